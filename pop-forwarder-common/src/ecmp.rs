//! ECMP next-hop groups: a route with several paths points at a group of
//! `GROUP_BUCKETS` buckets, each holding one member's next-hop id; a packet
//! takes the bucket its flow hash selects, so a flow stays on one path.
//!
//! Buckets are assigned by rendezvous (highest random weight) hashing: each
//! bucket goes to the member whose key scores highest for it, a member of
//! weight w taking part as w virtual members. That makes the table a pure
//! function of the member set, whatever order members were learned in, and
//! resilient in the sense of the kernel's resilient next-hop groups: when a
//! member leaves, only its buckets (its flows) move; when one joins, it
//! takes buckets from the others and nothing else moves.

use crate::maglev::mix64;

/// Buckets per group: how finely flows are spread (a member's share is a
/// multiple of 1/256, within a few percent of its weight's share).
pub const GROUP_BUCKETS: usize = 256;
/// Groups the `NEXT_HOP_GROUPS` table holds.
pub const MAX_GROUPS: u32 = 1024;
/// Members a group may have; a route with more paths is left to the kernel.
pub const MAX_GROUP_MEMBERS: usize = 64;
/// Weights are at most this (the kernel's: RTNH hops + 1).
pub const MAX_WEIGHT: u32 = 256;
/// A route target at or past this is group `target - FIRST_GROUP_ID`;
/// below it, a next-hop id (or LOCAL_NEXT_HOP / KERNEL_NEXT_HOP).
pub const FIRST_GROUP_ID: u32 = 8192;

/// Value of the `NEXT_HOP_GROUPS` array: the next-hop id of each bucket,
/// which is all the program reads; and, for the host (listing, adopting
/// pinned tables), the members and their weights. A free slot is all
/// zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NextHopGroup {
    pub buckets: [u16; GROUP_BUCKETS],
    /// Next-hop ids of the members, the first `count`.
    pub members: [u16; MAX_GROUP_MEMBERS],
    pub weights: [u16; MAX_GROUP_MEMBERS],
    /// Members; 0 for a free slot.
    pub count: u32,
    pub pad: u32,
}

/// The group a route target names, if it names one.
#[inline(always)]
pub const fn group_index(target: u32) -> Option<u32> {
    if target >= FIRST_GROUP_ID && target < FIRST_GROUP_ID + MAX_GROUPS {
        Some(target - FIRST_GROUP_ID)
    } else {
        None
    }
}

/// The bucket of a flow: one mix of its addresses (each folded to a word),
/// `extra` (ports and protocol, or IPv6 flow label and next header) and
/// the PoP's seed; the top byte of the result. Lighter than the Maglev
/// flow hash (one mix, not five): the XDP program's stack has no room for
/// more on the routing path.
#[inline(always)]
pub const fn flow_bucket(seed: u32, src: u64, dst: u64, extra: u64) -> usize {
    (mix64(src ^ dst.rotate_left(29) ^ extra.rotate_left(47) ^ seed as u64) >> 56) as usize
}

/// The IPv6 flow label of an IP-in-IP outer header (20 bits, never 0):
/// from the inner flow's source (its `maglev::address_words`), ports and
/// protocol (its destination, the VIP, is the same for all of a VIP's
/// flows), so that routers and NICs on the way, which hash the outer
/// header, spread a node's flows rather than put them all on one path or
/// queue (as Katran does).
#[inline(always)]
pub const fn entropy_label(src: [u64; 2], ports: u32, protocol: u8) -> u32 {
    let h = mix64(src[0] ^ src[1].rotate_left(29) ^ ((ports as u64) << 8 | protocol as u64));
    let label = (h ^ (h >> 32)) as u32 & 0x000f_ffff;
    if label == 0 { 1 } else { label }
}

/// A member's identity for hashing: its gateway and interface, the same on
/// every forwarder and after every restart (unlike its next-hop slot).
pub const fn member_key(gateway: &[u8; 16], ifindex: u32) -> u64 {
    let hi = u64::from_le_bytes([
        gateway[0], gateway[1], gateway[2], gateway[3], gateway[4], gateway[5], gateway[6],
        gateway[7],
    ]);
    let lo = u64::from_le_bytes([
        gateway[8],
        gateway[9],
        gateway[10],
        gateway[11],
        gateway[12],
        gateway[13],
        gateway[14],
        gateway[15],
    ]);
    mix64(mix64(mix64(ifindex as u64 ^ 0x6563_6d70) ^ hi) ^ lo)
}

/// Assigns every bucket to a member: `members` are (key, weight), weights
/// from 1 to `MAX_WEIGHT`; the result holds indexes into `members`. Equal
/// weights are reduced by their greatest common divisor first (a group of
/// weight-2 members is a group of weight-1 members). Returns None for an
/// empty group or a weight out of range.
pub fn assign(members: &[(u64, u32)]) -> Option<[u16; GROUP_BUCKETS]> {
    if members.is_empty() || members.len() > MAX_GROUP_MEMBERS {
        return None;
    }
    if members.iter().any(|&(_, w)| w == 0 || w > MAX_WEIGHT) {
        return None;
    }
    let divisor = members.iter().fold(0, |g, &(_, w)| gcd(g, w));
    let mut out = [0u16; GROUP_BUCKETS];
    for (bucket, slot) in out.iter_mut().enumerate() {
        let mut best = (0u64, 0u64);
        let mut winner = 0u16;
        for (i, &(key, weight)) in members.iter().enumerate() {
            for copy in 0..weight / divisor {
                let score = mix64(key ^ mix64(((copy as u64) << 32) | bucket as u64));
                // Ties (never in practice) go to the larger key, so the
                // result does not depend on the order of `members`.
                if (score, key) > best {
                    best = (score, key);
                    winner = i as u16;
                }
            }
        }
        *slot = winner;
    }
    Some(out)
}

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn keys(n: u64) -> impl Iterator<Item = (u64, u32)> {
        (1..=n).map(|i| (mix64(i), 1))
    }

    fn shares(buckets: &[u16; GROUP_BUCKETS], n: usize) -> [usize; 8] {
        let mut s = [0; 8];
        for &b in buckets {
            s[b as usize] += 1;
        }
        assert!(s[n..].iter().all(|&c| c == 0));
        s
    }

    #[test]
    fn equal_members_share_the_buckets_evenly() {
        for n in 2..=8 {
            let members: Vec<(u64, u32)> = keys(n as u64).collect();
            let buckets = assign(&members).unwrap();
            let fair = GROUP_BUCKETS / n;
            for (i, &count) in shares(&buckets, n)[..n].iter().enumerate() {
                // Rendezvous hashing over 256 buckets: within about three
                // standard deviations of the fair share.
                assert!(
                    count.abs_diff(fair) <= fair / 3 + 6,
                    "{n} members: member {i} has {count} buckets, fair is {fair}"
                );
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_member_order() {
        let members: Vec<(u64, u32)> = keys(5).collect();
        let a = assign(&members).unwrap();
        let mut reversed = members.clone();
        reversed.reverse();
        let b = assign(&reversed).unwrap();
        for bucket in 0..GROUP_BUCKETS {
            assert_eq!(
                members[a[bucket] as usize].0,
                reversed[b[bucket] as usize].0
            );
        }
    }

    #[test]
    fn only_a_leaving_members_buckets_move() {
        let members: Vec<(u64, u32)> = keys(4).collect();
        let before = assign(&members).unwrap();
        let gone = members[2].0;
        let rest: Vec<(u64, u32)> = members.iter().copied().filter(|m| m.0 != gone).collect();
        let after = assign(&rest).unwrap();
        let mut moved = 0;
        for bucket in 0..GROUP_BUCKETS {
            let was = members[before[bucket] as usize].0;
            let now = rest[after[bucket] as usize].0;
            if was != gone {
                assert_eq!(was, now, "bucket {bucket} moved off a member that stayed");
            } else {
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn a_joining_member_only_takes_buckets() {
        let members: Vec<(u64, u32)> = keys(3).collect();
        let before = assign(&members).unwrap();
        let mut more = members.clone();
        more.push((mix64(99), 1));
        let after = assign(&more).unwrap();
        for bucket in 0..GROUP_BUCKETS {
            let now = more[after[bucket] as usize].0;
            if now != mix64(99) {
                assert_eq!(members[before[bucket] as usize].0, now);
            }
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let members = [(mix64(1), 1), (mix64(2), 3)];
        let s = shares(&assign(&members).unwrap(), 2);
        assert!(
            (40..=88).contains(&s[0]),
            "weight 1 of 4 took {} of 256",
            s[0]
        );
        // Weights with a common factor are the same group.
        assert_eq!(
            assign(&members).unwrap(),
            assign(&[(mix64(1), 2), (mix64(2), 6)]).unwrap()
        );
    }

    #[test]
    fn bad_groups_are_refused() {
        assert_eq!(assign(&[]), None);
        assert_eq!(assign(&[(1, 0)]), None);
        assert_eq!(assign(&[(1, MAX_WEIGHT + 1)]), None);
        assert_eq!(group_index(FIRST_GROUP_ID - 1), None);
        assert_eq!(group_index(FIRST_GROUP_ID + 3), Some(3));
        assert_eq!(group_index(FIRST_GROUP_ID + MAX_GROUPS), None);
    }
}
