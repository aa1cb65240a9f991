//! `eps2v sample` (text-to-image with a single-file SDXL checkpoint, PNGs
//! with A1111 infotext) and `eps2v diagnose uncond` (does the model treat
//! `""` like zeroed conditioning?). Flags are parsed here into
//! [`crate::pipeline`] configs; every error is exit code 2.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::device::DeviceArgs;
use crate::diffusion::{Prediction, UncondMode};
use crate::pipeline::diagnose::{self, DiagnoseConfig};
use crate::pipeline::sample::{self, SampleConfig};
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::{Error, Result};

/// Arguments of `eps2v sample`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  eps2v sample --model noob_vpred.safetensors --prompt \"1girl, solo, red circle\" --seed 7 --steps 28 --cfg 5 --size 832x1216 --batch 4\n\n\
Without --model the committed toy model is used (fixtures/toy/model.safetensors, or $EPS2V_TOY_DIR/model.safetensors).\n\
Image k of a batch uses seed SEED+k (A1111 convention); the batch goes through the UNet together, and on the CPU a seed gives identical bytes at any batch size and position (on CUDA the last bits may differ).\n\
Files are written as OUT/NNNNN-SEED.png with an A1111 'parameters' text chunk."
)]
pub struct SampleArgs {
    /// Single-file SDXL checkpoint (.safetensors with UNet, both text encoders and VAE). Default: the committed toy model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt (A1111 syntax: (emphasis:1.2), [de-emphasis], BREAK).
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt; when given (non-empty) it is the unconditional branch.
    #[arg(long)]
    pub negative: Option<String>,
    /// Seed of the first image (image k uses seed+k); random when omitted
    /// or -1 (as in A1111). At most 2^63 − 1: the seed written into the
    /// image must read back (A1111 infotext, the manifest's integers).
    #[arg(long, value_parser = parse_seed, allow_negative_numbers = true)]
    pub seed: Option<Seed>,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// CFG scale (1 disables guidance).
    #[arg(long, default_value_t = 7.0, allow_negative_numbers = true)]
    pub cfg: f64,
    /// CFG rescale φ in [0, 1] (default 0.7 for v-prediction, 0 for eps).
    #[arg(long, allow_negative_numbers = true)]
    pub rescale: Option<f64>,
    /// Sampler: euler, euler_a, dpmpp_2m, ddim.
    #[arg(long, default_value = "euler")]
    pub sampler: String,
    /// σ schedule: normal, karras, simple, sgm_uniform, leading, trailing, linspace (default trailing for ZTSNR models, normal otherwise).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Image size WxH in pixels (multiples of 32 for SDXL). Default: the model's own: its `modelspec.resolution` metadata, else 64x64 for the toy model and 1024x1024 for SDXL.
    #[arg(long)]
    pub size: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Unconditional branch when no --negative: zero (zeroed text conditioning, SDXL reference), empty (encode "") or text:TEXT. Default: what the model was trained with (eps2v.uncond metadata of an eps2v export), else zero.
    #[arg(long)]
    pub uncond: Option<String>,
    /// Override the prediction type read from the checkpoint: eps or v.
    #[arg(long)]
    pub prediction: Option<String>,
    /// Override the ZTSNR flag read from the checkpoint (true / false;
    /// `--ztsnr` alone: true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ztsnr: Option<bool>,
    /// Output folder (created if needed).
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// --device / --precision.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Arguments of `eps2v diagnose`.
#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// What to diagnose.
    #[command(subcommand)]
    pub command: DiagnoseCommand,
}

/// `diagnose` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiagnoseCommand {
    /// Compare the model's predictions for the empty prompt "" and for zeroed conditioning (relative L2 / cosine) and print a verdict: same below rel 0.05 with cosine above 0.99, strongly different above rel 0.25 or below cosine 0.9, else moderate.
    Uncond(UncondArgs),
}

/// Arguments of `eps2v diagnose uncond`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  eps2v diagnose uncond --model finetune.safetensors")]
pub struct UncondArgs {
    /// Single-file SDXL checkpoint. Default: the committed toy model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Timesteps to probe (comma-separated, 0..=999).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "999,750,500,250,50",
        allow_negative_numbers = true
    )]
    pub timesteps: Vec<f64>,
    /// Number of seeds (0..N) per timestep.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// Probe size WxH in pixels (each probe is one UNet call on two rows; 512x512 is 4x faster on a CPU than 1024x1024). Default: the model's own, as for `sample`.
    #[arg(long)]
    pub size: Option<String>,
    /// Override the prediction type read from the checkpoint: eps or v.
    #[arg(long)]
    pub prediction: Option<String>,
    /// --device / --precision.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Parse `WxH` (e.g. `832x1216`).
pub fn parse_size(s: &str) -> Result<(u32, u32)> {
    crate::pipeline::size::parse_wxh(s).ok_or_else(|| {
        Error::config(format!(
            "--size {s:?}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024 or 832x1216"
        ))
    })
}

fn load(
    model: &PathBuf,
    prediction: Option<&str>,
    ztsnr: Option<bool>,
    hash: bool,
    device: &DeviceArgs,
) -> Result<(SdxlModel, f64)> {
    let prediction = prediction.map(str::parse::<Prediction>).transpose()?;
    let opts = device.load_options(LoadOptions {
        prediction,
        ztsnr,
        hash,
        ..Default::default()
    })?;
    let t0 = Instant::now();
    let m = SdxlModel::load(model, &opts)?;
    for w in &m.info.warnings {
        eprintln!("warning: {w}");
    }
    Ok((m, t0.elapsed().as_secs_f64()))
}

/// Run `eps2v sample`.
pub fn run_sample(a: SampleArgs, json: bool) -> Result<i32> {
    // Without --size the model's own size replaces this once it is loaded;
    // everything else is checked before the (slow) load.
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let (width, height) = size.unwrap_or((1024, 1024));
    let (sampler, schedule) =
        crate::diffusion::sampler::sampler_and_schedule(&a.sampler, a.schedule.as_deref())?;
    let mut cfg = SampleConfig {
        prompt: a.prompt.clone(),
        uncond: UncondMode::from_flags(a.uncond.as_deref(), a.negative.as_deref())?,
        seed: match a.seed {
            Some(Seed::Fixed(s)) => s,
            None | Some(Seed::Random) => u64::from(rand::random::<u32>()),
        },
        steps: a.steps,
        cfg: a.cfg,
        rescale: a.rescale,
        sampler,
        schedule,
        width,
        height,
        batch: a.batch,
    };
    cfg.validate()?;
    check_out_dir(&a.out)?;
    let model_path = crate::toy::model_or_default(a.model.clone())?;
    let (model, load_s) = load(
        &model_path,
        a.prediction.as_deref(),
        a.ztsnr,
        true,
        &a.device,
    )?;
    if size.is_none() {
        (cfg.width, cfg.height) = model.info.native_size;
    }
    if a.uncond.is_none() && a.negative.as_deref().is_none_or(str::is_empty) {
        if let Some(trained) = &model.info.trained_uncond {
            cfg.uncond = trained.parse()?;
        }
    }
    model.latent_shape(cfg.width, cfg.height)?;
    // Off a terminal (nohup, Slurm, `2> log`): a line every 30 s, as the
    // stages' bars do.
    let terminal = crate::stages::log_lines::stderr_is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some((cfg.steps * cfg.batch) as u64),
        match (json, terminal) {
            (true, _) => ProgressDrawTarget::hidden(),
            (false, true) => ProgressDrawTarget::stderr(),
            (false, false) => crate::stages::log_lines::target(),
        },
    );
    if let Ok(style) = ProgressStyle::with_template(if terminal {
        "{bar:40} {pos}/{len} steps {elapsed} eta {eta}"
    } else {
        crate::stages::log_lines::TEMPLATE
    }) {
        bar.set_style(style);
    }
    bar.set_message("sample steps");
    let report = sample::run(&model, &cfg, &a.out, load_s, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report.resolved;
        println!(
            "{} image(s) in {:.1}s (load {:.1}s): prediction {}, ZTSNR {}, schedule {}, rescale {}",
            report.files.len(),
            report.seconds,
            report.load_seconds,
            model.info.prediction,
            model.info.ztsnr,
            r.schedule,
            r.rescale
        );
        for (f, s) in report.files.iter().zip(&report.seeds) {
            println!("{}  seed {s}", f.display());
        }
    }
    // A broken render fails only itself: the report (with the written
    // files) is out, the error names it, and the exit code says some
    // images failed.
    if let Some(msg) = report.broken_message() {
        eprintln!("error: {msg}");
        if cfg.cfg > 30.0 {
            eprintln!(
                "note: --cfg {} is far past the usual 3–12; a guidance scale this large can overflow by itself",
                cfg.cfg
            );
        }
        return Ok(1);
    }
    Ok(0)
}

/// `sample --out`: a folder that can be written, checked before the model
/// loads and the images render (they are written at the end).
fn check_out_dir(out: &std::path::Path) -> Result<()> {
    use std::path::Path;
    // Nothing is made here (a bad --model must not leave an empty
    // folder): the folder, or the nearest one above it that is there, is
    // tried with a temporary file.
    let there = out
        .ancestors()
        .find(|a| a.as_os_str().is_empty() || a.exists())
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .unwrap_or(Path::new("."));
    if !there.is_dir() {
        return Err(Error::config(format!(
            "--out {}: {} is a file; give a folder (the images are numbered inside it, as A1111 does)",
            out.display(),
            there.display()
        )));
    }
    tempfile::NamedTempFile::new_in(there)
        .map(drop)
        .map_err(|e| {
            Error::config(format!(
                "--out {}: cannot write in {} ({e})",
                out.display(),
                there.display()
            ))
        })
}

/// Run `eps2v diagnose …`.
pub fn run_diagnose(a: DiagnoseArgs, json: bool) -> Result<i32> {
    match a.command {
        DiagnoseCommand::Uncond(u) => {
            let size = u.size.as_deref().map(parse_size).transpose()?;
            if u.seeds == 0 {
                return Err(Error::config("--seeds must be at least 1"));
            }
            let model_path = crate::toy::model_or_default(u.model.clone())?;
            let (model, _) = load(&model_path, u.prediction.as_deref(), None, false, &u.device)?;
            let (width, height) = size.unwrap_or(model.info.native_size);
            let report = diagnose::uncond(
                &model,
                &DiagnoseConfig {
                    timesteps: u.timesteps.clone(),
                    seeds: (0..u.seeds).collect(),
                    width,
                    height,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("timestep  seed  rel_l2    cosine");
                for p in &report.probes {
                    println!(
                        "{:>8}  {:>4}  {:<8.4}  {:.4}",
                        p.timestep, p.seed, p.rel_l2, p.cosine
                    );
                }
                println!(
                    "mean rel_l2 {:.4} (max {:.4}), mean cosine {:.4}",
                    report.mean_rel_l2, report.max_rel_l2, report.mean_cosine
                );
                println!("verdict: {} ({})", report.verdict.name(), report.message);
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--out` is checked without being made; a file on the way is named.
    #[test]
    fn the_out_folder_is_checked_not_made() {
        let d = tempfile::tempdir().unwrap();
        let nested = d.path().join("a/b");
        check_out_dir(&nested).unwrap();
        assert!(!d.path().join("a").exists());
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let e = check_out_dir(&d.path().join("f/sub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a file"), "{e}");
    }

    #[test]
    fn sizes_parse_or_say_what_is_wanted() {
        assert_eq!(parse_size("832x1216").unwrap(), (832, 1216));
        assert_eq!(parse_size(" 64X64 ").unwrap(), (64, 64));
        for bad in ["", "64", "64x", "x64", "0x64", "-8x64", "axb", "64x64x64"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("WIDTHxHEIGHT"), "{bad}: {e}");
        }
    }
}

/// `sample --seed`: a number, or -1 for a random one (A1111's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// This seed.
    Fixed(u64),
    /// Drawn at random (reported with each image).
    Random,
}

fn parse_seed(s: &str) -> std::result::Result<Seed, String> {
    if s.trim() == "-1" {
        return Ok(Seed::Random);
    }
    match s.trim().parse::<u64>() {
        Ok(v) if v <= i64::MAX as u64 => Ok(Seed::Fixed(v)),
        _ => Err(format!(
            "{s:?}: a seed from 0 to 2^63-1 (9223372036854775807), or -1 for a random one"
        )),
    }
}
