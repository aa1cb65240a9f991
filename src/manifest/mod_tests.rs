use super::*;

/// A dataset path that is a file: one clear error, not a remedy
/// (`eps2v init FILE`) that fails in turn.
#[test]
fn a_file_is_no_dataset() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("notes.txt");
    std::fs::write(&f, "x").unwrap();
    for e in [
        Manifest::open(&f).unwrap_err(),
        Manifest::init(&f).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(e.contains("exists and is not a folder"), "{e}");
    }
}

#[test]
fn init_creates_layout_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::init(dir.path()).unwrap();
    assert_eq!(m.user_version().unwrap(), SCHEMA_VERSION);
    assert!(dir.path().join("images").is_dir());
    let run = m.begin_run("init", &serde_json::json!({})).unwrap();
    m.end_run(run, true, &serde_json::json!({"n": 0})).unwrap();
    drop(m);
    let m = Manifest::init(dir.path()).unwrap();
    let n: i64 = m
        .conn()
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(m.integrity_check().unwrap(), "ok");
}

/// A stage's row ends `done` with its report, or `failed` with the
/// error's text; either way its lock is released.
#[test]
fn stage_run_ends_the_row_by_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(dir.path()).unwrap();
    let cfg = serde_json::json!({});
    let row = |m: &Manifest, id: i64| -> (String, String) {
        m.conn()
            .query_row(
                "SELECT status, counts_json FROM runs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    let mut seen = 0;
    let n = stage_run(&mut m, "bucket", &cfg, |m, id| {
        seen = id;
        assert!(m.run_is_live(id)?);
        Ok(serde_json::json!({"bucketed": 3}))
    })
    .unwrap();
    assert_eq!(n["bucketed"], 3);
    assert_eq!(row(&m, seen), ("done".into(), r#"{"bucketed":3}"#.into()));
    assert!(!m.run_is_live(seen).unwrap());
    let e = stage_run(&mut m, "bucket", &cfg, |_, id| -> Result<()> {
        seen = id;
        Err(Error::config("images/x.png: no such file"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("images/x.png"), "{e}");
    let (status, counts) = row(&m, seen);
    assert_eq!(status, "failed");
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["error"], e.to_string());
    assert!(!m.run_is_live(seen).unwrap());
    // A stage's partial report keeps its counts beside the error.
    let id = m.begin_run("generate", &cfg).unwrap();
    m.fail_run(id, &serde_json::json!({"rendered": 5}), &e);
    let counts: serde_json::Value = serde_json::from_str(&row(&m, id).1).unwrap();
    assert_eq!(
        (&counts["rendered"], counts["error"].is_string()),
        (&5.into(), true)
    );
    assert!(counts.get("interrupted").is_none());
    // A stop request is recorded as one (inspect: "stopped by Ctrl-C").
    let stop = Error::Interrupted("bucket: stopped after 8 of 20 items".into());
    stage_run(&mut m, "bucket", &cfg, |_, id| -> Result<()> {
        seen = id;
        Err(stop)
    })
    .unwrap_err();
    let counts: serde_json::Value = serde_json::from_str(&row(&m, seen).1).unwrap();
    assert_eq!(counts["interrupted"], true);
}

#[test]
fn open_without_manifest_says_to_init() {
    let dir = tempfile::tempdir().unwrap();
    let e = Manifest::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("eps2v init") && e.contains("eps2v import"),
        "{e}"
    );
    // A folder of images given as the dataset: import them into one.
    std::fs::write(dir.path().join("a.PNG"), b"x").unwrap();
    let e = Manifest::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("it holds images") && e.contains("eps2v import DATASET --from"),
        "{e}"
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::init(dir.path()).unwrap();
    m.conn().execute_batch("PRAGMA user_version = 99").unwrap();
    drop(m);
    let e = Manifest::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("newer"), "{e}");
}

/// Regression: a reference broken before the upgrade (an item deleted
/// in the sqlite3 shell, which enforces no foreign keys, its tags
/// left) failed every migration step, so the dataset could not be
/// opened; only references a step breaks count.
#[test]
fn a_reference_broken_by_hand_does_not_block_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(dir.path().join(MANIFEST_FILE)).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(
                "PRAGMA user_version = 1; PRAGMA foreign_keys = OFF;
                 INSERT INTO runs (id, stage, config_json, tool_version, started_at) VALUES (1, 'import', '{}', '0', 'x');
                 INSERT INTO tags (item_id, source, tag, score, run_id) VALUES (42, 'sidecar_txt', 'solo', NULL, 1);",
            )
            .unwrap();
    }
    let m = Manifest::open(dir.path()).unwrap();
    assert_eq!(m.user_version().unwrap(), SCHEMA_VERSION);
    let left = broken_references(m.conn()).unwrap();
    assert_eq!(
        left.into_iter().collect::<Vec<_>>(),
        [("tags row ? → items".to_string(), 1)]
    );
}

/// A version-1 manifest with rows in every table that references
/// `items` migrates to the current schema with its data and references
/// intact, and the CHECK constraints still refuse unknown values.
#[test]
fn v1_manifest_migrates_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(dir.path().join(MANIFEST_FILE)).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO runs (id, stage, config_json, tool_version, started_at) VALUES (1, 'import', '{}', '0', 'x'),
                     (2, 'filter', '{}', '0', 'x');
                 INSERT INTO items (id, sha256, path, source, status, reason, run_id, status_run_id, created_at)
                     VALUES (7, 'aa', 'images/aa/aa.png', '/a.png', 'ok', NULL, 1, 1, 'x'),
                            (9, 'bb', NULL, '/b.png', 'duplicate', 'near_duplicate: of item 7', 1, 1, 'x'),
                            (11, 'cc', NULL, '/c.png', 'rejected', 'misaligned: 0.1', 1, 2, 'x');
                 INSERT INTO sources (item_id, path, size, mtime_ns, run_id) VALUES (7, '/a.png', 1, 2, 1);
                 INSERT INTO duplicates VALUES (7, 7, 7, 0, 'keeper', 1), (9, 7, 7, 3, 'near', 1), (11, 7, 7, 4, 'near', 1);
                 INSERT INTO tags (item_id, source, tag, score, run_id) VALUES (7, 'sidecar_txt', 'solo', NULL, 1);",
            )
            .unwrap();
    }
    let m = Manifest::open(dir.path()).unwrap();
    assert_eq!(m.user_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(m.integrity_check().unwrap(), "ok");
    let fk_on: i64 = m
        .conn()
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk_on, 1);
    // v6: items_status covers only the set-aside items.
    let sql: String = m
        .conn()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'items_status'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(sql.ends_with("WHERE status <> 'ok'"), "{sql}");
    let rows: Vec<(i64, String, Option<String>)> = m
        .conn()
        .prepare("SELECT id, status, reason FROM items ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            (7, "ok".into(), None),
            (
                9,
                "duplicate".into(),
                Some("near_duplicate: of item 7".into())
            ),
            (11, "rejected".into(), Some("misaligned: 0.1".into()))
        ]
    );
    let kinds: String = m
        .conn()
        .query_row("SELECT group_concat(kind) FROM duplicates", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kinds, "keeper,near,near");
    // v7: a tag written before `pos` existed has no place.
    let pos: Option<i64> = m
        .conn()
        .query_row("SELECT pos FROM tags WHERE item_id = 7", [], |r| r.get(0))
        .unwrap();
    assert_eq!(pos, None);
    // v8: the set-aside item has the verdict of the run that set it aside.
    // A duplicate is dedupe's whatever run set it; a duplicate a filter
    // rejection overwrote gets dedupe's verdict back from `duplicates`.
    let v: String = m
            .conn()
            .query_row(
                "SELECT group_concat(item_id || '|' || stage || '|' || status || '|' || reason || '|' || run_id, ';')
                 FROM (SELECT * FROM item_verdicts ORDER BY item_id, stage)",
                [],
                |r| r.get(0),
            )
            .unwrap();
    assert_eq!(
        v,
        "9|dedupe|duplicate|near_duplicate: of item 7|1;\
             11|dedupe|duplicate|near_duplicate: of item 7 (distance 4)|1;\
             11|filter|rejected|misaligned: 0.1|2"
    );
    for bad in [
            "UPDATE items SET status = 'maybe' WHERE id = 7",
            "UPDATE duplicates SET kind = 'twin' WHERE item_id = 9",
            "INSERT INTO sources (item_id, path, size, mtime_ns, run_id) VALUES (99, '/c.png', 1, 2, 1)",
            "INSERT INTO items (sha256, source, status, run_id, status_run_id, created_at)
                 VALUES ('aa', '/again.png', 'ok', 1, 1, 'x')",
        ] {
            assert!(m.conn().execute(bad, []).is_err(), "{bad}");
        }
    assert!(m
        .conn()
        .execute("UPDATE items SET status = 'rejected' WHERE id = 7", [])
        .is_ok());
}

/// A run's stored report keeps at most [`MAX_LISTED`] entries of each
/// list and says how many it left out; short lists are whole.
#[test]
fn stored_reports_cut_long_lists_and_say_so() {
    let r = serde_json::json!({
        "rejected": 3,
        "rejections": (0..2500).collect::<Vec<_>>(),
        "inner": {"failed": ["a", "b"]},
    });
    let b = bounded_lists(r);
    assert_eq!(b["rejections"].as_array().unwrap().len(), MAX_LISTED);
    assert_eq!(b["rejections_omitted"], 1500);
    assert_eq!(b["rejections"][999], 999);
    assert_eq!(b["inner"], serde_json::json!({"failed": ["a", "b"]}));
    assert!(b.get("inner_omitted").is_none() && b["rejected"] == 3);
}

/// The regression this schema fixes: no ephemeral index per inserted row.
#[test]
fn item_and_duplicate_inserts_build_no_ephemeral_index() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::init(dir.path()).unwrap();
    for sql in [
            "EXPLAIN INSERT INTO items (sha256, path, source, width, height, format, status, reason, run_id, status_run_id, created_at)
             VALUES ('x', NULL, 's', 1, 1, 'png', 'ok', NULL, 1, 1, 't')",
            "EXPLAIN INSERT INTO duplicates (item_id, cluster_id, keeper_id, distance, kind, run_id) VALUES (1, 1, 1, 0, 'near', 1)",
        ] {
            let ops: Vec<String> = m
                .conn()
                .prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(1))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            assert!(ops.iter().any(|o| o == "Insert"), "{ops:?}");
            assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{sql}: {ops:?}");
        }
}

#[test]
fn read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    drop(Manifest::init(dir.path()).unwrap());
    let m = Manifest::open_read_only(dir.path()).unwrap();
    assert!(m.conn().execute("DELETE FROM runs", []).is_err());
}
