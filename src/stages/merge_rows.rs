//! The rows half of `manifest merge` ([`super`]): one shard's tables
//! copied into OUT in one transaction, ids remapped, what the shard redid
//! since an earlier merge brought again.

use std::collections::BTreeSet;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{ShardSummary, StoredPlan};
use crate::manifest::{self, Manifest, MANIFEST_FILE};
use crate::Result;

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

/// Copy one shard's rows into OUT in one transaction (the shard attached
/// as `shard`). Items whose image is in `missing_images` (relative paths
/// the shard lacks and OUT does not have) are left out.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_rows(
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
            // Never empty: the table refers to items.
            let mut filter = item_refs;
            let t = quote(&table);
            let col_list = cols.join(", ");
            let item_col = fks
                .iter()
                .filter(|(_, t)| t == "items")
                .map(|(c, _)| c.as_str())
                .min_by_key(|c| *c != "item_id");
            let has_run = fks.iter().any(|(c, t)| c == "run_id" && t == "runs");
            // What an earlier merge of this folder brought and the folder
            // has since redone is brought again: a group of rows (see
            // GROUPS) all written by this folder's runs is replaced by the
            // folder's current rows. A group OUT's own runs (or another
            // folder's) wrote stays, and the folder's rows for it are not
            // taken. (A table without a run column is only added to.)
            let grouped = item_col.filter(|_| has_run).map(|item_col| {
                let group = GROUPS
                    .iter()
                    .find(|(t, _)| *t == table)
                    .map(|(_, g)| g.to_vec())
                    .unwrap_or_else(|| vec![item_col]);
                (
                    quote(item_col),
                    group.into_iter().map(quote).collect::<Vec<_>>(),
                )
            });
            if let Some((ic, group)) = &grouped {
                let same = group
                    .iter()
                    .map(|g| format!("f.{g} IS {t}.{g}"))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let stale = format!(
                    "{t}.{ic} IN (SELECT new FROM item_map)
                     AND NOT EXISTS (SELECT 1 FROM main.{t} f WHERE {same}
                         AND (f.\"run_id\" IS NULL OR f.\"run_id\" NOT IN (SELECT new FROM run_map)))"
                );
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
                            .position(|c| c == g)
                            .map(|i| exprs[i].clone())
                            .unwrap_or_else(|| format!("s.{g}"));
                        format!("m.{g} IS {e}")
                    })
                    .collect();
                filter.push(format!(
                    "NOT EXISTS (SELECT 1 FROM main.{t} m WHERE {})",
                    mapped.join(" AND ")
                ));
            }
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO main.{t} ({col_list}) SELECT {} FROM shard.{t} s WHERE {}",
                    exprs.join(", "),
                    filter.join(" AND ")
                ),
                [],
            )
            .map_err(map)?;
            if grouped.is_some() {
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
