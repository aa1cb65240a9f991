//! `eps2v caption` and `eps2v filter`: flags → [`CaptionConfig`] /
//! [`FilterConfig`], summaries, exit codes (0 ok, 1 some items rejected by
//! `caption` as unreadable, 2 usage / model errors, 130 interrupted).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::manifest::Manifest;
use crate::stages::caption::policy::{Policy, PolicyConfig, Thresholds};
use crate::stages::caption::{self, CaptionConfig};
use crate::stages::filter::{self, FilterConfig};
use crate::stages::Ctx;

/// Caption policy on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    /// The generation prompt without A1111 syntax (`(red hair:1.2)` → `red hair`); needs no tagger.
    Prompt,
    /// The tagger's tags: count tags, characters, then general tags by confidence.
    Tags,
    /// The prompt's tags the tagger confirms, plus confident extra tags.
    Merged,
}

/// `eps2v caption DIR`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v caption my_dataset --tagger ~/models/wd-vit-tagger-v3\n  eps2v caption my_dataset --tagger wd-vit-tagger-v3 --policy tags --mcut --undesired \"simple background,white background\"\n  eps2v caption my_dataset --policy prompt --keep-tokens 2",
    mut_arg("precision", |a| a.help("Precision of the tagger: f32 (the default, also on CUDA: its thresholds were set in f32, and it is small), bf16 or f16 (CUDA only)"))
)]
pub struct CaptionArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// WD tagger folder (model.safetensors, selected_tags.csv, config.json), e.g. SmilingWolf/wd-vit-tagger-v3. Default when the policy needs one: the committed toy tagger.
    #[arg(long)]
    pub tagger: Option<PathBuf>,
    /// Caption policy.
    #[arg(long, value_enum, default_value = "merged")]
    pub policy: PolicyArg,
    /// General tags are kept when their probability is above this.
    #[arg(long, default_value_t = 0.35)]
    pub general_threshold: f32,
    /// Character tags are kept when their probability is above this.
    #[arg(long, default_value_t = 0.75)]
    pub character_threshold: f32,
    /// Per-image MCut thresholds (largest probability gap) instead of the fixed ones.
    #[arg(long)]
    pub mcut: bool,
    /// The first N tags of the prompt lead every caption verbatim (for kohya's --keep_tokens N).
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    /// Comma-separated tags never written into a caption.
    #[arg(long, value_delimiter = ',')]
    pub undesired: Vec<String>,
    /// Rewrite a caption tag: FROM=TO (repeatable; empty TO removes the tag).
    #[arg(long = "replace", value_name = "FROM=TO")]
    pub replace: Vec<String>,
    /// merged: tags not in the prompt are added when their probability is at least this.
    #[arg(long, default_value_t = 0.6)]
    pub extra_threshold: f32,
    /// Also replace the sidecar captions (.txt / .caption) of imported items.
    #[arg(long)]
    pub overwrite: bool,
    /// Images per model batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Where the tagger runs and in which precision.
    #[command(flatten)]
    pub device: crate::cli::device::DeviceArgs,
}

/// `eps2v filter DIR --min-alignment X`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v filter my_dataset --min-alignment 0.6 --dry-run\n  eps2v filter my_dataset --min-alignment 0.6"
)]
pub struct FilterArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Reject generated items whose alignment (share of the prompt's tags the tagger confirms) is below this.
    #[arg(long)]
    pub min_alignment: f64,
    /// List the decisions; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Build the caption config from flags.
pub fn caption_config(a: &CaptionArgs) -> anyhow::Result<CaptionConfig> {
    let mut replace = Vec::new();
    for r in &a.replace {
        let Some((from, to)) = r.split_once('=') else {
            return Err(crate::Error::config(format!(
                "--replace {r:?}: write it as FROM=TO (e.g. --replace \"1girl=one girl\")"
            ))
            .into());
        };
        replace.push((from.trim().to_string(), to.trim().to_string()));
    }
    let mut c = CaptionConfig {
        device: None,
        dtype: None,
        tagger: a.tagger.clone(),
        thresholds: Thresholds {
            general: a.general_threshold,
            character: a.character_threshold,
            mcut: a.mcut,
        },
        caption: PolicyConfig {
            policy: match a.policy {
                PolicyArg::Prompt => Policy::Prompt,
                PolicyArg::Tags => Policy::Tags,
                PolicyArg::Merged => Policy::Merged,
            },
            keep_tokens: a.keep_tokens,
            undesired: a
                .undesired
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            replace,
            extra_threshold: a.extra_threshold,
        },
        overwrite: a.overwrite,
        batch: a.batch,
    };
    if c.tagger.is_none() && c.caption.policy.needs_tagger() {
        c.tagger = Some(default_tagger(&a.dir)?);
    }
    // The device flags matter only when a tagger runs.
    // The tagger runs in f32 unless --precision says otherwise: its
    // thresholds were set in f32, and it is small.
    if c.tagger.is_some() {
        let (d, t) = a.device.resolve()?;
        c.device = Some(d);
        c.dtype = Some(if a.device.precision.is_some() {
            t
        } else {
            candle_core::DType::F32
        });
    }
    Ok(c)
}

/// The tagger without `--tagger`: the toy world's, for a dataset that toy
/// models generated ([`crate::toy::dataset_generator`]); any other dataset
/// needs a real tagger, since the toy one knows only the toy shapes and
/// would confirm none of a real prompt's tags.
fn default_tagger(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use crate::toy::Generator;
    let m = Manifest::open_read_only(dir)?;
    let why = match crate::toy::dataset_generator(&m)? {
        Generator::Toy => return Ok(crate::toy::default_tagger_dir()?),
        Generator::Nothing => "no image in it was generated by a toy model".to_string(),
        Generator::Other(what) => format!("its images were generated by {what}"),
        Generator::ToyAndImported => {
            "some of its images were imported, not generated by a toy model".to_string()
        }
    };
    Err(crate::Error::config(format!(
        "{}: no --tagger given, and the default tagger is the toy world's (it knows only the toy shapes) while {why}; pass --tagger DIR, a WD v3 tagger folder (model.safetensors, selected_tags.csv, config.json, e.g. SmilingWolf/wd-vit-tagger-v3), or --policy prompt",
        dir.display()
    ))
    .into())
}

/// Run `caption`; exit 1 when items were rejected, 130 when interrupted.
pub fn run_caption(a: CaptionArgs, json: bool) -> anyhow::Result<i32> {
    let cfg = caption_config(&a)?;
    cfg.check()?;
    let mut m = Manifest::open(&a.dir)?;
    let r = caption::run(&cfg, &mut m, &Ctx::new(!json))?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "caption ({} policy{}): {} items in {:.1}s; {} tagged ({:.1} images/s), {} already tagged",
            r.policy,
            r.tagger
                .as_deref()
                .map(|t| format!(", tagger {t}"))
                .unwrap_or_default(),
            r.considered,
            r.seconds,
            r.tagged,
            r.images_per_second,
            r.already_tagged
        );
        println!(
            "         {} captions written, {} kept their sidecar caption, {} without a caption",
            r.captioned, r.kept_sidecar, r.uncaptioned
        );
        // The dataset's scores, not only this run's (a resumed caption
        // scores what is left): what `filter --min-alignment` decides on.
        if let Some(mean) = r.dataset_mean_alignment.filter(|_| r.dataset_scored > 0) {
            println!(
                "         {} generated items scored ({} in this run), mean alignment {mean:.2} (see `eps2v inspect`, then `eps2v filter --min-alignment X`)",
                r.dataset_scored, r.scored
            );
        }
        if !r.ratings.is_empty() {
            let parts: Vec<String> = r.ratings.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("         ratings: {}", parts.join(", "));
        }
        if r.restored > 0 {
            println!(
                "         {} items rejected by an earlier caption run are ok again",
                r.restored
            );
        }
        if !r.rejected.is_empty() {
            let parts: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("         rejected: {}", parts.join(", "));
        }
        if r.interrupted {
            println!(
                "         interrupted: {} items not looked at yet; rerun the same command to do them (everything above is kept)",
                r.remaining
            );
        }
    }
    Ok(if r.interrupted {
        crate::error::INTERRUPTED_EXIT
    } else if r.rejected_total() > 0 {
        1
    } else {
        0
    })
}

/// Run `filter`.
pub fn run_filter(a: FilterArgs, json: bool) -> anyhow::Result<i32> {
    let mut m = Manifest::open(&a.dir)?;
    let cfg = FilterConfig {
        min_alignment: a.min_alignment,
        dry_run: a.dry_run,
    };
    let r = filter::run(&cfg, &mut m)?;
    if json {
        print_json(&r)?;
        return Ok(0);
    }
    if r.dry_run {
        for x in &r.rejections {
            println!("would reject item {}: {}", x.item_id, x.reason);
        }
    }
    println!(
        "filter{} (min alignment {:.2}): {} scored items, {} kept, {}{} rejected ({} newly), {} restored",
        if r.dry_run { " (dry run)" } else { "" },
        r.min_alignment,
        r.scored,
        r.kept,
        r.duplicates_text(),
        r.rejected,
        r.newly_rejected,
        r.restored
    );
    if r.unscored_with_prompt > 0 {
        println!(
            "        {} generated items have no score yet: run `eps2v caption {} --tagger DIR`",
            r.unscored_with_prompt,
            a.dir.display()
        );
    }
    if r.waiting_on_a_set_aside_keeper > 0 {
        println!(
            "        {}",
            crate::stages::dedupe::waiting_hint(r.waiting_on_a_set_aside_keeper, &a.dir)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CaptionArgs,
    }

    #[test]
    fn device_flags_reach_the_config_only_with_a_tagger() {
        let c = caption_config(&T::parse_from(["x", "ds", "--tagger", "t", "--device", "cpu"]).a)
            .unwrap();
        assert!(c.device.as_ref().is_some_and(|d| d.is_cpu()));
        assert_eq!(c.dtype, Some(candle_core::DType::F32));
        let c = caption_config(&T::parse_from(["x", "ds", "--policy", "prompt"]).a).unwrap();
        assert!(c.device.is_none() && c.dtype.is_none());
        let e = caption_config(
            &T::parse_from([
                "x",
                "ds",
                "--tagger",
                "t",
                "--device",
                "cpu",
                "--precision",
                "f16",
            ])
            .a,
        )
        .unwrap_err();
        assert!(e.to_string().contains("use f32 or a CUDA device"), "{e}");
    }
}
