//! What happens to a frame after the program hands it over, as the kernel
//! reports it on the xdp tracepoints: a devmap transmit that dropped
//! frames (a full TX ring, a target that cannot take XDP frames), and a
//! redirect of this program's that the kernel refused. Counted by egress
//! ifindex in `TX_ERRORS`, so that a redirect counted `forwarded` that
//! never left is visible.
//!
//! The records are read at the offsets of their format files
//! (`tracepoints`), which the loader checks before attaching.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use pop_forwarder_common::{MAX_INTERFACES, TxErrors, settings, tracepoints};

use crate::maps::SETTINGS;

#[map]
static TX_ERRORS: PerCpuArray<TxErrors> = PerCpuArray::with_max_entries(MAX_INTERFACES, 0);

#[inline(always)]
fn field(ctx: &TracePointContext, offset: usize) -> i32 {
    // SAFETY: a read of the tracepoint's record at an offset its format
    // file gives (checked by the loader); a failed read is 0.
    unsafe { ctx.read_at::<i32>(offset) }.unwrap_or(0)
}

#[tracepoint(category = "xdp", name = "xdp_devmap_xmit")]
pub fn xdp_devmap_xmit(ctx: TracePointContext) -> u32 {
    let to_ifindex = field(&ctx, tracepoints::DEVMAP_XMIT[0].1);
    let drops = field(&ctx, tracepoints::DEVMAP_XMIT[1].1);
    if drops > 0
        && to_ifindex > 0
        && let Some(slot) = TX_ERRORS.get_ptr_mut(to_ifindex as u32)
    {
        // SAFETY: a per-CPU slot.
        unsafe { (*slot).xmit_drops += drops as u64 };
    }
    0
}

#[tracepoint(category = "xdp", name = "xdp_redirect_err")]
pub fn xdp_redirect_err(ctx: TracePointContext) -> u32 {
    let prog_id = field(&ctx, tracepoints::REDIRECT_ERR[0].1) as u32;
    let ours = SETTINGS.get(settings::XDP_PROG_ID).copied().unwrap_or(0);
    if ours == 0 || prog_id != ours {
        return 0;
    }
    // A devmap redirect names its target by the map's key (the ifindex,
    // in EGRESS_PORTS); a plain one by to_ifindex.
    let map_id = field(&ctx, tracepoints::REDIRECT_ERR[2].1);
    let target = if map_id != 0 {
        field(&ctx, tracepoints::REDIRECT_ERR[3].1)
    } else {
        field(&ctx, tracepoints::REDIRECT_ERR[1].1)
    };
    if target > 0
        && let Some(slot) = TX_ERRORS.get_ptr_mut(target as u32)
    {
        // SAFETY: a per-CPU slot.
        unsafe { (*slot).redirect_errors += 1 };
    }
    0
}
