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

impl Tables {
    /// The deny list as the maps hold it, each entry with its slot.
    pub fn deny_entries(&self) -> Result<BTreeMap<Deny, u32>> {
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

    fn deny_insert(&mut self, entry: Deny, slot: u32) -> Result<()> {
        let d = direction_byte(entry.direction);
        let bits = 8 + u32::from(entry.prefix.len);
        match entry.prefix.addr {
            IpAddr::V4(a) => {
                self.deny_v4
                    .insert(&Key::new(bits, deny::key_v4(d, a.octets())), slot, 0)
            }
            IpAddr::V6(a) => {
                self.deny_v6
                    .insert(&Key::new(bits, deny::key_v6(d, a.octets())), slot, 0)
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
        for entry in new {
            let slot = free.next().context("no free deny-list slot")?;
            self.deny_stats
                .set(slot, zero()?, 0)
                .context("zeroing a deny-list counter")?;
            self.journal("deny", |_| Undo::Deny(entry, None))?;
            self.deny_insert(entry, slot)?;
            added += 1;
        }
        self.rebuild_deny_filter()?;
        Ok((added, removed))
    }

    /// Rewrites `DENY_FILTER` and the `DENY_ON` flags from the tries: every
    /// bucket an entry covers marked. After the tries change, so that a
    /// bucket is marked by the time a lookup can find its new entry, and
    /// cleared only once its entries are gone.
    pub(super) fn rebuild_deny_filter(&mut self) -> Result<()> {
        let entries = self.deny_entries()?;
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
        self.set_setting(settings::DENY_ON, flags, "the deny-list flags")
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
