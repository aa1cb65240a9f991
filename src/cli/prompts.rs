//! `eps2v prompts TEMPLATE --count N [--seed S] [--combinatorial]
//! [--wildcards DIR] [--raw]`: print the prompts a template gives
//! ([`crate::prompts`]), one per line.

use std::path::PathBuf;

use clap::Args;

use crate::prompts::{self, tidy, TemplateSpec};
use crate::{Error, Result};

/// Arguments of `eps2v prompts`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v prompts 1girl --count 5 --seed 7\n  eps2v prompts my_template.txt --wildcards my_wildcards --count 20\n  eps2v prompts \"{red|blue} {circle|square}, {2$$ and $$a|b|c}\" --combinatorial --count 100\n\n\
TEMPLATE is a template file, a built-in pack name (1girl) or the template text itself.\n\
Wildcards (__name__) come from --wildcards, else the template's sibling wildcards/ folder (or its own folder); the built-in pack carries its own.\n\
Random mode: prompt i depends only on (template, --seed, i). --combinatorial lists every prompt in dynamicprompts' order."
)]
pub struct PromptsArgs {
    /// Template file, built-in pack name (`1girl`), or template text.
    pub template: String,
    /// How many prompts.
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    /// Seed of random mode.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Enumerate every combination (in dynamicprompts' order) instead of sampling.
    #[arg(long)]
    pub combinatorial: bool,
    /// Folder of wildcard `.txt` files.
    #[arg(long)]
    pub wildcards: Option<PathBuf>,
    /// Print the exact expansion (newlines, empty comma pieces) instead of the tidied prompt.
    #[arg(long)]
    pub raw: bool,
}

/// Run `eps2v prompts`.
pub fn run(a: PromptsArgs, json: bool) -> Result<i32> {
    if a.count == 0 {
        return Err(Error::config("--count must be at least 1"));
    }
    let spec = TemplateSpec::from_arg(&a.template)?;
    let t = prompts::load(&spec, a.wildcards.as_deref())?;
    let finish = |p: String| if a.raw { p } else { tidy(&p) };
    let list: Vec<String> = if a.combinatorial && !a.raw {
        t.distinct_combinations().take(a.count as usize).collect()
    } else if a.combinatorial {
        t.combinations().take(a.count as usize).collect()
    } else {
        (0..a.count).map(|i| finish(t.random(a.seed, i))).collect()
    };
    if a.combinatorial && (list.len() as u64) < a.count {
        // Say it rather than silently printing fewer lines than asked for.
        eprintln!(
            "note: the template has only {} {}combinations; printed {} of the {} asked for (--count)",
            list.len(),
            if a.raw { "" } else { "distinct " },
            list.len(),
            a.count
        );
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "template": spec.label(),
                "digest": t.digest(),
                "mode": if a.combinatorial { "combinatorial" } else { "random" },
                "seed": a.seed,
                "prompts": list,
            }))?
        );
    } else {
        for p in &list {
            println!("{p}");
        }
    }
    Ok(0)
}
