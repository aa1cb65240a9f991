//! Curation subcommands: `init`, `dedupe`, `export`, `inspect` (and, in
//! their own files, `import` and `bucket`). Flags become the stages'
//! typed configs here; the stages never see clap.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::manifest::Manifest;
use crate::stages::{self, Ctx};

/// `eps2v init DIR`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  eps2v init my_dataset")]
pub struct InitArgs {
    /// Dataset folder to create (or open, if it exists).
    pub dir: PathBuf,
}

/// `eps2v import DIR --from FOLDER`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v import my_dataset --from ~/pictures/a1111_outputs\n  eps2v --json import my_dataset --from kohya_folder --max-side 8192"
)]
pub struct ImportArgs {
    /// Dataset folder (created if missing).
    pub dir: PathBuf,
    /// Folder to import from (recursive; PNG/JPEG/WebP/GIF/BMP/TIFF).
    #[arg(long)]
    pub from: PathBuf,
    /// Files per manifest transaction.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Refuse images with a side larger than this (decompression-bomb guard).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_side: Option<u32>,
    /// Refuse images with more pixels than this.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pixels: Option<u64>,
}

/// Hash choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum HashArg {
    /// DCT perceptual hash (imagededup-compatible).
    Phash,
    /// Difference hash.
    Dhash,
}

/// `eps2v dedupe DIR`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v dedupe my_dataset --dry-run\n  eps2v dedupe my_dataset --radius 6 --hash dhash"
)]
pub struct DedupeArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Perceptual hash used for near duplicates.
    #[arg(long, value_enum, default_value = "phash")]
    pub hash: HashArg,
    /// Hamming radius (0..=32); 10 is imagededup's default.
    #[arg(long, default_value_t = 10)]
    pub radius: u32,
    /// List what would be dropped; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `eps2v bucket DIR`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v bucket my_dataset\n  eps2v bucket my_dataset --kohya-resolution 1024 --step 64 --min-side 256 --max-side 2048 --crop random --seed 7"
)]
pub struct BucketArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Use a kohya-style generated bucket set for this square resolution (its area is kept) instead of the SDXL list.
    #[arg(long, conflicts_with = "sdxl")]
    pub kohya_resolution: Option<u32>,
    /// Use the SDXL list (40 sizes of about 1024², and their transposes). Without this or --kohya-resolution: the set the dataset's buckets were made with, else the toy buckets for a dataset that toy models generated, else the SDXL list.
    #[arg(long)]
    pub sdxl: bool,
    /// Generator: side step (with --kohya-resolution; the SDXL list has its own sides).
    #[arg(long, default_value_t = 64, requires = "kohya_resolution")]
    pub step: u32,
    /// Generator: smallest side (with --kohya-resolution).
    #[arg(long, default_value_t = 256, requires = "kohya_resolution")]
    pub min_side: u32,
    /// Generator: largest side (with --kohya-resolution).
    #[arg(long, default_value_t = 2048, requires = "kohya_resolution")]
    pub max_side: u32,
    /// Crop placement [default: the earlier bucketing's, else center].
    #[arg(long, value_enum)]
    pub crop: Option<CropChoice>,
    /// Seed for random crops [default: the earlier bucketing's, else 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Largest upscale factor accepted (1.0 = never upscale); smaller images are rejected [default: the earlier bucketing's, else 1.25].
    #[arg(long)]
    pub max_upscale: Option<f64>,
    /// Redo items that already have a bucket.
    #[arg(long)]
    pub force: bool,
}

/// Crop choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CropChoice {
    /// Centered crop.
    Center,
    /// Seeded random crop.
    Random,
}

/// Export format on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// kohya sd-scripts folder (`<repeats>_<name>/` + .txt + meta_lat.json).
    Kohya,
    /// Hugging Face imagefolder (train/ + metadata.jsonl).
    Hf,
    /// Parquet of every manifest row.
    Parquet,
    /// JSON lines of every manifest row.
    Jsonl,
}

/// `eps2v export DIR --format …`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v export my_dataset --format kohya\n  eps2v export my_dataset --format kohya --latents sdxl.safetensors --device cuda\n  eps2v export my_dataset --format parquet --out rows.parquet\n\n\
With --latents, kohya reads each image's latents, original size and crop from the .npz beside it when it trains with the flags the summary prints (--caption_extension .txt --enable_bucket --bucket_no_upscale --resolution R --bucket_reso_steps S --cache_latents --cache_latents_to_disk); --flip_aug only with --flip-latents, and no --alpha_mask (kohya would re-encode and overwrite the .npz).",
    mut_arg("precision", |a| a.help("Precision of the VAE of --latents: f32 (the default, also on CUDA: these latents are another trainer's input) or bf16 (CUDA only; f16 runs the VAE in f32, the SDXL VAE overflows in f16)"))
)]
pub struct ExportArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// Output path (default: DIR/exports/<format> or DIR/exports/manifest.<ext>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// kohya: repeats in the folder name `<repeats>_<name>` [default: 1].
    #[arg(long)]
    pub repeats: Option<u32>,
    /// kohya: concept name in the folder name [default: eps2v].
    #[arg(long)]
    pub name: Option<String>,
    /// kohya: also write kohya's latent cache, a .npz beside each bucketed image with its latents from MODEL's VAE (an SDXL checkpoint or the SDXL VAE file: 4 latent channels) and its true original size and crop, so kohya conditions SDXL on them instead of on the bucket-sized file. The summary prints the sd-scripts flags that use them. Latents go through the dataset's latent cache (shared with `eps2v train`).
    #[arg(long, value_name = "MODEL")]
    pub latents: Option<PathBuf>,
    /// kohya latents: also encode the mirrored images (`latents_flipped`), which sd-scripts' --flip_aug needs.
    #[arg(long, requires = "latents")]
    pub flip_latents: bool,
    /// Where the VAE of --latents runs, and in which precision.
    #[command(flatten)]
    pub device: crate::cli::device::DeviceArgs,
}

/// `eps2v inspect DIR`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  eps2v inspect my_dataset\n  eps2v inspect my_dataset --sql \"SELECT status, count(*) FROM items GROUP BY 1\""
)]
pub struct InspectArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Run one read-only SQL statement against the manifest and print the result.
    #[arg(long)]
    pub sql: Option<String>,
    /// How many tags to list.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32))]
    pub top: u32,
}

fn ctx(json: bool) -> Ctx {
    Ctx::new(!json)
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Run `init`.
pub fn init(a: InitArgs, json: bool) -> anyhow::Result<i32> {
    let m = Manifest::init(&a.dir)?;
    if json {
        print_json(&serde_json::json!({
            "dataset": a.dir.to_string_lossy(),
            "manifest": m.db_path().to_string_lossy(),
        }))?;
    } else {
        println!("dataset ready: {}", m.db_path().display());
    }
    Ok(0)
}

/// Run `import`.
pub fn import(a: ImportArgs, json: bool) -> anyhow::Result<i32> {
    // A mistyped --from must not leave a new, empty dataset behind.
    if !a.from.is_dir() {
        let what = if a.from.exists() {
            "not a folder (import takes the folder that holds the images)"
        } else {
            "no such folder"
        };
        return Err(crate::Error::config(format!(
            "--from {}: {what}; pass an existing folder of images",
            a.from.display()
        ))
        .into());
    }
    // The dataset folder is left out of the walk: as the source itself,
    // nothing would be found (and a manifest made among the images).
    let same = match (a.from.canonicalize(), a.dir.canonicalize()) {
        (Ok(f), Ok(d)) => f == d,
        _ => false,
    };
    if same {
        return Err(crate::Error::config(format!(
            "import {} --from {}: the images' folder is the dataset folder; import into a new folder beside it, e.g. `eps2v import {}_dataset --from {}`",
            a.dir.display(),
            a.from.display(),
            a.dir.display(),
            a.from.display()
        ))
        .into());
    }
    let mut m = Manifest::init(&a.dir)?;
    let mut cfg = stages::import::ImportConfig {
        from: a.from,
        batch: a.batch,
        ..Default::default()
    };
    if let Some(v) = a.max_side {
        cfg.limits.max_side = v;
    }
    if let Some(v) = a.max_pixels {
        cfg.limits.set_max_pixels(v);
    }
    let r = stages::import::run(&cfg, &mut m, &ctx(json))?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "import: {} files found in {:.1}s; {} new items, {} already imported, {} identical to an existing item",
            r.found, r.seconds, r.imported, r.already_imported, r.same_file
        );
        println!(
            "        {} with A1111 parameters, {} with sidecar captions, {} with a wrong extension",
            r.with_parameters, r.with_caption, r.wrong_extension
        );
        if r.reconsidered > 0 {
            println!(
                "        {} earlier rejections decided again with these limits",
                r.reconsidered
            );
        }
        if !r.rejected.is_empty() {
            let parts: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("        rejected: {}", parts.join(", "));
        }
        // One clean line per rejected file (decoder panics are caught
        // silently and arrive here as `corrupt: …`).
        for f in &r.rejected_files {
            eprintln!("rejected {}: {}", f.path.display(), f.reason);
        }
        // Imported, but without the caption its sidecar holds.
        for f in &r.unread_captions {
            eprintln!("warning: {}: {}", f.path.display(), f.reason);
        }
        let sk = &r.skipped;
        if sk.unread_formats > 0 {
            println!(
                "        not read: {} files in image formats eps2v does not decode (e.g. {}); convert them to PNG, JPEG or WebP to import them",
                sk.unread_formats,
                sk.unread_examples
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if sk.total() > 0 {
            println!(
                "        skipped: {} broken links, {} FIFOs, {} sockets, {} devices, {} link loops, {} folders reached twice",
                sk.broken_links,
                sk.fifos,
                sk.sockets,
                sk.devices,
                sk.loops.len(),
                sk.repeated_folders
            );
            for l in &sk.loops {
                println!("        link loop (not followed): {}", l.display());
            }
        }
        if r.gone > 0 {
            println!(
                "        {} files imported from here before are gone (e.g. {}); their items stay in the dataset",
                r.gone,
                r.gone_examples.join(", ")
            );
        }
        if let Some(x) = &sk.excluded {
            println!(
                "        not searched: {} (the dataset folder itself)",
                x.display()
            );
        }
        for f in &r.failed {
            println!("        failed: {}: {}", f.path.display(), f.reason);
        }
    }
    Ok(if r.rejected_total() > 0 || !r.failed.is_empty() {
        1
    } else {
        0
    })
}

/// An item as its user knows it: `item N (SOURCE)`, the file it was
/// imported from, or its image in the dataset for a generated one.
fn item_name(m: &Manifest, id: i64) -> String {
    let path: Option<String> = m
        .conn()
        .query_row(
            "SELECT coalesce((SELECT min(path) FROM sources WHERE item_id = ?1),
                             (SELECT path FROM items WHERE id = ?1))",
            [id],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    match path {
        Some(p) => format!("item {id} ({p})"),
        None => format!("item {id}"),
    }
}

/// Run `dedupe`.
pub fn dedupe(a: DedupeArgs, json: bool) -> anyhow::Result<i32> {
    let mut m = Manifest::open(&a.dir)?;
    let cfg = stages::dedupe::DedupeConfig {
        hash: match a.hash {
            HashArg::Phash => stages::dedupe::HashKind::Phash,
            HashArg::Dhash => stages::dedupe::HashKind::Dhash,
        },
        radius: a.radius,
        dry_run: a.dry_run,
    };
    let r = stages::dedupe::run(&cfg, &mut m, &ctx(json))?;
    if json {
        print_json(&r)?;
        return Ok(0);
    }
    if r.dry_run {
        for c in &r.plan {
            for d in &c.drops {
                println!(
                    "would drop {} ({} duplicate of {}, distance {})",
                    item_name(&m, d.item_id),
                    d.kind,
                    item_name(&m, d.keeper_id),
                    d.distance
                );
            }
        }
    }
    println!(
        "dedupe{}: {} items considered, {} clusters, {} exact + {} near duplicates {}, {} kept",
        if r.dry_run { " (dry run)" } else { "" },
        r.considered,
        r.clusters,
        r.exact,
        r.near,
        if r.dry_run {
            "would be dropped"
        } else {
            "dropped"
        },
        r.kept
    );
    if r.carried_captions > 0 {
        println!(
            "        {} kept images {} the hand-written caption (.txt/.caption) of a dropped duplicate; export and train use it",
            r.carried_captions,
            if r.dry_run { "would take" } else { "took" }
        );
    }
    Ok(0)
}

/// Run `bucket`.
pub fn bucket(a: BucketArgs, json: bool) -> anyhow::Result<i32> {
    use stages::bucket::{BucketConfig, BucketSet, CropArg};
    let mut m = Manifest::open(&a.dir)?;
    // What is not given comes from the bucketing the dataset has (a plain
    // rerun redoes nothing), else from the defaults: the toy buckets for a
    // dataset of toy images (the SDXL list would reject them all as too
    // small), else the SDXL list.
    let earlier = stages::bucket::current_settings(&m)?;
    let given = if a.sdxl {
        Some(BucketSet::Sdxl)
    } else {
        a.kohya_resolution.map(|resolution| BucketSet::Kohya {
            resolution,
            step: a.step,
            min_side: a.min_side,
            max_side: a.max_side,
        })
    };
    let (base, origin) = match &earlier {
        Some((run, c)) => (
            c.clone(),
            format!("bucket run {run}'s, which made the dataset's buckets"),
        ),
        None if given.is_some() => (BucketConfig::default(), "the defaults".to_string()),
        None => match crate::toy::dataset_generator(&m)? {
            crate::toy::Generator::Toy => (
                BucketConfig {
                    buckets: crate::run::config::toy_bucket_set(),
                    ..Default::default()
                },
                "the toy world's, as toy models generated every image (--sdxl for the SDXL list)"
                    .to_string(),
            ),
            crate::toy::Generator::ToyAndImported => (
                BucketConfig::default(),
                "the defaults (not the toy buckets: some images were imported; --kohya-resolution 80 --step 32 --min-side 64 --max-side 96 makes them)"
                    .to_string(),
            ),
            _ => (BucketConfig::default(), "the defaults".to_string()),
        },
    };
    let cfg = BucketConfig {
        buckets: given.unwrap_or(base.buckets),
        crop: match a.crop {
            None => base.crop,
            Some(CropChoice::Center) => CropArg::Center,
            Some(CropChoice::Random) => CropArg::Random,
        },
        seed: a.seed.unwrap_or(base.seed),
        max_upscale: a.max_upscale.unwrap_or(base.max_upscale),
        force: a.force,
        ..Default::default()
    };
    let r = stages::bucket::run(&cfg, &mut m, &ctx(json))?;
    if json {
        // The report, and the settings used with where the ones not given
        // came from.
        let mut v = serde_json::to_value(&r)?;
        v["settings"] = serde_json::to_value(&cfg)?;
        v["settings_from"] = origin.clone().into();
        print_json(&v)?;
    } else {
        // Which settings were not given, and where they came from.
        let mut taken = Vec::new();
        if !a.sdxl && a.kohya_resolution.is_none() {
            taken.push(cfg.buckets.to_string());
        }
        if a.crop.is_none() {
            taken.push(format!(
                "{} crop",
                match cfg.crop {
                    CropArg::Center => "center",
                    CropArg::Random => "random",
                }
            ));
        }
        if a.seed.is_none() {
            taken.push(format!("seed {}", cfg.seed));
        }
        if a.max_upscale.is_none() {
            taken.push(format!("max upscale {}", cfg.max_upscale));
        }
        if !taken.is_empty() {
            println!("settings not given are {origin}: {}", taken.join(", "));
        }
        println!(
            "bucket: {} items bucketed in {:.1}s, {} already bucketed with these settings",
            r.bucketed, r.seconds, r.already
        );
        if r.rebucketed + r.reconsidered > 0 {
            println!(
                "        redone with these settings: {} bucketed before, {} rejected before",
                r.rebucketed, r.reconsidered
            );
        }
        if r.rebucketed_rejected > 0 {
            println!(
                "        {} items bucketed before with other settings are rejected with these: to get their buckets back, run bucket again with the earlier settings (`eps2v inspect {}` lists the runs)",
                r.rebucketed_rejected,
                a.dir.display()
            );
        }
        if r.still_rejected > 0 {
            println!(
                "        {} rejected earlier with these same settings (change the settings or use --force to retry)",
                r.still_rejected
            );
        }
        if r.waiting_on_a_set_aside_keeper > 0 {
            println!(
                "        {}",
                stages::dedupe::waiting_hint(r.waiting_on_a_set_aside_keeper, &a.dir)
            );
        }
        let mut hist: Vec<_> = r.histogram.iter().collect();
        hist.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (b, n) in hist.iter().take(12) {
            println!("        {b:>10}  {n}");
        }
        if !r.rejected.is_empty() {
            let parts: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("        rejected: {}", parts.join(", "));
        }
        // Which ones, as import names its rejections (the rest: --json,
        // or `eps2v inspect`).
        const SHOWN: usize = 20;
        for x in r.rejected_items.iter().take(SHOWN) {
            let what = x
                .source
                .clone()
                .unwrap_or_else(|| format!("item {}", x.item_id));
            eprintln!("rejected {what}: {}", x.reason);
        }
        if r.rejected_items.len() > SHOWN {
            eprintln!(
                "... and {} more (--json lists them all)",
                r.rejected_items.len() - SHOWN
            );
        }
    }
    Ok(if r.rejected.is_empty() { 0 } else { 1 })
}

/// Run `export`.
pub fn export(a: ExportArgs, json: bool) -> anyhow::Result<i32> {
    use stages::export::ExportFormat as F;
    if !matches!(a.format, FormatArg::Kohya) && (a.repeats.is_some() || a.name.is_some()) {
        return Err(crate::Error::config(
            "export --repeats/--name: they make kohya's folder name `<repeats>_<name>`; drop them, or use --format kohya",
        )
        .into());
    }
    let mut m = Manifest::open(&a.dir)?;
    let cfg = stages::export::ExportConfig {
        format: match a.format {
            FormatArg::Kohya => F::Kohya,
            FormatArg::Hf => F::Hf,
            FormatArg::Parquet => F::Parquet,
            FormatArg::Jsonl => F::Jsonl,
        },
        out: a.out,
        repeats: a.repeats.unwrap_or(1),
        name: a.name.unwrap_or_else(|| "eps2v".into()),
        latents: a.latents,
        flip_latents: a.flip_latents,
    };
    if cfg.latents.is_none() && (a.device.device.is_some() || a.device.precision.is_some()) {
        return Err(crate::Error::config(
            "export --device/--precision: they say where the VAE of --latents runs; add --latents MODEL",
        )
        .into());
    }
    stages::export::check(&cfg, m.root())?;
    // The VAE loads before anything is written; f32 unless --precision.
    let vae = match &cfg.latents {
        Some(p) => {
            let (device, dtype) = a.device.resolve()?;
            let dtype = if a.device.precision.is_some() {
                dtype
            } else {
                candle_core::DType::F32
            };
            Some(stages::export::LatentSource::load(p, &device, dtype)?)
        }
        None => None,
    };
    let r = stages::export::run_with(&cfg, &mut m, &ctx(json), vae.as_ref())?;
    if json {
        print_json(&r)?;
    } else if matches!(cfg.format, F::Parquet | F::Jsonl) {
        // A table of every item: no image is written, none can be missing.
        println!(
            "export {}: {} rows written to {} (every item, all statuses; schema schemas/export_row.schema.json)",
            r.format,
            r.written,
            r.out.display()
        );
    } else {
        println!(
            "export {}: {} written to {} ({} missing image files, {} without caption{})",
            r.format,
            r.written,
            r.out.display(),
            r.missing,
            r.uncaptioned,
            if r.converted > 0 {
                format!(
                    ", {} originals written as PNG of their decoded pixels (EXIF rotation, alpha on white, or a format trainers skip)",
                    r.converted
                )
            } else {
                String::new()
            }
        );
        if !r.uncaptioned_files.is_empty() {
            const SHOWN: usize = 10;
            let more = r.uncaptioned_files.len().saturating_sub(SHOWN);
            println!(
                "        without caption{}: {}{}",
                if r.format == "kohya" {
                    " (kohya trains them on the folder's class token, by both routes; `eps2v train` skips them; `eps2v caption` captions them)"
                } else {
                    ""
                },
                r.uncaptioned_files
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if more > 0 {
                    format!(" and {more} more (--json lists all)")
                } else {
                    String::new()
                }
            );
        }
        if cfg.latents.is_some() {
            println!(
                "        kohya latent cache: {} .npz written ({} latents encoded, {} from the dataset's cache){}",
                r.latents_written,
                r.latents_encoded,
                r.latents_cached,
                if r.latents_unbucketed > 0 {
                    format!(
                        "; {} items without a bucket have none (kohya encodes them; run `eps2v bucket` first)",
                        r.latents_unbucketed
                    )
                } else {
                    String::new()
                }
            );
            if let Some(f) = &r.kohya_flags {
                println!(
                    "        sd-scripts flags that use them (--train_data_dir {}{}): {f}",
                    r.out.display(),
                    if cfg.flip_latents {
                        ", --flip_aug if you want it"
                    } else {
                        "; no --flip_aug, which needs --flip-latents"
                    }
                );
                println!(
                    "        or, fine-tuning style: --train_data_dir {} --in_json {} with the same flags (from sd-scripts #2186, c6bc632e, on; older sd-scripts look meta_lat.json's keys up without their extension and do not find these images: use the folder route above there){}",
                    r.out.join(format!("{}_{}", cfg.repeats, cfg.name)).display(),
                    r.out.join("meta_lat.json").display(),
                    if cfg.repeats > 1 {
                        format!("; this route ignores the folder's {} repeats: add --dataset_repeats {}", cfg.repeats, cfg.repeats)
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(w) = &r.kohya_warning {
                println!("        warning: {w}");
            }
        }
        for f in r.failed.iter().take(10) {
            println!("        not written: {f}");
        }
        if r.failed.len() > 10 {
            println!(
                "        and {} more not written (--json lists all)",
                r.failed.len() - 10
            );
        }
    }
    Ok(if r.missing > 0 || !r.failed.is_empty() {
        1
    } else {
        0
    })
}

/// Run `inspect`.
pub fn inspect(a: InspectArgs, json: bool) -> anyhow::Result<i32> {
    let m = Manifest::open_read_only(&a.dir)?;
    if let Some(sql) = a.sql {
        let t = stages::inspect::sql(&m, &sql)?;
        if json {
            print_json(&t)?;
        } else {
            println!("{}", t.render());
        }
        return Ok(0);
    }
    let r = stages::inspect::run(&m, a.top as usize)?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", stages::inspect::render(&r));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The kohya generator's settings without --kohya-resolution were
    /// ignored (the SDXL list was used): now a usage error.
    #[test]
    fn kohya_generator_flags_need_kohya_resolution() {
        let parse = |args: &[&str]| {
            let mut all = vec!["eps2v", "bucket", "ds"];
            all.extend_from_slice(args);
            super::super::Cli::try_parse_from(all)
        };
        assert!(parse(&[]).is_ok());
        for flag in ["--max-side", "--min-side", "--step"] {
            let e = parse(&[flag, "64"])
                .map(|_| ())
                .expect_err(flag)
                .to_string();
            assert!(e.contains("--kohya-resolution"), "{e}");
        }
        assert!(parse(&["--kohya-resolution", "1024", "--max-side", "1536"]).is_ok());
    }
}
