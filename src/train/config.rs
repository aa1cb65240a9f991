//! The training configuration: one flat, serde-typed struct (the nanoGPT
//! habit of a flat config that is saved into every checkpoint), with staged
//! recipes as a list of [`StageConfig`]. Every CLI flag of `eps2v train` is a
//! field here, and the TOML `[train]` table of a pipeline config deserialises
//! into the same struct (`deny_unknown_fields`: a misspelt key is an error
//! that names it).
//!
//! Defaults follow what the conversion needs (reference/trainers-landscape.md,
//! Lin et al. 2023): v objective with the exact ZTSNR schedule, plain v-MSE
//! (min-SNR-γ is offered but weighs the ZTSNR terminal steps by ~0, see
//! [`crate::diffusion::training`]), zeroed-conditioning caption dropout (what
//! SDXL itself was trained with), AdamW 1e-5 with f32 moments, clipping at 1.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::blocks::BlockSet;
use crate::diffusion::{Prediction, SamplerKind, UncondMode};
use crate::{Error, Result};

/// Serialise through `Display`, deserialise through `FromStr` (so TOML and
/// JSON use the CLI spellings: `"v"`, `"zero"`, `"text:,"`, `"euler"`).
pub(crate) mod as_str {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    /// Serialise `v` as its `Display` string.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Parse a string with `FromStr`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

/// The caption-dropout conditioning: what a dropped caption is replaced by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DropoutCond {
    /// Zeroed context and pooled vector (SDXL's own `ucg_rate` dropout,
    /// ComfyUI ConditioningZeroOut). The default.
    #[default]
    Zero,
    /// The encoded empty prompt `""` (kohya `--caption_dropout_rate`,
    /// A1111/Forge's shortcut).
    Empty,
    /// A fixed text, e.g. `","` (`text:,`).
    Text(String),
}

impl DropoutCond {
    /// The matching sampling-time unconditional mode (written into the
    /// exported metadata so `sample` and `diagnose uncond` can use it).
    pub fn uncond_mode(&self) -> UncondMode {
        match self {
            DropoutCond::Zero => UncondMode::Zero,
            DropoutCond::Empty => UncondMode::Empty,
            DropoutCond::Text(t) => UncondMode::Negative(t.clone()),
        }
    }

    /// The text to encode (`None` for zeroed conditioning).
    pub fn text(&self) -> Option<&str> {
        match self {
            DropoutCond::Zero => None,
            DropoutCond::Empty => Some(""),
            DropoutCond::Text(t) => Some(t),
        }
    }
}

impl FromStr for DropoutCond {
    type Err = Error;

    /// `zero`, `empty` or `text:TEXT` (e.g. `text:,`).
    fn from_str(s: &str) -> Result<Self> {
        if let Some(t) = s.strip_prefix("text:") {
            return Ok(DropoutCond::Text(t.to_string()));
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "zero" => Ok(DropoutCond::Zero),
            "empty" => Ok(DropoutCond::Empty),
            other => Err(Error::config(format!(
                "uncond {other:?}: use zero, empty or text:TEXT (e.g. text:,)"
            ))),
        }
    }
}

impl fmt::Display for DropoutCond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropoutCond::Zero => f.write_str("zero"),
            DropoutCond::Empty => f.write_str("empty"),
            DropoutCond::Text(t) => write!(f, "text:{t}"),
        }
    }
}

/// Per-sample loss weighting over timesteps.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Plain MSE on the objective's target (Lin et al. for v). The default.
    #[default]
    None,
    /// Min-SNR-γ (`min_snr_gamma`): ε → min(SNR, γ)/SNR, v → min(SNR, γ)/(SNR+1).
    MinSnr,
    /// Debiased estimation (kohya): ε → 1/√SNR, v → 1/(SNR+1), SNR clamped
    /// to [`TrainConfig::debiased_snr_min`, 1000].
    Debiased,
}

/// Learning-rate shape after the warmup.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Constant after a linear warmup. The default.
    #[default]
    Constant,
    /// Cosine decay to `min_lr_ratio · lr` over the stage's steps.
    Cosine,
}

/// Which VAE latent is cached per image.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LatentMode {
    /// The distribution's mean (deterministic). The default.
    #[default]
    Mean,
    /// One sample `mean + std·n`, `n` seeded per item (kohya caches a sample).
    Sample,
}

/// Storage dtype of the exported checkpoint.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SaveDtype {
    /// IEEE half (what most SDXL files use). The default.
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// float32.
    F32,
}

impl SaveDtype {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            SaveDtype::F16 => candle_core::DType::F16,
            SaveDtype::Bf16 => candle_core::DType::BF16,
            SaveDtype::F32 => candle_core::DType::F32,
        }
    }
}

/// One stage of a staged recipe: which blocks train, for how long, at what
/// learning rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Trainable UNet blocks: `all`, MBW ids (`IN00`…`IN08`, `M00`,
    /// `OUT00`…`OUT08`), ranges (`IN00-IN08`), `out`, `time_embed`, `label_emb`.
    pub blocks: Vec<String>,
    /// Optimizer steps of this stage (the maximum when `until_retention` is set).
    pub steps: usize,
    /// Learning rate of this stage (default: the run's `lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Per-block learning rates overriding `lr` (`{ OUT08 = 2e-5 }`).
    #[serde(default)]
    pub block_lr: BTreeMap<String, f64>,
    /// End the stage early once the shape-retention score reaches this value
    /// (checked at every evaluation; e.g. "until samples hold shapes").
    #[serde(default)]
    pub until_retention: Option<f64>,
}

/// Everything `eps2v train` needs (see the module docs). Field defaults are
/// the CLI defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base single-file SDXL checkpoint (its prediction type is the one the
    /// dataset was generated with).
    pub model: PathBuf,
    /// Training objective: `v` (the conversion) or `eps` (the way back).
    #[serde(with = "as_str")]
    #[schemars(with = "String")]
    pub objective: Prediction,
    /// Train on the exact zero-terminal-SNR schedule (ᾱ_T = 0) and mark the
    /// export `ztsnr`. Default: true with the v objective, false with eps.
    pub ztsnr: bool,
    /// Trainable blocks of the single stage (ignored when `stages` is set).
    pub blocks: Vec<String>,
    /// Optimizer steps of the single stage (ignored when `stages` is set).
    pub steps: usize,
    /// Staged recipe; when empty, one stage of `blocks` × `steps`.
    pub stages: Vec<StageConfig>,
    /// Per-block learning rates of the single stage.
    pub block_lr: BTreeMap<String, f64>,
    /// Images per micro-batch (one bucket per batch).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Keep the UNet's activations only at block boundaries and recompute
    /// each block during the backward (sd-scripts' `--gradient_checkpointing`):
    /// far less memory for one more forward of the trained blocks. The same
    /// gradients up to rounding; may change on resume.
    pub gradient_checkpointing: bool,
    /// Base learning rate.
    pub lr: f64,
    /// Shape after warmup.
    pub lr_schedule: LrSchedule,
    /// Linear warmup steps (per stage).
    pub warmup_steps: usize,
    /// Floor of the cosine schedule as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// EMA decay of the trained weights (`None`: no EMA); the export, the
    /// evaluation grids, the retention score and the validation loss use the EMA weights.
    /// A block that a later stage freezes stays at its EMA value there.
    pub ema_decay: Option<f64>,
    /// Loss weighting over timesteps.
    pub weighting: Weighting,
    /// γ of min-SNR-γ (> 0).
    pub min_snr_gamma: f64,
    /// Lower SNR clamp of debiased estimation (1/√SNR is infinite at SNR 0).
    pub debiased_snr_min: f64,
    /// Offset noise strength (0 disables): ε += offset·N(0,1) per (sample, channel).
    pub noise_offset: f64,
    /// Multi-resolution ("pyramid") noise levels added to ε after the
    /// offset (0 disables; kohya `--multires_noise_iterations`, 6–10 at
    /// 1024²): level i = 0, 1, … adds N(0,1) drawn at the latent size
    /// divided by rᶦ (r uniform in [2, 4) per level, so level 0 is a second
    /// full-size field), bilinearly upsampled and scaled by
    /// `multires_noise_discount`ᶦ, until a side reaches 1; then each
    /// sample's noise is rescaled to unit std.
    pub multires_noise_iterations: usize,
    /// Weight ratio between successive multi-resolution levels (0 < d ≤ 1;
    /// kohya's default 0.3).
    pub multires_noise_discount: f64,
    /// Smallest training timestep (inclusive).
    pub min_timestep: usize,
    /// Largest training timestep (inclusive, ≤ 999).
    pub max_timestep: usize,
    /// Fraction of the items held out for validation (seeded, recorded).
    pub val_fraction: f64,
    /// Most items held out.
    pub val_max: usize,
    /// Timesteps of the deterministic validation loss.
    pub val_timesteps: Vec<usize>,
    /// Cached VAE latent.
    pub latent: LatentMode,
    /// Longest caption in 75-token chunks (kohya `--max_token_length` 225 = 3).
    pub max_chunks: usize,
    /// Caption-dropout probability per sample.
    pub caption_dropout: f64,
    /// What a dropped caption becomes.
    #[serde(with = "as_str")]
    #[schemars(with = "String")]
    pub uncond: DropoutCond,
    /// Seed of the split, the shuffles, the noise and the timesteps.
    pub seed: u64,
    /// Evaluate (grid, retention, validation loss) every N steps (0: only at
    /// the start and the end).
    pub eval_every: usize,
    /// Evaluation prompts (default: captions of the first validation items).
    pub eval_prompts: Vec<String>,
    /// How many validation captions to use when `eval_prompts` is empty.
    pub eval_prompt_count: usize,
    /// Seeds per evaluation prompt.
    pub eval_seeds: Vec<u64>,
    /// Evaluation sampling steps.
    pub eval_steps: usize,
    /// Evaluation CFG scale.
    pub eval_cfg: f64,
    /// Evaluation sampler.
    #[serde(with = "as_str")]
    #[schemars(with = "String")]
    pub eval_sampler: SamplerKind,
    /// Evaluation size `[w, h]` (default: the most common training bucket).
    pub eval_size: Option<[u32; 2]>,
    /// Stop when the shape-retention score falls below this, keeping the last
    /// checkpoint whose score was at or above it.
    pub stop_below: Option<f64>,
    /// Consecutive non-finite steps before rolling back to the last good checkpoint.
    pub nan_rollback_after: usize,
    /// Save a resumable checkpoint every N steps (0: only at the end / on a signal).
    pub save_every: usize,
    /// The exported single-file checkpoint.
    pub out: Option<PathBuf>,
    /// Storage dtype of the export.
    pub save_dtype: SaveDtype,
    /// Write the `v_pred` / `ztsnr` marker keys (v exports).
    pub markers: bool,
    /// Write an A1111 `.yaml` config beside the export (v exports).
    pub a1111_yaml: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            objective: Prediction::V,
            ztsnr: true,
            blocks: vec!["all".into()],
            steps: 1000,
            stages: Vec::new(),
            block_lr: BTreeMap::new(),
            batch_size: 4,
            grad_accum: 1,
            gradient_checkpointing: false,
            lr: 1e-5,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            ema_decay: None,
            weighting: Weighting::None,
            min_snr_gamma: 5.0,
            debiased_snr_min: 1e-3,
            noise_offset: 0.0,
            multires_noise_iterations: 0,
            multires_noise_discount: 0.3,
            min_timestep: 0,
            max_timestep: 999,
            val_fraction: 0.05,
            val_max: 64,
            val_timesteps: vec![100, 300, 500, 700, 900, 999],
            latent: LatentMode::Mean,
            max_chunks: 3,
            caption_dropout: 0.1,
            uncond: DropoutCond::Zero,
            seed: 0,
            eval_every: 100,
            eval_prompts: Vec::new(),
            eval_prompt_count: 4,
            eval_seeds: vec![0, 1],
            eval_steps: 20,
            eval_cfg: 5.0,
            eval_sampler: SamplerKind::Euler,
            eval_size: None,
            stop_below: None,
            nan_rollback_after: 3,
            save_every: 500,
            out: None,
            save_dtype: SaveDtype::F16,
            markers: true,
            a1111_yaml: false,
        }
    }
}

/// Fields that may differ between a run and its `--resume` (they change
/// where things are written or how often, never the numbers — except
/// `save_every` for a run that rolls back after NaNs: it returns to the
/// newest scheduled checkpoint, which `save_every` places).
const RESUMABLE_FIELDS: &[&str] = &[
    "out",
    "save_every",
    "save_dtype",
    "markers",
    "a1111_yaml",
    "gradient_checkpointing",
];

impl TrainConfig {
    /// The stages to run: `stages`, or one stage from `blocks`/`steps`/`block_lr`.
    pub fn effective_stages(&self) -> Vec<StageConfig> {
        if !self.stages.is_empty() {
            return self.stages.clone();
        }
        vec![StageConfig {
            blocks: self.blocks.clone(),
            steps: self.steps,
            lr: None,
            block_lr: self.block_lr.clone(),
            until_retention: None,
        }]
    }

    /// Total optimizer steps over all stages.
    pub fn total_steps(&self) -> usize {
        self.effective_stages().iter().map(|s| s.steps).sum()
    }

    /// Check every field; errors name the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(format!("train.{field}: {msg}")));
        if self.model.as_os_str().is_empty() {
            return bad("model", "no base checkpoint given (--model FILE)".into());
        }
        if let Some(out) = &self.out {
            crate::models::sdxl::checkpoint::check_safetensors_name("train.out (--out)", out)?;
        }
        // A staged recipe takes steps, blocks and learning rates from its
        // stages: the single stage's keys beside it would be ignored.
        if !self.stages.is_empty() {
            let d = Self::default();
            let ignored: Vec<&str> = [
                ("train.steps", self.steps != d.steps),
                ("train.blocks", self.blocks != d.blocks),
                ("train.block_lr", !self.block_lr.is_empty()),
            ]
            .into_iter()
            .filter_map(|(k, set)| set.then_some(k))
            .collect();
            if !ignored.is_empty() {
                return Err(Error::config(format!(
                    "{}: ignored beside [[train.stages]], which gives each stage its own steps, blocks and block_lr; move them into the stages (or drop the stages)",
                    ignored.join(", ")
                )));
            }
        }
        let stages = self.effective_stages();
        if stages.iter().all(|s| s.steps == 0) {
            return bad("steps", "must be at least 1".into());
        }
        // One stage of its own (no `[[train.stages]]`): its keys are the
        // config's `blocks` / `block_lr` (the flags `--blocks` / `--block-lr`).
        let single = self.stages.is_empty();
        for (i, s) in stages.iter().enumerate() {
            let set = BlockSet::parse(&s.blocks).map_err(|e| {
                Error::config(if single {
                    format!("train.blocks (--blocks): {e}")
                } else {
                    format!("train.stages[{i}].blocks: {e}")
                })
            })?;
            for (k, &lr) in &s.block_lr {
                let one = BlockSet::parse(std::slice::from_ref(k))
                    .map_err(|e| Error::config(format!("train.block_lr.{k}: {e}")))?;
                if !one.is_subset(&set) {
                    return bad(
                        "block_lr",
                        if single {
                            format!(
                                "{k} is not among the trained blocks {:?} (--blocks)",
                                s.blocks
                            )
                        } else {
                            format!("{k} is not trained in stage {i} (blocks {:?})", s.blocks)
                        },
                    );
                }
                if !(lr >= 0.0 && lr.is_finite()) {
                    return bad("block_lr", format!("{k} = {lr}: must be ≥ 0"));
                }
            }
            if let Some(lr) = s.lr {
                if !(lr > 0.0 && lr.is_finite()) {
                    return bad("stages.lr", format!("{lr}: must be > 0"));
                }
            }
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size", "batch_size and grad_accum must be ≥ 1".into());
        }
        if self.a1111_yaml && self.objective != Prediction::V {
            return bad("a1111_yaml", super::export::A1111_YAML_EPS.into());
        }
        // ComfyUI and A1111 read `ztsnr` only with `v_pred`, and `ckpt mark`
        // refuses the pair: an eps model trained on the ZTSNR schedule
        // would be sampled on another one everywhere else.
        if self.ztsnr && self.objective == Prediction::Eps {
            return bad(
                "ztsnr",
                "true with objective eps: at t = 999 the input is pure noise and ε is the input itself, so the model learns nothing there and eps sampling cannot start from it; drop ztsnr (eps trains on the usual schedule, as the v → eps direction does) or use objective v".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{}: must be > 0", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1", "β₁ and β₂ must be in [0, 1)".into());
        }
        if !(self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            return bad(
                "adam_eps",
                format!(
                    "{}: must be > 0 (0 makes 0/0 of a parameter that has had no gradient yet)",
                    self.adam_eps
                ),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(
                "weight_decay",
                format!("{}: must be ≥ 0", self.weight_decay),
            );
        }
        if self.max_grad_norm < 0.0 || !self.max_grad_norm.is_finite() {
            return bad("max_grad_norm", "must be ≥ 0 (0 disables clipping)".into());
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return bad("ema_decay", format!("{d}: must be in [0, 1)"));
            }
        }
        if !(self.min_snr_gamma > 0.0 && self.min_snr_gamma.is_finite()) {
            return bad(
                "min_snr_gamma",
                format!(
                    "{}: γ must be > 0 (5 is the paper's value)",
                    self.min_snr_gamma
                ),
            );
        }
        if !(self.debiased_snr_min > 0.0 && self.debiased_snr_min <= 1000.0) {
            return bad(
                "debiased_snr_min",
                format!(
                    "{}: must be in (0, 1000] (the SNR is capped at 1000; 1e-3 is the default)",
                    self.debiased_snr_min
                ),
            );
        }
        if self.noise_offset < 0.0 {
            return bad("noise_offset", "must be ≥ 0".into());
        }
        if !(self.multires_noise_discount > 0.0 && self.multires_noise_discount <= 1.0) {
            return bad(
                "multires_noise_discount",
                format!(
                    "{} is outside (0, 1]; 0.3 is kohya's default",
                    self.multires_noise_discount
                ),
            );
        }
        if self.max_timestep > 999 || self.min_timestep > self.max_timestep {
            return bad(
                "min_timestep",
                format!(
                    "need 0 ≤ min_timestep ({}) ≤ max_timestep ({}) ≤ 999",
                    self.min_timestep, self.max_timestep
                ),
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad("val_fraction", "must be in [0, 1)".into());
        }
        if let Some(t) = self.val_timesteps.iter().find(|&&t| t > 999) {
            return bad("val_timesteps", format!("{t} is above 999"));
        }
        if self.max_chunks == 0 {
            return bad("max_chunks", "must be ≥ 1".into());
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return bad("caption_dropout", "must be in [0, 1]".into());
        }
        if self.eval_seeds.is_empty() || self.eval_steps == 0 {
            return bad("eval_seeds", "need at least one seed and one step".into());
        }
        if self.eval_cfg.is_nan() || self.eval_cfg <= 0.0 {
            return bad("eval_cfg", "must be > 0".into());
        }
        if self.nan_rollback_after == 0 {
            return bad("nan_rollback_after", "must be ≥ 1".into());
        }
        if let Some(x) = self.stop_below {
            if !(0.0..=1.0).contains(&x) {
                return bad("stop_below", "must be in [0, 1]".into());
            }
        }
        Ok(())
    }

    /// ZTSNR follows the objective unless the TOML `table` this config was
    /// read from sets it, as the `--objective` flag does: `objective =
    /// "eps"` alone trains without ZTSNR (the default `ztsnr = true`
    /// belongs to v, and eps cannot learn the terminal step).
    pub fn ztsnr_follows_objective(&mut self, table: &toml::Table) {
        if !table.contains_key("ztsnr") {
            self.ztsnr = self.objective == Prediction::V;
        }
    }

    /// Warnings worth printing before a run (valid but probably unintended).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.ztsnr && self.weighting == Weighting::MinSnr && self.objective == Prediction::V {
            w.push(format!(
                "min-SNR-γ with ZTSNR weighs t = 999 by exactly 0 and every t ≥ 937 by < 1e-3 for v: the steps that learn to predict from pure noise get almost no signal (γ = {}); the conversion usually wants weighting = none",
                self.min_snr_gamma
            ));
        }
        w
    }

    /// The first field that differs from `saved` and may not differ on
    /// resume, as `name: saved → now`. `model` is not compared here: a
    /// resume compares the base by content
    /// ([`super::state::TrainState::resume_mismatch`]).
    pub fn resume_mismatch(&self, saved: &TrainConfig) -> Result<Option<String>> {
        let a = serde_json::to_value(saved)?;
        let b = serde_json::to_value(self)?;
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Ok(None);
        };
        for (k, va) in a {
            // The base is compared by content ([`super::state::TrainState::resume_mismatch`]).
            if k == "model" || RESUMABLE_FIELDS.contains(&k.as_str()) {
                continue;
            }
            let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
            if va != vb {
                return Ok(Some(format!("{k}: {va} in the saved run, {vb} now")));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        TrainConfig {
            model: "m.safetensors".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = cfg();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("objective = \"v\""), "{text}");
        assert!(text.contains("uncond = \"zero\""), "{text}");
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let e = toml::from_str::<TrainConfig>("objectve = \"v\"").unwrap_err();
        assert!(e.to_string().contains("objectve"), "{e}");
        let e = toml::from_str::<TrainConfig>("uncond = \"nothing\"").unwrap_err();
        assert!(e.to_string().contains("text:TEXT"), "{e}");
        let cases: Vec<(TrainConfig, &str)> = vec![
            (
                TrainConfig {
                    min_snr_gamma: 0.0,
                    ..cfg()
                },
                "min_snr_gamma",
            ),
            (
                TrainConfig {
                    blocks: vec!["OUT9".into()],
                    ..cfg()
                },
                "OUT9",
            ),
            (TrainConfig { steps: 0, ..cfg() }, "steps"),
            (
                TrainConfig {
                    steps: 60,
                    stages: vec![StageConfig {
                        blocks: vec!["all".into()],
                        steps: 10,
                        lr: None,
                        block_lr: BTreeMap::new(),
                        until_retention: None,
                    }],
                    ..cfg()
                },
                "train.steps: ignored beside [[train.stages]]",
            ),
            (
                TrainConfig {
                    debiased_snr_min: 2000.0,
                    ..cfg()
                },
                "debiased_snr_min",
            ),
            (
                TrainConfig {
                    max_timestep: 1000,
                    ..cfg()
                },
                "max_timestep",
            ),
            (
                TrainConfig {
                    model: PathBuf::new(),
                    ..cfg()
                },
                "--model",
            ),
            (
                TrainConfig {
                    blocks: vec!["out".into()],
                    block_lr: [("IN00".to_string(), 1e-4)].into(),
                    ..cfg()
                },
                "IN00 is not among the trained blocks",
            ),
            (
                TrainConfig {
                    adam_eps: 0.0,
                    ..cfg()
                },
                "train.adam_eps: 0: must be > 0",
            ),
            (
                TrainConfig {
                    weight_decay: f64::NAN,
                    ..cfg()
                },
                "train.weight_decay",
            ),
            (
                TrainConfig {
                    objective: Prediction::Eps,
                    a1111_yaml: true,
                    ..cfg()
                },
                "train.a1111_yaml: --a1111-yaml is for v exports",
            ),
            (
                TrainConfig {
                    objective: Prediction::Eps,
                    ztsnr: true,
                    ..cfg()
                },
                "train.ztsnr: true with objective eps",
            ),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn uncond_spellings() {
        assert_eq!("zero".parse::<DropoutCond>().unwrap(), DropoutCond::Zero);
        assert_eq!("empty".parse::<DropoutCond>().unwrap(), DropoutCond::Empty);
        let t: DropoutCond = "text:,".parse().unwrap();
        assert_eq!(t, DropoutCond::Text(",".into()));
        assert_eq!(t.to_string(), "text:,");
        assert_eq!(t.uncond_mode(), UncondMode::Negative(",".into()));
    }

    #[test]
    fn an_eps_objective_alone_turns_ztsnr_off() {
        let read = |text: &str| {
            let table: toml::Table = toml::from_str(text).unwrap();
            let mut c: TrainConfig = table.clone().try_into().unwrap();
            c.ztsnr_follows_objective(&table);
            (c.objective, c.ztsnr)
        };
        assert_eq!(read("objective = \"eps\""), (Prediction::Eps, false));
        assert_eq!(
            read("objective = \"eps\"\nztsnr = true"),
            (Prediction::Eps, true)
        );
        assert_eq!(read(""), (Prediction::V, true));
        assert_eq!(read("ztsnr = false"), (Prediction::V, false));
    }

    #[test]
    fn min_snr_with_ztsnr_warns() {
        let c = TrainConfig {
            weighting: Weighting::MinSnr,
            ..cfg()
        };
        assert!(c.warnings()[0].contains("t = 999"));
        assert!(cfg().warnings().is_empty());
    }

    #[test]
    fn resume_mismatch_names_the_field() {
        let a = cfg();
        let b = TrainConfig { lr: 2e-5, ..cfg() };
        let m = b.resume_mismatch(&a).unwrap().unwrap();
        assert!(m.starts_with("lr: 0.00001"), "{m}");
        let c = TrainConfig {
            save_every: 7,
            out: Some("x".into()),
            ..cfg()
        };
        assert_eq!(c.resume_mismatch(&a).unwrap(), None);
    }
}
