//! `eps2v generate DIR --model CKPT [--template T] --count N`: make the
//! aligned synthetic dataset from the base model itself.
//!
//! Two steps, both resumable:
//! 1. **Plan** ([`plan`]): one `gen_items` row per index with every
//!    generation parameter (prompt, negative, seed, size, sampler, schedule,
//!    steps, CFG, rescale, uncond mode, model and its AutoV2 hash), written
//!    in one transaction before anything is rendered. A rerun with other
//!    settings is an error naming the first differing field (or
//!    `--replan`); a larger `--count` extends the plan.
//! 2. **Render** what is still `planned`: rows of one size go through
//!    [`crate::pipeline::sample::sample_batch`] `--batch` at a time (the
//!    batch is a speed knob only: pixels do not depend on it); each image
//!    becomes a PNG with A1111's `parameters` text, written
//!    content-addressed to `images/ab/<sha256>.png` (temp file + rename),
//!    then the batch's items, hashes, generation parameters and row states
//!    are committed in one transaction. A `kill -9` loses at most the batch
//!    in flight; the rerun renders exactly the rows still planned, with
//!    their planned seeds (same bytes as an uninterrupted run).
//!
//! A broken render — NaN/inf in the latent or the decoded image, an
//! all-black or flat image ([`broken_reason`]) — marks its row `rejected`
//! with the reason and the run goes on (exit code 1). These are
//! `generate`'s own rejections: the next run plans them again (in the plan
//! transaction); images another stage rejected (e.g. `filter`) are left
//! alone.
//!
//! `--shard K/N` renders the indices `i ≡ K−1 (mod N)` into their own
//! folder; `eps2v manifest merge` ([`super::merge`]) joins shard folders.

pub mod plan;
pub mod shard;
pub mod space;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use rayon::prelude::*;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::import::{image_rel_path, sweep_temp_files, write_atomic_if_absent};
use super::Ctx;
use crate::diffusion::{Prediction, SamplerKind, ScheduleKind, UncondMode};
use crate::error::IoContext;
use crate::imaging::hash::image_hashes;
use crate::imaging::infotext::write_png_with_parameters;
use crate::manifest::{self, GenerationParams, HashRecord, ItemStatus, Manifest, NewItem};
use crate::pipeline::sample::{sample_batch, BatchItem, Rendered, SampleConfig};
use crate::pipeline::SdxlModel;
use crate::prompts::{Template, TemplateSpec};
use crate::{Error, Result};

pub use plan::{PlanOutcome, PlanSettings, PlannedItem, SizeWeight, Sizes};
pub use shard::Shard;

/// Configuration of `generate` (the CLI fills it from flags).
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Single-file SDXL checkpoint.
    pub model: PathBuf,
    /// Override of the prediction type read from the checkpoint.
    pub prediction: Option<Prediction>,
    /// Override of the ZTSNR flag read from the checkpoint.
    pub ztsnr: Option<bool>,
    /// Template: built-in pack, file or text.
    pub template: TemplateSpec,
    /// Wildcard folder (default: see [`crate::prompts::load`]).
    pub wildcards: Option<PathBuf>,
    /// Number of images in the whole plan (all shards).
    pub count: u64,
    /// Base seed: prompt and size draws, and image `i` gets seed + i.
    pub seed: u64,
    /// Combinatorial prompts (the first `count` expansions) instead of random ones.
    pub combinatorial: bool,
    /// Image sizes.
    pub sizes: Sizes,
    /// Sampling steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// CFG rescale φ (`None`: 0.7 for v-prediction, 0 for eps).
    pub rescale: Option<f64>,
    /// Sampler.
    pub sampler: SamplerKind,
    /// σ schedule (`None`: trailing for ZTSNR models, normal otherwise).
    pub schedule: Option<ScheduleKind>,
    /// Unconditional branch (zero / empty / negative prompt).
    pub uncond: UncondMode,
    /// Images per UNet call (speed only).
    pub batch: usize,
    /// Part of the plan rendered here.
    pub shard: Shard,
    /// Replace a stored plan whose settings differ.
    pub replan: bool,
}

impl GenerateConfig {
    /// Check the numbers that need neither the model nor the dataset.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::config("--count must be at least 1"));
        }
        if self.batch == 0 {
            return Err(Error::config("--batch must be at least 1"));
        }
        // Image i gets seed + i, stored as a signed 64-bit integer (and
        // read back from the infotext): the last one must fit.
        if !crate::pipeline::sample::seeds_fit(self.seed, self.count) {
            return Err(Error::config(format!(
                "seed {}: the images take seeds {} to {} + {}, past 2^63-1 (the largest seed the manifest stores); give a smaller seed",
                self.seed,
                self.seed,
                self.seed,
                self.count - 1
            )));
        }
        self.sample_config(64, 64).validate()
    }

    /// The sampling settings of one image size (prompt, uncond and seed are
    /// per image).
    pub fn sample_config(&self, width: u32, height: u32) -> SampleConfig {
        SampleConfig {
            prompt: String::new(),
            uncond: self.uncond.clone(),
            seed: 0,
            steps: self.steps,
            cfg: self.cfg,
            rescale: self.rescale,
            sampler: self.sampler,
            schedule: self.schedule,
            width,
            height,
            batch: 1,
        }
    }

    /// The run's config as stored in `runs.config_json` (paths as text,
    /// lossily where they are not UTF-8: `json!` panics on such a path).
    /// The model's path is made canonical (absolute, no `..`, links
    /// resolved): the defaults that follow the toy world read it back from
    /// another folder
    /// ([`crate::toy::dataset_generator`]).
    pub fn to_json(&self) -> serde_json::Value {
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let model = std::fs::canonicalize(&self.model)
            .or_else(|_| std::path::absolute(&self.model))
            .unwrap_or_else(|_| self.model.clone());
        serde_json::json!({
            "model": text(&model),
            "prediction": self.prediction.map(|p| p.to_string()),
            "ztsnr": self.ztsnr,
            "template": self.template.label(),
            "wildcards": self.wildcards.as_deref().map(text),
            "count": self.count,
            "seed": self.seed,
            "combinatorial": self.combinatorial,
            "sizes": self.sizes,
            "steps": self.steps,
            "cfg": self.cfg,
            "rescale": self.rescale,
            "sampler": self.sampler.cli_name(),
            "schedule": self.schedule.map(|s| s.to_string()),
            "uncond": self.uncond.to_string(),
            "negative": self.uncond.prompt().filter(|_| matches!(self.uncond, UncondMode::Negative(_))),
            "batch": self.batch,
            "shard": self.shard.to_string(),
            "replan": self.replan,
        })
    }
}

/// The plan header for `cfg` with `template` on `model` (defaults resolved);
/// checks that every size fits the model.
pub fn plan_settings(
    cfg: &GenerateConfig,
    template: &Template,
    model: &SdxlModel,
) -> Result<PlanSettings> {
    for (w, h) in cfg.sizes.candidates() {
        model.latent_shape(w, h)?;
    }
    let r = cfg.sample_config(64, 64).resolve(model);
    let model_hash = model.info.autov2.clone().ok_or_else(|| {
        Error::Other("generate: the model was loaded without its hash (LoadOptions::hash)".into())
    })?;
    Ok(PlanSettings {
        plan_version: plan::PLAN_VERSION,
        model: model.info.stem.clone(),
        model_hash,
        prediction: model.info.prediction.to_string(),
        ztsnr: model.info.ztsnr,
        template: cfg.template.label(),
        template_digest: template.digest().to_string(),
        combinatorial: cfg.combinatorial,
        seed: cfg.seed,
        sizes: cfg.sizes.clone(),
        uncond: cfg.uncond.to_string(),
        negative: match &cfg.uncond {
            UncondMode::Negative(n) => Some(n.clone()),
            _ => None,
        },
        sampler: cfg.sampler.to_string(),
        schedule: r.schedule.to_string(),
        steps: cfg.steps,
        cfg: cfg.cfg,
        rescale: r.rescale,
    })
}

/// What `generate` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateReport {
    /// Run id.
    pub run_id: i64,
    /// Shard rendered.
    pub shard: String,
    /// Planning.
    pub plan: PlanOutcome,
    /// Images rendered by this run.
    pub rendered: u64,
    /// Rows already rendered before this run.
    pub skipped: u64,
    /// Rows this run rejected, by reason code.
    pub rejected: BTreeMap<String, u64>,
    /// Wall time of planning and rendering, seconds.
    pub seconds: f64,
    /// Of which in the model (text encoders, UNet, VAE decode), seconds,
    /// summed over the lanes (more than `seconds` when several ran).
    pub model_seconds: f64,
    /// Batches rendered side by side ([`crate::nn::lanes`]; 1: one after
    /// the other).
    pub lanes: usize,
    /// Rendered or rejected images per second of wall time.
    pub images_per_second: f64,
    /// Stopped by SIGINT / SIGTERM before every planned row was rendered:
    /// the batches already rendered are kept and the run is recorded as
    /// `failed`; rerunning the same command renders the rest.
    pub interrupted: bool,
    /// Planned rows this run left to a rerun (0 unless interrupted).
    pub remaining: u64,
    /// Estimated disk the images still to render at the start needed
    /// ([`space`]), bytes.
    pub disk_need_bytes: u64,
    /// Bytes per pixel the estimate used, and the images it was measured
    /// on (0: the default).
    pub bytes_per_pixel: (f64, usize),
    /// Warnings (the disk-space check).
    pub warnings: Vec<String>,
}

impl GenerateReport {
    /// Total rejected by this run.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Pixel standard deviation (0–255 scale) below which an image is flat.
pub const FLAT_STD: f64 = 2.0;
/// Brightest value (0–255) at or below which an image is all black.
pub const BLACK_MAX: u8 = 8;

/// Why an image is not worth keeping: `black_image: …` when no channel
/// exceeds [`BLACK_MAX`], `flat_image: …` when every channel's standard
/// deviation over the pixels is below [`FLAT_STD`]; `None` when fine.
pub fn broken_reason(img: &RgbImage) -> Option<String> {
    let px = img.as_raw();
    if px.is_empty() {
        return Some("empty_image: 0 pixels".into());
    }
    let max = px.iter().copied().max().unwrap_or(0);
    if max <= BLACK_MAX {
        return Some(format!("black_image: brightest value {max}/255"));
    }
    let n = (px.len() / 3) as f64;
    let mut worst: f64 = 0.0;
    for c in 0..3 {
        let (mut s, mut s2) = (0f64, 0f64);
        for p in px.chunks_exact(3) {
            let v = f64::from(p[c]);
            s += v;
            s2 += v * v;
        }
        let mean = s / n;
        worst = worst.max((s2 / n - mean * mean).max(0.0).sqrt());
    }
    (worst < FLAT_STD)
        .then(|| format!("flat_image: pixel standard deviation {worst:.2} < {FLAT_STD}"))
}

/// A planned row still to render.
#[derive(Debug, Clone)]
struct Todo {
    idx: i64,
    prompt: String,
    seed: u64,
    width: u32,
    height: u32,
}

/// An image ready for the manifest.
struct Ready {
    idx: i64,
    item: NewItem,
    hashes: HashRecord,
    generation: GenerationParams,
}

/// Result of one image.
enum Outcome {
    Ok(Box<Ready>),
    Rejected { idx: i64, reason: String },
}

/// Plan and render with an already loaded `model` (loaded with its hash).
/// The manifest is only written after every input has been checked.
pub fn run(
    cfg: &GenerateConfig,
    template: &Template,
    model: &SdxlModel,
    m: &mut Manifest,
    ctx: &Ctx,
) -> Result<GenerateReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    let settings = plan_settings(cfg, template, model)?;
    let old = plan::stored_plan(m.conn())?;
    if let Some(o) = &old {
        if let Some(why) = plan::conflict(o, &settings, cfg.count, cfg.shard)? {
            if !cfg.replan {
                return Err(Error::config(format!(
                    "{}: this dataset holds another generation plan: {why}. Rerun with the same settings to finish it, use another folder, or pass --replan to replace the plan (rendered images whose parameters change are rejected as `replanned` and rendered again)",
                    m.root().display()
                )));
            }
        }
    }
    let indices: Vec<u64> = (0..cfg.count).filter(|&i| cfg.shard.contains(i)).collect();
    let rows = plan::plan_rows(&settings, template, cfg.count, &indices)?;
    // Ctrl-C / SIGTERM: finish the batches in flight, keep them, stop.
    let _signals = crate::signal::install();
    let run_id = m.begin_run("generate", &cfg.to_json())?;
    let mut report = GenerateReport {
        run_id,
        shard: cfg.shard.to_string(),
        ..Default::default()
    };
    let mut todo = Vec::new();
    let result = plan_then_render(
        cfg,
        &settings,
        model,
        m,
        ctx,
        run_id,
        old.as_ref(),
        &rows,
        &mut todo,
        &mut report,
    );
    report.seconds = t0.elapsed().as_secs_f64();
    let done = report.rendered + report.rejected_total();
    report.images_per_second = if report.seconds > 0.0 {
        done as f64 / report.seconds
    } else {
        0.0
    };
    report.remaining = (todo.len() as u64).saturating_sub(done);
    report.interrupted = result.is_ok() && report.remaining > 0;
    match &result {
        Ok(_) => m.end_run(run_id, !report.interrupted, &report)?,
        Err(e) => m.fail_run(run_id, &report, e),
    }
    result?;
    Ok(report)
}

/// Write the plan of run `run_id`, then render what is still `planned`
/// (`todo`, for the report).
#[allow(clippy::too_many_arguments)]
fn plan_then_render(
    cfg: &GenerateConfig,
    settings: &PlanSettings,
    model: &SdxlModel,
    m: &mut Manifest,
    ctx: &Ctx,
    run_id: i64,
    old: Option<&plan::StoredPlan>,
    rows: &[plan::PlannedItem],
    todo: &mut Vec<Todo>,
    report: &mut GenerateReport,
) -> Result<()> {
    // Under the writer lock (`begin_run`): no other writer's temp file is swept.
    sweep_temp_files(&m.root().join("images"))?;
    let now = manifest::now();
    let path = m.db_path().to_path_buf();
    let root = m.root().to_path_buf();
    let tx = m
        .conn_mut()
        .transaction()
        .map_err(manifest::sql_err(&path))?;
    report.plan = plan::write_plan(&tx, run_id, old, settings, rows, cfg.count, cfg.shard, &now)
        .map_err(|e| match e {
            Error::Sqlite(s) => manifest::sql_err(&path)(s),
            other => other,
        })?;
    report.plan.missing_images =
        plan::plan_missing_images(&tx, &root, run_id).map_err(manifest::sql_err(&path))?;
    tx.commit().map_err(manifest::sql_err(&path))?;
    *todo = pending(m)?;
    report.skipped = report.plan.planned - todo.len() as u64;
    // Will the images fit? A warning, not an error ([`space`]).
    let (bpp, measured_on) =
        space::measured_bytes_per_pixel(m)?.unwrap_or((space::DEFAULT_BYTES_PER_PIXEL, 0));
    let need = space::Need {
        images: todo.len() as u64,
        pixels: todo.iter().map(|t| t.width as u64 * t.height as u64).sum(),
        bytes_per_pixel: bpp,
        measured_on,
    };
    report.disk_need_bytes = need.bytes();
    report.bytes_per_pixel = (bpp, measured_on);
    let images = m.root().join("images");
    if let Some(w) = space::shortfall(&need, &images, crate::train::disk::free_bytes(&images)) {
        ctx.say(&format!("warning: {w}"));
        report.warnings.push(w);
    }
    render(cfg, settings, model, m, ctx, run_id, todo, report)
}

/// Rows still `planned`, by index.
fn pending(m: &Manifest) -> Result<Vec<Todo>> {
    let mut st = m
        .conn()
        .prepare("SELECT idx, prompt, seed, width, height FROM gen_items WHERE state = 'planned' ORDER BY idx")
        .map_err(|e| m.err(e))?;
    let rows = st
        .query_map([], |r| {
            Ok(Todo {
                idx: r.get(0)?,
                prompt: r.get(1)?,
                seed: r.get::<_, i64>(2)? as u64,
                width: r.get::<_, i64>(3)? as u32,
                height: r.get::<_, i64>(4)? as u32,
            })
        })
        .map_err(|e| m.err(e))?;
    rows.collect::<rusqlite::Result<_>>().map_err(|e| m.err(e))
}

/// Render `todo` in batches of `cfg.batch` images of one size (index
/// order within each size), on lanes when the sizes are small
/// ([`crate::nn::lanes`]: one single-thread lane per core for toy-sized
/// latents on the CPU). A lane samples a batch and writes its PNGs; the
/// manifest rows are committed here, one transaction per batch, in batch
/// order whatever the lanes' timing, so the manifest is the one a
/// one-batch-after-the-other run writes.
#[allow(clippy::too_many_arguments)]
fn render(
    cfg: &GenerateConfig,
    settings: &PlanSettings,
    model: &SdxlModel,
    m: &mut Manifest,
    ctx: &Ctx,
    run_id: i64,
    todo: &[Todo],
    report: &mut GenerateReport,
) -> Result<()> {
    let mut by_size: BTreeMap<(u32, u32), Vec<&Todo>> = BTreeMap::new();
    for t in todo {
        by_size.entry((t.width, t.height)).or_default().push(t);
    }
    let mut jobs: Vec<(SampleConfig, &[&Todo])> = Vec::new();
    let mut largest = (0usize, 0usize);
    for ((w, h), rows) in &by_size {
        let (_, lh, lw) = model.latent_shape(*w, *h)?;
        if lw * lh > largest.0 * largest.1 {
            largest = (lw, lh);
        }
        let scfg = cfg.sample_config(*w, *h);
        for chunk in rows.chunks(cfg.batch) {
            jobs.push((scfg.clone(), chunk));
        }
    }
    let lanes = crate::nn::lanes::lanes_for_latent(&model.device, largest.0, largest.1)
        .clamp(1, jobs.len().max(1));
    report.lanes = lanes;
    let total_steps = (todo.len() * cfg.steps) as u64;
    let bar = ctx.bar(total_steps, "generate");
    // One lane: keep the pool's idle worker polling through the loop; with
    // several, each lane is its own pool and nobody polls.
    let _warm = (lanes == 1).then(crate::nn::keep_warm);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {percent}% {elapsed} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let t_start = Instant::now();
    let mut images_done = 0u64;
    let root = m.root().to_path_buf();
    // `None`: not rendered, a stop was asked for before the job started.
    let job = |i: usize| -> Result<Option<(Vec<Outcome>, f64)>> {
        if ctx.should_stop() {
            return Ok(None);
        }
        let (scfg, chunk) = &jobs[i];
        let items: Vec<BatchItem> = chunk
            .iter()
            .map(|t| BatchItem {
                prompt: t.prompt.clone(),
                uncond: cfg.uncond.clone(),
                seed: t.seed,
            })
            .collect();
        let tm = Instant::now();
        let mut last = 0usize;
        let rendered = sample_batch(model, scfg, &items, &mut |done, _| {
            bar.inc(done.saturating_sub(last) as u64);
            last = done;
        })?;
        let secs = tm.elapsed().as_secs_f64();
        let outcomes: Vec<Result<Outcome>> = chunk
            .par_iter()
            .zip(rendered)
            .map(|(t, r)| outcome(&root, settings, t, r))
            .collect();
        Ok(Some((
            outcomes.into_iter().collect::<Result<Vec<_>>>()?,
            secs,
        )))
    };
    crate::nn::lanes::run(jobs.len(), lanes, job, |i, done| {
        let Some((outcomes, secs)) = done else {
            return Ok(());
        };
        report.model_seconds += secs;
        commit(m, run_id, outcomes, report)?;
        images_done += jobs[i].1.len() as u64;
        let rate = images_done as f64 / t_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{images_done}/{} images, {rate:.2} img/s",
            todo.len()
        ));
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(())
}

/// PNG + hashes + manifest rows of one rendered image, or its rejection.
fn outcome(root: &std::path::Path, s: &PlanSettings, t: &Todo, r: Rendered) -> Result<Outcome> {
    let g = match r {
        Rendered::Broken { reason, .. } => return Ok(Outcome::Rejected { idx: t.idx, reason }),
        Rendered::Image(g) => g,
    };
    if let Some(reason) = broken_reason(&g.image) {
        return Ok(Outcome::Rejected { idx: t.idx, reason });
    }
    let raw = g.infotext.format();
    let png = write_png_with_parameters(&g.image, &raw)?;
    let sha = hex::encode(Sha256::digest(&png));
    let rel = image_rel_path(&sha, "png");
    write_atomic_if_absent(&root.join(&rel), &png)?;
    let h = image_hashes(&g.image);
    let extra: serde_json::Map<String, serde_json::Value> = g
        .infotext
        .params
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "Steps"
                    | "Sampler"
                    | "Schedule type"
                    | "CFG scale"
                    | "Seed"
                    | "Size"
                    | "Model hash"
                    | "Model"
            )
        })
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .chain(std::iter::once((
            "Plan index".to_string(),
            serde_json::Value::from(t.idx),
        )))
        .collect();
    Ok(Outcome::Ok(Box::new(Ready {
        idx: t.idx,
        item: NewItem {
            sha256: sha,
            path: Some(rel),
            source: "generate".into(),
            width: Some(g.image.width()),
            height: Some(g.image.height()),
            format: Some("png".into()),
            status: ItemStatus::Ok,
            reason: None,
        },
        hashes: HashRecord {
            pixel_sha256: h.pixel_sha256,
            phash: h.phash,
            dhash: h.dhash,
        },
        generation: GenerationParams {
            prompt: Some(t.prompt.clone()),
            negative: s.negative.clone(),
            seed: Some(t.seed as i64),
            steps: Some(s.steps as i64),
            sampler: Some(s.sampler.clone()),
            schedule: Some(s.schedule.clone()),
            cfg: Some(s.cfg),
            width: Some(i64::from(t.width)),
            height: Some(i64::from(t.height)),
            model_hash: Some(s.model_hash.clone()),
            model: Some(s.model.clone()),
            extra_json: Some(serde_json::Value::Object(extra).to_string()),
            raw: Some(raw),
            origin: "generate".into(),
        },
    })))
}

/// One transaction for a batch: items, hashes, generation parameters,
/// caption (the prompt, as `import` stores A1111 prompts) and row states.
fn commit(
    m: &mut Manifest,
    run_id: i64,
    outcomes: Vec<Outcome>,
    report: &mut GenerateReport,
) -> Result<()> {
    let path = m.db_path().to_path_buf();
    let map = manifest::sql_err(&path);
    let tx = m.conn_mut().transaction().map_err(map)?;
    for o in outcomes {
        match o {
            Outcome::Rejected { idx, reason } => {
                tx.execute(
                    "UPDATE gen_items SET state = 'rejected', reason = ?2, item_id = NULL, render_run_id = ?3 WHERE idx = ?1",
                    params![idx, reason, run_id],
                )
                .map_err(map)?;
                let code = reason.split(':').next().unwrap_or("unknown").to_string();
                *report.rejected.entry(code).or_default() += 1;
            }
            Outcome::Ok(ready) => {
                let Ready {
                    idx,
                    item,
                    hashes,
                    generation,
                } = *ready;
                let existing: Option<i64> = tx
                    .query_row(
                        "SELECT id FROM items WHERE sha256 = ?1",
                        [&item.sha256],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(map)?;
                let id = match existing {
                    Some(id) => {
                        // The same pixels again after a replan set them
                        // aside (a plan shrunk, then grown back): back in
                        // the dataset. Another stage's rejection stands.
                        manifest::verdicts::set(&tx, id, "generate", None, run_id).map_err(map)?;
                        id
                    }
                    None => {
                        let id = manifest::insert_item(&tx, run_id, &item).map_err(map)?;
                        manifest::insert_hashes(&tx, run_id, id, &hashes).map_err(map)?;
                        manifest::insert_generation(&tx, run_id, id, &generation).map_err(map)?;
                        if let Some(p) = generation.prompt.as_deref().filter(|p| !p.is_empty()) {
                            manifest::upsert_caption(&tx, run_id, id, "a1111_prompt", p, None)
                                .map_err(map)?;
                        }
                        id
                    }
                };
                tx.execute(
                    "UPDATE gen_items SET state = 'rendered', reason = NULL, item_id = ?2, render_run_id = ?3 WHERE idx = ?1",
                    params![idx, id, run_id],
                )
                .map_err(map)?;
                report.rendered += 1;
            }
        }
    }
    tx.commit().map_err(map)?;
    Ok(())
}

/// Load the template and the model of `cfg` and check everything that does
/// not need the dataset folder (so that bad input writes nothing). The
/// model goes where `placement` says (its `device` and `dtype`; the rest of
/// the load options come from `cfg`).
pub fn load_inputs(
    cfg: &GenerateConfig,
    placement: &crate::pipeline::LoadOptions,
) -> Result<(Template, SdxlModel)> {
    cfg.validate()?;
    let template = crate::prompts::load(&cfg.template, cfg.wildcards.as_deref())?;
    // Before the model loads and DIR is created.
    if cfg.combinatorial {
        plan::distinct_combinations(&template, cfg.count)?;
    }
    let model = SdxlModel::load(
        &cfg.model,
        &crate::pipeline::LoadOptions {
            prediction: cfg.prediction,
            ztsnr: cfg.ztsnr,
            hash: true,
            device: placement.device.clone(),
            dtype: placement.dtype,
        },
    )?;
    plan_settings(cfg, &template, &model)?;
    Ok((template, model))
}

/// Check that `dir` can hold a dataset before anything is written there:
/// an existing file, or a folder that cannot be written, is a config error.
pub fn check_dir(dir: &std::path::Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::config(format!(
            "{}: exists and is not a folder; pass a dataset folder",
            dir.display()
        )));
    }
    let probe_parent = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        let mut p = dir.to_path_buf();
        while !p.exists() {
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q.to_path_buf(),
                _ => {
                    p = PathBuf::from(".");
                    break;
                }
            }
        }
        p
    };
    tempfile::Builder::new()
        .prefix(".eps2v-write-test")
        .tempfile_in(&probe_parent)
        .map(drop)
        .at(&probe_parent)
        .map_err(|e| {
            Error::config(format!(
                "{}: cannot write here ({e}); pass a writable dataset folder",
                dir.display()
            ))
        })
}

#[cfg(test)]
mod tests;
