use super::*;

/// A content-addressed file of the wrong length (left empty by a host
/// crash) is written again; one of the right length is kept.
#[test]
fn an_existing_file_of_another_length_is_rewritten() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("images/ab/ab.png");
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, b"").unwrap();
    write_atomic_if_absent(&p, b"pixels").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"pixels");
    fs::write(&p, b"PIXELS").unwrap();
    write_atomic_if_absent(&p, b"pixels").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"PIXELS", "same length: kept");
}

/// Sidecars are read only from regular files of caption size: a FIFO
/// would block the import forever, a huge file is not a caption.
#[cfg(unix)]
#[test]
fn only_caption_sized_regular_files_are_sidecars() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.png");
    fs::write(d.path().join("a.caption"), "red hair").unwrap();
    let big = d.path().join("big.bin");
    fs::write(&big, vec![b'x'; MAX_SIDECAR_BYTES as usize + 1]).unwrap();
    std::os::unix::fs::symlink(&big, d.path().join("a.txt")).unwrap();
    assert_eq!(
        sidecar_captions(&img),
        vec![("sidecar_caption", "red hair".to_string())]
    );
    let fifo = d.path().join("b.txt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    if made {
        assert!(sidecar_captions(&d.path().join("b.png")).is_empty());
    }
    // The too-large one is said, not dropped without a word.
    let (_, problems) = read_sidecars(&img);
    assert!(
        problems.len() == 1 && problems[0].reason.contains("over 1048576"),
        "{problems:?}"
    );
}

/// Regression: a sidecar in UTF-16 (Notepad's "Unicode") or in cp1252
/// was dropped silently and its image trained on the class token. UTF-16
/// with its byte-order mark is read; other bytes are said.
#[test]
fn utf16_sidecars_are_read_and_other_encodings_said() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.png");
    let text = "café, naïve girl\r\n";
    let le: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    fs::write(d.path().join("a.txt"), le).unwrap();
    let be: Vec<u8> = [0xFE, 0xFF]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
        .collect();
    fs::write(d.path().join("a.caption"), be).unwrap();
    let (caps, problems) = read_sidecars(&img);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        caps,
        vec![
            ("sidecar_txt", "café, naïve girl".to_string()),
            ("sidecar_caption", "café, naïve girl".to_string())
        ]
    );
    // cp1252 "café": not UTF-8, not UTF-16.
    fs::write(d.path().join("b.txt"), b"caf\xe9, girl").unwrap();
    fs::write(d.path().join("b.caption"), "\u{feff}1girl").unwrap();
    let (caps, problems) = read_sidecars(&d.path().join("b.png"));
    assert_eq!(caps, vec![("sidecar_caption", "1girl".to_string())]);
    assert!(
        problems.len() == 1
            && problems[0].path.ends_with("b.txt")
            && problems[0].reason.contains("not UTF-8"),
        "{problems:?}"
    );
}

#[test]
fn pre_1_9_sampler_names_are_stored_split() {
    assert_eq!(
        split_a1111_sampler("DPM++ 2M Karras"),
        ("DPM++ 2M", Some("Karras"))
    );
    assert_eq!(
        split_a1111_sampler("DPM++ 2M SDE Exponential"),
        ("DPM++ 2M SDE", Some("Exponential"))
    );
    assert_eq!(
        split_a1111_sampler("Euler SGM Uniform"),
        ("Euler", Some("SGM Uniform"))
    );
    for whole in ["Euler a", "DDIM", "DPM++ 2M", "Karras"] {
        assert_eq!(split_a1111_sampler(whole), (whole, None));
    }
    let old = generation_from_infotext(
        "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512",
        "png_text",
    );
    assert_eq!(
        (old.sampler.as_deref(), old.schedule.as_deref()),
        (Some("DPM++ 2M"), Some("Karras"))
    );
    // 1.9+: both given, taken as they are.
    let new = generation_from_infotext(
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512",
        "png_text",
    );
    assert_eq!(
        (new.sampler.as_deref(), new.schedule.as_deref()),
        (Some("DPM++ 2M"), Some("Karras"))
    );
}

#[test]
fn rerun_plan_redoes_changed_files_and_own_rejections_only() {
    let k = |size, mtime_ns, other| KnownSource {
        size,
        mtime_ns,
        rejected_under_other_limits: other,
        sidecars: Vec::new(),
        item_id: 1,
    };
    assert_eq!(plan_file(None, 10, 1), FilePlan::Process);
    assert_eq!(plan_file(Some(&k(10, 1, false)), 10, 1), FilePlan::Skip);
    assert_eq!(plan_file(Some(&k(10, 1, false)), 11, 1), FilePlan::Process);
    assert_eq!(plan_file(Some(&k(10, 1, false)), 10, 2), FilePlan::Process);
    assert_eq!(
        plan_file(Some(&k(10, 1, true)), 10, 1),
        FilePlan::Reconsider
    );
    // A file that vanished since the listing is processed (and fails there).
    assert_eq!(plan_file(Some(&k(10, 1, false)), -1, -1), FilePlan::Process);
}

/// Regression: `--max-pixels` above the default could never take effect for
/// large images, since the decoder's fixed 512 MiB budget refused them
/// first (a 100 MP RGBA image needs 400 MB, a 16-bit one 800 MB).
#[test]
fn a_raised_pixel_limit_raises_the_decode_budget() {
    let mut l = ImportLimits::default();
    let default_budget = l.max_alloc;
    l.set_max_pixels(10_000_000);
    assert_eq!((l.max_pixels, l.max_alloc), (10_000_000, default_budget));
    l.set_max_pixels(200_000_000);
    let d = DecodeLimits::from(l);
    assert_eq!(d.max_pixels, 200_000_000);
    assert!(
        d.max_alloc_bytes >= 200_000_000 * 8,
        "{}",
        d.max_alloc_bytes
    );
}

/// Regression: two copies of one image, one with a sidecar caption: the
/// copy without one removed the caption whenever it was imported after the
/// other. The caption now stays while any copy has it, and goes when none
/// has.
#[test]
fn a_caption_stays_while_any_copy_of_the_image_has_it() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8, y as u8, 3]));
    img.save(src.join("a.png")).unwrap();
    fs::copy(src.join("a.png"), src.join("b.png")).unwrap();
    fs::write(src.join("a.txt"), "red, circle").unwrap();
    let ds = d.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let cfg = ImportConfig {
        from: src.clone(),
        ..Default::default()
    };
    let captions = |m: &Manifest| -> i64 {
        m.conn()
            .query_row(
                "SELECT count(*) FROM captions WHERE source = 'sidecar_txt' AND text = 'red, circle'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(captions(&m), 1);
    // b changes (its mtime) and is imported again, after a: caption kept.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::copy(src.join("a.png"), src.join("b.png")).unwrap();
    run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(captions(&m), 1);
    // No copy has it any more: gone.
    fs::remove_file(src.join("a.txt")).unwrap();
    run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(captions(&m), 0);
}

/// Regressions: files whose names differ only in bytes that are not UTF-8
/// were stored under one lossy name, each import replacing the other; a
/// sidecar's byte-order mark and CRs stayed in the caption (the BOM glued
/// to the first tag); an image with both sidecars, and a copy of a
/// captioned image, were read again on every rerun.
#[test]
fn odd_names_and_sidecars_import_once_and_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let img =
        |v: u8| image::RgbImage::from_fn(16, 16, move |x, y| image::Rgb([x as u8, y as u8, v]));
    img(1).save(src.join("both.png")).unwrap();
    fs::write(
        src.join("both.txt"),
        "\u{feff}concept, bom tag\r\nsecond line\r\n",
    )
    .unwrap();
    fs::write(src.join("both.caption"), "red hair").unwrap();
    img(2).save(src.join("a.png")).unwrap();
    fs::copy(src.join("a.png"), src.join("copy_of_a.png")).unwrap();
    fs::write(src.join("a.txt"), "smile").unwrap();
    img(3).save(src.join("ansi.png")).unwrap();
    fs::write(src.join("ansi.txt"), b"caf\xe9").unwrap();
    #[cfg(unix)]
    let odd = {
        use std::os::unix::ffi::OsStrExt;
        let names: Vec<PathBuf> = [&b"bad\xffname.png"[..], &b"bad\xfename.png"[..]]
            .iter()
            .map(|n| src.join(std::ffi::OsStr::from_bytes(n)))
            .collect();
        for (k, p) in names.iter().enumerate() {
            let mut f = fs::File::create(p).unwrap();
            img(10 + k as u8)
                .write_to(&mut f, image::ImageFormat::Png)
                .unwrap();
        }
        names.len()
    };
    #[cfg(not(unix))]
    let odd = 0;
    let ds = d.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let cfg = ImportConfig {
        from: src.clone(),
        ..Default::default()
    };
    let r = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(r.imported, 3 + odd);
    let count =
        |m: &Manifest, sql: &str| -> i64 { m.conn().query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count(&m, "SELECT count(*) FROM items WHERE status = 'ok'"),
        3 + odd as i64
    );
    assert_eq!(count(&m, "SELECT count(*) FROM sources"), 4 + odd as i64);
    // The cp1252 sidecar is said, on the first import and on each rerun
    // that still cannot read it.
    let unread = |r: &ImportReport| -> Vec<String> {
        r.unread_captions
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(unread(&r), ["ansi.txt"]);
    let text: String = m
        .conn()
        .query_row(
            "SELECT text FROM captions WHERE source = 'sidecar_txt' AND text LIKE '%bom%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(text, "concept, bom tag\nsecond line");
    assert_eq!(
        count(&m, "SELECT count(*) FROM tags WHERE tag = 'concept'"),
        1
    );
    // A rerun with nothing changed reads nothing again.
    let again = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(
        (again.already_imported, again.imported, again.same_file),
        (r.found, 0, 0)
    );
    assert_eq!(unread(&again), ["ansi.txt"]);
    // The copy's caption goes when no copy has it any more: both read again.
    fs::remove_file(src.join("a.txt")).unwrap();
    let after = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(after.already_imported, r.found - 2);
    assert_eq!(
        count(&m, "SELECT count(*) FROM captions WHERE text = 'smile'"),
        0
    );
    assert_eq!(after.gone, 0);
    // A file deleted from the folder is said to be gone; its item stays.
    fs::remove_file(src.join("copy_of_a.png")).unwrap();
    let later = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(later.gone, 1);
    assert!(
        later.gone_examples[0].ends_with("copy_of_a.png"),
        "{:?}",
        later.gone_examples
    );
}
