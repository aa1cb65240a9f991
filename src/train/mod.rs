//! `eps2v train`: finetune the UNet of a single-file SDXL checkpoint on a
//! curated dataset with the v objective on the exact ZTSNR schedule (the
//! conversion), or with eps (the way back), and export the result in the
//! base file's layout with the right markers.
//!
//! [`train`] is one function that reads top to bottom (nanoGPT's shape,
//! DESIGN.md §6): run folder and resume → base model → data, split and
//! caches → evaluation reference → per stage: UNet with only its blocks
//! trainable, AdamW → steps (lr → micro-batches → NaN guard → clip → step
//! → EMA → log → evaluate → checkpoint) → export. The pieces it calls:
//! - [`config`]: the flat, serde-typed config (CLI flags = TOML fields);
//! - [`blocks`]: MBW block selectors and per-block learning rates;
//! - [`data`]: trainable items, seeded validation split, bucket batches;
//! - [`cache`]: latent and text-conditioning caches (dropout works with them);
//! - [`weights`]: the UNet's weights, frozen blocks as plain tensors;
//! - [`batch`]: a step's micro-batch (timesteps, noise, target) and the
//!   per-sample and validation losses;
//! - [`ema`]: the EMA update and evaluating with the EMA weights in place;
//! - [`eval`] + [`retention`]: sampled grids and the shape-retention score
//!   (of the EMA weights when EMA is on: what the export writes);
//! - [`state`]: atomic, NaN-free, bit-exact resumable checkpoints;
//! - [`disk`]: will the checkpoints and the export fit (a warning per stage);
//! - [`export`]: the single-file export with `v_pred` / `ztsnr` markers;
//! - [`log`]: the CSV log and its plot;
//! - [`crate::signal`]: SIGINT / SIGTERM → checkpoint and stop (while the
//!   caches are filled, before any step: stop, keeping the encoded entries).
//!
//! Why the loss curve is not the judge: converting eps → v changes what the
//! output means, so the v-loss starts high and falls for reasons unrelated
//! to whether samples keep their shapes; the run is watched by sampling a
//! fixed prompt × seed set (ZTSNR-correct) and scoring it against the base
//! model's samples, and `--stop-below` acts on that score.

mod advice;
mod batch;
pub mod blocks;
pub mod cache;
pub mod config;
pub mod data;
pub mod disk;
mod ema;
pub mod eval;
pub mod export;
pub mod log;
mod report;
pub mod retention;
pub mod state;
pub mod testkit;
pub mod weights;
pub use advice::same_prediction_warning;
pub use report::TrainReport;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;

use crate::diffusion::{NoiseSchedule, TerminalClamp};
use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::nn::optim::AdamW;
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::signal;
use crate::stages::Ctx;
use crate::{Error, Result};
use rusqlite::OptionalExtension;

use batch::{add_grads, clip_grads, grad_norm, loss_and_grads, make_batch, validation_loss};
use blocks::{BlockLr, BlockSet};
use cache::CacheInputs;
use config::{LrSchedule, StageConfig, TrainConfig};
use data::{Batches, TrainItem};
use ema::{ema_update, with_ema};
use eval::{eval_spec, evals_upto, record_eval, Evaluator};
use export::export_weights;
use state::{Loaded, TrainState};
use weights::UNetWeights;

/// How to run (not part of the config: it changes nothing numeric).
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Resume the run with this id (`None`: a new run).
    pub resume: Option<i64>,
    /// Stop as if interrupted once this many steps are done (tests of resume).
    pub stop_at_step: Option<usize>,
    /// Make the batches of these steps non-finite (tests of the NaN guard).
    pub inject_nan_at: Vec<usize>,
    /// Where the models, caches, trained weights and optimizer state live
    /// (`--device`; `None`: [`crate::nn::default_device`]). Not part of the
    /// run's config: a run may resume on another device.
    pub device: Option<Device>,
    /// dtype of the frozen models: text encoders, VAE (as
    /// [`crate::nn::vae_dtype`]) and the evaluation's base model
    /// (`--precision`; `None`: [`crate::nn::model_dtype`]'s default, f32 on
    /// the CPU, bf16 on CUDA). The trained UNet always keeps f32 master
    /// weights and computes in f32, on every device.
    pub dtype: Option<DType>,
    /// Micro-batches computed at once (`None`: [`crate::nn::lanes`]'
    /// choice for the largest bucket). Speed only: any count gives the same
    /// bytes.
    pub lanes: Option<usize>,
    /// Free bytes of a path's file system (tests of the disk check;
    /// `None`: [`disk::free_bytes`]).
    pub disk_free: Option<fn(&Path) -> Option<u64>>,
}

/// The run folder of run `id`.
pub fn run_dir(root: &Path, id: i64) -> PathBuf {
    root.join("runs").join(id.to_string())
}

/// Learning-rate factor at `s` of a stage of `steps` (linear warmup, then
/// constant or cosine down to `min_ratio`).
pub fn lr_factor(s: usize, steps: usize, warmup: usize, kind: LrSchedule, min_ratio: f64) -> f64 {
    if warmup > 0 && s < warmup {
        return (s + 1) as f64 / warmup as f64;
    }
    match kind {
        LrSchedule::Constant => 1.0,
        LrSchedule::Cosine => {
            let span = steps.saturating_sub(warmup).max(1) as f64;
            let p = ((s - warmup.min(s)) as f64 / span).clamp(0.0, 1.0);
            min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// The exact training schedule (ᾱ_T = 0 under ZTSNR; the clamp only
/// matters for samplers).
fn schedule(cfg: &TrainConfig) -> NoiseSchedule {
    NoiseSchedule::sdxl_with(cfg.ztsnr, TerminalClamp::ComfyUi)
}

/// Union of the blocks of stages `0..=upto`.
fn trained_so_far(stages: &[StageConfig], upto: usize) -> Result<Vec<BlockSet>> {
    stages[..=upto.min(stages.len() - 1)]
        .iter()
        .map(|s| BlockSet::parse(&s.blocks))
        .collect()
}

/// Train (see the module docs). Config and model errors stop before any
/// step; a signal or `--stop-below` ends early with a checkpoint (a signal
/// while the caches are filled ends the run `failed`, interrupted, with the
/// entries encoded so far kept for the next run).
pub fn train(
    cfg: &TrainConfig,
    m: &mut Manifest,
    opts: &TrainOptions,
    ctx: &Ctx,
) -> Result<TrainReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    let _signals = signal::install();
    let root = m.root().to_path_buf();
    let stages = cfg.effective_stages();
    let device = opts
        .device
        .clone()
        .unwrap_or_else(crate::nn::default_device);
    let frozen_dtype = crate::nn::model_dtype(&device, opts.dtype)?;
    let mut report = TrainReport {
        warnings: cfg.warnings(),
        ..Default::default()
    };

    // What there is to train on, before a run row or folder exists: an
    // empty or unprepared dataset is an input error, not a failed run.
    let (items, eligibility) = data::load_items(m)?;
    report.data = eligibility;
    let data_digest = data::digest(&items);

    // --- the run: new, or resumed from its newest checkpoint ---------------
    // The base by content: a resume refuses a file replaced under its name.
    // Opened first: a pipe, a broken link or a non-safetensors file is
    // named (hashing a pipe would wait forever).
    let ckpt = Checkpoint::open(&cfg.model)?;
    // What the header can refuse, before a run row and folder exist (they
    // were left `failed` and empty) and before the caches and the first
    // samples: block ids this UNet lacks (IN09 on SDXL, a level a small
    // config lacks), a yaml A1111 could not load, an evaluation size the
    // model cannot sample. A header whose config cannot be inferred fails
    // to load below.
    if let Ok(u) = ckpt.infer_unet_config() {
        let keys = crate::models::sdxl::checkpoint::unet_expected_keys(&u.config)?;
        for s in &stages {
            BlockSet::parse(&s.blocks)?.check_exists(keys.iter().map(|(k, _)| k.as_str()))?;
        }
        if cfg.a1111_yaml {
            export::a1111_v_yaml(&u.config)?;
        }
        if let (Some([w, h]), Ok(v)) = (cfg.eval_size, ckpt.infer_vae_config()) {
            crate::pipeline::model::check_size(&u.config, &v.config, w, h)?;
        }
    }
    let base_sha256 = crate::models::sdxl::checkpoint::sha256_file(&cfg.model)?;
    let (run_id, resumed, _lock): (i64, Option<Loaded>, _) = match opts.resume {
        Some(id) => {
            // Before anything of the run is touched: another process may
            // be training it.
            let lock = m.lock_run(id)?;
            let dir = run_dir(&root, id);
            let latest = state::latest(&dir)?.ok_or_else(|| {
                Error::config(format!(
                    "--resume {id}: {} has no checkpoint to resume from",
                    state::dir(&dir).display()
                ))
            })?;
            let loaded = state::load(&latest, &device)?;
            if let Some(diff) = loaded.state.resume_mismatch(cfg, &base_sha256)? {
                // A finished run is not extended: its schedule (warmup,
                // decay to `steps`) is part of what it trained.
                let done = m
                    .conn()
                    .query_row(
                        "SELECT status = 'done' FROM runs WHERE id = ?1",
                        [id],
                        |r| r.get::<_, bool>(0),
                    )
                    .unwrap_or(false);
                let more = if done && diff.starts_with("steps:") {
                    format!("; to train on from run {id}'s result, start a new run with its export as --model")
                } else {
                    String::new()
                };
                return Err(Error::config(format!(
                    "--resume {id}: the config differs from the saved run's ({diff}); resume with the settings it was started with (the same flags, or the same --config / `eps2v run` config), or start a new run{more}"
                )));
            }
            if let Some(diff) = loaded.state.data_mismatch(&data_digest) {
                return Err(Error::config(format!(
                    "--resume {id}: the training data changed since the run was saved ({diff}); a resumed run draws the same batches from the same items: put the dataset back as it was, or start a new run (the latents cached for unchanged items are reused)"
                )));
            }
            state::sweep_partial(&dir)?;
            // The temporary files of its log, grids and evaluation images
            // (the run's lock is held: nothing else writes there).
            crate::stages::import::sweep_temp_files(&dir)?;
            let finished: bool = m
                .conn()
                .query_row(
                    "SELECT status = 'done' FROM runs WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| m.err(e))?
                .unwrap_or(false);
            if finished {
                ctx.say(&format!(
                    "run {id} had finished; resumed from its checkpoint at step {}, it trains what is left (nothing, unless it was saved by an eps2v that wrote no checkpoint at the end) and exports again",
                    loaded.state.step
                ));
            }
            m.conn()
                .execute(
                    "UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?1",
                    [id],
                )
                .map_err(|e| m.err(e))?;
            (id, Some(loaded), lock)
        }
        None => {
            let id = m.begin_run("train", cfg)?;
            (id, None, m.lock_run(id)?)
        }
    };
    // Past this point an error ends the row `failed` with its text (still
    // resumable from its newest checkpoint), rather than leaving it
    // `running` until the next run finds it.
    let result = (|| -> Result<()> {
        report.tidied = state::tidy_dead_runs(m, run_id)?;
        for t in &report.tidied {
            ctx.say(&t.to_string());
        }
        let rdir = run_dir(&root, run_id);
        std::fs::create_dir_all(&rdir).at(&rdir)?;
        report.run_id = run_id;
        report.run_dir = rdir.clone();
        report.resumed = resumed.is_some();

        // --- base model --------------------------------------------------------
        let base = SdxlModel::load(
            &cfg.model,
            &LoadOptions {
                device: Some(device.clone()),
                dtype: Some(frozen_dtype),
                ..Default::default()
            },
        )?;
        // Where the export goes, and its size (the disk check).
        let out = cfg
            .out
            .clone()
            .unwrap_or_else(|| export::default_out(cfg, &rdir));
        let export_bytes = disk::export_bytes(&ckpt, cfg.save_dtype.dtype().size_in_bytes());
        let sched = schedule(cfg);

        // --- data, split, caches ------------------------------------------------
        let (train_items, val_items) = data::split(items, cfg.val_fraction, cfg.val_max, cfg.seed);
        report.train_items = train_items.len();
        report.val_items = val_items.len();
        data::record_split(m, run_id, &train_items, &val_items)?;
        let all: Vec<&TrainItem> = train_items.iter().chain(&val_items).collect();
        let (caches, cache_report) = cache::build(
            m,
            cfg,
            &CacheInputs {
                ckpt: &ckpt,
                vae: &base.vae,
                text: &base.text,
                items: &all,
                extra_texts: &[],
                device: &device,
                dtype: frozen_dtype,
            },
            run_id,
            ctx,
        )?;
        report.cache = cache_report;
        // Micro-batches run on lanes where latents are tiny (nn::lanes): the
        // largest bucket decides.
        let f = base.vae.config().downsample_factor();
        let micro_lanes = train_items
            .iter()
            .map(|it| (it.bucket.0 as usize / f, it.bucket.1 as usize / f))
            .max_by_key(|&(w, h)| w * h)
            .map_or(1, |(w, h)| {
                crate::nn::lanes::lanes_for_latent(&device, w, h)
            });
        let micro_lanes = opts.lanes.unwrap_or(micro_lanes).clamp(1, cfg.grad_accum);
        report.lanes = micro_lanes;

        // --- evaluation reference (the base model with its own objective) ------
        let evaluator = Evaluator::new(eval_spec(cfg, &train_items, &val_items), &rdir, &base)?;
        let SdxlModel {
            unet: base_unet,
            text,
            vae,
            info,
            device,
        } = base;
        let mut weights = UNetWeights::from_checkpoint(&ckpt, base_unet.config(), &device)?;
        drop(base_unet);
        let mut view_info = info.clone();
        view_info.prediction = cfg.objective;
        view_info.ztsnr = cfg.ztsnr;

        // --- state ---------------------------------------------------------------
        let mut st = match &resumed {
            Some(l) => {
                weights.restore(&[], &l.weights)?;
                evaluator.forget_after(l.state.step)?;
                let mut st = l.state.clone();
                st.base_sha256.get_or_insert(base_sha256.clone());
                st
            }
            None => TrainState {
                data_digest: Some(data_digest.clone()),
                ..TrainState::start(cfg.clone(), base_sha256.clone())
            },
        };
        report.resumed_at = if report.resumed { st.step } else { 0 };
        let mut csv = log::CsvLog::open(&rdir.join("log.csv"), st.step)?;
        // What the steps before a resume reported, as an uninterrupted run
        // has it: every evaluation (the export's metadata takes the last
        // one) and the losses of the running mean.
        let mut recent: Vec<f64> = Vec::new();
        if resumed.is_some() {
            for (step, vl, score) in evals_upto(m, run_id, st.step)? {
                report.retention.push((step, score));
                report.val_loss = vl;
            }
            if !report.retention.is_empty() {
                report.grid = Some(evaluator.write_grid(st.step)?);
            }
            recent = csv.last_losses(10)?;
        }
        let total_steps = cfg.total_steps();
        let bar = ctx.bar(total_steps as u64, "train");
        let mut warm = crate::nn::keep_warm();
        bar.set_position(st.step as u64);
        let mut batches = Batches::new(&train_items, cfg.batch_size, cfg.seed, st.pos);
        let mut ema: BTreeMap<String, Tensor> =
            resumed.as_ref().map(|l| l.ema.clone()).unwrap_or_default();
        let mut resumed_slots = resumed.map(|l| l.slots);

        // A resumed run has its checkpoint at the step it starts from.
        let mut checkpoint_at_start = report.resumed.then_some(st.step);
        // A run that stopped early (and was killed before its export) exports.
        report.stopped_early = st.stopped.clone();
        'stages: while st.stage < stages.len() && st.stopped.is_none() {
            let stage = &stages[st.stage];
            let stage_lr = stage.lr.unwrap_or(cfg.lr);
            let blocks = BlockSet::parse(&stage.blocks)?;
            let block_lr = BlockLr::new(stage_lr, &stage.block_lr)?;
            if cfg.ema_decay.is_some() {
                // Blocks an earlier stage trained and this one freezes stay at
                // their EMA value (what the export writes).
                weights.freeze_at_ema(&blocks, &ema)?;
            }
            let built = weights.build(&blocks)?;
            let unet = built.unet;
            let vars = built.vars;
            let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            report.trainable_params = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let mut opt = AdamW::with_lr_scales(
                vars.iter()
                    .map(|(k, v)| (v.clone(), block_lr.of_key(k) / stage_lr))
                    .collect(),
                ParamsAdamW {
                    lr: stage_lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.adam_eps,
                    weight_decay: cfg.weight_decay,
                },
            )?;
            report.optimizer_bytes = opt.state_bytes();
            let keys: Vec<String> = vars.iter().map(|(k, _)| k.clone()).collect();
            if let Some(slots) = resumed_slots.take().filter(|s| !s.is_empty()) {
                let saved: Vec<&String> = st.slots.iter().map(|(k, _)| k).collect();
                if saved != keys.iter().collect::<Vec<_>>() {
                    return Err(Error::config(format!(
                        "--resume {run_id}: the checkpoint's optimizer covers other parameters than stage {} trains; the checkpoint does not belong to this config",
                        st.stage
                    )));
                }
                opt.load_state(&slots)?;
            }
            if cfg.ema_decay.is_some() {
                for (k, v) in &vars {
                    if !ema.contains_key(k) {
                        ema.insert(k.clone(), v.as_tensor().detach().copy()?);
                    }
                }
            }
            let view = SdxlModel {
                unet: unet.clone(),
                text: text.clone(),
                vae: vae.clone(),
                info: view_info.clone(),
                device: device.clone(),
            };
            let trained = trained_so_far(&stages, st.stage)?;
            let saver = state::Saver {
                run_dir: &rdir,
                keys: &keys,
                trained: &trained,
                saved_at: std::cell::Cell::new(checkpoint_at_start.take()),
            };
            // Will the checkpoints and the export fit?
            {
                let trained_params: usize = weights
                    .map()
                    .iter()
                    .filter(|(k, _)| trained.iter().any(|b| b.contains_key(k)))
                    .map(|(_, t)| t.elem_count())
                    .sum();
                let ema_params: usize = ema.values().map(Tensor::elem_count).sum();
                let need = disk::Need {
                    checkpoint: disk::checkpoint_bytes(
                        trained_params,
                        opt.state_bytes(),
                        ema_params,
                    ),
                    checkpoints: if cfg.stop_below.is_some() { 5 } else { 3 },
                    existing: state::bytes_on_disk(&rdir)?,
                    export: export_bytes,
                };
                report.checkpoint_bytes = need.checkpoint;
                report.disk_peak_bytes = report
                    .disk_peak_bytes
                    .max(need.checkpoints * need.checkpoint + need.export);
                let free = opts.disk_free.unwrap_or(disk::free_bytes);
                if let Some(w) = disk::shortfall(&need, &rdir, &out, &free) {
                    ctx.say(&format!("warning: {w}"));
                    if !report.warnings.contains(&w) {
                        report.warnings.push(w);
                    }
                }
            }

            // Rollback anchor and the "before training" evaluation.
            if st.stage_step == 0 {
                if st.step == 0 && st.last_retention.is_none() {
                    let ((score, grid), vl) = with_ema(&vars, &ema, || {
                        Ok((
                            evaluator.evaluate(&view, 0)?,
                            validation_loss(cfg, &sched, &caches, &unet, &val_items)?,
                        ))
                    })?;
                    record_eval(m, run_id, 0, vl, score, &grid)?;
                    csv.eval(0, vl, score)?;
                    report.retention.push((0, score));
                    report.grid = Some(grid);
                    st.last_retention = Some(score);
                }
                saver.save(&st, &opt, &weights, &ema, state::Series::Rolling)?;
            }

            while st.stage_step < stage.steps && !st.stage_met {
                warm.refresh();
                if ctx.should_stop() || opts.stop_at_step == Some(st.step) {
                    st.pos = batches.pos();
                    saver.save(&st, &opt, &weights, &ema, state::Series::Stop)?;
                    report.interrupted = true;
                    break 'stages;
                }
                // lr
                let factor = lr_factor(
                    st.stage_step,
                    stage.steps,
                    cfg.warmup_steps,
                    cfg.lr_schedule,
                    cfg.min_lr_ratio,
                );
                opt.set_learning_rate(stage_lr * factor);
                // micro-batches: on lanes when there are several (their
                // gradients are summed here in micro-batch order, as one after
                // the other would: the same bytes either way).
                let idxs: Vec<Vec<usize>> =
                    (0..cfg.grad_accum).map(|_| batches.next_batch()).collect();
                let nan = opts.inject_nan_at.contains(&st.step);
                let step = st.step;
                let mut grads: Option<GradStore> = None;
                let mut loss_sum = 0.0f64;
                let mut batch_ids = Vec::new();
                crate::nn::lanes::run(
                    cfg.grad_accum,
                    micro_lanes,
                    |micro| {
                        let b = make_batch(
                            cfg,
                            &sched,
                            &caches,
                            &train_items,
                            &idxs[micro],
                            (step, micro),
                            nan,
                        )?;
                        let (l, g) = loss_and_grads(&unet, &b, cfg, &var_list)?;
                        Ok((l, b.item_ids, g))
                    },
                    |_, (l, ids, g)| {
                        loss_sum += l;
                        batch_ids.extend(ids);
                        grads = Some(match grads.take() {
                            None => g,
                            Some(acc) => add_grads(acc, &g, &vars)?,
                        });
                        Ok(())
                    },
                )?;
                if micro_lanes > 1 {
                    // The lanes declared the cores shared; poll again for the
                    // optimizer step.
                    warm.refresh();
                }
                let mut grads = grads.ok_or_else(|| Error::Other("no gradients".into()))?;
                let gnorm = grad_norm(&grads, &vars)?;
                // NaN / Inf guard: skip, log the batch, roll back after K in a
                // row. A skipped step still counts, and is still evaluated
                // and saved on schedule (the last one included).
                let finite = loss_sum.is_finite() && gnorm.is_finite();
                if !finite {
                    st.skipped += 1;
                    st.bad_in_row += 1;
                    // Numbered as log.csv numbers its rows: the step count this
                    // step ends at.
                    csv.nan(&rdir, st.step + 1, loss_sum, gnorm, &batch_ids)?;
                    if st.bad_in_row >= cfg.nan_rollback_after {
                        let anchor = state::latest_anchor(&rdir)?.ok_or_else(|| {
                            Error::Other("rollback: no checkpoint to roll back to".into())
                        })?;
                        let l = state::load(&anchor, &device)?;
                        weights.restore(&vars, &l.weights)?;
                        if l.state.stage == st.stage && !l.slots.is_empty() {
                            opt.load_state(&l.slots)?;
                        }
                        ema = l.ema;
                        st.rollbacks += 1;
                        st.rollbacks_in_row += 1;
                        st.bad_in_row = 0;
                        if st.rollbacks_in_row > 3 * cfg.nan_rollback_after {
                            // For the failed row's report.
                            (report.steps, report.skipped, report.rollbacks) =
                                (st.step, st.skipped, st.rollbacks);
                            return Err(Error::model(format!(
                                "training diverged: {} rollbacks in a row, every step between them non-finite (last items {batch_ids:?}); lower the learning rate or check those items",
                                st.rollbacks_in_row
                            )));
                        }
                    }
                } else {
                    st.bad_in_row = 0;
                    st.rollbacks_in_row = 0;
                    clip_grads(&mut grads, &vars, gnorm, cfg.max_grad_norm)?;
                    // step
                    opt.step(&grads)?;
                    if let Some(d) = cfg.ema_decay {
                        ema_update(&mut ema, &vars, d)?;
                    }
                }
                st.step += 1;
                st.stage_step += 1;
                bar.inc(1);
                if finite {
                    recent.push(loss_sum);
                    if recent.len() > 10 {
                        recent.remove(0);
                    }
                    if st.step % 10 == 0 {
                        // The mean loss of the last 10 steps on the bar
                        // (and in the log lines off a terminal).
                        bar.set_message(format!(
                            "train (loss {:.4})",
                            recent.iter().sum::<f64>() / recent.len() as f64
                        ));
                    }
                    csv.step(
                        st.step,
                        st.stage,
                        batches.pos().epoch,
                        loss_sum,
                        stage_lr * factor,
                        gnorm,
                    )?;
                }

                // evaluate
                let last = st.stage_step == stage.steps && st.stage + 1 == stages.len();
                if (cfg.eval_every > 0 && st.step % cfg.eval_every == 0) || last {
                    // Judged on what the export writes: the EMA weights when EMA is on.
                    let ((score, grid), vl) = with_ema(&vars, &ema, || {
                        Ok((
                            evaluator.evaluate(&view, st.step)?,
                            validation_loss(cfg, &sched, &caches, &unet, &val_items)?,
                        ))
                    })?;
                    record_eval(m, run_id, st.step, vl, score, &grid)?;
                    csv.eval(st.step, vl, score)?;
                    report.retention.push((st.step, score));
                    report.val_loss = vl;
                    report.grid = Some(grid);
                    st.last_retention = Some(score);
                    // Saved with the checkpoints of this step, so a resume
                    // from one of them goes on as this run does.
                    st.stage_met = stage.until_retention.is_some_and(|u| score >= u);
                    if let Some(x) = cfg.stop_below {
                        if score >= x {
                            st.armed = true;
                            st.pos = batches.pos();
                            saver.save(&st, &opt, &weights, &ema, state::Series::Good)?;
                        } else if st.armed {
                            st.stopped = Some(format!(
                                "retention {score:.3} fell below --stop-below {x} at step {}; exporting the last good checkpoint",
                                st.step
                            ));
                            report.stopped_early = st.stopped.clone();
                            st.pos = batches.pos();
                            saver.save(&st, &opt, &weights, &ema, state::Series::Rolling)?;
                            break 'stages;
                        }
                    }
                    if st.stage_met {
                        break;
                    }
                }
                if cfg.save_every > 0 && st.step % cfg.save_every == 0 {
                    st.pos = batches.pos();
                    saver.save(&st, &opt, &weights, &ema, state::Series::Rolling)?;
                }
            }
            st.pos = batches.pos();
            if st.stage + 1 == stages.len() && saver.saved_at.get() != Some(st.step) {
                // The end of training is a checkpoint too (`save_every = 0`
                // promises it): a kill during the export resumes here, not
                // steps back.
                saver.save(&st, &opt, &weights, &ema, state::Series::Rolling)?;
            }
            st.stage += 1;
            st.stage_step = 0;
            st.stage_met = false;
            report.stages_done = st.stage;
            if st.stage < stages.len() {
                // The next stage's optimizer starts fresh; EMA follows its parameters.
                st.slots.clear();
            }
        }
        bar.finish_and_clear();
        if let (Some(x), false, false) = (cfg.stop_below, st.armed, report.interrupted) {
            report.warnings.push(format!(
                "--stop-below {x} never armed: no evaluation after step 0 reached retention {x} (it arms on the first that does), so the last step's weights were exported whatever their score; see the retention series, and lower the threshold or evaluate more often (--eval-every)"
            ));
        }
        report.steps = st.step;
        report.skipped = st.skipped;
        report.rollbacks = st.rollbacks;
        report.last_loss =
            (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64);

        // --- export ----------------------------------------------------------------
        if !report.interrupted {
            let good = match report.stopped_early {
                Some(_) => state::latest_good(&rdir)?
                    .map(|p| state::load(&p, &device))
                    .transpose()?,
                None => None,
            };
            // What the file holds: with `stop_below`, the last good
            // checkpoint's step and score, not the step that fell below.
            let (exported_step, exported_retention) = match &good {
                Some(l) => (l.state.step, l.state.last_retention),
                None => (st.step, report.retention.last().map(|r| r.1)),
            };
            report.exported_step = Some(exported_step);
            report.exported_retention = exported_retention;
            let unet_w = export_weights(
                weights.map(),
                cfg.ema_decay.is_some().then_some(&ema),
                good.map(|l| (l.weights, l.ema)),
                &trained_so_far(&stages, st.stage)?,
                |k| ckpt.tensor(k, DType::F32, &device),
            )?;
            let mut meta = BTreeMap::new();
            meta.insert(
                "eps2v.train".to_string(),
                serde_json::json!({
                    "run_id": run_id,
                    "steps": exported_step,
                    "objective": cfg.objective.to_string(),
                    "ztsnr": cfg.ztsnr,
                    "base": info.stem,
                    "retention": exported_retention,
                })
                .to_string(),
            );
            report.exported = export::export(
                &ckpt,
                &unet_w,
                weights.config(),
                &out,
                &export::ExportSpec {
                    objective: cfg.objective,
                    ztsnr: cfg.ztsnr,
                    dtype: cfg.save_dtype,
                    markers: cfg.markers,
                    a1111_yaml: cfg.a1111_yaml,
                    uncond: cfg.uncond.clone(),
                    metadata: meta,
                },
            )?;
            csv.plot(&rdir.join("curves.png"))?;
        }
        Ok(())
    })();
    report.seconds = t0.elapsed().as_secs_f64();
    if let Err(e) = result {
        // A save the error cut short leaves nothing half-written.
        let _ = state::sweep_partial(&run_dir(&root, run_id));
        m.fail_run(run_id, &report, &e);
        return Err(e);
    }
    if report.interrupted {
        m.end_run(run_id, false, &report)?;
    } else {
        m.end_run(run_id, true, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod end_tests;
#[cfg(test)]
mod order_tests;
#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod tests;
