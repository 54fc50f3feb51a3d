//! VIP steering: a packet for a service address goes to one cache node of
//! its pool, the same node for the whole flow (connection table), chosen
//! for a new flow by the VIP's Maglev table, and delivered by direct server
//! return: the frame gets the node's MAC, the IP packet is left as it is
//! (the node holds the VIP itself).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use network_types::eth::EthHdr;
use pop_forwarder_common::{
    Counter, TrafficCounter, dir24,
    maglev::{self, NO_NODE},
    settings,
    steering::{
        CacheNode, FlowKey, MAGLEV_ENTRIES, MAGLEV_STRIDE, MAX_CACHE_NODES, MAX_FLOWS, MAX_VIPS,
        NODE_F_IN_USE, NODE_F_MAC_VALID, PROTO_TCP, PROTO_UDP, VipInfo, VipKey,
    },
};

use crate::{
    Verdict,
    maps::{SETTINGS, add_traffic, egress},
    packet::ptr_at,
    pass,
};

#[map]
static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// One Maglev table per VIP slot, node ids stored in pairs (see dir24).
#[map]
static MAGLEV: Array<u64> = Array::with_max_entries(MAGLEV_ENTRIES / dir24::ENTRIES_PER_ELEMENT, 0);

#[map]
static CACHE_NODES: Array<CacheNode> = Array::with_max_entries(MAX_CACHE_NODES, 0);

/// Flow -> node: keeps a flow on its node when the pool changes.
#[map]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map]
static VIP_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

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
}

/// The verdict for a VIP's packet, or None if the destination is no VIP.
#[inline(always)]
pub fn steer(ctx: &XdpContext, eth: *mut EthHdr, flow: &Flow) -> Option<Verdict> {
    if SETTINGS.get(settings::STEERING_ON) != Some(&1) {
        return None;
    }
    let (src_port, dst_port) = ports(ctx, flow);
    let mut key = VipKey {
        addr: flow.dst,
        port: dst_port,
        protocol: flow.protocol,
        family: flow.family,
    };
    // SAFETY: map values are only copied out.
    let vip = match unsafe { VIPS.get(&key) } {
        Some(vip) => *vip,
        None => {
            key.port = 0;
            *unsafe { VIPS.get(&key) }?
        }
    };
    let flow_key = FlowKey {
        src: flow.src,
        dst: flow.dst,
        src_port,
        dst_port,
        protocol: flow.protocol,
        family: flow.family,
        pad: [0; 2],
    };
    // SAFETY: as above.
    let known = unsafe { FLOWS.get(&flow_key) }
        .copied()
        .filter(|&id| usable(id).is_some());
    let node_id = match known {
        Some(id) => id,
        None => {
            let seed = SETTINGS.get(settings::FLOW_HASH_SEED).copied().unwrap_or(0);
            let hash = maglev::flow_hash(
                u64::from(seed),
                &flow.src,
                &flow.dst,
                src_port,
                dst_port,
                flow.protocol,
            );
            let slot = vip.index * MAGLEV_STRIDE + hash % vip.table_size.max(1);
            let Some(pair) = MAGLEV.get(dir24::element_of(slot)) else {
                return Some(pass(Counter::PassVipNoNode));
            };
            let id = dir24::entry_in(*pair, slot);
            if id == NO_NODE || usable(id).is_none() {
                return Some(pass(Counter::PassVipNoNode));
            }
            // A full table evicts its least recently used flow.
            let _ = FLOWS.insert(&flow_key, &id, 0);
            id
        }
    };
    let Some(node) = usable(node_id) else {
        return Some(pass(Counter::PassVipNoNode));
    };
    let verdict = match egress(ctx, node.ifindex) {
        Ok(v) => Verdict {
            action: v.action,
            counter: Counter::Steered,
        },
        Err(v) => return Some(v),
    };
    // SAFETY: `eth` was bounds-checked by ptr_at in classify_and_forward.
    unsafe {
        (*eth).dst_addr = node.dst_mac;
        (*eth).src_addr = node.src_mac;
    }
    add_traffic(&VIP_STATS, vip.index, flow.frame_len as u64);
    add_traffic(&NODE_STATS, node_id, flow.frame_len as u64);
    Some(verdict)
}

/// The node `id`, if it can take packets now.
#[inline(always)]
fn usable(id: u32) -> Option<&'static CacheNode> {
    CACHE_NODES.get(id).filter(|n| {
        n.flags & (NODE_F_IN_USE | NODE_F_MAC_VALID) == NODE_F_IN_USE | NODE_F_MAC_VALID
    })
}

/// Source and destination ports of TCP and UDP; 0 for other protocols,
/// for fragments without the L4 header, and for a header cut short.
#[inline(always)]
fn ports(ctx: &XdpContext, flow: &Flow) -> (u16, u16) {
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
