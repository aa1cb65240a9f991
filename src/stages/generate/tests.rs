//! Tests of `generate` on seeded random tiny checkpoints (64×64, 2 steps).

use super::*;
use crate::imaging::infotext::{read_parameters, Infotext};
use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use crate::pipeline::LoadOptions;
use crate::prompts::TemplateSpec;
use crate::stages::merge::{self, MergeConfig};

struct World {
    dir: tempfile::TempDir,
    model: SdxlModel,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.safetensors");
    write_random_checkpoint(&p, TinyOptions::default()).unwrap();
    let model = SdxlModel::load(
        &p,
        &LoadOptions {
            hash: true,
            ..Default::default()
        },
    )
    .unwrap();
    World { dir, model }
}

fn cfg(w: &World, count: u64) -> GenerateConfig {
    GenerateConfig {
        model: w.dir.path().join("tiny.safetensors"),
        prediction: None,
        ztsnr: None,
        template: TemplateSpec::Inline("1girl, {red|blue|green} hair, {smile|frown}".into()),
        wildcards: None,
        count,
        seed: 40,
        combinatorial: false,
        sizes: Sizes::Fixed {
            width: 64,
            height: 64,
        },
        steps: 2,
        cfg: 4.0,
        rescale: None,
        sampler: SamplerKind::Euler,
        schedule: None,
        uncond: UncondMode::Zero,
        batch: 2,
        shard: Shard::ALL,
        replan: false,
    }
}

fn gen(w: &World, c: &GenerateConfig, dir: &std::path::Path) -> Result<GenerateReport> {
    let t = crate::prompts::load(&c.template, c.wildcards.as_deref())?;
    let mut m = Manifest::init(dir)?;
    run(c, &t, &w.model, &mut m, &Ctx::quiet())
}

/// `(idx, state, seed, sha256 or reason)` of every plan row.
fn rows(dir: &std::path::Path) -> Vec<(i64, String, i64, String)> {
    let m = Manifest::open(dir).unwrap();
    let mut st = m
        .conn()
        .prepare(
            "SELECT g.idx, g.state, g.seed, coalesce(i.sha256, g.reason, '') FROM gen_items g
             LEFT JOIN items i ON i.id = g.item_id ORDER BY g.idx",
        )
        .unwrap();
    let r = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    r
}

/// (id, sha256) of every item, by id.
fn item_ids(dir: &std::path::Path) -> Vec<(i64, String)> {
    let m = Manifest::open(dir).unwrap();
    let mut st = m
        .conn()
        .prepare("SELECT id, sha256 FROM items ORDER BY id")
        .unwrap();
    let r = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    r
}

fn count(dir: &std::path::Path, sql: &str) -> i64 {
    Manifest::open(dir)
        .unwrap()
        .conn()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn plan_then_render_with_provenance_and_resume() {
    let w = world();
    let d = w.dir.path().join("ds");
    let c = cfg(&w, 5);
    let r = gen(&w, &c, &d).unwrap();
    assert_eq!((r.plan.added, r.rendered, r.skipped), (5, 5, 0));
    assert!(r.rejected.is_empty());
    // The disk estimate: five 64×64 images at the default size per pixel
    // (none on disk yet); this machine's disk holds them.
    let px = 5 * 64 * 64;
    assert_eq!(r.bytes_per_pixel, (space::DEFAULT_BYTES_PER_PIXEL, 0));
    assert_eq!(
        r.disk_need_bytes,
        (px as f64 * space::DEFAULT_BYTES_PER_PIXEL).ceil() as u64
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let rs = rows(&d);
    assert_eq!(rs.len(), 5);
    for (i, (idx, state, seed, _)) in rs.iter().enumerate() {
        assert_eq!(
            (*idx, state.as_str(), *seed),
            (i as i64, "rendered", 40 + i as i64)
        );
    }
    // The image: content-addressed PNG whose parameters are the plan row.
    let m = Manifest::open(&d).unwrap();
    let (path, prompt, gseed, extra): (String, String, i64, String) = m
        .conn()
        .query_row(
            "SELECT i.path, g.prompt, g.seed, g.extra_json FROM items i JOIN generation g ON g.item_id = i.id
             JOIN gen_items p ON p.item_id = i.id WHERE p.idx = 3",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(gseed, 43);
    assert!(
        extra.contains("\"Plan index\":3") && extra.contains("\"CFG rescale\""),
        "{extra}"
    );
    let bytes = std::fs::read(d.join(&path)).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    assert_eq!(path, format!("images/{}/{sha}.png", &sha[..2]));
    let raw = read_parameters(&bytes).unwrap();
    let info = Infotext::parse(&raw);
    assert_eq!(info.prompt, prompt);
    assert_eq!(info.get("Seed"), Some("43"));
    assert_eq!(info.get("Size"), Some("64x64"));
    assert!(
        prompt.starts_with("1girl, ") && prompt.contains(" hair, "),
        "{prompt}"
    );
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM hashes h JOIN gen_items g ON g.item_id = h.item_id"
        ),
        5
    );
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM captions WHERE source = 'a1111_prompt'"
        ),
        5
    );
    // A rerun renders nothing and changes nothing.
    let r2 = gen(&w, &c, &d).unwrap();
    assert_eq!((r2.plan.added, r2.rendered, r2.skipped), (0, 0, 5));
    assert_eq!(rows(&d), rs);
    // A larger count extends the plan; the first five stay as they are.
    // (Its disk estimate is measured on the five PNGs already there.)
    let on_disk: u64 = std::fs::read_dir(d.join("images"))
        .unwrap()
        .flat_map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap())
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    let r3 = gen(&w, &cfg(&w, 7), &d).unwrap();
    assert_eq!((r3.plan.added, r3.rendered, r3.skipped), (2, 2, 5));
    let bpp = on_disk as f64 / px as f64;
    assert_eq!(r3.bytes_per_pixel.1, 5);
    assert!(
        (r3.bytes_per_pixel.0 - bpp).abs() < 1e-9,
        "{:?} vs {bpp}",
        r3.bytes_per_pixel
    );
    assert_eq!(r3.disk_need_bytes, (2.0 * 64.0 * 64.0 * bpp).ceil() as u64);
    assert_eq!(rows(&d)[..5], rs[..]);
}

#[test]
fn a_different_plan_names_the_field_unless_replan() {
    let w = world();
    let d = w.dir.path().join("ds");
    gen(&w, &cfg(&w, 3), &d).unwrap();
    let before = rows(&d);
    let other = GenerateConfig {
        steps: 3,
        ..cfg(&w, 3)
    };
    let e = gen(&w, &other, &d).unwrap_err().to_string();
    assert!(e.contains("steps was 2, this run asks for 3"), "{e}");
    assert!(e.contains("--replan"), "{e}");
    let smaller = gen(&w, &cfg(&w, 2), &d).unwrap_err().to_string();
    assert!(smaller.contains("count was 3"), "{smaller}");
    let t = GenerateConfig {
        template: TemplateSpec::Inline("2girls".into()),
        ..cfg(&w, 3)
    };
    let e = gen(&w, &t, &d).unwrap_err().to_string();
    assert!(e.contains("template_digest was"), "{e}");
    assert_eq!(rows(&d), before, "a refused rerun writes nothing");
    assert_eq!(
        count(&d, "SELECT count(*) FROM runs WHERE stage = 'generate'"),
        1
    );
    // --replan: every row changed (steps), old images rejected, new ones rendered.
    let r = gen(
        &w,
        &GenerateConfig {
            replan: true,
            ..other
        },
        &d,
    )
    .unwrap();
    assert_eq!((r.plan.replanned, r.rendered), (3, 3));
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM items WHERE status = 'rejected' AND reason LIKE 'replanned:%'"
        ),
        3
    );
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM gen_items WHERE state = 'rendered' AND steps = 3"
        ),
        3
    );
}

/// Regression: a plan shrunk with --replan, then grown back, rendered the
/// same pixels again, found their item and marked the row rendered, but
/// the item stayed `rejected` (replanned), out of the dataset for good.
#[test]
fn rows_a_replan_removed_and_a_later_plan_restores_are_back_in_the_dataset() {
    let w = world();
    let d = w.dir.path().join("ds");
    gen(&w, &cfg(&w, 3), &d).unwrap();
    let ok = "SELECT count(*) FROM items WHERE status = 'ok'";
    assert_eq!(count(&d, ok), 3);
    let shrunk = GenerateConfig {
        replan: true,
        ..cfg(&w, 1)
    };
    let r = gen(&w, &shrunk, &d).unwrap();
    assert_eq!((r.plan.removed, count(&d, ok)), (2, 1));
    let r = gen(&w, &cfg(&w, 3), &d).unwrap();
    assert_eq!(r.rendered, 2);
    assert_eq!(count(&d, ok), 3);
    assert_eq!(
        count(&d, "SELECT count(*) FROM items WHERE reason IS NOT NULL"),
        0
    );
    // Another stage's rejection of those pixels stands: beside the
    // replan's while it is out of the plan, alone when it is back.
    let mut m = Manifest::open(&d).unwrap();
    let filter = m.begin_run("filter", &serde_json::json!({})).unwrap();
    let last: i64 = m
        .conn()
        .query_row("SELECT max(id) FROM items", [], |r| r.get(0))
        .unwrap();
    let tx = m.conn_mut().transaction().unwrap();
    let low = Some((ItemStatus::Rejected, "misaligned: 0.1"));
    crate::manifest::verdicts::set(&tx, last, "filter", low, filter).unwrap();
    tx.commit().unwrap();
    m.end_run(filter, true, &serde_json::json!({})).unwrap();
    drop(m);
    gen(&w, &shrunk, &d).unwrap();
    let reason = "SELECT count(*) FROM items WHERE reason LIKE 'replanned:%'";
    assert_eq!((count(&d, ok), count(&d, reason)), (1, 2));
    gen(&w, &cfg(&w, 3), &d).unwrap();
    assert_eq!(count(&d, ok), 2);
    let misaligned = "SELECT count(*) FROM items WHERE reason = 'misaligned: 0.1'";
    assert_eq!(count(&d, misaligned), 1);
}

/// Regression: a replan set aside only `ok` items (one status per item), so
/// an item another stage had rejected kept that rejection alone and came
/// back in the dataset when that stage took it back, though its plan row
/// was gone. Now the replan's verdict stands beside the other stage's.
#[test]
fn an_item_out_of_the_plan_stays_out_when_another_stage_takes_it_back() {
    let w = world();
    let d = w.dir.path().join("ds");
    gen(&w, &cfg(&w, 2), &d).unwrap();
    let mut m = Manifest::open(&d).unwrap();
    let bucket = m.begin_run("bucket", &serde_json::json!({})).unwrap();
    let last: i64 = m
        .conn()
        .query_row("SELECT max(id) FROM items", [], |r| r.get(0))
        .unwrap();
    let tx = m.conn_mut().transaction().unwrap();
    let small = Some((ItemStatus::Rejected, "too_small: 64x64"));
    crate::manifest::verdicts::set(&tx, last, "bucket", small, bucket).unwrap();
    tx.commit().unwrap();
    m.end_run(bucket, true, &serde_json::json!({})).unwrap();
    drop(m);
    let shrunk = GenerateConfig {
        replan: true,
        ..cfg(&w, 1)
    };
    gen(&w, &shrunk, &d).unwrap();
    // Bucket takes it back (other settings).
    let mut m = Manifest::open(&d).unwrap();
    let bucket = m.begin_run("bucket", &serde_json::json!({})).unwrap();
    let tx = m.conn_mut().transaction().unwrap();
    crate::manifest::verdicts::set(&tx, last, "bucket", None, bucket).unwrap();
    tx.commit().unwrap();
    m.end_run(bucket, true, &serde_json::json!({})).unwrap();
    drop(m);
    let ok = "SELECT count(*) FROM items WHERE status = 'ok'";
    let replanned = "SELECT count(*) FROM items WHERE reason LIKE 'replanned:%'";
    assert_eq!((count(&d, ok), count(&d, replanned)), (1, 1));
}

/// Regression: the prediction and ZTSNR change every image but are not in
/// the rows, so a --replan that changed only them kept the old images.
#[test]
fn a_replan_of_the_prediction_renders_every_row_again() {
    let w = world();
    let d = w.dir.path().join("ds");
    let fixed = |prediction: Option<Prediction>| GenerateConfig {
        prediction,
        ztsnr: Some(false),
        rescale: Some(0.0),
        schedule: Some(ScheduleKind::Simple),
        ..cfg(&w, 2)
    };
    gen(&w, &fixed(None), &d).unwrap();
    let before = rows(&d);
    let v = GenerateConfig {
        replan: true,
        ..fixed(Some(Prediction::V))
    };
    // The model as `generate` loads it for that config.
    let as_v = World {
        model: SdxlModel::load(
            &v.model,
            &LoadOptions {
                prediction: v.prediction,
                ztsnr: v.ztsnr,
                hash: true,
                ..Default::default()
            },
        )
        .unwrap(),
        dir: w.dir,
    };
    let r = gen(&as_v, &v, &d).unwrap();
    assert_eq!((r.plan.replanned, r.rendered), (2, 2));
    let after = rows(&d);
    assert!(before.iter().zip(&after).all(|(a, b)| a.3 != b.3));
    // The same settings again: nothing to do.
    let r = gen(&as_v, &v, &d).unwrap();
    assert_eq!((r.plan.replanned, r.rendered), (0, 0));
}

#[test]
fn batch_size_does_not_change_a_single_byte() {
    let w = world();
    let one = w.dir.path().join("b1");
    let three = w.dir.path().join("b3");
    let mixed = |b| GenerateConfig {
        batch: b,
        sizes: Sizes::parse_weights("*=0,64x64=1,64x128=1").unwrap(),
        uncond: UncondMode::Negative("lowres".into()),
        sampler: SamplerKind::EulerAncestral,
        ..cfg(&w, 6)
    };
    gen(&w, &mixed(1), &one).unwrap();
    gen(&w, &mixed(3), &three).unwrap();
    let a = rows(&one);
    assert_eq!(a, rows(&three));
    let sizes = count(
        &one,
        "SELECT count(DISTINCT width || 'x' || height) FROM gen_items",
    );
    assert_eq!(sizes, 2, "both sizes drawn");
}

/// Batches rendered on three single-thread lanes commit the manifest one
/// rendered one batch after the other writes: same rows, same item ids.
#[test]
fn lanes_change_neither_pixels_nor_the_manifest() {
    let w = world();
    let c = GenerateConfig {
        batch: 1,
        sizes: Sizes::parse_weights("*=0,64x64=1,64x128=1").unwrap(),
        ..cfg(&w, 7)
    };
    let mut seen = Vec::new();
    for threads in [1, 3] {
        let dir = w.dir.path().join(format!("t{threads}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let rep = pool.install(|| gen(&w, &c, &dir)).unwrap();
        assert_eq!(rep.rendered, 7);
        if std::env::var_os("EPS2V_LANES").is_none() {
            assert_eq!(rep.lanes, threads);
        }
        seen.push((rows(&dir), item_ids(&dir)));
    }
    assert_eq!(seen[0], seen[1]);
}

#[test]
fn broken_renders_are_rejected_and_reconsidered_but_not_other_stages_rejections() {
    let w = world();
    // A checkpoint whose UNet output overflows (a finite bias of 3e38, which
    // the loader accepts): every render is NaN/inf.
    let src = w.dir.path().join("tiny.safetensors");
    let ck = crate::models::sdxl::checkpoint::Checkpoint::open(&src).unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = ck
        .entries()
        .keys()
        .map(|k| {
            let t = ck
                .tensor(k, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
            let t = if k == "model.diffusion_model.out.2.bias" {
                (t.ones_like().unwrap() * 3e38).unwrap()
            } else {
                t
            };
            (k.clone(), t)
        })
        .collect();
    let nan = w.dir.path().join("nan.safetensors");
    crate::models::sdxl::checkpoint::save_tensors(&nan, &tensors, &Default::default()).unwrap();
    let model = SdxlModel::load(
        &nan,
        &LoadOptions {
            hash: true,
            ..Default::default()
        },
    )
    .unwrap();
    let nw = World {
        dir: tempfile::tempdir().unwrap(),
        model,
    };
    let d = nw.dir.path().join("ds");
    let c = GenerateConfig {
        model: nan.clone(),
        ..cfg(&w, 3)
    };
    let r = gen(&nw, &c, &d).unwrap();
    assert_eq!(r.rendered, 0);
    assert_eq!(r.rejected.get("nan_latent"), Some(&3));
    assert_eq!(count(&d, "SELECT count(*) FROM items"), 0);
    assert!(rows(&d)
        .iter()
        .all(|r| r.1 == "rejected" && r.3.starts_with("nan_latent: ")));
    // The rerun reconsiders generate's own rejections (and rejects them again).
    let r2 = gen(&nw, &c, &d).unwrap();
    assert_eq!(
        (r2.plan.reconsidered, r2.rejected.get("nan_latent")),
        (3, Some(&3))
    );
    // `inspect` lists them by reason.
    let rep = crate::stages::inspect::run(&Manifest::open_read_only(&d).unwrap(), 5).unwrap();
    assert_eq!(
        rep.generation_plan.rows,
        vec![vec![
            serde_json::json!("rejected"),
            serde_json::json!("nan_latent"),
            serde_json::json!(3)
        ]]
    );
    // An image another stage rejected is left alone.
    let good = w.dir.path().join("good");
    gen(&w, &cfg(&w, 2), &good).unwrap();
    {
        let m = Manifest::open(&good).unwrap();
        let run = m.begin_run("filter", &serde_json::json!({})).unwrap();
        m.conn()
            .execute(
                "UPDATE items SET status = 'rejected', reason = 'misaligned: 0.1', status_run_id = ?1
                 WHERE id = (SELECT item_id FROM gen_items WHERE idx = 0)",
                [run],
            )
            .unwrap();
    }
    let r3 = gen(&w, &cfg(&w, 2), &good).unwrap();
    assert_eq!((r3.plan.reconsidered, r3.rendered, r3.skipped), (0, 0, 2));
    assert_eq!(
        count(
            &good,
            "SELECT count(*) FROM items WHERE reason = 'misaligned: 0.1'"
        ),
        1
    );
}

#[test]
fn broken_reason_flags_black_and_flat_images() {
    let black = RgbImage::from_pixel(8, 8, image::Rgb([3, 1, 0]));
    assert!(broken_reason(&black)
        .unwrap()
        .starts_with("black_image: brightest value 3/255"));
    let grey = RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
    assert!(broken_reason(&grey).unwrap().starts_with("flat_image: "));
    let mut almost = grey.clone();
    almost.put_pixel(0, 0, image::Rgb([129, 128, 128]));
    assert!(
        broken_reason(&almost).is_some(),
        "one pixel off is still flat"
    );
    let noise = RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 90])
    });
    assert_eq!(broken_reason(&noise), None);
}

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
