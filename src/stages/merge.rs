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
//! earlier merge of it brought (a group of them, see `GROUPS`, all written
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

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::generate::plan::{self, StoredPlan};
use super::generate::Shard;
use super::import::write_atomic_if_absent;
use super::Ctx;
use crate::error::IoContext;
use crate::manifest::{self, Manifest, MANIFEST_FILE};
use crate::{Error, Result};

/// Tables handled explicitly (not by the generic item-table copy).
const SPECIAL: &[&str] = &["items", "runs", "gen_plan", "gen_items", "merged_runs"];

/// Item references that are not declared as foreign keys.
const UNDECLARED_ITEM_REFS: &[(&str, &str)] = &[("duplicates", "cluster_id")];

/// The rows of an item table that one decision writes together, which a
/// re-merge replaces as a whole: tags and captions per (item, source),
/// verdicts per (item, stage), a training split per (item, run). Any other
/// table: per item.
const GROUPS: &[(&str, &[&str])] = &[
    ("tags", &["item_id", "source"]),
    ("captions", &["item_id", "source"]),
    ("item_verdicts", &["item_id", "stage"]),
    ("train_split", &["item_id", "run_id"]),
];

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

/// Columns of `table` in schema `db` (`main` / `shard`): (name, is pk).
fn columns(conn: &Connection, db: &str, table: &str) -> rusqlite::Result<Vec<(String, bool)>> {
    let mut st = conn.prepare(&format!("PRAGMA {db}.table_info(\"{table}\")"))?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)? > 0))
    })?;
    rows.collect()
}

/// Foreign keys of `table`: (column, referenced table).
fn foreign_keys(
    conn: &Connection,
    db: &str,
    table: &str,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare(&format!("PRAGMA {db}.foreign_key_list(\"{table}\")"))?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(3)?, r.get::<_, String>(2)?)))?;
    rows.collect()
}

fn tables(conn: &Connection, db: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(&format!(
        "SELECT name FROM {db}.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ))?;
    let rows = st.query_map([], |r| r.get(0))?;
    rows.collect()
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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
            merge_rows(
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

/// Copy one shard's rows into OUT in one transaction (the shard attached
/// as `shard`). Items whose image is in `missing_images` (relative paths
/// the shard lacks and OUT does not have) are left out.
#[allow(clippy::too_many_arguments)]
fn merge_rows(
    run_id: i64,
    out: &mut Manifest,
    dir: &Path,
    shard_plan: &StoredPlan,
    missing_images: &BTreeSet<String>,
    s: &mut ShardSummary,
    merged_tables: &mut BTreeSet<String>,
    skipped: &mut BTreeSet<String>,
) -> Result<()> {
    let db_path = out.db_path().to_path_buf();
    let map = manifest::sql_err(&db_path);
    let shard_db = dir.join(MANIFEST_FILE);
    out.conn()
        .execute("ATTACH DATABASE ?1 AS shard", [shard_db.to_string_lossy()])
        .map_err(map)?;
    let result = (|| -> Result<()> {
        let conn = out.conn_mut();
        let tx = conn.transaction().map_err(map)?;
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS run_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);
             CREATE TEMP TABLE IF NOT EXISTS item_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);
             DELETE FROM run_map; DELETE FROM item_map;",
        )
        .map_err(map)?;
        // Runs.
        let runs: Vec<i64> = {
            let mut st = tx
                .prepare("SELECT id FROM shard.runs ORDER BY id")
                .map_err(map)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(map)?;
            rows.collect::<rusqlite::Result<_>>().map_err(map)?
        };
        let mut found_dead = Vec::new();
        for old in runs {
            let known: Option<i64> = tx
                .query_row(
                    "SELECT run_id FROM merged_runs WHERE source_plan = ?1 AND source_run_id = ?2",
                    params![shard_plan.plan_id, old],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map)?;
            let new = match known {
                Some(n) => n,
                None => {
                    // A row that a dead process left `running` (a killed
                    // shard; live ones were refused) is copied as `failed`,
                    // noting that this merge found it so.
                    const COPY: &str = "INSERT INTO runs \
                         (stage, config_json, tool_version, started_at, ended_at, status, counts_json) \
                         SELECT stage, config_json, tool_version, started_at, ended_at, \
                         CASE status WHEN 'running' THEN 'failed' ELSE status END, \
                         CASE status WHEN 'running' THEN coalesce(counts_json, \
                         json_object('process_gone', 1, 'marked_failed_by', ?2)) \
                         ELSE counts_json END \
                         FROM shard.runs WHERE id = ?1";
                    tx.execute(COPY, params![old, run_id]).map_err(map)?;
                    let n = tx.last_insert_rowid();
                    let marked: bool = tx
                        .query_row(
                            "SELECT CASE WHEN status <> 'running' AND json_valid(counts_json)
                                    THEN json_extract(counts_json, '$.marked_failed_by') IS NOT NULL
                                    ELSE 0 END
                             FROM shard.runs WHERE id = ?1",
                            [old],
                            |r| r.get(0),
                        )
                        .map_err(map)?;
                    if marked {
                        found_dead.push(n);
                    }
                    tx.execute(
                        "INSERT INTO merged_runs (source_plan, source_run_id, run_id, source_dir) VALUES (?1, ?2, ?3, ?4)",
                        params![shard_plan.plan_id, old, n, dir.display().to_string()],
                    )
                    .map_err(map)?;
                    s.runs_copied += 1;
                    n
                }
            };
            tx.execute(
                "INSERT INTO run_map (old, new) VALUES (?1, ?2)",
                params![old, new],
            )
            .map_err(map)?;
        }
        // A dead run the shard found (`marked_failed_by` a run of the
        // shard) names that run's id here.
        for id in found_dead {
            tx.execute(
                "UPDATE main.runs SET counts_json = json_set(counts_json, '$.marked_failed_by',
                     (SELECT new FROM run_map WHERE old = json_extract(counts_json, '$.marked_failed_by')))
                 WHERE id = ?1 AND json_extract(counts_json, '$.marked_failed_by') IN (SELECT old FROM run_map)",
                [id],
            )
            .map_err(map)?;
        }
        // Items, by content address.
        let item_cols: Vec<String> = columns(&tx, "shard", "items")
            .map_err(map)?
            .into_iter()
            .map(|c| c.0)
            .filter(|c| c != "id")
            .collect();
        let main_items: BTreeSet<String> = columns(&tx, "main", "items")
            .map_err(map)?
            .into_iter()
            .map(|c| c.0)
            .collect();
        let item_cols: Vec<String> = item_cols
            .into_iter()
            .filter(|c| main_items.contains(c))
            .collect();
        let ids: Vec<(i64, String, String)> = {
            let mut st = tx
                .prepare("SELECT id, sha256, path FROM shard.items ORDER BY id")
                .map_err(map)?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(map)?;
            rows.collect::<rusqlite::Result<_>>().map_err(map)?
        };
        // A plan index OUT already has rendered to other pixels (the shard
        // rendered it again elsewhere): OUT's image stays the index's only
        // item, instead of a second image of the same plan row.
        let conflicting: std::collections::BTreeMap<i64, i64> = {
            let mut st = tx
                .prepare(
                    "SELECT s.item_id, s.idx FROM shard.gen_items s
                     JOIN main.gen_items g ON g.idx = s.idx
                     JOIN shard.items si ON si.id = s.item_id
                     JOIN main.items mi ON mi.id = g.item_id
                     WHERE s.state = 'rendered' AND g.state = 'rendered' AND si.sha256 <> mi.sha256",
                )
                .map_err(map)?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(map)?;
            rows.collect::<rusqlite::Result<_>>().map_err(map)?
        };
        let item_fks = foreign_keys(&tx, "shard", "items").map_err(map)?;
        let select: Vec<String> = item_cols
            .iter()
            .map(|c| match item_fks.iter().find(|(from, _)| from == c) {
                Some((_, t)) if t == "runs" => {
                    format!("(SELECT new FROM run_map WHERE old = s.{})", quote(c))
                }
                _ => format!("s.{}", quote(c)),
            })
            .collect();
        let insert_item = format!(
            "INSERT INTO main.items ({}) SELECT {} FROM shard.items s WHERE s.id = ?1",
            item_cols
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", "),
            select.join(", ")
        );
        for (old, sha, path) in ids {
            let existing: Option<i64> = tx
                .query_row("SELECT id FROM main.items WHERE sha256 = ?1", [&sha], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(map)?;
            let new = match existing {
                Some(id) => {
                    s.items_existing += 1;
                    id
                }
                None if missing_images.contains(&path) => {
                    s.items_without_image += 1;
                    continue;
                }
                None if conflicting.contains_key(&old) => {
                    s.items_conflicting += 1;
                    if s.conflict_examples.len() < 5 {
                        s.conflict_examples.push(conflicting[&old] as u64);
                    }
                    continue;
                }
                None => {
                    tx.execute(&insert_item, [old]).map_err(map)?;
                    s.items_added += 1;
                    tx.last_insert_rowid()
                }
            };
            tx.execute(
                "INSERT INTO item_map (old, new) VALUES (?1, ?2)",
                params![old, new],
            )
            .map_err(map)?;
        }
        // Every other table that refers to items.
        let main_tables: BTreeSet<String> = tables(&tx, "main").map_err(map)?.into_iter().collect();
        for table in tables(&tx, "shard").map_err(map)? {
            if SPECIAL.contains(&table.as_str()) {
                continue;
            }
            let fks = foreign_keys(&tx, "shard", &table).map_err(map)?;
            let refers_items = fks.iter().any(|(_, t)| t == "items");
            if !refers_items || !main_tables.contains(&table) {
                let n: i64 = tx
                    .query_row(
                        &format!("SELECT count(*) FROM shard.{}", quote(&table)),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(map)?;
                if n > 0 {
                    skipped.insert(table);
                }
                continue;
            }
            let main_cols: BTreeSet<String> = columns(&tx, "main", &table)
                .map_err(map)?
                .into_iter()
                .map(|c| c.0)
                .collect();
            let mut cols = Vec::new();
            let mut exprs = Vec::new();
            // Rows of items left out (no image, a conflict) are not copied.
            let mut item_refs = Vec::new();
            for (c, pk) in columns(&tx, "shard", &table).map_err(map)? {
                if !main_cols.contains(&c) {
                    continue;
                }
                let fk = fks
                    .iter()
                    .find(|(from, _)| *from == c)
                    .map(|(_, t)| t.as_str());
                let undeclared = UNDECLARED_ITEM_REFS.contains(&(table.as_str(), c.as_str()));
                if fk == Some("items") || undeclared {
                    item_refs.push(format!(
                        "(s.{c} IS NULL OR s.{c} IN (SELECT old FROM item_map))",
                        c = quote(&c)
                    ));
                }
                let expr = match fk {
                    Some("items") => {
                        format!("(SELECT new FROM item_map WHERE old = s.{})", quote(&c))
                    }
                    Some("runs") => {
                        format!("(SELECT new FROM run_map WHERE old = s.{})", quote(&c))
                    }
                    _ if undeclared => {
                        format!("(SELECT new FROM item_map WHERE old = s.{})", quote(&c))
                    }
                    // A surrogate key: OUT assigns its own.
                    _ if pk && c == "id" => continue,
                    _ => format!("s.{}", quote(&c)),
                };
                cols.push(quote(&c));
                exprs.push(expr);
            }
            let mut filter = item_refs;
            let item_col = fks
                .iter()
                .filter(|(_, t)| t == "items")
                .map(|(c, _)| c.as_str())
                .min_by_key(|c| *c != "item_id");
            let has_run = fks.iter().any(|(c, t)| c == "run_id" && t == "runs");
            if let (Some(item_col), true) = (item_col, has_run) {
                // What an earlier merge of this folder brought and the
                // folder has since redone is brought again: a group of rows
                // (see GROUPS) all written by this folder's runs is
                // replaced by the folder's current rows. A group OUT's own
                // runs (or another folder's) wrote stays, and the folder's
                // rows for it are not taken.
                let group: Vec<&str> = GROUPS
                    .iter()
                    .find(|(t, _)| *t == table)
                    .map(|(_, g)| g.to_vec())
                    .unwrap_or_else(|| vec![item_col]);
                let same = |a: &str, b: &str| {
                    group
                        .iter()
                        .map(|g| format!("{a}.{g} IS {b}.{g}", g = quote(g)))
                        .collect::<Vec<_>>()
                        .join(" AND ")
                };
                let t = quote(&table);
                let stale = format!(
                    "{t}.{ic} IN (SELECT new FROM item_map)
                     AND NOT EXISTS (SELECT 1 FROM main.{t} f WHERE {same}
                         AND (f.\"run_id\" IS NULL OR f.\"run_id\" NOT IN (SELECT new FROM run_map)))",
                    ic = quote(item_col),
                    same = same("f", &t),
                );
                let col_list = cols.join(", ");
                tx.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.merge_old;
                     CREATE TEMP TABLE merge_old AS SELECT {col_list} FROM main.{t} WHERE {stale};
                     DELETE FROM main.{t} WHERE {stale};"
                ))
                .map_err(map)?;
                // The mapped group of a shard row, against OUT's rows left.
                let mapped: Vec<String> = group
                    .iter()
                    .map(|g| {
                        let e = cols
                            .iter()
                            .position(|c| *c == quote(g))
                            .map(|i| exprs[i].clone())
                            .unwrap_or_else(|| format!("s.{}", quote(g)));
                        format!("m.{} IS {e}", quote(g))
                    })
                    .collect();
                filter.push(format!(
                    "NOT EXISTS (SELECT 1 FROM main.{t} m WHERE {})",
                    mapped.join(" AND ")
                ));
                tx.execute(
                    &format!(
                        "INSERT OR IGNORE INTO main.{t} ({col_list}) SELECT {} FROM shard.{t} s WHERE {}",
                        exprs.join(", "),
                        filter.join(" AND ")
                    ),
                    [],
                )
                .map_err(map)?;
                let gone: i64 = tx
                    .query_row(
                        &format!(
                            "SELECT count(*) FROM (SELECT {col_list} FROM temp.merge_old
                             EXCEPT SELECT {col_list} FROM main.{t})"
                        ),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(map)?;
                s.rows_updated += gone as u64;
                tx.execute_batch("DROP TABLE temp.merge_old").map_err(map)?;
            } else {
                let filter = if filter.is_empty() {
                    String::new()
                } else {
                    format!(" WHERE {}", filter.join(" AND "))
                };
                tx.execute(
                    &format!(
                        "INSERT OR IGNORE INTO main.{t} ({}) SELECT {} FROM shard.{t} s{filter}",
                        cols.join(", "),
                        exprs.join(", "),
                        t = quote(&table)
                    ),
                    [],
                )
                .map_err(map)?;
            }
            merged_tables.insert(table);
        }
        // Verdicts: a shard written before `item_verdicts` has none; its
        // set-aside items get the one its status says, as the migration
        // gives them. Each item then shows what its verdicts say.
        let shard_has_verdicts: bool = tx
            .query_row(
                "SELECT count(*) > 0 FROM shard.sqlite_master WHERE type = 'table' AND name = 'item_verdicts'",
                [],
                |r| r.get(0),
            )
            .map_err(map)?;
        if !shard_has_verdicts {
            tx.execute(
                "INSERT OR IGNORE INTO main.item_verdicts (item_id, stage, status, reason, run_id)
                 SELECT i.id,
                        CASE WHEN i.status = 'duplicate' THEN 'dedupe' ELSE coalesce(r.stage, 'unknown') END,
                        i.status, i.reason, r.id
                 FROM item_map m JOIN main.items i ON i.id = m.new
                      LEFT JOIN main.runs r ON r.id = i.status_run_id
                 WHERE i.status <> 'ok'
                   AND NOT EXISTS (SELECT 1 FROM main.item_verdicts v WHERE v.item_id = i.id)",
                [],
            )
            .map_err(map)?;
            // As the migration: a duplicate a later rejection overwrote (the
            // shard's status says rejected) keeps dedupe's verdict from its
            // `duplicates` row.
            tx.execute(
                "INSERT OR IGNORE INTO main.item_verdicts (item_id, stage, status, reason, run_id)
                 SELECT d.item_id, 'dedupe', 'duplicate',
                        d.kind || '_duplicate: of item ' || d.keeper_id || ' (distance ' || d.distance || ')',
                        (SELECT id FROM main.runs WHERE id = d.run_id)
                 FROM item_map m JOIN main.duplicates d ON d.item_id = m.new
                      JOIN main.items i ON i.id = d.item_id
                 WHERE d.kind <> 'keeper' AND i.status = 'rejected'",
                [],
            )
            .map_err(map)?;
        }
        // Only items with a verdict, or set aside, can change.
        let mapped: Vec<i64> = {
            let mut st = tx
                .prepare(
                    "SELECT m.new FROM item_map m JOIN main.items i ON i.id = m.new
                     WHERE i.status <> 'ok'
                        OR EXISTS (SELECT 1 FROM main.item_verdicts v WHERE v.item_id = m.new)",
                )
                .map_err(map)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(map)?;
            rows.collect::<rusqlite::Result<_>>().map_err(map)?
        };
        for id in mapped {
            manifest::verdicts::refresh(&tx, id, run_id).map_err(map)?;
        }
        // Plan rows: a more advanced state wins.
        s.rows_merged = tx
            .execute(
                "INSERT INTO main.gen_items (idx, prompt, negative, seed, width, height, sampler, schedule, steps, cfg,
                     rescale, uncond, model, model_hash, state, reason, item_id, plan_run_id, render_run_id)
                 SELECT idx, prompt, negative, seed, width, height, sampler, schedule, steps, cfg, rescale, uncond,
                        model, model_hash,
                        CASE WHEN s.item_id IS NOT NULL AND m.new IS NULL THEN 'planned' ELSE s.state END,
                        CASE WHEN s.item_id IS NOT NULL AND m.new IS NULL THEN NULL ELSE s.reason END,
                        m.new,
                        (SELECT new FROM run_map WHERE old = s.plan_run_id),
                        CASE WHEN s.item_id IS NOT NULL AND m.new IS NULL THEN NULL
                             ELSE (SELECT new FROM run_map WHERE old = s.render_run_id) END
                 FROM shard.gen_items s LEFT JOIN item_map m ON m.old = s.item_id WHERE true
                 ON CONFLICT (idx) DO UPDATE SET state = excluded.state, reason = excluded.reason,
                     item_id = excluded.item_id, render_run_id = excluded.render_run_id
                 WHERE (CASE excluded.state WHEN 'rendered' THEN 2 WHEN 'rejected' THEN 1 ELSE 0 END)
                     > (CASE gen_items.state WHEN 'rendered' THEN 2 WHEN 'rejected' THEN 1 ELSE 0 END)",
                [],
            )
            .map_err(map)? as u64;
        tx.commit().map_err(map)?;
        Ok(())
    })();
    let detach = out.conn().execute("DETACH DATABASE shard", []).map_err(map);
    result?;
    detach?;
    Ok(())
}

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
