//! What training only some UNet blocks saves (issue 11):
//! `cargo bench --profile dev --bench train_blocks [-- --steps N]`.
//!
//! The tiny SDXL UNet (`UNetConfig::tiny()`) at the toy training batch (8
//! latents 4×32×32, 77×64 context, per-sample timesteps, MSE, the fused
//! AdamW, f32, 2 threads), built by the trainer's own weight store
//! (`train::weights::UNetWeights`) with either every block trainable or only
//! `out` + `OUT08`. Each variant runs in its own child process so its peak
//! RSS (`VmHWM`) is its own; the table gives steps/s, trainable parameters,
//! optimizer state and peak RSS in the same run.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use eps2v::models::sdxl::{build_y, init_params, SizeCond, UNet, UNetConfig, UNET_PREFIX};
use eps2v::nn::optim::AdamW;
use eps2v::train::blocks::BlockSet;
use eps2v::train::weights::UNetWeights;
use rand::SeedableRng;

mod common;
use common::{median, peak_rss_mb, randn, THREADS};

const BATCH: usize = 8;
const LATENT: usize = 32;

fn child(blocks: &str, steps: usize) -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime();
    let dev = Device::Cpu;
    let cfg = UNetConfig::tiny();
    let varmap = VarMap::new();
    UNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp(UNET_PREFIX),
        &cfg,
    )?;
    init_params(&varmap, 0)?;
    let map: BTreeMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| eps2v::Error::Other("lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect();
    drop(varmap);
    let mut weights = UNetWeights::from_map(&cfg, map, &dev)?;
    let set = BlockSet::parse(&blocks.split(',').map(String::from).collect::<Vec<_>>())?;
    let stage = weights.build(&set)?;
    let params: usize = stage.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(
        stage.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW::default(),
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x = randn(&mut rng, &[BATCH, 4, LATENT, LATENT], 1.0)?;
    let target = randn(&mut rng, &[BATCH, 4, LATENT, LATENT], 1.0)?;
    let ctx = randn(&mut rng, &[BATCH, 77, cfg.context_dim], 1.0)?;
    let pooled = randn(&mut rng, &[BATCH, cfg.pooled_dim], 1.0)?;
    let y = build_y(&pooled, &[SizeCond::inference(256.0, 256.0); BATCH])?;
    let t = Tensor::from_vec(
        (0..BATCH).map(|i| 100.0 * i as f32).collect::<Vec<_>>(),
        BATCH,
        &dev,
    )?;
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        let loss = (stage.unet.forward(&x, &t, &ctx, &y)? - &target)?
            .sqr()?
            .mean_all()?;
        opt.step(&loss.backward()?)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{{\"step_ms\": {}, \"params\": {params}, \"opt_mb\": {}, \"peak_rss_mb\": {}}}",
        median(&mut times),
        opt.state_bytes() as f64 / 1048576.0,
        peak_rss_mb()
    );
    Ok(())
}

fn main() -> eps2v::Result<()> {
    let steps: usize = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0] == "--steps")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(10);
    if let Ok(blocks) = std::env::var("EPS2V_BENCH_BLOCKS") {
        return eps2v::nn::on_pool(|| child(&blocks, steps));
    }
    println!("| trainable | params | optimizer state MB | step ms | steps/s | peak RSS MB |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for blocks in ["all", "out,OUT08"] {
        let exe = std::env::current_exe().map_err(|e| eps2v::Error::io("current_exe", e))?;
        let out = Command::new(exe)
            .args(["--steps", &steps.to_string()])
            .env("EPS2V_BENCH_BLOCKS", blocks)
            .env("RAYON_NUM_THREADS", THREADS)
            .output()
            .map_err(|e| eps2v::Error::io("child", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(line)?;
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        println!(
            "| {blocks} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0} |",
            f("params"),
            f("opt_mb"),
            f("step_ms"),
            1e3 / f("step_ms"),
            f("peak_rss_mb")
        );
        rows.push((f("step_ms"), f("peak_rss_mb"), f("opt_mb")));
    }
    if let [(s_all, r_all, o_all), (s_out, r_out, o_out)] = rows[..] {
        println!();
        println!(
            "out+OUT08 vs all: step {:.2}x faster, peak RSS {:.0} MB less ({:.2}x), optimizer state {:.1} MB less",
            s_all / s_out,
            r_all - r_out,
            r_all / r_out,
            o_all - o_out
        );
    }
    Ok(())
}
