//! Bare redirect: every frame to devmap slot 0, no parsing, no lookup. The
//! ceiling of the XDP redirect path that pop-forwarder's routing is
//! measured against. And bare XDP_TX, the ceiling of the paths that answer
//! out of the ingress.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::DevMap,
    programs::XdpContext,
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
