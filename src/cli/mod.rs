//! Command-line interface: clap structs and their conversion to the typed
//! configs of the library. Nothing below `cli/` imports clap.
//!
//! Exit codes: 0 ok, 1 the command ran but some items failed, 2 usage /
//! config / model error.

pub mod tokenize;

use clap::{Parser, Subcommand};

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
    /// Print the CLIP token ids (and A1111 weights) of a prompt as JSON.
    Tokenize(tokenize::TokenizeArgs),
}

/// Run a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let _json = cli.json;
    match cli.command {
        Command::Tokenize(args) => tokenize::run(&args),
    }
}
