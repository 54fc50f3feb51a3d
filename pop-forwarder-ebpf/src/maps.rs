//! The program's maps and the lookups on them. Layouts come from
//! pop-forwarder-common; the host pins these maps under the same names.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use pop_forwarder_common::{
    Counter, INTERFACE_MAC_KNOWN, MAX_EGRESS_PORTS, MAX_INTERFACES, MAX_LOCAL_ADDRS, MAX_NEXT_HOPS,
    MAX_ROUTES_V4, MAX_ROUTES_V6, NextHop, RouteKeyV4, RouteTarget, TrafficCounter,
    dir24::{self, TBL8_ENTRIES, TBL24_ENTRIES, Tbl24},
    settings,
};

use crate::{Verdict, drop, pass};

/// The IPv4 routes, by exact prefix: the host's record, which the program
/// does not read. It looks IPv4 up in DIR-24-8 or, if so configured, in
/// ROUTES_V4_TRIE.
#[map]
static ROUTES_V4: HashMap<RouteKeyV4, RouteTarget> =
    HashMap::with_max_entries(MAX_ROUTES_V4, BPF_F_NO_PREALLOC as u32);

#[map]
static ROUTES_V4_TRIE: LpmTrie<[u8; 4], RouteTarget> = LpmTrie::with_max_entries(MAX_ROUTES_V4, 0);

/// DIR-24-8 tables for IPv4 (see pop_forwarder_common::dir24). Mmappable,
/// so the host writes a million routes at memory speed.
#[map]
static IPV4_TBL24: Array<u64> = Array::with_max_entries(
    TBL24_ENTRIES / dir24::ENTRIES_PER_ELEMENT,
    BPF_F_MMAPABLE as u32,
);

#[map]
static IPV4_TBL8: Array<u64> = Array::with_max_entries(
    TBL8_ENTRIES / dir24::ENTRIES_PER_ELEMENT,
    BPF_F_MMAPABLE as u32,
);

#[map]
static ROUTES_V6: LpmTrie<[u8; 16], RouteTarget> = LpmTrie::with_max_entries(MAX_ROUTES_V6, 0);

#[map]
static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(MAX_NEXT_HOPS, 0);

#[map]
static NEXT_HOP_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(MAX_NEXT_HOPS, 0);

/// This box's own addresses: the host's record of the /32 and /128 routes
/// to LOCAL_NEXT_HOP it keeps in the route tables. The program does not
/// read these; the route lookup answers for them.
#[map]
static LOCAL_V4: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
static LOCAL_V6: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Egress interfaces by ifindex, for bpf_redirect_map.
#[map]
static EGRESS_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_PORTS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT as u32, 0);

#[map]
pub static SETTINGS: Array<u32> = Array::with_max_entries(settings::COUNT, 0);

/// The MAC of each interface the program is attached to, indexed by
/// ifindex (an array: a lookup is one load), kept current by the daemon.
#[map]
static INTERFACE_MACS: Array<[u8; 8]> = Array::with_max_entries(MAX_INTERFACES, 0);

/// Whether a unicast frame to `mac` is addressed to the interface it came
/// in on. An interface whose MAC the daemon has not recorded (or whose
/// ifindex is past the array) takes every frame, as before it was recorded.
#[inline(always)]
pub fn for_this_interface(ifindex: u32, mac: &[u8; 6]) -> bool {
    match INTERFACE_MACS.get(ifindex) {
        // Byte by byte: a slice comparison may become a memcmp call.
        Some(own) if own[6] == INTERFACE_MAC_KNOWN => {
            own[0] == mac[0]
                && own[1] == mac[1]
                && own[2] == mac[2]
                && own[3] == mac[3]
                && own[4] == mac[4]
                && own[5] == mac[5]
        }
        _ => true,
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: a per-CPU slot; XDP runs with preemption off on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn traffic(next_hop_id: u32, bytes: u64) {
    add_traffic(&NEXT_HOP_STATS, next_hop_id, bytes);
}

/// One more packet of `bytes` in slot `index` of a per-CPU traffic array.
#[inline(always)]
pub fn add_traffic(stats: &PerCpuArray<TrafficCounter>, index: u32, bytes: u64) {
    if let Some(slot) = stats.get_ptr_mut(index) {
        // SAFETY: as in `count`.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn lookup_route_v4(dst: [u8; 4]) -> Option<u32> {
    if let Some(&settings::IPV4_TRIE) = SETTINGS.get(settings::IPV4_LOOKUP) {
        return ROUTES_V4_TRIE.get(Key::new(32, dst)).map(|t| t.next_hop);
    }
    let addr = u32::from_be_bytes(dst);
    let i = dir24::tbl24_index(addr);
    let entry = dir24::entry_in(*IPV4_TBL24.get(dir24::element_of(i))?, i);
    match dir24::tbl24_step(entry, addr) {
        Tbl24::Miss => None,
        Tbl24::NextHop(id) => Some(id),
        Tbl24::Tbl8(i) => {
            dir24::tbl8_step(dir24::entry_in(*IPV4_TBL8.get(dir24::element_of(i))?, i))
        }
    }
}

#[inline(always)]
pub fn lookup_route_v6(dst: [u8; 16]) -> Option<u32> {
    ROUTES_V6.get(Key::new(128, dst)).map(|t| t.next_hop)
}

/// The verdict for a destination that no route covers, by the configured
/// route-miss policy.
#[inline(always)]
pub fn route_miss() -> Verdict {
    match SETTINGS.get(settings::ROUTE_MISS_DROP) {
        Some(&1) => drop(Counter::DropRouteMiss),
        _ => pass(Counter::PassRouteMiss),
    }
}

/// The next hop a route points at, if a packet of `l3_len` bytes can be sent
/// to it now; otherwise the verdict that hands the packet to the kernel.
#[inline(always)]
pub fn next_hop_for(next_hop_id: u32, l3_len: usize) -> Result<&'static NextHop, Verdict> {
    let next_hop = match NEXT_HOPS.get(next_hop_id) {
        Some(nh) if nh.is_in_use() => nh,
        _ => return Err(pass(Counter::PassNoNextHop)),
    };
    if !next_hop.mac_valid() {
        return Err(pass(Counter::PassNoNeighbour));
    }
    if l3_len > next_hop.mtu as usize {
        return Err(pass(Counter::PassTooBig));
    }
    Ok(next_hop)
}

/// The MTU of next hop `next_hop_id` (0 if the slot is free).
#[inline(always)]
pub fn next_hop_mtu(next_hop_id: u32) -> u32 {
    NEXT_HOPS.get(next_hop_id).map_or(0, |nh| nh.mtu)
}

/// How the frame leaves through `ifindex`: XDP_TX out of the interface it came
/// in on, or a devmap redirect. bpf_redirect_map only records the target,
/// so calling it before the packet is rewritten lets a missing egress fall
/// back to the kernel with the packet untouched, at the cost of one devmap
/// lookup rather than two.
#[inline(always)]
pub fn egress(ctx: &XdpContext, ifindex: u32) -> Result<Verdict, Verdict> {
    if ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Verdict {
            action: xdp_action::XDP_TX,
            counter: Counter::ForwardedTx,
        });
    }
    match EGRESS_PORTS.redirect(ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => Ok(Verdict {
            action,
            counter: Counter::Forwarded,
        }),
        Err(_) => Err(pass(Counter::PassNoEgress)),
    }
}
