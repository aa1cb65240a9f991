//! Tagger input preprocessing, exactly as the reference script
//! (neggles/wdv3-timm `wdv3_timm.py` @2f49e85, the current version):
//!
//! 1. the image as RGB with alpha composited on white — here the decode of
//!    [`crate::imaging::decode`] (its composite formula equals Pillow's
//!    `alpha_composite` on an opaque white canvas for every (colour, alpha)
//!    pair; checked by the golden script);
//! 2. padded to a square of its longer side on white, the image pasted at
//!    `((side − w) / 2, (side − h) / 2)` (integer division);
//! 3. timm's eval transform for `crop_pct` 1.0: resize to `S×S` with
//!    Pillow's filter (`BICUBIC` for WD v3; the padded square needs no
//!    crop), `ToTensor` (`v / 255` in f32), `Normalize` (`(x − mean) / std`
//!    in f32, per RGB channel);
//! 4. channels reversed, RGB → BGR (`inputs[:, [2, 1, 0]]` after the
//!    transform), NCHW.
//!
//! On the channel order: the script's history flipped twice once
//! (`convert("BGR;24")` *and* the index flip, i.e. RGB again) before the
//! index flip alone was kept (commit cc48e52, still at HEAD). The WD
//! models were trained on BGR input (SmilingWolf's own ONNX demo feeds
//! OpenCV-order pixels), so BGR it is. Since v3's mean and std are equal
//! for the three channels, normalising before or after the flip gives the
//! same numbers; we normalise in RGB order as timm does.
//!
//! Where our decode deliberately differs from Pillow's (and so from what
//! the script would feed the model): 16-bit samples are rounded
//! (`round(v / 257)`) where Pillow truncates RGB (`v >> 8`) and clamps
//! 16-bit grey to 255 (an all-white image); grey + alpha is composited on
//! white where the script's `convert("RGB")` drops the alpha. The golden
//! test (`fixtures/golden/tagger/preprocess.json`) compares against the
//! reference transform on our decode exactly, and against the script's
//! own decode where they agree.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::config::{Interpolation, TaggerConfig};
use crate::imaging::hash::{pil_resize_on_white_square, PilFilter};
use crate::Result;

/// The input transform of one tagger.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output side `S`.
    pub size: usize,
    /// Normalisation mean (RGB).
    pub mean: [f32; 3],
    /// Normalisation std (RGB).
    pub std: [f32; 3],
    /// Pillow filter of the resize.
    pub filter: PilFilter,
}

/// Pad `rgb` to a white square of its longer side, centred as Pillow's
/// `paste` at `((side − w) // 2, (side − h) // 2)`. Returns packed RGB8 and the side.
pub fn pad_square_white(rgb: &RgbImage) -> (Vec<u8>, usize) {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    (
        crate::imaging::hash::pad_square_white(rgb.as_raw(), w, h),
        w.max(h),
    )
}

impl Preprocess {
    /// The transform a config describes.
    pub fn new(cfg: &TaggerConfig) -> Self {
        Self {
            size: cfg.img_size,
            mean: cfg.mean,
            std: cfg.std,
            filter: match cfg.interpolation {
                Interpolation::Bicubic => PilFilter::Bicubic,
                Interpolation::Lanczos => PilFilter::Lanczos,
            },
        }
    }

    /// Steps 2–3 up to the resize: packed RGB8 of `S×S` (the padded square
    /// is not made: [`pil_resize_on_white_square`]).
    pub fn resize(&self, rgb: &RgbImage) -> Vec<u8> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        pil_resize_on_white_square(rgb.as_raw(), w, h, self.size, self.filter)
    }

    /// Steps 3–4 after the resize: `S×S` RGB8 → CHW f32, channels B, G, R.
    pub fn normalize_bgr(&self, resized: &[u8]) -> Vec<f32> {
        let n = self.size * self.size;
        let mut out = vec![0f32; 3 * n];
        for (c, plane) in out.chunks_exact_mut(n).enumerate() {
            let src = 2 - c; // output plane 0 = B = RGB channel 2
            let (mean, std) = (self.mean[src], self.std[src]);
            for (o, px) in plane.iter_mut().zip(resized.chunks_exact(3)) {
                *o = (f32::from(px[src]) / 255.0 - mean) / std;
            }
        }
        out
    }

    /// The whole transform of one decoded image: CHW f32 (B, G, R planes).
    pub fn image(&self, rgb: &RgbImage) -> Vec<f32> {
        self.normalize_bgr(&self.resize(rgb))
    }

    /// Stack CHW images into a `(b, 3, S, S)` f32 tensor.
    pub fn batch<T: AsRef<[f32]>>(&self, images: &[T], device: &Device) -> Result<Tensor> {
        let s = self.size;
        let mut flat = Vec::with_capacity(images.len() * 3 * s * s);
        for im in images {
            let im = im.as_ref();
            if im.len() != 3 * s * s {
                return Err(crate::Error::Other(format!(
                    "tagger batch: image of {} values, expected 3×{s}×{s}",
                    im.len()
                )));
            }
            flat.extend_from_slice(im);
        }
        Ok(Tensor::from_vec(flat, (images.len(), 3, s, s), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resize without the square gives the bytes of resizing the
    /// square, wide and tall, shrinking, equal and growing.
    #[test]
    fn resizing_on_a_virtual_square_equals_resizing_the_square() {
        use crate::imaging::hash::pil_resize_rgb;
        for (w, h, out) in [
            (301, 77, 64),
            (77, 301, 64),
            (40, 64, 64),
            (5, 9, 32),
            (130, 129, 48),
        ] {
            let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
                image::Rgb([(x * 7 + y) as u8, (y * 13) as u8, (x ^ y) as u8])
            });
            for filter in [PilFilter::Bicubic, PilFilter::Lanczos] {
                let (sq, side) = pad_square_white(&img);
                let want = pil_resize_rgb(&sq, side, side, out, out, filter);
                let got = pil_resize_on_white_square(img.as_raw(), w, h, out, filter);
                assert!(got == want, "{w}x{h} → {out} {filter:?}");
            }
        }
    }

    #[test]
    fn pad_centres_with_floor_offsets() {
        let img = RgbImage::from_raw(1, 4, vec![0; 12]).unwrap();
        let (sq, side) = pad_square_white(&img);
        assert_eq!(side, 4);
        // column (4 - 1) / 2 = 1 is the image, the rest white
        for y in 0..4 {
            for x in 0..4 {
                let v = sq[(y * 4 + x) * 3];
                assert_eq!(v, if x == 1 { 0 } else { 255 }, "({x}, {y})");
            }
        }
        let wide = RgbImage::from_raw(3, 2, vec![7; 18]).unwrap();
        let (sq, side) = pad_square_white(&wide);
        assert_eq!(side, 3);
        assert_eq!(&sq[..9], &[7; 9]); // row 0 = image (offset (3-2)/2 = 0)
        assert_eq!(&sq[18..], &[255; 9]);
    }

    #[test]
    fn normalize_flips_to_bgr() {
        let p = Preprocess {
            size: 1,
            mean: [0.5; 3],
            std: [0.5; 3],
            filter: PilFilter::Bicubic,
        };
        let v = p.normalize_bgr(&[255, 0, 51]);
        assert_eq!(v, vec![(51.0 / 255.0 - 0.5) / 0.5, -1.0, 1.0]);
    }
}
