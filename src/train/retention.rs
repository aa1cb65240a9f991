//! The shape-retention score: does the model being trained still draw what
//! the base model drew for the same prompt and seed?
//!
//! A conversion that "loses shapes" (the usual failure: grey blobs, noise,
//! washed-out colour fields) shows up in the images long before the loss
//! says anything, so training is watched by pictures and by this number.
//!
//! For one pair of images (base sample A, current sample B, same prompt and
//! seed):
//! 1. both go to luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, in 0..255)
//!    and are area-resized to [`SIDE`]×[`SIDE`] (layout, not texture);
//! 2. **structure** = SSIM of the two luma maps exactly as scikit-image's
//!    `structural_similarity(a, b, data_range=255)` computes it (7×7
//!    uniform windows, K1 = 0.01, K2 = 0.03, sample covariances, mean over
//!    the windows that fit) — checked against a golden made with scikit-image;
//! 3. **edges** = Pearson correlation of the Sobel gradient magnitudes of the
//!    two luma maps (interior pixels): do the outlines sit in the same places?
//! 4. score = √(max(structure, 0) · max(edges, 0)), in [0, 1]: both must
//!    agree. SSIM alone stays high for a flat image of similar brightness
//!    (its luminance term), edge correlation alone ignores colour fields;
//!    the geometric mean is 1 for the same picture and ~0 when the shapes
//!    are gone or moved.
//!
//! The run's retention is the mean over every (prompt, seed) pair.

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

/// Side of the luma maps the score compares.
pub const SIDE: u32 = 64;

/// The two parts of the score and the score itself.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Retention {
    /// SSIM of the luma maps.
    pub structure: f64,
    /// Correlation of the Sobel edge magnitudes.
    pub edges: f64,
    /// √(max(structure, 0) · max(edges, 0)).
    pub score: f64,
}

/// BT.601 luma of an RGB image, resized (triangle filter) to `SIDE × SIDE`.
pub fn luma_map(img: &RgbImage) -> Vec<f64> {
    let g = GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let l = 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
        image::Luma([l.round().clamp(0.0, 255.0) as u8])
    });
    let r = image::imageops::resize(&g, SIDE, SIDE, FilterType::Triangle);
    r.as_raw().iter().map(|&v| v as f64).collect()
}

/// scikit-image `structural_similarity(a, b, data_range)` for `w × h`
/// single-channel images (win 7, uniform filter, sample covariance).
pub fn ssim(a: &[f64], b: &[f64], w: usize, h: usize, data_range: f64) -> f64 {
    const WIN: usize = 7;
    if w < WIN || h < WIN || a.len() != w * h || b.len() != w * h {
        return f64::NAN;
    }
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let np = (WIN * WIN) as f64;
    let cov_norm = np / (np - 1.0);
    let mut total = 0.0;
    let mut count = 0usize;
    for y0 in 0..=h - WIN {
        for x0 in 0..=w - WIN {
            let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for y in y0..y0 + WIN {
                for x in x0..x0 + WIN {
                    let (p, q) = (a[y * w + x], b[y * w + x]);
                    sa += p;
                    sb += q;
                    saa += p * p;
                    sbb += q * q;
                    sab += p * q;
                }
            }
            let (ma, mb) = (sa / np, sb / np);
            let va = cov_norm * (saa / np - ma * ma);
            let vb = cov_norm * (sbb / np - mb * mb);
            let vab = cov_norm * (sab / np - ma * mb);
            let num = (2.0 * ma * mb + c1) * (2.0 * vab + c2);
            let den = (ma * ma + mb * mb + c1) * (va + vb + c2);
            total += num / den;
            count += 1;
        }
    }
    total / count as f64
}

/// Sobel gradient magnitudes of the interior pixels of a `w × h` map.
pub fn sobel_magnitude(a: &[f64], w: usize, h: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(w.saturating_sub(2) * h.saturating_sub(2));
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let p = |dx: isize, dy: isize| {
                a[(y as isize + dy) as usize * w + (x as isize + dx) as usize]
            };
            let gx = (p(1, -1) + 2.0 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2.0 * p(-1, 0) + p(-1, 1));
            let gy = (p(-1, 1) + 2.0 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2.0 * p(0, -1) + p(1, -1));
            out.push((gx * gx + gy * gy).sqrt());
        }
    }
    out
}

/// Pearson correlation; 1 when both are constant and equal, 0 when only one is.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n == 0.0 {
        return 0.0;
    }
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    match (saa > 1e-12, sbb > 1e-12) {
        (true, true) => sab / (saa * sbb).sqrt(),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

/// The score of one pair (see the module docs).
pub fn retention(base: &RgbImage, current: &RgbImage) -> Retention {
    let (a, b) = (luma_map(base), luma_map(current));
    let s = SIDE as usize;
    let structure = ssim(&a, &b, s, s, 255.0);
    let edges = pearson(&sobel_magnitude(&a, s, s), &sobel_magnitude(&b, s, s));
    Retention {
        structure,
        edges,
        score: (structure.max(0.0) * edges.max(0.0)).sqrt(),
    }
}

/// Mean score over pairs (0 for none).
pub fn mean_retention(base: &[RgbImage], current: &[RgbImage]) -> f64 {
    let n = base.len().min(current.len());
    if n == 0 {
        return 0.0;
    }
    base.iter()
        .zip(current)
        .map(|(a, b)| retention(a, b).score)
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> serde_json::Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/golden/train/ssim.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn f64s(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    // Equivalent scikit-image code: structural_similarity(a, b, data_range=255)
    // (fixtures/scripts/gen_train_goldens.py).
    #[test]
    fn ssim_matches_scikit_image() {
        let g = golden();
        for case in g["cases"].as_array().unwrap() {
            let (w, h) = (
                case["w"].as_u64().unwrap() as usize,
                case["h"].as_u64().unwrap() as usize,
            );
            let got = ssim(&f64s(&case["a"]), &f64s(&case["b"]), w, h, 255.0);
            let want = case["ssim"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-9,
                "{}: {got} vs {want}",
                case["name"]
            );
        }
    }

    fn shape(w: u32, h: u32, cx: f64, cy: f64, r: f64, fg: [u8; 3]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            image::Rgb(if d < r { fg } else { [230, 230, 230] })
        })
    }

    #[test]
    fn same_shape_scores_high_moved_or_lost_shape_scores_low() {
        let a = shape(128, 128, 40.0, 64.0, 25.0, [200, 30, 30]);
        let same = retention(&a, &a);
        assert!((same.score - 1.0).abs() < 1e-12, "{same:?}");
        // Same place, another colour: layout kept.
        let recoloured = retention(&a, &shape(128, 128, 40.0, 64.0, 25.0, [30, 30, 200]));
        assert!(recoloured.score > 0.6, "{recoloured:?}");
        // Moved to the other side: much lower.
        let moved = retention(&a, &shape(128, 128, 90.0, 64.0, 25.0, [200, 30, 30]));
        assert!(
            moved.score < recoloured.score - 0.2,
            "{moved:?} vs {recoloured:?}"
        );
        // Shape lost (flat grey): near zero.
        let flat = RgbImage::from_pixel(128, 128, image::Rgb([128, 128, 128]));
        let lost = retention(&a, &flat);
        assert!(lost.score < 0.05, "{lost:?}");
        // Noise: no structure.
        let mut rng = 1u64;
        let noise = RgbImage::from_fn(128, 128, |_, _| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (rng >> 56) as u8;
            image::Rgb([v, v.wrapping_mul(3), v.wrapping_mul(7)])
        });
        let noisy = retention(&a, &noise);
        assert!(noisy.score < 0.2, "{noisy:?}");
        eprintln!("same {same:?}\nrecoloured {recoloured:?}\nmoved {moved:?}\nlost {lost:?}\nnoise {noisy:?}");
        assert_eq!(
            mean_retention(std::slice::from_ref(&a), std::slice::from_ref(&a)),
            1.0
        );
    }
}
