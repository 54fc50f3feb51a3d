//! The program's maps and the lookups on them. Layouts come from
//! pop-forwarder-common; the host pins these maps under the same names.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use pop_forwarder_common::{
    Counter, INTERFACE_MAC_KNOWN, InterfaceCounter, KERNEL_NEXT_HOP, MAX_EGRESS_PORTS,
    MAX_INTERFACES, MAX_LOCAL_ADDRS, MAX_NEIGHBOURS, MAX_NEXT_HOPS, MAX_ROUTES_V4, MAX_ROUTES_V6,
    NH_F_CONNECTED, NeighbourKey, NeighbourMac, NextHop, RouteKeyV4, RouteTarget, TrafficCounter,
    dir24::{self, TBL8_ENTRIES, TBL24_ENTRIES, Tbl24},
    dxr6,
    ecmp::{self, NextHopGroup},
    settings,
};

use network_types::ip::Ipv6Hdr;
use pop_forwarder_common::maglev::{address_words, address_words_v4};

use crate::{
    Verdict, drop,
    packet::{pair_at, words_at},
    pass,
};

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

/// The IPv6 routes: the host's record, which the program reads only if
/// so configured; it looks IPv6 up in the range table below by default.
#[map]
static ROUTES_V6: LpmTrie<[u8; 16], RouteTarget> = LpmTrie::with_max_entries(MAX_ROUTES_V6, 0);

/// The IPv6 range table (see pop_forwarder_common::dxr6): one entry per
/// /20 (a cache line: the entry, and a copy of the chunk's ranges when
/// they are few), and the sorted address ranges of the /20s that longer
/// routes cut. Mmappable, like DIR-24-8.
#[map]
static IPV6_CHUNKS: Array<[u64; dxr6::CHUNK_WORDS as usize]> =
    Array::with_max_entries(dxr6::CHUNKS, BPF_F_MMAPABLE as u32);

#[map]
static IPV6_RANGES: Array<u64> = Array::with_max_entries(dxr6::RANGE_SLOTS, BPF_F_MMAPABLE as u32);

#[map]
static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(MAX_NEXT_HOPS, 0);

/// ECMP groups: routes with several paths point at one (see
/// pop_forwarder_common::ecmp).
#[map]
static NEXT_HOP_GROUPS: Array<NextHopGroup> = Array::with_max_entries(ecmp::MAX_GROUPS, 0);

/// Hosts on connected subnets and their MACs, mirrored from the kernel's
/// neighbour table by the daemon.
#[map]
static NEIGHBOURS: HashMap<NeighbourKey, NeighbourMac> =
    HashMap::with_max_entries(MAX_NEIGHBOURS, 0);

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
///
/// # Safety
/// `mac` is at an even address (`packet::words_at`): the frame's
/// destination MAC is.
#[inline(always)]
pub unsafe fn for_this_interface(ifindex: u32, mac: *const [u8; 6]) -> bool {
    match INTERFACE_MACS.get(ifindex) {
        // Word by word: a slice comparison may become a memcmp call, and
        // bytes take twice the loads.
        Some(own) if own[6] == INTERFACE_MAC_KNOWN => {
            // SAFETY: six bytes at even addresses: `mac` by the caller, `own`
            // a map value (which starts on 8 bytes).
            let (own, mac) = unsafe {
                (
                    &*words_at::<3>(own.as_ptr()),
                    &*words_at::<3>(mac as *const u8),
                )
            };
            own[0] == mac[0] && own[1] == mac[1] && own[2] == mac[2]
        }
        _ => true,
    }
}

/// What the program did with the packets of each ingress interface.
#[map]
static INTERFACE_STATS: PerCpuArray<InterfaceCounter> =
    PerCpuArray::with_max_entries(MAX_INTERFACES, 0);

/// One more packet of `bytes` received on `ifindex`, and what became of it.
#[inline(always)]
pub fn count_interface(ifindex: u32, bytes: u64, action: u32) {
    if let Some(slot) = INTERFACE_STATS.get_ptr_mut(ifindex) {
        // SAFETY: as in `count`.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
            match action {
                xdp_action::XDP_REDIRECT | xdp_action::XDP_TX => (*slot).forwarded += 1,
                xdp_action::XDP_PASS => (*slot).passed += 1,
                _ => (*slot).dropped += 1,
            }
        }
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
pub fn lookup_route_v6(dst: &[u8; 16]) -> Option<u32> {
    if let Some(&settings::IPV6_TRIE) = SETTINGS.get(settings::IPV6_LOOKUP) {
        return ROUTES_V6.get(Key::new(128, *dst)).map(|t| t.next_hop);
    }
    let words = dst.as_ptr() as *const u64;
    // SAFETY: 16 readable bytes; read unaligned (a header field).
    let (hi, lo) = unsafe {
        (
            u64::from_be(words.read_unaligned()),
            u64::from_be(words.add(1).read_unaligned()),
        )
    };
    let words = IPV6_CHUNKS.get(dxr6::chunk_index(hi))?;
    dxr6::lookup_in(words, hi, lo, |i| IPV6_RANGES.get(i).copied())
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

/// Where a route sends one packet: the next hop's id and slot, and the
/// destination MAC (the gateway's, or for a connected subnet the
/// destination host's).
pub struct Hop {
    pub id: u32,
    pub next_hop: &'static NextHop,
    pub dst_mac: &'static [u8; 6],
}

impl Hop {
    /// Whether a packet of `l3_len` bytes fits the egress MTU; if not, the
    /// kernel fragments it or answers ICMP.
    #[inline(always)]
    pub fn fits(&self, l3_len: usize) -> Result<(), Verdict> {
        if l3_len > self.next_hop.mtu as usize {
            return Err(pass(Counter::PassTooBig));
        }
        Ok(())
    }
}

/// What an ECMP group picks its member by, and where the packet goes (for
/// a connected subnet's neighbour), read only when needed: a group's
/// bucket, a connected next hop's destination. Plain data, not closures: a
/// closure the compiler leaves out of line is a BPF-to-BPF call whose stack
/// frame adds to the caller's, past the verifier's 512 bytes.
pub enum RouteFlow {
    /// IPv4: addresses, protocol and, where `l4` is (not a fragment), the
    /// TCP, UDP or SCTP ports.
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        l4: Option<usize>,
    },
    /// IPv6: addresses (read in the header, not copied), and the flow label
    /// with the next header (RFC 6438; Linux's default policy).
    V6 { header: *const Ipv6Hdr, extra: u64 },
    /// An IP-in-IP outer packet to a node: every flow to the node on one
    /// path, as a router hashing the outer header would do.
    Node([u64; 2]),
}

impl RouteFlow {
    /// The bucket of an ECMP group this flow takes.
    #[inline(always)]
    fn bucket(&self, ctx: &XdpContext) -> usize {
        match *self {
            RouteFlow::V4 {
                src,
                dst,
                protocol,
                l4,
            } => ecmp::flow_bucket(
                seed(),
                u64::from(u32::from_ne_bytes(src)),
                u64::from(u32::from_ne_bytes(dst)),
                u64::from(ports_of(ctx, protocol, l4)) << 8 | u64::from(protocol),
            ),
            RouteFlow::V6 { header, extra } => {
                // SAFETY: the header was bounds-checked by ptr_at before
                // the RouteFlow was made, and the packet has not moved since.
                let [s0, s1] = address_words(unsafe { &(*header).src_addr });
                let [d0, d1] = address_words(unsafe { &(*header).dst_addr });
                ecmp::flow_bucket(
                    seed(),
                    s0 ^ s1.rotate_left(32),
                    d0 ^ d1.rotate_left(32),
                    extra,
                )
            }
            RouteFlow::Node([hi, lo]) => ecmp::flow_bucket(0, hi, lo, 0),
        }
    }

    /// The destination's words (`maglev::address_words`).
    #[inline(always)]
    fn destination(&self) -> [u64; 2] {
        match *self {
            RouteFlow::V4 { dst, .. } => address_words_v4(dst),
            // SAFETY: as in `bucket`.
            RouteFlow::V6 { header, .. } => address_words(unsafe { &(*header).dst_addr }),
            RouteFlow::Node(words) => words,
        }
    }
}

/// The TCP, UDP or SCTP ports of a packet whose L4 header is at `l4`
/// (source port in the high half), or 0.
#[inline(always)]
fn ports_of(ctx: &XdpContext, protocol: u8, l4: Option<usize>) -> u32 {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const SCTP: u8 = 132;
    match l4 {
        Some(offset) if matches!(protocol, TCP | UDP | SCTP) => {
            match pair_at(ctx, offset).zip(pair_at(ctx, offset + 2)) {
                Some((s, d)) => {
                    u32::from(u16::from_be_bytes(s)) << 16 | u32::from(u16::from_be_bytes(d))
                }
                None => 0,
            }
        }
        _ => 0,
    }
}

/// The PoP's flow-hash seed.
#[inline(always)]
pub fn seed() -> u32 {
    SETTINGS.get(settings::FLOW_HASH_SEED).copied().unwrap_or(0)
}

/// The hop that route target `target` gives `flow`'s packet: an ECMP
/// group picks the member in the flow's bucket; otherwise the verdict that
/// hands the packet to the kernel.
#[inline(always)]
pub fn next_hop_for(ctx: &XdpContext, target: u32, flow: &RouteFlow) -> Result<Hop, Verdict> {
    let id = match ecmp::group_index(target) {
        Some(group) => match NEXT_HOP_GROUPS.get(group) {
            Some(g) => u32::from(g.buckets[flow.bucket(ctx) % ecmp::GROUP_BUCKETS]),
            None => return Err(pass(Counter::PassNoNextHop)),
        },
        None => target,
    };
    if id == KERNEL_NEXT_HOP {
        return Err(pass(Counter::PassKernelRoute));
    }
    let next_hop = match NEXT_HOPS.get(id) {
        Some(nh) if nh.is_in_use() => nh,
        _ => return Err(pass(Counter::PassNoNextHop)),
    };
    let dst_mac = if next_hop.flags & NH_F_CONNECTED != 0 {
        let [hi, lo] = flow.destination();
        // Built from words: byte arrays would take stack the program does
        // not have to spare.
        let words = [
            hi,
            lo,
            u64::from(next_hop.ifindex) | u64::from(next_hop.family) << 32,
        ];
        // SAFETY: NeighbourKey is repr(C), 24 bytes without padding: the
        // address's 16 bytes as `address_words` read them (little-endian),
        // then ifindex and family.
        let key = unsafe { core::mem::transmute::<[u64; 3], NeighbourKey>(words) };
        // SAFETY: the value is only read, for the MAC copied out of it.
        match unsafe { NEIGHBOURS.get(&key) } {
            Some(n) => &n.mac,
            None => return Err(pass(Counter::PassNoNeighbour)),
        }
    } else if next_hop.mac_valid() {
        &next_hop.dst_mac
    } else {
        return Err(pass(Counter::PassNoNeighbour));
    };
    Ok(Hop {
        id,
        next_hop,
        dst_mac,
    })
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
