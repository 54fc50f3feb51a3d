//! Internet checksum arithmetic (RFC 1071) and its incremental update
//! (RFC 1624), shared by the XDP program and the host's tests.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after one 16-bit word of the covered data changes from `old` to
/// `new`: HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3). Eqn. 3 rather than the
/// RFC 1141 form so that a result of 0xffff is never produced from a valid
/// header. Values are the words as read in network byte order.
#[inline(always)]
pub const fn update_word(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// The IPv4 header checksum after the TTL drops by one. TTL shares its
/// 16-bit word with the protocol field, so only that word changes.
#[inline(always)]
pub const fn after_ttl_decrement(check: u16, ttl: u8, protocol: u8) -> u16 {
    let old = u16::from_be_bytes([ttl, protocol]);
    let new = u16::from_be_bytes([ttl.wrapping_sub(1), protocol]);
    update_word(check, old, new)
}

/// The one's-complement sum of `data` (RFC 1071), not yet inverted, below
/// 0x20000. An odd trailing byte is padded with zero. Inlined: the XDP
/// program sums the header and options with it, and a call there would
/// be a BPF-to-BPF call with a frame of its own.
#[inline(always)]
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u32;
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = words.remainder() {
        acc += u16::from_be_bytes([*last, 0]) as u32;
    }
    acc
}

/// The one's-complement sum of `words` as read from memory in the host's
/// byte order, not yet folded: below 0x10000 * `words.len()`, so any header
/// (at most 30 words) fits a u32 many times over. RFC 1071 (2.B): the sum of byte-swapped words is the
/// byte-swapped sum, so summing words as they lie in memory, with no swap,
/// gives the checksum's bytes in memory order. The XDP program's checks and
/// rewrites use this form: two-byte loads and adds, against two byte loads,
/// shifts, a swap and a fold per word for `sum`.
#[inline(always)]
pub fn sum_ne(words: &[u16]) -> u32 {
    let mut acc: u32 = 0;
    for &w in words {
        acc += u32::from(w);
    }
    acc
}

/// `after_ttl_decrement` on words as they lie in memory (see `sum_ne`):
/// `check` is the header's checksum field and `ttl_protocol` the word of
/// its TTL and protocol, both read in the host's byte order; the result is
/// written back the same way. The TTL is the word's first byte, so one less
/// TTL is the word less `from_ne_bytes([1, 0])` (the caller has checked the
/// TTL is above 1: no borrow).
#[inline(always)]
pub const fn after_ttl_decrement_ne(check: u16, ttl_protocol: u16) -> u16 {
    let new = ttl_protocol.wrapping_sub(u16::from_ne_bytes([1, 0]));
    update_word(check, ttl_protocol, new)
}

/// The checksum an IPv4 header should carry, computed from scratch with its
/// checksum field taken as zero. `header` is the whole header, options too.
pub fn ipv4_header(header: &[u8]) -> u16 {
    let mut acc = sum(header);
    if header.len() >= 12 {
        // Take the stored checksum back out, as if the field were zero.
        acc += (!u16::from_be_bytes([header[10], header[11]])) as u32;
    }
    !fold(acc)
}

/// True if an IPv4 header's checksum is right: its whole sum folds to 0xffff.
pub fn ipv4_header_valid(header: &[u8]) -> bool {
    fold(sum(header)) == 0xffff
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// A 20-byte header with options-free layout; checksum filled in.
    fn header(ttl: u8, proto: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0x00, 0x00, 0x54, 0x1c, 0x46, 0x40, 0x00, ttl, proto, 0, 0, 10, 0, 1, 2, 10, 0,
            3, 4,
        ];
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn full_checksum_matches_known_value() {
        // RFC 1071 style example from a captured ICMP echo header.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h), 0xb861);
        assert!(ipv4_header_valid(&h));
    }

    #[test]
    fn ttl_decrement_matches_recomputation_for_every_ttl_and_protocol() {
        for ttl in 2..=255u8 {
            for proto in [1u8, 6, 17, 41, 47, 255] {
                let h = header(ttl, proto);
                let check = u16::from_be_bytes([h[10], h[11]]);
                let updated = after_ttl_decrement(check, ttl, proto);
                let mut expect = h;
                expect[8] = ttl - 1;
                assert_eq!(updated, ipv4_header(&expect), "ttl {ttl} proto {proto}");
                expect[10..12].copy_from_slice(&updated.to_be_bytes());
                assert!(ipv4_header_valid(&expect));
            }
        }
    }

    #[test]
    fn update_word_handles_carry_and_zero_sums() {
        // Exhaustive over the old word for a few checksums: the update must
        // equal recomputing from the changed data.
        for check_seed in [0x0000u16, 0x0001, 0x7fff, 0xfffe] {
            for old in (0..=u16::MAX).step_by(257) {
                let new = old.wrapping_add(0x0100);
                // Data of two words: `old` and a filler making the checksum `check_seed`-ish.
                let filler = check_seed;
                let check = !fold(old as u32 + filler as u32);
                let expect = !fold(new as u32 + filler as u32);
                let got = update_word(check, old, new);
                // One's complement has two zeros; both are the same checksum.
                assert!(
                    got == expect
                        || (got == 0xffff && expect == 0)
                        || (got == 0 && expect == 0xffff),
                    "check {check:#x} old {old:#x} new {new:#x}: {got:#x} != {expect:#x}"
                );
            }
        }
    }

    /// The words of `h` as the XDP program reads them from memory.
    fn words_ne(h: &[u8]) -> std::vec::Vec<u16> {
        h.chunks_exact(2)
            .map(|w| u16::from_ne_bytes([w[0], w[1]]))
            .collect()
    }

    #[test]
    fn memory_order_sums_judge_headers_as_network_order_ones_do() {
        // Valid headers of every TTL, then each with one bit flipped (a
        // header damaged on the way), and the checksum's two zeros.
        let mut headers = std::vec::Vec::new();
        for ttl in 0..=255u8 {
            let h = header(ttl, 17);
            headers.push(h);
            let mut damaged = h;
            damaged[usize::from(ttl) % 20] ^= 1 << (ttl % 8);
            headers.push(damaged);
        }
        let mut zero = [0u8; 20];
        headers.push(zero);
        zero[10] = 0xff;
        zero[11] = 0xff;
        headers.push(zero);
        for h in headers {
            assert_eq!(
                fold(sum_ne(&words_ne(&h))) == 0xffff,
                ipv4_header_valid(&h),
                "{h:02x?}"
            );
        }
        // And a sum in memory order is the swapped sum in network order.
        let h = header(64, 6);
        let mut check = h;
        check[10] = 0;
        check[11] = 0;
        let c = (!fold(sum_ne(&words_ne(&check)))).to_ne_bytes();
        assert_eq!(c, [h[10], h[11]]);
    }

    #[test]
    fn memory_order_ttl_decrement_matches_recomputation() {
        for ttl in 2..=255u8 {
            for proto in [1u8, 6, 17, 41, 47, 255] {
                let h = header(ttl, proto);
                let updated = after_ttl_decrement_ne(
                    u16::from_ne_bytes([h[10], h[11]]),
                    u16::from_ne_bytes([h[8], h[9]]),
                );
                let mut expect = h;
                expect[8] = ttl - 1;
                assert_eq!(
                    updated.to_ne_bytes(),
                    ipv4_header(&expect).to_be_bytes(),
                    "ttl {ttl} proto {proto}"
                );
            }
        }
    }

    #[test]
    fn odd_length_sum_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}
