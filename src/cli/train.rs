//! `eps2v train` and `eps2v merge`: flags → [`TrainConfig`] /
//! [`MergeConfig`]. Every `train` flag is also a field of the TOML training
//! config (`--config FILE`, a `[train]` table or a bare table); flags given
//! on the command line override the file. The exceptions say where and how a
//! run goes, not what it trains: `--resume`, `--device` and `--precision`.

use std::path::PathBuf;

use clap::Args;

use crate::manifest::Manifest;
use crate::stages::Ctx;
use crate::train::config::{LatentMode, LrSchedule, SaveDtype, TrainConfig, Weighting};
use crate::train::{self, TrainOptions};
use crate::{Error, Result};

/// Arguments of `eps2v train`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
eps2v train my_set --model base_eps.safetensors --objective v --ztsnr --blocks out,OUT08 --steps 500 --lr 3e-6 --out stage1.safetensors\n  \
eps2v train my_set --config train.toml --resume 7\n  \
eps2v train my_set --config train.toml --resume      # the newest stopped run of this config\n\n\
Watch runs/<id>/eval/grid.png (rows: prompt x seed; columns: base model, then each evaluation) and the retention score, not the loss.")]
pub struct TrainArgs {
    /// Dataset folder (bucketed and captioned).
    pub dir: PathBuf,
    /// TOML training config (`[train]` table or bare); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base single-file SDXL checkpoint (default: the config's, else the model that generated the dataset, else the committed toy model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training objective: v (the conversion) or eps (back to eps).
    #[arg(long)]
    pub objective: Option<String>,
    /// Train on the exact zero-terminal-SNR schedule (default with --objective v).
    #[arg(long, overrides_with = "no_ztsnr")]
    pub ztsnr: bool,
    /// Train on SDXL's original schedule (default with --objective eps).
    #[arg(long)]
    pub no_ztsnr: bool,
    /// Trainable blocks: all, IN00…IN08, M00, OUT00…OUT08, ranges (IN00-IN08), out, time_embed, label_emb.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<String>>,
    /// Per-block learning rates, e.g. "OUT08=2e-5,out=3e-5".
    #[arg(long)]
    pub block_lr: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Images per micro-batch (one bucket per batch).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Keep activations only at UNet block boundaries and recompute each
    /// block in the backward: less memory, one more forward.
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// Keep every activation (faster; the default unless the config turns
    /// checkpointing on).
    #[arg(long)]
    pub no_gradient_checkpointing: bool,
    /// Learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant or cosine.
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// EMA decay (e.g. 0.999); the export uses the EMA weights.
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Loss weighting: none (plain MSE, default), min_snr, debiased.
    #[arg(long)]
    pub weighting: Option<String>,
    /// γ of min-SNR-γ.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Offset noise strength.
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// Multi-resolution (pyramid) noise levels (0 disables; kohya 6–10).
    #[arg(long)]
    pub multires_noise_iterations: Option<usize>,
    /// Weight ratio between multi-resolution noise levels (kohya 0.3).
    #[arg(long)]
    pub multires_noise_discount: Option<f64>,
    /// Smallest training timestep.
    #[arg(long)]
    pub min_timestep: Option<usize>,
    /// Largest training timestep.
    #[arg(long)]
    pub max_timestep: Option<usize>,
    /// Fraction held out for validation.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Cached latent: mean or sample.
    #[arg(long)]
    pub latent: Option<String>,
    /// Caption-dropout probability.
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// Dropped captions become: zero (default), empty ("" encoded) or text:TEXT (e.g. text:,).
    #[arg(long)]
    pub uncond: Option<String>,
    /// Seed (split, shuffles, noise, timesteps).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N steps (grid, retention, validation loss).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Evaluation prompt (repeat for several; default: validation captions).
    #[arg(long = "eval-prompt")]
    pub eval_prompts: Vec<String>,
    /// Evaluation seeds, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub eval_seeds: Option<Vec<u64>>,
    /// Evaluation sampling steps.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Evaluation CFG scale.
    #[arg(long)]
    pub eval_cfg: Option<f64>,
    /// Evaluation size WxH (default: the most common bucket).
    #[arg(long)]
    pub eval_size: Option<String>,
    /// Stop when retention falls below X (after first reaching it) and export the last good checkpoint.
    #[arg(long)]
    pub stop_below: Option<f64>,
    /// Save a resumable checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Exported checkpoint (default runs/<id>/<base>-<v-ztsnr|v|eps>.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Export dtype: f16 (default), bf16, f32.
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Do not write the v_pred / ztsnr marker keys.
    #[arg(long, overrides_with = "markers")]
    pub no_markers: bool,
    /// Write the v_pred / ztsnr marker keys (the default unless the config
    /// says `markers = false`).
    #[arg(long)]
    pub markers: bool,
    /// Write an A1111 <name>.yaml (sgm VScaling + VWeighting) beside a v export.
    #[arg(long, overrides_with = "no_a1111_yaml")]
    pub a1111_yaml: bool,
    /// Write no A1111 yaml (the default unless the config asks for one).
    #[arg(long)]
    pub no_a1111_yaml: bool,
    /// Resume run ID from its newest checkpoint (same config required); `--resume` alone (or `--resume latest`): the newest stopped run of this config.
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "latest", value_parser = parse_resume)]
    pub resume: Option<Resume>,
    /// Where the models, caches, trained weights and optimizer state live, and the precision of the frozen text encoders and VAE (the trained UNet keeps f32 weights and computes in f32). Command line only, like --resume: not a config field, and a run may resume on another device.
    #[command(flatten)]
    pub device: crate::cli::device::DeviceArgs,
}

/// A flag's value read as its serde form (`--save-dtype bf16`).
pub(super) fn parse<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|e| Error::config(format!("--{flag} {v:?}: {e}")))
}

/// Read a TOML training config: a `[train]` table, or the whole file. In
/// an `eps2v run` config, a `[train]` without a `model` of its own trains
/// the run's top-level `model`, as `run` does.
pub fn read_config(path: &std::path::Path) -> Result<TrainConfig> {
    Ok(read_config_ztsnr(path)?.0)
}

/// [`read_config`], and whether the file sets `ztsnr` itself (then the
/// `--objective` flag does not change it).
fn read_config_ztsnr(path: &std::path::Path) -> Result<(TrainConfig, bool)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
    let table = match value.get("train") {
        Some(toml::Value::Table(t)) => {
            let mut t = t.clone();
            let own = t
                .get("model")
                .and_then(toml::Value::as_str)
                .is_some_and(|m| !m.is_empty());
            if let (false, Some(m)) = (own, value.get("model")) {
                t.insert("model".into(), m.clone());
            }
            t
        }
        _ => value,
    };
    let mut c = table
        .clone()
        .try_into::<TrainConfig>()
        .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
    c.ztsnr_follows_objective(&table);
    Ok((c, table.contains_key("ztsnr")))
}

impl TrainArgs {
    /// The config: file (or defaults), then the flags.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let (mut c, file_ztsnr) = match &self.config {
            Some(p) => read_config_ztsnr(p)?,
            None => (TrainConfig::default(), false),
        };
        // A config of stages takes its steps, blocks and learning rates
        // from them: these flags would be ignored, so they are refused.
        if !c.stages.is_empty() {
            let file = self.config.as_deref().unwrap_or(std::path::Path::new(""));
            let given = [
                ("--steps", self.steps.is_some()),
                ("--blocks", self.blocks.is_some()),
                ("--block-lr", self.block_lr.is_some()),
                (
                    "--lr",
                    self.lr.is_some() && c.stages.iter().all(|s| s.lr.is_some()),
                ),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(Error::config(format!(
                    "{flag}: {} trains in [[train.stages]], each with its own steps, blocks and learning rate; edit the stages there (or train without --config)",
                    file.display()
                )));
            }
        }
        macro_rules! set {
            ($($f:ident),*) => {$(if let Some(v) = &self.$f { c.$f = v.clone(); })*};
        }
        set!(
            model,
            steps,
            batch_size,
            grad_accum,
            lr,
            warmup_steps,
            weight_decay,
            max_grad_norm,
            min_snr_gamma,
            noise_offset,
            multires_noise_iterations,
            multires_noise_discount,
            min_timestep,
            max_timestep,
            val_fraction,
            caption_dropout,
            seed,
            eval_every,
            eval_steps,
            eval_cfg,
            save_every,
            blocks
        );
        if let Some(o) = &self.objective {
            let objective = o.parse()?;
            // ZTSNR follows the objective unless a flag says it, or the
            // config file says it for this same objective (`ztsnr =
            // false` with `--objective v` stays off; the shipped configs'
            // `ztsnr = true` is v's, so `--objective eps` turns it off).
            let file_says = file_ztsnr && objective == c.objective;
            c.objective = objective;
            if !self.ztsnr && !self.no_ztsnr && !file_says {
                c.ztsnr = c.objective == crate::diffusion::Prediction::V;
            }
        }
        if self.ztsnr {
            c.ztsnr = true;
        }
        if self.gradient_checkpointing {
            c.gradient_checkpointing = true;
        }
        if self.no_gradient_checkpointing {
            c.gradient_checkpointing = false;
        }
        if self.no_ztsnr {
            c.ztsnr = false;
        }
        if let Some(s) = &self.block_lr {
            c.block_lr.clear();
            for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=').ok_or_else(|| {
                    Error::config(format!(
                        "--block-lr {part:?}: use BLOCK=LR, e.g. OUT08=2e-5"
                    ))
                })?;
                let v: f64 = v.trim().parse().map_err(|_| {
                    Error::config(format!("--block-lr {part:?}: {v:?} is not a number"))
                })?;
                c.block_lr.insert(k.trim().to_string(), v);
            }
        }
        if let Some(v) = self.ema_decay {
            c.ema_decay = Some(v);
        }
        if let Some(v) = self.stop_below {
            c.stop_below = Some(v);
        }
        if let Some(v) = &self.out {
            c.out = Some(v.clone());
        }
        if let Some(v) = &self.lr_schedule {
            c.lr_schedule = parse::<LrSchedule>("lr-schedule", v)?;
        }
        if let Some(v) = &self.weighting {
            c.weighting = parse::<Weighting>("weighting", v)?;
        }
        if let Some(v) = &self.latent {
            c.latent = parse::<LatentMode>("latent", v)?;
        }
        if let Some(v) = &self.save_dtype {
            c.save_dtype = parse::<SaveDtype>("save-dtype", v)?;
        }
        if let Some(v) = &self.uncond {
            c.uncond = v.parse()?;
        }
        if !self.eval_prompts.is_empty() {
            c.eval_prompts = self.eval_prompts.clone();
        }
        if let Some(v) = &self.eval_seeds {
            c.eval_seeds = v.clone();
        }
        if let Some(v) = &self.eval_size {
            let (w, h) = super::sample::parse_size(v)?;
            c.eval_size = Some([w, h]);
        }
        if self.no_markers {
            c.markers = false;
        }
        if self.markers {
            c.markers = true;
        }
        if self.a1111_yaml {
            c.a1111_yaml = true;
        }
        if self.no_a1111_yaml {
            c.a1111_yaml = false;
        }
        Ok(c)
    }
}

/// Which run `--resume` takes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// `--resume ID`.
    Run(i64),
    /// `--resume` alone or `--resume latest`: the newest run of this config
    /// that stopped with a checkpoint ([`train::state::resumable_run`]).
    Latest,
}

fn parse_resume(s: &str) -> std::result::Result<Resume, String> {
    match s.trim() {
        "latest" => Ok(Resume::Latest),
        t => t
            .parse()
            .map(Resume::Run)
            .map_err(|_| format!("expected a run id (see `eps2v inspect`) or `latest`, got {s:?}")),
    }
}

/// The run id `--resume` names, if any.
fn resume_id(r: Option<Resume>, cfg: &TrainConfig, m: &Manifest) -> Result<Option<i64>> {
    match r {
        None => Ok(None),
        Some(Resume::Run(id)) => Ok(Some(id)),
        Some(Resume::Latest) => match train::state::resumable_run(m, cfg)? {
            Some(id) => Ok(Some(id)),
            None => Err(match train::state::newest_mismatch(m, cfg)? {
                // Say why the newest stopped run does not go on.
                Some((id, why)) => Error::config(format!(
                    "--resume: the newest stopped training run, {id}, cannot go on with these settings: {why}; resume it with its own, or drop --resume to start a new run"
                )),
                None => Error::config(format!(
                    "--resume: {} holds no stopped training run with a checkpoint to resume (`eps2v inspect {}` lists the runs); drop --resume to start a new run",
                    m.root().display(),
                    m.root().display()
                )),
            }),
        },
    }
}

/// This process's command line with `--resume ID` in place of any
/// `--resume` it had, quoted for a POSIX shell: what resumes the run.
fn resume_command(id: i64) -> String {
    // `args()` panics on an argument that is not UTF-8 (clap takes such
    // paths): shown lossily.
    let mut args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Some(first) = args.first_mut() {
        *first = "eps2v".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a.starts_with("--resume=") {
            i += 1;
            continue;
        }
        if a == "--resume" {
            // Its optional value: an id or `latest`.
            let next = args.get(i + 1);
            i += if next.is_some_and(|n| n == "latest" || n.parse::<i64>().is_ok()) {
                2
            } else {
                1
            };
            continue;
        }
        out.push(shell_quote(a));
        i += 1;
    }
    out.push(format!("--resume {id}"));
    out.join(" ")
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=:,@%+-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Run `eps2v train`; exit 130 when interrupted (a checkpoint to resume
/// from was saved).
pub fn run_train(a: TrainArgs, json: bool) -> Result<i32> {
    let mut cfg = a.to_config()?;
    // What needs no model is checked before one is looked for (and hashed).
    if let Some(out) = &cfg.out {
        crate::models::sdxl::checkpoint::check_safetensors_name("train.out (--out)", out)?;
    }
    let mut m = Manifest::open(&a.dir)?;
    // No model given: the one that generated the dataset (the point of
    // the job: convert the model on its own images), else the toy base.
    if cfg.model.as_os_str().is_empty() {
        let (model, why) = match crate::toy::generating_model(&m)? {
            Some(p) => (p, "the model that generated the dataset"),
            None => (
                crate::toy::default_model_path()?,
                "nothing in the dataset was generated, so the toy world's",
            ),
        };
        if !json {
            println!("base model: {} (no --model given: {why})", model.display());
        }
        cfg.model = model;
    }
    cfg.validate()?;
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(w) = train::same_prediction_warning(&cfg, &m)? {
        eprintln!("warning: {w}");
    }
    let (device, dtype) = a.device.resolve()?;
    let resume = resume_id(a.resume, &cfg, &m)?;
    if resume.is_none() && !json {
        // The same command after a Ctrl-C starts over: say so while it
        // is cheap to stop.
        if let Some(id) = train::state::resumable_run(&m, &cfg)? {
            eprintln!(
                "note: training run {id} stopped earlier with these settings; this starts a new run from step 0. To go on from where run {id} stopped instead, stop this one (Ctrl-C) and rerun with --resume"
            );
        }
    }
    let ctx = Ctx::new(!json);
    let r = train::train(
        &cfg,
        &mut m,
        &TrainOptions {
            resume,
            device: Some(device),
            dtype: Some(dtype),
            ..Default::default()
        },
        &ctx,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "train run {} ({}): {} steps in {:.1}s{}{}, objective {}{}, {} trainable parameters, optimizer state {:.1} MB",
            r.run_id,
            r.run_dir.display(),
            r.steps,
            r.seconds,
            // The time is this call's: a resumed run says which steps.
            match (r.resumed, r.steps > r.resumed_at) {
                (true, true) => format!(
                    " (steps {}–{} now, resumed at {})",
                    r.resumed_at + 1,
                    r.steps,
                    r.resumed_at
                ),
                (true, false) => format!(" (resumed at {}: no steps left)", r.resumed_at),
                (false, _) => String::new(),
            },
            if r.lanes > 1 {
                format!(" ({} micro-batches at once)", r.lanes)
            } else {
                String::new()
            },
            cfg.objective,
            if cfg.ztsnr { " + ZTSNR" } else { "" },
            r.trainable_params,
            r.optimizer_bytes as f64 / 1e6
        );
        println!(
            "data: {} train / {} val items ({} ok, {} unbucketed, {} uncaptioned); cache: latents {} encoded / {} cached, captions {} encoded / {} cached",
            r.train_items,
            r.val_items,
            r.data.ok,
            r.data.unbucketed,
            r.data.uncaptioned,
            r.cache.latents_encoded,
            r.cache.latents_cached,
            r.cache.texts_encoded,
            r.cache.texts_cached
        );
        if let Some(l) = r.last_loss {
            print!("loss (last 10) {l:.4}");
        }
        if let Some(v) = r.val_loss {
            print!(", val loss {v:.4}");
        } else if r.val_items == 0 && cfg.val_fraction > 0.0 {
            // Said, so that a missing validation loss is not a surprise.
            print!(
                " (no validation loss: --val-fraction {} of {} items holds none out)",
                cfg.val_fraction, r.train_items
            );
        }
        println!();
        let ret: Vec<String> = r
            .retention
            .iter()
            .map(|(s, v)| format!("{s}:{v:.3}"))
            .collect();
        println!("retention (step:score): {}", ret.join(" "));
        if r.skipped > 0 || r.rollbacks > 0 {
            println!(
                "non-finite steps skipped: {}, rollbacks: {} (see {})",
                r.skipped,
                r.rollbacks,
                r.run_dir.join("nan.log").display()
            );
        }
        if let Some(g) = &r.grid {
            println!("grid: {}", g.display());
        }
        if let Some(why) = &r.stopped_early {
            println!("stopped early: {why}");
        }
        for p in &r.exported {
            println!(
                "exported: {}{}",
                p.display(),
                match (&r.stopped_early, r.exported_step) {
                    (Some(_), Some(s)) if p.extension().is_some_and(|e| e == "safetensors") =>
                        format!(
                            " (step {s}'s weights, retention {})",
                            r.exported_retention
                                .map_or("-".into(), |v| format!("{v:.3}"))
                        ),
                    _ => String::new(),
                }
            );
        }
        for t in &r.tidied {
            println!(
                "earlier run {} had been left `running` by a dead process: marked failed{}",
                t.run_id,
                if t.resumable {
                    format!(", resumable with --resume {}", t.run_id)
                } else {
                    String::new()
                }
            );
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        if r.interrupted {
            println!(
                "interrupted at step {}; resume with: {} (the same settings; `--resume` alone takes the newest stopped run of them)",
                r.steps,
                resume_command(r.run_id)
            );
        }
    }
    Ok(if r.interrupted {
        crate::error::INTERRUPTED_EXIT
    } else {
        0
    })
}

#[cfg(test)]
#[path = "train_tests.rs"]
mod tests;

/// `eps2v train --help` with each tuning flag's default, taken from
/// [`TrainConfig::default`] itself (so the help cannot drift from it): the
/// flags are options over the config file, so clap has no default of its
/// own to show.
pub fn with_defaults(c: clap::Command) -> clap::Command {
    let d = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    const FLAGS: &[&str] = &[
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "lr_schedule",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "weighting",
        "min_snr_gamma",
        "noise_offset",
        "multires_noise_iterations",
        "multires_noise_discount",
        "min_timestep",
        "max_timestep",
        "val_fraction",
        "latent",
        "caption_dropout",
        "seed",
        "eval_every",
        "eval_steps",
        "eval_cfg",
        "save_every",
        "save_dtype",
    ];
    FLAGS.iter().fold(c, |c, id| {
        let Some(v) = d.get(*id).filter(|v| !v.is_null()) else {
            return c;
        };
        let v = match (v.as_str(), v.as_f64()) {
            (Some(s), _) => s.to_string(),
            // 1e-5, not 0.00001.
            (None, Some(x)) if x != 0.0 && x.abs() < 1e-3 => format!("{x:e}"),
            _ => v.to_string(),
        };
        c.mut_arg(*id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {v}]"))
        })
    })
}
