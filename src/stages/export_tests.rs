use super::*;

/// A killed export (its temporary sibling left behind) leaves the
/// previous export intact; the next export sweeps the leftover and
/// replaces the old export whole.
#[test]
fn staged_export_replaces_whole_and_sweeps_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("kohya");
    fs::create_dir_all(out.join("1_old")).unwrap();
    fs::write(out.join("meta_lat.json"), b"{}").unwrap();
    // A run killed before its commit: its temp dir stays, `out` is untouched.
    let killed = d.path().join(".kohya.tmp-999999");
    fs::create_dir_all(killed.join("1_half")).unwrap();
    let st = Staged::new(&out).unwrap();
    assert!(!killed.exists(), "leftover not swept");
    assert!(out.join("1_old").is_dir());
    fs::create_dir_all(st.tmp.join("1_new")).unwrap();
    st.commit().unwrap();
    assert!(out.join("1_new").is_dir() && !out.join("1_old").exists());
    let names: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["kohya"]);
}

/// A kill between a folder export's two renames leaves the old export
/// aside; the next export puts it back first. A file export replaces
/// its file in one rename.
#[test]
fn a_folder_set_aside_is_restored_and_files_are_replaced_in_one_rename() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("kohya");
    fs::create_dir_all(d.path().join(".kohya.old-export/1_old")).unwrap();
    let st = Staged::new(&out).unwrap();
    assert!(out.join("1_old").is_dir() && !d.path().join(".kohya.old-export").exists());
    st.discard();
    // Regression: the set-aside name replaced the last extension, so
    // `set.v1`'s was `set.v2`'s too, and a folder of the user's named
    // `set.old-export` was taken for one (and deleted by the commit).
    let sub = d.path().join("sub");
    let mine = sub.join("set.old-export");
    fs::create_dir_all(mine.join("keep")).unwrap();
    fs::create_dir_all(sub.join(".set.v1.old-export/1_v1")).unwrap();
    let st = Staged::new(&sub.join("set.v2")).unwrap();
    assert!(!sub.join("set.v2").exists());
    fs::create_dir_all(st.tmp.join("1_v2")).unwrap();
    st.commit().unwrap();
    assert!(sub.join("set.v2/1_v2").is_dir());
    assert!(sub.join(".set.v1.old-export/1_v1").is_dir());
    assert!(mine.join("keep").is_dir());
    fs::remove_dir_all(&sub).unwrap();
    let file = d.path().join("manifest.parquet");
    fs::write(&file, b"old").unwrap();
    let st = Staged::new(&file).unwrap();
    fs::write(&st.tmp, b"new").unwrap();
    st.commit().unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"new");
    let names: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn kohya_gets_no_tags_besides_a_policy_caption() {
    let row = |source: &str| ExportRow {
        caption: Some("1girl, very long hair".into()),
        caption_source: Some(source.into()),
        tags: Some("1girl, long hair, simple background".into()),
        ..Default::default()
    };
    let policy = row("policy");
    let k = kohya_entry(policy.caption.as_deref(), kohya_tags(&policy));
    assert_eq!(
        (k.text.as_str(), k.tags.as_str()),
        ("1girl, very long hair", "")
    );
    let sidecar = row("sidecar_txt");
    let k = kohya_entry(sidecar.caption.as_deref(), kohya_tags(&sidecar));
    assert_eq!(
        k.text,
        "1girl, very long hair, long hair, simple background"
    );
}

#[test]
fn kohya_text_never_repeats_caption_and_tags() {
    let e = kohya_entry(
        Some("1girl, solo, red circle"),
        Some("1girl, red circle, solo"),
    );
    assert_eq!(e.caption, "1girl, solo, red circle");
    assert_eq!(e.tags, "");
    assert_eq!(e.text, "1girl, solo, red circle");
    let e = kohya_entry(
        Some("a photo of a cat"),
        Some("cat, a photo of a cat, indoors, cat"),
    );
    assert_eq!(e.tags, "cat, indoors");
    assert_eq!(e.text, "a photo of a cat, cat, indoors");
    let e = kohya_entry(None, Some("smile, solo"));
    assert_eq!((e.caption.as_str(), e.text.as_str()), ("", "smile, solo"));
    let e = kohya_entry(Some("  \n "), None);
    assert_eq!(e.text, "");
    assert_eq!(
        one_line("line one\n\n  line two,\nthree"),
        "line one, line two, three"
    );
    // Regressions: spellings of one tag (a sidecar's underscores, the
    // tagger's spaces) were both written; a lone `\r` stayed, where
    // kohya's `readlines()` cut the caption.
    let e = kohya_entry(
        Some("1girl, long_hair, Blue_Eyes"),
        Some("long hair, blue eyes, solo, Solo"),
    );
    assert_eq!(e.text, "1girl, long_hair, Blue_Eyes, solo");
    assert_eq!(one_line("1girl, solo\rred hair"), "1girl, solo, red hair");
}

#[test]
fn caption_priority_prefers_policy_then_tagger_then_sidecars() {
    assert!(caption_rank("policy") < caption_rank("tagger"));
    assert!(caption_rank("tagger") < caption_rank("sidecar_txt"));
    assert!(caption_rank("a1111_prompt") < caption_rank("zzz"));
}

/// kohya's flip rule (`bucket_w − right` is the mirrored image's left
/// crop) gives the true crop of the mirrored image.
#[test]
fn kohya_crop_ltrb_mirrors_to_the_true_crop() {
    // 100×64 cover-scaled, cut 10 px from the left into a 64×64 bucket:
    // mirrored, 100 − 10 − 64 = 26 px are cut from the left.
    let ltrb = kohya_crop_ltrb((64, 64), (100, 64), (10, 0));
    assert_eq!(ltrb, [10, 0, 38, 64]);
    assert_eq!(64 - ltrb[2], 26);
    // An exact fit is kohya's own [0, 0, w, h].
    assert_eq!(kohya_crop_ltrb((64, 96), (64, 96), (0, 0)), [0, 0, 64, 96]);
}

/// `--latents` writes, beside each bucketed image, the VAE mean of the
/// bucket image (and of its mirror) before the scale factor, the item's
/// size before bucketing and its crop, such that kohya's flip rule gives
/// the mirrored image's crop; an item without a bucket gets no `.npz`; a
/// second export reads every latent from the cache and writes the same
/// bytes; a standalone file of the same VAE gives the same files.
#[test]
fn kohya_latents_carry_the_true_size_and_crop() {
    use crate::stages::bucket::{self, BucketConfig, BucketSet, CropArg};
    use candle_core::{DType, Device, Tensor};

    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    // 96×64 → 64×64 bucket (up to 32 px cut across), 200×64 → 96×32
    // bucket (cover-scaled to 100×32), 64×64 exact.
    import_patterns(d.path(), &mut m, "a", &[(96, 64), (200, 64), (64, 64)]);
    let buckets = BucketConfig {
        buckets: BucketSet::Kohya {
            resolution: 64,
            step: 32,
            min_side: 32,
            max_side: 128,
        },
        crop: CropArg::Random,
        seed: 3,
        ..Default::default()
    };
    bucket::run(&buckets, &mut m, &Ctx::quiet()).unwrap();
    import_patterns(d.path(), &mut m, "b", &[(80, 48)]); // after bucketing: no bucket
    let model = tiny_model(d.path());
    let src = LatentSource::load(&model, &Device::Cpu, DType::F32).unwrap();
    let cfg = ExportConfig {
        latents: Some(model.clone()),
        flip_latents: true,
        ..Default::default()
    };
    // Stopped (Ctrl-C) before its first encoding: nothing is written.
    let stop = Ctx::quiet();
    stop.cancel();
    let e = run_with(&cfg, &mut m, &stop, Some(&src)).unwrap_err();
    assert!(
        matches!(e, Error::Interrupted(_))
            && e.to_string().contains("stopped after encoding 0 of 3"),
        "{e}"
    );
    assert!(!ds.join("exports/kohya").exists());
    let r = run_with(&cfg, &mut m, &Ctx::quiet(), Some(&src)).unwrap();
    assert_eq!(
        (r.written, r.latents_written, r.latents_unbucketed),
        (4, 3, 1),
        "{r:?}"
    );
    assert_eq!((r.latents_encoded, r.latents_cached), (6, 0), "{r:?}");
    assert!(r.failed.is_empty() && r.kohya_warning.is_none(), "{r:?}");
    // The largest bucket is 4096 px², every side a multiple of 32.
    let flags = r.kohya_flags.as_deref().unwrap();
    assert!(
        flags.contains("--bucket_no_upscale --resolution 64 --bucket_reso_steps 32")
            && flags.contains("--min_bucket_reso 64"),
        "{flags}"
    );

    let ck = crate::models::sdxl::checkpoint::Checkpoint::open(&model).unwrap();
    let vae = ck
        .load_vae(
            &ck.infer_vae_config().unwrap().config,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let dir = r.out.join("1_eps2v");
    let rows = load_rows(&m, true).unwrap();
    let mut npz_bytes = Vec::new();
    let mut asymmetric = 0;
    for row in &rows {
        let stem = &row.sha256[..16];
        let npz = dir.join(format!("{stem}.npz"));
        let Some(bucket_path) = &row.bucket_path else {
            assert!(!npz.exists(), "an unbucketed item has no npz");
            continue;
        };
        let got: std::collections::HashMap<String, Tensor> =
            Tensor::read_npz(&npz).unwrap().into_iter().collect();
        let mut keys: Vec<&str> = got.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["crop_ltrb", "latents", "latents_flipped", "original_size"]
        );
        let ints = |k: &str| got[k].to_vec1::<i64>().unwrap();
        assert_eq!(
            ints("original_size"),
            [row.width.unwrap(), row.height.unwrap()]
        );
        let (bw, bh) = (row.bucket_w.unwrap(), row.bucket_h.unwrap());
        let (rw, rh) = (row.resized_w.unwrap(), row.resized_h.unwrap());
        let (l, t) = (
            row.crop_left_resized.unwrap(),
            row.crop_top_resized.unwrap(),
        );
        let ltrb = ints("crop_ltrb");
        assert_eq!((ltrb[0], ltrb[1]), (l, t), "the true crop");
        // kohya's mirrored crop (`bucket − right`) is what the mirrored
        // image loses on its left: the right margin of the crop.
        assert_eq!(bw - ltrb[2], rw - bw - l);
        assert_eq!(bh - ltrb[3], rh - bh - t);
        if l != rw - bw - l {
            asymmetric += 1;
        }
        let mut img = image::open(ds.join(bucket_path)).unwrap().into_rgb8();
        assert_eq!((img.width() as i64, img.height() as i64), (bw, bh));
        for (key, mirror) in [("latents", false), ("latents_flipped", true)] {
            if mirror {
                image::imageops::flip_horizontal_in_place(&mut img);
            }
            let x = crate::pipeline::latent::from_rgb8(&img, &Device::Cpu).unwrap();
            let want = vae.encode(&x).unwrap().squeeze(0).unwrap();
            let have = &got[key];
            assert_eq!(have.dtype(), DType::F32);
            assert_eq!(have.dims(), [4, bh as usize / 8, bw as usize / 8]);
            assert_eq!(have.dims(), want.dims());
            assert!(
                max_abs(&(have - &want).unwrap()) <= 1e-5 * max_abs(&want),
                "{key}"
            );
        }
        assert!(
            max_abs(&(&got["latents"] - &got["latents_flipped"]).unwrap()) > 0.0,
            "the mirrored latents are the same"
        );
        npz_bytes.push((npz.clone(), fs::read(&npz).unwrap()));
    }
    assert_eq!(npz_bytes.len(), 3);
    assert!(asymmetric >= 1, "no asymmetric crop was tested");

    // Again: everything from the cache, the same files. Rows a killed
    // run wrote the files of but not yet the rows (here: deleted) are
    // recorded from the files found, under the run that finds them.
    let latent_rows = |m: &Manifest| -> (i64, i64) {
        m.conn()
            .query_row(
                "SELECT count(*), count(DISTINCT run_id) FROM cache_entries WHERE kind = 'latent'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    assert_eq!(latent_rows(&m), (6, 1));
    m.conn()
        .execute(
            "DELETE FROM cache_entries WHERE rowid IN (SELECT rowid FROM cache_entries WHERE kind = 'latent' LIMIT 2)",
            [],
        )
        .unwrap();
    let r = run_with(&cfg, &mut m, &Ctx::quiet(), Some(&src)).unwrap();
    assert_eq!((r.latents_encoded, r.latents_cached), (0, 6), "{r:?}");
    assert_eq!(latent_rows(&m), (6, 2));
    for (p, bytes) in &npz_bytes {
        assert_eq!(&fs::read(p).unwrap(), bytes, "{}", p.display());
    }

    // The same VAE as a standalone file (no `first_stage_model.` prefix):
    // its own cache entries, the same latents; without --flip-latents no
    // `latents_flipped`.
    let vae_file = d.path().join("vae.safetensors");
    let vae_tensors: std::collections::HashMap<String, Tensor> = ck
        .entries()
        .keys()
        .filter_map(|k| {
            let short = k.strip_prefix("first_stage_model.")?;
            Some((
                short.to_string(),
                ck.tensor(k, DType::F32, &Device::Cpu).unwrap(),
            ))
        })
        .collect();
    candle_core::safetensors::save(&vae_tensors, &vae_file).unwrap();
    let standalone = LatentSource::load(&vae_file, &Device::Cpu, DType::F32).unwrap();
    let out = d.path().join("plain");
    let plain = ExportConfig {
        latents: Some(vae_file),
        out: Some(out.clone()),
        ..Default::default()
    };
    let r = run_with(&plain, &mut m, &Ctx::quiet(), Some(&standalone)).unwrap();
    assert_eq!((r.latents_encoded, r.latents_cached), (3, 0), "{r:?}");
    for (p, _) in &npz_bytes {
        let q = out.join("1_eps2v").join(p.file_name().unwrap());
        let a: std::collections::HashMap<String, Tensor> =
            Tensor::read_npz(p).unwrap().into_iter().collect();
        let b: std::collections::HashMap<String, Tensor> =
            Tensor::read_npz(&q).unwrap().into_iter().collect();
        assert!(!b.contains_key("latents_flipped"));
        assert_eq!(b.len(), 3);
        for k in ["latents", "original_size", "crop_ltrb"] {
            let values = |t: &Tensor| -> Vec<f64> {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(values(&a[k]), values(&b[k]), "{k}");
            assert_eq!(a[k].dims(), b[k].dims());
        }
    }
}

/// An image the VAE cannot read is its own item's failure: its `.npz` is
/// listed as not written, the other items get theirs.
#[test]
fn an_unreadable_bucket_image_fails_only_its_npz() {
    use candle_core::{DType, Device};

    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    import_patterns(d.path(), &mut m, "a", &[(96, 64), (64, 64), (72, 64)]);
    crate::train::testkit::bucket_all(&mut m).unwrap();
    let rows = load_rows(&m, true).unwrap();
    let (broken, resized, good) = (&rows[0], &rows[2], &rows[1]);
    fs::write(ds.join(broken.bucket_path.as_ref().unwrap()), b"not a png").unwrap();
    // A valid image of another size than its bucket (replaced by hand).
    let other = ds.join(resized.bucket_path.as_ref().unwrap());
    let _ = fs::remove_file(&other);
    image::RgbImage::new(48, 64).save(&other).unwrap();
    let model = tiny_model(d.path());
    let src = LatentSource::load(&model, &Device::Cpu, DType::F32).unwrap();
    let cfg = ExportConfig {
        latents: Some(model),
        flip_latents: true,
        ..Default::default()
    };
    let r = run_with(&cfg, &mut m, &Ctx::quiet(), Some(&src)).unwrap();
    assert_eq!((r.written, r.latents_written), (3, 1), "{r:?}");
    assert_eq!(r.failed.len(), 2, "{r:?}");
    for (row, why) in [
        (broken, "rerun `eps2v bucket`"),
        (resized, "is 48x64, its bucket is 64x64"),
    ] {
        let stem = &row.sha256[..16];
        let line = r
            .failed
            .iter()
            .find(|f| f.starts_with(&format!("{stem}.npz: ")));
        assert!(line.is_some_and(|l| l.contains(why)), "{why}: {r:?}");
        assert!(!r.out.join(format!("1_eps2v/{stem}.npz")).exists());
    }
    assert!(r
        .out
        .join(format!("1_eps2v/{}.npz", &good.sha256[..16]))
        .exists());
}

/// The toy model's VAE (8 latent channels) is refused: kohya's SDXL UNet
/// takes 4.
#[test]
fn a_vae_that_is_not_sdxl_shaped_is_refused() {
    let toy = crate::toy::model_or_default(None).unwrap();
    let e = LatentSource::load(&toy, &candle_core::Device::Cpu, candle_core::DType::F32)
        .err()
        .unwrap();
    assert!(e.to_string().contains("8-channel latents"), "{e}");
}

/// kohya's flags: a resolution whose area covers the largest bucket, the
/// largest usual step dividing every side, and a warning when no step
/// kohya's SDXL trainer allows does.
#[test]
fn kohya_flags_cover_the_largest_bucket() {
    let (f, w) = kohya_flags(&[(1024, 1024), (832, 1216), (1536, 640)]).unwrap();
    assert!(
        f.contains("--resolution 1024 --bucket_reso_steps 64")
            && !f.contains("min_bucket_reso")
            && !f.contains("max_bucket_reso"),
        "{f}"
    );
    assert!(w.is_none());
    let (f, _) = kohya_flags(&[(1152, 1152)]).unwrap();
    assert!(
        f.contains("--resolution 1152") && f.contains("--max_bucket_reso 1152"),
        "{f}"
    );
    let (_, w) = kohya_flags(&[(96, 80)]).unwrap();
    assert!(w.unwrap().contains("multiples of 16 only"));
    assert!(kohya_flags(&[]).is_none());
}

/// The largest absolute value of `t`.
fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A seeded random tiny SDXL checkpoint (4-channel VAE) in `dir`.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny.safetensors");
    let opts = crate::pipeline::tiny::TinyOptions {
        seed: 3,
        v_pred_ztsnr: false,
    };
    crate::pipeline::tiny::write_random_checkpoint(&model, opts).unwrap();
    model
}

/// Import patterned PNGs of `sizes` (with sidecar captions) from
/// `dir/<sub>`.
fn import_patterns(dir: &Path, m: &mut Manifest, sub: &str, sizes: &[(u32, u32)]) {
    use crate::stages::import::{self, ImportConfig};
    let src = dir.join(sub);
    fs::create_dir_all(&src).unwrap();
    for (k, (w, h)) in sizes.iter().enumerate() {
        let p = src.join(format!("{k}.png"));
        let c = k as u32 + 7 * sub.len() as u32;
        image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([
                (x * 7 + c * 40) as u8,
                (y * 5) as u8,
                ((x * y + c) % 251) as u8,
            ])
        })
        .save(&p)
        .unwrap();
        fs::write(src.join(format!("{k}.txt")), format!("shape {k}")).unwrap();
    }
    let cfg = ImportConfig {
        from: src,
        limits: Default::default(),
        batch: 16,
    };
    import::run(&cfg, m, &Ctx::quiet()).unwrap();
}

/// The latent flags go with the kohya format and a VAE.
#[test]
fn latent_flags_need_kohya_and_a_vae() {
    let d = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(&d.path().join("ds")).unwrap();
    let flip_only = ExportConfig {
        flip_latents: true,
        ..Default::default()
    };
    let e = run(&flip_only, &mut m, &Ctx::quiet()).unwrap_err();
    assert!(e.to_string().contains("add --latents"), "{e}");
    let parquet = ExportConfig {
        format: ExportFormat::Parquet,
        latents: Some("model.safetensors".into()),
        ..Default::default()
    };
    let e = run(&parquet, &mut m, &Ctx::quiet()).unwrap_err();
    assert!(e.to_string().contains("use --format kohya"), "{e}");
    let no_vae = ExportConfig {
        latents: Some("model.safetensors".into()),
        ..Default::default()
    };
    let e = run(&no_vae, &mut m, &Ctx::quiet()).unwrap_err();
    assert!(e.to_string().contains("was not loaded"), "{e}");
    // A table written under the other format's name is refused.
    for (format, out) in [
        (ExportFormat::Jsonl, "rows.parquet"),
        (ExportFormat::Parquet, "rows.jsonl"),
    ] {
        let c = ExportConfig {
            format,
            out: Some(d.path().join(out)),
            ..Default::default()
        };
        let e = run(&c, &mut m, &Ctx::quiet()).unwrap_err().to_string();
        assert!(e.contains("name it for the format"), "{e}");
    }
    // Regression: a user's own .jsonl (or .parquet) was replaced: only an
    // earlier export of that format is.
    for (format, out, theirs) in [
        (
            ExportFormat::Jsonl,
            "mine.jsonl",
            &b"{\"prompt\": \"a cat\"}\n"[..],
        ),
        (
            ExportFormat::Parquet,
            "mine.parquet",
            &b"PAR1 not a table"[..],
        ),
    ] {
        let out = d.path().join(out);
        std::fs::write(&out, theirs).unwrap();
        let c = ExportConfig {
            format,
            out: Some(out.clone()),
            ..Default::default()
        };
        let e = run(&c, &mut m, &Ctx::quiet()).unwrap_err().to_string();
        assert!(e.contains("not an earlier eps2v"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), theirs);
        // Made by export, it is replaced on the next one.
        std::fs::remove_file(&out).unwrap();
        run(&c, &mut m, &Ctx::quiet()).unwrap();
        run(&c, &mut m, &Ctx::quiet()).unwrap();
    }
}

/// `--latents` from an SD 1.x checkpoint (same VAE layout, other weights)
/// is refused: kohya would train SDXL on another VAE's latents.
#[test]
fn latents_from_an_sd1_checkpoint_are_refused() {
    use crate::models::sdxl::checkpoint::{save_tensors, SaveOptions};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sd15.safetensors");
    let t =
        candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    save_tensors(
        &p,
        &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                t.clone(),
            ),
            (
                "model.diffusion_model.input_blocks.0.0.weight".into(),
                t.clone(),
            ),
            ("first_stage_model.encoder.conv_in.weight".into(), t),
        ],
        &SaveOptions::default(),
    )
    .unwrap();
    let e = latents::LatentSource::load(&p, &candle_core::Device::Cpu, candle_core::DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Stable Diffusion 1.x") && e.contains("must come from the SDXL VAE"),
        "{e}"
    );
}
