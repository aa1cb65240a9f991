//! The `eps2v run` configuration: one TOML file describing the whole job
//! (DESIGN.md §2 `config.rs`, issue 10). Each stage's own serde config is
//! reused as a nested table (`[caption]` is a [`CaptionConfig`], `[train]`
//! a [`TrainConfig`], …), so a key means the same here as in the stage's
//! own flags; only `generate`, `evaluate`, `merge` and `device`, whose
//! library configs hold parsed values (templates, samplers, shards), get a
//! table of plain strings and numbers here that converts to them.
//!
//! The defaults (`RunConfig::default()`) are the toy world: what
//! `eps2v run` does without a config, and what `fixtures/configs/toy.toml`
//! spells out. `schemas/config.schema.json` is generated from these structs
//! with `schemars` ([`schema_json`], `eps2v run --print-schema`); a test
//! regenerates it and compares.
//!
//! Loading ([`RunConfig::from_toml`]) checks in this order, each error a
//! config error (exit 2) that names the key:
//! 1. unknown keys, walked against the generated schema, with the nearest
//!    valid key suggested (Levenshtein distance, `strsim`; `super::keys`);
//! 2. types and values (serde / toml: the message shows the line);
//! 3. the stage list ([`check_stages`]): known names, no repeats, in
//!    pipeline order (a stage never runs before one it needs);
//! 4. files ([`RunConfig::check_files`]): the model, the tagger.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::diffusion::{Prediction, SamplerKind, UncondMode};
use crate::merge::BlockAlphas;
use crate::models::sdxl::checkpoint::Prediction as CkptPrediction;
use crate::pipeline::model::discrete_prediction;
use crate::pipeline::sample::SampleConfig;
use crate::prompts::TemplateSpec;
use crate::stages::bucket::{BucketConfig, BucketSet};
use crate::stages::caption::policy::{Policy, PolicyConfig};
use crate::stages::caption::CaptionConfig;
use crate::stages::dedupe::DedupeConfig;
use crate::stages::filter::FilterConfig;
use crate::stages::generate::{GenerateConfig, Shard, SizeWeight, Sizes};
use crate::train::config::TrainConfig;
use crate::{Error, Result};

use super::keys::{check_keys, suggestion};

/// Every stage of a run, in the only order they can run in.
pub const STAGES: &[&str] = &[
    "generate", "caption", "filter", "dedupe", "bucket", "train", "merge", "evaluate", "report",
];

/// What each stage needs from an earlier one (for the order error).
fn needs(stage: &str) -> &'static str {
    match stage {
        "caption" => "generated images to tag",
        "filter" => "the caption stage's alignment scores",
        "dedupe" => "the images that survive filtering",
        "bucket" => "the deduplicated images",
        "train" => "bucketed, captioned images",
        "merge" => "the converted model that train exports",
        "evaluate" => "the models of train and merge",
        "report" => "every result it shows",
        _ => "nothing",
    }
}

/// The whole job. Every table is optional; a missing key takes the default
/// written in its doc (the toy world).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Dataset folder (relative paths are relative to the current
    /// directory); `--dataset DIR` overrides it. Default `eps2v-toy-run`.
    pub dataset: PathBuf,
    /// Base eps-prediction single-file SDXL checkpoint. Default: the
    /// committed toy model (`fixtures/toy/model.safetensors`).
    pub model: Option<PathBuf>,
    /// Stages to run, in pipeline order (a subset of `generate`, `caption`,
    /// `filter`, `dedupe`, `bucket`, `train`, `merge`, `evaluate`,
    /// `report`). Default: all of them.
    pub stages: Vec<String>,
    /// Where models run (generation, evaluation).
    pub device: DeviceSection,
    /// `generate`: the synthetic dataset drawn from the base model.
    pub generate: GenerateSection,
    /// `caption`: tagger and caption policy (the `eps2v caption` config).
    /// Default tagger: the committed toy tagger (`fixtures/toy/tagger/`).
    /// Default policy here: `prompt` (the `caption` command's is
    /// `merged`): on the toy world the generation prompt as caption, with
    /// the tagger's alignment for `filter`, converted to 50.9 % adherence
    /// against 38.0 % with `merged` captions (no EMA; README, Toy world).
    pub caption: CaptionConfig,
    /// `filter`: drop images that show too little of their prompt.
    /// Default `min_alignment = 0.5`.
    pub filter: FilterConfig,
    /// `dedupe`: exact and near duplicates (the `eps2v dedupe` config).
    pub dedupe: DedupeConfig,
    /// `bucket`: aspect-ratio buckets (the `eps2v bucket` config). Default:
    /// the toy buckets 64×64, 96×64, 64×96 (`kind = "kohya"`, resolution 80,
    /// step 32, sides 64–96).
    pub bucket: BucketConfig,
    /// `train`: the conversion recipe (the `eps2v train` config: objective,
    /// ZTSNR, stages with blocks and learning rates, caption dropout…).
    /// `model` may stay empty: it is the run's `model`. Default: the toy
    /// recipe (v + ZTSNR, all blocks, 1,200 steps at 1e-4, batch 8, EMA
    /// 0.999).
    pub train: TrainConfig,
    /// `merge`: a sweep of merges of the converted model with the base.
    pub merge: MergeSection,
    /// `evaluate`: adherence of the base (as eps, and as v + ZTSNR), the
    /// converted model and each merge, and the evaluation grids. Default
    /// here: 32 prompts (a table given without `prompt_count` has 8, the
    /// real recipe's cost at 1024²): the toy run's 16 images per model
    /// moved its scores by 10 points.
    pub evaluate: EvalSection,
}

/// Device settings: where generate, the tagger of caption, train, the
/// merge sweep and evaluate run (the tagger always in f32, as its
/// thresholds assume; train's UNet computes in f32, `precision` is that of
/// its frozen text encoders and VAE).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    /// `cpu`, `cuda` or `cuda:N`. Default: CUDA 0 in a CUDA build with a
    /// GPU, else the CPU.
    pub device: Option<String>,
    /// Model precision `f32`, `bf16` or `f16`. Default: f32 on the CPU,
    /// bf16 on CUDA.
    pub precision: Option<String>,
}

/// The `[generate]` table (the flags of `eps2v generate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSection {
    /// Template: a built-in pack (`toy`, `1girl`), a template file, or the
    /// template text. Default `toy`.
    pub template: String,
    /// Wildcard folder. Default: the pack's own / the file's sibling `wildcards/`.
    pub wildcards: Option<PathBuf>,
    /// Images in the plan. Default 768.
    pub count: u64,
    /// Base seed of prompts, sizes and noise. Default 0.
    pub seed: u64,
    /// The first `count` combinations instead of random prompts. Default false.
    pub combinatorial: bool,
    /// Image sizes, `"WxH"` or `"WxH=weight"`; empty: the 41 SDXL sizes.
    /// Default `["64x64", "96x64", "64x96"]` (the toy buckets).
    pub sizes: Vec<String>,
    /// Sampling steps. Default 20.
    pub steps: usize,
    /// CFG scale. Default 5.
    pub cfg: f64,
    /// CFG rescale φ. Default: 0.7 for v models, 0 for eps.
    pub rescale: Option<f64>,
    /// Sampler (`euler`, `euler_a`, `dpmpp_2m`, …). Default `euler`.
    pub sampler: String,
    /// σ schedule (`normal`, `karras`, `trailing`, …). Default: trailing for
    /// ZTSNR models, normal otherwise.
    pub schedule: Option<String>,
    /// Unconditional branch: `zero`, `empty` or `negative`. Default `zero`.
    pub uncond: String,
    /// Negative prompt (with `uncond = "negative"`). Default none.
    pub negative: Option<String>,
    /// Images per UNet call (speed only). Default 8.
    pub batch: usize,
}

impl Default for GenerateSection {
    fn default() -> Self {
        Self {
            template: "toy".into(),
            wildcards: None,
            count: 768,
            seed: 0,
            combinatorial: false,
            sizes: vec!["64x64".into(), "96x64".into(), "64x96".into()],
            steps: 20,
            cfg: 5.0,
            rescale: None,
            sampler: "euler".into(),
            schedule: None,
            uncond: "zero".into(),
            negative: None,
            batch: 8,
        }
    }
}

/// The `[merge]` table: weighted sums `(1 − α)·converted + α·base`, one
/// per α, markers (v, ZTSNR) from the converted model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MergeSection {
    /// Share of the base model in each merge. Default `[0.25, 0.5]`.
    pub alphas: Vec<f64>,
    /// Per-block α overriding `alphas` for those blocks (`eps2v merge
    /// --blocks` syntax, e.g. `"IN00-IN08=0.5,M00=0.5"`). Default none.
    pub blocks: Option<String>,
}

impl Default for MergeSection {
    fn default() -> Self {
        Self {
            alphas: vec![0.25, 0.5],
            blocks: None,
        }
    }
}

/// The `[evaluate]` table: the fixed prompt × seed set every model is
/// sampled with (and the merge sweep scores retention on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Prompts drawn from the generate template (seeded, never the training
    /// prompts' seed). Default 8.
    pub prompt_count: usize,
    /// Seed of the prompt draw. Default 1000003.
    pub prompt_seed: u64,
    /// Noise seeds per prompt. Default `[0, 1]`.
    pub seeds: Vec<u64>,
    /// Sampling steps. Default 20.
    pub steps: usize,
    /// CFG scale. Default 5.
    pub cfg: f64,
    /// Image size `[width, height]`. Default `[64, 64]`.
    pub size: [u32; 2],
    /// Tagger probability at which a tag counts as seen. Default 0.35.
    pub threshold: f32,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            prompt_count: 8,
            prompt_seed: 1_000_003,
            seeds: vec![0, 1],
            steps: 20,
            cfg: 5.0,
            size: [64, 64],
            threshold: 0.35,
        }
    }
}

/// The toy bucket set (64×64, 96×64, 64×96) in kohya form.
pub fn toy_bucket_set() -> BucketSet {
    BucketSet::Kohya {
        resolution: 80,
        step: 32,
        min_side: 64,
        max_side: 96,
    }
}

/// The toy training recipe (the default `[train]`).
pub fn toy_train() -> TrainConfig {
    TrainConfig {
        steps: 1200,
        lr: 1e-4,
        // EMA of the weights, exported: the converted toy model read 56.1 %
        // with it against 50.9 % without on the stop-22 toy world (less
        // grain in the last steps; README, Toy world).
        ema_decay: Some(0.999),
        batch_size: 8,
        warmup_steps: 20,
        eval_every: 100,
        eval_prompt_count: 4,
        eval_steps: 12,
        save_every: 50,
        val_fraction: 0.05,
        val_max: 16,
        save_dtype: crate::train::config::SaveDtype::F32,
        ..Default::default()
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            dataset: PathBuf::from("eps2v-toy-run"),
            model: None,
            stages: STAGES.iter().map(|s| s.to_string()).collect(),
            device: DeviceSection::default(),
            generate: GenerateSection::default(),
            caption: CaptionConfig {
                caption: PolicyConfig {
                    policy: Policy::Prompt,
                    ..Default::default()
                },
                ..Default::default()
            },
            filter: FilterConfig::default(),
            dedupe: DedupeConfig::default(),
            bucket: BucketConfig {
                buckets: toy_bucket_set(),
                ..Default::default()
            },
            train: toy_train(),
            merge: MergeSection::default(),
            evaluate: EvalSection {
                prompt_count: 32,
                ..Default::default()
            },
        }
    }
}

/// The JSON Schema of [`RunConfig`] (what `schemas/config.schema.json` holds).
pub fn schema() -> Value {
    schemars::schema_for!(RunConfig).to_value()
}

/// [`schema`] pretty-printed with a trailing newline (the committed file).
pub fn schema_json() -> String {
    let mut s = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    s.push('\n');
    s
}

impl RunConfig {
    /// Parse and check a config's text (`origin` names it in errors):
    /// unknown keys, types, the stage list (module docs). Files are checked
    /// by [`RunConfig::check_files`] once the defaults are resolved.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let value: toml::Table = toml::from_str(text)
            .map_err(|e| Error::config(format!("{origin}: not valid TOML: {e}")))?;
        let schema = schema();
        let value = toml::Value::Table(value);
        check_keys(&value, &schema, &schema, "")
            .map_err(|e| Error::config(format!("{origin}: {e}")))?;
        let mut cfg: RunConfig =
            toml::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")))?;
        if let Some(toml::Value::Table(t)) = value.get("train") {
            cfg.train.ztsnr_follows_objective(t);
        }
        check_stages(&cfg.stages).map_err(|e| Error::config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "{}: cannot read the config ({e}); give an existing TOML file, or no file for the toy default",
                path.display()
            ))
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Whether `stage` is listed.
    pub fn has(&self, stage: &str) -> bool {
        self.stages.iter().any(|s| s == stage)
    }

    /// The base model (the toy model when `model` is not set).
    pub fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(super::defaults::default_model_path)
    }

    /// Fill what defaults to another key: `train.model` ← `model`, the
    /// toy tagger when the caption policy needs one or a listed stage reads
    /// what only a tagger gives (`filter`: alignment scores, `evaluate`:
    /// adherence), the training seed.
    pub fn resolve(&mut self) {
        let model = self.model_path();
        self.model = Some(model.clone());
        if self.train.model.as_os_str().is_empty() {
            self.train.model = model;
        }
        let needs_tagger = self.caption.caption.policy.needs_tagger()
            || self.has("filter")
            || self.has("evaluate");
        if self.caption.tagger.is_none() && needs_tagger {
            self.caption.tagger = Some(super::defaults::default_tagger_dir());
        }
    }

    /// Check that the files the listed stages read exist and that every
    /// section's values are valid (after [`RunConfig::resolve`]).
    pub fn check_files(&self) -> Result<()> {
        // `[device]` places generate, caption, train, the merge sweep and
        // evaluate: a bad spec fails now, not after the stages before them
        // (and not at all when none of them is listed).
        if ["generate", "caption", "train", "merge", "evaluate"]
            .iter()
            .any(|s| self.has(s))
        {
            super::placement(self)?;
        }
        let model = self.model_path();
        if !model.is_file() && model.symlink_metadata().is_ok() {
            // There, but no file: a folder (diffusers?), a pipe, a broken
            // link. The checkpoint reader says which.
            crate::models::sdxl::checkpoint::Checkpoint::open(&model)
                .map_err(|e| Error::config(format!("model: {e}")))?;
        }
        if !model.is_file() {
            let toy = self.model.is_none()
                || Some(model.clone()) == Some(super::defaults::default_model_path());
            return Err(Error::config(format!(
                "model: {}: no such file; {}",
                model.display(),
                if toy {
                    format!(
                        "give `model = \"FILE\"` in the config for your own model; for the toy world, {}",
                        crate::toy::where_to_find_it()
                    )
                } else {
                    format!(
                        "give the path of a single-file SDXL .safetensors checkpoint{}",
                        crate::error::relative_to_cwd(&model)
                    )
                }
            )));
        }
        if let Some(t) = &self.caption.tagger {
            // The toy tagger knows only the toy world's shapes: on a real
            // model's images it would confirm none of the prompt tags.
            if *t == super::defaults::default_tagger_dir() && !crate::toy::is_toy_model(&model) {
                return Err(Error::config(format!(
                    "caption.tagger: not given, and the default is the toy world's tagger (it knows only the toy shapes) while model {} is not a toy model; give `tagger = \"DIR\"` under [caption], a WD v3 tagger folder (model.safetensors, selected_tags.csv, config.json, e.g. SmilingWolf/wd-vit-tagger-v3), or use caption.caption.policy = \"prompt\" without the filter and evaluate stages",
                    model.display()
                )));
            }
        }
        if self.has("caption") {
            if let Some(t) = &self.caption.tagger {
                if !t.exists() {
                    return Err(Error::config(format!(
                        "caption.tagger: {}: no such folder; give a WD tagger folder (model.safetensors, selected_tags.csv), or caption.caption.policy = \"prompt\"",
                        t.display()
                    )));
                }
            }
            self.caption.check().map_err(|e| {
                as_keys(
                    e,
                    "caption",
                    &[
                        ("--general-threshold", "caption.thresholds.general"),
                        ("--character-threshold", "caption.thresholds.character"),
                        ("--extra-threshold", "caption.caption.extra_threshold"),
                        ("--batch", "caption.batch"),
                    ],
                )
            })?;
        }
        if self.has("generate") {
            self.generate_config()?.validate().map_err(|e| {
                as_keys(
                    e,
                    "generate",
                    &[
                        ("--count", "generate.count"),
                        ("--batch", "generate.batch"),
                        ("--steps", "generate.steps"),
                        ("--cfg", "generate.cfg"),
                        ("--rescale", "generate.rescale"),
                        ("seed", "generate.seed"),
                    ],
                )
            })?;
        }
        if self.has("train") {
            self.train.validate()?;
            // Block ids the UNet does not have (OUT09 on SDXL), from its
            // header, before the stages before train run for hours.
            if self.train.model.is_file() {
                let ck = crate::models::sdxl::checkpoint::Checkpoint::open(&self.train.model)?;
                // The run generates its data from `model` in the model's
                // own prediction: training that same prediction on it
                // converts nothing (a v model given for an eps one).
                if self.has("generate") && crate::atomic::same_file(&self.train.model, &model) {
                    let p = ck.prediction();
                    if discrete_prediction(p.prediction) == Some(self.train.objective) {
                        let (now, other) = match self.train.objective {
                            Prediction::V => ("v", "eps"),
                            Prediction::Eps => ("eps", "v"),
                        };
                        return Err(Error::config(format!(
                            "train.objective = \"{now}\": model {} already predicts {} ({}); a run converts its model to the other prediction: give the {other} model to convert, or set objective = \"{other}\" under [train] for {now} → {other}",
                            model.display(),
                            p.prediction.name(),
                            p.source
                        )));
                    }
                }
                if let Ok(u) = ck.infer_unet_config() {
                    let keys = crate::models::sdxl::checkpoint::unet_expected_keys(&u.config)?;
                    let staged = !self.train.stages.is_empty();
                    for (i, st) in self.train.effective_stages().iter().enumerate() {
                        let key = if staged {
                            format!("train.stages[{i}].blocks")
                        } else {
                            "train.blocks".to_string()
                        };
                        crate::train::blocks::BlockSet::parse(&st.blocks)
                            .and_then(|b| b.check_exists(keys.iter().map(|(k, _)| k.as_str())))
                            .map_err(|e| match e {
                                Error::Config(msg) => Error::config(format!(
                                    "{key}: {msg}, in {}",
                                    self.train.model.display()
                                )),
                                other => other,
                            })?;
                    }
                }
            }
        }
        if self.has("merge") {
            self.merge_blocks()?;
            if self.merge.alphas.is_empty() || self.merge.alphas.iter().any(|a| !a.is_finite()) {
                return Err(Error::config(
                    "merge.alphas: give at least one finite α (share of the base model), e.g. [0.25, 0.5]",
                ));
            }
            // (1 - α)·converted + α·base: outside [0, 1] it extrapolates
            // past one of the two (α = 25 meant as 25 % is −24·converted +
            // 25·base). `eps2v merge` still takes any α for hand merges.
            if let Some(a) = self.merge.alphas.iter().find(|a| !(0.0..=1.0).contains(*a)) {
                return Err(Error::config(format!(
                    "merge.alphas: {a} is outside [0, 1]; α is the base model's share of the merge, (1 - α)·converted + α·base, so 0.25 means 25 % base (`eps2v merge` takes other values by hand)"
                )));
            }
        }
        if self.has("filter") && !(0.0..=1.0).contains(&self.filter.min_alignment) {
            return Err(Error::config(format!(
                "filter.min_alignment = {}: must be between 0 and 1",
                self.filter.min_alignment
            )));
        }
        let e = &self.evaluate;
        if e.prompt_count == 0 || e.seeds.is_empty() || e.steps == 0 {
            return Err(Error::config(
                "evaluate: prompt_count, seeds and steps must each be at least 1",
            ));
        }
        self.eval_sample_config().validate().map_err(|err| {
            as_keys(
                err,
                "evaluate",
                &[("--steps", "evaluate.steps"), ("--cfg", "evaluate.cfg")],
            )
        })?;
        // The size the merge sweep and the evaluation sample at, against
        // the model's shapes (its header), before any stage runs.
        if self.has("merge") || self.has("evaluate") {
            let [w, h] = e.size;
            crate::pipeline::model::check_size_of(&model, w, h).map_err(|err| match err {
                Error::Config(msg) => Error::config(format!("evaluate.size: {msg}")),
                other => other,
            })?;
        }
        Ok(())
    }

    /// The per-block α of the merge.
    pub fn merge_blocks(&self) -> Result<BlockAlphas> {
        match &self.merge.blocks {
            None => Ok(BlockAlphas::default()),
            Some(s) => {
                BlockAlphas::parse(s).map_err(|e| Error::config(format!("merge.blocks: {e}")))
            }
        }
    }

    /// Sampling settings of the evaluation (prompt and seed per image).
    pub fn eval_sample_config(&self) -> SampleConfig {
        let e = &self.evaluate;
        SampleConfig {
            prompt: String::new(),
            uncond: UncondMode::Zero,
            seed: 0,
            steps: e.steps,
            cfg: e.cfg,
            rescale: None,
            sampler: SamplerKind::Euler,
            schedule: None,
            width: e.size[0],
            height: e.size[1],
            batch: 1,
        }
    }

    /// How the base samples as its file says: eps on the plain schedule,
    /// or v with its `ztsnr` marker (an unreadable or EDM file: eps; the
    /// stages that load it say what is wrong).
    pub fn base_sampling(&self) -> (Prediction, bool) {
        match self.base_file_prediction() {
            Some(p) if p.prediction == CkptPrediction::V => (Prediction::V, p.ztsnr),
            _ => (Prediction::Eps, false),
        }
    }

    /// What the base file's markers or metadata say (`None`: unreadable).
    fn base_file_prediction(&self) -> Option<crate::models::sdxl::checkpoint::PredictionInfo> {
        crate::models::sdxl::checkpoint::Checkpoint::open(self.model_path())
            .ok()
            .map(|ck| ck.prediction())
    }

    /// How generate samples the base: eps on the plain schedule for an eps
    /// file (as it always did, so the plans of existing runs stay valid),
    /// else `None`: the loader reads the file's markers (v, ZTSNR) and
    /// refuses EDM. An unreadable file counts as eps: its error comes from
    /// the model check or the stage.
    fn base_prediction(&self) -> (Option<Prediction>, Option<bool>) {
        match self.base_file_prediction() {
            Some(p) if p.prediction != CkptPrediction::Epsilon => (None, None),
            _ => (Some(Prediction::Eps), Some(false)),
        }
    }

    /// The library config of the generate stage.
    pub fn generate_config(&self) -> Result<GenerateConfig> {
        let g = &self.generate;
        let key = |k: &str, e: Error| Error::config(format!("generate.{k}: {e}"));
        let sizes = parse_sizes(&g.sizes).map_err(|e| key("sizes", e))?;
        // The model renders in its own prediction (its markers): a v model
        // rendered as eps makes a dataset of broken images.
        let (prediction, ztsnr) = self.base_prediction();
        // A1111's "DPM++ 2M Karras" names its schedule too.
        let (sampler, schedule) =
            crate::diffusion::sampler::sampler_and_schedule(&g.sampler, g.schedule.as_deref())
                .map_err(|e| key("sampler", e))?;
        Ok(GenerateConfig {
            model: self.model_path(),
            prediction,
            ztsnr,
            template: TemplateSpec::from_arg(&g.template).map_err(|e| key("template", e))?,
            wildcards: g.wildcards.clone(),
            count: g.count,
            seed: g.seed,
            combinatorial: g.combinatorial,
            sizes,
            steps: g.steps,
            cfg: g.cfg,
            rescale: g.rescale,
            sampler,
            schedule,
            uncond: UncondMode::from_flags(Some(&g.uncond), g.negative.as_deref())
                .map_err(|e| key("uncond", e))?,
            batch: g.batch,
            shard: Shard::ALL,
            replan: false,
        })
    }
}

/// A stage's config error in the config's words: the command-line flags
/// its checks name (`--count must be at least 1`) become the TOML keys
/// (`generate.count must be at least 1`). `flags` pairs a flag (or a word
/// at the start of the message) with its dotted key; a message naming none
/// of them is prefixed with `section: `.
fn as_keys(e: Error, section: &str, flags: &[(&str, &str)]) -> Error {
    let Error::Config(msg) = e else {
        return e;
    };
    let word_end = |rest: &str| !rest.starts_with(|c: char| c.is_alphanumeric() || c == '-');
    let mut out = msg.clone();
    let mut named = false;
    for &(flag, key) in flags {
        let mut s = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(flag) {
            let before = rest[..i].chars().next_back();
            let starts = if flag.starts_with("--") {
                !matches!(before, Some(c) if c.is_alphanumeric() || c == '-')
            } else {
                s.is_empty() && i == 0
            };
            let after = &rest[i + flag.len()..];
            s.push_str(&rest[..i]);
            if starts && word_end(after) {
                s.push_str(key);
                named = true;
            } else {
                s.push_str(flag);
            }
            rest = after;
        }
        s.push_str(rest);
        out = s;
    }
    if named {
        Error::config(out)
    } else {
        Error::config(format!("{section}: {out}"))
    }
}

/// `["WxH", "WxH=weight", …]` → [`Sizes`] (empty: the SDXL list).
pub fn parse_sizes(list: &[String]) -> Result<Sizes> {
    if list.is_empty() {
        return Ok(Sizes::sdxl());
    }
    let mut out = Vec::new();
    for s in list {
        let (size, weight) = match s.split_once('=') {
            Some((a, b)) => (
                a,
                b.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| {
                        Error::config(format!("{s:?}: the weight after `=` must be a number ≥ 0"))
                    })?,
            ),
            None => (s.as_str(), 1.0),
        };
        let (w, h) = crate::cli::sample::parse_size(size.trim())?;
        out.push(SizeWeight {
            width: w,
            height: h,
            weight,
        });
    }
    let sizes = Sizes::Weighted(out);
    if sizes.candidates().is_empty() {
        return Err(Error::config("every size has weight 0"));
    }
    Ok(sizes)
}

/// Check the stage list: known names (nearest suggested), no repeats, in
/// pipeline order.
pub fn check_stages(stages: &[String]) -> Result<()> {
    if stages.is_empty() {
        return Err(Error::config(format!(
            "stages: the list is empty; name the stages to run, in order: {}",
            STAGES.join(", ")
        )));
    }
    let mut last: Option<(usize, &str)> = None;
    let mut seen = BTreeSet::new();
    for s in stages {
        let Some(i) = STAGES.iter().position(|x| x == s) else {
            return Err(Error::config(format!(
                "stages: unknown stage `{s}`{}; the stages are {}",
                suggestion(s, STAGES.iter().copied()),
                STAGES.join(", ")
            )));
        };
        if !seen.insert(s.as_str()) {
            return Err(Error::config(format!(
                "stages: `{s}` is listed twice; list each stage once"
            )));
        }
        if let Some((j, prev)) = last {
            if i < j {
                return Err(Error::config(format!(
                    "stages: `{prev}` comes before `{s}`, but {prev} needs {}; list the stages in the order {}",
                    needs(prev),
                    STAGES.join(", ")
                )));
            }
        }
        last = Some((i, s));
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
