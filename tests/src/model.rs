//! A reference model of the data plane, written from README's table of
//! outcomes ("What it does with each packet") and its sections on VLANs,
//! ECMP groups and connected subnets, not from the program: given what the
//! tables hold and one frame, what the program must do (action, counter)
//! and every byte of the frame it sends or hands to the kernel.
//!
//! It covers: Ethernet and VLAN tags (known and unknown VLANs, tags back
//! on for the kernel, a next hop's tag pushed), IPv4 and IPv6 header
//! checks, the deny list, IPv4 options, link-scope and martian addresses,
//! VIP steering (direct server return, IP-in-IP with its outer header,
//! ICMP errors about a VIP's flows, too-big answers), this box's own
//! addresses, TTL, the route lookup (longest prefix), kernel routes, ECMP
//! groups (the bucket of a flow), connected subnets and their neighbours,
//! next hops with and without a MAC, the MTU, and the rewrite. Not
//! modelled: the kernel-FIB lookup (its answers are the kernel's), and
//! the connection table's memory across pool changes (the differential
//! test changes no pool, so a flow's node is its Maglev entry's).
//!
//! The hashes that pick a Maglev entry, an ECMP bucket and an IPv6 flow
//! label, and the rendezvous assignment of buckets to members, are the
//! common crate's functions: README names them as the definition.
//!
//! And a structure-aware generator of worlds and frames for it, from a
//! seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pop_forwarder::{
    config::{Deny, DenyDirection},
    net::Prefix,
};
use pop_forwarder_common::{Counter, ecmp, maglev};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// A next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The route's interface (a VLAN subinterface's own ifindex for a hop
    /// on a VLAN), and the one frames leave by (its parent).
    pub ifindex: u32,
    pub tx_ifindex: u32,
    pub mtu: u32,
    /// The gateway's MAC, if known (unused for a connected subnet).
    pub mac: Option<[u8; 6]>,
    pub src_mac: [u8; 6],
    /// The gateway; for a connected subnet, unspecified.
    pub gateway: IpAddr,
    /// A connected subnet: packets go to the destination host itself.
    pub connected: bool,
    /// The VLAN frames leave on: TPID and TCI.
    pub vlan: Option<(u16, u16)>,
}

/// Where a route leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Hop(Hop),
    /// An ECMP group: members and weights.
    Group(Vec<(Hop, u32)>),
    /// A route the kernel must handle (blackhole and the like).
    Kernel,
}

/// A cache node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// Direct server return on `ifindex`, to `mac` (None: not known yet,
    /// the node cannot take packets); `mtu` of the link (0: unchecked).
    Dsr {
        ifindex: u32,
        mac: Option<[u8; 6]>,
        src_mac: [u8; 6],
        mtu: u32,
    },
    /// IP-in-IP to `addr`, the outer packet routed.
    Ipip { addr: IpAddr },
}

/// A VIP: address, protocol, port (0: any) and its Maglev table (node ids;
/// `maglev::NO_NODE` for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub addr: IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub table: Vec<u32>,
}

/// What the tables hold.
#[derive(Debug, Clone)]
pub struct World {
    /// The interface frames arrive on, and its MAC.
    pub ingress: u32,
    pub ingress_mac: [u8; 6],
    pub routes: Vec<(Prefix, Target)>,
    /// This box's addresses.
    pub local: Vec<IpAddr>,
    pub deny: Vec<Deny>,
    pub route_miss_drop: bool,
    /// Hosts on connected subnets: address, interface, MAC.
    pub neighbours: Vec<(IpAddr, u32, [u8; 6])>,
    /// VLANs of the ingress: outer and inner VLAN ID (0: one tag).
    pub vlans: Vec<(u16, u16)>,
    /// Steering: on when there is a VIP.
    pub vips: Vec<Vip>,
    pub nodes: Vec<(u32, Node)>,
    /// IP-in-IP outer sources: an IPv4 address or pool (address, length),
    /// an IPv6 address.
    pub encap_v4: Option<(Ipv4Addr, u8)>,
    pub encap_v6: Option<Ipv6Addr>,
    pub seed: u32,
}

/// What the program must do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub counter: Counter,
    /// The frame as it leaves (or is handed to the kernel). Not compared
    /// for XDP_DROP: nothing leaves.
    pub frame: Vec<u8>,
    /// For a too-big answer: the source it answers, whose answers are
    /// rate limited (8 a second). The model does not keep time: the
    /// harness knows when it sent what and may accept
    /// `drop_icmp_rate_limited` instead (see `differential.rs`).
    pub answered: Option<IpAddr>,
}

fn keep(frame: &[u8], action: u32, counter: Counter) -> Outcome {
    Outcome {
        action,
        counter,
        frame: frame.to_vec(),
        answered: None,
    }
}

fn pass(frame: &[u8], counter: Counter) -> Outcome {
    keep(frame, XDP_PASS, counter)
}

fn drop(frame: &[u8], counter: Counter) -> Outcome {
    keep(frame, XDP_DROP, counter)
}

fn bits(addr: IpAddr) -> (u128, u32) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

pub fn contains(p: &Prefix, addr: IpAddr) -> bool {
    if p.addr.is_ipv4() != addr.is_ipv4() {
        return false;
    }
    if p.len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(p.len));
    bits(p.addr).0 & mask == bits(addr).0 & mask
}

/// Longest-prefix match over the routes.
fn lookup(world: &World, addr: IpAddr) -> Option<&Target> {
    world
        .routes
        .iter()
        .filter(|(p, _)| contains(p, addr))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, t)| t)
}

fn denied(world: &World, src: IpAddr, dst: IpAddr) -> bool {
    world.deny.iter().any(|d| match d.direction {
        DenyDirection::Source => contains(&d.prefix, src),
        DenyDirection::Destination => contains(&d.prefix, dst),
    })
}

/// RFC 1624: the header checksum after one 16-bit word changed from `old`
/// to `new` (HC' = ~(~HC + ~m + m')).
fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// RFC 1071: the ones' complement of the ones' complement sum of `data`
/// (a last odd byte padded with zero) and `extra`.
fn internet_checksum(data: &[u8], extra: u32) -> u16 {
    let mut sum = extra;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    internet_checksum(header, 0)
}

fn widen(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut w = [0u8; 16];
            w[..4].copy_from_slice(&a.octets());
            w
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn addr_at(frame: &[u8], at: usize, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::from(<[u8; 4]>::try_from(&frame[at..at + 4]).unwrap())
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap())
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// What README says the program does with `frame`.
pub fn expect(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 {
        return drop(frame, DropTruncated);
    }
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    if ether_type != 0x8100 && ether_type != 0x88a8 {
        return untagged(world, frame);
    }
    // Tagged: a frame shorter than 22 bytes (two MACs, a tag, a type and
    // the room of a second tag) cannot be untagged and is dropped.
    if frame.len() < 22 {
        return drop(frame, DropTruncated);
    }
    // One tag, or two when an 802.1Q tag follows the first.
    let two = u16::from_be_bytes([frame[16], frame[17]]) == 0x8100;
    let n = if two { 8 } else { 4 };
    let outer = u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff;
    let inner = if two {
        u16::from_be_bytes([frame[18], frame[19]]) & 0x0fff
    } else {
        0
    };
    if !world.vlans.contains(&(outer, inner)) {
        return pass(frame, PassUnknownVlan);
    }
    let tags = &frame[12..12 + n];
    let mut bare = frame[..12].to_vec();
    bare.extend_from_slice(&frame[12 + n..]);
    let mut out = untagged(world, &bare);
    // The tags go back on, as they came, for the kernel; and on an answer
    // back to the sender (it is on that VLAN).
    if out.action == XDP_PASS || out.counter == IcmpTooBig {
        out.frame.splice(12..12, tags.iter().copied());
    }
    out
}

fn untagged(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    let dst_mac: [u8; 6] = frame[..6].try_into().unwrap();
    if dst_mac[0] & 1 == 0 && dst_mac != world.ingress_mac {
        return pass(frame, PassNotForUs);
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => ipv4(world, frame),
        0x86dd => ipv6(world, frame),
        _ => pass(frame, PassNonIp),
    }
}

enum Options {
    Plain,
    SourceRoute,
    Unknown,
}

/// README: at most four options are walked; LSRR (131) and SSRR (137) are
/// dropped; more than four, or malformed ones (a length under 2 or past
/// the header, or a kind whose length cannot be read), go to the kernel.
fn options(header: &[u8], frame_rest: usize) -> Options {
    let mut at = 20;
    for _ in 0..4 {
        if at >= header.len() {
            return Options::Plain;
        }
        // Kind and length are read as a pair, inside the frame.
        if at + 2 > frame_rest {
            return Options::Unknown;
        }
        match header[at] {
            0 => return Options::Plain,
            1 => at += 1,
            131 | 137 => return Options::SourceRoute,
            _ => {
                let Some(&len) = header.get(at + 1) else {
                    return Options::Unknown;
                };
                let len = usize::from(len);
                if len < 2 || at + len > header.len() {
                    return Options::Unknown;
                }
                at += len;
            }
        }
    }
    if at >= header.len() {
        Options::Plain
    } else {
        Options::Unknown
    }
}

/// A packet's flow, as routing and steering read it.
struct Flow {
    v4: bool,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    /// Offset in the frame of the L4 header, unless the packet is a
    /// fragment (or, IPv6, its extension-header chain is not walked
    /// through).
    l4: Option<usize>,
    /// The IP datagram's length (the frame may carry padding after it).
    ip_len: usize,
    tos: u8,
    ttl: u8,
}

fn ipv4(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 + 20 {
        return drop(frame, DropTruncated);
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return drop(frame, DropBadHeader);
    }
    if 14 + ihl > frame.len() {
        return drop(frame, DropTruncated);
    }
    // RFC 1812 5.2.2: a wrong header checksum is dropped.
    if internet_checksum(&ip[..ihl], 0) != 0 {
        return drop(frame, DropBadHeader);
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total < ihl || 14 + total > frame.len() {
        return drop(frame, DropBadLength);
    }
    let src = addr_at(ip, 12, true);
    let dst_octets: [u8; 4] = ip[16..20].try_into().unwrap();
    let dst = IpAddr::from(dst_octets);
    if denied(world, src, dst) {
        return drop(frame, DropDenied);
    }
    if ihl > 20 {
        match options(&ip[..ihl], ip.len()) {
            Options::Plain => {}
            Options::SourceRoute => return drop(frame, DropSourceRouted),
            Options::Unknown => return pass(frame, PassIpOptions),
        }
    }
    if dst_octets[0] & 0xf0 == 0xe0 || dst_octets == [255; 4] {
        return pass(frame, PassLinkScope);
    }
    let s: [u8; 4] = ip[12..16].try_into().unwrap();
    if s == [0; 4] || s[0] == 127 || s[0] & 0xf0 == 0xe0 || s == [255; 4] {
        return drop(frame, DropMartianSource);
    }
    // A fragment (more-fragments set or an offset) carries its ports only
    // in the first: none is read, so all go one way.
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let flow = Flow {
        v4: true,
        src,
        dst,
        protocol: ip[9],
        l4: (!fragment).then_some(14 + ihl),
        ip_len: total,
        tos: ip[1],
        ttl: ip[8],
    };
    if let Some(out) = steer(world, frame, &flow) {
        return out;
    }
    // ECMP: addresses, protocol and (not for fragments) TCP, UDP or SCTP
    // ports, as Linux's default policy.
    let ports = match flow.l4 {
        Some(l4) if matches!(flow.protocol, TCP | UDP | SCTP) => {
            match be16(frame, l4).zip(be16(frame, l4 + 2)) {
                Some((a, b)) => u32::from(a) << 16 | u32::from(b),
                None => 0,
            }
        }
        _ => 0,
    };
    let bucket = ecmp::flow_bucket(
        world.seed,
        u64::from(u32::from_le_bytes(s)),
        u64::from(u32::from_le_bytes(dst_octets)),
        u64::from(ports) << 8 | u64::from(flow.protocol),
    );
    route(world, frame, &flow, bucket, |out| {
        let ip = &mut out[14..];
        let old = u16::from_be_bytes([ip[8], ip[9]]);
        ip[8] -= 1;
        let new = u16::from_be_bytes([ip[8], ip[9]]);
        let check = checksum_update(u16::from_be_bytes([ip[10], ip[11]]), old, new);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
    })
}

/// IPv6's upper-layer protocol for steering: behind at most four
/// extension headers (hop-by-hop, routing, fragment, destination
/// options); a longer chain, or one cut short, leaves an extension header
/// as the protocol (no VIP's). Behind a fragment header, no L4 header is
/// read (every fragment goes one way).
fn upper_layer_v6(frame: &[u8]) -> (u8, Option<usize>) {
    let mut next = frame[14 + 6];
    let mut at = 14 + 40;
    let mut fragment = false;
    for _ in 0..4 {
        if !matches!(next, 0 | 43 | 44 | 60) {
            break;
        }
        let (Some(&following), Some(&len)) = (frame.get(at), frame.get(at + 1)) else {
            return (next, None);
        };
        if next == 44 {
            fragment = true;
            at += 8;
        } else {
            at += (usize::from(len) + 1) * 8;
        }
        next = following;
    }
    (next, (!fragment).then_some(at))
}

fn ipv6(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 + 40 {
        return drop(frame, DropTruncated);
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 6 {
        return drop(frame, DropBadHeader);
    }
    let total = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if 14 + total > frame.len() {
        return drop(frame, DropBadLength);
    }
    let src_octets: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst_octets: [u8; 16] = ip[24..40].try_into().unwrap();
    let (src, dst) = (IpAddr::from(src_octets), IpAddr::from(dst_octets));
    if denied(world, src, dst) {
        return drop(frame, DropDenied);
    }
    let link_local = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    if dst_octets[0] == 0xff || link_local(&dst_octets) || link_local(&src_octets) {
        return pass(frame, PassLinkScope);
    }
    if src_octets[0] == 0xff
        || src == IpAddr::from(Ipv6Addr::UNSPECIFIED)
        || src == IpAddr::from(Ipv6Addr::LOCALHOST)
    {
        return drop(frame, DropMartianSource);
    }
    let (protocol, l4) = upper_layer_v6(frame);
    let flow = Flow {
        v4: false,
        src,
        dst,
        protocol,
        l4,
        ip_len: total,
        tos: ip[0] << 4 | ip[1] >> 4,
        ttl: ip[7],
    };
    if let Some(out) = steer(world, frame, &flow) {
        return out;
    }
    // ECMP (RFC 6438): addresses (each folded to a word), flow label and
    // next header; no extension-header walk.
    let fold = |a: &[u8; 16]| {
        let [hi, lo] = maglev::address_words(a);
        hi ^ lo.rotate_left(32)
    };
    let label = u32::from_be_bytes([0, ip[1] & 0x0f, ip[2], ip[3]]);
    let bucket = ecmp::flow_bucket(
        world.seed,
        fold(&src_octets),
        fold(&dst_octets),
        u64::from(label) << 8 | u64::from(ip[6]),
    );
    route(world, frame, &flow, bucket, |out| out[14 + 7] -= 1)
}

/// The next hop a route target gives a packet whose ECMP bucket is
/// `bucket`, going to `dst`: its MAC, or the counter of why not.
fn resolve(
    world: &World,
    target: &Target,
    bucket: usize,
    dst: IpAddr,
) -> Result<(Hop, [u8; 6]), Counter> {
    let hop = match target {
        Target::Kernel => return Err(Counter::PassKernelRoute),
        Target::Hop(hop) => *hop,
        Target::Group(members) => {
            let keys: Vec<(u64, u32)> = members
                .iter()
                .map(|(h, w)| (ecmp::member_key(&widen(h.gateway), h.ifindex), *w))
                .collect();
            let assigned = ecmp::assign(&keys).expect("a valid group");
            members[usize::from(assigned[bucket % ecmp::GROUP_BUCKETS])].0
        }
    };
    let mac = if hop.connected {
        world
            .neighbours
            .iter()
            .find(|(a, i, _)| *a == dst && *i == hop.ifindex)
            .map(|(_, _, m)| *m)
    } else {
        hop.mac
    };
    match mac {
        Some(mac) => Ok((hop, mac)),
        None => Err(Counter::PassNoNeighbour),
    }
}

/// The Ethernet header for `hop` (with its VLAN's tag), then `rest`.
fn ethernet(hop: &Hop, mac: [u8; 6], ether_type: [u8; 2], rest: &[u8]) -> Vec<u8> {
    let mut out = mac.to_vec();
    out.extend_from_slice(&hop.src_mac);
    if let Some((proto, tci)) = hop.vlan {
        out.extend_from_slice(&proto.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(&ether_type);
    out.extend_from_slice(rest);
    out
}

fn route<F: FnOnce(&mut Vec<u8>)>(
    world: &World,
    frame: &[u8],
    flow: &Flow,
    bucket: usize,
    decrement: F,
) -> Outcome {
    use Counter::*;
    if world.local.contains(&flow.dst) {
        return pass(frame, PassLocal);
    }
    if flow.ttl <= 1 {
        return pass(frame, PassTtlExceeded);
    }
    let Some(target) = lookup(world, flow.dst) else {
        return if world.route_miss_drop {
            drop(frame, DropRouteMiss)
        } else {
            pass(frame, PassRouteMiss)
        };
    };
    let (hop, mac) = match resolve(world, target, bucket, flow.dst) {
        Ok(h) => h,
        Err(counter) => return pass(frame, counter),
    };
    if flow.ip_len > hop.mtu as usize {
        return pass(frame, PassTooBig);
    }
    let mut rewritten = frame.to_vec();
    decrement(&mut rewritten);
    let out = ethernet(&hop, mac, [frame[12], frame[13]], &rewritten[14..]);
    if hop.tx_ifindex == world.ingress {
        keep(&out, XDP_TX, ForwardedTx)
    } else {
        keep(&out, XDP_REDIRECT, Forwarded)
    }
}

/// The flow an ICMP error is about (README: "ICMP error … to a VIP, about
/// a TCP/UDP flow, quoting a packet from that VIP"): the quoted packet is
/// the node's reply, VIP to client, so addresses and ports are swapped
/// back. Returns (client, VIP, protocol, client port, VIP port).
fn icmp_error_flow(frame: &[u8], flow: &Flow) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let l4 = flow.l4?;
    // The ICMP header is read whole (8 bytes) before its type.
    if l4 + 8 > frame.len() {
        return None;
    }
    let kind = frame[l4];
    let embedded = l4 + 8;
    let (src, dst, protocol, ports_at) =
        if flow.v4 && flow.protocol == ICMP && matches!(kind, 3 | 11 | 12) {
            if embedded + 20 > frame.len() {
                return None;
            }
            let ihl = usize::from(frame[embedded] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            (
                addr_at(frame, embedded + 12, true),
                addr_at(frame, embedded + 16, true),
                frame[embedded + 9],
                embedded + ihl,
            )
        } else if !flow.v4 && flow.protocol == ICMPV6 && matches!(kind, 1..=4) {
            if embedded + 40 > frame.len() {
                return None;
            }
            (
                addr_at(frame, embedded + 8, false),
                addr_at(frame, embedded + 24, false),
                frame[embedded + 6],
                embedded + 40,
            )
        } else {
            return None;
        };
    if !matches!(protocol, TCP | UDP) || src != flow.dst || ports_at + 4 > frame.len() {
        return None;
    }
    let quoted_src_port = u16::from_be_bytes([frame[ports_at], frame[ports_at + 1]]);
    let quoted_dst_port = u16::from_be_bytes([frame[ports_at + 2], frame[ports_at + 3]]);
    Some((dst, src, protocol, quoted_dst_port, quoted_src_port))
}

/// README's VIP rows: None if the packet is for no VIP (it is routed).
fn steer(world: &World, frame: &[u8], flow: &Flow) -> Option<Outcome> {
    use Counter::*;
    if world.vips.is_empty() {
        return None;
    }
    let error = icmp_error_flow(frame, flow);
    let (src, dst, protocol, src_port, dst_port) = match error {
        Some(f) => f,
        None => {
            let (a, b) = match flow.l4 {
                Some(l4) if matches!(flow.protocol, TCP | UDP) && l4 + 4 <= frame.len() => (
                    u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
                    u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
                ),
                _ => (0, 0),
            };
            (flow.src, flow.dst, flow.protocol, a, b)
        }
    };
    let find = |port: u16| {
        world
            .vips
            .iter()
            .find(|v| v.addr == dst && v.protocol == protocol && v.port == port)
    };
    let vip = find(dst_port).or_else(|| find(0))?;
    let hash = maglev::flow_hash(
        u64::from(world.seed),
        &widen(src),
        &widen(dst),
        src_port,
        dst_port,
        protocol,
    );
    let id = vip.table[hash as usize % vip.table.len()];
    let node = world.nodes.iter().find(|(i, _)| *i == id).map(|(_, n)| *n);
    let node = match node {
        Some(Node::Dsr { mac: None, .. }) | None => return Some(pass(frame, PassVipNoNode)),
        Some(n) => n,
    };
    match node {
        Node::Dsr {
            ifindex,
            mac,
            src_mac,
            mtu,
        } => {
            // Too big for the node's link: the kernel's, as a routed
            // packet.
            if mtu != 0 && flow.ip_len > mtu as usize {
                return Some(pass(frame, PassTooBig));
            }
            let mut out = frame.to_vec();
            out[..6].copy_from_slice(&mac.unwrap());
            out[6..12].copy_from_slice(&src_mac);
            let action = if ifindex == world.ingress {
                XDP_TX
            } else {
                XDP_REDIRECT
            };
            Some(keep(&out, action, Steered))
        }
        Node::Ipip { addr } => {
            let label = ecmp::entropy_label(
                maglev::address_words(&widen(src)),
                u32::from(src_port) << 16 | u32::from(dst_port),
                protocol,
            );
            Some(encapsulate(
                world,
                frame,
                flow,
                addr,
                label,
                error.is_some(),
            ))
        }
    }
}

/// IP-in-IP to the node at `node`: the outer packet is routed (its ECMP
/// bucket from the node's address alone), wraps exactly the IP datagram,
/// copies DSCP and ECN, carries `label` (IPv6) or takes its source from
/// the pool by it (IPv4).
fn encapsulate(
    world: &World,
    frame: &[u8],
    flow: &Flow,
    node: IpAddr,
    label: u32,
    icmp_error: bool,
) -> Outcome {
    use Counter::*;
    let outer_v4 = node.is_ipv4();
    if outer_v4 && !flow.v4 {
        return pass(frame, PassVipNoNode);
    }
    let outer_len = if outer_v4 { 20 } else { 40 };
    if world.local.contains(&node) {
        return pass(frame, PassVipNoNode);
    }
    let Some(target) = lookup(world, node) else {
        return pass(frame, PassVipNoNode);
    };
    let [hi, lo] = maglev::address_words(&widen(node));
    let bucket = ecmp::flow_bucket(0, hi, lo, 0);
    let (hop, mac) = match resolve(world, target, bucket, node) {
        Ok(h) => h,
        Err(counter) => return pass(frame, counter),
    };
    if flow.ip_len + outer_len > hop.mtu as usize {
        // No ICMP error in answer to an ICMP error.
        if icmp_error {
            return pass(frame, PassTooBig);
        }
        return too_big(frame, flow, hop.mtu.saturating_sub(outer_len as u32));
    }
    if hop.vlan.is_some() {
        return pass(frame, PassVipNoNode);
    }
    let inner = &frame[14..14 + flow.ip_len];
    let inner_protocol = if flow.v4 { 4 } else { 41 };
    let mut outer = Vec::new();
    if outer_v4 {
        let (base, len) = world.encap_v4.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
        let mut source = u32::from(base);
        if len > 0 && len < 32 {
            source |= label & (u32::MAX >> len);
        }
        let total = ((flow.ip_len + 20) as u16).to_be_bytes();
        outer.extend_from_slice(&[
            0x45,
            flow.tos,
            total[0],
            total[1],
            0,
            0,
            0x40,
            0,
            64,
            inner_protocol,
            0,
            0,
        ]);
        outer.extend_from_slice(&source.to_be_bytes());
        outer.extend_from_slice(&widen(node)[..4]);
        let c = ipv4_checksum(&outer);
        outer[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        let source = world.encap_v6.unwrap_or(Ipv6Addr::UNSPECIFIED);
        outer.extend_from_slice(&[
            0x60 | flow.tos >> 4,
            flow.tos << 4 | (label >> 16) as u8,
            (label >> 8) as u8,
            label as u8,
        ]);
        outer.extend_from_slice(&(flow.ip_len as u16).to_be_bytes());
        outer.extend_from_slice(&[inner_protocol, 64]);
        outer.extend_from_slice(&source.octets());
        outer.extend_from_slice(&widen(node));
    }
    outer.extend_from_slice(inner);
    let ether_type = if outer_v4 { [0x08, 0x00] } else { [0x86, 0xdd] };
    let out = ethernet(&hop, mac, ether_type, &outer);
    let action = if hop.tx_ifindex == world.ingress {
        XDP_TX
    } else {
        XDP_REDIRECT
    };
    keep(&out, action, Steered)
}

/// README: a packet for an IP-in-IP node too big once wrapped, with
/// don't-fragment (always so for IPv6), is answered in place: ICMP
/// fragmentation needed or packet too big from the VIP to the client,
/// giving `mtu`, quoting 68 or 88 bytes, back to the MAC it came from.
fn too_big(frame: &[u8], flow: &Flow, mtu: u32) -> Outcome {
    use Counter::*;
    let quote_len = if flow.v4 { 68 } else { 88 };
    if flow.v4 && u16::from_be_bytes([frame[20], frame[21]]) & 0x4000 == 0 {
        return pass(frame, PassTooBig);
    }
    if frame.len() < 14 + quote_len {
        return pass(frame, PassTooBig);
    }
    let quote = &frame[14..14 + quote_len];
    let mut out = frame[6..12].to_vec();
    out.extend_from_slice(&frame[..6]);
    if flow.v4 {
        out.extend_from_slice(&[0x08, 0x00]);
        let total = ((20 + 8 + quote_len) as u16).to_be_bytes();
        let mut ip = vec![0x45, 0, total[0], total[1], 0, 0, 0, 0, 64, ICMP, 0, 0];
        ip.extend_from_slice(&widen(flow.dst)[..4]);
        ip.extend_from_slice(&widen(flow.src)[..4]);
        let c = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        let mut icmp = vec![3, 4, 0, 0, 0, 0, m[0], m[1]];
        icmp.extend_from_slice(quote);
        let c = internet_checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&icmp);
    } else {
        out.extend_from_slice(&[0x86, 0xdd]);
        let len = ((8 + quote_len) as u16).to_be_bytes();
        let mut ip = vec![0x60, 0, 0, 0, len[0], len[1], ICMPV6, 64];
        ip.extend_from_slice(&widen(flow.dst));
        ip.extend_from_slice(&widen(flow.src));
        let m = mtu.to_be_bytes();
        let mut icmp = vec![2, 0, 0, 0, m[0], m[1], m[2], m[3]];
        icmp.extend_from_slice(quote);
        // Pseudo-header: addresses, length, next header.
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ICMPV6]);
        pseudo.extend_from_slice(&icmp);
        let c = internet_checksum(&pseudo, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&icmp);
    }
    Outcome {
        action: XDP_TX,
        counter: IcmpTooBig,
        frame: out,
        answered: Some(flow.src),
    }
}
/// A small, fast, seedable generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// An address in `p`: its first, its last, or any.
fn in_prefix(rng: &mut Rng, p: &Prefix) -> IpAddr {
    let (base, width) = bits(p.addr);
    let host_bits = width - u32::from(p.len);
    let host = match rng.below(3) {
        0 => 0,
        1 if host_bits > 0 => u128::MAX >> (128 - host_bits),
        _ if host_bits > 0 => {
            (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                & (u128::MAX >> (128 - host_bits))
        }
        _ => 0,
    };
    let a = base | (host << (128 - width));
    if width == 32 {
        IpAddr::from(((a >> 96) as u32).to_be_bytes())
    } else {
        IpAddr::from(a.to_be_bytes())
    }
}

/// An address of a family near the world's interesting ones: inside a
/// route (often at its edges), a local address, a VIP, a neighbour, a
/// deny-list prefix, a link-scope or martian one, or anything.
fn address(rng: &mut Rng, world: &World, v4: bool) -> IpAddr {
    let family = |a: &IpAddr| a.is_ipv4() == v4;
    let routes: Vec<&Prefix> = world
        .routes
        .iter()
        .map(|(p, _)| p)
        .filter(|p| family(&p.addr))
        .collect();
    let deny: Vec<&Prefix> = world
        .deny
        .iter()
        .map(|d| &d.prefix)
        .filter(|p| family(&p.addr))
        .collect();
    let local: Vec<IpAddr> = world.local.iter().copied().filter(family).collect();
    let vips: Vec<IpAddr> = world.vips.iter().map(|v| v.addr).filter(family).collect();
    let neighbours: Vec<IpAddr> = world
        .neighbours
        .iter()
        .map(|n| n.0)
        .filter(family)
        .collect();
    let special_v4: [[u8; 4]; 8] = [
        [0, 0, 0, 0],
        [127, 0, 0, 1],
        [224, 0, 0, 5],
        [239, 1, 2, 3],
        [255, 255, 255, 255],
        [0, 1, 2, 3],
        [240, 0, 0, 1],
        [169, 254, 1, 1],
    ];
    let special_v6: [&str; 7] = [
        "::",
        "::1",
        "ff02::1",
        "ff05::2",
        "fe80::1",
        "febf::1",
        "::ffff:1.2.3.4",
    ];
    match rng.below(14) {
        0..=3 if !routes.is_empty() => {
            let p = **rng.pick(&routes);
            in_prefix(rng, &p)
        }
        4 if !local.is_empty() => *rng.pick(&local),
        5..=7 if !vips.is_empty() => *rng.pick(&vips),
        9 if !neighbours.is_empty() => *rng.pick(&neighbours),
        10 if !deny.is_empty() => {
            let p = **rng.pick(&deny);
            in_prefix(rng, &p)
        }
        8 | 11 => {
            if v4 {
                IpAddr::from(*rng.pick(&special_v4))
            } else {
                rng.pick(&special_v6).parse().unwrap()
            }
        }
        _ => {
            if v4 {
                IpAddr::from((rng.next_u64() as u32).to_be_bytes())
            } else {
                IpAddr::from(
                    (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())).to_be_bytes(),
                )
            }
        }
    }
}

/// IPv4 options: plain ones, source routes, malformed ones, too many.
fn random_options(rng: &mut Rng) -> Vec<u8> {
    let mut o = Vec::new();
    for _ in 0..rng.below(7) {
        match rng.below(9) {
            0 => o.push(0),
            1 | 2 => o.push(1),
            3 => o.extend_from_slice(&[131, 7, 4, 10, 0, 0, 1]),
            4 => o.extend_from_slice(&[137, 7, 4, 10, 0, 0, 1]),
            5 => o.extend_from_slice(&[0x94, 4, 0, 0]),
            6 => o.extend_from_slice(&[7, 7, 4, 0, 0, 0, 0]),
            7 => o.extend_from_slice(&[68, rng.below(3) as u8, 5]),
            _ => o.push(rng.next_u64() as u8),
        }
    }
    o.truncate(40);
    while o.len() % 4 != 0 {
        o.push(if rng.chance(50) { 0 } else { 1 });
    }
    o
}

fn random_bytes(rng: &mut Rng, n: u64) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// An IP header (with `protocol`, from `src` to `dst`) and `payload`.
fn ip_packet(
    rng: &mut Rng,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let options = if rng.chance(10) {
                random_options(rng)
            } else {
                Vec::new()
            };
            let ihl = 20 + options.len();
            let total = (ihl + payload.len()) as u16;
            // Don't-fragment mostly; sometimes none, or a fragment.
            let frags: u16 = *rng.pick(&[0x4000, 0x4000, 0x4000, 0, 0x2000, 0x0010, 0x2010]);
            let mut h = vec![0x40 | (ihl / 4) as u8, rng.next_u64() as u8];
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(&frags.to_be_bytes());
            h.extend_from_slice(&[ttl, protocol, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&options);
            let c = ipv4_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // Extension headers sometimes: hop-by-hop, routing, fragment,
            // destination options, up to six (past the walk's four).
            let mut chain = Vec::new();
            let mut kinds = Vec::new();
            if rng.chance(15) {
                for _ in 0..rng.below(7) {
                    kinds.push(*rng.pick(&[0u8, 43, 44, 60]));
                }
            }
            let first = kinds.first().copied().unwrap_or(protocol);
            for (i, _) in kinds.iter().enumerate() {
                let next = kinds.get(i + 1).copied().unwrap_or(protocol);
                chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
            }
            let payload_len = (chain.len() + payload.len()) as u16;
            let tc = rng.next_u64() as u8;
            let mut h = vec![
                0x60 | tc >> 4,
                tc << 4 | (rng.next_u64() as u8 & 0x0f),
                rng.next_u64() as u8,
                rng.next_u64() as u8,
            ];
            h.extend_from_slice(&payload_len.to_be_bytes());
            h.extend_from_slice(&[first, ttl]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&chain);
            h.extend_from_slice(payload);
            h
        }
        _ => unreachable!("one family"),
    }
}

/// A port: a VIP's, a well-known one, or any.
fn port(rng: &mut Rng) -> u16 {
    let any = rng.next_u64() as u16;
    *rng.pick(&[443, 53, 80, 0, any])
}

/// One frame: mostly well-formed, with one or two things bent.
pub fn frame(rng: &mut Rng, world: &World) -> Vec<u8> {
    let mut f = Vec::new();
    let dst_mac = match rng.below(10) {
        0 => [0xff; 6],
        1 => [0x01, 0x00, 0x5e, 0, 0, 5],
        2 => [0x02, 0, 0, 0, 0, rng.next_u64() as u8],
        _ => world.ingress_mac,
    };
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xa0]);
    let kind = rng.below(20);
    if kind == 0 {
        // ARP, LLDP or anything else.
        let kinds: [[u8; 2]; 3] = [[0x08, 0x06], [0x88, 0xcc], [0x12, 0x34]];
        let k: &[u8; 2] = rng.pick(&kinds);
        f.extend_from_slice(k);
        let n = rng.below(60);
        f.extend(random_bytes(rng, n));
        return f;
    }
    if kind == 1 {
        // Tagged junk: one tag or two, or cut short.
        let tags: [[u8; 2]; 2] = [[0x81, 0x00], [0x88, 0xa8]];
        let t: &[u8; 2] = rng.pick(&tags);
        f.extend_from_slice(t);
        let n = rng.below(60);
        f.extend(random_bytes(rng, n));
        return f;
    }
    let v4 = rng.chance(55);
    let src = address(rng, world, v4);
    let dst = address(rng, world, v4);
    let ttl = *rng.pick(&[0u8, 1, 2, 64, 64, 64, 255]);
    let payload_len = rng.below(80);
    let (protocol, l4) = match rng.below(20) {
        0..=7 => {
            let mut u = port(rng).to_be_bytes().to_vec();
            u.extend_from_slice(&port(rng).to_be_bytes());
            u.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend(random_bytes(rng, payload_len));
            (UDP, u)
        }
        8..=12 => {
            let mut t = port(rng).to_be_bytes().to_vec();
            t.extend_from_slice(&port(rng).to_be_bytes());
            t.extend(random_bytes(rng, 8));
            // Flags: SYN, ACK, SYN+ACK, anything.
            let any = rng.next_u64() as u8;
            t.extend_from_slice(&[0x50, *rng.pick(&[0x02, 0x10, 0x12, any])]);
            t.extend(random_bytes(rng, 6 + payload_len));
            (TCP, t)
        }
        13..=15 => {
            // An ICMP error quoting a packet from the destination (a VIP,
            // often) to somewhere, with its ports; or from elsewhere.
            let quoted_src = if rng.chance(75) {
                dst
            } else {
                address(rng, world, v4)
            };
            let client = address(rng, world, v4);
            let mut quoted_l4 = port(rng).to_be_bytes().to_vec();
            quoted_l4.extend_from_slice(&port(rng).to_be_bytes());
            quoted_l4.extend(random_bytes(rng, 4));
            let quoted_protocol = *rng.pick(&[UDP, TCP, TCP, ICMP]);
            let quoted = ip_packet(rng, quoted_src, client, quoted_protocol, 64, &quoted_l4);
            let kinds: &[u8] = if v4 {
                &[3, 11, 12, 8, 0, 5]
            } else {
                &[1, 2, 3, 4, 128, 135]
            };
            let mut m = vec![*rng.pick(kinds), rng.below(5) as u8, 0, 0, 0, 0, 0x05, 0xdc];
            m.extend_from_slice(&quoted);
            (if v4 { ICMP } else { ICMPV6 }, m)
        }
        16 => {
            let mut s = port(rng).to_be_bytes().to_vec();
            s.extend_from_slice(&port(rng).to_be_bytes());
            s.extend(random_bytes(rng, 8 + payload_len));
            (SCTP, s)
        }
        _ => {
            let any = rng.next_u64() as u8;
            let p = *rng.pick(&[ICMP, ICMPV6, 47, 4, 41, any]);
            (p, random_bytes(rng, 8 + payload_len))
        }
    };
    let packet = ip_packet(rng, src, dst, protocol, ttl, &l4);
    f.extend_from_slice(if v4 { &[0x08, 0x00] } else { &[0x86, 0xdd] });
    f.extend_from_slice(&packet);
    // Bend it: a wrong version or IHL, a wrong length, a damaged IPv4
    // header, padding, a cut, a big packet (past small MTUs).
    match rng.below(20) {
        0 => f[14] = (rng.next_u64() as u8) & 0xf0 | f[14] & 0x0f,
        1 if v4 => f[14] = 0x40 | rng.below(5) as u8,
        2 => {
            let at = if v4 { 16 } else { 18 };
            let v = rng.next_u64() as u16;
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            // The checksum made right again mostly, so that the length is
            // what is wrong.
            if v4 && rng.below(4) != 0 {
                crate::packets::fix_ipv4_checksum(&mut f);
            }
        }
        // A header damaged on the way: one byte of it changed, the
        // checksum left as it was.
        7 if v4 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let at = 14 + rng.below(ihl as u64) as usize;
            f[at] ^= 1 << rng.below(8);
        }
        3 => f.extend((0..rng.below(30)).map(|_| 0xee)),
        4 => {
            let cut = rng.below(f.len() as u64) as usize;
            f.truncate(cut);
        }
        5 | 6 => {
            let extra = 1000 + rng.below(600) as usize;
            f.extend((0..extra).map(|_| 0x55));
            if v4 {
                let total = f.len() - 14;
                f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
                crate::packets::fix_ipv4_checksum(&mut f);
            } else {
                let payload = f.len() - 14 - 40;
                f[18..20].copy_from_slice(&(payload as u16).to_be_bytes());
            }
        }
        _ => {}
    }
    // On a VLAN sometimes: one the box has (one tag, or two), or not.
    if rng.chance(12) && f.len() >= 14 {
        let tags: Vec<u8> = match rng.below(4) {
            0 => vec![0x81, 0x00, 0x00, 200],
            1 => vec![0x88, 0xa8, 0x00, 200, 0x81, 0x00, 0x01, 0x2c],
            2 => vec![0x81, 0x00, 0x20, 7],
            _ => vec![0x81, 0x00, 0x00, 5],
        };
        f.splice(12..12, tags);
    }
    f
}

/// A world to test in: `routes` IPv4 and IPv6 routes with targets of
/// every kind (gateways with and without a MAC, small MTUs, out of the
/// ingress, on VLANs, ECMP groups, connected subnets, kernel routes),
/// nested prefixes, local addresses, a deny list, VLANs on the ingress;
/// with `steering`, VIPs on nodes of every kind (direct server return out
/// of either interface, without a MAC, with a small MTU; IP-in-IP to
/// nodes behind every kind of route).
pub fn world(rng: &mut Rng, ingress: u32, egress: u32, routes: usize, steering: bool) -> World {
    let src_mac = [0x02, 0, 0, 0, 0, 0x11];
    let mut gateways = 0u32;
    // Each gateway its own (100.127.x.y, fd7f::x:y), so that each hop's
    // MAC, MTU and VLAN are its own.
    let mut hop = |rng: &mut Rng, v4: bool, kind: u64| -> Hop {
        gateways += 1;
        let gateway: IpAddr = if v4 {
            [100, 127, (gateways >> 8) as u8, gateways as u8].into()
        } else {
            let mut g = [0u8; 16];
            g[0] = 0xfd;
            g[1] = 0x7f;
            g[14] = (gateways >> 8) as u8;
            g[15] = gateways as u8;
            g.into()
        };
        let plain = Hop {
            ifindex: egress,
            tx_ifindex: egress,
            mtu: 1500,
            mac: Some([0x02, 0, 0, 0, 0, 0xc0]),
            src_mac,
            gateway,
            connected: false,
            vlan: None,
        };
        match kind {
            0 => Hop { mac: None, ..plain },
            1 => Hop {
                mtu: 576,
                mac: Some([0x02, 0, 0, 0, 0, 0xc1]),
                ..plain
            },
            2 => Hop {
                ifindex: ingress,
                tx_ifindex: ingress,
                mac: Some([0x02, 0, 0, 0, 0, 0xc2]),
                ..plain
            },
            // On VLAN 100 of the egress (802.1Q), or 101 of the ingress
            // (802.1ad): the subinterfaces' own ifindexes are made up,
            // the program sends on the parent.
            3 => Hop {
                ifindex: 900,
                vlan: Some((0x8100, 100)),
                mac: Some([0x02, 0, 0, 0, 0, 0xc3]),
                ..plain
            },
            4 => Hop {
                ifindex: 901,
                tx_ifindex: ingress,
                vlan: Some((0x88a8, 0x2065)),
                mac: Some([0x02, 0, 0, 0, 0, 0xc4]),
                ..plain
            },
            _ => Hop {
                mac: Some([0x02, 0, 0, 0, 0, 0xc0 + rng.below(8) as u8]),
                ..plain
            },
        }
    };
    // Connected subnets: one hop per interface and family (a connected
    // route's next hop is the interface itself).
    let connected = |v4: bool, on_vlan: bool| Hop {
        ifindex: if on_vlan { 902 } else { egress },
        tx_ifindex: egress,
        mtu: 1500,
        mac: None,
        src_mac,
        gateway: if v4 {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        },
        connected: true,
        vlan: on_vlan.then_some((0x8100, 102)),
    };
    let mut out: Vec<(Prefix, Target)> = Vec::new();
    let mut neighbours = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while out.len() < routes {
        let v4 = rng.chance(60);
        let prefix = if v4 {
            let len = *rng.pick(&[8u8, 12, 16, 20, 23, 24, 25, 28, 30, 32]);
            // Nested around a few bases, so that longer prefixes sit inside
            // shorter ones.
            let any = rng.next_u64() as u32;
            let base = *rng.pick(&[0x0a00_0000u32, 0xc633_6400, 0x6440_0000, any]);
            let a = (base | (rng.next_u64() as u32 & 0x00ff_ffff)) & (u32::MAX << (32 - len));
            Prefix::containing(IpAddr::from(a.to_be_bytes()), len).unwrap()
        } else {
            let len = *rng.pick(&[16u8, 20, 21, 32, 48, 56, 64, 96, 127, 128]);
            let any = u128::from(rng.next_u64()) << 64;
            let base = *rng.pick(&[0x2001_0db8u128 << 96, 0xfd00u128 << 112, any]);
            let a = (base | u128::from(rng.next_u64() as u32) << 64 | u128::from(rng.next_u64()))
                & (u128::MAX << (128 - u32::from(len)));
            Prefix::containing(IpAddr::from(a.to_be_bytes()), len).unwrap()
        };
        if !seen.insert(prefix) {
            continue;
        }
        let target = match rng.below(14) {
            0 => Target::Kernel,
            1..=3 => {
                let members = 2 + rng.below(3);
                Target::Group(
                    (0..members)
                        .map(|_| {
                            let kind = rng.below(8);
                            (hop(rng, v4, kind), 1 + rng.below(3) as u32)
                        })
                        .collect(),
                )
            }
            4 | 5 => {
                let h = connected(v4, rng.chance(30));
                // Some of its hosts are known neighbours.
                for _ in 0..3 {
                    let host = in_prefix(rng, &prefix);
                    if !neighbours
                        .iter()
                        .any(|(a, i, _)| *a == host && *i == h.ifindex)
                    {
                        neighbours.push((
                            host,
                            h.ifindex,
                            [0x02, 0, 0, 0, 0x0e, neighbours.len() as u8],
                        ));
                    }
                }
                Target::Hop(h)
            }
            k => Target::Hop(hop(rng, v4, k - 6)),
        };
        out.push((prefix, target));
    }
    let mut local: Vec<IpAddr> = ["10.0.0.1", "198.51.100.1", "2001:db8::1", "fd00::1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let mut vips = Vec::new();
    let mut nodes = Vec::new();
    let (mut encap_v4, mut encap_v6) = (None, None);
    if steering {
        // Routes to IP-in-IP nodes, one of each kind; 172.16.7.5 is this
        // box's own, 172.16.9.5 has no route.
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let node_routes = [
            (p("172.16.1.0/24"), Target::Hop(hop(rng, true, 7))),
            (p("172.16.2.0/24"), Target::Hop(hop(rng, true, 1))),
            (
                p("172.16.3.0/24"),
                Target::Group(vec![(hop(rng, true, 7), 1), (hop(rng, true, 2), 2)]),
            ),
            (p("172.16.4.0/24"), Target::Hop(hop(rng, true, 3))),
            (p("172.16.5.0/24"), Target::Kernel),
            (p("172.16.6.0/24"), Target::Hop(connected(true, false))),
            (p("172.16.8.0/24"), Target::Hop(hop(rng, true, 0))),
            (p("fd00:172:1::/48"), Target::Hop(hop(rng, false, 7))),
            (
                p("fd00:172:2::/48"),
                Target::Hop(Hop {
                    mtu: 1280,
                    ..hop(rng, false, 7)
                }),
            ),
            (p("fd00:172:3::/48"), Target::Hop(hop(rng, false, 2))),
        ];
        out.retain(|(p, _)| !node_routes.iter().any(|(q, _)| q == p));
        out.extend(node_routes);
        neighbours.push((
            "172.16.6.5".parse().unwrap(),
            egress,
            [0x02, 0, 0, 0, 0x0e, 0xff],
        ));
        local.push("172.16.7.5".parse().unwrap());
        let dsr = |ifindex, mac, mtu| Node::Dsr {
            ifindex,
            mac,
            src_mac,
            mtu,
        };
        let ipip = |a: &str| Node::Ipip {
            addr: a.parse().unwrap(),
        };
        nodes = vec![
            (0, dsr(egress, Some([0x02, 0, 0, 0, 0x0d, 0]), 1500)),
            (1, dsr(ingress, Some([0x02, 0, 0, 0, 0x0d, 1]), 1500)),
            (2, dsr(egress, None, 1500)),
            (3, dsr(egress, Some([0x02, 0, 0, 0, 0x0d, 3]), 576)),
            (4, dsr(egress, Some([0x02, 0, 0, 0, 0x0d, 4]), 0)),
            (10, ipip("172.16.1.5")),
            (11, ipip("172.16.2.5")),
            (12, ipip("172.16.3.5")),
            (13, ipip("172.16.4.5")),
            (14, ipip("172.16.5.5")),
            (15, ipip("172.16.6.5")),
            (16, ipip("172.16.7.5")),
            (17, ipip("172.16.8.5")),
            (18, ipip("172.16.9.5")),
            (20, ipip("fd00:172:1::5")),
            (21, ipip("fd00:172:2::5")),
            (22, ipip("fd00:172:3::5")),
            (23, ipip("fd00:172:9::5")),
        ];
        // Maglev tables (prime sizes) of nodes, empty entries and an id
        // no node has.
        let table = |rng: &mut Rng, ids: &[u32]| -> Vec<u32> {
            let size = *rng.pick(&[7usize, 13, 31]);
            (0..size)
                .map(|_| match rng.below(12) {
                    0 => maglev::NO_NODE,
                    1 => 77,
                    _ => *rng.pick(ids),
                })
                .collect()
        };
        let dsr_ids = [0, 1, 2, 3, 4];
        let v4_ids = [10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21];
        let v6_ids = [20, 21, 22, 23, 10, 0, 1];
        let vip = |a: &str, protocol, port, table| Vip {
            addr: a.parse().unwrap(),
            protocol,
            port,
            table,
        };
        vips = vec![
            vip("203.0.113.10", UDP, 0, table(rng, &dsr_ids)),
            vip("203.0.113.10", TCP, 443, table(rng, &dsr_ids)),
            vip("203.0.113.11", TCP, 0, table(rng, &v4_ids)),
            vip("203.0.113.11", UDP, 53, table(rng, &v4_ids)),
            vip("2001:db8:f::10", TCP, 0, table(rng, &dsr_ids)),
            vip("2001:db8:f::11", UDP, 0, table(rng, &v6_ids)),
            vip("2001:db8:f::11", TCP, 443, table(rng, &v6_ids)),
        ];
        encap_v4 = Some(if rng.chance(50) {
            ("192.0.2.0".parse().unwrap(), 24)
        } else {
            ("192.0.2.1".parse().unwrap(), 32)
        });
        encap_v6 = Some("2001:db8:e::1".parse().unwrap());
    }
    // A route to exactly a local address is refused (local addresses are
    // the box's): the world has none.
    out.retain(|(p, _)| {
        !local
            .iter()
            .any(|a| p.addr == *a && (p.len == 32 || p.len == 128))
    });
    let deny = vec![
        Deny::parse_line("source 100.64.0.0/10").unwrap(),
        Deny::parse_line("destination 10.9.0.0/16").unwrap(),
        Deny::parse_line("destination 198.51.100.77/32").unwrap(),
        Deny::parse_line("source 2001:db8:bad::/48").unwrap(),
        Deny::parse_line("destination fd00:dead::/32").unwrap(),
    ];
    World {
        ingress,
        ingress_mac: [0x02, 0, 0, 0, 0, 0x10],
        routes: out,
        local,
        deny,
        route_miss_drop: rng.chance(50),
        neighbours,
        vlans: vec![(200, 0), (200, 300), (7, 0)],
        vips,
        nodes,
        encap_v4,
        encap_v6,
        seed: rng.next_u64() as u32,
    }
}
