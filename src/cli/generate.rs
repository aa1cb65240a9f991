//! `eps2v generate DIR --model CKPT [--template T] --count N …`: flags
//! become a [`GenerateConfig`]; every input (template, wildcards, model,
//! sizes, DIR) is checked before the dataset folder is created, so bad
//! input exits 2 with nothing written.

use std::path::PathBuf;

use clap::Args;

use crate::cli::sample::parse_size;
use crate::diffusion::{Prediction, UncondMode};
use crate::manifest::Manifest;
use crate::prompts::TemplateSpec;
use crate::stages::generate::{self, GenerateConfig, Shard, Sizes};
use crate::stages::Ctx;
use crate::Result;

/// Arguments of `eps2v generate`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v generate data --model noob_eps.safetensors --count 2000 --steps 28 --cfg 5 --batch 4\n  eps2v generate data --model base.safetensors --template my.txt --wildcards my_wildcards --count 500 --size 1024x1024\n  eps2v generate shard-3 --model base.safetensors --count 10000 --shard 3/8   # then: eps2v manifest merge data shard-*\n\n\
First the plan (one row per image with every generation parameter) is written to DIR/manifest.sqlite, then what is not rendered yet is rendered; kill it at any time and rerun the same command to finish.\n\
Without --shard, the shard comes from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (Slurm array jobs) or JOB_COMPLETION_INDEX with --shards N (Kubernetes indexed Jobs).\n\
Without --model the committed toy model is used (fixtures/toy/model.safetensors, or $EPS2V_TOY_DIR/model.safetensors)."
)]
pub struct GenerateArgs {
    /// Dataset folder (created if missing).
    pub dir: PathBuf,
    /// Single-file SDXL checkpoint (.safetensors with UNet, both text encoders and VAE). Default: the committed toy model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Template file, built-in pack name, or template text (dynamicprompts syntax). Default: `toy` for a toy model (the default one, or a toy model that `train` or `merge` made), else `1girl`.
    #[arg(long)]
    pub template: Option<String>,
    /// Folder of wildcard .txt files (default: the template's wildcards/ folder, or the built-in pack's).
    #[arg(long)]
    pub wildcards: Option<PathBuf>,
    /// Images in the whole plan (all shards together).
    #[arg(long)]
    pub count: u64,
    /// Base seed: prompts and sizes are drawn from it, image i gets seed+i
    /// (at most 2⁶³−1 for the last image, as the manifest stores seeds).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
    pub seed: u64,
    /// Use the first --count combinatorial prompts instead of random ones.
    #[arg(long)]
    pub combinatorial: bool,
    /// One size WxH for every image (default: drawn from the SDXL bucket list, or the toy buckets 64x64, 96x64, 64x96 for a toy model).
    #[arg(long, conflicts_with = "size_weights")]
    pub size: Option<String>,
    /// Weights of the SDXL bucket sizes: WxH=W entries, `*=W` for the rest (default 1), e.g. "*=0,1024x1024=2,832x1216=1".
    #[arg(long)]
    pub size_weights: Option<String>,
    /// Sampling steps.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// CFG scale (1 disables guidance).
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub cfg: f64,
    /// CFG rescale φ in [0, 1] (default 0.7 for v-prediction, 0 for eps).
    #[arg(long, allow_negative_numbers = true)]
    pub rescale: Option<f64>,
    /// Sampler: euler, euler_a, dpmpp_2m, ddim.
    #[arg(long, default_value = "euler_a")]
    pub sampler: String,
    /// σ schedule: normal, karras, simple, sgm_uniform, leading, trailing, linspace (default trailing for ZTSNR models, normal otherwise).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Unconditional branch when no --negative: zero (SDXL reference) or empty (encode ""). Default: what the model was trained with (eps2v's `eps2v.uncond` metadata, as `sample` does), else zero.
    #[arg(long)]
    pub uncond: Option<String>,
    /// Negative prompt; when given (non-empty) it is the unconditional branch.
    #[arg(long)]
    pub negative: Option<String>,
    /// Override the prediction type read from the checkpoint: eps or v.
    #[arg(long)]
    pub prediction: Option<String>,
    /// Override the ZTSNR flag read from the checkpoint (true / false;
    /// `--ztsnr` alone: true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ztsnr: Option<bool>,
    /// Images per UNet call (a speed knob: the pixels do not depend on it).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Render only shard K of N of the plan (indices i with i mod N = K-1).
    #[arg(long)]
    pub shard: Option<String>,
    /// Number of shards, with JOB_COMPLETION_INDEX (Kubernetes) or instead of SLURM_ARRAY_TASK_COUNT.
    #[arg(long)]
    pub shards: Option<u32>,
    /// Replace a stored plan whose settings differ (changed rows are rendered again; their old images are rejected as `replanned`).
    #[arg(long)]
    pub replan: bool,
    /// Device and precision (`--device`, `--precision`).
    #[command(flatten)]
    pub device: crate::cli::device::DeviceArgs,
}

impl GenerateArgs {
    /// The typed config (shard defaults read from `env`).
    pub fn to_config(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<GenerateConfig> {
        let model = crate::toy::model_or_default(self.model.clone())?;
        let (sampler, schedule) = crate::diffusion::sampler::sampler_and_schedule(
            &self.sampler,
            self.schedule.as_deref(),
        )?;
        // A toy model (the default, or one that `train` / `merge` made from
        // it) draws toy scenes at the toy buckets unless told otherwise.
        let toy = self.model.is_none() || crate::toy::is_toy_model(&model);
        let sizes = match (&self.size, &self.size_weights) {
            (Some(s), _) => {
                let (width, height) = parse_size(s)?;
                Sizes::Fixed { width, height }
            }
            (None, Some(w)) => Sizes::parse_weights(w)?,
            (None, None) if toy => toy_sizes(),
            (None, None) => Sizes::sdxl(),
        };
        let template = self
            .template
            .clone()
            .unwrap_or_else(|| if toy { "toy" } else { "1girl" }.into());
        // The uncond the model was trained with (an eps2v export records
        // it), as `sample` defaults to: a model converted with "" dropout
        // renders with "" here too.
        // (A file that cannot be opened is reported by the model load.)
        let trained_uncond = crate::models::sdxl::checkpoint::Checkpoint::open(&model)
            .ok()
            .and_then(|c| {
                c.metadata()
                    .get(crate::models::sdxl::checkpoint::META_UNCOND)
                    .cloned()
            });
        Ok(GenerateConfig {
            model,
            prediction: self
                .prediction
                .as_deref()
                .map(str::parse::<Prediction>)
                .transpose()?,
            ztsnr: self.ztsnr,
            template: TemplateSpec::from_arg(&template)?,
            wildcards: self.wildcards.clone(),
            count: self.count,
            seed: self.seed,
            combinatorial: self.combinatorial,
            sizes,
            steps: self.steps,
            cfg: self.cfg,
            rescale: self.rescale,
            sampler,
            schedule,
            uncond: UncondMode::from_flags(
                self.uncond.as_deref().or(trained_uncond.as_deref()),
                self.negative.as_deref(),
            )?,
            batch: self.batch,
            shard: Shard::resolve(self.shard.as_deref(), self.shards, env)?,
            replan: self.replan,
        })
    }
}

/// Run `eps2v generate`; exit 1 when images were rejected, 130 when
/// interrupted (the batches rendered are kept; a rerun renders the rest).
pub fn run(a: GenerateArgs, json: bool) -> Result<i32> {
    let cfg = a.to_config(&|k| std::env::var(k).ok())?;
    cfg.validate()?;
    generate::check_dir(&a.dir)?;
    let placement = a
        .device
        .load_options(crate::pipeline::LoadOptions::default())?;
    let (template, model) = generate::load_inputs(&cfg, &placement)?;
    for w in &model.info.warnings {
        eprintln!("warning: {w}");
    }
    let mut m = Manifest::init(&a.dir)?;
    let ctx = Ctx::new(!json);
    let r = generate::run(&cfg, &template, &model, &mut m, &ctx)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "generate {} (shard {}): {} rendered, {} skipped (already done), {} rejected in {:.1}s ({:.2} images/s)",
            a.dir.display(),
            r.shard,
            r.rendered,
            r.skipped,
            r.rejected_total(),
            r.seconds,
            r.images_per_second
        );
        let p = &r.plan;
        println!(
            "        plan: {} images in this shard ({} new, {} replanned, {} removed, {} earlier rejections reconsidered)",
            p.planned, p.added, p.replanned, p.removed, p.reconsidered
        );
        if p.missing_images > 0 {
            println!(
                "        {} rendered images were missing on disk and are rendered again",
                p.missing_images
            );
        }
        if !r.rejected.is_empty() {
            let parts: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("        rejected: {}", parts.join(", "));
        }
        for w in &r.warnings {
            println!("        warning: {w}");
        }
        if r.interrupted {
            println!(
                "        interrupted: {} images not rendered yet; rerun the same command to render them (everything above is kept)",
                r.remaining
            );
        }
    }
    Ok(if r.interrupted {
        crate::error::INTERRUPTED_EXIT
    } else if r.rejected_total() > 0 {
        1
    } else {
        0
    })
}

/// The toy buckets, equally likely: the sizes the toy model was trained at.
fn toy_sizes() -> Sizes {
    Sizes::Weighted(
        crate::toy::scenes::TOY_BUCKETS
            .iter()
            .map(
                |&(width, height)| crate::stages::generate::plan::SizeWeight {
                    width,
                    height,
                    weight: 1.0,
                },
            )
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: GenerateArgs,
    }

    fn config(args: &[&str]) -> GenerateConfig {
        let mut all = vec!["generate", "--count", "4"];
        all.extend_from_slice(args);
        Cli::parse_from(all).a.to_config(&|_| None).unwrap()
    }

    /// Seeds fit the manifest's signed 64-bit column, the last image's
    /// included (the flag, and the plan in `validate`, which `run` uses).
    #[test]
    fn seeds_past_2_63_are_refused() {
        let too_big = (i64::MAX as u64 + 1).to_string();
        let parsed = Cli::try_parse_from(["generate", "d", "--count", "1", "--seed", &too_big]);
        assert!(parsed.is_err());
        let d = tempfile::tempdir().unwrap();
        let mut c = config(&[d.path().to_str().unwrap()]);
        c.seed = i64::MAX as u64 - 3;
        c.validate().unwrap(); // seeds up to exactly 2^63 - 1
        c.count = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("2^63-1"), "{e}");
        c.seed = u64::MAX;
        assert!(c.validate().is_err());
    }

    /// A model path that is not UTF-8 is stored lossily, not a panic
    /// (`json!` unwraps its serialisation).
    #[cfg(unix)]
    #[test]
    fn a_model_path_that_is_not_utf8_does_not_panic() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let mut c = config(&[d.path().to_str().unwrap()]);
        c.model =
            std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b"/m/mod\xe8le.safetensors"));
        c.wildcards = Some(c.model.clone());
        let v = c.to_json();
        assert_eq!(v["model"], "/m/mod\u{fffd}le.safetensors");
        assert_eq!(v["wildcards"], v["model"]);
    }

    /// Without --uncond, generate uses the uncond the model was trained
    /// with (as `sample` does); --uncond and --negative win over it.
    #[test]
    fn uncond_defaults_to_the_models_training_uncond() {
        use crate::models::sdxl::checkpoint::{save_tensors, SaveOptions, META_UNCOND};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let opts = SaveOptions {
            metadata: [(META_UNCOND.to_string(), "empty".to_string())].into(),
            ..Default::default()
        };
        save_tensors(&p, &[("x".into(), t)], &opts).unwrap();
        let (m, dir) = (p.to_str().unwrap(), d.path().to_str().unwrap());
        assert_eq!(config(&[dir, "--model", m]).uncond, UncondMode::Empty);
        assert_eq!(
            config(&[dir, "--model", m, "--uncond", "zero"]).uncond,
            UncondMode::Zero
        );
        assert_eq!(
            config(&[dir, "--model", m, "--negative", "lowres"]).uncond,
            UncondMode::Negative("lowres".into())
        );
    }
}
