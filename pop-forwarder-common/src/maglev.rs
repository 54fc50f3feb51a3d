//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights,
//! and the seeded flow hash that indexes the table.
//!
//! The table is a pure function of the pool: the same nodes and weights give
//! the same table on every forwarder, after every restart, whatever order
//! the nodes were given in, so forwarders behind ECMP agree on every flow.

/// Default table size: a prime, as Maglev's permutations need (so that
/// every skip is coprime with the size), and large enough that 1,000 nodes
/// get about 65 entries each.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// The entry of a slot no node holds (an empty pool).
pub const NO_NODE: u32 = u32::MAX;

/// One cache node of a pool: what the table holds for it (`id`, e.g. its
/// slot in the node table), a stable identity (`key`, e.g. a hash of its
/// name: it orders the pool and seeds the node's permutation, so it must
/// not depend on where or in which order the node was configured) and a
/// weight (0 = drained: no new flows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolNode {
    pub id: u32,
    pub key: u64,
    pub weight: u32,
}

/// splitmix64's finaliser: a bijective 64-bit mix with good avalanche.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001; // "maglev" 1
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002; // "maglev" 2

/// Is `n` prime? (Trial division: table sizes are checked once, at config
/// time.)
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Fills `table` (its length is the table size, a prime) with node ids from
/// `pool`. Nodes of weight 0 get no entries; an empty or all-drained pool
/// leaves every entry `NO_NODE`. `scratch` holds one cursor per node and is
/// resized by the caller's allocator (this crate is no_std): it must be at
/// least `pool.len()` long.
///
/// Weighted Maglev: nodes take turns in id order, as in the paper, but a
/// node claims a slot on its turn only when its credit (its weight, added
/// each turn) reaches the largest weight, so slots split in proportion to
/// weight while each node still walks its own permutation.
pub fn populate(pool: &mut [PoolNode], table: &mut [u32], scratch: &mut [(u64, u64, u64, u64)]) {
    let size = table.len() as u64;
    table.fill(NO_NODE);
    pool.sort_unstable_by_key(|n| n.key);
    let max_weight = pool.iter().map(|n| n.weight).max().unwrap_or(0) as u64;
    if size == 0 || max_weight == 0 {
        return;
    }
    // Per node: (offset, skip, next index into its permutation, credit).
    for (state, node) in scratch.iter_mut().zip(pool.iter()) {
        let offset = mix64(node.key ^ OFFSET_SEED) % size;
        let skip = mix64(node.key ^ SKIP_SEED) % (size - 1) + 1;
        *state = (offset, skip, 0, 0);
    }
    let mut filled = 0u64;
    while filled < size {
        for (state, node) in scratch.iter_mut().zip(pool.iter()) {
            if node.weight == 0 {
                continue;
            }
            state.3 += node.weight as u64;
            if state.3 < max_weight {
                continue;
            }
            state.3 -= max_weight;
            // The node's next preferred slot that is still free.
            loop {
                let slot = (state.0 + state.2 * state.1) % size;
                state.2 += 1;
                if table[slot as usize] == NO_NODE {
                    table[slot as usize] = node.id;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
}

/// The hash of a flow's 5-tuple, seeded so that every forwarder of a PoP
/// (same seed) picks the same slot for the same flow. Addresses are 16
/// bytes (IPv4 in the first four, the rest zero); ports are 0 for protocols
/// without them.
#[inline(always)]
pub const fn flow_hash(
    seed: u64,
    src: &[u8; 16],
    dst: &[u8; 16],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
) -> u32 {
    flow_hash_words(
        seed,
        address_words(src),
        address_words(dst),
        src_port,
        dst_port,
        protocol,
    )
}

/// A 16-byte address as the two little-endian words `flow_hash` mixes.
#[inline(always)]
pub const fn address_words(a: &[u8; 16]) -> [u64; 2] {
    [
        u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    ]
}

/// An IPv4 address's words: the same as `address_words` of it widened to
/// 16 bytes, without the 16 bytes (the XDP program's stack is small).
#[inline(always)]
pub const fn address_words_v4(a: [u8; 4]) -> [u64; 2] {
    [u32::from_le_bytes(a) as u64, 0]
}

/// `flow_hash` of addresses given as their words.
#[inline(always)]
pub const fn flow_hash_words(
    seed: u64,
    src: [u64; 2],
    dst: [u64; 2],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
) -> u32 {
    let mut h = mix64(seed ^ ((protocol as u64) << 32 | (src_port as u64) << 16 | dst_port as u64));
    h = mix64(h ^ src[0]);
    h = mix64(h ^ src[1]);
    h = mix64(h ^ dst[0]);
    h = mix64(h ^ dst[1]);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashMap, vec, vec::Vec};

    use super::*;

    fn build(pool: &[PoolNode], size: u32) -> Vec<u32> {
        let mut pool = pool.to_vec();
        let mut table = vec![0u32; size as usize];
        let mut scratch = vec![(0, 0, 0, 0); pool.len()];
        populate(&mut pool, &mut table, &mut scratch);
        table
    }

    /// A node whose key is derived from its id, as the host derives it from
    /// the node's name.
    fn node(id: u32, weight: u32) -> PoolNode {
        PoolNode {
            id,
            key: mix64(u64::from(id)),
            weight,
        }
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for &id in table {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    fn equal_pool(n: u32) -> Vec<PoolNode> {
        (0..n).map(|i| node(1000 + i * 7, 1)).collect()
    }

    #[test]
    fn default_size_is_prime_and_primality_is_right() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(2) && is_prime(3) && is_prime(251) && is_prime(655_373));
        assert!(
            !is_prime(0) && !is_prime(1) && !is_prime(65_536) && !is_prime(65_535) && !is_prime(9)
        );
    }

    #[test]
    fn balance_is_within_one_percent_of_weight_shares() {
        for pool in [
            equal_pool(10),
            equal_pool(100),
            vec![node(1, 1), node(2, 2), node(3, 3), node(4, 4)],
            vec![node(9, 100), node(5, 37), node(77, 1)],
        ] {
            let table = build(&pool, DEFAULT_TABLE_SIZE);
            let got = shares(&table);
            let total: u32 = pool.iter().map(|n| n.weight).sum();
            for node in &pool {
                let want = node.weight as f64 / total as f64;
                let have = got[&node.id] as f64 / DEFAULT_TABLE_SIZE as f64;
                assert!(
                    (have - want).abs() <= 0.01 * want,
                    "node {} weight {}/{total}: share {have:.5}, want {want:.5}",
                    node.id,
                    node.weight
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_at_most_one_nth_plus_one_percent() {
        for n in [5u32, 10, 50, 200] {
            let pool = equal_pool(n);
            let before = build(&pool, DEFAULT_TABLE_SIZE);
            for gone in [0usize, n as usize / 2, n as usize - 1] {
                let mut rest = pool.clone();
                rest.remove(gone);
                let after = build(&rest, DEFAULT_TABLE_SIZE);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64;
                let bound = DEFAULT_TABLE_SIZE as f64 / n as f64 + 0.01 * DEFAULT_TABLE_SIZE as f64;
                assert!(
                    moved <= bound,
                    "n {n}, removed #{gone}: {moved} entries moved, bound {bound}"
                );
                // Entries of the removed node must all move, and only to others.
                assert!(after.iter().all(|&id| id != pool[gone].id));
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_the_order_of_the_pool() {
        let pool = equal_pool(37);
        let mut reversed = pool.clone();
        reversed.reverse();
        let mut shuffled = pool.clone();
        shuffled.rotate_left(11);
        shuffled.swap(3, 30);
        let a = build(&pool, DEFAULT_TABLE_SIZE);
        assert_eq!(a, build(&reversed, DEFAULT_TABLE_SIZE));
        assert_eq!(a, build(&shuffled, DEFAULT_TABLE_SIZE));
    }

    #[test]
    fn drained_and_empty_pools() {
        let mut pool = equal_pool(4);
        pool[2].weight = 0;
        let table = build(&pool, 251);
        assert!(table.iter().all(|&id| id != pool[2].id && id != NO_NODE));
        assert!(build(&[], 251).iter().all(|&id| id == NO_NODE));
        let all_drained: Vec<_> = pool.iter().map(|n| PoolNode { weight: 0, ..*n }).collect();
        assert!(build(&all_drained, 251).iter().all(|&id| id == NO_NODE));
    }

    #[test]
    fn flow_hash_is_deterministic_seeded_and_spreads() {
        let a = [10, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let h = flow_hash(7, &a, &b, 40000, 443, 6);
        assert_eq!(h, flow_hash(7, &a, &b, 40000, 443, 6));
        assert_ne!(h, flow_hash(8, &a, &b, 40000, 443, 6));
        assert_ne!(h, flow_hash(7, &b, &a, 40000, 443, 6));
        assert_ne!(h, flow_hash(7, &a, &b, 40000, 443, 17));
        // 200,000 flows over 1,000 buckets: a uniform hash gives counts of
        // 200 +- 14 (binomial); every bucket within 5 sigma, and Pearson's
        // chi-square (999 degrees of freedom) within 5 sigma of its mean.
        let mut buckets = vec![0u32; 1000];
        for port in 0..200_000u32 {
            let mut src = a;
            src[3] = (port >> 16) as u8;
            let h = flow_hash(7, &src, &b, port as u16, 443, 6);
            buckets[(h % 1000) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&c| (130..=270).contains(&c)),
            "{:?}",
            (buckets.iter().min(), buckets.iter().max())
        );
        let chi2: f64 = buckets
            .iter()
            .map(|&c| (c as f64 - 200.0).powi(2) / 200.0)
            .sum();
        assert!(
            chi2 < 999.0 + 5.0 * (2.0f64 * 999.0).sqrt(),
            "chi-square {chi2}"
        );
    }
}
