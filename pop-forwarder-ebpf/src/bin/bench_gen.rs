//! Traffic generator for BPF_PROG_TEST_RUN with live frames (the in-kernel
//! pktgen of this project): each run rewrites the frame's headers from a
//! template, varies destination, source address and source port by
//! per-CPU counters, and sends the frame with XDP_TX out of the
//! device the test run names as ingress.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};
use pop_forwarder_common::{
    AF_INET,
    bench::{GEN_HEADER_LEN, GEN_MAX_DSTS, GenConfig},
    checksum,
};

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);
#[map]
static GEN_TEMPLATE: Array<[u64; GEN_HEADER_LEN / 8]> = Array::with_max_entries(1, 0);
#[map]
static GEN_DSTS: Array<[u8; 16]> = Array::with_max_entries(GEN_MAX_DSTS, 0);
/// Where this CPU is in the sequence of flows: the destination's index,
/// the source's step (one more each time the destinations wrap) and the
/// source port's step, each stepped and wrapped by a compare (not a frame
/// number divided by the counts: three 64-bit divisions a frame, for a
/// generator whose every nanosecond is taken from the router's share of
/// the CPU).
#[map]
static GEN_STATE: PerCpuArray<GenState> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct GenState {
    dst: u32,
    src: u32,
    port: u32,
}
/// The sending device, for `bench_gen_min`'s redirect.
#[map]
static GEN_PORT: DevMap = DevMap::with_max_entries(1, 0);

/// The least a live-frames generator can do, for the bench's harness
/// ceiling: the template copied over the frame, the frame redirected out
/// of the sending device. Every frame is the same.
#[xdp]
pub fn bench_gen_min(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + GEN_HEADER_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(template) = GEN_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the frame holds GEN_HEADER_LEN bytes (checked above).
    unsafe { copy_template(start as *mut u64, template) };
    match GEN_PORT.redirect(0, u64::from(xdp_action::XDP_ABORTED)) {
        Ok(action) | Err(action) => action,
    }
}

const ETH: usize = 14;

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    generate(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + GEN_HEADER_LEN > end {
        return None;
    }
    let frame = start as *mut [u64; GEN_HEADER_LEN / 8];
    let conf = GEN_CONFIG.get(0)?;
    let template = GEN_TEMPLATE.get(0)?;
    let state = GEN_STATE.get_ptr_mut(0)?;
    // SAFETY: the frame holds GEN_HEADER_LEN bytes (checked above); the
    // state is this CPU's own (XDP runs with preemption off).
    let (dst_index, src_step, port_step) = unsafe {
        copy_template(frame as *mut u64, template);
        let s = &mut *state;
        let now = (s.dst, s.src as u16, s.port as u16);
        s.dst = wrapped_step(s.dst, conf.dst_count);
        if s.dst == 0 {
            s.src = wrapped_step(s.src, conf.src_count);
        }
        s.port = wrapped_step(s.port, conf.src_port_count);
        now
    };
    let dst = GEN_DSTS.get(dst_index)?;
    let bytes = start as *mut u8;
    // SAFETY: every offset below is inside the first GEN_HEADER_LEN bytes.
    unsafe {
        if conf.family == AF_INET {
            let ip = bytes.add(ETH);
            core::ptr::copy_nonoverlapping(dst.as_ptr(), ip.add(16), 4);
            add_be16(ip.add(14), src_step);
            add_be16(bytes.add(ETH + 20), port_step);
            // The header checksum, from scratch over the 20-byte header,
            // on its 16-bit words as they lie in memory (`checksum::sum_ne`:
            // the header is at an even address, as the frame starts on one).
            let words = ip as *mut [u16; 10];
            (*words)[5] = 0;
            (*words)[5] = !checksum::fold(checksum::sum_ne(&*words));
            // UDP checksum 0: "none" for IPv4 (RFC 768).
            *bytes.add(ETH + 26) = 0;
            *bytes.add(ETH + 27) = 0;
        } else {
            let ip = bytes.add(ETH);
            core::ptr::copy_nonoverlapping(dst.as_ptr(), ip.add(24), 16);
            add_be16(ip.add(22), src_step);
            add_be16(bytes.add(ETH + 40), port_step);
        }
    }
    Some(xdp_action::XDP_TX)
}

/// Copies the template over the frame's first GEN_HEADER_LEN bytes, a
/// word at a time. (A plain array assignment compiles to a call of the
/// BPF target's `memmove`, which copies byte by byte: 64 iterations, most
/// of what a generator's frame cost. Volatile accesses keep LLVM from
/// fusing the words back into that call.)
#[inline(always)]
unsafe fn copy_template(dst: *mut u64, template: &[u64; GEN_HEADER_LEN / 8]) {
    let src = template.as_ptr();
    let mut i = 0;
    while i < GEN_HEADER_LEN / 8 {
        // SAFETY: the caller's frame holds GEN_HEADER_LEN bytes.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        i += 1;
    }
}

/// `i + 1`, or 0 once that reaches `count` (a count of 0 counts as 1).
#[inline(always)]
fn wrapped_step(i: u32, count: u32) -> u32 {
    if i + 1 >= count { 0 } else { i + 1 }
}

/// Adds `v` to the big-endian 16-bit field at `p`.
#[inline(always)]
unsafe fn add_be16(p: *mut u8, v: u16) {
    unsafe {
        let x = u16::from_be_bytes([*p, *p.add(1)])
            .wrapping_add(v)
            .to_be_bytes();
        *p = x[0];
        *p.add(1) = x[1];
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
