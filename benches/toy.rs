//! Toy-world model sizes and the toy UNet's training step (issue 10:
//! "a UNet training step at batch 8 on 64×64 images (8×8 latents) takes
//! well under ~100 ms on this CPU and the files total a few MB").
//!
//! `cargo bench --profile dev --bench toy [-- --steps N]`
//!
//! Prints the parameter count and f32 / f16 size of each part of the `toy`
//! family (UNet, VAE, the two text encoders, the tagger over the scene
//! tags), then the training step of `UNetConfig::toy()` at batch 8 for
//! each toy bucket: random latents, per-sample timesteps, 77 context
//! tokens of width 48, pooled 32 + size conditioning, MSE against a random
//! target, the project's fused AdamW, f32, two threads (`nn::on_pool`,
//! `nn::tune_cpu_runtime`, as the binary). Forward (incl. loss), backward,
//! optimizer and whole-step medians over the measured steps after 2
//! warm-up steps, with the pool's idle worker kept polling for work
//! (`nn::keep_warm`, as the trainer runs) and, last column, the whole step
//! without it (rayon parks the idle worker between ops). The machine may be
//! shared: compare rows of one run.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use eps2v::models::sdxl::clip::ClipTextModel;
use eps2v::models::sdxl::{
    build_y, init_params, SizeCond, UNet, UNetConfig, Vae, VaeConfig, UNET_PREFIX,
};
use eps2v::models::tagger::{TaggerConfig, VisionTransformer};
use eps2v::pipeline::TextConfigs;
use rand::SeedableRng;

mod common;
use common::{adamw, median, randn};

const BATCH: usize = 8;
const TOKENS: usize = 77;
const WARMUP: usize = 2;

fn count(build: impl FnOnce(VarBuilder) -> eps2v::Result<()>) -> eps2v::Result<usize> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    Ok(varmap.all_vars().iter().map(|v| v.elem_count()).sum())
}

fn sizes() -> eps2v::Result<()> {
    let text = TextConfigs::toy();
    let tags = eps2v::toy::scenes::all_tags().len();
    let rows: Vec<(&str, usize)> = vec![
        (
            "UNet (UNetConfig::toy)",
            count(|vb| UNet::new(vb, &UNetConfig::toy()).map(|_| ()))?,
        ),
        (
            "VAE (VaeConfig::toy)",
            count(|vb| Vae::new(vb, &VaeConfig::toy()).map(|_| ()))?,
        ),
        (
            "CLIP-L-like (clip_l_toy)",
            count(|vb| ClipTextModel::new(vb, &text.clip_l).map(|_| ()))?,
        ),
        (
            "bigG-like (open_clip_bigg_toy)",
            count(|vb| ClipTextModel::new(vb, &text.clip_g).map(|_| ()))?,
        ),
        (
            "tagger (TaggerConfig::toy)",
            count(|vb| VisionTransformer::new(vb, &TaggerConfig::toy(tags)).map(|_| ()))?,
        ),
    ];
    println!("| part | parameters | f32 MB | f16 MB |\n|---|---|---|---|");
    let mut total = 0;
    for (name, n) in &rows {
        total += n;
        println!(
            "| {name} | {n} | {:.2} | {:.2} |",
            *n as f64 * 4e-6,
            *n as f64 * 2e-6
        );
    }
    println!(
        "| total | {total} | {:.2} | {:.2} |",
        total as f64 * 4e-6,
        total as f64 * 2e-6
    );
    Ok(())
}

fn step_bench(width: usize, height: usize, steps: usize) -> eps2v::Result<[f64; 4]> {
    let dev = Device::Cpu;
    let cfg = UNetConfig::toy();
    let varmap = VarMap::new();
    let unet = UNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp(UNET_PREFIX),
        &cfg,
    )?;
    init_params(&varmap, 0)?;
    let mut opt_step = adamw(varmap.all_vars(), 1e-4, true)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (lh, lw) = (height / 8, width / 8);
    let x = randn(&mut rng, &[BATCH, cfg.in_channels, lh, lw], 1.0)?;
    let target = randn(&mut rng, &[BATCH, cfg.out_channels, lh, lw], 1.0)?;
    let ctx = randn(&mut rng, &[BATCH, TOKENS, cfg.context_dim], 1.0)?;
    let pooled = randn(&mut rng, &[BATCH, cfg.pooled_dim], 1.0)?;
    let y = build_y(
        &pooled,
        &[SizeCond::inference(width as f32, height as f32); BATCH],
    )?;
    let ts: Vec<f32> = (0..BATCH)
        .map(|i| 999.0 * i as f32 / (BATCH - 1) as f32)
        .collect();
    let t = Tensor::from_vec(ts, BATCH, &dev)?;
    let (mut fw, mut bw, mut op, mut st) = (vec![], vec![], vec![], vec![]);
    for i in 0..WARMUP + steps {
        let t0 = Instant::now();
        let out = unet.forward(&x, &t, &ctx, &y)?;
        let loss = (out - &target)?.sqr()?.mean_all()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt_step(&grads)?;
        let t3 = Instant::now();
        if i >= WARMUP {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
            op.push((t3 - t2).as_secs_f64() * 1e3);
            st.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    Ok([
        median(&mut fw),
        median(&mut bw),
        median(&mut op),
        median(&mut st),
    ])
}

fn main() -> eps2v::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(10usize)
        .max(1);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", common::THREADS);
    }
    eps2v::nn::tune_cpu_runtime();
    sizes()?;
    println!(
        "\ntoy UNet training step, batch {BATCH}, MSE + fused AdamW, f32, {} threads; median of {steps} steps after {WARMUP} warm-up\n",
        common::THREADS
    );
    println!("| image | latent | forward ms | backward ms | optimizer ms | step ms | step ms, workers parked | ratio |\n|---|---|---|---|---|---|---|---|");
    for (w, h) in eps2v::toy::scenes::TOY_BUCKETS.iter() {
        let (w, h) = (*w as usize, *h as usize);
        let warm = |on: bool| {
            eps2v::nn::set_keep_warm(on);
            eps2v::nn::on_pool(|| {
                let _warm = eps2v::nn::keep_warm();
                step_bench(w, h, steps)
            })
        };
        let [f, b, o, s] = warm(true)?;
        let [.., cold] = warm(false)?;
        eps2v::nn::set_keep_warm(true);
        println!(
            "| {w}x{h} | {}x{} | {f:.1} | {b:.1} | {o:.1} | {s:.1} | {cold:.1} | {:.2} |",
            w / 8,
            h / 8,
            cold / s
        );
    }
    Ok(())
}
