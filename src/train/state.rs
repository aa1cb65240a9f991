//! Resumable training checkpoints: `runs/<id>/checkpoints/step-NNNNNN.safetensors`.
//!
//! One safetensors file holds everything a resume needs to continue *bit
//! for bit* as if never interrupted:
//! - `w.<key>`: the current f32 values of every UNet weight trained so far
//!   (the union of the blocks of the stages up to the current one; the rest
//!   still equals the base checkpoint);
//! - `m.<key>` / `v.<key>`: AdamW moments of the current stage's parameters,
//!   with their per-parameter step counts in the metadata;
//! - `ema.<key>`: EMA weights when EMA is on;
//! - metadata `eps2v.train_state`: [`TrainState`] as JSON (step, stage,
//!   data position, counters, the whole config).
//!
//! Randomness needs no saved state: every draw comes from a ChaCha stream
//! seeded by `(seed, purpose, step, micro-batch)` ([`super::data::rng_for`]).
//!
//! Files are written atomically (temp file + rename) after checking that no
//! tensor holds a NaN or infinity, so a crash, a full disk or a diverged
//! step never replaces a good checkpoint with a bad one. The two newest
//! rolling checkpoints are kept; `good-step-NNNNNN` files (the last
//! evaluation at or above `--stop-below`) are kept separately.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::data::DataPos;
use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::{
    remove_partial_saves, save_tensors, Checkpoint, SaveOptions,
};
use crate::nn::optim::SlotState;
use crate::{Error, Result};

/// Metadata key holding [`TrainState`].
pub const STATE_KEY: &str = "eps2v.train_state";

/// Where a run is, everything but tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done (over all stages).
    pub step: usize,
    /// Current stage index.
    pub stage: usize,
    /// Optimizer steps done in the current stage.
    pub stage_step: usize,
    /// Next batch.
    pub pos: DataPos,
    /// Steps skipped for non-finite loss or gradients, in total.
    pub skipped: usize,
    /// Rollbacks to a checkpoint so far.
    pub rollbacks: usize,
    /// Whether retention has reached `stop_below` at least once.
    pub armed: bool,
    /// Last retention score measured.
    pub last_retention: Option<f64>,
    /// Non-finite steps in a row so far (the NaN guard rolls back at
    /// `nan_rollback_after`), so a resume counts on where the run was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bad_in_row: usize,
    /// Rollbacks since the last finite step: the run is called diverged
    /// when these pass `3 × nan_rollback_after` (a long run that recovers
    /// from each burst of NaNs goes on however many it had in total).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rollbacks_in_row: usize,
    /// The current stage reached its `until_retention` at this step: a
    /// resume goes on with the next stage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stage_met: bool,
    /// Why the run stopped early (`--stop-below`): a resume exports the last
    /// good checkpoint instead of training on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Keys of the optimizer's parameters, in its order, with their step counts.
    pub slots: Vec<(String, u64)>,
    /// The run's config.
    pub config: TrainConfig,
    /// SHA-256 of the base checkpoint the run started from (checkpoints
    /// written before it was recorded have none: their base is known by
    /// path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// What it trains on ([`super::data::digest`]; checkpoints written
    /// before it was recorded have none and are not resumed: their
    /// batches were drawn in item-id order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_digest: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl TrainState {
    /// A new run of `config` on a base whose SHA-256 is `base_sha256`, at step 0.
    pub fn start(config: TrainConfig, base_sha256: String) -> Self {
        Self {
            step: 0,
            stage: 0,
            stage_step: 0,
            pos: DataPos::default(),
            skipped: 0,
            rollbacks: 0,
            armed: false,
            last_retention: None,
            bad_in_row: 0,
            rollbacks_in_row: 0,
            stage_met: false,
            stopped: None,
            slots: Vec::new(),
            config,
            base_sha256: Some(base_sha256),
            data_digest: None,
        }
    }

    /// Why this run cannot go on over a dataset whose trainable items
    /// digest to `now` ([`super::data::digest`]); `None` when it can.
    pub fn data_mismatch(&self, now: &str) -> Option<String> {
        // Saved before the digest was recorded: by an eps2v that drew its
        // batches in item-id order too.
        let saved = self.data_digest.as_deref().unwrap_or("?");
        if saved == now {
            return None;
        }
        let format = |d: &str| d.split(':').nth(1).map(str::to_string);
        if format(saved) != format(now) {
            return Some(
                "dataset: the run was saved by an earlier eps2v, which ordered its batches by item id (now by content); resume it with that version, or start a new run (its caches are reused)"
                    .to_string(),
            );
        }
        let count = |d: &str| d.split(':').next().unwrap_or("?").to_string();
        let (was, is) = (count(saved), count(now));
        Some(if was == is {
            format!(
                "dataset: the run trained on {was} items; there are as many now, but their images, captions or buckets changed (a caption, filter, dedupe or bucket run since?)"
            )
        } else {
            format!("dataset: the run trained on {was} items, there are {is} now")
        })
    }

    /// Why a run with config `cfg` on a base whose SHA-256 is `base_sha256`
    /// cannot continue this one; `None` when it can. The base is compared
    /// by content, so a moved or renamed base file still resumes and a
    /// file replaced under the same name does not (by path only for
    /// checkpoints that did not record the hash).
    pub fn resume_mismatch(&self, cfg: &TrainConfig, base_sha256: &str) -> Result<Option<String>> {
        match &self.base_sha256 {
            Some(saved) if saved != base_sha256 => {
                return Ok(Some(format!(
                    "base model: {} now has SHA-256 {}…, the saved run started from {}…",
                    cfg.model.display(),
                    &base_sha256[..base_sha256.len().min(12)],
                    &saved[..saved.len().min(12)]
                )))
            }
            Some(_) => {}
            None if self.config.model != cfg.model => {
                return Ok(Some(format!(
                    "model: {} in the saved run, {} now",
                    self.config.model.display(),
                    cfg.model.display()
                )))
            }
            None => {}
        }
        cfg.resume_mismatch(&self.config)
    }
}

/// A checkpoint read back.
pub struct Loaded {
    /// Counters and config.
    pub state: TrainState,
    /// Saved UNet weights by key.
    pub weights: BTreeMap<String, Tensor>,
    /// Optimizer state in `state.slots` order.
    pub slots: Vec<SlotState>,
    /// EMA weights by key (empty without EMA).
    pub ema: BTreeMap<String, Tensor>,
}

/// The checkpoint folder of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// `(step, path)` of the checkpoints named `<prefix>NNNNNN.safetensors`, by step.
fn list(run_dir: &Path, prefix: &str) -> Result<Vec<(usize, PathBuf)>> {
    let d = dir(run_dir);
    let mut out = Vec::new();
    if !d.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&d).at(&d)? {
        let e = e.at(&d)?;
        if let Some(s) = step_of(&e.file_name().to_string_lossy(), prefix) {
            out.push((s, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes of the checkpoints (both series) already in `run_dir`.
pub fn bytes_on_disk(run_dir: &Path) -> Result<u64> {
    let mut total = 0;
    for prefix in ["step-", "good-step-", STOP_PREFIX] {
        for (_, p) in list(run_dir, prefix)? {
            total += std::fs::metadata(&p).at(&p)?.len();
        }
    }
    Ok(total)
}

/// Remove the checkpoints a killed process left half-written in the
/// checkpoint folder ([`crate::models::sdxl::checkpoint::is_partial_save`]),
/// as large as a checkpoint each. Called when a run is resumed, which owns
/// its folder. Returns how many were removed.
pub fn sweep_partial(run_dir: &Path) -> Result<usize> {
    remove_partial_saves(&dir(run_dir), None)
}

/// The newest checkpoint to resume from: a rolling one or the one a stop
/// request wrote, whichever is later.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    // At the same step, the rolling one (the same state): last after a
    // stable sort.
    let mut all = list(run_dir, STOP_PREFIX)?;
    all.extend(list(run_dir, "step-")?);
    all.sort_by_key(|(s, _)| *s);
    Ok(all.pop().map(|(_, p)| p))
}

/// The newest rolling checkpoint: where a NaN rollback returns to. A
/// checkpoint written on a stop request is not one, so a resumed run rolls
/// back where the uninterrupted run does.
pub fn latest_anchor(run_dir: &Path) -> Result<Option<PathBuf>> {
    match list(run_dir, "step-")?.pop() {
        Some((_, p)) => Ok(Some(p)),
        None => latest(run_dir),
    }
}

/// Writes the run's checkpoints for one stage.
pub(super) struct Saver<'a> {
    pub(super) run_dir: &'a Path,
    /// The optimizer's parameter keys, in its order.
    pub(super) keys: &'a [String],
    /// Blocks trained by this stage and the ones before it.
    pub(super) trained: &'a [super::blocks::BlockSet],
    /// The step of the last checkpoint to resume from (rolling or stop,
    /// not `good-`) it wrote.
    pub(super) saved_at: std::cell::Cell<Option<usize>>,
}

impl Saver<'_> {
    pub(super) fn save(
        &self,
        st: &TrainState,
        opt: &crate::nn::optim::AdamW,
        weights: &super::weights::UNetWeights,
        ema: &BTreeMap<String, Tensor>,
        series: Series,
    ) -> Result<PathBuf> {
        if series != Series::Good {
            self.saved_at.set(Some(st.step));
        }
        let slots = opt.state()?;
        let mut s = st.clone();
        s.slots = self
            .keys
            .iter()
            .cloned()
            .zip(slots.iter().map(|x| x.step))
            .collect();
        let w: Vec<(&str, &Tensor)> = weights
            .map()
            .iter()
            .filter(|(k, _)| self.trained.iter().any(|b| b.contains_key(k)))
            .map(|(k, t)| (k.as_str(), t))
            .collect();
        save(
            self.run_dir,
            &ToSave {
                state: &s,
                weights: w,
                slots: &slots,
                ema,
            },
            series,
        )
    }
}

/// Which series a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// On schedule (stage starts, every `save_every`, the end); the two
    /// newest are kept.
    Rolling,
    /// The last one with retention at or above `--stop-below`.
    Good,
    /// Where a stop request (Ctrl-C, SIGTERM) ended the run; only the
    /// newest is kept, until a rolling one passes it.
    Stop,
}

/// File name prefix of the checkpoints written on a stop request.
const STOP_PREFIX: &str = "stop-step-";

/// The newest unfinished training run of the dataset in `m` whose
/// settings match `cfg` (up to the fields that may change on resume, the
/// base compared by content) and that has a checkpoint: what a rerun of
/// `run` or `toy build` continues instead of starting again.
///
/// Unfinished is `running` (killed: `kill -9`, a crash, an error) or
/// `failed`, which the trainer writes only when it stopped on request
/// (Ctrl-C, SIGTERM, a stage beside it failing) after saving a
/// checkpoint of where it stopped. A checkpoint that cannot be read, and
/// a run that another process holds ([`Manifest::run_is_live`]), are
/// passed over (a new run starts).
pub fn resumable_run(m: &Manifest, cfg: &TrainConfig) -> Result<Option<i64>> {
    matching_run(m, cfg, "('running', 'failed')")
}

/// [`resumable_run`], finished runs included: what `run`'s train stage
/// takes up when no record of the pipeline says it trained (a kill between
/// the training run's end and the pipeline's record of it). Resuming a
/// finished run from its last checkpoint (written at its last step) only
/// exports again, the same bytes as its first export.
pub fn adoptable_run(m: &Manifest, cfg: &TrainConfig) -> Result<Option<i64>> {
    matching_run(m, cfg, "('running', 'failed', 'done')")
}

/// For `train --resume` alone when [`resumable_run`] found nothing: the
/// newest stopped run with a readable checkpoint, and why it does not
/// resume with `cfg` (its settings, base model or data differ).
pub fn newest_mismatch(m: &Manifest, cfg: &TrainConfig) -> Result<Option<(i64, String)>> {
    let mut found = None;
    scan_runs(m, cfg, "('running', 'failed')", &mut |id, why| {
        found = Some((id, why.to_string()));
        true
    })?;
    Ok(found)
}

fn matching_run(m: &Manifest, cfg: &TrainConfig, statuses: &str) -> Result<Option<i64>> {
    let mut found = None;
    scan_runs(m, cfg, statuses, &mut |id, why| {
        if why.is_empty() {
            found = Some(id);
        }
        found.is_some()
    })?;
    Ok(found)
}

/// The train runs of `statuses`, newest first, that no process holds and
/// that have a readable checkpoint, each with why it does not resume with
/// `cfg` ("" when it does), until `stop` says so.
fn scan_runs(
    m: &Manifest,
    cfg: &TrainConfig,
    statuses: &str,
    stop: &mut dyn FnMut(i64, &str) -> bool,
) -> Result<()> {
    let mut st = m
        .conn()
        .prepare(&format!(
            "SELECT id FROM runs WHERE stage = 'train' AND status IN {statuses} ORDER BY id DESC"
        ))
        .map_err(|e| m.err(e))?;
    let ids: Vec<i64> = st
        .query_map([], |r| r.get(0))
        .map_err(|e| m.err(e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| m.err(e))?;
    if ids.is_empty() {
        // Nothing to compare: the base is not hashed.
        return Ok(());
    }
    let base = crate::models::sdxl::checkpoint::sha256_file(&cfg.model)?;
    // No trainable items: nothing to compare (training refuses it anyway).
    let data = super::data::load_items(m)
        .ok()
        .map(|(items, _)| super::data::digest(&items));
    for id in ids {
        // Another process is training it.
        if m.run_is_live(id)? {
            continue;
        }
        let Some(latest) = latest(&super::run_dir(m.root(), id))? else {
            continue;
        };
        let Ok(saved) = peek(&latest) else {
            continue;
        };
        let data_differs = data.as_deref().and_then(|d| saved.data_mismatch(d));
        let why = saved
            .resume_mismatch(cfg, &base)?
            .or(data_differs)
            .unwrap_or_default();
        if stop(id, &why) {
            break;
        }
    }
    Ok(())
}

/// A training run that a dead process left `running` (killed, crashed),
/// as [`tidy_dead_runs`] found it.
#[derive(Debug, Clone, Serialize)]
pub struct Tidied {
    /// Its run id.
    pub run_id: i64,
    /// Half-written checkpoints removed from its folder.
    pub partial_saves_removed: usize,
    /// Whether it has a checkpoint to resume from (`train --resume ID`).
    pub resumable: bool,
}

impl std::fmt::Display for Tidied {
    /// What the user is told about it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training run {} was left `running` by a process that died; marked failed",
            self.run_id
        )?;
        if self.partial_saves_removed > 0 {
            write!(
                f,
                ", {} half-written checkpoint(s) removed",
                self.partial_saves_removed
            )?;
        }
        if self.resumable {
            write!(f, " (resume it with --resume {})", self.run_id)?;
        }
        Ok(())
    }
}

/// Mark the training runs of `m` other than `except` that are `running`
/// but whose lock no process holds ([`Manifest::run_is_live`]: their
/// process died) as `failed`, and remove the half-written checkpoints they
/// left ([`sweep_partial`]). Their finished checkpoints stay: such a run
/// is still resumed by [`resumable_run`] or `--resume ID`.
pub fn tidy_dead_runs(m: &Manifest, except: i64) -> Result<Vec<Tidied>> {
    let mut out = Vec::new();
    m.tidy_dead_rows("train", except, &mut |id| {
        let rdir = super::run_dir(m.root(), id);
        let partial_saves_removed = sweep_partial(&rdir)?;
        out.push(Tidied {
            run_id: id,
            partial_saves_removed,
            resumable: latest(&rdir)?.is_some(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// The newest `good-` checkpoint, if any.
pub fn latest_good(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir, "good-step-")?.pop().map(|(_, p)| p))
}

fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let bad = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .position(|v| !v.is_finite());
    match bad {
        Some(i) => Err(Error::Other(format!(
            "refusing to save a checkpoint: {name} holds NaN/inf (element {i})"
        ))),
        None => Ok(()),
    }
}

/// What [`save`] writes.
pub struct ToSave<'a> {
    /// Counters and config.
    pub state: &'a TrainState,
    /// UNet weights to store (key → tensor).
    pub weights: Vec<(&'a str, &'a Tensor)>,
    /// Optimizer state in `state.slots` order.
    pub slots: &'a [SlotState],
    /// EMA weights.
    pub ema: &'a BTreeMap<String, Tensor>,
}

/// Write a checkpoint of `series` ([`Series`]: the two newest rolling and
/// good ones are kept, one stop one, and none a rolling one has passed).
pub fn save(run_dir: &Path, what: &ToSave<'_>, series: Series) -> Result<PathBuf> {
    let d = dir(run_dir);
    std::fs::create_dir_all(&d).at(&d)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, t) in &what.weights {
        check_finite(k, t)?;
        tensors.push((format!("w.{k}"), (*t).clone()));
    }
    if what.slots.len() != what.state.slots.len() {
        return Err(Error::Other(
            "checkpoint: optimizer state and its keys differ in length".into(),
        ));
    }
    for ((k, _), st) in what.state.slots.iter().zip(what.slots) {
        check_finite(k, &st.m)?;
        check_finite(k, &st.v)?;
        tensors.push((format!("m.{k}"), st.m.clone()));
        tensors.push((format!("v.{k}"), st.v.clone()));
    }
    for (k, t) in what.ema {
        check_finite(k, t)?;
        tensors.push((format!("ema.{k}"), t.clone()));
    }
    let prefix = match series {
        Series::Rolling => "step-",
        Series::Good => "good-step-",
        Series::Stop => STOP_PREFIX,
    };
    let path = d.join(format!("{prefix}{:06}.safetensors", what.state.step));
    let mut metadata = BTreeMap::new();
    metadata.insert(STATE_KEY.to_string(), serde_json::to_string(what.state)?);
    save_tensors(
        &path,
        &tensors,
        &SaveOptions {
            dtype: None,
            metadata,
            ..Default::default()
        },
    )?;
    let keep = if series == Series::Stop { 1 } else { 2 };
    let all = list(run_dir, prefix)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_file(old).at(old)?;
    }
    if series == Series::Rolling {
        for (s, old) in list(run_dir, STOP_PREFIX)? {
            if s <= what.state.step {
                std::fs::remove_file(&old).at(&old)?;
            }
        }
    }
    Ok(path)
}

fn state_of(ck: &Checkpoint, path: &Path) -> Result<TrainState> {
    serde_json::from_str(ck.metadata().get(STATE_KEY).ok_or_else(|| {
        Error::config(format!(
            "{}: not an eps2v training checkpoint (no {STATE_KEY} metadata)",
            path.display()
        ))
    })?)
    .map_err(|e| Error::config(format!("{}: bad training state: {e}", path.display())))
}

/// The [`TrainState`] of a checkpoint written by [`save`], without its tensors.
pub fn peek(path: &Path) -> Result<TrainState> {
    state_of(&Checkpoint::open(path)?, path)
}

/// Read a checkpoint written by [`save`].
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let ck = Checkpoint::open(path)?;
    let state = state_of(&ck, path)?;
    let mut weights = BTreeMap::new();
    let mut ema = BTreeMap::new();
    let mut moments: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, e) in ck.entries() {
        let dtype = if e.dtype == "F64" {
            DType::F64
        } else {
            DType::F32
        };
        let t = || ck.tensor(name, dtype, device);
        if let Some(k) = name.strip_prefix("w.") {
            weights.insert(k.to_string(), t()?);
        } else if let Some(k) = name.strip_prefix("ema.") {
            ema.insert(k.to_string(), t()?);
        } else if let Some(k) = name.strip_prefix("m.") {
            moments.entry(k.to_string()).or_default().0 =
                Some(ck.tensor(name, dtype, &Device::Cpu)?);
        } else if let Some(k) = name.strip_prefix("v.") {
            moments.entry(k.to_string()).or_default().1 =
                Some(ck.tensor(name, dtype, &Device::Cpu)?);
        }
    }
    let slots = state
        .slots
        .iter()
        .map(|(k, step)| match moments.remove(k) {
            Some((Some(m), Some(v))) => Ok(SlotState { step: *step, m, v }),
            _ => Err(Error::config(format!(
                "{}: optimizer state of {k} is missing; the checkpoint is incomplete",
                path.display()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Loaded {
        state,
        weights,
        slots,
        ema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(model: &str, base: Option<&str>) -> TrainState {
        TrainState {
            step: 4,
            stage_step: 4,
            base_sha256: base.map(String::from),
            ..TrainState::start(cfg(model), String::new())
        }
    }

    fn cfg(model: &str) -> TrainConfig {
        TrainConfig {
            model: model.into(),
            ..Default::default()
        }
    }

    #[test]
    fn stop_decisions_survive_a_save_and_older_states_load_without_them() {
        let mut st = state("base.safetensors", Some("aa"));
        st.bad_in_row = 2;
        st.rollbacks_in_row = 1;
        st.stage_met = true;
        st.stopped = Some("retention fell".into());
        let json = serde_json::to_value(&st).unwrap();
        let back: TrainState = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, st);
        // A state written before these fields existed.
        let mut old = json;
        for k in ["bad_in_row", "rollbacks_in_row", "stage_met", "stopped"] {
            old.as_object_mut().unwrap().remove(k).unwrap();
        }
        let back: TrainState = serde_json::from_value(old).unwrap();
        assert_eq!(
            (
                back.bad_in_row,
                back.rollbacks_in_row,
                back.stage_met,
                back.stopped
            ),
            (0, 0, false, None)
        );
        // Not written when unset.
        let plain = serde_json::to_value(state("base.safetensors", None)).unwrap();
        assert!(plain.get("stage_met").is_none() && plain.get("stopped").is_none());
    }

    #[test]
    fn resume_compares_the_base_by_content_then_the_rest() {
        let saved = state("a/base.safetensors", Some("aaaa1111"));
        // Moved or renamed, same bytes: resumes.
        assert_eq!(
            saved
                .resume_mismatch(&cfg("b/renamed.safetensors"), "aaaa1111")
                .unwrap(),
            None
        );
        // Same path, other bytes: refused, naming the file and both hashes.
        let why = saved
            .resume_mismatch(&cfg("a/base.safetensors"), "bbbb2222")
            .unwrap()
            .unwrap();
        assert!(
            why.contains("a/base.safetensors")
                && why.contains("bbbb2222")
                && why.contains("aaaa1111"),
            "{why}"
        );
        // The other settings still count.
        let other = TrainConfig {
            lr: 3e-5,
            ..cfg("a/base.safetensors")
        };
        let why = saved.resume_mismatch(&other, "aaaa1111").unwrap().unwrap();
        assert!(why.starts_with("lr:"), "{why}");
        // A checkpoint without the hash (older files): by path.
        let old = state("a/base.safetensors", None);
        assert_eq!(
            old.resume_mismatch(&cfg("a/base.safetensors"), "cccc")
                .unwrap(),
            None
        );
        let why = old
            .resume_mismatch(&cfg("b/base.safetensors"), "cccc")
            .unwrap()
            .unwrap();
        assert!(why.starts_with("model:"), "{why}");
        // Old checkpoints' JSON (no `base_sha256`) still reads.
        let mut json = serde_json::to_value(&old).unwrap();
        json.as_object_mut().unwrap().remove("base_sha256");
        let back: TrainState = serde_json::from_value(json).unwrap();
        assert_eq!(back, old);
    }
}
