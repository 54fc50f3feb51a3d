//! Typed access to the program's maps, from the loader (the maps of a freshly
//! loaded object) or from another process (the maps pinned in bpffs).
//!
//! Writers order their updates so that the program never sees a route whose
//! next hop is not fully written: next hop first, then the route; route
//! removed first, then the next hop.
//!
//! One concern a file: this one opens the maps and keeps the journal that
//! makes a change a transaction (and the settings); `routes`, `next_hops`,
//! `steering` and `stats` write and read their tables; `sys` holds the
//! syscalls aya lacks (batched lookups and updates, mmap). The imports below
//! serve them all (`use super::*`).

use crate::{
    config::{Ipv4Lookup, Ipv6Lookup, Route, RouteLookup, RouteMissPolicy},
    kernel::{self, Link, Neighbour},
    net::{Mac, Prefix, PrefixSet},
    plan::{GatewayKey, GroupKey, RoutePlan, Want, gateway_key, plan_routes},
};
use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{
    Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use pop_forwarder_common::{
    AF_INET, AF_INET6, Counter, INTERFACE_MAC_KNOWN, KERNEL_NEXT_HOP, LOCAL_NEXT_HOP,
    MAP_LAYOUT_VERSION, MAX_INTERFACES, MAX_NEXT_HOPS, MAX_ROUTES_V4, MAX_ROUTES_V6,
    NH_F_CONNECTED, NH_F_IN_USE, NH_F_MAC_STATIC, NH_F_MAC_VALID, NeighbourKey, NeighbourMac,
    NextHop, RouteKeyV4, RouteTarget, TrafficCounter, VlanKey,
    dir24::{self as dir24_layout, Dir24, Dir24Error, TBL8_GROUPS},
    dxr6::{self as dxr6_layout, Block, Dxr6, Dxr6Error, Tables6},
    ecmp::{self, NextHopGroup},
    map_names as names, settings,
    steering::{CacheNode, FlowEntry, FlowKey, FlowSetV4, MAGLEV_STRIDE, VipInfo, VipKey},
};
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
};

mod deny;
mod next_hops;
mod routes;
mod stats;
mod steering;
mod sys;

pub use deny::DenyEntry;
use next_hops::NextHopTable;
pub use next_hops::{
    NH_F_KERNEL, connected_next_hop, connected_routes, gateway_addr, gateway_next_hop,
    kernel_next_hop, resolve_next_hop,
};
pub use routes::RouteEntry;
pub use stats::{InterfaceStats, NextHopStats, Stats};
pub use steering::FlowLookup;
use sys::{Mmap, array_all, lookup_all, update_batch};

pub struct Tables {
    /// IPv4 routes by exact prefix: the record every writer consults.
    routes_v4: HashMap<MapData, RouteKeyV4, RouteTarget>,
    /// The IPv4 lookup trie, filled only when the program reads it.
    trie_v4: LpmTrie<MapData, [u8; 4], RouteTarget>,
    /// IPv6 routes by prefix: the record, and the lookup if so configured.
    routes_v6: LpmTrie<MapData, [u8; 16], RouteTarget>,
    /// Second descriptors of the route maps, for batch updates.
    routes_v4_fd: std::os::fd::OwnedFd,
    trie_v4_fd: std::os::fd::OwnedFd,
    routes_v6_fd: std::os::fd::OwnedFd,
    /// What the program reads for IPv4 (SETTINGS, read once: it is set
    /// before the first route and never changes).
    ipv4_lookup: Ipv4Lookup,
    /// What the program reads for IPv6 (likewise).
    ipv6_lookup: Ipv6Lookup,
    next_hops: Array<MapData, NextHop>,
    next_hop_stats: PerCpuArray<MapData, TrafficCounter>,
    local_v4: HashMap<MapData, [u8; 4], u8>,
    local_v6: HashMap<MapData, [u8; 16], u8>,
    egress: DevMapHash<MapData>,
    counters: PerCpuArray<MapData, u64>,
    settings: Array<MapData, u32>,
    tbl24: MapData,
    tbl8: MapData,
    /// The DIR-24-8 tables mapped into this process, once needed.
    dir24: Option<(Mmap, Mmap)>,
    chunks6: MapData,
    ranges6: MapData,
    /// The IPv6 range table mapped into this process with its host side,
    /// once needed.
    dxr6: Option<Dxr6Host>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    /// VIP_FILTER: per bucket of VIP addresses, 0 or its epoch.
    vip_filter: Array<MapData, u32>,
    maglev: Array<MapData, u64>,
    cache_nodes: Array<MapData, CacheNode>,
    /// The connection tables: IPv6 flows (an LRU hash), IPv4 flows (sets
    /// of slots in an array: `FlowSetV4`).
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flows_fd: std::os::fd::OwnedFd,
    flows_v4: Array<MapData, FlowSetV4>,
    flows_v4_fd: std::os::fd::OwnedFd,
    vip_stats: PerCpuArray<MapData, TrafficCounter>,
    node_stats: PerCpuArray<MapData, TrafficCounter>,
    encap_sources: Array<MapData, [u8; 16]>,
    interface_macs: Array<MapData, [u8; 8]>,
    next_hop_groups: Array<MapData, NextHopGroup>,
    neighbours: HashMap<MapData, NeighbourKey, NeighbourMac>,
    /// What `neighbours` holds, as this process wrote it (read from the map
    /// once, at the first sync): a sync compares against this copy rather
    /// than reading every entry back, two system calls each.
    neighbours_held: Option<std::collections::HashMap<NeighbourKey, [u8; 6]>>,
    vlans: HashMap<MapData, VlanKey, u8>,
    deny_v4: LpmTrie<MapData, pop_forwarder_common::deny::KeyV4, u32>,
    deny_v6: LpmTrie<MapData, pop_forwarder_common::deny::KeyV6, u32>,
    deny_stats: PerCpuArray<MapData, TrafficCounter>,
    deny_filter_map: MapData,
    /// DENY_FILTER mapped into this process, once used.
    deny_filter: Option<Mmap>,
    /// Slots freed lately, not to be reused before `GRACE` has passed.
    retired: Retired,
    /// Deny-list entries, as last counted by this handle.
    deny_len: std::cell::Cell<Option<usize>>,
    interface_stats: PerCpuArray<MapData, pop_forwarder_common::InterfaceCounter>,
    tx_errors: PerCpuArray<MapData, pop_forwarder_common::TxErrors>,
    /// How to take back the writes of the change under way (`begin`), newest
    /// last; None when no change is open.
    journal: Option<Vec<Undo>>,
    /// Walks over a whole route table so far (`route_table_scans`).
    scans: std::cell::Cell<u64>,
}

/// How to take back one write of a change. Tables the program writes
/// itself (counters, the connection table) are not journaled: a change that
/// resets a slot's counters leaves them reset when it is taken back.
///
/// A change of a million routes journals a million of these, so the values
/// much larger than a route's (a next hop, a cache node, an ECMP group of
/// 776 bytes), which few changes write, are boxed: an entry is 32 bytes,
/// where with the group inline it was 784 (`undo_entries_stay_small`).
#[derive(Debug, Clone)]
enum Undo {
    /// A route was inserted: remove it.
    RouteAdded(Prefix),
    /// A route pointed at this target: point it back (exact in DIR-24-8
    /// too: the same entries are overwritten again).
    RouteReplaced(Prefix, RouteTarget),
    /// A route was removed: insert it again (in DIR-24-8 a /24 cut up by
    /// longer prefixes may come back in another tbl8 group, with the same
    /// lookups).
    RouteRemoved(Prefix, RouteTarget),
    NextHop(u32, Box<NextHop>),
    /// An interface was added to the egress devmap: remove it.
    Egress(u32),
    Setting(u32, u32),
    Local(IpAddr, bool),
    Node(u32, Box<CacheNode>),
    Maglev(u32, u64),
    Vip(VipKey, Option<VipInfo>),
    Encap(u32, [u8; 16]),
    InterfaceMac(u32, [u8; 8]),
    Group(u32, Box<NextHopGroup>),
    /// A deny-list entry was added (None) or removed (its slot): put it
    /// back as it was.
    Deny(crate::config::Deny, Option<u32>),
}

/// How long a freed tbl8 group, next-hop slot or ECMP group slot rests
/// before it is reused: the RCU grace period the kernel would wait. A
/// lookup that read a route before its change may still read what the
/// route pointed at; XDP programs run in softirq with preemption (or, on
/// PREEMPT_RT, migration) disabled, for microseconds a packet, so once
/// 50 ms have passed no lookup can still hold the old pointer. Reusing the
/// slot sooner could send its packet to another route's next hop.
pub const GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// The IPv6 range table as this process edits it.
pub(super) struct Dxr6Host {
    chunks: Mmap,
    ranges: Mmap,
    dxr: Dxr6,
}

impl Dxr6Host {
    pub(super) fn parts(&mut self) -> (&mut Dxr6, Tables6<'_>) {
        (
            &mut self.dxr,
            Tables6 {
                chunks: self.chunks.slice(),
                ranges: self.ranges.slice(),
            },
        )
    }
}

/// Slots freed, with when, per kind: each reusable once `GRACE` has passed.
#[derive(Debug, Default)]
pub(super) struct Retired {
    /// Blocks of the IPv6 range table.
    pub(super) blocks: Vec<(Block, std::time::Instant)>,
    pub(super) groups: Vec<(u32, std::time::Instant)>,
    pub(super) next_hops: Vec<(u32, std::time::Instant)>,
    pub(super) ecmp: Vec<(u32, std::time::Instant)>,
}

/// Drops the entries of `list` older than `GRACE`, returning their slots.
pub(super) fn settled<T: Copy>(list: &mut Vec<(T, std::time::Instant)>) -> Vec<T> {
    let (old, young): (Vec<_>, Vec<_>) = list.iter().partition(|(_, at)| at.elapsed() >= GRACE);
    *list = young;
    old.into_iter().map(|(slot, _)| slot).collect()
}

/// Waits until the youngest entry of `list` is `GRACE` old.
pub(super) fn wait_out<T>(list: &[(T, std::time::Instant)]) {
    if let Some(youngest) = list.iter().map(|(_, at)| *at).max() {
        std::thread::sleep(GRACE.saturating_sub(youngest.elapsed()));
    }
}

fn typed<T>(map: Map, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

/// BPF_NOEXIST from linux/bpf.h: create only.
const BPF_NOEXIST: u64 = 1;

fn os_error(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

/// A map with a duplicate of its descriptor.
fn with_fd(map: (Map, String)) -> Result<((Map, String), std::os::fd::OwnedFd)> {
    let fd = match &map.0 {
        Map::LpmTrie(data) | Map::HashMap(data) | Map::LruHashMap(data) | Map::Array(data) => {
            data.fd().as_fd().try_clone_to_owned()
        }
        _ => bail!("map {} is not an LPM trie, a hash or an array", map.1),
    }
    .with_context(|| format!("duplicating the descriptor of map {}", map.1))?;
    Ok((map, fd))
}

/// The MapData of an array map (the DIR-24-8 tables are mmapped, not
/// accessed element by element).
fn array_data(map: (Map, String)) -> Result<MapData> {
    match map.0 {
        Map::Array(data) => Ok(data),
        _ => bail!("map {} is not an array", map.1),
    }
}

fn ifname(links: &[Link], ifindex: u32) -> String {
    links
        .iter()
        .find(|l| l.ifindex == ifindex)
        .map_or_else(|| format!("ifindex {ifindex}"), |l| l.name.clone())
}

trait FreeSlot {
    fn default_free() -> Self;
}

impl FreeSlot for NextHop {
    fn default_free() -> NextHop {
        bytemuck::Zeroable::zeroed()
    }
}

impl Tables {
    /// Takes the maps out of a loaded object (the loader, the program tests).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Tables> {
        Tables::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    /// The `MAP_LAYOUT_VERSION` recorded in the settings map pinned in
    /// `dir` (0: a build from before versions were recorded), read from
    /// that map alone: the other maps of another layout may not open as
    /// this build's types.
    pub fn pinned_layout_version(dir: &Path) -> Result<u32> {
        let path = dir.join(names::SETTINGS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data).with_context(|| format!("map {}", path.display()))?;
        let settings: Array<MapData, u32> =
            typed(map, names::SETTINGS).context("the pinned settings")?;
        settings
            .get(&settings::LAYOUT_VERSION, 0)
            .context("reading the map layout version")
    }

    /// Opens the maps an instance pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Tables> {
        Tables::open(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
        })
    }

    fn open(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Tables> {
        let mut take = |name: &str| get(name).map(|m| (m, name.to_owned()));
        macro_rules! open {
            ($name:expr) => {{
                let (map, name) = take($name)?;
                typed(map, &name)?
            }};
        }
        let (v4, routes_v4_fd) = with_fd(take(names::ROUTES_V4)?)?;
        let (trie4, trie_v4_fd) = with_fd(take(names::ROUTES_V4_TRIE)?)?;
        let (v6, routes_v6_fd) = with_fd(take(names::ROUTES_V6)?)?;
        let (flows, flows_fd) = with_fd(take(names::FLOWS)?)?;
        let (flows_v4, flows_v4_fd) = with_fd(take(names::FLOWS_V4)?)?;
        let settings: Array<MapData, u32> = open!(names::SETTINGS);
        let ipv4_lookup = match settings.get(&settings::IPV4_LOOKUP, 0)? {
            settings::IPV4_TRIE => Ipv4Lookup::Trie,
            _ => Ipv4Lookup::Dir24,
        };
        let ipv6_lookup = match settings.get(&settings::IPV6_LOOKUP, 0)? {
            settings::IPV6_TRIE => Ipv6Lookup::Trie,
            _ => Ipv6Lookup::Dxr,
        };
        Ok(Tables {
            routes_v4: typed(v4.0, &v4.1)?,
            trie_v4: typed(trie4.0, &trie4.1)?,
            routes_v6: typed(v6.0, &v6.1)?,
            routes_v4_fd,
            trie_v4_fd,
            routes_v6_fd,
            ipv4_lookup,
            ipv6_lookup,
            next_hops: open!(names::NEXT_HOPS),
            next_hop_stats: open!(names::NEXT_HOP_STATS),
            local_v4: open!(names::LOCAL_V4),
            local_v6: open!(names::LOCAL_V6),
            egress: open!(names::EGRESS_PORTS),
            counters: open!(names::COUNTERS),
            settings,
            tbl24: array_data(take(names::IPV4_TBL24)?)?,
            tbl8: array_data(take(names::IPV4_TBL8)?)?,
            dir24: None,
            chunks6: array_data(take(names::IPV6_CHUNKS)?)?,
            ranges6: array_data(take(names::IPV6_RANGES)?)?,
            dxr6: None,
            vips: open!(names::VIPS),
            vip_filter: open!(names::VIP_FILTER),
            maglev: open!(names::MAGLEV),
            cache_nodes: open!(names::CACHE_NODES),
            flows: typed(flows.0, &flows.1)?,
            flows_fd,
            flows_v4: typed(flows_v4.0, &flows_v4.1)?,
            flows_v4_fd,
            vip_stats: open!(names::VIP_STATS),
            node_stats: open!(names::NODE_STATS),
            encap_sources: open!(names::ENCAP_SOURCES),
            interface_macs: open!(names::INTERFACE_MACS),
            next_hop_groups: open!(names::NEXT_HOP_GROUPS),
            neighbours: open!(names::NEIGHBOURS),
            neighbours_held: None,
            vlans: open!(names::VLANS),
            deny_v4: open!(names::DENY_V4),
            deny_v6: open!(names::DENY_V6),
            deny_stats: open!(names::DENY_STATS),
            deny_filter_map: array_data(take(names::DENY_FILTER)?)?,
            deny_filter: None,
            retired: Retired::default(),
            deny_len: std::cell::Cell::new(None),
            interface_stats: open!(names::INTERFACE_STATS),
            tx_errors: open!(names::TX_ERRORS),
            journal: None,
            scans: std::cell::Cell::new(0),
        })
    }

    /// How many times this handle walked over a whole route table: a change
    /// must cost a constant number of walks, whatever its size (a walk per
    /// route would make big changes quadratic). For the tests.
    pub fn route_table_scans(&self) -> u64 {
        self.scans.get()
    }

    fn scanned(&self) {
        self.scans.set(self.scans.get() + 1);
    }

    /// Opens a change: from here every table write is journaled, so that
    /// `rollback` can take the change back whole.
    pub fn begin(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Closes the change: its writes stay. Returns how many table writes it
    /// made.
    pub fn commit(&mut self) -> usize {
        self.journal.take().map_or(0, |j| j.len())
    }

    /// Takes back every write since `begin`, newest first, and closes the
    /// change. Returns the undo steps that failed (each is also logged):
    /// none, normally.
    pub fn rollback(&mut self) -> usize {
        let Some(journal) = self.journal.take() else {
            return 0;
        };
        let mut failed = 0;
        let deny = journal.iter().any(|u| matches!(u, Undo::Deny(..)));
        for undo in journal.into_iter().rev() {
            if let Err(e) = self.undo(&undo) {
                log::error!("taking back a table write ({undo:?}): {e:#}");
                failed += 1;
            }
        }
        // The deny filter follows the tries it fronts.
        if deny && let Err(e) = self.rebuild_deny_filter() {
            log::error!("rebuilding the deny filter: {e:#}");
            failed += 1;
        }
        failed
    }

    fn undo(&mut self, undo: &Undo) -> Result<()> {
        match *undo {
            Undo::RouteAdded(prefix) => self.remove_route(prefix),
            Undo::RouteReplaced(prefix, target) => self.write_route(prefix, target),
            Undo::RouteRemoved(prefix, target) => self.insert_route(prefix, target.next_hop),
            Undo::NextHop(id, ref nh) => Ok(self.next_hops.set(id, **nh, 0)?),
            Undo::Egress(ifindex) => Ok(self.egress.remove(ifindex)?),
            Undo::Setting(index, value) => Ok(self.settings.set(index, value, 0)?),
            Undo::Local(addr, present) => match (addr, present) {
                (IpAddr::V4(a), true) => Ok(self.local_v4.insert(a.octets(), 1, 0)?),
                (IpAddr::V6(a), true) => Ok(self.local_v6.insert(a.octets(), 1, 0)?),
                (IpAddr::V4(a), false) => Ok(self.local_v4.remove(&a.octets())?),
                (IpAddr::V6(a), false) => Ok(self.local_v6.remove(&a.octets())?),
            },
            Undo::Node(id, ref node) => Ok(self.cache_nodes.set(id, **node, 0)?),
            Undo::Maglev(element, value) => Ok(self.maglev.set(element, value, 0)?),
            Undo::Vip(key, Some(info)) => {
                self.vips.insert(key, info, 0)?;
                self.vip_address_changed(&key.addr)
            }
            Undo::Vip(key, None) => {
                self.vips.remove(&key)?;
                self.vip_address_changed(&key.addr)
            }
            Undo::Encap(slot, addr) => Ok(self.encap_sources.set(slot, addr, 0)?),
            Undo::InterfaceMac(ifindex, value) => Ok(self.interface_macs.set(ifindex, value, 0)?),
            Undo::Group(index, ref group) => Ok(self.next_hop_groups.set(index, **group, 0)?),
            Undo::Deny(entry, slot) => self.undo_deny(entry, slot),
        }
    }

    /// Records how to take back a write about to be made, if a change is
    /// open. `kind` names the write for failure injection (`failpoint`).
    fn journal(&mut self, kind: &'static str, undo: impl FnOnce(&Self) -> Undo) -> Result<()> {
        self.failpoint(kind)?;
        let undo = self.journal.is_some().then(|| undo(self));
        if let (Some(undo), Some(journal)) = (undo, &mut self.journal) {
            journal.push(undo);
        }
        Ok(())
    }

    /// Fails here if the tests asked for it (`failpoint`), inside a change.
    fn failpoint(&self, kind: &'static str) -> Result<()> {
        match self.journal {
            Some(_) => crate::failpoint::hit(kind),
            None => Ok(()),
        }
    }

    /// Records the id of the instance's XDP program: the tracepoint program
    /// counts that program's refused redirects.
    pub fn set_xdp_prog_id(&mut self, id: u32) -> Result<()> {
        self.set_setting(settings::XDP_PROG_ID, id, "the XDP program's id")
    }

    /// Writes one slot of SETTINGS, journaled.
    /// (A value already there is not written again.)
    fn set_setting(&mut self, index: u32, value: u32, what: &str) -> Result<()> {
        let old = self.settings.get(&index, 0).unwrap_or(0);
        if old == value {
            return Ok(());
        }
        self.journal("setting", |_| Undo::Setting(index, old))?;
        self.settings
            .set(index, value, 0)
            .with_context(|| format!("writing {what}"))
    }

    /// How the program looks IPv4 up. Set once, before any IPv4 route.
    pub fn set_ipv4_lookup(&mut self, lookup: Ipv4Lookup) -> Result<()> {
        if self.routes_v4.keys().next().is_some() {
            bail!("the IPv4 lookup can only be chosen while there are no IPv4 routes");
        }
        let value = match lookup {
            Ipv4Lookup::Dir24 => settings::IPV4_DIR24,
            Ipv4Lookup::Trie => settings::IPV4_TRIE,
        };
        self.set_setting(settings::IPV4_LOOKUP, value, "the IPv4 lookup setting")?;
        self.ipv4_lookup = lookup;
        Ok(())
    }

    /// How the program looks IPv6 up. Set once, before any IPv6 route.
    pub fn set_ipv6_lookup(&mut self, lookup: Ipv6Lookup) -> Result<()> {
        if self.routes_v6.keys().next().is_some() {
            bail!("the IPv6 lookup can only be chosen while there are no IPv6 routes");
        }
        let value = match lookup {
            Ipv6Lookup::Dxr => settings::IPV6_DXR,
            Ipv6Lookup::Trie => settings::IPV6_TRIE,
        };
        self.set_setting(settings::IPV6_LOOKUP, value, "the IPv6 lookup setting")?;
        self.ipv6_lookup = lookup;
        self.dxr6 = None;
        Ok(())
    }

    /// Whether the program looks routed packets up in its tables or in the
    /// kernel's FIB; may change at any time.
    pub fn set_route_lookup(&mut self, lookup: RouteLookup) -> Result<()> {
        let value = match lookup {
            RouteLookup::Tables => settings::ROUTE_LOOKUP_TABLES,
            RouteLookup::KernelFib => settings::ROUTE_LOOKUP_FIB,
        };
        self.set_setting(settings::ROUTE_LOOKUP, value, "the route lookup setting")
    }

    pub fn ipv4_lookup(&self) -> Ipv4Lookup {
        self.ipv4_lookup
    }

    pub fn ipv6_lookup(&self) -> Ipv6Lookup {
        self.ipv6_lookup
    }

    /// Records that these maps have this build's layout: written once, when
    /// a daemon creates them.
    pub fn set_layout_version(&mut self) -> Result<()> {
        self.set_setting(
            settings::LAYOUT_VERSION,
            MAP_LAYOUT_VERSION,
            "the map layout version",
        )
    }

    pub fn set_route_miss(&mut self, policy: RouteMissPolicy) -> Result<()> {
        let value = u32::from(policy == RouteMissPolicy::Drop);
        self.set_setting(settings::ROUTE_MISS_DROP, value, "the route-miss policy")
    }

    pub fn route_miss(&self) -> Result<RouteMissPolicy> {
        Ok(match self.settings.get(&settings::ROUTE_MISS_DROP, 0)? {
            1 => RouteMissPolicy::Drop,
            _ => RouteMissPolicy::Pass,
        })
    }

    /// Records the MAC of an interface the program is attached to: unicast
    /// frames for other MACs arriving there are not routed or steered.
    /// Returns false, writing nothing, for an ifindex past the array (its
    /// frames are not checked).
    pub fn set_interface_mac(&mut self, ifindex: u32, mac: Mac) -> Result<bool> {
        if ifindex >= MAX_INTERFACES {
            return Ok(false);
        }
        let mut value = [0u8; 8];
        value[..6].copy_from_slice(&mac.0);
        value[6] = INTERFACE_MAC_KNOWN;
        let old = self.interface_macs.get(&ifindex, 0).unwrap_or([0; 8]);
        if old != value {
            self.journal("interface-mac", |_| Undo::InterfaceMac(ifindex, old))?;
            self.interface_macs
                .set(ifindex, value, 0)
                .with_context(|| format!("recording the MAC of interface index {ifindex}"))?;
        }
        Ok(true)
    }

    /// Keeps the recorded MACs of attached interfaces current (a MAC can be
    /// changed); returns a line per change.
    pub fn refresh_interface_macs(&mut self, links: &[Link]) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        for link in links {
            let (Some(mac), true) = (link.mac, link.ifindex < MAX_INTERFACES) else {
                continue;
            };
            let have = self.interface_macs.get(&link.ifindex, 0).unwrap_or([0; 8]);
            if have[6] == INTERFACE_MAC_KNOWN && have[..6] != mac.0 {
                self.set_interface_mac(link.ifindex, mac)?;
                changes.push(format!("interface {}: mac {mac}", link.name));
            }
        }
        Ok(changes)
    }

    /// Writes ECMP group `index` (route target `ecmp::FIRST_GROUP_ID +
    /// index`): each bucket a next-hop id already written.
    pub fn write_group(&mut self, index: u32, group: &NextHopGroup) -> Result<()> {
        if index >= ecmp::MAX_GROUPS {
            bail!(
                "ECMP group {index} is past the {} groups the table holds",
                ecmp::MAX_GROUPS
            );
        }
        let old = self
            .next_hop_groups
            .get(&index, 0)
            .unwrap_or(bytemuck::Zeroable::zeroed());
        self.journal("group", |_| Undo::Group(index, Box::new(old)))?;
        self.next_hop_groups
            .set(index, group, 0)
            .with_context(|| format!("writing ECMP group {index}"))
    }

    /// Records (Some) or forgets (None) the MAC of a host on a connected
    /// subnet. The table mirrors the kernel's neighbour cache, as the
    /// connection table mirrors traffic: not journaled.
    pub fn set_neighbour(&mut self, ifindex: u32, addr: IpAddr, mac: Option<Mac>) -> Result<()> {
        let (a, family) = next_hops::gateway_bytes(addr);
        let key = NeighbourKey {
            addr: a,
            ifindex,
            family,
        };
        match mac {
            Some(mac) => {
                self.neighbours
                    .insert(
                        key,
                        NeighbourMac {
                            mac: mac.0,
                            pad: [0; 2],
                        },
                        0,
                    )
                    .with_context(|| format!("recording neighbour {addr}"))?;
                if let Some(held) = &mut self.neighbours_held {
                    held.insert(key, mac.0);
                }
            }
            None => {
                match self.neighbours.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("forgetting neighbour {addr}"));
                    }
                }
                if let Some(held) = &mut self.neighbours_held {
                    held.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Makes `NEIGHBOURS` hold exactly `want` (hosts on connected subnets:
    /// interface, address, MAC), at most `MAX_NEIGHBOURS` of them. Returns
    /// (written, removed, left out for lack of room). What it writes is
    /// compared with what this process last wrote, so a sync that changes
    /// nothing makes no system call.
    pub fn sync_neighbours(
        &mut self,
        want: &[(u32, IpAddr, Mac)],
    ) -> Result<(usize, usize, usize)> {
        let key = |ifindex: u32, addr: IpAddr| {
            let (addr, family) = next_hops::gateway_bytes(addr);
            NeighbourKey {
                addr,
                ifindex,
                family,
            }
        };
        if self.neighbours_held.is_none() {
            self.neighbours_held = Some(
                self.neighbours
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| (k, v.mac))
                    .collect(),
            );
        }
        let held = self.neighbours_held.as_mut().expect("read above");
        let wanted: std::collections::HashMap<NeighbourKey, Mac> = want
            .iter()
            .map(|&(ifindex, addr, mac)| (key(ifindex, addr), mac))
            .collect();
        let gone: Vec<NeighbourKey> = held
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        let removed = gone.len();
        for k in gone {
            match self.neighbours.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    held.remove(&k);
                }
                Err(e) => return Err(e).context("forgetting a neighbour"),
            }
        }
        let mut room = (pop_forwarder_common::MAX_NEIGHBOURS as usize).saturating_sub(held.len());
        let (mut written, mut left_out) = (0, 0);
        for (k, mac) in &wanted {
            match held.get(k) {
                Some(have) if *have == mac.0 => continue,
                Some(_) => {}
                None if room == 0 => {
                    left_out += 1;
                    continue;
                }
                None => room -= 1,
            }
            self.neighbours
                .insert(
                    k,
                    NeighbourMac {
                        mac: mac.0,
                        pad: [0; 2],
                    },
                    0,
                )
                .context("recording a neighbour")?;
            held.insert(*k, mac.0);
            written += 1;
        }
        Ok((written, removed, left_out))
    }

    /// Makes `VLANS` hold exactly `want`: the VLANs whose tagged frames the
    /// program routes and steers. It mirrors the interfaces, as
    /// `NEIGHBOURS` mirrors the neighbour table: not journaled. Returns the
    /// VLANs left out for lack of room.
    pub fn sync_vlans(&mut self, want: &[VlanKey]) -> Result<usize> {
        let have: HashSet<VlanKey> = self.vlans.keys().filter_map(Result::ok).collect();
        let wanted: HashSet<VlanKey> = want.iter().copied().collect();
        for key in have.difference(&wanted) {
            match self.vlans.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("forgetting a VLAN"),
            }
        }
        let mut left_out = 0;
        for key in wanted.difference(&have) {
            match self.vlans.insert(key, 1, 0) {
                Ok(()) => {}
                Err(e) if os_error(&e) == Some(libc::E2BIG) => left_out += 1,
                Err(e) => return Err(e).context("recording a VLAN"),
            }
        }
        Ok(left_out)
    }

    /// Allows redirects to `ifindex`.
    pub fn add_egress(&mut self, ifindex: u32) -> Result<()> {
        if self.egress.get(ifindex, 0).is_ok() {
            return Ok(());
        }
        self.journal("egress", |_| Undo::Egress(ifindex))?;
        self.egress
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| anyhow!("adding interface index {ifindex} to the egress devmap: {e}"))
    }
}

#[cfg(test)]
mod tests {
    /// A journal entry is small whatever it takes back: a change of a
    /// million routes journals a million of them (see `Undo`).
    #[test]
    fn undo_entries_stay_small() {
        let size = std::mem::size_of::<super::Undo>();
        assert!(size <= 32, "an undo entry takes {size} bytes");
    }
}
