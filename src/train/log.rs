//! The run log: `runs/<id>/log.csv` (one row per optimizer step, plus the
//! evaluations), `runs/<id>/nan.log` (skipped steps and their items), and
//! `runs/<id>/curves.png` (loss, validation loss, retention, gradient norm).
//!
//! Rows are appended and flushed as they happen; a resumed run first drops
//! the rows after the step it resumes from, so the file always describes
//! one history.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::report::plot::{write_png, Panel};
use crate::Result;

/// CSV columns.
pub const HEADER: &str = "step,stage,epoch,loss,lr,grad_norm,val_loss,retention";

/// One parsed row (empty fields are `None`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Optimizer step.
    pub step: usize,
    /// Training loss (step rows).
    pub loss: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Validation loss (evaluation rows).
    pub val_loss: Option<f64>,
    /// Retention (evaluation rows).
    pub retention: Option<f64>,
}

/// Appends rows to `log.csv`.
pub struct CsvLog {
    path: PathBuf,
    file: File,
}

fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() != 8 {
        return None;
    }
    let num = |s: &str| s.parse::<f64>().ok();
    Some(Row {
        step: f[0].parse().ok()?,
        loss: num(f[3]),
        lr: num(f[4]),
        grad_norm: num(f[5]),
        val_loss: num(f[6]),
        retention: num(f[7]),
    })
}

/// Read every row of a log.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let f = File::open(path).at(path)?;
    let mut rows = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.at(path)?;
        if let Some(r) = parse_row(&line) {
            rows.push(r);
        }
    }
    Ok(rows)
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6e}")).unwrap_or_default()
}

impl CsvLog {
    /// Open (creating it with a header), keeping only rows up to `upto_step`.
    pub fn open(path: &Path, upto_step: usize) -> Result<Self> {
        let mut kept = vec![HEADER.to_string()];
        if path.is_file() {
            let f = File::open(path).at(path)?;
            for line in BufReader::new(f).lines() {
                let line = line.at(path)?;
                if let Some(r) = parse_row(&line) {
                    if r.step <= upto_step {
                        kept.push(line);
                    }
                }
            }
        }
        let mut text = kept.join("\n");
        text.push('\n');
        crate::pipeline::sample::write_atomic(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn line(&mut self, s: String) -> Result<()> {
        writeln!(self.file, "{s}").at(&self.path)?;
        self.file.flush().at(&self.path)
    }

    /// A training step.
    pub fn step(
        &mut self,
        step: usize,
        stage: usize,
        epoch: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
    ) -> Result<()> {
        self.line(format!(
            "{step},{stage},{epoch},{},{},{},,",
            fmt(Some(loss)),
            fmt(Some(lr)),
            fmt(Some(grad_norm))
        ))
    }

    /// An evaluation.
    pub fn eval(&mut self, step: usize, val_loss: Option<f64>, retention: f64) -> Result<()> {
        self.line(format!(
            "{step},,,,,,{},{}",
            fmt(val_loss),
            fmt(Some(retention))
        ))
    }

    /// A skipped step: appended to `nan.log` beside the CSV with its items.
    pub fn nan(
        &mut self,
        run_dir: &Path,
        step: usize,
        loss: f64,
        gnorm: f64,
        items: &[i64],
    ) -> Result<()> {
        let p = run_dir.join("nan.log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .at(&p)?;
        writeln!(
            f,
            "step {step}: skipped (loss {loss}, grad norm {gnorm}); items {items:?}"
        )
        .at(&p)
    }

    /// Plot the log into `png`: loss (log scale), validation loss,
    /// retention, gradient norm.
    pub fn plot(&self, png: &Path) -> Result<()> {
        let rows = read(&self.path)?;
        let series = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
                .collect()
        };
        let panels = [
            Panel {
                title: "training loss".into(),
                series: vec![("loss".into(), series(&|r| r.loss))],
                log_y: true,
            },
            Panel {
                title: "validation loss (fixed timesteps)".into(),
                series: vec![("val".into(), series(&|r| r.val_loss))],
                log_y: false,
            },
            Panel {
                title: "shape retention vs base".into(),
                series: vec![("retention".into(), series(&|r| r.retention))],
                log_y: false,
            },
            Panel {
                title: "gradient norm (before clipping)".into(),
                series: vec![("grad norm".into(), series(&|r| r.grad_norm))],
                log_y: true,
            },
        ];
        write_png(png, &panels, 720, 220)
    }
}
