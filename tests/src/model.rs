//! A reference model of the routing data plane, written from README's
//! table of outcomes ("What it does with each packet"), not from the
//! program: given what the tables hold and one frame, what the program
//! must do (action, counter) and every byte of the frame it must send.
//!
//! It covers the routing path: Ethernet and VLAN tags, IPv4 and IPv6
//! header checks, the deny list, IPv4 options, link-scope and martian
//! addresses, this box's own addresses, TTL, the route lookup (longest
//! prefix), kernel routes, next hops with and without a MAC, the MTU, and
//! the rewrite. VIP steering, ECMP groups, connected subnets and the
//! kernel-FIB lookup are not modelled: the differential test runs with
//! none of them configured.
//!
//! And a structure-aware generator of frames for it, from a seed.

use std::net::IpAddr;

use pop_forwarder::{
    config::{Deny, DenyDirection},
    net::Prefix,
};
use pop_forwarder_common::Counter;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Where a route leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A gateway on interface `ifindex` with this MTU, its MAC known or
    /// not, frames leaving with source MAC `src_mac`.
    Hop {
        ifindex: u32,
        mtu: u32,
        mac: Option<[u8; 6]>,
        src_mac: [u8; 6],
    },
    /// A route the kernel must handle (blackhole and the like).
    Kernel,
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
}

/// What the program must do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub counter: Counter,
    /// The frame as it leaves (or is handed to the kernel).
    pub frame: Vec<u8>,
}

fn keep(frame: &[u8], action: u32, counter: Counter) -> Outcome {
    Outcome {
        action,
        counter,
        frame: frame.to_vec(),
    }
}

fn contains(p: &Prefix, addr: IpAddr) -> bool {
    let (a, b, bits) = match (p.addr, addr) {
        (IpAddr::V4(p), IpAddr::V4(a)) => (
            u128::from(u32::from(p)) << 96,
            u128::from(u32::from(a)) << 96,
            32,
        ),
        (IpAddr::V6(p), IpAddr::V6(a)) => (u128::from(p), u128::from(a), 128),
        _ => return false,
    };
    let _ = bits;
    if p.len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(p.len));
    a & mask == b & mask
}

/// Longest-prefix match over the routes.
fn lookup(world: &World, addr: IpAddr) -> Option<Target> {
    world
        .routes
        .iter()
        .filter(|(p, _)| contains(p, addr))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, t)| *t)
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

/// What README says the program does with `frame`.
pub fn expect(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 {
        return keep(frame, XDP_DROP, DropTruncated);
    }
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    // Tagged frames: no VLAN is configured, so every tag is unknown; a
    // tagged frame shorter than 22 bytes (two MACs, a tag, a type and the
    // room of a second tag) cannot be untagged and is dropped.
    if ether_type == 0x8100 || ether_type == 0x88a8 {
        if frame.len() < 22 {
            return keep(frame, XDP_DROP, DropTruncated);
        }
        return keep(frame, XDP_PASS, PassUnknownVlan);
    }
    let dst_mac: [u8; 6] = frame[..6].try_into().unwrap();
    if dst_mac[0] & 1 == 0 && dst_mac != world.ingress_mac {
        return keep(frame, XDP_PASS, PassNotForUs);
    }
    match ether_type {
        0x0800 => ipv4(world, frame),
        0x86dd => ipv6(world, frame),
        _ => keep(frame, XDP_PASS, PassNonIp),
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
fn options(header: &[u8]) -> Options {
    let mut at = 20;
    for _ in 0..4 {
        if at >= header.len() {
            return Options::Plain;
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

fn route<F: FnOnce(&mut Vec<u8>)>(
    world: &World,
    frame: &[u8],
    dst: IpAddr,
    ttl: u8,
    ip_len: usize,
    decrement: F,
) -> Outcome {
    use Counter::*;
    let target = lookup(world, dst);
    if world.local.contains(&dst) {
        return keep(frame, XDP_PASS, PassLocal);
    }
    if ttl <= 1 {
        return keep(frame, XDP_PASS, PassTtlExceeded);
    }
    let Some(target) = target else {
        return if world.route_miss_drop {
            keep(frame, XDP_DROP, DropRouteMiss)
        } else {
            keep(frame, XDP_PASS, PassRouteMiss)
        };
    };
    let Target::Hop {
        ifindex,
        mtu,
        mac,
        src_mac,
    } = target
    else {
        return keep(frame, XDP_PASS, PassKernelRoute);
    };
    let Some(mac) = mac else {
        return keep(frame, XDP_PASS, PassNoNeighbour);
    };
    if ip_len > mtu as usize {
        return keep(frame, XDP_PASS, PassTooBig);
    }
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&src_mac);
    decrement(&mut out);
    if ifindex == world.ingress {
        Outcome {
            action: XDP_TX,
            counter: ForwardedTx,
            frame: out,
        }
    } else {
        Outcome {
            action: XDP_REDIRECT,
            counter: Forwarded,
            frame: out,
        }
    }
}

fn ipv4(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 + 20 {
        return keep(frame, XDP_DROP, DropTruncated);
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return keep(frame, XDP_DROP, DropBadHeader);
    }
    if 14 + ihl > frame.len() {
        return keep(frame, XDP_DROP, DropTruncated);
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total < ihl || 14 + total > frame.len() {
        return keep(frame, XDP_DROP, DropBadLength);
    }
    let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
    let dst_octets: [u8; 4] = ip[16..20].try_into().unwrap();
    let dst = IpAddr::from(dst_octets);
    if denied(world, src, dst) {
        return keep(frame, XDP_DROP, DropDenied);
    }
    if ihl > 20 {
        match options(&ip[..ihl]) {
            Options::Plain => {}
            Options::SourceRoute => return keep(frame, XDP_DROP, DropSourceRouted),
            Options::Unknown => return keep(frame, XDP_PASS, PassIpOptions),
        }
    }
    if dst_octets[0] & 0xf0 == 0xe0 || dst_octets == [255; 4] {
        return keep(frame, XDP_PASS, PassLinkScope);
    }
    let s = ip[12];
    let src_octets: [u8; 4] = ip[12..16].try_into().unwrap();
    if src_octets == [0; 4] || s == 127 || s & 0xf0 == 0xe0 || src_octets == [255; 4] {
        return keep(frame, XDP_DROP, DropMartianSource);
    }
    let ttl = ip[8];
    route(world, frame, dst, ttl, total, |out| {
        let ip = &mut out[14..];
        let old = u16::from_be_bytes([ip[8], ip[9]]);
        ip[8] -= 1;
        let new = u16::from_be_bytes([ip[8], ip[9]]);
        let check = checksum_update(u16::from_be_bytes([ip[10], ip[11]]), old, new);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
    })
}

fn ipv6(world: &World, frame: &[u8]) -> Outcome {
    use Counter::*;
    if frame.len() < 14 + 40 {
        return keep(frame, XDP_DROP, DropTruncated);
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 6 {
        return keep(frame, XDP_DROP, DropBadHeader);
    }
    let total = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if 14 + total > frame.len() {
        return keep(frame, XDP_DROP, DropBadLength);
    }
    let src_octets: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst_octets: [u8; 16] = ip[24..40].try_into().unwrap();
    let (src, dst) = (IpAddr::from(src_octets), IpAddr::from(dst_octets));
    if denied(world, src, dst) {
        return keep(frame, XDP_DROP, DropDenied);
    }
    let link_local = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    if dst_octets[0] == 0xff || link_local(&dst_octets) || link_local(&src_octets) {
        return keep(frame, XDP_PASS, PassLinkScope);
    }
    let loopback = {
        let mut l = [0u8; 16];
        l[15] = 1;
        l
    };
    if src_octets[0] == 0xff || src_octets == [0; 16] || src_octets == loopback {
        return keep(frame, XDP_DROP, DropMartianSource);
    }
    let hop_limit = ip[7];
    route(world, frame, dst, hop_limit, total, |out| out[14 + 7] -= 1)
}

/// A small, fast, seedable generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// An address of `family` near the world's interesting ones: inside a
/// route (often at its edges), a local address, a deny-list prefix, a
/// link-scope or martian one, or anything.
fn address(rng: &mut Rng, world: &World, v4: bool) -> IpAddr {
    let in_prefix = |rng: &mut Rng, p: &Prefix| -> IpAddr {
        let (base, bits) = match p.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32u32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host_bits = bits - u32::from(p.len);
        let host = match rng.below(3) {
            0 => 0,
            1 if host_bits > 0 => u128::MAX >> (128 - host_bits),
            _ if host_bits > 0 => {
                (u128::from(rng.next()) << 64 | u128::from(rng.next()))
                    & (u128::MAX >> (128 - host_bits))
            }
            _ => 0,
        };
        let a = base | (host << (128 - bits));
        if bits == 32 {
            IpAddr::from(((a >> 96) as u32).to_be_bytes())
        } else {
            IpAddr::from(a.to_be_bytes())
        }
    };
    let routes: Vec<&Prefix> = world
        .routes
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.addr.is_ipv4() == v4)
        .collect();
    let deny: Vec<&Prefix> = world
        .deny
        .iter()
        .map(|d| &d.prefix)
        .filter(|p| p.addr.is_ipv4() == v4)
        .collect();
    let local: Vec<&IpAddr> = world.local.iter().filter(|a| a.is_ipv4() == v4).collect();
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
    match rng.below(10) {
        0..=4 if !routes.is_empty() => {
            let p = **rng.pick(&routes);
            in_prefix(rng, &p)
        }
        5 if !local.is_empty() => **rng.pick(&local),
        6 if !deny.is_empty() => {
            let p = **rng.pick(&deny);
            in_prefix(rng, &p)
        }
        7 => {
            if v4 {
                IpAddr::from(*rng.pick(&special_v4))
            } else {
                rng.pick(&special_v6).parse().unwrap()
            }
        }
        _ => {
            if v4 {
                IpAddr::from((rng.next() as u32).to_be_bytes())
            } else {
                IpAddr::from((u128::from(rng.next()) << 64 | u128::from(rng.next())).to_be_bytes())
            }
        }
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
            _ => o.push(rng.next() as u8),
        }
    }
    o.truncate(40);
    while o.len() % 4 != 0 {
        o.push(if rng.chance(50) { 0 } else { 1 });
    }
    o
}

/// One frame: mostly well-formed, with one or two things bent.
pub fn frame(rng: &mut Rng, world: &World) -> Vec<u8> {
    let mut f = Vec::new();
    let dst_mac = match rng.below(10) {
        0 => [0xff; 6],
        1 => [0x01, 0x00, 0x5e, 0, 0, 5],
        2 => [0x02, 0, 0, 0, 0, rng.next() as u8],
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
        f.extend((0..rng.below(60)).map(|_| rng.next() as u8));
        return f;
    }
    if kind == 1 {
        // Tagged: one tag or two, or cut short.
        let tags: [[u8; 2]; 2] = [[0x81, 0x00], [0x88, 0xa8]];
        let t: &[u8; 2] = rng.pick(&tags);
        f.extend_from_slice(t);
        f.extend((0..rng.below(60)).map(|_| rng.next() as u8));
        return f;
    }
    let v4 = rng.chance(55);
    let payload_len = rng.below(80) as usize;
    let src = address(rng, world, v4);
    let dst = address(rng, world, v4);
    let ttl = *rng.pick(&[0u8, 1, 2, 64, 255]);
    if v4 {
        f.extend_from_slice(&[0x08, 0x00]);
        let options = if rng.chance(15) {
            random_options(rng)
        } else {
            Vec::new()
        };
        let ihl = 20 + options.len();
        let total = ihl + 8 + payload_len;
        let mut h = vec![
            0x40 | (ihl / 4) as u8,
            rng.next() as u8,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            ttl,
            17,
            0,
            0,
        ];
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
            unreachable!()
        };
        h.extend_from_slice(&s.octets());
        h.extend_from_slice(&d.octets());
        h.extend_from_slice(&options);
        let c = ipv4_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&h);
    } else {
        f.extend_from_slice(&[0x86, 0xdd]);
        let payload = (8 + payload_len) as u16;
        f.extend_from_slice(&[0x60, rng.next() as u8, 0, 0]);
        f.extend_from_slice(&payload.to_be_bytes());
        f.extend_from_slice(&[17, ttl]);
        let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
            unreachable!()
        };
        f.extend_from_slice(&s.octets());
        f.extend_from_slice(&d.octets());
    }
    // UDP header and payload.
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|_| rng.next() as u8));
    // Bend it: a wrong version or IHL, a wrong length, padding, a cut.
    match rng.below(12) {
        0 => f[14] = (rng.next() as u8) & 0xf0 | f[14] & 0x0f,
        1 if v4 => f[14] = 0x40 | rng.below(5) as u8,
        2 => {
            let at = if v4 { 16 } else { 18 };
            let v = rng.next() as u16;
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
        3 => f.extend((0..rng.below(30)).map(|_| 0xee)),
        4 => {
            let cut = rng.below(f.len() as u64) as usize;
            f.truncate(cut);
        }
        5 if v4 => {
            // A big packet: past small MTUs.
            let extra = 1000 + rng.below(600) as usize;
            f.extend((0..extra).map(|_| 0x55));
            let total = f.len() - 14;
            f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        }
        6 if !v4 => {
            let extra = 1000 + rng.below(600) as usize;
            f.extend((0..extra).map(|_| 0x55));
            let payload = f.len() - 14 - 40;
            f[18..20].copy_from_slice(&(payload as u16).to_be_bytes());
        }
        _ => {}
    }
    f
}

/// A world to test in: `routes` IPv4 and IPv6 routes with next hops of
/// every kind (MAC known or not, small MTUs, out of the ingress, kernel
/// routes), nested prefixes, local addresses and a deny list.
pub fn world(rng: &mut Rng, ingress: u32, egress: u32, routes: usize) -> World {
    let src_mac = [0x02, 0, 0, 0, 0, 0x11];
    let mut out: Vec<(Prefix, Target)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while out.len() < routes {
        let v4 = rng.chance(60);
        let prefix = if v4 {
            let len = *rng.pick(&[8u8, 12, 16, 20, 23, 24, 25, 28, 30, 32]);
            // Nested around a few bases, so that longer prefixes sit inside
            // shorter ones.
            let any = rng.next() as u32;
            let base = *rng.pick(&[0x0a00_0000u32, 0xc633_6400, 0x6440_0000, any]);
            let a = (base | (rng.next() as u32 & 0x00ff_ffff))
                & if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Prefix::containing(IpAddr::from(a.to_be_bytes()), len).unwrap()
        } else {
            let len = *rng.pick(&[16u8, 32, 48, 56, 64, 96, 127, 128]);
            let any = u128::from(rng.next()) << 64;
            let base = *rng.pick(&[0x2001_0db8u128 << 96, 0xfd00u128 << 112, any]);
            let a = (base | u128::from(rng.next() as u32) << 64 | u128::from(rng.next()))
                & if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
            Prefix::containing(IpAddr::from(a.to_be_bytes()), len).unwrap()
        };
        if !seen.insert(prefix) {
            continue;
        }
        let target = match rng.below(10) {
            0 => Target::Kernel,
            1 => Target::Hop {
                ifindex: egress,
                mtu: 1500,
                mac: None,
                src_mac,
            },
            2 => Target::Hop {
                ifindex: egress,
                mtu: 576,
                mac: Some([0x02, 0, 0, 0, 0, 0xc1]),
                src_mac,
            },
            3 => Target::Hop {
                ifindex: ingress,
                mtu: 1500,
                mac: Some([0x02, 0, 0, 0, 0, 0xc2]),
                src_mac,
            },
            _ => Target::Hop {
                ifindex: egress,
                mtu: 1500,
                mac: Some([0x02, 0, 0, 0, 0, 0xc0]),
                src_mac,
            },
        };
        out.push((prefix, target));
    }
    let local: Vec<IpAddr> = vec![
        "10.0.0.1".parse().unwrap(),
        "198.51.100.1".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
        "fd00::1".parse().unwrap(),
    ];
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
    }
}
