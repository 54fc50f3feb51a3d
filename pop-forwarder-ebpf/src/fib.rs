//! `route_lookup = "kernel-fib"`: routed packets are looked up in the
//! kernel's FIB, per packet, with bpf_fib_lookup (as xdp-forward and the
//! kernel's xdp_fwd sample do), instead of the program's own tables: the
//! kernel's routes, rules, ECMP and neighbours answer, and nothing is
//! mirrored.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use pop_forwarder_common::{Counter, settings};

use crate::{
    Verdict,
    maps::{SETTINGS, egress},
    packet::copy_bytes,
    pass,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The lookup's parameters (64 bytes) live in a per-CPU map slot, not on
/// the stack, which has no room for them.
#[map]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Whether routed packets are looked up in the kernel's FIB.
#[inline(always)]
pub fn enabled() -> bool {
    SETTINGS.get(settings::ROUTE_LOOKUP) == Some(&settings::ROUTE_LOOKUP_FIB)
}

/// Forwards an IPv4 packet (TTL > 1 checked) as the kernel's FIB says.
#[inline(always)]
pub fn forward_v4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: &mut Ipv4Hdr,
    total_len: usize,
) -> Verdict {
    let Some(p) = FIB_PARAMS.get_ptr_mut(0) else {
        return pass(Counter::PassNoNextHop);
    };
    // SAFETY: this CPU's slot; XDP runs with preemption off.
    let p = unsafe { &mut *p };
    p.family = AF_INET;
    p.l4_protocol = ip.proto;
    p.sport = 0;
    p.dport = 0;
    p.__bindgen_anon_1.tot_len = total_len as u16;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    p.__bindgen_anon_5.tbid = 0;
    let verdict = match lookup(ctx, p) {
        Ok(v) => v,
        Err(v) => return v,
    };
    crate::decrement_ttl(ip);
    rewrite(eth, p);
    verdict
}

/// Forwards an IPv6 packet (hop limit > 1 checked) as the FIB says.
#[inline(always)]
pub fn forward_v6(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: &mut Ipv6Hdr,
    total_len: usize,
) -> Verdict {
    let Some(p) = FIB_PARAMS.get_ptr_mut(0) else {
        return pass(Counter::PassNoNextHop);
    };
    // SAFETY: as in forward_v4.
    let p = unsafe { &mut *p };
    p.family = AF_INET6;
    p.l4_protocol = ip.next_hdr;
    p.sport = 0;
    p.dport = 0;
    p.__bindgen_anon_1.tot_len = total_len as u16;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // Flow label and traffic class, as the kernel's own lookup takes them.
    p.__bindgen_anon_2.flowinfo = u32::from_ne_bytes(ip.vcf) & 0x0fff_ffffu32.to_be();
    // SAFETY: plain 16-byte copies into the union's IPv6 arms.
    unsafe {
        copy_bytes(
            &mut *(p.__bindgen_anon_3.ipv6_src.as_mut_ptr() as *mut [u8; 16]),
            &ip.src_addr,
        );
        copy_bytes(
            &mut *(p.__bindgen_anon_4.ipv6_dst.as_mut_ptr() as *mut [u8; 16]),
            &ip.dst_addr,
        );
    }
    p.__bindgen_anon_5.tbid = 0;
    let verdict = match lookup(ctx, p) {
        Ok(v) => v,
        Err(v) => return v,
    };
    ip.hop_limit -= 1;
    rewrite(eth, p);
    verdict
}

/// Asks the FIB; on success, the verdict that sends the packet out of the
/// interface it names (nothing written yet), otherwise the one that hands
/// it to the kernel.
#[inline(always)]
fn lookup(ctx: &XdpContext, p: &mut bpf_fib_lookup) -> Result<Verdict, Verdict> {
    // SAFETY: the helper reads and writes the 64-byte parameter block, a
    // map value of exactly that size.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => egress(ctx, p.ifindex),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(pass(Counter::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(pass(Counter::PassTooBig)),
        BPF_FIB_LKUP_RET_NOT_FWDED | BPF_FIB_LKUP_RET_FWD_DISABLED => {
            Err(pass(Counter::PassFibNotForwarded))
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(pass(Counter::PassKernelRoute))
        }
        // Lightweight tunnels, no source address, errors: the kernel's.
        _ => Err(pass(Counter::PassKernelRoute)),
    }
}

#[inline(always)]
fn rewrite(eth: *mut EthHdr, p: &bpf_fib_lookup) {
    // SAFETY: `eth` was bounds-checked by ptr_at in classify_and_forward.
    unsafe {
        copy_bytes(&mut (*eth).dst_addr, &p.dmac);
        copy_bytes(&mut (*eth).src_addr, &p.smac);
    }
}
