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

#[path = "merge_tests.rs"]
mod merge_tests;
