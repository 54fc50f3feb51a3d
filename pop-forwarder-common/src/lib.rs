//! Types and pure logic shared by the XDP program and the host.
//!
//! Every map key and value has exactly one definition here. Everything that
//! can be computed outside the kernel (checksum arithmetic, counter names) is
//! plain Rust so the host's unit tests exercise the same code the program runs.
#![no_std]

pub mod bench;
pub mod checksum;
pub mod counters;
pub mod dir24;
pub mod dxr6;
pub mod ecmp;
pub mod maglev;
pub mod steering;

pub use counters::{Counter, ICMP_TOO_BIG_PER_SECOND};

/// The unit tests' deterministic random numbers (xorshift64).
#[cfg(test)]
mod test_rng {
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub fn wide(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }
    }
}

/// The layout of the pinned maps: their names, types, key and value
/// layouts, sizes and the meaning of every entry. A daemon (or a new build
/// of the program) adopts an instance's pinned maps only if they carry this
/// very number (`settings::LAYOUT_VERSION`). Bump it with any change that
/// makes maps written by one build unreadable, or wrongly read, by another;
/// `map_layout_is_pinned_down` in this crate's tests fails until you do.
pub const MAP_LAYOUT_VERSION: u32 = 10;

/// Names of the program's maps. The host pins them under these names, and the
/// CLI opens them from there.
pub mod map_names {
    pub const ROUTES_V4: &str = "ROUTES_V4";
    pub const ROUTES_V4_TRIE: &str = "ROUTES_V4_TRIE";
    pub const ROUTES_V6: &str = "ROUTES_V6";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const NEXT_HOP_STATS: &str = "NEXT_HOP_STATS";
    pub const LOCAL_V4: &str = "LOCAL_V4";
    pub const LOCAL_V6: &str = "LOCAL_V6";
    pub const EGRESS_PORTS: &str = "EGRESS_PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const IPV4_TBL24: &str = "IPV4_TBL24";
    pub const IPV4_TBL8: &str = "IPV4_TBL8";
    pub const VIPS: &str = "VIPS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CACHE_NODES: &str = "CACHE_NODES";
    pub const FLOWS: &str = "FLOWS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const NODE_STATS: &str = "NODE_STATS";
    pub const ENCAP_SOURCES: &str = "ENCAP_SOURCES";
    pub const INTERFACE_MACS: &str = "INTERFACE_MACS";
    pub const NEXT_HOP_GROUPS: &str = "NEXT_HOP_GROUPS";
    pub const NEIGHBOURS: &str = "NEIGHBOURS";
    pub const VLANS: &str = "VLANS";
    pub const DENY_V4: &str = "DENY_V4";
    pub const DENY_V6: &str = "DENY_V6";
    pub const DENY_STATS: &str = "DENY_STATS";
    pub const DENY_FILTER: &str = "DENY_FILTER";
    pub const INTERFACE_STATS: &str = "INTERFACE_STATS";
    pub const TX_ERRORS: &str = "TX_ERRORS";
    pub const IPV6_CHUNKS: &str = "IPV6_CHUNKS";
    pub const IPV6_RANGES: &str = "IPV6_RANGES";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const FLOWS_V4: &str = "FLOWS_V4";
    pub const DENY_CACHE: &str = "DENY_CACHE";
    pub const ALL: [&str; 34] = [
        ROUTES_V4,
        ROUTES_V4_TRIE,
        ROUTES_V6,
        NEXT_HOPS,
        NEXT_HOP_STATS,
        LOCAL_V4,
        LOCAL_V6,
        EGRESS_PORTS,
        COUNTERS,
        SETTINGS,
        IPV4_TBL24,
        IPV4_TBL8,
        VIPS,
        MAGLEV,
        CACHE_NODES,
        FLOWS,
        VIP_STATS,
        NODE_STATS,
        ENCAP_SOURCES,
        INTERFACE_MACS,
        NEXT_HOP_GROUPS,
        NEIGHBOURS,
        VLANS,
        DENY_V4,
        DENY_V6,
        DENY_STATS,
        DENY_FILTER,
        INTERFACE_STATS,
        TX_ERRORS,
        IPV6_CHUNKS,
        IPV6_RANGES,
        VIP_FILTER,
        FLOWS_V4,
        DENY_CACHE,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "pop_forwarder";

/// Capacity of the route tables (per address family).
pub const MAX_ROUTES_V4: u32 = 1 << 20;
pub const MAX_ROUTES_V6: u32 = 1 << 18;
/// Capacity of the next-hop table; next-hop ids index it.
pub const MAX_NEXT_HOPS: u32 = 4096;
/// The route-table value that marks one of this box's own addresses (a /32
/// or /128 route): such packets go to the kernel. Outside the next-hop
/// table, and within the 24 bits DIR-24-8 entries hold.
pub const LOCAL_NEXT_HOP: u32 = MAX_NEXT_HOPS;
/// The route-table value of a route the kernel must handle: a blackhole,
/// unreachable or prohibit route, or one whose next hops the program cannot
/// express. Its packets go to the kernel (counted `pass_kernel_route`), and
/// no shorter route covering it takes them.
pub const KERNEL_NEXT_HOP: u32 = MAX_NEXT_HOPS + 1;

/// Capacity of the local-address sets and of the egress devmap.
pub const MAX_LOCAL_ADDRS: u32 = 4096;
pub const MAX_EGRESS_PORTS: u32 = 256;
/// `INTERFACE_MACS` is an array indexed by ifindex: the MAC of each
/// interface the program is attached to in the first six bytes, and
/// `INTERFACE_MAC_KNOWN` in the seventh (an all-zero entry: not known, so
/// not checked). Interfaces with a larger ifindex are not checked.
pub const MAX_INTERFACES: u32 = 4096;
pub const INTERFACE_MAC_KNOWN: u8 = 1;

/// The next hop's MAC address is known (configured or learned); without it
/// the program hands the packet to the kernel, which resolves the neighbour.
pub const NH_F_MAC_VALID: u32 = 1 << 0;
/// The MAC was given in the config or on the command line; the neighbour
/// refresher leaves it alone.
pub const NH_F_MAC_STATIC: u32 = 1 << 1;
/// The slot is allocated. Free slots are all zeros.
pub const NH_F_IN_USE: u32 = 1 << 2;
/// A connected subnet (a route without a gateway): the packet goes to its
/// destination itself, whose MAC the program looks up in `NEIGHBOURS`; one
/// not there yet goes to the kernel, which resolves it.
pub const NH_F_CONNECTED: u32 = 1 << 3;

/// Capacity of the `VLANS` set.
pub const MAX_VLANS: u32 = 4096;

/// Key of `VLANS`: a VLAN this box has on an interface the program is
/// attached to (a VLAN subinterface): tagged frames on other VLANs are the
/// kernel's, which drops them as Linux does for VLANs it has no device for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VlanKey {
    pub ifindex: u32,
    /// The outer tag's VLAN ID (802.1Q, or 802.1ad for two tags).
    pub outer: u16,
    /// The inner 802.1Q tag's VLAN ID behind an outer one; 0 for one tag.
    pub inner: u16,
}

/// Capacity of the `NEIGHBOURS` table (hosts on connected subnets).
pub const MAX_NEIGHBOURS: u32 = 1 << 16;

/// Key of `NEIGHBOURS`: a host on a connected subnet, on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NeighbourKey {
    /// IPv4 in the first four bytes, the rest zero; or IPv6.
    pub addr: [u8; 16],
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

/// Value of `NEIGHBOURS`: the host's MAC (two bytes of padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NeighbourMac {
    pub mac: [u8; 6],
    pub pad: [u8; 2],
}

/// Address family of a next hop's gateway.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// A next hop: where a route sends a packet, and the L2 header it gets.
///
/// Value of the `NEXT_HOPS` array; routes point at it by index so that a MAC
/// learned for a gateway updates every route through it at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NextHop {
    /// Egress interface index (in the forwarder's network namespace).
    pub ifindex: u32,
    /// Egress MTU (L3 bytes); larger packets go to the kernel.
    pub mtu: u32,
    /// `NH_F_*` bits.
    pub flags: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Gateway address: IPv4 in the first 4 bytes, or IPv6. All zeros for a
    /// directly connected route whose packets go to the destination itself.
    pub gateway: [u8; 16],
    /// `AF_INET` or `AF_INET6`: how to read `gateway`.
    pub family: u32,
    /// The VLAN the packet leaves on (`ifindex` is a VLAN subinterface):
    /// its ID (TCI), and its TPID (0x8100, 0x88a8; 0: untagged).
    pub vlan_tci: u16,
    pub vlan_proto: u16,
    /// The interface the frame is sent out of: `ifindex` itself, or the
    /// parent of a VLAN subinterface (XDP sends on the real device, with
    /// the tag pushed).
    pub tx_ifindex: u32,
}

// The XDP program copies MACs as 16-bit words (`copy_mac`): they must sit
// at even offsets (values start on 8 bytes).
const _: () = assert!(
    core::mem::offset_of!(NextHop, dst_mac) % 2 == 0
        && core::mem::offset_of!(NextHop, src_mac) % 2 == 0
        && core::mem::offset_of!(NeighbourMac, mac) % 2 == 0
);

impl NextHop {
    pub const fn is_in_use(&self) -> bool {
        self.flags & NH_F_IN_USE != 0
    }
    pub const fn mac_valid(&self) -> bool {
        self.flags & NH_F_MAC_VALID != 0
    }
}

/// Key of the IPv4 route record (`ROUTES_V4`, an exact-match hash): the
/// prefix itself, host bits clear.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RouteKeyV4 {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// Value of a route-trie entry: the index of its next hop in `NEXT_HOPS`,
/// and the route's own prefix length, which a longest-match lookup does not
/// return otherwise (the DIR-24-8 tables need it when a route goes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RouteTarget {
    pub next_hop: u32,
    pub prefix_len: u32,
}

/// Per-next-hop traffic, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Capacity of the deny list (IPv4 and IPv6 entries together index
/// `DENY_STATS`).
pub const MAX_DENY: u32 = 1 << 17;

/// Which address of a packet a deny-list entry matches: the first byte of
/// its LPM key, before the address.
pub mod deny {
    pub const SOURCE: u8 = 1;
    pub const DESTINATION: u8 = 2;
    /// Key data: the direction byte, the address, zero padding (to 4-byte
    /// multiples). The prefix length counts the direction byte's 8 bits.
    pub type KeyV4 = [u8; 8];
    pub type KeyV6 = [u8; 20];

    pub fn key_v4(direction: u8, addr: [u8; 4]) -> KeyV4 {
        let mut k = [0; 8];
        k[0] = direction;
        k[1..5].copy_from_slice(&addr);
        k
    }

    pub fn key_v6(direction: u8, addr: [u8; 16]) -> KeyV6 {
        let mut k = [0; 20];
        k[0] = direction;
        k[1..17].copy_from_slice(&addr);
        k
    }

    // The filter in front of the tries: most packets match no entry, and an
    // LPM trie of 100,000 entries costs hundreds of nanoseconds to say so.
    // One bit per bucket, per family and direction, set for every bucket
    // an entry covers: a clear bit means no entry can match, and the trie
    // is not asked. A set bit may be a false positive: the trie decides.

    /// Buckets per family and direction: 2^24 bits (2 MiB).
    pub const FILTER_BUCKET_BITS: u32 = 24;
    /// u64 words of the filter (`DENY_FILTER`): four bitmaps (IPv4 and
    /// IPv6, by source and by destination).
    pub const FILTER_WORDS: u32 = 4 << (FILTER_BUCKET_BITS - 6);
    /// `DENY_ON` flags: the list has an entry; IPv6 source (destination)
    /// entries shorter than /16 exist, which the filter cannot mark
    /// (2^16 buckets at most per entry): those lookups skip the filter.
    pub const ON: u32 = 1;
    pub const V6_SOURCE_UNFILTERED: u32 = 2;
    pub const V6_DESTINATION_UNFILTERED: u32 = 4;

    /// The bitmap (0 to 3) of a family (4 or 6) and direction.
    pub const fn bitmap(family: u8, direction: u8) -> u32 {
        (if family == 4 { 0 } else { 2 }) + if direction == SOURCE { 0 } else { 1 }
    }

    /// An IPv4 address's bucket: its /24.
    pub const fn bucket_v4(addr: [u8; 4]) -> u32 {
        u32::from_be_bytes(addr) >> 8
    }

    // Behind the filter, the answers the tries gave for whole /24s (IPv4)
    // and /48s (IPv6): an entry of that length or shorter with no other
    // entry of its direction inside it answers for every address of the
    // /24s (/48s) it covers, so the program keeps that answer per CPU
    // (`DENY_CACHE`, two slots by /24 or /48), and a flood at such a
    // prefix costs a trie lookup per /24 (/48) and CPU, not per packet.
    // The host marks such entries in the tries' values (`DECIDES`) and
    // moves `settings::DENY_GENERATION` on after every change of the
    // list, so that no answer outlives the list it came from.

    /// In a trie's value: the entry answers for every address of each /24
    /// (IPv4) or /48 (IPv6) it covers: it is no longer than that, and no
    /// other entry of its direction lies inside it.
    pub const DECIDES: u32 = 1 << 31;
    /// The length of the prefixes an answer is cached for, by family.
    pub const CACHED_LEN_V4: u8 = 24;
    pub const CACHED_LEN_V6: u8 = 48;
    /// In a trie's value: the entry's slot (`DENY_STATS`).
    pub const SLOT_MASK: u32 = !DECIDES;
    /// Slots of `DENY_CACHE` per CPU: 2^13.
    pub const CACHE_BITS: u32 = 13;
    pub const CACHE_SLOTS: u32 = 1 << CACHE_BITS;

    /// One slot of `DENY_CACHE`: which /24 or /48 (`cache_tag`,
    /// `cache_tag_v6`) it answers for, in which generation of the list,
    /// and the entry's slot.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
    pub struct CacheSlot {
        pub tag: u32,
        pub generation: u32,
        pub entry: u32,
        /// An IPv6 /48's first 32 bits (0 in IPv4 slots: builds before
        /// IPv6 answers were cached left it so, and never read it).
        pub high: u32,
    }

    /// The tag of a direction's IPv4 /24 bucket (never 0, an empty
    /// slot's; bit 30 clear).
    pub const fn cache_tag(direction: u8, bucket: u32) -> u32 {
        1 << 31 | (direction as u32) << 24 | (bucket & 0x00ff_ffff)
    }

    /// The tag and `high` word of a direction's IPv6 /48, from the
    /// address's first six bytes as two big-endian words (`top32`, and
    /// `next16` holding bits 32 to 47). Bit 30 set: no IPv4 tag is ever
    /// equal.
    pub const fn cache_tag_v6(direction: u8, top32: u32, next16: u32) -> (u32, u32) {
        (
            1 << 31 | 1 << 30 | (direction as u32) << 24 | (next16 & 0xffff),
            top32,
        )
    }

    /// The first of the two slots of `DENY_CACHE` a tag (and `high` word,
    /// 0 for IPv4) may go in (for IPv4, the one slot of builds before
    /// there were two).
    pub const fn cache_index(tag: u32, high: u32) -> u32 {
        (tag ^ high.wrapping_mul(0x85eb_ca6b)).wrapping_mul(0x9e37_79b1) >> (32 - CACHE_BITS)
    }

    /// The second, by another hash: two tags that share one slot seldom
    /// share the other, so that a few thousand /24s or /48s a CPU find
    /// room without evicting each other, where one slot each (direct
    /// mapped) left about 39 % of 4,096 (1 - e^-0.5, worked out) evicting each
    /// other.
    pub const fn cache_index_2(tag: u32, high: u32) -> u32 {
        (tag.wrapping_mul(0xc2b2_ae35) ^ high).wrapping_mul(0x27d4_eb2f) >> (32 - CACHE_BITS)
    }

    /// An IPv6 address's bucket: a hash of its first 32 bits (entries are
    /// /32 to /48 mostly; longer ones share their /32's bucket).
    pub const fn bucket_v6(top32: u32) -> u32 {
        top32.wrapping_mul(0x9e37_79b1) >> (32 - FILTER_BUCKET_BITS)
    }

    /// The filter bit of `bucket` in `bitmap`: (u64 word, bit in it).
    pub const fn filter_position(bitmap: u32, bucket: u32) -> (u32, u32) {
        let bit = (bitmap << FILTER_BUCKET_BITS) | bucket;
        (bit / 64, bit % 64)
    }

    /// Sets, in `words` (the filter seen as little-endian u32 words, twice
    /// `FILTER_WORDS` of them), the bit of every bucket an entry of this
    /// family, direction, address and prefix length covers. Returns false
    /// for an IPv6 entry shorter than /16, which covers too many buckets
    /// to mark: its direction's IPv6 lookups must skip the filter.
    pub fn mark(words: &mut [u32], family: u8, direction: u8, addr: &[u8], len: u8) -> bool {
        let bitmap = bitmap(family, direction);
        let mut set = |bucket: u32| {
            let bit = (bitmap << FILTER_BUCKET_BITS) | bucket;
            words[(bit / 32) as usize] |= 1 << (bit % 32);
        };
        let top = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
        if family == 4 {
            if len >= 24 {
                set(top >> 8);
            } else {
                let n = 1u32 << (24 - len);
                let first = (top >> 8) & !(n - 1);
                for b in first..first + n {
                    set(b);
                }
            }
            return true;
        }
        if len >= 32 {
            set(bucket_v6(top));
            true
        } else if len >= 16 {
            let n = 1u32 << (32 - len);
            let first = top & !(n - 1);
            for i in 0..n {
                set(bucket_v6(first + i));
            }
            true
        } else {
            false
        }
    }
}

/// What the program did with the packets that came in on one interface,
/// per CPU (`INTERFACE_STATS`, indexed by ingress ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InterfaceCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Redirected or sent back out (XDP_REDIRECT, XDP_TX).
    pub forwarded: u64,
    /// Handed to the kernel (XDP_PASS).
    pub passed: u64,
    /// Dropped (XDP_DROP).
    pub dropped: u64,
}

/// What the kernel reported failing after the program handed a frame over
/// (`TX_ERRORS`, by egress ifindex, per CPU), from the xdp tracepoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TxErrors {
    /// Frames a devmap transmit dropped (`xdp:xdp_devmap_xmit`'s drops: a
    /// full TX ring, a target that cannot take XDP frames).
    pub xmit_drops: u64,
    /// This program's redirects the kernel refused (`xdp:xdp_redirect_err`
    /// for its program id).
    pub redirect_errors: u64,
}

/// The xdp tracepoints' records as their format files give them (checked
/// by the loader against /sys/kernel/tracing/events/xdp/*/format).
pub mod tracepoints {
    /// xdp:xdp_devmap_xmit: (field, offset).
    pub const DEVMAP_XMIT: [(&str, usize); 3] = [("to_ifindex", 16), ("drops", 20), ("err", 28)];
    /// xdp:xdp_redirect_err.
    pub const REDIRECT_ERR: [(&str, usize); 4] = [
        ("prog_id", 8),
        ("to_ifindex", 24),
        ("map_id", 28),
        ("map_index", 32),
    ];
}

/// Indexes of the `SETTINGS` array.
pub mod settings {
    /// 1: a packet whose destination matches no route is dropped; 0: passed
    /// to the kernel.
    pub const ROUTE_MISS_DROP: u32 = 0;
    /// How the program looks IPv4 destinations up: `IPV4_DIR24` (the
    /// default, zero) or `IPV4_TRIE`.
    pub const IPV4_LOOKUP: u32 = 1;
    /// Seed of the flow hash: the same on every forwarder of a PoP.
    pub const FLOW_HASH_SEED: u32 = 2;
    /// 1 when any VIP is configured: without one, routed packets skip the
    /// VIP lookup.
    pub const STEERING_ON: u32 = 3;
    /// The `MAP_LAYOUT_VERSION` of the build that created the maps: a new
    /// daemon adopts pinned maps only when it is its own.
    pub const LAYOUT_VERSION: u32 = 4;
    /// How routed packets are looked up: `ROUTE_LOOKUP_TABLES` (the
    /// default, zero: the program's own tables) or `ROUTE_LOOKUP_FIB` (the
    /// kernel's FIB, per packet, with bpf_fib_lookup).
    pub const ROUTE_LOOKUP: u32 = 5;
    /// Seconds a TCP / another protocol's connection-table entry may stay
    /// idle before it is treated as absent; 0: never.
    pub const FLOW_IDLE_TCP: u32 = 6;
    pub const FLOW_IDLE_UDP: u32 = 7;
    /// The deny list's flags (`deny::ON` and the others): 0 when it is
    /// empty, and packets skip its lookups.
    pub const DENY_ON: u32 = 8;
    /// The id of the XDP program the instance runs: its redirect errors
    /// are the ones counted.
    pub const XDP_PROG_ID: u32 = 9;
    /// How the program looks IPv6 destinations up: `IPV6_DXR` (the default,
    /// zero: the range table of `dxr6`) or `IPV6_TRIE`.
    pub const IPV6_LOOKUP: u32 = 10;
    /// Moves on with every change of the deny list: the program's cache of
    /// decided /24s (`DENY_CACHE`) holds answers of one generation.
    pub const DENY_GENERATION: u32 = 11;
    pub const COUNT: u32 = 12;

    pub const ROUTE_LOOKUP_TABLES: u32 = 0;
    pub const ROUTE_LOOKUP_FIB: u32 = 1;

    pub const IPV4_DIR24: u32 = 0;
    pub const IPV4_TRIE: u32 = 1;

    pub const IPV6_DXR: u32 = 0;
    pub const IPV6_TRIE: u32 = 1;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C) without padding (checked by bytemuck's
    // Pod derive), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::RouteTarget {}
    unsafe impl aya::Pod for super::RouteKeyV4 {}
    unsafe impl aya::Pod for super::TrafficCounter {}
    unsafe impl aya::Pod for super::InterfaceCounter {}
    unsafe impl aya::Pod for super::TxErrors {}
    unsafe impl aya::Pod for super::NeighbourKey {}
    unsafe impl aya::Pod for super::NeighbourMac {}
    unsafe impl aya::Pod for super::VlanKey {}
    unsafe impl aya::Pod for super::ecmp::NextHopGroup {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    /// The deny cache's two slots for an answer come from two hashes that
    /// do not move together: of 4,096 /48s and 4,096 /24s, those that
    /// share their first slot almost never share the second, and an IPv6
    /// tag never equals an IPv4 one.
    #[test]
    fn deny_cache_answers_that_share_one_slot_seldom_share_the_other() {
        extern crate std;
        use std::{collections::BTreeMap, vec::Vec};
        let mut rng = crate::test_rng::Rng(0x9e37_79b9_7f4a_7c15);
        let mut tags: Vec<(u32, u32)> = Vec::new();
        for direction in [deny::SOURCE, deny::DESTINATION] {
            for _ in 0..2048 {
                let r = rng.next();
                let v6 = deny::cache_tag_v6(
                    direction,
                    0x2000_0000 | (r as u32 >> 3),
                    (r >> 32) as u32 & 0xffff,
                );
                let v4 = deny::cache_tag(direction, (r >> 40) as u32);
                assert!(v6.0 & 1 << 30 != 0 && v4 & 1 << 30 == 0);
                tags.push(v6);
                tags.push((v4, 0));
            }
        }
        tags.sort_unstable();
        tags.dedup();
        assert!(tags.len() > 8000, "{} distinct tags", tags.len());
        let mut by_first: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &(t, h) in &tags {
            by_first
                .entry(deny::cache_index(t, h))
                .or_default()
                .push(deny::cache_index_2(t, h));
        }
        let (mut sharing_first, mut sharing_both) = (0, 0);
        for seconds in by_first.values() {
            for (i, a) in seconds.iter().enumerate() {
                for b in &seconds[i + 1..] {
                    sharing_first += 1;
                    sharing_both += usize::from(a == b);
                }
            }
        }
        assert!(
            sharing_first > 100,
            "{sharing_first} pairs share a first slot"
        );
        assert!(
            sharing_both * 100 <= sharing_first,
            "{sharing_both} of {sharing_first} pairs that share a first slot share the second"
        );
    }

    /// The deny filter never says "no entry" where one matches: for random
    /// entries of every length and random addresses inside and outside
    /// them, a match always finds its bit set. And it says "no entry" for
    /// most addresses no entry covers.
    #[test]
    fn the_deny_filter_has_no_false_negatives_and_few_false_positives() {
        extern crate std;
        use std::{vec, vec::Vec};
        let mut words = vec![0u32; 2 * deny::FILTER_WORDS as usize];
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bit = |words: &[u32], family: u8, direction: u8, addr: &[u8]| {
            let top = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
            let bucket = if family == 4 {
                deny::bucket_v4([addr[0], addr[1], addr[2], addr[3]])
            } else {
                deny::bucket_v6(top)
            };
            let (word, b) = deny::filter_position(deny::bitmap(family, direction), bucket);
            let w =
                u64::from(words[2 * word as usize]) | u64::from(words[2 * word as usize + 1]) << 32;
            w & (1 << b) != 0
        };
        let mut entries: Vec<(u8, u8, [u8; 16], u8)> = Vec::new();
        for i in 0..5000 {
            let family = if i % 2 == 0 { 4 } else { 6 };
            let direction = if i % 3 == 0 {
                deny::SOURCE
            } else {
                deny::DESTINATION
            };
            let mut addr = [0u8; 16];
            addr[..8].copy_from_slice(&next().to_be_bytes());
            addr[8..].copy_from_slice(&next().to_be_bytes());
            let len = if family == 4 {
                8 + (next() % 25) as u8
            } else {
                16 + (next() % 113) as u8
            };
            assert!(deny::mark(&mut words, family, direction, &addr, len));
            entries.push((family, direction, addr, len));
        }
        // Every address inside an entry (its first, its last, one between).
        for (family, direction, addr, len) in &entries {
            let bits = if *family == 4 { 32 } else { 128 };
            let base = u128::from_be_bytes(*addr) >> (128 - bits) >> (bits - *len as u32)
                << (bits - *len as u32);
            let span_mask = if *len as u32 == bits {
                0
            } else {
                (1u128 << (bits - *len as u32)) - 1
            };
            for host in [
                0,
                span_mask,
                (u128::from(next()) << 64 | u128::from(next())) & span_mask,
            ] {
                let a = ((base | host) << (128 - bits)).to_be_bytes();
                assert!(
                    bit(&words, *family, *direction, &a),
                    "{family} {direction} {a:?}/{len}"
                );
            }
        }
        // IPv6 entries shorter than /16 cannot be marked.
        assert!(!deny::mark(&mut words, 6, deny::SOURCE, &[0x20; 16], 12));
        // Random IPv4 destinations: the 2,500 IPv4 entries of /8 to /32
        // (some /8s and /9s among them) cover a fair share, but far from all.
        let hits = (0..100_000)
            .filter(|_| bit(&words, 4, deny::DESTINATION, &next().to_be_bytes()[..4]))
            .count();
        assert!(hits < 90_000, "{hits}");
        // 100,000 /24s (a large list): about 0.6 % of the buckets, so
        // about 0.6 % of clean traffic asks the trie.
        let mut words = vec![0u32; 2 * deny::FILTER_WORDS as usize];
        for _ in 0..100_000 {
            let a = (next() as u32 & 0xffff_ff00).to_be_bytes();
            deny::mark(&mut words, 4, deny::SOURCE, &a, 24);
        }
        let hits = (0..100_000)
            .filter(|_| bit(&words, 4, deny::SOURCE, &next().to_be_bytes()[..4]))
            .count();
        assert!(
            hits < 1_500,
            "{hits} of 100,000 clean addresses ask the trie"
        );
    }

    /// Everything the pinned maps' layout is made of that this crate
    /// defines: key and value sizes, table sizes, slot counts. A build that
    /// changes any of it must bump `MAP_LAYOUT_VERSION`, or a new daemon
    /// would adopt maps it reads wrongly; this test fails until the number
    /// and the record below change together.
    #[test]
    fn map_layout_is_pinned_down() {
        let layout = [
            size_of::<NextHop>() as u32,
            size_of::<RouteKeyV4>() as u32,
            size_of::<RouteTarget>() as u32,
            size_of::<TrafficCounter>() as u32,
            size_of::<steering::VipKey>() as u32,
            size_of::<steering::VipInfo>() as u32,
            size_of::<steering::CacheNode>() as u32,
            size_of::<steering::FlowKey>() as u32,
            MAX_ROUTES_V4,
            MAX_ROUTES_V6,
            MAX_NEXT_HOPS,
            MAX_LOCAL_ADDRS,
            MAX_EGRESS_PORTS,
            MAX_INTERFACES,
            Counter::COUNT as u32,
            settings::COUNT,
            dir24::TBL24_ENTRIES,
            dir24::TBL8_ENTRIES,
            dir24::ENTRIES_PER_ELEMENT,
            steering::MAX_VIPS,
            steering::MAX_CACHE_NODES,
            steering::MAGLEV_STRIDE,
            steering::MAX_FLOWS,
            map_names::ALL.len() as u32,
            size_of::<NeighbourKey>() as u32,
            size_of::<NeighbourMac>() as u32,
            size_of::<ecmp::NextHopGroup>() as u32,
            MAX_NEIGHBOURS,
            ecmp::MAX_GROUPS,
            ecmp::FIRST_GROUP_ID,
            KERNEL_NEXT_HOP,
            size_of::<VlanKey>() as u32,
            MAX_VLANS,
            size_of::<steering::FlowEntry>() as u32,
            MAX_DENY,
            size_of::<deny::KeyV4>() as u32,
            size_of::<deny::KeyV6>() as u32,
            size_of::<InterfaceCounter>() as u32,
            deny::FILTER_WORDS,
            size_of::<TxErrors>() as u32,
            dxr6::CHUNK_BITS,
            dxr6::RANGE_SLOTS,
            dxr6::SHORT_MAX_LEN,
            dxr6::TARGET_MASK,
            dxr6::CHUNK_WORDS,
            steering::VIP_FILTER_BUCKETS,
            steering::EPOCH_MASK,
            size_of::<steering::FlowKeyV4>() as u32,
            size_of::<steering::FlowSetV4>() as u32,
            steering::FLOW_WAYS as u32,
            steering::KEY_BITS_V4.count_ones(),
            steering::FLOW_SETS_V4,
            deny::DECIDES,
            deny::CACHE_SLOTS,
            size_of::<deny::CacheSlot>() as u32,
        ];
        assert_eq!(
            (MAP_LAYOUT_VERSION, layout),
            (
                10,
                [
                    52, 8, 8, 16, 20, 8, 44, 40, 1048576, 262144, 4096, 4096, 256, 4096, 27, 12,
                    16777216, 2097152, 2, 64, 1024, 65537, 262144, 34, 24, 8, 776, 65536, 1024,
                    8192, 4097, 8, 4096, 16, 131072, 8, 20, 40, 1048576, 16, 20, 4194304, 52,
                    16383, 4, 4096, 16777215, 16, 128, 4, 40, 131072, 2147483648, 8192, 16,
                ]
            ),
            "the map layout changed: bump MAP_LAYOUT_VERSION and record the new layout here"
        );
    }
}
