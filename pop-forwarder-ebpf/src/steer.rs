//! VIP steering: a packet for a service address goes to one cache node of
//! its pool, the same node for the whole flow (connection table), chosen
//! for a new flow by the VIP's Maglev table, and delivered by direct server
//! return: the frame gets the node's MAC, the IP packet is left as it is
//! (the node holds the VIP itself).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{
        bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use pop_forwarder_common::{
    Counter, ICMP_TOO_BIG_PER_SECOND, LOCAL_NEXT_HOP, TrafficCounter, checksum, dir24, ecmp,
    maglev::{self, NO_NODE},
    settings,
    steering::{
        self, CacheNode, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, FLOW_SETS_V4, FLOW_WAYS,
        FLOWS_SEEN_SLOTS, FlowEntry, FlowKey, FlowSetV4, FlowSlotV4, MAGLEV_ENTRIES,
        MAX_CACHE_NODES, MAX_FLOWS, MAX_VIPS, NODE_F_IN_USE, NODE_F_IPIP, NODE_F_MAC_VALID,
        PROTO_TCP, PROTO_UDP, VIP_FILTER_BUCKETS, VipInfo, VipKey,
    },
};

use crate::{
    Verdict,
    maps::{
        RouteFlow, SETTINGS, add_traffic, egress, lookup_route_v4, lookup_route_v6, next_hop_for,
        seed, traffic,
    },
    packet::{copy_bytes, copy_mac, pair_at, ptr_at, widen, words_at},
    pass,
};

#[map]
static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// One Maglev table per VIP slot, node ids stored in pairs (see dir24).
#[map]
static MAGLEV: Array<u64> = Array::with_max_entries(MAGLEV_ENTRIES / dir24::ENTRIES_PER_ELEMENT, 0);

#[map]
static CACHE_NODES: Array<CacheNode> = Array::with_max_entries(MAX_CACHE_NODES, 0);

/// Flow -> node: keeps a flow on its node when the pool changes. IPv6
/// flows here, in the kernel's LRU hash; IPv4 ones in FLOWS_V4. Each table
/// has room for MAX_FLOWS.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// The IPv4 connection table: sets of slots in an array (see
/// `steering::FlowSetV4`). A lookup reads one set, inline; the LRU hash
/// costs a call that hashes the key and walks a bucket (with the
/// return-stack mitigations of the CPUs this runs on, every call's return
/// is dear), and a new flow's insert takes its lock.
#[map]
static FLOWS_V4: Array<FlowSetV4> = Array::with_max_entries(FLOW_SETS_V4, 0);

/// The set of the IPv4 flow `key` (its words).
#[inline(always)]
fn flow_set_v4(key: [u64; 2]) -> Option<*mut FlowSetV4> {
    FLOWS_V4.get_ptr_mut(steering::flow_set_v4(key, seed()))
}

/// Per CPU: where `opaque_way` puts a slot number.
#[map]
static OPAQUE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `way`, as a slot number the verifier knows only to be one: written to
/// this CPU's word and read back. The paths that chose different slots
/// then go on as one, which the verifier walks once; as constants, each
/// slot's path would be walked through the rest of the program.
#[inline(always)]
fn opaque_way(way: usize) -> usize {
    match OPAQUE.get_ptr_mut(0) {
        // SAFETY: this CPU's word; XDP runs with preemption off.
        Some(word) => unsafe {
            core::ptr::write_volatile(word, way as u32);
            core::ptr::read_volatile(word) as usize & (FLOW_WAYS - 1)
        },
        None => 0,
    }
}

/// The slot of `set` that holds the IPv4 flow `key`, and what it held.
#[inline(always)]
fn slot_of(set: *mut FlowSetV4, key: [u64; 2]) -> Option<(*mut FlowSlotV4, FlowSlotV4)> {
    for way in 0..FLOW_WAYS {
        // SAFETY: a slot of this array's value. Read once, whole (another
        // CPU may be writing it): what is checked is what is used.
        let seen = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*set).slots[way])) };
        if seen.holds(key) {
            let way = opaque_way(way);
            // SAFETY: as above.
            return Some((unsafe { core::ptr::addr_of_mut!((*set).slots[way]) }, seen));
        }
    }
    None
}

/// The entry of `key`'s flow, from the table of its family: what it says,
/// and where its last-seen time is kept.
#[inline(always)]
fn flow_entry(key: &FlowKey) -> Option<(FlowEntry, *mut u64)> {
    match key.v4() {
        Some(k) => {
            let words = k.words();
            let (slot, seen) = slot_of(flow_set_v4(words)?, words)?;
            // SAFETY: a field of the slot found above.
            Some((seen.entry, unsafe {
                core::ptr::addr_of_mut!((*slot).entry.last_seen_ns)
            }))
        }
        None => {
            let entry = FLOWS.get_ptr_mut(key)?;
            // SAFETY: an LRU hash value of this map's type.
            Some((unsafe { *entry }, unsafe {
                core::ptr::addr_of_mut!((*entry).last_seen_ns)
            }))
        }
    }
}

#[inline(always)]
fn forget_flow(key: &FlowKey) {
    match key.v4() {
        Some(k) => {
            let words = k.words();
            if let Some((slot, _)) = flow_set_v4(words).and_then(|set| slot_of(set, words)) {
                // SAFETY: a slot of the array: a zero key word fails the
                // check, so the slot holds no flow.
                unsafe { (*slot).key[1] = 0 };
            }
        }
        None => {
            let _ = FLOWS.remove(key);
        }
    }
}

/// Writes `entry` for `key`'s flow: for IPv4, over the slot that holds the
/// flow, or else one that holds none, or else the one of the flow seen
/// least recently.
#[inline(always)]
fn remember_flow(key: &FlowKey, entry: &FlowEntry) {
    let Some(k) = key.v4() else {
        let _ = FLOWS.insert(key, entry, 0);
        return;
    };
    let words = k.words();
    let Some(set) = flow_set_v4(words) else {
        return;
    };
    let mut way = 0;
    let mut oldest = u64::MAX;
    for w in 0..FLOW_WAYS {
        // SAFETY: a slot of this array's value, read once, whole.
        let seen = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*set).slots[w])) };
        match seen.flow() {
            Some(flow) if flow == words => {
                way = w;
                break;
            }
            None => {
                way = w;
                oldest = 0;
            }
            Some(_) if seen.entry.last_seen_ns < oldest => {
                way = w;
                oldest = seen.entry.last_seen_ns;
            }
            Some(_) => {}
        }
    }
    let slot = FlowSlotV4::new(words, *entry);
    // SAFETY: a slot of this array's value; word by word (a whole-struct
    // store may become a byte-by-byte copy in BPF). A CPU reading it
    // meanwhile finds the check wrong and the slot empty.
    unsafe {
        let at = core::ptr::addr_of_mut!((*set).slots[opaque_way(way)]);
        (*at).key[1] = 0;
        (*at).entry.node = slot.entry.node;
        (*at).entry.vip = slot.entry.vip;
        (*at).entry.last_seen_ns = slot.entry.last_seen_ns;
        (*at).key[0] = slot.key[0];
        (*at).key[1] = slot.key[1];
    }
}

#[map]
static VIP_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Outer source addresses of IP-in-IP (ENCAP_SOURCE_V4, ENCAP_SOURCE_V6).
#[map]
static ENCAP_SOURCES: Array<[u8; 16]> = Array::with_max_entries(2, 0);

/// See `steering::VIP_FILTER_BUCKETS`.
#[map]
static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_BUCKETS, 0);

#[map]
static NODE_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_CACHE_NODES, 0);

/// What steering needs to know of a packet, parsed by the IP stage.
pub struct Flow {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    /// Offset of the L4 header, if the packet carries one (not an IPv4
    /// fragment after the first).
    pub l4_offset: Option<usize>,
    pub frame_len: usize,
    /// The IP datagram's own length (the frame may carry Ethernet padding
    /// after it).
    pub ip_len: usize,
    /// DSCP and ECN (IPv4 TOS, IPv6 traffic class).
    pub tos: u8,
    /// Ports known without reading the L4 header (an ICMP error's flow).
    pub ports: Option<(u16, u16)>,
}

/// Whether any VIP is configured: without, the packet path builds no flow.
#[inline(always)]
pub fn enabled() -> bool {
    SETTINGS.get(settings::STEERING_ON) == Some(&1)
}

/// The verdict for a VIP's packet, or None if the destination is no VIP.
#[inline(always)]
pub fn steer(ctx: &XdpContext, eth: *mut EthHdr, flow: &mut Flow) -> Option<Verdict> {
    // An ICMP error about a VIP flow (a router on the way back to the
    // client answering the node's reply) belongs to that flow's node: the
    // flow is rewritten in place (a second Flow would not fit the stack).
    icmp_error_flow(ctx, flow);
    let flow = &*flow;
    // An address no VIP has ever had is routed at the cost of this one
    // read; otherwise it is the address's epoch (see VIP_FILTER_BUCKETS),
    // read before any VIP lookup so that an entry written in it was
    // written after the VIP changes it stands for.
    let epoch = *VIP_FILTER.get(steering::vip_bucket(maglev::address_words(&flow.dst)))?;
    if epoch == 0 {
        return None;
    }
    let (src_port, dst_port) = ports(ctx, flow);
    let flow_key = FlowKey {
        src: flow.src,
        dst: flow.dst,
        src_port,
        dst_port,
        protocol: flow.protocol,
        family: flow.family,
        pad: [0; 2],
    };
    let now = coarse_now_ns();
    let known = match flow_entry(&flow_key) {
        Some((entry, last_seen)) => {
            let idle = now.wrapping_sub(entry.last_seen_ns);
            let timeout = idle_timeout_ns(flow.protocol);
            let node = usable(entry.node).filter(|_| timeout == 0 || idle < timeout);
            if let Some(node) = node {
                // At most one write a second per flow. SAFETY: the
                // entry's field; a racing CPU's write of the same time,
                // or of another flow's that took the slot, is harmless.
                if idle >= 1_000_000_000 {
                    unsafe { *last_seen = now };
                }
                Some((entry, node))
            } else {
                // Idle too long, or its node is gone: the entry goes, so
                // that a node later given the slot does not inherit the
                // flow (a TCP flow that is not starting would otherwise
                // keep it: only a SYN writes an entry).
                forget_flow(&flow_key);
                None
            }
        }
        None => None,
    };
    // The node is read once, where the flow's is decided: each read is a
    // map lookup the compiler cannot merge with another.
    let (vip_index, node_id, node) = match known {
        // A known flow of an address whose VIPs are as they were: the
        // entry names its VIP, no VIP lookup needed.
        Some((entry, node)) if entry.epoch() == epoch => (entry.vip_index(), entry.node, node),
        // The address's VIPs changed since the entry was written: the flow
        // stays on its node if a VIP still takes it, and the entry learns
        // which one.
        Some((entry, node)) => {
            let vip = lookup_vip(flow, dst_port)?;
            let learnt = FlowEntry {
                vip: FlowEntry::vip_of(vip.index, epoch),
                ..entry
            };
            remember_flow(&flow_key, &learnt);
            (vip.index, entry.node, node)
        }
        None => {
            let vip = lookup_vip(flow, dst_port)?;
            let hash = maglev::flow_hash(
                u64::from(seed()),
                &flow.src,
                &flow.dst,
                src_port,
                dst_port,
                flow.protocol,
            );
            let slot = vip.maglev_position(hash);
            let Some(pair) = MAGLEV.get(dir24::element_of(slot)) else {
                return Some(pass(Counter::PassVipNoNode));
            };
            let id = dir24::entry_in(*pair, slot);
            let node = if id == NO_NODE { None } else { usable(id) };
            let Some(node) = node else {
                return Some(pass(Counter::PassVipNoNode));
            };
            // A TCP flow is remembered from the packet that can start it
            // (SYN): a flood of other TCP packets for flows never seen
            // creates no entries, so it cannot push established flows out
            // of the table; such packets follow the Maglev table alone.
            // Any other flow is remembered from its second packet (see
            // `seen_before`): a flood of one-packet flows (spoofed
            // sources) creates no entries either. A full table evicts its
            // least recently used flow.
            let remember = if flow.protocol == PROTO_TCP {
                tcp_syn(ctx, flow)
            } else {
                seen_before(hash)
            };
            if remember {
                let entry = FlowEntry {
                    node: id,
                    vip: FlowEntry::vip_of(vip.index, epoch),
                    last_seen_ns: now,
                };
                remember_flow(&flow_key, &entry);
            }
            (vip.index, id, node)
        }
    };
    if node.flags & NODE_F_IPIP != 0 {
        let verdict = encapsulate(ctx, node, flow, (src_port, dst_port));
        if verdict.counter == Counter::Steered {
            add_traffic(&VIP_STATS, vip_index, flow.frame_len as u64);
            add_traffic(&NODE_STATS, node_id, flow.frame_len as u64);
        }
        return Some(verdict);
    }
    // Too big for the node's link, like a routed packet: the kernel
    // fragments it or answers ICMP.
    if node.mtu != 0 && flow.ip_len > node.mtu as usize {
        return Some(pass(Counter::PassTooBig));
    }
    let verdict = match egress(ctx, node.ifindex) {
        Ok(v) => Verdict {
            action: v.action,
            counter: Counter::Steered,
        },
        Err(v) => return Some(v),
    };
    // SAFETY: `eth` was bounds-checked by ptr_at in classify_and_forward;
    // the MACs are at even addresses (`copy_mac`).
    unsafe {
        copy_mac(&mut (*eth).dst_addr, &node.dst_mac);
        copy_mac(&mut (*eth).src_addr, &node.src_mac);
    }
    add_traffic(&VIP_STATS, vip_index, flow.frame_len as u64);
    add_traffic(&NODE_STATS, node_id, flow.frame_len as u64);
    Some(verdict)
}

/// The VIP that takes `flow` (to `dst_port`): the one of its port, or else
/// the one of every port of its protocol.
#[inline(always)]
fn lookup_vip(flow: &Flow, dst_port: u16) -> Option<VipInfo> {
    let key = VipKey {
        addr: flow.dst,
        port: dst_port,
        protocol: flow.protocol,
        family: flow.family,
    };
    // SAFETY: map values are only copied out.
    match unsafe { VIPS.get(&key) } {
        Some(vip) => Some(*vip),
        None => unsafe { VIPS.get(&key.any_port()) }.copied(),
    }
}

/// Per CPU: the jiffy at which `coarse_now_ns` last read the clock, and
/// what it read.
#[map]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// `bpf_ktime_get_coarse_ns`, read once a tick per CPU. The coarse clock
/// moves only at a tick, so the reading stays exact until the jiffies
/// counter moves; reading that counter (`bpf_jiffies64`) the verifier
/// turns into one load, where the clock is a helper call, and a helper
/// call's return costs tens of nanoseconds under the return-stack
/// mitigations of the CPUs this runs on.
#[inline(always)]
fn coarse_now_ns() -> u64 {
    // SAFETY: a plain helper call, inlined by the verifier.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cached) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: a plain helper call.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; XDP runs with preemption off.
    unsafe {
        if (*cached)[0] != jiffies || (*cached)[1] == 0 {
            *cached = [jiffies, bpf_ktime_get_coarse_ns()];
        }
        (*cached)[1]
    }
}

/// How long a connection-table entry of `protocol` may stay idle, in ns;
/// 0: for ever.
#[inline(always)]
fn idle_timeout_ns(protocol: u8) -> u64 {
    let slot = if protocol == PROTO_TCP {
        settings::FLOW_IDLE_TCP
    } else {
        settings::FLOW_IDLE_UDP
    };
    u64::from(SETTINGS.get(slot).copied().unwrap_or(0)) * 1_000_000_000
}

/// Flows other than TCP seen once and not yet remembered in FLOWS, by flow
/// hash, direct-mapped (see `steering::seen_slot`): a lookup and a write
/// of one array slot, whatever the traffic, so that a flood of one-packet
/// flows (spoofed sources) costs what a Maglev lookup does and churns this
/// table, not FLOWS. Not pinned: a restart forgets them (a flow is then
/// remembered a packet later).
#[map]
static FLOWS_SEEN: Array<u64> = Array::with_max_entries(FLOWS_SEEN_SLOTS, 0);

/// Whether the flow of `hash` (not in FLOWS) was seen before: true on its
/// second packet (the note is then cleared, the flow goes to FLOWS); on
/// its first, notes it and answers false.
#[inline(always)]
fn seen_before(hash: u32) -> bool {
    let (slot, tag) = steering::seen_slot(hash);
    let Some(noted) = FLOWS_SEEN.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: a slot of this array; a racing CPU's write to it loses one
    // note, which the table's design allows anyway.
    unsafe {
        if *noted == tag {
            *noted = 0;
            return true;
        }
        *noted = tag;
    }
    false
}

/// Whether `flow`'s packet is a TCP SYN (its L4 header there to read).
#[inline(always)]
fn tcp_syn(ctx: &XdpContext, flow: &Flow) -> bool {
    const SYN: u8 = 0x02;
    match flow.l4_offset.and_then(|l4| pair_at(ctx, l4 + 12)) {
        Some([_, flags]) => flags & SYN != 0,
        None => false,
    }
}

/// The node `id`, if it can take packets now.
#[inline(always)]
fn usable(id: u32) -> Option<&'static CacheNode> {
    CACHE_NODES
        .get(id)
        .filter(|n| n.flags & NODE_F_IN_USE != 0 && n.flags & (NODE_F_MAC_VALID | NODE_F_IPIP) != 0)
}

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// For an ICMP error (IPv4: destination unreachable, time exceeded,
/// parameter problem; IPv6: types 1 to 4) whose embedded packet is TCP or
/// UDP, rewrites `flow` into the flow it is about, seen from the client:
/// the embedded packet is the node's reply, from the VIP to the client, so
/// its addresses and ports are swapped back. Anything else leaves `flow`
/// as it is.
#[inline(always)]
fn icmp_error_flow(ctx: &XdpContext, flow: &mut Flow) -> Option<()> {
    let offset = flow.l4_offset?;
    let icmp = ptr_at::<[u8; 8]>(ctx, offset)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    let kind = unsafe { (*icmp)[0] };
    let embedded = offset + 8;
    let (src, dst, protocol, l4) = match flow.protocol {
        ICMP if flow.family == 4 && matches!(kind, 3 | 11 | 12) => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, embedded)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            let header_len = usize::from(ip.vihl & 0x0f) * 4;
            if header_len < Ipv4Hdr::LEN {
                return None;
            }
            (
                widen(ip.src_addr),
                widen(ip.dst_addr),
                ip.proto,
                embedded + header_len,
            )
        }
        ICMPV6 if flow.family == 6 && matches!(kind, 1..=4) => {
            let ip = ptr_at::<Ipv6Hdr>(ctx, embedded)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            (
                ip.src_addr,
                ip.dst_addr,
                ip.next_hdr,
                embedded + Ipv6Hdr::LEN,
            )
        }
        _ => return None,
    };
    // It must be about a packet the VIP sent: one addressed to the VIP,
    // quoting a packet from it. Anything else is routed like any packet.
    if protocol != PROTO_TCP && protocol != PROTO_UDP || src != flow.dst {
        return None;
    }
    let ports = ptr_at::<[u8; 4]>(ctx, l4)?;
    // SAFETY: as above.
    let p = unsafe { *ports };
    flow.src = dst;
    flow.dst = src;
    flow.protocol = protocol;
    flow.l4_offset = None;
    flow.ports = Some((
        u16::from_be_bytes([p[2], p[3]]),
        u16::from_be_bytes([p[0], p[1]]),
    ));
    Some(())
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;

/// IP-in-IP to the node (RFC 2003; IPv6 outer headers per RFC 2473): an
/// outer header from the configured source to the node's address, routed
/// like any packet. IPv4 in IPv4, IPv6 in IPv6 and IPv4 in IPv6; a packet
/// the egress MTU cannot take once wrapped is answered with ICMP (see
/// `too_big`). `ports` are the inner flow's.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, node: &CacheNode, flow: &Flow, ports: (u16, u16)) -> Verdict {
    // Exactly the IP datagram goes inside, not the Ethernet padding after it.
    let inner_len = flow.ip_len;
    let padding = flow.frame_len - EthHdr::LEN - inner_len;
    let outer_v4 = node.family == 4;
    if outer_v4 && flow.family != 4 {
        // IPv6 in IPv4 is not offered.
        return pass(Counter::PassVipNoNode);
    }
    let outer_len = if outer_v4 { Ipv4Hdr::LEN } else { Ipv6Hdr::LEN };
    let route = if outer_v4 {
        lookup_route_v4([node.addr[0], node.addr[1], node.addr[2], node.addr[3]])
    } else {
        lookup_route_v6(&node.addr)
    };
    let Some(target) = route.filter(|&id| id != LOCAL_NEXT_HOP) else {
        return pass(Counter::PassVipNoNode);
    };
    // An ECMP route to the node picks its path by the outer addresses, as
    // a router hashing the outer header would: every flow to one node
    // takes one path.
    let route_flow = RouteFlow::Node(maglev::address_words(&node.addr));
    let hop = match next_hop_for(ctx, target, &route_flow) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    if let Err(verdict) = hop.fits(inner_len + outer_len) {
        // Never an ICMP error in answer to an ICMP error (RFC 1812 4.3.2.7,
        // RFC 4443 2.4): one about a VIP flow that is too big goes to the
        // kernel, counted, like any other too-big packet.
        if flow.ports.is_some() {
            return verdict;
        }
        let mtu = hop.next_hop.mtu.saturating_sub(outer_len as u32);
        return too_big(ctx, flow.family, mtu);
    }
    let next_hop = hop.next_hop;
    // An outer packet that would leave on a VLAN: not offered.
    if next_hop.vlan_proto != 0 {
        return pass(Counter::PassVipNoNode);
    }
    let Some(source) = ENCAP_SOURCES.get(if outer_v4 {
        ENCAP_SOURCE_V4
    } else {
        ENCAP_SOURCE_V6
    }) else {
        return pass(Counter::PassVipNoNode);
    };
    let mut source = *source;
    // An IPv4 pool (`base/len` in bytes 0 to 4): the flow's entropy picks
    // the address, so routers and NICs hashing the outer header spread a
    // node's flows as they would the inner ones.
    if outer_v4 && source[4] > 0 && source[4] < 32 {
        let host = (entropy_label(flow, ports) & (u32::MAX >> source[4])).to_be_bytes();
        source[0] |= host[0];
        source[1] |= host[1];
        source[2] |= host[2];
        source[3] |= host[3];
    }
    let verdict = match egress(ctx, next_hop.tx_ifindex) {
        Ok(v) => Verdict {
            action: v.action,
            counter: Counter::Steered,
        },
        Err(v) => return v,
    };
    // SAFETY: plain helper calls on this program's context; every pointer
    // into the packet is derived again below.
    if padding > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } != 0 {
        return pass(Counter::PassVipNoNode);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return pass(Counter::PassVipNoNode);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(Counter::PassVipNoNode);
    };
    // SAFETY: ptr_at checked the header lies inside the packet; the MACs
    // are at even addresses (`copy_mac`).
    unsafe {
        copy_mac(&mut (*eth).dst_addr, hop.dst_mac);
        copy_mac(&mut (*eth).src_addr, &next_hop.src_mac);
        (*eth).ether_type = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be();
    }
    let inner_protocol = if flow.family == 4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if outer_v4 {
        let Some(ip) = ptr_at::<[u8; 20]>(ctx, EthHdr::LEN) else {
            return pass(Counter::PassVipNoNode);
        };
        // Built and summed as 16-bit words as they lie in memory
        // (`checksum::sum_ne`), written word by word: a 20-byte array
        // stored into the packet is twenty byte stores. DSCP and ECN
        // copied from the inner header (RFC 6040's normal mode for ECN;
        // the uniform model for DSCP, RFC 2983); don't-fragment set; TTL 64.
        let word = |a: u8, b: u8| u16::from_ne_bytes([a, b]);
        let mut h = [
            word(0x45, flow.tos),
            ((inner_len + outer_len) as u16).to_be(),
            0,
            word(0x40, 0),
            word(64, inner_protocol),
            0,
            word(source[0], source[1]),
            word(source[2], source[3]),
            word(node.addr[0], node.addr[1]),
            word(node.addr[2], node.addr[3]),
        ];
        h[5] = !checksum::fold(checksum::sum_ne(&h));
        // SAFETY: ptr_at checked the 20 bytes lie inside the packet, at an
        // even address (`words_at`).
        unsafe {
            let out = words_at::<10>(ip as *const u8);
            let mut i = 0;
            while i < 10 {
                (*out)[i] = h[i];
                i += 1;
            }
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return pass(Counter::PassVipNoNode);
        };
        // Traffic class from the inner header (as for IPv4); the flow label
        // from the inner flow, for ECMP and RSS on the way.
        let label = entropy_label(flow, ports);
        // SAFETY: as above.
        unsafe {
            (*ip).vcf = [
                0x60 | flow.tos >> 4,
                flow.tos << 4 | (label >> 16) as u8,
                (label >> 8) as u8,
                label as u8,
            ];
            (*ip).payload_len = (inner_len as u16).to_be_bytes();
            (*ip).next_hdr = inner_protocol;
            (*ip).hop_limit = 64;
            copy_bytes(&mut (*ip).src_addr, &source);
            copy_bytes(&mut (*ip).dst_addr, &node.addr);
        }
    }
    traffic(hop.id, (EthHdr::LEN + inner_len + outer_len) as u64);
    verdict
}

/// The inner flow's entropy (`ecmp::entropy_label`): the outer IPv6 flow
/// label, and the host part of an IPv4 source pool's address. Computed
/// where one of those is written, not for every wrapped packet: an IPv4
/// outer header from one source address has no use for it.
#[inline(always)]
fn entropy_label(flow: &Flow, (src_port, dst_port): (u16, u16)) -> u32 {
    ecmp::entropy_label(
        maglev::address_words(&flow.src),
        u32::from(src_port) << 16 | u32::from(dst_port),
        flow.protocol,
    )
}

/// Source and destination ports of TCP and UDP; 0 for other protocols,
/// for fragments without the L4 header, and for a header cut short.
#[inline(always)]
fn ports(ctx: &XdpContext, flow: &Flow) -> (u16, u16) {
    if let Some(ports) = flow.ports {
        return ports;
    }
    if flow.protocol != PROTO_TCP && flow.protocol != PROTO_UDP {
        return (0, 0);
    }
    let Some(offset) = flow.l4_offset else {
        return (0, 0);
    };
    match ptr_at::<[u8; 4]>(ctx, offset) {
        // SAFETY: ptr_at checked the four bytes lie inside the packet.
        Some(p) => {
            let b = unsafe { *p };
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        }
        None => (0, 0),
    }
}

/// How much of the packet an ICMP error quotes: an IPv4 header with the
/// longest options and 8 bytes beyond (RFC 792); for IPv6 the fixed header
/// and 48 bytes (RFC 4443 asks for as much as fits 1280 bytes; this is
/// enough for any transport header a sender matches errors by).
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 88;
/// Whole frames of the answers: Ethernet, IP, ICMP, quote.
const ANSWER_V4: usize = EthHdr::LEN + 20 + 8 + QUOTE_V4;
const ANSWER_V6: usize = EthHdr::LEN + 40 + 8 + QUOTE_V6;

/// Answers a packet for a VIP that is too big once wrapped for its node:
/// ICMP fragmentation needed (IPv4, RFC 1191) or packet too big (ICMPv6,
/// RFC 4443) giving `mtu`, from the VIP to the client, back out of the
/// interface the packet came in on, to the MAC it came from. The packet
/// becomes the answer in place: cut to the quote, then the new headers
/// grown in front of it. IPv4 without don't-fragment (the sender allows
/// fragmenting, which XDP cannot do) goes to the kernel, counted.
/// Too-big answers sent per source this second: (the second's start in
/// ns, answers). Not pinned: a restart starts every source afresh.
#[map]
static TOO_BIG_SENT: LruHashMap<[u64; 2], [u64; 2]> = LruHashMap::with_max_entries(1 << 16, 0);

/// Whether the packet's source may get another ICMP error this second
/// (RFC 1812 4.3.2.8, RFC 4443 2.4 f), counting it if so.
#[inline(always)]
fn too_big_allowed(ctx: &XdpContext, family: u8) -> bool {
    let key = if family == 4 {
        match pair_at(ctx, EthHdr::LEN + 12).zip(pair_at(ctx, EthHdr::LEN + 14)) {
            Some((a, b)) => [u64::from(u32::from_le_bytes([a[0], a[1], b[0], b[1]])), 0],
            None => return false,
        }
    } else {
        match ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) {
            // SAFETY: ptr_at checked the header lies inside the packet.
            Some(ip) => maglev::address_words(unsafe { &(*ip).src_addr }),
            None => return false,
        }
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match TOO_BIG_SENT.get_ptr_mut(&key) {
        Some(sent) => {
            // SAFETY: an LRU hash value of this map's type; racing CPUs
            // may miscount by a few, which a rate limit tolerates.
            let sent = unsafe { &mut *sent };
            if now.wrapping_sub(sent[0]) >= 1_000_000_000 {
                *sent = [now, 1];
                true
            } else if sent[1] < ICMP_TOO_BIG_PER_SECOND {
                sent[1] += 1;
                true
            } else {
                false
            }
        }
        None => {
            let _ = TOO_BIG_SENT.insert(&key, &[now, 1], 0);
            true
        }
    }
}

#[inline(always)]
fn too_big(ctx: &XdpContext, family: u8, mtu: u32) -> Verdict {
    let frame_len = ctx.data_end() - ctx.data();
    let (quote, grow) = if family == 4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return pass(Counter::PassTooBig);
        };
        // SAFETY: ptr_at checked the header lies inside the packet.
        let dont_fragment = u16::from_be_bytes(unsafe { (*ip).frags }) & 0x4000 != 0;
        if !dont_fragment {
            return pass(Counter::PassTooBig);
        }
        (QUOTE_V4, ANSWER_V4 - EthHdr::LEN - QUOTE_V4)
    } else {
        (QUOTE_V6, ANSWER_V6 - EthHdr::LEN - QUOTE_V6)
    };
    if frame_len < EthHdr::LEN + quote {
        return pass(Counter::PassTooBig);
    }
    if !too_big_allowed(ctx, family) {
        return crate::drop(Counter::DropIcmpRateLimited);
    }
    // Cut first: if that fails the packet is still whole for the kernel.
    let cut = (EthHdr::LEN + quote) as i32 - frame_len as i32;
    // SAFETY: plain helper calls on this program's context; every pointer
    // into the packet is derived again below.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, cut) } != 0 {
        return pass(Counter::PassTooBig);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return pass(Counter::PassTooBig);
    }
    let answered = if family == 4 {
        answer_v4(ctx, mtu)
    } else {
        answer_v6(ctx, mtu)
    };
    if answered.is_none() {
        return pass(Counter::PassTooBig);
    }
    Verdict {
        action: xdp_action::XDP_TX,
        counter: Counter::IcmpTooBig,
    }
}

/// The Ethernet header of an answer: back to where the packet came from.
/// `old` is the offset of the packet's own Ethernet header in `frame`.
#[inline(always)]
fn answer_ethernet(frame: &mut [u8], old: usize, ether_type: u16) {
    let mut from = [0u8; 6];
    let mut to = [0u8; 6];
    from.copy_from_slice(&frame[old + 6..old + 12]);
    to.copy_from_slice(&frame[old..old + 6]);
    frame[0..6].copy_from_slice(&from);
    frame[6..12].copy_from_slice(&to);
    frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
}

/// Writes the IPv4 answer. The packet is now 28 grown bytes, its own
/// Ethernet header (at 28) and the quote (at 42); the answer is Ethernet
/// (0..14), IPv4 (14..34), ICMP (34..42) and the quote, so the new headers
/// overwrite the old Ethernet header once its MACs are read.
#[inline(always)]
fn answer_v4(ctx: &XdpContext, mtu: u32) -> Option<()> {
    let frame = ptr_at::<[u8; ANSWER_V4]>(ctx, 0)?;
    // SAFETY: ptr_at checked the whole answer lies inside the packet.
    let f = unsafe { &mut *frame };
    const IP: usize = EthHdr::LEN;
    const ICMP_AT: usize = IP + 20;
    const QUOTE: usize = ICMP_AT + 8;
    answer_ethernet(f, 28, ETH_P_IP);
    // The quote is the old IP header: its source is the client, its
    // destination the VIP.
    let mut client = [0u8; 4];
    let mut vip = [0u8; 4];
    client.copy_from_slice(&f[QUOTE + 12..QUOTE + 16]);
    vip.copy_from_slice(&f[QUOTE + 16..QUOTE + 20]);
    let total = ((ANSWER_V4 - EthHdr::LEN) as u16).to_be_bytes();
    let header = [
        0x45, 0, total[0], total[1], 0, 0, 0, 0, 64, ICMP, 0, 0, vip[0], vip[1], vip[2], vip[3],
        client[0], client[1], client[2], client[3],
    ];
    f[IP..IP + 20].copy_from_slice(&header);
    let check = (!checksum::fold(checksum::sum(&f[IP..IP + 20]))).to_be_bytes();
    f[IP + 10..IP + 12].copy_from_slice(&check);
    // Type 3 code 4: fragmentation needed and DF set; next-hop MTU.
    let mtu = (mtu.min(0xffff) as u16).to_be_bytes();
    f[ICMP_AT..QUOTE].copy_from_slice(&[3, 4, 0, 0, 0, 0, mtu[0], mtu[1]]);
    let check = (!checksum::fold(checksum::sum(&f[ICMP_AT..ANSWER_V4]))).to_be_bytes();
    f[ICMP_AT + 2..ICMP_AT + 4].copy_from_slice(&check);
    Some(())
}

/// As answer_v4 for IPv6: 48 new bytes, the old Ethernet header at 48, the
/// quote at 62.
#[inline(always)]
fn answer_v6(ctx: &XdpContext, mtu: u32) -> Option<()> {
    let frame = ptr_at::<[u8; ANSWER_V6]>(ctx, 0)?;
    // SAFETY: ptr_at checked the whole answer lies inside the packet.
    let f = unsafe { &mut *frame };
    const IP: usize = EthHdr::LEN;
    const ICMP_AT: usize = IP + 40;
    const QUOTE: usize = ICMP_AT + 8;
    const ICMP_LEN: usize = ANSWER_V6 - ICMP_AT;
    answer_ethernet(f, 48, ETH_P_IPV6);
    let mut client = [0u8; 16];
    let mut vip = [0u8; 16];
    client.copy_from_slice(&f[QUOTE + 8..QUOTE + 24]);
    vip.copy_from_slice(&f[QUOTE + 24..QUOTE + 40]);
    let len = (ICMP_LEN as u16).to_be_bytes();
    f[IP..IP + 8].copy_from_slice(&[0x60, 0, 0, 0, len[0], len[1], ICMPV6, 64]);
    f[IP + 8..IP + 24].copy_from_slice(&vip);
    f[IP + 24..IP + 40].copy_from_slice(&client);
    // Type 2: packet too big; the MTU as 32 bits.
    let mtu = mtu.to_be_bytes();
    f[ICMP_AT..QUOTE].copy_from_slice(&[2, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]]);
    // Checksum over the pseudo-header (addresses, length, next header) and
    // the message.
    let sum = checksum::sum(&f[IP + 8..IP + 40])
        + ICMP_LEN as u32
        + u32::from(ICMPV6)
        + checksum::sum(&f[ICMP_AT..ANSWER_V6]);
    let check = (!checksum::fold(sum)).to_be_bytes();
    f[ICMP_AT + 2..ICMP_AT + 4].copy_from_slice(&check);
    Some(())
}
