//! Training-step benchmark for the CPU kernels of issue 5
//! (`cargo bench --profile dev --bench train [-- --steps N]`).
//!
//! The net is the small conv net, built from `eps2v::nn` layers:
//! conv_in 4→32, 4 residual blocks (GroupNorm+SiLU+conv3×3, twice) at 32 ch
//! 16×16, a stride-2 conv 32→64, 4 blocks at 64 ch 8×8, one single-head
//! attention block over the 64 tokens (GroupNorm, q/k/v/out linears,
//! residual), nearest ×2 upsample, GroupNorm+SiLU, conv_out 64→4; MSE loss,
//! batch 32, f32, AdamW (candle's for the composite variant, the fused
//! `eps2v::nn::optim::AdamW` for the kernels), 2 threads. The same
//! architecture in PyTorch is in
//! `benches/train_ref.py` (run in the same benchmark when `import torch`
//! works).
//!
//! Each variant runs in its own child process (this executable, re-run with
//! `EPS2V_BENCH_MODE`) so that its peak RSS (`VmHWM`) is its own: `composite`
//! is candle's own ops (the `nn::ops::reference` path), `kernels` is the
//! custom ops of `nn::kernels`. Times are medians over the measured steps;
//! because the development machine is shared, the kernels and PyTorch run in
//! `--rounds N` interleaved rounds (default 3) and each reports its round
//! with the lowest median step (the composite, ~3 s/step, runs once).
//! The toy UNet (`UNetConfig::tiny()`) is measured by `--bench train_unet`.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use eps2v::nn::{ops, Conv2d, GroupNorm, Linear};
use rand::SeedableRng;
use std::time::Instant;

mod common;
use common::{
    adamw, best, median, peak_rss_mb, print_report, python_has, randn, run_child, run_python, Row,
    THREADS,
};

const BATCH: usize = 32;

/// GroupNorm+SiLU+conv, twice, plus the identity skip.
struct ResBlock {
    n1: GroupNorm,
    c1: Conv2d,
    n2: GroupNorm,
    c2: Conv2d,
}

impl ResBlock {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            n1: GroupNorm::new(vb.pp("n1"), 32, c, 1e-5)?,
            c1: Conv2d::new(vb.pp("c1"), c, c, 3, 1, 1)?,
            n2: GroupNorm::new(vb.pp("n2"), 32, c, 1e-5)?,
            c2: Conv2d::new(vb.pp("c2"), c, c, 3, 1, 1)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c1.forward(&self.n1.forward_silu(x)?)?;
        let h = self.c2.forward(&self.n2.forward_silu(&h)?)?;
        x + h
    }
}

/// Single-head self-attention over the h·w tokens, with residual.
struct AttnBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl AttnBlock {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), 32, c, 1e-6)?,
            q: Linear::new(vb.pp("q"), c, c, false)?,
            k: Linear::new(vb.pp("k"), c, c, false)?,
            v: Linear::new(vb.pp("v"), c, c, false)?,
            out: Linear::new(vb.pp("out"), c, c, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?; // (b, hw, c)
        let heads = |l: &Linear| -> Result<Tensor> { l.forward(&t)?.reshape((b, 1, h * w, c)) };
        let o = ops::attention(
            &heads(&self.q)?,
            &heads(&self.k)?,
            &heads(&self.v)?,
            1.0 / (c as f64).sqrt(),
            false,
        )?;
        let o = self.out.forward(&o.reshape((b, h * w, c))?)?; // (b, hw, c)
        x + o.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

struct Net {
    conv_in: Conv2d,
    blocks32: Vec<ResBlock>,
    down: Conv2d,
    blocks64: Vec<ResBlock>,
    attn: AttnBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Net {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), 4, 32, 3, 1, 1)?,
            blocks32: (0..4)
                .map(|i| ResBlock::new(vb.pp(format!("b32.{i}")), 32))
                .collect::<Result<_>>()?,
            down: Conv2d::new(vb.pp("down"), 32, 64, 3, 2, 1)?,
            blocks64: (0..4)
                .map(|i| ResBlock::new(vb.pp(format!("b64.{i}")), 64))
                .collect::<Result<_>>()?,
            attn: AttnBlock::new(vb.pp("attn"), 64)?,
            norm_out: GroupNorm::new(vb.pp("norm_out"), 32, 64, 1e-5)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), 64, 4, 3, 1, 1)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?; // (b, 32, 16, 16)
        for b in &self.blocks32 {
            h = b.forward(&h)?;
        }
        h = self.down.forward(&h)?; // (b, 64, 8, 8)
        for b in &self.blocks64 {
            h = b.forward(&h)?;
        }
        h = self.attn.forward(&h)?;
        h = ops::upsample_nearest2x(&h)?; // (b, 64, 16, 16)
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?) // (b, 4, 16, 16)
    }
}

/// One variant in this process; prints one JSON line.
fn child(mode: &str, steps: usize) -> Result<()> {
    ops::set_cpu_kernels(mode == "kernels");
    if mode == "kernels" {
        eps2v::nn::tune_cpu_runtime(); // as the eps2v binary does
    }
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let net = Net::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("var map lock".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var: &Var = &data[name];
            let dims = var.dims().to_vec();
            if name.ends_with("weight") && dims.len() >= 2 {
                let fan_in: usize = dims[1..].iter().product();
                var.set(&randn(&mut rng, &dims, (1.0 / fan_in as f32).sqrt())?)?;
            } else if name.ends_with("weight") {
                var.set(&Tensor::ones(dims.as_slice(), DType::F32, &dev)?)?;
            }
        }
    }
    let mut opt_step = adamw(varmap.all_vars(), 1e-4, mode == "kernels")?;
    let x = randn(&mut rng, &[BATCH, 4, 16, 16], 1.0)?;
    let target = randn(&mut rng, &[BATCH, 4, 16, 16], 1.0)?;
    let warmup = 2;
    let (mut fw, mut bw, mut op, mut st) = (vec![], vec![], vec![], vec![]);
    let mut last_loss = 0f32;
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let loss = (net.forward(&x)? - &target)?.sqr()?.mean_all()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt_step(&grads)?;
        let t3 = Instant::now();
        last_loss = loss.to_scalar::<f32>()?;
        if i >= warmup {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
            op.push((t3 - t2).as_secs_f64() * 1e3);
            st.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"min_forward_ms\":{:.3},\"min_backward_ms\":{:.3},\"min_step_ms\":{:.3},\"forward_ms\":{:.3},\"backward_ms\":{:.3},\"optimizer_ms\":{:.3},\"step_ms\":{:.3},\"peak_rss_mb\":{:.1},\"loss\":{}}}",
        min(&fw),
        min(&bw),
        min(&st),
        median(&mut fw),
        median(&mut bw),
        median(&mut op),
        median(&mut st),
        peak_rss_mb(),
        last_loss
    );
    Ok(())
}

fn torch_row(steps: usize) -> Option<Row> {
    if !python_has("torch") {
        return None;
    }
    run_python(
        concat!(env!("CARGO_MANIFEST_DIR"), "/benches/train_ref.py"),
        steps,
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps = std::env::var("EPS2V_BENCH_STEPS")
        .ok()
        .or_else(|| {
            args.iter()
                .position(|a| a == "--steps")
                .and_then(|i| args.get(i + 1).cloned())
        })
        .and_then(|s| s.parse().ok())
        .unwrap_or(10usize);
    if let Ok(mode) = std::env::var("EPS2V_BENCH_MODE") {
        return eps2v::nn::on_pool(|| child(&mode, steps)); // as the eps2v binary does
    }
    println!("train step: conv net (4 res blocks 32ch 16x16, stride-2 conv, 4 res blocks 64ch 8x8, attention over 64 tokens, nearest x2), batch {BATCH}, f32, AdamW, {THREADS} threads; median of {steps} steps after 2 warm-up; kernels and PyTorch: best of interleaved rounds (--rounds)");
    println!("(the toy UNet has its own benchmark: --bench train_unet)");
    // The development machine is shared: kernels and PyTorch run in
    // interleaved rounds and each keeps its round with the lowest median step.
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let composite = run_child("composite", steps.div_ceil(2).max(3));
    let (mut kernels, mut torch) = (None, None);
    for _ in 0..rounds {
        kernels = best(kernels, run_child("kernels", steps));
        torch = best(torch, torch_row(steps));
    }
    print_report(composite, kernels, torch);
    Ok(())
}
