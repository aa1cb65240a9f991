//! Captioning throughput on the CPU: is the tagger kept busy?
//!
//! `cargo bench --profile dev --bench caption [-- --images N --batch B]`
//!
//! N (default 64) synthetic ~1 MP PNGs in SDXL sizes (what `generate`
//! writes), with an A1111 prompt each, are imported into a dataset; then,
//! for two seeded random taggers — `tiny` (`TaggerConfig::tiny`, 32² input)
//! and `small` (the v3 layout at the real 448² input and 784 tokens, 96
//! wide, 4 blocks, so that the model costs about as much as the decoding) —
//! it measures on the same images:
//! - **prepare only**: read + decode + pad + Pillow-bicubic resize +
//!   normalise, batch by batch on the rayon pool;
//! - **model only**: the tagger on those prepared batches;
//! - **caption stage**: `stages::caption::run` end to end (prepare of batch
//!   k+1 overlapped with the model on batch k, tag selection, alignment,
//!   captions, manifest transactions).
//!
//! The model is kept busy when the stage's wall time is close to the
//! model-only time (and below prepare + model, the serial sum). On a CPU
//! both phases compete for the same cores, so the overlap can only hide
//! what the model leaves idle; `--full` adds the model-only time per image
//! of the real `wd-vit-tagger-v3` architecture (random weights, 448², 12
//! blocks, 10861 tags) to set the preparation cost against. Prints a table;
//! numbers go in the README.

use std::time::Instant;

use eps2v::imaging::decode::{decode, DecodeLimits};
use eps2v::imaging::infotext::encode_png;
use eps2v::manifest::Manifest;
use eps2v::models::tagger::tiny::{write_random_tagger, TinyTaggerOptions};
use eps2v::models::tagger::{Tagger, TaggerConfig};
use eps2v::stages::caption::{self, CaptionConfig};
use eps2v::stages::{self, Ctx};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

mod common;
use common::arg;

/// A ~1 MP image in one of four SDXL sizes: gradient, blocks, light noise.
fn synth(k: usize) -> RgbImage {
    let sizes = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768)];
    let (w, h) = sizes[k % sizes.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
    let (a, b): (f32, f32) = (rng.random(), rng.random());
    let blocks: Vec<(u32, u32, u32, u32, [u8; 3])> = (0..6)
        .map(|_| {
            (
                rng.random_range(0..w),
                rng.random_range(0..h),
                rng.random_range(w / 8..w / 2),
                rng.random_range(h / 8..h / 2),
                [rng.random(), rng.random(), rng.random()],
            )
        })
        .collect();
    RgbImage::from_fn(w, h, |x, y| {
        let n = (((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 13) % 6) as u8;
        for &(bx, by, bw, bh, col) in &blocks {
            if x >= bx && x < bx + bw && y >= by && y < by + bh {
                return Rgb(col.map(|v| v.saturating_add(n)));
            }
        }
        let (xf, yf) = (x as f32 / w as f32, y as f32 / h as f32);
        Rgb([
            (255.0 * (a * xf + (1.0 - a) * yf)) as u8 + n,
            (250.0 * (b * yf)) as u8 + n,
            (250.0 * (1.0 - xf)) as u8,
        ])
    })
}

fn main() -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime(); // as the eps2v binary does
    eps2v::nn::on_pool(run)
}

fn run() -> eps2v::Result<()> {
    let n: usize = arg("--images", 64);
    let batch: usize = arg("--batch", 16);
    let work = tempfile::tempdir().map_err(|e| eps2v::Error::io("tempdir", e))?;
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).map_err(|e| eps2v::Error::io(&src, e))?;
    let t = Instant::now();
    (0..n).into_par_iter().try_for_each(|k| -> eps2v::Result<()> {
        let params = format!(
            "1girl, solo, long hair, smile, upper body\nNegative prompt: lowres\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: {k}, Size: 1024x1024"
        );
        let bytes = encode_png(&synth(k), Some(&params), png::Compression::Fast)?;
        let p = src.join(format!("img_{k:05}.png"));
        std::fs::write(&p, bytes).map_err(|e| eps2v::Error::io(&p, e))
    })?;
    let ds = work.path().join("ds");
    let mut m = Manifest::init(&ds)?;
    let imported = stages::import::run(
        &stages::import::ImportConfig {
            from: src,
            ..Default::default()
        },
        &mut m,
        &Ctx::quiet(),
    )?;
    eprintln!(
        "made and imported {} images in {:.1}s",
        imported.imported,
        t.elapsed().as_secs_f64()
    );
    let paths: Vec<String> = {
        let mut st = m
            .conn()
            .prepare("SELECT path FROM items WHERE status = 'ok' ORDER BY id")
            .map_err(|e| m.err(e))?;
        let rows = st.query_map([], |r| r.get(0)).map_err(|e| m.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| m.err(e))?
    };

    println!(
        "\ncaptioning {n} ~1 MP PNGs, batch {batch}, {} threads (shared machine: compare ratios within a run)\n",
        rayon::current_num_threads()
    );
    println!("| tagger | prepare only s | model only s | prepare + model s | caption stage s | images/s | stage / model | wall outside the model |");
    println!("|---|---|---|---|---|---|---|---|");
    let small = TaggerConfig {
        img_size: 448,
        patch_size: 16,
        embed_dim: 96,
        depth: 4,
        num_heads: 2,
        mlp_hidden: 384,
        ..TaggerConfig::tiny(15)
    };
    for (name, cfg) in [("tiny", TaggerConfig::tiny(15)), ("small", small)] {
        let dir = work.path().join(name);
        let mut opts = TinyTaggerOptions::with_default_tags(3);
        opts.config = cfg;
        write_random_tagger(&dir, &opts)?;
        let tagger = Tagger::load(&dir, &candle_core::Device::Cpu)?;

        // Prepare only.
        let t = Instant::now();
        let mut prepared = Vec::new();
        for chunk in paths.chunks(batch) {
            let imgs: Vec<Vec<f32>> = chunk
                .par_iter()
                .map(|rel| -> eps2v::Result<Vec<f32>> {
                    let p = ds.join(rel);
                    let bytes = std::fs::read(&p).map_err(|e| eps2v::Error::io(&p, e))?;
                    let d = decode(&bytes, &DecodeLimits::default())
                        .map_err(|e| eps2v::Error::Other(e.to_string()))?;
                    Ok(tagger.preprocess.image(&d.rgb))
                })
                .collect::<eps2v::Result<_>>()?;
            prepared.push(tagger.preprocess.batch(&imgs, tagger.device())?);
        }
        let prep_s = t.elapsed().as_secs_f64();

        // Model only.
        let t = Instant::now();
        for b in &prepared {
            std::hint::black_box(tagger.probabilities(b)?);
        }
        let model_s = t.elapsed().as_secs_f64();

        // The stage, end to end (a new tagger id: every item is tagged).
        let cfg = CaptionConfig {
            tagger: Some(dir.clone()),
            batch,
            ..Default::default()
        };
        let t = Instant::now();
        let r = caption::run(&cfg, &mut m, &Ctx::quiet())?;
        let stage_s = t.elapsed().as_secs_f64();
        assert_eq!(r.tagged, n, "every image tagged");
        println!(
            "| {name} ({}², {} tokens, {} wide, {} blocks) | {prep_s:.2} | {model_s:.2} | {:.2} | {stage_s:.2} | {:.1} | {:.2}× | {:.0} % |",
            opts.config.img_size,
            opts.config.tokens(),
            opts.config.embed_dim,
            opts.config.depth,
            prep_s + model_s,
            n as f64 / stage_s,
            stage_s / model_s,
            100.0 * (stage_s - model_s).max(0.0) / stage_s
        );
    }
    if std::env::args().any(|a| a == "--full") {
        full_size_model(batch.min(4))?;
    }
    Ok(())
}

/// Model-only seconds per image of the real v3 ViT (random weights).
fn full_size_model(b: usize) -> eps2v::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    let cfg = TaggerConfig::wd_vit_v3();
    let varmap = VarMap::new();
    let model = eps2v::models::tagger::VisionTransformer::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )?;
    eps2v::models::sdxl::init_params(&varmap, 1)?;
    let x = Tensor::randn(0f32, 1.0, (b, 3, 448, 448), &Device::Cpu)?;
    std::hint::black_box(model.forward(&x)?); // warm-up
    let t = Instant::now();
    std::hint::black_box(model.forward(&x)?);
    let per = t.elapsed().as_secs_f64() / b as f64;
    println!(
        "
wd-vit-tagger-v3 architecture (448², 784 tokens, 768 wide, 12 blocks, 10861 tags), batch {b}: model only {per:.2} s per image"
    );
    Ok(())
}
