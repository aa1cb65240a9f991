//! `eps2v run [CONFIG.toml]`: the whole job from one config — generate →
//! caption → filter → dedupe → bucket → train (eps → v with ZTSNR) → merge
//! sweep → evaluate → report — each stage through its library entry point
//! and recorded in the manifest's `runs` table by the stage itself.
//!
//! **Resuming.** The pipeline has its own `runs` row (`stage = 'run'`,
//! `config_json` = the resolved [`RunConfig`]); its `counts_json` holds the
//! progress: per finished stage, a digest and the stage's result. A stage's
//! digest chains the settings of every stage up to it (a change upstream
//! makes everything after it stale), so a rerun skips each stage whose
//! digest is unchanged and runs the rest. Stages are themselves resumable
//! after `kill -9` (their items are committed in batches); `train` resumes
//! the newest unfinished training run with the same settings from its last
//! checkpoint (bit-exact, see [`crate::train`]). A rerun with the same
//! config reuses the same pipeline row (and so the same `runs/<id>/`
//! folder); another config starts a new row and carries over the results
//! of the stages whose digests still match.
//!
//! Outputs under `<dataset>/runs/<id>/`: `converted.safetensors`,
//! `merges/merge-a<α>.safetensors` (+ grids), `report/index.html`.

pub mod adherence;
pub mod config;
pub mod defaults;
mod digest;
mod evaluate;
mod keys;
mod progress;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::manifest::{Manifest, RunLock};
use crate::merge::{self, MergeConfig, Side, SweepEval};
use crate::pipeline::LoadOptions;
use crate::stages::{self, Ctx};
use crate::train::eval::EvalSpec;
use crate::train::{self, TrainOptions};
use crate::{Error, Result};

pub use adherence::{Adherence, AdherenceFn, AdherenceRequest, TaggerAdherence};
pub use config::{RunConfig, STAGES};
pub use digest::digests;
use evaluate::evaluate;
use progress::save_progress;
pub use progress::{ModelScore, Progress, StageRecord};

/// One stage as this invocation saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageTiming {
    /// Stage name.
    pub stage: String,
    /// Wall time of this invocation, seconds (0 when skipped).
    pub seconds: f64,
    /// Wall time when it ran (the earlier invocation's when skipped).
    pub ran_seconds: f64,
    /// Done by an earlier invocation with the same settings; not rerun.
    pub skipped: bool,
    /// One line of what it did.
    pub summary: String,
    /// Items this stage failed or rejected (exit code 1 at the end).
    pub failed: u64,
}

/// What `eps2v run` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// The pipeline's run id (`runs/<id>/`).
    pub run_id: i64,
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Per stage, in order.
    pub stages: Vec<StageTiming>,
    /// Adherence of each model (from `evaluate`).
    pub scores: Vec<ModelScore>,
    /// The converted model.
    pub converted: Option<PathBuf>,
    /// α and file of the merge with the best adherence (retention when not evaluated).
    pub best_merge: Option<(f64, PathBuf)>,
    /// The report page.
    pub report: Option<PathBuf>,
    /// Stopped by SIGINT / SIGTERM (in generate, caption or train, or
    /// between two stages); what was done is kept: rerun the same command
    /// to go on.
    pub interrupted: bool,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
}

impl RunReport {
    /// Record that `stage` stopped on a signal after `seconds`.
    fn stopped_in(&mut self, stage: &str, seconds: f64, summary: String) {
        self.interrupted = true;
        self.stages.push(StageTiming {
            stage: stage.to_string(),
            seconds,
            summary,
            ..Default::default()
        });
    }

    /// Failed or rejected items over all stages, those an earlier
    /// invocation ran too: a rerun after a kill ends as the run
    /// uninterrupted would (its exit status included).
    pub fn failed(&self) -> u64 {
        self.stages.iter().map(|s| s.failed).sum()
    }
}

/// Open the dataset's manifest (creating the folder when `generate` runs).
fn open_dataset(root: &Path, creates: bool) -> Result<Manifest> {
    if root.join(crate::manifest::MANIFEST_FILE).is_file() {
        return Manifest::open(root);
    }
    if !creates {
        return Err(Error::config(format!(
            "dataset {}: no manifest there; run the generate stage first (add \"generate\" to stages) or point `dataset` at an existing dataset",
            root.display()
        )));
    }
    stages::generate::check_dir(root)?;
    Manifest::init(root)
}

/// The pipeline row to use, locked for this process: the newest with the
/// same config key (reopened, its stored config updated to the paths given
/// now), or a new one carrying over the newest row's still-valid stages.
/// While another process runs the newest row (its lock is held), a second
/// `run` on the dataset is refused, naming that process.
fn pipeline_row(
    m: &Manifest,
    value: &serde_json::Value,
    digests: &BTreeMap<String, String>,
    key: &str,
) -> Result<(i64, Progress, RunLock)> {
    let latest: Option<(i64, String, Option<String>)> = m
        .conn()
        .query_row(
            "SELECT id, config_json, counts_json FROM runs WHERE stage = 'run' ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(m.err(e)),
        })?;
    let mut progress = Progress {
        key: key.to_string(),
        ..Default::default()
    };
    // The newest row, when a new row replaces it: left `running` by a
    // killed `run`, it is marked failed (no later `run` looks at it again).
    let mut replaced = None;
    if let Some((id, json, counts)) = &latest {
        // Refused while another process runs it, whatever the config.
        let lock = m.lock_run(*id)?;
        let old: Progress = counts
            .as_deref()
            .and_then(|c| serde_json::from_str::<Progress>(c).ok())
            .unwrap_or_default()
            .resolved(m.root());
        // Rows from before the key was kept: the same config by value.
        let same = if old.key.is_empty() {
            serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .as_ref()
                == Some(value)
        } else {
            old.key == key
        };
        progress.stages = old
            .stages
            .into_iter()
            .filter(|(s, r)| digests.get(s) == Some(&r.digest))
            .collect();
        if same {
            m.conn()
                .execute(
                    "UPDATE runs SET status = 'running', ended_at = NULL, config_json = ?2 WHERE id = ?1",
                    rusqlite::params![id, serde_json::to_string(value)?],
                )
                .map_err(|e| m.err(e))?;
            save_progress(m, *id, &progress)?;
            return Ok((*id, progress, lock));
        }
        replaced = Some((*id, lock));
    }
    let id = m.begin_run("run", value)?;
    let lock = m.lock_run(id)?;
    if let Some((old, _held)) = replaced {
        m.mark_dead(old, id)?;
    }
    save_progress(m, id, &progress)?;
    Ok((id, progress, lock))
}

/// The evaluation prompts: `prompt_count` draws from the generate template.
pub fn eval_prompts(cfg: &RunConfig) -> Result<Vec<String>> {
    let g = cfg.generate_config()?;
    let template = crate::prompts::load(&g.template, g.wildcards.as_deref())?;
    Ok((0..cfg.evaluate.prompt_count as u64)
        .map(|i| crate::prompts::tidy(&template.random(cfg.evaluate.prompt_seed, i)))
        .collect())
}

/// The evaluation spec shared by the sweep and the adherence measurements.
pub fn eval_spec(cfg: &RunConfig) -> Result<EvalSpec> {
    let e = &cfg.evaluate;
    Ok(EvalSpec {
        prompts: eval_prompts(cfg)?,
        seeds: e.seeds.clone(),
        width: e.size[0],
        height: e.size[1],
        steps: e.steps,
        cfg: e.cfg,
        sampler: crate::diffusion::SamplerKind::Euler,
        uncond: crate::diffusion::UncondMode::Zero,
    })
}

/// Device and dtype of the models the pipeline loads itself.
pub fn placement(cfg: &RunConfig) -> Result<LoadOptions> {
    let device = match &cfg.device.device {
        Some(spec) => crate::nn::device::device_as(
            spec,
            &crate::nn::device::DeviceSource {
                name: "device.device",
                use_cpu: "set device = \"cpu\" under [device] in the config",
            },
        )?,
        None => crate::nn::default_device(),
    };
    let requested = match cfg.device.precision.as_deref() {
        Some(p) => Some(crate::nn::device::parse_dtype(p).map_err(|_| {
            Error::config(format!("device.precision {p:?}: expected f32, bf16 or f16"))
        })?),
        None => None,
    };
    let dtype = crate::nn::model_dtype(&device, requested)?;
    Ok(LoadOptions {
        device: Some(device),
        dtype: Some(dtype),
        ..Default::default()
    })
}

/// The trainer's options in a run: `[device]`'s device and precision (of
/// the frozen models; the trained UNet computes in f32).
fn train_options(cfg: &RunConfig, resume: Option<i64>) -> Result<TrainOptions> {
    let place = placement(cfg)?;
    Ok(TrainOptions {
        resume,
        device: place.device,
        dtype: place.dtype,
        ..Default::default()
    })
}

/// The newest run id of the manifest.
fn newest_run(m: &Manifest) -> Result<Option<i64>> {
    m.conn()
        .query_row("SELECT max(id) FROM runs", [], |r| r.get(0))
        .map_err(|e| m.err(e))
}

/// The first pipeline stage whose input a run outside the pipeline
/// changed since the pipeline's stages ended (index into [`STAGES`]), and
/// that run's stage: a dataset-writing run newer than every recorded
/// stage's [`StageRecord::last_run`]. `import`, `generate` and `manifest
/// merge` change what `generate` made; `caption`, `filter`, `dedupe` and
/// `bucket` their own stage's results. `None` when nothing did (or no
/// record says what the pipeline saw).
pub(crate) fn changed_outside(
    m: &Manifest,
    progress: &Progress,
) -> Result<Option<(usize, String)>> {
    let Some(seen) = progress.stages.values().filter_map(|r| r.last_run).max() else {
        return Ok(None);
    };
    let mut st = m
        .conn()
        .prepare("SELECT DISTINCT stage FROM runs WHERE id > ?1")
        .map_err(|e| m.err(e))?;
    let stages = st
        .query_map([seen], |r| r.get::<_, String>(0))
        .map_err(|e| m.err(e))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(|e| m.err(e))?;
    fn at(stage: &str) -> Option<&str> {
        match stage {
            "import" | "generate" | "merge" => Some("generate"),
            "caption" | "filter" | "dedupe" | "bucket" => Some(stage),
            _ => None,
        }
    }
    Ok(stages
        .iter()
        .filter_map(|s| {
            let first = at(s)?;
            Some((STAGES.iter().position(|x| *x == first)?, s.clone()))
        })
        .min())
}

/// Run the pipeline (module docs). `cfg` must be resolved and checked
/// ([`RunConfig::resolve`], [`RunConfig::check_files`]); `adherence` is
/// called by the `evaluate` stage (`None`: the tagger of `[caption]`).
pub fn run(cfg: &RunConfig, adherence: Option<&AdherenceFn<'_>>, ctx: &Ctx) -> Result<RunReport> {
    let t0 = Instant::now();
    // Ctrl-C / SIGTERM: the stage running stops at its next safe point
    // (keeping its work), and no further stage starts.
    let _signals = crate::signal::install();
    let root = cfg.dataset.clone();
    let mut m = open_dataset(&root, cfg.has("generate"))?;
    let (digests, key) = digests(cfg)?;
    let _pipeline = m.pipeline_lock()?;
    let (run_id, mut progress, _lock) =
        pipeline_row(&m, &serde_json::to_value(cfg)?, &digests, &key)?;
    let out_dir = train::run_dir(&root, run_id);
    std::fs::create_dir_all(&out_dir).at(&out_dir)?;
    // What a killed attempt at this row left half-written (the row's lock
    // is held: no other process writes here): temporary files of the
    // report, grids and sweep state, and partial merges.
    crate::stages::import::sweep_temp_files(&out_dir)?;
    crate::models::sdxl::checkpoint::remove_partial_saves(&out_dir.join("merges"), None)?;
    let mut report = RunReport {
        run_id,
        dataset: root.clone(),
        ..Default::default()
    };
    let base = cfg.model_path();
    // A curation command run on the dataset outside this pipeline since its
    // last stage (`eps2v caption DS --policy …`, `bucket`, `import`, a
    // `manifest merge`): the pipeline's stages from the one it affects run
    // again, or they would be skipped on a dataset they no longer describe.
    if let Some((at, other)) = changed_outside(&m, &progress)? {
        let stale: Vec<String> = progress
            .stages
            .keys()
            .filter(|s| STAGES.iter().position(|x| x == s).unwrap_or(0) >= at)
            .cloned()
            .collect();
        if !stale.is_empty() {
            ctx.say(&format!(
                "the dataset changed outside this pipeline since its last stage (a `{other}` run): {} run again",
                stale.join(", ")
            ));
            progress.stages.retain(|s, _| !stale.contains(s));
        }
    }
    // An error ends the row (below) rather than leaving it `running`.
    let result = (|| -> Result<()> {
        for stage in &cfg.stages {
            let digest = digests[stage.as_str()].clone();
            if let Some(r) = progress
                .stages
                .get(stage.as_str())
                .filter(|r| r.digest == digest)
            {
                report.stages.push(StageTiming {
                    stage: stage.clone(),
                    seconds: 0.0,
                    ran_seconds: r.seconds,
                    skipped: true,
                    summary: r.summary.clone(),
                    failed: r.failed,
                });
                continue;
            }
            if ctx.should_stop() {
                report.stopped_in(stage, 0.0, "not started: interrupted".into());
                break;
            }
            // Everything after a stage that runs again is stale.
            let at = STAGES.iter().position(|s| s == stage).unwrap_or(0);
            progress
                .stages
                .retain(|s, _| STAGES.iter().position(|x| x == s).unwrap_or(0) < at);
            let ts = Instant::now();
            let mut rec = StageRecord {
                digest,
                ..Default::default()
            };
            match stage.as_str() {
                "generate" => {
                    let g = cfg.generate_config()?;
                    let (template, model) = stages::generate::load_inputs(&g, &placement(cfg)?)?;
                    let r = stages::generate::run(&g, &template, &model, &mut m, ctx)?;
                    if r.interrupted {
                        report.stopped_in(
                            stage,
                            ts.elapsed().as_secs_f64(),
                            format!(
                                "interrupted: {} rendered now, {} left; rerun to render them",
                                r.rendered, r.remaining
                            ),
                        );
                        break;
                    }
                    rec.failed = r.rejected_total();
                    rec.summary = format!(
                        "{} rendered, {} already there, {} rejected ({:.2} images/s)",
                        r.rendered, r.skipped, rec.failed, r.images_per_second
                    );
                }
                "caption" => {
                    // The tagger runs where `[device]` says, in f32 (as the
                    // reference taggers run; their thresholds assume it).
                    let mut c = cfg.caption.clone();
                    c.device = placement(cfg)?.device;
                    let r = stages::caption::run(&c, &mut m, ctx)?;
                    if r.interrupted {
                        report.stopped_in(
                            stage,
                            ts.elapsed().as_secs_f64(),
                            format!(
                                "interrupted: {} tagged now, {} items left; rerun to do them",
                                r.tagged, r.remaining
                            ),
                        );
                        break;
                    }
                    rec.failed = r.rejected_total() as u64;
                    rec.summary = format!(
                        "{} tagged, {} captioned, mean alignment {}",
                        r.tagged,
                        r.captioned,
                        r.mean_alignment.map_or("-".into(), |a| format!("{a:.3}"))
                    );
                }
                "filter" => {
                    let r = stages::filter::run(&cfg.filter, &mut m)?;
                    rec.summary = format!(
                        "{} scored, {} kept, {}{} rejected below alignment {}",
                        r.scored,
                        r.kept,
                        r.duplicates_text(),
                        r.rejected,
                        r.min_alignment
                    );
                }
                "dedupe" => {
                    let r = stages::dedupe::run(&cfg.dedupe, &mut m, ctx)?;
                    rec.summary = format!(
                        "{} considered, {} exact + {} near duplicates dropped",
                        r.considered, r.exact, r.near
                    );
                }
                "bucket" => {
                    let r = stages::bucket::run(&cfg.bucket, &mut m, ctx);
                    let Some(r) = until_stopped(r, &mut report, stage, ts)? else {
                        break;
                    };
                    rec.failed = r.rejected.values().sum::<usize>() as u64;
                    let hist: Vec<String> = r
                        .histogram
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    // Nothing newly bucketed (a rerun): no empty histogram.
                    let hist = if hist.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", hist.join(", "))
                    };
                    rec.summary = format!(
                        "{} bucketed, {} already, {} rejected{hist}",
                        r.bucketed, r.already, rec.failed,
                    );
                }
                "train" => {
                    let mut t = cfg.train.clone();
                    if t.out.is_none() {
                        t.out = Some(out_dir.join("converted.safetensors"));
                    }
                    let resume = train::state::adoptable_run(&m, &t)?;
                    // With `generate` in the run, the config check refused
                    // this; here the dataset was made earlier.
                    if !cfg.has("generate") && resume.is_none() {
                        if let Some(w) = train::same_prediction_warning(&t, &m)? {
                            ctx.say(&format!("warning: {w}"));
                        }
                    }
                    let r = train::train(&t, &mut m, &train_options(cfg, resume)?, ctx)?;
                    if r.interrupted {
                        report.stopped_in(
                            stage,
                            ts.elapsed().as_secs_f64(),
                            format!("interrupted at step {}; rerun to resume", r.steps),
                        );
                        break;
                    }
                    let converted = r
                        .exported
                        .iter()
                        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
                        .cloned()
                        .ok_or_else(|| Error::Other("train: no checkpoint was exported".into()))?;
                    rec.summary = format!(
                        "{} steps{}, {} train / {} val items, last loss {}, retention {}{}",
                        r.steps,
                        if r.resumed { " (resumed)" } else { "" },
                        r.train_items,
                        r.val_items,
                        r.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
                        r.exported_retention
                            .map_or("-".into(), |v| format!("{v:.3}")),
                        match (&r.stopped_early, r.exported_step) {
                            (Some(_), Some(s)) => format!(" (stopped early; step {s} exported)"),
                            _ => String::new(),
                        }
                    );
                    rec.train_run = Some(r.run_id);
                    rec.converted = Some(converted);
                    rec.retention = r.retention.clone();
                    rec.exported_retention = r.exported_retention;
                }
                "merge" => {
                    const NO_MODEL: &str = "merge: no converted model: list `train` before `merge` (or keep its earlier result by leaving [train] unchanged)";
                    let converted = progress
                        .stages
                        .get("train")
                        .and_then(|r| r.converted.clone())
                        .ok_or_else(|| Error::config(NO_MODEL))?;
                    let dir = out_dir.join("merges");
                    std::fs::create_dir_all(&dir).at(&dir)?;
                    let spec = eval_spec(cfg)?;
                    let r = merge::sweep(
                        &MergeConfig {
                            a: converted,
                            b: base.clone(),
                            c: None,
                            alpha: 0.0,
                            blocks: cfg.merge_blocks()?,
                            te: Side::A,
                            vae: Side::A,
                            markers: Some(Side::A),
                            dtype: None,
                        },
                        &cfg.merge.alphas,
                        &dir.join("merge.safetensors"),
                        &SweepEval {
                            reference: Some(base.clone()),
                            prompts: spec.prompts.clone(),
                            seeds: spec.seeds.clone(),
                            steps: spec.steps,
                            cfg: spec.cfg,
                            width: spec.width,
                            height: spec.height,
                            load: placement(cfg)?,
                            // The converted model on the merges' measure,
                            // for `evaluate` and the report.
                            score_a: true,
                        },
                        ctx,
                    );
                    let Some(r) = until_stopped(r, &mut report, stage, ts)? else {
                        break;
                    };
                    let pts: Vec<String> = r
                        .a_retention
                        .map(|x| format!("converted retention {x:.3}"))
                        .into_iter()
                        .chain(
                            r.points
                                .iter()
                                .map(|p| format!("α {} retention {:.3}", p.alpha, p.retention)),
                        )
                        .collect();
                    rec.summary = pts.join(", ");
                    rec.sweep = Some(r);
                }
                "evaluate" => {
                    let r = evaluate(cfg, &progress, &out_dir, adherence, ctx);
                    let Some(scores) = until_stopped(r, &mut report, stage, ts)? else {
                        break;
                    };
                    rec.scores = scores;
                    let parts: Vec<String> = rec
                        .scores
                        .iter()
                        .map(|s| format!("{} {:.1} %", s.label, 100.0 * s.adherence.overall))
                        .collect();
                    rec.summary = parts.join("; ");
                }
                "report" => {
                    let page = report::write(&m, cfg, run_id, &progress, &out_dir.join("report"))?;
                    rec.summary = progress::stored_path(&root, &page).display().to_string();
                    rec.page = Some(page);
                }
                other => return Err(Error::config(format!("stages: unknown stage `{other}`"))),
            }
            rec.seconds = ts.elapsed().as_secs_f64();
            rec.last_run = newest_run(&m)?;
            report.stages.push(StageTiming {
                stage: stage.clone(),
                seconds: rec.seconds,
                ran_seconds: rec.seconds,
                skipped: false,
                summary: rec.summary.clone(),
                failed: rec.failed,
            });
            progress.stages.insert(stage.clone(), rec);
            save_progress(&m, run_id, &progress)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        // The row ends `failed` with the error; the next `run` with the
        // same config reopens it and goes on from the stages done, which
        // are listed before the error is.
        m.fail_run(run_id, &progress.stored(&root), &e);
        for s in &report.stages {
            let kept = if s.skipped { " (kept from before)" } else { "" };
            ctx.say(&format!("{:<9} done{kept}: {}", s.stage, s.summary));
        }
        if let Some(next) = cfg.stages.get(report.stages.len()) {
            ctx.say(&format!(
                "{next:<9} failed (below); rerun the same command once it is fixed: the stages above are kept"
            ));
        }
        return Err(e);
    }
    if let Some(r) = progress.stages.get("train") {
        report.converted = r.converted.clone();
    }
    if let Some(r) = progress.stages.get("evaluate") {
        report.scores = r.scores.clone();
    }
    report.best_merge = best_merge(&progress);
    if let Some(r) = progress.stages.get("report") {
        report.report = Some(r.page.clone().unwrap_or_else(|| PathBuf::from(&r.summary)));
    }
    report.seconds = t0.elapsed().as_secs_f64();
    // An interrupted row ends `failed`; the next `run` with the same
    // config reopens it ([`pipeline_row`]).
    progress.interrupted = report.interrupted;
    m.end_run(run_id, !report.interrupted, &progress.stored(&root))?;
    Ok(report)
}

/// A stage's result, or `None` when a stop request ended it
/// ([`Error::Interrupted`], recorded in `report` as where the pipeline
/// stopped).
fn until_stopped<T>(
    r: Result<T>,
    report: &mut RunReport,
    stage: &str,
    started: Instant,
) -> Result<Option<T>> {
    match r {
        Err(Error::Interrupted(why)) => {
            let secs = started.elapsed().as_secs_f64();
            report.stopped_in(stage, secs, format!("interrupted: {why}"));
            Ok(None)
        }
        r => r.map(Some),
    }
}

/// The merge with the best adherence (the `evaluate` scores), else the
/// sweep's best retention.
pub fn best_merge(p: &Progress) -> Option<(f64, PathBuf)> {
    let sweep = p.stages.get("merge")?.sweep.as_ref()?;
    let scored = p.stages.get("evaluate").map(|e| &e.scores);
    let by_adherence = scored.and_then(|scores| {
        sweep
            .points
            .iter()
            .filter_map(|pt| {
                scores
                    .iter()
                    .find(|s| s.model == pt.out)
                    .map(|s| (s.adherence.overall, pt))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, pt)| (pt.alpha, pt.out.clone()))
    });
    by_adherence.or_else(|| {
        sweep
            .points
            .iter()
            .find(|pt| pt.alpha == sweep.best_alpha)
            .map(|pt| (pt.alpha, pt.out.clone()))
    })
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
