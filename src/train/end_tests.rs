//! Tests of how a training run ends and what it exports: `--stop-below`
//! exports described by their own step, the base's EMA copy left out, a
//! broken evaluation render as divergence, a pipe as the base.

use candle_core::{DType, Device, Tensor};

use super::config::TrainConfig;
use super::tests::{quick, run};
use super::*;
use crate::models::sdxl::checkpoint::Checkpoint;

/// With `stop_below`, the export's metadata, the report and the summary
/// describe the checkpoint exported (the last good step), not the step
/// that fell below; a threshold never reached is said.
#[test]
fn a_stop_below_export_is_described_by_its_own_step() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let cfg = |stop: Option<f64>, out: &str| TrainConfig {
        lr: 3e-2,
        eval_every: 1,
        save_every: 0,
        stop_below: stop,
        out: Some(d.path().join(out)),
        ..quick(&ck, 8)
    };
    // The retention series of the same run without a stop.
    let r = run(
        &ds,
        &cfg(None, "free.safetensors"),
        &TrainOptions::default(),
    )
    .unwrap();
    let series: Vec<(usize, f64)> = r
        .retention
        .iter()
        .copied()
        .filter(|(s, _)| *s > 0)
        .collect();
    assert!(r.warnings.iter().all(|w| !w.contains("never armed")));
    // A threshold between the best score and the lowest after it: it arms
    // at the first evaluation reaching it and stops at the next below it.
    let best = series
        .iter()
        .copied()
        .fold((0, f64::MIN), |b, p| if p.1 > b.1 { p } else { b });
    let low = series
        .iter()
        .filter(|(s, _)| *s > best.0)
        .map(|p| p.1)
        .fold(f64::MAX, f64::min);
    assert!(low < best.1, "retention never falls: {series:?}");
    let x = (best.1 + low) / 2.0;
    let arm = series.iter().position(|p| p.1 >= x).unwrap();
    let fall = arm + series[arm..].iter().position(|p| p.1 < x).unwrap();
    let fall_at = series[fall].0;
    let (good_step, good_score) = series[arm..fall]
        .iter()
        .copied()
        .rfind(|p| p.1 >= x)
        .unwrap();
    let r = run(
        &ds,
        &cfg(Some(x), "stop.safetensors"),
        &TrainOptions::default(),
    )
    .unwrap();
    assert!(r.stopped_early.is_some(), "{series:?} x {x}");
    assert_eq!(r.steps, fall_at);
    assert_eq!(r.exported_step, Some(good_step), "{series:?} x {x}");
    assert_eq!(r.exported_retention, Some(good_score));
    let meta: serde_json::Value = serde_json::from_str(
        &Checkpoint::open(d.path().join("stop.safetensors"))
            .unwrap()
            .metadata()["eps2v.train"],
    )
    .unwrap();
    assert_eq!(meta["steps"], good_step);
    assert_eq!(meta["retention"], good_score);
    // Above every score: never armed, the last weights go out, and it is said.
    let r = run(
        &ds,
        &cfg(Some(0.99), "never.safetensors"),
        &TrainOptions::default(),
    )
    .unwrap();
    assert!(r.stopped_early.is_none());
    assert_eq!(r.exported_step, Some(8));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("--stop-below 0.99 never armed")),
        "{:?}",
        r.warnings
    );
}

/// A base's EMA copy of its UNet (`model_ema.*`) is the unconverted model:
/// the export leaves it out (it kept ~5 GB of eps weights in a v file).
#[test]
fn the_export_leaves_out_the_bases_ema_copy() {
    use crate::models::sdxl::checkpoint::SaveOptions;
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let base = Checkpoint::open(&ck).unwrap();
    let mut tensors: Vec<(String, Tensor)> = base
        .entries()
        .keys()
        .map(|k| (k.clone(), base.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    tensors.push((
        "model_ema.diffusion_modelout2weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    ));
    tensors.push((
        "model_ema.decay".into(),
        Tensor::new(&[0.999f32], &Device::Cpu).unwrap(),
    ));
    let with_ema = d.path().join("with_ema.safetensors");
    crate::models::sdxl::checkpoint::save_tensors(&with_ema, &tensors, &SaveOptions::default())
        .unwrap();
    let out = d.path().join("v.safetensors");
    let cfg = TrainConfig {
        out: Some(out.clone()),
        ..quick(&with_ema, 1)
    };
    run(&ds, &cfg, &TrainOptions::default()).unwrap();
    let got = Checkpoint::open(&out).unwrap();
    assert!(!got.entries().keys().any(|k| k.starts_with("model_ema.")));
    // Everything else is there.
    let keys = |c: &Checkpoint| -> Vec<String> {
        c.entries()
            .keys()
            .filter(|k| !crate::models::sdxl::checkpoint::is_marker_key(k))
            .filter(|k| !k.starts_with("model_ema."))
            .cloned()
            .collect()
    };
    assert_eq!(keys(&got), keys(&Checkpoint::open(&with_ema).unwrap()));
}

/// Weights blown up with finite losses (the NaN guard does not see them)
/// break the evaluation's renders: said as divergence with what to do,
/// not as a prediction-type problem.
#[test]
fn a_broken_evaluation_render_is_reported_as_divergence() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let cfg = TrainConfig {
        lr: 50.0,
        max_grad_norm: 0.0,
        eval_every: 1,
        ..quick(&ck, 10)
    };
    let e = run(&ds, &cfg, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("training diverged by step ") && e.contains("lower the learning rate"),
        "{e}"
    );
    assert!(!e.contains("--prediction"), "{e}");
}

/// A pipe given as the base is refused by name (hashing it waited forever).
#[cfg(unix)]
#[test]
fn a_pipe_as_the_base_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (ds, _) = super::testkit::dataset(d.path()).unwrap();
    let fifo = d.path().join("fifo.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = run(&ds, &quick(&fifo, 1), &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}
