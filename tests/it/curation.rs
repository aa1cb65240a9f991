//! Curation end to end over generated images: import → dedupe → bucket →
//! export → inspect, resume after `kill -9`, idempotent reruns. (The
//! bundled `fixtures/images/` with exact counts: `fixtures_chain.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eps2v::manifest::Manifest;
use eps2v::stages::{self, Ctx};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn count(m: &Manifest, sql: &str) -> i64 {
    m.conn().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Write `n` distinct images (gradient + random blocks + noise) to `dir`.
fn synth_images(dir: &Path, n: usize, side: u32, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for k in 0..n {
        let w = side + (k as u32 % 3) * 8;
        let blocks: Vec<(u32, u32, u32, u32, [u8; 3])> = (0..4)
            .map(|_| {
                let (x, y) = (rng.random_range(0..w), rng.random_range(0..side));
                let (bw, bh) = (
                    rng.random_range(w / 6..w / 2),
                    rng.random_range(side / 6..side / 2),
                );
                (x, y, bw, bh, [rng.random(), rng.random(), rng.random()])
            })
            .collect();
        let (a, b): (u8, u8) = (rng.random(), rng.random());
        let img = RgbImage::from_fn(w, side, |x, y| {
            for &(bx, by, bw, bh, c) in &blocks {
                if x >= bx && x < bx + bw && y >= by && y < by + bh {
                    return Rgb(c);
                }
            }
            let n: u8 = rng.random_range(0..16);
            Rgb([
                a.wrapping_add((x / 2) as u8).wrapping_add(n),
                b.wrapping_add((y / 2) as u8),
                n,
            ])
        });
        img.save(dir.join(format!("img_{k:05}.png"))).unwrap();
    }
}

fn import(m: &mut Manifest, from: &Path) -> stages::import::ImportReport {
    let cfg = stages::import::ImportConfig {
        from: from.to_path_buf(),
        ..Default::default()
    };
    stages::import::run(&cfg, m, &Ctx::quiet()).unwrap()
}

#[test]
fn import_kill9_or_ctrl_c_then_resume_loses_and_doubles_nothing() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    synth_images(&src, 300, 96, 7);
    // Reference: a clean import.
    let clean = work.path().join("clean");
    let mut mc = Manifest::init(&clean).unwrap();
    let rc = import(&mut mc, &src);
    assert_eq!(rc.imported, 300);

    // kill -9, then Ctrl-C (SIGINT: stops after the batch in hand, exit 130).
    for ctrl_c in [false, true] {
        let mut killed_midway = false;
        for attempt in 0..5 {
            let ds = work.path().join(format!("ds{attempt}-{ctrl_c}"));
            let st = Command::new(bin())
                .args(["init"])
                .arg(&ds)
                .status()
                .unwrap();
            assert!(st.success());
            let mut child = Command::new(bin())
                .args(["--json", "import"])
                .arg(&ds)
                .arg("--from")
                .arg(&src)
                .args(["--batch", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Kill as soon as some (not all) items are committed.
            let t0 = Instant::now();
            loop {
                let n = Manifest::open_read_only(&ds)
                    .ok()
                    .map(|m| count(&m, "SELECT count(*) FROM items"))
                    .unwrap_or(0);
                if n > 0 || t0.elapsed() > Duration::from_secs(60) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if ctrl_c {
                let pid = child.id().to_string();
                assert!(Command::new("kill")
                    .args(["-INT", &pid])
                    .status()
                    .unwrap()
                    .success());
            } else {
                child.kill().unwrap(); // SIGKILL
            }
            let code = child.wait().unwrap().code();
            let m = Manifest::open(&ds).unwrap();
            let n = count(&m, "SELECT count(*) FROM items");
            if n > 0 && n < 300 {
                killed_midway = true;
                if ctrl_c {
                    // Stopped, not killed: the row says so.
                    assert_eq!(code, Some(130));
                    let (status, interrupted): (String, i64) = m
                        .conn()
                        .query_row(
                            "SELECT status, json_extract(counts_json, '$.interrupted') FROM runs \
                         WHERE stage = 'import' ORDER BY id DESC LIMIT 1",
                            [],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .unwrap();
                    assert_eq!((status.as_str(), interrupted), ("failed", 1));
                }
            }
            drop(m);
            let out = Command::new(bin())
                .args(["--json", "import"])
                .arg(&ds)
                .arg("--from")
                .arg(&src)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let m = Manifest::open(&ds).unwrap();
            assert_eq!(m.integrity_check().unwrap(), "ok");
            assert_eq!(count(&m, "SELECT count(*) FROM items"), 300);
            assert_eq!(count(&m, "SELECT count(*) FROM sources"), 300);
            assert_eq!(count(&m, "SELECT count(*) FROM hashes"), 300);
            assert_eq!(count(&m, "SELECT count(DISTINCT sha256) FROM items"), 300);
            // Same content as the clean import.
            let shas =
                |m: &Manifest| -> Vec<String> {
                    let mut st = m
                .conn()
                .prepare("SELECT sha256 || phash FROM items JOIN hashes ON item_id = id ORDER BY 1")
                .unwrap();
                    st.query_map([], |r| r.get(0))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect()
                };
            assert_eq!(shas(&m), shas(&mc));
            // No stray temp files left next to the images.
            let files = walk(&ds.join("images"));
            assert_eq!(
                files.len(),
                300,
                "{:?}",
                files.iter().take(5).collect::<Vec<_>>()
            );
            if killed_midway {
                break;
            }
        }
        assert!(
            killed_midway,
            "import finished before it could be killed in 5 attempts (Ctrl-C: {ctrl_c})"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn chain_dedupe_bucket_export_inspect_on_generated_images() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    synth_images(&src, 12, 200, 3);
    // Near duplicate: a downscaled copy of image 0; exact-pixel duplicate:
    // image 1 re-encoded as a different PNG (other bytes, same pixels).
    let im0 = image::open(src.join("img_00000.png")).unwrap();
    im0.resize(150, 150, image::imageops::FilterType::Lanczos3)
        .save(src.join("near_copy.png"))
        .unwrap();
    let im1 = image::open(src.join("img_00001.png")).unwrap().to_rgba8();
    im1.save(src.join("same_pixels_rgba.png")).unwrap();
    // Too small for any bucket without a big upscale.
    synth_images(&work.path().join("small"), 1, 40, 9);
    std::fs::rename(
        work.path().join("small/img_00000.png"),
        src.join("thumbnail.png"),
    )
    .unwrap();
    // Not in name order: export keeps the order the caption wrote its tags in.
    std::fs::write(src.join("img_00002.txt"), "solo, red circle, 1girl").unwrap();

    let ds = work.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let ri = import(&mut m, &src);
    assert_eq!(ri.imported, 15, "{ri:?}");

    // Dry run changes nothing.
    let cfg = stages::dedupe::DedupeConfig {
        dry_run: true,
        ..Default::default()
    };
    let dry = stages::dedupe::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(
        count(&m, "SELECT count(*) FROM items WHERE status = 'duplicate'"),
        0
    );
    assert_eq!((dry.exact, dry.near), (1, 1), "{dry:?}");
    let d1 = stages::dedupe::run(&Default::default(), &mut m, &Ctx::quiet()).unwrap();
    let d2 = stages::dedupe::run(&Default::default(), &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((d1.exact, d1.near, d1.kept), (d2.exact, d2.near, d2.kept));
    assert_eq!(
        count(&m, "SELECT count(*) FROM items WHERE status = 'duplicate'"),
        2
    );
    // The larger original is kept over its downscaled copy.
    let kept_src: String = m
        .conn()
        .query_row(
            "SELECT s.path FROM duplicates d JOIN sources s ON s.item_id = d.item_id
             WHERE d.kind = 'keeper' AND d.cluster_id IN (SELECT cluster_id FROM duplicates WHERE kind = 'near')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(kept_src.ends_with("img_00000.png"), "{kept_src}");

    let bcfg = stages::bucket::BucketConfig {
        buckets: stages::bucket::BucketSet::Kohya {
            resolution: 128,
            step: 32,
            min_side: 64,
            max_side: 256,
        },
        ..Default::default()
    };
    // A stop request before the first batch: nothing bucketed, the row
    // ended as interrupted, and the next run does everything.
    let stop = Ctx::quiet();
    stop.cancel();
    let e = stages::bucket::run(&bcfg, &mut m, &stop).unwrap_err();
    assert!(
        matches!(e, eps2v::Error::Interrupted(_))
            && e.to_string().contains("stopped after 0 of 13 items"),
        "{e}"
    );
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM runs WHERE stage = 'bucket' AND status = 'failed' \
             AND json_extract(counts_json, '$.interrupted')"
        ),
        1
    );
    let rb = stages::bucket::run(&bcfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(rb.bucketed, 12, "{rb:?}");
    assert_eq!(rb.rejected.get("too_small"), Some(&1), "{rb:?}");
    // Resumable: nothing left to do.
    let rb2 = stages::bucket::run(&bcfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((rb2.bucketed, rb2.already), (0, 12));
    // Every bucket row has its file at the bucket size, and a crop inside the image.
    let mut st = m
        .conn()
        .prepare("SELECT path, bucket_w, bucket_h, resized_w, resized_h, crop_left_resized, crop_top_resized, orig_w, orig_h, crop_left, crop_top FROM buckets")
        .unwrap();
    type Row = (String, [u32; 10]);
    let rows: Vec<Row> = st
        .query_map([], |r| {
            let mut v = [0u32; 10];
            for (k, x) in v.iter_mut().enumerate() {
                *x = r.get(k + 1)?;
            }
            Ok((r.get(0)?, v))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    drop(st);
    for (path, [bw, bh, rw, rh, cl, ct, ow, oh, clo, cto]) in rows {
        let img = image::open(ds.join(&path)).unwrap();
        assert_eq!((img.width(), img.height()), (bw, bh));
        assert!(rw >= bw && rh >= bh && cl + bw <= rw && ct + bh <= rh);
        assert!(clo < ow && cto < oh);
    }

    for (format, out) in [
        ("kohya", "exports/kohya"),
        ("hf", "exports/hf"),
        ("parquet", "exports/manifest.parquet"),
        ("jsonl", "exports/manifest.jsonl"),
    ] {
        let o = Command::new(bin())
            .args(["--json", "export"])
            .arg(&ds)
            .args(["--format", format])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(ds.join(out).exists(), "{format}");
    }
    // `--out` a bare file name: in the current folder.
    let cwd = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .current_dir(cwd.path())
        .arg("export")
        .arg(&ds)
        .args(["--format", "jsonl", "--out", "here.jsonl"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(cwd.path().join("here.jsonl").is_file());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.join("exports/kohya/meta_lat.json")).unwrap())
            .unwrap();
    assert_eq!(meta.as_object().unwrap().len(), 12);
    let captioned: Vec<_> = meta
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v["caption"] == "solo, red circle, 1girl")
        .collect();
    assert_eq!(captioned.len(), 1);
    // Its tags are the caption's own pieces: kohya would train them twice.
    assert!(captioned[0].get("tags").is_none(), "{}", captioned[0]);
    let kohya_dir = ds.join("exports/kohya/1_eps2v");
    assert_eq!(walk(&kohya_dir).len(), 13); // 12 images + 1 caption (no empty .txt)
    let jsonl = std::fs::read_to_string(ds.join("exports/manifest.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 15);
    let tagged: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| !v["tags"].is_null())
        .collect();
    assert_eq!(tagged.len(), 1);
    assert_eq!(tagged[0]["tags"], "solo, red circle, 1girl");
    let hf = std::fs::read_to_string(ds.join("exports/hf/train/metadata.jsonl")).unwrap();
    assert_eq!(hf.lines().count(), 12);

    // A stop request during an export leaves the previous export whole and
    // no staging folder behind; the row ends interrupted.
    let listing = || {
        let mut v = walk(&ds.join("exports"));
        v.extend(
            std::fs::read_dir(ds.join("exports"))
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
        v.sort();
        v
    };
    let before = listing();
    let e = stages::export::run(
        &stages::export::ExportConfig {
            format: stages::export::ExportFormat::Kohya,
            ..Default::default()
        },
        &mut m,
        &stop,
    )
    .unwrap_err();
    assert!(
        matches!(e, eps2v::Error::Interrupted(_))
            && e.to_string().contains("stopped after 0 of 12 files"),
        "{e}"
    );
    assert_eq!(listing(), before);
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM runs WHERE stage = 'export' AND status = 'failed' \
             AND json_extract(counts_json, '$.interrupted')"
        ),
        1
    );

    // --out: a folder that is not an earlier export is never replaced
    // (a kohya train_data_dir with another concept); an empty one, or an
    // earlier export's, is.
    let concepts = work.path().join("train_data");
    std::fs::create_dir_all(concepts.join("5_other")).unwrap();
    std::fs::write(concepts.join("5_other/a.txt"), "mine").unwrap();
    let export_to = |out: &Path, extra: &[&str]| {
        Command::new(bin())
            .args(["export"])
            .arg(&ds)
            .args(["--format", "kohya", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = export_to(&concepts, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not an earlier eps2v export"), "{err}");
    assert_eq!(
        std::fs::read_to_string(concepts.join("5_other/a.txt")).unwrap(),
        "mine"
    );
    let mine = concepts.join("eps2v");
    for _ in 0..2 {
        let o = export_to(&mine, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(mine.join("1_eps2v").is_dir() && concepts.join("5_other/a.txt").is_file());
    // A file where a folder export goes, and zero repeats.
    let o = export_to(&concepts.join("5_other/a.txt"), &[]);
    assert_eq!(o.status.code(), Some(2));
    let o = export_to(&mine, &["--repeats", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--repeats 0"));

    // An export that cannot write ends its row `failed` with why (not
    // `running` until the next export finds it), and inspect says so.
    let blocker = work.path().join("a_file");
    std::fs::write(&blocker, "").unwrap();
    let o = Command::new(bin())
        .arg("export")
        .arg(&ds)
        .args(["--format", "jsonl", "--out"])
        .arg(blocker.join("manifest.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = Command::new(bin())
        .args(["--json", "inspect"])
        .arg(&ds)
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let newest = &r["runs"]["rows"][0];
    assert_eq!(
        (&newest[1], &newest[2]),
        (&"export".into(), &"failed".into()),
        "{newest}"
    );
    let why = newest[5].as_str().unwrap_or_default();
    assert!(
        why.starts_with("stopped on an error: ") && why.contains("a_file"),
        "{why}"
    );

    // inspect --sql is read-only; writes are refused with exit code 2.
    let o = Command::new(bin())
        .args(["--json", "inspect"])
        .arg(&ds)
        .args([
            "--sql",
            "SELECT status, count(*) AS n FROM items GROUP BY 1 ORDER BY 1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["rows"][0], serde_json::json!(["duplicate", 2]));
    let o = Command::new(bin())
        .args(["inspect"])
        .arg(&ds)
        .args(["--sql", "DELETE FROM items"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("read-only"));
    // An empty statement, and a --top past what SQLite takes, are named.
    for (args, want) in [
        (["--sql", " ; "], "--sql: empty statement"),
        (["--top", "9223372036854775808"], "--top"),
    ] {
        let o = Command::new(bin())
            .args(["inspect"])
            .arg(&ds)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want) && !err.contains("mismatch"), "{err}");
    }
    let o = Command::new(bin())
        .args(["inspect"])
        .arg(&ds)
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("too_small") && s.contains("1girl"), "{s}");
}

/// Regressions: a file edited in place at a known path left the item of
/// its old content `ok` (both versions trained); a sidecar re-read kept
/// the tags it no longer has; a source folder holding the dataset took
/// the dataset's own files for new images.
#[test]
fn reimports_follow_edits_and_skip_the_dataset_itself() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    synth_images(&src, 2, 64, 11);
    std::fs::write(src.join("img_00000.txt"), "red hair, watermark").unwrap();
    let ds = src.join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    assert_eq!(import(&mut m, &src).imported, 2);
    let tags = |m: &Manifest| -> Vec<String> {
        let mut st = m
            .conn()
            .prepare("SELECT tag FROM tags WHERE source = 'sidecar_txt' ORDER BY pos")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    assert_eq!(tags(&m), ["red hair", "watermark"]);
    // The sidecar edited, the image not: read again, the tag is gone.
    std::fs::write(src.join("img_00000.txt"), "red hair").unwrap();
    let r = import(&mut m, &src);
    assert_eq!((r.imported, r.already_imported), (0, 1), "{r:?}");
    assert_eq!(tags(&m), ["red hair"]);
    // Removed: its caption and tags go too; nothing changed: nothing read.
    std::fs::remove_file(src.join("img_00000.txt")).unwrap();
    import(&mut m, &src);
    assert!(tags(&m).is_empty());
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM captions WHERE source = 'sidecar_txt'"
        ),
        0
    );
    assert_eq!(import(&mut m, &src).already_imported, 2);
    // The image edited in place: the old content's item is set aside.
    let other = work.path().join("other");
    synth_images(&other, 1, 72, 99);
    std::fs::copy(other.join("img_00000.png"), src.join("img_00001.png")).unwrap();
    let r = import(&mut m, &src);
    assert_eq!(r.imported, 1, "{r:?}");
    assert_eq!(
        count(&m, "SELECT count(*) FROM items WHERE status = 'ok'"),
        2
    );
    let reason: String = m
        .conn()
        .query_row(
            "SELECT reason FROM items WHERE status = 'rejected'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        reason.starts_with("superseded: ") && reason.contains("img_00001.png changed"),
        "{reason}"
    );
    // Nothing under ds/ (its images/) was taken for a new image.
    assert_eq!(count(&m, "SELECT count(*) FROM items"), 3);
}

#[test]
fn missing_dataset_is_a_usage_error_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["dedupe"])
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("eps2v init"));
}

/// The import summary keeps stderr to one clean line per rejected file
/// (`rejected PATH: reason`): no panic messages or backtraces from decoders,
/// even with `RUST_BACKTRACE` set.
#[test]
fn import_stderr_has_one_line_per_rejected_file() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let o = Command::new(bin())
        .arg("import")
        .arg(&ds)
        .arg("--from")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/images"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let m = Manifest::open(&ds).unwrap();
    let rejected = count(&m, "SELECT count(*) FROM items WHERE status = 'rejected'");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len() as i64, rejected, "{err}");
    for l in &lines {
        assert!(l.starts_with("rejected ") && l.contains(": "), "{err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// Exported without bucketing (kohya then buckets itself), the bundled
/// images reach the trainer as we decoded them: read the way sd-scripts
/// reads them (no EXIF orientation), every file has the size `meta_lat.json`
/// gives and no alpha, and no file is of a format its DreamBooth loader
/// skips; plain PNG / JPEG / WebP files go out as they are.
#[test]
fn unbucketed_export_holds_the_pixels_import_decoded() {
    let work = tempfile::tempdir().unwrap();
    let ds = work.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    import(
        &mut m,
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/images"),
    );
    let r = stages::export::run(
        &stages::export::ExportConfig {
            format: stages::export::ExportFormat::Kohya,
            ..Default::default()
        },
        &mut m,
        &Ctx::quiet(),
    )
    .unwrap();
    assert!(r.converted >= 5, "{r:?}"); // orient6/8, sticker, gif, bmp, tiff, …
    assert!(r.converted < r.written, "{r:?}");
    let out = ds.join("exports/kohya");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta_lat.json")).unwrap()).unwrap();
    let mut linked = 0;
    for (name, entry) in meta.as_object().unwrap() {
        let p = out.join("1_eps2v").join(name);
        let ext = p.extension().unwrap().to_str().unwrap().to_string();
        assert!(
            ["png", "jpg", "jpeg", "webp"].contains(&ext.as_str()),
            "{name}"
        );
        // image::open applies no EXIF orientation, like PIL's Image.open.
        let img = image::open(&p).unwrap();
        assert_eq!(
            serde_json::json!([img.width(), img.height()]),
            entry["image_size"],
            "{name}"
        );
        assert!(!img.color().has_alpha(), "{name}");
        if ext != "png" {
            linked += 1;
        }
    }
    assert!(linked > 0, "plain JPEG / WebP files are linked as they are");
}
