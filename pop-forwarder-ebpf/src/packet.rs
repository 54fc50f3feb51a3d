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

/// The two bytes at `offset`, checked against a fresh read of `data_end`.
/// For offsets the compiler could prove inside the packet from checks on
/// lengths (scalars): it would drop `ptr_at`'s comparison as redundant, and
/// the verifier, which trusts only comparisons of packet pointers, would
/// refuse the load. A volatile read of `data_end` keeps the comparison. (Two
/// bytes, not one: `x + 1 > end` becomes `x >= end`, from which the
/// verifier proves nothing about the byte at `x`.)
#[inline(always)]
pub fn pair_at(ctx: &XdpContext, offset: usize) -> Option<[u8; 2]> {
    let start = ctx.data();
    // SAFETY: `ctx.ctx` is the program's own context, valid for the run.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + offset + 2 > end {
        return None;
    }
    // SAFETY: checked just above to lie inside the packet.
    Some(unsafe { *((start + offset) as *const [u8; 2]) })
}

/// `dst = *src` for the MACs and addresses the program writes into the
/// packet, one byte at a time. A plain array assignment between two
/// pointers that may alias compiles to a call of the byte-loop `memmove`
/// bpf-linker links in: a BPF-to-BPF call and a loop on every packet.
#[inline(always)]
pub fn copy_bytes<const N: usize>(dst: &mut [u8; N], src: &[u8; N]) {
    let mut i = 0;
    while i < N {
        dst[i] = src[i];
        i += 1;
    }
}

/// The `N` 16-bit words at `at`, as they lie in memory (for
/// `checksum::sum_ne`): `N` two-byte loads where `[u8; 2 * N]` read as
/// big-endian words is two byte loads, two shifts and a swap a word.
///
/// # Safety
/// `2 * N` readable bytes at an even address. Packet headers at even
/// offsets are: a frame starts on an even address (the program reads
/// `EthHdr::ether_type`, a u16, in place, and every headroom change it
/// makes is even), and map values start on 8 bytes.
#[inline(always)]
pub unsafe fn words_at<const N: usize>(at: *const u8) -> *mut [u16; N] {
    at as *mut [u16; N]
}

/// `dst = *src` for a MAC, as three 16-bit words (`copy_bytes` takes six
/// byte loads and six byte stores).
///
/// # Safety
/// Both at even addresses (see `words_at`): the Ethernet header's MACs,
/// and map values' MAC fields, which sit at even offsets (checked where
/// their types are defined).
#[inline(always)]
pub unsafe fn copy_mac(dst: *mut [u8; 6], src: *const [u8; 6]) {
    // SAFETY: by the caller.
    unsafe {
        let (d, s) = (
            words_at::<3>(dst as *const u8),
            words_at::<3>(src as *const u8),
        );
        (*d)[0] = (*s)[0];
        (*d)[1] = (*s)[1];
        (*d)[2] = (*s)[2];
    }
}

/// An IPv4 address in the 16-byte form flows and VIPs use. Built from two
/// words: zeroing a byte array compiles to a call of the byte-loop
/// `memset`.
#[inline(always)]
pub fn widen(a: [u8; 4]) -> [u8; 16] {
    let words = [
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], 0, 0, 0, 0]),
        0u64,
    ];
    // SAFETY: [u64; 2] and [u8; 16] have the same size, and every bit
    // pattern is a valid [u8; 16]; from_ne_bytes keeps the byte order.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}
