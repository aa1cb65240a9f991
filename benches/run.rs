//! Wall time of the default `eps2v run` (the toy world), by stage (issue
//! 10: "the default run finishes in ≤ 5 minutes here").
//!
//! `cargo bench --profile dev --bench run [-- --count N --train-steps N --keep DIR]`
//!
//! Runs [`RunConfig::default`] — the same config as `eps2v run` with no
//! file — in a temporary dataset folder, on the same thread pool as the
//! binary, and prints one row per stage with its seconds. With the
//! committed toy model and tagger (`fixtures/toy/`) it is exactly the
//! default run; without them it writes seeded random toy models of the same
//! architecture (same compute per step and per image) and keeps every image
//! (`filter.min_alignment = 0`, prompts as captions: a random tagger's
//! verdicts mean nothing; it still tags every image), and says so. `--count` / `--train-steps` shrink the run; `--keep DIR` keeps the
//! dataset there. The machine may be shared: the per-stage split is what
//! the numbers are for.

use std::path::PathBuf;

use eps2v::pipeline::tiny::TinyOptions;
use eps2v::run::{self, RunConfig};
use eps2v::stages::Ctx;
use eps2v::toy::models::{write_random_toy_model, write_random_toy_tagger};

mod common;
use common::arg;

fn main() -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime();
    let tmp = tempfile::tempdir().map_err(|e| eps2v::Error::Other(e.to_string()))?;
    let keep: String = arg("--keep", String::new());
    let mut cfg = RunConfig::default();
    cfg.generate.count = arg("--count", cfg.generate.count);
    cfg.train.steps = arg("--train-steps", cfg.train.steps);
    cfg.dataset = if keep.is_empty() {
        tmp.path().join("ds")
    } else {
        PathBuf::from(keep)
    };
    let trained = run::defaults::default_model_path().is_file()
        && run::defaults::default_tagger_dir().is_dir();
    if !trained {
        let model = tmp.path().join("toy.safetensors");
        write_random_toy_model(
            &model,
            TinyOptions {
                seed: 1,
                v_pred_ztsnr: false,
            },
        )?;
        write_random_toy_tagger(&tmp.path().join("tagger"), 2)?;
        cfg.model = Some(model);
        cfg.caption.tagger = Some(tmp.path().join("tagger"));
        cfg.filter.min_alignment = 0.0;
        cfg.caption.caption.policy = eps2v::stages::caption::policy::Policy::Prompt;
    }
    cfg.resolve();
    cfg.check_files()?;
    println!(
        "eps2v run (default config{}): {} images, {} training steps",
        if trained {
            ""
        } else {
            "; random toy models of the same size, filter off"
        },
        cfg.generate.count,
        cfg.train.total_steps()
    );
    let r = eps2v::nn::on_pool(|| run::run(&cfg, None, &Ctx::quiet()))?;
    println!("| stage | seconds | share |");
    println!("|---|---:|---:|");
    let total: f64 = r.stages.iter().map(|s| s.seconds).sum();
    for s in &r.stages {
        println!(
            "| {} | {:.1} | {:.0} % |",
            s.stage,
            s.seconds,
            100.0 * s.seconds / total.max(1e-9)
        );
    }
    println!("| **total** | **{:.1}** | |", r.seconds);
    for s in &r.stages {
        println!("{:<9} {}", s.stage, s.summary);
    }
    Ok(())
}
