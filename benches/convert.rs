//! The conversion, measured (long version of the test
//! `train::tests::the_conversion_works_as_a_number`):
//! `cargo bench --profile dev --bench convert [-- --eps-steps N --v-steps N --back-steps N --lr X]`.
//!
//! A tiny SDXL-shaped model (`UNetConfig::tiny()`, seeded random weights,
//! a VAE rescaled to unit-variance latents) is trained from scratch with the
//! eps objective on four 64×64 coloured shapes (one caption each) through
//! the real pipeline (import → bucket → `train`); then converted with
//! `--objective v --ztsnr`, then trained back to eps. After each phase the
//! model samples every caption (Euler, 12 steps, CFG 1, seeds 0 and 1) and
//! the table reports the mean relative squared distance of the sampled
//! latents to the caption's training latent (0 = the data exactly), with
//! the same eps weights also sampled as v + ZTSNR ("unconverted").

use std::time::Instant;

use eps2v::diffusion::Prediction;
use eps2v::manifest::Manifest;
use eps2v::pipeline::{LoadOptions, SdxlModel};
use eps2v::stages::Ctx;
use eps2v::train::config::{SaveDtype, TrainConfig};
use eps2v::train::testkit::{dataset, shape_latents, CAPTIONS};
use eps2v::train::{eval, train, TrainOptions};

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn distance(model: &SdxlModel, targets: &[candle_core::Tensor]) -> eps2v::Result<f64> {
    let mut total = 0.0;
    for (i, c) in CAPTIONS.iter().enumerate() {
        for seed in [0, 1] {
            let z = eval::sample_latent(model, c, seed, 12, 1.0, 64, 64)?;
            let num = (z - &targets[i])?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            let den = targets[i].sqr()?.sum_all()?.to_scalar::<f32>()?;
            total += (num / den) as f64;
        }
    }
    Ok(total / (2 * CAPTIONS.len()) as f64)
}

fn load(
    p: &std::path::Path,
    pred: Option<Prediction>,
    ztsnr: Option<bool>,
) -> eps2v::Result<SdxlModel> {
    SdxlModel::load(
        p,
        &LoadOptions {
            prediction: pred,
            ztsnr,
            hash: false,
        },
    )
}

fn main() -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime();
    eps2v::nn::on_pool(|| {
        let eps_steps = arg("--eps-steps", 1500.0) as usize;
        let v_steps = arg("--v-steps", 400.0) as usize;
        let back_steps = arg("--back-steps", 400.0) as usize;
        let lr = arg("--lr", 1e-3);
        let d = tempfile::tempdir().map_err(|e| eps2v::Error::io(std::env::temp_dir(), e))?;
        let (ds, ck) = dataset(d.path())?;
        let cfg = |model: &std::path::Path,
                   out: &std::path::Path,
                   objective: Prediction,
                   steps: usize| TrainConfig {
            model: model.to_path_buf(),
            objective,
            ztsnr: objective == Prediction::V,
            steps,
            batch_size: 4,
            lr,
            caption_dropout: 0.0,
            val_fraction: 0.0,
            eval_every: 0,
            eval_prompt_count: 1,
            eval_seeds: vec![0],
            eval_steps: 2,
            eval_cfg: 1.0,
            save_every: 0,
            save_dtype: SaveDtype::F32,
            out: Some(out.to_path_buf()),
            ..Default::default()
        };
        let mut rows = Vec::new();
        let phase = |name: &str,
                     model: &std::path::Path,
                     out: &std::path::Path,
                     obj: Prediction,
                     steps: usize|
         -> eps2v::Result<f64> {
            let mut m = Manifest::open(&ds)?;
            let t0 = Instant::now();
            let r = train(
                &cfg(model, out, obj, steps),
                &mut m,
                &TrainOptions::default(),
                &Ctx::quiet(),
            )?;
            let s = t0.elapsed().as_secs_f64();
            println!(
                "{name}: {steps} steps in {s:.1} s ({:.1} ms/step), last loss {:.4}",
                1e3 * s / steps as f64,
                r.last_loss.unwrap_or(f64::NAN)
            );
            Ok(s)
        };
        let eps = d.path().join("eps.safetensors");
        let v = d.path().join("v.safetensors");
        let back = d.path().join("back.safetensors");
        phase("eps from scratch", &ck, &eps, Prediction::Eps, eps_steps)?;
        let m = load(&eps, None, None)?;
        let targets = shape_latents(&m)?;
        rows.push(("eps model, sampled as eps", distance(&m, &targets)?));
        rows.push((
            "same weights, sampled as v + ZTSNR (unconverted)",
            distance(&load(&eps, Some(Prediction::V), Some(true))?, &targets)?,
        ));
        phase("convert (v + ZTSNR)", &eps, &v, Prediction::V, v_steps)?;
        rows.push((
            "converted, sampled as v + ZTSNR",
            distance(&load(&v, None, None)?, &targets)?,
        ));
        phase("back to eps", &v, &back, Prediction::Eps, back_steps)?;
        rows.push((
            "converted back, sampled as eps",
            distance(&load(&back, None, None)?, &targets)?,
        ));
        println!();
        println!("| model | distance to data (mean rel. sq. error of sampled latents) |");
        println!("|---|---|");
        for (n, v) in &rows {
            println!("| {n} | {v:.4} |");
        }
        Ok(())
    })
}
