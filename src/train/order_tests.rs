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
