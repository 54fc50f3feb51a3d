//! VIP steering's tables: cache nodes, VIPs, their Maglev tables, the
//! connection table, and the outer sources of IP-in-IP.

use super::*;
use pop_forwarder_common::steering::{self as steering_layout, FlowKeyV4};

/// Where a flow to a VIP goes (`Tables::lookup_flow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLookup {
    /// The VIP's slot.
    pub vip: u32,
    /// The node slot the connection table pins the flow to, if it does.
    pub existing: Option<u32>,
    /// The node slot a new flow gets (its VIP's Maglev table).
    pub new: u32,
    /// The entry of the Maglev table that says so.
    pub maglev_slot: u32,
}

impl Tables {
    /// Makes the local-address sets exactly `addrs`.
    /// Seeds the flow hash and turns the VIP lookup on or off.
    /// How long connection-table entries may stay idle (seconds; 0:
    /// for ever), TCP and other protocols.
    pub fn set_flow_idle(&mut self, tcp: u32, udp: u32) -> Result<()> {
        self.set_setting(settings::FLOW_IDLE_TCP, tcp, "the TCP flow idle timeout")?;
        self.set_setting(settings::FLOW_IDLE_UDP, udp, "the UDP flow idle timeout")
    }

    pub fn set_steering(&mut self, seed: u32, on: bool) -> Result<()> {
        self.set_setting(settings::FLOW_HASH_SEED, seed, "the flow-hash seed")?;
        self.set_setting(settings::STEERING_ON, u32::from(on), "steering on or off")
    }

    pub fn flow_hash_seed(&self) -> Result<u32> {
        Ok(self.settings.get(&settings::FLOW_HASH_SEED, 0)?)
    }

    /// Writes cache node `id`, resetting its counters if the slot was free.
    pub fn write_node(&mut self, id: u32, node: &CacheNode) -> Result<()> {
        let was_in_use = self.cache_nodes.get(&id, 0).is_ok_and(|n| n.flags != 0);
        if !was_in_use {
            let zeros = vec![TrafficCounter::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
            self.node_stats
                .set(id, PerCpuValues::try_from(zeros)?, 0)
                .context("resetting node counters")?;
        }
        // IP-in-IP nodes leave by their route's next hop, which has its own
        // egress entry.
        if node.flags & pop_forwarder_common::steering::NODE_F_IPIP == 0 {
            self.add_egress(node.ifindex)?;
        }
        self.journal_node(id)?;
        self.cache_nodes
            .set(id, node, 0)
            .with_context(|| format!("writing cache node {id}"))
    }

    /// Writes an IP-in-IP outer source address (slot ENCAP_SOURCE_V4 or
    /// ENCAP_SOURCE_V6).
    pub fn set_encap_source(&mut self, slot: u32, addr: [u8; 16]) -> Result<()> {
        let old = self.encap_sources.get(&slot, 0).unwrap_or([0; 16]);
        if old == addr {
            return Ok(());
        }
        self.journal("encap", |_| Undo::Encap(slot, old))?;
        self.encap_sources
            .set(slot, addr, 0)
            .context("writing an encapsulation source")
    }

    /// Frees node slot `id`: flows pinned to it go back to their VIP's
    /// Maglev table, and their connection-table entries are deleted, so
    /// that a node given the slot later inherits none of them (the program
    /// also deletes such an entry when the flow's next packet meets it).
    /// A rollback puts the node back, not the entries: its flows then
    /// follow the Maglev table.
    pub fn remove_node(&mut self, id: u32) -> Result<()> {
        let free: CacheNode = bytemuck::Zeroable::zeroed();
        self.journal_node(id)?;
        self.cache_nodes
            .set(id, free, 0)
            .with_context(|| format!("removing cache node {id}"))?;
        self.purge_flows_of(id)
    }

    /// Deletes the connection-table entries that name node slot `id`. (No
    /// new one can name it: the slot is free, and the program writes
    /// entries only for usable nodes.)
    fn purge_flows_of(&mut self, id: u32) -> Result<()> {
        // Evicted or deleted by the program meanwhile: gone too.
        let gone = |r: Result<(), aya::maps::MapError>| match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("deleting a removed node's flows"),
        };
        let v6: Vec<(FlowKey, FlowEntry)> =
            lookup_all(self.flows_fd.as_fd()).context("reading the IPv6 connection table")?;
        for (key, _) in v6.iter().filter(|(_, e)| e.node == id) {
            gone(self.flows.remove(key))?;
        }
        // A set is written back whole: a flow the program writes into
        // another slot of it meanwhile is lost (it then follows its VIP's
        // Maglev table), as when two CPUs write one slot.
        for (index, mut set) in self.flow_sets_v4()?.into_iter().enumerate() {
            let mut changed = false;
            for slot in &mut set.slots {
                if slot.flow().is_some() && slot.entry.node == id {
                    slot.key[1] = 0;
                    changed = true;
                }
            }
            if changed {
                self.flows_v4
                    .set(index as u32, set, 0)
                    .context("deleting a removed node's flows")?;
            }
        }
        Ok(())
    }

    /// Every set of the IPv4 connection table, in index order.
    fn flow_sets_v4(&self) -> Result<Vec<FlowSetV4>> {
        array_all(self.flows_v4_fd.as_fd(), steering_layout::FLOW_SETS_V4)
            .context("reading the IPv4 connection table")
    }

    /// Every entry of the connection tables, IPv6 and IPv4.
    #[allow(clippy::type_complexity)]
    fn flow_entries(&self) -> Result<(Vec<(FlowKey, FlowEntry)>, Vec<(FlowKeyV4, FlowEntry)>)> {
        let v4 = self
            .flow_sets_v4()?
            .iter()
            .flat_map(|set| set.slots)
            .filter_map(|slot| Some((FlowKeyV4::from_words(slot.flow()?), slot.entry)))
            .collect();
        Ok((
            lookup_all(self.flows_fd.as_fd()).context("reading the IPv6 connection table")?,
            v4,
        ))
    }

    pub(super) fn journal_node(&mut self, id: u32) -> Result<()> {
        self.journal("node", |t| {
            Undo::Node(
                id,
                Box::new(
                    t.cache_nodes
                        .get(&id, 0)
                        .unwrap_or(bytemuck::Zeroable::zeroed()),
                ),
            )
        })
    }

    pub fn node(&self, id: u32) -> Result<CacheNode> {
        Ok(self.cache_nodes.get(&id, 0)?)
    }

    /// Writes VIP slot `index`: its Maglev table (node ids), then the VIP
    /// entry that points the program at it; the slot's counters start at 0.
    pub fn write_vip(&mut self, index: u32, key: &VipKey, table: &[u32]) -> Result<()> {
        self.write_maglev(index, table, None)?;
        let zeros = vec![TrafficCounter::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
        self.vip_stats
            .set(index, PerCpuValues::try_from(zeros)?, 0)
            .context("resetting VIP counters")?;
        self.insert_vip(index, key, table.len())
    }

    /// Replaces the Maglev table of a VIP in slot `index`, writing only the
    /// elements that differ from `old` (what the slot holds now). Packets
    /// meanwhile see each entry old or new, every one a node of the pool.
    pub fn update_vip(
        &mut self,
        index: u32,
        key: &VipKey,
        old: &[u32],
        table: &[u32],
    ) -> Result<()> {
        self.write_maglev(index, table, Some(old))?;
        if old.len() != table.len() {
            self.insert_vip(index, key, table.len())?;
        }
        Ok(())
    }

    /// Takes a VIP out of the program's VIP table: its packets are routed
    /// like any others from then on.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.journal_vip(key)?;
        match self.vips.remove(key) {
            Ok(()) => self.vip_address_changed(&key.addr),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing a VIP"),
        }
    }

    /// Moves the VIP_FILTER bucket of `addr` to its next epoch, after a VIP
    /// of that address came or went: connection-table entries written
    /// before learn again which VIP takes their flow (or that none does)
    /// from their next packet. A bucket never goes back to 0, so that an
    /// epoch is never seen twice (an address whose last VIP went only
    /// costs its packets a lookup that misses).
    pub(super) fn vip_address_changed(&mut self, addr: &[u8; 16]) -> Result<()> {
        let bucket = steering_layout::vip_bucket(pop_forwarder_common::maglev::address_words(addr));
        let epoch = self
            .vip_filter
            .get(&bucket, 0)
            .context("reading the VIP filter")?;
        self.vip_filter
            .set(bucket, steering_layout::next_epoch(epoch), 0)
            .context("writing the VIP filter")
    }

    pub(super) fn journal_vip(&mut self, key: &VipKey) -> Result<()> {
        let key = *key;
        self.journal("vip", |t| Undo::Vip(key, t.vips.get(&key, 0).ok()))
    }

    pub(super) fn insert_vip(&mut self, index: u32, key: &VipKey, len: usize) -> Result<()> {
        self.journal_vip(key)?;
        // A new VIP's address is let through the filter before the VIP is
        // written, and moves to a new epoch after: entries written in
        // between, under the old VIPs, are checked again.
        let new = self.vips.get(key, 0).is_err();
        if new {
            self.vip_address_changed(&key.addr)?;
        }
        self.vips
            .insert(
                key,
                VipInfo {
                    index,
                    table_size: len as u32,
                },
                0,
            )
            .context("writing the VIP")?;
        if new {
            self.vip_address_changed(&key.addr)?;
        }
        Ok(())
    }

    pub(super) fn write_maglev(
        &mut self,
        index: u32,
        table: &[u32],
        old: Option<&[u32]>,
    ) -> Result<()> {
        if table.is_empty() || table.len() > MAGLEV_STRIDE as usize {
            bail!("a Maglev table must hold 1 to {MAGLEV_STRIDE} entries");
        }
        let old = old.filter(|o| o.len() == table.len());
        let base = index * MAGLEV_STRIDE;
        // The stride is odd, so a VIP's table starts on either half of an
        // element; write whole elements, keeping the neighbour's half.
        let first = dir24_layout::element_of(base);
        let last = dir24_layout::element_of(base + table.len() as u32 - 1);
        let ours = |entry: u32| entry >= base && entry < base + table.len() as u32;
        for element in first..=last {
            let lo_entry = element * dir24_layout::ENTRIES_PER_ELEMENT;
            if let Some(old) = old {
                let same = |entry: u32| {
                    !ours(entry) || old[(entry - base) as usize] == table[(entry - base) as usize]
                };
                if same(lo_entry) && same(lo_entry + 1) {
                    continue;
                }
            }
            let current = self.maglev.get(&element, 0).unwrap_or(0);
            self.journal("maglev", |_| Undo::Maglev(element, current))?;
            let half = |entry: u32, shift: u32| -> u64 {
                if ours(entry) {
                    u64::from(table[(entry - base) as usize]) << shift
                } else {
                    current & (0xffff_ffffu64 << shift)
                }
            };
            self.maglev
                .set(element, half(lo_entry, 0) | half(lo_entry + 1, 32), 0)
                .context("writing a Maglev table")?;
        }
        Ok(())
    }

    /// The VIPs as the program sees them.
    pub fn vips(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        let mut v: Vec<_> = self
            .vips
            .iter()
            .collect::<Result<_, _>>()
            .context("reading VIPs")?;
        v.sort_by_key(|(_, info)| info.index);
        Ok(v)
    }

    /// Entry `slot` of VIP slot `index`'s Maglev table.
    /// The first `size` entries of VIP slot `index`'s Maglev table, as the
    /// program reads them.
    pub fn maglev_table(&self, index: u32, size: u32) -> Result<Vec<u32>> {
        let first = index * MAGLEV_STRIDE;
        let mut table = Vec::with_capacity(size as usize);
        let mut element = None;
        for at in first..first + size {
            let e = dir24_layout::element_of(at);
            let value = match element {
                Some((i, v)) if i == e => v,
                _ => {
                    let v = self.maglev.get(&e, 0).context("reading a Maglev table")?;
                    element = Some((e, v));
                    v
                }
            };
            table.push(dir24_layout::entry_in(value, at));
        }
        Ok(table)
    }

    pub fn maglev_entry(&self, index: u32, slot: u32) -> Result<u32> {
        let at = index * MAGLEV_STRIDE + slot;
        let element = self.maglev.get(&dir24_layout::element_of(at), 0)?;
        Ok(dir24_layout::entry_in(element, at))
    }

    /// What the program does with a new or known flow to a VIP, read from
    /// the tables it reads, the way it reads them (the common crate's VIP
    /// key order, flow hash and Maglev position): None if no VIP takes it.
    pub fn lookup_flow(&self, flow: &FlowKey) -> Result<Option<FlowLookup>> {
        let key = VipKey {
            addr: flow.dst,
            port: flow.dst_port,
            protocol: flow.protocol,
            family: flow.family,
        };
        let vip = match self.vips.get(&key, 0) {
            Ok(vip) => vip,
            Err(_) => match self.vips.get(&key.any_port(), 0) {
                Ok(vip) => vip,
                Err(_) => return Ok(None),
            },
        };
        let hash = pop_forwarder_common::maglev::flow_hash(
            u64::from(self.flow_hash_seed()?),
            &flow.src,
            &flow.dst,
            flow.src_port,
            flow.dst_port,
            flow.protocol,
        );
        let position = vip.maglev_position(hash);
        let element = self.maglev.get(&dir24_layout::element_of(position), 0)?;
        Ok(Some(FlowLookup {
            vip: vip.index,
            existing: self.flow_node(flow)?,
            new: dir24_layout::entry_in(element, position),
            maglev_slot: position - vip.index * MAGLEV_STRIDE,
        }))
    }

    /// Live connection-table entries per node slot: those the program would
    /// still follow (seen within their protocol's idle timeout). A drained
    /// node (weight 0) whose count is 0 has no flow left.
    pub fn live_flows(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let (v6, v4) = self.flow_entries()?;
        let entries = v6
            .into_iter()
            .map(|(k, e)| (k.protocol, e))
            .chain(v4.into_iter().map(|(k, e)| (k.protocol, e)));
        let idle =
            |index| -> Result<u64> { Ok(u64::from(self.settings.get(&index, 0)?) * 1_000_000_000) };
        let (tcp, other) = (
            idle(settings::FLOW_IDLE_TCP)?,
            idle(settings::FLOW_IDLE_UDP)?,
        );
        let now = monotonic_ns();
        let mut out = std::collections::HashMap::new();
        for (protocol, entry) in entries {
            let timeout = if protocol == 6 { tcp } else { other };
            if timeout == 0 || now.saturating_sub(entry.last_seen_ns) <= timeout {
                *out.entry(entry.node).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// The node a known flow is pinned to (its entry may have expired:
    /// the program then treats it as absent).
    pub fn flow_node(&self, key: &FlowKey) -> Result<Option<u32>> {
        let entry = match key.v4() {
            Some(k) => {
                let words = k.words();
                let set = steering_layout::flow_set_v4(words, self.flow_hash_seed()?);
                let set = self
                    .flows_v4
                    .get(&set, 0)
                    .context("reading the IPv4 connection table")?;
                return Ok(set
                    .slots
                    .iter()
                    .find(|slot| slot.holds(words))
                    .map(|slot| slot.entry.node));
            }
            None => self.flows.get(key, 0),
        };
        match entry {
            Ok(entry) => Ok(Some(entry.node)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the connection table"),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
