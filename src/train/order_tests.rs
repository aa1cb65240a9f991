//! Training depends on the dataset's content, not on its manifest ids.

use super::config::LatentMode;
use super::tests::{quick, run, unet_tensors};
use super::*;

/// The same images and captions imported one by one in reverse order get
/// other ids (as shards merged in another order, or a generation extended
/// later, do) and train to the same bytes: batches and latent samples are
/// keyed by content. The digest that guards a resume is the same too.
#[test]
fn the_same_content_under_other_ids_trains_the_same() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = testkit::dataset(d.path()).unwrap();
    let src = d.path().join("src");
    let other = d.path().join("other");
    let mut m = Manifest::init(&other).unwrap();
    for i in (0..testkit::CAPTIONS.len()).rev() {
        let one = d.path().join(format!("one-{i}"));
        std::fs::create_dir_all(&one).unwrap();
        for ext in ["png", "txt"] {
            let name = format!("{i}.{ext}");
            std::fs::copy(src.join(&name), one.join(&name)).unwrap();
        }
        testkit::import_from(&mut m, one).unwrap();
    }
    testkit::bucket_all(&mut m).unwrap();
    drop(m);
    let ids = |ds: &Path| -> Vec<(String, i64)> {
        let m = Manifest::open(ds).unwrap();
        let (items, _) = data::load_items(&m).unwrap();
        items
            .into_iter()
            .map(|it| (it.sha256, it.item_id))
            .collect()
    };
    let (a, b) = (ids(&ds), ids(&other));
    assert_eq!(a.len(), 4);
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "listed by content"
    );
    assert_ne!(a, b, "the ids differ");

    let cfg = TrainConfig {
        latent: LatentMode::Sample,
        caption_dropout: 0.3,
        ..quick(&ck, 4)
    };
    let trained = |ds: &Path, name: &str| {
        let out = d.path().join(name);
        let cfg = TrainConfig {
            out: Some(out.clone()),
            ..cfg.clone()
        };
        let r = run(ds, &cfg, &TrainOptions::default()).unwrap();
        (unet_tensors(&out), r)
    };
    let (wa, ra) = trained(&ds, "a.safetensors");
    let (wb, rb) = trained(&other, "b.safetensors");
    assert!(wa == wb, "the two datasets trained to other weights");
    assert_eq!(ra.last_loss, rb.last_loss);
    let digest = |ds: &Path| {
        let m = Manifest::open(ds).unwrap();
        data::digest(&data::load_items(&m).unwrap().0)
    };
    assert_eq!(digest(&ds), digest(&other));
    assert!(digest(&ds).starts_with("4:content:"), "{}", digest(&ds));
    // A run saved with the id-keyed digest before it is not resumed.
    let old = state::TrainState {
        data_digest: Some(format!("4:{}", "ab".repeat(32))),
        ..state::TrainState::start(cfg.clone(), String::new())
    };
    let why = old.data_mismatch(&digest(&ds)).unwrap();
    assert!(why.contains("ordered its batches by item id"), "{why}");
    // So is one saved before the digest was recorded at all.
    let older = state::TrainState {
        data_digest: None,
        ..old
    };
    let why = older.data_mismatch(&digest(&ds)).unwrap();
    assert!(why.contains("ordered its batches by item id"), "{why}");
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
