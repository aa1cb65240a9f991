//! Helpers shared by the benchmarks: command-line values (`arg`, `flag`);
//! for the training ones (`train`, `train_unet`, `train_blocks`) each
//! variant runs in its own child process (so peak RSS is its own), prints
//! one JSON line, and the parent collects the rows.

#![allow(dead_code)]

use std::process::Command;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use candle_nn::Optimizer;
use rand_distr::{Distribution, StandardNormal};

/// The value after `--name` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `--name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Threads for every variant (Rust and PyTorch).
pub const THREADS: &str = "2";

/// `N(0, std²)` tensor on the CPU from a seeded generator.
pub fn randn(rng: &mut rand_chacha::ChaCha8Rng, dims: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            z * std
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Median (sorts in place).
/// An AdamW step function (lr as given, PyTorch's other defaults): candle's
/// own `AdamW` for the composite variant, the fused `eps2v::nn::optim::AdamW`
/// for the kernels variant.
pub type Step = Box<dyn FnMut(&GradStore) -> Result<()>>;

/// The optimizer of a benchmark variant (see [`Step`]).
pub fn adamw(vars: Vec<Var>, lr: f64, fused: bool) -> Result<Step> {
    let params = candle_nn::ParamsAdamW {
        lr,
        ..Default::default()
    };
    Ok(if fused {
        let mut opt = eps2v::nn::optim::AdamW::new(vars, params)?;
        Box::new(move |g: &GradStore| opt.step(g))
    } else {
        let mut opt = candle_nn::AdamW::new(vars, params)?;
        Box::new(move |g: &GradStore| opt.step(g))
    })
}

/// Median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One variant's timings (ms) and peak RSS (MiB); `params` is NaN when not reported.
#[derive(Default, Clone, Copy)]
pub struct Row {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub step_ms: f64,
    pub peak_rss_mb: f64,
    pub params: f64,
}

/// Parse the last JSON line of a child's stdout.
pub fn parse_row(out: &str) -> Option<Row> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
    Some(Row {
        forward_ms: f("forward_ms"),
        backward_ms: f("backward_ms"),
        optimizer_ms: f("optimizer_ms"),
        step_ms: f("step_ms"),
        peak_rss_mb: f("peak_rss_mb"),
        params: f("params"),
    })
}

/// The faster of two rounds (by whole step).
pub fn best(a: Option<Row>, b: Option<Row>) -> Option<Row> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.step_ms < x.step_ms { y } else { x }),
        (x, y) => x.or(y),
    }
}

/// Run this benchmark binary again as a child in `mode` (`EPS2V_BENCH_MODE`).
pub fn run_child(mode: &str, steps: usize) -> Option<Row> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe)
        .env("EPS2V_BENCH_MODE", mode)
        .env("EPS2V_BENCH_STEPS", steps.to_string())
        .env("RAYON_NUM_THREADS", THREADS)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{mode}: failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    parse_row(&String::from_utf8_lossy(&out.stdout))
}

/// Whether `python3 -c "import <modules>"` works (says so when not).
pub fn python_has(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("pytorch: `import {modules}` failed; skipping the reference");
    }
    ok
}

/// Run a PyTorch reference script (`--steps N --threads T`) and parse its row.
pub fn run_python(script: &str, steps: usize) -> Option<Row> {
    let out = Command::new("python3")
        .args([script, "--steps", &steps.to_string(), "--threads", THREADS])
        .env("OMP_NUM_THREADS", THREADS)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("pytorch: failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    parse_row(&String::from_utf8_lossy(&out.stdout))
}

/// Print the variant table and the issue-5 ratios.
pub fn print_report(composite: Option<Row>, kernels: Option<Row>, torch: Option<Row>) {
    println!();
    println!("| variant | forward ms | backward ms | optimizer ms | step ms | peak RSS MB |");
    println!("|---|---|---|---|---|---|");
    for (name, row) in [
        ("candle composite", composite),
        ("eps2v kernels", kernels),
        ("PyTorch (CPU)", torch),
    ] {
        match row {
            Some(r) => println!(
                "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                r.forward_ms, r.backward_ms, r.optimizer_ms, r.step_ms, r.peak_rss_mb
            ),
            None => println!("| {name} | - | - | - | - | - |"),
        }
    }
    println!();
    if let Some(k) = kernels {
        println!(
            "backward / forward (kernels): {:.2}x (target <= 2.5x)",
            k.backward_ms / k.forward_ms
        );
        if let Some(c) = composite {
            println!(
                "kernels speed-up over composite: forward {:.1}x, backward {:.1}x, step {:.1}x",
                c.forward_ms / k.forward_ms,
                c.backward_ms / k.backward_ms,
                c.step_ms / k.step_ms
            );
        }
        if let Some(t) = torch {
            println!(
                "kernels / PyTorch: forward {:.2}x (target <= 1.5x), backward {:.2}x, step {:.2}x (target <= 1.5x)",
                k.forward_ms / t.forward_ms,
                k.backward_ms / t.backward_ms,
                k.step_ms / t.step_ms
            );
        }
    }
}
