//! A resumed training run is the uninterrupted one: same weights, same
//! report, the same rollbacks.

use std::path::Path;

use super::tests::{quick, run, unet_tensors};
use super::*;

#[test]
fn resume_equals_an_uninterrupted_run_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = super::testkit::dataset(d.path()).unwrap();
    let straight = d.path().join("straight.safetensors");
    let resumed = d.path().join("resumed.safetensors");
    let cfg = TrainConfig {
        blocks: vec!["OUT06-OUT08".into(), "out".into()],
        ema_decay: Some(0.9),
        grad_accum: 2,
        caption_dropout: 0.3,
        lr_schedule: config::LrSchedule::Cosine,
        warmup_steps: 2,
        ..quick(&ck, 6)
    };
    let cfg_s = TrainConfig {
        out: Some(straight.clone()),
        ..cfg.clone()
    };
    let whole = run(&ds, &cfg_s, &TrainOptions::default()).unwrap();
    let cfg_r = TrainConfig {
        out: Some(resumed.clone()),
        ..cfg.clone()
    };
    let first = run(
        &ds,
        &cfg_r,
        &TrainOptions {
            stop_at_step: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(first.interrupted && first.exported.is_empty());
    assert_eq!(first.steps, 4);
    // Another config is refused, naming the field.
    let e = run(
        &ds,
        &TrainConfig {
            lr: 2e-4,
            ..cfg_r.clone()
        },
        &resuming(first.run_id),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lr:") && e.contains("config differs"), "{e}");
    // So is another dataset (an item set aside since), which `run` would
    // otherwise resume on: its split and batch positions are not the
    // run's. Put back, it resumes.
    let set_status = |status: &str| {
        Manifest::open(&ds)
            .unwrap()
            .conn()
            .execute(
                "UPDATE items SET status = ?1 WHERE id = (SELECT min(id) FROM items)",
                [status],
            )
            .unwrap();
    };
    set_status("rejected");
    let resume = resuming(first.run_id);
    let e = run(&ds, &cfg_r, &resume).unwrap_err().to_string();
    assert!(
        e.contains("dataset: the run trained on 4 items, there are 3 now"),
        "{e}"
    );
    let m = Manifest::open(&ds).unwrap();
    assert_eq!(state::resumable_run(&m, &cfg_r).unwrap(), None);
    // `--resume` alone says why the newest stopped run does not go on.
    let (id, why) = state::newest_mismatch(&m, &cfg_r).unwrap().unwrap();
    assert_eq!(id, first.run_id);
    assert!(
        why.contains("the run trained on 4 items, there are 3 now"),
        "{why}"
    );
    set_status("ok");
    assert_eq!(
        state::resumable_run(&m, &cfg_r).unwrap(),
        Some(first.run_id)
    );
    drop(m);
    // A checkpoint a killed process was writing is swept on resume.
    let partial = state::dir(&first.run_dir).join(".step-000005.safetensors.tmp-4999999");
    std::fs::write(&partial, b"half a checkpoint").unwrap();
    // So is the temporary file of a log or grid write it was killed in.
    let temp = first.run_dir.join(".tmpAbC123");
    std::fs::write(&temp, b"half a log").unwrap();
    let second = run(&ds, &cfg_r, &resuming(first.run_id)).unwrap();
    assert!(second.resumed && !second.interrupted);
    assert!(!partial.exists() && !temp.exists());
    assert_eq!((second.run_id, second.steps), (first.run_id, 6));
    assert_eq!(unet_tensors(&straight), unet_tensors(&resumed));
    // The log describes one history: 6 step rows.
    let rows = log::read(&second.run_dir.join("log.csv")).unwrap();
    assert_eq!(rows.iter().filter(|r| r.loss.is_some()).count(), 6);
    // ... and the report is the uninterrupted run's: every evaluation
    // (the step-0 one was made before the interruption) and the running
    // mean of the loss.
    assert_eq!(second.retention, whole.retention);
    assert_eq!(second.last_loss, whole.last_loss);
    assert_eq!(second.val_loss, whole.val_loss);

    // A finished run has a checkpoint at its last step (`save_every` 0):
    // resumed, as `run` does when no record of it says it trained, it only
    // exports again, the same bytes, with the same report.
    let exported = std::fs::read(&straight).unwrap();
    std::fs::remove_file(&straight).unwrap();
    let m = Manifest::open(&ds).unwrap();
    assert_eq!(state::resumable_run(&m, &cfg_s).unwrap(), None);
    assert_eq!(
        state::adoptable_run(&m, &cfg_s).unwrap(),
        Some(second.run_id),
        "the newest matching run, finished"
    );
    drop(m);
    let again = run(&ds, &cfg_s, &resuming(whole.run_id)).unwrap();
    assert!(again.resumed && !again.interrupted);
    assert_eq!(again.steps, 6);
    assert_eq!(std::fs::read(&straight).unwrap(), exported);
    assert_eq!(again.retention, whole.retention);
    assert_eq!(again.last_loss, whole.last_loss);
    let rows = log::read(&whole.run_dir.join("log.csv")).unwrap();
    assert_eq!(rows.iter().filter(|r| r.loss.is_some()).count(), 6);
}

/// A stop request between scheduled saves writes a checkpoint of its own
/// series: resumed, a NaN rollback returns where the uninterrupted run's
/// does (the last scheduled checkpoint), not to where the run stopped, so
/// the result is the same bytes; the stop checkpoint is gone once a
/// scheduled one passes it.
#[test]
fn a_rollback_after_a_resume_returns_where_the_uninterrupted_run_does() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = testkit::dataset(d.path()).unwrap();
    let cfg = TrainConfig {
        blocks: vec!["out".into()],
        nan_rollback_after: 1,
        save_every: 4,
        ..quick(&ck, 10)
    };
    let with_out = |name: &str| TrainConfig {
        out: Some(d.path().join(name)),
        ..cfg.clone()
    };
    let nan = TrainOptions {
        inject_nan_at: vec![6],
        ..Default::default()
    };
    let whole = run(&ds, &with_out("whole.safetensors"), &nan).unwrap();
    assert_eq!(whole.rollbacks, 1);
    let cfg_r = with_out("resumed.safetensors");
    let first = run(
        &ds,
        &cfg_r,
        &TrainOptions {
            stop_at_step: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(first.interrupted);
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(state::dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&first.run_dir),
        [
            "step-000000.safetensors",
            "step-000004.safetensors",
            "stop-step-000005.safetensors"
        ]
    );
    let second = run(
        &ds,
        &cfg_r,
        &TrainOptions {
            resume: Some(first.run_id),
            ..nan
        },
    )
    .unwrap();
    assert_eq!((second.steps, second.rollbacks), (10, 1));
    assert!(
        unet_tensors(&d.path().join("whole.safetensors"))
            == unet_tensors(&d.path().join("resumed.safetensors")),
        "the resumed run rolled back elsewhere"
    );
    assert!(names(&second.run_dir)
        .iter()
        .all(|n| n.starts_with("step-")));
}

/// Options that resume run `id`.
fn resuming(id: i64) -> TrainOptions {
    TrainOptions {
        resume: Some(id),
        ..Default::default()
    }
}
