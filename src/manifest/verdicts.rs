//! Per-stage verdicts (`item_verdicts`, schema v8): each stage's own
//! decision on an item, kept apart from the others'.
//!
//! A stage that sets an item aside writes its row (`rejected` or
//! `duplicate`, with a reason), and removes it when it takes the item back;
//! it never touches another stage's row. `items.status`, `reason` and
//! `status_run_id` are derived from the item's rows by [`refresh`], in the
//! same transaction: a rejection before a duplicate, then the earliest
//! stage of [`STAGE_ORDER`]; `ok` (with the run that cleared the last row)
//! when none is left. So a duplicate that filter rejects and later restores
//! is a duplicate again, and a replan sets aside an item whatever other
//! stages decided, which come back when the plan takes it back.
//!
//! Readers keep reading `items.status`; a stage chooses the items it
//! decides with [`eligible`]: none set aside by a stage other than those it
//! names.

use rusqlite::{params, Connection, OptionalExtension};

use super::ItemStatus;

/// The pipeline's order, which decides whose verdict an item shows when
/// several stages set it aside (a rejection first, then the earliest
/// stage). Stages not listed come after, by name.
pub const STAGE_ORDER: &[&str] = &[
    "import", "generate", "caption", "filter", "dedupe", "bucket",
];

/// `ORDER BY` terms that put an item's shown verdict first (`v` is the
/// verdicts table's alias).
fn precedence() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let stages: String = STAGE_ORDER
            .iter()
            .enumerate()
            .map(|(k, s)| format!(" WHEN '{s}' THEN {k}"))
            .collect();
        format!(
            "v.status = 'duplicate', CASE v.stage{stages} ELSE {} END, v.stage",
            STAGE_ORDER.len()
        )
    })
}

/// Set (`Some((status, reason))`) or clear (`None`) `stage`'s verdict on
/// `item`, then [`refresh`] the item's status. `status` must not be
/// [`ItemStatus::Ok`] (that is `None`). Returns whether the item's shown
/// status or reason changed.
pub fn set(
    tx: &Connection,
    item: i64,
    stage: &str,
    verdict: Option<(ItemStatus, &str)>,
    run_id: i64,
) -> rusqlite::Result<bool> {
    match verdict {
        Some((status, reason)) => {
            debug_assert!(status != ItemStatus::Ok, "an ok verdict is a cleared one");
            tx.prepare_cached(
                "INSERT INTO item_verdicts (item_id, stage, status, reason, run_id) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (item_id, stage) DO UPDATE SET status = excluded.status,
                     reason = excluded.reason, run_id = excluded.run_id",
            )?
            .execute(params![item, stage, status.as_str(), reason, run_id])?;
        }
        None => {
            let gone = tx
                .prepare_cached("DELETE FROM item_verdicts WHERE item_id = ?1 AND stage = ?2")?
                .execute(params![item, stage])?;
            if gone == 0 {
                return Ok(false);
            }
        }
    }
    refresh(tx, item, run_id)
}

/// Clear the verdicts of `stage` on the items it decides again, those
/// [`eligible`] for `stage` (a stage that decides its whole plan again, as
/// dedupe; its verdicts on items another stage set aside meanwhile stand,
/// since it does not look at them). Returns the items whose shown status
/// changed.
pub fn clear_stage(tx: &Connection, stage: &str, run_id: i64) -> rusqlite::Result<Vec<i64>> {
    let items: Vec<i64> = {
        let mut st = tx.prepare(&format!(
            "DELETE FROM item_verdicts WHERE stage = ?1
               AND item_id IN (SELECT i.id FROM items i WHERE {})
             RETURNING item_id",
            eligible("i", &[stage])
        ))?;
        let rows = st.query_map([stage], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut changed = Vec::new();
    for id in items {
        if refresh(tx, id, run_id)? {
            changed.push(id);
        }
    }
    Ok(changed)
}

/// Derive `items.status`, `reason` and `status_run_id` of `item` from its
/// verdicts; `run_id` is recorded when none is left and the item was set
/// aside. Returns whether the status or reason changed.
pub fn refresh(tx: &Connection, item: i64, run_id: i64) -> rusqlite::Result<bool> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "SELECT v.status, v.reason, v.run_id FROM item_verdicts v WHERE v.item_id = ?1
             ORDER BY {} LIMIT 1",
            precedence()
        )
    });
    let shown: Option<(String, Option<String>, Option<i64>)> = tx
        .prepare_cached(sql)?
        .query_row([item], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let n = match shown {
        Some((status, reason, by)) => tx
            .prepare_cached(
                "UPDATE items SET status = ?2, reason = ?3, status_run_id = ?4
                 WHERE id = ?1 AND (status IS NOT ?2 OR reason IS NOT ?3)",
            )?
            .execute(params![item, status, reason, by.unwrap_or(run_id)])?,
        None => tx
            .prepare_cached(
                "UPDATE items SET status = 'ok', reason = NULL, status_run_id = ?2
                 WHERE id = ?1 AND (status <> 'ok' OR reason IS NOT NULL)",
            )?
            .execute(params![item, run_id])?,
    };
    Ok(n > 0)
}

/// Record the verdict of a new item inserted set aside (`status` not ok)
/// by `run_id`, under that run's stage.
pub(crate) fn record_insert(
    tx: &Connection,
    item: i64,
    status: ItemStatus,
    reason: Option<&str>,
    run_id: i64,
) -> rusqlite::Result<()> {
    if status != ItemStatus::Ok {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO item_verdicts (item_id, stage, status, reason, run_id)
             SELECT ?1, stage, ?2, ?3, id FROM runs WHERE id = ?4",
        )?
        .execute(params![item, status.as_str(), reason, run_id])?;
    }
    Ok(())
}

/// SQL condition: item `alias` is not set aside by any stage other than
/// `stages` (whose verdicts the caller decides again). An item set aside
/// without a verdict (a status written by hand) counts as set aside by
/// another stage.
pub fn eligible(alias: &str, stages: &[&str]) -> String {
    let list = stages
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "(NOT EXISTS (SELECT 1 FROM item_verdicts v WHERE v.item_id = {alias}.id AND v.stage NOT IN ({list})) \
         AND ({alias}.status = 'ok' OR EXISTS (SELECT 1 FROM item_verdicts v WHERE v.item_id = {alias}.id)))"
    )
}

/// SQL expression: `column` of the verdict item `alias` shows (NULL when
/// it has none).
pub fn shown(alias: &str, column: &str) -> String {
    format!(
        "(SELECT v.{column} FROM item_verdicts v WHERE v.item_id = {alias}.id ORDER BY {} LIMIT 1)",
        precedence()
    )
}

/// SQL expression: `stage`'s verdict on item `alias` (`status` column of
/// the row; NULL when the stage has none).
pub fn of(alias: &str, stage: &str, column: &str) -> String {
    format!(
        "(SELECT v.{column} FROM item_verdicts v WHERE v.item_id = {alias}.id AND v.stage = '{stage}')"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{insert_item, Manifest, NewItem};

    fn shown(c: &rusqlite::Connection, id: i64) -> (String, Option<String>) {
        c.query_row(
            "SELECT status, reason FROM items WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// The rule of the module: each stage's verdict stands on its own, the
    /// item shows a rejection before a duplicate and the earliest stage, and
    /// is ok again only when no verdict is left.
    #[test]
    fn an_item_shows_the_first_verdict_left_and_is_ok_without_one() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let import = m.begin_run("import", &serde_json::json!({})).unwrap();
        let dedupe = m.begin_run("dedupe", &serde_json::json!({})).unwrap();
        let filter = m.begin_run("filter", &serde_json::json!({})).unwrap();
        let generate = m.begin_run("generate", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        let id = insert_item(&tx, import, &NewItem::for_test(1)).unwrap();
        let dup = Some((ItemStatus::Duplicate, "near_duplicate: of item 9"));
        assert!(set(&tx, id, "dedupe", dup, dedupe).unwrap());
        let low = Some((ItemStatus::Rejected, "misaligned: 0.2"));
        assert!(set(&tx, id, "filter", low, filter).unwrap());
        // Setting the same again changes nothing shown.
        assert!(!set(&tx, id, "filter", low, filter).unwrap());
        let gone = Some((ItemStatus::Rejected, "replanned: not in the plan"));
        assert!(set(&tx, id, "generate", gone, generate).unwrap());
        tx.commit().unwrap();
        assert_eq!(
            shown(m.conn(), id),
            ("rejected".into(), Some("replanned: not in the plan".into()))
        );
        let tx = m.conn_mut().transaction().unwrap();
        assert!(set(&tx, id, "generate", None, generate).unwrap());
        assert_eq!(shown(&tx, id).1.as_deref(), Some("misaligned: 0.2"));
        // Filter takes it back: a duplicate again, not ok.
        assert!(set(&tx, id, "filter", None, filter).unwrap());
        assert_eq!(shown(&tx, id).0, "duplicate");
        // Clearing a verdict the stage never gave changes nothing.
        assert!(!set(&tx, id, "bucket", None, filter).unwrap());
        assert_eq!(clear_stage(&tx, "dedupe", dedupe).unwrap(), [id]);
        tx.commit().unwrap();
        assert_eq!(shown(m.conn(), id), ("ok".into(), None));
        let by: i64 = m
            .conn()
            .query_row("SELECT status_run_id FROM items WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(by, dedupe);
    }

    #[test]
    fn eligible_items_are_those_no_other_stage_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let import = m.begin_run("import", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        let rej = Some((ItemStatus::Rejected, "x"));
        for n in 1..=5 {
            insert_item(&tx, import, &NewItem::for_test(n)).unwrap();
        }
        set(&tx, 2, "bucket", rej, import).unwrap();
        set(&tx, 3, "filter", rej, import).unwrap();
        set(&tx, 4, "bucket", rej, import).unwrap();
        set(&tx, 4, "filter", rej, import).unwrap();
        // Set aside by hand, without a verdict.
        tx.execute("UPDATE items SET status = 'rejected' WHERE id = 5", [])
            .unwrap();
        tx.commit().unwrap();
        let ids = |stages: &[&str]| -> Vec<i64> {
            let sql = format!(
                "SELECT i.id FROM items i WHERE {} ORDER BY i.id",
                eligible("i", stages)
            );
            let mut st = m.conn().prepare(&sql).unwrap();
            let rows = st.query_map([], |r| r.get(0)).unwrap();
            rows.map(|r| r.unwrap()).collect()
        };
        assert_eq!(ids(&["bucket"]), [1, 2]);
        assert_eq!(ids(&["filter", "bucket"]), [1, 2, 3, 4]);
        assert_eq!(ids(&["caption"]), [1]);
    }

    #[test]
    fn an_item_inserted_set_aside_has_its_runs_verdict() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let import = m.begin_run("import", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        let item = NewItem {
            status: ItemStatus::Rejected,
            reason: Some("undecodable: truncated".into()),
            path: None,
            ..NewItem::for_test(1)
        };
        let id = insert_item(&tx, import, &item).unwrap();
        tx.commit().unwrap();
        let v: (String, String, Option<String>) = m
            .conn()
            .query_row(
                "SELECT stage, status, reason FROM item_verdicts WHERE item_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            v,
            (
                "import".into(),
                "rejected".into(),
                Some("undecodable: truncated".into())
            )
        );
    }
}
