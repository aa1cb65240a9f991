//! The generation plan: what every index of a `generate` run will be
//! (prompt, seed, size, sampling settings, model), as pure functions of
//! the settings and the index, and the manifest transaction that
//! materialises it.
//!
//! - Prompt `i`: prompt `i` of the template in random mode (seeded with
//!   `--seed`, [`crate::prompts::Template::random`]) or the `i`-th
//!   combinatorial prompt, [`tidy`]-ed.
//! - Seed `i`: `seed + i` (A1111's batch convention).
//! - Size `i`: `--size`, or drawn from the weighted size list with a
//!   ChaCha8 generator keyed by SHA-256 of the seed, stream `i`.
//! - Shard K/N renders the indices `i` with `i mod N = K − 1`: disjoint,
//!   deterministic, and independent of `--count`, so a plan can grow.
//!
//! A rerun compares its [`PlanSettings`] with the stored ones field by
//! field: a difference is an error naming the field, unless `--replan`;
//! then rows whose parameters changed are planned again and the images
//! rendered for their old parameters are rejected (`replanned: …`).
//! A larger `--count` extends the plan without `--replan`.

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shard::Shard;
use crate::imaging::buckets::sdxl_buckets;
use crate::prompts::expand::weighted_index;
use crate::prompts::{tidy, Template};
use crate::{Error, Result};

/// Version of the row function ([`plan_rows`]); part of the settings, so a
/// change in how prompts or sizes are drawn is a different plan.
pub const PLAN_VERSION: u32 = 1;

/// One entry of the weighted size list.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeWeight {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Relative weight (≥ 0).
    pub weight: f64,
}

/// How image sizes are chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sizes {
    /// Every image `width × height` (`--size WxH`).
    Fixed {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Drawn per image in proportion to the weights (`--size-weights`).
    Weighted(Vec<SizeWeight>),
}

impl Sizes {
    /// The SDXL bucket list (41 sizes, [`sdxl_buckets`]), each weight 1:
    /// every aspect ratio that training buckets into.
    pub fn sdxl() -> Self {
        Sizes::Weighted(
            sdxl_buckets()
                .into_iter()
                .map(|b| SizeWeight {
                    width: b.width,
                    height: b.height,
                    weight: 1.0,
                })
                .collect(),
        )
    }

    /// The SDXL list re-weighted by `spec`: comma-separated `WxH=W`
    /// entries; `*=W` sets every size not listed (default 1); a listed size
    /// outside the SDXL list is added (`"*=0,1024x1024=2,832x1216=1"`).
    pub fn parse_weights(spec: &str) -> Result<Self> {
        let bad = |e: &str, why: &str| {
            Error::config(format!(
                "--size-weights {spec:?}: entry {e:?} {why}; write WIDTHxHEIGHT=WEIGHT entries separated by commas, e.g. \"*=0,1024x1024=2,832x1216=1\""
            ))
        };
        let Sizes::Weighted(mut list) = Self::sdxl() else {
            return Err(Error::Other("sdxl sizes are weighted".into()));
        };
        let mut default = 1.0;
        let mut set: Vec<(u32, u32, f64)> = Vec::new();
        for e in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (k, v) = e.split_once('=').ok_or_else(|| bad(e, "has no `=`"))?;
            let w: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad(e, "has no numeric weight"))?;
            if !(w.is_finite() && w >= 0.0) {
                return Err(bad(e, "has a negative or non-finite weight"));
            }
            if k.trim() == "*" {
                default = w;
                continue;
            }
            let (wd, ht) = k
                .trim()
                .split_once(['x', 'X'])
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
                })
                .filter(|&(a, b)| a > 0 && b > 0)
                .ok_or_else(|| bad(e, "is not WIDTHxHEIGHT"))?;
            set.push((wd, ht, w));
        }
        for s in &mut list {
            s.weight = default;
        }
        for (wd, ht, w) in set {
            match list.iter_mut().find(|s| s.width == wd && s.height == ht) {
                Some(s) => s.weight = w,
                None => list.push(SizeWeight {
                    width: wd,
                    height: ht,
                    weight: w,
                }),
            }
        }
        let s = Sizes::Weighted(list);
        if s.candidates().is_empty() {
            return Err(Error::config(format!(
                "--size-weights {spec:?}: every size has weight 0"
            )));
        }
        Ok(s)
    }

    /// Sizes that can be drawn (positive weight), in list order.
    pub fn candidates(&self) -> Vec<(u32, u32)> {
        match self {
            Sizes::Fixed { width, height } => vec![(*width, *height)],
            Sizes::Weighted(l) => l
                .iter()
                .filter(|s| s.weight > 0.0)
                .map(|s| (s.width, s.height))
                .collect(),
        }
    }

    /// The size of plan index `index` of a run seeded with `seed`.
    pub fn pick(&self, seed: u64, index: u64) -> (u32, u32) {
        match self {
            Sizes::Fixed { width, height } => (*width, *height),
            Sizes::Weighted(l) => {
                let mut h = Sha256::new();
                h.update(b"eps2v size rng v1\0");
                h.update(seed.to_le_bytes());
                let mut rng = ChaCha8Rng::from_seed(h.finalize().into());
                rng.set_stream(index);
                let weights: Vec<f64> = l.iter().map(|s| s.weight).collect();
                let i = weighted_index(&mut rng, &weights);
                (l[i].width, l[i].height)
            }
        }
    }
}

/// Everything that fixes the plan's rows except their number: the plan
/// header stored in `gen_plan.settings_json`. Field order is the order in
/// which a rerun reports the first difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// [`PLAN_VERSION`].
    pub plan_version: u32,
    /// Checkpoint file name (A1111 `Model`).
    pub model: String,
    /// AutoV2 hash of the checkpoint (A1111 `Model hash`).
    pub model_hash: String,
    /// `eps` or `v`.
    pub prediction: String,
    /// Zero-terminal-SNR schedule.
    pub ztsnr: bool,
    /// Template label (`builtin:1girl`, a path, `inline`).
    pub template: String,
    /// SHA-256 of the template text and the wildcard files it uses.
    pub template_digest: String,
    /// Combinatorial instead of random prompts.
    pub combinatorial: bool,
    /// Base seed (`--seed`).
    pub seed: u64,
    /// Size choice.
    pub sizes: Sizes,
    /// Unconditional branch: `zero`, `empty` or `negative`.
    pub uncond: String,
    /// Negative prompt (with `uncond = negative`).
    pub negative: Option<String>,
    /// Sampler (A1111 name).
    pub sampler: String,
    /// σ schedule (A1111 name, resolved).
    pub schedule: String,
    /// Steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// CFG rescale φ (resolved).
    pub rescale: f64,
}

impl PlanSettings {
    /// Field names in declaration order (the order differences are reported in).
    pub const FIELDS: &'static [&'static str] = &[
        "plan_version",
        "model",
        "model_hash",
        "prediction",
        "ztsnr",
        "template",
        "template_digest",
        "combinatorial",
        "seed",
        "sizes",
        "uncond",
        "negative",
        "sampler",
        "schedule",
        "steps",
        "cfg",
        "rescale",
    ];

    /// Fields that only label the plan: how the template was spelled
    /// (`/abs/t.txt`, `t.txt`, `builtin:1girl`) says nothing its digest
    /// does not, and differs between shards launched from other folders.
    pub const LABELS: &'static [&'static str] = &["template"];

    /// `(field, stored, requested)` of the first field that differs
    /// (labels aside).
    pub fn first_difference(&self, other: &Self) -> Result<Option<(String, String, String)>> {
        let a = serde_json::to_value(self)?;
        let b = serde_json::to_value(other)?;
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Ok(None);
        };
        let null = serde_json::Value::Null;
        // Field order first (serde_json's map is sorted), then anything else.
        let keys = Self::FIELDS
            .iter()
            .map(|k| k.to_string())
            .chain(a.keys().chain(b.keys()).cloned());
        for k in keys.filter(|k| !Self::LABELS.contains(&k.as_str())) {
            let (va, vb) = (a.get(&k).unwrap_or(&null), b.get(&k).unwrap_or(&null));
            if va != vb {
                return Ok(Some((k, short(va), short(vb))));
            }
        }
        Ok(None)
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// One planned image: the parameters that vary by index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedItem {
    /// Plan index.
    pub idx: u64,
    /// Prompt (tidied).
    pub prompt: String,
    /// Seed.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The first `count` of [`Template::distinct_combinations`], or an error
/// when the template has fewer.
pub fn distinct_combinations(template: &Template, count: u64) -> Result<Vec<String>> {
    let c: Vec<String> = template
        .distinct_combinations()
        .take(count as usize)
        .collect();
    if (c.len() as u64) < count {
        return Err(Error::config(format!(
            "--combinatorial: the template has only {} distinct prompts but --count is {count}; lower --count or drop --combinatorial",
            c.len()
        )));
    }
    Ok(c)
}

/// The rows of `indices` (ascending) for `settings`. Combinatorial plans
/// need at least `count` distinct expansions.
pub fn plan_rows(
    settings: &PlanSettings,
    template: &Template,
    count: u64,
    indices: &[u64],
) -> Result<Vec<PlannedItem>> {
    let combos: Vec<String> = if settings.combinatorial {
        distinct_combinations(template, count)?
    } else {
        Vec::new()
    };
    Ok(indices
        .iter()
        .map(|&idx| {
            let raw = if settings.combinatorial {
                combos[idx as usize].clone()
            } else {
                template.random(settings.seed, idx)
            };
            let (width, height) = settings.sizes.pick(settings.seed, idx);
            PlannedItem {
                idx,
                prompt: tidy(&raw),
                seed: settings.seed.wrapping_add(idx),
                width,
                height,
            }
        })
        .collect())
}

/// The stored plan header.
#[derive(Debug, Clone)]
pub struct StoredPlan {
    /// Random id of this folder's plan, drawn once when the folder's first
    /// plan is written and kept across `--replan`. It is the folder's
    /// identity for `manifest merge` (`merged_runs` is keyed on it and the
    /// folder's run ids), so it must differ between shards of one plan and
    /// between two folders rendering the same shard; that is why it is not
    /// a digest of the settings, and the one manifest field outside the
    /// determinism of `generate` besides timestamps and timings.
    pub plan_id: String,
    /// Settings.
    pub settings: PlanSettings,
    /// Indices `0..count`.
    pub count: u64,
    /// Shard rendered here.
    pub shard: Shard,
}

/// Read the plan header of a manifest connection, if any.
pub fn stored_plan(conn: &rusqlite::Connection) -> Result<Option<StoredPlan>> {
    let row: Option<(String, String, i64, String)> = conn
        .query_row(
            "SELECT plan_id, settings_json, count, shard FROM gen_plan WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    row.map(|(plan_id, s, count, shard)| {
        Ok(StoredPlan {
            plan_id,
            settings: serde_json::from_str(&s)?,
            count: count as u64,
            shard: Shard::parse(&shard)?,
        })
    })
    .transpose()
}

/// Why a rerun cannot use the stored plan without `--replan` (`None`: it can).
pub fn conflict(
    old: &StoredPlan,
    settings: &PlanSettings,
    count: u64,
    shard: Shard,
) -> Result<Option<String>> {
    if let Some((field, was, now)) = old.settings.first_difference(settings)? {
        return Ok(Some(format!("{field} was {was}, this run asks for {now}")));
    }
    if shard != old.shard {
        return Ok(Some(format!(
            "shard was {}, this run asks for {shard}",
            old.shard
        )));
    }
    if count < old.count {
        return Ok(Some(format!(
            "count was {}, this run asks for {count} (a larger --count extends a plan; a smaller one replaces it)",
            old.count
        )));
    }
    Ok(None)
}

/// What planning did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanOutcome {
    /// Rows of this shard in the plan now.
    pub planned: u64,
    /// Rows added by this run.
    pub added: u64,
    /// Rows whose parameters changed (`--replan`): planned again.
    pub replanned: u64,
    /// Rows beyond a smaller `--count` (`--replan`): removed.
    pub removed: u64,
    /// Rows `generate` had rejected, planned again for this run.
    pub reconsidered: u64,
    /// Rendered rows whose image file is gone, planned again for this run
    /// (their item set aside as `image_missing` until the same bytes are
    /// rendered again).
    pub missing_images: u64,
}

/// A row's parameters as stored in `gen_items`, for comparison.
#[derive(Debug, Clone, PartialEq)]
struct RowKey {
    prompt: String,
    negative: Option<String>,
    seed: i64,
    width: i64,
    height: i64,
    sampler: String,
    schedule: String,
    steps: i64,
    cfg: f64,
    rescale: f64,
    uncond: String,
    model: String,
    model_hash: String,
}

fn row_key(settings: &PlanSettings, p: &PlannedItem) -> RowKey {
    RowKey {
        prompt: p.prompt.clone(),
        negative: settings.negative.clone(),
        seed: p.seed as i64,
        width: i64::from(p.width),
        height: i64::from(p.height),
        sampler: settings.sampler.clone(),
        schedule: settings.schedule.clone(),
        steps: settings.steps as i64,
        cfg: settings.cfg,
        rescale: settings.rescale,
        uncond: settings.uncond.clone(),
        model: settings.model.clone(),
        model_hash: settings.model_hash.clone(),
    }
}

/// Write the plan in one transaction: the header, a row per index of this
/// shard (new ones `planned`), on `--replan` the changed rows planned again
/// (their old images rejected as `replanned`), and every row `generate`
/// had rejected back to `planned`.
#[allow(clippy::too_many_arguments)]
pub fn write_plan(
    tx: &Transaction,
    run_id: i64,
    old: Option<&StoredPlan>,
    settings: &PlanSettings,
    rows: &[PlannedItem],
    count: u64,
    shard: Shard,
    now: &str,
) -> Result<PlanOutcome> {
    let mut out = PlanOutcome::default();
    // How the model is sampled changes every image but is not in the rows:
    // a plan whose prediction or ZTSNR changed (`--replan`) renders all again.
    let sampling_changed = old.is_some_and(|o| {
        o.settings.prediction != settings.prediction || o.settings.ztsnr != settings.ztsnr
    });
    let settings_json = serde_json::to_string(settings)?;
    let plan_id = match old {
        Some(o) => o.plan_id.clone(),
        None => new_plan_id(run_id, now),
    };
    tx.execute(
        "INSERT INTO gen_plan (id, plan_id, settings_json, count, shard, run_id, updated_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET settings_json = excluded.settings_json, count = excluded.count,
             shard = excluded.shard, run_id = excluded.run_id, updated_at = excluded.updated_at",
        params![plan_id, settings_json, count as i64, shard.to_string(), run_id, now],
    )?;
    let mut existing: HashMap<i64, (RowKey, String, Option<i64>)> = HashMap::new();
    {
        let mut st = tx.prepare(
            "SELECT idx, prompt, negative, seed, width, height, sampler, schedule, steps, cfg, rescale, uncond,
                    model, model_hash, state, item_id FROM gen_items",
        )?;
        let mut q = st.query([])?;
        while let Some(r) = q.next()? {
            let key = RowKey {
                prompt: r.get(1)?,
                negative: r.get(2)?,
                seed: r.get(3)?,
                width: r.get(4)?,
                height: r.get(5)?,
                sampler: r.get(6)?,
                schedule: r.get(7)?,
                steps: r.get(8)?,
                cfg: r.get(9)?,
                rescale: r.get(10)?,
                uncond: r.get(11)?,
                model: r.get(12)?,
                model_hash: r.get(13)?,
            };
            existing.insert(r.get(0)?, (key, r.get(14)?, r.get(15)?));
        }
    }
    // Generate's own verdict: another stage's stands beside it and is
    // shown again when a later plan takes the item back.
    let reject = |item: Option<i64>, why: &str| -> Result<()> {
        if let Some(id) = item {
            crate::manifest::verdicts::set(
                tx,
                id,
                "generate",
                Some((crate::manifest::ItemStatus::Rejected, why)),
                run_id,
            )?;
        }
        Ok(())
    };
    let mut insert = tx.prepare(
        "INSERT INTO gen_items (idx, prompt, negative, seed, width, height, sampler, schedule, steps, cfg, rescale,
                                uncond, model, model_hash, state, reason, item_id, plan_run_id, render_run_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'planned', NULL, NULL, ?15, NULL)
         ON CONFLICT (idx) DO UPDATE SET prompt = excluded.prompt, negative = excluded.negative, seed = excluded.seed,
             width = excluded.width, height = excluded.height, sampler = excluded.sampler, schedule = excluded.schedule,
             steps = excluded.steps, cfg = excluded.cfg, rescale = excluded.rescale, uncond = excluded.uncond,
             model = excluded.model, model_hash = excluded.model_hash, state = 'planned', reason = NULL,
             item_id = NULL, plan_run_id = excluded.plan_run_id, render_run_id = NULL",
    )?;
    for p in rows {
        let key = row_key(settings, p);
        match existing.get(&(p.idx as i64)) {
            Some((k, _, _)) if *k == key && !sampling_changed => continue,
            Some((_, _, item)) => {
                reject(
                    *item,
                    &format!("replanned: the plan of index {} changed", p.idx),
                )?;
                out.replanned += 1;
            }
            None => out.added += 1,
        }
        insert.execute(params![
            p.idx as i64,
            key.prompt,
            key.negative,
            key.seed,
            key.width,
            key.height,
            key.sampler,
            key.schedule,
            key.steps,
            key.cfg,
            key.rescale,
            key.uncond,
            key.model,
            key.model_hash,
            run_id
        ])?;
    }
    // Rows outside the plan now (a smaller count, or another shard): gone.
    for (idx, (_, _, item)) in &existing {
        if *idx as u64 >= count || !shard.contains(*idx as u64) {
            reject(
                *item,
                &format!("replanned: index {idx} is no longer in the plan"),
            )?;
            tx.execute("DELETE FROM gen_items WHERE idx = ?1", [idx])?;
            out.removed += 1;
        }
    }
    out.reconsidered = tx.execute(
        "UPDATE gen_items SET state = 'planned', reason = NULL WHERE state = 'rejected'",
        [],
    )? as u64;
    out.planned =
        tx.query_row("SELECT count(*) FROM gen_items", [], |r| r.get::<_, i64>(0))? as u64;
    Ok(out)
}

/// Plan again the rendered rows whose image file is gone (deleted by hand,
/// lost in a copy): the same seed renders the same bytes back to the same
/// item; until then the item is set aside as `image_missing` (one that
/// comes back other pixels stays aside, the new image being another item).
pub fn plan_missing_images(
    tx: &Transaction,
    root: &std::path::Path,
    run_id: i64,
) -> rusqlite::Result<u64> {
    let rendered: Vec<(i64, i64, String)> = {
        let mut st = tx.prepare(
            "SELECT g.idx, i.id, i.path FROM gen_items g JOIN items i ON i.id = g.item_id
             WHERE g.state = 'rendered'",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut n = 0;
    for (idx, item, rel) in rendered {
        if root.join(&rel).is_file() {
            continue;
        }
        let why = format!("image_missing: {rel} is gone; index {idx} is rendered again");
        crate::manifest::verdicts::set(
            tx,
            item,
            "generate",
            Some((crate::manifest::ItemStatus::Rejected, why.as_str())),
            run_id,
        )?;
        tx.execute(
            "UPDATE gen_items SET state = 'planned', reason = NULL, item_id = NULL, render_run_id = NULL
             WHERE idx = ?1",
            [idx],
        )?;
        n += 1;
    }
    Ok(n)
}

fn new_plan_id(run_id: i64, now: &str) -> String {
    let mut h = Sha256::new();
    h.update(now.as_bytes());
    h.update(run_id.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(rand::random::<u64>().to_le_bytes());
    hex::encode(&h.finalize()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::{Source, WildcardSet};

    fn settings() -> PlanSettings {
        PlanSettings {
            plan_version: PLAN_VERSION,
            model: "m".into(),
            model_hash: "abc".into(),
            prediction: "eps".into(),
            ztsnr: false,
            template: "inline".into(),
            template_digest: "d".into(),
            combinatorial: false,
            seed: 5,
            sizes: Sizes::sdxl(),
            uncond: "zero".into(),
            negative: None,
            sampler: "Euler".into(),
            schedule: "Normal".into(),
            steps: 20,
            cfg: 7.0,
            rescale: 0.0,
        }
    }

    #[test]
    fn size_weights_parse_and_draw() {
        let s = Sizes::parse_weights("*=0, 1024x1024=3 ,832x1216=1,64x64=0").unwrap();
        assert_eq!(s.candidates(), [(832, 1216), (1024, 1024)]);
        let n = 4000;
        let square = (0..n).filter(|&i| s.pick(1, i) == (1024, 1024)).count();
        assert!((square as f64 / n as f64 - 0.75).abs() < 0.03, "{square}");
        assert_eq!(s.pick(1, 7), s.pick(1, 7));
        let all = Sizes::sdxl();
        assert_eq!(all.candidates().len(), 41);
        let added = Sizes::parse_weights("*=0,64x96=1").unwrap();
        assert_eq!(added.candidates(), [(64, 96)]);
        for bad in ["*=0", "1024=1", "axb=1", "64x64=-1", "64x64"] {
            assert!(Sizes::parse_weights(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Sizes::Fixed {
                width: 64,
                height: 64
            }
            .pick(3, 9),
            (64, 64)
        );
    }

    #[test]
    fn rows_depend_only_on_settings_and_index() {
        let t =
            Template::compile("{a|b|c}, {x|y}", &Source::new("t"), &WildcardSet::empty()).unwrap();
        let s = settings();
        let all = plan_rows(&s, &t, 10, &(0..10).collect::<Vec<_>>()).unwrap();
        let some = plan_rows(&s, &t, 10, &[3, 7]).unwrap();
        assert_eq!(some, [all[3].clone(), all[7].clone()]);
        assert_eq!(all[4].seed, 9);
        let combi = PlanSettings {
            combinatorial: true,
            ..settings()
        };
        let c = plan_rows(&combi, &t, 6, &[0, 1, 5]).unwrap();
        assert_eq!(
            c.iter().map(|r| r.prompt.as_str()).collect::<Vec<_>>(),
            ["a, x", "a, y", "c, y"]
        );
        let e = plan_rows(&combi, &t, 7, &[0]).unwrap_err().to_string();
        assert!(e.contains("only 6 distinct prompts"), "{e}");
        // Raw expansions that tidy to the same prompt count once: ", a",
        // ", ", "a, a", "a, " are "a", "", "a, a".
        let t = Template::compile("{|a}, {a|}", &Source::new("t"), &WildcardSet::empty()).unwrap();
        let c = plan_rows(&combi, &t, 3, &[0, 1, 2]).unwrap();
        let prompts: std::collections::HashSet<&str> =
            c.iter().map(|r| r.prompt.as_str()).collect();
        assert_eq!(prompts.len(), 3, "{c:?}");
        let e = plan_rows(&combi, &t, 4, &[0]).unwrap_err().to_string();
        assert!(e.contains("only 3 distinct prompts"), "{e}");
    }

    #[test]
    fn differences_name_the_first_field() {
        let a = settings();
        let b = PlanSettings {
            steps: 28,
            cfg: 5.0,
            ..settings()
        };
        let (f, was, now) = a.first_difference(&b).unwrap().unwrap();
        assert_eq!(
            (f.as_str(), was.as_str(), now.as_str()),
            ("steps", "20", "28")
        );
        assert!(a.first_difference(&a.clone()).unwrap().is_none());
        // The template's spelling is a label: the digest decides.
        let relabelled = PlanSettings {
            template: "/elsewhere/t.txt".into(),
            ..settings()
        };
        assert!(a.first_difference(&relabelled).unwrap().is_none());
        let edited = PlanSettings {
            template_digest: "e".into(),
            ..relabelled
        };
        assert_eq!(
            a.first_difference(&edited).unwrap().unwrap().0,
            "template_digest"
        );
        // Every field is listed in FIELDS.
        let v = serde_json::to_value(&a).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut listed = PlanSettings::FIELDS.to_vec();
        keys.sort();
        listed.sort();
        assert_eq!(keys, listed);
        let old = StoredPlan {
            plan_id: "p".into(),
            settings: a.clone(),
            count: 10,
            shard: Shard::ALL,
        };
        assert!(
            conflict(&old, &a, 12, Shard::ALL).unwrap().is_none(),
            "growing is fine"
        );
        let m = conflict(&old, &a, 8, Shard::ALL).unwrap().unwrap();
        assert!(m.starts_with("count was 10"), "{m}");
        let m = conflict(&old, &a, 10, Shard::new(1, 2).unwrap())
            .unwrap()
            .unwrap();
        assert!(m.starts_with("shard was 1/1"), "{m}");
    }
}
