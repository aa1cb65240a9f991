//! `eps2v manifest …`: whole-manifest operations. `merge OUT SHARD_DIR…`
//! joins the folders of a sharded `generate` ([`crate::stages::merge`]).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::manifest::Manifest;
use crate::stages::merge::{self, MergeConfig};
use crate::stages::Ctx;
use crate::Result;

/// Arguments of `eps2v manifest`.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ManifestCommand,
}

/// `manifest` subcommands.
#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Join the shard folders of one `generate` plan (items, images, runs, provenance) into OUT.
    #[command(
        after_help = "Example:\n  eps2v manifest merge data shard-1 shard-2 shard-3\n\n\
Shards of different plans are refused before OUT is touched. Merging again is harmless (nothing is copied twice).\n\
Afterwards `eps2v generate OUT` with the same flags renders whatever no shard rendered."
    )]
    Merge(MergeArgs),
}

/// Arguments of `eps2v manifest merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Output dataset folder (created if missing).
    pub out: PathBuf,
    /// Shard folders filled by `eps2v generate --shard K/N`.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

/// Run `eps2v manifest …`.
pub fn run(a: ManifestArgs, json: bool) -> Result<i32> {
    match a.command {
        ManifestCommand::Merge(m) => {
            merge::check_shards(&m.out, &m.shards)?;
            let mut out = Manifest::init(&m.out)?;
            let cfg = MergeConfig { shards: m.shards };
            let r = merge::run(&cfg, &mut out, &Ctx::new(!json))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for s in &r.shards {
                    println!(
                        "{} (shard {}): {} new items, {} already there, {} plan rows, {} files copied or linked, {} runs{}",
                        s.dir.display(),
                        s.shard,
                        s.items_added,
                        s.items_existing,
                        s.rows_merged,
                        s.files_copied,
                        s.runs_copied,
                        if s.rows_updated > 0 {
                            format!(", {} rows it has redone since brought up to date", s.rows_updated)
                        } else {
                            String::new()
                        }
                    );
                    if s.files_missing > 0 {
                        println!(
                            "        {} files missing in that folder (e.g. {}){}",
                            s.files_missing,
                            s.missing_files.join(", "),
                            if s.items_without_image > 0 {
                                format!(
                                    "; their {} items were left out and their plan rows are `planned` again: \
                                     put the files back and merge again, or run `eps2v generate {}` with the same flags",
                                    s.items_without_image,
                                    m.out.display()
                                )
                            } else {
                                String::new()
                            }
                        );
                    }
                    if s.items_conflicting > 0 {
                        println!(
                            "        {} plan indices (e.g. {:?}) were rendered to other pixels there than in {} \
                             (another device or precision?); {}'s images were kept",
                            s.items_conflicting,
                            s.conflict_examples,
                            m.out.display(),
                            m.out.display()
                        );
                    }
                }
                println!(
                    "merge {}: {} of {} planned images rendered; {} missing{}",
                    m.out.display(),
                    r.rendered,
                    r.count,
                    r.missing,
                    if r.missing > 0 {
                        format!(
                            " (e.g. {:?}; run `eps2v generate {}` with the same flags to render them)",
                            r.missing_examples,
                            m.out.display()
                        )
                    } else {
                        String::new()
                    }
                );
                if !r.skipped_tables.is_empty() {
                    println!(
                        "        not merged (no item reference): {}",
                        r.skipped_tables.join(", ")
                    );
                }
            }
            Ok(
                if r.shards
                    .iter()
                    .any(|s| s.files_missing > 0 || s.items_conflicting > 0)
                {
                    1
                } else {
                    0
                },
            )
        }
    }
}
