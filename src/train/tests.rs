//! Tests of `train()` on tiny SDXL-shaped checkpoints and a small dataset
//! of coloured shapes, through the real pipeline (import → bucket → train).

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{SaveDtype, TrainConfig, Weighting};
use super::*;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::stages::import::{self, ImportConfig};

/// A short config: no validation split, one eval prompt, cheap evaluation.
pub(crate) fn quick(model: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        steps,
        batch_size: 2,
        lr: 1e-4,
        val_fraction: 0.0,
        eval_every: 0,
        eval_prompt_count: 1,
        eval_seeds: vec![0],
        eval_steps: 2,
        eval_cfg: 1.0,
        save_every: 0,
        save_dtype: SaveDtype::F32,
        ..Default::default()
    }
}

/// Files under `dir`, recursively (0 when it does not exist).
fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk_count(&p)
                } else {
                    1
                }
            })
            .sum()
    })
}

pub(super) fn run(ds: &Path, cfg: &TrainConfig, opts: &TrainOptions) -> Result<TrainReport> {
    let mut m = Manifest::open(ds)?;
    train(cfg, &mut m, opts, &Ctx::quiet())
}

pub(super) fn unet_tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = Checkpoint::open(p).unwrap();
    ck.entries()
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
        .map(|k| {
            let t = ck.tensor(k, DType::F32, &Device::Cpu).unwrap();
            (k.clone(), t.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn only_selected_blocks_change_and_the_export_is_marked_v_ztsnr() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let out = d.path().join("v.safetensors");
    let cfg = TrainConfig {
        blocks: vec!["out".into(), "OUT08".into()],
        out: Some(out.clone()),
        ..quick(&ck, 3)
    };
    let r = run(&ds, &cfg, &TrainOptions::default()).unwrap();
    assert_eq!(r.steps, 3);
    assert_eq!(r.train_items, 4);
    assert_eq!(r.exported, vec![out.clone()]);
    // Frozen blocks hold no optimizer state: 8 bytes per trainable parameter.
    assert_eq!(r.optimizer_bytes, 8 * r.trainable_params);
    let base = unet_tensors(&ck);
    let new = unet_tensors(&out);
    assert_eq!(base.len(), new.len());
    let mut changed = 0;
    for ((k, a), (k2, b)) in base.iter().zip(&new) {
        assert_eq!(k, k2);
        let trained = k.contains(".out.") || k.contains(".output_blocks.8.");
        if trained {
            changed += (a != b) as usize;
        } else {
            assert!(a == b, "{k} changed but is frozen");
        }
    }
    assert!(changed > 10, "only {changed} trained tensors changed");
    // Text encoders and VAE are byte-identical copies (f32 in, f32 out).
    let (a, b) = (
        Checkpoint::open(&ck).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    for k in a.entries().keys().filter(|k| !k.starts_with("model.")) {
        let ta = a.tensor(k, DType::F32, &Device::Cpu).unwrap();
        let tb = b.tensor(k, DType::F32, &Device::Cpu).unwrap();
        let diff = (ta - tb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
    let p = b.prediction();
    assert_eq!((p.prediction.name(), p.ztsnr), ("v", true));
    assert_eq!(b.metadata()["eps2v.uncond"], "zero");
    // The run folder: log, curves, grid, checkpoints.
    let rd = &r.run_dir;
    for f in [
        "log.csv",
        "curves.png",
        "eval/grid.png",
        "eval/base/000.png",
    ] {
        assert!(rd.join(f).is_file(), "{f}");
    }
    let rows = log::read(&rd.join("log.csv")).unwrap();
    assert_eq!(rows.iter().filter(|r| r.loss.is_some()).count(), 3);
    assert_eq!(rows.iter().filter(|r| r.retention.is_some()).count(), 2);
    // The disk check: one checkpoint is what it estimated (weights and
    // AdamW moments, f32, plus the safetensors header), and the peak is
    // three of them and the export; this disk has room for them.
    assert_eq!(r.checkpoint_bytes, 12 * r.trainable_params as u64);
    let on_disk = std::fs::metadata(state::latest(rd).unwrap().unwrap())
        .unwrap()
        .len();
    assert!(
        (r.checkpoint_bytes..r.checkpoint_bytes + 200_000).contains(&on_disk),
        "{on_disk} vs {}",
        r.checkpoint_bytes
    );
    let export = std::fs::metadata(&out).unwrap().len();
    let peak = 3 * r.checkpoint_bytes + export;
    assert!(
        (peak - 500_000..=peak).contains(&r.disk_peak_bytes),
        "{} vs {peak}",
        r.disk_peak_bytes
    );
    assert!(
        !r.warnings.iter().any(|w| w.contains("disk")),
        "{:?}",
        r.warnings
    );
    // A second run encodes nothing; on a full disk it warns (and trains).
    let full = TrainOptions {
        disk_free: Some(|_| Some(1_000)),
        ..Default::default()
    };
    let r2 = run(&ds, &cfg, &full).unwrap();
    let w = r2.warnings.iter().find(|w| w.contains("more disk"));
    assert!(
        w.is_some_and(|w| w.contains("3 checkpoints of") && w.contains("0.0 MB is free")),
        "{:?}",
        r2.warnings
    );
    assert_eq!((r2.cache.latents_encoded, r2.cache.texts_encoded), (0, 0));
    assert_eq!(r2.cache.latents_cached, 4);
    assert!(r2.run_id > r.run_id);
}

/// With EMA, a block that the second stage freezes is frozen at its EMA
/// value: the weights the second stage trains around (its saved state)
/// are the ones the export writes, and they differ from the raw weights.
#[test]
fn a_block_a_later_stage_freezes_stays_at_its_ema() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let out = d.path().join("staged.safetensors");
    let stage = |blocks: &[&str]| config::StageConfig {
        blocks: blocks.iter().map(|b| b.to_string()).collect(),
        steps: 2,
        lr: Some(1e-3),
        block_lr: Default::default(),
        until_retention: None,
    };
    let cfg = TrainConfig {
        stages: vec![stage(&["OUT08", "out"]), stage(&["out"])],
        ema_decay: Some(0.5),
        out: Some(out.clone()),
        // The stages give the steps.
        steps: TrainConfig::default().steps,
        ..quick(&ck, 4)
    };
    let r = run(&ds, &cfg, &TrainOptions::default()).unwrap();
    assert_eq!(r.steps, 4);
    let saved = state::load(&state::latest(&r.run_dir).unwrap().unwrap(), &Device::Cpu).unwrap();
    let base = unet_tensors(&ck);
    let exported = unet_tensors(&out);
    let mut frozen = 0;
    for ((k, a), (_, e)) in base.iter().zip(&exported) {
        if !k.contains(".output_blocks.8.") {
            continue;
        }
        let s: Vec<f32> = saved.weights[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            &s, e,
            "{k}: stage 2 trained around other weights than the export holds"
        );
        frozen += usize::from(a != e);
    }
    assert!(
        frozen > 5,
        "OUT08 barely moved in stage 1 ({frozen} tensors)"
    );
}

#[test]
fn micro_batches_on_lanes_give_the_same_bytes() {
    // Every block (a transformer included). One lane runs the micro-batches
    // on the test's pool, three run them on one-thread pools: so this also
    // checks that the gradients do not depend on the thread count
    // (nn::kernels::SUM_PIECES).
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let cfg = TrainConfig {
        ema_decay: Some(0.9),
        grad_accum: 3,
        caption_dropout: 0.3,
        ..quick(&ck, 3)
    };
    let mut exported = Vec::new();
    for lanes in [1, 3] {
        let out = d.path().join(format!("lanes{lanes}.safetensors"));
        let r = run(
            &ds,
            &TrainConfig {
                out: Some(out.clone()),
                ..cfg.clone()
            },
            &TrainOptions {
                lanes: Some(lanes),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.lanes, lanes);
        exported.push((unet_tensors(&out), r.last_loss));
    }
    let (one, three) = (&exported[0], &exported[1]);
    assert_eq!(one.1, three.1, "the logged loss differs with lanes");
    let changed = one.0.iter().zip(&three.0).filter(|(a, b)| a != b).count();
    assert_eq!(changed, 0, "{changed} tensors differ between 1 and 3 lanes");
}

/// `gradient_checkpointing` trains the same step: the same loss, and the
/// same update of every parameter up to rounding (the gradients themselves
/// are compared in `models::sdxl::unet::recompute`). One AdamW step moves
/// each weight by about `lr · g/|g|`, so a rounding-level difference of a
/// gradient only shows where `|g|` is near AdamW's ε.
#[test]
fn gradient_checkpointing_trains_the_same_step() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let base = unet_tensors(&ck);
    let mut runs = Vec::new();
    for recompute in [false, true] {
        let out = d.path().join(format!("gc{recompute}.safetensors"));
        let cfg = TrainConfig {
            out: Some(out.clone()),
            gradient_checkpointing: recompute,
            ..quick(&ck, 1)
        };
        // Counted per thread; one micro-batch runs on this one.
        let calls = || crate::models::sdxl::unet::recompute::CALLS.with(std::cell::Cell::get);
        let before = calls();
        let r = run(&ds, &cfg, &TrainOptions::default()).unwrap();
        assert_eq!(calls() > before, recompute, "the recomputing path taken");
        runs.push((unet_tensors(&out), r.last_loss.unwrap()));
    }
    let ((plain, l0), (recomputed, l1)) = (&runs[0], &runs[1]);
    assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "loss {l0} vs {l1}");
    let lr = quick(&ck, 1).lr as f32;
    let (mut moved, mut off, mut total) = (0usize, 0usize, 0usize);
    for ((k, b), ((_, p), (_, r))) in base.iter().zip(plain.iter().zip(recomputed)) {
        moved += usize::from(b != p);
        for ((b, p), r) in b.iter().zip(p).zip(r) {
            total += 1;
            off += usize::from(((p - b) - (r - b)).abs() > 0.01 * lr);
        }
        assert_eq!(b != p, b != r, "{k}: trained in one run only");
    }
    assert!(
        moved > base.len() / 2,
        "only {moved} of {} tensors trained",
        base.len()
    );
    assert!(
        off * 1000 <= total,
        "{off} of {total} weights moved differently"
    );
}

/// A run another process is training (its lock held) is never taken
/// over: `--resume` is refused naming the holder, `resumable_run` passes it
/// over, and a new run leaves it alone. Once that process is gone (lock
/// free) with the run still `running`, as `kill -9` leaves it, the next
/// training run marks it failed and removes its half-written checkpoint,
/// and it is resumable again.
#[test]
fn a_live_run_is_never_taken_over_and_dead_ones_are_tidied() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let cfg = quick(&ck, 3);
    let stop1 = TrainOptions {
        stop_at_step: Some(1),
        ..Default::default()
    };
    let a = run(&ds, &cfg, &stop1).unwrap();
    assert!(a.interrupted && a.tidied.is_empty());
    let m = Manifest::open(&ds).unwrap();
    let status = |id: i64| -> String {
        m.conn()
            .query_row("SELECT status FROM runs WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    // As a process killed mid-save leaves it.
    m.conn()
        .execute(
            "UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?1",
            [a.run_id],
        )
        .unwrap();
    let partial = state::dir(&a.run_dir).join(".step-000002.safetensors.tmp-4999999");
    std::fs::write(&partial, b"half a checkpoint").unwrap();

    // Live: another process holds it.
    let held = m.lock_run(a.run_id).unwrap();
    let resume_a = TrainOptions {
        resume: Some(a.run_id),
        ..Default::default()
    };
    let e = run(&ds, &cfg, &resume_a).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "run {} is in use by another eps2v process",
            a.run_id
        )),
        "{e}"
    );
    assert_eq!(state::resumable_run(&m, &cfg).unwrap(), None);
    let b = run(&ds, &cfg, &stop1).unwrap();
    assert!(b.tidied.is_empty(), "{:?}", b.tidied);
    assert_eq!(status(a.run_id), "running");
    assert!(partial.exists());

    // Dead: the lock is free.
    drop(held);
    let c = run(&ds, &cfg, &stop1).unwrap();
    assert_eq!(c.tidied.len(), 1, "{:?}", c.tidied);
    assert_eq!(c.tidied[0].run_id, a.run_id);
    assert_eq!(c.tidied[0].partial_saves_removed, 1);
    assert!(c.tidied[0].resumable);
    assert_eq!(
        c.tidied[0].to_string(),
        format!(
            "training run {0} was left `running` by a process that died; marked failed, 1 half-written checkpoint(s) removed (resume it with --resume {0})",
            a.run_id
        )
    );
    assert_eq!(status(a.run_id), "failed");
    assert!(!partial.exists());
    // The newest unfinished run of these settings is resumed first.
    assert_eq!(state::resumable_run(&m, &cfg).unwrap(), Some(c.run_id));
    let r = run(&ds, &cfg, &resume_a).unwrap();
    assert!(r.resumed && !r.interrupted && r.steps == 3);
}

#[test]
fn injected_nans_are_skipped_then_rolled_back_and_never_saved() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let out = d.path().join("n.safetensors");
    let cfg = TrainConfig {
        blocks: vec!["out".into()],
        nan_rollback_after: 2,
        out: Some(out.clone()),
        ..quick(&ck, 6)
    };
    let r = run(
        &ds,
        &cfg,
        &TrainOptions {
            inject_nan_at: vec![2, 3, 4],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.steps, r.skipped, r.rollbacks), (6, 3, 1));
    let log = std::fs::read_to_string(r.run_dir.join("nan.log")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert!(
        log.contains("step 3: skipped") && log.contains("items ["),
        "{log}"
    );
    // Everything written is finite.
    for (k, v) in unet_tensors(&out) {
        assert!(v.iter().all(|x| x.is_finite()), "{k}");
    }
    for e in std::fs::read_dir(state::dir(&r.run_dir)).unwrap() {
        let l = state::load(&e.unwrap().path(), &Device::Cpu).unwrap();
        for t in l.weights.values() {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
    // Regression: a skipped last step skipped the final evaluation too,
    // so the export's retention was the one before training.
    let r = run(
        &ds,
        &cfg,
        &TrainOptions {
            inject_nan_at: vec![5],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.steps, r.skipped), (6, 1));
    assert_eq!(
        r.retention.last().map(|x| x.0),
        Some(6),
        "{:?}",
        r.retention
    );
    // Regression: bursts of NaNs the run recovers from, more of them than
    // the divergence limit (3 × 1 rollbacks), were called divergence: the
    // limit counted rollbacks over the whole run, not in a row.
    let cfg = TrainConfig {
        nan_rollback_after: 1,
        ..cfg
    };
    let r = run(
        &ds,
        &cfg,
        &TrainOptions {
            inject_nan_at: vec![0, 1, 3, 5],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.steps, r.skipped, r.rollbacks), (6, 4, 4));
}

/// Every step non-finite: the run stops with "training diverged", and its
/// row ends `failed` with that text (not `running` until the next run
/// finds it), still resumable from its checkpoint.
#[test]
fn a_diverged_run_ends_its_row_failed_with_the_error() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let cfg = TrainConfig {
        blocks: vec!["out".into()],
        nan_rollback_after: 1,
        ..quick(&ck, 12)
    };
    let opts = TrainOptions {
        inject_nan_at: (0..12).collect(),
        ..Default::default()
    };
    let e = run(&ds, &cfg, &opts).unwrap_err();
    assert!(e.to_string().contains("training diverged"), "{e}");
    let m = Manifest::open(&ds).unwrap();
    let (id, status, counts): (i64, String, String) = m
        .conn()
        .query_row(
            "SELECT id, status, counts_json FROM runs WHERE stage = 'train'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(status, "failed");
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["error"], e.to_string());
    assert!(
        counts["run_id"] == id && counts["rollbacks"] == 4,
        "{counts}"
    );
    assert!(!m.run_is_live(id).unwrap());
    assert_eq!(state::resumable_run(&m, &cfg).unwrap(), Some(id));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    // Unknown block.
    let e = run(
        &ds,
        &TrainConfig {
            blocks: vec!["OUT9".into()],
            ..quick(&ck, 1)
        },
        &TrainOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Config(_)) && e.to_string().contains("OUT9"),
        "{e}"
    );
    // A block the model lacks.
    let e = run(
        &ds,
        &TrainConfig {
            blocks: vec!["IN11".into()],
            ..quick(&ck, 1)
        },
        &TrainOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("IN11 does not exist"), "{e}");
    // min-SNR γ = 0.
    let e = run(
        &ds,
        &TrainConfig {
            weighting: Weighting::MinSnr,
            min_snr_gamma: 0.0,
            ..quick(&ck, 1)
        },
        &TrainOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("min_snr_gamma"), "{e}");
    // An empty dataset, and one that is not bucketed.
    let empty = d.path().join("empty");
    Manifest::init(&empty).unwrap();
    let e = run(&empty, &quick(&ck, 1), &TrainOptions::default()).unwrap_err();
    assert!(e.to_string().contains("nothing to train on"), "{e}");
    let unb = d.path().join("unbucketed");
    let mut m = Manifest::init(&unb).unwrap();
    import::run(
        &ImportConfig {
            from: d.path().join("src"),
            limits: Default::default(),
            batch: 16,
        },
        &mut m,
        &Ctx::quiet(),
    )
    .unwrap();
    let e = run(&unb, &quick(&ck, 1), &TrainOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("4 without a bucket (run `eps2v bucket`)"),
        "{e}"
    );
    // A checkpoint of another family.
    let lora = d.path().join("lora.safetensors");
    crate::models::sdxl::checkpoint::save_tensors(
        &lora,
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
            Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
        )],
        &Default::default(),
    )
    .unwrap();
    let e = run(&ds, &quick(&lora, 1), &TrainOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Model(_)), "{e}");
    // A block this UNet does not have: refused before any cache or sample.
    let cache_entries = || walk_count(&ds.join("cache"));
    let before = cache_entries();
    // Nor is a run row (or its folder) made for them.
    let train_runs = || -> i64 {
        Manifest::open(&ds)
            .unwrap()
            .conn()
            .query_row("SELECT count(*) FROM runs WHERE stage = 'train'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let runs_before = train_runs();
    let mut odd = quick(&ck, 1);
    odd.blocks = vec!["IN09".into()];
    let e = run(&ds, &odd, &TrainOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("block IN09 does not exist in this UNet"),
        "{e}"
    );
    assert_eq!(cache_entries(), before);
    // A yaml A1111 could not load with this (tiny) UNet: refused before
    // training, not after the export is written.
    let mut yaml = quick(&ck, 1);
    yaml.a1111_yaml = true;
    let e = run(&ds, &yaml, &TrainOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--a1111-yaml"), "{e}");
    assert_eq!(cache_entries(), before);
    let mut size = quick(&ck, 1);
    size.eval_size = Some([100, 100]);
    let e = run(&ds, &size, &TrainOptions::default()).unwrap_err();
    assert!(e.to_string().contains("100x100"), "{e}");
    assert_eq!(train_runs(), runs_before);
    // Resume of a run that has no checkpoint.
    let e = run(
        &ds,
        &quick(&ck, 1),
        &TrainOptions {
            resume: Some(999),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("--resume 999"), "{e}");
}

/// The conversion works, as a number (short version; the long one is
/// `cargo bench --bench convert`): a tiny model trained from scratch with
/// eps reproduces its four images; the same weights sampled as v + ZTSNR do
/// not; after `train --objective v --ztsnr` v sampling is back within a
/// margin of the eps model's distance; converting back to eps recovers eps
/// sampling.
#[test]
fn the_conversion_works_as_a_number() {
    let d = tempfile::tempdir().unwrap();
    let c = super::testkit::Conversion::default();
    let r =
        super::testkit::conversion(d.path(), &super::testkit::micro_unet(), &c, |n, s, t, l| {
            eprintln!("{n}: {s} steps in {t:.1} s, last loss {l:?}")
        })
        .unwrap();
    eprintln!("distance to data: {r:?}");
    // Measured at these settings: eps 0.017, unconverted 0.054, converted
    // 0.015, back 0.012 (the bench has the long version).
    assert!(r.eps < 0.05, "eps model does not reproduce its data: {r:?}");
    assert!(
        r.unconverted > 2.5 * r.eps,
        "unconverted v + ZTSNR sampling is not far from the data: {r:?}"
    );
    assert!(r.converted < r.eps + 0.02, "converted too far: {r:?}");
    assert!(
        r.converted < r.unconverted / 2.0,
        "conversion did not help: {r:?}"
    );
    assert!(r.back < r.eps + 0.02, "back to eps too far: {r:?}");
}

/// The evaluation sees the EMA weights (what the export writes) and the
/// raw weights come back afterwards, also when the evaluation fails.
#[test]
fn with_ema_evaluates_the_ema_weights_and_restores_the_raw_ones() {
    let v = Var::from_slice(&[1f32, 2.0], 2, &Device::Cpu).unwrap();
    let frozen = Var::from_slice(&[5f32], 1, &Device::Cpu).unwrap();
    let vars = vec![
        ("w".to_string(), v.clone()),
        ("b".to_string(), frozen.clone()),
    ];
    let mut ema: BTreeMap<String, Tensor> = BTreeMap::new();
    ema.insert(
        "w".into(),
        Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap(),
    );
    let seen = with_ema(&vars, &ema, || {
        Ok((
            v.as_tensor().to_vec1::<f32>()?,
            frozen.as_tensor().to_vec1::<f32>()?,
        ))
    })
    .unwrap();
    assert_eq!(seen, (vec![0.5, 0.25], vec![5.0]));
    assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    let failed: Result<()> = with_ema(&vars, &ema, || Err(Error::Other("eval failed".into())));
    assert!(failed.is_err());
    assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    // No EMA: the raw weights.
    let raw = with_ema(&vars, &BTreeMap::new(), || {
        Ok(v.as_tensor().to_vec1::<f32>()?)
    })
    .unwrap();
    assert_eq!(raw, vec![1.0, 2.0]);
}

#[test]
fn ema_update_holds_no_graph_and_averages() {
    let v = Var::from_slice(&[1f32, 2.0], 2, &Device::Cpu).unwrap();
    let vars = vec![("w".to_string(), v.clone())];
    let mut ema: BTreeMap<String, Tensor> = BTreeMap::new();
    ema.insert("w".into(), Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap());
    for _ in 0..3 {
        ema_update(&mut ema, &vars, 0.5).unwrap();
        assert!(!ema["w"].track_op(), "the EMA tensor records ops");
    }
    // 0 → 0.5 → 0.75 → 0.875 of the var.
    let got = ema["w"].to_vec1::<f32>().unwrap();
    assert_eq!(got, vec![0.875, 1.75]);
    // The fused pass has the bits of the composite (candle's affines and
    // add), zero signs included.
    let vals = [0.3f32, -0.0, 1e-30, -7.25, 0.0, 3.0e7, -1.5e-3];
    let olds = [1.1f32, -0.0, -2e-30, 7.0, -0.0, -1.0, 0.5];
    let w = Var::from_slice(&vals, vals.len(), &Device::Cpu).unwrap();
    let old = Tensor::new(&olds, &Device::Cpu).unwrap();
    let mut ema = BTreeMap::from([("w".to_string(), old.clone())]);
    ema_update(&mut ema, &[("w".to_string(), w.clone())], 0.999).unwrap();
    let want = ((&old * 0.999).unwrap() + (w.as_tensor() * (1.0 - 0.999)).unwrap()).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&ema["w"]), bits(&want));
    assert_eq!(
        bits(&old),
        olds.map(f32::to_bits).to_vec(),
        "the old EMA tensor changed"
    );
    let mut ema = BTreeMap::from([(
        "w".to_string(),
        Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap(),
    )]);
    for _ in 0..3 {
        ema_update(&mut ema, &[("w".to_string(), v.clone())], 0.5).unwrap();
    }
    assert_eq!(ema["w"].to_vec1::<f32>().unwrap(), got);
    // Untracked vars are left alone.
    ema_update(&mut ema, &[("other".to_string(), v)], 0.5).unwrap();
    assert_eq!(ema["w"].to_vec1::<f32>().unwrap(), got);
}

/// A run stopped by `--stop-below` in its second stage exports the last
/// good checkpoint (saved in the first stage) with the second stage's
/// blocks back at the base model's values, not their degraded ones.
#[test]
fn a_stop_below_export_puts_blocks_trained_since_the_good_checkpoint_back_to_base() {
    let t = |x: f32| Tensor::new(&[x], &Device::Cpu).unwrap();
    let k_in = "model.diffusion_model.input_blocks.1.0.x".to_string();
    let k_out = "model.diffusion_model.output_blocks.8.0.x".to_string();
    let k_mid = "model.diffusion_model.middle_block.0.x".to_string();
    let live: BTreeMap<String, Tensor> = [(&k_in, 5.0), (&k_out, 6.0), (&k_mid, 7.0)]
        .into_iter()
        .map(|(k, v)| (k.clone(), t(v)))
        .collect();
    let base = |k: &str| -> crate::Result<Tensor> {
        Ok(t(if k.contains("input") {
            1.0
        } else if k.contains("output") {
            2.0
        } else {
            3.0
        }))
    };
    let trained = vec![
        BlockSet::parse(&["IN01".into()]).unwrap(),
        BlockSet::parse(&["OUT08".into()]).unwrap(),
    ];
    let val = |m: &BTreeMap<String, Tensor>, k: &str| m[k].to_vec1::<f32>().unwrap()[0];
    // Good checkpoint from stage 0: IN01 at 4 (its EMA 4.5).
    let good = || {
        Some((
            [(k_in.clone(), t(4.0))].into_iter().collect(),
            [(k_in.clone(), t(4.5))].into_iter().collect(),
        ))
    };
    let w = export_weights(&live, None, good(), &trained, base).unwrap();
    assert_eq!(
        (val(&w, &k_in), val(&w, &k_out), val(&w, &k_mid)),
        (4.0, 2.0, 7.0)
    );
    let ema: BTreeMap<String, Tensor> = [(k_in.clone(), t(9.0)), (k_out.clone(), t(9.0))]
        .into_iter()
        .collect();
    let w = export_weights(&live, Some(&ema), good(), &trained, base).unwrap();
    assert_eq!((val(&w, &k_in), val(&w, &k_out)), (4.5, 2.0));
    // Not stopped: the live weights, or their EMA.
    let w = export_weights(&live, None, None, &trained, base).unwrap();
    assert_eq!((val(&w, &k_in), val(&w, &k_out)), (5.0, 6.0));
    let w = export_weights(&live, Some(&ema), None, &trained, base).unwrap();
    assert_eq!(
        (val(&w, &k_in), val(&w, &k_out), val(&w, &k_mid)),
        (9.0, 9.0, 7.0)
    );
}

/// Warm-up climbs linearly to the peak, cosine falls from it to
/// `min_ratio` over the rest of the stage, constant stays.
#[test]
fn the_learning_rate_warms_up_then_follows_its_schedule() {
    use config::LrSchedule::{Constant, Cosine};
    let f = |s, kind| lr_factor(s, 14, 4, kind, 0.1);
    let warm: Vec<f64> = (0..4).map(|s| f(s, Cosine)).collect();
    assert_eq!(warm, [0.25, 0.5, 0.75, 1.0]);
    assert_eq!(f(4, Cosine), 1.0);
    // Half-way through the 10 cosine steps: half-way between 1 and 0.1.
    assert!((f(9, Cosine) - 0.55).abs() < 1e-12, "{}", f(9, Cosine));
    assert!((f(14, Cosine) - 0.1).abs() < 1e-12);
    assert!((5..14).all(|s| f(s, Cosine) < f(s - 1, Cosine)));
    assert!((4..14).all(|s| f(s, Constant) == 1.0));
    assert_eq!(lr_factor(0, 5, 0, Cosine, 0.0), 1.0);
}
