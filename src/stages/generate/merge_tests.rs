//! `manifest merge` of `generate` shards (the shards made by the
//! helpers of [`super`]).

use super::*;

#[test]
fn shards_merged_equal_a_single_run_item_for_item() {
    let w = world();
    let single = w.dir.path().join("single");
    gen(&w, &cfg(&w, 7), &single).unwrap();
    let shards: Vec<std::path::PathBuf> = (1..=3)
        .map(|k| {
            let d = w.dir.path().join(format!("shard{k}"));
            let r = gen(
                &w,
                &GenerateConfig {
                    shard: Shard::new(k, 3).unwrap(),
                    ..cfg(&w, 7)
                },
                &d,
            )
            .unwrap();
            assert_eq!(r.rendered, [3, 2, 2][k as usize - 1]);
            d
        })
        .collect();
    let out = w.dir.path().join("merged");
    merge::check_shards(&out, &shards).unwrap();
    let mut m = Manifest::init(&out).unwrap();
    let cfgm = MergeConfig {
        shards: shards.clone(),
    };
    let r = merge::run(&cfgm, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!((r.rendered, r.missing), (7, 0));
    assert_eq!(r.shards.iter().map(|s| s.items_added).sum::<u64>(), 7);
    assert!(
        r.tables.contains(&"generation".to_string()) && r.tables.contains(&"hashes".to_string())
    );
    drop(m);
    assert_eq!(rows(&out), rows(&single));
    for (_, _, _, sha) in rows(&out) {
        let rel = format!("images/{}/{sha}.png", &sha[..2]);
        assert_eq!(
            std::fs::read(out.join(&rel)).unwrap(),
            std::fs::read(single.join(&rel)).unwrap()
        );
        // Linked from its shard, not copied (one file system here).
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let inode = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
            let linked = shards
                .iter()
                .any(|d| d.join(&rel).is_file() && inode(&d.join(&rel)) == inode(&out.join(&rel)));
            assert!(linked, "{rel} was copied");
        }
    }
    let q = "SELECT group_concat(g.prompt || '|' || g.seed || '|' || g.raw, ';') FROM
             (SELECT * FROM generation ORDER BY seed) g";
    let text = |d: &std::path::Path| -> String {
        Manifest::open(d)
            .unwrap()
            .conn()
            .query_row(q, [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(text(&out), text(&single));
    // Merging again copies nothing twice.
    let runs = count(&out, "SELECT count(*) FROM runs");
    let mut m = Manifest::open(&out).unwrap();
    let again = merge::run(&cfgm, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(
        again
            .shards
            .iter()
            .map(|s| s.items_added + s.runs_copied)
            .sum::<u64>(),
        0
    );
    drop(m);
    assert_eq!(count(&out, "SELECT count(*) FROM runs"), runs + 1);
    // `generate OUT` with the same flags has nothing left to do.
    let r = gen(&w, &cfg(&w, 7), &out).unwrap();
    assert_eq!((r.rendered, r.skipped), (0, 7));
    // With a shard missing, it renders exactly that shard's images.
    let partial = w.dir.path().join("partial");
    merge::check_shards(&partial, &shards[..2]).unwrap();
    let mut m = Manifest::init(&partial).unwrap();
    let r = merge::run(
        &MergeConfig {
            shards: shards[..2].to_vec(),
        },
        &mut m,
        &Ctx::quiet(),
    )
    .unwrap();
    drop(m);
    assert_eq!(
        (r.rendered, r.missing, r.missing_examples.clone()),
        (5, 2, vec![2, 5])
    );
    let r = gen(&w, &cfg(&w, 7), &partial).unwrap();
    assert_eq!((r.plan.added, r.rendered, r.skipped), (2, 2, 5));
    assert_eq!(rows(&partial), rows(&single));
    // A shard of another plan is refused, naming the field.
    let other = w.dir.path().join("other");
    gen(
        &w,
        &GenerateConfig {
            seed: 1,
            shard: Shard::new(1, 3).unwrap(),
            ..cfg(&w, 7)
        },
        &other,
    )
    .unwrap();
    let e = merge::check_shards(&w.dir.path().join("m2"), &[shards[1].clone(), other])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different generation plan (seed is 1 there but 40"),
        "{e}"
    );
    // A path leading out of the shard's folder is refused, not followed.
    let odd = w.dir.path().join("odd");
    gen(
        &w,
        &GenerateConfig {
            shard: Shard::new(2, 3).unwrap(),
            ..cfg(&w, 7)
        },
        &odd,
    )
    .unwrap();
    Manifest::open(&odd)
        .unwrap()
        .conn()
        .execute(
            "UPDATE items SET path = '../escaped.png' WHERE id = (SELECT min(id) FROM items)",
            [],
        )
        .unwrap();
    let escaped = w.dir.path().join("m3");
    let mut m = Manifest::init(&escaped).unwrap();
    let e = merge::run(&MergeConfig { shards: vec![odd] }, &mut m, &Ctx::quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("items.path \"../escaped.png\""), "{e}");
    assert!(!w.dir.path().join("escaped.png").exists());
}

/// `manifest merge` carries each stage's verdict with its item, and gives
/// a set-aside item of a shard written before verdicts existed the one its
/// status says (as the migration does), so stages reconsider it as theirs.
#[test]
fn merge_carries_verdicts_and_derives_missing_ones() {
    let w = world();
    let shards: Vec<std::path::PathBuf> = (1..=2)
        .map(|k| {
            let d = w.dir.path().join(format!("shard{k}"));
            let sharded = GenerateConfig {
                shard: Shard::new(k, 2).unwrap(),
                ..cfg(&w, 4)
            };
            gen(&w, &sharded, &d).unwrap();
            // One item set aside by filter in each shard.
            let mut m = Manifest::open(&d).unwrap();
            let filter = m.begin_run("filter", &serde_json::json!({})).unwrap();
            let first: i64 = m
                .conn()
                .query_row("SELECT min(id) FROM items", [], |r| r.get(0))
                .unwrap();
            let tx = m.conn_mut().transaction().unwrap();
            let low = Some((ItemStatus::Rejected, "misaligned: 0.1"));
            crate::manifest::verdicts::set(&tx, first, "filter", low, filter).unwrap();
            if k == 2 {
                // As written before `item_verdicts`: the status alone, and
                // the dedupe decision the filter rejection overwrote.
                tx.execute_batch(&format!(
                    "DROP TABLE item_verdicts;
                     INSERT INTO duplicates (item_id, cluster_id, keeper_id, distance, kind, run_id)
                     VALUES ({first}, {first} + 1, {first} + 1, 3, 'near', {filter}),
                            ({first} + 1, {first} + 1, {first} + 1, 0, 'keeper', {filter});"
                ))
                .unwrap();
            }
            tx.commit().unwrap();
            m.end_run(filter, true, &serde_json::json!({})).unwrap();
            d
        })
        .collect();
    let out = w.dir.path().join("merged");
    let mut m = Manifest::init(&out).unwrap();
    merge::run(&MergeConfig { shards }, &mut m, &Ctx::quiet()).unwrap();
    drop(m);
    let q = "SELECT count(*) FROM items i JOIN item_verdicts v ON v.item_id = i.id
             WHERE i.status = 'rejected' AND v.stage = 'filter' AND v.reason = 'misaligned: 0.1'
               AND (SELECT stage FROM runs WHERE id = v.run_id) = 'filter'";
    assert_eq!(count(&out, q), 2);
    assert_eq!(
        count(&out, "SELECT count(*) FROM items WHERE status = 'ok'"),
        2
    );
    // Filter reconsiders both as its own.
    let mut m = Manifest::open(&out).unwrap();
    let r = crate::stages::filter::run(
        &crate::stages::filter::FilterConfig {
            min_alignment: 0.0,
            dry_run: false,
        },
        &mut m,
    );
    drop(m);
    // No item has an alignment score here: filter's verdicts are taken
    // back; the one dedupe had set aside in shard 2 is a duplicate again.
    let r = r.unwrap();
    assert_eq!(r.restored, 2);
    assert_eq!(
        count(&out, "SELECT count(*) FROM items WHERE status = 'ok'"),
        3
    );
    assert_eq!(
        count(&out, "SELECT count(*) FROM items WHERE status = 'duplicate' AND reason = 'near_duplicate: of item ' || (SELECT keeper_id FROM duplicates WHERE kind = 'near') || ' (distance 3)'"),
        1
    );
}

/// Merging a folder again takes what it has redone since (a caption
/// rewritten, a verdict taken back), but not over what OUT's own runs
/// wrote. An item whose image is gone from the folder is left out with its
/// plan row `planned`, so `generate OUT` renders it again; a plan index a
/// second folder rendered to other pixels keeps OUT's image.
#[test]
fn a_second_merge_takes_what_the_folder_redid_but_not_over_out() {
    let w = world();
    let shard = w.dir.path().join("s");
    gen(&w, &cfg(&w, 4), &shard).unwrap();
    // A later run on a folder: `edit(tx, run_id)` in one transaction.
    let later = |d: &std::path::Path, stage: &str, edit: &dyn Fn(&rusqlite::Transaction, i64)| {
        let mut m = Manifest::open(d).unwrap();
        let run = m.begin_run(stage, &serde_json::json!({})).unwrap();
        let tx = m.conn_mut().transaction().unwrap();
        edit(&tx, run);
        tx.commit().unwrap();
        m.end_run(run, true, &serde_json::json!({})).unwrap();
    };
    let caption = |tx: &rusqlite::Transaction, item: i64, text: &str, run: i64| {
        tx.execute(
            "INSERT INTO captions (item_id, source, text, run_id) VALUES (?1, 'policy', ?2, ?3)
             ON CONFLICT (item_id, source) DO UPDATE SET text = excluded.text, run_id = excluded.run_id",
            rusqlite::params![item, text, run],
        )
        .unwrap();
    };
    let s = item_ids(&shard);
    let (a, b) = (s[0].0, s[1].0);
    later(&shard, "caption", &|tx, run| {
        caption(tx, a, "old a", run);
        caption(tx, b, "old b", run);
        let low = Some((ItemStatus::Rejected, "misaligned: 0.1"));
        crate::manifest::verdicts::set(tx, a, "filter", low, run).unwrap();
        // A dead run this one found (as `mark_dead` notes it).
        tx.execute(
            "INSERT INTO runs (stage, config_json, tool_version, started_at, status, counts_json)
             VALUES ('caption', '{}', 'test', '2026-01-01T00:00:00Z', 'failed',
                     json_object('process_gone', 1, 'marked_failed_by', ?1))",
            [run],
        )
        .unwrap();
    });
    let out = w.dir.path().join("out");
    let merge_into = |out: &std::path::Path, shards: &[std::path::PathBuf]| {
        merge::check_shards(out, shards).unwrap();
        let mut m = Manifest::init(out).unwrap();
        let cfgm = MergeConfig {
            shards: shards.to_vec(),
        };
        merge::run(&cfgm, &mut m, &Ctx::quiet()).unwrap()
    };
    merge_into(&out, std::slice::from_ref(&shard));
    let o = item_ids(&out);
    let by_sha = |sha: &str| o.iter().find(|(_, s)| s == sha).unwrap().0;
    let (oa, ob) = (by_sha(&s[0].1), by_sha(&s[1].1));
    let text = |item: i64| -> String {
        Manifest::open(&out)
            .unwrap()
            .conn()
            .query_row(
                "SELECT text FROM captions WHERE item_id = ?1 AND source = 'policy'",
                [item],
                |r| r.get(0),
            )
            .unwrap()
    };
    let status = |item: i64| -> String {
        Manifest::open(&out)
            .unwrap()
            .conn()
            .query_row("SELECT status FROM items WHERE id = ?1", [item], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert_eq!(
        (text(oa), text(ob), status(oa)),
        ("old a".into(), "old b".into(), "rejected".into())
    );
    // The dead run names its finder by OUT's id for it.
    assert_eq!(
        count(
            &out,
            "SELECT count(*) FROM runs d JOIN runs f ON f.id = json_extract(d.counts_json, '$.marked_failed_by')
             WHERE json_extract(d.counts_json, '$.process_gone') = 1 AND f.stage = 'caption' AND f.status = 'done'"
        ),
        1
    );
    // OUT captions b itself; then the folder captions both again and takes
    // its filter verdict back.
    later(&out, "caption", &|tx, run| caption(tx, ob, "out b", run));
    later(&shard, "caption", &|tx, run| {
        caption(tx, a, "new a", run);
        caption(tx, b, "new b", run);
        crate::manifest::verdicts::set(tx, a, "filter", None, run).unwrap();
    });
    let r = merge_into(&out, std::slice::from_ref(&shard));
    assert_eq!(
        (text(oa), text(ob), status(oa)),
        ("new a".into(), "out b".into(), "ok".into())
    );
    assert_eq!((r.shards[0].runs_copied, r.shards[0].rows_updated), (1, 2));
    // Nothing redone since: a third merge changes nothing.
    let r = merge_into(&out, std::slice::from_ref(&shard));
    assert_eq!((r.shards[0].runs_copied, r.shards[0].rows_updated), (0, 0));

    // An image gone from the folder: left out, planned again, rendered by
    // `generate OUT` to the same bytes.
    let lost = w.dir.path().join("lost");
    gen(&w, &cfg(&w, 4), &lost).unwrap();
    let rel = format!("images/{}/{}.png", &s[2].1[..2], s[2].1);
    std::fs::remove_file(lost.join(&rel)).unwrap();
    let out2 = w.dir.path().join("out2");
    let r = merge_into(&out2, std::slice::from_ref(&lost));
    let sh = &r.shards[0];
    assert_eq!(
        (
            sh.files_missing,
            sh.items_without_image,
            r.rendered,
            r.missing
        ),
        (1, 1, 3, 1)
    );
    assert_eq!(sh.missing_files, vec![rel.clone()]);
    assert_eq!(item_ids(&out2).len(), 3);
    let g = gen(&w, &cfg(&w, 4), &out2).unwrap();
    assert_eq!((g.rendered, g.skipped), (1, 3));
    assert_eq!(rows(&out2), rows(&shard));
    assert_eq!(
        std::fs::read(out2.join(&rel)).unwrap(),
        std::fs::read(shard.join(&rel)).unwrap()
    );
    // In the folder itself, `generate` renders the lost image again (its
    // item set aside as `image_missing` until it is back).
    let g = gen(&w, &cfg(&w, 4), &lost).unwrap();
    assert_eq!((g.plan.missing_images, g.rendered, g.skipped), (1, 1, 3));
    assert_eq!(
        std::fs::read(lost.join(&rel)).unwrap(),
        std::fs::read(shard.join(&rel)).unwrap()
    );
    assert_eq!(
        count(&lost, "SELECT count(*) FROM items WHERE status = 'ok'"),
        4
    );
    assert_eq!(count(&lost, "SELECT count(*) FROM item_verdicts"), 0);

    // The same plan index rendered to other pixels in a second folder.
    let alt = w.dir.path().join("alt");
    gen(&w, &cfg(&w, 4), &alt).unwrap();
    let other = "f".repeat(64);
    let other_rel = format!("images/ff/{other}.png");
    std::fs::create_dir_all(alt.join("images/ff")).unwrap();
    std::fs::copy(alt.join(&rel), alt.join(&other_rel)).unwrap();
    Manifest::open(&alt)
        .unwrap()
        .conn()
        .execute(
            "UPDATE items SET sha256 = ?1, path = ?2 WHERE sha256 = ?3",
            rusqlite::params![other, other_rel, s[2].1],
        )
        .unwrap();
    let conflicted: i64 = Manifest::open(&alt)
        .unwrap()
        .conn()
        .query_row(
            "SELECT g.idx FROM gen_items g JOIN items i ON i.id = g.item_id WHERE i.sha256 = ?1",
            [&other],
            |r| r.get(0),
        )
        .unwrap();
    let out3 = w.dir.path().join("out3");
    let r = merge_into(&out3, &[shard.clone(), alt]);
    assert_eq!(
        (
            r.shards[1].items_conflicting,
            r.shards[1].conflict_examples.clone()
        ),
        (1, vec![conflicted as u64])
    );
    assert_eq!(item_ids(&out3).len(), 4);
    assert_eq!(rows(&out3), rows(&shard));
}
