use super::*;

fn cand(id: i64, pixels: u64, score: Option<f64>, px: &str, hash: u64) -> Candidate {
    Candidate {
        id,
        pixels,
        lossless: true,
        score,
        captioned: false,
        written_caption: false,
        file_size: 0,
        pixel_sha256: px.into(),
        hash,
    }
}

/// The keeper choice by each member's pairs is the choice by scanning
/// every keeper of the group (the rule as first written), on random
/// groups with chains, exact pixels and ties.
#[test]
fn keepers_by_pairs_equal_keepers_by_scanning_every_keeper() {
    fn by_scanning(items: &[Candidate], groups: &[Vec<u32>], radius: u32) -> Vec<Cluster> {
        let mut clusters = Vec::new();
        for g in groups {
            let mut order = g.clone();
            order.sort_by(|&a, &b| keeper_order(&items[a as usize], &items[b as usize]));
            let mut kept: Vec<(&Candidate, Vec<Drop>)> = Vec::new();
            for &i in &order {
                let c = &items[i as usize];
                let exact = kept
                    .iter()
                    .position(|(k, _)| k.pixel_sha256 == c.pixel_sha256);
                let near = kept
                    .iter()
                    .enumerate()
                    .map(|(n, (k, _))| ((c.hash ^ k.hash).count_ones(), n))
                    .filter(|&(d, _)| d <= radius)
                    .min()
                    .map(|(_, n)| n);
                match exact.or(near) {
                    Some(n) => {
                        let k = kept[n].0;
                        kept[n].1.push(Drop {
                            item_id: c.id,
                            keeper_id: k.id,
                            distance: (c.hash ^ k.hash).count_ones(),
                            kind: if exact.is_some() { "exact" } else { "near" },
                        });
                    }
                    None => kept.push((c, Vec::new())),
                }
            }
            push_clusters(kept, &mut clusters);
        }
        clusters.sort_by_key(|c| c.keeper_id);
        clusters
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20 {
        // Hashes near a few centres, so that groups chain.
        let centres: Vec<u64> = (0..4).map(|_| next()).collect();
        let items: Vec<Candidate> = (0..300)
            .map(|k| {
                let mut h = centres[(next() % 4) as usize];
                for _ in 0..(next() % 12) {
                    h ^= 1 << (next() % 64);
                }
                let px = format!("p{}", next() % 280);
                let pixels = [64, 128, 256][(next() % 3) as usize];
                cand(k, pixels, None, &px, h)
            })
            .collect();
        let radius = [4, 8, 10][round % 3];
        let (groups, pairs) = components_and_pairs(&items, radius);
        let got = choose_keepers(&items, &groups, &pairs);
        assert!(!got.is_empty());
        let want = by_scanning(&items, &groups, radius);
        assert_eq!(got, want, "round {round}");
    }
}

/// The score the keeper rule reads is the tagger's alignment with the
/// prompt when there is one, not the most confident single tag.
#[test]
fn the_keeper_score_is_the_alignment_when_tagged() {
    let d = tempfile::tempdir().unwrap();
    let m = Manifest::init(d.path()).unwrap();
    let run = m.begin_run("test", &serde_json::json!({})).unwrap();
    m.conn()
        .execute_batch(&format!(
            "INSERT INTO items (id, sha256, path, source, width, height, format, status, run_id, status_run_id, created_at)
                 VALUES (1, 'a', 'a.png', 'a', 8, 8, 'png', 'ok', {run}, {run}, 'x'),
                        (2, 'b', 'b.png', 'b', 8, 8, 'png', 'ok', {run}, {run}, 'x');
             INSERT INTO hashes (item_id, pixel_sha256, phash, dhash, run_id)
                 VALUES (1, 'same', 5, 5, {run}), (2, 'same', 5, 5, {run});
             INSERT INTO tags (item_id, source, tag, score, run_id)
                 VALUES (1, 'tagger', '1girl', 0.99, {run}), (2, 'tagger', '1girl', 0.9, {run});
             INSERT INTO tagging (item_id, tagger, settings, alignment, run_id)
                 VALUES (1, 't', 's', 0.5, {run}), (2, 't', 's', 1.0, {run});"
        ))
        .unwrap();
    let (clusters, _) = read_and_plan(&DedupeConfig::default(), &m).unwrap();
    assert_eq!(clusters.len(), 1);
    assert_eq!(clusters[0].keeper_id, 2);
    assert_eq!(clusters[0].drops[0].kind, "exact");
}

/// Regression (review of the verdicts change): a dedupe rerun cleared
/// its verdicts on every item, also on a duplicate another stage had
/// set aside since, which it does not look at; when that stage took it
/// back, it was `ok` beside its keeper.
#[test]
fn a_rerun_keeps_its_verdict_on_a_duplicate_another_stage_set_aside() {
    let d = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(d.path()).unwrap();
    let run = m.begin_run("import", &serde_json::json!({})).unwrap();
    m.conn()
        .execute_batch(&format!(
            "INSERT INTO items (id, sha256, path, source, width, height, format, status, run_id, status_run_id, created_at)
                 VALUES (1, 'a', 'a.png', 'a', 8, 8, 'png', 'ok', {run}, {run}, 'x'),
                        (2, 'b', 'b.png', 'b', 4, 4, 'png', 'ok', {run}, {run}, 'x');
             INSERT INTO hashes (item_id, pixel_sha256, phash, dhash, run_id)
                 VALUES (1, 'p1', 5, 5, {run}), (2, 'p2', 5, 5, {run});"
        ))
        .unwrap();
    m.end_run(run, true, &serde_json::json!({})).unwrap();
    let cfg = DedupeConfig::default();
    run_dedupe(&cfg, &mut m);
    let status = |m: &Manifest| -> String {
        m.conn()
            .query_row("SELECT status FROM items WHERE id = 2", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(status(&m), "duplicate");
    let filter = m.begin_run("filter", &serde_json::json!({})).unwrap();
    let tx = m.conn_mut().transaction().unwrap();
    let low = Some((ItemStatus::Rejected, "misaligned: 0.1"));
    verdicts::set(&tx, 2, "filter", low, filter).unwrap();
    tx.commit().unwrap();
    run_dedupe(&cfg, &mut m);
    let tx = m.conn_mut().transaction().unwrap();
    verdicts::set(&tx, 2, "filter", None, filter).unwrap();
    tx.commit().unwrap();
    m.end_run(filter, true, &serde_json::json!({})).unwrap();
    assert_eq!(status(&m), "duplicate");
    let rows: i64 = m
        .conn()
        .query_row(
            "SELECT count(*) FROM duplicates WHERE item_id = 2",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
    // The next rerun looks at it again, and decides the same.
    run_dedupe(&cfg, &mut m);
    assert_eq!(status(&m), "duplicate");
}

/// Regression: the hand-captioned, resized copy of a full-size
/// original was dropped and its caption with it (the keeper trained on
/// its machine caption). The keeper takes it, ahead of that caption;
/// each run makes it again; not after a `caption --overwrite`.
#[test]
fn a_dropped_duplicates_written_caption_goes_to_its_keeper() {
    let d = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(d.path()).unwrap();
    let imp = m.begin_run("import", &serde_json::json!({})).unwrap();
    m.conn()
        .execute_batch(&format!(
            "INSERT INTO items (id, sha256, path, source, width, height, format, status, run_id, status_run_id, created_at)
                 VALUES (1, 'a', 'a.png', 'a', 8, 8, 'png', 'ok', {imp}, {imp}, 'x'),
                        (2, 'b', 'b.jpg', 'b', 4, 4, 'jpeg', 'ok', {imp}, {imp}, 'x');
             INSERT INTO hashes (item_id, pixel_sha256, phash, dhash, run_id)
                 VALUES (1, 'p1', 5, 5, {imp}), (2, 'p2', 5, 5, {imp});
             INSERT INTO captions (item_id, source, text, run_id)
                 VALUES (1, 'policy', 'machine words', {imp}),
                        (2, 'sidecar_caption', 'from .caption', {imp}),
                        (2, 'sidecar_txt', 'hand written', {imp});"
        ))
        .unwrap();
    m.end_run(imp, true, &serde_json::json!({})).unwrap();
    let cfg = DedupeConfig::default();
    let caption_of_1 = |m: &Manifest| {
        crate::stages::export::load_rows(m, true)
            .unwrap()
            .into_iter()
            .find(|r| r.item_id == 1)
            .and_then(|r| r.caption)
    };
    let dry = DedupeConfig {
        dry_run: true,
        ..DedupeConfig::default()
    };
    assert_eq!(
        run(&dry, &mut m, &Ctx::quiet()).unwrap().carried_captions,
        1
    );
    for _ in 0..2 {
        let r = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
        assert_eq!((r.near + r.exact, r.carried_captions), (1, 1));
        assert_eq!(caption_of_1(&m).as_deref(), Some("hand written"));
    }
    let carried: i64 = m
        .conn()
        .query_row(
            "SELECT count(*) FROM captions WHERE source = ?1",
            [CARRIED_CAPTION_SOURCE],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(carried, 1);
    // Once the keeper has a sidecar of its own, the carried one is not
    // used (its policy caption stays ahead until `caption` reruns, as
    // for any sidecar added after captioning).
    m.conn()
        .execute(
            &format!("INSERT INTO captions (item_id, source, text, run_id) VALUES (1, 'sidecar_txt', 'its own', {imp})"),
            [],
        )
        .unwrap();
    assert_eq!(caption_of_1(&m).as_deref(), Some("machine words"));
    m.conn()
        .execute(
            "DELETE FROM captions WHERE item_id = 1 AND source = 'sidecar_txt'",
            [],
        )
        .unwrap();
    let cap = m
        .begin_run("caption", &serde_json::json!({"overwrite": true}))
        .unwrap();
    m.end_run(cap, true, &serde_json::json!({})).unwrap();
    let r = run(&cfg, &mut m, &Ctx::quiet()).unwrap();
    assert_eq!(r.carried_captions, 0);
    assert_eq!(caption_of_1(&m).as_deref(), Some("machine words"));
}

fn run_dedupe(cfg: &DedupeConfig, m: &mut Manifest) {
    run(cfg, m, &Ctx::quiet()).unwrap();
}

#[test]
fn keeper_is_largest_then_best_score_then_oldest() {
    let items = vec![
        cand(1, 100, None, "a", 0),
        cand(2, 400, None, "b", 1),
        cand(3, 400, Some(0.9), "c", 3),
        cand(4, 400, Some(0.9), "d", 7),
        cand(5, 50, None, "e", u64::MAX),
    ];
    let c = plan(&items, 3);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].keeper_id, 3);
    let ids: Vec<i64> = c[0].drops.iter().map(|d| d.item_id).collect();
    assert_eq!(ids, vec![1, 2, 4]);
    assert_eq!(c[0].drops[2].distance, 1);
}

#[test]
fn chains_drop_only_within_the_radius_and_exact_pixels_join_even_with_far_hash() {
    // 0 -8- 1 -8- 2 : chain at radius 8 (0 and 2 are 16 apart); 3 has
    // the same pixels as 0. 1 goes as a near duplicate of 0; 2 is near
    // only the dropped 1, so it is kept.
    let h0 = 0u64;
    let h1 = 0xFFu64;
    let h2 = 0xFFFFu64;
    let items = vec![
        cand(10, 10, None, "p0", h0),
        cand(11, 10, None, "p1", h1),
        cand(12, 10, None, "p2", h2),
        cand(13, 10, None, "p0", u64::MAX),
        cand(14, 10, None, "p4", 0xF0F0_F0F0_0000_0000),
    ];
    let c = plan(&items, 8);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].keeper_id, 10);
    let kinds: Vec<(i64, &str, u32)> = c[0]
        .drops
        .iter()
        .map(|d| (d.item_id, d.kind, d.distance))
        .collect();
    assert_eq!(kinds, vec![(11, "near", 8), (13, "exact", 64)]);
    assert_eq!(components(&items, 8), [vec![0, 1, 2, 3]]);
}
