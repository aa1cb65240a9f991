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

/// Skipped steps, beside `log.csv`.
const NAN_LOG: &str = "nan.log";

/// The step of a `nan.log` line (`step N: …`).
fn nan_step(line: &str) -> Option<usize> {
    line.strip_prefix("step ")?.split(':').next()?.parse().ok()
}

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

/// Shortest form that reads back to the same `f64` (a resumed run's
/// running mean of the loss is taken from the file).
fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:e}")).unwrap_or_default()
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
        // `nan.log` beside it, numbered as the rows are (the step count a
        // step ends at): the ones past `upto_step` belong to the steps a
        // resume redoes.
        let nan = path.with_file_name(NAN_LOG);
        if nan.is_file() {
            let text = std::fs::read_to_string(&nan).at(&nan)?;
            let kept: String = text
                .lines()
                .filter(|l| nan_step(l).is_some_and(|s| s <= upto_step))
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                crate::pipeline::sample::write_atomic(&nan, kept.as_bytes())?;
            }
        }
        let file = OpenOptions::new().append(true).open(path).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The training losses of the last `n` logged steps, oldest first (a
    /// resumed run's running mean goes on from them).
    pub fn last_losses(&self, n: usize) -> Result<Vec<f64>> {
        let losses: Vec<f64> = read(&self.path)?.iter().filter_map(|r| r.loss).collect();
        Ok(losses[losses.len().saturating_sub(n)..].to_vec())
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
        let p = run_dir.join(NAN_LOG);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume from step 2 keeps the rows and skipped steps of the steps
    /// before it (`nan.log` numbers steps as the rows do), and the losses
    /// read back exactly.
    #[test]
    fn a_resume_drops_what_comes_after_its_step() {
        let d = tempfile::tempdir().unwrap();
        let csv_path = d.path().join("log.csv");
        let mut log = CsvLog::open(&csv_path, 0).unwrap();
        let losses = [0.1f64 / 3.0, 2.0f64.sqrt(), 1e-9 / 7.0];
        for (i, l) in losses.iter().enumerate() {
            log.step(i + 1, 0, 0, *l, 1e-4, 1.0).unwrap();
            log.nan(d.path(), i + 1, f64::NAN, 1.0, &[i as i64])
                .unwrap();
        }
        log.eval(3, Some(0.5), 0.9).unwrap();
        drop(log);
        let log = CsvLog::open(&csv_path, 2).unwrap();
        let rows = read(&csv_path).unwrap();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(log.last_losses(10).unwrap(), losses[..2]);
        assert_eq!(log.last_losses(1).unwrap(), losses[1..2]);
        let nan = std::fs::read_to_string(d.path().join(NAN_LOG)).unwrap();
        assert_eq!(
            nan.lines()
                .map(|l| nan_step(l).unwrap())
                .collect::<Vec<_>>(),
            [1, 2],
            "{nan}"
        );
    }
}
