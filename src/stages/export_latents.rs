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
//! in a bucket of the image's own size: `--enable_bucket
//! --bucket_no_upscale` with `--resolution` at least the largest bucket and
//! `--bucket_reso_steps` dividing every bucket side (64 does for eps2v's
//! SDXL buckets). Items without a bucket get no `.npz` (kohya encodes them).
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
use crate::models::sdxl::checkpoint::Checkpoint;
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
        let cfg = ckpt
            .infer_vae_config()
            .map_err(|e| Error::config(format!("export --latents {}: {e}", path.display())))?
            .config;
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

/// The latent cache entries of the rows being exported.
pub(super) struct Prepared {
    entries: HashMap<i64, String>,
    flipped: HashMap<i64, String>,
    scale: f64,
    /// Latents read from the cache (mirrored ones included).
    pub cached: usize,
    /// Latents the VAE encoded in this run (mirrored ones included).
    pub encoded: usize,
}

/// Encode (or find in the cache) the latents of every row with a bucket
/// image on disk, and with `flipped` those of the mirrored images too.
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
    let refs: Vec<_> = items.iter().collect();
    let mut out = Prepared {
        entries: HashMap::new(),
        flipped: HashMap::new(),
        scale: src.vae.scale_factor(),
        cached: 0,
        encoded: 0,
    };
    for mirror in [false, true] {
        if mirror && !flipped {
            continue;
        }
        let (entries, cached, encoded) = cache::latents(
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
            },
            run_id,
            ctx,
        )?;
        out.cached += cached;
        out.encoded += encoded;
        if mirror {
            out.flipped = entries;
        } else {
            out.entries = entries;
        }
    }
    Ok(out)
}

impl Prepared {
    /// Whether `item_id` has its latents.
    pub(super) fn has(&self, item_id: i64) -> bool {
        self.entries.contains_key(&item_id)
    }

    /// Write the `.npz` of `r` at `path` and read it back (a zip whose
    /// finishing failed would otherwise go unnoticed); `Err` says why not
    /// (an entry removed as corrupt is recomputed by the next export).
    pub(super) fn write(&self, root: &Path, r: &ExportRow, path: &Path) -> Result<()> {
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
        let (Some(bw), Some(bh)) = (r.bucket_w, r.bucket_h) else {
            return Err(Error::Other(format!("item {}: no bucket", r.item_id)));
        };
        let dim = |v: Option<i64>| v.unwrap_or(0).max(0) as u32;
        let ltrb = kohya_crop_ltrb(
            (bw as u32, bh as u32),
            (dim(r.resized_w), dim(r.resized_h)),
            (dim(r.crop_left_resized), dim(r.crop_top_resized)),
        );
        let original = [r.width.unwrap_or(bw), r.height.unwrap_or(bh)];
        let mut arrays: Vec<(&str, Tensor)> = vec![
            ("latents", unscaled(&self.entries)?),
            ("original_size", Tensor::new(&original[..], &Device::Cpu)?),
            ("crop_ltrb", Tensor::new(&ltrb[..], &Device::Cpu)?),
        ];
        if !self.flipped.is_empty() {
            arrays.push(("latents_flipped", unscaled(&self.flipped)?));
        }
        let io = |e: candle_core::Error| Error::Other(format!("{}: {e}", path.display()));
        Tensor::write_npz(&arrays, path).map_err(io)?;
        let names: Vec<&str> = arrays.iter().map(|(n, _)| *n).collect();
        Tensor::read_npz_by_name(path, &names).map_err(io)?;
        Ok(())
    }
}
