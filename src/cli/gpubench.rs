//! `eps2v gpu-bench` (hidden): the Rust steps of the device benchmark
//! `benches/gpu/run.sh` — `weights` (random SDXL checkpoint + UNet inputs),
//! `run` (our measurements, [`crate::gpubench::run`]) and `report` (the
//! ratio table against the PyTorch side). Not a user command: the script
//! drives it, and its CPU fallback runs in the tests.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::cli::sample::parse_size;
use crate::gpubench::report::{combine, markdown, reference_error};
use crate::gpubench::run::{run, write_json, RunConfig};
use crate::gpubench::weights::{write_inputs, write_random_checkpoint};
use crate::gpubench::Variant;
use crate::nn::device::parse_dtype;
use crate::{Error, Result};

/// Arguments of `eps2v gpu-bench`.
#[derive(Debug, Args)]
pub struct GpuBenchArgs {
    /// Which step.
    #[command(subcommand)]
    pub command: GpuBenchCommand,
}

/// `gpu-bench` steps.
#[derive(Debug, Subcommand)]
pub enum GpuBenchCommand {
    /// Write a seeded random SDXL checkpoint (real key layout) and the UNet check inputs.
    Weights(WeightsArgs),
    /// Run our measurements (golden models, UNet check, sample and training-step timings).
    Run(RunArgs),
    /// Join ours.json and the PyTorch side's JSON into the ratio table.
    Report(ReportArgs),
    /// Run the user's commands on the toy world on the device, each checked by its --json report.
    Product(ProductArgs),
}

/// Arguments of `gpu-bench product`.
#[derive(Debug, Args)]
pub struct ProductArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Also render the probe image with this --precision (the steps run each command's default).
    #[arg(long)]
    pub precision: Option<String>,
    /// Work folder (emptied first).
    #[arg(long)]
    pub work: PathBuf,
    /// Report to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Seconds for all steps together (a step past it is killed).
    #[arg(long, default_value_t = 60.0)]
    pub budget_s: f64,
}

/// Arguments of `gpu-bench weights`.
#[derive(Debug, Args)]
pub struct WeightsArgs {
    /// full (SDXL base) or tiny (test configs).
    #[arg(long, default_value = "full")]
    pub variant: String,
    /// Seed of every value.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Image size WxH the UNet inputs are for (latent = size / 8).
    #[arg(long, default_value = "1024x1024")]
    pub size: String,
    /// Checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
    /// UNet inputs to write.
    #[arg(long)]
    pub inputs: PathBuf,
}

/// Arguments of `gpu-bench run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Checkpoint from `gpu-bench weights`.
    #[arg(long)]
    pub model: PathBuf,
    /// UNet inputs from `gpu-bench weights`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Golden fixtures folder (skipped when absent).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model dtype: bf16 or f16 on CUDA, f32 anywhere.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Image size WxH (sampling and training).
    #[arg(long, default_value = "1024x1024")]
    pub size: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Batch sizes to time sampling at.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batches: Vec<usize>,
    /// Timed training steps per selection.
    #[arg(long, default_value_t = 3)]
    pub train_steps: usize,
    /// Seconds of sampling after which further batch sizes are skipped.
    #[arg(long, default_value_t = 120.0)]
    pub budget_s: f64,
    /// Seconds per training selection after which no further step starts.
    #[arg(long, default_value_t = 30.0)]
    pub train_budget_s: f64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `gpu-bench report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// ours.json from `gpu-bench run`.
    #[arg(long)]
    pub ours: PathBuf,
    /// The PyTorch side's JSON (missing file = no reference).
    #[arg(long)]
    pub reference: PathBuf,
    /// Combined JSON to write.
    #[arg(long)]
    pub out: PathBuf,
    /// product.json from `gpu-bench product` (its rows are added; a missing file adds a failed row).
    #[arg(long)]
    pub product: Option<PathBuf>,
}

fn read_json(path: &PathBuf) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Run `eps2v gpu-bench …`.
pub fn run_gpu_bench(a: GpuBenchArgs, json: bool) -> Result<i32> {
    match a.command {
        GpuBenchCommand::Weights(w) => {
            let variant = Variant::parse(&w.variant)?;
            let (width, height) = parse_size(&w.size)?;
            let r = write_random_checkpoint(&w.out, variant, w.seed, parse_dtype(&w.dtype)?)?;
            write_inputs(
                &w.inputs,
                variant,
                w.seed,
                (height as usize / 8, width as usize / 8),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} tensors, {} parameters, {:.2} GB in {:.1}s",
                    r.path.display(),
                    r.tensors,
                    r.parameters,
                    r.bytes as f64 / 1e9,
                    r.seconds
                );
            }
            Ok(0)
        }
        GpuBenchCommand::Run(r) => {
            let t0 = Instant::now();
            let cfg = RunConfig {
                model: r.model,
                inputs: r.inputs,
                fixtures: r.fixtures,
                device: crate::nn::device(&r.device)?,
                dtype: parse_dtype(&r.dtype)?,
                size: parse_size(&r.size)?,
                steps: r.steps,
                batches: r.batches,
                train_steps: r.train_steps,
                budget_s: r.budget_s,
                train_budget_s: r.train_budget_s,
                out_dir: r.out,
            };
            let report = run(&cfg, &mut |msg| {
                eprintln!("[{:7.1}s] eps2v: {msg}", t0.elapsed().as_secs_f64())
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: wrote ours.json in {:.1}s",
                    cfg.out_dir.display(),
                    report.seconds
                );
            }
            Ok(0)
        }
        GpuBenchCommand::Product(p) => {
            let t0 = Instant::now();
            let cfg = crate::gpubench::product::ProductConfig {
                bin: std::env::current_exe()
                    .map_err(|e| Error::Other(format!("the eps2v binary's path: {e}")))?,
                device: p.device,
                precision: p.precision,
                work: p.work,
                out: p.out,
                budget_s: p.budget_s,
            };
            let report = crate::gpubench::product::run(&cfg, &mut |msg| {
                eprintln!("[{:7.1}s] product: {msg}", t0.elapsed().as_secs_f64())
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: {} of {} steps passed",
                    cfg.out.display(),
                    report.passed,
                    report.total
                );
            }
            Ok(0)
        }
        GpuBenchCommand::Report(r) => {
            let ours = read_json(&r.ours)?;
            let reference = if r.reference.is_file() {
                // An unreadable reference still gets our side's table.
                read_json(&r.reference).unwrap_or_else(|e| {
                    serde_json::json!({ "error": format!("{} unreadable: {e}", r.reference.display()) })
                })
            } else {
                serde_json::Value::Null
            };
            let mut combined = combine(&ours, &reference)?;
            if let Some(p) = &r.product {
                combined.add_product(&read_json(p).unwrap_or(serde_json::Value::Null));
            }
            write_json(&r.out, &combined)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&combined)?);
            } else {
                print!("{}", markdown(&combined));
                if let Some(e) = reference_error(&reference) {
                    println!("reference side failed: {e}");
                } else if reference.is_null() {
                    println!("no reference side ({} missing)", r.reference.display());
                }
            }
            Ok(0)
        }
    }
}
