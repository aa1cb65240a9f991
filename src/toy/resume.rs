//! Resumable toy trainers: the VAE, text-encoder and tagger loops of `eps2v
//! toy build` save their state now and then, and where Ctrl-C stopped them,
//! so a rerun goes on from there *bit for bit* instead of starting over
//! (the UNet stage has the project trainer's own checkpoints).
//!
//! One safetensors file per stage (`work/<stage>.resume.safetensors`):
//! - `w.<name>`: every trained weight (f32, as trained);
//! - `m.<name>` / `v.<name>`: its AdamW moments;
//! - metadata `eps2v.toy_resume`: [`Saved`] as JSON — the settings key of
//!   the stage (a file made under other settings is not resumed), the steps
//!   done, every loss so far, the training seconds so far, each weight's
//!   AdamW step count, and the word position of the loop's noise stream
//!   when it has one (the VAE's; the other draws are pure functions of the
//!   step).
//!
//! Written atomically (temp file + rename, [`save_tensors`]) every
//! [`DEFAULT_EVERY`] of training and when the loop is asked to stop
//! (Ctrl-C / SIGTERM, or the stage running beside it failed), so a `kill
//! -9` loses at most that much work. Why not the trainer's checkpoints
//! ([`crate::train::state`]): those are for the UNet of a manifest run
//! (keys under the checkpoint's UNet prefix, a run id, a data position);
//! these loops train other models on draws that need only the step.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::models::sdxl::checkpoint::{
    remove_partial_saves, save_tensors, Checkpoint, SaveOptions,
};
use crate::nn::optim::{AdamW, SlotState};
use crate::stages::Ctx;
use crate::{Error, Result};

/// Metadata key holding [`Saved`].
const STATE_KEY: &str = "eps2v.toy_resume";

/// How much training a `kill -9` may lose at most.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(60);

/// Where a toy trainer keeps its resumable state, and when it saves and
/// stops.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    path: PathBuf,
    key: String,
    every: Duration,
    stop_at: Option<usize>,
}

impl Checkpoints {
    /// State in `path` for the stage whose settings are `key`; saved every
    /// [`DEFAULT_EVERY`] of training.
    pub fn new(path: impl Into<PathBuf>, key: &serde_json::Value) -> Self {
        Self {
            path: path.into(),
            key: key.to_string(),
            every: DEFAULT_EVERY,
            stop_at: None,
        }
    }

    /// Save at most this often (`Duration::ZERO`: after every step).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Stop as if interrupted once this many steps are done (tests of
    /// resume).
    pub fn stop_at(mut self, step: Option<usize>) -> Self {
        self.stop_at = step;
        self
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the state file (the stage's product is saved), and any
    /// temporary file a killed save left beside it.
    pub fn remove(&self) -> Result<()> {
        sweep_partial(&self.path)?;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&self.path),
            _ => Ok(()),
        }
    }
}

/// Temporary files of saves of `path` that a kill left behind.
fn sweep_partial(path: &Path) -> Result<()> {
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        remove_partial_saves(dir, Some(name))?;
    }
    Ok(())
}

/// What the state file holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    key: String,
    step: usize,
    losses: Vec<f32>,
    seconds: f64,
    /// Per weight name.
    adam_steps: BTreeMap<String, u64>,
    /// `ChaCha8Rng::get_word_pos`, in decimal (u128 does not fit JSON numbers).
    rng_word_pos: Option<String>,
}

/// The bookkeeping of one toy training loop: what it resumed from, its
/// losses, its time, its saves and its stop.
pub struct TrainLoop<'a> {
    what: &'static str,
    steps: usize,
    ctx: &'a Ctx,
    ck: Option<&'a Checkpoints>,
    named: Vec<(String, Var)>,
    started: Instant,
    last_save: Instant,
    before: f64,
    /// The first step this process runs (0, or the steps a resume found done).
    pub start: usize,
    /// Every loss so far, resumed ones first.
    pub losses: Vec<f32>,
    /// The noise stream's word position at `start`, when one was saved.
    pub rng_word_pos: Option<u128>,
}

impl<'a> TrainLoop<'a> {
    /// Start the loop `what` of `steps` steps over the weights `named`
    /// (each optimised by `opt`): from the state in `ck` when it holds one
    /// of the same settings (weights, moments, losses, position restored),
    /// otherwise from step 0.
    pub fn start(
        what: &'static str,
        steps: usize,
        named: Vec<(String, Var)>,
        opt: &mut AdamW,
        ck: Option<&'a Checkpoints>,
        ctx: &'a Ctx,
    ) -> Result<Self> {
        let now = Instant::now();
        let mut lp = Self {
            what,
            steps,
            ctx,
            ck,
            named,
            started: now,
            last_save: now,
            before: 0.0,
            start: 0,
            losses: Vec::with_capacity(steps),
            rng_word_pos: None,
        };
        if let Some(ck) = ck {
            sweep_partial(&ck.path)?;
            if ck.path.is_file() {
                lp.restore(ck, opt)?;
            }
        }
        Ok(lp)
    }

    fn restore(&mut self, ck: &Checkpoints, opt: &mut AdamW) -> Result<()> {
        let path = &ck.path;
        let bad = |why: String| {
            Error::config(format!(
                "{}: {why}; delete it to train the toy {} from the start",
                path.display(),
                self.what
            ))
        };
        let file = Checkpoint::open(path)?;
        let saved: Saved = serde_json::from_str(
            file.metadata()
                .get(STATE_KEY)
                .ok_or_else(|| bad(format!("no {STATE_KEY} metadata")))?,
        )
        .map_err(|e| bad(format!("bad {STATE_KEY} metadata: {e}")))?;
        if saved.key != ck.key {
            self.ctx.say(&format!(
                "toy build: {} was saved under other settings; training the toy {} from the start",
                path.display(),
                self.what
            ));
            return Ok(());
        }
        if saved.step >= self.steps || saved.losses.len() != saved.step {
            return Err(bad(format!(
                "it says {} steps done with {} losses, of {}",
                saved.step,
                saved.losses.len(),
                self.steps
            )));
        }
        let get = |k: &str| -> Result<Tensor> {
            if !file.entries().contains_key(k) {
                return Err(bad(format!("tensor {k} is missing")));
            }
            file.tensor(k, DType::F32, &Device::Cpu)
        };
        let mut slots: HashMap<TensorId, SlotState> = HashMap::new();
        for (name, var) in &self.named {
            let w = get(&format!("w.{name}"))?;
            if w.dims() != var.dims() {
                return Err(bad(format!(
                    "w.{name} has shape {:?}, the model {:?}",
                    w.dims(),
                    var.dims()
                )));
            }
            var.set(&w.to_dtype(var.dtype())?)?;
            let step = *saved
                .adam_steps
                .get(name)
                .ok_or_else(|| bad(format!("no AdamW step count for {name}")))?;
            slots.insert(
                var.as_tensor().id(),
                SlotState {
                    step,
                    m: get(&format!("m.{name}"))?,
                    v: get(&format!("v.{name}"))?,
                },
            );
        }
        let states = opt
            .vars()
            .map(|v| {
                slots
                    .remove(&v.as_tensor().id())
                    .ok_or_else(|| bad("the optimizer has a weight the file does not name".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        opt.load_state(&states)?;
        self.rng_word_pos = match &saved.rng_word_pos {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| bad(format!("bad noise position {s:?}")))?,
            ),
        };
        self.start = saved.step;
        self.before = saved.seconds;
        self.losses = saved.losses;
        self.ctx.say(&format!(
            "toy build: resuming the toy {} at step {} of {}",
            self.what, self.start, self.steps
        ));
        Ok(())
    }

    /// Training seconds so far, those before a resume included.
    pub fn seconds(&self) -> f64 {
        self.before + self.started.elapsed().as_secs_f64()
    }

    /// After step `done` (1-based) of the loop: save the state when it is
    /// time, and when a stop is asked for (Ctrl-C / SIGTERM, the stage
    /// beside it failed, or [`Checkpoints::stop_at`]) save it and return
    /// an error that says how to go on. `rng_word_pos`: the noise stream's
    /// position after this step.
    pub fn after_step(
        &mut self,
        done: usize,
        opt: &AdamW,
        rng_word_pos: Option<u128>,
    ) -> Result<()> {
        if done >= self.steps {
            return Ok(());
        }
        let stop = self.ctx.should_stop() || self.ck.is_some_and(|c| c.stop_at == Some(done));
        let Some(ck) = self.ck else {
            if stop {
                let msg = format!(
                    "toy {} training: stopped at step {done} of {} (interrupted, or a stage running beside it failed)",
                    self.what, self.steps
                );
                return Err(if crate::signal::requested() {
                    Error::Interrupted(msg)
                } else {
                    Error::Other(msg)
                });
            }
            return Ok(());
        };
        if stop || self.last_save.elapsed() >= ck.every {
            self.save(ck, done, opt, rng_word_pos)?;
            self.last_save = Instant::now();
        }
        if stop {
            return Err(Error::Interrupted(format!(
                "toy {} training: interrupted at step {done} of {}, saved in {}; rerun `eps2v toy build` with the same settings to resume it from there",
                self.what,
                self.steps,
                ck.path.display()
            )));
        }
        Ok(())
    }

    fn save(&self, ck: &Checkpoints, done: usize, opt: &AdamW, rng: Option<u128>) -> Result<()> {
        let names: HashMap<TensorId, &str> = self
            .named
            .iter()
            .map(|(n, v)| (v.as_tensor().id(), n.as_str()))
            .collect();
        let mut tensors: Vec<(String, Tensor)> = self
            .named
            .iter()
            .map(|(n, v)| (format!("w.{n}"), v.as_tensor().clone()))
            .collect();
        let mut adam_steps = BTreeMap::new();
        for (var, st) in opt.vars().zip(opt.state()?) {
            let name = names.get(&var.as_tensor().id()).ok_or_else(|| {
                Error::Other(format!(
                    "toy {} training: the optimizer has a weight without a name",
                    self.what
                ))
            })?;
            adam_steps.insert(name.to_string(), st.step);
            tensors.push((format!("m.{name}"), st.m));
            tensors.push((format!("v.{name}"), st.v));
        }
        let saved = Saved {
            key: ck.key.clone(),
            step: done,
            losses: self.losses.clone(),
            seconds: self.seconds(),
            adam_steps,
            rng_word_pos: rng.map(|p| p.to_string()),
        };
        let mut metadata = BTreeMap::new();
        metadata.insert(STATE_KEY.to_string(), serde_json::to_string(&saved)?);
        save_tensors(
            &ck.path,
            &tensors,
            &SaveOptions {
                metadata,
                ..Default::default()
            },
        )
    }
}

/// The weights of `varmap` under their names, `prefix` in front, sorted.
pub fn named_vars(varmap: &candle_nn::VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> = data
        .iter()
        .map(|(k, var)| (format!("{prefix}{k}"), var.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::vae::{train_vae, VaeTraining};

    fn opts() -> VaeTraining {
        VaeTraining {
            steps: 4,
            batch: 2,
            lr: 3e-3,
            ..Default::default()
        }
    }

    fn bytes(t: &BTreeMap<String, Tensor>) -> Vec<(String, Vec<f32>)> {
        t.iter()
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// The VAE trained in one go, against stopped at step 2 (state saved)
    /// and resumed: the same weights and losses, bit for bit; the resumed
    /// run's seconds include the first run's. The VAE's loop is the one
    /// with a noise stream, so this also checks its position is restored.
    #[test]
    fn stopped_and_resumed_equals_one_go() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, rep) = train_vae(&opts(), None, &Ctx::quiet()).unwrap();
        let key = serde_json::json!({"vae": 1});
        let ck = Checkpoints::new(dir.path().join("vae.resume.safetensors"), &key);
        let err = train_vae(&opts(), Some(&ck.clone().stop_at(Some(2))), &Ctx::quiet())
            .unwrap_err()
            .to_string();
        assert!(err.contains("interrupted at step 2 of 4"), "{err}");
        assert!(err.contains("vae.resume.safetensors"), "{err}");
        assert!(ck.path().is_file());
        let (resumed, rep2) = train_vae(&opts(), Some(&ck), &Ctx::quiet()).unwrap();
        assert_eq!(rep2.losses, rep.losses);
        assert_eq!(
            bytes(&resumed.tensors().unwrap()),
            bytes(&whole.tensors().unwrap())
        );
        ck.remove().unwrap();
        assert!(!ck.path().exists());
        ck.remove().unwrap();
    }

    /// What a `kill -9` leaves: the state of the last timed save (here
    /// after every step, so step 3 of 4) and a half-written temporary file.
    /// A resume goes on from step 3, sweeps the temporary file, and ends
    /// where one go ends. A state saved under other settings is not
    /// resumed (the loop starts over and still ends there); a file that is
    /// not a state file is an error that names it and says what to do.
    #[test]
    fn a_kill_loses_at_most_one_save_interval_and_other_settings_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, rep) = train_vae(&opts(), None, &Ctx::quiet()).unwrap();
        let key = serde_json::json!({"vae": 1});
        let path = dir.path().join("vae.resume.safetensors");
        let ck = Checkpoints::new(&path, &key).every(Duration::ZERO);
        train_vae(&opts(), Some(&ck), &Ctx::quiet()).unwrap();
        let saved: Saved =
            serde_json::from_str(Checkpoint::open(&path).unwrap().metadata()[STATE_KEY].as_str())
                .unwrap();
        assert_eq!((saved.step, saved.losses.len()), (3, 3));
        assert!(saved.rng_word_pos.is_some());
        let partial = dir.path().join(".vae.resume.safetensors.tmp-12345");
        std::fs::write(&partial, b"half").unwrap();
        let (resumed, rep2) = train_vae(&opts(), Some(&ck), &Ctx::quiet()).unwrap();
        assert!(!partial.exists());
        assert_eq!(rep2.losses, rep.losses);
        assert_eq!(
            bytes(&resumed.tensors().unwrap()),
            bytes(&whole.tensors().unwrap())
        );

        // Other settings: not resumed.
        let other = Checkpoints::new(&path, &serde_json::json!({"vae": 2}));
        let (fresh, rep3) = train_vae(&opts(), Some(&other), &Ctx::quiet()).unwrap();
        assert_eq!(rep3.losses, rep.losses);
        assert_eq!(
            bytes(&fresh.tensors().unwrap()),
            bytes(&whole.tensors().unwrap())
        );

        // Not a state file.
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = train_vae(&opts(), Some(&ck), &Ctx::quiet())
            .unwrap_err()
            .to_string();
        assert!(err.contains("vae.resume.safetensors"), "{err}");
        let plain = dir.path().join("plain.safetensors");
        save_tensors(
            &plain,
            &[(
                "x".to_string(),
                Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            )],
            &SaveOptions::default(),
        )
        .unwrap();
        std::fs::rename(&plain, &path).unwrap();
        let err = train_vae(&opts(), Some(&ck), &Ctx::quiet())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vae.resume.safetensors") && err.contains("delete it"),
            "{err}"
        );
    }

    /// Without a state file the loop still stops when asked (the stage
    /// beside it failed), with an error naming where.
    #[test]
    fn a_cancelled_loop_without_state_stops_after_its_step() {
        let ctx = Ctx::quiet();
        ctx.cancel();
        let err = train_vae(&opts(), None, &ctx).unwrap_err().to_string();
        assert!(
            err.contains("toy VAE training: stopped at step 1 of 4"),
            "{err}"
        );
    }
}
