//! `eps2v merge`: weighted sum, add-difference, per-block weights and
//! sweeps of single-file checkpoints ([`crate::merge`],
//! [`crate::merge_sweep`]).

use std::path::PathBuf;

use clap::Args;

use crate::merge::{self, BlockAlphas, MergeConfig, Side};
use crate::stages::Ctx;
use crate::train::config::SaveDtype;

use super::train::parse;
use crate::{Error, Result};

/// Arguments of `eps2v merge`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
eps2v merge converted.safetensors base.safetensors --markers a --alpha 0.3 --out merged.safetensors\n  \
eps2v merge converted.safetensors base.safetensors --markers a --blocks \"IN00-IN08=0.2,M00=0.5,OUT00-OUT08=0.8\" --out m.safetensors\n  \
eps2v merge finetune.safetensors converted.safetensors --diff base.safetensors --alpha 1 --markers b --out finetune_v.safetensors\n  \
eps2v merge converted.safetensors base.safetensors --markers a --sweep 0,0.25,0.5,0.75,1 --eval-prompt \"1girl, solo\" --out sweep/m.safetensors\n\n\
Weighted sum: (1-alpha)*A + alpha*B. Add difference: A + alpha*(B-C). Text encoders, VAE and the v_pred/ztsnr markers are copied from the side chosen with --te/--vae/--markers (default a; models that predict differently, eps vs v or ZTSNR, need --markers).")]
pub struct MergeArgs {
    /// Model A.
    pub a: PathBuf,
    /// Model B.
    pub b: PathBuf,
    /// Model C: add difference A + alpha*(B - C).
    #[arg(long)]
    pub diff: Option<PathBuf>,
    /// Default alpha.
    #[arg(
        long,
        default_value_t = 0.5,
        allow_negative_numbers = true,
        conflicts_with = "sweep"
    )]
    pub alpha: f64,
    /// Per-block alphas, e.g. "IN00-IN08=0.2,M00=0.5,OUT00-OUT08=0.8".
    #[arg(long)]
    pub blocks: Option<String>,
    /// Text encoders from a or b.
    #[arg(long, default_value = "a")]
    pub te: String,
    /// VAE from a or b.
    #[arg(long, default_value = "a")]
    pub vae: String,
    /// v_pred/ztsnr markers and prediction metadata from a or b (default: a
    /// when both predict alike; models that differ need it said).
    #[arg(long)]
    pub markers: Option<String>,
    /// Storage dtype: f16, bf16 or f32 (default: each tensor as stored in the model it comes from: the UNet as in A, text encoders and VAE as on their --te/--vae side).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write one merge per alpha (comma-separated), each scored by shape retention.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub sweep: Option<Vec<f64>>,
    /// Sweep: reference model for retention (default: whichever of A/B is eps, else A).
    #[arg(long, requires = "sweep")]
    pub reference: Option<PathBuf>,
    /// Sweep: evaluation prompt (repeat). Default: 8 drawn from the built-in pack `generate` uses for model A (toy for a toy model, else 1girl).
    #[arg(long = "eval-prompt", requires = "sweep")]
    pub eval_prompts: Vec<String>,
    /// Sweep: seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1", requires = "sweep")]
    pub eval_seeds: Vec<u64>,
    /// Sweep: sampling steps.
    #[arg(long, default_value_t = 20, requires = "sweep")]
    pub eval_steps: usize,
    /// Sweep: CFG scale.
    #[arg(
        long,
        default_value_t = 5.0,
        allow_negative_numbers = true,
        requires = "sweep"
    )]
    pub eval_cfg: f64,
    /// Sweep: image size WxH (default: model A's own, as for `sample`: 64x64 for a toy model, 1024x1024 for SDXL).
    #[arg(long, requires = "sweep")]
    pub eval_size: Option<String>,
    /// Output file (with --sweep: the stem of each merge's file).
    #[arg(long)]
    pub out: PathBuf,
}

/// A `--te`/`--vae`/`--markers` side, its error naming the flag.
fn side(flag: &str, v: &str) -> Result<Side> {
    v.parse::<Side>()
        .map_err(|_| Error::config(format!("{flag} {v:?}: use a or b")))
}

/// Run `eps2v merge`.
pub fn run_merge(a: MergeArgs, json: bool) -> Result<i32> {
    crate::models::sdxl::checkpoint::check_safetensors_name("merge --out", &a.out)?;
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some(d) => Some(parse::<SaveDtype>("dtype", d)?.dtype()),
    };
    let cfg = MergeConfig {
        a: a.a.clone(),
        b: a.b.clone(),
        c: a.diff.clone(),
        alpha: a.alpha,
        blocks: a
            .blocks
            .as_deref()
            .map(BlockAlphas::parse)
            .transpose()?
            .unwrap_or_default(),
        te: side("--te", &a.te)?,
        vae: side("--vae", &a.vae)?,
        markers: a
            .markers
            .as_deref()
            .map(|m| side("--markers", m))
            .transpose()?,
        dtype,
    };
    merge::check_model_a(&cfg.a)?;
    match &a.sweep {
        None => {
            let r = merge::merge(&cfg, &a.out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: {} UNet tensors blended, {} copied{}; markers: v_pred {}, ztsnr {}",
                    r.out.display(),
                    r.blended,
                    r.copied,
                    if r.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", left_out(&r.skipped))
                    },
                    r.v_pred,
                    r.ztsnr
                );
            }
        }
        Some(alphas) => {
            // No prompts given: drawn as `run`'s evaluation draws them, from
            // the built-in pack `generate` would use for model A.
            let prompts = if a.eval_prompts.is_empty() {
                let pack = if crate::toy::is_toy_model(&a.a) {
                    "toy"
                } else {
                    "1girl"
                };
                let p = default_sweep_prompts(pack)?;
                if !json {
                    println!(
                        "eval prompts: {} drawn from the built-in {pack} pack (seed {SWEEP_PROMPT_SEED}); --eval-prompt to choose",
                        p.len()
                    );
                }
                p
            } else {
                a.eval_prompts.clone()
            };
            let (width, height) = match &a.eval_size {
                Some(s) => super::sample::parse_size(s)?,
                None => crate::pipeline::size::native_size_of(&a.a)?,
            };
            // Ctrl-C / SIGTERM: stop after the merge in hand.
            let _signals = crate::signal::install();
            let r = merge::sweep(
                &cfg,
                alphas,
                &a.out,
                &merge::SweepEval {
                    reference: a.reference.clone(),
                    prompts,
                    seeds: a.eval_seeds.clone(),
                    steps: a.eval_steps,
                    cfg: a.eval_cfg,
                    width,
                    height,
                    load: Default::default(),
                    score_a: false,
                },
                &Ctx::new(!json),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.points {
                    println!(
                        "alpha {:<6} retention {:.3}  {}  grid {}",
                        p.alpha,
                        p.retention,
                        p.out.display(),
                        p.grid.display()
                    );
                }
                println!(
                    "best: alpha {} (retention {:.3})",
                    r.best_alpha, r.best_retention
                );
            }
        }
    }
    Ok(0)
}

/// Seed of the sweep's default prompt draw: `run`'s evaluation seed, never
/// a training prompt's.
const SWEEP_PROMPT_SEED: u64 = 1_000_003;

/// `merge --sweep` without `--eval-prompt`: 8 prompts of the built-in
/// `pack`, drawn as `run`'s evaluation draws its prompts.
fn default_sweep_prompts(pack: &str) -> Result<Vec<String>> {
    let template = crate::prompts::load(&crate::prompts::TemplateSpec::Builtin(pack.into()), None)?;
    Ok((0..8)
        .map(|i| crate::prompts::tidy(&template.random(SWEEP_PROMPT_SEED, i)))
        .collect())
}

/// The keys a merge left out, for its one-line summary: an EMA copy by
/// count (a real one has ~1,700 keys), other keys by name up to three
/// (all of them are under `skipped` in `--json`).
fn left_out(skipped: &[String]) -> String {
    let ema = skipped
        .iter()
        .filter(|k| k.starts_with("model_ema."))
        .count();
    let other: Vec<&str> = skipped
        .iter()
        .filter(|k| !k.starts_with("model_ema."))
        .map(String::as_str)
        .collect();
    let mut parts = Vec::new();
    if ema > 0 {
        parts.push(format!("{ema} model_ema.* (an EMA copy of A's UNet)"));
    }
    if !other.is_empty() {
        let more = if other.len() > 3 { ", …" } else { "" };
        parts.push(format!(
            "{} other ({}{more})",
            other.len(),
            other[..other.len().min(3)].join(", ")
        ));
    }
    format!("{} keys left out: {}", skipped.len(), parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_summaries_count_ema_keys() {
        let mut skipped: Vec<String> = (0..1700).map(|i| format!("model_ema.k{i}")).collect();
        skipped.push("a.position_ids".into());
        assert_eq!(
            left_out(&skipped),
            "1701 keys left out: 1700 model_ema.* (an EMA copy of A's UNet); 1 other (a.position_ids)"
        );
        let many: Vec<String> = (0..5).map(|i| format!("x{i}")).collect();
        assert_eq!(left_out(&many), "5 keys left out: 5 other (x0, x1, x2, …)");
    }
}
