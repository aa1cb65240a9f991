//! Text-to-image sampling with a loaded [`SdxlModel`], and writing the
//! results as PNGs carrying A1111's `parameters` infotext.
//!
//! Per image: seeded CPU noise ([`crate::diffusion::noise`]; image k of a
//! batch started at seed s uses seed s + k, A1111's convention) → σ list of
//! the chosen schedule → [`ModelDenoiser`] (c_in / c_skip / c_out for ε or v,
//! σ → nearest timestep) → [`CfgDenoiser`] (CFG with φ-rescale in v-space) →
//! sampler → VAE decode (f32; bf16 when the model runs in bf16, never f16)
//! → RGB8 (`round(255·clamp((x+1)/2, 0, 1))`, as
//! diffusers' `numpy_to_pil`).
//!
//! **Batches.** [`sample_batch`] denoises several images — each with its
//! own prompt, unconditional branch and seed — in one UNet call per step
//! (rows `[cond₁…cond_b; uncond₁…uncond_b]`); images whose prompts (or
//! negatives) need a different number of 77-token chunks go in separate
//! calls, and a prompt and its negative keep their own lengths. The batch is a
//! speed knob only: a seed's pixels are bit-identical at any batch size and
//! position on the CPU, because noise is drawn per image, every prompt is
//! encoded on its own, the VAE decodes one image at a time, and the CPU
//! kernels compute each row with the same arithmetic whatever the batch
//! (`nn::kernels::invariant`; tested below). On CUDA, cuBLAS may pick
//! different algorithms for different batch sizes, so there the same seed
//! can differ in the last bits between batch sizes. [`generate`] (`eps2v
//! sample`, evaluation grids) is [`sample_batch`] with one prompt.
//!
//! The infotext follows A1111's `create_infotext` order — Steps, Sampler,
//! Schedule type, CFG scale, Seed, Size, Model hash, Model — then our extra
//! params (Prediction, ZTSNR, Uncond, CFG rescale) where A1111 puts
//! extension params, then Version last; formatting and quoting are
//! [`Infotext::format`]'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::model::{Bound, SdxlModel};
use crate::diffusion::guidance::default_rescale;
use crate::diffusion::noise::{batch_noise, batch_seeds, SeededNoise};
use crate::diffusion::sampler::{initial_latent, sample_with, Sampler};
use crate::diffusion::{
    CfgDenoiser, Denoiser, Guidance, ModelDenoiser, SamplerKind, ScheduleKind, TimestepMode,
    UncondMode,
};
use crate::error::IoContext;
use crate::imaging::infotext::{write_png_with_parameters, Infotext};
use crate::models::sdxl::clip::TextConditioning;
use crate::{Error, Result};

/// Everything one `sample` run needs besides the model.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    /// Positive prompt (A1111 syntax).
    pub prompt: String,
    /// Unconditional branch (zero / empty / negative text).
    pub uncond: UncondMode,
    /// Seed of the first image; image k gets `seed + k`.
    pub seed: u64,
    /// Sampling steps.
    pub steps: usize,
    /// CFG scale (1 = no guidance, the uncond branch is skipped).
    pub cfg: f64,
    /// CFG rescale φ; `None` = 0.7 for v-prediction, 0 for ε.
    pub rescale: Option<f64>,
    /// Sampler.
    pub sampler: SamplerKind,
    /// σ schedule; `None` = trailing for ZTSNR models, normal otherwise.
    pub schedule: Option<ScheduleKind>,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Number of images.
    pub batch: usize,
}

/// The settings actually used (defaults resolved).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Resolved {
    /// CFG rescale φ.
    pub rescale: f64,
    /// σ schedule.
    #[serde(serialize_with = "super::model::ser_display")]
    pub schedule: ScheduleKind,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Its seed.
    pub seed: u64,
    /// Pixels.
    pub image: RgbImage,
    /// Its A1111 infotext.
    pub infotext: Infotext,
}

/// Progress callback argument: `(done, total)` steps over the whole run.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Whether the `n` images from `seed` (seeds `seed..seed + n`) all have
/// seeds an infotext and the manifest read back: at most 2^63 − 1
/// (a signed 64-bit integer).
pub fn seeds_fit(seed: u64, n: u64) -> bool {
    seed.checked_add(n.saturating_sub(1))
        .is_some_and(|last| last <= i64::MAX as u64)
}

impl SampleConfig {
    /// Check the numbers that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::config("--batch must be at least 1"));
        }
        if self.steps == 0 {
            return Err(Error::config("--steps must be at least 1"));
        }
        // Image k gets seed + k, written into its infotext and read back
        // as a signed 64-bit integer (import, A1111): the last must fit.
        if !seeds_fit(self.seed, self.batch as u64) {
            return Err(Error::config(format!(
                "--seed {}: the {} images take seeds up to {} + {}, past 2^63-1 (the largest seed an image's infotext reads back as); give a smaller seed",
                self.seed,
                self.batch,
                self.seed,
                self.batch - 1
            )));
        }
        if !(self.cfg.is_finite() && self.cfg > 0.0) {
            return Err(Error::config(format!(
                "--cfg must be a positive number, got {}",
                self.cfg
            )));
        }
        if let Some(r) = self.rescale {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::config(format!(
                    "--rescale must be between 0 and 1, got {r}"
                )));
            }
        }
        Ok(())
    }

    /// Defaults that depend on the model (prediction type, ZTSNR).
    pub fn resolve(&self, model: &SdxlModel) -> Resolved {
        Resolved {
            rescale: self
                .rescale
                .unwrap_or_else(|| default_rescale(model.info.prediction)),
            schedule: self
                .schedule
                .unwrap_or_else(|| ScheduleKind::default_for(model.info.ztsnr)),
        }
    }

    /// The A1111 infotext of the image with `seed`.
    pub fn infotext(&self, model: &SdxlModel, r: &Resolved, seed: u64) -> Infotext {
        let mut it = Infotext {
            prompt: self.prompt.clone(),
            negative_prompt: match &self.uncond {
                UncondMode::Negative(n) => n.clone(),
                _ => String::new(),
            },
            params: Vec::new(),
        };
        it.set("Steps", self.steps.to_string());
        it.set("Sampler", self.sampler.to_string());
        it.set("Schedule type", r.schedule.to_string());
        it.set("CFG scale", self.cfg.to_string());
        it.set("Seed", seed.to_string());
        it.set("Size", format!("{}x{}", self.width, self.height));
        if let Some(h) = &model.info.autov2 {
            it.set("Model hash", h.clone());
        }
        it.set("Model", model.info.stem.clone());
        it.set("Prediction", model.info.prediction.to_string());
        it.set(
            "ZTSNR",
            if model.info.ztsnr { "True" } else { "False" }.to_string(),
        );
        it.set("Uncond", self.uncond.to_string());
        it.set("CFG rescale", r.rescale.to_string());
        if model.info.ztsnr {
            // A1111's and Forge's own key for it: "Send to txt2img" then
            // samples with zero terminal SNR there too.
            it.set("Noise Schedule", "Zero Terminal SNR".to_string());
        }
        it.set("Version", format!("eps2v {}", env!("CARGO_PKG_VERSION")));
        it
    }
}

/// Generate `cfg.batch` images (seeds `seed..seed+batch`), reporting
/// progress after every step. A broken render (NaN/inf) is an error.
pub fn generate(
    model: &SdxlModel,
    cfg: &SampleConfig,
    progress: Progress<'_>,
) -> Result<Vec<Generated>> {
    cfg.validate()?;
    sample_batch(model, cfg, &cfg.items(), progress)?
        .into_iter()
        .map(Rendered::into_image)
        .collect()
}

impl SampleConfig {
    /// The images of one run: the prompt with seeds `seed..seed + batch`.
    fn items(&self) -> Vec<BatchItem> {
        batch_seeds(self.seed, self.batch)
            .into_iter()
            .map(|seed| BatchItem {
                prompt: self.prompt.clone(),
                uncond: self.uncond.clone(),
                seed,
            })
            .collect()
    }
}

/// One image of a [`sample_batch`]: its prompt, unconditional branch and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// Positive prompt (A1111 syntax).
    pub prompt: String,
    /// Unconditional branch.
    pub uncond: UncondMode,
    /// Seed of its noise.
    pub seed: u64,
}

/// The outcome of one image of a [`sample_batch`].
#[derive(Debug, Clone)]
pub enum Rendered {
    /// A finished image.
    Image(Generated),
    /// The model produced NaN or infinite values for this image.
    Broken {
        /// Its seed.
        seed: u64,
        /// `nan_latent: …` or `nan_decode: …`.
        reason: String,
    },
}

impl Rendered {
    /// The image, or a model error naming the seed and what to check (for
    /// callers that cannot go on without every image).
    pub fn into_image(self) -> Result<Generated> {
        match self {
            Rendered::Image(g) => Ok(g),
            Rendered::Broken { seed, reason } => {
                Err(Error::model(BrokenRender { seed, reason }.message()))
            }
        }
    }
}

/// Render `items` with the shared settings of `cfg` (its `prompt`,
/// `uncond`, `seed` and `batch` are not used): all images of the same
/// chunk count in one UNet call per step, results in the order of `items`.
/// Progress counts image-steps: `(done, items.len() · steps)`.
pub fn sample_batch(
    model: &SdxlModel,
    cfg: &SampleConfig,
    items: &[BatchItem],
    progress: Progress<'_>,
) -> Result<Vec<Rendered>> {
    sample_batch_from(model, cfg, items, None, progress)
}

/// [`sample_batch`] over any number of items of one size: batches of at
/// most `batch` images, run on the lanes that
/// [`crate::nn::lanes::lanes_for_latent`] picks for the size (small latents
/// on the CPU: one single-thread lane per core). Batches and lanes are
/// speed knobs only: the results, in item order, are the pixels of one
/// [`sample_batch`] call.
pub fn sample_many(
    model: &SdxlModel,
    cfg: &SampleConfig,
    items: &[BatchItem],
    batch: usize,
) -> Result<Vec<Rendered>> {
    cfg.validate()?;
    let (_, lh, lw) = model.latent_shape(cfg.width, cfg.height)?;
    let lanes = crate::nn::lanes::lanes_for_latent(&model.device, lw, lh);
    let per = items.len().div_ceil(lanes).clamp(1, batch.max(1));
    let chunks: Vec<&[BatchItem]> = items.chunks(per).collect();
    // One lane: the pool's idle worker polls through the loop (`keep_warm`).
    let _warm = (lanes <= 1).then(crate::nn::keep_warm);
    let mut out = Vec::with_capacity(items.len());
    crate::nn::lanes::run(
        chunks.len(),
        lanes,
        |i| sample_batch(model, cfg, chunks[i], &mut |_, _| {}),
        |_, r| {
            out.extend(r);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Where img2img sampling starts: one clean UNet-scale latent per item
/// `(1, c, h/8, w/8)`, noised with the item's seeded noise to the σ of
/// step `step` of the `cfg.steps`-step txt2img schedule, which is then run
/// from there: the last `steps − step` steps (the infotext records
/// `Denoising strength: (steps − step)/steps`). Unlike ComfyUI's `denoise`
/// the σ list is not recomputed, so every start lies on the txt2img path.
pub struct Start<'a> {
    /// Clean latents, one per item.
    pub latents: &'a [Tensor],
    /// First step to run (`0..steps`).
    pub step: usize,
}

/// [`sample_batch`] from pure noise (`start` `None`, txt2img) or from
/// noised latents ([`Start`]).
pub fn sample_batch_from(
    model: &SdxlModel,
    cfg: &SampleConfig,
    items: &[BatchItem],
    start: Option<&Start<'_>>,
    progress: Progress<'_>,
) -> Result<Vec<Rendered>> {
    cfg.validate()?;
    let shape = model.latent_shape(cfg.width, cfg.height)?; // (4, h/8, w/8)
    let r = cfg.resolve(model);
    let schedule = model.schedule();
    let mut sigmas = r.schedule.sigmas(&schedule, cfg.steps)?;
    if let Some(st) = start {
        if st.step >= cfg.steps {
            return Err(Error::config(format!(
                "img2img: start step {} is outside 0..{} (the sampling steps)",
                st.step, cfg.steps
            )));
        }
        if st.latents.len() != items.len() {
            return Err(Error::config(format!(
                "img2img: {} start latents for {} images",
                st.latents.len(),
                items.len()
            )));
        }
        sigmas.drain(..st.step);
    }
    let steps = sigmas.len() - 1;
    let guided = cfg.cfg != 1.0;
    // Each prompt on its own (batch-invariant text), grouped by the chunk
    // counts of prompt and negative.
    let conds = items
        .iter()
        .map(|it| model.conditioning(&it.prompt, &it.uncond))
        .collect::<Result<Vec<_>>>()?;
    let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
    for (i, (c, u)) in conds.iter().enumerate() {
        let k = (c.context.dim(1)?, u.context.dim(1)?);
        match groups.iter_mut().find(|g| g.0 == k) {
            Some(g) => g.1.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    let total = steps * items.len();
    let mut done = 0usize;
    let mut out: Vec<Option<Rendered>> = vec![None; items.len()];
    for (_, idx) in groups {
        let cat = |f: &dyn Fn(usize) -> Tensor| -> Result<Tensor> {
            let parts: Vec<Tensor> = idx.iter().map(|&i| f(i)).collect();
            Ok(Tensor::cat(&parts, 0)?)
        };
        let cond = TextConditioning {
            context: cat(&|i| conds[i].0.context.clone())?, // (b, 77·k, ctx)
            pooled: cat(&|i| conds[i].0.pooled.clone())?,   // (b, pooled)
        };
        let uncond = TextConditioning {
            context: cat(&|i| conds[i].1.context.clone())?,
            pooled: cat(&|i| conds[i].1.pooled.clone())?,
        };
        let bound = Bound::new(
            &model.unet,
            &cond,
            guided.then_some(&uncond),
            cfg.height,
            cfg.width,
        )?;
        let inner = ModelDenoiser {
            model: &bound,
            prediction: model.info.prediction,
            schedule: &schedule,
            timestep_mode: TimestepMode::Nearest,
        };
        let cfg_denoiser;
        let denoiser: &dyn Denoiser = if guided {
            cfg_denoiser = CfgDenoiser {
                inner,
                guidance: Guidance {
                    scale: cfg.cfg,
                    rescale: r.rescale,
                },
            };
            &cfg_denoiser
        } else {
            &inner
        };
        let seeds: Vec<u64> = idx.iter().map(|&i| items[i].seed).collect();
        let x = match start {
            None => initial_latent(&seeds, shape, &sigmas, &schedule, &model.device)?, // (b, 4, h/8, w/8)
            Some(st) => {
                let x0 = cat(&|i| st.latents[i].clone())?.to_dtype(DType::F32)?;
                if x0.dims()[1..] != [shape.0, shape.1, shape.2] {
                    return Err(Error::config(format!(
                        "img2img: start latent of shape {:?}, the sampler wants {:?} for {}x{}",
                        &x0.dims()[1..],
                        shape,
                        cfg.width,
                        cfg.height
                    )));
                }
                let noise = batch_noise(&seeds, shape, &model.device)?;
                (x0 + noise.affine(sigmas[0], 0.0)?)?
            }
        };
        let mut noise = SeededNoise::new(&seeds);
        let b = seeds.len();
        let latent = sample_with(
            denoiser,
            &sigmas,
            x,
            Sampler::new(cfg.sampler),
            &mut noise,
            &mut |_| {
                done += b;
                progress(done, total);
                Ok(())
            },
        )?;
        for (j, &i) in idx.iter().enumerate() {
            let it = &items[i];
            let one = latent.narrow(0, j, 1)?; // (1, 4, h/8, w/8)
            out[i] = Some(match decode_rgb8(model, &one)? {
                Err(reason) => Rendered::Broken {
                    seed: it.seed,
                    reason,
                },
                Ok(image) => {
                    let per = SampleConfig {
                        prompt: it.prompt.clone(),
                        uncond: it.uncond.clone(),
                        seed: it.seed,
                        batch: 1,
                        ..cfg.clone()
                    };
                    let mut infotext = per.infotext(model, &r, it.seed);
                    if let Some(st) = start {
                        let version = infotext.get("Version").map(str::to_string);
                        infotext.params.retain(|(k, _)| k != "Version");
                        infotext.set(
                            "Denoising strength",
                            format!("{}", (cfg.steps - st.step) as f64 / cfg.steps as f64),
                        );
                        if let Some(v) = version {
                            infotext.set("Version", v);
                        }
                    }
                    Rendered::Image(Generated {
                        seed: it.seed,
                        image,
                        infotext,
                    })
                }
            });
        }
    }
    out.into_iter()
        .map(|r| r.ok_or_else(|| Error::Other("sample_batch: an image was not rendered".into())))
        .collect()
}

/// VAE-decode one latent `(1, 4, h, w)` (f32) to RGB8; `Ok(Err(reason))`
/// when the latent or the decoded image holds NaN/inf.
fn decode_rgb8(
    model: &SdxlModel,
    latent: &Tensor,
) -> Result<std::result::Result<RgbImage, String>> {
    let latent = latent.to_dtype(DType::F32)?;
    let bad = latent
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    if bad > 0 {
        return Ok(Err(format!(
            "nan_latent: {bad} of {} latent values are NaN or infinite",
            latent.elem_count()
        )));
    }
    let img = model.vae.decode_scaled(&latent)?; // (1, 3, H, W)
    let (_, c, h, w) = img.dims4()?;
    if c != 3 {
        return Err(Error::model(format!(
            "vae decoded {c} channels, expected 3"
        )));
    }
    let data = img
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?; // (H·W·3), in [-1, 1]
                            // Checked before the clamp, which turns NaN into a valid pixel.
    if data.iter().any(|v| !v.is_finite()) {
        return Ok(Err(
            "nan_decode: the VAE produced NaN or infinite pixels".to_string()
        ));
    }
    let bytes: Vec<u8> = data
        .iter()
        .map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0))
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .map(Ok)
        .ok_or_else(|| Error::Other("decoded image buffer has the wrong size".into()))
}

/// The first free A1111-style index in `dir`: one more than the largest
/// `NNNNN-…png` already there (0 for an empty folder).
pub fn next_index(dir: &Path) -> Result<u64> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let name = entry.at(dir)?.file_name();
        let name = name.to_string_lossy();
        if let Some((num, _)) = name.split_once('-') {
            if num.len() >= 5 && name.ends_with(".png") {
                if let Ok(n) = num.parse::<u64>() {
                    next = next.max(n + 1);
                }
            }
        }
    }
    Ok(next)
}

/// Write `png` bytes to `path` atomically, synced ([`crate::atomic::write`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write(path, bytes, true)
}

/// What `eps2v sample` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleReport {
    /// Written PNG files, in seed order.
    pub files: Vec<PathBuf>,
    /// Seed of each file.
    pub seeds: Vec<u64>,
    /// Wall time of the whole run (load excluded), seconds.
    pub seconds: f64,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// The model as loaded.
    pub model: super::model::ModelInfo,
    /// Defaults resolved for this model.
    pub resolved: Resolved,
    /// Renders the model broke (NaN/inf), each with its seed and what to
    /// check; the others are written. Empty when every image came out.
    pub broken: Vec<BrokenRender>,
}

/// A render the model broke (NaN or infinite values).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokenRender {
    /// Its seed.
    pub seed: u64,
    /// `nan_latent: …` or `nan_decode: …`.
    pub reason: String,
}

impl BrokenRender {
    /// Its seed, reason and what to check.
    pub fn message(&self) -> String {
        format!(
            "seed {}: {} (check the prediction type with --prediction, or the checkpoint with `eps2v ckpt check`)",
            self.seed, self.reason
        )
    }
}

impl SampleReport {
    /// One line naming the broken renders and what to check, `None` when
    /// there are none.
    pub fn broken_message(&self) -> Option<String> {
        let mut msg = self.broken.first()?.message();
        if self.broken.len() > 1 {
            let rest: Vec<String> = self.broken[1..]
                .iter()
                .map(|b| b.seed.to_string())
                .collect();
            msg.push_str(&format!("; seeds {} too", rest.join(", ")));
        }
        Some(msg)
    }
}

/// Generate and write PNGs `NNNNN-SEED.png` into `out_dir` (created if
/// needed), each with its `parameters` infotext, numbered on from the
/// folder's highest; a file is never replaced.
pub fn run(
    model: &SdxlModel,
    cfg: &SampleConfig,
    out_dir: &Path,
    load_seconds: f64,
    progress: Progress<'_>,
) -> Result<SampleReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    model.latent_shape(cfg.width, cfg.height)?;
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    // A broken image (NaN) costs only itself: the others are written, and
    // the report names it (the CLI exits 1).
    let mut images = Vec::new();
    let mut broken: Vec<BrokenRender> = Vec::new();
    for r in sample_batch(model, cfg, &cfg.items(), progress)? {
        match r {
            Rendered::Image(g) => images.push(g),
            Rendered::Broken { seed, reason } => broken.push(BrokenRender { seed, reason }),
        }
    }
    let mut files = Vec::new();
    let mut seeds = Vec::new();
    let mut index = next_index(out_dir)?;
    for g in &images {
        let png = write_png_with_parameters(&g.image, &g.infotext.format())?;
        // A number another run took meanwhile (two `sample`s into one
        // folder) is passed over, not overwritten.
        let path = loop {
            let path = out_dir.join(format!("{index:05}-{}.png", g.seed));
            index += 1;
            if crate::atomic::write_new(&path, &png, true)? {
                break path;
            }
        };
        files.push(path);
        seeds.push(g.seed);
    }
    Ok(SampleReport {
        files,
        seeds,
        seconds: t0.elapsed().as_secs_f64(),
        load_seconds,
        model: model.info.clone(),
        resolved: cfg.resolve(model),
        broken,
    })
}

#[cfg(test)]
#[path = "sample_tests.rs"]
mod tests;
