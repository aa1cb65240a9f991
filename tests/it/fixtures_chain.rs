//! The curation chain on the bundled `fixtures/images/` with exact counts
//! (every status and reason, formats, sidecars, notes), the README quick
//! start as written (commands and exit codes), reruns with other settings
//! (a stage remakes its own rejections only), symbolic links, and the
//! export file contracts (Parquet = JSONL = `schemas/export_row.schema.json`,
//! kohya `meta_lat.json` + `.txt`, HF `metadata.jsonl`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use eps2v::manifest::Manifest;
use eps2v::stages::{self, Ctx};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    root().join("fixtures/images")
}

fn eps2v(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn count(m: &Manifest, sql: &str) -> i64 {
    m.conn().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// `(key, value)` rows of a two-column query, as strings.
fn pairs(m: &Manifest, sql: &str) -> Vec<(String, String)> {
    let mut st = m.conn().prepare(sql).unwrap();
    st.query_map([], |r| {
        let v: rusqlite::types::Value = r.get(1)?;
        let v = match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(t) => t,
            rusqlite::types::Value::Null => "NULL".into(),
            other => format!("{other:?}"),
        };
        Ok((r.get::<_, String>(0)?, v))
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

/// `("status:reason_code", count)` over all items, sorted.
fn status_counts(m: &Manifest) -> Vec<(String, String)> {
    pairs(
        m,
        "SELECT status || ':' || coalesce(substr(reason, 1, instr(reason, ':') - 1), ''), count(*)
         FROM items GROUP BY 1 ORDER BY 1",
    )
}

fn kohya_128() -> stages::bucket::BucketConfig {
    stages::bucket::BucketConfig {
        buckets: stages::bucket::BucketSet::Kohya {
            resolution: 128,
            step: 32,
            min_side: 64,
            max_side: 256,
        },
        ..Default::default()
    }
}

fn strs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn import_fixtures_counts_every_status_and_reason_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(dir.path()).unwrap();
    let cfg = stages::import::ImportConfig {
        from: fixtures(),
        ..Default::default()
    };
    let r = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    // Every rejected file is listed once with its reason (one stderr line
    // each in the CLI).
    assert_eq!(r.rejected_files.len(), r.rejected_total(), "{r:?}");
    assert!(
        r.rejected_files.iter().all(|f| f.reason.contains(':')),
        "{r:?}"
    );
    // 38 image files (by extension), 3 sidecars and the README are not images.
    assert_eq!(r.found, 38, "{r:?}");
    assert_eq!(
        (r.imported, r.same_file, r.already_imported, r.reconsidered),
        (33, 0, 0, 0)
    );
    let rejected: Vec<(&str, usize)> = r.rejected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        rejected,
        [
            ("empty", 1),
            ("too_large", 1),
            ("truncated", 2),
            ("unsupported", 1)
        ]
    );
    assert_eq!(
        (r.with_parameters, r.with_caption, r.wrong_extension),
        (6, 4, 1)
    );
    assert!(r.failed.is_empty() && r.skipped.total() == 0, "{r:?}");
    // The manifest says the same, per reason code and per file.
    assert_eq!(
        status_counts(&m),
        strs(&[
            ("ok:", "33"),
            ("rejected:empty", "1"),
            ("rejected:too_large", "1"),
            ("rejected:truncated", "2"),
            ("rejected:unsupported", "1"),
        ])
    );
    let by_file = |sql: &str| -> BTreeMap<String, String> {
        pairs(&m, sql)
            .into_iter()
            .map(|(p, v)| {
                let name = Path::new(&p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, v)
            })
            .collect()
    };
    let rejected_files = by_file(
        "SELECT s.path, substr(i.reason, 1, instr(i.reason, ':') - 1) FROM items i JOIN sources s ON s.item_id = i.id
         WHERE i.status = 'rejected'",
    );
    let want: BTreeMap<String, String> = [
        ("bomb.png", "too_large"),
        ("empty.png", "empty"),
        ("garbage.png", "unsupported"),
        ("truncated.jpg", "truncated"),
        ("truncated.png", "truncated"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(rejected_files, want);
    // Formats sniffed from content, BMP and TIFF included.
    assert_eq!(
        pairs(
            &m,
            "SELECT format, count(*) FROM items WHERE status = 'ok' GROUP BY 1 ORDER BY 1"
        ),
        strs(&[
            ("bmp", "1"),
            ("gif", "1"),
            ("jpeg", "9"),
            ("png", "18"),
            ("tiff", "1"),
            ("webp", "3"),
        ])
    );
    let sizes = by_file(
        "SELECT s.path, i.width || 'x' || i.height FROM items i JOIN sources s ON s.item_id = i.id
         WHERE i.format IN ('bmp', 'tiff') OR s.path LIKE '%orient%'",
    );
    assert_eq!(sizes["bitmap.bmp"], "150x100");
    assert_eq!(sizes["scan.tiff"], "100x150");
    assert_eq!(sizes["orient6.jpg"], "120x180");
    assert_eq!(sizes["orient8.jpg"], "120x180");
    // Sidecars: `.txt` and `.caption`, stored as captions and tags.
    assert_eq!(
        by_file(
            "SELECT s.path, c.source || '=' || c.text FROM captions c JOIN sources s ON s.item_id = c.item_id
             WHERE c.source LIKE 'sidecar%'"
        ),
        [
            ("photo.jpg", "sidecar_txt=landscape, 桜, no humans"),
            (
                "portrait_rgb.png",
                "sidecar_caption=a portrait photo with soft light"
            ),
            ("scene_rgb.jpg", "sidecar_txt=1girl, solo, outdoors, sunset"),
            ("scene_rgb.png", "sidecar_txt=1girl, solo, outdoors, sunset"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect::<BTreeMap<_, _>>()
    );
    assert_eq!(
        count(&m, "SELECT count(*) FROM tags WHERE source LIKE 'sidecar%'"),
        4 + 4 + 3 + 1 // scene_rgb.png, scene_rgb.jpg, photo.jpg, portrait_rgb.png (one phrase)
    );
    // The wrong extension is a note on the source, not a rejection.
    assert_eq!(
        by_file("SELECT path, note FROM sources WHERE note IS NOT NULL"),
        [(
            "png_named.jpg".to_string(),
            "wrong_extension: extension .jpg but content is png".to_string()
        )]
        .into_iter()
        .collect::<BTreeMap<_, _>>()
    );
    // A1111 parameters from PNG text chunks and EXIF UserComments.
    assert_eq!(
        pairs(
            &m,
            "SELECT origin, count(*) FROM generation GROUP BY 1 ORDER BY 1"
        ),
        strs(&[("exif_user_comment", "3"), ("png_text", "3")])
    );
    // Rerun: nothing new, nothing reconsidered.
    let again = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(
        (
            again.already_imported,
            again.imported,
            again.reconsidered,
            again.rejected.len()
        ),
        (38, 0, 0, 0)
    );
    assert_eq!(m.integrity_check().unwrap(), "ok");
}

/// The README's quick start, command for command, with its exit codes;
/// then the default SDXL bucket set (all too small) and a rerun with the
/// kohya settings: bucket decides again on its own rejections only.
#[test]
fn readme_quick_start_and_bucket_rerun_with_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let d = s(&demo);
    let kohya = [
        "--kohya-resolution",
        "128",
        "--step",
        "32",
        "--min-side",
        "64",
        "--max-side",
        "256",
    ];
    let code = |o: Output| o.status.code().unwrap();
    assert_eq!(code(eps2v(&["import", d, "--from", s(&fixtures())])), 1);
    assert_eq!(code(eps2v(&["dedupe", d])), 0);
    // Default SDXL list: every ok item is smaller than 1024² / 1.25.
    let o = eps2v(&["--json", "bucket", d]);
    assert_eq!(code(o.clone()), 1);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["bucketed"], 0);
    assert_eq!(r["rejected"]["too_small"], 29);
    // Other settings: bucket's own 29 rejections are decided again.
    let mut args = vec!["--json", "bucket", d];
    args.extend(kohya);
    let o = eps2v(&args);
    assert_eq!(code(o.clone()), 1);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["bucketed"].as_u64(), r["reconsidered"].as_u64()),
        (Some(27), Some(29))
    );
    assert_eq!(r["rejected"]["too_small"], 2);
    // Each rejection names the file it came from (on stderr too, below).
    let rejected_sources: Vec<String> = r["rejected_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            assert!(
                x["reason"].as_str().unwrap().starts_with("too_small"),
                "{x}"
            );
            x["source"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(rejected_sources.len(), 2, "{r}");
    assert!(rejected_sources
        .iter()
        .all(|p| p.starts_with(s(&fixtures()))));
    let m = Manifest::open(&demo).unwrap();
    assert_eq!(
        status_counts(&m),
        strs(&[
            ("duplicate:exact_duplicate", "1"),
            ("duplicate:near_duplicate", "3"),
            ("ok:", "27"),
            ("rejected:empty", "1"),
            ("rejected:too_large", "1"),
            ("rejected:too_small", "2"),
            ("rejected:truncated", "2"),
            ("rejected:unsupported", "1"),
        ])
    );
    // Import's rejections still carry import's run.
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM items i JOIN runs r ON r.id = i.status_run_id
             WHERE i.status = 'rejected' AND r.stage = 'import'"
        ),
        5
    );
    drop(m);
    // Same settings again: nothing to redo, the two rejections stand.
    let o = eps2v(&args);
    assert_eq!(code(o.clone()), 0);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            r["bucketed"].as_u64(),
            r["already"].as_u64(),
            r["still_rejected"].as_u64()
        ),
        (Some(0), Some(27), Some(2))
    );
    // --force redoes everything bucket decided, nothing else.
    let mut forced = args.clone();
    forced.push("--force");
    let r: Value = serde_json::from_slice(&eps2v(&forced).stdout).unwrap();
    assert_eq!(
        (
            r["bucketed"].as_u64(),
            r["rebucketed"].as_u64(),
            r["reconsidered"].as_u64()
        ),
        (Some(27), Some(27), Some(2))
    );
    // As text, each rejection is a line naming its file, as import's are.
    let o = eps2v(&forced[1..]);
    let err = String::from_utf8_lossy(&o.stderr);
    for src in &rejected_sources {
        assert!(err.contains(&format!("rejected {src}: too_small")), "{err}");
    }
    // The rest of the quick start.
    assert_eq!(code(eps2v(&["export", d, "--format", "kohya"])), 0);
    let o = eps2v(&["inspect", d]);
    assert_eq!(code(o.clone()), 0);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("too_small") && text.contains("128x128"),
        "{text}"
    );
    // The flags left off afterwards: the settings the buckets were made
    // with, so nothing is redone.
    let o = eps2v(&["bucket", d]);
    assert_eq!(code(o.clone()), 0);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("settings not given are bucket run ")
            && text.contains("kohya buckets at 128² (step 32, sides 64–256), center crop")
            && text.contains("0 items bucketed in")
            && text.contains("27 already bucketed with these settings"),
        "{text}"
    );
    // The SDXL list asked for: every bucket goes, and the summary says how
    // to get them back.
    let o = eps2v(&["bucket", d, "--sdxl"]);
    assert_eq!(code(o.clone()), 1);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("27 items bucketed before with other settings are rejected with these")
            && text.contains(": center crop, seed 0, max upscale 1.25\n"),
        "{text}"
    );
}

/// Import rejects what is over its limits; a rerun with other limits decides
/// again on those (and only those): bucket's rejections stay.
#[test]
fn import_rerun_with_other_limits_reconsiders_only_its_own_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(dir.path()).unwrap();
    let mut cfg = stages::import::ImportConfig {
        from: fixtures(),
        ..Default::default()
    };
    cfg.limits.max_side = 200;
    let r = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    let big = r.rejected["too_large"];
    assert_eq!(big, 9 + 1, "{r:?}"); // 9 images over 200 px + the bomb
    let b = stages::bucket::run(&kohya_128(), &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(b.rejected["too_small"], 2);
    // Same limits: nothing reconsidered.
    let r2 = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((r2.reconsidered, r2.already_imported), (0, 38));
    // Default limits: every rejection import made under the 200 px limit is
    // decided again (the 9 large images now pass; the broken files and the
    // bomb are rejected again, now by this run).
    cfg.limits = Default::default();
    let r3 = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(r3.reconsidered, big + 4, "{r3:?}");
    assert_eq!(r3.imported, big - 1, "{r3:?}");
    let rejected: Vec<(&str, usize)> = r3.rejected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        rejected,
        [
            ("empty", 1),
            ("too_large", 1),
            ("truncated", 2),
            ("unsupported", 1)
        ]
    );
    assert_eq!(r3.already_imported, 38 - big - 4);
    // A third run with the same limits: nothing left to decide.
    let r4 = stages::import::run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((r4.reconsidered, r4.already_imported), (0, 38), "{r4:?}");
    assert_eq!(
        count(&m, "SELECT count(*) FROM items WHERE status = 'ok'"),
        31
    );
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM items WHERE reason LIKE 'too_small%'"
        ),
        2
    );
    // The newly accepted items got their hashes and image files.
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM items i LEFT JOIN hashes h ON h.item_id = i.id
             WHERE i.status = 'ok' AND (h.item_id IS NULL OR i.path IS NULL)"
        ),
        0
    );
    // Bucket picks up the newly accepted items.
    let b2 = stages::bucket::run(&kohya_128(), &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((b2.bucketed, b2.still_rejected), (big - 1, 2), "{b2:?}");
}

/// Exact duplicates by pixels, near by pHash (and by dHash with `--hash
/// dhash`); the keeper is the larger, lossless, captioned original.
#[test]
fn dedupe_keeps_the_lossless_captioned_original() {
    let dir = tempfile::tempdir().unwrap();
    let d = s(dir.path());
    eps2v(&["import", d, "--from", s(&fixtures())]);
    let names = |m: &Manifest| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = pairs(
            m,
            "SELECT s.path, d.kind || ' of ' || (SELECT path FROM sources WHERE item_id = d.keeper_id)
             FROM duplicates d JOIN sources s ON s.item_id = d.item_id",
        )
        .into_iter()
        .map(|(a, b)| {
            let short = |p: &str| Path::new(p).file_name().unwrap().to_string_lossy().into_owned();
            let (kind, keeper) = b.split_once(" of ").unwrap();
            (short(&a), format!("{kind} of {}", short(keeper)))
        })
        .collect();
        v.sort();
        v
    };
    let want = strs(&[
        ("orient6.jpg", "keeper of orient6.jpg"),
        ("orient8.jpg", "near of orient6.jpg"),
        ("scene_rgb.jpg", "near of scene_rgb.png"),
        ("scene_rgb.png", "keeper of scene_rgb.png"),
        ("scene_rgb_recompressed.png", "exact of scene_rgb.png"),
        ("scene_rgb_small.png", "near of scene_rgb.png"),
    ]);
    for hash in ["phash", "dhash"] {
        let o = eps2v(&["--json", "dedupe", d, "--hash", hash]);
        assert_eq!(o.status.code(), Some(0), "{hash}");
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (
                r["considered"].as_u64(),
                r["clusters"].as_u64(),
                r["exact"].as_u64(),
                r["near"].as_u64(),
                r["kept"].as_u64()
            ),
            (Some(33), Some(2), Some(1), Some(3), Some(29)),
            "{hash}"
        );
        let m = Manifest::open(dir.path()).unwrap();
        assert_eq!(names(&m), want, "{hash}");
        let hash_used: String = m
            .conn()
            .query_row(
                "SELECT json_extract(config_json, '$.hash') FROM runs WHERE stage = 'dedupe' ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(hash_used, hash);
    }
    // The fixtures' near pairs are at distance 0 under both hashes, so give
    // two unrelated images the same dHash: only `--hash dhash` joins them.
    {
        let m = Manifest::open(dir.path()).unwrap();
        m.conn()
            .execute(
                "UPDATE hashes SET dhash = (SELECT h.dhash FROM hashes h JOIN sources s ON s.item_id = h.item_id
                                            WHERE s.path LIKE '%/wide_rgb.png')
                 WHERE item_id = (SELECT item_id FROM sources WHERE path LIKE '%/square_rgb.png')",
                [],
            )
            .unwrap();
    }
    let dry = |hash: &str| -> Value {
        serde_json::from_slice(&eps2v(&["--json", "dedupe", d, "--hash", hash, "--dry-run"]).stdout)
            .unwrap()
    };
    let (p, dh) = (dry("phash"), dry("dhash"));
    assert_eq!(
        (p["clusters"].as_u64(), p["near"].as_u64()),
        (Some(2), Some(3)),
        "{p}"
    );
    assert_eq!(
        (dh["clusters"].as_u64(), dh["near"].as_u64()),
        (Some(3), Some(4)),
        "{dh}"
    );
    assert_eq!(dh["dry_run"], true);
    // As text, each planned drop names the files the user imported.
    let o = eps2v(&["dedupe", d, "--hash", "dhash", "--dry-run"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let drops: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("would drop"))
        .collect();
    assert_eq!(drops.len(), 5, "{text}");
    assert!(
        drops.iter().any(|l| {
            let (a, b) = ("/square_rgb.png)", "/wide_rgb.png)");
            (l.contains(&format!("{a} (near duplicate of item")) && l.contains(b))
                || (l.contains(&format!("{b} (near duplicate of item")) && l.contains(a))
        }),
        "{text}"
    );
    // After caption: the tagger's tags and policy captions on every image,
    // the same scores on pixel-identical copies. The original with the
    // hand-written sidecar caption is still kept over its larger re-encode
    // (it used to lose to the file size once both had captions).
    let tagger = eps2v::toy::default_tagger_dir().unwrap();
    let o = eps2v(&["--json", "caption", d, "--tagger", s(&tagger)]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["tagged"].as_u64().unwrap() > 25, "{r}");
    assert_eq!(eps2v(&["dedupe", d]).status.code(), Some(0));
    let m = Manifest::open(dir.path()).unwrap();
    assert_eq!(names(&m), want);
}

#[cfg(unix)]
#[test]
fn import_follows_links_and_reports_what_it_skipped() {
    use std::os::unix::fs::symlink;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    // hub-cache style: links to files whose targets have no extension.
    let blobs = work.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::copy(fixtures().join("square_rgb.png"), blobs.join("9f2c")).unwrap();
    symlink(blobs.join("9f2c"), src.join("square.png")).unwrap();
    symlink(fixtures().join("wide_rgb.png"), src.join("sub/wide.png")).unwrap();
    // a linked folder, a loop back to the root, a dangling link
    let more = work.path().join("more");
    std::fs::create_dir_all(&more).unwrap();
    std::fs::copy(fixtures().join("grey.png"), more.join("grey.png")).unwrap();
    symlink(&more, src.join("linked")).unwrap();
    symlink(&src, src.join("sub/back_to_root")).unwrap();
    symlink(work.path().join("gone.png"), src.join("dangling.png")).unwrap();
    let ds = work.path().join("ds");
    let o = eps2v(&["--json", "import", s(&ds), "--from", s(&src)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["found"].as_u64(), r["imported"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(r["skipped"]["broken_links"], 1);
    assert_eq!(r["skipped"]["loops"].as_array().unwrap().len(), 1);
    assert!(r["skipped"]["loops"][0]
        .as_str()
        .unwrap()
        .ends_with("sub/back_to_root"));
    // The summary says what was skipped.
    let o = eps2v(&["import", s(&work.path().join("ds2")), "--from", s(&src)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("3 files found")
            && text.contains("1 broken links")
            && text.contains("1 link loops"),
        "{text}"
    );
}

/// Every export format, read back and checked against its contract.
#[test]
fn export_files_match_their_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path();
    let mut m = Manifest::init(ds).unwrap();
    let icfg = stages::import::ImportConfig {
        from: fixtures(),
        ..Default::default()
    };
    stages::import::run(&icfg, &mut m, &Ctx::quiet()).unwrap();
    stages::dedupe::run(&Default::default(), &mut m, &Ctx::quiet()).unwrap();
    stages::bucket::run(&kohya_128(), &mut m, &Ctx::quiet()).unwrap();
    let export = |m: &mut Manifest, format| {
        let cfg = stages::export::ExportConfig {
            format,
            ..Default::default()
        };
        stages::export::run(&cfg, m, &Ctx::quiet()).unwrap()
    };
    use stages::export::ExportFormat as F;
    let pq = export(&mut m, F::Parquet);
    let jl = export(&mut m, F::Jsonl);
    let ko = export(&mut m, F::Kohya);
    let hf = export(&mut m, F::Hf);
    assert_eq!((pq.written, jl.written), (38, 38));
    assert_eq!((ko.written, hf.written, ko.missing), (27, 27, 0));

    // --- JSONL rows follow the schema -------------------------------------
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/export_row.schema.json")).unwrap(),
    )
    .unwrap();
    let props = schema["properties"].as_object().unwrap();
    let rows: Vec<serde_json::Map<String, Value>> =
        std::fs::read_to_string(ds.join("exports/manifest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(rows.len(), 38);
    for row in &rows {
        for req in schema["required"].as_array().unwrap() {
            assert!(row.contains_key(req.as_str().unwrap()), "{req} missing");
        }
        for (k, v) in row {
            let p = props
                .get(k)
                .unwrap_or_else(|| panic!("column {k} not in the schema"));
            if let Some(e) = p.get("enum") {
                assert!(e.as_array().unwrap().contains(v), "{k}: {v}");
                continue;
            }
            let types: Vec<&str> = match &p["type"] {
                Value::String(t) => vec![t.as_str()],
                Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
                other => panic!("{k}: type {other}"),
            };
            let ok = types.iter().any(|t| match *t {
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "string" => v.is_string(),
                "null" => v.is_null(),
                _ => false,
            });
            assert!(ok, "{k}: {v} is not {types:?}");
        }
    }
    let counts = |pred: &dyn Fn(&serde_json::Map<String, Value>) -> bool| {
        rows.iter().filter(|r| pred(r)).count()
    };
    assert_eq!(counts(&|r| r["status"] == "ok"), 27);
    assert_eq!(counts(&|r| r["status"] == "duplicate"), 4);
    assert_eq!(counts(&|r| r["bucket_path"].is_string()), 27);
    assert_eq!(counts(&|r| r["caption"].is_string()), 10);
    // A1111's "DPM++ 2M" + "Schedule type: Karras" keeps both.
    assert!(
        counts(&|r| r["sampler"] == "DPM++ 2M" && r["schedule"] == "Karras") >= 1,
        "no row with the A1111 fixture's sampler and schedule"
    );

    // --- Parquet = JSONL, row by row, column by column ---------------------
    {
        use polars::prelude::*;
        let f = std::fs::File::open(ds.join("exports/manifest.parquet")).unwrap();
        let df = ParquetReader::new(f).finish().unwrap();
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let schema_names: Vec<String> = props.keys().cloned().collect();
        assert_eq!(
            names.iter().collect::<BTreeSet<_>>(),
            schema_names.iter().collect::<BTreeSet<_>>()
        );
        assert_eq!(df.height(), rows.len());
        for (i, row) in rows.iter().enumerate() {
            for name in &names {
                let av = df.column(name).unwrap().get(i).unwrap();
                let got = match av {
                    AnyValue::Null => Value::Null,
                    AnyValue::Int64(v) => Value::from(v),
                    AnyValue::Float64(v) => Value::from(v),
                    AnyValue::String(v) => Value::from(v),
                    AnyValue::StringOwned(v) => Value::from(v.as_str()),
                    other => panic!("{name}: unexpected parquet value {other:?}"),
                };
                let want = row.get(name).cloned().unwrap_or(Value::Null);
                assert_eq!(got, want, "row {i} column {name}");
            }
        }
    }

    // --- kohya: meta_lat.json + <repeats>_<name>/ ---------------------------
    let kdir = ds.join("exports/kohya/1_eps2v");
    let meta: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(ds.join("exports/kohya/meta_lat.json")).unwrap(),
    )
    .unwrap();
    let mut images: Vec<String> = Vec::new();
    let mut txts: BTreeSet<String> = BTreeSet::new();
    for e in std::fs::read_dir(&kdir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".txt") {
            txts.insert(stem.to_string());
        } else {
            images.push(name);
        }
    }
    images.sort();
    // Keys are the image file names (with extension) in the image folder.
    assert_eq!(meta.keys().cloned().collect::<Vec<_>>(), images);
    assert_eq!(images.len(), 27);
    let mut uncaptioned = Vec::new();
    for (name, v) in &meta {
        let e = v.as_object().unwrap();
        for k in e.keys() {
            assert!(
                ["caption", "tags", "image_size", "train_resolution"].contains(&k.as_str()),
                "{name}: {k}"
            );
        }
        let img = image::open(kdir.join(name)).unwrap();
        let size = serde_json::json!([img.width(), img.height()]);
        assert_eq!(e["image_size"], size, "{name}");
        assert_eq!(e["train_resolution"], size, "{name}");
        let caption = e.get("caption").map(|c| c.as_str().unwrap()).unwrap_or("");
        let tags = e.get("tags").map(|c| c.as_str().unwrap()).unwrap_or("");
        assert!(
            e.get("caption").is_none_or(|c| c != ""),
            "{name}: empty caption kept"
        );
        assert!(
            e.get("tags").is_none_or(|c| c != ""),
            "{name}: empty tags kept"
        );
        assert!(!caption.contains('\n'), "{name}");
        // kohya trains on caption + ", " + tags: no piece twice.
        let text = [caption, tags]
            .iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let pieces: Vec<&str> = text.split(',').map(str::trim).collect();
        let unique: BTreeSet<&str> = pieces.iter().copied().collect();
        assert_eq!(unique.len(), pieces.len(), "{name}: {text}");
        let stem = name.rsplit_once('.').unwrap().0;
        if ko.uncaptioned_files.contains(name) {
            // No caption text: no `.txt` (the DreamBooth loader takes the
            // folder's class token) and that token in meta_lat.json.
            assert_eq!((caption, tags), ("eps2v", ""), "{name}");
            assert!(!txts.contains(stem), "{name}: .txt written");
            uncaptioned.push(name.clone());
        } else {
            let t = std::fs::read_to_string(kdir.join(format!("{stem}.txt"))).unwrap();
            assert_eq!(t, format!("{text}\n"), "{name}");
        }
    }
    assert_eq!(txts.len(), 27 - uncaptioned.len());
    let mut listed = ko.uncaptioned_files.clone();
    listed.sort();
    assert_eq!(listed, uncaptioned);
    assert_eq!(ko.uncaptioned, uncaptioned.len());
    // scene_rgb.png: its sidecar is both caption and tags; kohya gets it once.
    let scene = meta
        .values()
        .find(|v| {
            v.get("caption")
                .is_some_and(|c| c == "1girl, solo, outdoors, sunset")
        })
        .unwrap();
    assert!(scene.get("tags").is_none(), "{scene}");

    // --- HF imagefolder ------------------------------------------------------
    let hdir = ds.join("exports/hf/train");
    let lines: Vec<serde_json::Map<String, Value>> =
        std::fs::read_to_string(hdir.join("metadata.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 27);
    let want_cols: BTreeSet<&str> = [
        "file_name",
        "text",
        "tags",
        "width",
        "height",
        "train_width",
        "train_height",
        "crop_top_resized",
        "crop_left_resized",
        "sha256",
    ]
    .into_iter()
    .collect();
    for l in &lines {
        assert_eq!(
            l.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            want_cols
        );
        let img = image::open(hdir.join(l["file_name"].as_str().unwrap())).unwrap();
        assert_eq!(
            (l["train_width"].as_u64(), l["train_height"].as_u64()),
            (Some(u64::from(img.width())), Some(u64::from(img.height())))
        );
        assert!(l["text"].is_string() && l["sha256"].as_str().unwrap().len() == 64);
        // One type per column, never null (datasets types columns from
        // the first rows).
        assert!(l["tags"].is_string(), "{l:?}");
        for k in ["width", "height", "crop_top_resized", "crop_left_resized"] {
            assert!(l[k].is_u64(), "{k}: {l:?}");
        }
    }
    assert_eq!(
        lines.iter().filter(|l| l["text"] == "").count(),
        hf.uncaptioned
    );
}

/// The README's quick start is `cargo run -- run` (the whole job on the
/// toy world) then `cargo test`, and the curation example below it is the
/// command line the test above runs (same subcommands and flags).
#[test]
fn readme_quick_start_runs_the_toy_job() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("## Quick start")
        .expect("README has a Quick start");
    let blocks: Vec<&str> = readme[start..]
        .split("```sh\n")
        .skip(1)
        .take(2)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    let commands = |b: &str| -> Vec<String> {
        b.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    assert_eq!(commands(blocks[0]), ["cargo run -- run", "cargo test"]);
    let chain = commands(blocks[1]).join(" ");
    for part in [
        "import demo --from fixtures/images",
        "dedupe demo",
        "bucket demo --kohya-resolution 128 --step 32 --min-side 64 --max-side 256",
        "export demo --format kohya",
        "inspect demo",
    ] {
        assert!(
            chain.contains(part),
            "README curation example lacks `{part}`"
        );
    }
    // `eps2v run` with no config really is the toy job (its default file
    // is checked against fixtures/configs/toy.toml in tests/it/run.rs).
    let o = eps2v(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    let default = eps2v::run::RunConfig::default().dataset;
    assert_eq!(default, Path::new("eps2v-toy-run"));
    assert!(help.contains("./eps2v-toy-run"), "{help}");
}
