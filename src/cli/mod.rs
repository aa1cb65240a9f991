//! Command-line interface: clap structs and their conversion to the typed
//! configs of the library. Nothing below `cli/` imports clap.
//!
//! Exit codes: 0 ok, 1 the command ran but some items failed, 2 usage /
//! config / model error.

pub mod caption;
pub mod curation;
pub mod tokenize;

use clap::{Parser, Subcommand};

pub mod ckpt;
pub mod device;
pub mod generate;
pub mod gpubench;
pub mod manifest;
pub mod merge;
pub mod prompts;
pub mod run;
pub mod sample;
pub mod toy;
pub mod train;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "eps2v",
    version,
    about = "Convert an eps-prediction SDXL checkpoint to v-prediction (ZTSNR) by finetuning on aligned synthetic data",
    long_about = None
)]
pub struct Cli {
    /// Print the command's report as JSON on stdout instead of the summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The command line with what the derive cannot say: `train --help` shows
/// each tuning flag's default ([`train::with_defaults`]).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommand("train", train::with_defaults)
}

/// Parse the process's arguments through [`command`].
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a dataset folder with an empty manifest.
    Init(curation::InitArgs),
    /// Import images (A1111 / kohya folders) into a dataset.
    Import(curation::ImportArgs),
    /// Mark exact and near duplicates (pHash/dHash, multi-index search).
    Dedupe(curation::DedupeArgs),
    /// Assign aspect-ratio buckets, resize and crop (records real crop offsets).
    Bucket(curation::BucketArgs),
    /// Write the dataset as kohya / HF imagefolder / Parquet / JSONL.
    Export(curation::ExportArgs),
    /// Tag images with a WD tagger, score prompt alignment, write training captions.
    Caption(caption::CaptionArgs),
    /// Reject generated images that show too little of their prompt (alignment below a threshold).
    Filter(caption::FilterArgs),
    /// Summarise a dataset, or run read-only SQL on its manifest.
    Inspect(curation::InspectArgs),
    /// Inspect and check single-file SDXL checkpoints.
    Ckpt(ckpt::CkptArgs),
    /// Print the CLIP token ids (and A1111 weights) of a prompt as JSON.
    Tokenize(tokenize::TokenizeArgs),
    /// Text-to-image with a single-file SDXL checkpoint; PNGs with A1111 infotext.
    Sample(sample::SampleArgs),
    /// Model diagnostics (`uncond`: does the model treat "" like zeros?).
    Diagnose(sample::DiagnoseArgs),
    /// Finetune the UNet: eps -> v-prediction (ZTSNR) or back, watched by sampled grids.
    Train(Box<train::TrainArgs>),
    /// Blend checkpoints: weighted sum, add-difference, per-block weights, sweeps.
    Merge(merge::MergeArgs),
    /// Print the prompts of a template (dynamicprompts syntax, wildcards, the built-in 1girl pack).
    Prompts(prompts::PromptsArgs),
    /// Plan and render a synthetic dataset from a checkpoint (resumable, sharded).
    Generate(generate::GenerateArgs),
    /// Whole-manifest operations (`merge`: join generate shards).
    Manifest(manifest::ManifestArgs),
    /// Device benchmark steps driven by benches/gpu/run.sh (hidden).
    #[command(hide = true)]
    GpuBench(gpubench::GpuBenchArgs),
    /// The toy world: `toy scenes DIR --count N` draws tagged procedural scenes.
    Toy(toy::ToyArgs),
    /// The whole job from one TOML config (default: the toy world): generate → caption → filter → dedupe → bucket → train → merge → evaluate → report.
    Run(run::RunArgs),
}

/// Run a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    // Compact polars tables in summaries (no shape line, no dtype row).
    // Set before any thread starts; users can still override them.
    for (k, v) in [
        ("POLARS_FMT_TABLE_HIDE_DATAFRAME_SHAPE_INFORMATION", "1"),
        ("POLARS_FMT_TABLE_HIDE_COLUMN_DATA_TYPES", "1"),
        ("POLARS_FMT_STR_LEN", "60"),
        ("POLARS_FMT_MAX_ROWS", "40"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    match cli.command {
        Command::Init(a) => curation::init(a, json),
        Command::Import(a) => curation::import(a, json),
        Command::Dedupe(a) => curation::dedupe(a, json),
        Command::Bucket(a) => curation::bucket(a, json),
        Command::Export(a) => curation::export(a, json),
        Command::Inspect(a) => curation::inspect(a, json),
        Command::Caption(a) => caption::run_caption(a, json),
        Command::Filter(a) => caption::run_filter(a, json),
        Command::Ckpt(args) => Ok(ckpt::run(args, json)?),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Sample(a) => Ok(sample::run_sample(a, json)?),
        Command::Diagnose(a) => Ok(sample::run_diagnose(a, json)?),
        Command::Train(a) => Ok(train::run_train(*a, json)?),
        Command::Merge(a) => Ok(merge::run_merge(a, json)?),
        Command::Prompts(a) => Ok(prompts::run(a, json)?),
        Command::Generate(a) => Ok(generate::run(a, json)?),
        Command::Manifest(a) => Ok(manifest::run(a, json)?),
        Command::GpuBench(a) => Ok(gpubench::run_gpu_bench(a, json)?),
        Command::Toy(a) => toy::run(a, json),
        Command::Run(a) => Ok(run::run(a, json)?),
    }
}
