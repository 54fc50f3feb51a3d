//! Typed access to the program's maps, from the loader (the maps of a freshly
//! loaded object) or from another process (the maps pinned in bpffs).
//!
//! Writers order their updates so that the program never sees a route whose
//! next hop is not fully written: next hop first, then the route; route
//! removed first, then the next hop.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{
    Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use pop_forwarder_common::{
    AF_INET, AF_INET6, Counter, LOCAL_NEXT_HOP, MAP_LAYOUT_VERSION, MAX_NEXT_HOPS, MAX_ROUTES_V4,
    MAX_ROUTES_V6, NH_F_IN_USE, NH_F_MAC_STATIC, NH_F_MAC_VALID, NextHop, RouteKeyV4, RouteTarget,
    TrafficCounter,
    dir24::{self as dir24_layout, Dir24, Dir24Error, TBL8_GROUPS},
    map_names as names, settings,
    steering::{CacheNode, FlowKey, MAGLEV_STRIDE, VipInfo, VipKey},
};

use crate::{
    config::{Ipv4Lookup, Route, RouteMissPolicy},
    kernel::{self, Link, Neighbour},
    net::{Mac, Prefix},
    plan::{GatewayKey, RoutePlan, gateway_key, plan_routes},
};

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

pub struct Tables {
    /// IPv4 routes by exact prefix: the record every writer consults.
    routes_v4: HashMap<MapData, RouteKeyV4, RouteTarget>,
    /// The IPv4 lookup trie, filled only when the program reads it.
    trie_v4: LpmTrie<MapData, [u8; 4], RouteTarget>,
    /// IPv6 routes: record and lookup in one.
    routes_v6: LpmTrie<MapData, [u8; 16], RouteTarget>,
    /// Second descriptors of the route maps, for batch updates.
    routes_v4_fd: std::os::fd::OwnedFd,
    trie_v4_fd: std::os::fd::OwnedFd,
    routes_v6_fd: std::os::fd::OwnedFd,
    /// What the program reads for IPv4 (SETTINGS, read once: it is set
    /// before the first route and never changes).
    ipv4_lookup: Ipv4Lookup,
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
    vips: HashMap<MapData, VipKey, VipInfo>,
    maglev: Array<MapData, u64>,
    cache_nodes: Array<MapData, CacheNode>,
    flows: HashMap<MapData, FlowKey, u32>,
    vip_stats: PerCpuArray<MapData, TrafficCounter>,
    node_stats: PerCpuArray<MapData, TrafficCounter>,
    encap_sources: Array<MapData, [u8; 16]>,
    /// How to take back the writes of the change under way (`begin`), newest
    /// last; None when no change is open.
    journal: Option<Vec<Undo>>,
    /// Walks over a whole route table so far (`route_table_scans`).
    scans: std::cell::Cell<u64>,
}

/// How to take back one write of a change. Tables the program writes
/// itself (counters, the connection table) are not journaled: a change that
/// resets a slot's counters leaves them reset when it is taken back.
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
    NextHop(u32, NextHop),
    /// An interface was added to the egress devmap: remove it.
    Egress(u32),
    Setting(u32, u32),
    Local(IpAddr, bool),
    Node(u32, CacheNode),
    Maglev(u32, u64),
    Vip(VipKey, Option<VipInfo>),
    Encap(u32, [u8; 16]),
}

/// A BPF array map of u64 pairs mapped into this process as u32 entries
/// (BPF_F_MMAPABLE; see dir24::ENTRIES_PER_ELEMENT).
struct Mmap {
    ptr: *mut u32,
    entries: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for Mmap {}

impl Mmap {
    fn new(map: &MapData, name: &str) -> Result<Mmap> {
        use std::os::fd::AsRawFd as _;
        let info = map.info().with_context(|| format!("map {name}"))?;
        if info.value_size() != 8 {
            bail!(
                "map {name} holds {}-byte values, not u32 pairs",
                info.value_size()
            );
        }
        let entries =
            info.max_entries() as usize * pop_forwarder_common::dir24::ENTRIES_PER_ELEMENT as usize;
        let len = entries * 4;
        // SAFETY: mmap of a BPF map fd we hold; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmapping map {name}"));
        }
        Ok(Mmap {
            ptr: ptr.cast(),
            entries,
        })
    }

    fn slice(&mut self) -> &mut [u32] {
        // SAFETY: the mapping holds `entries` u32s and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.entries) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.entries * 4) };
    }
}

/// A route as the tables hold it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteEntry {
    pub prefix: String,
    pub next_hop: u32,
    pub via: String,
    pub dev: String,
    /// None while the neighbour is unresolved.
    pub mac: Option<String>,
    pub mac_static: bool,
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub counters: BTreeMap<&'static str, u64>,
    pub next_hops: Vec<NextHopStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NextHopStats {
    pub id: u32,
    pub via: String,
    pub dev: String,
    pub packets: u64,
    pub bytes: u64,
}

fn typed<T>(map: Map, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

fn gateway_bytes(addr: IpAddr) -> ([u8; 16], u32) {
    let mut gw = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            gw[..4].copy_from_slice(&a.octets());
            (gw, AF_INET)
        }
        IpAddr::V6(a) => (a.octets(), AF_INET6),
    }
}

pub fn gateway_addr(nh: &NextHop) -> IpAddr {
    if nh.family == AF_INET {
        let mut a = [0u8; 4];
        a.copy_from_slice(&nh.gateway[..4]);
        IpAddr::from(a)
    } else {
        IpAddr::from(nh.gateway)
    }
}

/// The next hop a route needs, resolved against this namespace's interfaces
/// and neighbours: egress index, MTU and source MAC from the interface; the
/// destination MAC from the route or, failing that, the neighbour table.
pub fn resolve_next_hop(
    route: &Route,
    links: &[Link],
    neighbours: &[Neighbour],
) -> Result<NextHop> {
    let link = kernel::link(links, &route.dev).context("dev")?;
    let src_mac = link
        .mac
        .with_context(|| format!("dev: interface {:?} has no Ethernet address", route.dev))?;
    let (gateway, family) = gateway_bytes(route.via);
    let mut nh = NextHop {
        ifindex: link.ifindex,
        mtu: link.mtu,
        flags: NH_F_IN_USE,
        dst_mac: [0; 6],
        src_mac: src_mac.0,
        gateway,
        family,
    };
    if let Some(mac) = route.mac {
        nh.dst_mac = mac.0;
        nh.flags |= NH_F_MAC_VALID | NH_F_MAC_STATIC;
    } else if let Some(n) = neighbours
        .iter()
        .find(|n| n.addr == route.via && n.ifname == route.dev)
    {
        nh.dst_mac = n.mac.0;
        nh.flags |= NH_F_MAC_VALID;
    }
    Ok(nh)
}

/// The next-hop table as read once, indexed by gateway, so that a batch of
/// routes costs a hash lookup per route rather than a scan of the table.
struct NextHopTable {
    slots: Vec<NextHop>,
    by_gateway: std::collections::HashMap<GatewayKey, u32>,
}

impl Tables {
    /// Takes the maps out of a loaded object (the loader, the program tests).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Tables> {
        Tables::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
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
        let settings: Array<MapData, u32> = open!(names::SETTINGS);
        let ipv4_lookup = match settings.get(&settings::IPV4_LOOKUP, 0)? {
            settings::IPV4_TRIE => Ipv4Lookup::Trie,
            _ => Ipv4Lookup::Dir24,
        };
        Ok(Tables {
            routes_v4: typed(v4.0, &v4.1)?,
            trie_v4: typed(trie4.0, &trie4.1)?,
            routes_v6: typed(v6.0, &v6.1)?,
            routes_v4_fd,
            trie_v4_fd,
            routes_v6_fd,
            ipv4_lookup,
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
            vips: open!(names::VIPS),
            maglev: open!(names::MAGLEV),
            cache_nodes: open!(names::CACHE_NODES),
            flows: open!(names::FLOWS),
            vip_stats: open!(names::VIP_STATS),
            node_stats: open!(names::NODE_STATS),
            encap_sources: open!(names::ENCAP_SOURCES),
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
        for undo in journal.into_iter().rev() {
            if let Err(e) = self.undo(&undo) {
                log::error!("taking back a table write ({undo:?}): {e:#}");
                failed += 1;
            }
        }
        failed
    }

    fn undo(&mut self, undo: &Undo) -> Result<()> {
        match *undo {
            Undo::RouteAdded(prefix) => self.remove_route(prefix),
            Undo::RouteReplaced(prefix, target) => self.write_route(prefix, target),
            Undo::RouteRemoved(prefix, target) => self.insert_route(prefix, target.next_hop),
            Undo::NextHop(id, nh) => Ok(self.next_hops.set(id, nh, 0)?),
            Undo::Egress(ifindex) => Ok(self.egress.remove(ifindex)?),
            Undo::Setting(index, value) => Ok(self.settings.set(index, value, 0)?),
            Undo::Local(addr, present) => match (addr, present) {
                (IpAddr::V4(a), true) => Ok(self.local_v4.insert(a.octets(), 1, 0)?),
                (IpAddr::V6(a), true) => Ok(self.local_v6.insert(a.octets(), 1, 0)?),
                (IpAddr::V4(a), false) => Ok(self.local_v4.remove(&a.octets())?),
                (IpAddr::V6(a), false) => Ok(self.local_v6.remove(&a.octets())?),
            },
            Undo::Node(id, node) => Ok(self.cache_nodes.set(id, node, 0)?),
            Undo::Maglev(element, value) => Ok(self.maglev.set(element, value, 0)?),
            Undo::Vip(key, Some(info)) => Ok(self.vips.insert(key, info, 0)?),
            Undo::Vip(key, None) => Ok(self.vips.remove(&key)?),
            Undo::Encap(slot, addr) => Ok(self.encap_sources.set(slot, addr, 0)?),
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

    pub fn ipv4_lookup(&self) -> Ipv4Lookup {
        self.ipv4_lookup
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

    /// The `MAP_LAYOUT_VERSION` of the build that created these maps (0:
    /// a build from before versions were recorded).
    pub fn layout_version(&self) -> Result<u32> {
        self.settings
            .get(&settings::LAYOUT_VERSION, 0)
            .context("reading the map layout version")
    }

    /// The DIR-24-8 tables, if the program uses them.
    fn dir24(&mut self) -> Result<Option<Dir24<'_>>> {
        if self.ipv4_lookup != Ipv4Lookup::Dir24 {
            return Ok(None);
        }
        if self.dir24.is_none() {
            self.dir24 = Some((
                Mmap::new(&self.tbl24, names::IPV4_TBL24)?,
                Mmap::new(&self.tbl8, names::IPV4_TBL8)?,
            ));
        }
        let (t24, t8) = self.dir24.as_mut().expect("mapped above");
        Ok(Some(Dir24 {
            tbl24: t24.slice(),
            tbl8: t8.slice(),
        }))
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

    /// Every slot of the next-hop table, free ones too.
    pub fn next_hop_slots(&self) -> Result<Vec<NextHop>> {
        (0..MAX_NEXT_HOPS)
            .map(|i| {
                self.next_hops
                    .get(&i, 0)
                    .context("reading the next-hop table")
            })
            .collect()
    }

    /// The id of the next hop for `want`'s gateway and interface, allocating
    /// a slot if there is none. Returns whether the slot is new.
    fn find_or_add_next_hop(
        &mut self,
        table: &mut NextHopTable,
        want: &NextHop,
    ) -> Result<(u32, bool)> {
        if let Some(&id) = table.by_gateway.get(&gateway_key(want)) {
            let have = table.slots[id as usize];
            let want_static = want.flags & NH_F_MAC_STATIC != 0;
            let have_static = have.flags & NH_F_MAC_STATIC != 0;
            if want_static && have_static && have.dst_mac != want.dst_mac {
                bail!(
                    "mac: gateway {} already has MAC {} (next hop {id})",
                    gateway_addr(&have),
                    Mac(have.dst_mac)
                );
            }
            if want_static && !have_static {
                self.write_next_hop(id, want)?;
                table.slots[id as usize] = *want;
            }
            return Ok((id, false));
        }
        let id = table
            .slots
            .iter()
            .position(|nh| !nh.is_in_use())
            .with_context(|| format!("the next-hop table is full ({MAX_NEXT_HOPS} next hops)"))?
            as u32;
        self.add_egress(want.ifindex)?;
        let zeros = vec![TrafficCounter::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
        self.next_hop_stats
            .set(id, PerCpuValues::try_from(zeros)?, 0)
            .context("resetting next-hop counters")?;
        self.write_next_hop(id, want)?;
        table.slots[id as usize] = *want;
        table.by_gateway.insert(gateway_key(want), id);
        Ok((id, true))
    }

    fn write_next_hop(&mut self, id: u32, nh: &NextHop) -> Result<()> {
        self.journal("next-hop", |t| {
            Undo::NextHop(
                id,
                t.next_hops.get(&id, 0).unwrap_or(NextHop::default_free()),
            )
        })?;
        self.next_hops
            .set(id, nh, 0)
            .with_context(|| format!("writing next hop {id}"))
    }

    fn next_hop_table(&self) -> Result<NextHopTable> {
        let slots = self.next_hop_slots()?;
        let by_gateway = slots
            .iter()
            .enumerate()
            .filter(|(_, nh)| nh.is_in_use())
            .map(|(id, nh)| (gateway_key(nh), id as u32))
            .collect();
        Ok(NextHopTable { slots, by_gateway })
    }

    /// Installs `prefix` -> `next_hop`. Fails if the prefix is already routed.
    pub fn add_route(&mut self, prefix: Prefix, next_hop: &NextHop) -> Result<u32> {
        self.refuse_local(prefix)?;
        let mut table = self.next_hop_table()?;
        let (id, new) = self.find_or_add_next_hop(&mut table, next_hop)?;
        if let Err(e) = self.insert_route(prefix, id) {
            if new {
                self.free_next_hop(id)?;
            }
            return Err(e);
        }
        Ok(id)
    }

    fn insert_route(&mut self, prefix: Prefix, next_hop: u32) -> Result<()> {
        self.failpoint("route")?;
        let target = RouteTarget {
            next_hop,
            prefix_len: prefix.len.into(),
        };
        // BPF_NOEXIST: the record (and the IPv6 trie) refuse an exact
        // duplicate prefix.
        let inserted = match prefix.addr {
            IpAddr::V4(a) => self
                .routes_v4
                .insert(key_v4(prefix.len, a), target, BPF_NOEXIST),
            IpAddr::V6(a) => self.routes_v6.insert(
                &Key::new(prefix.len.into(), a.octets()),
                target,
                BPF_NOEXIST,
            ),
        };
        match inserted {
            Ok(()) => {}
            Err(e) if os_error(&e) == Some(libc::EEXIST) => {
                bail!("a route to {prefix} already exists; delete it first")
            }
            Err(e) => return Err(e).with_context(|| format!("inserting the route to {prefix}")),
        }
        if let IpAddr::V4(a) = prefix.addr
            && let Err(e) = self.index_v4(a, prefix.len, target)
        {
            let _ = self.routes_v4.remove(&key_v4(prefix.len, a));
            return Err(e).with_context(|| format!("inserting the route to {prefix}"));
        }
        if let Some(journal) = &mut self.journal {
            journal.push(Undo::RouteAdded(prefix));
        }
        Ok(())
    }

    /// Points the existing route to `prefix` at `target`: the record, then
    /// the structure the program reads.
    fn write_route(&mut self, prefix: Prefix, target: RouteTarget) -> Result<()> {
        match prefix.addr {
            IpAddr::V4(a) => {
                self.routes_v4.insert(key_v4(prefix.len, a), target, 0)?;
                self.index_v4(a, prefix.len, target)
            }
            IpAddr::V6(a) => {
                Ok(self
                    .routes_v6
                    .insert(&Key::new(prefix.len.into(), a.octets()), target, 0)?)
            }
        }
    }

    /// Adds an IPv4 route to the structure the program reads.
    fn index_v4(&mut self, a: std::net::Ipv4Addr, len: u8, target: RouteTarget) -> Result<()> {
        match self.ipv4_lookup {
            Ipv4Lookup::Trie => self
                .trie_v4
                .insert(&Key::new(len.into(), a.octets()), target, 0)
                .map_err(Into::into),
            Ipv4Lookup::Dir24 => {
                let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                dir.add(u32::from(a), len.into(), target.next_hop)
                    .map_err(dir24_error)
            }
        }
    }

    /// Removes exactly `prefix`. For IPv4 its addresses then belong to the
    /// longest remaining prefix that covers them, found in the record.
    fn remove_route(&mut self, prefix: Prefix) -> Result<()> {
        self.failpoint("route")?;
        let old = self.longest_match(prefix)?;
        let removed = match prefix.addr {
            IpAddr::V4(a) => self.routes_v4.remove(&key_v4(prefix.len, a)),
            IpAddr::V6(a) => self
                .routes_v6
                .remove(&Key::new(prefix.len.into(), a.octets())),
        };
        match removed {
            Ok(()) => {}
            Err(e)
                if matches!(e, aya::maps::MapError::KeyNotFound)
                    || os_error(&e) == Some(libc::ENOENT) =>
            {
                bail!("there is no route to {prefix}")
            }
            Err(e) => return Err(e).with_context(|| format!("removing the route to {prefix}")),
        }
        if let IpAddr::V4(a) = prefix.addr {
            match self.ipv4_lookup {
                Ipv4Lookup::Trie => self
                    .trie_v4
                    .remove(&Key::new(prefix.len.into(), a.octets()))
                    .with_context(|| format!("removing the route to {prefix} from the trie"))?,
                Ipv4Lookup::Dir24 => {
                    let covering = self.covering_v4(a, prefix.len)?;
                    let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                    dir.remove(u32::from(a), prefix.len.into(), covering)
                        .map_err(dir24_error)?;
                }
            }
        }
        if let (Some(journal), Some(old)) = (&mut self.journal, old) {
            journal.push(Undo::RouteRemoved(prefix, old));
        }
        Ok(())
    }

    /// The longest IPv4 route shorter than `len` covering `a`, as (next hop,
    /// length): at most `len` exact lookups in the record.
    fn covering_v4(&self, a: std::net::Ipv4Addr, len: u8) -> Result<Option<(u32, u32)>> {
        for shorter in (0..len).rev() {
            let net = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(shorter)).unwrap_or(0);
            match self.routes_v4.get(&key_v4(shorter, net.into()), 0) {
                Ok(t) => return Ok(Some((t.next_hop, t.prefix_len))),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) if os_error(&e) == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("looking up a covering route"),
            }
        }
        Ok(None)
    }

    /// Local addresses are the daemon's to route: refuses `prefix` if it is
    /// exactly one of them.
    fn refuse_local(&self, prefix: Prefix) -> Result<()> {
        refuse_local(&self.local_addrs(), prefix)
    }

    /// Installs a whole set of routes; on any failure, removes what it added
    /// (routes, then the next hops it allocated) so the tables are as they
    /// were. The tries are written with BPF_MAP_UPDATE_BATCH, a syscall per
    /// chunk rather than per route.
    pub fn add_routes(&mut self, routes: &[(Prefix, NextHop)]) -> Result<()> {
        // A batch update cannot refuse an existing key (elem_flags takes only
        // BPF_F_LOCK), so duplicates are found first: against what the
        // tries hold (few entries when a daemon starts) and within the batch.
        let mut present = self.prefixes()?;
        let mut table = self.next_hop_table()?;
        self.insert_new_routes(routes, &mut present, &mut table)
            .map(drop)
    }

    /// `add_routes` given what the tries hold (`present`, which it extends)
    /// and the next-hop table as read: returns each route's next-hop id.
    fn insert_new_routes(
        &mut self,
        routes: &[(Prefix, NextHop)],
        present: &mut HashSet<Prefix>,
        table: &mut NextHopTable,
    ) -> Result<Vec<u32>> {
        let locals = self.local_addrs();
        let mut new_next_hops = Vec::new();
        let mut targets = Vec::with_capacity(routes.len());
        for (prefix, nh) in routes {
            let found = refuse_local(&locals, *prefix)
                .and_then(|()| match present.insert(*prefix) {
                    true => Ok(()),
                    false => Err(anyhow!(
                        "a route to {prefix} already exists; delete it first"
                    )),
                })
                .and_then(|()| self.find_or_add_next_hop(table, nh));
            match found {
                Ok((id, new)) => {
                    if new {
                        new_next_hops.push(id);
                    }
                    targets.push(RouteTarget {
                        next_hop: id,
                        prefix_len: prefix.len.into(),
                    });
                }
                Err(e) => {
                    self.free_next_hops(&new_next_hops);
                    return Err(e);
                }
            }
        }
        let mut inserted = Vec::with_capacity(routes.len());
        let result = self.insert_routes(routes, &targets, &mut inserted);
        if let Some(journal) = &mut self.journal {
            journal.extend(inserted.iter().map(|p| Undo::RouteAdded(*p)));
        }
        if let Err(e) = result {
            for prefix in inserted.iter().rev() {
                let _ = self.remove_route(*prefix);
            }
            self.free_next_hops(&new_next_hops);
            return Err(e);
        }
        Ok(targets.iter().map(|t| t.next_hop).collect())
    }

    /// Every prefix in the tries, local ones included.
    fn prefixes(&self) -> Result<HashSet<Prefix>> {
        self.scanned();
        let v4 = self.routes_v4_all()?.into_iter().map(|(k, _)| {
            Ok(Prefix {
                addr: IpAddr::from(k.addr),
                len: k.prefix_len as u8,
            })
        });
        let v6 = self.routes_v6.keys().map(|k| {
            k.map(|k| Prefix {
                addr: IpAddr::from(k.data()),
                len: k.prefix_len() as u8,
            })
        });
        v4.chain(v6)
            .collect::<Result<_, _>>()
            .context("reading the route tables")
    }

    fn free_next_hops(&mut self, ids: &[u32]) {
        for id in ids {
            let _ = self.free_next_hop(*id);
        }
    }

    /// Writes `routes` into the tries in batches, then (IPv4) into DIR-24-8;
    /// records every prefix written in `inserted`.
    fn insert_routes(
        &mut self,
        routes: &[(Prefix, NextHop)],
        targets: &[RouteTarget],
        inserted: &mut Vec<Prefix>,
    ) -> Result<()> {
        const CHUNK: usize = 1 << 16;
        self.failpoint("route")?;
        let (v4, v6): (Vec<usize>, Vec<usize>) =
            (0..routes.len()).partition(|&i| routes[i].0.addr.is_ipv4());
        for chunk in v4.chunks(CHUNK) {
            let v4_of = |i: usize| match routes[i].0.addr {
                IpAddr::V4(a) => (a, routes[i].0.len),
                IpAddr::V6(_) => unreachable!("partitioned by family"),
            };
            let keys: Vec<RouteKeyV4> = chunk
                .iter()
                .map(|&i| {
                    let (a, len) = v4_of(i);
                    key_v4(len, a)
                })
                .collect();
            let values: Vec<RouteTarget> = chunk.iter().map(|&i| targets[i]).collect();
            let result = update_batch(self.routes_v4_fd.as_fd(), &keys, &values);
            let done = result.as_ref().err().map_or(chunk.len(), |(n, _)| *n);
            inserted.extend(chunk[..done].iter().map(|&i| routes[i].0));
            // Then the structure the program reads.
            match self.ipv4_lookup {
                Ipv4Lookup::Trie => {
                    let keys: Vec<Key<[u8; 4]>> = chunk[..done]
                        .iter()
                        .map(|&i| {
                            let (a, len) = v4_of(i);
                            Key::new(len.into(), a.octets())
                        })
                        .collect();
                    if let Err((n, e)) =
                        update_batch(self.trie_v4_fd.as_fd(), &keys, &values[..done])
                    {
                        return Err(batch_error(
                            routes[chunk[n.min(done.saturating_sub(1))]].0,
                            e,
                        ));
                    }
                }
                Ipv4Lookup::Dir24 => {
                    let mut dir = self.dir24()?.expect("DIR-24-8 is in use");
                    for &i in &chunk[..done] {
                        let (a, len) = v4_of(i);
                        dir.add(u32::from(a), len.into(), targets[i].next_hop)
                            .map_err(dir24_error)
                            .with_context(|| format!("inserting the route to {}", routes[i].0))?;
                    }
                }
            }
            if let Err((n, e)) = result {
                return Err(batch_error(routes[chunk[n.min(chunk.len() - 1)]].0, e));
            }
        }
        for chunk in v6.chunks(CHUNK) {
            let keys: Vec<Key<[u8; 16]>> = chunk
                .iter()
                .map(|&i| match routes[i].0.addr {
                    IpAddr::V6(a) => Key::new(routes[i].0.len.into(), a.octets()),
                    IpAddr::V4(_) => unreachable!("partitioned by family"),
                })
                .collect();
            let values: Vec<RouteTarget> = chunk.iter().map(|&i| targets[i]).collect();
            let result = update_batch(self.routes_v6_fd.as_fd(), &keys, &values);
            let done = result.as_ref().err().map_or(chunk.len(), |(n, _)| *n);
            inserted.extend(chunk[..done].iter().map(|&i| routes[i].0));
            if let Err((n, e)) = result {
                return Err(batch_error(routes[chunk[n.min(chunk.len() - 1)]].0, e));
            }
        }
        Ok(())
    }

    /// The next-hop id the longest prefix covering `prefix` points at.
    /// The route for `prefix`: exact for IPv4 (the record); the longest
    /// match covering it for IPv6 (the trie), which is `prefix` itself when
    /// it is routed.
    fn longest_match(&self, prefix: Prefix) -> Result<Option<RouteTarget>> {
        let got = match prefix.addr {
            IpAddr::V4(a) => self.routes_v4.get(&key_v4(prefix.len, a), 0),
            IpAddr::V6(a) => self
                .routes_v6
                .get(&Key::new(prefix.len.into(), a.octets()), 0),
        };
        match got {
            Ok(t) => Ok(Some(t)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) if os_error(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("looking up a route"),
        }
    }

    /// Removes the route to exactly `prefix`, and its next hop if no other
    /// route uses it.
    pub fn del_route(&mut self, prefix: Prefix) -> Result<()> {
        self.refuse_local(prefix)?;
        // If the exact prefix is routed, this is its next hop; if it is not,
        // the removal below says so.
        let id = self.longest_match(prefix)?.map(|t| t.next_hop);
        self.remove_route(prefix)?;
        if let Some(id) = id
            && !self.next_hop_ids_in_use().contains(&id)
        {
            self.free_next_hop(id)?;
        }
        Ok(())
    }

    fn free_next_hop(&mut self, id: u32) -> Result<()> {
        self.write_next_hop(id, &NextHop::default_free())
    }

    /// Next-hop ids that operator routes point at (local routes do not).
    fn next_hop_ids_in_use(&self) -> HashSet<u32> {
        self.scanned();
        let v4 = self
            .routes_v4_all()
            .unwrap_or_default()
            .into_iter()
            .map(|(_, t)| t.next_hop);
        let v6 = self
            .routes_v6
            .iter()
            .filter_map(Result::ok)
            .map(|(_, t)| t.next_hop);
        v4.chain(v6).collect()
    }

    /// The IPv4 record, whole: batched, a syscall per 16,384 routes.
    fn routes_v4_all(&self) -> Result<Vec<(RouteKeyV4, RouteTarget)>> {
        lookup_all(self.routes_v4_fd.as_fd()).context("reading IPv4 routes")
    }

    /// Operator routes (local addresses left out) and their next-hop ids,
    /// IPv4 first, each family in address order.
    fn operator_routes(&self) -> Result<Vec<(Prefix, u32)>> {
        self.scanned();
        let mut v4 = self.routes_v4_all()?;
        v4.sort_by_key(|(k, _)| (k.addr, k.prefix_len));
        let mut v6: Vec<_> = self
            .routes_v6
            .iter()
            .collect::<Result<_, _>>()
            .context("reading IPv6 routes")?;
        v6.sort_by_key(|(k, _)| (k.data(), k.prefix_len()));
        let v4 = v4.into_iter().map(|(k, t)| {
            (
                Prefix {
                    addr: IpAddr::from(k.addr),
                    len: k.prefix_len as u8,
                },
                t.next_hop,
            )
        });
        let v6 = v6.into_iter().map(|(k, t)| {
            (
                Prefix {
                    addr: IpAddr::from(k.data()),
                    len: k.prefix_len() as u8,
                },
                t.next_hop,
            )
        });
        Ok(v4
            .chain(v6)
            .filter(|(_, id)| *id != LOCAL_NEXT_HOP)
            .collect())
    }

    /// Every operator route, IPv4 first, with its next hop described.
    pub fn routes(&self, links: &[Link]) -> Result<Vec<RouteEntry>> {
        let slots = self.next_hop_slots()?;
        Ok(self
            .operator_routes()?
            .into_iter()
            .map(|(prefix, id)| {
                let nh = slots
                    .get(id as usize)
                    .copied()
                    .unwrap_or(NextHop::default_free());
                RouteEntry {
                    prefix: prefix.to_string(),
                    next_hop: id,
                    via: gateway_addr(&nh).to_string(),
                    dev: ifname(links, nh.ifindex),
                    mac: nh.mac_valid().then(|| Mac(nh.dst_mac).to_string()),
                    mac_static: nh.flags & NH_F_MAC_STATIC != 0,
                }
            })
            .collect())
    }

    /// Makes the operator routes exactly `desired` (a reloaded config):
    /// adds the new prefixes first, as one batch that is undone whole if it
    /// fails; then points changed prefixes at their new next hops in place
    /// (no moment without a route); then deletes the prefixes no longer
    /// wanted. Returns (added, changed, deleted).
    pub fn apply_routes(&mut self, desired: &[(Prefix, NextHop)]) -> Result<(usize, usize, usize)> {
        // One walk over the routes and one read of the next-hop table serve
        // the whole change: it costs in proportion to its routes, never to
        // routes times routes.
        let ops = self.operator_routes()?;
        let mut table = self.next_hop_table()?;
        let mut uses: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        for (_, id) in &ops {
            *uses.entry(*id).or_default() += 1;
        }
        let current: std::collections::HashMap<Prefix, (u32, NextHop)> = ops
            .iter()
            .map(|&(p, id)| {
                let nh = table
                    .slots
                    .get(id as usize)
                    .copied()
                    .unwrap_or(NextHop::default_free());
                (p, (id, nh))
            })
            .collect();
        let RoutePlan { new, changed, gone } = plan_routes(&current, desired);
        let locals = self.local_addrs();
        let v4 = ops.iter().filter(|(p, _)| p.addr.is_ipv4()).count();
        self.check_room(&new, &changed, &table, (v4, ops.len() - v4), &locals)?;
        let mut present: HashSet<Prefix> = current
            .keys()
            .copied()
            .chain(locals.iter().map(|a| host_prefix(*a)))
            .collect();
        for id in self.insert_new_routes(&new, &mut present, &mut table)? {
            *uses.entry(id).or_default() += 1;
        }
        for (prefix, nh) in &changed {
            let old = current[prefix].0;
            let id = self.repoint_route(*prefix, old, nh, &mut table)?;
            if id != old {
                *uses.entry(id).or_default() += 1;
                self.release_next_hop(old, &mut uses, &mut table)?;
            }
        }
        for prefix in &gone {
            self.remove_route(*prefix)?;
            self.release_next_hop(current[prefix].0, &mut uses, &mut table)?;
        }
        Ok((new.len(), changed.len(), gone.len()))
    }

    /// One route fewer uses next hop `id`; frees it when none does.
    fn release_next_hop(
        &mut self,
        id: u32,
        uses: &mut std::collections::HashMap<u32, usize>,
        table: &mut NextHopTable,
    ) -> Result<()> {
        let Some(n) = uses.get_mut(&id) else {
            return Ok(());
        };
        *n -= 1;
        if *n == 0 && id != LOCAL_NEXT_HOP {
            uses.remove(&id);
            self.free_next_hop(id)?;
            if let Some(slot) = table.slots.get_mut(id as usize) {
                table.by_gateway.remove(&gateway_key(slot));
                *slot = NextHop::default_free();
            }
        }
        Ok(())
    }

    /// Refuses a change of the operator routes that would not fit, before
    /// its first write: new next hops beyond the free slots, routes beyond
    /// the tables' sizes, /24s cut up by longer prefixes beyond the free
    /// tbl8 groups. Routes that go are not counted as room: they are deleted
    /// last, once everything new is in place.
    fn check_room(
        &mut self,
        new: &[(Prefix, NextHop)],
        changed: &[(Prefix, NextHop)],
        table: &NextHopTable,
        (op_v4, op_v6): (usize, usize),
        locals: &HashSet<IpAddr>,
    ) -> Result<()> {
        let gateways: HashSet<GatewayKey> = new
            .iter()
            .chain(changed)
            .map(|(_, nh)| gateway_key(nh))
            .filter(|k| !table.by_gateway.contains_key(k))
            .collect();
        let free = table.slots.iter().filter(|nh| !nh.is_in_use()).count();
        if gateways.len() > free {
            bail!(
                "the change needs {} new next hops; the next-hop table has {free} free of {MAX_NEXT_HOPS}",
                gateways.len()
            );
        }
        let new_v4: Vec<(u32, u32)> = new
            .iter()
            .filter_map(|(p, _)| match p.addr {
                IpAddr::V4(a) => Some((u32::from(a), u32::from(p.len))),
                IpAddr::V6(_) => None,
            })
            .collect();
        let local_v4 = locals.iter().filter(|a| a.is_ipv4()).count();
        let v4 = op_v4 + local_v4 + new_v4.len();
        let v6 = op_v6 + (locals.len() - local_v4) + (new.len() - new_v4.len());
        for (family, n, max) in [("IPv4", v4, MAX_ROUTES_V4), ("IPv6", v6, MAX_ROUTES_V6)] {
            if n > max as usize {
                bail!("the change makes {n} {family} routes; the table holds {max}");
            }
        }
        if let Some(dir) = self.dir24()? {
            let cut: HashSet<u32> = new_v4
                .iter()
                .filter(|(a, len)| dir.needs_group(*a, *len))
                .map(|(a, _)| dir24_layout::tbl24_index(*a))
                .collect();
            let free = TBL8_GROUPS - dir.groups_in_use();
            if cut.len() as u32 > free {
                bail!(
                    "the change cuts up {} more /24s with longer prefixes, each taking a DIR-24-8 tbl8 group; {free} of {TBL8_GROUPS} are free",
                    cut.len()
                );
            }
        }
        Ok(())
    }

    /// Points the existing route to `prefix`, now through next hop `old`,
    /// at `next_hop`, overwriting it where the program reads it (no moment
    /// without a route). Returns the next-hop id it now uses; the caller
    /// releases `old` if that differs.
    fn repoint_route(
        &mut self,
        prefix: Prefix,
        old: u32,
        next_hop: &NextHop,
        table: &mut NextHopTable,
    ) -> Result<u32> {
        // Same gateway, new static MAC: the next hop itself changes, for
        // every route through it (a config gives a gateway one MAC).
        if table
            .slots
            .get(old as usize)
            .is_some_and(|have| gateway_key(have) == gateway_key(next_hop))
        {
            self.write_next_hop(old, next_hop)?;
            table.slots[old as usize] = *next_hop;
            return Ok(old);
        }
        let (id, _) = self.find_or_add_next_hop(table, next_hop)?;
        let target = RouteTarget {
            next_hop: id,
            prefix_len: prefix.len.into(),
        };
        self.failpoint("route")?;
        if let Some(journal) = &mut self.journal {
            journal.push(Undo::RouteReplaced(
                prefix,
                RouteTarget {
                    next_hop: old,
                    prefix_len: prefix.len.into(),
                },
            ));
        }
        self.write_route(prefix, target)?;
        Ok(id)
    }

    /// Operator routes per family (local addresses not counted).
    pub fn route_counts(&self) -> (usize, usize) {
        self.scanned();
        let operator = |t: RouteTarget| t.next_hop != LOCAL_NEXT_HOP;
        (
            self.routes_v4_all()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, t)| operator(*t))
                .count(),
            self.routes_v6
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, t)| operator(*t))
                .count(),
        )
    }

    /// Brings learned next-hop MACs, egress MTUs and source MACs in line with
    /// the kernel. Returns a line per change, for the log.
    pub fn refresh_next_hops(
        &mut self,
        links: &[Link],
        neighbours: &[Neighbour],
    ) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        for (id, nh) in self.next_hop_slots()?.into_iter().enumerate() {
            if !nh.is_in_use() {
                continue;
            }
            let Some(link) = links.iter().find(|l| l.ifindex == nh.ifindex) else {
                continue;
            };
            let mut next = nh;
            next.mtu = link.mtu;
            if let Some(mac) = link.mac {
                next.src_mac = mac.0;
            }
            if nh.flags & NH_F_MAC_STATIC == 0 {
                let gw = gateway_addr(&nh);
                match neighbours
                    .iter()
                    .find(|n| n.addr == gw && n.ifname == link.name)
                {
                    Some(n) => {
                        next.dst_mac = n.mac.0;
                        next.flags |= NH_F_MAC_VALID;
                    }
                    None => {
                        next.dst_mac = [0; 6];
                        next.flags &= !NH_F_MAC_VALID;
                    }
                }
            }
            if next != nh {
                // Re-read under the caller's lock: the slot must still be the
                // same next hop, not one freed and reused meanwhile.
                let current = self.next_hops.get(&(id as u32), 0)?;
                if current != nh {
                    continue;
                }
                self.write_next_hop(id as u32, &next)?;
                changes.push(format!(
                    "next hop {id} ({} on {}): mac {} mtu {}",
                    gateway_addr(&nh),
                    link.name,
                    if next.mac_valid() {
                        Mac(next.dst_mac).to_string()
                    } else {
                        "unresolved".into()
                    },
                    next.mtu
                ));
            }
        }
        Ok(changes)
    }

    /// Makes the local-address sets exactly `addrs`.
    /// Seeds the flow hash and turns the VIP lookup on or off.
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
    /// Maglev table.
    pub fn remove_node(&mut self, id: u32) -> Result<()> {
        let free: CacheNode = bytemuck::Zeroable::zeroed();
        self.journal_node(id)?;
        self.cache_nodes
            .set(id, free, 0)
            .with_context(|| format!("removing cache node {id}"))
    }

    fn journal_node(&mut self, id: u32) -> Result<()> {
        self.journal("node", |t| {
            Undo::Node(
                id,
                t.cache_nodes
                    .get(&id, 0)
                    .unwrap_or(bytemuck::Zeroable::zeroed()),
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
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing a VIP"),
        }
    }

    fn journal_vip(&mut self, key: &VipKey) -> Result<()> {
        let key = *key;
        self.journal("vip", |t| Undo::Vip(key, t.vips.get(&key, 0).ok()))
    }

    fn insert_vip(&mut self, index: u32, key: &VipKey, len: usize) -> Result<()> {
        self.journal_vip(key)?;
        self.vips
            .insert(
                key,
                VipInfo {
                    index,
                    table_size: len as u32,
                },
                0,
            )
            .context("writing the VIP")
    }

    fn write_maglev(&mut self, index: u32, table: &[u32], old: Option<&[u32]>) -> Result<()> {
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

    /// The node a known flow is pinned to.
    pub fn flow_node(&self, key: &FlowKey) -> Result<Option<u32>> {
        match self.flows.get(key, 0) {
            Ok(id) => Ok(Some(id)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the connection table"),
        }
    }

    /// Packets and bytes per VIP slot and per node, summed over CPUs.
    pub fn steering_stats(
        &self,
        vips: u32,
        nodes: u32,
    ) -> Result<(Vec<TrafficCounter>, Vec<TrafficCounter>)> {
        let sum = |v: PerCpuValues<TrafficCounter>| TrafficCounter {
            packets: v.iter().map(|t| t.packets).sum(),
            bytes: v.iter().map(|t| t.bytes).sum(),
        };
        let v = (0..vips)
            .map(|i| self.vip_stats.get(&i, 0).map(sum))
            .collect::<Result<_, _>>()?;
        let n = (0..nodes)
            .map(|i| self.node_stats.get(&i, 0).map(sum))
            .collect::<Result<_, _>>()?;
        Ok((v, n))
    }

    /// Gateways (and their interface index) of next hops that still wait for
    /// a MAC from the neighbour table.
    pub fn unresolved_gateways(&self) -> Result<Vec<(IpAddr, u32)>> {
        Ok(self
            .next_hop_slots()?
            .iter()
            .filter(|nh| nh.is_in_use() && !nh.mac_valid() && nh.flags & NH_F_MAC_STATIC == 0)
            .map(|nh| (gateway_addr(nh), nh.ifindex))
            .collect())
    }

    /// Makes this box's addresses exactly `addrs`: each is a /32 or /128
    /// route to LOCAL_NEXT_HOP (so the program's one route lookup also says
    /// "ours"), recorded in the LOCAL maps. Returns the addresses that could
    /// not be made local because an operator route to exactly that /32 or
    /// /128 exists.
    pub fn sync_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<Vec<IpAddr>> {
        let want: HashSet<IpAddr> = addrs.iter().copied().collect();
        let have = self.local_addrs();
        let mut conflicts = Vec::new();
        for addr in want.difference(&have) {
            let prefix = host_prefix(*addr);
            match self.insert_route(prefix, LOCAL_NEXT_HOP) {
                Ok(()) => {}
                Err(_)
                    if self
                        .longest_match(prefix)?
                        .is_some_and(|t| t.prefix_len == u32::from(prefix.len)) =>
                {
                    conflicts.push(*addr);
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("making {addr} local")),
            }
            self.journal("local", |_| Undo::Local(*addr, false))?;
            match addr {
                IpAddr::V4(a) => self.local_v4.insert(a.octets(), 1, 0),
                IpAddr::V6(a) => self.local_v6.insert(a.octets(), 1, 0),
            }
            .with_context(|| format!("recording local address {addr}"))?;
        }
        for addr in have.difference(&want) {
            self.remove_route(host_prefix(*addr))
                .with_context(|| format!("removing local address {addr}"))?;
            self.journal("local", |_| Undo::Local(*addr, true))?;
            match addr {
                IpAddr::V4(a) => self.local_v4.remove(&a.octets()),
                IpAddr::V6(a) => self.local_v6.remove(&a.octets()),
            }
            .with_context(|| format!("forgetting local address {addr}"))?;
        }
        Ok(conflicts)
    }

    /// This box's addresses as the tables know them.
    pub fn local_addrs(&self) -> HashSet<IpAddr> {
        let v4 = self
            .local_v4
            .keys()
            .filter_map(Result::ok)
            .map(IpAddr::from);
        let v6 = self
            .local_v6
            .keys()
            .filter_map(Result::ok)
            .map(IpAddr::from);
        v4.chain(v6).collect()
    }

    pub fn stats(&self, links: &[Link]) -> Result<Stats> {
        let mut counters = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&c.index(), 0)
                .with_context(|| format!("reading counter {}", c.name()))?;
            counters.insert(c.name(), per_cpu.iter().sum());
        }
        let mut next_hops = Vec::new();
        for (id, nh) in self.next_hop_slots()?.into_iter().enumerate() {
            if !nh.is_in_use() {
                continue;
            }
            let per_cpu = self
                .next_hop_stats
                .get(&(id as u32), 0)
                .context("reading next-hop counters")?;
            next_hops.push(NextHopStats {
                id: id as u32,
                via: gateway_addr(&nh).to_string(),
                dev: ifname(links, nh.ifindex),
                packets: per_cpu.iter().map(|t| t.packets).sum(),
                bytes: per_cpu.iter().map(|t| t.bytes).sum(),
            });
        }
        Ok(Stats {
            counters,
            next_hops,
        })
    }
}

fn refuse_local(locals: &HashSet<IpAddr>, prefix: Prefix) -> Result<()> {
    if prefix == host_prefix(prefix.addr) && locals.contains(&prefix.addr) {
        bail!("{prefix} is one of this box's own addresses; its packets always go to the kernel");
    }
    Ok(())
}

/// The error for the route a batch update stopped at.
fn batch_error(prefix: Prefix, e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("inserting routes (stopped at {prefix})"))
}

/// The `batch` member of union bpf_attr (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// BPF_MAP_UPDATE_BATCH: writes `keys[i]` -> `values[i]` in one syscall
/// (aya 0.14 has no batch API). On failure, the kernel reports how many
/// elements it wrote before the one that failed.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsRawFd as _;
    assert_eq!(keys.len(), values.len());
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr points at key and value arrays of `count` elements of the
    // map's key and value sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err((attr.count as usize, std::io::Error::last_os_error()))
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// BPF_MAP_LOOKUP_BATCH over a whole hash map: every (key, value), tens of
/// thousands per syscall rather than two syscalls per key.
fn lookup_all<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd as _;
    const CHUNK: usize = 1 << 14;
    let mut all = Vec::new();
    // SAFETY: keys and values are Pod: any bytes the kernel writes are valid.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    // The position token: a hash map's bucket index.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at key and value buffers of `count` elements
        // of the map's key and value sizes, and at the tokens, all alive for
        // the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let n = attr.count as usize;
        all.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the walk is over.
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(all)
            } else {
                Err(e)
            };
        }
        token_in = token_out;
        first = false;
    }
}

/// The record key of an IPv4 prefix.
fn key_v4(len: u8, a: std::net::Ipv4Addr) -> RouteKeyV4 {
    RouteKeyV4 {
        prefix_len: len.into(),
        addr: a.octets(),
    }
}

/// The /32 or /128 of one address.
fn host_prefix(addr: IpAddr) -> Prefix {
    Prefix {
        addr,
        len: if addr.is_ipv4() { 32 } else { 128 },
    }
}

/// BPF_NOEXIST from linux/bpf.h: create only.
const BPF_NOEXIST: u64 = 1;

fn os_error(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

fn dir24_error(e: Dir24Error) -> anyhow::Error {
    match e {
        Dir24Error::Tbl8Full => anyhow!(
            "the IPv4 table has no free tbl8 group: at most {} distinct /24s may hold prefixes longer than /24",
            pop_forwarder_common::dir24::TBL8_GROUPS
        ),
        Dir24Error::NextHopTooLarge => anyhow!("next-hop id does not fit the IPv4 table"),
        Dir24Error::BadLength => anyhow!("prefix length over 32"),
    }
}

/// A map with a duplicate of its descriptor.
fn with_fd(map: (Map, String)) -> Result<((Map, String), std::os::fd::OwnedFd)> {
    let fd = match &map.0 {
        Map::LpmTrie(data) | Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned(),
        _ => bail!("map {} is not an LPM trie or a hash", map.1),
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
