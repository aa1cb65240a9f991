//! `eps2v manifest merge OUT SHARD_DIR…`: join the folders that
//! `generate --shard K/N` filled (one per Slurm array task or Kubernetes
//! Job index) into one dataset.
//!
//! Shards must hold the same generation plan ([`plan::PlanSettings`]
//! equal field for field, same count); anything else is refused before OUT
//! is touched ([`check_shards`]). For each shard, in one transaction after
//! its files are copied:
//! - its `runs` are copied (new ids; `merged_runs` remembers which run of
//!   which source plan each one was, so merging a folder again copies
//!   nothing twice);
//! - its `items` are added by content address (an image already in OUT is
//!   the same item), their files hard-linked (copied across file systems)
//!   to the same relative path (`images/…`, and `buckets/…` for bucketed
//!   items);
//! - every table that refers to `items(id)` — generation parameters,
//!   captions, tags, hashes, buckets, and whatever later stages add — is
//!   copied with its item and run ids remapped (found through SQLite's
//!   foreign-key list, so new tables need no change here; `duplicates`'
//!   `cluster_id`, a keeper's item id without a declared key, is remapped
//!   too);
//! - its plan rows go into OUT's `gen_items`, a more advanced state
//!   (`rendered` > `rejected` > `planned`) replacing a less advanced one.
//!
//! Merging a folder again brings what it has redone since: rows an
//! earlier merge of it brought (a group of them, see `GROUPS` in merge_rows.rs, all written
//! by its runs) are replaced by its current ones — a later caption,
//! bucket or filter run there is taken, a verdict it dropped is dropped.
//! Rows OUT's own runs wrote stand (a stage run on OUT after the merge is
//! newer than the folder's copy), as do another folder's.
//!
//! An item whose image is missing from the folder (and from OUT) is left
//! out, its plan row going in as `planned` so that `generate OUT` renders
//! it again; a plan index OUT already has rendered to other pixels keeps
//! OUT's image (the folder's is left out and counted).
//!
//! OUT's plan header is the shards' settings with shard `1/1`, so
//! `eps2v generate OUT` with the same flags renders whatever no shard did.
//! Tables without an item reference (none today) are not merged and are
//! listed in the report.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::params;
use serde::Serialize;

use super::generate::plan::{self, StoredPlan};
use super::generate::Shard;
use super::import::write_atomic_if_absent;
use super::Ctx;
use crate::error::IoContext;
use crate::manifest::{self, Manifest, MANIFEST_FILE};
use crate::{Error, Result};

/// Tables whose `path` column names a file relative to the dataset.
const FILE_TABLES: &[&str] = &["items", "buckets"];

/// Configuration of `manifest merge`.
#[derive(Debug, Clone, Serialize)]
pub struct MergeConfig {
    /// Shard folders, merged in this order.
    pub shards: Vec<PathBuf>,
}

/// What one shard contributed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardSummary {
    /// Its folder.
    pub dir: PathBuf,
    /// Its shard of the plan (`K/N`).
    pub shard: String,
    /// Items new to OUT.
    pub items_added: u64,
    /// Items OUT already had.
    pub items_existing: u64,
    /// Plan rows added or advanced.
    pub rows_merged: u64,
    /// Files copied (hard-linked where the file system allows).
    pub files_copied: u64,
    /// Files its manifest names that are missing on disk (and not in OUT).
    pub files_missing: u64,
    /// The first few of them, relative to the folder.
    pub missing_files: Vec<String>,
    /// Items not taken because their image is missing: their plan rows go
    /// into OUT as `planned`, so `generate OUT` renders them again.
    pub items_without_image: u64,
    /// Items not taken because OUT has the same plan index rendered to
    /// other pixels (another device or precision): OUT's stays.
    pub items_conflicting: u64,
    /// The first few plan indices of those.
    pub conflict_examples: Vec<u64>,
    /// Rows an earlier merge of this folder had brought that it has since
    /// changed or removed (a later caption, bucket or filter run there),
    /// brought up to date.
    pub rows_updated: u64,
    /// Runs copied.
    pub runs_copied: u64,
}

/// What `manifest merge` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MergeReport {
    /// Run id in OUT.
    pub run_id: i64,
    /// Per shard.
    pub shards: Vec<ShardSummary>,
    /// Item tables copied (generic copy).
    pub tables: Vec<String>,
    /// Non-empty tables that were not merged.
    pub skipped_tables: Vec<String>,
    /// Plan size.
    pub count: u64,
    /// Plan rows rendered in OUT after the merge.
    pub rendered: u64,
    /// Plan indices not rendered by any shard merged so far.
    pub missing: u64,
    /// The first few of them.
    pub missing_examples: Vec<u64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Open a folder's manifest read-only with its plan, or say why it cannot
/// be merged.
fn open_shard(dir: &Path) -> Result<(Manifest, StoredPlan)> {
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(Error::config(format!(
            "{}: no {MANIFEST_FILE} here; pass folders that `eps2v generate` filled",
            dir.display()
        )));
    }
    let m = Manifest::open_read_only(dir)?;
    let has_plan: bool = m
        .conn()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'gen_plan'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| m.err(e))?
        > 0;
    let p = if has_plan {
        plan::stored_plan(m.conn())?
    } else {
        None
    };
    let p = p.ok_or_else(|| {
        Error::config(format!(
            "{}: has no generation plan; only folders made by `eps2v generate` can be merged",
            dir.display()
        ))
    })?;
    Ok((m, p))
}

/// Check that every shard holds the same plan as the first (and as OUT's,
/// when OUT already has one) before anything is written. Returns the plan.
pub fn check_shards(out: &Path, shards: &[PathBuf]) -> Result<StoredPlan> {
    let Some(first) = shards.first() else {
        return Err(Error::config(
            "manifest merge: give at least one shard folder",
        ));
    };
    let out_canon = std::fs::canonicalize(out).ok();
    let (_, reference) = open_shard(first)?;
    let mut seen = BTreeSet::new();
    for dir in shards {
        let canon = std::fs::canonicalize(dir).at(dir)?;
        if Some(&canon) == out_canon.as_ref() {
            return Err(Error::config(format!(
                "{}: is the output folder itself; merge into a new folder",
                dir.display()
            )));
        }
        if !seen.insert(canon) {
            return Err(Error::config(format!("{}: given twice", dir.display())));
        }
        let (shard, p) = open_shard(dir)?;
        refuse_live_runs(&shard, dir)?;
        let why = if let Some((f, a, b)) = reference.settings.first_difference(&p.settings)? {
            Some(format!("{f} is {b} there but {a} in {}", first.display()))
        } else if p.count != reference.count {
            Some(format!(
                "count is {} there but {} in {}",
                p.count,
                reference.count,
                first.display()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::config(format!(
                "{}: holds a different generation plan ({why}); only shards of one plan can be merged",
                dir.display()
            )));
        }
    }
    if out.join(MANIFEST_FILE).is_file() {
        let m = Manifest::open_read_only(out)?;
        let has_plan: i64 = m
            .conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'gen_plan'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| m.err(e))?;
        let existing = if has_plan > 0 {
            plan::stored_plan(m.conn())?
        } else {
            None
        };
        match existing {
            Some(o) => {
                if let Some((f, a, b)) = o.settings.first_difference(&reference.settings)? {
                    return Err(Error::config(format!(
                        "{}: already holds another generation plan ({f} is {a} there, {b} in the shards)",
                        out.display()
                    )));
                }
            }
            None => {
                let items: i64 = m
                    .conn()
                    .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
                    .map_err(|e| m.err(e))?;
                if items > 0 {
                    return Err(Error::config(format!(
                        "{}: already holds {items} items that are not from this plan; merge into a new folder",
                        out.display()
                    )));
                }
            }
        }
    }
    Ok(reference)
}

/// Refuse a shard that a process is still writing (a `running` run whose
/// lock is held): its rows would be copied half done, and its run row
/// would stay `running` in OUT. A run left `running` by a dead process is
/// copied as `failed` ([`merge_rows`]).
fn refuse_live_runs(shard: &Manifest, dir: &Path) -> Result<()> {
    let running: Vec<(i64, String)> = {
        let mut st = shard
            .conn()
            .prepare("SELECT id, stage FROM runs WHERE status = 'running' ORDER BY id")
            .map_err(|e| shard.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| shard.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| shard.err(e))?
    };
    for (id, stage) in running {
        if let Some(who) = shard.run_holder(id)? {
            return Err(Error::config(format!(
                "{}: its {stage} run {id} is still in progress ({who}); merge once it has ended",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Merge `cfg.shards` into `out` (already checked with [`check_shards`]).
pub fn run(cfg: &MergeConfig, out: &mut Manifest, ctx: &Ctx) -> Result<MergeReport> {
    let t0 = Instant::now();
    let reference = check_shards(out.root(), &cfg.shards)?;
    crate::manifest::stage_run(out, "merge", cfg, |out, run_id| {
        let mut report = MergeReport {
            run_id,
            count: reference.count,
            ..Default::default()
        };
        let root = out.root().to_path_buf();
        let db_path = out.db_path().to_path_buf();
        let map = manifest::sql_err(&db_path);
        // OUT's plan header: the shards' settings, the whole plan; a plan
        // the shards have since extended (`--count` raised) grows with
        // them, so that `generate` on OUT with the new count finds its rows
        // planned (with the old count it would replan and set them aside).
        {
            let exists: bool = out
                .conn()
                .query_row("SELECT count(*) FROM gen_plan", [], |r| r.get::<_, i64>(0))
                .map_err(map)?
                > 0;
            if exists {
                out.conn()
                    .execute(
                        "UPDATE gen_plan SET count = ?1, updated_at = ?2 WHERE id = 1 AND count < ?1",
                        params![reference.count as i64, manifest::now()],
                    )
                    .map_err(map)?;
            } else {
                const HEADER: &str = "INSERT INTO gen_plan \
                     (id, plan_id, settings_json, count, shard, run_id, updated_at) \
                     VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)";
                out.conn()
                    .execute(
                        HEADER,
                        params![
                            format!("merge-{}", &reference.plan_id),
                            serde_json::to_string(&reference.settings)?,
                            reference.count as i64,
                            Shard::ALL.to_string(),
                            run_id,
                            manifest::now()
                        ],
                    )
                    .map_err(map)?;
            }
        }
        let bar = ctx.bar(cfg.shards.len() as u64, "merge");
        let mut merged_tables = BTreeSet::new();
        let mut skipped = BTreeSet::new();
        for dir in &cfg.shards {
            let (shard_m, shard_plan) = open_shard(dir)?;
            let mut missing_images = BTreeSet::new();
            // Held until its rows are in: a run started on the shard since
            // the check above is refused, and one that began before it
            // (a requeued job) is found here.
            let _shard_lock = shard_m.lock_for_reading()?;
            refuse_live_runs(&shard_m, dir)?;
            let mut s = ShardSummary {
                dir: dir.clone(),
                shard: shard_plan.shard.to_string(),
                ..Default::default()
            };
            // Files first (content-addressed, idempotent), then one transaction.
            for table in FILE_TABLES {
                let exists: i64 = shard_m
                    .conn()
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                        [table],
                        |r| r.get(0),
                    )
                    .map_err(|e| shard_m.err(e))?;
                if exists == 0 {
                    continue;
                }
                let mut st = shard_m
                    .conn()
                    .prepare(&format!("SELECT path FROM {table} WHERE path IS NOT NULL"))
                    .map_err(|e| shard_m.err(e))?;
                let paths: Vec<String> = st
                    .query_map([], |r| r.get(0))
                    .map_err(|e| shard_m.err(e))?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(|e| shard_m.err(e))?;
                for rel in paths {
                    // The manifest's paths are relative and inside the
                    // folder; anything else is not copied anywhere.
                    let plain = std::path::Path::new(&rel)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                    if !plain {
                        return Err(Error::model(format!(
                            "{}: {table}.path {rel:?} is not a relative path inside the dataset; is this an eps2v manifest?",
                            shard_m.db_path().display()
                        )));
                    }
                    let src = dir.join(&rel);
                    let dst = root.join(&rel);
                    if dst.is_file() {
                        continue;
                    }
                    // A hard link where the file system allows (files are
                    // content-addressed and only ever replaced by rename,
                    // so OUT and the shard never see each other's
                    // changes); a copy otherwise.
                    if src.is_file() {
                        let dir = dst.parent().unwrap_or(&root);
                        std::fs::create_dir_all(dir).at(dir)?;
                        if crate::atomic::link(&src, &dst)? {
                            s.files_copied += 1;
                            continue;
                        }
                    }
                    match std::fs::read(&src) {
                        Ok(bytes) => {
                            write_atomic_if_absent(&dst, &bytes)?;
                            s.files_copied += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            s.files_missing += 1;
                            if s.missing_files.len() < 5 {
                                s.missing_files.push(rel.clone());
                            }
                            if *table == "items" {
                                missing_images.insert(rel);
                            }
                        }
                        Err(e) => return Err(Error::io(&src, e)),
                    }
                }
            }
            drop(shard_m);
            rows::merge_rows(
                run_id,
                out,
                dir,
                &shard_plan,
                &missing_images,
                &mut s,
                &mut merged_tables,
                &mut skipped,
            )?;
            report.shards.push(s);
            bar.inc(1);
        }
        bar.finish_and_clear();
        report.tables = merged_tables.into_iter().collect();
        report.skipped_tables = skipped.into_iter().collect();
        let rendered: Vec<i64> = {
            let mut st = out
                .conn()
                .prepare("SELECT idx FROM gen_items WHERE state = 'rendered'")
                .map_err(map)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(map)?;
            rows.collect::<rusqlite::Result<_>>().map_err(map)?
        };
        report.rendered = rendered.len() as u64;
        let done: BTreeSet<i64> = rendered.into_iter().collect();
        let planned: i64 = out
            .conn()
            .query_row("SELECT count FROM gen_plan WHERE id = 1", [], |r| r.get(0))
            .map_err(map)?;
        report.count = planned as u64;
        let missing: Vec<u64> = (0..report.count)
            .filter(|i| !done.contains(&(*i as i64)))
            .collect();
        report.missing = missing.len() as u64;
        report.missing_examples = missing.into_iter().take(10).collect();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    })
}

#[path = "merge_rows.rs"]
mod rows;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_without_a_plan_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = check_shards(&d.path().join("out"), &[d.path().join("nope")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no manifest.sqlite"), "{e}");
        drop(Manifest::init(&d.path().join("plain")).unwrap());
        let e = check_shards(&d.path().join("out"), &[d.path().join("plain")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no generation plan"), "{e}");
        let e = check_shards(&d.path().join("out"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one shard"), "{e}");
    }
}
