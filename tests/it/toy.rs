//! The toy world from the command line: `eps2v toy scenes` writes PNG +
//! `.txt` scenes that `eps2v import` takes with their tags as captions,
//! and `eps2v bucket` with the toy bucket list keeps every scene at its own
//! size (no crop).

use std::process::Command;

use eps2v::manifest::Manifest;
use eps2v::toy::Scene;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn toy_scenes_import_with_their_tags_and_bucket_at_their_own_size() {
    let work = tempfile::tempdir().unwrap();
    let scenes = work.path().join("scenes");
    let ds = work.path().join("ds");
    let (s, d) = (scenes.to_str().unwrap(), ds.to_str().unwrap());
    let out = run(&["--json", "toy", "scenes", s, "--count", "12", "--seed", "3"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["written"], 12);
    // A rerun finds everything there.
    let v: serde_json::Value = serde_json::from_str(&run(&[
        "--json", "toy", "scenes", s, "--count", "12", "--seed", "3",
    ]))
    .unwrap();
    assert_eq!(
        (v["written"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(12))
    );
    run(&["init", d]);
    run(&["--json", "import", d, "--from", s]);
    run(&[
        "--json",
        "bucket",
        d,
        "--kohya-resolution",
        "80",
        "--step",
        "32",
        "--min-side",
        "64",
        "--max-side",
        "96",
    ]);
    let m = Manifest::open(&ds).unwrap();
    let mut q = m
        .conn()
        .prepare(
            "SELECT s.path, c.text, b.bucket_w, b.bucket_h, b.crop_left, b.crop_top
             FROM items i JOIN sources s ON s.item_id = i.id
             JOIN captions c ON c.item_id = i.id AND c.source = 'sidecar_txt'
             JOIN buckets b ON b.item_id = i.id",
        )
        .unwrap();
    let rows: Vec<(String, String, u32, u32, u32, u32)> = q
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    for (path, caption, bw, bh, cl, ct) in rows {
        let stem = std::path::Path::new(&path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let index: u64 = stem.trim_start_matches("scene_").parse().unwrap();
        let scene = Scene::random(3, index);
        assert_eq!(caption.trim(), scene.caption());
        assert_eq!(
            (bw, bh, cl, ct),
            (scene.width, scene.height, 0, 0),
            "{stem}"
        );
    }
}
