//! Command-line interface: clap structs and their conversion to the typed
//! configs of the library. Nothing below `cli/` imports clap.
//!
//! Exit codes: 0 ok, 1 the command ran but some items failed, 2 usage /
//! config / model error.

use clap::{Parser, Subcommand};

pub mod ckpt;

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

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and check single-file SDXL checkpoints.
    Ckpt(ckpt::CkptArgs),
}

/// Run a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match cli.command {
        Command::Ckpt(args) => Ok(ckpt::run(args, json)?),
    }
}
