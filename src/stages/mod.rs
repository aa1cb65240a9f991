//! Curation stages. Each stage is `run(cfg, &mut Manifest, &Ctx) ->
//! Result<Report>`: it reads the manifest, does the items that still need
//! it, and writes results in batched transactions, so it can be killed at
//! any point and rerun (no item lost, none done twice). The decision logic
//! of each stage is a pure function over plain data, unit-tested on its own.
//!
//! Nothing here knows about clap: the CLI converts flags to the `*Config`
//! structs.

pub mod bucket;
pub mod dedupe;
pub mod export;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod merge;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Runtime context shared by stages.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Draw progress bars on stderr (off for `--json` and in tests).
    pub progress: bool,
}

impl Ctx {
    /// A context that draws nothing (tests, `--json`).
    pub fn quiet() -> Self {
        Self { progress: false }
    }

    /// A progress bar of `len` steps with a message, hidden when
    /// progress is off.
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(
            Some(len),
            if self.progress {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        pb.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(msg.to_string());
        pb
    }
}
