//! The deny list's tables: `DENY_V4` and `DENY_V6` (LPM tries keyed by the
//! direction byte and the prefix, valued with the entry's slot) and
//! `DENY_STATS` (per-CPU packets and bytes by slot); `DENY_ON` in
//! `SETTINGS` while there is an entry.

use super::*;
use crate::config::{Deny, DenyDirection};
use pop_forwarder_common::{MAX_DENY, deny};

/// One entry as `deny list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DenyEntry {
    pub direction: DenyDirection,
    pub prefix: String,
    pub packets: u64,
    pub bytes: u64,
}

fn widen(v4: &[u8]) -> [u8; 16] {
    let mut w = [0; 16];
    w[..4].copy_from_slice(v4);
    w
}

fn direction_byte(d: DenyDirection) -> u8 {
    match d {
        DenyDirection::Source => deny::SOURCE,
        DenyDirection::Destination => deny::DESTINATION,
    }
}

fn direction_of(byte: u8) -> Option<DenyDirection> {
    match byte {
        deny::SOURCE => Some(DenyDirection::Source),
        deny::DESTINATION => Some(DenyDirection::Destination),
        _ => None,
    }
}

/// The entries of `list` that answer for every address of each IPv4 /24
/// or IPv6 /48 they cover (`deny::DECIDES`): that long or shorter, with no
/// other entry of their family and direction inside them.
fn deciding<'a>(list: impl Iterator<Item = &'a Deny>) -> HashSet<Deny> {
    // By family, direction, network and length (an IPv4 network in the
    // top 32 bits, so that lengths count alike): whatever lies inside an
    // entry comes right after it.
    let mut all: Vec<(bool, bool, u128, u8, &Deny)> = list
        .map(|e| {
            let (v6, net) = match e.prefix.addr {
                IpAddr::V4(a) => (false, u128::from(u32::from(a)) << 96),
                IpAddr::V6(a) => (true, u128::from(a)),
            };
            (
                v6,
                e.direction == DenyDirection::Destination,
                net,
                e.prefix.len,
                e,
            )
        })
        .collect();
    all.sort_unstable_by_key(|&(v6, d, net, len, _)| (v6, d, net, len));
    let mut out = HashSet::new();
    for (i, &(v6, direction, net, len, entry)) in all.iter().enumerate() {
        let last = net | u128::MAX.checked_shr(len.into()).unwrap_or(0);
        let inside = all
            .get(i + 1)
            .is_some_and(|&(f, d, next, ..)| f == v6 && d == direction && next <= last);
        let cached = if v6 {
            deny::CACHED_LEN_V6
        } else {
            deny::CACHED_LEN_V4
        };
        if len <= cached && !inside {
            out.insert(*entry);
        }
    }
    out
}

impl Tables {
    /// The deny list as the maps hold it, each entry with its slot.
    pub fn deny_entries(&self) -> Result<BTreeMap<Deny, u32>> {
        let mut out = self.deny_values()?;
        for value in out.values_mut() {
            *value &= deny::SLOT_MASK;
        }
        Ok(out)
    }

    /// The deny list as the maps hold it, each entry with its tries' value
    /// (its slot, and `deny::DECIDES`).
    fn deny_values(&self) -> Result<BTreeMap<Deny, u32>> {
        let mut out = BTreeMap::new();
        for item in self.deny_v4.iter() {
            let (key, slot) = item.context("reading DENY_V4")?;
            let data = key.data();
            let Some(direction) = direction_of(data[0]) else {
                continue;
            };
            let addr: [u8; 4] = data[1..5].try_into().expect("4 bytes");
            let prefix = Prefix::containing(IpAddr::from(addr), (key.prefix_len() - 8) as u8)
                .context("a DENY_V4 key")?;
            out.insert(Deny { direction, prefix }, slot);
        }
        for item in self.deny_v6.iter() {
            let (key, slot) = item.context("reading DENY_V6")?;
            let data = key.data();
            let Some(direction) = direction_of(data[0]) else {
                continue;
            };
            let addr: [u8; 16] = data[1..17].try_into().expect("16 bytes");
            let prefix = Prefix::containing(IpAddr::from(addr), (key.prefix_len() - 8) as u8)
                .context("a DENY_V6 key")?;
            out.insert(Deny { direction, prefix }, slot);
        }
        Ok(out)
    }

    /// Puts `entry` in its trie with `value` (its slot, marks).
    fn deny_insert(&mut self, entry: Deny, value: u32) -> Result<()> {
        let d = direction_byte(entry.direction);
        let bits = 8 + u32::from(entry.prefix.len);
        match entry.prefix.addr {
            IpAddr::V4(a) => {
                self.deny_v4
                    .insert(&Key::new(bits, deny::key_v4(d, a.octets())), value, 0)
            }
            IpAddr::V6(a) => {
                self.deny_v6
                    .insert(&Key::new(bits, deny::key_v6(d, a.octets())), value, 0)
            }
        }
        .with_context(|| format!("adding {entry} to the deny list"))
    }

    fn deny_remove(&mut self, entry: Deny) -> Result<()> {
        let d = direction_byte(entry.direction);
        let bits = 8 + u32::from(entry.prefix.len);
        let removed = match entry.prefix.addr {
            IpAddr::V4(a) => self
                .deny_v4
                .remove(&Key::new(bits, deny::key_v4(d, a.octets()))),
            IpAddr::V6(a) => self
                .deny_v6
                .remove(&Key::new(bits, deny::key_v6(d, a.octets()))),
        };
        match removed {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {entry} from the deny list")),
        }
    }

    /// Takes back one deny-list write: the entry as it was (absent, or in
    /// its slot).
    pub(super) fn undo_deny(&mut self, entry: Deny, slot: Option<u32>) -> Result<()> {
        match slot {
            Some(slot) => self.deny_insert(entry, slot),
            None => self.deny_remove(entry),
        }
    }

    /// Makes the deny list exactly `want` (journaled): entries that go are
    /// removed first, new ones get free slots, their counters zeroed.
    /// Entries that stay keep their slots and counters. Returns (added,
    /// removed).
    pub fn apply_deny(&mut self, want: &[Deny]) -> Result<(usize, usize)> {
        if want.len() > MAX_DENY as usize {
            bail!(
                "the deny list holds at most {MAX_DENY} entries, not {}",
                want.len()
            );
        }
        let have = self.deny_entries()?;
        let wanted: HashSet<Deny> = want.iter().copied().collect();
        let mut removed = 0;
        for (&entry, &slot) in &have {
            if !wanted.contains(&entry) {
                self.journal("deny", |_| Undo::Deny(entry, Some(slot)))?;
                self.deny_remove(entry)?;
                removed += 1;
            }
        }
        let used: HashSet<u32> = have
            .iter()
            .filter(|(e, _)| wanted.contains(e))
            .map(|(_, s)| *s)
            .collect();
        let mut free = (0..MAX_DENY).filter(|s| !used.contains(s));
        let mut added = 0;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let zero = || {
            PerCpuValues::try_from(vec![TrafficCounter::default(); cpus])
                .context("zeroed per-CPU counters")
        };
        let new: Vec<Deny> = want
            .iter()
            .copied()
            .filter(|e| !have.contains_key(e))
            .collect();
        // New entries go in marked as they will be once the list is
        // whole (`rebuild_deny_filter` then rewrites only the old ones
        // whose mark changed).
        let decides = deciding(want.iter());
        for entry in new {
            let slot = free.next().context("no free deny-list slot")?;
            self.deny_stats
                .set(slot, zero()?, 0)
                .context("zeroing a deny-list counter")?;
            self.journal("deny", |_| Undo::Deny(entry, None))?;
            let mark = if decides.contains(&entry) {
                deny::DECIDES
            } else {
                0
            };
            self.deny_insert(entry, slot | mark)?;
            added += 1;
        }
        self.rebuild_deny_filter()?;
        Ok((added, removed))
    }

    /// Rewrites `DENY_FILTER` and the `DENY_ON` flags from the tries: every
    /// bucket an entry covers marked. After the tries change, so that a
    /// bucket is marked by the time a lookup can find its new entry, and
    /// cleared only once its entries are gone. Then marks the entries that
    /// answer for whole /24s (`deny::DECIDES`) and moves the list's
    /// generation on, which retires every answer the program cached.
    pub(super) fn rebuild_deny_filter(&mut self) -> Result<()> {
        let entries = self.mark_deciding_entries()?;
        self.deny_len.set(Some(entries.len()));
        let mut words = vec![0u32; 2 * deny::FILTER_WORDS as usize];
        let mut flags = if entries.is_empty() { 0 } else { deny::ON };
        for entry in entries.keys() {
            let (family, addr) = match entry.prefix.addr {
                IpAddr::V4(a) => (4, widen(a.octets().as_slice())),
                IpAddr::V6(a) => (6, a.octets()),
            };
            let direction = direction_byte(entry.direction);
            if !deny::mark(&mut words, family, direction, &addr, entry.prefix.len) {
                flags |= if direction == deny::SOURCE {
                    deny::V6_SOURCE_UNFILTERED
                } else {
                    deny::V6_DESTINATION_UNFILTERED
                };
            }
        }
        if self.deny_filter.is_none() {
            self.deny_filter = Some(Mmap::new(&self.deny_filter_map, names::DENY_FILTER, 8)?);
        }
        let filter = self
            .deny_filter
            .as_mut()
            .expect("mapped above")
            .slice::<u32>();
        if filter.len() != words.len() {
            bail!(
                "map {} holds {} words, not {}",
                names::DENY_FILTER,
                filter.len(),
                words.len()
            );
        }
        filter.copy_from_slice(&words);
        self.set_setting(settings::DENY_ON, flags, "the deny-list flags")?;
        // Not journaled: a generation taken back would revive answers
        // cached from the change being taken back.
        let generation = self
            .settings
            .get(&settings::DENY_GENERATION, 0)
            .context("reading the deny list's generation")?;
        self.settings
            .set(settings::DENY_GENERATION, generation.wrapping_add(1), 0)
            .context("writing the deny list's generation")
    }

    /// Gives `deny::DECIDES` to the IPv4 entries of /24 or shorter and the
    /// IPv6 ones of /48 or shorter with no other entry of their direction
    /// inside them, and takes it from the others: such an entry is the
    /// longest match of every address of the /24s (/48s) it covers.
    /// Derived from the list, so not journaled (a change taken back
    /// rebuilds it). Returns the list with each entry's slot.
    fn mark_deciding_entries(&mut self) -> Result<BTreeMap<Deny, u32>> {
        let values = self.deny_values()?;
        let decides = deciding(values.keys());
        for (entry, &value) in &values {
            let want = if decides.contains(entry) {
                value | deny::DECIDES
            } else {
                value & deny::SLOT_MASK
            };
            if want != value {
                self.deny_insert(*entry, want)
                    .with_context(|| format!("marking {entry} in the deny list"))?;
            }
        }
        Ok(values
            .into_iter()
            .map(|(e, v)| (e, v & deny::SLOT_MASK))
            .collect())
    }

    /// How many entries the deny list has (counted once per handle, then
    /// kept by this handle's changes: a scrape must not walk 100,000).
    pub fn deny_len(&self) -> Result<usize> {
        if let Some(n) = self.deny_len.get() {
            return Ok(n);
        }
        let n = self.deny_entries()?.len();
        self.deny_len.set(Some(n));
        Ok(n)
    }

    /// The deny list with each entry's packets and bytes.
    pub fn deny_list(&self) -> Result<Vec<DenyEntry>> {
        let mut out = Vec::new();
        for (entry, slot) in self.deny_entries()? {
            let per_cpu = self
                .deny_stats
                .get(&slot, 0)
                .context("reading deny-list counters")?;
            out.push(DenyEntry {
                direction: entry.direction,
                prefix: entry.prefix.to_string(),
                packets: per_cpu.iter().map(|t| t.packets).sum(),
                bytes: per_cpu.iter().map(|t| t.bytes).sum(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(direction: DenyDirection, prefix: &str) -> Deny {
        Deny {
            direction,
            prefix: prefix.parse().unwrap(),
        }
    }

    /// An entry decides its /24s (IPv6: /48s) unless another of its
    /// family and direction lies inside it, or it is longer than /24
    /// (/48).
    #[test]
    fn entries_decide_the_24s_nothing_else_cuts() {
        use DenyDirection::{Destination as D, Source as S};
        let list = [
            d(S, "10.0.0.0/16"),
            d(S, "10.0.7.0/24"),
            d(S, "10.1.0.0/16"),
            d(D, "10.1.2.3/32"),
            d(D, "10.2.0.0/15"),
            d(D, "10.3.255.255/32"),
            d(D, "10.4.0.0/24"),
            d(S, "10.4.0.0/25"),
            d(S, "2001:db8::/32"),
            d(S, "2001:db9::/32"),
            d(S, "2001:db9:0:1::/64"),
            d(D, "2001:db9::/32"),
            d(D, "2001:dba:7::/48"),
            d(D, "2001:dba:8::/49"),
            d(S, "0.0.0.0/0"),
        ];
        let mut got: Vec<String> = deciding(list.iter())
            .iter()
            .map(|e| e.to_string())
            .collect();
        got.sort();
        // 0.0.0.0/0 by source holds the other IPv4 source entries, so it
        // decides nothing (they still decide theirs); the IPv6 ones lie
        // inside it too, but are of another family.
        let mut want: Vec<String> = [
            d(S, "10.0.7.0/24"),
            d(S, "10.1.0.0/16"),
            d(D, "10.4.0.0/24"),
            d(S, "2001:db8::/32"),
            d(D, "2001:db9::/32"),
            d(D, "2001:dba:7::/48"),
        ]
        .iter()
        .map(|e| e.to_string())
        .collect();
        want.sort();
        assert_eq!(got, want);
    }
}
