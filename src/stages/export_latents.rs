//! `export --format kohya --latents MODEL`: kohya's latent cache beside
//! each bucketed image, so that kohya trains on the true SDXL
//! micro-conditioning.
//!
//! Without it kohya sees only the exported file, which is already cut to
//! its bucket: it conditions every image on `original_size` = the bucket
//! size and a `(0, 0)` crop, whatever the image was before bucketing (and
//! kohya's own crop rule is not the crop it makes either). With
//! `--cache_latents --cache_latents_to_disk`, kohya reads each image's
//! latents, original size and crop from a `.npz` beside it instead, and
//! never opens the image (checked against sd-scripts' `strategy_base.py`
//! / `strategy_sd.py` / `train_util.py` at commit 48d368fa):
//! - name: `<stem>.npz` beside `<stem>.<ext>`, the name every sd-scripts
//!   version reads (later ones prefer it to their own
//!   `<stem>_<W>x<H>_sdxl.npz` when it exists);
//! - `latents`: f32 `(4, h/8, w/8)`, the VAE's latent *before* the scale
//!   factor (kohya multiplies by 0.13025 itself); the distribution's mean,
//!   where kohya would draw a sample;
//! - `original_size`: `[width, height]` of the item before bucketing;
//! - `crop_ltrb`: `[left, top, right, bottom]` with left/top the pixels
//!   cut from the cover-scaled image (SDXL's `crop_coords_top_left`, what
//!   `eps2v train` conditions on). kohya computes the crop of a mirrored
//!   image (`--flip_aug`) as `bucket_width − right`, so `right` is written
//!   as `2·bucket_w + left − resized_w`, which makes that the true left crop
//!   of the mirrored image; `bottom` likewise (kohya does not read it);
//! - `latents_flipped` (with `--flip-latents`): the mirrored image's
//!   latents; kohya's `--flip_aug` rejects a cache without them and
//!   re-encodes, overwriting the file.
//!
//! kohya checks only that the keys are there (older versions also that the
//! latents have the size of the bucket it picks), so it must put each image
//! in a bucket of the image's own size, and must not re-encode: the export
//! prints the flags that do ([`kohya_flags`]): `--enable_bucket
//! --bucket_no_upscale` with a `--resolution` whose area covers the largest
//! bucket and a `--bucket_reso_steps` (a multiple of 32, as kohya's SDXL
//! trainer asserts) dividing every bucket side, plus `--cache_latents
//! --cache_latents_to_disk`. kohya re-encodes, overwriting the `.npz` with
//! the bucket-file values, with `--flip_aug` and no `latents_flipped`
//! (use `--flip-latents`) and with `--alpha_mask` (no mask is written).
//! Items without a bucket get no `.npz` (kohya encodes them).
//!
//! The VAE must give SDXL latents (4 channels, factor 8): kohya's SDXL UNet
//! takes nothing else, and it would take a wrong file without a word, so
//! there is no embedded default (the toy VAE has 8 channels).
//!
//! The latents come from the same cache as `eps2v train`'s
//! ([`crate::train::cache::latents`], mean mode): an export killed half way
//! keeps what it encoded, and a dataset already trained on (f32, same VAE)
//! encodes nothing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::ExportRow;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::{Checkpoint, Family};
use crate::models::sdxl::Vae;
use crate::stages::Ctx;
use crate::train::cache::{self, LatentInputs};
use crate::train::config::LatentMode;

/// The VAE that encodes the latents, loaded before anything is written.
pub struct LatentSource {
    vae: Vae,
    vae_hash: String,
    device: Device,
    dtype: DType,
}

impl LatentSource {
    /// Load the VAE of `path` (a checkpoint or a standalone VAE file) to
    /// `device` in `dtype` (f32, or bf16 on CUDA; f16 runs as f32: the
    /// SDXL VAE overflows there).
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        // SD 1.x/2.x VAEs share SDXL's layout (4 channels, 1/8) but not
        // its weights: kohya would train SDXL on another VAE's latents.
        // (A standalone VAE file cannot be told apart by its keys.)
        let family = ckpt.family();
        if matches!(
            family,
            Family::Sd1 | Family::Sd2 | Family::Lora | Family::Diffusers
        ) {
            return Err(Error::config(format!(
                "export --latents {}: this looks like {}; the latents must come from the SDXL VAE: pass the SDXL checkpoint you train, or the SDXL VAE file (sdxl_vae.safetensors)",
                path.display(),
                ckpt.describe_family()
            )));
        }
        let cfg = ckpt
            .infer_vae_config()
            .map_err(|e| Error::config(format!("export --latents {}: {e}", path.display())))?
            .config;
        if cfg.embed_dim != 4 || cfg.downsample_factor() != 8 {
            return Err(Error::config(format!(
                "export --latents {}: its VAE makes {}-channel latents at 1/{} of the image size; kohya's SDXL trainer takes 4 channels at 1/8 (pass an SDXL checkpoint or the SDXL VAE file; the toy model's VAE has 8 channels)",
                path.display(),
                cfg.embed_dim,
                cfg.downsample_factor()
            )));
        }
        let dtype = crate::nn::vae_dtype(dtype);
        let vae = ckpt.load_vae(&cfg, dtype, device)?;
        Ok(Self {
            vae_hash: cache::vae_hash(&ckpt),
            vae,
            device: device.clone(),
            dtype,
        })
    }
}

/// kohya's `crop_ltrb` of a bucketed item: the true left/top crop, and
/// right/bottom such that kohya's mirrored crop (`bucket − right`) is the
/// true crop of the mirrored image (module docs).
pub fn kohya_crop_ltrb(bucket: (u32, u32), resized: (u32, u32), left_top: (u32, u32)) -> [i64; 4] {
    let (bw, bh) = (i64::from(bucket.0), i64::from(bucket.1));
    let (rw, rh) = (i64::from(resized.0), i64::from(resized.1));
    let (l, t) = (i64::from(left_top.0), i64::from(left_top.1));
    [l, t, 2 * bw + l - rw, 2 * bh + t - rh]
}

/// The sd-scripts flags under which kohya puts each exported bucket image
/// in a bucket of its own size and reads its `.npz`, for buckets of sizes
/// `buckets`; `None` without buckets. Also the reason when kohya's SDXL
/// trainer cannot reproduce them (a side that is not a multiple of 32).
/// For the DreamBooth folder, and `--in_json` from sd-scripts #2186
/// (c6bc632e) on; before it, sd-scripts looked meta_lat.json's keys up
/// as stems (`glob_images(image_dir, key)` + each image extension), so
/// keys with their extension, as ours, are not found there.
pub fn kohya_flags(buckets: &[(u32, u32)]) -> Option<(String, Option<String>)> {
    let area = buckets
        .iter()
        .map(|&(w, h)| u64::from(w) * u64::from(h))
        .max()?;
    let gcd = buckets
        .iter()
        .flat_map(|&(w, h)| [w, h])
        .fold(0u32, |a, b| {
            let (mut a, mut b) = (a, b);
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        });
    let step = if gcd % 64 == 0 { 64 } else { 32 };
    // The smallest square resolution (a multiple of the step) whose area
    // covers the largest bucket: nothing is downscaled.
    let mut side = (area as f64).sqrt().ceil() as u32;
    side = side.div_ceil(step) * step;
    let mut flags = format!(
        "--caption_extension .txt --enable_bucket --bucket_no_upscale --resolution {side} --bucket_reso_steps {step} --cache_latents --cache_latents_to_disk"
    );
    // kohya asserts min_bucket_reso ≤ resolution ≤ max_bucket_reso even
    // when --bucket_no_upscale ignores them (defaults 256 and 1024).
    if side < 256 {
        flags.push_str(&format!(" --min_bucket_reso {side}"));
    }
    if side > 1024 {
        flags.push_str(&format!(" --max_bucket_reso {side}"));
    }
    let problem = (gcd % 32 != 0).then(|| {
        format!(
            "bucket sides are multiples of {gcd} only, and kohya's SDXL trainer needs --bucket_reso_steps to be a multiple of 32: it will re-bucket these images and not use their .npz; rebucket with a step of 32 or 64"
        )
    });
    Some((flags, problem))
}

/// The latent cache entries of the rows being exported.
pub(super) struct Prepared {
    entries: HashMap<i64, String>,
    /// Whether the mirrored latents were asked for.
    flip: bool,
    flipped: HashMap<i64, String>,
    /// Items with a bucket image but no latents, with why.
    failed: HashMap<i64, String>,
    scale: f64,
    /// Latents read from the cache (mirrored ones included).
    pub cached: usize,
    /// Latents the VAE encoded in this run (mirrored ones included).
    pub encoded: usize,
}

/// Encode (or find in the cache) the latents of every row with a bucket
/// image on disk, and with `flipped` those of the mirrored images too. An
/// image that cannot be read (or gives non-finite latents) is that item's
/// failure.
pub(super) fn prepare(
    m: &mut Manifest,
    rows: &[ExportRow],
    src: &LatentSource,
    flipped: bool,
    run_id: i64,
    ctx: &Ctx,
) -> Result<Prepared> {
    let root = m.root().to_path_buf();
    let items: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.bucket_path
                .as_ref()
                .is_some_and(|p| root.join(p).is_file())
        })
        .filter_map(|r| crate::train::data::bucketed_item(r, String::new()))
        .collect();
    let mut out = Prepared {
        entries: HashMap::new(),
        flip: flipped,
        flipped: HashMap::new(),
        failed: HashMap::new(),
        scale: src.vae.scale_factor(),
        cached: 0,
        encoded: 0,
    };
    for mirror in [false, true] {
        if mirror && !flipped {
            continue;
        }
        // The mirror of an image that failed fails the same way.
        let refs: Vec<_> = items
            .iter()
            .filter(|it| !out.failed.contains_key(&it.item_id))
            .collect();
        let got = cache::latents(
            m,
            &LatentInputs {
                vae_hash: &src.vae_hash,
                vae: &src.vae,
                items: &refs,
                mode: LatentMode::Mean,
                seed: 0,
                flipped: mirror,
                device: &src.device,
                vae_dtype: src.dtype,
                keep_going: true,
            },
            run_id,
            ctx,
        )?;
        out.cached += got.cached;
        out.encoded += got.encoded;
        out.failed.extend(got.failed);
        if mirror {
            out.flipped = got.entries;
        } else {
            out.entries = got.entries;
        }
    }
    Ok(out)
}

/// What becomes of one exported item's `.npz`.
pub(super) enum Outcome {
    /// Written.
    Written,
    /// No bucket image: kohya encodes the item itself.
    Unbucketed,
    /// Not written, with why (the image is exported; kohya encodes it).
    Failed(String),
}

impl Prepared {
    /// Write the `.npz` of `r` at `path`, or say why not.
    pub(super) fn write(&self, root: &Path, r: &ExportRow, path: &Path) -> Outcome {
        if let Some(why) = self.failed.get(&r.item_id) {
            return Outcome::Failed(why.clone());
        }
        if !self.entries.contains_key(&r.item_id) {
            return Outcome::Unbucketed;
        }
        match self.try_write(root, r, path) {
            Ok(()) => Outcome::Written,
            Err(e) => {
                // Nothing half-written is left for kohya to choke on.
                let _ = std::fs::remove_file(path);
                Outcome::Failed(e.to_string())
            }
        }
    }

    /// Write the `.npz` and read it back (a zip whose finishing failed
    /// would otherwise go unnoticed).
    fn try_write(&self, root: &Path, r: &ExportRow, path: &Path) -> Result<()> {
        let field = |name: &str, v: Option<i64>| -> Result<u32> {
            v.filter(|v| *v >= 0).map(|v| v as u32).ok_or_else(|| {
                Error::Other(format!(
                    "item {}: no {name} in the manifest; rerun `eps2v bucket --force`",
                    r.item_id
                ))
            })
        };
        let bucket = (
            field("bucket_w", r.bucket_w)?,
            field("bucket_h", r.bucket_h)?,
        );
        let resized = (
            field("resized_w", r.resized_w)?,
            field("resized_h", r.resized_h)?,
        );
        let left_top = (
            field("crop_left_resized", r.crop_left_resized)?,
            field("crop_top_resized", r.crop_top_resized)?,
        );
        let original = [r.width, r.height].map(|v| v.filter(|v| *v > 0));
        let [Some(ow), Some(oh)] = original else {
            return Err(Error::Other(format!(
                "item {}: no original width/height in the manifest; import it again (`eps2v import`)",
                r.item_id
            )));
        };
        if resized.0 < bucket.0 + left_top.0 || resized.1 < bucket.1 + left_top.1 {
            return Err(Error::Other(format!(
                "item {}: its crop ({}, {}) of a {}x{} bucket does not fit its {}x{} resized image; rerun `eps2v bucket --force`",
                r.item_id, left_top.0, left_top.1, bucket.0, bucket.1, resized.0, resized.1
            )));
        }
        let unscaled = |entries: &HashMap<i64, String>| -> Result<Tensor> {
            let rel = entries.get(&r.item_id).ok_or_else(|| {
                Error::Other(format!("item {}: no latent was encoded", r.item_id))
            })?;
            let z = cache::read_latent(root, rel).map_err(|why| {
                Error::Other(format!(
                    "latent cache entry {} is {why}; rerun the export to encode it again",
                    root.join(rel).display()
                ))
            })?;
            Ok((z / self.scale)?)
        };
        let ltrb = kohya_crop_ltrb(bucket, resized, left_top);
        let original = [ow, oh];
        let mut arrays: Vec<(&str, Tensor)> = vec![
            ("latents", unscaled(&self.entries)?),
            ("original_size", Tensor::new(&original[..], &Device::Cpu)?),
            ("crop_ltrb", Tensor::new(&ltrb[..], &Device::Cpu)?),
        ];
        if self.flip {
            arrays.push(("latents_flipped", unscaled(&self.flipped)?));
        }
        let io = |e: candle_core::Error| Error::Other(format!("{}: {e}", path.display()));
        Tensor::write_npz(&arrays, path).map_err(io)?;
        let names: Vec<&str> = arrays.iter().map(|(n, _)| *n).collect();
        Tensor::read_npz_by_name(path, &names).map_err(io)?;
        Ok(())
    }
}
