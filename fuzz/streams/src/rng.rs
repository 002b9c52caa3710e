//! A small, fast, seedable generator (SplitMix64): every stream's randomness comes from
//! `(seed, configuration, stream index)` alone, so that any stream can be replayed by itself.

pub struct Rng(u64);

impl Rng {
    pub fn for_stream(seed: u64, config: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        rng.0 ^= rng.next_u64() ^ config.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        rng.0 ^= rng.next_u64() ^ stream.wrapping_mul(0x94d0_49bb_1331_11eb);
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}
