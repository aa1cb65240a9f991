//! `eps2v import DIR --from FOLDER`: bring existing images into a dataset.
//!
//! For every image file under `--from` (recursive, sorted, by extension;
//! symbolic links followed with loop detection, see [`super::walk`]):
//! read the bytes once, sha256 them (the content address), decode once with
//! limits (decompression bombs are refused before allocation), compute the
//! pixel sha256 / pHash / dHash from that same decode, read A1111
//! `parameters` (PNG text chunks, JPEG/WebP EXIF UserComment) and kohya
//! sidecar captions (`.txt`, `.caption`), and copy the original bytes to
//! `images/ab/<sha256>.<ext>` (temp file + rename). Byte-identical files
//! collapse into one item with several `sources`.
//!
//! Bad files (empty, truncated, corrupt, over the limits, unsupported) are
//! recorded as `rejected` with a reason code and the import goes on.
//!
//! Resumable and idempotent: a source path already recorded with the same
//! size and mtime is skipped, unless import itself rejected its item under
//! other decode limits (`--max-side`, `--max-pixels`): then this run decides
//! again ([`plan_file`]); items rejected by other stages are never
//! touched. Results are committed in batches, each in one transaction
//! *after* its image files are in place, so a `kill -9` loses at most the
//! batch in flight (redone on rerun; files already copied are recognised by
//! their content address).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::error::{Error, IoContext, Result};
use crate::imaging::{self, decode::DecodeLimits};
use crate::manifest::{
    self, verdicts, GenerationParams, HashRecord, ItemStatus, Manifest, NewItem,
};

pub use super::walk::IMAGE_EXTENSIONS;

/// Configuration of the import stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// Folder to import from (recursive).
    pub from: PathBuf,
    /// Decoder limits (largest side, pixel count, allocation).
    pub limits: ImportLimits,
    /// Files per transaction.
    pub batch: usize,
}

/// Decode limits, in config form.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted pixel count.
    pub max_pixels: u64,
    /// Largest decoder allocation, in bytes.
    pub max_alloc: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        let d = DecodeLimits::default();
        Self {
            max_side: d.max_width.max(d.max_height),
            max_pixels: d.max_pixels,
            max_alloc: d.max_alloc_bytes,
        }
    }
}

impl ImportLimits {
    /// Set the pixel limit (`--max-pixels`); the decoder's allocation
    /// budget grows with it (8 bytes a pixel, 16-bit RGBA), so that a
    /// raised limit is not refused by the fixed default budget.
    pub fn set_max_pixels(&mut self, v: u64) {
        self.max_pixels = v;
        self.max_alloc = self.max_alloc.max(v.saturating_mul(8));
    }
}

impl From<ImportLimits> for DecodeLimits {
    fn from(l: ImportLimits) -> Self {
        DecodeLimits {
            max_width: l.max_side,
            max_height: l.max_side,
            max_pixels: l.max_pixels,
            max_alloc_bytes: l.max_alloc,
        }
    }
}

impl Default for ImportConfig {
    fn default() -> Self {
        Self {
            from: PathBuf::new(),
            limits: ImportLimits::default(),
            batch: 64,
        }
    }
}

/// A per-file failure that produced no item (e.g. unreadable file).
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The source path.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// What `import` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// Run id.
    pub run_id: i64,
    /// Image files found under `--from` (links to files included).
    pub found: usize,
    /// Entries of `--from` that were not image files nor folders to walk:
    /// broken links, FIFOs, sockets, devices, link loops, unreadable folders.
    pub skipped: super::walk::Skipped,
    /// Already imported earlier (same path, size, mtime): skipped.
    pub already_imported: usize,
    /// New ok items (including earlier rejections that now decode).
    pub imported: usize,
    /// Files whose bytes equal an item already in the dataset.
    pub same_file: usize,
    /// Items an earlier import had rejected under other limits, decided
    /// again by this run (counted again in `imported` or `rejected`).
    pub reconsidered: usize,
    /// Items rejected by this run, by reason code.
    pub rejected: std::collections::BTreeMap<String, usize>,
    /// Every newly rejected file with its reason (`corrupt: …`), in the
    /// order written; the summary prints one line each.
    pub rejected_files: Vec<Failure>,
    /// Items with A1111 generation parameters.
    pub with_parameters: usize,
    /// Items with a sidecar caption.
    pub with_caption: usize,
    /// Files with a content/extension mismatch (imported anyway).
    pub wrong_extension: usize,
    /// Sidecar captions that are there but were not read (not UTF-8 or
    /// UTF-16 text, too large), with why: their images are imported
    /// without them.
    pub unread_captions: Vec<Failure>,
    /// Files that could not be read at all.
    pub failed: Vec<Failure>,
    /// Files imported from this folder before that are gone from it now
    /// (their items stay in the dataset: import only adds and updates).
    pub gone: usize,
    /// The first few of them.
    pub gone_examples: Vec<String>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl ImportReport {
    /// Total rejected.
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }
}

/// Result of processing one file (pure data, no manifest access).
#[derive(Debug, Clone)]
pub struct FileOutcome {
    /// Absolute source path.
    pub source: PathBuf,
    /// File size.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// The item row.
    pub item: NewItem,
    /// Hashes (ok items only).
    pub hashes: Option<HashRecord>,
    /// A1111 parameters, when present and parseable.
    pub generation: Option<GenerationParams>,
    /// Sidecar captions: (source, text).
    pub captions: Vec<(&'static str, String)>,
    /// Sidecars that are there but were not read ([`read_sidecars`]).
    pub caption_problems: Vec<Failure>,
    /// Note on the source (e.g. `wrong_extension: png content in .jpg`).
    pub note: Option<String>,
}

#[path = "import_files.rs"]
mod files;
pub use files::*;
use files::{mtime_ns, SIDECARS};

/// A source path the manifest already has, as [`plan_file`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSource {
    /// Recorded size.
    pub size: i64,
    /// Recorded mtime.
    pub mtime_ns: i64,
    /// Its item was rejected by an `import` run whose decode limits differ
    /// from this run's (so this run may decide otherwise).
    pub rejected_under_other_limits: bool,
    /// Its item's sidecar captions as imported, `(source, text)` by source.
    pub sidecars: Vec<(String, String)>,
    /// Its item.
    pub item_id: i64,
}

/// What `import` does with one file it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePlan {
    /// Not seen before, or changed since: process it.
    Process,
    /// Seen, unchanged, but import rejected it under other limits: process
    /// it again (a stage remakes its own rejections, never another's).
    Reconsider,
    /// Seen and unchanged, its decision stands.
    Skip,
}

/// The rerun rule of `import`, over plain data.
pub fn plan_file(known: Option<&KnownSource>, size: i64, mtime_ns: i64) -> FilePlan {
    match known {
        None => FilePlan::Process,
        Some(k) if k.size != size || k.mtime_ns != mtime_ns => FilePlan::Process,
        Some(k) if k.rejected_under_other_limits => FilePlan::Reconsider,
        Some(_) => FilePlan::Skip,
    }
}

/// Run the import stage.
pub fn run(cfg: &ImportConfig, m: &mut Manifest, ctx: &Ctx) -> Result<ImportReport> {
    let t0 = Instant::now();
    let from = fs::canonicalize(&cfg.from).map_err(|e| {
        Error::config(format!(
            "{}: {e}; pass an existing folder with --from",
            cfg.from.display()
        ))
    })?;
    // A source folder that holds the dataset: its own images, buckets
    // and exports are not new images.
    let listing = super::walk::list_images_except(&from, Some(m.root()))?;
    let limits = DecodeLimits::from(cfg.limits);
    // Ctrl-C / SIGTERM: stop after the batch in hand (each is committed).
    let _signals = crate::signal::install();
    crate::manifest::stage_run(m, "import", cfg, |m, run_id| {
        // Under the writer lock: no other writer's temp file is swept.
        sweep_temp_files(&m.root().join("images"))?;
        let mut report = ImportReport {
            run_id,
            found: listing.files.len(),
            skipped: listing.skipped,
            ..Default::default()
        };
        // Import runs whose rejections stand: those with these decode limits.
        let same_limits =
            super::runs_with_same_settings(m, "import", |c: &ImportConfig| c.limits == cfg.limits)?;
        // Sources already recorded, with how their item was decided.
        let known: HashMap<String, KnownSource> = {
            // Import's own verdict (and its run), whatever other stages decided.
            const KNOWN: &str =
                "SELECT s.path, s.size, s.mtime_ns, v.status IS NOT NULL, v.run_id, s.item_id \
                                 FROM sources s LEFT JOIN item_verdicts v \
                                 ON v.item_id = s.item_id AND v.stage = 'import'";
            let mut st = m.conn().prepare(KNOWN).map_err(|e| m.err(e))?;
            let rows = st
                .query_map([], |r| {
                    let by_import: Option<bool> = r.get(3)?;
                    let run: Option<i64> = r.get(4)?;
                    Ok((
                        r.get(0)?,
                        KnownSource {
                            size: r.get(1)?,
                            mtime_ns: r.get(2)?,
                            rejected_under_other_limits: by_import == Some(true)
                                && !run.is_some_and(|r| same_limits.contains(&r)),
                            sidecars: Vec::new(),
                            item_id: r.get(5)?,
                        },
                    ))
                })
                .map_err(|e| m.err(e))?;
            let mut known: HashMap<String, KnownSource> = rows
                .collect::<rusqlite::Result<_>>()
                .map_err(|e| m.err(e))?;
            let mut st = m
                .conn()
                .prepare(
                    "SELECT s.path, c.source, c.text FROM sources s JOIN captions c ON c.item_id = s.item_id \
                     WHERE c.source IN ('sidecar_txt', 'sidecar_caption') ORDER BY s.path, c.source",
                )
                .map_err(|e| m.err(e))?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| m.err(e))?;
            for row in rows {
                let (path, source, text) = row.map_err(|e| m.err(e))?;
                if let Some(k) = known.get_mut(&path) {
                    k.sidecars.push((source, text));
                }
            }
            known
        };
        // An unchanged image whose sidecar was edited or added is read
        // again for its captions, and so is every copy of an image whose
        // sidecar caption no copy has any more. The captions belong to the
        // item, which any of its copies' sidecars may have given.
        let mut copies: HashMap<i64, Vec<&str>> = HashMap::new();
        for (path, k) in &known {
            copies.entry(k.item_id).or_default().push(path);
        }
        type Sidecars = std::collections::BTreeSet<(String, String)>;
        // Each path's sidecars as read now, and those that could not be.
        let mut read: HashMap<PathBuf, (Sidecars, Vec<Failure>)> = HashMap::new();
        let mut now = |p: &Path| -> Sidecars {
            read.entry(p.to_path_buf())
                .or_insert_with(|| {
                    let (caps, problems) = read_sidecars(p);
                    let caps = caps.into_iter().map(|(s, t)| (s.to_string(), t)).collect();
                    (caps, problems)
                })
                .0
                .clone()
        };
        // Sources recorded under this folder that are no longer there
        // (deleted while curating): said, their items left as they are.
        {
            let listed: std::collections::HashSet<String> =
                listing.files.iter().map(|p| source_key(p)).collect();
            let mut gone: Vec<&String> = known
                .keys()
                .filter(|k| {
                    let p = Path::new(k.as_str());
                    p.starts_with(&from) && !listed.contains(*k) && !p.exists()
                })
                .collect();
            gone.sort();
            report.gone = gone.len();
            report.gone_examples = gone.into_iter().take(5).cloned().collect();
        }
        let mut todo: Vec<PathBuf> = Vec::new();
        let mut skipped: Vec<PathBuf> = Vec::new();
        for p in listing.files {
            let (size, mt) =
                fs::metadata(&p).map_or((-1, -1), |meta| (meta.len() as i64, mtime_ns(&meta)));
            let k = known.get(&source_key(&p));
            let redo = plan_file(k, size, mt) != FilePlan::Skip
                || k.is_some_and(|k| {
                    let stored: Sidecars = k.sidecars.iter().cloned().collect();
                    if !now(&p).is_subset(&stored) {
                        return true;
                    }
                    let given: Sidecars = copies
                        .get(&k.item_id)
                        .into_iter()
                        .flatten()
                        .flat_map(|q| now(Path::new(q)))
                        .collect();
                    !stored.is_subset(&given)
                });
            if redo {
                todo.push(p);
            } else {
                skipped.push(p);
            }
        }
        // A sidecar that still cannot be read is said on every import
        // (its image trains without it), not only the first.
        for p in &skipped {
            if let Some((_, problems)) = read.get(p) {
                report.unread_captions.extend(problems.iter().cloned());
            }
        }
        report.already_imported = report.found - todo.len();
        let root = m.root().to_path_buf();
        let pb = ctx.bar(todo.len() as u64, "import");
        for (k, chunk) in todo.chunks(cfg.batch.max(1)).enumerate() {
            if ctx.should_stop() {
                return Err(Error::Interrupted(format!(
                    "import: stopped after {} of {} new files (each batch is kept); rerun the same command to import the rest",
                    k * cfg.batch.max(1),
                    todo.len()
                )));
            }
            let outcomes: Vec<std::result::Result<FileOutcome, Failure>> = chunk
                .par_iter()
                .map(|p| {
                    let r = process_file(&root, p, &limits).map_err(|e| Failure {
                        path: p.clone(),
                        reason: e.to_string(),
                    });
                    pb.inc(1);
                    r
                })
                .collect();
            write_batch(m, run_id, outcomes, &mut report)?;
        }
        pb.finish_and_clear();
        for (path, why) in &report.skipped.unreadable {
            report.failed.push(Failure {
                path: path.clone(),
                reason: format!("unreadable folder: {why}"),
            });
        }
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    })
}

fn write_batch(
    m: &mut Manifest,
    run_id: i64,
    outcomes: Vec<std::result::Result<FileOutcome, Failure>>,
    report: &mut ImportReport,
) -> Result<()> {
    let path = m.db_path().to_path_buf();
    let map = crate::manifest::sql_err(&path);
    let tx = m.conn_mut().transaction().map_err(map)?;
    for o in outcomes {
        let o = match o {
            Ok(o) => o,
            Err(f) => {
                report.failed.push(f);
                continue;
            }
        };
        report
            .unread_captions
            .extend(o.caption_problems.iter().cloned());
        // The item with these bytes, and whether import itself rejected it.
        let existing: Option<(i64, bool)> = tx
            .query_row(
                "SELECT i.id, EXISTS (SELECT 1 FROM item_verdicts v WHERE v.item_id = i.id AND v.stage = 'import')
                 FROM items i WHERE i.sha256 = ?1",
                [&o.item.sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(map)?;
        let item_id = match existing {
            Some((id, false)) => {
                report.same_file += 1;
                id
            }
            Some((id, true)) => {
                // This run decides again what an import run rejected.
                tx.prepare_cached(
                    "UPDATE items SET path = ?2, width = ?3, height = ?4, format = ?5 WHERE id = ?1",
                )
                .and_then(|mut st| {
                    st.execute(rusqlite::params![
                        id,
                        o.item.path,
                        o.item.width,
                        o.item.height,
                        o.item.format,
                    ])
                })
                .map_err(map)?;
                let verdict = (o.item.status != ItemStatus::Ok)
                    .then(|| (o.item.status, o.item.reason.as_deref().unwrap_or("")));
                verdicts::set(&tx, id, "import", verdict, run_id).map_err(map)?;
                report.reconsidered += 1;
                record_decision(&tx, run_id, id, &o, report).map_err(map)?;
                id
            }
            None => {
                let id = manifest::insert_item(&tx, run_id, &o.item).map_err(map)?;
                record_decision(&tx, run_id, id, &o, report).map_err(map)?;
                id
            }
        };
        if o.note.is_some() {
            report.wrong_extension += 1;
        }
        // Each sidecar as it is now: its caption and tags replaced, or,
        // when it is gone, removed (tags only ever added kept stale ones),
        // unless another path of the same bytes has that sidecar (two
        // copies of an image, one captioned: the caption stays, whichever
        // copy is imported last).
        let source_now = source_key(&o.source);
        let other_has = |source: &str| -> rusqlite::Result<bool> {
            let mut st =
                tx.prepare_cached("SELECT path FROM sources WHERE item_id = ?1 AND path <> ?2")?;
            let paths = st.query_map(params![item_id, source_now], |r| r.get::<_, String>(0))?;
            for p in paths {
                let p = std::path::PathBuf::from(p?);
                if sidecar_captions(&p).iter().any(|(s, _)| *s == source) {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        for (_, source) in SIDECARS {
            let text = o.captions.iter().find(|(s, _)| *s == source);
            if text.is_none() && other_has(source).map_err(map)? {
                continue;
            }
            tx.execute(
                "DELETE FROM tags WHERE item_id = ?1 AND source = ?2",
                params![item_id, source],
            )
            .map_err(map)?;
            let Some((_, text)) = text else {
                tx.execute(
                    "DELETE FROM captions WHERE item_id = ?1 AND source = ?2",
                    params![item_id, source],
                )
                .map_err(map)?;
                continue;
            };
            manifest::upsert_caption(&tx, run_id, item_id, source, text, None).map_err(map)?;
            for (pos, tag) in manifest::split_tags(text).iter().enumerate() {
                manifest::upsert_tag(&tx, run_id, item_id, source, (tag, pos), None)
                    .map_err(map)?;
            }
        }
        let source_path = source_key(&o.source);
        let before: Option<i64> = tx
            .query_row(
                "SELECT item_id FROM sources WHERE path = ?1",
                [&source_path],
                |r| r.get(0),
            )
            .optional()
            .map_err(map)?;
        manifest::insert_source(
            &tx,
            run_id,
            item_id,
            &source_path,
            o.size,
            o.mtime_ns,
            o.note.as_deref(),
        )
        .map_err(map)?;
        // The file at a known path changed: the item import made of its
        // old content, now without any source, is not in the dataset any
        // more (the edited image replaces it).
        if let Some(old) = before.filter(|&old| old != item_id) {
            let orphan: bool = tx
                .query_row(
                    "SELECT NOT EXISTS (SELECT 1 FROM sources WHERE item_id = ?1)
                         AND coalesce((SELECT stage FROM runs WHERE id = items.run_id) = 'import', 0)
                     FROM items WHERE id = ?1",
                    [old],
                    |r| r.get(0),
                )
                .map_err(map)?;
            if orphan {
                let why = format!("superseded: {source_path} changed (now item {item_id})");
                let v = Some((ItemStatus::Rejected, why.as_str()));
                verdicts::set(&tx, old, "import", v, run_id).map_err(map)?;
            }
        }
    }
    tx.commit().map_err(map)?;
    Ok(())
}

/// Count the decision of this run on item `id` and store what came with
/// the decode (hashes, A1111 parameters and their prompt as a caption).
fn record_decision(
    tx: &rusqlite::Transaction,
    run_id: i64,
    id: i64,
    o: &FileOutcome,
    report: &mut ImportReport,
) -> rusqlite::Result<()> {
    match o.item.status {
        ItemStatus::Ok => report.imported += 1,
        _ => {
            let code = o
                .item
                .reason
                .as_deref()
                .and_then(|r| r.split(':').next())
                .unwrap_or("unknown")
                .to_string();
            *report.rejected.entry(code).or_default() += 1;
            report.rejected_files.push(Failure {
                path: o.source.clone(),
                reason: o.item.reason.clone().unwrap_or_default(),
            });
        }
    }
    if let Some(h) = &o.hashes {
        manifest::insert_hashes(tx, run_id, id, h)?;
    }
    if let Some(g) = &o.generation {
        manifest::insert_generation(tx, run_id, id, g)?;
        if let Some(p) = g.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            manifest::upsert_caption(tx, run_id, id, "a1111_prompt", p, None)?;
        }
        report.with_parameters += 1;
    }
    if !o.captions.is_empty() {
        report.with_caption += 1;
    }
    Ok(())
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
