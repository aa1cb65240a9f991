//! Aspect-ratio buckets: the SDXL list, a kohya-style generator, and
//! nearest-log-aspect assignment.
//!
//! Why: SDXL was trained on ~1 MP buckets with sides in multiples of 64 and
//! gets the bucket size as conditioning; fine-tuning data should use the same
//! set. Sources (`shared/reference/curation-landscape.md` §6):
//! - [`SDXL_BUCKETS`]: the 40-entry list from the SDXL paper (arXiv
//!   2307.01952 App. I, as hard-coded in neggles/neurosis `SDXLBucketList`),
//!   (width, height). It is not symmetric (704×1344 has no 1344×704), so
//!   [`sdxl_buckets`] adds the missing transposes → 41 buckets.
//! - [`kohya_buckets`]: kohya-ss/sd-scripts `make_bucket_resolutions`
//!   (model_util.py): the square ⌊√area/step⌋·step, then for each width from
//!   min to max in steps, the largest height ≤ max with w·h ≤ area, plus its
//!   transpose. 1024², 256..1024 → 25 buckets; 256..2048 → 41.
//! - [`assign_bucket`]: nearest by |ln(w/h) − ln(W/H)| (symmetric in
//!   portrait/landscape, unlike kohya's linear |AR diff|). Ties (equal
//!   distance within 1e-12) go to the bucket closer to square, then the larger
//!   area, then the earlier one in the list — deterministic whatever the order
//!   of equal-distance candidates.

/// A bucket size in pixels.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Bucket {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Bucket {
    /// A bucket of `width × height`.
    pub const fn new(width: u32, height: u32) -> Self {
        Bucket { width, height }
    }
    /// ln(width / height).
    pub fn log_aspect(&self) -> f64 {
        (f64::from(self.width) / f64::from(self.height)).ln()
    }
    /// width · height.
    pub fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
    /// The bucket with sides swapped.
    pub fn transposed(&self) -> Bucket {
        Bucket::new(self.height, self.width)
    }
    /// `"{w}x{h}"`, the form used in the manifest and in A1111 `Size`.
    pub fn label(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// The 40 SDXL training buckets as (width, height), portrait → landscape.
pub const SDXL_BUCKETS: [(u32, u32); 40] = [
    (512, 2048),
    (512, 1984),
    (512, 1920),
    (512, 1856),
    (576, 1792),
    (576, 1728),
    (576, 1664),
    (640, 1600),
    (640, 1536),
    (704, 1472),
    (704, 1408),
    (704, 1344),
    (768, 1344),
    (768, 1280),
    (832, 1216),
    (832, 1152),
    (896, 1152),
    (896, 1088),
    (960, 1088),
    (960, 1024),
    (1024, 1024),
    (1024, 960),
    (1088, 960),
    (1088, 896),
    (1152, 896),
    (1152, 832),
    (1216, 832),
    (1280, 768),
    (1344, 768),
    (1408, 704),
    (1472, 704),
    (1536, 640),
    (1600, 640),
    (1664, 576),
    (1728, 576),
    (1792, 576),
    (1856, 512),
    (1920, 512),
    (1984, 512),
    (2048, 512),
];

/// The SDXL bucket set: [`SDXL_BUCKETS`] plus missing transposes (41),
/// sorted by aspect ratio (tallest first).
pub fn sdxl_buckets() -> Vec<Bucket> {
    let mut v: Vec<Bucket> = SDXL_BUCKETS
        .iter()
        .map(|&(w, h)| Bucket::new(w, h))
        .collect();
    let transposes: Vec<Bucket> = v.iter().map(Bucket::transposed).collect();
    v.extend(transposes);
    sort_dedup(v)
}

fn sort_dedup(mut v: Vec<Bucket>) -> Vec<Bucket> {
    v.sort_by(|a, b| {
        a.log_aspect()
            .total_cmp(&b.log_aspect())
            .then(a.area().cmp(&b.area()))
    });
    v.dedup();
    v
}

/// kohya `make_bucket_resolutions((max_w, max_h), min_size, max_size, step)`,
/// sorted by aspect ratio. Returns an empty list when `step` is 0 or
/// `min_size > max_size`.
pub fn kohya_buckets(
    max_w: u32,
    max_h: u32,
    min_size: u32,
    max_size: u32,
    step: u32,
) -> Vec<Bucket> {
    if step == 0 || min_size > max_size {
        return Vec::new();
    }
    let area = u64::from(max_w) * u64::from(max_h);
    let step64 = u64::from(step);
    let mut v = Vec::new();
    let side = (((area as f64).sqrt() as u64) / step64 * step64) as u32;
    v.push(Bucket::new(side, side));
    let mut w = min_size;
    while w <= max_size {
        let h = u64::from(max_size).min(area / u64::from(w.max(1)) / step64 * step64) as u32;
        if h >= min_size {
            v.push(Bucket::new(w, h));
            v.push(Bucket::new(h, w));
        }
        w += step;
    }
    sort_dedup(v)
}

/// Index of the bucket nearest to a `w × h` image in log aspect ratio (tie
/// rule in the module docs). `None` for an empty list or a zero dimension.
pub fn assign_bucket(w: u32, h: u32, buckets: &[Bucket]) -> Option<usize> {
    if w == 0 || h == 0 {
        return None;
    }
    let target = (f64::from(w) / f64::from(h)).ln();
    let mut best: Option<(usize, f64)> = None;
    for (i, b) in buckets.iter().enumerate() {
        if b.width == 0 || b.height == 0 {
            continue;
        }
        let d = (b.log_aspect() - target).abs();
        let replace = match best {
            None => true,
            Some((j, bd)) => {
                d < bd - 1e-12 || ((d - bd).abs() <= 1e-12 && better_tie(b, &buckets[j]))
            }
        };
        if replace {
            best = Some((i, d));
        }
    }
    best.map(|(i, _)| i)
}

/// Tie-break: closer to square wins, then larger area; else keep the earlier.
fn better_tie(cand: &Bucket, cur: &Bucket) -> bool {
    let (ca, cu) = (cand.log_aspect().abs(), cur.log_aspect().abs());
    if (ca - cu).abs() > 1e-12 {
        return ca < cu;
    }
    cand.area() > cur.area()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_list_shape() {
        assert_eq!(SDXL_BUCKETS.len(), 40);
        for &(w, h) in &SDXL_BUCKETS {
            assert!(w % 64 == 0 && h % 64 == 0, "{w}x{h}");
            let mp = f64::from(w * h) / f64::from(1024 * 1024);
            assert!((0.9..=1.0).contains(&mp), "{w}x{h} = {mp} MP");
        }
        let set = sdxl_buckets();
        assert_eq!(set.len(), 41);
        assert!(set.contains(&Bucket::new(1344, 704)));
        // Symmetric after adding transposes.
        for b in &set {
            assert!(set.contains(&b.transposed()), "{}", b.label());
        }
    }

    #[test]
    fn kohya_generator_counts_match_reference() {
        // curation-landscape.md §6: 1024², step 64: max 1024 -> 25, max 2048 -> 41.
        let small = kohya_buckets(1024, 1024, 256, 1024, 64);
        assert_eq!(small.len(), 25);
        assert!(small.iter().all(|b| b.width <= 1024 && b.height <= 1024));
        assert!(small.contains(&Bucket::new(768, 1024)));
        let big = kohya_buckets(1024, 1024, 256, 2048, 64);
        assert_eq!(big.len(), 41);
        for b in [
            (832, 1216),
            (896, 1152),
            (768, 1344),
            (640, 1536),
            (256, 2048),
            (1024, 1024),
        ] {
            assert!(big.contains(&Bucket::new(b.0, b.1)), "{b:?}");
        }
        assert!(!big.contains(&Bucket::new(1152, 832)));
        assert!(kohya_buckets(1024, 1024, 256, 1024, 0).is_empty());
    }

    #[test]
    fn assignment_nearest_log_aspect() {
        let set = sdxl_buckets();
        let pick = |w, h| set[assign_bucket(w, h, &set).unwrap()];
        assert_eq!(pick(1000, 1000), Bucket::new(1024, 1024));
        assert_eq!(pick(832, 1216), Bucket::new(832, 1216));
        assert_eq!(pick(1216, 832), Bucket::new(1216, 832));
        assert_eq!(pick(1920, 1080), Bucket::new(1344, 768));
        assert_eq!(pick(100, 10000), Bucket::new(512, 2048));
        assert_eq!(assign_bucket(0, 5, &set), None);
        assert_eq!(assign_bucket(5, 5, &[]), None);
    }

    #[test]
    fn ties_prefer_square_then_area_order_independent() {
        // A square image is exactly between 1:2 and 2:1 in log aspect; both
        // are equally far from square and equal in area, so the earlier wins.
        let a = Bucket::new(512, 1024);
        let b = Bucket::new(1024, 512);
        assert_eq!(assign_bucket(100, 100, &[a, b]), Some(0));
        assert_eq!(assign_bucket(100, 100, &[b, a]), Some(0));
        // Same aspect, different area: the larger one wins in any order.
        let s = Bucket::new(512, 512);
        let l = Bucket::new(1024, 1024);
        assert_eq!(assign_bucket(7, 7, &[s, l]), Some(1));
        assert_eq!(assign_bucket(7, 7, &[l, s]), Some(0));
        // Between 1:1 and 1:4 in log (1:2), the closer-to-square bucket wins.
        let sq = Bucket::new(1024, 1024);
        let tall = Bucket::new(512, 2048);
        assert_eq!(assign_bucket(500, 1000, &[tall, sq]), Some(1));
    }
}
