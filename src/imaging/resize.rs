//! Cover-scale + crop into an aspect-ratio bucket, with fast_image_resize
//! (Lanczos3).
//!
//! Why: SDXL training images must exactly fill their bucket (W×H, multiples of
//! 64). Like kohya (`trim_and_resize_if_required`), OneTrainer and SimpleTuner
//! we scale the image so it *covers* the bucket and crop the overflow —
//! never pad. See `shared/reference/curation-landscape.md` §6 and
//! `trainers-landscape.md` §1.3.
//!
//! Geometry ([`plan_cover_crop`]):
//! - `scale = max(W/w, H/h)`; resized size `(round(w·scale), round(h·scale))`,
//!   each at least the bucket side (so float error never leaves a gap);
//! - crop offset in the resized image: center = `(rw−W)/2, (rh−H)/2` (floor),
//!   or uniform random from a ChaCha8 RNG seeded with the item's u64 seed;
//! - refusal ([`ResizeRefusal::UpscaleTooLarge`]) when `scale > max_upscale`.
//!   Default [`DEFAULT_MAX_UPSCALE`] = 1.25: small rounding-level upscales
//!   (an 896×1152 image into 832×1216 needs 1.056) pass, but a 512² image is
//!   not blown up to 1024² — blurry targets would teach the model blur.
//!
//! Crop offsets are reported twice: in resized pixels (`crop_left/top`, what
//! the SDXL paper's c_crop and sgm's `crop_coords_top_left` mean when the
//! image was resized before cropping) and in ORIGINAL pixels
//! (`crop_left_orig/top_orig` = resized offset / scale, rounded), which is what
//! the manifest records next to the original size. Note kohya records the
//! *letterbox* offset instead (its issue #1443); we record the real crop.
//!
//! [`resize_and_crop`] resizes only the source region that survives the crop
//! (fast_image_resize `ResizeOptions::crop` with fractional source box), which
//! equals "resize to rw×rh, then cut W×H at the offset" without computing the
//! discarded pixels. No global state: call it from any rayon worker.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Default largest accepted upscale factor (see module docs).
pub const DEFAULT_MAX_UPSCALE: f64 = 1.25;

/// Where to cut the bucket out of the covering resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// Centered (floor of half the overflow).
    Center,
    /// Uniform random offset from ChaCha8 seeded with this value.
    Random {
        /// Per-item seed (stored in the manifest for reproducibility).
        seed: u64,
    },
}

/// The full geometry of one cover-resize + crop.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CropPlan {
    /// Source width (original pixels).
    pub src_width: u32,
    /// Source height (original pixels).
    pub src_height: u32,
    /// Bucket (target) width.
    pub bucket_width: u32,
    /// Bucket (target) height.
    pub bucket_height: u32,
    /// Cover scale `max(W/w, H/h)`.
    pub scale: f64,
    /// Width after the covering resize (≥ bucket width).
    pub resized_width: u32,
    /// Height after the covering resize (≥ bucket height).
    pub resized_height: u32,
    /// Crop left offset in resized pixels.
    pub crop_left: u32,
    /// Crop top offset in resized pixels.
    pub crop_top: u32,
    /// Crop left offset in original pixels (`crop_left / sx`, rounded).
    pub crop_left_orig: u32,
    /// Crop top offset in original pixels (`crop_top / sy`, rounded).
    pub crop_top_orig: u32,
}

/// Why an image cannot go into a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResizeRefusal {
    /// A zero dimension on the source or the bucket.
    EmptySize,
    /// Covering the bucket needs a larger upscale than allowed.
    UpscaleTooLarge {
        /// Needed scale.
        scale: f64,
        /// Configured maximum.
        max_upscale: f64,
    },
}

impl ResizeRefusal {
    /// Stable snake_case reason for the manifest.
    pub fn name(&self) -> &'static str {
        match self {
            ResizeRefusal::EmptySize => "empty_size",
            ResizeRefusal::UpscaleTooLarge { .. } => "too_small",
        }
    }
}

impl std::fmt::Display for ResizeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResizeRefusal::EmptySize => write!(f, "image or bucket has a zero dimension"),
            ResizeRefusal::UpscaleTooLarge { scale, max_upscale } => write!(
                f,
                "image too small for its bucket: needs {scale:.3}x upscale, limit is {max_upscale}x (smaller buckets fit it: `--kohya-resolution`; or raise the limit, `--max-upscale` / `max_upscale`)"
            ),
        }
    }
}

/// Plan the cover-resize + crop of a `src_w × src_h` image into a
/// `bucket_w × bucket_h` bucket. Pure arithmetic; see module docs.
pub fn plan_cover_crop(
    src_w: u32,
    src_h: u32,
    bucket_w: u32,
    bucket_h: u32,
    mode: CropMode,
    max_upscale: f64,
) -> std::result::Result<CropPlan, ResizeRefusal> {
    if src_w == 0 || src_h == 0 || bucket_w == 0 || bucket_h == 0 {
        return Err(ResizeRefusal::EmptySize);
    }
    let scale =
        (f64::from(bucket_w) / f64::from(src_w)).max(f64::from(bucket_h) / f64::from(src_h));
    if scale > max_upscale {
        return Err(ResizeRefusal::UpscaleTooLarge { scale, max_upscale });
    }
    let rw = ((f64::from(src_w) * scale).round() as u32).max(bucket_w);
    let rh = ((f64::from(src_h) * scale).round() as u32).max(bucket_h);
    let (over_x, over_y) = (rw - bucket_w, rh - bucket_h);
    let (crop_left, crop_top) = match mode {
        CropMode::Center => (over_x / 2, over_y / 2),
        CropMode::Random { seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (rng.random_range(0..=over_x), rng.random_range(0..=over_y))
        }
    };
    let sx = f64::from(rw) / f64::from(src_w);
    let sy = f64::from(rh) / f64::from(src_h);
    Ok(CropPlan {
        src_width: src_w,
        src_height: src_h,
        bucket_width: bucket_w,
        bucket_height: bucket_h,
        scale,
        resized_width: rw,
        resized_height: rh,
        crop_left,
        crop_top,
        crop_left_orig: (f64::from(crop_left) / sx).round() as u32,
        crop_top_orig: (f64::from(crop_top) / sy).round() as u32,
    })
}

/// The source pixels `[start, start + len)` that the resized pixels
/// `[crop, crop + kept)` of a side resized from `src` to `resized` come
/// from: scaled by `src / resized` (so a side kept whole is exactly `src`,
/// where dividing by the scale could come out a hair over it, e.g. 832 /
/// (832/940) = 940.0000000000001, which the resizer refuses), and never
/// past the source's end.
fn source_span(crop: u32, kept: u32, resized: u32, src: u32) -> (f64, f64) {
    let scale = f64::from(src) / f64::from(resized);
    let start = f64::from(crop) * scale;
    let len = (f64::from(kept) * scale).min(f64::from(src) - start);
    (start, len)
}

/// Execute a [`CropPlan`] on an RGB8 image (whose size must be the plan's
/// source size): Lanczos3 convolution over the surviving source region,
/// output exactly `bucket_width × bucket_height`.
pub fn resize_and_crop(rgb: &RgbImage, plan: &CropPlan) -> Result<RgbImage> {
    if rgb.dimensions() != (plan.src_width, plan.src_height) {
        return Err(Error::Other(format!(
            "resize: image is {}x{} but the crop plan was made for {}x{}",
            rgb.width(),
            rgb.height(),
            plan.src_width,
            plan.src_height
        )));
    }
    let fir_err = |e: &dyn std::fmt::Display| Error::Other(format!("resize: {e}"));
    let src = ImageRef::new(rgb.width(), rgb.height(), rgb.as_raw(), PixelType::U8x3)
        .map_err(|e| fir_err(&e))?;
    let mut dst = Image::new(plan.bucket_width, plan.bucket_height, PixelType::U8x3);
    let (left, width) = source_span(
        plan.crop_left,
        plan.bucket_width,
        plan.resized_width,
        plan.src_width,
    );
    let (top, height) = source_span(
        plan.crop_top,
        plan.bucket_height,
        plan.resized_height,
        plan.src_height,
    );
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(left, top, width, height);
    let mut resizer = Resizer::new();
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| fir_err(&e))?;
    RgbImage::from_raw(plan.bucket_width, plan.bucket_height, dst.into_vec())
        .ok_or_else(|| Error::Other("resize: output buffer has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_scale_geometry() {
        // 1000x1500 into 832x1216: scale = max(0.832, 0.8107) = 0.832.
        let p = plan_cover_crop(1000, 1500, 832, 1216, CropMode::Center, 1.0).unwrap();
        assert!((p.scale - 0.832).abs() < 1e-12);
        assert_eq!((p.resized_width, p.resized_height), (832, 1248));
        assert_eq!((p.crop_left, p.crop_top), (0, 16));
        // 16 resized px = 16/0.832 = 19.2 -> 19 original px.
        assert_eq!((p.crop_left_orig, p.crop_top_orig), (0, 19));
    }

    /// Regression: the source box was the resized one divided by the
    /// scale, a hair past the image's edge for some sizes (940×1410 into
    /// 832×1216: width 940.0000000000001), which the resizer refused,
    /// failing the whole bucket run on every rerun.
    #[test]
    fn every_placement_stays_inside_the_source() {
        let sizes = [
            (940, 1410),
            (1000, 1500),
            (777, 1333),
            (1283, 911),
            (2049, 3071),
        ];
        for (w, h) in sizes {
            let rgb = RgbImage::new(w, h);
            for (bw, bh) in [(832, 1216), (1216, 832), (1024, 1024), (896, 1152)] {
                let mut modes = vec![CropMode::Center];
                modes.extend((0..8).map(|seed| CropMode::Random { seed }));
                for mode in modes {
                    let p = plan_cover_crop(w, h, bw, bh, mode, 4.0).unwrap();
                    let out = resize_and_crop(&rgb, &p)
                        .unwrap_or_else(|e| panic!("{w}x{h} -> {bw}x{bh} {mode:?}: {e}"));
                    assert_eq!(out.dimensions(), (bw, bh));
                }
            }
        }
        // The largest random offsets too: every crop position of one side.
        for crop_top in 0..=32 {
            let mut p = plan_cover_crop(1000, 1500, 832, 1216, CropMode::Center, 1.0).unwrap();
            p.crop_top = crop_top;
            resize_and_crop(&RgbImage::new(1000, 1500), &p).unwrap();
        }
        assert_eq!(source_span(0, 832, 832, 940), (0.0, 940.0));
    }

    #[test]
    fn exact_fit_has_no_crop() {
        let p = plan_cover_crop(1024, 1024, 1024, 1024, CropMode::Center, 1.0).unwrap();
        assert_eq!(
            (p.resized_width, p.resized_height, p.crop_left, p.crop_top),
            (1024, 1024, 0, 0)
        );
    }

    #[test]
    fn upscale_limit_refuses_small_images() {
        let e = plan_cover_crop(512, 512, 1024, 1024, CropMode::Center, DEFAULT_MAX_UPSCALE)
            .unwrap_err();
        assert_eq!(e.name(), "too_small");
        assert!(e.to_string().contains("2.000x"), "{e}");
        assert!(
            plan_cover_crop(900, 1160, 832, 1216, CropMode::Center, DEFAULT_MAX_UPSCALE).is_ok()
        );
        assert_eq!(
            plan_cover_crop(0, 5, 64, 64, CropMode::Center, 2.0).unwrap_err(),
            ResizeRefusal::EmptySize
        );
    }

    #[test]
    fn random_crop_is_seeded_and_in_range() {
        let a = plan_cover_crop(3000, 1100, 1024, 1024, CropMode::Random { seed: 7 }, 1.0).unwrap();
        let b = plan_cover_crop(3000, 1100, 1024, 1024, CropMode::Random { seed: 7 }, 1.0).unwrap();
        assert_eq!(a, b);
        assert!(a.crop_left <= a.resized_width - 1024 && a.crop_top == 0);
        let offsets: std::collections::HashSet<u32> = (0..20)
            .map(|s| {
                plan_cover_crop(3000, 1100, 1024, 1024, CropMode::Random { seed: s }, 1.0)
                    .unwrap()
                    .crop_left
            })
            .collect();
        assert!(offsets.len() > 10, "seeds should give different offsets");
    }

    #[test]
    fn resize_and_crop_output_and_content() {
        // Left half red, right half blue; a wide image cropped to a square
        // keeps the middle: left columns red-ish, right columns blue-ish.
        let img = RgbImage::from_fn(400, 100, |x, _| {
            if x < 200 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let p = plan_cover_crop(400, 100, 64, 64, CropMode::Center, 1.0).unwrap();
        assert_eq!(
            (p.resized_width, p.resized_height, p.crop_left),
            (256, 64, 96)
        );
        let out = resize_and_crop(&img, &p).unwrap();
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(out.get_pixel(2, 30).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(61, 30).0, [0, 0, 255]);
        // Equivalence with resize-then-crop on a smooth image.
        let grad = RgbImage::from_fn(300, 200, |x, y| {
            image::Rgb([(x * 255 / 299) as u8, (y * 255 / 199) as u8, 128])
        });
        let p = plan_cover_crop(300, 200, 128, 128, CropMode::Random { seed: 3 }, 1.0).unwrap();
        let out = resize_and_crop(&grad, &p).unwrap();
        let full = plan_cover_crop(
            300,
            200,
            p.resized_width,
            p.resized_height,
            CropMode::Center,
            1.0,
        )
        .unwrap();
        let resized = resize_and_crop(&grad, &full).unwrap();
        let mut max_diff = 0u8;
        for y in 4..124 {
            for x in 4..124 {
                let a = out.get_pixel(x, y).0;
                let b = resized.get_pixel(x + p.crop_left, y + p.crop_top).0;
                for c in 0..3 {
                    max_diff = max_diff.max(a[c].abs_diff(b[c]));
                }
            }
        }
        assert!(
            max_diff <= 2,
            "crop-resize differs from resize-then-crop by {max_diff}"
        );
        assert!(resize_and_crop(
            &grad,
            &plan_cover_crop(10, 10, 8, 8, CropMode::Center, 1.0).unwrap()
        )
        .is_err());
    }
}
