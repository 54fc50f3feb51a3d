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
/// Flows each connection table remembers (least recently used go first:
/// of the whole table for IPv6, of the flow's set for IPv4).
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

// MACs copied as 16-bit words by the XDP program: at even offsets.
const _: () = assert!(
    core::mem::offset_of!(CacheNode, dst_mac) % 2 == 0
        && core::mem::offset_of!(CacheNode, src_mac) % 2 == 0
);

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

/// Slots of a set of the IPv4 connection table (`FLOWS_V4`).
pub const FLOW_WAYS: usize = 4;
/// Sets of the IPv4 connection table: two slots for each of `MAX_FLOWS`
/// flows (16 MiB), so that a flow seldom finds its set full. Spread
/// evenly, 0.2 % of 102,400 flows find their set full, 3.8 % of 262,144;
/// with one slot a flow, it was 1.8 % and 19.5 %.
pub const FLOW_SETS_V4: u32 = 2 * MAX_FLOWS / FLOW_WAYS as u32;
/// The bits of a `FlowKeyV4`'s second word that are the key: the rest
/// (`pad`, `pad2`) holds a slot's check (`flow_check_v4`).
pub const KEY_BITS_V4: u64 = (1 << 40) - 1;

/// A slot of the IPv4 connection table: a flow and its entry.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowSlotV4 {
    /// The flow, its check in the bytes above `KEY_BITS_V4`.
    pub key: [u64; 2],
    pub entry: FlowEntry,
}

/// A set of the IPv4 connection table (`FLOWS_V4`), an array of
/// `FLOW_SETS_V4` of them: a flow may be in any slot of its set
/// (`flow_set_v4`), and nowhere else. A slot holds a flow when its check
/// is the one of its key, node and VIP (`flow_check_v4`); an empty slot
/// (zero) fails it. The check is what makes slots safe to share between
/// CPUs without locks: a slot read while another CPU writes it, half old
/// and half new, fails its check (but for one chance in 2^24) and reads as
/// empty. A new flow takes a slot no flow holds, or else the slot of the
/// flow seen least recently (`last_seen_ns`, kept to the second): the
/// least recently used of its set goes, not of the whole table. Two CPUs
/// writing one slot at once may lose one of the two flows, which then
/// follows its VIP's Maglev table.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowSetV4 {
    pub slots: [FlowSlotV4; FLOW_WAYS],
}

/// The set of an IPv4 flow, from its key's words (`FlowKeyV4::words`) and
/// the flow-hash seed: keyed, so that traffic cannot pick which flows
/// share a set without knowing the seed.
#[inline(always)]
pub const fn flow_set_v4(key: [u64; 2], seed: u32) -> u32 {
    let h = crate::maglev::mix64(key[0] ^ crate::maglev::mix64(key[1] ^ seed as u64));
    (h >> (64 - FLOW_SETS_V4.trailing_zeros())) as u32
}

/// The check of a slot holding the flow `key` (its key bits) with `entry`'s
/// node and VIP, placed in the bits above `KEY_BITS_V4`; never zero.
#[inline(always)]
pub const fn flow_check_v4(key: [u64; 2], node: u32, vip: u32) -> u64 {
    let h = crate::maglev::mix64(
        key[0] ^ key[1].rotate_left(24) ^ ((node as u64) << 32 | vip as u64).rotate_left(7),
    );
    (h | 1 << 40) & !KEY_BITS_V4
}

impl FlowSlotV4 {
    /// The slot of flow `key` with `entry`.
    #[inline(always)]
    pub const fn new(key: [u64; 2], entry: FlowEntry) -> FlowSlotV4 {
        let key = [key[0], key[1] & KEY_BITS_V4];
        FlowSlotV4 {
            key: [key[0], key[1] | flow_check_v4(key, entry.node, entry.vip)],
            entry,
        }
    }

    /// Whether the slot holds flow `key` (its words, check bits zero).
    #[inline(always)]
    pub const fn holds(&self, key: [u64; 2]) -> bool {
        self.key[0] == key[0]
            && self.key[1] & KEY_BITS_V4 == key[1]
            && self.key[1] & !KEY_BITS_V4 == flow_check_v4(key, self.entry.node, self.entry.vip)
    }

    /// The flow the slot holds, if its check is right.
    #[inline(always)]
    pub const fn flow(&self) -> Option<[u64; 2]> {
        let key = [self.key[0], self.key[1] & KEY_BITS_V4];
        if self.holds(key) { Some(key) } else { None }
    }
}

impl FlowKeyV4 {
    /// The key as two words (check bits zero), as `FlowSlotV4` keeps it.
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        let [s0, s1, s2, s3] = self.src;
        let [d0, d1, d2, d3] = self.dst;
        let [p0, p1] = self.src_port.to_ne_bytes();
        let [q0, q1] = self.dst_port.to_ne_bytes();
        [
            u64::from_le_bytes([s0, s1, s2, s3, d0, d1, d2, d3]),
            u64::from_le_bytes([p0, p1, q0, q1, self.protocol, 0, 0, 0]),
        ]
    }

    /// The key whose words (`words`) are `key`.
    pub const fn from_words(key: [u64; 2]) -> FlowKeyV4 {
        let [s0, s1, s2, s3, d0, d1, d2, d3] = key[0].to_le_bytes();
        let [p0, p1, q0, q1, protocol, ..] = key[1].to_le_bytes();
        FlowKeyV4 {
            src: [s0, s1, s2, s3],
            dst: [d0, d1, d2, d3],
            src_port: u16::from_ne_bytes([p0, p1]),
            dst_port: u16::from_ne_bytes([q0, q1]),
            protocol,
            pad: 0,
            pad2: 0,
        }
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
    unsafe impl aya::Pod for super::FlowSetV4 {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// Deterministic pseudo-random words (splitmix64's sequence).
    fn words(n: usize, seed: u64) -> Vec<u64> {
        (0..n as u64)
            .map(|i| crate::maglev::mix64(seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))))
            .collect()
    }

    fn flow(w: u64, v: u64) -> FlowKeyV4 {
        let [a, b, c, d, e, f, g, h] = w.to_le_bytes();
        let [p, q, r, s, t, ..] = v.to_le_bytes();
        FlowKeyV4 {
            src: [a, b, c, d],
            dst: [e, f, g, h],
            src_port: u16::from_be_bytes([p, q]),
            dst_port: u16::from_be_bytes([r, s]),
            protocol: t,
            pad: 0,
            pad2: 0,
        }
    }

    fn entry(node: u32, vip: u32) -> FlowEntry {
        FlowEntry {
            node,
            vip,
            last_seen_ns: 12_345,
        }
    }

    #[test]
    fn flow_key_words_round_trip_and_leave_the_check_bits_zero() {
        let w = words(2_000, 1);
        for pair in w.chunks(2) {
            let key = flow(pair[0], pair[1]);
            assert_eq!(key.words()[1] & !KEY_BITS_V4, 0);
            assert_eq!(FlowKeyV4::from_words(key.words()), key);
        }
    }

    #[test]
    fn a_slot_holds_its_flow_and_no_bit_flip_of_it_does() {
        let key = flow(0x0a00_0001_c000_0201, 0x11_01bb_c350).words();
        let slot = FlowSlotV4::new(key, entry(7, FlowEntry::vip_of(3, 9)));
        assert!(slot.holds(key));
        assert_eq!(slot.flow(), Some(key));
        let zero: FlowSlotV4 = bytemuck::Zeroable::zeroed();
        assert_eq!(zero.flow(), None, "an empty slot holds no flow");
        // Every bit of the key, its check, the node and the VIP.
        for bit in 0..192 {
            let mut bent = slot;
            match bit {
                0..64 => bent.key[0] ^= 1 << bit,
                64..128 => bent.key[1] ^= 1 << (bit - 64),
                128..160 => bent.entry.node ^= 1 << (bit - 128),
                _ => bent.entry.vip ^= 1 << (bit - 160),
            }
            assert!(!bent.holds(key), "bit {bit} flipped");
            if let Some(other) = bent.flow() {
                assert_ne!(other, key, "bit {bit} flipped");
            }
        }
        // The last-seen time is not checked: a CPU refreshes it alone.
        let mut seen = slot;
        seen.entry.last_seen_ns = 99;
        assert!(seen.holds(key));
    }

    /// A slot read while another CPU rewrites it, each 8-byte word from
    /// either flow (a word is written in one store), is either flow whole
    /// or holds none.
    #[test]
    fn a_slot_torn_between_two_flows_holds_neither() {
        let w = words(4 * 4_000, 2);
        let mut torn = 0;
        for (i, c) in w.chunks(4).enumerate() {
            let (a, b) = (flow(c[0], c[1]).words(), flow(c[2], c[3]).words());
            let i = i as u32;
            let sa = FlowSlotV4::new(a, entry(i % 1024, i % 251));
            let sb = FlowSlotV4::new(b, entry((i + 1) % 1024, (i + 7) % 251));
            let [sa, sb]: [[u64; 4]; 2] = [bytemuck::cast(sa), bytemuck::cast(sb)];
            for mix in 1..15u32 {
                let mixed: [u64; 4] =
                    core::array::from_fn(|w| if mix >> w & 1 == 1 { sb[w] } else { sa[w] });
                // Key, node and VIP all from one flow (the last-seen word
                // alone from the other): that flow whole.
                if mixed[..3] == sa[..3] || mixed[..3] == sb[..3] {
                    continue;
                }
                torn += 1;
                let mixed: FlowSlotV4 = bytemuck::cast(mixed);
                assert!(
                    !mixed.holds(a) && !mixed.holds(b),
                    "flow pair {i}, mix {mix:04b}"
                );
            }
        }
        assert_eq!(torn, 4_000 * 12);
    }

    #[test]
    fn flows_spread_over_the_sets_and_the_seed_moves_them() {
        let w = words(2 * MAX_FLOWS as usize, 3);
        let mut load = vec![0u32; FLOW_SETS_V4 as usize];
        let mut moved = 0;
        for pair in w.chunks(2) {
            let key = flow(pair[0], pair[1]).words();
            let set = flow_set_v4(key, 42);
            assert!(set < FLOW_SETS_V4);
            load[set as usize] += 1;
            moved += u32::from(flow_set_v4(key, 43) != set);
        }
        // MAX_FLOWS flows, two a set on average: spread as evenly as a
        // Poisson draw, the fullest of 131,072 sets holds about ten.
        let max = *load.iter().max().unwrap();
        assert!(max <= 14, "a set of {max} flows");
        assert!(moved > MAX_FLOWS * 99 / 100, "{moved} flows moved");
    }
}
