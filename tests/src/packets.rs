//! Packet builders for the program tests, on top of etherparse, so that no
//! test hand-writes hex.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, PacketBuilderStep, UdpHeader};
use pop_forwarder_common::checksum;

pub const ETH_LEN: usize = 14;

#[derive(Clone, Copy, Debug)]
pub struct Eth {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

/// An Ethernet + IPv4 + UDP frame.
pub fn udp_v4(eth: Eth, src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, payload: &[u8]) -> Vec<u8> {
    udp_frame(
        PacketBuilder::ethernet2(eth.src, eth.dst)
            .ipv4(src.octets(), dst.octets(), ttl)
            .udp(40000, 9999),
        payload,
    )
}

/// An Ethernet + IPv6 + UDP frame.
pub fn udp_v6(eth: Eth, src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    udp_frame(
        PacketBuilder::ethernet2(eth.src, eth.dst)
            .ipv6(src.octets(), dst.octets(), hop_limit)
            .udp(40000, 9999),
        payload,
    )
}

/// The frame a UDP packet builder makes around `payload`.
fn udp_frame(builder: PacketBuilderStep<UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("building a test packet");
    out
}

/// Inserts IPv4 options (padded with End-of-Options to a multiple of four)
/// into an IPv4 frame, fixing IHL, total length and header checksum. The
/// UDP checksum does not cover options, so it stays right.
pub fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = (20 + opts.len()) / 4;
    assert!(ihl <= 15, "IPv4 options too long");
    let mut out = frame[..ETH_LEN + 20].to_vec();
    out.extend_from_slice(&opts);
    out.extend_from_slice(&frame[ETH_LEN + 20..]);
    let ip = &mut out[ETH_LEN..];
    ip[0] = 0x40 | ihl as u8;
    let total = u16::from_be_bytes([ip[2], ip[3]]) + opts.len() as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Recomputes the IPv4 header checksum of a frame in place.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let header = &mut frame[ETH_LEN..ETH_LEN + ihl];
    let c = checksum::ipv4_header(header);
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// What a router should make of `frame`: MACs replaced, TTL / hop limit one
/// lower and, for IPv4, the header checksum recomputed from scratch (the
/// program updates it incrementally; the two must agree).
pub fn forwarded(frame: &[u8], eth: Eth) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&eth.dst);
    out[6..12].copy_from_slice(&eth.src);
    match u16::from_be_bytes([out[12], out[13]]) {
        0x0800 => {
            out[ETH_LEN + 8] -= 1;
            fix_ipv4_checksum(&mut out);
        }
        0x86dd => out[ETH_LEN + 7] -= 1,
        other => panic!("not an IP frame: ethertype {other:#x}"),
    }
    out
}

/// An Ethernet + IPv4/IPv6 + UDP or TCP frame with the ports given.
pub fn flow_frame(
    eth: Eth,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    tcp: bool,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let base = PacketBuilder::ethernet2(eth.src, eth.dst);
    let ip = match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => base.ipv4(s.octets(), d.octets(), 64),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => base.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    };
    let payload = b"pop-forwarder flow";
    if !tcp {
        return udp_frame(ip.udp(sport, dport), payload);
    }
    let mut out = Vec::new();
    ip.tcp(sport, dport, 1, 65535)
        .write(&mut out, payload)
        .expect("building a test packet");
    out
}
