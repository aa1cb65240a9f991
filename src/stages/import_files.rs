//! The per-file half of `import` ([`super`]): list, read, hash, decode and
//! copy one file, its sidecar captions and A1111 parameters, and the
//! atomic writes the other stages share.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::*;

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(super) fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// List image files under `from`, sorted (links followed; see
/// [`crate::stages::walk`]).
pub fn list_images(from: &Path) -> Result<Vec<PathBuf>> {
    Ok(crate::stages::walk::list_images(from)?.files)
}

/// The largest sidecar caption read (bytes); a larger file is not one.
pub const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// The kohya-style sidecars: `(extension, caption source)`.
pub(super) const SIDECARS: [(&str, &str); 2] =
    [("txt", "sidecar_txt"), ("caption", "sidecar_caption")];

/// Read the kohya-style sidecar captions of `image` (`stem.txt`, `stem.caption`).
pub fn sidecar_captions(image: &Path) -> Vec<(&'static str, String)> {
    read_sidecars(image).0
}

/// [`sidecar_captions`], and a line for each sidecar that is there but
/// could not be taken as a caption (not UTF-8/UTF-16 text, too large), so
/// that import says so instead of training the image without it.
pub fn read_sidecars(image: &Path) -> (Vec<(&'static str, String)>, Vec<Failure>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (ext, source) in SIDECARS {
        let p = image.with_extension(ext);
        // A regular file of caption size only: a link to a FIFO or a
        // device would block or never end, and a link to some large
        // unrelated file is not a caption.
        let Ok(meta) = fs::metadata(&p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.len() > MAX_SIDECAR_BYTES {
            problems.push(Failure {
                path: p,
                reason: format!(
                    "sidecar caption not read: {} bytes, over {MAX_SIDECAR_BYTES} (not a caption)",
                    meta.len()
                ),
            });
            continue;
        }
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) => {
                problems.push(Failure {
                    path: p,
                    reason: format!("sidecar caption not read: {e}"),
                });
                continue;
            }
        };
        let Some(text) = caption_text(&bytes) else {
            problems.push(Failure {
                path: p,
                reason: "sidecar caption not read: not UTF-8 (nor UTF-16 with a byte-order mark) text, e.g. an \"ANSI\" / cp1252 file; save it as UTF-8 and import again".into(),
            });
            continue;
        };
        // Windows line ends are not caption text.
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let text = text.trim();
        if !text.is_empty() {
            out.push((source, text.to_string()));
        }
    }
    (out, problems)
}

/// A sidecar's bytes as text: UTF-8 (a byte-order mark dropped: it would
/// glue itself to the first tag), or UTF-16 with its byte-order mark (what
/// Windows Notepad saves as "Unicode"); `None` for anything else.
fn caption_text(bytes: &[u8]) -> Option<String> {
    let utf16 = |b: &[u8], be: bool| -> Option<String> {
        if b.len() % 2 != 0 {
            return None;
        }
        let units = b.chunks_exact(2).map(|c| {
            if be {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        });
        char::decode_utf16(units)
            .collect::<std::result::Result<String, _>>()
            .ok()
    };
    match bytes {
        [0xFF, 0xFE, rest @ ..] => utf16(rest, false),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, true),
        _ => std::str::from_utf8(bytes)
            .ok()
            .map(|t| t.trim_start_matches('\u{feff}').to_string()),
    }
}

/// A source path as the manifest stores it (`sources.path`, unique): the
/// path itself when it is UTF-8, else with each byte that is not written
/// `\xNN`. A lossy conversion would give files whose names differ only
/// in such bytes one name, and each would replace the other.
pub fn source_key(path: &Path) -> String {
    if let Some(s) = path.to_str() {
        return s.to_string();
    }
    let mut out = String::new();
    for chunk in path.as_os_str().as_encoded_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// Relative path of an item's image: `images/ab/<sha>.<ext>`.
pub fn image_rel_path(sha: &str, ext: &str) -> String {
    format!("images/{}/{sha}.{ext}", &sha[..2])
}

/// Write `bytes` to `path` atomically (temp file in the same folder + rename);
/// an existing file is kept (content-addressed, so it is the same bytes).
pub fn write_atomic_if_absent(path: &Path, bytes: &[u8]) -> Result<()> {
    // A file of another length is not this content (a file a host crash
    // left empty after its rename reached the disk before its data).
    if fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(());
    }
    write_atomic_replace(path, bytes)
}

/// Write `bytes` to `path` atomically, replacing any existing file.
pub fn write_atomic_replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = crate::atomic::parent_of(path);
    fs::create_dir_all(dir).at(dir)?;
    crate::atomic::write(path, bytes, false)
}

/// Remove temporary files (`.tmp*`) that a killed run left under `dir`.
/// Only one curation stage writes a dataset at a time (the writer lock,
/// [`crate::manifest::WRITER_STAGES`]), so no live writer's temp file
/// is swept.
pub fn sweep_temp_files(dir: &Path) -> Result<usize> {
    sweep_temp_files_older_than(dir, std::time::Duration::ZERO)
}

/// [`sweep_temp_files`] of the temporary files last written more than
/// `age` ago (all of them for a zero `age`): for folders without a writer
/// lock, where another process may be writing its own right now.
pub fn sweep_temp_files_older_than(dir: &Path, age: std::time::Duration) -> Result<usize> {
    let mut removed = 0;
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(0);
    };
    for entry in rd {
        let entry = entry.at(dir)?;
        let p = entry.path();
        if entry.file_type().at(&p)?.is_dir() {
            removed += sweep_temp_files_older_than(&p, age)?;
        } else if entry.file_name().to_string_lossy().starts_with(".tmp") {
            let old = age.is_zero()
                || entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > age));
            if old {
                fs::remove_file(&p).at(&p)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Process one file: read, hash, decode, extract metadata, copy into the
/// dataset. Returns `Err` only when the file cannot be read at all.
pub fn process_file(root: &Path, path: &Path, limits: &DecodeLimits) -> Result<FileOutcome> {
    let meta = fs::metadata(path).at(path)?;
    let bytes = fs::read(path).at(path)?;
    let sha = sha256_hex(&bytes);
    let source = source_key(path);
    let (captions, caption_problems) = read_sidecars(path);
    let mut out = FileOutcome {
        source: path.to_path_buf(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        item: NewItem {
            sha256: sha.clone(),
            path: None,
            source,
            width: None,
            height: None,
            format: None,
            status: ItemStatus::Rejected,
            reason: None,
        },
        hashes: None,
        generation: None,
        captions,
        caption_problems,
        note: None,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match imaging::decode::decode(&bytes, limits) {
        Err(e) => {
            out.item.reason = Some(format!("{}: {}", e.reason.name(), e.message));
            out.item.format = imaging::decode::sniff_format(&bytes).map(|f| f.name().to_string());
        }
        Ok(d) => {
            let fmt = d.format;
            out.note =
                imaging::decode::extension_note(&ext, fmt).map(|n| format!("wrong_extension: {n}"));
            let file_ext = fmt.extensions().first().copied().unwrap_or("bin");
            let rel = image_rel_path(&sha, file_ext);
            write_atomic_if_absent(&root.join(&rel), &bytes)?;
            let h = imaging::hash::image_hashes(&d.rgb);
            out.hashes = Some(HashRecord {
                pixel_sha256: h.pixel_sha256,
                phash: h.phash,
                dhash: h.dhash,
            });
            out.generation = imaging::infotext::find_parameters(
                &bytes,
                fmt == imaging::decode::SourceFormat::Png,
            )
            .map(|(raw, origin)| generation_from_infotext(&raw, origin));
            out.item.path = Some(rel);
            out.item.width = Some(d.width);
            out.item.height = Some(d.height);
            out.item.format = Some(fmt.name().to_string());
            out.item.status = ItemStatus::Ok;
        }
    }
    Ok(out)
}

/// A1111's scheduler labels, longest first so that "SGM Uniform" is not
/// read as "Uniform" (`modules/sd_schedulers.py`).
const A1111_SCHEDULE_LABELS: &[&str] = &[
    "Align Your Steps GITS",
    "Align Your Steps 11",
    "Align Your Steps 32",
    "Align Your Steps",
    "Polyexponential",
    "SGM Uniform",
    "Exponential",
    "KL Optimal",
    "Uniform",
    "Karras",
    "Simple",
    "Normal",
    "Turbo",
    "DDIM",
    "Beta",
];

/// Split a pre-1.9 A1111 sampler name into sampler and schedule
/// ("DPM++ 2M Karras" → "DPM++ 2M", "Karras"), as A1111 itself does when it
/// reads one; a name without a schedule label comes back whole.
pub fn split_a1111_sampler(name: &str) -> (&str, Option<&str>) {
    let t = name.trim();
    for label in A1111_SCHEDULE_LABELS {
        if let Some(head) = t.strip_suffix(label).and_then(|h| h.strip_suffix(' ')) {
            if !head.trim().is_empty() {
                return (head.trim_end(), Some(label));
            }
        }
    }
    (t, None)
}

/// Turn a raw A1111 `parameters` text into manifest generation parameters.
pub fn generation_from_infotext(raw: &str, origin: &str) -> GenerationParams {
    let info = imaging::infotext::Infotext::parse(raw);
    let get = |k: &str| info.get(k).map(str::to_string);
    let known = [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
    ];
    let extra: serde_json::Map<String, serde_json::Value> = info
        .params
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    // A1111 before 1.9 wrote the schedule into the sampler's name
    // ("DPM++ 2M Karras"); stored split, as 1.9+ writes it, so one setting
    // is one value (the raw text keeps what was written).
    let sampler_and_schedule = match (get("Sampler"), get("Schedule type")) {
        (Some(s), None) => match split_a1111_sampler(&s) {
            (name, Some(schedule)) => (Some(name.to_string()), Some(schedule.to_string())),
            (_, None) => (Some(s), None),
        },
        other => other,
    };
    let (width, height) = get("Size")
        .and_then(|s| {
            let (w, h) = s.split_once('x')?;
            Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
        })
        .map_or((None, None), |(w, h)| (Some(w), Some(h)));
    GenerationParams {
        prompt: Some(info.prompt.clone()),
        negative: (!info.negative_prompt.is_empty()).then(|| info.negative_prompt.clone()),
        seed: get("Seed").and_then(|s| s.trim().parse().ok()),
        steps: get("Steps").and_then(|s| s.trim().parse().ok()),
        sampler: sampler_and_schedule.0,
        schedule: sampler_and_schedule.1,
        cfg: get("CFG scale").and_then(|s| s.trim().parse().ok()),
        width,
        height,
        model_hash: get("Model hash"),
        model: get("Model"),
        extra_json: (!extra.is_empty()).then(|| serde_json::Value::Object(extra).to_string()),
        raw: Some(raw.to_string()),
        origin: origin.to_string(),
    }
}
