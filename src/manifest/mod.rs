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
//! - Every decision carries the run that made it (`runs` table).

mod records;

pub use records::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, IoContext, Result};

/// The version-1 schema.
pub const SCHEMA_V1: &str = include_str!("../../schemas/manifest.sql");

/// Forward migrations: entry `i` upgrades `user_version` `i + 1` → `i + 2`.
/// Append only; never edit a released entry.
pub const MIGRATIONS: &[&str] = &[GENERATE_PLAN];

/// Migration (issue 13): the plan of `eps2v generate` and the provenance of
/// `eps2v manifest merge`.
///
/// - `gen_plan`: one row, the settings every planned image shares
///   (`settings_json`, the serialised `stages::generate::PlanSettings`),
///   how many indices the plan has, which shard of it this folder renders,
///   and a random `plan_id` naming this folder's plan in merges.
/// - `gen_items`: one row per plan index with every generation parameter
///   (prompt, negative, seed, size, sampler, schedule, steps, CFG, rescale,
///   uncond mode, model + AutoV2 hash) and its state: `planned`,
///   `rendered` (`item_id` → its image in `items`) or `rejected` by
///   `generate` itself (`reason`: `nan_latent`, `black_image`, …; no item).
///   A planned image has no bytes yet, so no `items` row (whose `sha256`
///   is the content address).
/// - `merged_runs`: for `manifest merge`, which run of which source plan
///   each copied run was, so merging a folder twice copies nothing twice.
pub const GENERATE_PLAN: &str = "
CREATE TABLE gen_plan (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    plan_id       TEXT    NOT NULL,
    settings_json TEXT    NOT NULL,
    count         INTEGER NOT NULL,
    shard         TEXT    NOT NULL,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    updated_at    TEXT    NOT NULL
);
CREATE TABLE gen_items (
    idx           INTEGER PRIMARY KEY,
    prompt        TEXT    NOT NULL,
    negative      TEXT,
    seed          INTEGER NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    sampler       TEXT    NOT NULL,
    schedule      TEXT    NOT NULL,
    steps         INTEGER NOT NULL,
    cfg           REAL    NOT NULL,
    rescale       REAL    NOT NULL,
    uncond        TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    model_hash    TEXT    NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'planned' CHECK (state IN ('planned', 'rendered', 'rejected')),
    reason        TEXT,
    item_id       INTEGER REFERENCES items(id),
    plan_run_id   INTEGER NOT NULL REFERENCES runs(id),
    render_run_id INTEGER REFERENCES runs(id)
);
CREATE INDEX gen_items_state ON gen_items(state);
CREATE INDEX gen_items_item ON gen_items(item_id);
CREATE TABLE merged_runs (
    source_plan   TEXT    NOT NULL,
    source_run_id INTEGER NOT NULL,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    source_dir    TEXT    NOT NULL,
    PRIMARY KEY (source_plan, source_run_id)
);
";

/// Latest schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.sqlite";

/// An open dataset: its folder and a connection to its manifest.
pub struct Manifest {
    root: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("root", &self.root)
            .finish()
    }
}

impl Manifest {
    /// Create the dataset folder layout and an empty manifest (idempotent:
    /// an existing manifest is opened and migrated).
    pub fn init(root: &Path) -> Result<Self> {
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
        let mut m = Self {
            root: root.to_path_buf(),
            db_path,
            conn,
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

    /// Bring the schema to [`SCHEMA_VERSION`], one transaction per step.
    fn migrate(&mut self) -> Result<()> {
        self.check_version_readable()?;
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
            tx.execute_batch(sql).map_err(|e| manifest_err(&path, e))?;
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

    /// Record the start of a stage run; returns its id.
    pub fn begin_run(&self, stage: &str, config: &impl serde::Serialize) -> Result<i64> {
        let cfg = serde_json::to_string(config)?;
        self.conn
            .execute(
                "INSERT INTO runs (stage, config_json, tool_version, started_at) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![stage, cfg, env!("CARGO_PKG_VERSION"), now()],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Record the end of a run with its report.
    pub fn end_run(&self, run_id: i64, ok: bool, report: &impl serde::Serialize) -> Result<()> {
        let counts = serde_json::to_string(report)?;
        self.conn
            .execute(
                "UPDATE runs SET ended_at = ?2, status = ?3, counts_json = ?4 WHERE id = ?1",
                rusqlite::params![run_id, now(), if ok { "done" } else { "failed" }, counts],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
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
    Error::Config(format!(
        "{}: no {MANIFEST_FILE} here; create the dataset first with `eps2v init {}`",
        root.display(),
        root.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_layout_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        assert_eq!(m.user_version().unwrap(), SCHEMA_VERSION);
        assert!(dir.path().join("images").is_dir());
        let run = m.begin_run("init", &serde_json::json!({})).unwrap();
        m.end_run(run, true, &serde_json::json!({"n": 0})).unwrap();
        drop(m);
        let m = Manifest::init(dir.path()).unwrap();
        let n: i64 = m
            .conn()
            .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(m.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn open_without_manifest_says_to_init() {
        let dir = tempfile::tempdir().unwrap();
        let e = Manifest::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("eps2v init"), "{e}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        m.conn().execute_batch("PRAGMA user_version = 99").unwrap();
        drop(m);
        let e = Manifest::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        drop(Manifest::init(dir.path()).unwrap());
        let m = Manifest::open_read_only(dir.path()).unwrap();
        assert!(m.conn().execute("DELETE FROM runs", []).is_err());
    }
}
