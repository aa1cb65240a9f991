//! UNet forward time per step on CPU (f32): the tiny config and the full
//! SDXL base config, both at a 64×64 latent (512×512 image), batch 1.
//!
//! Weights are random (tiny, `init_params`) or zeros (full: 10.3 GB of f32
//! weights, the values do not change the work done). Run with
//! `cargo bench --profile dev --bench unet`; set `EPS2V_BENCH_SKIP_FULL=1`
//! to time only the tiny config, `EPS2V_BENCH_FULL_STEPS=N` for more
//! full-size steps (default 1).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use eps2v::models::sdxl::{build_y, init_params, SizeCond, UNet, UNetConfig, UNET_PREFIX};

struct Row {
    name: &'static str,
    params: usize,
    latent: usize,
    steps: usize,
    ms_per_step: f64,
}

fn time_unet(
    name: &'static str,
    unet: &UNet,
    cfg: &UNetConfig,
    latent: usize,
    steps: usize,
    warmup: usize,
) -> eps2v::Result<Row> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &dev)?;
    let t = Tensor::new(&[500f32], &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, cfg.context_dim), &dev)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.pooled_dim), &dev)?;
    let px = (latent * 8) as f32;
    let y = build_y(&pooled, &[SizeCond::inference(px, px)])?;
    for _ in 0..warmup {
        unet.forward(&x, &t, &ctx, &y)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        let out = unet.forward(&x, &t, &ctx, &y)?;
        // Force the computation to finish.
        out.sum_all()?.to_scalar::<f32>()?;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / steps as f64;
    let params = eps2v::models::sdxl::checkpoint::unet_expected_keys(cfg)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    Ok(Row {
        name,
        params,
        latent,
        steps,
        ms_per_step: ms,
    })
}

fn main() -> eps2v::Result<()> {
    // As the eps2v binary does.
    eps2v::nn::tune_cpu_runtime();
    eps2v::nn::on_pool(run)
}

fn run() -> eps2v::Result<()> {
    let dev = Device::Cpu;
    let mut rows = Vec::new();

    let cfg = UNetConfig::tiny();
    let varmap = VarMap::new();
    let unet = UNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp(UNET_PREFIX),
        &cfg,
    )?;
    init_params(&varmap, 0)?;
    rows.push(time_unet("tiny", &unet, &cfg, 64, 10, 2)?);
    drop(unet);

    if std::env::var("EPS2V_BENCH_SKIP_FULL").map_or(true, |v| v != "1") {
        let steps = std::env::var("EPS2V_BENCH_FULL_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let cfg = UNetConfig::sdxl_base();
        let unet = UNet::new(VarBuilder::zeros(DType::F32, &dev).pp(UNET_PREFIX), &cfg)?;
        rows.push(time_unet("sdxl_base", &unet, &cfg, 64, steps, 0)?);
    }

    println!("UNet forward, CPU f32, batch 1, context 77 tokens");
    println!(
        "{:<10} {:>14} {:>8} {:>6} {:>12}",
        "config", "params", "latent", "steps", "ms/step"
    );
    for r in rows {
        println!(
            "{:<10} {:>14} {:>5}x{:<2} {:>6} {:>12.1}",
            r.name, r.params, r.latent, r.latent, r.steps, r.ms_per_step
        );
    }
    Ok(())
}
