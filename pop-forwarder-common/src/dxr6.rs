//! IPv6 longest-prefix match in a range table: a direct index over the
//! leading `CHUNK_BITS` bits of the address, then a binary search over the
//! address ranges of that chunk (the scheme of DXR: Zec, Rizzo, Mikuc,
//! "DXR: towards a billion routing lookups per second in software", ACM
//! SIGCOMM CCR 42(5), 2012).
//!
//! Prefixes cut the address space into ranges, each with one longest
//! match. `CHUNKS` has one u64 entry per /20:
//! - its fallback: the longest route of length <= 20 covering the chunk
//!   (or none), and
//! - if routes longer than /20 start in the chunk, where its ranges are:
//!   `count` consecutive ranges in `RANGES` (u64 slots) from `base`,
//!   sorted, the first starting at the chunk's first address; short ones
//!   (one slot) if the chunk's routes are all /52 or shorter, long ones
//!   (three slots) otherwise (see `SHORT_MAX_LEN`). A range's target is
//!   the longest of those longer routes covering it, or none, which means
//!   the fallback.
//!
//! A lookup reads the chunk entry, then binary-searches at most `count`
//! ranges (at most `SEARCH_STEPS` reads; most chunks hold one to five
//! ranges, one or two cache lines). Its cost depends little on how many
//! routes the table holds, unlike a trie's (one read per level), which is
//! why it replaces the kernel's LPM trie for IPv6 lookups.
//!
//! A chunk entry is half a cache line (`CHUNK_WORDS` u64 words). Word 0 is
//! the entry proper; if the chunk has at most `INLINE_ROUTES` routes longer
//! than /20, all /52 or shorter, the other three hold a copy of those
//! routes (network bits 20 to 51, length, target), so that a lookup in such
//! a chunk reads its entry alone, not the entry and then its block: the
//! longest copied route covering the address, else the fallback. Each
//! copied word carries the generation that word 0 names (`GEN_SHIFT`); the
//! writer moves the generation on every time it rewrites the copy, writes
//! the copy before word 0, and never reuses the block word 0 points at
//! until a grace period has passed. A lookup that finds a word of another
//! generation (it read word 0 while the chunk was being rewritten)
//! searches the block instead, which is still the one that word 0 named:
//! it sees the old ranges or the new ones, never a mix.
//!
//! Why half a line and three routes, not a line and seven short ranges
//! (map layout 8): three routes cover what seven ranges did (a route cuts
//! at most two more ranges), so the same lookups read the entry alone,
//! from half the bytes and half the pages; the table takes 32 MiB less,
//! and the bench measured lookups a little cheaper (the README has the
//! figures).
//!
//! The host (`Dxr6`) keeps every route in a sorted map and rebuilds a
//! chunk's ranges whenever a route longer than /20 in it changes: into a
//! free block of `RANGES`, then (release order) the chunk entry switches to
//! it in one aligned u64 store. A lookup thus sees the old ranges or the new
//! ones, never a mix. The old block is retired, not freed: lookups that read
//! the old entry may still be searching it, so the caller frees it
//! (`reclaim`) after a grace period. A route of length <= 20 only changes
//! the fallback of the chunks it covers, which is one u64 store each.
//! Blocks are allocated by a buddy allocator (power-of-two sizes, aligned),
//! so a host that adopts pinned tables recovers which blocks are in use from
//! the chunk entries alone.

/// Bits of the address indexing `CHUNKS`.
pub const CHUNK_BITS: u32 = 20;
pub const CHUNKS: u32 = 1 << CHUNK_BITS;
/// u64 words of a chunk entry: 32 bytes, half a cache line (an mmapped
/// array's values start on a page, so no entry straddles two lines).
pub const CHUNK_WORDS: u32 = 4;
/// Routes a chunk entry holds a copy of, after its word 0.
pub const INLINE_ROUTES: u32 = CHUNK_WORDS - 1;
/// u64 slots of `RANGES`: room for `MAX_ROUTES_V6` routes in short ranges
/// (at most two ranges each, rounded up to a power of two per chunk), for
/// long ones too unless most routes sit alone in their /20, and for the
/// blocks retired while a change settles.
pub const RANGE_SLOTS: u32 = 1 << 22;
/// Ranges one chunk may hold (the entry's 16-bit count).
pub const MAX_CHUNK_RANGES: u32 = 0xffff;
/// Binary-search steps that narrow `MAX_CHUNK_RANGES` ranges to one.
pub const SEARCH_STEPS: u32 = 16;
/// Routes up to this long start and end on addresses whose bits past it
/// are zero: a chunk whose routes all are has short ranges, keyed by bits
/// 20 to 51 of their first address, one u64 slot each (key << 32 |
/// target). Other chunks have long ranges: three slots (the high and the
/// low 64 bits of the first address, host order; the target).
pub const SHORT_MAX_LEN: u32 = CHUNK_BITS + 32;

/// The chunk entry has ranges in `RANGES`.
const EXT: u64 = 1 << 63;
/// The chunk entry's fallback is a route.
const FALLBACK_VALID: u64 = 1 << 62;
const FALLBACK_SHIFT: u32 = 48;
/// Route targets (next-hop ids, `KERNEL_NEXT_HOP`, `LOCAL_NEXT_HOP`, ECMP
/// group ids) fit in 14 bits.
pub const TARGET_MASK: u32 = 0x3fff;
const COUNT_SHIFT: u32 = 32;
/// In the entry's low word: the chunk's ranges are long.
const LONG: u32 = 1 << 31;
/// In the entry's low word: words 1 to 3 hold the chunk's routes.
const INLINE: u32 = 1 << 30;
/// In the entry's low word: the generation of the copied ranges (1 to
/// 255; 0, never copied), 8 bits from here. Copied words carry it in their
/// top 8 bits.
const GEN_SHIFT: u32 = 22;
const GEN_MASK: u32 = 0xff;
const WORD_GEN_SHIFT: u32 = 56;
/// In the entry's low word: the first slot of the chunk's block.
const BASE_MASK: u32 = RANGE_SLOTS - 1;
/// A copied route: its network's bits 20 to 51 (`short_key`) from here,
/// its length less `CHUNK_BITS` (1 to 32; 0, an unused word) 6 bits from
/// `INLINE_LEN_SHIFT`, its target in the low `TARGET_MASK` bits.
const INLINE_KEY_SHIFT: u32 = 24;
const INLINE_LEN_SHIFT: u32 = 16;
const INLINE_LEN_MASK: u32 = 0x3f;
/// A range's target is a route (else: the chunk's fallback).
const RANGE_VALID: u32 = 1 << 31;
/// Slots a long range takes.
pub const LONG_SLOTS: u32 = 3;

const _: () = assert!(
    crate::ecmp::FIRST_GROUP_ID + crate::ecmp::MAX_GROUPS <= TARGET_MASK + 1
        && crate::KERNEL_NEXT_HOP <= TARGET_MASK
);
const _: () = assert!(1 << SEARCH_STEPS > MAX_CHUNK_RANGES);
const _: () = assert!(
    RANGE_SLOTS == 1 << GEN_SHIFT
        && TARGET_MASK < 1 << INLINE_LEN_SHIFT
        && SHORT_MAX_LEN - CHUNK_BITS <= INLINE_LEN_MASK
        && INLINE_KEY_SHIFT + 32 == WORD_GEN_SHIFT
);

/// Index of the chunk of an address whose high 64 bits are `hi`.
#[inline(always)]
pub const fn chunk_index(hi: u64) -> u32 {
    (hi >> (64 - CHUNK_BITS)) as u32
}

/// A short range's key for an address whose high 64 bits are `hi`: bits
/// 20 to 51.
#[inline(always)]
pub const fn short_key(hi: u64) -> u32 {
    (hi >> (64 - SHORT_MAX_LEN)) as u32
}

/// The fallback route of a chunk entry.
#[inline(always)]
pub const fn fallback(entry: u64) -> Option<u32> {
    if entry & FALLBACK_VALID != 0 {
        Some((entry >> FALLBACK_SHIFT) as u32 & TARGET_MASK)
    } else {
        None
    }
}

/// Where a chunk's ranges are.
pub struct Ranges {
    /// First slot.
    pub base: u32,
    pub count: u32,
    /// Long ranges (three slots each), else short (one).
    pub long: bool,
}

/// The ranges of a chunk entry, if it has any.
#[inline(always)]
pub const fn ranges_of(entry: u64) -> Option<Ranges> {
    if entry & EXT != 0 {
        Some(Ranges {
            base: entry as u32 & BASE_MASK,
            count: (entry >> COUNT_SHIFT) as u32 & MAX_CHUNK_RANGES,
            long: entry as u32 & LONG != 0,
        })
    } else {
        None
    }
}

/// The route of a range's target slot, if any (else the chunk's fallback).
#[inline(always)]
pub const fn range_target(slot: u64) -> Option<u32> {
    if slot as u32 & RANGE_VALID != 0 {
        Some(slot as u32 & TARGET_MASK)
    } else {
        None
    }
}

/// The index of the last of `count` sorted ranges that starts at or before
/// the address, as the program searches them: `at_or_before(i)` says
/// whether range `i` does (None: unreadable). The first range starts at the
/// chunk's first address, so there is one.
#[inline(always)]
pub fn search(count: u32, at_or_before: impl Fn(u32) -> Option<bool>) -> Option<u32> {
    // Invariant: range `at` starts at or before the address; the answer is
    // among the `n` ranges from `at`.
    let mut at = 0;
    let mut n = count;
    for _ in 0..SEARCH_STEPS {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        if at_or_before(at + half)? {
            at += half;
            n -= half;
        } else {
            n = half;
        }
    }
    Some(at)
}

/// The target slot of the range of `r` covering the address `hi:lo`
/// (`slot` reads one slot of `RANGES`).
#[inline(always)]
pub fn find(r: &Ranges, hi: u64, lo: u64, slot: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if r.long {
        let i = search(r.count, |i| {
            let at = r.base + i * LONG_SLOTS;
            let (h, l) = (slot(at)?, slot(at + 1)?);
            Some(h < hi || (h == hi && l <= lo))
        })?;
        slot(r.base + i * LONG_SLOTS + 2)
    } else {
        // A short slot is key << 32 | target: it starts at or before the
        // address if it is at most the address's key with all ones below.
        let probe = (u64::from(short_key(hi)) << 32) | 0xffff_ffff;
        let i = search(r.count, |i| Some(slot(r.base + i)? <= probe))?;
        slot(r.base + i)
    }
}

/// The longest copied route covering the address whose high 64 bits are
/// `hi`, if the chunk entry `words` holds its routes and every copied word
/// is of its generation: `Some(Some(target))`, or `Some(None)` for the
/// fallback. `None`: search the block.
#[inline(always)]
pub fn find_inline(words: &[u64; CHUNK_WORDS as usize], hi: u64) -> Option<Option<u32>> {
    let entry = words[0];
    if entry as u32 & INLINE == 0 {
        return None;
    }
    let generation = (entry >> GEN_SHIFT) & u64::from(GEN_MASK);
    let key = u64::from(short_key(hi));
    let mut longest = 0;
    let mut found = None;
    for &w in &words[1..] {
        if w >> WORD_GEN_SHIFT != generation {
            return None;
        }
        // Length 1 to 32 past /20: the route covers the address if their
        // first `len` key bits agree (an unused word, 0, never does; the
        // shift is in range for any length the 6 bits can hold).
        let len = (w >> INLINE_LEN_SHIFT) as u32 & INLINE_LEN_MASK;
        let net = (w >> INLINE_KEY_SHIFT) & 0xffff_ffff;
        if len > longest && ((net ^ key) << 32) >> (64 - len) == 0 {
            longest = len;
            found = Some(w as u32 & TARGET_MASK);
        }
    }
    Some(found)
}

/// The route for the address `hi:lo` from its chunk's entry `words`:
/// the copied ranges if they are of the entry's generation, else a search
/// of its block (`slot` reads one slot of `RANGES`), else the fallback.
/// The program's lookup and the host's (`lookup`) are this function.
#[inline(always)]
pub fn lookup_in(
    words: &[u64; CHUNK_WORDS as usize],
    hi: u64,
    lo: u64,
    slot: impl Fn(u32) -> Option<u64>,
) -> Option<u32> {
    let entry = words[0];
    if let Some(inline) = find_inline(words, hi) {
        return inline.or(fallback(entry));
    }
    match ranges_of(entry) {
        None => fallback(entry),
        Some(r) => range_target(find(&r, hi, lo, slot)?).or(fallback(entry)),
    }
}

/// The route for `addr`, looked up as the program does (`chunks` holds
/// `CHUNK_WORDS` words a chunk).
pub fn lookup(chunks: &[u64], ranges: &[u64], addr: u128) -> Option<u32> {
    let (hi, lo) = ((addr >> 64) as u64, addr as u64);
    let at = chunk_index(hi) as usize * CHUNK_WORDS as usize;
    let words = chunks.get(at..at + CHUNK_WORDS as usize)?.try_into().ok()?;
    lookup_in(words, hi, lo, |i| ranges.get(i as usize).copied())
}

#[cfg(feature = "user")]
pub use host::*;

#[cfg(feature = "user")]
mod host {
    extern crate std;
    use std::{
        collections::{BTreeMap, BTreeSet},
        vec,
        vec::Vec,
    };

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Dxr6Error {
        /// No free block of `RANGES` is large enough.
        RangesFull,
        /// The chunk would hold more than `MAX_CHUNK_RANGES` ranges.
        ChunkFull,
        /// The route target does not fit in `TARGET_MASK`.
        TargetTooLarge,
        /// Prefix length over 128.
        BadLength,
        /// Adopted tables whose blocks overlap or are misaligned.
        Inconsistent,
    }

    impl core::fmt::Display for Dxr6Error {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str(match self {
                Dxr6Error::RangesFull => "the IPv6 range table is full",
                Dxr6Error::ChunkFull => {
                    "one /20 of the IPv6 table would hold more than 65,535 ranges"
                }
                Dxr6Error::TargetTooLarge => "route target does not fit the IPv6 table",
                Dxr6Error::BadLength => "prefix length over 128",
                Dxr6Error::Inconsistent => {
                    "the IPv6 range table's blocks overlap: the pinned tables are damaged"
                }
            })
        }
    }

    /// A block of `RANGES`: `1 << order` slots from `base`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Block {
        pub base: u32,
        pub order: u8,
    }

    /// The two tables, borrowed for editing (the host's mmapped maps):
    /// `chunks` holds `CHUNK_WORDS` words a chunk.
    pub struct Tables6<'a> {
        pub chunks: &'a mut [u64],
        pub ranges: &'a mut [u64],
    }

    impl Tables6<'_> {
        /// Word 0 of a chunk's entry.
        fn entry(&self, chunk: u32) -> u64 {
            self.chunks[(chunk * CHUNK_WORDS) as usize]
        }

        /// Stores one word of a chunk entry as one 64-bit store (the
        /// program reads it concurrently), after everything written
        /// before it.
        fn store(&mut self, chunk: u32, word: u32, value: u64) {
            let slot = &mut self.chunks[(chunk * CHUNK_WORDS + word) as usize] as *mut u64;
            // SAFETY: an aligned u64 of a live slice.
            unsafe { core::sync::atomic::AtomicU64::from_ptr(slot) }
                .store(value, core::sync::atomic::Ordering::Release);
        }

        /// Writes a chunk's word 0 after everything written before it.
        fn publish(&mut self, chunk: u32, entry: u64) {
            self.store(chunk, 0, entry);
        }
    }

    /// The block that holds a chunk's ranges.
    fn block_of(r: &Ranges) -> Block {
        let slots = if r.long {
            r.count * LONG_SLOTS
        } else {
            r.count
        };
        Block {
            base: r.base,
            order: slots.next_power_of_two().trailing_zeros() as u8,
        }
    }

    /// Buddy allocator over `RANGES`.
    #[derive(Debug, Clone)]
    pub(super) struct Buddy {
        /// Free blocks by order, by base.
        free: Vec<BTreeSet<u32>>,
        top: u8,
    }

    impl Buddy {
        pub(super) fn new(capacity: u32) -> Buddy {
            assert!(capacity.is_power_of_two());
            let top = capacity.trailing_zeros() as u8;
            let mut free = vec![BTreeSet::new(); usize::from(top) + 1];
            free[usize::from(top)].insert(0);
            Buddy { free, top }
        }

        pub(super) fn alloc(&mut self, order: u8) -> Option<u32> {
            let mut k = (order..=self.top).find(|&k| !self.free[usize::from(k)].is_empty())?;
            let base = self.free[usize::from(k)].pop_first()?;
            while k > order {
                k -= 1;
                self.free[usize::from(k)].insert(base + (1 << k));
            }
            Some(base)
        }

        pub(super) fn free(&mut self, mut base: u32, mut order: u8) {
            while order < self.top {
                let buddy = base ^ (1 << order);
                if !self.free[usize::from(order)].remove(&buddy) {
                    break;
                }
                base = base.min(buddy);
                order += 1;
            }
            self.free[usize::from(order)].insert(base);
        }

        /// Marks a block in use that is free now (adopting tables).
        pub(super) fn reserve(&mut self, base: u32, order: u8) -> bool {
            if order > self.top || base & ((1 << order) - 1) != 0 {
                return false;
            }
            let Some((mut k, mut at)) = (order..=self.top)
                .map(|k| (k, base & !((1u32 << k) - 1)))
                .find(|&(k, at)| self.free[usize::from(k)].contains(&at))
            else {
                return false;
            };
            self.free[usize::from(k)].remove(&at);
            while k > order {
                k -= 1;
                let upper = at + (1 << k);
                if base >= upper {
                    self.free[usize::from(k)].insert(at);
                    at = upper;
                } else {
                    self.free[usize::from(k)].insert(upper);
                }
            }
            true
        }

        pub(super) fn free_entries(&self) -> u64 {
            self.free
                .iter()
                .enumerate()
                .map(|(k, s)| (s.len() as u64) << k)
                .sum()
        }
    }

    fn net_of(addr: u128, len: u8) -> u128 {
        addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    /// How a chunk's `ranges` would be stored: long or short, and the
    /// block they take (its base left 0); `ChunkFull` past
    /// `MAX_CHUNK_RANGES`.
    fn layout(ranges: &[(u128, u32)]) -> Result<(bool, Block), Dxr6Error> {
        let count = ranges.len() as u32;
        if count > MAX_CHUNK_RANGES {
            return Err(Dxr6Error::ChunkFull);
        }
        let long = ranges
            .iter()
            .any(|(start, _)| start & (u128::MAX >> SHORT_MAX_LEN) != 0);
        let block = block_of(&Ranges {
            base: 0,
            count,
            long,
        });
        Ok((long, block))
    }

    /// The sorted ranges of `chunk` cut by `routes` (longer than /20, in
    /// (network, length) order, with their targets): each start and its
    /// target (`RANGE_VALID` | target, or 0), adjacent ranges with the same
    /// target merged.
    fn sweep(chunk: u32, routes: impl Iterator<Item = ((u128, u8), u32)>) -> Vec<(u128, u32)> {
        let first = u128::from(chunk) << (128 - CHUNK_BITS);
        let last = first | (u128::MAX >> CHUNK_BITS);
        let mut out: Vec<(u128, u32)> = vec![(first, 0)];
        let emit = |out: &mut Vec<(u128, u32)>, start: u128, target: u32| {
            let end = out.len() - 1;
            if out[end].0 == start {
                out[end].1 = target;
                if end > 0 && out[end - 1].1 == target {
                    out.pop();
                }
            } else if out[end].1 != target {
                out.push((start, target));
            }
        };
        // Routes nest or are disjoint; by (network, length) each comes after
        // the routes that contain it. `open` holds the routes containing the
        // current position: (last address, target).
        let mut open: Vec<(u128, u32)> = Vec::new();
        let close_before =
            |open: &mut Vec<(u128, u32)>, out: &mut Vec<(u128, u32)>, at: Option<u128>| {
                while let Some(&(end, _)) = open.last() {
                    if at.is_some_and(|a| end >= a) {
                        break;
                    }
                    open.pop();
                    if end < last {
                        emit(out, end + 1, open.last().map_or(0, |o| o.1));
                    }
                }
            };
        for ((net, len), target) in routes {
            close_before(&mut open, &mut out, Some(net));
            let target = RANGE_VALID | target;
            emit(&mut out, net, target);
            open.push((net | u128::MAX.checked_shr(len.into()).unwrap_or(0), target));
        }
        close_before(&mut open, &mut out, None);
        out
    }

    pub(super) const fn chunk_of(addr: u128) -> u32 {
        chunk_index((addr >> 64) as u64)
    }

    /// A route (network, length) a batch wrote, and the target it replaced.
    type Replaced = ((u128, u8), Option<u32>);

    /// The host's side of the table: every route, and which blocks are free.
    #[derive(Debug, Clone)]
    pub struct Dxr6 {
        /// Every route, by (network, length).
        routes: BTreeMap<(u128, u8), u32>,
        /// Per chunk: 1 + the length of its fallback route; 0, none.
        fallback_len: Vec<u8>,
        alloc: Buddy,
    }

    impl Dxr6 {
        /// Takes over tables as they are (zeroed ones are empty), with
        /// `routes`, the record of what they hold.
        pub fn adopt(
            t: &Tables6<'_>,
            routes: impl IntoIterator<Item = (u128, u8, u32)>,
        ) -> Result<Dxr6, Dxr6Error> {
            let mut dxr = Dxr6 {
                routes: BTreeMap::new(),
                fallback_len: vec![0; t.chunks.len() / CHUNK_WORDS as usize],
                alloc: Buddy::new(t.ranges.len() as u32),
            };
            for (addr, len, target) in routes {
                if len > 128 {
                    return Err(Dxr6Error::BadLength);
                }
                dxr.routes.insert((net_of(addr, len), len), target);
                if u32::from(len) <= CHUNK_BITS {
                    for c in Self::span(net_of(addr, len), len) {
                        let have = &mut dxr.fallback_len[c as usize];
                        *have = (*have).max(len + 1);
                    }
                }
            }
            for &entry in t.chunks.iter().step_by(CHUNK_WORDS as usize) {
                if let Some(b) = ranges_of(entry).as_ref().map(block_of)
                    && !dxr.alloc.reserve(b.base, b.order)
                {
                    return Err(Dxr6Error::Inconsistent);
                }
            }
            Ok(dxr)
        }

        /// The chunks a route of length <= `CHUNK_BITS` covers.
        fn span(net: u128, len: u8) -> core::ops::Range<u32> {
            let first = chunk_of(net);
            first..first + (1 << (CHUNK_BITS - u32::from(len)))
        }

        pub fn len(&self) -> usize {
            self.routes.len()
        }

        pub fn is_empty(&self) -> bool {
            self.routes.is_empty()
        }

        /// Slots of `RANGES` neither in use nor retired.
        pub fn free_ranges(&self) -> u64 {
            self.alloc.free_entries()
        }

        /// Adds `addr/len` -> `target`, or points it there if it exists.
        /// Returns the block it retired, for `reclaim` after a grace period.
        /// On error the tables and the routes are as they were.
        pub fn insert(
            &mut self,
            t: &mut Tables6<'_>,
            addr: u128,
            len: u8,
            target: u32,
        ) -> Result<Option<Block>, Dxr6Error> {
            if len > 128 {
                return Err(Dxr6Error::BadLength);
            }
            if target > TARGET_MASK {
                return Err(Dxr6Error::TargetTooLarge);
            }
            let key = (net_of(addr, len), len);
            let old = self.routes.insert(key, target);
            if u32::from(len) <= CHUNK_BITS {
                // Each chunk it covers whose fallback is no longer takes it.
                let depth = len + 1;
                self.set_fallbacks(t, key, (depth, Some(target)), |have| have <= depth);
                return Ok(None);
            }
            self.rebuild(t, chunk_of(key.0)).inspect_err(|_| {
                match old {
                    Some(old) => self.routes.insert(key, old),
                    None => self.routes.remove(&key),
                };
            })
        }

        /// Adds (or repoints) many routes, rebuilding each chunk once. On
        /// error, returns it with the routes that did not go in (their
        /// chunks are as they were); the others did, and what they retired
        /// is in `retired`.
        pub fn insert_many(
            &mut self,
            t: &mut Tables6<'_>,
            routes: &[(u128, u8, u32)],
            retired: &mut Vec<Block>,
        ) -> Result<(), (Dxr6Error, Vec<(u128, u8)>)> {
            let bad = routes.iter().find_map(|&(_, len, target)| {
                if len > 128 {
                    Some(Dxr6Error::BadLength)
                } else if target > TARGET_MASK {
                    Some(Dxr6Error::TargetTooLarge)
                } else {
                    None
                }
            });
            if let Some(e) = bad {
                return Err((e, routes.iter().map(|&(a, l, _)| (a, l)).collect()));
            }
            // Per chunk, the routes that change it and what they replaced.
            let mut touched: BTreeMap<u32, Vec<Replaced>> = BTreeMap::new();
            for &(addr, len, target) in routes {
                let key = (net_of(addr, len), len);
                let old = self.routes.insert(key, target);
                if u32::from(len) <= CHUNK_BITS {
                    let depth = len + 1;
                    self.set_fallbacks(t, key, (depth, Some(target)), |have| have <= depth);
                } else {
                    touched.entry(chunk_of(key.0)).or_default().push((key, old));
                }
            }
            let touched: Vec<_> = touched.into_iter().collect();
            for (i, (chunk, _)) in touched.iter().enumerate() {
                match self.rebuild(t, *chunk) {
                    Ok(old) => retired.extend(old),
                    Err(e) => {
                        // Newest first, so that a key given twice gets back
                        // what it had before the batch.
                        let undo = touched[i..].iter().flat_map(|(_, v)| v.iter()).rev();
                        let mut left = Vec::new();
                        for &(key, old) in undo {
                            match old {
                                Some(old) => self.routes.insert(key, old),
                                None => self.routes.remove(&key),
                            };
                            left.push(key);
                        }
                        return Err((e, left));
                    }
                }
            }
            Ok(())
        }

        /// Removes exactly `addr/len`; nothing if it is absent. Returns the
        /// block it retired. On error the tables and the routes are as
        /// they were.
        pub fn remove(
            &mut self,
            t: &mut Tables6<'_>,
            addr: u128,
            len: u8,
        ) -> Result<Option<Block>, Dxr6Error> {
            if len > 128 {
                return Err(Dxr6Error::BadLength);
            }
            let key = (net_of(addr, len), len);
            let Some(old) = self.routes.remove(&key) else {
                return Ok(None);
            };
            if u32::from(len) <= CHUNK_BITS {
                // Its chunks fall back to the longest shorter route over it.
                let covering = (0..len)
                    .rev()
                    .find_map(|l| Some((l, *self.routes.get(&(net_of(key.0, l), l))?)));
                let (depth, target) = match covering {
                    Some((l, target)) => (l + 1, Some(target)),
                    None => (0, None),
                };
                // The chunks whose fallback it was take the next one.
                self.set_fallbacks(t, key, (depth, target), |have| have == len + 1);
                return Ok(None);
            }
            self.rebuild(t, chunk_of(key.0)).inspect_err(|_| {
                self.routes.insert(key, old);
            })
        }

        /// Frees a retired block: no lookup can still be reading it.
        pub fn reclaim(&mut self, block: Block) {
            self.alloc.free(block.base, block.order);
        }

        /// Gives the chunks of a route of length `len` <= 20 over `net`
        /// whose fallback length passes `take` the fallback `target`, of
        /// length `depth` - 1 (0: none).
        fn set_fallbacks(
            &mut self,
            t: &mut Tables6<'_>,
            (net, len): (u128, u8),
            (depth, target): (u8, Option<u32>),
            take: impl Fn(u8) -> bool,
        ) {
            for c in Self::span(net, len) {
                if take(self.fallback_len[c as usize]) {
                    self.write_fallback(t, c, depth, target);
                }
            }
        }

        fn write_fallback(&mut self, t: &mut Tables6<'_>, c: u32, depth: u8, target: Option<u32>) {
            self.fallback_len[c as usize] = depth;
            let old = t.entry(c);
            let mut entry = old & !(FALLBACK_VALID | (u64::from(TARGET_MASK) << FALLBACK_SHIFT));
            if let Some(target) = target {
                entry |= FALLBACK_VALID | (u64::from(target) << FALLBACK_SHIFT);
            }
            t.publish(c, entry);
        }

        /// The sorted ranges of `chunk` by its routes longer than /20: each
        /// start and its target (`RANGE_VALID` | target, or 0), adjacent
        /// ranges with the same target merged.
        fn ranges(&self, chunk: u32) -> Vec<(u128, u32)> {
            sweep(
                chunk,
                self.in_chunk(chunk).map(|(&key, &target)| (key, target)),
            )
        }

        /// The routes longer than /20 in `chunk`, in (network, length) order.
        fn in_chunk(&self, chunk: u32) -> impl Iterator<Item = (&(u128, u8), &u32)> {
            let first = u128::from(chunk) << (128 - CHUNK_BITS);
            let last = first | (u128::MAX >> CHUNK_BITS);
            self.routes
                .range((first, 0)..=(last, 128))
                .filter(|((_, len), _)| u32::from(*len) > CHUNK_BITS)
        }

        /// The slots that adding (or repointing) `routes` would take in new
        /// blocks, foreseen before any write: for each /20 in which a route
        /// longer than /20 changes, the block its ranges would need,
        /// counted as if no neighbouring ranges merged (an upper bound).
        /// Fails if a /20 would pass `MAX_CHUNK_RANGES` (`ChunkFull`) or if
        /// more slots are needed than are free (`RangesFull`); the
        /// allocator's fragmentation may still fail a change that passes.
        pub fn room_for(&self, routes: &[(u128, u8)]) -> Result<u64, Dxr6Error> {
            let mut by_chunk: BTreeMap<u32, Vec<(u128, u8)>> = BTreeMap::new();
            for &(addr, len) in routes {
                if len > 128 {
                    return Err(Dxr6Error::BadLength);
                }
                if u32::from(len) > CHUNK_BITS {
                    let net = net_of(addr, len);
                    by_chunk.entry(chunk_of(net)).or_default().push((net, len));
                }
            }
            let mut need = 0u64;
            for (chunk, new) in by_chunk {
                let mut all: Vec<(u128, u8)> = self
                    .in_chunk(chunk)
                    .map(|(&key, _)| key)
                    .chain(new)
                    .collect();
                all.sort_unstable();
                all.dedup();
                // A target of its own for every route: nothing merges.
                let (_, block) = layout(&sweep(chunk, all.into_iter().zip(0..)))?;
                need += 1 << block.order;
            }
            if need > self.free_ranges() {
                return Err(Dxr6Error::RangesFull);
            }
            Ok(need)
        }

        /// Writes `chunk`'s ranges into a new block and switches the chunk
        /// to it; returns the block it used before.
        fn rebuild(&mut self, t: &mut Tables6<'_>, chunk: u32) -> Result<Option<Block>, Dxr6Error> {
            let ranges = self.ranges(chunk);
            let entry = t.entry(chunk);
            let old = ranges_of(entry).as_ref().map(block_of);
            // The fallback, and the generation of the copied ranges, which
            // only moves on.
            let mut keep = entry
                & (FALLBACK_VALID
                    | (u64::from(TARGET_MASK) << FALLBACK_SHIFT)
                    | u64::from(GEN_MASK << GEN_SHIFT));
            if ranges.len() == 1 && ranges[0].1 == 0 {
                t.publish(chunk, keep);
                return Ok(old);
            }
            let count = ranges.len() as u32;
            let (long, block) = layout(&ranges)?;
            let base = self.alloc.alloc(block.order).ok_or(Dxr6Error::RangesFull)?;
            let slots = &mut t.ranges[base as usize..];
            for (i, &(start, target)) in ranges.iter().enumerate() {
                let hi = (start >> 64) as u64;
                if long {
                    let at = i * LONG_SLOTS as usize;
                    slots[at] = hi;
                    slots[at + 1] = start as u64;
                    slots[at + 2] = u64::from(target);
                } else {
                    slots[i] = (u64::from(short_key(hi)) << 32) | u64::from(target);
                }
            }
            let mut low = if long { base | LONG } else { base };
            let routes: Vec<((u128, u8), u32)> = self
                .in_chunk(chunk)
                .take(INLINE_ROUTES as usize + 1)
                .map(|(&key, &target)| (key, target))
                .collect();
            if routes.len() <= INLINE_ROUTES as usize
                && routes
                    .iter()
                    .all(|((_, len), _)| u32::from(*len) <= SHORT_MAX_LEN)
            {
                // A copy of the routes in the entry, of a new generation,
                // written before word 0 names it.
                let generation = match (entry >> GEN_SHIFT) as u32 & GEN_MASK {
                    GEN_MASK => 1,
                    g => g + 1,
                };
                let word = |i: usize| {
                    let copy = routes.get(i).map_or(0, |&((net, len), target)| {
                        (u64::from(short_key((net >> 64) as u64)) << INLINE_KEY_SHIFT)
                            | (u64::from(u32::from(len) - CHUNK_BITS) << INLINE_LEN_SHIFT)
                            | u64::from(target & TARGET_MASK)
                    });
                    (u64::from(generation) << WORD_GEN_SHIFT) | copy
                };
                for i in 0..INLINE_ROUTES {
                    t.store(chunk, 1 + i, word(i as usize));
                }
                keep =
                    keep & !u64::from(GEN_MASK << GEN_SHIFT) | u64::from(generation << GEN_SHIFT);
                low |= INLINE;
            }
            t.publish(
                chunk,
                keep | EXT | (u64::from(count) << COUNT_SHIFT) | u64::from(low),
            );
            Ok(old)
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec, vec::Vec};

    use super::{
        host::{Buddy, chunk_of},
        *,
    };
    use crate::test_rng::Rng;

    /// The reference: longest match by scanning every route.
    #[derive(Default)]
    struct Naive(BTreeMap<(u128, u8), u32>);

    impl Naive {
        fn lookup(&self, addr: u128) -> Option<u32> {
            self.0
                .iter()
                .filter(|((net, len), _)| mask(*len) & addr == *net)
                .max_by_key(|((_, len), _)| *len)
                .map(|(_, t)| *t)
        }
    }

    fn mask(len: u8) -> u128 {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    struct Owned {
        chunks: Vec<u64>,
        ranges: Vec<u64>,
    }

    impl Owned {
        fn new(capacity: u32) -> Owned {
            Owned {
                chunks: vec![0; (CHUNKS * CHUNK_WORDS) as usize],
                ranges: vec![0; capacity as usize],
            }
        }
        fn t(&mut self) -> Tables6<'_> {
            Tables6 {
                chunks: &mut self.chunks,
                ranges: &mut self.ranges,
            }
        }
        fn lookup(&self, addr: u128) -> Option<u32> {
            lookup(&self.chunks, &self.ranges, addr)
        }
    }

    /// Addresses that tell routes apart: the first and last address of
    /// `touched` and of up to 12 other routes, and their neighbours; and
    /// random ones under `base`.
    fn probes(
        naive: &Naive,
        touched: (u128, u8),
        rng: &mut Rng,
        base: u128,
        spread: u128,
    ) -> Vec<u128> {
        let mut out = Vec::new();
        let n = naive.0.len().max(1) as u64;
        let some = (0..12).filter_map(|_| naive.0.keys().nth((rng.next() % n) as usize));
        for &(net, len) in core::iter::once(&touched).chain(some) {
            let last = net | !mask(len);
            out.extend([net, last, net.wrapping_sub(1), last.wrapping_add(1)]);
        }
        out.extend((0..16).map(|_| base | (rng.wide() & spread)));
        out
    }

    /// Random adds, repoints and removes in a small corner of the space
    /// (so that routes nest, overlap chunk edges and share chunks), with
    /// lengths from /0 to /128, checked against the reference after every
    /// step; retired blocks are reclaimed a few steps later.
    #[test]
    fn matches_a_naive_longest_prefix_match_under_random_updates() {
        let mut tables = Owned::new(1 << 14);
        let mut dxr = Dxr6::adopt(&tables.t(), []).unwrap();
        let mut naive = Naive::default();
        let mut rng = Rng(0x1234_5678_9abc);
        let base: u128 = 0x2001_0db8 << 96;
        // /16 around the base: chunks 0x20010 .. 0x2001f.
        let spread: u128 = u128::MAX >> 16;
        let mut retired: Vec<(usize, Block)> = Vec::new();
        let lens = [
            0u8, 8, 16, 18, 20, 21, 24, 28, 32, 40, 47, 48, 56, 64, 96, 127, 128,
        ];
        for step in 0..3000 {
            let len = lens[(rng.next() % lens.len() as u64) as usize];
            let addr = (base | (rng.wide() & spread)) & mask(len);
            let old_free = dxr.free_ranges();
            let touched: (u128, u8);
            if rng.next().is_multiple_of(3) && !naive.0.is_empty() {
                // Remove one that exists, or (rarely) one that does not.
                let (net, len) = *naive
                    .0
                    .keys()
                    .nth((rng.next() % naive.0.len() as u64) as usize)
                    .unwrap();
                let got = dxr.remove(&mut tables.t(), net, len).unwrap();
                naive.0.remove(&(net, len));
                touched = (net, len);
                retired.extend(got.map(|b| (step, b)));
                assert_eq!(dxr.remove(&mut tables.t(), net, len), Ok(None));
            } else {
                let target = (rng.next() % 5000) as u32;
                let got = dxr.insert(&mut tables.t(), addr, len, target).unwrap();
                naive.0.insert((addr, len), target);
                retired.extend(got.map(|b| (step, b)));
                touched = (addr, len);
            }
            assert!(
                dxr.free_ranges() <= old_free,
                "a block was freed before its reclaim"
            );
            retired.retain(|&(at, b)| {
                if step - at >= 3 {
                    dxr.reclaim(b);
                    false
                } else {
                    true
                }
            });
            for a in probes(&naive, touched, &mut rng, base, spread) {
                assert_eq!(tables.lookup(a), naive.lookup(a), "step {step}: {a:#x}");
            }
        }
        // Everything gone: every block comes back.
        for (_, b) in retired {
            dxr.reclaim(b);
        }
        let keys: Vec<_> = naive.0.keys().copied().collect();
        for (net, len) in keys {
            if let Some(b) = dxr.remove(&mut tables.t(), net, len).unwrap() {
                dxr.reclaim(b);
            }
        }
        assert_eq!(dxr.free_ranges(), 1 << 14);
        assert!(
            tables
                .chunks
                .iter()
                .step_by(CHUNK_WORDS as usize)
                .all(|&e| {
                    ranges_of(e).is_none() && fallback(e).is_none() && e as u32 & INLINE == 0
                })
        );
    }

    /// A batch gives the lookups the same routes one by one would, and a
    /// host that adopts the tables carries on from them.
    #[test]
    fn a_batch_and_an_adopted_table_agree_with_single_inserts() {
        let mut rng = Rng(77);
        let routes: Vec<(u128, u8, u32)> = (0..3000)
            .map(|_| {
                let len = [16u8, 32, 36, 40, 44, 48, 64, 128][(rng.next() % 8) as usize];
                let addr = (0x2000u128 << 112 | (rng.wide() >> 3)) & !(u128::MAX >> 12)
                    | (rng.wide() & (u128::MAX >> 12));
                (addr & mask(len), len, (rng.next() % 4000) as u32)
            })
            .collect();
        let mut one = Owned::new(1 << 16);
        let mut dxr_one = Dxr6::adopt(&one.t(), []).unwrap();
        for &(a, l, t) in &routes {
            dxr_one.insert(&mut one.t(), a, l, t).unwrap();
        }
        let mut batch = Owned::new(1 << 16);
        let mut dxr_batch = Dxr6::adopt(&batch.t(), []).unwrap();
        let keys: Vec<(u128, u8)> = routes.iter().map(|&(a, l, _)| (a, l)).collect();
        let foreseen = dxr_batch.room_for(&keys).unwrap();
        let mut retired = Vec::new();
        dxr_batch
            .insert_many(&mut batch.t(), &routes, &mut retired)
            .unwrap();
        assert!(retired.is_empty());
        // The foresight is an upper bound of what the batch took.
        let taken = (1 << 16) - dxr_batch.free_ranges();
        assert!(taken <= foreseen && taken > 0, "{taken} > {foreseen}");
        let mut naive = Naive::default();
        for &(a, l, t) in &routes {
            naive.0.insert((a, l), t);
        }
        let mut probe = Vec::new();
        for &(net, len) in naive.0.keys() {
            let last = net | !mask(len);
            probe.extend([net, last, net.wrapping_sub(1), last.wrapping_add(1)]);
        }
        for &a in &probe {
            assert_eq!(one.lookup(a), naive.lookup(a), "{a:#x}");
            assert_eq!(batch.lookup(a), naive.lookup(a), "{a:#x}");
        }
        // Adopt the batch's tables from the record and change them further.
        let mut adopted =
            Dxr6::adopt(&batch.t(), naive.0.iter().map(|(&(a, l), &t)| (a, l, t))).unwrap();
        assert_eq!(adopted.free_ranges(), dxr_batch.free_ranges());
        for &(a, l, _) in routes.iter().take(500) {
            adopted.remove(&mut batch.t(), a, l).unwrap();
            naive.0.remove(&(a, l));
        }
        for &a in &probe {
            assert_eq!(batch.lookup(a), naive.lookup(a), "{a:#x}");
        }
    }

    /// A batch that does not fit leaves the chunks it could not write as
    /// they were and says which routes did not go in.
    #[test]
    fn a_batch_that_runs_out_of_room_names_what_did_not_go_in() {
        let mut tables = Owned::new(16);
        let mut dxr = Dxr6::adopt(&tables.t(), []).unwrap();
        // Each /48 in its own chunk: three ranges, a block of four.
        let routes: Vec<(u128, u8, u32)> = (0..6u128)
            .map(|i| ((0x2001u128 << 112) | (i << 108) | (5 << 80), 48, i as u32))
            .collect();
        // Foreseen before any write: four fit, six do not.
        let keys: Vec<(u128, u8)> = routes.iter().map(|&(a, l, _)| (a, l)).collect();
        assert_eq!(dxr.room_for(&keys[..4]), Ok(16));
        assert_eq!(dxr.room_for(&keys), Err(Dxr6Error::RangesFull));
        // 32,768 /48s, none adjacent, in one /20: 65,537 ranges.
        let crowded: Vec<(u128, u8)> = (0..32_768u128)
            .map(|i| ((0x2001u128 << 112) | (i * 2) << 80, 48))
            .collect();
        assert_eq!(dxr.room_for(&crowded), Err(Dxr6Error::ChunkFull));
        let mut retired = Vec::new();
        let (e, left) = dxr
            .insert_many(&mut tables.t(), &routes, &mut retired)
            .unwrap_err();
        assert_eq!(e, Dxr6Error::RangesFull);
        assert_eq!(left.len(), 2);
        for (i, &(a, _, t)) in routes.iter().enumerate() {
            let want = (i < 4).then_some(t);
            assert_eq!(tables.lookup(a), want);
        }
        assert_eq!(dxr.len(), 4);
        // A single insert that does not fit changes nothing either.
        assert_eq!(
            dxr.insert(&mut tables.t(), routes[5].0, 48, 9),
            Err(Dxr6Error::RangesFull)
        );
        assert_eq!(dxr.len(), 4);
        assert_eq!(
            dxr.insert(&mut tables.t(), 0, 64, TARGET_MASK + 1),
            Err(Dxr6Error::TargetTooLarge)
        );
    }

    #[test]
    fn adopting_overlapping_blocks_is_refused() {
        let mut tables = Owned::new(64);
        tables.chunks[CHUNK_WORDS as usize] = EXT | (4 << COUNT_SHIFT);
        tables.chunks[2 * CHUNK_WORDS as usize] = EXT | (4 << COUNT_SHIFT) | 2;
        assert_eq!(
            Dxr6::adopt(&tables.t(), []).unwrap_err(),
            Dxr6Error::Inconsistent
        );
    }

    #[test]
    fn buddy_splits_and_merges() {
        let mut b = Buddy::new(16);
        let x = b.alloc(0).unwrap();
        let y = b.alloc(2).unwrap();
        let z = b.alloc(3).unwrap();
        assert_eq!((x, y, z), (0, 4, 8));
        assert_eq!(b.alloc(3), None);
        b.free(y, 2);
        b.free(x, 0);
        b.free(z, 3);
        assert_eq!(b.free_entries(), 16);
        assert_eq!(b.alloc(4), Some(0));
        let mut b = Buddy::new(16);
        assert!(b.reserve(12, 2));
        assert!(!b.reserve(13, 0));
        assert!(b.reserve(2, 1));
        assert_eq!(b.free_entries(), 10);
    }

    /// A chunk's copied routes answer as the longest match does: routes
    /// nested in each other and in the chunk's fallback, disjoint ones,
    /// /21 to /52, one to three of them; a fourth route, or one longer
    /// than /52, leaves the chunk without a copy (the block answers).
    #[test]
    fn copied_routes_answer_the_longest_match() {
        let mut tables = Owned::new(1 << 12);
        let mut dxr = Dxr6::adopt(&tables.t(), []).unwrap();
        let mut rng = Rng(0x5eed_0fc0_b1e5);
        let chunk_base: u128 = 0x2001_0db8 << 96 & mask(20);
        let lens = [21u8, 24, 31, 32, 33, 40, 44, 47, 48, 51, 52, 53, 64];
        let c = (chunk_of(chunk_base) * CHUNK_WORDS) as usize;
        for round in 0..2000 {
            let mut naive = Naive::default();
            let mut routes = Vec::new();
            if rng.next().is_multiple_of(2) {
                routes.push((chunk_base & mask(16), 16, 4000));
            }
            let count = 1 + rng.next() % 4;
            let anchor = chunk_base | (rng.wide() & !mask(20));
            for i in 0..count {
                let len = lens[(rng.next() % lens.len() as u64) as usize];
                // Half nest around one address, half land anywhere.
                let at = if rng.next().is_multiple_of(2) {
                    anchor
                } else {
                    chunk_base | (rng.wide() & !mask(20))
                };
                routes.push((at & mask(len), len, i as u32 + 1));
            }
            for &(net, len, target) in &routes {
                if let Some(b) = dxr.insert(&mut tables.t(), net, len, target).unwrap() {
                    dxr.reclaim(b);
                }
                naive.0.insert((net, len), target);
            }
            let longer: Vec<_> = naive.0.keys().filter(|(_, l)| *l > 20).collect();
            let copied = longer.len() <= INLINE_ROUTES as usize
                && longer.iter().all(|(_, l)| u32::from(*l) <= SHORT_MAX_LEN);
            let words: [u64; CHUNK_WORDS as usize] = tables.chunks[c..c + CHUNK_WORDS as usize]
                .try_into()
                .unwrap();
            assert_eq!(
                words[0] as u32 & INLINE != 0,
                copied,
                "round {round}: {routes:x?}"
            );
            let mut probes = vec![anchor, chunk_base, chunk_base | !mask(20)];
            for &(&(net, len), _) in &naive.0.iter().collect::<Vec<_>>() {
                let last = net | !mask(len);
                probes.extend([net, last, net.wrapping_sub(1), last.wrapping_add(1)]);
            }
            probes.extend((0..8).map(|_| chunk_base | (rng.wide() & !mask(20))));
            for a in probes
                .into_iter()
                .filter(|&a| chunk_of(a) == chunk_of(chunk_base))
            {
                assert_eq!(tables.lookup(a), naive.lookup(a), "round {round}: {a:#x}");
                if copied {
                    let got = find_inline(&words, (a >> 64) as u64).unwrap();
                    assert_eq!(got.or(fallback(words[0])), naive.lookup(a), "round {round}");
                }
            }
            for &(net, len, _) in &routes {
                if let Some(b) = dxr.remove(&mut tables.t(), net, len).unwrap() {
                    dxr.reclaim(b);
                }
            }
        }
    }

    /// The search reads at most SEARCH_STEPS ranges of a full chunk, and
    /// finds the last range starting at or before the address.
    #[test]
    fn a_full_chunk_is_searched_in_bounded_steps() {
        let n = MAX_CHUNK_RANGES;
        let starts: Vec<u64> = (0..u64::from(n)).map(|i| i * 2).collect();
        for probe in [0u64, 1, 2, 77, 2 * u64::from(n) - 2, u64::MAX] {
            let reads = core::cell::Cell::new(0);
            let got = search(n, |i| {
                reads.set(reads.get() + 1);
                Some(*starts.get(i as usize)? <= probe)
            })
            .unwrap();
            assert_eq!(u64::from(got), (probe / 2).min(u64::from(n) - 1));
            assert!(reads.get() <= SEARCH_STEPS);
        }
    }

    /// A chunk with a route longer than /52 has long ranges; taking the
    /// route out makes them short again.
    #[test]
    fn ranges_are_short_until_a_route_needs_long_ones() {
        let mut tables = Owned::new(64);
        let mut dxr = Dxr6::adopt(&tables.t(), []).unwrap();
        let base = 0x2001_0db8u128 << 96;
        dxr.insert(&mut tables.t(), base, 48, 1).unwrap();
        let entry =
            |t: &Owned| ranges_of(t.chunks[(chunk_of(base) * CHUNK_WORDS) as usize]).unwrap();
        assert!(!entry(&tables).long);
        let b = dxr.insert(&mut tables.t(), base | 1 << 70, 64, 2).unwrap();
        dxr.reclaim(b.unwrap());
        assert!(entry(&tables).long);
        assert_eq!(tables.lookup(base | 1 << 70 | 5), Some(2));
        assert_eq!(tables.lookup(base | 5), Some(1));
        let b = dxr.remove(&mut tables.t(), base | 1 << 70, 64).unwrap();
        dxr.reclaim(b.unwrap());
        assert!(!entry(&tables).long);
        assert_eq!(tables.lookup(base | 1 << 70 | 5), Some(1));
    }

    /// A chunk of up to three routes, /52 or shorter, keeps a copy of them
    /// in its entry; a lookup that read word 0 before the chunk was
    /// rewritten and the copy after (or part of it) sees another
    /// generation and searches the block word 0 named, so it answers as
    /// the old table did. The generation wraps past 0.
    #[test]
    fn a_copy_of_another_generation_is_not_used() {
        let mut tables = Owned::new(256);
        let mut dxr = Dxr6::adopt(&tables.t(), []).unwrap();
        let base = 0x2001_0db8u128 << 96;
        let c = (chunk_of(base) * CHUNK_WORDS) as usize;
        let w = CHUNK_WORDS as usize;
        let line =
            |t: &Owned| -> [u64; CHUNK_WORDS as usize] { t.chunks[c..c + w].try_into().unwrap() };
        dxr.insert(&mut tables.t(), base, 48, 1).unwrap();
        assert!(line(&tables)[0] as u32 & INLINE != 0);
        let addr = base | 7;
        assert_eq!(
            find_inline(&line(&tables), (addr >> 64) as u64),
            Some(Some(1))
        );
        let before = line(&tables);
        // Repointed: a new copy, a new block; the old block is not reclaimed
        // (the grace period has not passed).
        let _retired = dxr.insert(&mut tables.t(), base, 48, 2).unwrap();
        let after = line(&tables);
        assert_eq!(tables.lookup(addr), Some(2));
        for torn in 1..w {
            // Word 0 as before, the copy rewritten up to word `torn`.
            let mut seen = before;
            seen[1..=torn].copy_from_slice(&after[1..=torn]);
            assert_eq!(find_inline(&seen, (addr >> 64) as u64), None, "{torn}");
            let mut chunks = tables.chunks.clone();
            chunks[c..c + w].copy_from_slice(&seen);
            assert_eq!(lookup(&chunks, &tables.ranges, addr), Some(1), "{torn}");
        }
        // Four routes do not fit the entry: no copy.
        for i in 1..4u128 {
            if let Some(b) = dxr.insert(&mut tables.t(), base | i << 82, 48, 3).unwrap() {
                dxr.reclaim(b);
            }
        }
        assert!(line(&tables)[0] as u32 & INLINE == 0);
        assert_eq!(tables.lookup(base | 2 << 82 | 9), Some(3));
        // Many rewrites: the generation never comes back to 0.
        for i in 1..4u128 {
            if let Some(b) = dxr.remove(&mut tables.t(), base | i << 82, 48).unwrap() {
                dxr.reclaim(b);
            }
        }
        for n in 0..600u32 {
            if let Some(b) = dxr.insert(&mut tables.t(), base, 48, n % 7).unwrap() {
                dxr.reclaim(b);
            }
            let l = line(&tables);
            assert_ne!((l[0] >> GEN_SHIFT) as u32 & GEN_MASK, 0);
            assert_eq!(find_inline(&l, (addr >> 64) as u64), Some(Some(n % 7)));
            assert_eq!(tables.lookup(base - 1), None);
        }
    }
}
