//! `eps2v caption` / `eps2v filter` end to end on a small dataset of
//! imported A1111 PNGs (prompts in their `parameters`) and a sidecar-captioned
//! image, with a seeded random tiny tagger whose head biases make every tag
//! certain or absent: tags, ratings, alignment, caption policies, sidecars,
//! filter reruns, `inspect`, `export`, bad inputs (exit 2, nothing written),
//! unreadable images, `kill -9` or Ctrl-C + resume.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use eps2v::imaging::infotext::write_png_with_parameters;
use eps2v::manifest::Manifest;
use eps2v::models::tagger::tiny::{write_random_tagger, TinyTag, TinyTaggerOptions};
use eps2v::models::tagger::TaggerConfig;
use eps2v::stages::caption::policy::{Policy, PolicyConfig, Thresholds};
use eps2v::stages::caption::{self, CaptionConfig};
use eps2v::stages::{self, Ctx};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn count(m: &Manifest, sql: &str) -> i64 {
    m.conn().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// A tagger that sees the same thing in every image: 1girl, solo, long hair,
/// smile, upper body (certain); red hair, 1boy, ^_^, blue eyes and the
/// character absent; rating general.
fn write_tagger(dir: &Path) {
    let t = |n: &str, c: u32, b: f32| TinyTag::new(n, c, b);
    let tags = vec![
        t("general", 9, 8.0),
        t("sensitive", 9, -8.0),
        t("questionable", 9, -8.0),
        t("explicit", 9, -8.0),
        t("1girl", 0, 8.0),
        t("solo", 0, 8.0),
        t("long_hair", 0, 8.0),
        t("smile", 0, 8.0),
        t("upper_body", 0, 8.0),
        t("red_hair", 0, -8.0),
        t("1boy", 0, -8.0),
        t("^_^", 0, -8.0),
        t("blue_eyes", 0, -8.0),
        t("hatsune_miku", 4, -8.0),
    ];
    let opts = TinyTaggerOptions {
        seed: 11,
        config: TaggerConfig::tiny(tags.len()),
        tags,
    };
    write_random_tagger(dir, &opts).unwrap();
}

fn noise_image(seed: u64, w: u32, h: u32) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    RgbImage::from_fn(w, h, |_, _| Rgb([rng.random(), rng.random(), rng.random()]))
}

fn write_a1111_png(path: &Path, seed: u64, prompt: &str) {
    let params = format!(
        "{prompt}\nNegative prompt: lowres, bad anatomy\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Size: 48x40, Model: tiny"
    );
    let bytes = write_png_with_parameters(&noise_image(seed, 48, 40), &params).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The prompts of the small dataset (file stem, prompt).
const PROMPTS: &[(&str, &str)] = &[
    ("a_all", "1girl, solo, (smile:1.2)"),
    ("b_third", "1girl, red hair, 1boy, masterpiece"),
    ("c_two_thirds", "long hair, smile, ^_^"),
    ("e_unknown", "masterpiece, best quality"),
];

/// Images: four A1111 PNGs and one plain PNG with a sidecar caption.
fn write_images(src: &Path) {
    std::fs::create_dir_all(src).unwrap();
    for (k, (stem, prompt)) in PROMPTS.iter().enumerate() {
        write_a1111_png(&src.join(format!("{stem}.png")), k as u64 + 1, prompt);
    }
    noise_image(99, 40, 56)
        .save(src.join("d_sidecar.png"))
        .unwrap();
    std::fs::write(src.join("d_sidecar.txt"), "my own caption, hand written").unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    ds: PathBuf,
    tagger: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_images(&src);
    let tagger = tmp.path().join("tagger");
    write_tagger(&tagger);
    let ds = tmp.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let r = stages::import::run(
        &stages::import::ImportConfig {
            from: src,
            ..Default::default()
        },
        &mut m,
        &Ctx::quiet(),
    )
    .unwrap();
    assert_eq!(r.imported, 5);
    assert_eq!(r.with_parameters, 4);
    Fixture {
        _tmp: tmp,
        ds,
        tagger,
    }
}

/// Item id of an imported file stem.
fn item(m: &Manifest, stem: &str) -> i64 {
    m.conn()
        .query_row(
            "SELECT item_id FROM sources WHERE path LIKE ?1",
            [format!("%/{stem}.png")],
            |r| r.get(0),
        )
        .unwrap()
}

fn caption_of(m: &Manifest, id: i64) -> Option<String> {
    m.conn()
        .query_row(
            "SELECT text FROM captions WHERE item_id = ?1 AND source = 'policy'",
            [id],
            |r| r.get(0),
        )
        .ok()
}

fn tag_set(s: &str) -> BTreeSet<String> {
    s.split(", ").map(str::to_string).collect()
}

fn status(m: &Manifest, id: i64) -> (String, Option<String>) {
    m.conn()
        .query_row(
            "SELECT status, reason FROM items WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[test]
fn caption_then_filter_end_to_end() {
    let f = fixture();
    let ds = f.ds.to_str().unwrap();
    let tagger = f.tagger.to_str().unwrap();
    let out = run(&["--json", "caption", ds, "--tagger", tagger]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json_of(&out);
    assert_eq!(r["considered"], 5);
    assert_eq!(r["tagged"], 5);
    assert_eq!(r["scored"], 3); // e_unknown has no tag the tagger knows, d no prompt
    assert_eq!(r["kept_sidecar"], 1);
    assert_eq!(r["captioned"], 4);
    assert_eq!(r["ratings"]["general"], 5);

    let m = Manifest::open(&f.ds).unwrap();
    let (a, b, c, d, e) = (
        item(&m, "a_all"),
        item(&m, "b_third"),
        item(&m, "c_two_thirds"),
        item(&m, "d_sidecar"),
        item(&m, "e_unknown"),
    );
    // Tags above threshold, with probabilities, under source `tagger`.
    let tags: Vec<(String, f64)> = {
        let mut st = m
            .conn()
            .prepare(
                "SELECT tag, score FROM tags WHERE item_id = ?1 AND source = 'tagger' ORDER BY tag",
            )
            .unwrap();
        st.query_map([a], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let names: Vec<&str> = tags.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, ["1girl", "long hair", "smile", "solo", "upper body"]);
    assert!(tags.iter().all(|t| t.1 > 0.99), "{tags:?}");
    // Rating as its own field.
    let (rating, score): (String, f64) = m
        .conn()
        .query_row(
            "SELECT rating, rating_score FROM tagging WHERE item_id = ?1",
            [a],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rating, "general");
    assert!(score > 0.99);
    // Alignment: confirmed / checkable prompt tags.
    let al = |id: i64| -> Option<f64> {
        m.conn()
            .query_row(
                "SELECT alignment FROM tagging WHERE item_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(al(a), Some(1.0));
    assert!((al(b).unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert!((al(c).unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(al(d), None);
    assert_eq!(al(e), None);
    // merged captions: count tags first, then by confidence; sidecar kept;
    // prompt words the tagger does not know (quality words) stay.
    for (id, unknown) in [
        (a, ""),
        (b, ", masterpiece"),
        (c, ""),
        (e, ", masterpiece, best quality"),
    ] {
        let cap = caption_of(&m, id).unwrap();
        let v: Vec<&str> = cap.split(", ").collect();
        assert_eq!(
            v[..2].iter().copied().collect::<BTreeSet<_>>(),
            ["1girl", "solo"].into_iter().collect(),
            "{cap}"
        );
        assert_eq!(
            tag_set(&cap),
            tag_set(&format!(
                "1girl, solo, long hair, smile, upper body{unknown}"
            )),
            "{cap}"
        );
    }
    assert_eq!(caption_of(&m, d), None);
    drop(m);

    // filter: b (0.33) goes, c (0.67) stays, unscored items are not judged.
    let out = run(&["--json", "filter", ds, "--min-alignment", "0.5"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json_of(&out);
    assert_eq!(
        (r["scored"].as_i64(), r["rejected"].as_i64()),
        (Some(3), Some(1))
    );
    let m = Manifest::open(&f.ds).unwrap();
    let (st, reason) = status(&m, b);
    assert_eq!(st, "rejected");
    assert_eq!(
        reason.unwrap(),
        "misaligned: alignment 0.33 < 0.50; missing red hair (0.00), 1boy (0.00)"
    );
    assert_eq!(status(&m, c).0, "ok");
    assert_eq!(status(&m, e).0, "ok");

    // Another stage's rejection is never filter's or caption's to undo.
    let mut m = m;
    let other_run: i64 = {
        m.conn()
            .execute(
                "INSERT INTO runs (stage, config_json, tool_version, started_at, status) VALUES ('bucket', '{}', 'test', 'now', 'done')",
                [],
            )
            .unwrap();
        m.conn().last_insert_rowid()
    };
    let tx = m.conn_mut().transaction().unwrap();
    let small = Some((eps2v::manifest::ItemStatus::Rejected, "too_small: test"));
    eps2v::manifest::verdicts::set(&tx, a, "bucket", small, other_run).unwrap();
    tx.commit().unwrap();
    drop(m);

    // Stricter: c goes too. Looser: both come back; a stays bucket's.
    let r = json_of(&run(&["--json", "filter", ds, "--min-alignment", "0.7"]));
    assert_eq!(
        (r["rejected"].as_i64(), r["newly_rejected"].as_i64()),
        (Some(2), Some(1))
    );
    let r = json_of(&run(&["--json", "filter", ds, "--min-alignment", "0.2"]));
    assert_eq!(
        (r["rejected"].as_i64(), r["restored"].as_i64()),
        (Some(0), Some(2))
    );
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(status(&m, b), ("ok".into(), None));
    assert_eq!(status(&m, c).0, "ok");
    assert_eq!(
        status(&m, a),
        ("rejected".into(), Some("too_small: test".into()))
    );
    drop(m);
    let out = run(&["--json", "caption", ds, "--tagger", tagger]);
    // a is captioned too (current when bucket takes it back), and stays bucket's.
    assert_eq!(json_of(&out)["considered"], 5);
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(status(&m, a).0, "rejected");
    drop(m);

    // --dry-run decides and writes nothing.
    let runs_before = count(&Manifest::open(&f.ds).unwrap(), "SELECT count(*) FROM runs");
    let out = run(&["filter", ds, "--min-alignment", "0.9", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("would reject item"), "{text}");
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(count(&m, "SELECT count(*) FROM runs"), runs_before);
    assert_eq!(
        count(
            &m,
            "SELECT count(*) FROM items WHERE reason LIKE 'misaligned%'"
        ),
        0
    );
    drop(m);

    // inspect shows the histogram; export writes the policy captions.
    let r = json_of(&run(&["--json", "inspect", ds]));
    let rows = r["alignment"]["rows"].as_array().unwrap();
    let bins: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(bins, ["0.3-0.4", "0.6-0.7", "0.9-1.0"]);
    let text = String::from_utf8_lossy(&run(&["inspect", ds]).stdout).into_owned();
    assert!(text.contains("alignment with the prompt"), "{text}");
    let out = run(&["--json", "export", ds, "--format", "jsonl"]);
    assert!(out.status.success());
    let rows = std::fs::read_to_string(f.ds.join("exports/manifest.jsonl")).unwrap();
    let d_row = rows
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["item_id"] == d)
        .unwrap();
    assert_eq!(d_row["caption"], "my own caption, hand written");
    assert_eq!(d_row["caption_source"], "sidecar_txt");
}

fn caption_lib(ds: &Path, cfg: &CaptionConfig) -> caption::CaptionReport {
    let mut m = Manifest::open(ds).unwrap();
    caption::run(cfg, &mut m, &Ctx::quiet()).unwrap()
}

#[test]
fn policies_reuse_tags_and_respect_sidecars() {
    let f = fixture();
    let merged = CaptionConfig {
        tagger: Some(f.tagger.clone()),
        ..Default::default()
    };
    assert_eq!(caption_lib(&f.ds, &merged).tagged, 5);
    // Another policy with the same tagger and thresholds: no inference.
    let tags = CaptionConfig {
        caption: PolicyConfig {
            policy: Policy::Tags,
            undesired: vec!["upper_body".into()],
            replace: vec![("long hair".into(), "very long hair".into())],
            ..Default::default()
        },
        ..merged.clone()
    };
    let r = caption_lib(&f.ds, &tags);
    assert_eq!((r.tagged, r.already_tagged), (0, 5));
    let m = Manifest::open(&f.ds).unwrap();
    let a = item(&m, "a_all");
    assert_eq!(
        tag_set(&caption_of(&m, a).unwrap()),
        tag_set("1girl, solo, very long hair, smile")
    );
    drop(m);
    // prompt policy, no tagger: the prompt without A1111 syntax.
    let prompt = CaptionConfig {
        tagger: None,
        caption: PolicyConfig {
            policy: Policy::Prompt,
            ..Default::default()
        },
        ..Default::default()
    };
    let r = caption_lib(&f.ds, &prompt);
    assert_eq!((r.tagged, r.captioned, r.kept_sidecar), (0, 4, 1));
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(caption_of(&m, a).unwrap(), "1girl, solo, smile");
    // Tags survive a prompt-only run.
    assert_eq!(count(&m, "SELECT count(*) FROM tagging"), 5);
    let d = item(&m, "d_sidecar");
    assert_eq!(caption_of(&m, d), None);
    drop(m);
    // --overwrite: the sidecar item gets a policy caption too.
    let over = CaptionConfig {
        overwrite: true,
        ..tags.clone()
    };
    let r = caption_lib(&f.ds, &over);
    assert_eq!(r.kept_sidecar, 0);
    let m = Manifest::open(&f.ds).unwrap();
    assert!(caption_of(&m, d).unwrap().contains("1girl"));
    drop(m);
    // Other thresholds: everything is tagged again.
    let stricter = CaptionConfig {
        thresholds: Thresholds {
            general: 0.5,
            ..Thresholds::default()
        },
        ..merged
    };
    assert_eq!(caption_lib(&f.ds, &stricter).tagged, 5);
    // export: policy captions win; an A1111 prompt alone exports cleaned.
    let m = Manifest::open(&f.ds).unwrap();
    m.conn()
        .execute("DELETE FROM captions WHERE source = 'policy'", [])
        .unwrap();
    let rows = stages::export::load_rows(&m, true).unwrap();
    let row = rows.iter().find(|r| r.item_id == a).unwrap();
    assert_eq!(row.caption_source.as_deref(), Some("a1111_prompt"));
    assert_eq!(row.caption.as_deref(), Some("1girl, solo, smile"));
}

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let f = fixture();
    let ds = f.ds.to_str().unwrap();
    let snapshot = |ds: &Path| -> Vec<i64> {
        let m = Manifest::open(ds).unwrap();
        ["runs", "tags", "captions", "tagging"]
            .iter()
            .map(|t| count(&m, &format!("SELECT count(*) FROM {t}")))
            .collect()
    };
    let before = snapshot(&f.ds);
    // A tag list with fewer rows than the model has outputs.
    let short = f.tagger.parent().unwrap().join("short_tagger");
    std::fs::create_dir_all(&short).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(f.tagger.join(file), short.join(file)).unwrap();
    }
    let csv = std::fs::read_to_string(f.tagger.join("selected_tags.csv")).unwrap();
    let few: String = csv.lines().take(10).map(|l| format!("{l}\n")).collect();
    std::fs::write(short.join("selected_tags.csv"), few).unwrap();
    // A tag list with the wrong columns.
    let cols = f.tagger.parent().unwrap().join("cols_tagger");
    std::fs::create_dir_all(&cols).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(f.tagger.join(file), cols.join(file)).unwrap();
    }
    std::fs::write(cols.join("selected_tags.csv"), "id,tag,kind\n1,a,0\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["caption", ds, "--tagger", short.to_str().unwrap()],
            "9 tags, but the model has 14 outputs",
        ),
        (
            vec!["caption", ds, "--tagger", cols.to_str().unwrap()],
            "columns `name` and `category` are required",
        ),
        // Imported images: the toy tagger is no default for them.
        (
            vec!["caption", ds, "--policy", "tags"],
            "no image in it was generated by a toy model; pass --tagger DIR",
        ),
        (
            vec!["caption", ds, "--tagger", "/no/such/dir"],
            "no such tagger folder",
        ),
        (
            vec![
                "caption",
                ds,
                "--tagger",
                f.tagger.to_str().unwrap(),
                "--general-threshold",
                "1.5",
            ],
            "between 0 and 1",
        ),
        (
            vec!["caption", ds, "--policy", "prompt", "--replace", "nothing"],
            "FROM=TO",
        ),
        (
            vec!["filter", ds, "--min-alignment", "0.5"],
            "run `eps2v caption",
        ),
        (
            vec!["filter", ds, "--min-alignment", "2"],
            "between 0 and 1",
        ),
        (
            vec!["caption", "/no/such/dataset", "--policy", "prompt"],
            "eps2v init",
        ),
    ];
    for (args, want) in cases {
        // No toy folder either.
        let out = Command::new(bin())
            .args(&args)
            .env("EPS2V_TOY_DIR", f.ds.join("no-toy-here"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(snapshot(&f.ds), before, "{args:?} wrote something");
    }
}

#[test]
fn unreadable_images_are_rejected_then_reconsidered() {
    let f = fixture();
    let ds = f.ds.to_str().unwrap();
    let tagger = f.tagger.to_str().unwrap();
    let m = Manifest::open(&f.ds).unwrap();
    let c = item(&m, "c_two_thirds");
    let rel: String = m
        .conn()
        .query_row("SELECT path FROM items WHERE id = ?1", [c], |r| r.get(0))
        .unwrap();
    drop(m);
    let img = f.ds.join(&rel);
    let saved = f.ds.join("saved.png");
    std::fs::rename(&img, &saved).unwrap();
    let out = run(&["--json", "caption", ds, "--tagger", tagger]);
    assert_eq!(out.status.code(), Some(1));
    let r = json_of(&out);
    assert_eq!(r["rejected"]["unreadable"], 1);
    assert_eq!(r["tagged"], 4);
    let m = Manifest::open(&f.ds).unwrap();
    let (st, reason) = status(&m, c);
    assert_eq!(st, "rejected");
    assert!(reason.unwrap().starts_with("unreadable: images/"));
    drop(m);
    // A run without a tagger cannot tag it, and does not restore it while
    // the image is still unreadable.
    let out = run(&["--json", "caption", ds, "--policy", "prompt"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_of(&out)["restored"], 0);
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(status(&m, c).0, "rejected");
    drop(m);
    // The file is back: the rerun reconsiders caption's own rejection.
    std::fs::rename(&saved, &img).unwrap();
    let out = run(&["--json", "caption", ds, "--tagger", tagger]);
    assert_eq!(out.status.code(), Some(0));
    let r = json_of(&out);
    assert_eq!(
        (r["tagged"].as_i64(), r["restored"].as_i64()),
        (Some(1), Some(1))
    );
    let m = Manifest::open(&f.ds).unwrap();
    assert_eq!(status(&m, c), ("ok".into(), None));
}

#[test]
fn caption_kill9_then_resume_tags_every_item_once() {
    interrupt_then_resume(false);
}

/// Ctrl-C between batches: the tagged batches are kept, the run ends
/// `failed` with `interrupted` and the items left, exit 130; the rerun
/// tags only the rest.
#[test]
fn ctrl_c_then_rerun_tags_only_the_rest() {
    interrupt_then_resume(true);
}

/// Stop `caption` once a first batch is committed, with SIGKILL or (with
/// `ctrl_c`) SIGINT, then rerun it: every item tagged once.
fn interrupt_then_resume(ctrl_c: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for k in 0..240u64 {
        write_a1111_png(
            &src.join(format!("g{k:04}.png")),
            k,
            "1girl, solo, red hair",
        );
    }
    let tagger = tmp.path().join("tagger");
    write_tagger(&tagger);
    let mut killed_midway = false;
    for attempt in 0..5 {
        let ds = tmp.path().join(format!("ds{attempt}"));
        let mut m = Manifest::init(&ds).unwrap();
        stages::import::run(
            &stages::import::ImportConfig {
                from: src.clone(),
                ..Default::default()
            },
            &mut m,
            &Ctx::quiet(),
        )
        .unwrap();
        drop(m);
        let mut child = Command::new(bin())
            .args(["--json", "caption"])
            .arg(&ds)
            .arg("--tagger")
            .arg(&tagger)
            .args(["--batch", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            let n = Manifest::open_read_only(&ds)
                .ok()
                .and_then(|m| {
                    m.conn()
                        .query_row("SELECT count(*) FROM tagging", [], |r| r.get::<_, i64>(0))
                        .ok()
                })
                .unwrap_or(0);
            if n > 0 || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if ctrl_c {
            // SAFETY: a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        } else {
            child.kill().unwrap(); // SIGKILL
        }
        let o = child.wait_with_output().unwrap();
        let m = Manifest::open(&ds).unwrap();
        let n = count(&m, "SELECT count(*) FROM tagging");
        if n > 0 && n < 240 {
            killed_midway = true;
            if ctrl_c {
                assert_eq!(o.status.code(), Some(130), "exit code after Ctrl-C");
                let r = json_of(&o);
                assert_eq!(r["interrupted"], true, "{r}");
                assert_eq!(r["tagged"].as_i64(), Some(n), "{r}");
                assert_eq!(r["remaining"].as_i64(), Some(240 - n), "{r}");
                assert_eq!(
                    count(
                        &m,
                        "SELECT count(*) FROM runs WHERE stage = 'caption' AND status = 'failed'"
                    ),
                    1
                );
                assert_eq!(n % 4, 0, "whole batches only");
            }
        }
        drop(m);
        let out = Command::new(bin())
            .args(["--json", "caption"])
            .arg(&ds)
            .arg("--tagger")
            .arg(&tagger)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = json_of(&out);
        assert_eq!(
            r["tagged"].as_i64().unwrap() + r["already_tagged"].as_i64().unwrap(),
            240
        );
        assert_eq!(r["tagged"].as_i64().unwrap(), 240 - n);
        let m = Manifest::open(&ds).unwrap();
        assert_eq!(m.integrity_check().unwrap(), "ok");
        assert_eq!(count(&m, "SELECT count(*) FROM tagging"), 240);
        assert_eq!(
            count(&m, "SELECT count(*) FROM captions WHERE source = 'policy'"),
            240
        );
        assert_eq!(
            count(&m, "SELECT count(*) FROM tags WHERE source = 'tagger'"),
            240 * 5
        );
        assert_eq!(
            count(
                &m,
                "SELECT count(*) FROM tagging WHERE abs(alignment - 2.0 / 3.0) < 1e-9"
            ),
            240
        );
        if killed_midway {
            break;
        }
    }
    assert!(
        killed_midway,
        "never managed to kill the caption run midway"
    );
}
