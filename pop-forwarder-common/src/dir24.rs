//! DIR-24-8: IPv4 longest-prefix match in at most two array reads (Gupta,
//! Lin, McKeown, "Routing lookups in hardware at memory access speeds",
//! INFOCOM 1998; the scheme of DPDK's rte_lpm).
//!
//! `tbl24` has one entry per /24: either the next hop of the longest prefix
//! of length <= 24 covering it, or a pointer to a group of 256 `tbl8`
//! entries, one per address of that /24, for /24s that longer prefixes cut
//! up. Entries carry the depth (prefix length) that wrote them, so that an
//! update only overwrites what a shorter prefix wrote and a delete only
//! clears what the deleted prefix wrote.
//!
//! The XDP program reads the two tables (BPF array maps, mmapped by the
//! host); the host edits them through `Dir24` as routes come and go, with
//! the route trie as the record of which prefixes exist. Every write is one
//! aligned u32, and a group is filled before tbl24 points at it (a release
//! fence between, so that neither the compiler nor the CPU reorders the
//! stores), so a lookup racing an update sees the old or the new route,
//! never garbage. A group that is folded back into tbl24 is retired, not
//! freed: its entries keep answering lookups that read tbl24 before the
//! fold, and the host reclaims it (`reclaim`) after a grace period, when
//! no lookup can still be reading it. Only then may another /24 take it.

/// How the tables sit in BPF array maps: array elements are 8-byte
/// aligned whatever their size, so each element (a u64) holds two
/// consecutive u32 entries, low half first (the program and the host are
/// little-endian). The host's mmapped view is then a plain `[u32]`.
pub const ENTRIES_PER_ELEMENT: u32 = 2;

/// The entry at `index` of a table stored as pairs: the element to read.
#[inline(always)]
pub const fn element_of(index: u32) -> u32 {
    index / ENTRIES_PER_ELEMENT
}

/// The entry at `index` out of the element that holds it.
#[inline(always)]
pub const fn entry_in(element: u64, index: u32) -> u32 {
    (element >> ((index % ENTRIES_PER_ELEMENT) * 32)) as u32
}

/// Entries of tbl24: one per /24.
pub const TBL24_ENTRIES: u32 = 1 << 24;
/// Entries per tbl8 group: one per address of a /24.
pub const TBL8_GROUP_SIZE: u32 = 256;
/// tbl8 groups: how many distinct /24s may hold prefixes longer than /24.
pub const TBL8_GROUPS: u32 = 8192;
pub const TBL8_ENTRIES: u32 = TBL8_GROUPS * TBL8_GROUP_SIZE;

/// The entry holds a route.
const VALID: u32 = 1 << 31;
/// tbl24: the entry points at a tbl8 group. tbl8: the entry's group is
/// allocated.
const EXT: u32 = 1 << 30;
const DEPTH_SHIFT: u32 = 24;
const DEPTH_MASK: u32 = 0x3f;
/// Next-hop ids and group indexes fit in the low 24 bits.
pub const VALUE_MASK: u32 = 0x00ff_ffff;

#[inline(always)]
const fn route(next_hop: u32, depth: u32) -> u32 {
    VALID | (depth << DEPTH_SHIFT) | (next_hop & VALUE_MASK)
}

#[inline(always)]
const fn is_valid(e: u32) -> bool {
    e & VALID != 0
}

#[inline(always)]
const fn depth(e: u32) -> u32 {
    (e >> DEPTH_SHIFT) & DEPTH_MASK
}

/// What a tbl24 entry tells the lookup.
pub enum Tbl24 {
    Miss,
    NextHop(u32),
    /// Read tbl8 at this index.
    Tbl8(u32),
}

/// The first step of a lookup: the tbl24 entry for `addr` (host order).
#[inline(always)]
pub const fn tbl24_step(entry: u32, addr: u32) -> Tbl24 {
    if entry & EXT != 0 {
        Tbl24::Tbl8((entry & VALUE_MASK) * TBL8_GROUP_SIZE + (addr & 0xff))
    } else if is_valid(entry) {
        Tbl24::NextHop(entry & VALUE_MASK)
    } else {
        Tbl24::Miss
    }
}

/// The second step: the next hop in a tbl8 entry, if any.
#[inline(always)]
pub const fn tbl8_step(entry: u32) -> Option<u32> {
    if is_valid(entry) {
        Some(entry & VALUE_MASK)
    } else {
        None
    }
}

/// Index of `addr`'s entry in tbl24.
#[inline(always)]
pub const fn tbl24_index(addr: u32) -> u32 {
    addr >> 8
}

/// The next hop for `addr` (host order), looked up as the program does.
pub fn lookup(tbl24: &[u32], tbl8: &[u32], addr: u32) -> Option<u32> {
    match tbl24_step(tbl24[tbl24_index(addr) as usize], addr) {
        Tbl24::Miss => None,
        Tbl24::NextHop(nh) => Some(nh),
        Tbl24::Tbl8(i) => tbl8_step(tbl8[i as usize]),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir24Error {
    /// Every tbl8 group is in use.
    Tbl8Full,
    /// The next-hop id does not fit in 24 bits.
    NextHopTooLarge,
    /// Prefix length over 32.
    BadLength,
}

/// The two tables, borrowed for editing.
pub struct Dir24<'a> {
    pub tbl24: &'a mut [u32],
    pub tbl8: &'a mut [u32],
}

impl Dir24<'_> {
    /// Adds (or replaces) `addr/len` -> `next_hop`. `addr` is in host
    /// order with its host bits clear.
    pub fn add(&mut self, addr: u32, len: u32, next_hop: u32) -> Result<(), Dir24Error> {
        if len > 32 {
            return Err(Dir24Error::BadLength);
        }
        if next_hop > VALUE_MASK {
            return Err(Dir24Error::NextHopTooLarge);
        }
        let new = route(next_hop, len);
        if len <= 24 {
            let start = tbl24_index(addr);
            for i in start..start + (1 << (24 - len)) {
                let e = self.tbl24[i as usize];
                if e & EXT != 0 {
                    let group = e & VALUE_MASK;
                    self.overwrite_group(group, 0, TBL8_GROUP_SIZE, len, new);
                } else if !is_valid(e) || depth(e) <= len {
                    self.tbl24[i as usize] = new;
                }
            }
            return Ok(());
        }
        let i = tbl24_index(addr) as usize;
        let e = self.tbl24[i];
        let group = if e & EXT != 0 {
            e & VALUE_MASK
        } else {
            let group = self.free_group().ok_or(Dir24Error::Tbl8Full)?;
            // The group inherits the /24's route, then tbl24 points at it.
            let base = (group * TBL8_GROUP_SIZE) as usize;
            for t in &mut self.tbl8[base..base + TBL8_GROUP_SIZE as usize] {
                *t = e | EXT;
            }
            core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
            self.tbl24[i] = VALID | EXT | group;
            group
        };
        let first = addr & 0xff;
        self.overwrite_group(group, first, 1 << (32 - len), len, new);
        Ok(())
    }

    /// Removes `addr/len`, whose entries fall back to `covering`: the
    /// longest remaining prefix shorter than `len` that covers it, as
    /// (next hop, length), or None. Returns the tbl8 group it retired, if
    /// its /24 no longer needs one: still allocated, to be `reclaim`ed after
    /// a grace period.
    pub fn remove(
        &mut self,
        addr: u32,
        len: u32,
        covering: Option<(u32, u32)>,
    ) -> Result<Option<u32>, Dir24Error> {
        if len > 32 {
            return Err(Dir24Error::BadLength);
        }
        let fallback = match covering {
            Some((nh, d)) if nh <= VALUE_MASK && d < len => route(nh, d),
            Some(_) => return Err(Dir24Error::NextHopTooLarge),
            None => 0,
        };
        if len <= 24 {
            // A group holds at least one prefix longer than /24 (it folds
            // when the last one goes), so removing a prefix of /24 or
            // shorter never folds one: nothing is retired.
            let start = tbl24_index(addr);
            for i in start..start + (1 << (24 - len)) {
                let e = self.tbl24[i as usize];
                if e & EXT != 0 {
                    self.clear_group(i, e & VALUE_MASK, 0..TBL8_GROUP_SIZE, len, fallback, false);
                } else if is_valid(e) && depth(e) == len {
                    self.tbl24[i as usize] = fallback;
                }
            }
            return Ok(None);
        }
        let i = tbl24_index(addr);
        let e = self.tbl24[i as usize];
        if e & EXT != 0 {
            let first = addr & 0xff;
            return Ok(self.clear_group(
                i,
                e & VALUE_MASK,
                first..first + (1 << (32 - len)),
                len,
                fallback,
                true,
            ));
        }
        Ok(None)
    }

    /// Calls `f` with every allocated group that no tbl24 entry points at:
    /// groups retired and not yet reclaimed, which a host that restarted
    /// no longer remembers.
    pub fn for_each_unreferenced_group(&self, mut f: impl FnMut(u32)) {
        let groups = self.tbl8.len() / TBL8_GROUP_SIZE as usize;
        let mut referenced = [0u64; TBL8_GROUPS as usize / 64];
        for &e in self.tbl24.iter() {
            if e & EXT != 0 {
                let g = (e & VALUE_MASK) as usize;
                if g < groups {
                    referenced[g / 64] |= 1 << (g % 64);
                }
            }
        }
        for g in 0..groups {
            let allocated = self.tbl8[g * TBL8_GROUP_SIZE as usize] & EXT != 0;
            if allocated && referenced[g / 64] & (1 << (g % 64)) == 0 {
                f(g as u32);
            }
        }
    }

    /// Frees a group `remove` retired, once no lookup can be reading it.
    pub fn reclaim(&mut self, group: u32) {
        let base = (group * TBL8_GROUP_SIZE) as usize;
        for t in &mut self.tbl8[base..base + TBL8_GROUP_SIZE as usize] {
            *t = 0;
        }
    }

    fn overwrite_group(&mut self, group: u32, first: u32, count: u32, len: u32, new: u32) {
        let base = (group * TBL8_GROUP_SIZE + first) as usize;
        for t in &mut self.tbl8[base..base + count as usize] {
            if !is_valid(*t) || depth(*t) <= len {
                *t = new | EXT;
            }
        }
    }

    /// Clears `len`'s entries among `cells` of a group, then folds the
    /// group back into tbl24 if no prefix longer than /24 is left in it,
    /// retiring it (returned; its entries left as they are).
    fn clear_group(
        &mut self,
        tbl24_at: u32,
        group: u32,
        cells: core::ops::Range<u32>,
        len: u32,
        fallback: u32,
        may_fold: bool,
    ) -> Option<u32> {
        let base = (group * TBL8_GROUP_SIZE) as usize;
        let range = base + cells.start as usize..base + cells.end as usize;
        for t in &mut self.tbl8[range] {
            if is_valid(*t) && depth(*t) == len {
                *t = fallback | EXT;
            }
        }
        let whole = &self.tbl8[base..base + TBL8_GROUP_SIZE as usize];
        let head = whole[0];
        let foldable = whole.iter().all(|&t| t == head) && (!is_valid(head) || depth(head) <= 24);
        if foldable && may_fold {
            self.tbl24[tbl24_at as usize] = head & !EXT;
            return Some(group);
        }
        None
    }

    /// How many tbl8 groups are allocated.
    pub fn groups_in_use(&self) -> u32 {
        let groups = self.tbl8.len() as u32 / TBL8_GROUP_SIZE;
        (0..groups)
            .filter(|g| self.tbl8[(g * TBL8_GROUP_SIZE) as usize] & EXT != 0)
            .count() as u32
    }

    /// Whether adding `addr/len` would take a tbl8 group: it is longer
    /// than /24 and its /24 has no group yet. (Prefixes in one /24 share
    /// its group: count each /24 once.)
    pub fn needs_group(&self, addr: u32, len: u32) -> bool {
        len > 24 && self.tbl24[tbl24_index(addr) as usize] & EXT == 0
    }

    fn free_group(&self) -> Option<u32> {
        let groups = self.tbl8.len() as u32 / TBL8_GROUP_SIZE;
        (0..groups).find(|g| self.tbl8[(g * TBL8_GROUP_SIZE) as usize] & EXT == 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;
    use crate::test_rng::Rng;

    #[test]
    fn groups_are_counted_and_foreseen() {
        let mut t24 = vec![0u32; TBL24_ENTRIES as usize];
        let mut t8 = vec![0u32; (4 * TBL8_GROUP_SIZE) as usize];
        let mut dir = Dir24 {
            tbl24: &mut t24,
            tbl8: &mut t8,
        };
        let a = 0x0a00_0100; // 10.0.1.0
        assert_eq!(dir.groups_in_use(), 0);
        assert!(!dir.needs_group(a, 24));
        assert!(dir.needs_group(a | 0x80, 25));
        dir.add(a | 0x80, 25, 1).unwrap();
        assert_eq!(dir.groups_in_use(), 1);
        // Its /24 has a group now; another /24 would take a second.
        assert!(!dir.needs_group(a | 0x40, 26));
        assert!(dir.needs_group(a + 0x100, 32));
        for i in 1..4 {
            dir.add(a + (i << 8), 32, 1).unwrap();
        }
        assert_eq!(dir.groups_in_use(), 4);
        assert_eq!(dir.add(a + (9 << 8), 32, 1), Err(Dir24Error::Tbl8Full));
        let retired = dir.remove(a | 0x80, 25, None).unwrap();
        // Retired, not yet free: still counted until reclaimed, and a new
        // /24 cannot take it.
        assert_eq!(retired, Some(0));
        assert_eq!(dir.groups_in_use(), 4);
        assert_eq!(dir.add(a + (9 << 8), 32, 1), Err(Dir24Error::Tbl8Full));
        // Its entries still answer a lookup that read tbl24 before.
        assert_eq!(dir.tbl8[0x80], EXT);
        // A host that restarted finds it among the unreferenced groups.
        let mut found = Vec::new();
        dir.for_each_unreferenced_group(|g| found.push(g));
        assert_eq!(found, [0]);
        dir.reclaim(0);
        found.clear();
        dir.for_each_unreferenced_group(|g| found.push(g));
        assert!(found.is_empty());
        assert_eq!(dir.groups_in_use(), 3);
    }

    /// The reference: a list of prefixes, longest match by scanning.
    #[derive(Default)]
    struct Naive(Vec<(u32, u32, u32)>);

    impl Naive {
        fn lookup(&self, addr: u32) -> Option<u32> {
            self.0
                .iter()
                .filter(|(a, l, _)| mask(*l) & addr == *a)
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, _, nh)| *nh)
        }
        fn covering(&self, addr: u32, len: u32) -> Option<(u32, u32)> {
            self.0
                .iter()
                .filter(|(a, l, _)| *l < len && mask(*l) & addr == *a)
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, l, nh)| (*nh, *l))
        }
    }

    fn mask(len: u32) -> u32 {
        u32::MAX.checked_shl(32 - len).unwrap_or(0)
    }

    fn tables(groups: u32) -> (Vec<u32>, Vec<u32>) {
        (
            vec![0; TBL24_ENTRIES as usize],
            vec![0; (groups * TBL8_GROUP_SIZE) as usize],
        )
    }

    /// Random adds and removes inside 10.0.0.0/12 (so that prefixes nest
    /// and overlap), checked against the reference after every step at the
    /// edges of every prefix touched and at random addresses.
    #[test]
    fn matches_a_naive_longest_prefix_match_under_random_updates() {
        let (mut t24, mut t8) = tables(64);
        let mut naive = Naive::default();
        let mut rng = Rng(0x1234_5678_9abc);
        let base = 0x0a00_0000u32;
        for step in 0..3000 {
            let len = [8, 12, 16, 20, 22, 24, 25, 26, 28, 30, 31, 32][(rng.next() % 12) as usize];
            let addr = (base | (rng.next() as u32 & 0x000f_ffff)) & mask(len);
            let existing = naive.0.iter().position(|(a, l, _)| *a == addr && *l == len);
            let mut dir = Dir24 {
                tbl24: &mut t24,
                tbl8: &mut t8,
            };
            match existing {
                Some(pos) if !rng.next().is_multiple_of(3) => {
                    naive.0.remove(pos);
                    if let Some(g) = dir.remove(addr, len, naive.covering(addr, len)).unwrap() {
                        dir.reclaim(g);
                    }
                }
                _ => {
                    let nh = (rng.next() % 1000) as u32;
                    match dir.add(addr, len, nh) {
                        Ok(()) => {
                            if let Some(pos) = existing {
                                naive.0.remove(pos);
                            }
                            naive.0.push((addr, len, nh));
                        }
                        Err(Dir24Error::Tbl8Full) => continue,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            let mut probes = vec![
                addr,
                addr | !mask(len),
                addr.wrapping_sub(1),
                (addr | !mask(len)).wrapping_add(1),
            ];
            for _ in 0..32 {
                probes.push(base | (rng.next() as u32 & 0x000f_ffff));
            }
            for p in probes {
                assert_eq!(
                    lookup(&t24, &t8, p),
                    naive.lookup(p),
                    "step {step}: address {p:#010x}"
                );
            }
        }
    }

    #[test]
    fn groups_are_recycled_when_their_long_prefixes_go() {
        let (mut t24, mut t8) = tables(2);
        let mut dir = Dir24 {
            tbl24: &mut t24,
            tbl8: &mut t8,
        };
        dir.add(0x0a00_0000, 16, 7).unwrap();
        for round in 0..10u32 {
            let a = 0x0a00_0000 | (round << 8) | 0x80;
            dir.add(a, 25, 1).unwrap();
            dir.add(a | 0x0001_0000, 32, 2).unwrap();
            assert_eq!(dir.add(a | 0x0002_0000, 32, 3), Err(Dir24Error::Tbl8Full));
            for g in [
                dir.remove(a, 25, Some((7, 16))).unwrap(),
                dir.remove(a | 0x0001_0000, 32, None).unwrap(),
            ]
            .into_iter()
            .flatten()
            {
                dir.reclaim(g);
            }
        }
        assert!(t8.iter().all(|&t| t == 0), "every group was freed");
        assert_eq!(lookup(&t24, &t8, 0x0a00_0181), Some(7));
        assert_eq!(lookup(&t24, &t8, 0x0a01_0181), None);
    }

    #[test]
    fn default_route_and_host_routes() {
        let (mut t24, mut t8) = tables(4);
        let mut dir = Dir24 {
            tbl24: &mut t24,
            tbl8: &mut t8,
        };
        dir.add(0, 0, 1).unwrap();
        dir.add(0xc000_0201, 32, 2).unwrap();
        assert_eq!(lookup(&t24, &t8, 0x0101_0101), Some(1));
        assert_eq!(lookup(&t24, &t8, 0xc000_0201), Some(2));
        assert_eq!(lookup(&t24, &t8, 0xc000_0202), Some(1));
        let mut dir = Dir24 {
            tbl24: &mut t24,
            tbl8: &mut t8,
        };
        dir.remove(0, 0, None).unwrap();
        assert_eq!(lookup(&t24, &t8, 0x0101_0101), None);
        assert_eq!(lookup(&t24, &t8, 0xc000_0201), Some(2));
        assert_eq!(lookup(&t24, &t8, 0xc000_0202), None);
    }
}
