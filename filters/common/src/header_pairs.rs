//! The proxy-wasm encoding of a header map ("pairs"): a little-endian `u32` count, then a
//! `u32` key size and `u32` value size per pair, then each key and value followed by a NUL.
//! Decoded here without trusting the sizes, so that a host bug cannot make a filter trap.

/// Every pair in order; `None` when the buffer is inconsistent with its own sizes.
pub fn decode(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let read_u32 = |offset: usize| -> Option<usize> {
        let word = bytes.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize)
    };
    let count = read_u32(0)?;
    let sizes_end = count.checked_mul(8)?.checked_add(4)?;
    if sizes_end > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    let mut data = sizes_end;
    for index in 0..count {
        let key_size = read_u32(4 + index * 8)?;
        let value_size = read_u32(8 + index * 8)?;
        let key_end = data.checked_add(key_size)?;
        let key = bytes.get(data..key_end)?;
        let value_start = key_end.checked_add(1)?;
        let value_end = value_start.checked_add(value_size)?;
        let value = bytes.get(value_start..value_end)?;
        data = value_end.checked_add(1)?;
        pairs.push((key, value));
    }
    Some(pairs)
}

/// Encodes pairs the same way (used by tests and by hosts).
pub fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The values of every header called `name` (ASCII case ignored), in order, read straight
/// from the encoded map without decoding the other pairs; `None` when the buffer is
/// inconsistent with its own sizes.
pub fn values_in<'a>(bytes: &'a [u8], name: &str) -> Option<Vec<&'a [u8]>> {
    let mut values = Vec::new();
    if bytes.is_empty() {
        return Some(values);
    }
    let size_at = |offset: usize| -> u64 {
        debug_assert!(offset + 4 <= bytes.len());
        // SAFETY: the size table was checked to fit in `bytes` before the loop; the read is
        // unaligned-safe. (Indexing byte by byte costs four bounds checks per size.)
        u64::from(u32::from_le(unsafe {
            bytes.as_ptr().add(offset).cast::<u32>().read_unaligned()
        }))
    };
    let count = size_at_checked(bytes, 0)? as usize;
    let table_end = count.checked_mul(8)?.checked_add(4)?;
    if table_end > bytes.len() {
        return None;
    }
    // Offsets in u64: a u32 size per key and value cannot overflow them.
    let mut data = table_end as u64;
    let name_len = name.len() as u64;
    for index in 0..count {
        let key_size = size_at(4 + index * 8);
        let value_size = size_at(8 + index * 8);
        let key_end = data + key_size;
        let value_start = key_end + 1;
        let value_end = value_start + value_size;
        if value_end > bytes.len() as u64 {
            return None;
        }
        // Envoy's keys are lower case already: the first byte rules out nearly every other
        // header of the same length before the case-blind comparison.
        if key_size == name_len
            && name_len > 0
            && bytes[data as usize].eq_ignore_ascii_case(&name.as_bytes()[0])
        {
            let key = &bytes[data as usize..key_end as usize];
            if same_name(key, name.as_bytes()) {
                values.push(&bytes[value_start as usize..value_end as usize]);
            }
        }
        data = value_end + 1;
    }
    Some(values)
}

/// [`values_in`] for several names in one pass over the map (the scan, not the copying, is
/// what reading a header costs): the values of `names[i]` in the `i`th vector. (`values_in`
/// keeps its own loop: one name compiles to fewer instructions there.)
pub fn values_in_each<'a, const N: usize>(
    bytes: &'a [u8],
    names: [&str; N],
) -> Option<[Vec<&'a [u8]>; N]> {
    let mut found: [Vec<&'a [u8]>; N] = std::array::from_fn(|_| Vec::new());
    if bytes.is_empty() {
        return Some(found);
    }
    let size_at = |offset: usize| -> u64 {
        debug_assert!(offset + 4 <= bytes.len());
        // SAFETY: the size table was checked to fit in `bytes` before the loop; the read is
        // unaligned-safe. (Indexing byte by byte costs four bounds checks per size.)
        u64::from(u32::from_le(unsafe {
            bytes.as_ptr().add(offset).cast::<u32>().read_unaligned()
        }))
    };
    let count = size_at_checked(bytes, 0)? as usize;
    let table_end = count.checked_mul(8)?.checked_add(4)?;
    if table_end > bytes.len() {
        return None;
    }
    // Offsets in u64: a u32 size per key and value cannot overflow them.
    let mut data = table_end as u64;
    for index in 0..count {
        let key_size = size_at(4 + index * 8);
        let value_size = size_at(8 + index * 8);
        let key_end = data + key_size;
        let value_start = key_end + 1;
        let value_end = value_start + value_size;
        if value_end > bytes.len() as u64 {
            return None;
        }
        // Envoy's keys are lower case already: the first byte rules out nearly every other
        // header of the same length before the case-blind comparison.
        for (name, values) in names.iter().zip(found.iter_mut()) {
            let name = name.as_bytes();
            if key_size == name.len() as u64
                && !name.is_empty()
                && bytes[data as usize].eq_ignore_ascii_case(&name[0])
            {
                let key = &bytes[data as usize..key_end as usize];
                if same_name(key, name) {
                    values.push(&bytes[value_start as usize..value_end as usize]);
                }
            }
        }
        data = value_end + 1;
    }
    Some(found)
}

/// A header name equal to `name` (lower case) without regard to ASCII case. Envoy's names are
/// lower case already, so the exact comparison (a word at a time) settles nearly every call;
/// the case-blind one, a byte at a time at some forty wasm instructions each, only runs for a
/// name that differs.
fn same_name(key: &[u8], name: &[u8]) -> bool {
    key == name || key.eq_ignore_ascii_case(name)
}

fn size_at_checked(bytes: &[u8], offset: usize) -> Option<u64> {
    let word = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u64::from(u32::from_le_bytes([
        word[0], word[1], word[2], word[3],
    ])))
}

/// The values of every header called `name` (compared without regard to ASCII case), in order.
pub fn values_of<'a>(pairs: &[(&'a [u8], &'a [u8])], name: &str) -> Vec<&'a [u8]> {
    pairs
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, value)| *value)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn several_names_in_one_pass() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"baggage", b"a=1"),
            (b"x-envoy-peer-metadata", b"one"),
            (b":path", b"/"),
            (b"Baggage", b"b=2"),
            (b"x-envoy-peer-metadata", b"two"),
        ];
        let map = encode(&pairs);
        let [baggage, metadata, absent] =
            values_in_each(&map, ["baggage", "x-envoy-peer-metadata", "x-other"]).unwrap();
        assert_eq!(baggage, [&b"a=1"[..], b"b=2"]);
        assert_eq!(metadata, [&b"one"[..], b"two"]);
        assert!(absent.is_empty());
        assert_eq!(values_in(&map, "baggage").unwrap(), baggage);
        assert_eq!(values_in_each(&map[..map.len() - 2], ["baggage"]), None);
    }

    #[test]
    fn round_trips_with_binary_names_and_values() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"baggage", b"a=1"),
            (b"\xff\xfe", b"\x00\x80"),
            (b"Baggage", b""),
        ];
        let encoded = encode(&pairs);
        let decoded = decode(&encoded).unwrap();
        assert_eq!(decoded, pairs);
        assert_eq!(values_of(&decoded, "baggage"), vec![&b"a=1"[..], &b""[..]]);
        assert_eq!(decode(&[]).unwrap(), vec![]);
        assert_eq!(
            values_in(&encoded, "baggage").unwrap(),
            vec![&b"a=1"[..], &b""[..]]
        );
        assert_eq!(values_in(&[], "baggage").unwrap(), Vec::<&[u8]>::new());
    }

    #[test]
    fn inconsistent_sizes_are_refused_not_trusted() {
        let encoded = encode(&[(b"k", b"value")]);
        assert!(decode(&encoded[..encoded.len() - 2]).is_none());
        let mut huge_count = encoded.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge_count).is_none());
        let mut huge_size = encoded;
        huge_size[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge_size).is_none());
        assert!(decode(&[1, 0]).is_none());
        assert!(values_in(&[1, 0], "k").is_none());
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest::proptest! {
        #[test]
        fn values_in_agrees_with_decode(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let expected = decode(&bytes).map(|pairs| values_of(&pairs, "k"));
            let scanned = values_in(&bytes, "k");
            if let Some(expected) = expected {
                proptest::prop_assert_eq!(scanned, Some(expected));
            }
        }
    }
}
