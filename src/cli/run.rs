//! `eps2v run [CONFIG.toml] [--dataset DIR]`: flags → a resolved
//! [`RunConfig`], then [`crate::run::run`] and a one-screen summary.
//! Without a config: the toy world in `./eps2v-toy-run` (the config's
//! default `dataset`). `--print-schema` prints the JSON Schema
//! that `schemas/config.schema.json` holds.

use std::path::PathBuf;

use clap::Args;

use crate::run::{self, RunConfig, RunReport};
use crate::stages::Ctx;
use crate::Result;

/// Arguments of `eps2v run`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
eps2v run                                   # the toy world in ./eps2v-toy-run, a few minutes on a laptop CPU\n  \
eps2v run fixtures/configs/sdxl-1girl.toml  # the real recipe (edit `model`, `caption.tagger` and `[device]` first)\n  \
eps2v run my.toml --dataset /data/run2\n\n\
Kill it at any time (Ctrl-C, kill -9) and rerun the same command: finished stages are skipped, training resumes from its last checkpoint.\n\
The report: <dataset>/runs/<id>/report/index.html.")]
pub struct RunArgs {
    /// TOML config (see fixtures/configs/toy.toml); none: the toy world.
    pub config: Option<PathBuf>,
    /// Dataset folder (overrides the config's `dataset`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Print the config's JSON Schema (for editors' TOML completion) and exit.
    #[arg(long)]
    pub print_schema: bool,
}

/// Load, resolve and check the config of `a`.
pub fn config(a: &RunArgs) -> Result<RunConfig> {
    let mut cfg = match &a.config {
        Some(p) => RunConfig::load(p)?,
        None => RunConfig::default(),
    };
    if let Some(d) = &a.dataset {
        cfg.dataset = d.clone();
    }
    cfg.resolve();
    cfg.check_files()?;
    Ok(cfg)
}

/// Print the one-screen summary.
pub fn print_summary(r: &RunReport) {
    println!(
        "eps2v run {} in {} ({:.1}s)",
        r.run_id,
        r.dataset.display(),
        r.seconds
    );
    println!("{:<9} {:>8}  result", "stage", "seconds");
    for s in &r.stages {
        let secs = if s.skipped {
            format!("({:.1})", s.ran_seconds)
        } else {
            format!("{:.1}", s.seconds)
        };
        let mut line = s.summary.clone();
        if line.chars().count() > 90 {
            line = line.chars().take(87).collect::<String>() + "...";
        }
        println!(
            "{:<9} {:>8}  {}{}",
            s.stage,
            secs,
            if s.skipped { "done earlier: " } else { "" },
            line
        );
    }
    if !r.scores.is_empty() {
        println!();
        println!(
            "{:<36} {:>10} {:>11} {:>10}",
            "model", "adherence", "has shapes", "retention"
        );
        for s in &r.scores {
            println!(
                "{:<36} {:>9.1}% {:>11} {:>10}",
                s.label,
                100.0 * s.adherence.overall,
                s.adherence
                    .has_shapes
                    .map_or("-".into(), |h| format!("{:.1}%", 100.0 * h)),
                s.retention.map_or("-".into(), |x| format!("{x:.3}"))
            );
        }
    }
    if let Some(c) = &r.converted {
        println!("converted:  {}", c.display());
    }
    if let Some((a, p)) = &r.best_merge {
        println!("best merge: α = {a}: {}", p.display());
    }
    if let Some(p) = &r.report {
        println!("report:     {}", p.display());
    }
    if r.interrupted {
        println!("interrupted: rerun the same command to resume");
    }
}

/// Run `eps2v run`; exit 1 when items failed, 130 when interrupted.
pub fn run(a: RunArgs, json: bool) -> Result<i32> {
    if a.print_schema {
        print!("{}", run::config::schema_json());
        return Ok(0);
    }
    let cfg = config(&a)?;
    for w in cfg.train.warnings() {
        eprintln!("warning: {w}");
    }
    let r = run::run(&cfg, None, &Ctx::new(!json))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_summary(&r);
    }
    Ok(if r.interrupted {
        130
    } else if r.failed() > 0 {
        1
    } else {
        0
    })
}
