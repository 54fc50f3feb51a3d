//! Bounds-checked access to the packet. Every header is reached through
//! `ptr_at`, so the verifier sees one pattern and so does the reader.

use core::mem;

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T`
/// lies before `data_end`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
