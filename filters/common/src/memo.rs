//! A small cache of results keyed by the exact bytes of their inputs. The same peer sends the
//! same claims request after request; with this, a repeated input costs one hash and one
//! comparison instead of a parse, a trust decision and an encoding. Bounded: once full, each new
//! entry replaces the oldest, so forged inputs can evict but never grow it.
//!
//! A key is a list of byte strings (the inputs of one computation, in order); two keys are equal
//! only when every part is byte-for-byte equal, so a hit returns exactly what the computation
//! would have returned.

/// Entries kept by default: a sidecar talks to a handful of peers at a time.
pub const DEFAULT_CAPACITY: usize = 32;

pub struct Memo<V> {
    entries: Vec<Entry<V>>,
    /// The entry replaced next once full (round robin: the oldest insertion).
    next: usize,
    /// The entry found or stored last: compared first, without hashing (the same peer
    /// calling again is the common case).
    recent: std::cell::Cell<usize>,
    capacity: usize,
}

struct Entry<V> {
    hash: u64,
    /// The parts, each preceded by its length as 4 little-endian bytes.
    key: Box<[u8]>,
    value: V,
}

/// The hash of a key's parts (lengths included, so `["ab", "c"]` and `["a", "bc"]` differ).
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(0, |hash, part| crate::bytes::hash(hash, part))
}

fn key_equals(stored: &[u8], parts: &[&[u8]]) -> bool {
    let mut rest = stored;
    for part in parts {
        let Some((length, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        if u32::from_le_bytes(*length) as usize != part.len() {
            return false;
        }
        let Some((bytes, tail)) = tail.split_at_checked(part.len()) else {
            return false;
        };
        if !crate::bytes::equal(bytes, part) {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

impl<V> Memo<V> {
    pub fn new(capacity: usize) -> Memo<V> {
        Memo {
            entries: Vec::with_capacity(capacity.max(1)),
            next: 0,
            recent: std::cell::Cell::new(0),
            capacity: capacity.max(1),
        }
    }

    /// The value stored for exactly these parts.
    pub fn get(&self, parts: &[&[u8]]) -> Option<&V> {
        self.position(parts).map(|index| &self.entries[index].value)
    }

    fn position(&self, parts: &[&[u8]]) -> Option<usize> {
        let recent = self.recent.get();
        if self
            .entries
            .get(recent)
            .is_some_and(|entry| key_equals(&entry.key, parts))
        {
            return Some(recent);
        }
        let hash = hash_parts(parts);
        let index = self
            .entries
            .iter()
            .position(|entry| entry.hash == hash && key_equals(&entry.key, parts))?;
        self.recent.set(index);
        Some(index)
    }

    /// Stores `value` for these parts (replacing the oldest entry when full) and returns it.
    pub fn insert(&mut self, parts: &[&[u8]], value: V) -> &V {
        let mut key = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
        for part in parts {
            key.extend_from_slice(&(part.len() as u32).to_le_bytes());
            key.extend_from_slice(part);
        }
        let entry = Entry {
            hash: hash_parts(parts),
            key: key.into_boxed_slice(),
            value,
        };
        let index = if self.entries.len() < self.capacity {
            self.entries.push(entry);
            self.entries.len() - 1
        } else {
            let index = self.next;
            self.entries[index] = entry;
            self.next = (index + 1) % self.capacity;
            index
        };
        self.recent.set(index);
        &self.entries[index].value
    }

    /// Stores `value` for these parts, replacing what was stored for them (if anything).
    pub fn put(&mut self, parts: &[&[u8]], value: V) {
        match self.position(parts) {
            Some(index) => self.entries[index].value = value,
            None => {
                self.insert(parts, value);
            }
        }
    }

    /// The value for these parts, computed by `compute` (and stored) on a miss.
    pub fn get_or_insert_with(&mut self, parts: &[&[u8]], compute: impl FnOnce() -> V) -> &V {
        match self.position(parts) {
            Some(index) => &self.entries[index].value,
            None => self.insert(parts, compute()),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_hit_needs_every_part_equal() {
        let mut memo = Memo::new(4);
        memo.insert(&[b"ab", b"c"], 1);
        assert_eq!(memo.get(&[b"ab", b"c"]), Some(&1));
        assert_eq!(memo.get(&[b"a", b"bc"]), None, "part boundaries matter");
        assert_eq!(memo.get(&[b"ab"]), None);
        assert_eq!(memo.get(&[b"ab", b"c", b""]), None);
        assert_eq!(memo.get(&[b"ab", b"d"]), None);
    }

    #[test]
    fn put_replaces_the_value_of_the_same_key() {
        let mut memo = Memo::new(4);
        memo.put(&[b"k"], 1);
        memo.put(&[b"k"], 2);
        assert_eq!(memo.get(&[b"k"]), Some(&2));
        assert_eq!(memo.len(), 1);
    }

    #[test]
    fn computes_once_per_distinct_input() {
        let mut memo = Memo::new(4);
        let mut computed = 0;
        for _ in 0..3 {
            memo.get_or_insert_with(&[b"peer"], || {
                computed += 1;
                7
            });
        }
        assert_eq!(computed, 1);
    }

    #[test]
    fn stays_bounded_and_evicts_the_oldest() {
        let mut memo = Memo::new(3);
        for i in 0..10_000u32 {
            memo.insert(&[&i.to_le_bytes()], i);
        }
        assert_eq!(memo.len(), 3);
        assert_eq!(memo.get(&[&9_999u32.to_le_bytes()]), Some(&9_999));
        assert_eq!(memo.get(&[&0u32.to_le_bytes()]), None);
    }
}
