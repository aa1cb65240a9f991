//! Where an export writes: its output replaced whole through a staged
//! sibling, refused when it holds something else, and the image files
//! (hard links, or a PNG of the decoded pixels where trainers would read
//! the original otherwise).

use std::fs;
use std::path::{Path, PathBuf};

use super::ExportFormat;
use crate::error::{Error, IoContext, Result};

/// Whether an original (an item never bucketed) must be exported as the
/// pixels import decoded rather than as its file: sd-scripts' loader
/// applies no EXIF orientation (a rotated photo trains sideways, and
/// squashed: its recorded size is the displayed one), drops alpha with
/// `convert("RGB")` (whatever colour the transparent pixels hold) where
/// import composites on white, clips 16-bit greys, and skips GIF / TIFF /
/// BMP files in a DreamBooth folder. PNG, JPEG and WebP files with none of
/// these are linked as they are. Reads the header only; a file it cannot read is rewritten (the
/// decode then says what is wrong).
pub fn needs_rewrite(path: &Path, format: Option<&str>) -> bool {
    if !matches!(format, Some("png" | "jpeg" | "webp")) {
        return true;
    }
    use image::ImageDecoder;
    let header = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(image::ImageError::IoError)
        .and_then(|r| r.into_decoder());
    match header {
        Ok(mut d) => {
            let rotated = d
                .orientation()
                .is_ok_and(|o| o != image::metadata::Orientation::NoTransforms);
            let ct = d.color_type();
            // 16-bit: PIL opens a 16-bit grey PNG as "I;16", which
            // convert("RGB") clips to white.
            let wide = ct.bytes_per_pixel() > ct.channel_count();
            rotated || ct.has_alpha() || wide
        }
        Err(_) => true,
    }
}

/// The file inside a folder export that marks it as one (and so as
/// replaceable by the next export).
pub const EXPORT_MARK: &str = ".eps2v-export";

/// An export replaces its output whole: refuse an `--out` that holds
/// something else — a folder that is not an earlier export (a kohya
/// `train_data_dir` with other concepts, a user's folder), or a folder where
/// a file goes and the other way round. The default place under the
/// dataset is the export's own.
pub(super) fn check_replaceable(out: &Path, format: ExportFormat, default_out: bool) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(out) else {
        return Ok(());
    };
    let folder_format = matches!(format, ExportFormat::Kohya | ExportFormat::Hf);
    let what = if meta.is_dir() { "a folder" } else { "a file" };
    if meta.is_dir() != folder_format {
        return Err(Error::config(format!(
            "export --out {}: it is {what}, and a {} export is {}; choose another --out",
            out.display(),
            format.name(),
            if folder_format { "a folder" } else { "a file" }
        )));
    }
    if !folder_format {
        // A file of the format's own kind is an earlier export; anything
        // else (the dataset's manifest.sqlite given by mistake) is not
        // replaced.
        let ext = out
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let own = match format {
            ExportFormat::Jsonl => matches!(ext.as_str(), "jsonl" | "ndjson" | "json"),
            _ => ext == "parquet",
        };
        if own {
            if super::tables::is_table_export(out, format)? {
                return Ok(());
            }
            return Err(Error::config(format!(
                "export --out {}: the file exists and is not an earlier eps2v {} export (no item_id / sha256 / status columns); an export replaces its file, so choose another --out",
                out.display(),
                format.name()
            )));
        }
        return Err(Error::config(format!(
            "export --out {}: the file exists and is not a .{} file; an export replaces its file, so choose another --out",
            out.display(),
            if format == ExportFormat::Jsonl { "jsonl" } else { "parquet" }
        )));
    }
    if default_out || out.join(EXPORT_MARK).is_file() {
        return Ok(());
    }
    let empty = fs::read_dir(out).at(out)?.next().is_none();
    if empty {
        return Ok(());
    }
    Err(Error::config(format!(
        "export --out {}: the folder exists and is not an earlier eps2v export (no {EXPORT_MARK} in it); an export replaces its folder whole, so choose a new --out (e.g. a subfolder: kohya's --train_data_dir may hold several <repeats>_<name> folders, one per export)",
        out.display()
    )))
}

/// A temporary sibling of `final_path` that is renamed over it on commit.
pub(super) struct Staged {
    pub(super) tmp: PathBuf,
    final_path: PathBuf,
}

impl Staged {
    pub(super) fn new(final_path: &Path) -> Result<Self> {
        let parent = crate::atomic::parent_of(final_path);
        fs::create_dir_all(parent).at(parent)?;
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        // An export killed between its two renames of a folder left the
        // previous export aside and nothing in its place: put it back.
        let old = set_aside(final_path);
        if !final_path.exists() && old.exists() {
            fs::rename(&old, final_path).at(final_path)?;
        }
        // Sweep what killed exports left (`.<name>.tmp-<pid>` of any pid);
        // only one export writes a dataset at a time (the writer lock).
        let stale = format!(".{name}.tmp-");
        for entry in fs::read_dir(parent).at(parent)? {
            let entry = entry.at(parent)?;
            if entry.file_name().to_string_lossy().starts_with(&stale) {
                remove_any(&entry.path())?;
            }
        }
        let tmp = parent.join(format!("{stale}{}", std::process::id()));
        Ok(Self {
            tmp,
            final_path: final_path.to_path_buf(),
        })
    }

    /// Remove the temporary sibling (best effort: a leftover is swept by
    /// the next export anyway).
    pub(super) fn discard(self) {
        if self.tmp.exists() {
            let _ = remove_any(&self.tmp);
        }
    }

    pub(super) fn commit(self) -> Result<()> {
        if !self.final_path.is_dir() {
            // A file (or nothing) there: one atomic rename replaces it.
            return fs::rename(&self.tmp, &self.final_path).at(&self.final_path);
        }
        // A folder cannot be renamed over a non-empty one: set the old one
        // aside first ([`Staged::new`] puts it back after a kill in between).
        let old = set_aside(&self.final_path);
        if old.exists() {
            remove_any(&old)?;
        }
        fs::rename(&self.final_path, &old).at(&self.final_path)?;
        fs::rename(&self.tmp, &self.final_path).at(&self.final_path)?;
        remove_any(&old)
    }
}

/// Where [`Staged::commit`] sets a previous export folder aside:
/// `.<name>.old-export` beside it (the whole name, so `set.v1` and
/// `set.v2` never share one, and hidden, so no folder of the user's is
/// taken for it).
fn set_aside(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    final_path.with_file_name(format!(".{name}.old-export"))
}

fn remove_any(p: &Path) -> Result<()> {
    if p.is_dir() {
        fs::remove_dir_all(p).at(p)
    } else {
        fs::remove_file(p).at(p)
    }
}

/// Hard-link `src` to `dst`, or copy when linking is impossible.
pub(super) fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    if fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst).at(dst)?;
    }
    Ok(())
}

/// Write the pixels import decodes from `src` as a PNG at `dst` (see
/// [`needs_rewrite`]).
pub(super) fn write_decoded_png(src: &Path, dst: &Path) -> Result<()> {
    let bytes = fs::read(src).at(src)?;
    let accepted = crate::imaging::decode::DecodeLimits::accepted();
    let d = crate::imaging::decode::decode(&bytes, &accepted)
        .map_err(|e| Error::Other(format!("{}: {e}", src.display())))?;
    let png = crate::stages::bucket::encode_png_fast(&d.rgb)?;
    fs::write(dst, png).at(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a file export replaced any existing `--out`, the
    /// dataset's own manifest included; only a file of its kind is.
    #[test]
    fn a_file_export_replaces_only_a_file_of_its_kind() {
        let d = tempfile::tempdir().unwrap();
        for name in ["manifest.sqlite", "rows.jsonl", "rows.parquet", "notes"] {
            fs::write(d.path().join(name), "x").unwrap();
        }
        let check = |name: &str, f| check_replaceable(&d.path().join(name), f, false);
        let e = check("manifest.sqlite", ExportFormat::Parquet)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a .parquet file"), "{e}");
        assert!(check("notes", ExportFormat::Jsonl).is_err());
        assert!(check("rows.jsonl", ExportFormat::Parquet).is_err());
        // Of its kind by name but not by content ("x"): not replaced.
        let e = check("rows.jsonl", ExportFormat::Jsonl)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an earlier eps2v jsonl export"), "{e}");
        assert!(check("rows.parquet", ExportFormat::Parquet).is_err());
        // An earlier export's first line, or an empty one, is.
        fs::write(
            d.path().join("rows.jsonl"),
            "{\"item_id\":1,\"sha256\":\"ab\",\"status\":\"ok\"}\n",
        )
        .unwrap();
        check("rows.jsonl", ExportFormat::Jsonl).unwrap();
        fs::write(d.path().join("empty.jsonl"), "").unwrap();
        check("empty.jsonl", ExportFormat::Jsonl).unwrap();
        // A user's file that starts with a blank line is still theirs.
        fs::write(d.path().join("blank.jsonl"), "\n{\"prompt\":\"x\"}\n").unwrap();
        assert!(check("blank.jsonl", ExportFormat::Jsonl).is_err());
        check("new.parquet", ExportFormat::Parquet).unwrap();
        // An earlier Parquet export (no rows) is replaced.
        super::super::tables::write_parquet(&[], &d.path().join("old.parquet")).unwrap();
        check("old.parquet", ExportFormat::Parquet).unwrap();
    }
}
