//! Training-step benchmark of the toy SDXL UNet (`UNetConfig::tiny()`) on
//! CPU, issue 5 (`cargo bench --profile dev --bench train_unet [-- --steps N
//! --rounds N]`).
//!
//! Toy training batch: 8 latents of 4×32×32 (256×256 images), per-sample
//! timesteps, 77 context tokens of width `context_dim` (64), pooled text
//! (8, 32) and 256×256 size conditioning ([`build_y`]); MSE against a random
//! target, AdamW (lr 1e-4; candle's for the composite variant, the fused
//! `eps2v::nn::optim::AdamW` for the kernels), f32, 2 threads. Weights come from
//! [`init_params`] (seed 0). Forward (incl. the loss), backward and the
//! optimizer step are timed separately; each is the median over the
//! measured steps after 2 warm-up steps.
//!
//! As `benches/train.rs` does, each variant runs in its own child process
//! (this executable re-run with `EPS2V_BENCH_MODE`) so that its peak RSS
//! (`VmHWM`) is its own: `composite` is candle's own ops
//! (`nn::ops::set_cpu_kernels(false)`), `kernels` the custom ops of
//! `nn::kernels`. The same architecture built with diffusers'
//! `UNet2DConditionModel` is in `benches/train_unet_ref.py` (run when
//! `import torch, diffusers` works; the configuration mapping and the
//! parameter-count check are documented there). The machine is shared, so
//! the kernels and PyTorch run in `--rounds` interleaved rounds (default 3)
//! and each keeps its round with the lowest median step; the composite runs
//! once. `--profile` then adds per-op forward/backward times (fastest of 7)
//! of the kernels path at the UNet's shapes (where the step's time goes).

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use eps2v::models::sdxl::{build_y, init_params, SizeCond, UNet, UNetConfig, UNET_PREFIX};
use eps2v::nn::ops;
use rand::SeedableRng;
use std::time::Instant;

use std::process::Command;

mod common;
use common::{
    adamw, best, median, peak_rss_mb, print_report, python_has, randn, run_child, run_python, Row,
    THREADS,
};

const BATCH: usize = 8;
const LATENT: usize = 32;
const TOKENS: usize = 77;
const WARMUP: usize = 2;

/// One variant in this process; prints one JSON line.
fn child(mode: &str, steps: usize) -> eps2v::Result<()> {
    ops::set_cpu_kernels(mode == "kernels");
    if mode == "kernels" {
        eps2v::nn::tune_cpu_runtime(); // as the eps2v binary does
    }
    let dev = Device::Cpu;
    let cfg = UNetConfig::tiny();
    let varmap = VarMap::new();
    let unet = UNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp(UNET_PREFIX),
        &cfg,
    )?;
    init_params(&varmap, 0)?;
    let vars = varmap.all_vars();
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt_step = adamw(vars, 1e-4, mode == "kernels")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x = randn(&mut rng, &[BATCH, cfg.in_channels, LATENT, LATENT], 1.0)?; // (8, 4, 32, 32)
    let target = randn(&mut rng, &[BATCH, cfg.out_channels, LATENT, LATENT], 1.0)?;
    let ctx = randn(&mut rng, &[BATCH, TOKENS, cfg.context_dim], 1.0)?; // (8, 77, 64)
    let pooled = randn(&mut rng, &[BATCH, cfg.pooled_dim], 1.0)?; // (8, 32)
    let px = (LATENT * 8) as f32;
    let y = build_y(&pooled, &[SizeCond::inference(px, px); BATCH])?; // (8, 1568)
    let ts: Vec<f32> = (0..BATCH)
        .map(|i| 999.0 * i as f32 / (BATCH - 1).max(1) as f32)
        .collect();
    let t = Tensor::from_vec(ts, BATCH, &dev)?; // (8,)
    let (mut fw, mut bw, mut op, mut st) = (vec![], vec![], vec![], vec![]);
    let mut last_loss = 0f32;
    for i in 0..WARMUP + steps {
        let t0 = Instant::now();
        let out = unet.forward(&x, &t, &ctx, &y)?; // (8, 4, 32, 32)
        let loss = (out - &target)?.sqr()?.mean_all()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt_step(&grads)?;
        let t3 = Instant::now();
        last_loss = loss.to_scalar::<f32>()?;
        if i >= WARMUP {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
            op.push((t3 - t2).as_secs_f64() * 1e3);
            st.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    println!(
        "{{\"forward_ms\":{:.3},\"backward_ms\":{:.3},\"optimizer_ms\":{:.3},\"step_ms\":{:.3},\"peak_rss_mb\":{:.1},\"params\":{params},\"loss\":{}}}",
        median(&mut fw),
        median(&mut bw),
        median(&mut op),
        median(&mut st),
        peak_rss_mb(),
        last_loss
    );
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
}

fn main() -> eps2v::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps = std::env::var("EPS2V_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .or_else(|| arg(&args, "--steps"))
        .unwrap_or(10usize)
        .max(1);
    if let Ok(mode) = std::env::var("EPS2V_BENCH_MODE") {
        if mode == "profile" {
            eps2v::nn::tune_cpu_runtime();
            return Ok(eps2v::nn::on_pool(profile)?);
        }
        return eps2v::nn::on_pool(|| child(&mode, steps));
    }
    let rounds = arg(&args, "--rounds").unwrap_or(3usize).max(1);
    println!(
        "train step: toy UNet (UNetConfig::tiny()), batch {BATCH} x 4x{LATENT}x{LATENT} latents, {TOKENS}x64 context, f32, MSE, AdamW, {THREADS} threads; median of {steps} steps after {WARMUP} warm-up; kernels and PyTorch: best of {rounds} interleaved rounds"
    );
    let composite = run_child("composite", steps.div_ceil(2).max(3));
    let has_torch = python_has("torch, diffusers");
    let (mut kernels, mut torch) = (None, None);
    for _ in 0..rounds {
        kernels = best(kernels, run_child("kernels", steps));
        if has_torch {
            torch = best(
                torch,
                run_python(
                    concat!(env!("CARGO_MANIFEST_DIR"), "/benches/train_unet_ref.py"),
                    steps,
                ),
            );
        }
    }
    let count = |r: Option<Row>| r.map_or("-".to_string(), |r| format!("{}", r.params));
    println!(
        "parameters: eps2v {}, diffusers {}",
        count(kernels.or(composite)),
        count(torch)
    );
    print_report(composite, kernels, torch);
    if args.iter().any(|a| a == "--profile") {
        println!();
        let exe = std::env::current_exe().map_err(|e| eps2v::Error::io("current_exe", e))?;
        let out = Command::new(&exe)
            .env("EPS2V_BENCH_MODE", "profile")
            .env("RAYON_NUM_THREADS", THREADS)
            .output()
            .map_err(|e| eps2v::Error::io(&exe, e))?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One op at the UNet's shapes: forward and backward (of `sum(out)`) time,
/// the fastest of 7 after one warm-up (the machine is shared), on the
/// current path.
fn time_op(
    rng: &mut rand_chacha::ChaCha8Rng,
    inputs: &[&[usize]],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(f64, f64)> {
    let vars = inputs
        .iter()
        .map(|d| Var::from_tensor(&(randn(rng, d, 1.0)? * 0.1)?))
        .collect::<Result<Vec<_>>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (mut fw, mut bw) = (vec![], vec![]);
    for i in 0..8 {
        let t0 = Instant::now();
        let y = f(&xs)?.sum_all()?;
        let t1 = Instant::now();
        let _grads = y.backward()?;
        let t2 = Instant::now();
        if i > 0 {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((min(&fw), min(&bw)))
}

/// `--profile`: per-op forward/backward times of the kernels path at the toy
/// UNet's training shapes, with approximate calls per UNet forward
/// (convolutions with other input widths are counted at the level width;
/// rows with 0 calls are diagnostics that split a cost, not counted).
fn profile() -> Result<()> {
    ops::set_cpu_kernels(true);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let b = BATCH;
    let conv = |xs: &[Tensor]| ops::conv2d(&xs[0], &xs[1], Some(&xs[2]), 1, 1);
    let gn = |g: usize| move |xs: &[Tensor]| ops::group_norm(&xs[0], g, &xs[1], &xs[2], 1e-5, true);
    let lin = |xs: &[Tensor]| ops::linear(&xs[0], &xs[1], Some(&xs[2]));
    let lin_nb = |xs: &[Tensor]| ops::linear(&xs[0], &xs[1], None);
    let gelu = |xs: &[Tensor]| ops::gelu_erf(&xs[0]);
    let ln = |xs: &[Tensor]| ops::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5);
    let attn = |xs: &[Tensor]| ops::attention(&xs[0], &xs[1], &xs[2], 0.25, false);
    let geglu = |xs: &[Tensor]| ops::geglu(&xs[0]);
    type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;
    let gn8 = gn(8);
    let rows: Vec<(&str, usize, Vec<Vec<usize>>, OpFn)> = vec![
        (
            "conv3x3 32ch 32x32",
            10,
            vec![vec![b, 32, 32, 32], vec![32, 32, 3, 3], vec![32]],
            &conv,
        ),
        (
            "conv3x3 64ch 32x32 (up)",
            1,
            vec![vec![b, 64, 32, 32], vec![64, 64, 3, 3], vec![64]],
            &conv,
        ),
        (
            "conv3x3 64ch 16x16",
            10,
            vec![vec![b, 64, 16, 16], vec![64, 64, 3, 3], vec![64]],
            &conv,
        ),
        (
            "conv3x3 128ch 16x16 (up)",
            1,
            vec![vec![b, 128, 16, 16], vec![128, 128, 3, 3], vec![128]],
            &conv,
        ),
        (
            "conv3x3 128ch 8x8",
            14,
            vec![vec![b, 128, 8, 8], vec![128, 128, 3, 3], vec![128]],
            &conv,
        ),
        (
            "groupnorm+silu 32ch 32x32",
            13,
            vec![vec![b, 32, 32, 32], vec![32], vec![32]],
            &gn8,
        ),
        (
            "groupnorm+silu 64ch 16x16",
            12,
            vec![vec![b, 64, 16, 16], vec![64], vec![64]],
            &gn8,
        ),
        (
            "groupnorm+silu 128ch 8x8",
            18,
            vec![vec![b, 128, 8, 8], vec![128], vec![128]],
            &gn8,
        ),
        (
            "linear 64->64 x2048 tok",
            40,
            vec![vec![b, 256, 64], vec![64, 64], vec![64]],
            &lin,
        ),
        (
            "linear 64->512 x2048 tok",
            5,
            vec![vec![b, 256, 64], vec![512, 64], vec![512]],
            &lin,
        ),
        (
            "(diagnostic) linear 64->64 x2048 tok, no bias",
            0,
            vec![vec![b, 256, 64], vec![64, 64]],
            &lin_nb,
        ),
        (
            "(diagnostic) gelu_erf alone 256ch x2048 tok",
            0,
            vec![vec![b, 256, 256]],
            &gelu,
        ),
        (
            "linear 256->64 x2048 tok",
            5,
            vec![vec![b, 256, 256], vec![64, 256], vec![64]],
            &lin,
        ),
        (
            "linear 128->128 x512 tok",
            48,
            vec![vec![b, 64, 128], vec![128, 128], vec![128]],
            &lin,
        ),
        (
            "linear 128->1024 x512 tok",
            6,
            vec![vec![b, 64, 128], vec![1024, 128], vec![1024]],
            &lin,
        ),
        (
            "linear 512->128 x512 tok",
            6,
            vec![vec![b, 64, 512], vec![128, 512], vec![128]],
            &lin,
        ),
        (
            "linear ctx 64->64/128 x616 tok",
            22,
            vec![vec![b, TOKENS, 64], vec![96, 64], vec![96]],
            &lin,
        ),
        (
            "layernorm 64 x2048 tok",
            15,
            vec![vec![b, 256, 64], vec![64], vec![64]],
            &ln,
        ),
        (
            "layernorm 128 x512 tok",
            18,
            vec![vec![b, 64, 128], vec![128], vec![128]],
            &ln,
        ),
        (
            "self-attn 4h 256 tok",
            5,
            vec![vec![b, 4, 256, 16]; 3],
            &attn,
        ),
        (
            "cross-attn 4h 256x77 tok",
            5,
            vec![
                vec![b, 4, 256, 16],
                vec![b, 4, TOKENS, 16],
                vec![b, 4, TOKENS, 16],
            ],
            &attn,
        ),
        ("self-attn 8h 64 tok", 6, vec![vec![b, 8, 64, 16]; 3], &attn),
        (
            "cross-attn 8h 64x77 tok",
            6,
            vec![
                vec![b, 8, 64, 16],
                vec![b, 8, TOKENS, 16],
                vec![b, 8, TOKENS, 16],
            ],
            &attn,
        ),
        (
            "geglu gate 256ch x2048 tok",
            5,
            vec![vec![b, 256, 512]],
            &geglu,
        ),
        (
            "geglu gate 512ch x512 tok",
            6,
            vec![vec![b, 64, 1024]],
            &geglu,
        ),
    ];
    println!("| op (kernels path, batch {b}) | calls/forward | forward ms/call | backward ms/call | total ms/step |");
    println!("|---|---|---|---|---|");
    let (mut tf, mut tb) = (0.0, 0.0);
    for (name, calls, dims, f) in rows {
        let dims: Vec<&[usize]> = dims.iter().map(|d| d.as_slice()).collect();
        let (fw, bw) = time_op(&mut rng, &dims, f)?;
        tf += fw * calls as f64;
        tb += bw * calls as f64;
        println!(
            "| {name} | {calls} | {fw:.2} | {bw:.2} | {:.0} (fwd {:.0}, bwd {:.0}) |",
            (fw + bw) * calls as f64,
            fw * calls as f64,
            bw * calls as f64
        );
    }
    println!(
        "| sum of the above | | | | {:.0} (fwd {tf:.0}, bwd {tb:.0}) |",
        tf + tb
    );
    Ok(())
}
