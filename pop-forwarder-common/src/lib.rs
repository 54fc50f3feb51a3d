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
pub mod ecmp;
pub mod maglev;
pub mod steering;

pub use counters::{Counter, ICMP_TOO_BIG_PER_SECOND};

/// The layout of the pinned maps: their names, types, key and value
/// layouts, sizes and the meaning of every entry. A daemon (or a new build
/// of the program) adopts an instance's pinned maps only if they carry this
/// very number (`settings::LAYOUT_VERSION`). Bump it with any change that
/// makes maps written by one build unreadable, or wrongly read, by another;
/// `map_layout_is_pinned_down` in this crate's tests fails until you do.
pub const MAP_LAYOUT_VERSION: u32 = 4;

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
    pub const INTERFACE_STATS: &str = "INTERFACE_STATS";
    pub const ALL: [&str; 27] = [
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
        INTERFACE_STATS,
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

/// Indexes of the `SETTINGS` array.
pub mod settings {
    /// 1: a packet whose destination matches no route is dropped; 0: passed
    /// to the kernel.
    pub const ROUTE_MISS_DROP: u32 = 0;
    /// How the program looks IPv4 destinations up: `IPV4_DIR24` (the
    /// default, zero) or `IPV4_TRIE`. IPv6 always uses its trie.
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
    /// 1 when the deny list has an entry: without one, packets skip its
    /// lookups.
    pub const DENY_ON: u32 = 8;
    pub const COUNT: u32 = 9;

    pub const ROUTE_LOOKUP_TABLES: u32 = 0;
    pub const ROUTE_LOOKUP_FIB: u32 = 1;

    pub const IPV4_DIR24: u32 = 0;
    pub const IPV4_TRIE: u32 = 1;
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
    unsafe impl aya::Pod for super::NeighbourKey {}
    unsafe impl aya::Pod for super::NeighbourMac {}
    unsafe impl aya::Pod for super::VlanKey {}
    unsafe impl aya::Pod for super::ecmp::NextHopGroup {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

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
        ];
        assert_eq!(
            (MAP_LAYOUT_VERSION, layout),
            (
                4,
                [
                    52, 8, 8, 16, 20, 8, 44, 40, 1048576, 262144, 4096, 4096, 256, 4096, 27, 9,
                    16777216, 2097152, 2, 64, 1024, 65537, 262144, 27, 24, 8, 776, 65536, 1024,
                    8192, 4097, 8, 4096, 16, 131072, 8, 20, 40,
                ]
            ),
            "the map layout changed: bump MAP_LAYOUT_VERSION and record the new layout here"
        );
    }
}
