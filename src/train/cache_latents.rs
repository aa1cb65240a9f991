//! The latent half of the caches ([`latents`]): one entry per item and
//! bucket geometry, VAE, latent mode and dtype, shared by `train` and the
//! kohya export.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{entry_ok, entry_path, keyed, record, sweep, write_entry, Row};
use crate::diffusion::noise::normals;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::models::sdxl::{Vae, VAE_PREFIX};
use crate::stages::Ctx;
use crate::train::config::LatentMode;
use crate::train::data::{content_key, rng_for, stream, TrainItem};
use crate::{Error, Result};

/// What [`latents`] encodes, and with which VAE.
pub struct LatentInputs<'a> {
    /// The VAE's component hash ([`vae_hash`]), part of every key.
    pub vae_hash: &'a str,
    /// The VAE.
    pub vae: &'a Vae,
    /// The items whose bucket images are encoded.
    pub items: &'a [&'a TrainItem],
    /// Mean or seeded sample of the latent distribution.
    pub mode: LatentMode,
    /// Seed of [`LatentMode::Sample`].
    pub seed: u64,
    /// Encode the horizontally mirrored bucket image (kohya's
    /// `latents_flipped`); a key of its own.
    pub flipped: bool,
    /// Where the VAE runs.
    pub device: &'a Device,
    /// dtype the VAE runs in (anything but f32 is part of the key).
    pub vae_dtype: DType,
    /// An item whose image cannot be read or whose latents are not finite
    /// is listed in [`LatentEntries::failed`] and the rest go on (the kohya
    /// export); otherwise it is the call's error (train).
    pub keep_going: bool,
}

/// The component hash of a file's VAE, which keys its latents: the
/// tensors under `first_stage_model.` of a checkpoint, or every tensor of a
/// standalone VAE file (the same weights in the two layouts hash
/// differently, which only costs a recomputation).
pub fn vae_hash(ckpt: &Checkpoint) -> String {
    match ckpt.vae_prefix() {
        Some("") => ckpt.component_sha256(&[""]),
        _ => ckpt.component_sha256(&[&format!("{VAE_PREFIX}.")]),
    }
}

/// The cache key of an item's latent: its content hash, its bucket
/// geometry (`"WxH RWxRH top,left"`: bucket, cover-scaled size, crop), the
/// VAE's component hash and the latent mode (`mean`, `sample:<seed>:content`, plus
/// ` flipped` for the mirrored image), and the VAE dtype off f32. Caches
/// written by earlier versions stay valid only while this stays the same
/// (pinned by a test).
pub(super) fn latent_key(it: &TrainItem, vae_hash: &str, mode: &str, vae_dtype: DType) -> String {
    let geometry = format!(
        "{}x{} {}x{} {},{}",
        it.bucket.0,
        it.bucket.1,
        it.resized.0,
        it.resized.1,
        it.size.crop_top_left.0,
        it.size.crop_top_left.1
    );
    keyed(
        &[
            b"latent",
            it.sha256.as_bytes(),
            geometry.as_bytes(),
            vae_hash.as_bytes(),
            mode.as_bytes(),
        ],
        vae_dtype,
    )
}

/// The latent mode part of a latent key (and `cache_entries.detail`):
/// `mean` or `sample:<seed>:content`, plus ` flipped` for the mirrored image.
pub(super) fn latent_mode(mode: LatentMode, seed: u64, flipped: bool) -> String {
    let mut s = match mode {
        LatentMode::Mean => "mean".to_string(),
        // Noise keyed by the image's content ([`content_key`]); entries
        // of the id-keyed `sample:<seed>` before it are not reused.
        LatentMode::Sample => format!("sample:{seed}:content"),
    };
    if flipped {
        s.push_str(" flipped");
    }
    s
}

/// What [`latents`] found and made.
#[derive(Debug, Default)]
pub struct LatentEntries {
    /// The scaled latent entry of each item (relative to the dataset folder).
    pub entries: HashMap<i64, String>,
    /// Entries read back from the cache.
    pub cached: usize,
    /// Entries the VAE encoded in this call.
    pub encoded: usize,
    /// With [`LatentInputs::keep_going`]: the items without an entry, with
    /// why (an unreadable bucket image, non-finite latents).
    pub failed: Vec<(i64, String)>,
}

/// The scaled latent entry of each item in `inputs.items`, computing only
/// those missing from the cache. Each entry is recorded in the manifest's
/// `cache_entries` under `run_id` as it is written, so a killed run keeps
/// what it encoded.
pub fn latents(
    m: &mut Manifest,
    inputs: &LatentInputs<'_>,
    run_id: i64,
    ctx: &Ctx,
) -> Result<LatentEntries> {
    let root = m.root().to_path_buf();
    let device = inputs.device;
    let vae_dtype = inputs.vae_dtype;
    let vae_hash = inputs.vae_hash.to_string();
    let (mut cached, mut encoded) = (0, 0);
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    let mut latents = HashMap::new();
    sweep(&root, "latents");
    let mode = latent_mode(inputs.mode, inputs.seed, inputs.flipped);
    let bar = ctx.bar(inputs.items.len() as u64, "latents");
    let mut todo: BTreeMap<(u32, u32), Vec<(&TrainItem, String)>> = BTreeMap::new();
    for it in inputs.items {
        let key = latent_key(it, &vae_hash, &mode, vae_dtype);
        let rel = entry_path("latents", &key);
        if entry_ok(&root, &rel, &["latent"]) {
            rows.push(Row {
                hit: true,
                key: key.clone(),
                kind: "latent",
                item_id: Some(it.item_id),
                model_hash: vae_hash.clone(),
                path: rel.clone(),
                detail: mode.clone(),
            });
            latents.insert(it.item_id, rel);
            cached += 1;
            bar.inc(1);
        } else {
            todo.entry(it.bucket).or_default().push((it, key));
        }
    }
    let to_encode: usize = todo.values().map(Vec::len).sum();
    for group in todo.values() {
        for chunk in group.chunks(4) {
            // Ctrl-C (a stage that installed `signal`) stops here, between
            // chunks; what was encoded stays in the cache.
            if ctx.should_stop() {
                bar.finish_and_clear();
                record(m, run_id, &mut rows)?;
                return Err(Error::Interrupted(format!(
                    "latents: stopped after encoding {encoded} of {to_encode}; they are kept in {}, so rerunning the same command goes on from there",
                    root.join("cache/latents").display()
                )));
            }
            // With `keep_going`, an image that cannot be read is that
            // item's failure; otherwise the whole call's.
            let mut imgs = Vec::with_capacity(chunk.len());
            let mut read = Vec::with_capacity(chunk.len());
            for pair in chunk {
                match load_image(
                    &root,
                    &pair.0.image_path,
                    pair.0.bucket,
                    inputs.flipped,
                    device,
                ) {
                    Ok(x) => {
                        imgs.push(x);
                        read.push(pair);
                    }
                    Err(e) if inputs.keep_going => {
                        failed.push((pair.0.item_id, e.to_string()));
                        bar.inc(1);
                    }
                    Err(e) => return Err(e),
                }
            }
            if imgs.is_empty() {
                continue;
            }
            let x = Tensor::cat(&imgs, 0)?; // (b, 3, H, W)
            let z = match inputs.mode {
                LatentMode::Mean => inputs.vae.encode(&x)?,
                LatentMode::Sample => {
                    let (mean, logvar) = inputs.vae.encode_moments(&x)?;
                    let dims = mean.dims().to_vec();
                    let per: usize = dims[1..].iter().product();
                    let noise: Vec<f32> = read
                        .iter()
                        .flat_map(|(it, _)| {
                            normals(
                                &mut rng_for(
                                    inputs.seed,
                                    stream::LATENT,
                                    content_key(&it.sha256),
                                    0,
                                ),
                                per,
                            )
                        })
                        .collect();
                    let n = Tensor::from_vec(noise, dims, device)?;
                    // One encoder pass: the moments are those above.
                    crate::models::sdxl::vae::sample_moments(&mean, &logvar, &n)?
                }
            };
            let z = (z.to_dtype(DType::F32)? * inputs.vae.scale_factor())?; // (b, 4, h, w)
            let values = z.flatten_all()?.to_vec1::<f32>()?;
            let per = values.len() / read.len();
            let finite: Vec<bool> = values
                .chunks(per)
                .map(|v| v.iter().all(|x| x.is_finite()))
                .collect();
            const NAN: &str = "the VAE produced NaN/inf latents; check the VAE (an f16 SDXL VAE overflows: use f32 or the fp16-fix VAE)";
            if !inputs.keep_going && finite.contains(&false) {
                let bad: Vec<i64> = read
                    .iter()
                    .zip(&finite)
                    .filter(|(_, ok)| !**ok)
                    .map(|((it, _), _)| it.item_id)
                    .collect();
                return Err(Error::model(format!("{NAN} (items {bad:?})")));
            }
            for (i, (it, key)) in read.iter().enumerate() {
                bar.inc(1);
                if !finite[i] {
                    failed.push((it.item_id, NAN.to_string()));
                    continue;
                }
                let zi = z.get(i)?.contiguous()?;
                let rel = entry_path("latents", key);
                write_entry(&root, &rel, &[("latent", &zi)])?;
                latents.insert(it.item_id, rel.clone());
                rows.push(Row {
                    hit: false,
                    key: key.clone(),
                    kind: "latent",
                    item_id: Some(it.item_id),
                    model_hash: vae_hash.clone(),
                    path: rel,
                    detail: mode.clone(),
                });
                encoded += 1;
            }
            if rows.len() >= 64 {
                record(m, run_id, &mut rows)?;
            }
        }
    }
    bar.finish_and_clear();
    record(m, run_id, &mut rows)?;

    Ok(LatentEntries {
        entries: latents,
        cached,
        encoded,
        failed,
    })
}

/// Load a bucket image (mirrored left to right when `flipped`) as
/// `(1, 3, h, w)` in [−1, 1].
fn load_image(
    root: &Path,
    rel: &str,
    bucket: (u32, u32),
    flipped: bool,
    device: &Device,
) -> Result<Tensor> {
    let path = root.join(rel);
    let mut img = image::open(&path)
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("{e}; rerun `eps2v bucket` to recreate the training images"),
        })?
        .into_rgb8();
    // A file that is not its bucket's size (replaced by hand) would give
    // latents of another size under the bucket's key.
    if img.dimensions() != bucket {
        return Err(Error::Image {
            path,
            msg: format!(
                "is {}x{}, its bucket is {}x{}; rerun `eps2v bucket --force` to recreate the training images",
                img.width(),
                img.height(),
                bucket.0,
                bucket.1
            ),
        });
    }
    if flipped {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    crate::pipeline::latent::from_rgb8(&img, device)
}
