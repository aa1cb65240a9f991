//! The run's report: `runs/<id>/report/index.html`, a static page that
//! opens from disk with no network (inline CSS, no scripts, every picture a
//! PNG beside it, relative links only). It shows the adherence table with
//! each model's evaluation grid, the training curves (plotted with
//! [`crate::report::plot`]) and grid, the merge sweep with its retention
//! scores and grids, the dataset's statistics (items by status, drops by
//! reason, alignment histogram, buckets) and the stage timings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::config::RunConfig;
use super::{Progress, STAGES};
use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::report::plot::{self, Panel};
use crate::Result;

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// Copy `src` into the report folder as `name` when it exists; the name
/// to link, or `None`.
fn bring(src: &Path, dir: &Path, name: &str) -> Result<Option<String>> {
    if !src.is_file() {
        return Ok(None);
    }
    let dst = dir.join(name);
    std::fs::copy(src, &dst).at(&dst)?;
    Ok(Some(name.to_string()))
}

/// Rows of `sql` as `(text, count)`.
fn counts(m: &Manifest, sql: &str) -> Result<Vec<(String, i64)>> {
    let mut st = m.conn().prepare(sql).map_err(|e| m.err(e))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                r.get(1)?,
            ))
        })
        .map_err(|e| m.err(e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| m.err(e))?;
    Ok(rows)
}

/// A table of `(label, count)` rows with proportional bars.
fn bar_table(title: &str, rows: &[(String, i64)]) -> String {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let mut h = format!(
        "<table><tr><th>{}</th><th>count</th><th></th></tr>",
        esc(title)
    );
    if rows.is_empty() {
        h.push_str("<tr><td colspan=3>none</td></tr>");
    }
    for (k, v) in rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=n>{v}</td><td><div class=bar style=\"width:{}px\"></div></td></tr>",
            esc(k),
            (240 * v / max).max(1)
        );
    }
    h.push_str("</table>");
    h
}

/// Write the page (and its pictures) into `dir`; returns the page's path.
pub fn write(
    m: &Manifest,
    cfg: &RunConfig,
    run_id: i64,
    p: &Progress,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).at(dir)?;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>eps2v run {run_id}</h1><p>dataset <code>{}</code> · base model <code>{}</code> · eps2v {}</p>",
        esc(&cfg.dataset.display().to_string()),
        esc(&cfg.model_path().display().to_string()),
        env!("CARGO_PKG_VERSION")
    );

    // --- adherence ----------------------------------------------------------
    if let Some(e) = p.stages.get("evaluate") {
        body.push_str("<h2>Prompt adherence</h2><p>What the tagger reads in the samples against what each prompt asks (same prompts and seeds for every model). Toy world: share of images with the count, the shape kinds, the shape colours and the background read right, and their mean (the measure of <code>eps2v toy eval</code>); other taggers: share of each prompt's tags seen. Grids: one row per prompt, one column per seed. Retention: shape retention against the base model's own samples, on the merge sweep's samples (the converted model's on training's last evaluation when no sweep ran).</p>");
        let attrs: Vec<String> = e
            .scores
            .iter()
            .flat_map(|s| s.adherence.per_attribute.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        body.push_str("<table><tr><th>model</th><th>sampled as</th><th>adherence</th>");
        for a in &attrs {
            let _ = write!(body, "<th>{}</th>", esc(a));
        }
        body.push_str("<th>has shapes</th><th>retention</th></tr>");
        for s in &e.scores {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}{}</td><td class=n><b>{}</b></td>",
                esc(&s.label),
                esc(&s.prediction),
                if s.ztsnr { " + ZTSNR" } else { "" },
                pct(s.adherence.overall)
            );
            for a in &attrs {
                let _ = write!(
                    body,
                    "<td class=n>{}</td>",
                    s.adherence
                        .per_attribute
                        .get(a)
                        .map_or("-".into(), |x| pct(*x))
                );
            }
            let _ = write!(
                body,
                "<td class=n>{}</td><td class=n>{}</td></tr>",
                s.adherence.has_shapes.map_or("-".into(), pct),
                s.retention.map_or("-".into(), |r| format!("{r:.3}"))
            );
        }
        body.push_str("</table><div class=grids>");
        for s in e
            .scores
            .iter()
            .filter(|s| !s.grid.is_empty() && dir.join(&s.grid).is_file())
        {
            let _ = write!(
                body,
                "<figure><figcaption>{}</figcaption><img src=\"{}\" alt=\"{}\"></figure>",
                esc(&s.label),
                esc(&s.grid),
                esc(&s.label)
            );
        }
        body.push_str("</div>");
    }

    // --- training -------------------------------------------------------------
    if let Some(t) = p.stages.get("train") {
        body.push_str("<h2>Training</h2>");
        let _ = write!(body, "<p>{}</p>", esc(&t.summary));
        if let Some(id) = t.train_run {
            let rdir = crate::train::run_dir(m.root(), id);
            let rows = crate::train::log::read(&rdir.join("log.csv")).unwrap_or_default();
            let series = |f: &dyn Fn(&crate::train::log::Row) -> Option<f64>| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter_map(|r| f(r).map(|y| (r.step as f64, y)))
                    .collect()
            };
            let panels = vec![
                Panel {
                    title: "training loss".into(),
                    series: vec![("loss".into(), series(&|r| r.loss))],
                    log_y: true,
                },
                Panel {
                    title: "validation loss".into(),
                    series: vec![("val loss".into(), series(&|r| r.val_loss))],
                    log_y: false,
                },
                Panel {
                    title: "shape retention vs the base model".into(),
                    series: vec![("retention".into(), series(&|r| r.retention))],
                    log_y: false,
                },
                Panel {
                    title: "learning rate".into(),
                    series: vec![("lr".into(), series(&|r| r.lr))],
                    log_y: false,
                },
            ];
            plot::write_png(&dir.join("train-curves.png"), &panels, 800, 220)?;
            body.push_str("<img src=\"train-curves.png\" alt=\"training curves\">");
            if let Some(g) = bring(&rdir.join("eval").join("grid.png"), dir, "train-grid.png")? {
                let _ = write!(
                    body,
                    "<h3>Evaluation grid during training</h3><p>Rows: prompt × seed; columns: the base model, then each evaluation.</p><img src=\"{g}\" alt=\"training grid\">"
                );
            }
        }
        if !t.retention.is_empty() {
            body.push_str("<table><tr><th>step</th><th>retention</th></tr>");
            for (s, r) in &t.retention {
                let _ = write!(body, "<tr><td class=n>{s}</td><td class=n>{r:.3}</td></tr>");
            }
            body.push_str("</table>");
        }
    }

    // --- merges -------------------------------------------------------------
    if let Some(sweep) = p.stages.get("merge").and_then(|r| r.sweep.as_ref()) {
        body.push_str("<h2>Merge sweep</h2><p>(1 − α)·converted + α·base; retention against the base model's own samples. Grids: base column, then the merge.</p><table><tr><th>α</th><th>retention</th><th>file</th></tr>");
        if let Some(r) = sweep
            .a_retention
            .filter(|_| !sweep.points.iter().any(|p| p.alpha == 0.0))
        {
            let converted = p.stages.get("train").and_then(|t| t.converted.as_ref());
            let _ = write!(
                body,
                "<tr><td class=n>0 (unmerged)</td><td class=n>{r:.3}</td><td><code>{}</code></td></tr>",
                converted.map_or(String::new(), |c| esc(&c.display().to_string()))
            );
        }
        for pt in &sweep.points {
            let _ = write!(
                body,
                "<tr><td class=n>{}</td><td class=n>{:.3}</td><td><code>{}</code></td></tr>",
                pt.alpha,
                pt.retention,
                esc(&pt.out.display().to_string())
            );
        }
        body.push_str("</table><div class=grids>");
        for pt in &sweep.points {
            if let Some(g) = bring(&pt.grid, dir, &format!("merge-a{}.png", pt.alpha))? {
                let _ = write!(
                    body,
                    "<figure><figcaption>α = {a}</figcaption><img src=\"{g}\" alt=\"merge α {a}\"></figure>",
                    a = pt.alpha
                );
            }
        }
        body.push_str("</div>");
    }

    // --- dataset --------------------------------------------------------------
    body.push_str("<h2>Dataset</h2><div class=grids>");
    body.push_str(&bar_table(
        "items by status",
        &counts(
            m,
            "SELECT status, COUNT(*) FROM items GROUP BY status ORDER BY status",
        )?,
    ));
    let drops = counts(
        m,
        "SELECT CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END AS r, COUNT(*)
         FROM items WHERE status <> 'ok' GROUP BY r ORDER BY COUNT(*) DESC",
    )?;
    body.push_str(&bar_table("drops by reason", &drops));
    let hist = counts(
        m,
        "SELECT printf('%.1f–%.1f', MIN(CAST(alignment * 10 AS INTEGER), 9) / 10.0, MIN(CAST(alignment * 10 AS INTEGER), 9) / 10.0 + 0.1) AS b, COUNT(*)
         FROM tagging WHERE alignment IS NOT NULL GROUP BY b ORDER BY b",
    )?;
    body.push_str(&bar_table("alignment (tagger vs prompt)", &hist));
    let buckets = counts(
        m,
        "SELECT b.bucket_w || '×' || b.bucket_h AS k, COUNT(*) FROM buckets b JOIN items i ON i.id = b.item_id
         WHERE i.status = 'ok' GROUP BY k ORDER BY COUNT(*) DESC",
    )?;
    body.push_str(&bar_table("buckets (kept items)", &buckets));
    body.push_str("</div>");

    // --- stages -----------------------------------------------------------------
    body.push_str("<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>result</th></tr>");
    let by: BTreeMap<&str, _> = p.stages.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for s in STAGES.iter().filter(|s| by.contains_key(*s)) {
        let r = by[s];
        let _ = write!(
            body,
            "<tr><td>{s}</td><td class=n>{:.1}</td><td>{}</td></tr>",
            r.seconds,
            esc(&r.summary)
        );
    }
    body.push_str("</table>");

    let page = format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>eps2v run {run_id}</title><style>\
body{{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}}\
table{{border-collapse:collapse;margin:1em 1em 1em 0;vertical-align:top}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}td.n{{text-align:right;white-space:nowrap}}\
.bar{{background:#4a7fc1;height:10px}}.grids{{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}}\
figure{{margin:0}}figcaption{{font-weight:bold;margin-bottom:.3em}}img{{image-rendering:pixelated;max-width:100%}}code{{font-size:90%}}\
</style></head><body>\n{body}\n</body></html>\n"
    );
    let path = dir.join("index.html");
    crate::pipeline::sample::write_atomic(&path, page.as_bytes())?;
    Ok(path)
}

/// Every `src="…"` / `href="…"` target of an HTML page.
pub fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            if let Some(j) = rest.find('"') {
                out.push(rest[..j].to_string());
                rest = &rest[j..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_escaping() {
        let h = "<img src=\"a.png\"><a href=\"b/c.html\">x</a><img src=\"d.png\">";
        assert_eq!(links(h), vec!["a.png", "d.png", "b/c.html"]);
        assert_eq!(esc("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
