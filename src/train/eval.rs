//! Watching the run by images: a fixed prompt × seed set sampled with the
//! base model once (its own objective) and with the model being trained at
//! every evaluation (the *target* objective, ZTSNR-correct: trailing
//! spacing from σ_max on the ZTSNR schedule, CFG rescale for v — exactly
//! what `eps2v sample` does for such a checkpoint), the shape-retention
//! score between the two ([`super::retention`]), and a grid PNG: one row per
//! (prompt, seed), one column per evaluation point, the base model first.
//!
//! Every evaluation's images are written under `runs/<id>/eval/<label>/`
//! (`base`, `step-000100`, …), and the grid is rebuilt from those folders,
//! so a resumed run keeps the columns of before its interruption.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{imageops, RgbImage};

use super::config::TrainConfig;
use super::data::TrainItem;
use super::retention::mean_retention;
use crate::diffusion::{Prediction, SamplerKind, UncondMode};
use crate::error::IoContext;
use crate::imaging::infotext::write_png_with_parameters;
use crate::manifest::Manifest;
use crate::pipeline::sample::{sample_many, write_atomic, BatchItem, Rendered, SampleConfig};
use crate::pipeline::SdxlModel;
use crate::stages::bucket::encode_png_fast;
use crate::{Error, Result};

/// What is sampled at every evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// Prompts (rows, each repeated per seed).
    pub prompts: Vec<String>,
    /// Seeds per prompt.
    pub seeds: Vec<u64>,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Sampling steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Unconditional branch (the run's caption-dropout conditioning).
    pub uncond: UncondMode,
}

/// Longest side of a grid cell in pixels.
const CELL_MAX: u32 = 192;

/// The evaluation images of a run.
pub struct Evaluator {
    spec: EvalSpec,
    dir: PathBuf,
    reference: Vec<RgbImage>,
}

/// Sample `spec`'s prompt × seed set with `model` as its `info` says
/// (prediction type, ZTSNR), prompt-major. The images are those of one
/// `eps2v sample` per prompt and seed; they are rendered in batches of up
/// to [`SET_BATCH`] on lanes ([`crate::pipeline::sample_many`]), which
/// changes no pixel.
fn sample_rendered(model: &SdxlModel, spec: &EvalSpec) -> Result<Vec<Rendered>> {
    let cfg = SampleConfig {
        prompt: String::new(),
        uncond: spec.uncond.clone(),
        seed: 0,
        steps: spec.steps,
        cfg: spec.cfg,
        rescale: None,
        sampler: spec.sampler,
        schedule: None,
        width: spec.width,
        height: spec.height,
        batch: 1,
    };
    let items: Vec<BatchItem> = spec
        .prompts
        .iter()
        .flat_map(|p| {
            spec.seeds.iter().map(|&seed| BatchItem {
                prompt: p.clone(),
                uncond: spec.uncond.clone(),
                seed,
            })
        })
        .collect();
    sample_many(model, &cfg, &items, SET_BATCH)
}

/// [`sample_rendered`] as images; a broken render (NaN latents or
/// pixels) is an error.
pub fn sample_set(model: &SdxlModel, spec: &EvalSpec) -> Result<Vec<RgbImage>> {
    sample_rendered(model, spec)?
        .into_iter()
        .map(|r| Ok(r.into_image()?.image))
        .collect()
}

/// Images per UNet call in [`sample_set`] (a speed knob).
pub const SET_BATCH: usize = 8;

/// Sample one latent `(1, 4, h/8, w/8)` (not decoded) for `prompt` and
/// `seed` with Euler on the model's default σ schedule (trailing for ZTSNR),
/// CFG `cfg` (1 = no uncond branch) with the default rescale for its
/// prediction type, zeroed uncond: the same path as `sample`, stopping
/// before the VAE. Used to measure distances to training latents.
pub fn sample_latent(
    model: &SdxlModel,
    prompt: &str,
    seed: u64,
    steps: usize,
    cfg: f64,
    width: u32,
    height: u32,
) -> Result<candle_core::Tensor> {
    use crate::diffusion::{
        initial_latent, sample_with, CfgDenoiser, Denoiser, Guidance, ModelDenoiser, Sampler,
        ScheduleKind, SeededNoise, TimestepMode,
    };
    use crate::pipeline::model::Bound;
    let shape = model.latent_shape(width, height)?;
    let schedule = model.schedule();
    let sigmas = ScheduleKind::default_for(model.info.ztsnr).sigmas(&schedule, steps)?;
    let guided = cfg != 1.0;
    let (c, u) = model.conditioning(prompt, &UncondMode::Zero)?;
    let bound = Bound::new(&model.unet, &c, guided.then_some(&u), height, width)?;
    let inner = ModelDenoiser {
        model: &bound,
        prediction: model.info.prediction,
        schedule: &schedule,
        timestep_mode: TimestepMode::Nearest,
    };
    let cfg_den;
    let den: &dyn Denoiser = if guided {
        cfg_den = CfgDenoiser {
            inner,
            guidance: Guidance {
                scale: cfg,
                rescale: crate::diffusion::guidance::default_rescale(model.info.prediction),
            },
        };
        &cfg_den
    } else {
        &inner
    };
    let x = initial_latent(&[seed], shape, &sigmas, &schedule, &model.device)?;
    sample_with(
        den,
        &sigmas,
        x,
        Sampler::new(SamplerKind::Euler),
        &mut SeededNoise::new(&[seed]),
        &mut |_| Ok(()),
    )
}

fn read_column(dir: &Path, n: usize) -> Option<Vec<RgbImage>> {
    (0..n)
        .map(|i| {
            image::open(dir.join(format!("{i:03}.png")))
                .ok()
                .map(|im| im.to_rgb8())
        })
        .collect()
}

impl Evaluator {
    /// Evaluations of the run in `run_dir`; the base model's samples are
    /// read back from `eval/base/` when a previous attempt wrote them,
    /// otherwise sampled with `base` and written there.
    pub fn new(spec: EvalSpec, run_dir: &Path, base: &SdxlModel) -> Result<Self> {
        let dir = run_dir.join("eval");
        let n = spec.prompts.len() * spec.seeds.len();
        let mut ev = Self {
            spec,
            dir,
            reference: Vec::new(),
        };
        ev.reference = match read_column(&ev.dir.join("base"), n) {
            Some(imgs) => imgs,
            None => {
                let imgs = sample_set(base, &ev.spec)?;
                ev.write_column("base", &imgs, base.info.prediction, base.info.ztsnr)?;
                imgs
            }
        };
        Ok(ev)
    }

    /// The spec.
    pub fn spec(&self) -> &EvalSpec {
        &self.spec
    }

    fn write_column(
        &self,
        label: &str,
        imgs: &[RgbImage],
        prediction: Prediction,
        ztsnr: bool,
    ) -> Result<()> {
        let dir = self.dir.join(label);
        std::fs::create_dir_all(&dir).at(&dir)?;
        let mut i = 0;
        for p in &self.spec.prompts {
            for &seed in &self.spec.seeds {
                let text = format!(
                    "{p}\nSeed: {seed}, Steps: {}, CFG scale: {}, Size: {}x{}, Prediction: {prediction}, ZTSNR: {}, Eval: {label}",
                    self.spec.steps,
                    self.spec.cfg,
                    self.spec.width,
                    self.spec.height,
                    if ztsnr { "True" } else { "False" }
                );
                let png = write_png_with_parameters(&imgs[i], &text)?;
                write_atomic(&dir.join(format!("{i:03}.png")), &png)?;
                i += 1;
            }
        }
        Ok(())
    }

    /// Sample `model` (the current weights, viewed with the target objective),
    /// store the column `step-NNNNNN`, rebuild the grid; returns the mean
    /// retention against the base samples and the grid's path.
    pub fn evaluate(&self, model: &SdxlModel, step: usize) -> Result<(f64, PathBuf)> {
        // The base rendered these prompts: a broken render now is the
        // training's doing (weights blown up with a finite loss, which
        // the NaN guard does not see), not the prediction type's.
        let imgs = sample_rendered(model, &self.spec)?
            .into_iter()
            .map(|r| match r {
                Rendered::Image(g) => Ok(g.image),
                // Before any step it is the base (or how it is sampled).
                Rendered::Broken { seed, reason } if step == 0 => Err(Error::model(
                    crate::pipeline::sample::BrokenRender { seed, reason }.message(),
                )),
                Rendered::Broken { seed, reason } => Err(Error::model(format!(
                    "training diverged by step {step}: the evaluation's render of seed {seed} is broken ({reason}) although the base rendered it; the weights blew up with a finite loss (the NaN guard acts on non-finite losses only): lower the learning rate, or keep gradient clipping on (--max-grad-norm), and start a new run (a resume would repeat it)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let label = format!("step-{step:06}");
        self.write_column(&label, &imgs, model.info.prediction, model.info.ztsnr)?;
        let score = mean_retention(&self.reference, &imgs);
        let grid = self.write_grid(step)?;
        Ok((score, grid))
    }

    /// Drop evaluation columns after `step` (a resumed run redoes them).
    pub fn forget_after(&self, step: usize) -> Result<()> {
        for (s, dir) in self.columns()? {
            if s > step {
                std::fs::remove_dir_all(&dir).at(&dir)?;
            }
        }
        Ok(())
    }

    /// `(step, folder)` of every stored evaluation column, in step order.
    fn columns(&self) -> Result<Vec<(usize, PathBuf)>> {
        let mut cols = Vec::new();
        if !self.dir.is_dir() {
            return Ok(cols);
        }
        for e in std::fs::read_dir(&self.dir).at(&self.dir)? {
            let e = e.at(&self.dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = name
                .strip_prefix("step-")
                .and_then(|n| n.parse::<usize>().ok())
            {
                cols.push((s, e.path()));
            }
        }
        cols.sort();
        Ok(cols)
    }

    /// Rebuild `eval/grid.png` from the base column and every column up to
    /// `last_step`: rows (prompt, seed), columns base then steps.
    pub fn write_grid(&self, last_step: usize) -> Result<PathBuf> {
        let n = self.spec.prompts.len() * self.spec.seeds.len();
        let mut columns = vec![self.reference.clone()];
        for (s, dir) in self.columns()? {
            if s <= last_step {
                if let Some(c) = read_column(&dir, n) {
                    columns.push(c);
                }
            }
        }
        let grid = compose_grid(&columns, self.spec.width, self.spec.height);
        let path = self.dir.join("grid.png");
        write_atomic(&path, &encode_png_fast(&grid)?)?;
        Ok(path)
    }
}

/// Lay out `columns` of equally sized images (`w × h`) side by side, one
/// row per image index, cells scaled down to at most [`CELL_MAX`] px, with
/// white gaps.
pub fn compose_grid(columns: &[Vec<RgbImage>], w: u32, h: u32) -> RgbImage {
    let rows = columns.iter().map(Vec::len).max().unwrap_or(0);
    let scale = (CELL_MAX as f64 / w.max(h).max(1) as f64).min(1.0);
    let (cw, ch) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    let gap = 4;
    let gw = columns.len() as u32 * (cw + gap) + gap;
    let gh = rows as u32 * (ch + gap) + gap;
    let mut grid = RgbImage::from_pixel(gw, gh, image::Rgb([255, 255, 255]));
    for (c, col) in columns.iter().enumerate() {
        for (r, img) in col.iter().enumerate() {
            let cell = if img.dimensions() != (cw, ch) {
                imageops::resize(img, cw, ch, imageops::FilterType::Triangle)
            } else {
                img.clone()
            };
            let x = gap + c as u32 * (cw + gap);
            let y = gap + r as u32 * (ch + gap);
            imageops::overlay(&mut grid, &cell, x as i64, y as i64);
        }
    }
    grid
}

/// Record an evaluation of run `run_id` (its grid relative to the dataset).
pub(super) fn record_eval(
    m: &Manifest,
    run_id: i64,
    step: usize,
    val_loss: Option<f64>,
    retention: f64,
    grid: &Path,
) -> Result<()> {
    let rel = grid
        .strip_prefix(m.root())
        .unwrap_or(grid)
        .to_string_lossy()
        .into_owned();
    m.conn()
        .execute(
            "INSERT OR REPLACE INTO train_evals (run_id, step, val_loss, retention, grid_path) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![run_id, step as i64, val_loss, retention, rel],
        )
        .map_err(|e| m.err(e))?;
    Ok(())
}

/// The evaluations run `run_id` recorded up to `step`, in step order, as
/// `(step, val_loss, retention)`; the ones after it (a resume redoes them)
/// are deleted.
pub(super) fn evals_upto(
    m: &Manifest,
    run_id: i64,
    step: usize,
) -> Result<Vec<(usize, Option<f64>, f64)>> {
    let c = m.conn();
    c.execute(
        "DELETE FROM train_evals WHERE run_id = ?1 AND step > ?2",
        rusqlite::params![run_id, step as i64],
    )
    .map_err(|e| m.err(e))?;
    let mut st = c
        .prepare(
            "SELECT step, val_loss, retention FROM train_evals \
             WHERE run_id = ?1 AND retention IS NOT NULL ORDER BY step",
        )
        .map_err(|e| m.err(e))?;
    let rows = st
        .query_map([run_id], |r| {
            Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| m.err(e))?;
    rows.collect::<rusqlite::Result<_>>().map_err(|e| m.err(e))
}

/// The evaluation set: the configured prompts, or the captions of the
/// first validation (else training) items; size from the config or the
/// most common training bucket.
pub(super) fn eval_spec(cfg: &TrainConfig, train: &[TrainItem], val: &[TrainItem]) -> EvalSpec {
    let prompts = if cfg.eval_prompts.is_empty() {
        let src = if val.is_empty() { train } else { val };
        let mut p: Vec<String> = Vec::new();
        for it in src {
            // Trained as literal text ([`super::cache::caption_tokens`]):
            // escaped, so that A1111 emphasis reads it back the same.
            let prompt = crate::models::sdxl::prompt::escape_prompt(&it.caption);
            if !p.contains(&prompt) {
                p.push(prompt);
            }
            if p.len() == cfg.eval_prompt_count.max(1) {
                break;
            }
        }
        p
    } else {
        cfg.eval_prompts.clone()
    };
    let (width, height) = match cfg.eval_size {
        Some([w, h]) => (w, h),
        None => {
            let mut count: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for it in train {
                *count.entry(it.bucket).or_default() += 1;
            }
            count
                .into_iter()
                .max_by_key(|(b, n)| (*n, std::cmp::Reverse(*b)))
                .map(|(b, _)| b)
                .unwrap_or((1024, 1024))
        }
    };
    EvalSpec {
        prompts,
        seeds: cfg.eval_seeds.clone(),
        width,
        height,
        steps: cfg.eval_steps,
        cfg: cfg.eval_cfg,
        sampler: cfg.eval_sampler,
        uncond: cfg.uncond.uncond_mode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: captions (trained as literal text) became evaluation
    /// prompts as they were, so A1111 emphasis read `saber (fate)` as
    /// `saber` + `fate` ×1.1: the grid showed other conditioning than the
    /// one trained.
    #[test]
    fn captions_become_prompts_that_parse_to_the_caption() {
        let mut it = super::super::data::tests::item(1, (64, 64));
        it.caption = "saber (fate), 1girl, [x]".into();
        let cfg = TrainConfig {
            eval_prompt_count: 1,
            ..Default::default()
        };
        let spec = eval_spec(&cfg, &[it.clone()], &[]);
        let parsed = crate::models::sdxl::prompt::parse_prompt_attention(&spec.prompts[0]).unwrap();
        assert_eq!(parsed, vec![(it.caption, 1.0)]);
    }
}
