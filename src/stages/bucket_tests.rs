//! Tests of the bucket stage: the rerun rule, kohya sides, missing images
//! and bucket files, images already at their bucket size, the settings a
//! plain rerun takes.

use super::*;

#[test]
fn rerun_rule_remakes_own_decisions_made_with_other_settings() {
    use ItemPlan::*;
    use ItemState::*;
    let same = |s| Bucketed { same_settings: s };
    let rej = |s| RejectedByBucket { same_settings: s };
    for force in [false, true] {
        assert_eq!(plan_item(Unbucketed, force), Bucket);
        assert_eq!(plan_item(same(false), force), Rebucket);
        assert_eq!(plan_item(rej(false), force), Reconsider);
    }
    assert_eq!(plan_item(same(true), false), KeepBucket);
    assert_eq!(plan_item(same(true), true), Rebucket);
    assert_eq!(plan_item(rej(true), false), KeepRejection);
    assert_eq!(plan_item(rej(true), true), Reconsider);
}

#[test]
fn kohya_sides_are_rounded_to_the_step_and_must_bracket_the_resolution() {
    let kohya = |resolution, step, min_side, max_side| BucketConfig {
        buckets: BucketSet::Kohya {
            resolution,
            step,
            min_side,
            max_side,
        },
        ..Default::default()
    };
    // min 300 → 256, max 1000 → 1024 (kohya's adjustment): every side a
    // multiple of 64 and within them.
    let list = kohya(1024, 64, 300, 1000).bucket_list().unwrap();
    assert!(list.iter().any(|b| (b.width, b.height) == (1024, 1024)));
    for b in &list {
        assert!(b.width % 64 == 0 && b.height % 64 == 0, "{b:?}");
        assert!(
            (256..=1024).contains(&b.width) && (256..=1024).contains(&b.height),
            "{b:?}"
        );
    }
    for (bad, want) in [
        (kohya(1024, 64, 256, 512), "max side 512"),
        (kohya(512, 64, 768, 1024), "min side 768"),
        (kohya(1024, 12, 256, 2048), "multiple of 32"),
        (kohya(1024, 0, 256, 2048), "multiple of 32"),
        // A 264 px side is a 33-latent: SDXL's UNet cannot join its
        // skips at 17 → 34.
        (kohya(1024, 8, 256, 2048), "multiple of 32"),
        (kohya(1024, 64, 256, u32::MAX), "≤ 16384"),
    ] {
        let e = bad.bucket_list().unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// Regression: a missing image file failed the whole run, and every
/// rerun stopped at it; it is that item's rejection, as in caption.
#[test]
fn a_missing_image_is_its_items_rejection() {
    let d = tempfile::tempdir().unwrap();
    let cfg = BucketConfig::default();
    let list = cfg.bucket_list().unwrap();
    let o = process(d.path(), &cfg, &list, 7, "ab12", "images/ab/ab12.png").unwrap();
    match o {
        Outcome::Rejected { item_id, reason } => {
            assert_eq!(item_id, 7);
            assert!(
                reason.starts_with("unreadable: images/ab/ab12.png"),
                "{reason}"
            );
        }
        _ => panic!("not rejected"),
    }
}

/// `dir/src` holding copies of the bundled images `files`.
fn bundled(dir: &Path, files: &[&str]) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images");
    for f in files {
        std::fs::copy(fixtures.join(f), src.join(f)).unwrap();
    }
    src
}

/// The images of `src` imported into `dir/ds`, and kohya buckets
/// around 128² (64–256, step 32).
fn imported(dir: &Path, src: std::path::PathBuf) -> (std::path::PathBuf, Manifest, BucketConfig) {
    let ds = dir.join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let import = crate::stages::import::ImportConfig {
        from: src,
        ..Default::default()
    };
    crate::stages::import::run(&import, &mut m, &Ctx::quiet()).unwrap();
    let cfg = BucketConfig {
        buckets: BucketSet::Kohya {
            resolution: 128,
            step: 32,
            min_side: 64,
            max_side: 256,
        },
        ..Default::default()
    };
    (ds, m, cfg)
}

/// Regression: a bucketed item whose bucket file was deleted was kept
/// ("already"), and train and export then failed or dropped it.
#[test]
fn a_missing_bucket_file_is_made_again() {
    let d = tempfile::tempdir().unwrap();
    let (ds, mut m, cfg) = imported(
        d.path(),
        bundled(d.path(), &["scene_rgb.png", "wide_rgb.png"]),
    );
    let ctx = Ctx::quiet();
    let first = run(&cfg, &mut m, &ctx).unwrap();
    assert_eq!(first.bucketed, 2);
    let path: String = m
        .conn()
        .query_row(
            "SELECT path FROM buckets ORDER BY item_id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    std::fs::remove_file(ds.join(&path)).unwrap();
    let again = run(&cfg, &mut m, &ctx).unwrap();
    assert_eq!((again.already, again.rebucketed), (1, 1));
    assert!(ds.join(&path).is_file());
    // An image gone, rebucketed with other settings: rejected as
    // unreadable, which the settings did not cause (no "run bucket again
    // with the earlier settings" for it).
    let image: String = m
        .conn()
        .query_row("SELECT path FROM items ORDER BY id LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    std::fs::remove_file(ds.join(&image)).unwrap();
    let other = BucketConfig {
        crop: CropArg::Random,
        ..cfg.clone()
    };
    let r = run(&other, &mut m, &ctx).unwrap();
    assert_eq!(
        (r.rebucketed, r.rejected.get("unreadable").copied()),
        (2, Some(1))
    );
    assert_eq!(r.rebucketed_rejected, 0, "{r:?}");
}

/// An 8-bit RGB PNG already at its bucket's size (what `generate`
/// writes) is its own bucket image: a hard link, not a re-encoded copy;
/// any other image at that size is encoded (its decoded pixels).
#[test]
fn an_image_at_its_bucket_size_is_linked_not_encoded_again() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let rgb = image::RgbImage::from_fn(128, 128, |x, y| image::Rgb([x as u8, y as u8, 7]));
    rgb.save(src.join("rgb.png")).unwrap();
    let rgba = image::RgbaImage::from_fn(128, 128, |x, y| image::Rgba([y as u8, x as u8, 9, 255]));
    rgba.save(src.join("rgba.png")).unwrap();
    let (ds, mut m, cfg) = imported(d.path(), src);
    let ctx = Ctx::quiet();
    assert_eq!(run(&cfg, &mut m, &ctx).unwrap().bucketed, 2);
    let rows: Vec<(String, String, String)> = m
        .conn()
        .prepare(
            "SELECT s.path, i.path, b.path FROM buckets b JOIN items i ON i.id = b.item_id
             JOIN sources s ON s.item_id = i.id ORDER BY s.path",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for (source, image, bucket) in &rows {
        let (image, bucket) = (ds.join(image), ds.join(bucket));
        let same_bytes = std::fs::read(&image).unwrap() == std::fs::read(&bucket).unwrap();
        assert_eq!(same_bytes, source.ends_with("/rgb.png"), "{source}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
            assert_eq!(ino(&image) == ino(&bucket), source.ends_with("/rgb.png"));
        }
        let pixels = image::open(&bucket).unwrap().to_rgb8();
        let want = if source.ends_with("/rgb.png") {
            rgb.clone()
        } else {
            image::DynamicImage::ImageRgba8(rgba.clone()).to_rgb8()
        };
        assert_eq!(pixels, want, "{source}");
    }
    // Made again in the same place (--force): no temporary name is
    // left (a rename onto a link of the same file does nothing).
    let force = BucketConfig { force: true, ..cfg };
    assert_eq!(run(&force, &mut m, &ctx).unwrap().bucketed, 2);
    let dir = ds.join(rows[0].2.rsplit_once('/').unwrap().0);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn settings_ignore_force_and_batch() {
    let a = BucketConfig::default();
    let b = BucketConfig {
        force: true,
        batch: 3,
        ..BucketConfig::default()
    };
    assert!(same_settings(&a, &b));
    let c = BucketConfig {
        max_upscale: 2.0,
        ..BucketConfig::default()
    };
    assert!(!same_settings(&a, &c));
    // A stored config reads back equal.
    let json = serde_json::to_string(&c).unwrap();
    assert!(same_settings(
        &serde_json::from_str::<BucketConfig>(&json).unwrap(),
        &c
    ));
}

/// The settings a plain `bucket` takes are those of the latest run whose
/// buckets the dataset still has; none before any.
#[test]
fn current_settings_are_those_of_the_latest_run_with_buckets() {
    let d = tempfile::tempdir().unwrap();
    let (_ds, mut m, cfg) = imported(
        d.path(),
        bundled(
            d.path(),
            &["scene_rgb.png", "wide_rgb.png", "portrait_rgb.png"],
        ),
    );
    assert!(current_settings(&m).unwrap().is_none());
    let ctx = Ctx::quiet();
    let first = run(&cfg, &mut m, &ctx).unwrap();
    assert_eq!(first.bucketed, 3);
    let (id, got) = current_settings(&m).unwrap().unwrap();
    assert_eq!((id, same_settings(&got, &cfg)), (first.run_id, true));
    // Other settings: every item is bucketed again, by the new run.
    let random = BucketConfig {
        crop: CropArg::Random,
        seed: 5,
        ..cfg.clone()
    };
    let second = run(&random, &mut m, &ctx).unwrap();
    assert_eq!(second.rebucketed, 3);
    let (id, got) = current_settings(&m).unwrap().unwrap();
    assert_eq!((id, same_settings(&got, &random)), (second.run_id, true));
    // The same settings again: nothing redone, still the second run's.
    let third = run(&random, &mut m, &ctx).unwrap();
    assert_eq!(third.already, 3);
    assert_eq!(current_settings(&m).unwrap().unwrap().0, second.run_id);
    assert_eq!(
        random.buckets.to_string(),
        "kohya buckets at 128² (step 32, sides 64–256)"
    );
    assert_eq!(BucketSet::Sdxl.to_string(), "the SDXL list");
}
