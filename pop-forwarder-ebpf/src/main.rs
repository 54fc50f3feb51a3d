//! The pop-forwarder XDP program: parse, classify, look up, rewrite, send.
//!
//! Every packet leaves through exactly one `Verdict`, and every verdict bumps
//! one `Counter`; nothing is dropped or passed without being counted.
#![no_std]
#![no_main]

mod deny;
mod fib;
mod kernel_events;
mod maps;
mod packet;
mod steer;
mod vlan;

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::bpf_xdp_load_bytes,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::{debug, warn};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use pop_forwarder_common::{Counter, LOCAL_NEXT_HOP, checksum, maglev::address_words};

use crate::{
    maps::{
        Hop, RouteFlow, count, count_interface, egress, for_this_interface, lookup_route_v4,
        lookup_route_v6, next_hop_for, route_miss, traffic,
    },
    packet::{copy_mac, pair_at, ptr_at, widen, words_at},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// What happens to a packet and which counter says so.
struct Verdict {
    action: u32,
    counter: Counter,
}

const fn pass(counter: Counter) -> Verdict {
    Verdict {
        action: xdp_action::XDP_PASS,
        counter,
    }
}

const fn drop(counter: Counter) -> Verdict {
    Verdict {
        action: xdp_action::XDP_DROP,
        counter,
    }
}

#[xdp]
pub fn pop_forwarder(ctx: XdpContext) -> u32 {
    // The `upgrade-test` build (the tests crate's second object) differs
    // from the shipped one by this check, which no real frame meets: its
    // instructions, and so its kernel tag, differ, and the upgrade test
    // swaps it in under traffic.
    #[cfg(feature = "upgrade-test")]
    if ctx.data() >= ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let received = (ctx.data_end() - ctx.data()) as u64;
    // Read once: each read is three dependent loads (the context's queue,
    // its device, the device's ifindex).
    let ifindex = ctx.ingress_ifindex() as u32;
    // Tags come off first and go back on if the kernel gets the frame.
    let tags = match vlan::pop(&ctx) {
        Ok(tags) => tags,
        Err(()) => {
            count(Counter::DropTruncated);
            count_interface(ifindex, received, xdp_action::XDP_DROP);
            return xdp_action::XDP_DROP;
        }
    };
    let mut verdict = match tags {
        Some(tags) if !vlan::known(ifindex, &tags) => pass(Counter::PassUnknownVlan),
        _ => classify_and_forward(&ctx, ifindex),
    };
    // The tags go back on for the kernel, and on an ICMP answer sent back
    // out of the ingress: its client is on that VLAN.
    if let Some(tags) = tags
        && (verdict.action == xdp_action::XDP_PASS || verdict.counter == Counter::IcmpTooBig)
        && !vlan::restore(&ctx, tags)
    {
        verdict = drop(Counter::DropTruncated);
    }
    count(verdict.counter);
    count_interface(ifindex, received, verdict.action);
    // Log records cost a ring-buffer write each; the loader sets the level
    // (`run --bpf-log-level`, warn by default), below which these are one
    // load and a branch.
    match verdict.counter {
        Counter::DropTruncated | Counter::DropBadHeader | Counter::DropBadLength => {
            debug!(
                &ctx,
                "ifindex {}: dropped malformed packet ({})",
                ctx.ingress_ifindex() as u32,
                verdict.counter.name()
            );
        }
        Counter::PassNoNextHop => {
            warn!(
                &ctx,
                "ifindex {}: a route points at a free next-hop slot",
                ctx.ingress_ifindex() as u32
            );
        }
        _ => {}
    }
    verdict.action
}

#[inline(always)]
fn classify_and_forward(ctx: &XdpContext, ifindex: u32) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(Counter::DropTruncated);
    };
    // A unicast frame for another host's MAC is not for this box to route
    // or steer (RFC 1812 5.3.4 and what Linux does): the kernel drops it.
    // SAFETY: ptr_at checked that the header lies inside the packet; the
    // frame starts on an even address (`words_at`).
    if unsafe { (*eth).dst_addr[0] & 1 == 0 && !for_this_interface(ifindex, &(*eth).dst_addr) } {
        return pass(Counter::PassNotForUs);
    }
    // SAFETY: as above.
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => forward_v4(ctx, eth),
        ETH_P_IPV6 => forward_v6(ctx, eth),
        _ => pass(Counter::PassNonIp),
    }
}

#[inline(always)]
fn forward_v4(ctx: &XdpContext, eth: *mut EthHdr) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return drop(Counter::DropTruncated);
    };
    let frame_len = ctx.data_end() - ctx.data();
    // SAFETY: `ip` is inside the packet (ptr_at), and so is every field read
    // and written below; options (IHL > 5) are never touched, only skipped.
    let ip = unsafe { &mut *ip };
    if ip.version() != 4 {
        return drop(Counter::DropBadHeader);
    }
    let header_len = usize::from(ip.ihl());
    if header_len < Ipv4Hdr::LEN {
        return drop(Counter::DropBadHeader);
    }
    if EthHdr::LEN + header_len > frame_len {
        return drop(Counter::DropTruncated);
    }
    // RFC 1812 5.2.2: a router checks the header checksum and silently
    // drops a packet whose checksum is wrong, as Linux does: a header
    // damaged on the way (a flipped destination bit) would otherwise be
    // routed where it never meant to go.
    if !header_checksum_ok(ctx, ip) {
        return drop(Counter::DropBadHeader);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if total_len < header_len || EthHdr::LEN + total_len > frame_len {
        return drop(Counter::DropBadLength);
    }
    // The deny list before any other lookup: the first line against a
    // flood.
    if deny::denied_v4(ip.src_addr, ip.dst_addr, frame_len as u64) {
        return drop(Counter::DropDenied);
    }
    if header_len > Ipv4Hdr::LEN {
        match options_v4(ctx, header_len) {
            Options::Plain => {}
            Options::SourceRoute => return drop(Counter::DropSourceRouted),
            Options::Unknown => return pass(Counter::PassIpOptions),
        }
    }

    // The addresses as two 16-bit loads each, not four byte loads.
    // SAFETY: the header's 20 bytes, inside the packet, at an even address
    // (`words_at`).
    let (src, dst) = unsafe {
        let w = &*words_at::<10>(ip as *const Ipv4Hdr as *const u8);
        (address_v4(w[6], w[7]), address_v4(w[8], w[9]))
    };
    // Multicast (224/4) and limited broadcast are link-scope: routing
    // protocols, DHCP and the like belong to the kernel.
    if dst[0] & 0xf0 == 0xe0 || dst == [255; 4] {
        return pass(Counter::PassLinkScope);
    }
    // Martian sources, which Linux forwards none of: unspecified,
    // loopback, multicast, limited broadcast. (The rest of 0/8, and 240/4,
    // are unicast, as in Linux since 5.3.)
    if src == [0; 4] || src[0] == 127 || src[0] & 0xf0 == 0xe0 || src == [255; 4] {
        return drop(Counter::DropMartianSource);
    }
    // A VIP is looked up before the routes. Fragments after the first carry
    // no ports (RFC 791: a non-zero offset); so that every fragment of a
    // datagram goes to one node, the first (more-fragments set) is read
    // without its ports too: fragments hash by addresses and match only
    // any-port VIPs.
    if steer::enabled() {
        let fragment = u16::from_be_bytes(ip.frags) & 0x3fff != 0;
        let mut flow = steer::Flow {
            family: 4,
            src: widen(src),
            dst: widen(dst),
            protocol: ip.proto,
            l4_offset: (!fragment).then_some(EthHdr::LEN + header_len),
            frame_len,
            ip_len: total_len,
            tos: ip.tos,
            ports: None,
        };
        if let Some(verdict) = steer::steer(ctx, eth, &mut flow) {
            return verdict;
        }
    }
    if fib::enabled() {
        if ip.ttl <= 1 {
            return pass(Counter::PassTtlExceeded);
        }
        return fib::forward_v4(ctx, eth, ip, total_len);
    }
    // One lookup answers both "is it ours?" (this box's addresses are /32
    // routes to LOCAL_NEXT_HOP) and "where to?".
    let route = lookup_route_v4(dst);
    if route == Some(LOCAL_NEXT_HOP) {
        return pass(Counter::PassLocal);
    }
    // RFC 1812 5.3.1: a router must not forward a packet whose TTL would
    // reach zero; the kernel sends the ICMP time exceeded.
    if ip.ttl <= 1 {
        return pass(Counter::PassTtlExceeded);
    }
    let Some(target) = route else {
        return route_miss();
    };
    let flow = RouteFlow::V4 {
        src,
        dst,
        protocol: ip.proto,
        l4: (u16::from_be_bytes(ip.frags) & 0x3fff == 0).then_some(EthHdr::LEN + header_len),
    };
    let hop = match next_hop_for(ctx, target, &flow) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    if let Err(verdict) = hop.fits(total_len) {
        return verdict;
    }
    let verdict = match egress(ctx, hop.next_hop.tx_ifindex) {
        Ok(verdict) => verdict,
        Err(verdict) => return verdict,
    };

    decrement_ttl(ip);
    rewrite_l2(ctx, eth, &hop, frame_len)
        .map(|()| verdict)
        .unwrap_or(pass(Counter::PassNoEgress))
}

/// One less TTL, and the header checksum updated for it (RFC 1624); the
/// caller has checked the TTL is above 1. On the words as they lie in
/// memory (`checksum::after_ttl_decrement_ne`).
#[inline(always)]
pub(crate) fn decrement_ttl(ip: &mut Ipv4Hdr) {
    // SAFETY: the header's 20 bytes, inside the packet, at an even address
    // (`words_at`).
    unsafe {
        let words = words_at::<10>(ip as *mut Ipv4Hdr as *const u8);
        let ttl_protocol = (*words)[4];
        (*words)[5] = checksum::after_ttl_decrement_ne((*words)[5], ttl_protocol);
        (*words)[4] = ttl_protocol.wrapping_sub(u16::from_ne_bytes([1, 0]));
    }
}

/// An IPv4 address from its two 16-bit words as they lie in memory.
#[inline(always)]
fn address_v4(hi: u16, lo: u16) -> [u8; 4] {
    let [a, b] = hi.to_ne_bytes();
    let [c, d] = lo.to_ne_bytes();
    [a, b, c, d]
}

/// Room for an IPv4 header's options (at most 40 bytes), per CPU: they
/// are copied out of the packet to be summed (see `header_checksum_ok`).
#[map]
static OPTIONS_SCRATCH: PerCpuArray<[u8; 40]> = PerCpuArray::with_max_entries(1, 0);

/// Whether the IPv4 header at `ip`, with its options (all inside the
/// frame: checked by the caller), sums to 0xffff (RFC 1071).
#[inline(always)]
fn header_checksum_ok(ctx: &XdpContext, ip: &Ipv4Hdr) -> bool {
    // Summed as the words lie in memory: the sum is then byte-swapped
    // (on this little-endian target), and 0xffff swapped is 0xffff.
    // SAFETY: the header's 20 bytes, inside the packet, at an even address
    // (`words_at`).
    let mut sum = checksum::sum_ne(unsafe { &*words_at::<10>(ip as *const Ipv4Hdr as *const u8) });
    // Options, rare, are copied out (bpf_xdp_load_bytes) into zeros and
    // summed whole. Read in place they would take a bounds check each at
    // an offset that depends on their length, and the verifier would walk
    // the rest of the program once for each length (past its limit). Their
    // length comes from IHL read again from the packet: a fresh value, so
    // that what the checks here prove of it stays here, and the verifier
    // sees it is at most 40 bytes.
    // SAFETY: a byte of the header, inside the packet.
    let ihl = u32::from(unsafe { core::ptr::read_volatile(&ip.vihl) } & 0x0f);
    if ihl > 5 {
        let Some(buf) = OPTIONS_SCRATCH.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: this CPU's slot; XDP runs with preemption off. The
        // helper writes at most (15 - 5) * 4 = 40 bytes.
        let copied = unsafe {
            *buf = [0; 40];
            bpf_xdp_load_bytes(
                ctx.ctx,
                (EthHdr::LEN + Ipv4Hdr::LEN) as u32,
                buf as *mut c_void,
                (ihl - 5) * 4,
            )
        };
        if copied != 0 {
            return false;
        }
        // SAFETY: as above; a map value starts on 8 bytes, and the
        // options' length is a multiple of four.
        sum += checksum::sum_ne(unsafe { &*words_at::<20>(buf as *const u8) });
    }
    checksum::fold(sum) == 0xffff
}

/// What an IPv4 header's options (IHL > 5) hold, as far as forwarding is
/// concerned.
enum Options {
    /// Nothing that stops forwarding (they are forwarded as they are).
    Plain,
    /// A loose or strict source route (LSRR 131, SSRR 137).
    SourceRoute,
    /// More than the program walks through, or malformed: the kernel's.
    Unknown,
}

/// Walks the options (RFC 791): end of list (0) and no-operation (1) are
/// one byte, every other option has a length. At most four options are
/// walked (the verifier explores each path through the walk, and real
/// traffic carries one or two: router alert, record route, timestamps);
/// more, a malformed one, or one whose kind and length cannot be read as a
/// pair (a last byte with nothing after it in the frame) are the kernel's.
#[inline(always)]
fn options_v4(ctx: &XdpContext, header_len: usize) -> Options {
    const LSRR: u8 = 131;
    const SSRR: u8 = 137;
    let end = EthHdr::LEN + header_len;
    let mut at = EthHdr::LEN + Ipv4Hdr::LEN;
    for _ in 0..4 {
        if at >= end {
            return Options::Plain;
        }
        let Some([kind, len]) = pair_at(ctx, at) else {
            return Options::Unknown;
        };
        match kind {
            0 => return Options::Plain,
            1 => at += 1,
            LSRR | SSRR => return Options::SourceRoute,
            _ => {
                let len = usize::from(len);
                if len < 2 || at + len > end {
                    return Options::Unknown;
                }
                at += len;
            }
        }
    }
    if at >= end {
        Options::Plain
    } else {
        Options::Unknown
    }
}

/// The upper-layer protocol of an IPv6 packet behind at most four extension
/// headers (hop-by-hop, routing, destination options, fragment) and the
/// offset of its header; no offset behind a fragment header, so that every
/// fragment of a datagram hashes alike, by addresses. A chain longer than
/// that, or cut short, leaves an extension header as the protocol, which
/// no VIP has: such packets are routed.
#[inline(always)]
fn upper_layer_v6(ctx: &XdpContext, first: u8) -> (u8, Option<usize>) {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DEST_OPTS: u8 = 60;
    let mut next = first;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = false;
    for _ in 0..4 {
        if !matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS) {
            break;
        }
        let Some(header) = ptr_at::<[u8; 2]>(ctx, offset) else {
            return (next, None);
        };
        // SAFETY: ptr_at checked the two bytes lie inside the packet.
        let [following, len] = unsafe { *header };
        if next == FRAGMENT {
            fragment = true;
            offset += 8;
        } else {
            offset += (usize::from(len) + 1) * 8;
        }
        next = following;
    }
    (next, (!fragment).then_some(offset))
}

#[inline(always)]
fn forward_v6(ctx: &XdpContext, eth: *mut EthHdr) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return drop(Counter::DropTruncated);
    };
    let frame_len = ctx.data_end() - ctx.data();
    // SAFETY: `ip` is inside the packet (ptr_at).
    let ip = unsafe { &mut *ip };
    if ip.version() != 6 {
        return drop(Counter::DropBadHeader);
    }
    let total_len = Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(ip.payload_len));
    if EthHdr::LEN + total_len > frame_len {
        return drop(Counter::DropBadLength);
    }
    if deny::denied_v6(&ip.src_addr, &ip.dst_addr, frame_len as u64) {
        return drop(Counter::DropDenied);
    }

    // The addresses are read in place: 16-byte copies on the stack cost
    // room the program does not have.
    // Multicast (ff00::/8) carries neighbour discovery and router
    // advertisements; link-local (fe80::/10) addresses, as source or
    // destination, must not be forwarded (RFC 4291 2.5.6).
    if ip.dst_addr[0] == 0xff || is_link_local_v6(&ip.dst_addr) || is_link_local_v6(&ip.src_addr) {
        return pass(Counter::PassLinkScope);
    }
    // Martian sources: unspecified, loopback, multicast.
    let src_words = address_words(&ip.src_addr);
    if ip.src_addr[0] == 0xff || src_words == [0; 2] || src_words == LOOPBACK_V6_WORDS {
        return drop(Counter::DropMartianSource);
    }
    if steer::enabled() {
        let (protocol, l4_offset) = upper_layer_v6(ctx, ip.next_hdr);
        let mut flow = steer::Flow {
            family: 6,
            src: ip.src_addr,
            dst: ip.dst_addr,
            protocol,
            l4_offset,
            frame_len,
            ip_len: total_len,
            tos: ip.vcf[0] << 4 | ip.vcf[1] >> 4,
            ports: None,
        };
        if let Some(verdict) = steer::steer(ctx, eth, &mut flow) {
            return verdict;
        }
    }
    if fib::enabled() {
        if ip.hop_limit <= 1 {
            return pass(Counter::PassTtlExceeded);
        }
        return fib::forward_v6(ctx, eth, ip, total_len);
    }
    let route = lookup_route_v6(&ip.dst_addr);
    if route == Some(LOCAL_NEXT_HOP) {
        return pass(Counter::PassLocal);
    }
    // RFC 8200 3: a hop limit of 1 cannot be decremented and forwarded.
    if ip.hop_limit <= 1 {
        return pass(Counter::PassTtlExceeded);
    }
    let Some(target) = route else {
        return route_miss();
    };
    let flow = RouteFlow::V6 {
        header: ip as *const Ipv6Hdr,
        extra: u64::from(ip.flow_label()) << 8 | u64::from(ip.next_hdr),
    };
    let hop = match next_hop_for(ctx, target, &flow) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    if let Err(verdict) = hop.fits(total_len) {
        return verdict;
    }
    let verdict = match egress(ctx, hop.next_hop.tx_ifindex) {
        Ok(verdict) => verdict,
        Err(verdict) => return verdict,
    };

    ip.hop_limit -= 1;
    rewrite_l2(ctx, eth, &hop, frame_len)
        .map(|()| verdict)
        .unwrap_or(pass(Counter::PassNoEgress))
}

/// An IPv4 address in the 16-byte form flows and VIPs use.

/// ::1 as `address_words` reads it.
const LOOPBACK_V6_WORDS: [u64; 2] =
    address_words(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

#[inline(always)]
fn is_link_local_v6(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// Rewrites the Ethernet header for the hop (pushing its VLAN tag, if it
/// has one: the last write, every packet pointer is stale after it) and
/// counts the packet against its next hop. None if the tag found no room
/// (never with XDP's headroom): the frame is then the kernel's.
#[inline(always)]
fn rewrite_l2(ctx: &XdpContext, eth: *mut EthHdr, hop: &Hop, frame_len: usize) -> Option<()> {
    let nh = hop.next_hop;
    if nh.vlan_proto != 0 {
        // SAFETY: the MACs are map values' fields, at even addresses.
        if !unsafe { vlan::push(ctx, hop.dst_mac, &nh.src_mac, nh.vlan_proto, nh.vlan_tci) } {
            return None;
        }
    } else {
        // SAFETY: `eth` was bounds-checked by ptr_at in classify_and_forward;
        // the MACs are at even addresses (`copy_mac`).
        unsafe {
            copy_mac(&mut (*eth).dst_addr, hop.dst_mac);
            copy_mac(&mut (*eth).src_addr, &nh.src_mac);
        }
    }
    traffic(hop.id, frame_len as u64);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
