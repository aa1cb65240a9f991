//! `eps2v inspect`: what is in a dataset — counts by status and reason,
//! bucket histogram, top tags, duplicate clusters, recent runs — and a
//! read-only SQL pass-through (`--sql`).
//!
//! Aggregation runs in SQLite (indexed `GROUP BY`s over the manifest, the
//! fastest place for it at a million rows); the tables are printed through
//! polars `DataFrame`s, which format aligned, truncated tables for free.

use std::fmt::Write as _;

use polars::prelude::*;
use rusqlite::types::ValueRef;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// A small result table (column names + rows of display strings / JSON values).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Table {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, one JSON value per column.
    pub rows: Vec<Vec<serde_json::Value>>,
}

impl Table {
    /// Render as an aligned text table via polars.
    pub fn render(&self) -> String {
        // A column name seen before (`SELECT i.width, g.width …`) gets its
        // place appended: a frame's names must differ.
        let mut seen = std::collections::HashSet::new();
        let names: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(k, n)| {
                if seen.insert(n.as_str()) {
                    n.clone()
                } else {
                    format!("{n}#{}", k + 1)
                }
            })
            .collect();
        let cols: Vec<Column> = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let vals: Vec<Option<String>> = self
                    .rows
                    .iter()
                    .map(|r| match &r[k] {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s.clone()),
                        v => Some(v.to_string()),
                    })
                    .collect();
                Column::new(name.as_str().into(), vals)
            })
            .collect();
        match DataFrame::new(cols) {
            Ok(df) => format!("{df}"),
            Err(e) => format!("(table: {e})"),
        }
    }
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InspectReport {
    /// Total items.
    pub items: i64,
    /// status, reason code, count.
    pub by_status: Table,
    /// Each stage's own verdicts (an item two stages set aside counts for
    /// both; its status shows one of them): stage, status, reason code,
    /// count. Empty for a manifest from before verdicts (schema < 8).
    pub verdicts: Table,
    /// bucket, count.
    pub buckets: Table,
    /// tag, count.
    pub top_tags: Table,
    /// Clusters: number, dropped items, largest, and the duplicates whose
    /// keeper a later stage set aside (out of the dataset until dedupe
    /// runs again).
    pub duplicate_clusters: Table,
    /// Alignment histogram of tagged generated items (bins of 0.1):
    /// bin, items, of which rejected.
    pub alignment: Table,
    /// Most recent runs; for rows still marked `running`, `process` says
    /// whether a process holds the run's lock (live, with its pid and
    /// host) or none does (it was killed or crashed; the next run of that
    /// stage marks it failed); for `failed` rows that a signal stopped,
    /// that a rerun goes on.
    pub runs: Table,
    /// `generate` plan rows: state, reason code, count (empty without a plan).
    pub generation_plan: Table,
}

/// Run a query and collect it as a [`Table`].
pub fn query_table(m: &Manifest, sql: &str) -> Result<Table> {
    let mut st = m.conn().prepare(sql).map_err(|e| m.err(e))?;
    let columns: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
    let n = columns.len();
    let mut rows = Vec::new();
    let mut q = st.query([]).map_err(|e| m.err(e))?;
    while let Some(r) = q.next().map_err(|e| m.err(e))? {
        let mut row = Vec::with_capacity(n);
        for k in 0..n {
            let v = r.get_ref(k).map_err(|e| m.err(e))?;
            row.push(match v {
                ValueRef::Null => serde_json::Value::Null,
                ValueRef::Integer(i) => i.into(),
                ValueRef::Real(f) => serde_json::json!(f),
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                ValueRef::Blob(b) => format!("<{} bytes>", b.len()).into(),
            });
        }
        rows.push(row);
    }
    Ok(Table { columns, rows })
}

/// The 10 newest runs with a `process` column ([`InspectReport::runs`]).
fn runs_table(m: &Manifest) -> Result<Table> {
    let mut t = query_table(
        m,
        "SELECT id, stage, status, started_at, ended_at, \
         CASE WHEN json_valid(counts_json) THEN json_extract(counts_json, '$.interrupted') END IS 1 AS interrupted, \
         CASE WHEN json_valid(counts_json) THEN json_extract(counts_json, '$.marked_failed_by') END AS found_dead_by, \
         CASE WHEN json_valid(counts_json) THEN json_extract(counts_json, '$.error') END AS error \
         FROM runs ORDER BY id DESC LIMIT 10",
    )?;
    t.columns.truncate(5);
    t.columns.push("process".into());
    for row in &mut t.rows {
        let error = row.pop().and_then(|v| v.as_str().map(str::to_owned));
        let found_dead_by = row.pop().and_then(|v| v.as_i64());
        let interrupted = row.pop().and_then(|v| v.as_i64()) == Some(1);
        let process = match (row[0].as_i64(), row[2].as_str()) {
            (Some(id), Some("running")) => match m.run_holder(id)? {
                Some(who) => format!("live: {who}").into(),
                None => "none: process gone (killed or crashed)".into(),
            },
            // A plain rerun of train starts a new run: it goes on with
            // --resume (the stages that resume by rerunning say so).
            (Some(id), Some("failed")) if interrupted && row[1].as_str() == Some("train") => {
                format!("stopped by Ctrl-C / SIGTERM: `eps2v train DIR --resume {id}` (same flags) goes on").into()
            }
            (_, Some("failed")) if interrupted => {
                "stopped by Ctrl-C / SIGTERM: rerun to go on".into()
            }
            (_, Some("failed")) if error.is_some() => format!(
                "stopped on an error: {}",
                brief(error.as_deref().unwrap_or(""))
            )
            .into(),
            (_, Some("failed")) => match found_dead_by {
                Some(by) => format!("gone (killed or crashed); marked failed by run {by}").into(),
                None => serde_json::Value::Null,
            },
            _ => serde_json::Value::Null,
        };
        row.push(process);
    }
    Ok(t)
}

/// The first line of an error message, at most 160 characters, for a
/// table cell (the whole text is in `runs.counts_json`).
fn brief(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or("");
    match line.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

/// Gather the standard report.
pub fn run(m: &Manifest, top: usize) -> Result<InspectReport> {
    let items: i64 = m
        .conn()
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .map_err(|e| m.err(e))?;
    Ok(InspectReport {
        items,
        by_status: query_table(
            m,
            "SELECT status, coalesce(substr(reason, 1, instr(reason || ':', ':') - 1), '') AS reason,
                    count(*) AS n
             FROM items GROUP BY 1, 2 ORDER BY status, n DESC",
        )?,
        verdicts: if has_table(m, "item_verdicts")? {
            query_table(
                m,
                "SELECT stage, status, coalesce(substr(reason, 1, instr(reason || ':', ':') - 1), '') AS reason,
                        count(*) AS n
                 FROM item_verdicts GROUP BY 1, 2, 3 ORDER BY stage, status, n DESC",
            )?
        } else {
            Table::default()
        },
        buckets: query_table(
            m,
            "SELECT b.bucket_w || 'x' || b.bucket_h AS bucket, count(*) AS n
             FROM buckets b JOIN items i ON i.id = b.item_id AND i.status = 'ok'
             GROUP BY b.bucket_w, b.bucket_h ORDER BY n DESC, bucket",
        )?,
        top_tags: query_table(
            m,
            &format!(
                "SELECT t.tag, count(DISTINCT t.item_id) AS n
                 FROM tags t JOIN items i ON i.id = t.item_id AND i.status = 'ok'
                 GROUP BY t.tag ORDER BY n DESC, t.tag LIMIT {top}"
            ),
        )?,
        alignment: alignment_histogram(m)?,
        duplicate_clusters: query_table(
            m,
            &format!(
                "SELECT count(*) AS clusters, coalesce(sum(size) - count(*), 0) AS dropped,
                        coalesce(max(size), 0) AS largest,
                        coalesce(sum(waiting), 0) AS waiting_on_a_set_aside_keeper
                 FROM (SELECT d.cluster_id, count(*) AS size, sum({}) AS waiting
                       FROM duplicates d JOIN items i ON i.id = d.item_id JOIN items k ON k.id = d.keeper_id
                       GROUP BY d.cluster_id)",
                crate::stages::dedupe::WAITING
            ),
        )?,
        runs: runs_table(m)?,
        generation_plan: if has_table(m, "gen_items")? {
            query_table(
                m,
                "SELECT state, coalesce(substr(reason, 1, instr(reason || ':', ':') - 1), '') AS reason,
                        count(*) AS n
                 FROM gen_items GROUP BY 1, 2 ORDER BY state, n DESC",
            )?
        } else {
            Table::default()
        },
    })
}

/// Alignment histogram from the `tagging` table (empty when the manifest
/// predates it or nothing is scored): bins `[0.0, 0.1)` … `[0.9, 1.0]`.
pub fn alignment_histogram(m: &Manifest) -> Result<Table> {
    if !has_table(m, "tagging")? {
        return Ok(Table {
            columns: vec![
                "alignment".into(),
                "n".into(),
                "rejected".into(),
                "duplicate".into(),
            ],
            rows: Vec::new(),
        });
    }
    query_table(
        m,
        "SELECT printf('%.1f-%.1f', b / 10.0, (b + 1) / 10.0) AS alignment, count(*) AS n,
                sum(status = 'rejected') AS rejected, sum(status = 'duplicate') AS duplicate
         FROM (SELECT min(9, CAST(t.alignment * 10 AS INTEGER)) AS b, i.status AS status
               FROM tagging t JOIN items i ON i.id = t.item_id
               WHERE t.alignment IS NOT NULL)
         GROUP BY b ORDER BY b",
    )
}

/// Whether the manifest has `table` (read-only opens are not migrated).
fn has_table(m: &Manifest, table: &str) -> Result<bool> {
    m.conn()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(|e| m.err(e))
}

/// Human summary of an [`InspectReport`].
pub fn render(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "items: {}", r.items);
    for (title, t) in [
        ("by status and reason", &r.by_status),
        (
            "set aside, by stage (each stage's own verdicts)",
            &r.verdicts,
        ),
        ("buckets (ok items)", &r.buckets),
        ("top tags (ok items)", &r.top_tags),
        ("duplicate clusters", &r.duplicate_clusters),
        (
            "alignment with the prompt (tagged generated items)",
            &r.alignment,
        ),
        ("recent runs", &r.runs),
        ("generation plan (state, reason)", &r.generation_plan),
    ] {
        let _ = writeln!(s, "\n{title}:");
        if t.rows.is_empty() {
            let _ = writeln!(s, "  (none)");
        } else {
            let _ = writeln!(s, "{}", t.render());
        }
        let waiting = r.duplicate_clusters.rows.first().and_then(|row| row.get(3));
        if std::ptr::eq(t, &r.duplicate_clusters) {
            if let Some(n) = waiting.and_then(|v| v.as_u64()).filter(|n| *n > 0) {
                let _ = writeln!(
                    s,
                    "  {n} duplicates wait on a keeper set aside after dedupe chose it: rerun `eps2v dedupe`, then `eps2v bucket`, on this dataset to keep one of each of their clusters"
                );
            }
        }
    }
    s
}

/// Read-only SQL pass-through. Refuses anything but one read statement.
pub fn sql(m: &Manifest, sql: &str) -> Result<Table> {
    if sql.trim().trim_end_matches(';').trim().is_empty() {
        return Err(Error::config(
            "--sql: empty statement; e.g. --sql \"SELECT status, count(*) FROM items GROUP BY 1\"",
        ));
    }
    let st = m.conn().prepare(sql).map_err(|e| {
        Error::config(format!(
            "--sql: {e}; list the tables and their columns with --sql \"SELECT name, sql FROM sqlite_master\""
        ))
    })?;
    if !st.readonly() {
        return Err(Error::config(
            "--sql only runs read-only statements (SELECT / WITH / PRAGMA reads)",
        ));
    }
    drop(st);
    query_table(m, sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Regressions: top tags counted set-aside items (a tag every rejected
    /// image had still ranked first), and the alignment table's rejected
    /// column left duplicates out, so the rest read as kept.
    #[test]
    fn top_tags_count_ok_items_and_alignment_counts_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let m = Manifest::init(d.path()).unwrap();
        m.conn()
            .execute_batch(
                "INSERT INTO runs (id, stage, config_json, tool_version, started_at) VALUES (1, 'import', '{}', '0', 'x');
                 INSERT INTO items (id, sha256, source, status, run_id, status_run_id, created_at) VALUES
                     (1, 'a', '/a', 'ok', 1, 1, 'x'), (2, 'b', '/b', 'rejected', 1, 1, 'x'),
                     (3, 'c', '/c', 'rejected', 1, 1, 'x'), (4, 'd', '/d', 'duplicate', 1, 1, 'x');
                 INSERT INTO tags (item_id, source, tag, run_id) VALUES
                     (1, 't', 'smile', 1), (2, 't', 'blurry', 1), (3, 't', 'blurry', 1), (4, 't', 'blurry', 1);
                 INSERT INTO tagging (item_id, tagger, settings, alignment, run_id) VALUES
                     (1, 't', '{}', 0.95, 1), (2, 't', '{}', 0.1, 1), (4, 't', '{}', 0.91, 1);",
            )
            .unwrap();
        let r = run(&m, 5).unwrap();
        assert_eq!(r.top_tags.rows, [vec![json!("smile"), json!(1)]]);
        assert_eq!(
            r.alignment.rows,
            [
                vec![json!("0.1-0.2"), json!(1), json!(1), json!(0)],
                vec![json!("0.9-1.0"), json!(2), json!(0), json!(1)],
            ]
        );
    }

    /// Regression: two columns of one name (`SELECT i.width, g.width`)
    /// printed an error instead of the table.
    #[test]
    fn columns_of_one_name_both_show() {
        let t = Table {
            columns: vec!["width".into(), "width".into()],
            rows: vec![vec![json!(64), json!(96)]],
        };
        let shown = t.render();
        assert!(shown.contains("width#2") && shown.contains("96"), "{shown}");
    }

    /// Each stage's verdicts are counted on their own: an item filter
    /// rejected and dedupe marked counts for both.
    #[test]
    fn verdicts_are_counted_per_stage() {
        use crate::manifest::{insert_item, verdicts, ItemStatus, NewItem};
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let run_id = m.begin_run("import", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        for n in 1..=3 {
            insert_item(&tx, run_id, &NewItem::for_test(n)).unwrap();
        }
        let rej = |why| Some((ItemStatus::Rejected, why));
        verdicts::set(&tx, 1, "filter", rej("misaligned: 0.2"), run_id).unwrap();
        let dup = Some((ItemStatus::Duplicate, "near_duplicate: of item 3"));
        verdicts::set(&tx, 1, "dedupe", dup, run_id).unwrap();
        verdicts::set(&tx, 2, "bucket", rej("too_small: 8x8"), run_id).unwrap();
        tx.commit().unwrap();
        let r = run(&m, 5).unwrap();
        assert_eq!(
            r.verdicts.rows,
            [
                vec![
                    json!("bucket"),
                    json!("rejected"),
                    json!("too_small"),
                    json!(1)
                ],
                vec![
                    json!("dedupe"),
                    json!("duplicate"),
                    json!("near_duplicate"),
                    json!(1)
                ],
                vec![
                    json!("filter"),
                    json!("rejected"),
                    json!("misaligned"),
                    json!(1)
                ],
            ]
        );
        assert!(render(&r).contains("set aside, by stage"));
    }

    /// A `running` run of any stage shows whether a process holds it;
    /// ended rows have no `process`.
    #[test]
    fn runs_say_whether_a_running_run_has_a_live_process() {
        let d = tempfile::tempdir().unwrap();
        let m = Manifest::init(d.path()).unwrap();
        let none = serde_json::json!({});
        // Its process died: the lock is gone, the row still says running.
        let a = m.begin_run("train", &none).unwrap();
        drop(m.lock_run(a).unwrap());
        let b = m.begin_run("train", &none).unwrap();
        let held = m.lock_run(b).unwrap();
        let c = m.begin_run("generate", &none).unwrap();
        let e = m.begin_run("import", &none).unwrap();
        m.end_run(e, true, &none).unwrap();
        let f = m.begin_run("generate", &none).unwrap();
        let stopped = serde_json::json!({"interrupted": true, "remaining": 3});
        m.end_run(f, false, &stopped).unwrap();
        let g = m.begin_run("caption", &none).unwrap();
        drop(m.lock_run(g).unwrap()); // killed
        let h = m.begin_run("caption", &none).unwrap(); // finds it dead
        m.end_run(h, true, &none).unwrap();
        let k = m.begin_run("export", &none).unwrap();
        let long = format!("{}\nsecond line", "x".repeat(200));
        m.fail_run(k, &none, &Error::config(long));
        let tr = m.begin_run("train", &none).unwrap();
        m.end_run(tr, false, &stopped).unwrap();
        let ro = Manifest::open_read_only(d.path()).unwrap();
        let t = run(&ro, 5).unwrap().runs;
        assert_eq!(t.rows.len(), 9);
        assert_eq!(t.columns.last().map(String::as_str), Some("process"));
        let process = |id: i64| t.rows.iter().find(|r| r[0] == id).unwrap()[5].clone();
        assert_eq!(process(a), "none: process gone (killed or crashed)");
        for live in [b, c] {
            assert!(
                process(live).as_str().unwrap().starts_with("live: pid "),
                "{t:?}"
            );
        }
        assert!(process(e).is_null());
        assert_eq!(process(f), "stopped by Ctrl-C / SIGTERM: rerun to go on");
        // A plain rerun of train starts over: it says --resume.
        assert_eq!(
            process(tr),
            format!(
                "stopped by Ctrl-C / SIGTERM: `eps2v train DIR --resume {tr}` (same flags) goes on"
            )
            .as_str()
        );
        let why = process(k);
        let why = why.as_str().unwrap();
        assert!(why.starts_with("stopped on an error: "), "{why}");
        assert!(why.ends_with("x…") && !why.contains("second"), "{why}");
        assert_eq!(
            process(g),
            format!("gone (killed or crashed); marked failed by run {h}").as_str()
        );
        drop(held);
    }
}
