//! [`TrainReport`]: what a training run did (the summary, `--json`, and
//! what `run` records).

use std::path::PathBuf;

use serde::Serialize;

use super::cache::CacheReport;
use super::data::Eligibility;
use super::state;

/// What a training run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainReport {
    /// Manifest run id (`runs/<id>/`).
    pub run_id: i64,
    /// The run folder.
    pub run_dir: PathBuf,
    /// Whether this run resumed an earlier one.
    pub resumed: bool,
    /// The step it resumed at (0 for a new run): `steps - resumed_at`
    /// were taken in this call, in [`Self::seconds`].
    pub resumed_at: usize,
    /// Optimizer steps done (over all stages, skipped ones included).
    pub steps: usize,
    /// Stages finished.
    pub stages_done: usize,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped: usize,
    /// Rollbacks to the last good checkpoint.
    pub rollbacks: usize,
    /// Stopped by a signal (a resumable checkpoint was written).
    pub interrupted: bool,
    /// Training runs of the dataset that dead processes had left
    /// `running`, marked `failed` at this run's start
    /// ([`state::tidy_dead_runs`]).
    pub tidied: Vec<state::Tidied>,
    /// Why training stopped before its last step, if it did.
    pub stopped_early: Option<String>,
    /// Training-set eligibility counts.
    pub data: Eligibility,
    /// Items trained on / held out.
    pub train_items: usize,
    /// Items held out for validation.
    pub val_items: usize,
    /// Cache hits and misses.
    pub cache: CacheReport,
    /// Trainable parameters of the last stage.
    pub trainable_params: usize,
    /// Micro-batches computed at once ([`crate::nn::lanes`]; 1: one after
    /// the other).
    pub lanes: usize,
    /// Bytes of optimizer state of the last stage.
    pub optimizer_bytes: usize,
    /// Mean loss of the last 10 steps.
    pub last_loss: Option<f64>,
    /// Validation loss at the last evaluation.
    pub val_loss: Option<f64>,
    /// Retention at each evaluation, `(step, score)`.
    pub retention: Vec<(usize, f64)>,
    /// The step of the exported weights: the last step, or with
    /// `stop_below` the last good checkpoint's (`None`: nothing exported).
    pub exported_step: Option<usize>,
    /// Retention of the exported weights (their step's evaluation).
    pub exported_retention: Option<f64>,
    /// The exported checkpoint (and yaml).
    pub exported: Vec<PathBuf>,
    /// The evaluation grid.
    pub grid: Option<PathBuf>,
    /// Warnings about the configuration and the disk space.
    pub warnings: Vec<String>,
    /// What the run writes at its peak, bytes (checkpoints and export,
    /// [`super::disk::Need`]; the largest over the stages run now).
    pub disk_peak_bytes: u64,
    /// One checkpoint of the last stage run, bytes (estimated).
    pub checkpoint_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}
