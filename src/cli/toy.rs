//! `eps2v toy …`: the toy world (DESIGN.md §4). `toy scenes DIR --count N
//! [--seed S]` draws procedural scenes ([`crate::toy::scenes`]) as PNG files
//! with `.txt` tag sidecars, ready for `eps2v import`.

use std::path::PathBuf;

use crate::stages::Ctx;
use crate::toy::{write_scenes, WriteScenes};

/// Arguments of `eps2v toy`.
#[derive(Debug, clap::Args)]
pub struct ToyArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ToyCommand,
}

/// `eps2v toy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ToyCommand {
    /// Draw toy scenes (one or two coloured shapes on a plain / gradient /
    /// striped background, 64x64, 96x64 or 64x96) as PNG + `.txt` tags.
    Scenes(ScenesArgs),
    /// Train the toy tagger (TaggerConfig::toy) on scenes, write it as a WD
    /// tagger folder and measure its accuracy on fresh scenes.
    Tagger(TaggerArgs),
}

/// Arguments of `eps2v toy tagger`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  eps2v toy tagger toy-tagger/ --steps 2000\n  eps2v caption ds --tagger toy-tagger/\n\nWrites model.safetensors (timm keys), selected_tags.csv and config.json. Accuracy: share of fresh scenes (seed --eval-seed) whose predicted tag set (p >= 0.5) is exactly their true one."
)]
pub struct TaggerArgs {
    /// Output tagger folder (created if missing).
    pub dir: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Scenes per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate (AdamW, linear warm-up over 5 % of the steps).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the training scenes.
    #[arg(long, default_value_t = 1)]
    pub data_seed: u64,
    /// Seed of the fresh evaluation scenes (must differ from --data-seed).
    #[arg(long, default_value_t = 2)]
    pub eval_seed: u64,
    /// Number of evaluation scenes (0: no evaluation).
    #[arg(long, default_value_t = 500)]
    pub eval: usize,
}

/// Arguments of `eps2v toy scenes`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  eps2v toy scenes scenes/ --count 200\n  eps2v init ds && eps2v import ds --from scenes/\n\nFiles are scene_NNNNNN.png with scene_NNNNNN.txt (its tags, e.g. \"1shape, red circle, large, center, striped background, blue background\"). Scene i depends only on (seed, i); a rerun skips complete scenes."
)]
pub struct ScenesArgs {
    /// Output folder (created if missing).
    pub dir: PathBuf,
    /// Number of scenes (indices 0..count).
    #[arg(long)]
    pub count: u64,
    /// Seed of the scene set.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Run `eps2v toy …`; returns the exit code.
pub fn run(args: ToyArgs, json: bool) -> anyhow::Result<i32> {
    match args.command {
        ToyCommand::Scenes(a) => scenes(a, json),
        ToyCommand::Tagger(a) => tagger(a, json),
    }
}

fn tagger(a: TaggerArgs, json: bool) -> anyhow::Result<i32> {
    use crate::toy::tagger::{evaluate_tagger, train_tagger, TaggerTraining};
    if a.eval > 0 && a.eval_seed == a.data_seed {
        return Err(crate::Error::config(
            "--eval-seed equals --data-seed: the evaluation scenes would be training scenes; pick another --eval-seed",
        )
        .into());
    }
    let ctx = Ctx { progress: !json };
    let opts = TaggerTraining {
        seed: a.seed,
        data_seed: a.data_seed,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        ..Default::default()
    };
    let (t, rep) = train_tagger(&opts, &ctx)?;
    t.save(&a.dir)?;
    let acc = if a.eval > 0 {
        let loaded = crate::models::tagger::Tagger::load(&a.dir, &candle_core::Device::Cpu)?;
        Some(evaluate_tagger(&loaded, a.eval_seed, a.eval)?)
    } else {
        None
    };
    let n = rep.losses.len();
    let tail = &rep.losses[n.saturating_sub(50)..];
    let last = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    if json {
        let v = serde_json::json!({
            "dir": a.dir,
            "steps": n,
            "params": rep.params,
            "seconds": rep.seconds,
            "first_loss": rep.losses.first(),
            "last_loss_mean50": last,
            "accuracy": acc,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "toy tagger: {} parameters, {n} steps x {} scenes in {:.1} s; loss {:.4} -> {:.4} (mean of the last 50)",
        rep.params,
        a.batch,
        rep.seconds,
        rep.losses.first().copied().unwrap_or(f32::NAN),
        last
    );
    println!("written: {}", a.dir.display());
    if let Some(acc) = acc {
        println!(
            "fresh scenes (seed {}, {}): exact tag set {:.1} %, tag F1 {:.3}",
            a.eval_seed,
            acc.scenes,
            100.0 * acc.exact,
            acc.tag_f1
        );
        for (g, v) in &acc.groups {
            println!("  {g:<18} {:.1} %", 100.0 * v);
        }
    }
    Ok(0)
}

fn scenes(a: ScenesArgs, json: bool) -> anyhow::Result<i32> {
    let t0 = std::time::Instant::now();
    let ctx = Ctx { progress: !json };
    let r = write_scenes(
        &a.dir,
        WriteScenes {
            count: a.count,
            seed: a.seed,
        },
        &ctx,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!(
        "toy scenes: {} written, {} already there, seed {}, in {} ({:.1} s)",
        r.written,
        r.skipped,
        r.seed,
        r.dir.display(),
        t0.elapsed().as_secs_f64()
    );
    let sizes: Vec<String> = r.sizes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!("sizes: {}", sizes.join(", "));
    let mut tags: Vec<(&String, &u64)> = r.tags.iter().collect();
    tags.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("{} distinct tags; most frequent:", tags.len());
    for (t, n) in tags.iter().take(12) {
        println!("  {n:>6}  {t}");
    }
    println!(
        "next: eps2v init DATASET && eps2v import DATASET --from {}",
        r.dir.display()
    );
    Ok(0)
}
