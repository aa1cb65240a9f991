//! The dataset manifest: one SQLite file (`manifest.sqlite`) per dataset
//! folder, the single source of truth for every stage.
//!
//! - Schema: `schemas/manifest.sql` (embedded) is version 1; later versions
//!   are forward migrations in [`MIGRATIONS`], applied in order and tracked
//!   with `PRAGMA user_version`. Opening a manifest written by a newer eps2v
//!   is refused with a clear error instead of guessing.
//! - WAL mode: a reader (`sqlite3 manifest.sqlite`, `eps2v inspect`) can
//!   query while a stage writes; stages write in batched transactions, so a
//!   `kill -9` loses at most the batch in flight, which the rerun redoes.
//! - Every decision carries the run that made it (`runs` table); a process
//!   working on a training run or a `run` pipeline holds its lock
//!   ([`RunLock`], `lock.rs`), so a live run is never taken over.

mod lock;
mod records;
pub mod verdicts;

pub use lock::{PipelineLock, RunLock, LOCK_DIR, PIPELINE_LOCK, WRITER_LOCK, WRITER_STAGES};
pub use records::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, IoContext, Result};

/// The version-1 schema.
pub const SCHEMA_V1: &str = include_str!("../../schemas/manifest.sql");

/// Forward migrations: entry `i` upgrades `user_version` `i + 1` → `i + 2`.
/// Append only; never edit a released entry. Each is a file under
/// `schemas/migrations/` and runs in one transaction with foreign keys off
/// (so a table can be rebuilt) and must leave `PRAGMA foreign_key_check`
/// clean:
///
/// - v2, caption stage (issue 13): table `tagging`, one row per item a WD tagger
///   has seen: `tagger` (identity `folder@sha256[:12]` of its weights),
///   `settings` (JSON of tagger + thresholds + MCut; items tagged with other
///   settings are tagged again), the rating (`rating`, `rating_score`,
///   `ratings_json` with every rating label), `tags_json` (the selected tags
///   `[[name, category, p], …]`, which the `tags` table also holds under
///   source `tagger`), and the alignment of the image with its generation
///   prompt: `alignment` = `confirmed / checked` prompt tags (NULL without a
///   prompt or a checkable tag), `missing_json` (`[[tag, p], …]`, the prompt
///   tags the tagger did not confirm). Indexed by alignment for `filter` and
///   `inspect`.
/// - v3, training (issue 11): `cache_entries` (latent and text-conditioning
///   cache files with the component hash they depend on), `train_split`
///   (which items a run trained on / held out), `train_evals` (validation
///   loss, shape retention and grid of each evaluation).
/// - v4, `check_constraints.sql` (issue 14): `items.status` and
///   `duplicates.kind` CHECKs as OR-ed equalities (same values), because an
///   `IN` list made SQLite build an ephemeral index per inserted row; the
///   uniqueness of `items.sha256` as the named index `items_sha256`, which
///   [`insert_items_bulk`] can drop and rebuild around a bulk insert.
/// - v5, `generate.sql` (issue 13): `gen_plan` (the settings every planned
///   image shares, the plan size, this folder's shard and `plan_id`),
///   `gen_items` (one row per plan index with every generation parameter
///   and its state `planned` / `rendered` → `item_id` / `rejected` with a
///   reason) and `merged_runs` (provenance of `manifest merge`).
/// - v6, `status_index.sql` (issue 14): `items_status` becomes a partial
///   index over the items a stage set aside (`WHERE status <> 'ok'`): the
///   'ok' rows are most of the table and gained nothing from it, while a
///   bulk insert paid for rebuilding it.
/// - v7, `tag_order.sql`: `tags.pos`, a tag's place in its source (sidecar
///   and A1111 prompt order, the tagger caption's order), which the
///   WITHOUT ROWID key (item, source, tag) does not keep; NULL for rows
///   written before, which sort after the ordered ones by name.
/// - v8, `verdicts.sql`: `item_verdicts`, each stage's own decision on an
///   item; `items.status`, `reason` and `status_run_id` are derived from
///   them ([`verdicts`]). Existing set-aside items get one verdict, of the
///   stage of the run that set them aside.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../schemas/migrations/caption.sql"),
    include_str!("../../schemas/migrations/train.sql"),
    include_str!("../../schemas/migrations/check_constraints.sql"),
    include_str!("../../schemas/migrations/generate.sql"),
    include_str!("../../schemas/migrations/status_index.sql"),
    include_str!("../../schemas/migrations/tag_order.sql"),
    include_str!("../../schemas/migrations/verdicts.sql"),
];

/// Latest schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.sqlite";

/// An open dataset: its folder and a connection to its manifest.
pub struct Manifest {
    root: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    /// Locks of the runs this handle began and has not ended
    /// ([`Manifest::begin_run`], [`Manifest::lock_run`]).
    held: std::cell::RefCell<std::collections::BTreeMap<i64, lock::RunLock>>,
    /// The dataset's writer lock while a run of this handle holds it
    /// ([`WRITER_STAGES`]).
    writer: std::cell::RefCell<std::sync::Weak<lock::Locked>>,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("root", &self.root)
            .finish()
    }
}

/// Entries a list of a run's report keeps in `runs.counts_json`.
pub const MAX_LISTED: usize = 1000;

/// `report` with every list cut to its first [`MAX_LISTED`] entries, and
/// beside each cut list of an object `<key>_omitted`, how many were left
/// out: a report's per-item lists (filter's rejections, import's failures)
/// would otherwise put megabytes in one manifest row at 500k items. The
/// whole report is what `--json` prints.
fn bounded_lists(report: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match report {
        Value::Array(mut a) => {
            a.truncate(MAX_LISTED);
            Value::Array(a.into_iter().map(bounded_lists).collect())
        }
        Value::Object(o) => {
            let mut out = serde_json::Map::new();
            for (k, v) in o {
                if let Value::Array(a) = &v {
                    if a.len() > MAX_LISTED {
                        out.insert(format!("{k}_omitted"), (a.len() - MAX_LISTED).into());
                    }
                }
                out.insert(k, bounded_lists(v));
            }
            Value::Object(out)
        }
        v => v,
    }
}

/// `PRAGMA foreign_key_check` as lines `table row N → parent`, counted.
fn broken_references(
    conn: &Connection,
) -> rusqlite::Result<std::collections::BTreeMap<String, usize>> {
    let mut st = conn.prepare("PRAGMA foreign_key_check")?;
    let mut out = std::collections::BTreeMap::new();
    let rows = st.query_map([], |r| {
        Ok(format!(
            "{} row {} → {}",
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?
                .map_or("?".into(), |n| n.to_string()),
            r.get::<_, String>(2)?
        ))
    })?;
    for r in rows {
        *out.entry(r?).or_default() += 1;
    }
    Ok(out)
}

impl Manifest {
    /// Create the dataset folder layout and an empty manifest (idempotent:
    /// an existing manifest is opened and migrated).
    pub fn init(root: &Path) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(not_a_folder(root));
        }
        for sub in ["images", "buckets", "cache", "runs", "exports"] {
            std::fs::create_dir_all(root.join(sub)).at(root.join(sub))?;
        }
        Self::open_inner(root, true)
    }

    /// Open an existing dataset folder (error if it has no manifest).
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_inner(root, false)
    }

    /// Open read-only (for `inspect --sql`): writes are refused by SQLite.
    pub fn open_read_only(root: &Path) -> Result<Self> {
        let db_path = root.join(MANIFEST_FILE);
        if !db_path.is_file() {
            return Err(no_manifest(root));
        }
        let conn = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| manifest_err(&db_path, e))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| manifest_err(&db_path, e))?;
        conn.execute_batch("PRAGMA query_only = ON;")
            .map_err(|e| manifest_err(&db_path, e))?;
        let m = Self {
            root: root.to_path_buf(),
            db_path,
            conn,
            held: Default::default(),
            writer: Default::default(),
        };
        m.check_version_readable()?;
        Ok(m)
    }

    fn open_inner(root: &Path, create: bool) -> Result<Self> {
        let db_path = root.join(MANIFEST_FILE);
        if !create && !db_path.is_file() {
            return Err(no_manifest(root));
        }
        let conn = Connection::open(&db_path).map_err(|e| manifest_err(&db_path, e))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| manifest_err(&db_path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;
             PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -262144;",
        )
        .map_err(|e| manifest_err(&db_path, e))?;
        // Every write transaction takes the write lock when it begins: a
        // deferred one that read first fails at once (SQLITE_BUSY_SNAPSHOT,
        // which the busy timeout does not wait out) when another process
        // (a trainer writing its evaluations) committed in between.
        let mut conn = conn;
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        let mut m = Self {
            root: root.to_path_buf(),
            db_path,
            conn,
            held: Default::default(),
            writer: Default::default(),
        };
        m.migrate()?;
        Ok(m)
    }

    fn user_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn check_version_readable(&self) -> Result<()> {
        let v = self.user_version()?;
        if v > SCHEMA_VERSION {
            return Err(Error::Manifest {
                path: self.db_path.clone(),
                msg: format!(
                    "schema version {v} is newer than this eps2v understands ({SCHEMA_VERSION}); upgrade eps2v"
                ),
            });
        }
        Ok(())
    }

    /// Bring the schema to [`SCHEMA_VERSION`], one transaction per step,
    /// with foreign keys off while migrating (SQLite ignores that pragma
    /// inside a transaction, and a table rebuild needs it off); each step
    /// must leave `PRAGMA foreign_key_check` clean, or it is rolled back.
    fn migrate(&mut self) -> Result<()> {
        self.check_version_readable()?;
        if self.user_version()? >= SCHEMA_VERSION {
            return Ok(());
        }
        let path = self.db_path.clone();
        self.conn
            .execute_batch("PRAGMA foreign_keys = OFF;")
            .map_err(|e| manifest_err(&path, e))?;
        let result = self.migrate_steps();
        let on = self
            .conn
            .execute_batch("PRAGMA foreign_keys = ON;")
            .map_err(|e| manifest_err(&path, e));
        result.and(on)
    }

    fn migrate_steps(&mut self) -> Result<()> {
        let mut v = self.user_version()?;
        let path = self.db_path.clone();
        while v < SCHEMA_VERSION {
            let sql = if v == 0 {
                SCHEMA_V1
            } else {
                MIGRATIONS[(v - 1) as usize]
            };
            let tx = self
                .conn
                .transaction()
                .map_err(|e| manifest_err(&path, e))?;
            // Another process opening the same old manifest may have run
            // this step while this one waited for the write lock.
            let now: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|e| manifest_err(&path, e))?;
            if now != v {
                v = now;
                continue;
            }
            // Only references the step breaks count: rows a user deleted by
            // hand (the sqlite3 shell enforces no foreign keys) must not
            // make every later version unreachable.
            let before = broken_references(&tx).map_err(|e| manifest_err(&path, e))?;
            tx.execute_batch(sql).map_err(|e| manifest_err(&path, e))?;
            let after = broken_references(&tx).map_err(|e| manifest_err(&path, e))?;
            // (Rows of WITHOUT ROWID tables have no number: counted.)
            let new: Vec<&String> = after
                .iter()
                .filter(|(r, n)| before.get(*r).is_none_or(|b| b < *n))
                .map(|(r, _)| r)
                .collect();
            if !new.is_empty() {
                return Err(Error::Manifest {
                    path,
                    msg: format!(
                        "migration to schema version {} leaves broken references ({}{}); nothing was changed (report this as a bug)",
                        v + 1,
                        new.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        if new.len() > 3 { ", …" } else { "" }
                    ),
                });
            }
            tx.execute_batch(&format!("PRAGMA user_version = {}", v + 1))
                .map_err(|e| manifest_err(&path, e))?;
            tx.commit().map_err(|e| manifest_err(&path, e))?;
            v += 1;
        }
        Ok(())
    }

    /// The dataset folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of `manifest.sqlite`.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The underlying connection (for stage-specific queries).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Mutable connection (for transactions).
    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Wrap a SQLite error with this manifest's path.
    pub fn err(&self, e: rusqlite::Error) -> Error {
        manifest_err(&self.db_path, e)
    }

    /// Record the start of a stage run and hold its lock ([`Manifest::lock_run`]) until
    /// [`Manifest::end_run`] (or the process ends), so that other processes
    /// can tell it is live; returns its id. The row becomes visible to them
    /// only once it is locked (one transaction). Rows of the same stage that
    /// a dead process left `running` are marked `failed` (not `train`
    /// and `run` rows: the trainer tidies its own, with their partial
    /// checkpoints, and a pipeline row is reopened by the next `run`).
    /// A run of one of [`WRITER_STAGES`] also holds the dataset's
    /// writer lock, and is refused while another process holds it.
    pub fn begin_run(&self, stage: &str, config: &impl serde::Serialize) -> Result<i64> {
        let cfg = serde_json::to_string(config)?;
        let writer = self.writer_lock(stage)?;
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO runs (stage, config_json, tool_version, started_at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![stage, cfg, env!("CARGO_PKG_VERSION"), now()],
        )
        .map_err(|e| self.err(e))?;
        let id = tx.last_insert_rowid();
        let lock = self.lock_run(id)?.with_writer(writer);
        tx.commit().map_err(|e| self.err(e))?;
        self.held.borrow_mut().insert(id, lock);
        if stage != "train" && stage != "run" {
            self.tidy_dead_rows(stage, id, &mut |_| Ok(()))?;
        }
        Ok(id)
    }

    /// Mark the other `running` rows of `stage` that no process holds as
    /// `failed` (left by a process that was killed or crashed), noting that
    /// run `except` found them; their ids. `on_dead` runs first for each,
    /// with its lock held (the trainer removes its partial saves there).
    pub fn tidy_dead_rows(
        &self,
        stage: &str,
        except: i64,
        on_dead: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        let ids: Vec<i64> = {
            let mut st = self
                .conn
                .prepare("SELECT id FROM runs WHERE stage = ?1 AND status = 'running' AND id != ?2 ORDER BY id")
                .map_err(|e| self.err(e))?;
            let rows = st
                .query_map(rusqlite::params![stage, except], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(|e| self.err(e))?
        };
        let mut tidied = Vec::new();
        for id in ids {
            // Held while the row is marked: its process cannot start again
            // in between.
            let Ok(_lock) = self.try_lock_run(id)? else {
                continue;
            };
            on_dead(id)?;
            self.mark_dead(id, except)?;
            tidied.push(id);
        }
        Ok(tidied)
    }

    /// Mark `running` row `id`, whose process is gone, as `failed`, noting
    /// in its report (when it has none) that run `by` found it so. The
    /// caller holds its lock.
    pub(crate) fn mark_dead(&self, id: i64, by: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET status = 'failed', ended_at = ?2, \
                 counts_json = coalesce(counts_json, json_object('process_gone', 1, 'marked_failed_by', ?3)) \
                 WHERE id = ?1 AND status = 'running'",
                rusqlite::params![id, now(), by],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Record the end of a run with its report, and release its lock.
    pub fn end_run(&self, run_id: i64, ok: bool, report: &impl serde::Serialize) -> Result<()> {
        let counts = serde_json::to_string(&bounded_lists(serde_json::to_value(report)?))?;
        self.conn
            .execute(
                "UPDATE runs SET ended_at = ?2, status = ?3, counts_json = ?4 WHERE id = ?1",
                rusqlite::params![run_id, now(), if ok { "done" } else { "failed" }, counts],
            )
            .map_err(|e| self.err(e))?;
        self.held.borrow_mut().remove(&run_id);
        Ok(())
    }

    /// End a run that stopped on `err`: `failed`, its report (an object, or
    /// `{}`) with the error's text under `error` (and `interrupted: true`
    /// for [`Error::Interrupted`]), so that `inspect` can say why.
    /// Releases its lock. Best effort: the stage's error is the one that
    /// counts, so a row that cannot be written stays `running` and the next
    /// run of the stage marks it failed.
    pub fn fail_run(&self, run_id: i64, report: &impl serde::Serialize, err: &Error) {
        let mut counts = match serde_json::to_value(report) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        counts.insert("error".into(), err.to_string().into());
        if matches!(err, Error::Interrupted(_)) {
            counts.insert("interrupted".into(), true.into());
        }
        let _ = self.end_run(run_id, false, &counts);
    }

    /// `PRAGMA integrity_check` result ("ok" when healthy).
    pub fn integrity_check(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Look up an item id by file sha256.
    pub fn item_id_by_sha(&self, sha: &str) -> Result<Option<i64>> {
        self.conn
            .query_row("SELECT id FROM items WHERE sha256 = ?1", [sha], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }
}

/// Run `body` as a run of `stage` ([`Manifest::begin_run`]): its row ends
/// `done` with the report it returns, or `failed` with the error
/// ([`Manifest::fail_run`]) rather than staying `running` until the next
/// run of the stage finds it.
pub fn stage_run<R: serde::Serialize>(
    m: &mut Manifest,
    stage: &str,
    config: &impl serde::Serialize,
    body: impl FnOnce(&mut Manifest, i64) -> Result<R>,
) -> Result<R> {
    let run_id = m.begin_run(stage, config)?;
    let result = body(m, run_id);
    match &result {
        Ok(report) => m.end_run(run_id, true, report)?,
        Err(e) => m.fail_run(run_id, &serde_json::json!({}), e),
    }
    result
}

/// Current time, RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A closure that wraps SQLite errors with the manifest path, for use while
/// a transaction holds the connection mutably (`.map_err(sql_err(&path))`).
pub fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + Copy + '_ {
    move |e| manifest_err(path, e)
}

fn manifest_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Manifest {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn no_manifest(root: &Path) -> Error {
    if root.exists() && !root.is_dir() {
        return not_a_folder(root);
    }
    // A folder of images given as the dataset: a dataset is its own
    // folder, made from the images by import.
    // (Its own entries only: no walk of a big tree for an error message.)
    let has_images = std::fs::read_dir(root).is_ok_and(|d| {
        d.flatten()
            .take(10_000)
            .any(|e| crate::stages::walk::has_image_extension(&e.path()))
    });
    if has_images {
        return Error::Config(format!(
            "{}: no {MANIFEST_FILE} here, and it holds images: a dataset is a folder of its own; make one from them with `eps2v import DATASET --from {}`",
            root.display(),
            root.display()
        ));
    }
    Error::Config(format!(
        "{}: no {MANIFEST_FILE} here; create the dataset first with `eps2v import {} --from IMAGES`, `eps2v generate {}` or `eps2v init {}`",
        root.display(),
        root.display(),
        root.display(),
        root.display()
    ))
}

/// A dataset path that names a file.
fn not_a_folder(root: &Path) -> Error {
    Error::Config(format!(
        "{}: exists and is not a folder; a dataset is a folder (give another path)",
        root.display()
    ))
}

#[cfg(test)]
#[path = "mod_tests.rs"]
mod tests;
