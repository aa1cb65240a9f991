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
    /// Build the toy world's models from a seed: scenes → dataset → VAE →
    /// eps UNet (with `eps2v train`'s trainer) → tagger, then measure the
    /// gates. Writes OUT/model.safetensors, OUT/tagger/, OUT/build.json.
    Build(BuildArgs),
    /// Sample the fixed toy prompt set with a model, read each image with the
    /// toy tagger and report prompt adherence (count, shapes, colours,
    /// background) and the "still has shapes" rate.
    Eval(EvalArgs),
}

/// Arguments of `eps2v toy build`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  eps2v toy build                 # the committed models, into fixtures/toy (30 to 45 min on 2 cores by stop 26's stage times, not yet timed from scratch; over an hour on a slow day)\n  eps2v toy build --out /tmp/toy --quick\n\nDeterministic from --seed on one machine and thread count; the text encoders train beside the VAE and the tagger beside the UNet (--serial: one after the other, same bytes). Intermediate products stay in OUT/work/ until the end, so a rerun after an interruption redoes only the unfinished stages, each from where it stopped: Ctrl-C saves every training stage where it is, and a kill loses at most a minute of the VAE, text and tagger stages (1,000 steps of the UNet's)."
)]
pub struct BuildArgs {
    /// Output folder (default: the toy folder, $EPS2V_TOY_DIR or fixtures/toy).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Master seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A few steps of everything (checks that the build runs; useless
    /// models, so it needs --out).
    #[arg(long)]
    pub quick: bool,
    /// Keep OUT/work/ (scenes, dataset, training runs).
    #[arg(long)]
    pub keep_work: bool,
    /// Run the stages one after another (by default the text encoders
    /// train beside the VAE and the tagger beside the UNet, on two thread
    /// pools: the same bytes, in less wall time).
    #[arg(long)]
    pub serial: bool,
    /// Override the recipe's VAE steps.
    #[arg(long)]
    pub vae_steps: Option<usize>,
    /// Override the recipe's VAE batch.
    #[arg(long)]
    pub vae_batch: Option<usize>,
    /// Override the recipe's VAE KL weight.
    #[arg(long)]
    pub vae_kl: Option<f64>,
    /// Override the recipe's VAE training crop side (multiple of 8, ≤ 64).
    #[arg(long)]
    pub vae_crop: Option<u32>,
    /// Override the recipe's UNet steps.
    #[arg(long)]
    pub unet_steps: Option<usize>,
    /// Override the recipe's UNet batch.
    #[arg(long)]
    pub unet_batch: Option<usize>,
    /// Override the recipe's UNet peak learning rate.
    #[arg(long)]
    pub unet_lr: Option<f64>,
    /// Override the recipe's UNet offset-noise strength.
    #[arg(long)]
    pub unet_offset: Option<f64>,
    /// Override the recipe's tagger steps.
    #[arg(long)]
    pub tagger_steps: Option<usize>,
    /// Override the recipe's number of scenes.
    #[arg(long)]
    pub scenes: Option<u64>,
}

/// Arguments of `eps2v toy eval`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  eps2v toy eval                                  # the committed toy model, as eps\n  eps2v toy eval --prediction v --ztsnr           # the same weights sampled as v + ZTSNR\n  eps2v toy eval runs/3/model-v-ztsnr.safetensors\n  eps2v toy eval --steps 20 --denoise-from 0,6,12,17   # where along the path adherence is lost\n\nAdherence of an attribute: share of images whose tagger reading equals the prompt (count; shape kinds; shape colours; background style and colour); overall: their mean."
)]
pub struct EvalArgs {
    /// Model (default: the committed toy model).
    pub model: Option<PathBuf>,
    /// Toy tagger folder (default: the committed toy tagger).
    #[arg(long)]
    pub tagger: Option<PathBuf>,
    /// Sample as this prediction type (eps or v) instead of the model's own.
    #[arg(long)]
    pub prediction: Option<String>,
    /// Sample on the ZTSNR schedule (true/false) instead of the model's own flag.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ztsnr: Option<bool>,
    /// Number of prompts of the toy pack.
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Euler steps.
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// CFG scale.
    #[arg(long, default_value_t = 5.0)]
    pub cfg: f64,
    /// CFG rescale φ in [0, 1] (default 0.7 when sampling as v, 0 as eps).
    #[arg(long)]
    pub rescale: Option<f64>,
    /// Print every prompt with what the tagger read.
    #[arg(long)]
    pub verbose: bool,
    /// Instead of sampling: the tagger's attribute accuracy on VAE round
    /// trips of N fresh scenes (the most adherence this VAE allows).
    #[arg(long, value_name = "N")]
    pub reconstruct: Option<usize>,
    /// Instead of sampling from noise: --prompts fresh scenes (seed 7),
    /// encoded, noised to the σ of each of these steps of the --steps
    /// schedule and denoised from there with their captions; one row per
    /// step shows where along the sampling path the model loses what the
    /// tagger judges (e.g. 0,6,12,17 of 20).
    #[arg(long, value_name = "STEPS", value_delimiter = ',', num_args = 1..)]
    pub denoise_from: Vec<usize>,
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
    /// Architecture experiments: embedding width (default: TaggerConfig::toy).
    #[arg(long, hide = true)]
    pub embed_dim: Option<usize>,
    /// Architecture experiments: transformer blocks.
    #[arg(long, hide = true)]
    pub depth: Option<usize>,
    /// Architecture experiments: MLP hidden width.
    #[arg(long, hide = true)]
    pub mlp: Option<usize>,
    /// Architecture experiments: patch side.
    #[arg(long, hide = true)]
    pub patch: Option<usize>,
    /// Architecture experiments: input side.
    #[arg(long, hide = true)]
    pub img_size: Option<usize>,
    /// Pool of this many VAE round trips of scenes (what generated images
    /// look like), `--round-trip-batch` of them after each batch.
    #[arg(long, default_value_t = 0)]
    pub round_trips: usize,
    /// Pool images per step, after the drawn scenes.
    #[arg(long, default_value_t = 16)]
    pub round_trip_batch: usize,
    /// Model whose VAE makes the round trips (default: the committed toy model).
    #[arg(long)]
    pub model: Option<PathBuf>,
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
        ToyCommand::Build(a) => build(a, json),
        ToyCommand::Eval(a) => eval(a, json),
    }
}

fn build(a: BuildArgs, json: bool) -> anyhow::Result<i32> {
    use crate::toy::build::{build, BuildOptions, BuildRecipe};
    if a.quick && a.out.is_none() {
        anyhow::bail!(
            "--quick makes useless models and, without --out, would write them over the toy world every command uses by default ({}); give --out DIR",
            crate::toy::toy_dir().display()
        );
    }
    let out = a.out.unwrap_or_else(crate::toy::toy_dir);
    let mut recipe = if a.quick {
        BuildRecipe::quick(a.seed)
    } else {
        BuildRecipe::full(a.seed)
    };
    if let Some(v) = a.vae_steps {
        recipe.vae.steps = v;
    }
    if let Some(v) = a.vae_batch {
        recipe.vae.batch = v;
    }
    if let Some(v) = a.vae_kl {
        recipe.vae.kl_weight = v;
    }
    if let Some(v) = a.vae_crop {
        recipe.vae.crop = v;
    }
    if let Some(v) = a.unet_steps {
        recipe.unet.steps = v;
    }
    if let Some(v) = a.unet_batch {
        recipe.unet.batch = v;
    }
    if let Some(v) = a.unet_lr {
        recipe.unet.lr = v;
    }
    if let Some(v) = a.unet_offset {
        recipe.unet.noise_offset = v;
    }
    if let Some(v) = a.tagger_steps {
        recipe.tagger.steps = v;
    }
    if let Some(v) = a.scenes {
        recipe.scenes = v;
    }
    let r = build(
        &BuildOptions {
            out: out.clone(),
            recipe,
            keep_work: a.keep_work,
            concurrent: !a.serial,
            stop_at: Default::default(),
        },
        &Ctx::new(!json),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("toy build (seed {}) in {}:", a.seed, out.display());
        for (name, s) in &r.stages {
            let loss = match (s.first_loss, s.last_loss) {
                (Some(f), Some(l)) => format!("loss {f:.4} -> {l:.4}"),
                _ => String::new(),
            };
            println!("  {name:<8} {:>8.1} s  {loss}", s.seconds);
        }
        println!(
            "  total    {:>8.1} s  (wall {:.1} s{})",
            r.seconds,
            r.wall_seconds,
            if r.concurrent {
                ": text beside the VAE, tagger beside the UNet"
            } else {
                ""
            }
        );
        for (f, b) in &r.sizes {
            println!("  {f:<28} {:.2} MB", *b as f64 / 1e6);
        }
        let t = &r.tagger_attributes;
        println!(
            "tagger on {} fresh scenes: attributes {:.1} % (count {:.1}, shapes {:.1}, colours {:.1}, background {:.1}); exact tag sets {:.1} %  [gate >= 95 %]",
            r.tagger_accuracy.scenes,
            100.0 * r.tagger_gate,
            100.0 * t.count,
            100.0 * t.shapes,
            100.0 * t.colours,
            100.0 * t.background,
            100.0 * r.tagger_accuracy.exact
        );
        print_eval(&r.adherence, false);
        println!("gates {}", if r.gates_met { "met" } else { "NOT met" });
    }
    Ok(if r.gates_met { 0 } else { 1 })
}

fn print_eval(e: &crate::toy::eval::ToyEval, verbose: bool) {
    if verbose {
        for i in &e.items {
            let ok: Vec<&str> = ["count", "shapes", "colours", "background"]
                .iter()
                .zip(i.ok)
                .filter(|(_, ok)| !ok)
                .map(|(n, _)| *n)
                .collect();
            println!(
                "  {}\n    read: {}{}",
                i.prompt,
                i.read.join(", "),
                if ok.is_empty() {
                    String::new()
                } else {
                    format!("  [wrong: {}]", ok.join(", "))
                }
            );
        }
    }
    let a = &e.adherence;
    println!(
        "adherence as {}{} ({} prompts, {} Euler steps, CFG {}): overall {:.1} % (count {:.1}, shapes {:.1}, colours {:.1}, background {:.1}); has shapes {:.1} %  [{:.1} s]",
        e.prediction,
        if e.ztsnr { " + ZTSNR" } else { "" },
        e.items.len(),
        e.options.steps,
        e.options.cfg,
        100.0 * e.overall,
        100.0 * a.count,
        100.0 * a.shapes,
        100.0 * a.colours,
        100.0 * a.background,
        100.0 * e.has_shapes,
        e.seconds
    );
}

fn eval(a: EvalArgs, json: bool) -> anyhow::Result<i32> {
    use crate::pipeline::{LoadOptions, SdxlModel};
    use crate::toy::eval::{evaluate, EvalOptions};
    let model_path = crate::toy::model_or_default(a.model)?;
    let tagger_dir = crate::toy::tagger_or_default(a.tagger)?;
    let prediction = a
        .prediction
        .as_deref()
        .map(str::parse::<crate::diffusion::Prediction>)
        .transpose()?;
    let model = SdxlModel::load(
        &model_path,
        &LoadOptions {
            prediction,
            ztsnr: a.ztsnr,
            device: Some(candle_core::Device::Cpu),
            ..Default::default()
        },
    )?;
    let tagger = crate::models::tagger::Tagger::load(&tagger_dir, &candle_core::Device::Cpu)?;
    if let Some(n) = a.reconstruct {
        let c = crate::toy::eval::vae_ceiling(&model, &tagger, 7, n)?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"reconstruct": n, "attributes": c, "overall": c.mean()})
                )?
            );
        } else {
            println!(
                "toy eval --reconstruct {n}: VAE round trips of fresh scenes (seed 7) read right: {:.1} % (count {:.1}, shapes {:.1}, colours {:.1}, background {:.1})",
                100.0 * c.mean(),
                100.0 * c.count,
                100.0 * c.shapes,
                100.0 * c.colours,
                100.0 * c.background
            );
        }
        return Ok(0);
    }
    let opts = EvalOptions {
        prompts: a.prompts,
        steps: a.steps,
        cfg: a.cfg,
        rescale: a.rescale,
        ..Default::default()
    };
    if !a.denoise_from.is_empty() {
        let rows = crate::toy::eval::denoise_curve(
            &model,
            &tagger,
            &opts,
            &a.denoise_from,
            (7, a.prompts),
            &Ctx::new(!json),
        )?;
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(0);
        }
        println!(
            "toy eval --denoise-from: {} fresh scenes (seed 7) noised to the σ of a step of the {}-step schedule and denoised from there with their captions ({}{}, Euler, CFG {})",
            a.prompts,
            a.steps,
            model.info.prediction,
            if model.info.ztsnr { " + ZTSNR" } else { "" },
            a.cfg
        );
        println!("step  sigma    overall  count  shapes  colours  background  has shapes");
        for r in &rows {
            let c = &r.adherence;
            println!(
                "{:>4}  {:>6.3}   {:>6.1}  {:>5.1}  {:>6.1}  {:>7.1}  {:>10.1}  {:>10.1}",
                r.step,
                r.sigma,
                100.0 * r.overall,
                100.0 * c.count,
                100.0 * c.shapes,
                100.0 * c.colours,
                100.0 * c.background,
                100.0 * r.has_shapes
            );
        }
        return Ok(0);
    }
    let r = evaluate(&model, &tagger, &opts, &Ctx::new(!json))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "toy eval: {} with tagger {}",
            model_path.display(),
            tagger_dir.display()
        );
        print_eval(&r, a.verbose);
    }
    Ok(0)
}

/// `toy tagger --round-trips`: the round trips' scenes are of seed
/// `--data-seed` + this.
const ROUND_TRIP_SEED_OFFSET: u64 = 1000;

fn tagger(a: TaggerArgs, json: bool) -> anyhow::Result<i32> {
    use crate::toy::tagger::{evaluate_tagger, train_tagger, TaggerTraining};
    if a.eval > 0 && a.eval_seed == a.data_seed {
        return Err(crate::Error::config(
            "--eval-seed equals --data-seed: the evaluation scenes would be training scenes; pick another --eval-seed",
        )
        .into());
    }
    // The round trips are drawn from scenes of their own seed (it was
    // data_seed + 1: the default --eval-seed, so the evaluation scored
    // scenes trained on).
    let pool_seed = a.data_seed.wrapping_add(ROUND_TRIP_SEED_OFFSET);
    if a.eval > 0 && a.round_trips > 0 && a.eval_seed == pool_seed {
        return Err(crate::Error::config(format!(
            "--eval-seed {} is the seed of the --round-trips scenes (--data-seed + {ROUND_TRIP_SEED_OFFSET}): the evaluation scenes would be training scenes; pick another --eval-seed",
            a.eval_seed
        ))
        .into());
    }
    let ctx = Ctx::new(!json);
    let mut opts = TaggerTraining {
        seed: a.seed,
        data_seed: a.data_seed,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        ..Default::default()
    };
    let c = &mut opts.config;
    c.embed_dim = a.embed_dim.unwrap_or(c.embed_dim);
    c.depth = a.depth.unwrap_or(c.depth);
    c.mlp_hidden = a.mlp.unwrap_or(c.mlp_hidden);
    c.patch_size = a.patch.unwrap_or(c.patch_size);
    c.img_size = a.img_size.unwrap_or(c.img_size);
    opts.round_trips = a.round_trips;
    opts.round_trip_batch = a.round_trip_batch;
    let pool = if a.round_trips > 0 {
        let path = crate::toy::model_or_default(a.model)?;
        let model = crate::pipeline::SdxlModel::load(&path, &Default::default())?;
        crate::toy::tagger::round_trip_pool(&model, pool_seed, a.round_trips, &ctx)?
    } else {
        Vec::new()
    };
    let (t, rep) = train_tagger(&opts, &pool, None, &ctx)?;
    t.save(&a.dir)?;
    let (acc, attrs) = if a.eval > 0 {
        let loaded = crate::models::tagger::Tagger::load(&a.dir, &candle_core::Device::Cpu)?;
        (
            Some(evaluate_tagger(&loaded, a.eval_seed, a.eval)?),
            Some(crate::toy::eval::tagger_attribute_accuracy(
                &loaded,
                a.eval_seed,
                a.eval,
            )?),
        )
    } else {
        (None, None)
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
            "attributes": attrs,
            "gate": attrs.map(|a| a.mean()),
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
    if let Some(at) = attrs {
        println!(
            "attributes read right (the gate, >= {:.0} %): {:.1} % (count {:.1}, shapes {:.1}, colours {:.1}, background {:.1})",
            100.0 * crate::toy::build::TAGGER_GATE,
            100.0 * at.mean(),
            100.0 * at.count,
            100.0 * at.shapes,
            100.0 * at.colours,
            100.0 * at.background
        );
    }
    Ok(0)
}

fn scenes(a: ScenesArgs, json: bool) -> anyhow::Result<i32> {
    let t0 = std::time::Instant::now();
    let ctx = Ctx::new(!json);
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
        "toy scenes: {} written, {} already there{}, seed {}, in {} ({:.1} s)",
        r.written,
        r.skipped,
        match r.removed {
            0 => String::new(),
            n => format!(", {n} past the count removed"),
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: BuildArgs,
    }

    /// `--quick` never writes its useless models over the toy world every
    /// command uses by default: it needs --out (refused before anything
    /// is built).
    #[test]
    fn a_quick_build_needs_its_own_folder() {
        let e = build(T::parse_from(["x", "--quick"]).a, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--quick") && e.contains("give --out DIR"), "{e}");
        assert!(
            e.contains(&crate::toy::toy_dir().display().to_string()),
            "{e}"
        );
    }
}
