//! `eps2v caption DIR [--tagger DIR] [--policy prompt|tags|merged]`: tag
//! what is really in each image with a WD tagger, score how well each
//! generated image matches its prompt, and write the training caption.
//!
//! Which items ([`CANDIDATE_VERDICTS`]): every item that no stage before
//! it set aside: the `ok` items, those a previous `caption` run rejected
//! (reconsidered: a rerun with other settings may accept them), and those
//! the later stages set aside (`filter`, `dedupe`, `bucket`: tagged and
//! captioned under the current settings too, so that they are current when
//! that stage takes them back; their verdicts are those stages' to change,
//! [`crate::manifest::verdicts`]). Items rejected at import or by a replan
//! are left alone.
//!
//! Per item, with a tagger (`--tagger DIR`, a WD tagger folder):
//! - the image (the imported original) is decoded and preprocessed exactly
//!   as the reference tagger script ([`crate::models::tagger::preprocess`]);
//!   batches are decoded and preprocessed on the rayon pool while the model
//!   runs the previous batch (`rayon::join`), so the model is kept busy;
//! - the tags above their thresholds ([`policy::select_tags`]) are stored
//!   with their probability in `tags` (source `tagger`, display names), the
//!   rating and everything else in `tagging` (see the migration in
//!   [`crate::manifest::MIGRATIONS`]);
//! - items with a generation prompt get an alignment score
//!   ([`policy::alignment`]: confirmed / checkable prompt tags);
//! - an unreadable image is rejected with reason `unreadable: …` (counted;
//!   the run goes on; exit code 1).
//!
//! Items already tagged with the same tagger (file hash) and thresholds are
//! not run through the model again; their caption is rewritten from the
//! stored tags, so switching the caption policy costs no inference.
//!
//! The caption (source `policy`, which `export` prefers) follows the policy
//! ([`policy::caption`]); items imported with a sidecar caption
//! (`.txt` / `.caption`) keep it — no policy caption is stored for them —
//! unless `--overwrite`. `--policy prompt` needs no tagger.
//!
//! Writes are batched transactions after the model has run, so a `kill -9`
//! loses at most the batch in flight; a rerun finds the items already
//! tagged (same settings) and continues.

pub mod policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rusqlite::{params, Transaction};
use serde::{Deserialize, Serialize};

use self::policy::{Alignment, PolicyConfig, ScoredTag, TagResult, Thresholds};
use super::Ctx;
use crate::imaging::decode::{decode, DecodeLimits, Decoded};
use crate::manifest::{self, verdicts, ItemStatus, Manifest};
use crate::models::tagger::Tagger;
use crate::{Error, Result};

/// Caption source written by this stage.
pub const POLICY_SOURCE: &str = "policy";
/// Tag source of the tagger's tags.
pub const TAGGER_SOURCE: &str = "tagger";
/// Caption sources that count as a user's own (sidecar) caption.
/// (Not dedupe's carried caption: a keeper keeps its policy caption under
/// it, for when the duplicate or its sidecar goes.)
pub const SIDECAR_SOURCES: &[&str] = &["sidecar_txt", "sidecar_caption"];

/// Configuration of the caption stage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// WD tagger folder (`model.safetensors`, `selected_tags.csv`,
    /// `config.json`); required by the `tags` and `merged` policies.
    pub tagger: Option<PathBuf>,
    /// Tag selection thresholds.
    pub thresholds: Thresholds,
    /// How the caption is written.
    pub caption: PolicyConfig,
    /// Replace sidecar captions of imported items too.
    pub overwrite: bool,
    /// Images per model batch.
    pub batch: usize,
    /// Where the tagger runs (`--device`; `None`: CUDA GPU 0 when this is a
    /// CUDA build and one answers, else the CPU). Not recorded in the run's
    /// config.
    #[serde(skip)]
    pub device: Option<candle_core::Device>,
    /// dtype of the tagger's weights (`--precision`; `None`: f32 on every
    /// device, as the reference taggers run and their thresholds assume; a
    /// ViT-B is cheap in f32). Anything but f32 is part of the tagging
    /// settings, so a later f32 run tags those items again.
    #[serde(skip)]
    pub dtype: Option<candle_core::DType>,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        Self {
            tagger: None,
            thresholds: Thresholds::default(),
            caption: PolicyConfig::default(),
            overwrite: false,
            batch: 16,
            device: None,
            dtype: None,
        }
    }
}

impl CaptionConfig {
    /// Check values and combinations (config errors, exit 2).
    pub fn check(&self) -> Result<()> {
        let t = &self.thresholds;
        for (name, v) in [
            ("--general-threshold", t.general),
            ("--character-threshold", t.character),
            ("--extra-threshold", self.caption.extra_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(format!(
                    "{name} {v}: must be a probability between 0 and 1"
                )));
            }
        }
        if self.batch == 0 {
            return Err(Error::config("--batch must be at least 1"));
        }
        if self.caption.policy.needs_tagger() && self.tagger.is_none() {
            return Err(Error::config(format!(
                "--policy {} needs a tagger: pass --tagger DIR (a WD tagger folder with model.safetensors, selected_tags.csv and config.json, e.g. SmilingWolf/wd-vit-tagger-v3), or use --policy prompt",
                self.caption.policy.name()
            )));
        }
        Ok(())
    }
}

/// What `caption` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptionReport {
    /// Run id.
    pub run_id: i64,
    /// Tagger identity (`folder@sha256[:12]`), when one was used.
    pub tagger: Option<String>,
    /// Caption policy.
    pub policy: String,
    /// Items considered.
    pub considered: usize,
    /// Items run through the tagger.
    pub tagged: usize,
    /// Items already tagged with the same tagger and thresholds (not re-run).
    pub already_tagged: usize,
    /// Policy captions written.
    pub captioned: usize,
    /// Items that kept their sidecar caption.
    pub kept_sidecar: usize,
    /// Items left without any caption (policy had nothing, no sidecar).
    pub uncaptioned: usize,
    /// Items tagged in this run that got an alignment score.
    pub scored: usize,
    /// Mean of those scores.
    pub mean_alignment: Option<f64>,
    /// Items of the dataset with a score that `filter` judges (this run's
    /// and earlier ones'; none set aside by another stage).
    pub dataset_scored: usize,
    /// Mean of those: what `filter --min-alignment` decides on.
    pub dataset_mean_alignment: Option<f64>,
    /// Ratings of the items tagged in this run.
    pub ratings: BTreeMap<String, usize>,
    /// Items rejected by this run, by reason code.
    pub rejected: BTreeMap<String, usize>,
    /// Items an earlier caption run had rejected that are ok again.
    pub restored: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Tagged images per second of wall time in the tagging phase.
    pub images_per_second: f64,
    /// Seconds spent in the model (sum over batches).
    pub model_seconds: f64,
    /// Seconds spent decoding + preprocessing (sum over batches, overlapped with the model).
    pub prepare_seconds: f64,
    /// Stopped by SIGINT / SIGTERM before every item was looked at: the
    /// batches done are kept and the run is recorded as `failed`; rerunning
    /// the same command does the rest.
    pub interrupted: bool,
    /// Items this run left to a rerun (0 unless interrupted).
    pub remaining: usize,
}

impl CaptionReport {
    /// Total items rejected by this run.
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }
}

/// The stages whose verdicts do not keep an item from `caption`: its own
/// and the later stages'.
const CANDIDATE_VERDICTS: &[&str] = &["caption", "filter", "dedupe", "bucket"];

/// One item the stage looks at.
#[derive(Debug, Clone)]
struct Candidate {
    id: i64,
    path: Option<String>,
    /// `caption` when caption set it aside (whatever else did), else the
    /// stage whose verdict the item shows (`filter`, `dedupe`, `bucket`),
    /// `None` when ok.
    rejected_by: Option<String>,
    prompt: Option<String>,
    has_sidecar: bool,
    settings: Option<String>,
    tags_json: Option<String>,
}

/// The tagger's answer for one item, ready to store.
#[derive(Debug, Clone)]
struct Tagged {
    result: TagResult,
    alignment: Alignment,
}

/// `settings` recorded with each tagging: items tagged with other settings
/// are tagged again.
fn settings_json(tagger: &Tagger, th: &Thresholds) -> String {
    let mut v = serde_json::json!({
        "tagger": tagger.id,
        "general_threshold": th.general,
        "character_threshold": th.character,
        "mcut": th.mcut,
    });
    if tagger.dtype() != candle_core::DType::F32 {
        v["precision"] = crate::nn::device::dtype_name(tagger.dtype()).into();
    }
    v.to_string()
}

fn load_candidates(m: &Manifest) -> Result<Vec<Candidate>> {
    // Caption's own verdict first, then the one the item shows.
    let sql = format!(
        "SELECT i.id, i.path, i.status,
                CASE WHEN {} IS NOT NULL THEN 'caption' ELSE {} END,
                g.prompt,
                EXISTS (SELECT 1 FROM captions c WHERE c.item_id = i.id AND c.source IN ('{}', '{}')),
                t.settings, t.tags_json
         FROM items i
         LEFT JOIN generation g ON g.item_id = i.id
         LEFT JOIN tagging t ON t.item_id = i.id
         WHERE {}
         ORDER BY i.id",
        verdicts::of("i", "caption", "status"),
        verdicts::shown("i", "stage"),
        SIDECAR_SOURCES[0],
        SIDECAR_SOURCES[1],
        verdicts::eligible("i", CANDIDATE_VERDICTS)
    );
    let mut st = m.conn().prepare(&sql).map_err(|e| m.err(e))?;
    let rows = st
        .query_map([], |r| {
            let stage: Option<String> = r.get(3)?;
            Ok(Candidate {
                id: r.get(0)?,
                path: r.get(1)?,
                rejected_by: stage,
                prompt: r
                    .get::<_, Option<String>>(4)?
                    .filter(|p| !p.trim().is_empty()),
                has_sidecar: r.get(5)?,
                settings: r.get(6)?,
                tags_json: r.get(7)?,
            })
        })
        .map_err(|e| m.err(e))?;
    rows.collect::<rusqlite::Result<_>>().map_err(|e| m.err(e))
}

/// Read, decode and preprocess one image (`Err`: why it is unreadable).
fn prepare_one(
    root: &Path,
    c: &Candidate,
    tagger: &Tagger,
) -> std::result::Result<Vec<f32>, String> {
    let d = read_decoded(root, c)?;
    Ok(tagger.preprocess.image(&d.rgb))
}

/// Read and decode the item's image (`Err`: why it is unreadable).
fn read_decoded(root: &Path, c: &Candidate) -> std::result::Result<Decoded, String> {
    let rel = c.path.as_deref().ok_or("the item has no image file")?;
    let bytes = std::fs::read(root.join(rel)).map_err(|e| format!("{rel}: {e}"))?;
    decode(&bytes, &DecodeLimits::accepted()).map_err(|e| format!("{rel}: {e}"))
}

type Prepared = (Vec<std::result::Result<Vec<f32>, String>>, Duration);

fn prepare_batch(root: &Path, batch: &[&Candidate], tagger: &Tagger) -> Prepared {
    let t0 = Instant::now();
    let out = batch
        .par_iter()
        .map(|c| prepare_one(root, c, tagger))
        .collect();
    (out, t0.elapsed())
}

/// Run the model on the readable images of a prepared batch.
fn infer(tagger: &Tagger, prepared: &Prepared) -> Result<(Vec<Option<Vec<f32>>>, Duration)> {
    let t0 = Instant::now();
    let ok: Vec<&Vec<f32>> = prepared.0.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut probs = if ok.is_empty() {
        Vec::new()
    } else {
        tagger.probabilities(&tagger.preprocess.batch(&ok, tagger.device())?)?
    }
    .into_iter();
    let out = prepared
        .0
        .iter()
        .map(|r| if r.is_ok() { probs.next() } else { None })
        .collect();
    Ok((out, t0.elapsed()))
}

fn reason_code(reason: &str) -> String {
    reason.split(':').next().unwrap_or("unknown").to_string()
}

/// Per-run state for writing items.
struct Writer<'a> {
    run_id: i64,
    cfg: &'a CaptionConfig,
    settings: Option<String>,
    tagger_id: Option<String>,
    report: &'a mut CaptionReport,
    alignment_sum: f64,
    /// [`policy::checkable_keys`] of the tagger (empty without one).
    checkable: std::collections::HashSet<String>,
}

impl Writer<'_> {
    fn set_status_ok(&mut self, tx: &Transaction, c: &Candidate) -> rusqlite::Result<()> {
        if c.rejected_by.as_deref() == Some("caption") {
            verdicts::set(tx, c.id, "caption", None, self.run_id)?;
            self.report.restored += 1;
        }
        Ok(())
    }

    fn store_tagged(
        &mut self,
        tx: &Transaction,
        c: &Candidate,
        t: &Tagged,
    ) -> rusqlite::Result<()> {
        tx.execute(
            "DELETE FROM tags WHERE item_id = ?1 AND source = ?2",
            params![c.id, TAGGER_SOURCE],
        )?;
        for (pos, tag) in t.result.all().enumerate() {
            manifest::upsert_tag(
                tx,
                self.run_id,
                c.id,
                TAGGER_SOURCE,
                (&tag.name, pos),
                Some(f64::from(tag.p)),
            )?;
        }
        let tags_json: Vec<(&str, u32, f32)> = t
            .result
            .all()
            .map(|s| (s.name.as_str(), s.category, s.p))
            .collect();
        let ratings: serde_json::Map<String, serde_json::Value> = t
            .result
            .ratings
            .iter()
            .map(|(n, p)| (n.clone(), serde_json::json!(p)))
            .collect();
        tx.execute(
            "INSERT INTO tagging (item_id, tagger, settings, rating, rating_score, ratings_json, tags_json,
                                  alignment, checked, confirmed, missing_json, run_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (item_id) DO UPDATE SET tagger = excluded.tagger, settings = excluded.settings,
                 rating = excluded.rating, rating_score = excluded.rating_score,
                 ratings_json = excluded.ratings_json, tags_json = excluded.tags_json,
                 alignment = excluded.alignment, checked = excluded.checked,
                 confirmed = excluded.confirmed, missing_json = excluded.missing_json,
                 run_id = excluded.run_id",
            params![
                c.id,
                self.tagger_id,
                self.settings,
                t.result.rating.as_ref().map(|r| r.0.clone()),
                t.result.rating.as_ref().map(|r| f64::from(r.1)),
                serde_json::Value::Object(ratings).to_string(),
                serde_json::to_string(&tags_json).unwrap_or_else(|_| "[]".into()),
                t.alignment.score,
                t.alignment.checked as i64,
                t.alignment.confirmed.len() as i64,
                serde_json::to_string(&t.alignment.missing).unwrap_or_else(|_| "[]".into()),
                self.run_id
            ],
        )?;
        self.report.tagged += 1;
        if let Some((r, _)) = &t.result.rating {
            *self.report.ratings.entry(r.clone()).or_default() += 1;
        }
        if let Some(s) = t.alignment.score {
            self.report.scored += 1;
            self.alignment_sum += s;
        }
        Ok(())
    }

    fn reject(&mut self, tx: &Transaction, c: &Candidate, reason: &str) -> rusqlite::Result<()> {
        tx.execute(
            "DELETE FROM tags WHERE item_id = ?1 AND source = ?2",
            params![c.id, TAGGER_SOURCE],
        )?;
        tx.execute("DELETE FROM tagging WHERE item_id = ?1", [c.id])?;
        // Filter's verdict goes with the tagging row it was made from.
        verdicts::set(tx, c.id, "filter", None, self.run_id)?;
        verdicts::set(
            tx,
            c.id,
            "caption",
            Some((ItemStatus::Rejected, reason)),
            self.run_id,
        )?;
        *self.report.rejected.entry(reason_code(reason)).or_default() += 1;
        Ok(())
    }

    /// Write (or clear) the policy caption of an item.
    fn write_caption(
        &mut self,
        tx: &Transaction,
        c: &Candidate,
        tags: Option<&TagResult>,
    ) -> rusqlite::Result<()> {
        let text = if c.has_sidecar && !self.cfg.overwrite {
            self.report.kept_sidecar += 1;
            None
        } else {
            let prompt = c.prompt.as_deref().map(policy::prompt_tags);
            let t = policy::caption(&self.cfg.caption, prompt.as_deref(), tags, &self.checkable);
            // An empty policy caption is written (it wins over the raw
            // prompt in train and export) and counted as uncaptioned.
            if t.as_deref().is_none_or(str::is_empty) && !c.has_sidecar {
                self.report.uncaptioned += 1;
            }
            t
        };
        if self.cfg.overwrite {
            // Machine captions asked for everywhere: a written caption
            // dedupe carried to this keeper goes too.
            tx.execute(
                "DELETE FROM captions WHERE item_id = ?1 AND source = ?2",
                params![c.id, crate::stages::dedupe::CARRIED_CAPTION_SOURCE],
            )?;
        }
        match text {
            Some(t) => {
                manifest::upsert_caption(tx, self.run_id, c.id, POLICY_SOURCE, &t, None)?;
                self.report.captioned += 1;
            }
            None => {
                tx.execute(
                    "DELETE FROM captions WHERE item_id = ?1 AND source = ?2",
                    params![c.id, POLICY_SOURCE],
                )?;
            }
        }
        Ok(())
    }
}

/// Tag result stored by an earlier run (`tagging.tags_json`; a caption
/// needs no ratings).
fn stored_result(c: &Candidate) -> Option<TagResult> {
    let v: Vec<(String, u32, f32)> = serde_json::from_str(c.tags_json.as_deref()?).ok()?;
    let mut r = TagResult::default();
    for (name, category, p) in v {
        let t = ScoredTag { name, category, p };
        if category == crate::models::tagger::labels::CATEGORY_CHARACTER {
            r.character.push(t);
        } else {
            r.general.push(t);
        }
    }
    Some(r)
}

/// Run the caption stage.
pub fn run(cfg: &CaptionConfig, m: &mut Manifest, ctx: &Ctx) -> Result<CaptionReport> {
    let t0 = Instant::now();
    cfg.check()?;
    // Load (and validate) the tagger before anything is written.
    let tagger = match &cfg.tagger {
        Some(p) => {
            let device = cfg.device.clone().unwrap_or_else(crate::nn::default_device);
            let dtype = crate::nn::model_dtype(
                &device,
                Some(cfg.dtype.unwrap_or(candle_core::DType::F32)),
            )?;
            let t = Tagger::load_with(p, &device, dtype)?;
            if t.inferred_config {
                ctx.say(&format!(
                    "warning: {}: no config.json in the tagger folder; the architecture was inferred from the weights' shapes, with WD v3's 64-wide attention heads and tanh GELU (what shapes cannot tell): put the model's config.json beside it if it is not a WD v3 ViT",
                    p.display()
                ));
            }
            Some(t)
        }
        None => None,
    };
    let settings = tagger.as_ref().map(|t| settings_json(t, &cfg.thresholds));
    let cands = load_candidates(m)?;
    // Ctrl-C / SIGTERM: finish the batch in hand, keep it, stop.
    let _signals = crate::signal::install();
    let run_id = m.begin_run("caption", cfg)?;
    let mut report = CaptionReport {
        run_id,
        tagger: tagger.as_ref().map(|t| t.id.clone()),
        policy: cfg.caption.policy.name().into(),
        considered: cands.len(),
        ..Default::default()
    };
    let (need, rest): (Vec<&Candidate>, Vec<&Candidate>) = cands.iter().partition(|c| {
        tagger.is_some() && (c.settings != settings || c.rejected_by.as_deref() == Some("caption"))
    });
    report.already_tagged = if tagger.is_some() { rest.len() } else { 0 };
    let root = m.root().to_path_buf();
    let db = m.db_path().to_path_buf();
    let map = manifest::sql_err(&db);
    let pb = ctx.bar(cands.len() as u64, "caption");
    let _warm = crate::nn::keep_warm();
    // Items committed so far, against `cands.len()` (interruption).
    let mut looked_at = 0usize;
    let mut w = Writer {
        run_id,
        cfg,
        settings: settings.clone(),
        tagger_id: tagger.as_ref().map(|t| t.id.clone()),
        report: &mut report,
        alignment_sum: 0.0,
        checkable: tagger
            .as_ref()
            .map(|t| policy::checkable_keys(&t.labels))
            .unwrap_or_default(),
    };

    let tag_t0 = Instant::now();
    let mut tag_seconds = 0.0;
    // Both phases; on an error the run is still ended (as failed).
    let mut phases = || -> Result<()> {
        // Phase 1: items that need the model, pipelined.
        if let Some(tagger) = &tagger {
            let batches: Vec<&[&Candidate]> = need.chunks(cfg.batch).collect();
            let mut next_prep = batches.first().map(|b| prepare_batch(&root, b, tagger));
            for (k, batch) in batches.iter().enumerate() {
                if ctx.should_stop() {
                    break;
                }
                let Some(prepared) = next_prep.take() else {
                    break;
                };
                let following = batches.get(k + 1);
                let (probs, prep) = rayon::join(
                    || infer(tagger, &prepared),
                    || following.map(|b| prepare_batch(&root, b, tagger)),
                );
                next_prep = prep;
                let (probs, model_time) = probs?;
                w.report.model_seconds += model_time.as_secs_f64();
                w.report.prepare_seconds += prepared.1.as_secs_f64();
                let tx = m.conn_mut().transaction().map_err(map)?;
                for ((c, input), probs) in batch.iter().zip(&prepared.0).zip(probs) {
                    match (input, probs) {
                        (Err(why), _) => w
                            .reject(&tx, c, &format!("unreadable: {why}"))
                            .map_err(map)?,
                        (Ok(_), None) => {
                            return Err(Error::Other(format!(
                                "caption: the tagger returned no result for item {}",
                                c.id
                            )))
                        }
                        (Ok(_), Some(p)) => {
                            let result = policy::select_tags(&p, &tagger.labels, &cfg.thresholds);
                            let prompt = c
                                .prompt
                                .as_deref()
                                .map(policy::prompt_tags)
                                .unwrap_or_default();
                            let alignment = policy::alignment(&prompt, &p, &tagger.labels, &result);
                            let t = Tagged { result, alignment };
                            w.store_tagged(&tx, c, &t).map_err(map)?;
                            w.set_status_ok(&tx, c).map_err(map)?;
                            w.write_caption(&tx, c, Some(&t.result)).map_err(map)?;
                        }
                    }
                    pb.inc(1);
                }
                tx.commit().map_err(map)?;
                looked_at += batch.len();
            }
        }
        tag_seconds = tag_t0.elapsed().as_secs_f64();

        // Phase 2: items whose tags are known (or that need none): captions only.
        for chunk in rest.chunks(512) {
            if ctx.should_stop() {
                return Ok(());
            }
            let tx = m.conn_mut().transaction().map_err(map)?;
            for c in chunk {
                // Caption's own rejection (unreadable) and no tagger to read
                // the image now: undone only when the image decodes again.
                if c.rejected_by.as_deref() == Some("caption") && read_decoded(&root, c).is_err() {
                    pb.inc(1);
                    continue;
                }
                w.set_status_ok(&tx, c).map_err(map)?;
                let stored = if tagger.is_some() {
                    stored_result(c)
                } else {
                    None
                };
                w.write_caption(&tx, c, stored.as_ref()).map_err(map)?;
                pb.inc(1);
            }
            tx.commit().map_err(map)?;
            looked_at += chunk.len();
        }
        Ok(())
    };
    let result = phases();
    pb.finish_and_clear();
    let sum = w.alignment_sum;
    drop(w);
    if report.scored > 0 {
        report.mean_alignment = Some(sum / report.scored as f64);
    }
    // The whole dataset's scores (a resumed or repeated caption scores only
    // what it tags).
    if let Ok((n, mean)) = m.conn().query_row(
        &format!(
            "SELECT count(t.alignment), avg(t.alignment) FROM items i JOIN tagging t ON t.item_id = i.id
             WHERE t.alignment IS NOT NULL AND {}",
            crate::manifest::verdicts::eligible("i", crate::stages::filter::JUDGED_VERDICTS)
        ),
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<f64>>(1)?)),
    ) {
        report.dataset_scored = n as usize;
        report.dataset_mean_alignment = mean;
    }
    if report.tagged > 0 && tag_seconds > 0.0 {
        report.images_per_second = report.tagged as f64 / tag_seconds;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.remaining = cands.len().saturating_sub(looked_at);
    report.interrupted = result.is_ok() && report.remaining > 0;
    match &result {
        Ok(_) => m.end_run(run_id, !report.interrupted, &report)?,
        Err(e) => m.fail_run(run_id, &report, e),
    }
    result?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Duplicates are captioned under the current policy too (they come
    /// back when dedupe runs again without their keeper); other stages'
    /// rejections are not.
    #[test]
    fn duplicates_are_candidates_and_keep_their_status() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let import = m.begin_run("import", &serde_json::json!({})).unwrap();
        let dedupe = m.begin_run("dedupe", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        for (id, verdict) in [
            (1, None),
            (2, Some(("dedupe", ItemStatus::Duplicate, dedupe))),
            (3, Some(("import", ItemStatus::Rejected, import))),
            (4, Some(("bucket", ItemStatus::Rejected, import))),
        ] {
            let item = crate::manifest::NewItem::for_test(id);
            crate::manifest::insert_item(&tx, import, &item).unwrap();
            if let Some((stage, status, by)) = verdict {
                verdicts::set(&tx, id, stage, Some((status, "x")), by).unwrap();
            }
        }
        tx.commit().unwrap();
        let c = load_candidates(&m).unwrap();
        let got: Vec<(i64, Option<&str>)> =
            c.iter().map(|c| (c.id, c.rejected_by.as_deref())).collect();
        assert_eq!(got, [(1, None), (2, Some("dedupe")), (4, Some("bucket"))]);
    }

    /// Tags from a half-precision tagger are not the f32 tagger's: its
    /// settings say so (and items tagged in f32 are tagged again), while f32
    /// settings are those written before `--precision` existed.
    #[test]
    fn half_precision_is_part_of_the_tagging_settings() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/golden/tagger/vit_v3_tiny");
        let cpu = candle_core::Device::Cpu;
        let th = Thresholds::default();
        let f32s = settings_json(&Tagger::load(&dir, &cpu).unwrap(), &th);
        let v: serde_json::Value = serde_json::from_str(&f32s).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["character_threshold", "general_threshold", "mcut", "tagger"]
        );
        let bf16 = Tagger::load_with(&dir, &cpu, candle_core::DType::BF16).unwrap();
        let v: serde_json::Value = serde_json::from_str(&settings_json(&bf16, &th)).unwrap();
        assert_eq!(v["precision"], "bf16");
    }
}
