//! The user's commands on the device (`eps2v gpu-bench product`): the
//! stages one by one on the embedded toy world with `--device` (each
//! command's default precision there; the probe image also in the one
//! given), each run as its own `eps2v` process exactly as a user
//! types it, with its `--json` report checked — generate → caption →
//! dedupe → bucket → train → sample (the converted model) → merge sweep,
//! plus `sample` and `diagnose uncond` of the toy base on the device and
//! on the CPU, whose outputs are compared. The timing benchmark
//! ([`super::run`]) measures SDXL-sized kernels; this checks that what
//! users run works on the device end to end.
//!
//! Each step is bounded by what is left of the budget (killed past it).
//! A step whose input is missing (a failed earlier step) is skipped, not
//! run. The report is written after every step, so a run killed from
//! outside keeps the steps done.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// Settings of `gpu-bench product`.
#[derive(Debug, Clone)]
pub struct ProductConfig {
    /// The eps2v binary the steps run (the current one in the CLI).
    pub bin: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// A `--precision` to render the probe image in too, beside each
    /// command's default (e.g. f16 on CUDA, whose VAE decode must stay
    /// finite).
    pub precision: Option<String>,
    /// Work folder (the dataset, models and images go here); emptied
    /// first when this step made it, refused when it holds other files.
    pub work: PathBuf,
    /// Report to write (JSON).
    pub out: PathBuf,
    /// Seconds for all steps together.
    pub budget_s: f64,
}

/// One step of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Short name (`generate`, `sample cpu`, …).
    pub name: String,
    /// The command line after `eps2v --json`.
    pub args: Vec<String>,
    /// Exit code (`None`: killed, or not run).
    pub code: Option<i32>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The checks on its report passed.
    pub ok: bool,
    /// What was checked or what went wrong.
    pub detail: String,
}

/// What `gpu-bench product` writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProductReport {
    /// The device of the device steps.
    pub device: String,
    /// The extra `--precision` of the probe image (the other steps run
    /// each command's default).
    pub precision: Option<String>,
    /// The steps, in order.
    pub steps: Vec<StepReport>,
    /// Mean absolute difference of the same `sample` image rendered on the
    /// device and on the CPU, pixel values in 0–1.
    pub sample_device_vs_cpu: Option<f64>,
    /// |Δ| of `diagnose uncond`'s mean cosine, device vs CPU.
    pub diagnose_device_vs_cpu: Option<f64>,
    /// Steps run whose checks passed, of all steps.
    pub passed: usize,
    /// All steps.
    pub total: usize,
}

/// Bound of [`ProductReport::sample_device_vs_cpu`] the report calls met.
pub const SAMPLE_VS_CPU_TARGET: f64 = 0.05;
/// Bound of [`ProductReport::diagnose_device_vs_cpu`] the report calls met.
pub const DIAGNOSE_VS_CPU_TARGET: f64 = 0.02;

/// A check of a step's `--json` report: what it found, or what is wrong.
type Check = fn(&Value, &Path) -> std::result::Result<String, String>;

/// A step: name, arguments after `--json`, check, the file its check
/// looks at, and the step that must have passed first.
type Step<'a> = (&'a str, Vec<String>, Check, PathBuf, Option<&'a str>);

fn field<'a>(v: &'a Value, k: &str) -> std::result::Result<&'a Value, String> {
    v.get(k).ok_or_else(|| format!("no {k:?} in the report"))
}

fn count(v: &Value, k: &str) -> std::result::Result<u64, String> {
    field(v, k)?
        .as_u64()
        .ok_or_else(|| format!("{k:?} is not a count"))
}

fn sample_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let files = field(v, "files")?.as_array().map_or(0, Vec::len);
    let broken = field(v, "broken")?.as_array().map_or(0, Vec::len);
    if files == 0 || broken > 0 {
        return Err(format!("{files} images written, {broken} broken"));
    }
    Ok(format!("{files} images, none broken"))
}

fn generate_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let n = count(v, "rendered")?;
    let rejected = field(v, "rejected")?
        .as_object()
        .map_or(0, |r| r.values().filter_map(Value::as_u64).sum());
    if n == 0 || rejected > 0 {
        return Err(format!("{n} rendered, {rejected} rejected (NaN or blank)"));
    }
    Ok(format!("{n} rendered, none rejected"))
}

/// The toy tagger confirms this share of a toy prompt's tags in the toy
/// model's images on the CPU (0.65–0.71 at 4–8 steps); garbage images
/// (wrong layouts, NaNs turned black) score far below.
const MIN_ALIGNMENT: f64 = 0.4;

fn caption_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let n = count(v, "tagged")?;
    let a = field(v, "mean_alignment")?.as_f64().unwrap_or(f64::NAN);
    if n == 0 || a.is_nan() || a < MIN_ALIGNMENT {
        return Err(format!(
            "{n} tagged, mean alignment {a:.3} (under {MIN_ALIGNMENT}: the generated images do not show their prompts)"
        ));
    }
    Ok(format!("{n} tagged, mean alignment {a:.3}"))
}

fn dedupe_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    Ok(format!("{} kept", count(v, "kept")?))
}

fn bucket_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let n = count(v, "bucketed")?;
    if n == 0 {
        return Err("nothing bucketed".into());
    }
    Ok(format!("{n} bucketed"))
}

fn train_check(v: &Value, out: &Path) -> std::result::Result<String, String> {
    let loss = field(v, "last_loss")?.as_f64().unwrap_or(f64::NAN);
    let rollbacks = count(v, "rollbacks")?;
    if !loss.is_finite() || rollbacks > 0 || !out.is_file() {
        return Err(format!(
            "loss {loss}, {rollbacks} NaN rollbacks, export {}",
            if out.is_file() { "written" } else { "missing" }
        ));
    }
    Ok(format!("{} steps, loss {loss:.4}", count(v, "steps")?))
}

fn merge_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let r = field(v, "best_retention")?.as_f64().unwrap_or(f64::NAN);
    if !r.is_finite() {
        return Err(format!("retention {r}"));
    }
    Ok(format!("best retention {r:.3}"))
}

fn diagnose_check(v: &Value, _: &Path) -> std::result::Result<String, String> {
    let c = field(v, "mean_cosine")?.as_f64().unwrap_or(f64::NAN);
    if !c.is_finite() {
        return Err(format!("mean cosine {c}"));
    }
    Ok(format!(
        "verdict {}, mean cosine {c:.4}",
        v.get("verdict").and_then(Value::as_str).unwrap_or("?")
    ))
}

/// Run `bin --json args` with `left` seconds at most; `(code, stdout,
/// seconds)`, code `None` when killed. Its stderr goes to `log`.
fn spawn(bin: &Path, args: &[String], left: f64, log: &Path) -> Result<(Option<i32>, String, f64)> {
    let t0 = Instant::now();
    let err = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    let stdout_path = log.with_extension("json");
    let out = std::fs::File::create(&stdout_path).map_err(|e| Error::io(&stdout_path, e))?;
    let mut child = Command::new(bin)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| Error::Other(format!("{}: cannot start: {e}", bin.display())))?;
    let deadline = t0 + Duration::from_secs_f64(left.max(0.0));
    let code = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(|e| Error::Other(format!("{}: {e}", bin.display())))?
        {
            break s.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    Ok((code, stdout, t0.elapsed().as_secs_f64()))
}

/// Mean absolute difference of two 8-bit images' pixels, in 0–1.
fn image_difference(a: &Path, b: &Path) -> Result<f64> {
    let open = |p: &Path| {
        image::open(p)
            .map(|i| i.to_rgb8())
            .map_err(|e| Error::Other(format!("{}: {e}", p.display())))
    };
    let (a, b) = (open(a)?, open(b)?);
    if a.dimensions() != b.dimensions() {
        return Err(Error::Other(format!(
            "the device and CPU images differ in size: {:?} vs {:?}",
            a.dimensions(),
            b.dimensions()
        )));
    }
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    Ok(sum as f64 / (a.as_raw().len().max(1) as f64 * 255.0))
}

/// The first file a `sample` report lists.
fn first_file(v: &Value) -> Option<PathBuf> {
    v.get("files")?
        .as_array()?
        .first()?
        .as_str()
        .map(PathBuf::from)
}

/// Run the chain; `say` gets one line per step.
pub fn run(cfg: &ProductConfig, say: &mut dyn FnMut(&str)) -> Result<ProductReport> {
    let t0 = Instant::now();
    let w = &cfg.work;
    // Emptied first, but only a folder this step made (its marker file
    // inside) or an empty one: --work must not take a user's folder.
    let marker = w.join(".eps2v-gpu-bench-product");
    if w.exists() {
        let empty = std::fs::read_dir(w)
            .map_err(|e| Error::io(w, e))?
            .next()
            .is_none();
        if !empty && !marker.is_file() {
            return Err(Error::config(format!(
                "gpu-bench product --work {}: the folder holds files this step did not write; give a new or empty folder",
                w.display()
            )));
        }
        std::fs::remove_dir_all(w).map_err(|e| Error::io(w, e))?;
    }
    std::fs::create_dir_all(w).map_err(|e| Error::io(w, e))?;
    std::fs::write(&marker, b"").map_err(|e| Error::io(&marker, e))?;
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let ds = s(w.join("ds"));
    let converted = w.join("converted.safetensors");
    let base = crate::toy::default_model_path()?;
    let dev = vec!["--device".to_string(), cfg.device.clone()];
    let cpu = vec!["--device".to_string(), "cpu".to_string()];
    let with = |head: &[&str], tail: &[String]| -> Vec<String> {
        head.iter()
            .map(|a| a.to_string())
            .chain(tail.iter().cloned())
            .collect()
    };
    // One image, a non-ancestral sampler: the device and the CPU render
    // the same noise the same way, so their images can be compared.
    fn probe(out: &str) -> Vec<&str> {
        vec![
            "sample",
            "--prompt",
            "red circle, blue square",
            "--seed",
            "7",
            "--steps",
            "12",
            "--sampler",
            "euler",
            "--out",
            out,
        ]
    }
    let (sample_dev, sample_cpu) = (s(w.join("sample-device")), s(w.join("sample-cpu")));
    let merged = s(w.join("sweep/m.safetensors"));
    // (name, args, check, output file its check looks at, needs step)
    let sample_prec = s(w.join("sample-precision"));
    let mut steps: Vec<Step> = vec![
        (
            "sample",
            with(&probe(&sample_dev), &dev),
            sample_check,
            PathBuf::new(),
            None,
        ),
        (
            "sample cpu",
            with(&probe(&sample_cpu), &cpu),
            sample_check,
            PathBuf::new(),
            None,
        ),
        (
            "diagnose uncond",
            with(&["diagnose", "uncond"], &dev),
            diagnose_check,
            PathBuf::new(),
            None,
        ),
        (
            "diagnose uncond cpu",
            with(&["diagnose", "uncond"], &cpu),
            diagnose_check,
            PathBuf::new(),
            None,
        ),
        (
            "generate",
            with(&["generate", &ds, "--count", "8", "--steps", "8"], &dev),
            generate_check,
            PathBuf::new(),
            None,
        ),
        (
            "caption",
            with(&["caption", &ds], &dev),
            caption_check,
            PathBuf::new(),
            Some("generate"),
        ),
        (
            "dedupe",
            with(&["dedupe", &ds], &[]),
            dedupe_check,
            PathBuf::new(),
            Some("caption"),
        ),
        (
            "bucket",
            with(&["bucket", &ds], &[]),
            bucket_check,
            PathBuf::new(),
            Some("dedupe"),
        ),
        (
            "train",
            with(
                &[
                    "train",
                    &ds,
                    "--steps",
                    "4",
                    "--eval-every",
                    "2",
                    "--out",
                    &s(converted.clone()),
                ],
                &dev,
            ),
            train_check,
            converted.clone(),
            Some("bucket"),
        ),
        (
            "sample converted",
            with(
                &[
                    "sample",
                    "--model",
                    &s(converted.clone()),
                    "--prompt",
                    "green star",
                    "--steps",
                    "8",
                    "--batch",
                    "2",
                    "--out",
                    &s(w.join("sample-converted")),
                ],
                &dev,
            ),
            sample_check,
            PathBuf::new(),
            Some("train"),
        ),
        (
            "merge sweep",
            with(
                &[
                    "merge",
                    &s(converted.clone()),
                    &s(base.clone()),
                    "--sweep",
                    "0.5",
                    "--markers",
                    "a",
                    "--eval-seeds",
                    "0",
                    "--eval-steps",
                    "4",
                    "--out",
                    &merged,
                ],
                &[],
            ),
            merge_check,
            PathBuf::new(),
            Some("train"),
        ),
    ];
    if let Some(p) = &cfg.precision {
        let mut args = dev.clone();
        args.extend(["--precision".to_string(), p.clone()]);
        steps.insert(
            1,
            (
                "sample precision",
                with(&probe(&sample_prec), &args),
                sample_check,
                PathBuf::new(),
                None,
            ),
        );
    }
    let mut report = ProductReport {
        device: cfg.device.clone(),
        precision: cfg.precision.clone(),
        total: steps.len(),
        ..Default::default()
    };
    let mut outputs: std::collections::HashMap<&str, Value> = Default::default();
    for (name, args, check, file, needs) in steps {
        let left = cfg.budget_s - t0.elapsed().as_secs_f64();
        let mut step = StepReport {
            name: name.to_string(),
            args: args.clone(),
            code: None,
            seconds: 0.0,
            ok: false,
            detail: String::new(),
        };
        if let Some(n) = needs.filter(|n| !report.steps.iter().any(|s| s.name == *n && s.ok)) {
            step.detail = format!("skipped: {n} did not pass");
        } else if left <= 0.0 {
            step.detail = "skipped: out of time".into();
        } else {
            let log = w.join(format!("{}.log", name.replace(' ', "-")));
            let (code, stdout, seconds) = spawn(&cfg.bin, &args, left, &log)?;
            step.code = code;
            step.seconds = seconds;
            match (code, serde_json::from_str::<Value>(&stdout)) {
                (None, _) => step.detail = format!("killed after {seconds:.0}s (out of time)"),
                (Some(c), Ok(v)) if c == 0 || (c == 1 && name == "bucket") => {
                    match check(&v, &file) {
                        Ok(d) => (step.ok, step.detail) = (true, d),
                        Err(d) => step.detail = d,
                    }
                    outputs.insert(name, v);
                }
                (Some(c), _) => {
                    let err = std::fs::read_to_string(&log).unwrap_or_default();
                    let last = err
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    step.detail = format!("exit {c}: {last}");
                }
            }
        }
        say(&format!(
            "{:<20} {:>6.1}s  {}  {}",
            step.name,
            step.seconds,
            if step.ok { "ok  " } else { "FAIL" },
            step.detail
        ));
        report.passed += usize::from(step.ok);
        report.steps.push(step);
        super::run::write_json(&cfg.out, &report)?;
    }
    let (a, b) = (outputs.get("sample"), outputs.get("sample cpu"));
    if let (Some(a), Some(b)) = (a.and_then(first_file), b.and_then(first_file)) {
        report.sample_device_vs_cpu = Some(image_difference(&a, &b)?);
    }
    let cos = |n: &str| outputs.get(n)?.get("mean_cosine")?.as_f64();
    if let (Some(a), Some(b)) = (cos("diagnose uncond"), cos("diagnose uncond cpu")) {
        report.diagnose_device_vs_cpu = Some((a - b).abs());
    }
    super::run::write_json(&cfg.out, &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_checks_fail_on_what_a_broken_device_path_reports() {
        let none = Path::new("");
        assert!(sample_check(&json!({"files": ["a.png"], "broken": []}), none).is_ok());
        assert!(sample_check(&json!({"files": ["a.png"], "broken": [0]}), none).is_err());
        assert!(sample_check(&json!({"files": [], "broken": []}), none).is_err());
        assert!(generate_check(&json!({"rendered": 8, "rejected": {}}), none).is_ok());
        let nan = json!({"rendered": 7, "rejected": {"nan_latent": 1}});
        assert!(generate_check(&nan, none).is_err());
        let seen = json!({"tagged": 8, "mean_alignment": 0.7});
        assert!(caption_check(&seen, none).is_ok());
        let garbage = json!({"tagged": 8, "mean_alignment": 0.1});
        assert!(caption_check(&garbage, none)
            .unwrap_err()
            .contains("do not show"));
        assert!(caption_check(&json!({"tagged": 8, "mean_alignment": null}), none).is_err());
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.safetensors");
        let fine = json!({"last_loss": 0.5, "rollbacks": 0, "steps": 4});
        assert!(train_check(&fine, &out).unwrap_err().contains("missing"));
        std::fs::write(&out, b"x").unwrap();
        assert!(train_check(&fine, &out).is_ok());
        let nan = json!({"last_loss": null, "rollbacks": 0, "steps": 4});
        assert!(train_check(&nan, &out).is_err());
        let rolled = json!({"last_loss": 0.5, "rollbacks": 1, "steps": 4});
        assert!(train_check(&rolled, &out).is_err());
        assert!(merge_check(&json!({"best_retention": null}), none).is_err());
        assert!(diagnose_check(&json!({"mean_cosine": 0.5, "verdict": "same"}), none).is_ok());
        assert!(field(&json!({}), "rendered").is_err());
    }

    #[test]
    fn image_difference_is_the_mean_absolute_pixel_difference() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            d.path().join("a.png"),
            d.path().join("b.png"),
            d.path().join("c.png"),
        );
        image::RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30]))
            .save(&a)
            .unwrap();
        image::RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 81]))
            .save(&b)
            .unwrap();
        image::RgbImage::from_pixel(2, 2, image::Rgb([0, 0, 0]))
            .save(&c)
            .unwrap();
        assert_eq!(image_difference(&a, &a).unwrap(), 0.0);
        let v = image_difference(&a, &b).unwrap();
        assert!((v - 51.0 / 3.0 / 255.0).abs() < 1e-12, "{v}");
        assert!(image_difference(&a, &c).is_err());
    }
}
