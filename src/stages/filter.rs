//! `eps2v filter DIR --min-alignment X`: reject misgenerations — generated
//! items whose image shows too little of its prompt.
//!
//! The score is the alignment `caption` stores per item with a generation
//! prompt (`tagging.alignment`: the share of the prompt's checkable tags the
//! tagger confirms; see [`crate::stages::caption::policy`]). An item with a
//! score below `X` is rejected with the reason
//! `misaligned: alignment 0.33 < 0.60; missing red hair (0.12), smile (0.30)`
//! (the prompt tags the tagger did not confirm, with their probability).
//! Items without a score (no prompt, or no tag the tagger knows) are not
//! judged.
//!
//! Judged: every item no stage before it set aside ([`JUDGED_VERDICTS`]:
//! duplicates and bucket's rejections are judged too, so that they are
//! current when that stage takes them back). A rerun with another
//! threshold reconsiders the items `filter` itself rejected: in one
//! transaction, filter's verdicts are re-decided (removed when they now
//! pass, so the item shows what other stages decided, often `ok`) together
//! with the new decisions; other stages' verdicts are never touched
//! ([`crate::manifest::verdicts`]). `--dry-run` lists the decisions and
//! writes nothing.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::manifest::{self, verdicts, ItemStatus, Manifest};
use crate::{Error, Result};

/// Configuration of the filter stage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Reject items whose alignment is below this (0..=1). Default 0.5 (in a
    /// pipeline config; the CLI flag is required).
    pub min_alignment: f64,
    /// Decide and report, write nothing. Default false.
    pub dry_run: bool,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            min_alignment: 0.5,
            dry_run: false,
        }
    }
}

/// One rejection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    /// The item.
    pub item_id: i64,
    /// Its alignment.
    pub alignment: f64,
    /// The reason stored.
    pub reason: String,
}

/// What `filter` did (or would do, with `--dry-run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FilterReport {
    /// Run id (0 for a dry run).
    pub run_id: i64,
    /// The threshold.
    pub min_alignment: f64,
    /// Nothing was written.
    pub dry_run: bool,
    /// Items with a score that were judged.
    pub scored: usize,
    /// Judged items kept.
    pub kept: usize,
    /// Judged duplicates that pass: not kept, they stay duplicates
    /// (`scored` = `kept` + `duplicates_passing` + `rejected`).
    pub duplicates_passing: usize,
    /// Judged items rejected (including ones this stage had rejected before).
    pub rejected: usize,
    /// Items rejected now that were ok before.
    pub newly_rejected: usize,
    /// Items an earlier filter run had rejected that are ok again.
    pub restored: usize,
    /// Ok items with a generation prompt but no score (not captioned with a tagger yet).
    pub unscored_with_prompt: usize,
    /// Duplicates whose keeper is set aside now (by this run or another
    /// stage since dedupe): out of the dataset until `dedupe` runs again.
    pub waiting_on_a_set_aside_keeper: u64,
    /// Every rejection, by item id.
    pub rejections: Vec<Rejection>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl FilterReport {
    /// `"N duplicates pass (they stay duplicates), "` when there are any,
    /// so that the counts of a filter after dedupe add up to the items
    /// scored.
    pub fn duplicates_text(&self) -> String {
        match self.duplicates_passing {
            0 => String::new(),
            n => format!("{n} duplicates pass (they stay duplicates), "),
        }
    }
}

/// The decision for one score: `Some(reason)` to reject.
pub fn decide(alignment: f64, missing: &[(String, f32)], min: f64) -> Option<String> {
    if alignment >= min {
        return None;
    }
    let mut reason = format!("misaligned: alignment {alignment:.2} < {min:.2}");
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(t, p)| format!("{t} ({p:.2})"))
            .collect();
        reason.push_str("; missing ");
        reason.push_str(&list.join(", "));
    }
    Some(reason)
}

/// The stages whose verdicts do not keep an item from being judged: its
/// own and the later stages'.
pub(crate) const JUDGED_VERDICTS: &[&str] = &["filter", "dedupe", "bucket"];

struct Row {
    id: i64,
    /// Filter set it aside.
    own: bool,
    /// Dedupe set it aside: judged too (a rejected one cannot come back
    /// when dedupe runs again without its keeper); one that passes stays a
    /// duplicate.
    duplicate: bool,
    alignment: Option<f64>,
    missing: Vec<(String, f32)>,
}

/// Run the filter stage.
pub fn run(cfg: &FilterConfig, m: &mut Manifest) -> Result<FilterReport> {
    let t0 = Instant::now();
    if !(0.0..=1.0).contains(&cfg.min_alignment) {
        return Err(Error::config(format!(
            "--min-alignment {}: must be between 0 and 1 (the share of the prompt's tags the tagger confirms)",
            cfg.min_alignment
        )));
    }
    let rows: Vec<Row> = {
        let mut st = m
            .conn()
            .prepare(&format!(
                "SELECT i.id, {} IS NOT NULL, t.alignment, t.missing_json, {} IS NOT NULL
                     FROM items i
                     LEFT JOIN tagging t ON t.item_id = i.id
                     WHERE {}
                     ORDER BY i.id",
                verdicts::of("i", "filter", "status"),
                verdicts::of("i", "dedupe", "status"),
                verdicts::eligible("i", JUDGED_VERDICTS)
            ))
            .map_err(|e| m.err(e))?;
        let it = st
            .query_map([], |r| {
                let missing: Option<String> = r.get(3)?;
                Ok(Row {
                    id: r.get(0)?,
                    own: r.get(1)?,
                    duplicate: r.get(4)?,
                    alignment: r.get(2)?,
                    missing: missing
                        .and_then(|s| serde_json::from_str(&s).ok())
                        .unwrap_or_default(),
                })
            })
            .map_err(|e| m.err(e))?;
        it.collect::<rusqlite::Result<_>>().map_err(|e| m.err(e))?
    };
    let unscored_with_prompt: i64 = m
        .conn()
        .query_row(
            "SELECT count(*) FROM items i JOIN generation g ON g.item_id = i.id
             LEFT JOIN tagging t ON t.item_id = i.id
             WHERE i.status = 'ok' AND trim(coalesce(g.prompt, '')) != '' AND t.alignment IS NULL",
            [],
            |r| r.get(0),
        )
        .map_err(|e| m.err(e))?;
    let mut report = FilterReport {
        min_alignment: cfg.min_alignment,
        dry_run: cfg.dry_run,
        unscored_with_prompt: unscored_with_prompt as usize,
        ..Default::default()
    };
    // (id, new status reason or None for ok) for rows whose status changes or is re-stated.
    let mut updates: Vec<(i64, Option<String>)> = Vec::new();
    for r in &rows {
        match r.alignment {
            None => {
                if r.own {
                    updates.push((r.id, None));
                    report.restored += 1;
                }
            }
            Some(a) => {
                report.scored += 1;
                match decide(a, &r.missing, cfg.min_alignment) {
                    Some(reason) => {
                        report.rejected += 1;
                        if !r.own {
                            report.newly_rejected += 1;
                        }
                        report.rejections.push(Rejection {
                            item_id: r.id,
                            alignment: a,
                            reason: reason.clone(),
                        });
                        updates.push((r.id, Some(reason)));
                    }
                    None => {
                        // A duplicate that passes is not kept: it stays one.
                        report.kept += usize::from(!r.duplicate);
                        report.duplicates_passing += usize::from(r.duplicate);
                        if r.own {
                            report.restored += 1;
                            updates.push((r.id, None));
                        }
                    }
                }
            }
        }
    }
    if report.scored == 0 && updates.is_empty() {
        return Err(Error::config(format!(
            "{}: no item has an alignment score; run `eps2v caption {}` with a tagger first (any `--policy` but `prompt`, e.g. the default; `--tagger DIR` unless toy models generated the dataset; only items with a generation prompt get a score)",
            m.root().display(),
            m.root().display()
        )));
    }
    if cfg.dry_run {
        report.seconds = t0.elapsed().as_secs_f64();
        return Ok(report);
    }
    crate::manifest::stage_run(m, "filter", cfg, |m, run_id| {
        report.run_id = run_id;
        let db = m.db_path().to_path_buf();
        let map = manifest::sql_err(&db);
        let tx = m.conn_mut().transaction().map_err(map)?;
        {
            for (id, reason) in &updates {
                let verdict = reason.as_deref().map(|r| (ItemStatus::Rejected, r));
                verdicts::set(&tx, *id, "filter", verdict, run_id).map_err(map)?;
            }
        }
        tx.commit().map_err(map)?;
        report.waiting_on_a_set_aside_keeper =
            crate::stages::dedupe::waiting_on_a_set_aside_keeper(m.conn()).map_err(map)?;
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    /// Regression: a duplicate was never judged, so raising the threshold
    /// rejected its keeper and the next dedupe put the duplicate back in
    /// the dataset below the threshold. A duplicate above it stays one.
    #[test]
    fn duplicates_are_judged_and_stay_duplicates_when_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::init(d.path()).unwrap();
        let import = m.begin_run("import", &serde_json::json!({})).unwrap();
        let dedupe = m.begin_run("dedupe", &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        for (id, duplicate, alignment) in [(1, false, 0.7), (2, true, 0.55), (3, true, 0.9)] {
            let item = manifest::NewItem::for_test(id);
            let got = manifest::insert_item(&tx, import, &item).unwrap();
            assert_eq!(got, id);
            if duplicate {
                let v = Some((ItemStatus::Duplicate, "near_duplicate: of item 1"));
                verdicts::set(&tx, id, "dedupe", v, dedupe).unwrap();
            }
            tx.execute(
                "INSERT INTO duplicates (item_id, cluster_id, keeper_id, distance, kind, run_id)
                 VALUES (?1, 1, 1, ?2, ?3, ?4)",
                params![
                    id,
                    if duplicate { 3 } else { 0 },
                    if duplicate { "near" } else { "keeper" },
                    dedupe
                ],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO tagging (item_id, tagger, settings, alignment, run_id) VALUES (?1, 't', '{}', ?2, ?3)",
                params![id, alignment, import],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let cfg = FilterConfig {
            min_alignment: 0.6,
            dry_run: false,
        };
        let r = run(&cfg, &mut m).unwrap();
        assert_eq!((r.scored, r.kept, r.rejected), (3, 1, 1));
        assert_eq!(r.duplicates_passing, 1);
        let status = |m: &Manifest, id: i64| -> String {
            m.conn()
                .query_row("SELECT status FROM items WHERE id = ?1", [id], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            (status(&m, 1), status(&m, 2), status(&m, 3)),
            ("ok".into(), "rejected".into(), "duplicate".into())
        );
        // Regression: a lower threshold took the duplicate back as `ok`
        // (one status per item: filter's rejection had replaced dedupe's
        // verdict). Now it is a duplicate again.
        let lower = FilterConfig {
            min_alignment: 0.5,
            ..cfg
        };
        let r = run(&lower, &mut m).unwrap();
        assert_eq!((r.kept, r.rejected, r.restored), (1, 0, 1));
        assert_eq!(
            (status(&m, 1), status(&m, 2), status(&m, 3)),
            ("ok".into(), "duplicate".into(), "duplicate".into())
        );
        assert_eq!(r.waiting_on_a_set_aside_keeper, 0);
        // A threshold that rejects the keeper but not a duplicate: that
        // duplicate waits for dedupe to run again, and says so.
        let higher = FilterConfig {
            min_alignment: 0.8,
            ..cfg
        };
        let r = run(&higher, &mut m).unwrap();
        assert_eq!(
            (status(&m, 1), status(&m, 2), status(&m, 3)),
            ("rejected".into(), "rejected".into(), "duplicate".into())
        );
        assert_eq!(r.waiting_on_a_set_aside_keeper, 1);
        let shown = crate::stages::inspect::render(&crate::stages::inspect::run(&m, 5).unwrap());
        assert!(
            shown.contains("1 duplicates wait on a keeper set aside after dedupe chose it"),
            "{shown}"
        );
    }

    #[test]
    fn decide_lists_missing_tags() {
        assert_eq!(decide(0.8, &[], 0.6), None);
        assert_eq!(decide(0.6, &[], 0.6), None);
        assert_eq!(
            decide(
                1.0 / 3.0,
                &[("red hair".into(), 0.12), ("smile".into(), 0.3)],
                0.6
            )
            .unwrap(),
            "misaligned: alignment 0.33 < 0.60; missing red hair (0.12), smile (0.30)"
        );
        assert_eq!(
            decide(0.0, &[], 0.5).unwrap(),
            "misaligned: alignment 0.00 < 0.50"
        );
    }
}
