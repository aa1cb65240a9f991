//! `eps2v bucket`: assign every ok item to an aspect-ratio bucket, resize it
//! to cover the bucket (Lanczos3, fast_image_resize), crop (center or
//! seeded random), and write the training image to
//! `buckets/<w>x<h>/<sha>.png` (an 8-bit RGB PNG already at its bucket's
//! size, as `generate` writes them, is hard-linked there instead: the same
//! pixels, one file on disk).
//!
//! The crop actually taken is recorded both in original pixels and in
//! resized pixels, together with the original and target sizes, because
//! SDXL's micro-conditioning (`original_size`, `crop_coords_top_left`,
//! `target_size`) needs the real values (kohya records a letterbox offset
//! instead: reference/trainers-landscape.md, sd-scripts #1443).
//!
//! Never upscales beyond `max_upscale`: an image that would need more is
//! rejected with reason `too_small` and the stage goes on.
//!
//! Rerunnable ([`plan_item`]): an item bucketed or rejected by a bucket run
//! with the same settings (bucket set, crop, seed, upscale limit) keeps its
//! decision; one decided with other settings is decided again, and `force`
//! redoes everything. Items rejected by other stages are never touched.
//! Each batch's files are written (temp + rename) before its transaction
//! commits; that transaction replaces each item's old decision (status,
//! bucket row) with the new one, and replaced bucket images are removed
//! after it, so a `kill -9` leaves every item with one consistent decision.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::error::{Error, Result};
use crate::imaging::buckets::{self, Bucket};
use crate::imaging::resize::{self, CropMode, CropPlan};
use crate::manifest::{verdicts, ItemStatus, Manifest};

/// Which bucket set to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BucketSet {
    /// The 40-entry SDXL list and its transposes.
    Sdxl,
    /// kohya-style generator (`make_bucket_resolutions`).
    Kohya {
        /// Square training resolution whose area the buckets keep (1024 for SDXL).
        resolution: u32,
        /// Side step (64 for SDXL).
        step: u32,
        /// Smallest side.
        min_side: u32,
        /// Largest side.
        max_side: u32,
    },
}

/// Configuration of the bucket stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BucketConfig {
    /// Bucket set.
    pub buckets: BucketSet,
    /// Crop placement.
    pub crop: CropArg,
    /// Seed for random crops (combined with each item's sha256).
    pub seed: u64,
    /// Largest accepted upscale factor (1.0 = never upscale). Default 1.25
    /// tolerates images a little smaller than their bucket (e.g. 1000² for
    /// 1024²) and refuses thumbnails.
    pub max_upscale: f64,
    /// Redo items that already have a bucket.
    pub force: bool,
    /// Items per transaction.
    pub batch: usize,
}

/// Crop placement in config form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CropArg {
    /// Centered crop.
    Center,
    /// Seeded random crop (per item: seed ⊕ sha256).
    Random,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            buckets: BucketSet::Sdxl,
            crop: CropArg::Center,
            seed: 0,
            max_upscale: 1.25,
            force: false,
            batch: 32,
        }
    }
}

/// The largest bucket side a kohya bucket set may ask for (px).
pub const MAX_BUCKET_SIDE: u32 = 16384;

impl BucketConfig {
    /// The concrete bucket list.
    pub fn bucket_list(&self) -> Result<Vec<Bucket>> {
        let list = match &self.buckets {
            BucketSet::Sdxl => buckets::sdxl_buckets(),
            BucketSet::Kohya {
                resolution,
                step,
                min_side,
                max_side,
            } => {
                let (resolution, step) = (*resolution, *step);
                if step == 0 || step % 32 != 0 {
                    return Err(Error::config(format!(
                        "bucket step {step}: use a multiple of 32 (the VAE's 8 times SDXL's UNet's two halvings, whose skips must line up; kohya's default is 64)"
                    )));
                }
                if *max_side > MAX_BUCKET_SIDE || resolution > MAX_BUCKET_SIDE {
                    return Err(Error::config(format!(
                        "kohya buckets: resolution {resolution} and max side {max_side} must be ≤ {MAX_BUCKET_SIDE}"
                    )));
                }
                // kohya's adjustment: min down and max up to multiples of
                // the step (a min below the step: the step).
                let min_side = (*min_side - *min_side % step).max(step);
                let max_side = max_side.div_ceil(step) * step;
                if min_side > resolution || max_side < resolution {
                    return Err(Error::config(format!(
                        "kohya buckets: min side {min_side} ≤ resolution {resolution} ≤ max side {max_side} must hold (after rounding to multiples of the step {step}, as kohya does)"
                    )));
                }
                buckets::kohya_buckets(resolution, resolution, min_side, max_side, step)
            }
        };
        if list.is_empty() {
            return Err(Error::config(format!(
                "bucket set {:?} is empty; check resolution / step / min_side / max_side",
                self.buckets
            )));
        }
        Ok(list)
    }
}

/// What `bucket` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BucketReport {
    /// Run id.
    pub run_id: i64,
    /// Items bucketed now.
    pub bucketed: usize,
    /// Items that already had a bucket made with these settings.
    pub already: usize,
    /// Items bucketed before with other settings (or `force`), done again
    /// (counted in `bucketed` or `rejected`).
    pub rebucketed: usize,
    /// Of those bucketed before with other settings, the ones these
    /// settings reject as too small (their bucket is gone; an item
    /// rejected for another reason, e.g. its image is gone, is not
    /// counted).
    pub rebucketed_rejected: usize,
    /// Items an earlier bucket run rejected with other settings (or
    /// `force`), decided again (counted in `bucketed` or `rejected`).
    pub reconsidered: usize,
    /// Items a bucket run rejected with these same settings: left rejected.
    pub still_rejected: usize,
    /// Items rejected by this run (too small, unreadable), by reason code.
    pub rejected: std::collections::BTreeMap<String, usize>,
    /// Each item this run rejected: its id, the file it was imported
    /// from (generated items have none) and why.
    pub rejected_items: Vec<BucketRejection>,
    /// Histogram of this run's buckets: "WxH" → count.
    pub histogram: std::collections::BTreeMap<String, usize>,
    /// Duplicates whose keeper is set aside now (rejected as too small
    /// here, or by another stage since dedupe): out of the dataset until
    /// `dedupe` runs again.
    pub waiting_on_a_set_aside_keeper: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// An item a bucket run rejected.
#[derive(Debug, Clone, Serialize)]
pub struct BucketRejection {
    /// Item id.
    pub item_id: i64,
    /// The first source file it was imported from, if any.
    pub source: Option<String>,
    /// Why (`too_small: …`, `unreadable: …`).
    pub reason: String,
}

struct Done {
    item_id: i64,
    bucket: Bucket,
    orig: (u32, u32),
    placed: CropPlan,
    rel: String,
}

enum Outcome {
    Done(Box<Done>),
    Rejected { item_id: i64, reason: String },
}

/// Encode RGB8 as PNG with fast compression (bucket images are
/// intermediate training inputs: speed over size).
pub fn encode_png_fast(img: &image::RgbImage) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::with_capacity(img.as_raw().len() / 2);
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Other(format!("png encode: {e}")))?;
    Ok(out)
}

fn crop_seed(seed: u64, sha: &str) -> u64 {
    let h = u64::from_str_radix(&sha[..16.min(sha.len())], 16).unwrap_or(0);
    seed ^ h
}

fn process(
    root: &Path,
    cfg: &BucketConfig,
    list: &[Bucket],
    item_id: i64,
    sha: &str,
    rel_src: &str,
) -> Result<Outcome> {
    // One missing or unreadable image is that item's failure, not the run's.
    let bytes = match std::fs::read(root.join(rel_src)) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Outcome::Rejected {
                item_id,
                reason: format!("unreadable: {rel_src}: {e}"),
            })
        }
    };
    let accepted = crate::imaging::decode::DecodeLimits::accepted();
    let decoded = match crate::imaging::decode::decode(&bytes, &accepted) {
        Ok(d) => d,
        Err(e) => {
            return Ok(Outcome::Rejected {
                item_id,
                reason: format!("undecodable: {e}"),
            })
        }
    };
    // Pixels the file holds as they are (8-bit RGB PNG, no alpha, no
    // rotation): an image already at its bucket's size is its own bucket
    // image (generated images are).
    let as_stored = decoded.format == crate::imaging::decode::SourceFormat::Png
        && decoded.color_model == crate::imaging::decode::ColorModel::Rgb
        && decoded.bit_depth == 8
        && !decoded.had_alpha
        && decoded.orientation == 1;
    let rgb = decoded.rgb;
    let (w, h) = rgb.dimensions();
    let Some(bucket) = buckets::assign_bucket(w, h, list).map(|k| list[k]) else {
        return Ok(Outcome::Rejected {
            item_id,
            reason: format!("no_bucket: {w}x{h}"),
        });
    };
    let mode = match cfg.crop {
        CropArg::Center => CropMode::Center,
        CropArg::Random => CropMode::Random {
            seed: crop_seed(cfg.seed, sha),
        },
    };
    let placed =
        match resize::plan_cover_crop(w, h, bucket.width, bucket.height, mode, cfg.max_upscale) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Outcome::Rejected {
                    item_id,
                    reason: format!("{}: {e}", e.name()),
                })
            }
        };
    let identity = (placed.resized_width, placed.resized_height) == (w, h)
        && (placed.crop_left, placed.crop_top) == (0, 0)
        && (bucket.width, bucket.height) == (w, h);
    // Named by the placement too, so a new decision never overwrites the
    // file the manifest's current row points at (a run killed before its
    // commit would leave that row describing other pixels); the old file is
    // removed once the new row is committed.
    let rel = format!(
        "buckets/{}x{}/{sha}-{}x{}+{}+{}.png",
        bucket.width,
        bucket.height,
        placed.resized_width,
        placed.resized_height,
        placed.crop_left,
        placed.crop_top
    );
    if identity && as_stored {
        // The same pixels: a hard link, not a second encoded copy (the
        // source bytes where no link can be made).
        let dst = root.join(&rel);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        if !crate::atomic::link(&root.join(rel_src), &dst)? {
            super::import::write_atomic_replace(&dst, &bytes)?;
        }
    } else {
        let img = match resize::resize_and_crop(&rgb, &placed) {
            Ok(img) => img,
            Err(e) => {
                return Ok(Outcome::Rejected {
                    item_id,
                    reason: format!("resize_failed: {e}"),
                })
            }
        };
        let png = encode_png_fast(&img)?;
        super::import::write_atomic_replace(&root.join(&rel), &png)?;
    }
    Ok(Outcome::Done(Box::new(Done {
        item_id,
        bucket,
        orig: (w, h),
        placed,
        rel,
    })))
}

/// The settings a bucket decision depends on (everything but `force` and
/// `batch`): two runs with equal settings make the same decisions.
fn same_settings(a: &BucketConfig, b: &BucketConfig) -> bool {
    a.buckets == b.buckets && a.crop == b.crop && a.seed == b.seed && a.max_upscale == b.max_upscale
}

/// The settings a plain rerun of bucket takes: those of the latest bucket
/// run whose buckets the dataset still has (a rerun after one stopped
/// part-way goes on with its settings), with its id. `None` when nothing
/// is bucketed, or when that run's config is one this build cannot read.
pub fn current_settings(m: &Manifest) -> Result<Option<(i64, BucketConfig)>> {
    let row: Option<(i64, String)> = m
        .conn()
        .query_row(
            "SELECT r.id, r.config_json FROM runs r
             WHERE r.id = (SELECT max(run_id) FROM buckets)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| m.err(e))?;
    Ok(row.and_then(|(id, json)| {
        serde_json::from_str::<BucketConfig>(&json)
            .ok()
            .map(|c| (id, c))
    }))
}

impl std::fmt::Display for BucketSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BucketSet::Sdxl => write!(f, "the SDXL list"),
            BucketSet::Kohya {
                resolution,
                step,
                min_side,
                max_side,
            } => write!(
                f,
                "kohya buckets at {resolution}² (step {step}, sides {min_side}–{max_side})"
            ),
        }
    }
}

/// An item as the bucket rerun rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemState {
    /// Status ok, no bucket yet.
    Unbucketed,
    /// Status ok with a bucket made by a run with this run's settings
    /// (`true`) or other settings (`false`).
    Bucketed {
        /// The bucket was made with the current settings.
        same_settings: bool,
    },
    /// Rejected by a bucket run with this run's settings (`true`) or other
    /// settings (`false`). Items rejected by other stages never get here.
    RejectedByBucket {
        /// The rejection was made with the current settings.
        same_settings: bool,
    },
}

/// What bucket does with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemPlan {
    /// Bucket it (first time).
    Bucket,
    /// Bucket it again: it was bucketed under other settings, or `force`.
    Rebucket,
    /// Decide again on an item an earlier bucket run rejected.
    Reconsider,
    /// Its bucket stands.
    KeepBucket,
    /// Its rejection stands (same settings, no `force`).
    KeepRejection,
}

/// The rerun rule of `bucket`, over plain data: a decision made with other
/// settings (or any decision, with `force`) is made again.
pub fn plan_item(state: ItemState, force: bool) -> ItemPlan {
    match state {
        ItemState::Unbucketed => ItemPlan::Bucket,
        ItemState::Bucketed { same_settings } if force || !same_settings => ItemPlan::Rebucket,
        ItemState::Bucketed { .. } => ItemPlan::KeepBucket,
        ItemState::RejectedByBucket { same_settings } if force || !same_settings => {
            ItemPlan::Reconsider
        }
        ItemState::RejectedByBucket { .. } => ItemPlan::KeepRejection,
    }
}

/// One item to process.
struct Todo {
    item_id: i64,
    sha: String,
    rel: String,
    /// Path of its current bucket image, if any (removed when replaced).
    old_bucket: Option<String>,
    /// Its status is a bucket rejection (set back to ok when it succeeds).
    was_rejected: bool,
    /// Its bucket was made with other settings (not only a lost file).
    other_settings: bool,
}

/// Run the bucket stage.
pub fn run(cfg: &BucketConfig, m: &mut Manifest, ctx: &Ctx) -> Result<BucketReport> {
    let t0 = Instant::now();
    if !(cfg.max_upscale >= 1.0 && cfg.max_upscale.is_finite()) {
        return Err(Error::config(format!(
            "max_upscale {} must be a number >= 1.0 (1.0 = never upscale)",
            cfg.max_upscale
        )));
    }
    let list = cfg.bucket_list()?;
    let same =
        super::runs_with_same_settings(m, "bucket", |c: &BucketConfig| same_settings(c, cfg))?;
    // Ctrl-C / SIGTERM: stop after the batch in hand (each is committed).
    let _signals = crate::signal::install();
    crate::manifest::stage_run(m, "bucket", cfg, |m, run_id| {
        // Under the writer lock: no other writer's temp file is swept.
        super::import::sweep_temp_files(&m.root().join("buckets"))?;
        let mut report = BucketReport {
            run_id,
            ..Default::default()
        };
        // Ok items and the items a bucket run rejected; never other stages' rejections.
        let mut todo: Vec<Todo> = Vec::new();
        {
            let mut st = m
                .conn()
                .prepare(&format!(
                    "SELECT i.id, i.sha256, i.path, {}, {}, b.run_id, b.path
                     FROM items i LEFT JOIN buckets b ON b.item_id = i.id
                     WHERE i.path IS NOT NULL AND {}
                     ORDER BY i.id",
                    verdicts::of("i", "bucket", "status"),
                    verdicts::of("i", "bucket", "run_id"),
                    verdicts::eligible("i", &["bucket"])
                ))
                .map_err(|e| m.err(e))?;
            let mut rows = st.query([]).map_err(|e| m.err(e))?;
            while let Some(r) = rows.next().map_err(|e| m.err(e))? {
                // Bucket's own rejection, and the run that made it.
                let own: Option<String> = r.get(3).map_err(|e| m.err(e))?;
                let own_run: Option<i64> = r.get(4).map_err(|e| m.err(e))?;
                let bucket_run: Option<i64> = r.get(5).map_err(|e| m.err(e))?;
                let old_bucket: Option<String> = r.get(6).map_err(|e| m.err(e))?;
                let state = if own.is_some() {
                    ItemState::RejectedByBucket {
                        same_settings: own_run.is_some_and(|r| same.contains(&r)),
                    }
                } else {
                    // A bucket whose file is gone (a copied dataset, a
                    // cleaned folder) is made again, as if its settings
                    // had changed: train and export need the file.
                    let file_there =
                        |p: &Option<String>| p.as_ref().is_some_and(|p| m.root().join(p).is_file());
                    match bucket_run {
                        None => ItemState::Unbucketed,
                        Some(b) => ItemState::Bucketed {
                            same_settings: same.contains(&b) && file_there(&old_bucket),
                        },
                    }
                };
                let plan = plan_item(state, cfg.force);
                match plan {
                    ItemPlan::KeepBucket => report.already += 1,
                    ItemPlan::KeepRejection => report.still_rejected += 1,
                    ItemPlan::Bucket | ItemPlan::Rebucket | ItemPlan::Reconsider => {
                        match plan {
                            ItemPlan::Rebucket => report.rebucketed += 1,
                            ItemPlan::Reconsider => report.reconsidered += 1,
                            _ => {}
                        }
                        todo.push(Todo {
                            item_id: r.get(0).map_err(|e| m.err(e))?,
                            sha: r.get(1).map_err(|e| m.err(e))?,
                            rel: r.get(2).map_err(|e| m.err(e))?,
                            other_settings: bucket_run.is_some_and(|b| !same.contains(&b)),
                            old_bucket,
                            was_rejected: own.is_some(),
                        });
                    }
                }
            }
        }
        let root = m.root().to_path_buf();
        let pb = ctx.bar(todo.len() as u64, "bucket");
        for (k, chunk) in todo.chunks(cfg.batch.max(1)).enumerate() {
            if ctx.should_stop() {
                return Err(Error::Interrupted(format!(
                    "bucket: stopped after {} of {} items (each batch is kept); rerun the same command to bucket the rest",
                    k * cfg.batch.max(1),
                    todo.len()
                )));
            }
            let outcomes: Vec<Result<Outcome>> = chunk
                .par_iter()
                .map(|t| {
                    let r = process(&root, cfg, &list, t.item_id, &t.sha, &t.rel);
                    pb.inc(1);
                    r
                })
                .collect();
            let path = m.db_path().to_path_buf();
            let map = crate::manifest::sql_err(&path);
            let tx = m.conn_mut().transaction().map_err(map)?;
            // Bucket images this batch replaces or orphans, removed after the commit.
            let mut stale: Vec<String> = Vec::new();
            for (t, o) in chunk.iter().zip(outcomes) {
                match o? {
                    Outcome::Done(d) => {
                        let p = &d.placed;
                        tx.execute(
                            "INSERT OR REPLACE INTO buckets (item_id, bucket_w, bucket_h, orig_w, orig_h, resized_w, resized_h,
                                 crop_top, crop_left, crop_top_resized, crop_left_resized, target_w, target_h, path, run_id)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?2, ?3, ?12, ?13)",
                            params![
                                d.item_id,
                                d.bucket.width,
                                d.bucket.height,
                                d.orig.0,
                                d.orig.1,
                                p.resized_width,
                                p.resized_height,
                                p.crop_top_orig,
                                p.crop_left_orig,
                                p.crop_top,
                                p.crop_left,
                                d.rel,
                                run_id
                            ],
                        )
                        .map_err(map)?;
                        if t.was_rejected {
                            verdicts::set(&tx, d.item_id, "bucket", None, run_id).map_err(map)?;
                        }
                        stale.extend(t.old_bucket.clone().filter(|old| *old != d.rel));
                        report.bucketed += 1;
                        *report
                            .histogram
                            .entry(format!("{}x{}", d.bucket.width, d.bucket.height))
                            .or_default() += 1;
                    }
                    Outcome::Rejected { item_id, reason } => {
                        let v = Some((ItemStatus::Rejected, reason.as_str()));
                        verdicts::set(&tx, item_id, "bucket", v, run_id).map_err(map)?;
                        tx.execute("DELETE FROM buckets WHERE item_id = ?1", [item_id])
                            .map_err(map)?;
                        let code = reason.split(':').next().unwrap_or("unknown").to_string();
                        // Only a size refusal is the new settings' doing
                        // (a lost or broken image is not).
                        report.rebucketed_rejected += usize::from(
                            t.old_bucket.is_some() && t.other_settings && code == "too_small",
                        );
                        stale.extend(t.old_bucket.clone());
                        *report.rejected.entry(code).or_default() += 1;
                        let source = tx
                            .query_row(
                                "SELECT min(path) FROM sources WHERE item_id = ?1",
                                [item_id],
                                |r| r.get(0),
                            )
                            .map_err(map)?;
                        report.rejected_items.push(BucketRejection {
                            item_id,
                            source,
                            reason: reason.clone(),
                        });
                    }
                }
            }
            tx.commit().map_err(map)?;
            for rel in stale {
                // Best effort: a leftover file is harmless (no row points at it).
                let _ = std::fs::remove_file(root.join(rel));
            }
        }
        pb.finish_and_clear();
        report.waiting_on_a_set_aside_keeper =
            crate::stages::dedupe::waiting_on_a_set_aside_keeper(m.conn()).map_err(|e| m.err(e))?;
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    })
}

#[cfg(test)]
#[path = "bucket_tests.rs"]
mod tests;
