//! Curation stages. Each stage is `run(cfg, &mut Manifest, &Ctx) ->
//! Result<Report>`: it reads the manifest, does the items that still need
//! it, and writes results in batched transactions, so it can be killed at
//! any point and rerun (no item lost, none done twice). The decision logic
//! of each stage is a pure function over plain data, unit-tested on its own.
//!
//! **A stage's rejections are its own to remake.** Each stage keeps its own
//! verdict on an item (`item_verdicts`, with the run that made it; see
//! [`crate::manifest::verdicts`]) and `items.status` shows the first one
//! left, so a rerun with other settings decides again the items that this
//! stage rejected under other settings (`import`: other decode limits;
//! `bucket`: another bucket set, crop or upscale limit; `dedupe`: every
//! rerun recomputes its whole plan; `filter`: another threshold), and never
//! touches another stage's verdict: an item two stages set aside is back
//! only when both take it back. Each new decision replaces the old one in
//! the same transaction (per batch for the stages that write files), so a
//! killed rerun leaves every item with either its old or its new decision.
//!
//! Nothing here knows about clap: the CLI converts flags to the `*Config`
//! structs.

pub mod bucket;
pub mod caption;
pub mod dedupe;
pub mod export;
pub mod filter;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod log_lines;
pub mod merge;
pub mod walk;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::manifest::Manifest;

/// Ids of the runs of `stage` whose stored config (`runs.config_json`)
/// satisfies `same` — the runs whose decisions a rerun keeps. A config this
/// build cannot read counts as different.
pub fn runs_with_same_settings<C: DeserializeOwned>(
    m: &Manifest,
    stage: &str,
    same: impl Fn(&C) -> bool,
) -> Result<HashSet<i64>> {
    let mut st = m
        .conn()
        .prepare("SELECT id, config_json FROM runs WHERE stage = ?1")
        .map_err(|e| m.err(e))?;
    let rows = st
        .query_map([stage], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(|e| m.err(e))?;
    let mut out = HashSet::new();
    for row in rows {
        let (id, json) = row.map_err(|e| m.err(e))?;
        if serde_json::from_str::<C>(&json).is_ok_and(|c| same(&c)) {
            out.insert(id);
        }
    }
    Ok(out)
}

/// Runtime context shared by stages.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Draw progress bars on stderr (off for `--json` and in tests).
    pub progress: bool,
    /// Bars and messages of work that runs side by side (e.g. `toy build`'s
    /// concurrent stages) go through one multi-bar instead of drawing over
    /// each other.
    pub bars: Option<MultiProgress>,
    /// Set by [`Ctx::cancel`]: long loops that poll [`Ctx::cancelled`] stop
    /// early (a stage running beside them failed or was interrupted). Clones
    /// share it.
    pub stop: Arc<AtomicBool>,
}

impl Ctx {
    /// A context that draws nothing (tests, `--json`).
    pub fn quiet() -> Self {
        Self::new(false)
    }

    /// A context that draws progress bars when `progress` is set.
    pub fn new(progress: bool) -> Self {
        Self {
            progress,
            ..Self::default()
        }
    }

    /// This context for stages that run side by side: one multi-bar for
    /// their bars and messages, and a shared stop flag.
    pub fn concurrent(&self) -> Self {
        Self {
            progress: self.progress,
            bars: self.progress.then(|| {
                if log_lines::stderr_is_terminal() {
                    MultiProgress::new()
                } else {
                    MultiProgress::with_draw_target(log_lines::target())
                }
            }),
            stop: Arc::default(),
        }
    }

    /// Ask the loops that share this context to stop.
    pub fn cancel(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether [`Ctx::cancel`] was called.
    pub fn cancelled(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether a long loop should stop at its next safe point: cancelled,
    /// or interrupted by SIGINT / SIGTERM ([`crate::signal`]).
    pub fn should_stop(&self) -> bool {
        self.cancelled() || crate::signal::requested()
    }

    /// Print a progress message on stderr (above the bars), when progress
    /// is on.
    pub fn say(&self, msg: &str) {
        if !self.progress {
            return;
        }
        match &self.bars {
            // A multi-bar on a terminal prints above its bars; one that is
            // hidden (stderr redirected to a log) would drop the line.
            Some(m) if !m.is_hidden() && log_lines::stderr_is_terminal() => {
                if m.println(msg).is_err() {
                    eprintln!("{msg}");
                }
            }
            _ => eprintln!("{msg}"),
        }
    }

    /// A progress bar of `len` steps with a message, hidden when
    /// progress is off.
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        // indicatif draws nothing on a stderr that is not a terminal (nohup,
        // Slurm, `2> log`): there a line of the bar's state every
        // [`log_lines::EVERY`] instead ([`log_lines`]).
        let terminal = log_lines::stderr_is_terminal();
        let pb = ProgressBar::with_draw_target(
            Some(len),
            match (self.progress, terminal) {
                (false, _) => ProgressDrawTarget::hidden(),
                (true, true) => ProgressDrawTarget::stderr(),
                (true, false) => log_lines::target(),
            },
        );
        pb.set_style(if terminal {
            ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        } else {
            ProgressStyle::with_template(log_lines::TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
        });
        pb.set_message(msg.to_string());
        match &self.bars {
            Some(m) => m.add(pb),
            None => pb,
        }
    }
}
