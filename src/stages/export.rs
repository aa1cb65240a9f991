//! `eps2v export`: write the curated dataset in the formats trainers read.
//!
//! - `kohya`: a DreamBooth-style folder `<repeats>_<name>/` with each ok
//!   item's training image (the bucketed image when bucketed, otherwise the
//!   original) and a `.txt` caption beside it, plus `meta_lat.json` at the
//!   top, the metadata kohya's fine-tuning loader reads (`--in_json`, with
//!   `--train_data_dir` = the `<repeats>_<name>/` folder). The contract,
//!   checked against sd-scripts' `FineTuningDataset` and
//!   `DreamBoothDataset` (`library/train_util.py`):
//!   - keys of `meta_lat.json` are the image **file names with extension**,
//!     relative to the image folder (kohya joins them to `image_dir`; a stem
//!     without extension is only found when a latent cache exists);
//!   - `caption` is the chosen caption on one line; `tags` holds only the
//!     tags the caption does not already contain (kohya appends `tags` to
//!     `caption`), so nothing is trained twice; empty fields are left out;
//!   - `image_size` and `train_resolution` are the size of the exported
//!     file (`[w, h]`, the bucket size when bucketed);
//!   - the `.txt` holds what the fine-tuning loader trains on (`caption,
//!     tags`) on one line, since the DreamBooth loader reads the first line
//!     only and refuses an empty caption file;
//!   - items without any caption text get no `.txt` (the DreamBooth loader
//!     trains them on the folder's class token) and the class token as
//!     their `meta_lat.json` caption (the fine-tuning loader would take an
//!     empty prompt), so both routes agree; they are listed in the report
//!     (`uncaptioned_files`). `eps2v train` skips them.
//! - `hf`: an imagefolder (`train/` with the images and `metadata.jsonl`,
//!   `file_name` + `text` + tags + sizes), loadable with
//!   `datasets.load_dataset("imagefolder", data_dir=…)`.
//! - `parquet` / `jsonl`: every manifest item (all statuses) as one flat row,
//!   schema `schemas/export_row.schema.json`; Parquet through polars.
//!
//! Caption choice (silent in the issue; decided here): the first present of
//! `duplicate_sidecar` (a hand-written caption of a dropped duplicate,
//! given to its keeper by `dedupe`; not used once the keeper has a sidecar
//! of its own), `policy`, `tagger`, `sidecar_txt`, `sidecar_caption`,
//! `a1111_prompt`, then any other source alphabetically. An `a1111_prompt` caption is
//! exported as training text: A1111 emphasis, `BREAK` and extra-network
//! syntax removed (`(red hair:1.2)` → `red hair`, see
//! [`crate::models::sdxl::prompt::clean_prompt`]).
//!
//! Writes are atomic: everything goes to a temporary sibling which is
//! renamed into place at the end, so a killed export leaves the previous
//! export intact; rerunning produces the same files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Ctx;

#[path = "export_files.rs"]
mod files;
#[path = "export_latents.rs"]
mod latents;
#[path = "export_tables.rs"]
mod tables;
use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::models::tagger::labels::tag_key;
use files::{check_replaceable, link_or_copy, write_decoded_png, Staged};
pub use files::{needs_rewrite, EXPORT_MARK};
pub use latents::{kohya_crop_ltrb, kohya_flags, LatentSource};
pub use tables::{write_jsonl, write_parquet};

/// Caption sources in export priority order.
pub const CAPTION_PRIORITY: &[&str] = &[
    crate::stages::dedupe::CARRIED_CAPTION_SOURCE,
    "policy",
    "tagger",
    "sidecar_txt",
    "sidecar_caption",
    "a1111_prompt",
];

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// kohya sd-scripts folder + meta_lat.json.
    Kohya,
    /// Hugging Face imagefolder with metadata.jsonl.
    Hf,
    /// Parquet of the manifest rows.
    Parquet,
    /// JSON lines of the manifest rows.
    Jsonl,
}

impl ExportFormat {
    fn name(self) -> &'static str {
        match self {
            ExportFormat::Kohya => "kohya",
            ExportFormat::Hf => "hf",
            ExportFormat::Parquet => "parquet",
            ExportFormat::Jsonl => "jsonl",
        }
    }
}

/// Configuration of the export stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Output format.
    pub format: ExportFormat,
    /// Output path (folder for kohya/hf, file for parquet/jsonl); default
    /// `exports/<format>` (`exports/manifest.<ext>` for row formats).
    pub out: Option<PathBuf>,
    /// kohya: repeats in the folder name `<repeats>_<name>`.
    pub repeats: u32,
    /// kohya: concept name in the folder name.
    pub name: String,
    /// kohya: the checkpoint (or standalone VAE file) whose VAE writes
    /// kohya's latent cache, a `.npz` beside each bucketed image with the
    /// true original size and crop (see `export_latents.rs`); `None`: no
    /// latent cache. The VAE itself is passed to [`run_with`].
    #[serde(default)]
    pub latents: Option<PathBuf>,
    /// kohya latents: also the mirrored image's (`latents_flipped`), which
    /// kohya's `--flip_aug` needs.
    #[serde(default)]
    pub flip_latents: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            format: ExportFormat::Kohya,
            out: None,
            repeats: 1,
            name: "eps2v".into(),
            latents: None,
            flip_latents: false,
        }
    }
}

/// One flat manifest row (see `schemas/export_row.schema.json`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ExportRow {
    /// Manifest `items.id`.
    pub item_id: i64,
    /// sha256 of the file bytes (hex).
    pub sha256: String,
    /// Image path relative to the dataset folder (`images/ab/<sha>.<ext>`).
    pub path: Option<String>,
    /// First source path, or `generate`.
    pub source: String,
    /// Item status (`ok` or a rejection status).
    pub status: String,
    /// Reason code and detail when not ok.
    pub reason: Option<String>,
    /// Original width in pixels.
    pub width: Option<i64>,
    /// Original height in pixels.
    pub height: Option<i64>,
    /// Decoded image format (`png`, `jpeg`, …).
    pub format: Option<String>,
    /// Caption chosen by the export caption priority.
    pub caption: Option<String>,
    /// Where that caption came from (one of [`CAPTION_PRIORITY`]: `policy`, `tagger`, `sidecar_txt`, …).
    pub caption_source: Option<String>,
    /// Comma-separated tags of all sources: scored (tagger) tags highest
    /// score first, then each source's tags in its caption's order.
    pub tags: Option<String>,
    /// Generation prompt (A1111 infotext or `generate`).
    pub prompt: Option<String>,
    /// Generation negative prompt.
    pub negative: Option<String>,
    /// Generation seed.
    pub seed: Option<i64>,
    /// Generation sampler steps.
    pub steps: Option<i64>,
    /// Generation sampler name.
    pub sampler: Option<String>,
    /// Generation σ schedule (A1111's "Schedule type": Karras, …).
    pub schedule: Option<String>,
    /// Generation CFG scale.
    pub cfg: Option<f64>,
    /// Hash of the model that generated the image.
    pub model_hash: Option<String>,
    /// 64-bit pHash, 16 hex digits.
    pub phash: Option<String>,
    /// 64-bit dHash, 16 hex digits.
    pub dhash: Option<String>,
    /// Duplicate cluster (keeper item id).
    pub cluster_id: Option<i64>,
    /// The keeper of this item's duplicate cluster (itself when kept).
    pub keeper_id: Option<i64>,
    /// Bucket width in pixels.
    pub bucket_w: Option<i64>,
    /// Bucket height in pixels.
    pub bucket_h: Option<i64>,
    /// Width after the aspect-preserving resize, before the crop.
    pub resized_w: Option<i64>,
    /// Height after the aspect-preserving resize, before the crop.
    pub resized_h: Option<i64>,
    /// Crop offset from the top in original pixels.
    pub crop_top: Option<i64>,
    /// Crop offset from the left in original pixels.
    pub crop_left: Option<i64>,
    /// Crop offset from the top in resized pixels (SDXL `crop_coords_top_left`, as kohya/OneTrainer feed it).
    pub crop_top_resized: Option<i64>,
    /// Crop offset from the left in resized pixels.
    pub crop_left_resized: Option<i64>,
    /// Resized training image, relative to the dataset folder.
    pub bucket_path: Option<String>,
}

/// What `export` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    /// Run id.
    pub run_id: i64,
    /// Format written.
    pub format: String,
    /// Where.
    pub out: PathBuf,
    /// Rows / images written.
    pub written: usize,
    /// Ok items skipped because their image file is missing or could not
    /// be written (those of [`Self::failed`] that name an image).
    pub missing: usize,
    /// `file: reason` of each item whose image could not be written, and
    /// of each kohya `.npz` that could not be (its image is exported, and
    /// kohya encodes it).
    pub failed: Vec<String>,
    /// Ok items exported without any caption text (kohya: neither caption
    /// nor tags; hf: no caption).
    pub uncaptioned: usize,
    /// The exported file names of those items (kohya: they have no `.txt`,
    /// so the DreamBooth loader trains them on the folder's class token,
    /// and `meta_lat.json` gives them that token as their caption).
    pub uncaptioned_files: Vec<String>,
    /// Originals written as PNG of their decoded pixels (kohya / hf; see
    /// [`needs_rewrite`]).
    pub converted: usize,
    /// kohya latent cache: `.npz` files written.
    pub latents_written: usize,
    /// kohya latent cache: latents the VAE encoded in this run (mirrored
    /// ones included); the rest were in the dataset's latent cache.
    pub latents_encoded: usize,
    /// kohya latent cache: latents read from the dataset's latent cache.
    pub latents_cached: usize,
    /// kohya latent cache: exported items without a bucket image, so
    /// without a `.npz` (kohya encodes them itself).
    pub latents_unbucketed: usize,
    /// kohya latent cache: the sd-scripts flags under which kohya uses the
    /// `.npz` files ([`kohya_flags`]).
    pub kohya_flags: Option<String>,
    /// kohya latent cache: why kohya cannot use them, if it cannot.
    pub kohya_warning: Option<String>,
}

/// What the kohya export writes for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KohyaEntry {
    /// `meta_lat.json` `caption`: the chosen caption on one line.
    pub caption: String,
    /// `meta_lat.json` `tags`: the item's tags that the caption does not
    /// already hold, comma separated (kohya appends them to the caption).
    pub tags: String,
    /// The `.txt` caption: what kohya's fine-tuning loader trains on,
    /// `caption, tags`, so both loaders see the same text; empty = no file.
    pub text: String,
}

/// One line for kohya: kohya's DreamBooth loader reads only the first line
/// of a `.txt`, so line breaks become `, ` (blank lines dropped).
pub fn one_line(text: &str) -> String {
    let mut out = String::new();
    // A lone `\r` (old Mac line ends) is a line break to Python's
    // `readlines()`, which kohya reads with; `str::lines` keeps it.
    for line in text
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        if !out.is_empty() {
            out.push_str(if out.ends_with(',') { " " } else { ", " });
        }
        out.push_str(line);
    }
    out
}

/// The kohya text of one item: kohya's fine-tuning loader trains on
/// `caption + ", " + tags`, so tags already in the caption (as one of its
/// comma-separated pieces, in any spelling: `long_hair` is `Long hair`,
/// [`tag_key`]) are left out of `tags`, and nothing repeats.
pub fn kohya_entry(caption: Option<&str>, tags: Option<&str>) -> KohyaEntry {
    let caption = one_line(caption.unwrap_or(""));
    let mut seen: std::collections::HashSet<String> = caption
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(tag_key)
        .collect();
    let mut extra: Vec<&str> = Vec::new();
    for t in tags.unwrap_or("").split(',').map(str::trim) {
        if !t.is_empty() && seen.insert(tag_key(t)) {
            extra.push(t);
        }
    }
    let tags = extra.join(", ");
    let text = match (caption.is_empty(), tags.is_empty()) {
        (_, true) => caption.clone(),
        (true, false) => tags.clone(),
        (false, false) => format!("{caption}, {tags}"),
    };
    KohyaEntry {
        caption,
        tags,
        text,
    }
}

/// The tags kohya gets besides the caption: none when the caption policy
/// wrote the caption (it already chose which tags to keep, and dropped
/// `--undesired` ones and the original side of `--replace` on purpose: the
/// bundled trainer trains on that caption alone, and so should kohya);
/// otherwise the item's tags.
fn kohya_tags(r: &ExportRow) -> Option<&str> {
    if r.caption_source.as_deref() == Some("policy") {
        None
    } else {
        r.tags.as_deref()
    }
}

fn caption_rank(source: &str) -> usize {
    CAPTION_PRIORITY
        .iter()
        .position(|s| *s == source)
        .unwrap_or(CAPTION_PRIORITY.len())
}

/// Read every manifest row (optionally only status ok), ordered by item id.
pub fn load_rows(m: &Manifest, only_ok: bool) -> Result<Vec<ExportRow>> {
    let conn = m.conn();
    let where_ok = if only_ok { "WHERE i.status = 'ok'" } else { "" };
    let sql = format!(
        "SELECT i.id, i.sha256, i.path, i.source, i.status, i.reason, i.width, i.height, i.format,
                g.prompt, g.negative, g.seed, g.steps, g.sampler, g.cfg, g.model_hash,
                h.phash, h.dhash, d.cluster_id, d.keeper_id,
                b.bucket_w, b.bucket_h, b.resized_w, b.resized_h, b.crop_top, b.crop_left,
                b.crop_top_resized, b.crop_left_resized, b.path, g.schedule
         FROM items i
         LEFT JOIN generation g ON g.item_id = i.id
         LEFT JOIN hashes h ON h.item_id = i.id
         LEFT JOIN duplicates d ON d.item_id = i.id
         LEFT JOIN buckets b ON b.item_id = i.id
         {where_ok} ORDER BY i.id"
    );
    let mut st = conn.prepare(&sql).map_err(|e| m.err(e))?;
    let mut rows: Vec<ExportRow> = st
        .query_map([], |r| {
            let hexh = |v: Option<i64>| v.map(|x| format!("{:016x}", x as u64));
            Ok(ExportRow {
                item_id: r.get(0)?,
                sha256: r.get(1)?,
                path: r.get(2)?,
                source: r.get(3)?,
                status: r.get(4)?,
                reason: r.get(5)?,
                width: r.get(6)?,
                height: r.get(7)?,
                format: r.get(8)?,
                prompt: r.get(9)?,
                negative: r.get(10)?,
                seed: r.get(11)?,
                steps: r.get(12)?,
                sampler: r.get(13)?,
                cfg: r.get(14)?,
                model_hash: r.get(15)?,
                phash: hexh(r.get(16)?),
                dhash: hexh(r.get(17)?),
                cluster_id: r.get(18)?,
                keeper_id: r.get(19)?,
                bucket_w: r.get(20)?,
                bucket_h: r.get(21)?,
                resized_w: r.get(22)?,
                resized_h: r.get(23)?,
                crop_top: r.get(24)?,
                crop_left: r.get(25)?,
                crop_top_resized: r.get(26)?,
                crop_left_resized: r.get(27)?,
                bucket_path: r.get(28)?,
                schedule: r.get(29)?,
                ..Default::default()
            })
        })
        .map_err(|e| m.err(e))?
        .collect::<rusqlite::Result<_>>()
        .map_err(|e| m.err(e))?;
    // Captions and tags, merged in one pass each.
    let index: BTreeMap<i64, usize> = rows
        .iter()
        .enumerate()
        .map(|(k, r)| (r.item_id, k))
        .collect();
    let mut st = conn
        .prepare(&format!(
            // A caption dedupe carried to an item that has a sidecar of its
            // own (added by import after the carry) is not its to train on.
            "SELECT c.item_id, c.source, c.text FROM captions c
             WHERE NOT (c.source = '{carried}' AND EXISTS (
                 SELECT 1 FROM captions o WHERE o.item_id = c.item_id AND o.source IN ({written})))",
            carried = crate::stages::dedupe::CARRIED_CAPTION_SOURCE,
            written = crate::stages::dedupe::keeper::written_sql()
        ))
        .map_err(|e| m.err(e))?;
    let caps = st
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(|e| m.err(e))?;
    for c in caps {
        let (id, source, text) = c.map_err(|e| m.err(e))?;
        if let Some(&k) = index.get(&id) {
            let row = &mut rows[k];
            let better = match &row.caption_source {
                None => true,
                Some(cur) => {
                    (caption_rank(&source), source.as_str()) < (caption_rank(cur), cur.as_str())
                }
            };
            if better {
                // An imported A1111 prompt trains as its words, not its syntax.
                row.caption = Some(if source == "a1111_prompt" {
                    crate::models::sdxl::prompt::clean_prompt(&text)
                } else {
                    text
                });
                row.caption_source = Some(source);
            }
        }
    }
    // Scored (tagger) tags first, most confident first; then each unscored
    // source's tags in the order it wrote them (`pos`); rows from before
    // the `pos` column last, by name.
    let mut st = conn
        .prepare(
            "SELECT item_id, tag FROM tags
             ORDER BY item_id, score IS NULL, score DESC, source, pos IS NULL, pos, tag",
        )
        .map_err(|e| m.err(e))?;
    let tags = st
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(|e| m.err(e))?;
    // Sources spell tags their own way (a sidecar's `long_hair`, the
    // tagger's `long hair`): one of each, by key; rows come by item.
    let mut keys: (i64, std::collections::HashSet<String>) = (i64::MIN, Default::default());
    for t in tags {
        let (id, tag) = t.map_err(|e| m.err(e))?;
        if let Some(&k) = index.get(&id) {
            if keys.0 != id {
                keys = (id, Default::default());
            }
            if !keys.1.insert(tag_key(&tag)) {
                continue;
            }
            let row = &mut rows[k];
            match &mut row.tags {
                Some(s) => {
                    s.push_str(", ");
                    s.push_str(&tag);
                }
                None => row.tags = Some(tag),
            }
        }
    }
    Ok(rows)
}

/// Refuse a config that cannot be exported, before anything is loaded or
/// written; returns the output path.
pub fn check(cfg: &ExportConfig, root: &Path) -> Result<PathBuf> {
    match (&cfg.latents, cfg.format) {
        (None, _) if cfg.flip_latents => {
            return Err(Error::config(
                "export --flip-latents: the mirrored latents are part of the latent cache; add --latents MODEL",
            ))
        }
        (Some(_), f) if f != ExportFormat::Kohya => {
            return Err(Error::config(format!(
                "export --latents: only the kohya format has a latent cache, not {}; use --format kohya",
                f.name()
            )))
        }
        _ => {}
    }
    if cfg.format == ExportFormat::Kohya && cfg.repeats == 0 {
        return Err(Error::config(
            "export --repeats 0: kohya skips a folder with fewer than 1 repeat; use 1 or more",
        ));
    }
    // The concept name is one folder name (`<repeats>_<name>`), not a path.
    if cfg.format == ExportFormat::Kohya
        && (cfg.name.trim().is_empty()
            || cfg.name.contains(['/', '\\', '\0'])
            || cfg.name == "."
            || cfg.name == "..")
    {
        return Err(Error::config(format!(
            "export --name {:?}: the kohya concept name is part of one folder name; use a plain name such as `eps2v` (no slashes)",
            cfg.name
        )));
    }
    let out = match &cfg.out {
        Some(p) => p.clone(),
        None => match cfg.format {
            ExportFormat::Kohya | ExportFormat::Hf => root.join("exports").join(cfg.format.name()),
            ExportFormat::Parquet => root.join("exports").join("manifest.parquet"),
            ExportFormat::Jsonl => root.join("exports").join("manifest.jsonl"),
        },
    };
    // One table format written under the other's name.
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let clash = match (cfg.format, ext.as_deref()) {
        (ExportFormat::Parquet, Some("jsonl" | "json")) => Some("JSON lines"),
        (ExportFormat::Jsonl, Some("parquet")) => Some("Parquet"),
        _ => None,
    };
    if let Some(what) = clash {
        return Err(Error::config(format!(
            "export --format {} --out {}: the name says {what}; name it for the format (.{})",
            cfg.format.name(),
            out.display(),
            if cfg.format == ExportFormat::Parquet {
                "parquet"
            } else {
                "jsonl"
            }
        )));
    }
    check_replaceable(&out, cfg.format, cfg.out.is_none())?;
    Ok(out)
}

/// Run the export stage (without a latent cache: [`run_with`] takes the VAE).
pub fn run(cfg: &ExportConfig, m: &mut Manifest, ctx: &Ctx) -> Result<ExportReport> {
    run_with(cfg, m, ctx, None)
}

/// Run the export stage; `vae` writes kohya's latent cache
/// ([`ExportConfig::latents`], loaded by the caller before anything is
/// written).
pub fn run_with(
    cfg: &ExportConfig,
    m: &mut Manifest,
    ctx: &Ctx,
    vae: Option<&LatentSource>,
) -> Result<ExportReport> {
    let out = check(cfg, m.root())?;
    let vae = match (&cfg.latents, vae) {
        (Some(p), None) => {
            return Err(Error::config(format!(
                "export --latents {}: the VAE was not loaded (a caller of run_with passes it)",
                p.display()
            )))
        }
        (Some(_), Some(v)) => Some(v),
        (None, _) => None,
    };
    let root = m.root().to_path_buf();
    // Ctrl-C / SIGTERM: stop between files, drop the half-written staging
    // folder and leave the previous export as it was.
    let _signals = crate::signal::install();
    crate::manifest::stage_run(m, "export", cfg, |m, run_id| {
        let mut report = ExportReport {
            run_id,
            format: cfg.format.name().into(),
            out: out.clone(),
            ..Default::default()
        };
        let staged = Staged::new(&out)?;
        match cfg.format {
            ExportFormat::Parquet | ExportFormat::Jsonl => {
                let rows = load_rows(m, false)?;
                if cfg.format == ExportFormat::Parquet {
                    write_parquet(&rows, &staged.tmp)?;
                } else {
                    write_jsonl(&rows, &staged.tmp)?;
                }
                report.written = rows.len();
            }
            ExportFormat::Kohya | ExportFormat::Hf => {
                let rows = load_rows(m, true)?;
                // Encoded first, into the dataset's latent cache: a killed
                // export keeps them, and the folder below is written whole.
                let prepared = match vae {
                    Some(v) => Some(latents::prepare(
                        m,
                        &rows,
                        v,
                        cfg.flip_latents,
                        run_id,
                        ctx,
                    )?),
                    None => None,
                };
                if let Some(p) = &prepared {
                    report.latents_encoded = p.encoded;
                    report.latents_cached = p.cached;
                }
                let img_dir = if cfg.format == ExportFormat::Kohya {
                    staged.tmp.join(format!("{}_{}", cfg.repeats, cfg.name))
                } else {
                    staged.tmp.join("train")
                };
                fs::create_dir_all(&img_dir).at(&img_dir)?;
                let pb = ctx.bar(rows.len() as u64, "export");
                let mut npz_buckets = Vec::new();
                let mut meta = serde_json::Map::new();
                let mut jsonl = String::new();
                for (k, r) in rows.iter().enumerate() {
                    if ctx.should_stop() {
                        pb.finish_and_clear();
                        staged.discard();
                        return Err(Error::Interrupted(format!(
                            "export: stopped after {k} of {} files; {} is as it was (nothing half-written is left); rerun the same command to export",
                            rows.len(),
                            out.display()
                        )));
                    }
                    pb.inc(1);
                    let src_rel = r.bucket_path.as_ref().or(r.path.as_ref());
                    let Some(src_rel) = src_rel else {
                        report.missing += 1;
                        continue;
                    };
                    let src = root.join(src_rel);
                    if !src.is_file() {
                        report.missing += 1;
                        continue;
                    }
                    let stem = r.sha256[..16.min(r.sha256.len())].to_string();
                    // An original (never bucketed) that trainers would read
                    // otherwise than we do goes out as the pixels we decoded.
                    let rewrite =
                        r.bucket_path.is_none() && needs_rewrite(&src, r.format.as_deref());
                    let file_name = if rewrite {
                        let file_name = format!("{stem}.png");
                        // One item's failure is its own: said, and the
                        // export goes on.
                        if let Err(e) = write_decoded_png(&src, &img_dir.join(&file_name)) {
                            report.missing += 1;
                            report.failed.push(format!("{}: {e}", src.display()));
                            continue;
                        }
                        report.converted += 1;
                        file_name
                    } else {
                        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("png");
                        let file_name = format!("{stem}.{ext}");
                        link_or_copy(&src, &img_dir.join(&file_name))?;
                        file_name
                    };
                    let caption = r.caption.clone().unwrap_or_default();
                    // The exported file's size: the bucket when bucketed, else the original.
                    let (tw, th) = match (r.bucket_w, r.bucket_h) {
                        (Some(w), Some(h)) => (w, h),
                        _ => (r.width.unwrap_or(0), r.height.unwrap_or(0)),
                    };
                    if cfg.format == ExportFormat::Kohya {
                        let mut k = kohya_entry(r.caption.as_deref(), kohya_tags(r));
                        if k.text.is_empty() {
                            // No `.txt`: the DreamBooth loader trains it on
                            // the folder's class token (an empty `.txt`
                            // stops it), and `meta_lat.json` says the same,
                            // where the fine-tuning loader would take an
                            // empty prompt.
                            report.uncaptioned += 1;
                            report.uncaptioned_files.push(file_name.clone());
                            k.caption = cfg.name.clone();
                        } else {
                            let txt = img_dir.join(format!("{stem}.txt"));
                            fs::write(&txt, format!("{}\n", k.text)).at(&txt)?;
                        }
                        let mut entry = serde_json::Map::new();
                        if !k.caption.is_empty() {
                            entry.insert("caption".into(), k.caption.into());
                        }
                        if !k.tags.is_empty() {
                            entry.insert("tags".into(), k.tags.into());
                        }
                        entry.insert("image_size".into(), serde_json::json!([tw, th]));
                        entry.insert("train_resolution".into(), serde_json::json!([tw, th]));
                        meta.insert(file_name.clone(), serde_json::Value::Object(entry));
                        if let Some(p) = &prepared {
                            match p.write(&root, r, &img_dir.join(format!("{stem}.npz"))) {
                                latents::Outcome::Written => {
                                    report.latents_written += 1;
                                    npz_buckets.push((tw as u32, th as u32));
                                }
                                latents::Outcome::Unbucketed => report.latents_unbucketed += 1,
                                // The image is exported; kohya encodes it.
                                latents::Outcome::Failed(why) => {
                                    report.failed.push(format!("{stem}.npz: {why}"))
                                }
                            }
                        }
                    } else {
                        if caption.trim().is_empty() {
                            report.uncaptioned += 1;
                            report.uncaptioned_files.push(file_name.clone());
                        }
                        // One type per column, never null: `datasets`
                        // takes the column types from the first rows of
                        // the file, and a null column there fails the
                        // later rows. No tags is ""; an item that was not
                        // bucketed is its uncropped original, crop (0, 0).
                        let line = serde_json::json!({
                            "file_name": file_name,
                            "text": caption,
                            "tags": r.tags.clone().unwrap_or_default(),
                            "width": r.width,
                            "height": r.height,
                            "train_width": tw,
                            "train_height": th,
                            "crop_top_resized": r.crop_top_resized.unwrap_or(0),
                            "crop_left_resized": r.crop_left_resized.unwrap_or(0),
                            "sha256": r.sha256,
                        });
                        jsonl.push_str(&serde_json::to_string(&line)?);
                        jsonl.push('\n');
                    }
                    report.written += 1;
                }
                pb.finish_and_clear();
                npz_buckets.sort_unstable();
                npz_buckets.dedup();
                if let Some((flags, problem)) = latents::kohya_flags(&npz_buckets) {
                    report.kohya_flags = Some(flags);
                    report.kohya_warning = problem;
                }
                if cfg.format == ExportFormat::Kohya {
                    let p = staged.tmp.join("meta_lat.json");
                    fs::write(&p, serde_json::to_vec_pretty(&meta)?).at(&p)?;
                } else {
                    let p = img_dir.join("metadata.jsonl");
                    fs::write(&p, jsonl).at(&p)?;
                }
                // What lets a later export replace this folder whole.
                let p = staged.tmp.join(EXPORT_MARK);
                fs::write(
                    &p,
                    format!("eps2v export run {run_id}, format {}\n", cfg.format.name()),
                )
                .at(&p)?;
            }
        }
        staged.commit()?;
        Ok(report)
    })
}

#[cfg(test)]
#[path = "export_tests.rs"]
mod tests;
