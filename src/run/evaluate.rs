//! The `evaluate` stage of `run`: the adherence of each model the
//! pipeline made (and of the base both ways), with the scores of eps2v's own
//! measure kept in `report/eval-scores.json` ([`ScoreCache`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{digest, eval_spec, placement, RunConfig};
use super::{Adherence, AdherenceFn, AdherenceRequest, ModelScore, Progress, TaggerAdherence};
use crate::diffusion::Prediction;
use crate::error::IoContext;
use crate::stages::Ctx;
use crate::{Error, Result};

/// The `evaluate` stage: adherence of the base in its own prediction, the
/// same weights as the objective (untrained), the converted model and each
/// merge.
pub(super) fn evaluate(
    cfg: &RunConfig,
    progress: &Progress,
    out_dir: &Path,
    hook: Option<&AdherenceFn<'_>>,
    ctx: &Ctx,
) -> Result<Vec<ModelScore>> {
    let own;
    // With eps2v's own measure, scores are kept by what decides them, so a
    // killed or repeated evaluate measures only what it has not.
    let mut cache: Option<ScoreCache> = None;
    let dir = out_dir.join("report");
    let hook: &AdherenceFn<'_> = match hook {
        Some(h) => h,
        None => {
            let tagger = cfg.caption.tagger.clone().ok_or_else(|| {
                Error::config("evaluate: needs a tagger (caption.tagger) to measure adherence")
            })?;
            let (spec, place) = (eval_spec(cfg)?, placement(cfg)?);
            cache = Some(ScoreCache::open(
                &dir,
                &format!(
                    "{} {spec:?} {} {:?} {:?} {}",
                    env!("CARGO_PKG_VERSION"),
                    cfg.evaluate.threshold,
                    place.device.as_ref().map(|d| d.location()),
                    place.dtype,
                    digest::tagger_identity(&tagger)?
                ),
            ));
            let t = TaggerAdherence::new(&tagger, spec, cfg.evaluate.threshold, place)?;
            own = move |r: &AdherenceRequest<'_>| t.measure(r);
            &own
        }
    };
    let base = cfg.model_path();
    let ztsnr = cfg.train.ztsnr;
    let objective = cfg.train.objective;
    // The base in its own prediction (eps for the conversion, v for the
    // way back), then as the objective before training.
    let (own, own_z) = cfg.base_sampling();
    let mut todo: Vec<(String, PathBuf, Prediction, bool, Option<f64>)> = vec![
        (
            format!("base as {own}{}", if own_z { " + ZTSNR" } else { "" }),
            base.clone(),
            own,
            own_z,
            None,
        ),
        (
            format!(
                "base as {objective}{} (untrained)",
                if ztsnr { " + ZTSNR" } else { "" }
            ),
            base.clone(),
            objective,
            ztsnr,
            None,
        ),
    ];
    let sweep = progress.stages.get("merge").and_then(|r| r.sweep.as_ref());
    if let Some(t) = progress.stages.get("train") {
        if let Some(c) = &t.converted {
            // Retention on the merges' measure when the sweep scored it
            // (so the rows compare); else training's last evaluation.
            let retention = match sweep.and_then(|s| s.a_retention) {
                Some(r) => Some(r),
                None => t.exported_retention.or(t.retention.last().map(|x| x.1)),
            };
            todo.push(("converted".into(), c.clone(), objective, ztsnr, retention));
        }
    }
    if let Some(s) = sweep {
        for p in &s.points {
            todo.push((
                format!("merge α = {}", p.alpha),
                p.out.clone(),
                objective,
                ztsnr,
                Some(p.retention),
            ));
        }
    }
    let mut out = Vec::new();
    let n = todo.len();
    let mut reused = 0;
    for (i, (label, model, prediction, z, retention)) in todo.into_iter().enumerate() {
        // Ctrl-C / SIGTERM: between models (each a full set of samples).
        if ctx.should_stop() {
            return Err(Error::Interrupted(format!(
                "evaluate: stopped after {i} of {n} models; rerun to score the rest (the ones done are kept)"
            )));
        }
        let key = match &cache {
            Some(c) => Some(c.key(&model, prediction, z)?),
            None => None,
        };
        let kept = cache
            .as_ref()
            .zip(key.as_deref())
            .and_then(|(c, k)| c.get(k));
        let kept_now = kept.is_some();
        let (a, grid) = match kept {
            Some(hit) => hit,
            None => {
                let grid = match &key {
                    Some(k) => format!("eval-{}.png", &k[..16]),
                    None => format!("eval-{i}.png"),
                };
                let a = hook(&AdherenceRequest {
                    model: &model,
                    prediction,
                    ztsnr: z,
                    grid: Some(&dir.join(&grid)),
                })?;
                if let (Some(c), Some(k)) = (cache.as_mut(), &key) {
                    c.put(k, &a, &grid)?;
                }
                (a, grid)
            }
        };
        if let (Some(c), Some(k)) = (cache.as_mut(), &key) {
            c.used(k);
            reused += usize::from(kept_now);
        }
        let path = dir.join(&grid);
        out.push(ModelScore {
            label,
            model,
            prediction: prediction.to_string(),
            ztsnr: z,
            adherence: a,
            retention,
            grid: if path.is_file() { grid } else { String::new() },
        });
    }
    if let Some(c) = cache {
        if reused > 0 {
            ctx.say(&format!(
                "evaluate: {reused} of {n} scores kept from an earlier evaluate of the same models and settings ({})",
                c.path.display()
            ));
        }
        c.keep_only_used()?;
    }
    Ok(out)
}

/// Adherence scores of `evaluate`, kept in `report/eval-scores.json` by a
/// key over what decides them: the settings (eval spec, threshold,
/// placement, tagger, version), the model's content and how it is sampled.
struct ScoreCache {
    path: PathBuf,
    settings: String,
    entries: BTreeMap<String, (Adherence, String)>,
    used: std::collections::BTreeSet<String>,
}

impl ScoreCache {
    fn open(dir: &Path, settings: &str) -> Self {
        let path = dir.join("eval-scores.json");
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            settings: settings.to_string(),
            entries,
            used: Default::default(),
        }
    }

    fn key(&self, model: &Path, prediction: Prediction, ztsnr: bool) -> Result<String> {
        use sha2::{Digest, Sha256};
        let sha = crate::models::sdxl::checkpoint::sha256_file(model)?;
        let text = format!("{}|{sha}|{prediction}|{ztsnr}", self.settings);
        Ok(hex::encode(Sha256::digest(text.as_bytes())))
    }

    /// A kept score whose grid is still there.
    fn get(&self, key: &str) -> Option<(Adherence, String)> {
        let dir = self.path.parent()?;
        self.entries
            .get(key)
            .filter(|(_, grid)| dir.join(grid).is_file())
            .cloned()
    }

    fn put(&mut self, key: &str, a: &Adherence, grid: &str) -> Result<()> {
        self.entries
            .insert(key.to_string(), (a.clone(), grid.to_string()));
        self.save()
    }

    fn used(&mut self, key: &str) {
        self.used.insert(key.to_string());
    }

    fn save(&self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        crate::pipeline::sample::write_atomic(&self.path, &serde_json::to_vec(&self.entries)?)
    }

    /// Forget the scores (and remove the grids) of models this evaluate
    /// did not list.
    fn keep_only_used(mut self) -> Result<()> {
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let used = std::mem::take(&mut self.used);
        let keep: BTreeMap<_, _> = std::mem::take(&mut self.entries)
            .into_iter()
            .filter(|(k, _)| used.contains(k))
            .collect();
        // Grids no kept score shows (earlier ones, and the index-named ones
        // of eps2v before this cache).
        let kept_grids: std::collections::BTreeSet<&str> =
            keep.values().map(|v| v.1.as_str()).collect();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("eval-")
                && name.ends_with(".png")
                && !kept_grids.contains(name.as_str())
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.entries = keep;
        self.save()
    }
}
