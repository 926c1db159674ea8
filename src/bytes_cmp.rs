//! Byte comparison a word at a time, for the static musl builds.
//!
//! Comparing strings and byte slices compiles to calls of `bcmp` (equal or not) and `memcmp`
//! (which is less). In the static musl builds both come from zig's compiler_rt, which compares
//! a byte at a time; the proxy compares header names and values, HPACK table entries and metric
//! keys on every request, and `bcmp` alone was 2 % of box B's CPU time under load
//! (BENCHMARKS.md, "Box B sampled"). `src/main.rs` exports these under the C names in those
//! builds, where they take the place of compiler_rt's (which are weak).
//!
//! Nothing here may compare slices with `==` or `cmp`: that would call the function itself.

/// The first index below `n` where the bytes at `a` and `b` differ.
///
/// # Safety
///
/// `a` and `b` must each point to `n` readable bytes (any alignment).
unsafe fn first_difference(a: *const u8, b: *const u8, n: usize) -> Option<usize> {
    const WORD: usize = std::mem::size_of::<usize>();
    let mut i = 0;
    while n - i >= WORD {
        // SAFETY: `i + WORD <= n`, so the word lies inside both buffers; read unaligned.
        let (x, y) = unsafe { (a.add(i).cast::<usize>().read_unaligned(), b.add(i).cast::<usize>().read_unaligned()) };
        if x != y {
            // The byte at the lowest address is the least significant on little-endian
            // machines, the most significant on big-endian ones.
            let diff = x ^ y;
            let bits = if cfg!(target_endian = "little") { diff.trailing_zeros() } else { diff.leading_zeros() };
            return Some(i + bits as usize / 8);
        }
        i += WORD;
    }
    while i < n {
        // SAFETY: `i < n`.
        if unsafe { *a.add(i) != *b.add(i) } {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// C's `bcmp`: 0 when the `n` bytes at `a` and `b` are equal, else non-zero.
///
/// # Safety
///
/// As [`first_difference`].
pub unsafe fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: passed on.
    i32::from(unsafe { first_difference(a, b, n) }.is_some())
}

/// C's `memcmp`: less than, equal to or greater than 0 as the `n` bytes at `a` are less than,
/// equal to or greater than those at `b` (the first differing byte decides, as unsigned bytes).
///
/// # Safety
///
/// As [`first_difference`].
pub unsafe fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: passed on; the index found is below `n`.
    unsafe { first_difference(a, b, n).map_or(0, |i| i32::from(*a.add(i)) - i32::from(*b.add(i))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: a byte at a time, without slice comparison (which would itself call a
    /// `memcmp`, compiler_rt's in the musl test builds).
    fn reference(a: &[u8], b: &[u8]) -> i32 {
        a.iter().zip(b).find(|(x, y)| x != y).map_or(0, |(x, y)| i32::from(*x) - i32::from(*y))
    }

    #[test]
    fn every_length_offset_and_first_difference_agrees_with_a_byte_at_a_time() {
        let base: Vec<u8> = (0..80u32).map(|i| (i * 37 % 251) as u8).collect();
        for len in 0..=40 {
            for (offset, b_offset) in (0..8).flat_map(|a| (0..8).map(move |b| (a, b))) {
                let a = &base[offset..offset + len];
                let mut copy = vec![0u8; len + 8];
                copy[b_offset..b_offset + len].copy_from_slice(a);
                // SAFETY: both slices are `len` bytes long.
                let equal = |a: &[u8], b: &[u8]| unsafe {
                    (bcmp(a.as_ptr(), b.as_ptr(), len), memcmp(a.as_ptr(), b.as_ptr(), len))
                };
                assert_eq!(equal(a, &copy[b_offset..b_offset + len]), (0, 0), "len {len} offsets {offset}, {b_offset}");
                for at in 0..len {
                    for delta in [1u8, 128, 255] {
                        let mut b = copy.clone();
                        b[b_offset + at] = b[b_offset + at].wrapping_add(delta);
                        // A second difference after the first must not change the answer.
                        if at + 1 < len {
                            b[b_offset + len - 1] ^= 0x5a;
                        }
                        let b = &b[b_offset..b_offset + len];
                        let (eq, order) = equal(a, b);
                        assert_ne!(eq, 0, "len {len} offset {offset} differing at {at}");
                        // C asks for the sign only.
                        let expected = reference(a, b).signum();
                        assert_eq!(order.signum(), expected, "len {len} offset {offset} differing at {at} by {delta}");
                        // SAFETY: as above.
                        let reversed = unsafe { memcmp(b.as_ptr(), a.as_ptr(), len) };
                        assert_eq!(reversed.signum(), -expected);
                    }
                }
            }
        }
    }
}
