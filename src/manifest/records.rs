//! Typed records stored in the manifest, and their insert helpers.
//!
//! Stages build these plain structs (their decision logic never touches
//! SQL) and write them through the `insert_*` functions inside one
//! transaction per batch.

use rusqlite::{params, Transaction};
use serde::{Deserialize, Serialize};

/// Status of an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Usable.
    Ok,
    /// Refused (undecodable, too large, too small for any bucket…); see `reason`.
    Rejected,
    /// Dropped as a duplicate of a keeper; see `duplicates`.
    Duplicate,
}

impl ItemStatus {
    /// [`ItemStatus::as_str`] as an SQL parameter.
    fn as_sql(&self) -> &'static &'static str {
        match self {
            ItemStatus::Ok => &"ok",
            ItemStatus::Rejected => &"rejected",
            ItemStatus::Duplicate => &"duplicate",
        }
    }

    /// The value stored in `items.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Ok => "ok",
            ItemStatus::Rejected => "rejected",
            ItemStatus::Duplicate => "duplicate",
        }
    }
}

/// A new row of `items`.
#[derive(Debug, Clone, Serialize)]
pub struct NewItem {
    /// sha256 of the file bytes (hex).
    pub sha256: String,
    /// Path relative to the dataset root, `None` when rejected.
    pub path: Option<String>,
    /// Where it came from (first source path, or `generate`).
    pub source: String,
    /// Width after EXIF orientation.
    pub width: Option<u32>,
    /// Height after EXIF orientation.
    pub height: Option<u32>,
    /// Sniffed format name.
    pub format: Option<String>,
    /// Status.
    pub status: ItemStatus,
    /// Reason code (and detail) when not ok.
    pub reason: Option<String>,
}

#[cfg(test)]
impl NewItem {
    /// An ok 64×64 PNG item whose content hash is `n`, zero-padded (tests
    /// that set statuses by hand).
    pub(crate) fn for_test(n: i64) -> Self {
        Self {
            sha256: format!("{n:064}"),
            path: Some(format!("images/{n}.png")),
            source: "test".into(),
            width: Some(64),
            height: Some(64),
            format: Some("png".into()),
            status: ItemStatus::Ok,
            reason: None,
        }
    }
}

/// Generation parameters (A1111 infotext at import, the plan at generate).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationParams {
    /// Positive prompt.
    pub prompt: Option<String>,
    /// Negative prompt.
    pub negative: Option<String>,
    /// Seed.
    pub seed: Option<i64>,
    /// Sampling steps.
    pub steps: Option<i64>,
    /// Sampler name (A1111 spelling).
    pub sampler: Option<String>,
    /// Schedule type (A1111 spelling).
    pub schedule: Option<String>,
    /// CFG scale.
    pub cfg: Option<f64>,
    /// Width from `Size`.
    pub width: Option<i64>,
    /// Height from `Size`.
    pub height: Option<i64>,
    /// Model hash (AutoV2).
    pub model_hash: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// Every other key, in order, as JSON object text.
    pub extra_json: Option<String>,
    /// The raw parameters text.
    pub raw: Option<String>,
    /// `png_text`, `exif_user_comment` or `generate`.
    pub origin: String,
}

/// Perceptual and pixel hashes of one decoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HashRecord {
    /// sha256 of the decoded RGB8 pixels and size.
    pub pixel_sha256: [u8; 32],
    /// 64-bit pHash (imagededup bit order).
    pub phash: u64,
    /// 64-bit dHash.
    pub dhash: u64,
}

const INSERT_ITEM: &str =
    "INSERT INTO items (sha256, path, source, width, height, format, status, reason, run_id, status_run_id, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)";

/// The parameters of [`INSERT_ITEM`] for one item.
fn item_params<'a>(
    it: &'a NewItem,
    run_id: &'a i64,
    created_at: &'a dyn rusqlite::ToSql,
) -> [&'a dyn rusqlite::ToSql; 10] {
    [
        &it.sha256,
        &it.path,
        &it.source,
        &it.width,
        &it.height,
        &it.format,
        it.status.as_sql(),
        &it.reason,
        run_id,
        created_at,
    ]
}

/// Insert an item; returns its id. An item inserted set aside gets the
/// verdict of the run's stage ([`super::verdicts`]).
pub fn insert_item(tx: &Transaction, run_id: i64, it: &NewItem) -> rusqlite::Result<i64> {
    let now = super::now();
    tx.prepare_cached(INSERT_ITEM)?
        .execute(item_params(it, &run_id, &now))?;
    let id = tx.last_insert_rowid();
    super::verdicts::record_insert(tx, id, it.status, it.reason.as_deref(), run_id)?;
    Ok(id)
}

/// Inserts many items of one run: one prepared statement and one
/// `created_at` for all of them (the same rows as [`insert_item`], without
/// its per-row statement-cache lookup and clock formatting).
pub struct ItemInserter<'t> {
    tx: &'t rusqlite::Connection,
    stmt: rusqlite::Statement<'t>,
    run_id: i64,
    created_at: String,
}

impl<'t> ItemInserter<'t> {
    /// Prepare the insert inside `tx`.
    pub fn new(tx: &'t Transaction<'_>, run_id: i64) -> rusqlite::Result<Self> {
        Ok(Self {
            tx,
            stmt: tx.prepare(INSERT_ITEM)?,
            run_id,
            created_at: super::now(),
        })
    }

    /// Insert one item; returns its id.
    pub fn insert(&mut self, it: &NewItem) -> rusqlite::Result<i64> {
        let id = self
            .stmt
            .insert(item_params(it, &self.run_id, &self.created_at))?;
        super::verdicts::record_insert(self.tx, id, it.status, it.reason.as_deref(), self.run_id)?;
        Ok(id)
    }
}

/// Below this many new rows [`insert_items_bulk`] keeps the indexes:
/// rebuilding them costs a pass over the whole table.
pub const BULK_MIN_ROWS: usize = 10_000;

/// Insert many new items of one run inside `tx` with an [`ItemInserter`];
/// returns their ids in order. When they are at least [`BULK_MIN_ROWS`] and
/// at least as many as the items already there, the two `items` indexes
/// (`items_sha256`, the uniqueness of `sha256`, and `items_status`) are
/// dropped for the insert and rebuilt after it: sorting once is cheaper
/// than a random B-tree insert per row. All of it is inside `tx`, so
/// readers never see the table without its indexes and a kill rolls it all
/// back. An error (e.g. a `sha256` already present, found when the unique
/// index is rebuilt) leaves `tx` to be rolled back: drop it, do not commit.
pub fn insert_items_bulk<I>(
    tx: &Transaction<'_>,
    run_id: i64,
    items: I,
) -> rusqlite::Result<Vec<i64>>
where
    I: IntoIterator,
    I::IntoIter: ExactSizeIterator,
    I::Item: std::borrow::Borrow<NewItem>,
{
    let items = items.into_iter();
    let existing: i64 = tx.query_row("SELECT count(*) FROM items", [], |r| r.get(0))?;
    let rebuild = items.len() >= BULK_MIN_ROWS && items.len() as i64 >= existing;
    if rebuild {
        tx.execute_batch("DROP INDEX IF EXISTS items_sha256; DROP INDEX IF EXISTS items_status;")?;
    }
    let mut ids = Vec::with_capacity(items.len());
    {
        let mut ins = ItemInserter::new(tx, run_id)?;
        for it in items {
            ids.push(ins.insert(std::borrow::Borrow::borrow(&it))?);
        }
    }
    if rebuild {
        tx.execute_batch(
            "CREATE UNIQUE INDEX items_sha256 ON items(sha256);
             CREATE INDEX items_status ON items(status, reason) WHERE status <> 'ok';",
        )?;
    }
    Ok(ids)
}

/// Record one source path of an item (a changed file at a known path
/// re-points the path to its new item).
pub fn insert_source(
    tx: &Transaction,
    run_id: i64,
    item_id: i64,
    path: &str,
    size: u64,
    mtime_ns: i64,
    note: Option<&str>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO sources (item_id, path, size, mtime_ns, note, run_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (path) DO UPDATE SET item_id = excluded.item_id, size = excluded.size,
             mtime_ns = excluded.mtime_ns, note = excluded.note, run_id = excluded.run_id",
    )?
    .execute(params![item_id, path, size as i64, mtime_ns, note, run_id],
    )?;
    Ok(())
}

/// Insert (or keep the existing) generation parameters of an item.
pub fn insert_generation(
    tx: &Transaction,
    run_id: i64,
    item_id: i64,
    g: &GenerationParams,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO generation (item_id, prompt, negative, seed, steps, sampler, schedule, cfg, width, height,
                                           model_hash, model, extra_json, raw, origin, run_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
            item_id,
            g.prompt,
            g.negative,
            g.seed,
            g.steps,
            g.sampler,
            g.schedule,
            g.cfg,
            g.width,
            g.height,
            g.model_hash,
            g.model,
            g.extra_json,
            g.raw,
            g.origin,
            run_id
        ],
    )?;
    Ok(())
}

/// Insert or replace the caption of `(item, source)`.
pub fn upsert_caption(
    tx: &Transaction,
    run_id: i64,
    item_id: i64,
    source: &str,
    text: &str,
    score: Option<f64>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO captions (item_id, source, text, score, run_id) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (item_id, source) DO UPDATE SET text = excluded.text, score = excluded.score, run_id = excluded.run_id",
    )?
    .execute(params![item_id, source, text, score, run_id],
    )?;
    Ok(())
}

/// Insert or replace one tag of `(item, source)`; `pos` is its place in
/// that source (0-based), which export keeps.
pub fn upsert_tag(
    tx: &Transaction,
    run_id: i64,
    item_id: i64,
    source: &str,
    (tag, pos): (&str, usize),
    score: Option<f64>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO tags (item_id, source, tag, score, run_id, pos) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (item_id, source, tag) DO UPDATE SET score = excluded.score, run_id = excluded.run_id, pos = excluded.pos",
    )?
    .execute(params![item_id, source, tag, score, run_id, pos as i64],
    )?;
    Ok(())
}

/// Insert the hashes of an item (kept if already present).
pub fn insert_hashes(
    tx: &Transaction,
    run_id: i64,
    item_id: i64,
    h: &HashRecord,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO hashes (item_id, pixel_sha256, phash, dhash, run_id) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
            item_id,
            hex::encode(h.pixel_sha256),
            h.phash as i64,
            h.dhash as i64,
            run_id
        ],
    )?;
    Ok(())
}

/// Split a Danbooru-style caption (`1girl, solo, long hair`) into tags:
/// comma separated, trimmed, empty pieces dropped, duplicates dropped
/// (first occurrence kept).
pub fn split_tags(caption: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in caption.split([',', '\n']) {
        let t = t.trim();
        if !t.is_empty() && !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_inserter_writes_the_same_rows_as_insert_item() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = super::super::Manifest::init(dir.path()).unwrap();
        let run = m.begin_run("test", &serde_json::json!({})).unwrap();
        let item = |k: u32| NewItem {
            sha256: format!("{k:064x}"),
            path: Some(format!("images/00/{k}.png")),
            source: format!("/src/{k}.png"),
            width: Some(k),
            height: Some(2 * k),
            format: Some("png".into()),
            status: if k % 2 == 0 {
                ItemStatus::Ok
            } else {
                ItemStatus::Rejected
            },
            reason: (k % 2 == 1).then(|| "corrupt: x".to_string()),
        };
        let tx = m.conn_mut().transaction().unwrap();
        let a = insert_item(&tx, run, &item(1)).unwrap();
        let mut ins = ItemInserter::new(&tx, run).unwrap();
        let b = ins.insert(&item(2)).unwrap();
        let c = ins.insert(&item(3)).unwrap();
        drop(ins);
        tx.commit().unwrap();
        assert_eq!((b, c), (a + 1, a + 2));
        let index_count = |c: &rusqlite::Connection| -> i64 {
            c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name IN ('items_sha256', 'items_status')",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        // Bulk: the same rows, the indexes back afterwards.
        let many: Vec<NewItem> = (4..4 + BULK_MIN_ROWS as u32).map(item).collect();
        let tx = m.conn_mut().transaction().unwrap();
        let ids = insert_items_bulk(&tx, run, many.iter()).unwrap();
        assert_eq!(ids.len(), BULK_MIN_ROWS);
        assert_eq!(
            (ids[0], ids[ids.len() - 1]),
            (c + 1, c + BULK_MIN_ROWS as i64)
        );
        assert_eq!(index_count(&tx), 2);
        let plan: String = tx
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM items WHERE sha256 = 'x'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("items_sha256"), "{plan}");
        // The status index is rebuilt partial (migration v6) and serves the
        // set-aside items.
        let sql: String = tx
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'items_status'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.ends_with("WHERE status <> 'ok'"), "{sql}");
        let plan: String = tx
            .query_row(
                "EXPLAIN QUERY PLAN SELECT count(*) FROM items WHERE status <> 'ok' AND status = 'duplicate'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("items_status"), "{plan}");
        // A sha256 that is already there fails the rebuild: roll back.
        let again: Vec<NewItem> = (0..2 * BULK_MIN_ROWS as u32).map(|k| item(k + 3)).collect();
        assert!(insert_items_bulk(&tx, run, again.iter()).is_err());
        drop(tx);
        assert_eq!(index_count(m.conn()), 2);
        let rows: Vec<(String, String, Option<String>, i64, i64)> = m
            .conn()
            .prepare("SELECT sha256, status, reason, width, status_run_id FROM items ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        for (k, row) in (1..=3).zip(&rows) {
            let it = item(k);
            assert_eq!(row.0, it.sha256);
            assert_eq!(row.1, it.status.as_str());
            assert_eq!(row.2, it.reason);
            assert_eq!((row.3, row.4), (i64::from(k), run));
        }
    }

    #[test]
    fn split_tags_trims_and_dedups() {
        assert_eq!(
            split_tags(" 1girl, solo,, long hair ,solo\nsmile"),
            vec!["1girl", "solo", "long hair", "smile"]
        );
        assert!(split_tags("  ").is_empty());
    }
}
