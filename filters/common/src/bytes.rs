//! Byte-string equality and hashing eight bytes at a time. On wasm32 the compiler's `memcmp`
//! compares one byte per loop turn; the filters compare and hash label strings and header
//! values on every request, so this is where instructions go.

/// Whether `a` and `b` hold the same bytes.
#[inline]
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let length = a.len();
    if length < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    let mut index = 0;
    // Four words per turn, one branch: the loop's own instructions dominate on wasm32.
    while index + 32 <= length {
        let difference = (word_at(a, index) ^ word_at(b, index))
            | (word_at(a, index + 8) ^ word_at(b, index + 8))
            | (word_at(a, index + 16) ^ word_at(b, index + 16))
            | (word_at(a, index + 24) ^ word_at(b, index + 24));
        if difference != 0 {
            return false;
        }
        index += 32;
    }
    while index + 8 <= length {
        if word_at(a, index) != word_at(b, index) {
            return false;
        }
        index += 8;
    }
    // The last word, overlapping what was compared: no byte-by-byte tail.
    index == length || word_at(a, length - 8) == word_at(b, length - 8)
}

/// The position of the first `needle` in `haystack`, eight bytes per step (the classic
/// "has a zero byte" test on `word ^ needle×8`; the lowest flagged byte is always a match).
pub fn find_byte(haystack: &[u8], needle: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES * u64::from(needle);
    let mut index = 0;
    while index + 8 <= haystack.len() {
        let word = word_at(haystack, index) ^ pattern;
        let found = word.wrapping_sub(ONES) & !word & HIGHS;
        if found != 0 {
            return Some(index + (found.trailing_zeros() / 8) as usize);
        }
        index += 8;
    }
    while index < haystack.len() {
        if haystack[index] == needle {
            return Some(index);
        }
        index += 1;
    }
    None
}

/// How many times `needle` occurs in `haystack`, eight bytes per step (an exact per-byte
/// zero test on `word ^ needle×8`, then a population count).
pub fn count_byte(haystack: &[u8], needle: u8) -> usize {
    const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let pattern = 0x0101_0101_0101_0101 * u64::from(needle);
    let mut count = 0;
    let mut index = 0;
    while index + 8 <= haystack.len() {
        let word = word_at(haystack, index) ^ pattern;
        let nonzero = ((word & LOWS) + LOWS) | word;
        count += (!nonzero & !LOWS).count_ones() as usize;
        index += 8;
    }
    count
        + haystack[index..]
            .iter()
            .filter(|&&byte| byte == needle)
            .count()
}

/// The eight bytes of `bytes` at `index` as a word; `index + 8` must not pass the end.
#[inline(always)]
fn word_at(bytes: &[u8], index: usize) -> u64 {
    debug_assert!(index + 8 <= bytes.len());
    // SAFETY: callers keep `index + 8 <= bytes.len()`; the read is unaligned-safe.
    u64::from_le(unsafe { bytes.as_ptr().add(index).cast::<u64>().read_unaligned() })
}

/// FxHash's constant: a multiply-rotate hash, fast and good enough for bounded per-VM tables.
const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// Mixes `value` into `hash`.
pub fn mix(hash: u64, value: u64) -> u64 {
    (hash.rotate_left(5) ^ value).wrapping_mul(SEED)
}

/// The hash of `bytes` (its length included), continuing from `hash`.
pub fn hash(mut hash: u64, bytes: &[u8]) -> u64 {
    hash = mix(hash, bytes.len() as u64);
    let mut index = 0;
    while index + 8 <= bytes.len() {
        hash = mix(hash, word_at(bytes, index));
        index += 8;
    }
    let mut tail = 0u64;
    while index < bytes.len() {
        tail = tail << 8 | u64::from(bytes[index]);
        index += 1;
    }
    mix(hash, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn equality_is_byte_equality_at_every_length() {
        let base: Vec<u8> = (0..40u8).collect();
        for length in 0..base.len() {
            let a = &base[..length];
            assert!(equal(a, a));
            for index in 0..length {
                let mut b = a.to_vec();
                b[index] ^= 1;
                assert!(!equal(a, &b), "length {length}, index {index}");
            }
            assert!(!equal(a, &base[..length + 1]));
        }
    }

    #[test]
    fn find_byte_finds_the_first_match_anywhere() {
        for length in 0..40 {
            for at in 0..length {
                let mut haystack = vec![b'a'; length];
                haystack[at] = b',';
                if at + 3 < length {
                    haystack[at + 3] = b',';
                }
                assert_eq!(find_byte(&haystack, b','), Some(at), "{length} {at}");
            }
            assert_eq!(find_byte(&vec![b'a'; length], b','), None);
        }
        // Bytes just above and below the needle, and 0x80 bytes, are not matches.
        let tricky = [0x2d, 0x2b, 0x80, 0xac, 0x01, 0x2c];
        assert_eq!(find_byte(&tricky, 0x2c), Some(5));
        assert_eq!(find_byte(&[0u8; 9], 0), Some(0));
    }

    #[test]
    fn count_byte_counts_exactly() {
        for length in 0..40usize {
            let haystack: Vec<u8> = (0..length)
                .map(|i| if i % 3 == 0 { b',' } else { (i * 37) as u8 })
                .collect();
            let expected = haystack.iter().filter(|&&b| b == b',').count();
            assert_eq!(count_byte(&haystack, b','), expected, "{length}");
        }
        assert_eq!(
            count_byte(&[0x2c, 0xac, 0x2d, 0x2b, 0x80, 0x2c, 0, 0x2c], 0x2c),
            3
        );
    }

    #[test]
    fn hashes_differ_with_content_and_length() {
        assert_eq!(hash(0, b"service.name"), hash(0, b"service.name"));
        assert_ne!(hash(0, b"service.name"), hash(0, b"service.namf"));
        assert_ne!(hash(0, b"a"), hash(0, b"a\0"));
        assert_ne!(hash(0, b""), hash(0, b"\0"));
    }
}
