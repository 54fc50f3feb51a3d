//! Bare redirect: every frame to devmap slot 0, no parsing, no lookup. The
//! ceiling of the XDP redirect path that pop-forwarder's routing is
//! measured against. And bare XDP_TX, the ceiling of the paths that answer
//! out of the ingress. And a floor router: the least an IPv4 router with a
//! DIR-24-8 table does (see `bench_route`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, xdp_action},
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};
use pop_forwarder_common::{
    checksum,
    dir24::{self, TBL8_ENTRIES, TBL24_ENTRIES, Tbl24},
};

#[map]
static REDIRECT_PORT: DevMap = DevMap::with_max_entries(1, 0);

#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    match REDIRECT_PORT.redirect(0, u64::from(xdp_action::XDP_ABORTED)) {
        Ok(action) | Err(action) => action,
    }
}

/// Bare XDP_TX: every frame back out of the interface it came in on. The
/// ceiling of paths answered out of the ingress (IP-in-IP steering with
/// XDP_TX, as Katran does).
#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The floor router's DIR-24-8 tables, laid out and allocated as
/// pop-forwarder's (`dir24`: two u32 entries to a u64 element; mappable,
/// which is how the kernel allocates them).
#[map]
static FLOOR_TBL24: Array<u64> = Array::with_max_entries(
    TBL24_ENTRIES / dir24::ENTRIES_PER_ELEMENT,
    BPF_F_MMAPABLE as u32,
);
#[map]
static FLOOR_TBL8: Array<u64> = Array::with_max_entries(
    TBL8_ENTRIES / dir24::ENTRIES_PER_ELEMENT,
    BPF_F_MMAPABLE as u32,
);
/// Its next hops, by id: the destination and source MACs as six 16-bit
/// words as they lie in the frame, then the `REDIRECT_PORT` slot.
#[map]
static FLOOR_HOPS: Array<[u16; 8]> = Array::with_max_entries(256, 0);

/// The floor router: what RFC 1812 asks of any IPv4 forwarder with a
/// DIR-24-8 table, and nothing more. An untagged IPv4 frame without
/// options, whose total length fits the frame, whose header checksum is
/// right (RFC 1812 5.2.2: a router MUST verify it) and whose TTL is above
/// 1, is looked up (tbl24, then tbl8 if the /24 is cut up), gets its next
/// hop's MACs, one less TTL with the checksum updated (RFC 1624), and is
/// redirected; with the same arithmetic as pop-forwarder (`checksum`,
/// `dir24`). Everything else goes to the kernel, and a miss is dropped.
/// Left out, as pop-forwarder does them: VLANs, IPv4 options, IPv6, the
/// deny list, martian and link-scope checks, this box's own addresses,
/// VIPs, the MTU, counters, and what the daemon's settings choose. The
/// bench runs it beside pop-forwarder on the same table and traffic: the
/// rate no router with this table reaches past on this lab.
#[xdp]
pub fn bench_route(ctx: XdpContext) -> u32 {
    route(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn route(ctx: &XdpContext) -> Option<u32> {
    const ETH: usize = 14;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH + 20 > end {
        return None;
    }
    // The frame starts on 8 bytes (XDP headroom) and the IPv4 header 14
    // bytes in: every 16-bit word read here is aligned.
    let eth = start as *mut [u16; 7];
    let ip = (start + ETH) as *mut [u16; 10];
    // SAFETY: 34 bytes inside the frame, checked above.
    unsafe {
        if (*eth)[6] != 0x0800u16.to_be() || (*ip)[0].to_ne_bytes()[0] != 0x45 {
            return None;
        }
        let total = usize::from(u16::from_be((*ip)[1]));
        if total < 20 || start + ETH + total > end {
            return None;
        }
        if checksum::fold(checksum::sum_ne(&*ip)) != 0xffff {
            return Some(xdp_action::XDP_DROP);
        }
        let ttl_protocol = (*ip)[4];
        if ttl_protocol.to_ne_bytes()[0] <= 1 {
            return None;
        }
        let [a, b] = (*ip)[8].to_ne_bytes();
        let [c, d] = (*ip)[9].to_ne_bytes();
        let addr = u32::from_be_bytes([a, b, c, d]);
        let i = dir24::tbl24_index(addr);
        let hop = match dir24::tbl24_step(
            dir24::entry_in(*FLOOR_TBL24.get(dir24::element_of(i))?, i),
            addr,
        ) {
            Tbl24::NextHop(nh) => nh,
            Tbl24::Tbl8(j) => {
                let Some(nh) =
                    dir24::tbl8_step(dir24::entry_in(*FLOOR_TBL8.get(dir24::element_of(j))?, j))
                else {
                    return Some(xdp_action::XDP_DROP);
                };
                nh
            }
            Tbl24::Miss => return Some(xdp_action::XDP_DROP),
        };
        let hop = FLOOR_HOPS.get(hop)?;
        (*ip)[5] = checksum::after_ttl_decrement_ne((*ip)[5], ttl_protocol);
        (*ip)[4] = ttl_protocol.wrapping_sub(u16::from_ne_bytes([1, 0]));
        for k in 0..6 {
            (*eth)[k] = hop[k];
        }
        Some(
            match REDIRECT_PORT.redirect(u32::from(hop[6]), u64::from(xdp_action::XDP_ABORTED)) {
                Ok(action) | Err(action) => action,
            },
        )
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
