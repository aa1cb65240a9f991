//! Exact radius search over 64-bit hashes: multi-index hashing (MIH).
//!
//! Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index
//! Hashing" (CVPR 2012). The 64 bits are cut into `m` disjoint chunks; by
//! the pigeonhole principle two hashes within Hamming distance `r` agree to
//! within `⌊r/m⌋` bits on at least one chunk. Each chunk has a table
//! (CSR layout: `offsets[key]..offsets[key+1]` into `ids`), and a query
//! probes every key within `⌊r/m⌋` bits of its own chunk value. `m` is
//! picked by a cost model (probes × expected bucket size) under a memory
//! cap, so the search is sub-quadratic and *exact*: it finds every pair a
//! brute-force scan finds (tested).
//!
//! Why hand-written: the Rust BK-tree crates are fine for thousands of
//! hashes but degrade towards a linear scan at radius 8–10 on 64 bits
//! (most nodes are visited), and none offers an all-pairs join; MIH is
//! ~150 lines.

use rayon::prelude::*;

/// A pair of indices `(i, j)` with `i < j` and their Hamming distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pair {
    /// Smaller index.
    pub i: u32,
    /// Larger index.
    pub j: u32,
    /// Hamming distance between the two hashes.
    pub distance: u32,
}

struct Chunk {
    shift: u32,
    bits: u32,
    /// CSR offsets: entries with key `k` are `offsets[k]..offsets[k + 1]`.
    offsets: Vec<u32>,
    /// Hash indices sorted by key.
    ids: Vec<u32>,
    /// The hashes in the same order as `ids` (streamed, not gathered).
    sorted: Vec<u64>,
}

impl Chunk {
    fn key(&self, h: u64) -> u32 {
        ((h >> self.shift) & ((1u64 << self.bits) - 1)) as u32
    }
}

/// Multi-index over a fixed set of 64-bit hashes for a fixed radius.
pub struct MultiIndex {
    radius: u32,
    sub_radius: u32,
    chunks: Vec<Chunk>,
}

/// Largest chunk width (2^22 offsets = 16 MiB per chunk table).
const MAX_BITS: u32 = 22;

fn binom_sum(n: u32, k: u32) -> f64 {
    // Σ_{i=0..k} C(n, i)
    let mut total = 0.0;
    let mut c = 1.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            c = c * (n - i + 1) as f64 / i as f64;
        }
        total += c;
    }
    total
}

/// Choose the number of chunks for `n` hashes at `radius`.
fn choose_chunks(n: usize, radius: u32) -> u32 {
    let max_bits = ((n.max(2) as f64).log2().ceil() as u32 + 2).clamp(8, MAX_BITS);
    let mut best = (f64::INFINITY, 64u32.div_ceil(max_bits));
    for m in 64u32.div_ceil(max_bits)..=32 {
        let bits = 64 / m; // the narrowest chunk
        let s = radius / m;
        let probes = binom_sum(bits, s);
        let bucket = n as f64 / (1u64 << bits) as f64;
        let cost = m as f64 * probes * (1.0 + bucket);
        if cost < best.0 {
            best = (cost, m);
        }
    }
    best.1
}

impl MultiIndex {
    /// Build the index over `hashes` for searches of radius `radius` (≤ 32).
    pub fn new(hashes: &[u64], radius: u32) -> Self {
        let radius = radius.min(32);
        let m = choose_chunks(hashes.len(), radius);
        let (base, extra) = (64 / m, 64 % m);
        let mut shift = 0;
        let specs: Vec<(u32, u32)> = (0..m)
            .map(|c| {
                let bits = base + u32::from(c < extra);
                let s = shift;
                shift += bits;
                (s, bits)
            })
            .collect();
        let chunks = specs
            .into_par_iter()
            .map(|(shift, bits)| {
                let mut chunk = Chunk {
                    shift,
                    bits,
                    offsets: vec![0u32; (1usize << bits) + 1],
                    ids: vec![0u32; hashes.len()],
                    sorted: vec![0u64; hashes.len()],
                };
                for &h in hashes {
                    let k = chunk.key(h) as usize;
                    chunk.offsets[k + 1] += 1;
                }
                for k in 1..chunk.offsets.len() {
                    chunk.offsets[k] += chunk.offsets[k - 1];
                }
                let mut fill = chunk.offsets.clone();
                for (id, &h) in hashes.iter().enumerate() {
                    let k = chunk.key(h) as usize;
                    chunk.ids[fill[k] as usize] = id as u32;
                    chunk.sorted[fill[k] as usize] = h;
                    fill[k] += 1;
                }
                chunk
            })
            .collect();
        Self {
            radius,
            sub_radius: radius / m,
            chunks,
        }
    }

    /// Number of chunks in use.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Every pair `(i, j)`, `i < j`, with Hamming distance ≤ radius, sorted.
    ///
    /// The work is one task per (chunk, probe mask): each task streams over
    /// the hashes in key order and looks up `key ^ mask`, so table accesses
    /// move monotonically through memory instead of jumping at random
    /// (about 10× faster than probing query by query at a million hashes).
    /// A pair is reported only from the first chunk on which the two hashes
    /// agree within the sub-radius, so each pair appears once.
    pub fn all_pairs(&self) -> Vec<Pair> {
        let mut tasks: Vec<(usize, u32)> = Vec::new();
        for (c, chunk) in self.chunks.iter().enumerate() {
            for_each_within(0, chunk.bits, self.sub_radius, &mut |mask| {
                tasks.push((c, mask))
            });
        }
        let mut pairs: Vec<Pair> = tasks
            .par_iter()
            .fold(Vec::new, |mut acc, &(c, mask)| {
                self.scan(c, mask, &mut acc);
                acc
            })
            .reduce(Vec::new, |mut a, mut b| {
                a.append(&mut b);
                a
            });
        pairs.par_sort_unstable();
        pairs
    }

    /// Pairs whose chunk-`c` keys differ by exactly `mask`.
    fn scan(&self, c: usize, mask: u32, out: &mut Vec<Pair>) {
        let chunk = &self.chunks[c];
        for (p, &q) in chunk.sorted.iter().enumerate() {
            let i = chunk.ids[p];
            let probe = (chunk.key(q) ^ mask) as usize;
            let (a, b) = (
                chunk.offsets[probe] as usize,
                chunk.offsets[probe + 1] as usize,
            );
            for t in a..b {
                let j = chunk.ids[t];
                if j <= i {
                    continue;
                }
                let h = chunk.sorted[t];
                let d = (q ^ h).count_ones();
                if d > self.radius {
                    continue;
                }
                let earlier = self.chunks[..c]
                    .iter()
                    .any(|e| (e.key(q) ^ e.key(h)).count_ones() <= self.sub_radius);
                if !earlier {
                    out.push(Pair { i, j, distance: d });
                }
            }
        }
    }
}

/// Call `f` on every `bits`-bit value within Hamming distance `r` of `key`.
fn for_each_within(key: u32, bits: u32, r: u32, f: &mut impl FnMut(u32)) {
    fn rec(v: u32, from: u32, bits: u32, left: u32, f: &mut impl FnMut(u32)) {
        f(v);
        if left == 0 {
            return;
        }
        for b in from..bits {
            rec(v ^ (1 << b), b + 1, bits, left - 1, f);
        }
    }
    rec(key, 0, bits, r, f);
}

/// Brute-force reference: every pair within `radius` (O(n²); tests and
/// benchmark checks only).
pub fn brute_force_pairs(hashes: &[u64], radius: u32) -> Vec<Pair> {
    let mut out = Vec::new();
    for i in 0..hashes.len() {
        for j in i + 1..hashes.len() {
            let d = (hashes[i] ^ hashes[j]).count_ones();
            if d <= radius {
                out.push(Pair {
                    i: i as u32,
                    j: j as u32,
                    distance: d,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn planted(n: usize, radius: u32, seed: u64) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<u64> = (0..n).map(|_| rng.random()).collect();
        // Plant near-duplicates at every distance 0..=radius+1.
        for k in 0..(n / 10) {
            let src = v[rng.random_range(0..v.len())];
            let d = (k as u32) % (radius + 2);
            let mut h = src;
            let mut flipped = 0;
            while flipped < d {
                let b = rng.random_range(0..64);
                if (h ^ src) >> b & 1 == 0 {
                    h ^= 1 << b;
                    flipped += 1;
                }
            }
            v.push(h);
        }
        v
    }

    #[test]
    fn matches_brute_force_at_several_radii_and_sizes() {
        for (n, r) in [(1, 8), (50, 0), (300, 3), (2000, 8), (2000, 10), (500, 16)] {
            let h = planted(n, r, n as u64 + r as u64);
            let idx = MultiIndex::new(&h, r);
            let got = idx.all_pairs();
            let want = brute_force_pairs(&h, r);
            assert_eq!(got, want, "n={n} r={r} chunks={}", idx.chunk_count());
        }
    }

    #[test]
    fn within_enumerates_binomial_count() {
        let mut seen = Vec::new();
        for_each_within(0b1010, 6, 2, &mut |v| seen.push(v));
        assert_eq!(seen.len(), 1 + 6 + 15);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 22);
    }

    #[test]
    fn chunk_choice_prefers_wide_chunks_for_large_sets() {
        assert_eq!(choose_chunks(1_000_000, 8), 3);
        assert!(choose_chunks(100, 8) >= 8);
    }
}
