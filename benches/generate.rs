//! `eps2v generate` throughput on CPU with a seeded random tiny SDXL
//! checkpoint: images/s, and the share of wall time spent outside the model
//! (planning and prompting, PNG encoding, perceptual hashes, content-
//! addressed writes, manifest transactions) — target ≤ 5 %. "The model" is
//! `sample_batch`: text encoders, the UNet steps and the VAE decode.
//!
//! Run with `cargo bench --profile dev --bench generate [-- --count N
//! --steps N --toy-count N]`. Each row is a fresh dataset folder; the
//! second table renders the toy world's default plan (the committed toy
//! model, or a random one of its size; 20 steps, CFG 5, the toy sizes)
//! one batch after the other and on lanes (`nn::lanes`), twice each,
//! interleaved, with the speed-up; the third times the outside-the-model
//! pieces of one image on their own.

use std::time::Instant;

use eps2v::diffusion::{SamplerKind, UncondMode};
use eps2v::manifest::Manifest;
use eps2v::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use eps2v::pipeline::{LoadOptions, SdxlModel};
use eps2v::prompts::{self, TemplateSpec};
use eps2v::stages::generate::{self, GenerateConfig, Shard, Sizes};
use eps2v::stages::Ctx;

mod common;
use common::arg;

fn main() -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime();
    eps2v::nn::on_pool(body)
}

/// `ckpt` loaded with its hash, as `eps2v generate` loads it.
fn load(ckpt: &std::path::Path) -> eps2v::Result<SdxlModel> {
    SdxlModel::load(
        ckpt,
        &LoadOptions {
            hash: true,
            ..Default::default()
        },
    )
}

/// A whole-plan generate config of `count` images (seed 1, CFG 5, zeroed
/// uncond).
fn config(
    ckpt: &std::path::Path,
    template: &TemplateSpec,
    count: u64,
    sizes: Sizes,
    (steps, sampler, batch): (usize, SamplerKind, usize),
) -> GenerateConfig {
    GenerateConfig {
        model: ckpt.to_path_buf(),
        prediction: None,
        ztsnr: None,
        template: template.clone(),
        wildcards: None,
        count,
        seed: 1,
        combinatorial: false,
        sizes,
        steps,
        cfg: 5.0,
        rescale: None,
        sampler,
        schedule: None,
        uncond: UncondMode::Zero,
        batch,
        shard: Shard::ALL,
        replan: false,
    }
}

fn body() -> eps2v::Result<()> {
    let count = arg("--count", 24) as u64;
    let steps = arg("--steps", 8);
    let dir = tempfile::tempdir().map_err(|e| eps2v::Error::io("tempdir", e))?;
    let ckpt = dir.path().join("tiny.safetensors");
    write_random_checkpoint(&ckpt, TinyOptions::default())?;
    let model = load(&ckpt)?;
    let spec = TemplateSpec::Builtin("1girl".into());
    let template = prompts::load(&spec, None)?;
    println!(
        "generate, tiny random SDXL checkpoint, CPU f32, {} rayon threads, {count} images per row, {steps} steps, euler_a, CFG 5 (cond + uncond rows)",
        rayon::current_num_threads()
    );
    println!();
    println!("| size | batch | wall s | images/s | model s | outside the model |");
    println!("|---|---|---|---|---|---|");
    for (side, batch) in [(256u32, 1usize), (256, 4), (512, 1), (512, 4)] {
        let sizes = Sizes::Fixed {
            width: side,
            height: side,
        };
        let cfg = config(
            &ckpt,
            &spec,
            count,
            sizes,
            (steps, SamplerKind::EulerAncestral, batch),
        );
        let ds = dir.path().join(format!("ds-{side}-{batch}"));
        let mut m = Manifest::init(&ds)?;
        let r = generate::run(&cfg, &template, &model, &mut m, &Ctx::quiet())?;
        let outside = (r.seconds - r.model_seconds) / r.seconds * 100.0;
        println!(
            "| {side}x{side} | {batch} | {:.2} | {:.2} | {:.2} | {outside:.1} % |",
            r.seconds, r.images_per_second, r.model_seconds
        );
    }
    toy_lanes(dir.path(), arg("--toy-count", 192) as u64)?;
    // The outside-the-model pieces of one 512×512 image, on their own.
    let reps = 20;
    let t = Instant::now();
    for i in 0..reps * 50 {
        let _ = prompts::tidy(&template.random(1, i as u64));
    }
    let prompt_ms = t.elapsed().as_secs_f64() * 1000.0 / (reps * 50) as f64;
    let img = image::RgbImage::from_fn(512, 512, |x, y| {
        image::Rgb([(x * 7 + y) as u8, (y * 3) as u8, (x ^ y) as u8])
    });
    let t = Instant::now();
    let mut png = Vec::new();
    for _ in 0..reps {
        png = eps2v::imaging::infotext::write_png_with_parameters(&img, "x\nSteps: 8")?;
    }
    let png_ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = eps2v::imaging::hash::image_hashes(&img);
    }
    let hash_ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    // The VAE decode is part of "the model" above; its own share, for reference.
    let latent = candle_core::Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &candle_core::Device::Cpu)?;
    let t = Instant::now();
    for _ in 0..3 {
        model
            .vae
            .decode_scaled(&latent)?
            .sum_all()?
            .to_scalar::<f32>()?;
    }
    let vae_ms = t.elapsed().as_secs_f64() * 1000.0 / 3.0;
    println!();
    println!("| piece (one 512x512 image) | ms |");
    println!("|---|---|");
    println!("| 1girl prompt (random + tidy) | {prompt_ms:.3} |");
    println!(
        "| PNG encode with parameters ({} KB) | {png_ms:.2} |",
        png.len() / 1024
    );
    println!("| pHash + dHash + pixel sha256 | {hash_ms:.2} |");
    println!("| (in the model) tiny VAE decode | {vae_ms:.1} |");
    Ok(())
}

/// The toy default plan (`eps2v run`'s generate stage, `count` images)
/// one batch after the other and on lanes, interleaved: ABAB.
fn toy_lanes(dir: &std::path::Path, count: u64) -> eps2v::Result<()> {
    let committed = eps2v::run::defaults::default_model_path();
    let ckpt = if committed.is_file() {
        committed
    } else {
        let p = dir.join("toy.safetensors");
        eps2v::toy::models::write_random_toy_model(&p, TinyOptions::default())?;
        p
    };
    let model = load(&ckpt)?;
    let spec = TemplateSpec::Builtin("toy".into());
    let template = prompts::load(&spec, None)?;
    let auto = eps2v::nn::lanes::lanes_for_latent(&model.device, 12, 8);
    println!();
    println!(
        "toy plan: {} ({}), {count} images at 64x64 / 96x64 / 64x96, 20 steps, euler, CFG 5, batch 8",
        ckpt.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        if ckpt.starts_with(dir) { "random weights" } else { "committed" },
    );
    println!();
    println!("| lanes | wall s | images/s |");
    println!("|---|---|---|");
    let mut secs = [0.0f64; 2];
    for rep in 0..2 {
        for (k, lanes) in [1, auto].into_iter().enumerate() {
            eps2v::nn::lanes::set_lanes(Some(lanes));
            let sizes = Sizes::parse_weights("*=0,64x64=1,96x64=1,64x96=1")?;
            let cfg = GenerateConfig {
                seed: 0,
                ..config(&ckpt, &spec, count, sizes, (20, SamplerKind::Euler, 8))
            };
            let ds = dir.join(format!("toy-{rep}-{lanes}"));
            let mut m = Manifest::init(&ds)?;
            let r = generate::run(&cfg, &template, &model, &mut m, &Ctx::quiet())?;
            secs[k] += r.seconds;
            println!(
                "| {} | {:.2} | {:.2} |",
                r.lanes, r.seconds, r.images_per_second
            );
        }
    }
    eps2v::nn::lanes::set_lanes(None);
    println!(
        "lanes ({auto}) against one after the other: {:.2}x the speed",
        secs[0] / secs[1].max(1e-9)
    );
    Ok(())
}
