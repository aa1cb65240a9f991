use super::*;

/// A curation run on the dataset after the pipeline's last stage makes
/// the stages from the one it affects stale; a training run does not,
/// nor do the pipeline's own runs.
#[test]
fn curation_runs_outside_the_pipeline_make_its_stages_stale() {
    let d = tempfile::tempdir().unwrap();
    let m = Manifest::init(d.path()).unwrap();
    let run = |stage: &str| m.begin_run(stage, &serde_json::json!({})).unwrap();
    let mut progress = Progress::default();
    for stage in ["generate", "caption"] {
        let id = run(stage);
        let rec = StageRecord {
            last_run: Some(id),
            ..Default::default()
        };
        progress.stages.insert(stage.to_string(), rec);
    }
    assert_eq!(changed_outside(&m, &progress).unwrap(), None);
    run("train");
    assert_eq!(changed_outside(&m, &progress).unwrap(), None);
    run("bucket");
    assert_eq!(
        changed_outside(&m, &progress).unwrap(),
        Some((4, "bucket".to_string()))
    );
    run("caption");
    assert_eq!(
        changed_outside(&m, &progress).unwrap(),
        Some((1, "caption".to_string()))
    );
    run("import");
    assert_eq!(
        changed_outside(&m, &progress).unwrap(),
        Some((0, "import".to_string()))
    );
    // Records from before `last_run` was kept: nothing to compare.
    for r in progress.stages.values_mut() {
        r.last_run = None;
    }
    assert_eq!(changed_outside(&m, &progress).unwrap(), None);
}

/// `[device]` reaches the trainer (device and frozen-model precision),
/// not only generate and evaluate.
#[test]
fn the_run_device_reaches_the_trainer() {
    let mut cfg = RunConfig::default();
    cfg.device.device = Some("cpu".into());
    cfg.device.precision = Some("f32".into());
    let o = train_options(&cfg, Some(3)).unwrap();
    assert!(o.device.is_some_and(|d| d.is_cpu()));
    assert_eq!(
        (o.dtype, o.resume),
        (Some(candle_core::DType::F32), Some(3))
    );
    cfg.device.precision = Some("f64".into());
    let e = train_options(&cfg, None).unwrap_err().to_string();
    assert!(e.starts_with("device.precision"), "{e}");
}

/// The pipeline row is locked while a `run` works on it: a second
/// `run` on the dataset meanwhile is refused naming the first process,
/// whatever its config; once the first is gone its row is reopened
/// (same config) or a new one starts (another config) and the old row
/// is marked failed.
#[test]
fn a_second_run_on_a_dataset_in_use_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = Manifest::init(d.path()).unwrap();
    let value = serde_json::json!({"a": 1});
    let digests = BTreeMap::new();
    let (id, _, lock) = pipeline_row(&m, &value, &digests, "k1").unwrap();
    for key in ["k1", "k2"] {
        let e = pipeline_row(&m, &value, &digests, key)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("run {id} is in use")), "{e}");
    }
    drop(lock);
    let (again, _, lock) = pipeline_row(&m, &value, &digests, "k1").unwrap();
    assert_eq!(again, id);
    drop(lock);
    let (other, _, _lock) = pipeline_row(&m, &value, &digests, "k2").unwrap();
    assert_ne!(other, id);
    assert!(!m.run_is_live(id).unwrap() && m.run_is_live(other).unwrap());
    // The replaced row, left `running` by its dead process, is failed.
    let status = |id: i64| -> String {
        m.conn()
            .query_row("SELECT status FROM runs WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        (status(id).as_str(), status(other).as_str()),
        ("failed", "running")
    );
}

/// Regression: on a dataset without a pipeline row nothing was locked
/// before a row was chosen, so two `run`s could both begin one. The
/// pipeline lock is taken first, and held by one process at a time.
#[test]
fn the_pipeline_lock_admits_one_run_per_dataset() {
    let d = tempfile::tempdir().unwrap();
    let m = Manifest::init(d.path()).unwrap();
    let held = m.pipeline_lock().unwrap();
    let e = m.pipeline_lock().err().unwrap().to_string();
    assert!(e.contains("another `eps2v run` is running"), "{e}");
    drop(held);
    m.pipeline_lock().unwrap();
}
