//! One counter per outcome of the packet path, indexes of the per-CPU
//! `COUNTERS` array. The program and `pop-forwarder stats` both use this enum,
//! so a counter cannot be renamed on one side only.

/// What the program did with a packet, and why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// Routed and redirected to another interface through the devmap.
    Forwarded = 0,
    /// Routed back out of the interface it came in on (XDP_TX).
    ForwardedTx,
    /// Not IPv4 or IPv6 (ARP, LLDP, VLAN-tagged…): to the kernel.
    PassNonIp,
    /// For one of this box's own addresses: to the kernel.
    PassLocal,
    /// Multicast, broadcast or IPv6 link-local destination (neighbour
    /// discovery, routing protocols): to the kernel.
    PassLinkScope,
    /// TTL or hop limit <= 1: to the kernel, which answers with ICMP time
    /// exceeded.
    PassTtlExceeded,
    /// No route matched and the route-miss policy is `pass`.
    PassRouteMiss,
    /// No route matched and the route-miss policy is `drop`.
    DropRouteMiss,
    /// The next hop's MAC is not known yet: to the kernel, which resolves it.
    PassNoNeighbour,
    /// The egress interface is not in the egress devmap (not configured, or
    /// removed): to the kernel.
    PassNoEgress,
    /// Larger than the egress MTU: to the kernel, which fragments or answers
    /// ICMP fragmentation needed / packet too big.
    PassTooBig,
    /// Frame shorter than the headers it announces: dropped.
    DropTruncated,
    /// IPv4 IHL < 5 or a wrong header checksum, or an IP version that does
    /// not match the EtherType: dropped.
    DropBadHeader,
    /// IP total length (IPv4) or payload length (IPv6) larger than the
    /// frame: dropped.
    DropBadLength,
    /// The route points at an unallocated next-hop slot (a table being
    /// edited): to the kernel.
    PassNoNextHop,
    /// For a VIP: sent to a cache node of its pool (direct server return).
    Steered,
    /// For a VIP whose pool has no node to take it (empty, all drained, or
    /// the node's MAC unknown): to the kernel.
    PassVipNoNode,
    /// For a VIP's IP-in-IP node, too big for the egress MTU once wrapped,
    /// with don't-fragment set (always, for IPv6): answered with ICMP
    /// fragmentation needed / packet too big from the VIP, sent back out of
    /// the interface it came in on (XDP_TX).
    IcmpTooBig,
    /// A unicast frame for another host's MAC (a promiscuous NIC, a bridge,
    /// unknown-unicast flooding on an exchange LAN): neither forwarded nor
    /// steered; to the kernel, which drops it as another host's.
    PassNotForUs,
    /// A martian source (unspecified, loopback, multicast, limited
    /// broadcast): not forwarded, as Linux forwards none; dropped.
    DropMartianSource,
    /// IPv4 with a loose or strict source route option (LSRR, SSRR): not
    /// forwarded, as Linux forwards none by default (accept_source_route
    /// 0); dropped.
    DropSourceRouted,
    /// IPv4 options the program does not walk through: more than four, or
    /// malformed (a length under 2 or past the header): to the kernel, which
    /// forwards, drops or answers parameter problem as Linux does.
    PassIpOptions,
    /// The route is one the kernel handles (blackhole, unreachable,
    /// prohibit, or next hops the program cannot express): to the kernel,
    /// which drops or answers it as its table says.
    PassKernelRoute,
    /// `route_lookup = "kernel-fib"`: the kernel's FIB says the packet is
    /// not to be forwarded (a local or broadcast destination, no route, or
    /// forwarding off on the ingress interface): to the kernel.
    PassFibNotForwarded,
    /// A tagged frame on a VLAN this box has no subinterface for (not in
    /// `VLANS`): to the kernel, tags as they came, which drops it as Linux
    /// does.
    PassUnknownVlan,
    /// Too big for an IP-in-IP node once wrapped, and its source already
    /// got `ICMP_TOO_BIG_PER_SECOND` ICMP errors this second (RFC 1812
    /// 4.3.2.8, RFC 4443 2.4 f): dropped without an answer, as Linux does
    /// when its ICMP rate limit holds.
    DropIcmpRateLimited,
    /// The source or destination is in the deny list (`DENY_V4`,
    /// `DENY_V6`): dropped before any other lookup, and counted per entry
    /// too.
    DropDenied,
}

/// ICMP too-big answers a source gets per second at most; the rest of its
/// too-big packets are dropped (`drop_icmp_rate_limited`).
pub const ICMP_TOO_BIG_PER_SECOND: u64 = 8;

impl Counter {
    pub const COUNT: usize = 27;

    pub const ALL: [Counter; Self::COUNT] = [
        Counter::Forwarded,
        Counter::ForwardedTx,
        Counter::PassNonIp,
        Counter::PassLocal,
        Counter::PassLinkScope,
        Counter::PassTtlExceeded,
        Counter::PassRouteMiss,
        Counter::DropRouteMiss,
        Counter::PassNoNeighbour,
        Counter::PassNoEgress,
        Counter::PassTooBig,
        Counter::DropTruncated,
        Counter::DropBadHeader,
        Counter::DropBadLength,
        Counter::PassNoNextHop,
        Counter::Steered,
        Counter::PassVipNoNode,
        Counter::IcmpTooBig,
        Counter::PassNotForUs,
        Counter::DropMartianSource,
        Counter::DropSourceRouted,
        Counter::PassIpOptions,
        Counter::PassKernelRoute,
        Counter::PassFibNotForwarded,
        Counter::PassUnknownVlan,
        Counter::DropIcmpRateLimited,
        Counter::DropDenied,
    ];

    /// Stable snake_case name, used by `stats` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Forwarded => "forwarded",
            Counter::ForwardedTx => "forwarded_tx",
            Counter::PassNonIp => "pass_non_ip",
            Counter::PassLocal => "pass_local",
            Counter::PassLinkScope => "pass_link_scope",
            Counter::PassTtlExceeded => "pass_ttl_exceeded",
            Counter::PassRouteMiss => "pass_route_miss",
            Counter::DropRouteMiss => "drop_route_miss",
            Counter::PassNoNeighbour => "pass_no_neighbour",
            Counter::PassNoEgress => "pass_no_egress",
            Counter::PassTooBig => "pass_too_big",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropBadHeader => "drop_bad_header",
            Counter::DropBadLength => "drop_bad_length",
            Counter::PassNoNextHop => "pass_no_next_hop",
            Counter::Steered => "steered",
            Counter::PassVipNoNode => "pass_vip_no_node",
            Counter::IcmpTooBig => "icmp_too_big",
            Counter::PassNotForUs => "pass_not_for_us",
            Counter::DropMartianSource => "drop_martian_source",
            Counter::DropSourceRouted => "drop_source_routed",
            Counter::PassIpOptions => "pass_ip_options",
            Counter::PassKernelRoute => "pass_kernel_route",
            Counter::PassFibNotForwarded => "pass_fib_not_forwarded",
            Counter::PassUnknownVlan => "pass_unknown_vlan",
            Counter::DropIcmpRateLimited => "drop_icmp_rate_limited",
            Counter::DropDenied => "drop_denied",
        }
    }

    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_once_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{c:?}");
        }
    }

    #[test]
    fn names_are_unique() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }
}
