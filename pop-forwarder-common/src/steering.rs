//! Map layouts of VIP steering: service addresses (VIPs), their pools of
//! cache nodes, the per-VIP Maglev tables and the connection table.

use crate::maglev::DEFAULT_TABLE_SIZE;

/// Capacity of the VIP table.
pub const MAX_VIPS: u32 = 64;
const _: () = assert!(MAX_VIPS <= 256, "FlowEntry::vip keeps a VIP slot in 8 bits");
/// Capacity of the cache-node table; node ids index it.
pub const MAX_CACHE_NODES: u32 = 1024;
/// Room for one Maglev table per VIP slot; a VIP's table may be smaller (a
/// smaller prime), never larger.
pub const MAGLEV_STRIDE: u32 = DEFAULT_TABLE_SIZE;
/// Entries of MAGLEV (u32 node ids, stored in pairs: see dir24).
pub const MAGLEV_ENTRIES: u32 = MAX_VIPS * MAGLEV_STRIDE;
/// Flows the connection table remembers (least recently used go first).
pub const MAX_FLOWS: u32 = 1 << 18;
/// Slots of the seen-once table (`FLOWS_SEEN`): flows other than TCP seen
/// once, not yet remembered. A flow is remembered from its second packet
/// if its first is still noted: one slot per flow hash (direct-mapped,
/// `seen_slot`), which a later new flow on the same slot takes over.
pub const FLOWS_SEEN_SLOTS: u32 = 1 << 18;

/// A flow's slot in the seen-once table, and the tag that notes it there
/// (its whole hash; never 0, the empty slot's), from its flow hash. Two
/// flows with one hash share a note: the second is remembered from its
/// first packet, which costs an entry, nothing else.
#[inline(always)]
pub const fn seen_slot(hash: u32) -> (u32, u64) {
    (hash % FLOWS_SEEN_SLOTS, hash as u64 | 1 << 32)
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A VIP: address (IPv4 in the first four bytes), protocol and port (host
/// order; 0 = every port of that protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
}

/// Where a VIP's Maglev table is: slot `index` of MAGLEV, `table_size`
/// entries long.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VipInfo {
    pub index: u32,
    pub table_size: u32,
}

impl VipKey {
    /// The same service on every port: the VIP a packet falls back to when
    /// no VIP names its own port.
    pub const fn any_port(self) -> VipKey {
        VipKey { port: 0, ..self }
    }
}

impl VipInfo {
    /// Where in MAGLEV the node for a new flow of hash `hash` is.
    #[inline(always)]
    pub const fn maglev_position(&self, hash: u32) -> u32 {
        let size = if self.table_size == 0 {
            1
        } else {
            self.table_size
        };
        self.index * MAGLEV_STRIDE + hash % size
    }
}

/// The node slot is allocated.
pub const NODE_F_IN_USE: u32 = 1 << 0;
/// The node's MAC is known.
pub const NODE_F_MAC_VALID: u32 = 1 << 1;
/// The node is reached by IP-in-IP: packets are encapsulated to `addr`
/// and the outer packet is routed.
pub const NODE_F_IPIP: u32 = 1 << 2;

/// A cache node. Direct server return: same L2 segment, frames get its MAC
/// and leave through `ifindex`; the node holds the VIP itself. IP-in-IP:
/// the packet is wrapped in an outer IPv4 or IPv6 header to `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CacheNode {
    pub ifindex: u32,
    pub flags: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The node's address (IPv4 in the first four bytes).
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u32,
    /// Direct server return: the MTU of the link to the node; a larger
    /// packet goes to the kernel, as a routed one does. 0 for IP-in-IP
    /// nodes (their outer packet is routed, and checked there).
    pub mtu: u32,
}

/// Buckets of VIP_FILTER, by VIP address (`vip_bucket`). A bucket holds 0
/// while no VIP address has fallen in it, and from then on its epoch
/// (never 0), which the host bumps whenever a VIP with an address in it is
/// added or removed. A packet whose destination's bucket is 0 is no VIP's:
/// it is routed without a VIP or connection-table lookup. A connection-table
/// entry records the epoch it was written in (`FlowEntry::vip`); while the
/// bucket still holds it, no VIP of that address has come or gone since,
/// and the entry's VIP slot is still the VIP that takes the flow.
pub const VIP_FILTER_BUCKETS: u32 = 4096;

/// The VIP_FILTER bucket of an address, given as its `address_words`
/// (an IPv4 address and the IPv6 address of the same leading bytes share
/// one: a bucket tells only which addresses can be no VIP).
#[inline(always)]
pub const fn vip_bucket(addr: [u64; 2]) -> u32 {
    let h = (addr[0] ^ addr[1].rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - VIP_FILTER_BUCKETS.trailing_zeros())) as u32
}

/// Epochs count modulo 2^24 (`FlowEntry::vip` keeps 24 bits of one),
/// skipping 0.
pub const EPOCH_MASK: u32 = (1 << 24) - 1;

/// The epoch after `epoch`.
#[inline(always)]
pub const fn next_epoch(epoch: u32) -> u32 {
    match (epoch + 1) & EPOCH_MASK {
        0 => 1,
        e => e,
    }
}

/// Slots of ENCAP_SOURCES: the outer source address of IP-in-IP packets.
pub const ENCAP_SOURCE_V4: u32 = 0;
pub const ENCAP_SOURCE_V6: u32 = 1;

/// Value of the connection table: the flow's node, the VIP that took it
/// (`vip`), and when the program last saw the flow
/// (`bpf_ktime_get_coarse_ns`, updated at most once a second). An entry
/// idle longer than its protocol's timeout (`settings::FLOW_IDLE_TCP` /
/// `FLOW_IDLE_UDP`) is treated as absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowEntry {
    pub node: u32,
    /// The VIP's slot (low 8 bits) and its address's VIP_FILTER epoch when
    /// this was written (the 24 bits above): see `VIP_FILTER_BUCKETS`.
    pub vip: u32,
    pub last_seen_ns: u64,
}

impl FlowEntry {
    /// `vip` of VIP slot `index` in `epoch`.
    #[inline(always)]
    pub const fn vip_of(index: u32, epoch: u32) -> u32 {
        index & 0xff | (epoch & EPOCH_MASK) << 8
    }

    /// The VIP slot this entry names.
    #[inline(always)]
    pub const fn vip_index(&self) -> u32 {
        self.vip & 0xff
    }

    /// The VIP_FILTER epoch this entry was written in.
    #[inline(always)]
    pub const fn epoch(&self) -> u32 {
        self.vip >> 8
    }
}

/// Idle timeouts of connection-table entries by default, in seconds (as
/// IPVS's: TCP 900, UDP 300).
pub const FLOW_IDLE_TCP_DEFAULT_S: u32 = 900;
pub const FLOW_IDLE_UDP_DEFAULT_S: u32 = 300;

/// A flow: the key of the IPv6 connection table (`FLOWS`), and of both
/// in the host's API (see `FlowKeyV4`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// An IPv4 flow: the key of the IPv4 connection table (`FLOWS_V4`), 16
/// bytes where `FlowKey` takes 40: the kernel hashes and compares every
/// key byte on each lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKeyV4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// Zero. Not a `[u8; 3]`: LLVM zeroes three bytes with a call to
    /// memset, which in BPF is a function call of its own.
    pub pad: u8,
    pub pad2: u16,
}

impl FlowKey {
    /// The key of an IPv4 flow (family 4) in `FLOWS_V4`; None for IPv6,
    /// whose flows are in `FLOWS`.
    #[inline(always)]
    pub const fn v4(&self) -> Option<FlowKeyV4> {
        if self.family != 4 {
            return None;
        }
        Some(FlowKeyV4 {
            src: [self.src[0], self.src[1], self.src[2], self.src[3]],
            dst: [self.dst[0], self.dst[1], self.dst[2], self.dst[3]],
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
            pad: 0,
            pad2: 0,
        })
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) without padding (bytemuck's Pod derive checks).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::CacheNode {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    unsafe impl aya::Pod for super::FlowEntry {}
}
