//! Joins our measurements (`ours.json`, [`super::run::OursReport`]) and the
//! PyTorch side's (`torch.json`, written by benches/gpu/reference.py) into
//! one table of rows — metric, ours, reference, ratio ours/reference,
//! target, met — printed as Markdown and written as JSON.
//!
//! Targets (issue 12): our bf16 UNet within relative L2 error 1e-2 of
//! diffusers' on the same weights and inputs; the golden tiny models within
//! their tolerances ([`super::golden`]); `sample` time per image ≤ 1.15×
//! diffusers (first milestone; the goal is 1.0×); the `out`+`OUT08` training
//! step within 24 GB (10⁹ bytes) of GPU memory. Other rows are reported
//! without a target. A missing reference (no GPU, no torch) leaves its
//! columns empty; a target that could not be measured counts as not met.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Result;

/// Sampling: ours / diffusers per image must stay at or below this.
pub const SAMPLE_RATIO_TARGET: f64 = 1.15;
/// UNet check: relative L2 error bound in the bench dtype.
pub const UNET_REL_TARGET: f64 = 1e-2;
/// UNet check in f32 (same weights, different op order only).
pub const UNET_REL_F32_TARGET: f64 = 1e-3;
/// Peak GPU memory of the `out+OUT08` step, in GB (10⁹ bytes).
pub const HEAD_STEP_MEM_TARGET_GB: f64 = 24.0;

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub metric: String,
    /// Unit of `ours` and `reference`.
    pub unit: String,
    /// Our value.
    pub ours: Option<f64>,
    /// diffusers / PyTorch's value.
    pub reference: Option<f64>,
    /// `ours / reference`.
    pub ratio: Option<f64>,
    /// The target, in words (`≤ 0.01`, `ratio ≤ 1.15`).
    pub target: Option<String>,
    /// Whether the target is met (`None`: no target).
    pub met: Option<bool>,
}

/// The combined report.
#[derive(Debug, Clone, Serialize)]
pub struct Combined {
    /// The table.
    pub rows: Vec<Row>,
    /// Rows with a target, and how many are met.
    pub targets: usize,
    /// Targets met.
    pub met: usize,
    /// Our raw report.
    pub ours: Value,
    /// The reference's raw report (`null` when it did not run).
    pub reference: Value,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64().filter(|x| x.is_finite())
}

fn find<'a>(v: &'a Value, list: &str, key: &str, want: &Value) -> Option<&'a Value> {
    v.get(list)?
        .as_array()?
        .iter()
        .find(|e| e.get(key) == Some(want))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Row {
    fn new(
        metric: impl Into<String>,
        unit: &str,
        ours: Option<f64>,
        reference: Option<f64>,
    ) -> Self {
        Self {
            metric: metric.into(),
            unit: unit.to_string(),
            ours,
            reference,
            ratio: ratio(ours, reference),
            target: None,
            met: None,
        }
    }

    fn target(mut self, words: String, met: Option<bool>) -> Self {
        self.target = Some(words);
        self.met = Some(met.unwrap_or(false));
        self
    }
}

const MIB_TO_GB: f64 = 1_048_576.0 / 1e9;

/// Build the table from our report and the reference's (`Value::Null` when
/// the reference did not run).
pub fn combine(ours: &Value, reference: &Value) -> Result<Combined> {
    let dtype = ours.get("dtype").and_then(Value::as_str).unwrap_or("?");
    let mut rows = Vec::new();
    let rel = |k: &str| num(reference, &["unet_check", "rel_l2", k]);

    let v = rel("ours_vs_ref");
    rows.push(
        Row::new(
            format!("UNet rel. L2 error, ours {dtype} vs diffusers {dtype}"),
            "",
            v,
            None,
        )
        .target(
            format!("≤ {UNET_REL_TARGET}"),
            v.map(|v| v <= UNET_REL_TARGET),
        ),
    );
    if dtype != "f32" {
        let v = rel("ours_f32_vs_ref_f32");
        rows.push(
            Row::new("UNet rel. L2 error, ours f32 vs diffusers f32", "", v, None).target(
                format!("≤ {UNET_REL_F32_TARGET}"),
                v.map(|v| v <= UNET_REL_F32_TARGET),
            ),
        );
        rows.push(Row::new(
            format!("UNet rel. L2 error vs diffusers f32: ours {dtype} / diffusers {dtype}"),
            "",
            rel("ours_vs_ref_f32"),
            rel("ref_vs_ref_f32"),
        ));
    }
    for g in ours
        .get("golden")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = format!(
            "golden tiny {} {} max rel. error vs CPU f32",
            g.get("model").and_then(Value::as_str).unwrap_or("?"),
            g.get("dtype").and_then(Value::as_str).unwrap_or("?")
        );
        let tol = num(g, &["tolerance"]).unwrap_or(0.0);
        let ok = g.get("ok").and_then(Value::as_bool);
        rows.push(Row::new(name, "", num(g, &["max_rel"]), None).target(format!("≤ {tol}"), ok));
    }
    rows.push(Row::new(
        "UNet call, 2 rows (one CFG pair)",
        "ms",
        num(ours, &["unet_check", "forward_ms"]),
        num(reference, &["unet_check", "forward_ms"]),
    ));
    let wide = |v: &Value, key: &str| num(v, &["unet_check", "wide", key]);
    if let Some(n) = wide(ours, "rows").or_else(|| wide(reference, "rows")) {
        let failed = ours
            .pointer("/unet_check/wide/error")
            .and_then(Value::as_str)
            .map_or(String::new(), |e| format!(" (eps2v failed: {e})"));
        rows.push(Row::new(
            format!("UNet call, {n} rows (batch {} with CFG){failed}", n / 2.0),
            "ms",
            wide(ours, "forward_ms"),
            wide(reference, "forward_ms"),
        ));
    }
    rows.push(Row::new(
        "UNet call, fused device forms off (composites)",
        "ms",
        num(ours, &["unet_check", "composite_forward_ms"]),
        num(reference, &["unet_check", "forward_ms"]),
    ));
    let ab = num(ours, &["unet_check", "fused_vs_composite_rel_l2"]);
    rows.push(
        Row::new(
            "UNet output, fused forms vs composites, rel. L2",
            "",
            ab,
            None,
        )
        .target("≤ 0.01".into(), ab.map(|e| e <= 0.01)),
    );
    for s in ours
        .get("sample")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(batch) = s.get("batch") else {
            continue;
        };
        let theirs = find(reference, "sample", "batch", batch);
        let steps = num(s, &["steps"]).unwrap_or(0.0);
        // Skipped (budget) or failed on our side: the reason, first line.
        let why = s
            .get("skipped")
            .and_then(Value::as_str)
            .map(|e| format!(" (eps2v {})", e.lines().next().unwrap_or("").trim()))
            .unwrap_or_default();
        let row = Row::new(
            format!("sample, {steps} steps, CFG, batch {batch}{why}"),
            "s/image",
            num(s, &["seconds_per_image"]),
            theirs.and_then(|t| num(t, &["seconds_per_image"])),
        );
        let met = row.ratio.map(|r| r <= SAMPLE_RATIO_TARGET);
        rows.push(row.target(format!("ratio ≤ {SAMPLE_RATIO_TARGET}"), met));
    }
    for t in ours
        .get("train")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(sel) = t.get("trainable") else {
            continue;
        };
        let name = sel.as_str().unwrap_or("?");
        let theirs = find(reference, "train", "trainable", sel);
        let get = |v: Option<&Value>, k: &str| v.and_then(|v| num(v, &[k]));
        // A step that failed (out of memory) has no numbers of ours; its
        // reason goes into the row's name.
        let failed = |v: Option<&Value>| {
            v.and_then(|v| v.get("error"))
                .and_then(Value::as_str)
                .map(|e| e.lines().next().unwrap_or("").trim().to_string())
        };
        let recomputed = if t.get("recomputed").and_then(Value::as_bool) == Some(true) {
            ", ours with gradient checkpointing"
        } else {
            ""
        };
        // A selection whose timed steps did not fit its budget reports its
        // warm-up step (ours profiled and synchronised after every op).
        let warm_up = |v: Option<&Value>| {
            v.is_some_and(|v| num(v, &["steps"]) == Some(0.0) && failed(Some(v)).is_none())
        };
        let warm = match (warm_up(Some(t)), warm_up(theirs)) {
            (false, false) => "",
            (true, false) => " (eps2v: warm-up step only)",
            (false, true) => " (reference: warm-up step only)",
            (true, true) => " (warm-up steps only)",
        };
        let (ours_failed, theirs_failed) = (failed(Some(t)), failed(theirs));
        let t = if ours_failed.is_some() { None } else { Some(t) };
        let theirs = if theirs_failed.is_some() {
            None
        } else {
            theirs
        };
        let why = match (&ours_failed, &theirs_failed) {
            (None, None) => String::new(),
            (o, r) => {
                let side = |who: &str, e: &Option<String>| {
                    e.as_ref().map(|e| format!("{who} failed: {e}"))
                };
                let parts: Vec<String> = [side("eps2v", o), side("reference", r)]
                    .into_iter()
                    .flatten()
                    .collect();
                format!(" ({})", parts.join("; "))
            }
        };
        rows.push(Row::new(
            format!("train step, {name} trainable, parameters"),
            "",
            get(t, "params"),
            get(theirs, "params"),
        ));
        rows.push(Row::new(
            format!("train step, {name} trainable{recomputed}{warm}{why}"),
            "ms",
            get(t, "step_ms"),
            get(theirs, "step_ms"),
        ));
        let mem = |v: Option<&Value>| get(v, "peak_mem_mb").map(|m| m * MIB_TO_GB);
        let row = Row::new(
            format!(
                "train step, {name} trainable, peak GPU memory \
                 (AdamW moments: eps2v f32, PyTorch bf16){recomputed}"
            ),
            "GB",
            mem(t),
            mem(theirs),
        );
        rows.push(if name == "out+OUT08" {
            let met = row.ours.map(|m| m <= HEAD_STEP_MEM_TARGET_GB);
            row.target(format!("≤ {HEAD_STEP_MEM_TARGET_GB} GB"), met)
        } else {
            row
        });
        let rss = |v: Option<&Value>| get(v, "peak_rss_mb");
        if rss(t).is_some() || rss(theirs).is_some() {
            rows.push(Row::new(
                format!("train step, {name} trainable, peak RSS (CPU)"),
                "MiB",
                rss(t),
                rss(theirs),
            ));
        }
    }
    rows.extend(train_memory_rows(ours));
    rows.extend(profile_rows(ours, reference));
    let targets = rows.iter().filter(|r| r.met.is_some()).count();
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    Ok(Combined {
        rows,
        targets,
        met,
        ours: ours.clone(),
        reference: reference.clone(),
    })
}

impl Combined {
    /// Add the rows of `gpu-bench product`'s report (`product.json`): each
    /// user command on the device, passed or not, and the device-vs-CPU
    /// differences of `sample` and `diagnose uncond`. A report that is not
    /// one adds a failed row saying so.
    pub fn add_product(&mut self, product: &Value) {
        use super::product::{DIAGNOSE_VS_CPU_TARGET, SAMPLE_VS_CPU_TARGET};
        let device = product.get("device").and_then(Value::as_str).unwrap_or("?");
        match product.get("steps").and_then(Value::as_array) {
            None => self.rows.push(
                Row::new("user commands on the toy world: no report", "", None, None)
                    .target("every step passes".into(), Some(false)),
            ),
            Some(steps) => {
                for st in steps {
                    let name = st.get("name").and_then(Value::as_str).unwrap_or("?");
                    let detail = st.get("detail").and_then(Value::as_str).unwrap_or("");
                    let ok = st.get("ok").and_then(Value::as_bool);
                    self.rows.push(
                        Row::new(
                            format!("toy `{name}` ({device}): {detail}"),
                            "s",
                            num(st, &["seconds"]),
                            None,
                        )
                        .target("passes".into(), ok),
                    );
                }
            }
        }
        for (key, what, bound) in [
            (
                "sample_device_vs_cpu",
                "toy `sample` mean pixel, device vs CPU",
                SAMPLE_VS_CPU_TARGET,
            ),
            (
                "diagnose_device_vs_cpu",
                "toy `diagnose uncond` mean cosine, device vs CPU",
                DIAGNOSE_VS_CPU_TARGET,
            ),
        ] {
            let v = num(product, &[key]);
            self.rows.push(
                Row::new(what, "abs diff", v, None)
                    .target(format!("≤ {bound}"), v.map(|v| v <= bound)),
            );
        }
        self.targets = self.rows.iter().filter(|r| r.met.is_some()).count();
        self.met = self.rows.iter().filter(|r| r.met == Some(true)).count();
    }
}

/// Where our training steps' device memory went (ours only; also for a
/// step that ran out of memory, as far as it got): the memory in use after
/// each stage of the warm-up step, and the [`MEMORY_ROWS`] modules and ops
/// of its forward that left the most in use (inclusive, like the profile).
fn train_memory_rows(ours: &Value) -> Vec<Row> {
    let mut rows = Vec::new();
    for t in ours
        .get("train")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = t.get("trainable").and_then(Value::as_str).unwrap_or("?");
        for m in t
            .get("memory_after_mb")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(stage), Some(mb)) = (m.get(0).and_then(Value::as_str), m.get(1)) {
                rows.push(Row::new(
                    format!("train memory, {name}: in use after {stage}"),
                    "GB",
                    mb.as_f64().map(|m| m * MIB_TO_GB),
                    None,
                ));
            }
        }
        let mut scopes = profile_table(t.get("memory"), "retained_mb");
        scopes.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (scope, calls, mb) in scopes.into_iter().take(MEMORY_ROWS) {
            rows.push(Row::new(
                format!("train memory, {name}: forward, {scope} (calls {calls})"),
                "GB",
                Some(mb * MIB_TO_GB),
                None,
            ));
        }
    }
    rows
}

/// `(name, calls, value of field)` of each row of a list of
/// [`crate::nn::profile::ProfileRow`]s in JSON (rows without the field left out).
fn profile_table(rows: Option<&Value>, field: &str) -> Vec<(String, f64, f64)> {
    rows.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r.get("name")?.as_str()?.to_string(),
                num(r, &["calls"])?,
                num(r, &[field])?,
            ))
        })
        .collect()
}

/// How many modules and ops [`train_memory_rows`] lists per step.
const MEMORY_ROWS: usize = 12;

/// The UNet call's breakdown ([`crate::nn::profile`]; the Python side
/// times diffusers' modules and ops of the same kind), by our time, most
/// first: one call of two rows, each row inclusive of what runs inside it.
fn profile_rows(ours: &Value, reference: &Value) -> Vec<Row> {
    let mut rows = breakdown(
        ours.get("unet_check"),
        reference.get("unet_check"),
        "UNet call, profiled (synchronised after every op)",
        "profile",
        |_| true,
    );
    // At the largest batch's rows only the ops: the modules' split is
    // the two-row call's above.
    let wide = |v: &Value| v.get("unet_check").and_then(|c| c.get("wide")).cloned();
    let (mine, theirs) = (wide(ours), wide(reference));
    let n = [&mine, &theirs]
        .iter()
        .find_map(|w| w.as_ref().and_then(|w| num(w, &["rows"])));
    if let Some(n) = n {
        rows.extend(breakdown(
            mine.as_ref(),
            theirs.as_ref(),
            &format!("UNet call, {n} rows, profiled"),
            &format!("profile at {n} rows"),
            |name| name.starts_with("op "),
        ));
    }
    rows
}

/// One profiled call's rows: its wall time (`profiled_ms` of `ours` and
/// `theirs`), then each `profile` row kept by `keep`, by our time, most
/// first, then the names only the reference has.
fn breakdown(
    ours: Option<&Value>,
    theirs: Option<&Value>,
    title: &str,
    prefix: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<Row> {
    let table = |v: Option<&Value>| {
        let mut t = profile_table(v.and_then(|c| c.get("profile")), "ms");
        t.retain(|r| keep(&r.0));
        t
    };
    let (mine, their) = (table(ours), table(theirs));
    if mine.is_empty() && their.is_empty() {
        return Vec::new();
    }
    let mut names: Vec<&(String, f64, f64)> = mine.iter().collect();
    names.sort_by(|a, b| b.2.total_cmp(&a.2));
    names.extend(their.iter().filter(|t| !mine.iter().any(|m| m.0 == t.0)));
    let profiled = |v: Option<&Value>| v.and_then(|c| num(c, &["profiled_ms"]));
    let mut rows = vec![Row::new(title, "ms", profiled(ours), profiled(theirs))];
    for (name, _, _) in names {
        let get = |t: &[(String, f64, f64)]| t.iter().find(|r| &r.0 == name).map(|r| (r.1, r.2));
        let (m, t) = (get(&mine), get(&their));
        let calls = |c: Option<(f64, f64)>| c.map_or("—".to_string(), |c| format!("{}", c.0));
        rows.push(Row::new(
            format!("{prefix}: {name} (calls {} / {})", calls(m), calls(t)),
            "ms",
            m.map(|c| c.1),
            t.map(|c| c.1),
        ));
    }
    rows
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x != 0.0 && (x.abs() < 1e-2 || x.abs() >= 1e5) => format!("{x:.2e}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// The table as Markdown, with a one-line summary.
pub fn markdown(c: &Combined) -> String {
    let mut s = String::from("| metric | unit | eps2v | diffusers/PyTorch | ratio | target | met |\n|---|---|---|---|---|---|---|\n");
    for r in &c.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.metric,
            r.unit,
            fmt(r.ours),
            fmt(r.reference),
            r.ratio
                .map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "—".into()),
            r.target.as_deref().unwrap_or(""),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        ));
    }
    s.push_str(&format!("\n{} of {} targets met.\n", c.met, c.targets));
    let off: Vec<&str> = c
        .ours
        .get("kernels_off")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !off.is_empty() {
        s.push_str(&format!(
            "GPU kernels turned off during the run (ours.log says why): {}.\n",
            off.join(", ")
        ));
    }
    s
}

/// The PyTorch side's own failure, when its report says it did not run.
#[derive(Debug, Deserialize)]
struct RefError {
    error: Option<String>,
}

/// The reference report's `error` field, if any.
pub fn reference_error(reference: &Value) -> Option<String> {
    serde_json::from_value::<RefError>(reference.clone())
        .ok()
        .and_then(|e| e.error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Value {
        json!({
            "dtype": "bf16",
            "golden": [{"model": "unet", "dtype": "bf16", "max_rel": 0.01, "tolerance": 0.03, "ok": true}],
            "unet_check": {"forward_ms": 40.0, "composite_forward_ms": 48.0, "fused_vs_composite_rel_l2": 0.002},
            "sample": [
                {"batch": 1, "steps": 28, "seconds_per_image": 2.2},
                {"batch": 4, "steps": 28, "seconds_per_image": null, "skipped": "budget"}
            ],
            "train": [
                {"trainable": "out+OUT08", "step_ms": 300.0, "peak_mem_mb": 20000.0},
                {"trainable": "full", "step_ms": 900.0, "peak_mem_mb": 60000.0}
            ]
        })
    }

    #[test]
    fn rows_join_by_batch_and_selection_and_count_targets() {
        let theirs = json!({
            "unet_check": {"forward_ms": 50.0, "rel_l2": {"ours_vs_ref": 0.004, "ours_f32_vs_ref_f32": 2e-6,
                "ours_vs_ref_f32": 0.003, "ref_vs_ref_f32": 0.003}},
            "sample": [{"batch": 1, "seconds_per_image": 2.0}, {"batch": 4, "seconds_per_image": 1.5}],
            "train": [{"trainable": "full", "step_ms": 600.0, "peak_mem_mb": 50000.0},
                      {"trainable": "out+OUT08", "step_ms": 200.0, "peak_mem_mb": 10000.0}]
        });
        let c = combine(&ours(), &theirs).unwrap();
        let row = |m: &str| c.rows.iter().find(|r| r.metric == m).unwrap();
        let b1 = row("sample, 28 steps, CFG, batch 1");
        assert_eq!((b1.ratio, b1.met), (Some(1.1), Some(true)));
        assert!(!markdown(&c).contains("turned off"));
        let mut off = ours();
        off["kernels_off"] = json!(["flash attention"]);
        assert!(markdown(&combine(&off, &theirs).unwrap())
            .contains("turned off during the run (ours.log says why): flash attention."));
        let b4 = row("sample, 28 steps, CFG, batch 4 (eps2v budget)");
        assert_eq!(b4.met, Some(false), "skipped counts as not met");
        // A selection timed by its warm-up step alone says so.
        let mut warm = ours();
        warm["train"][1]["steps"] = json!(0);
        let w = combine(&warm, &theirs).unwrap();
        assert!(
            w.rows
                .iter()
                .any(|r| r.metric == "train step, full trainable (eps2v: warm-up step only)"),
            "{:#?}",
            w.rows
        );
        assert_eq!(row("train step, full trainable").ratio, Some(1.5));
        let head_mem = c
            .rows
            .iter()
            .find(|r| {
                r.metric
                    .starts_with("train step, out+OUT08 trainable, peak GPU memory")
            })
            .unwrap();
        // The memory rows say what differs between the two sides.
        let full_mem = c
            .rows
            .iter()
            .find(|r| {
                r.metric
                    .starts_with("train step, full trainable, peak GPU memory")
            })
            .unwrap();
        assert!(
            full_mem.metric.contains("moments: eps2v f32, PyTorch bf16"),
            "{}",
            full_mem.metric
        );
        assert!((head_mem.ours.unwrap() - 20.97152).abs() < 1e-9);
        assert_eq!(head_mem.met, Some(true));
        assert_eq!(
            row("UNet rel. L2 error, ours bf16 vs diffusers bf16").met,
            Some(true)
        );
        let ab = row("UNet call, fused device forms off (composites)");
        assert_eq!(ab.ratio, Some(0.96));
        assert_eq!(
            row("UNet output, fused forms vs composites, rel. L2").met,
            Some(true)
        );
        assert_eq!((c.targets, c.met), (7, 6));
        let md = markdown(&c);
        assert!(md.contains("| sample, 28 steps, CFG, batch 1 | s/image | 2.200 | 2.000 | 1.10× | ratio ≤ 1.15 | yes |"), "{md}");
        assert!(md.contains("6 of 7 targets met"));
    }

    /// A failed step (out of memory) reports no numbers of ours, and why;
    /// the breakdown joins by name, ours most first, then names only the
    /// reference has; no cell holds a `|`.
    #[test]
    fn failed_steps_and_the_breakdown() {
        let mut o = ours();
        o["train"][1] = json!({"trainable": "full", "params": 0, "step_ms": null, "steps": 0,
            "error": "tensor: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")\n   0: <unknown>"});
        o["unet_check"]["profiled_ms"] = json!(60.0);
        o["unet_check"]["profile"] = json!([
            {"name": "op conv2d", "calls": 4, "ms": 10.0},
            {"name": "unet resblock", "calls": 2, "ms": 30.0}]);
        let theirs = json!({
            "unet_check": {"forward_ms": 50.0, "profiled_ms": 55.0, "profile": [
                {"name": "op conv2d", "calls": 4, "ms": 5.0},
                {"name": "op upsample", "calls": 1, "ms": 1.0}]},
            "train": [{"trainable": "full", "params": 9, "step_ms": 600.0, "peak_mem_mb": 50000.0}]
        });
        let c = combine(&o, &theirs).unwrap();
        let row = |m: &str| c.rows.iter().find(|r| r.metric == m).unwrap();
        let step = row("train step, full trainable (eps2v failed: tensor: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\"))");
        assert_eq!(
            (step.ours, step.reference, step.ratio),
            (None, Some(600.0), None)
        );
        let params = row("train step, full trainable, parameters");
        assert_eq!((params.ours, params.ratio), (None, None));
        let names: Vec<&str> = c
            .rows
            .iter()
            .filter(|r| r.metric.starts_with("profile: "))
            .map(|r| r.metric.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "profile: unet resblock (calls 2 / —)",
                "profile: op conv2d (calls 4 / 4)",
                "profile: op upsample (calls — / 1)"
            ]
        );
        assert_eq!(row("profile: op conv2d (calls 4 / 4)").ratio, Some(2.0));
        // No wide call on either side: no wide rows.
        assert!(!c.rows.iter().any(|r| r.metric.contains("8 rows")));

        // The largest batch's call: its time, and only the ops' rows.
        o["unet_check"]["wide"] = json!({"rows": 8, "forward_ms": 300.0, "profiled_ms": 400.0,
            "profile": [{"name": "op conv2d", "calls": 4, "ms": 40.0},
                        {"name": "unet resblock", "calls": 2, "ms": 120.0}]});
        let mut theirs = theirs;
        theirs["unet_check"]["wide"] = json!({"rows": 8, "forward_ms": 150.0, "profiled_ms": 200.0,
            "profile": [{"name": "op conv2d", "calls": 4, "ms": 20.0}]});
        let c = combine(&o, &theirs).unwrap();
        let row = |m: &str| c.rows.iter().find(|r| r.metric == m).unwrap();
        assert_eq!(row("UNet call, 8 rows (batch 4 with CFG)").ratio, Some(2.0));
        assert_eq!(row("UNet call, 8 rows, profiled").ratio, Some(2.0));
        assert_eq!(
            row("profile at 8 rows: op conv2d (calls 4 / 4)").ratio,
            Some(2.0)
        );
        assert!(!c
            .rows
            .iter()
            .any(|r| r.metric.starts_with("profile at 8 rows: unet")));
        o["unet_check"]["wide"] = json!({"rows": 8, "forward_ms": null, "profile": [],
            "error": "tensor: out of memory"});
        let c = combine(&o, &theirs).unwrap();
        let failed = c
            .rows
            .iter()
            .find(|r| {
                r.metric.starts_with(
                    "UNet call, 8 rows (batch 4 with CFG) (eps2v failed: tensor: out of memory)",
                )
            })
            .unwrap();
        assert_eq!((failed.ours, failed.reference), (None, Some(150.0)));
        let md = markdown(&c);
        assert!(
            md.lines()
                .filter(|l| l.starts_with('|'))
                .all(|l| l.matches('|').count() == 8),
            "{md}"
        );
    }

    #[test]
    fn a_missing_reference_leaves_its_columns_empty() {
        let c = combine(&ours(), &Value::Null).unwrap();
        assert!(c
            .rows
            .iter()
            .all(|r| r.reference.is_none() && r.ratio.is_none()));
        assert_eq!(c.rows[0].met, Some(false));
        assert_eq!(
            reference_error(&json!({"error": "no torch"})).as_deref(),
            Some("no torch")
        );
        assert_eq!(reference_error(&Value::Null), None);
    }
}
