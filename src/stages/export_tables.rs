//! The table formats of `eps2v export`: every manifest row as JSON lines
//! or as Parquet (through polars), each synced before the export's rename.

use std::fs;
use std::path::Path;

use super::ExportRow;
use crate::error::{Error, IoContext, Result};

/// Whether the file at `out` is an earlier table export of `format`: a
/// Parquet file with the export's required columns (`item_id`, `sha256`,
/// `status`), or JSON lines whose first row starts as the export writes
/// one (`{"item_id":`, fields in struct order), or nothing but white
/// space. Anything else is not replaced. An unreadable file is an error.
pub fn is_table_export(out: &Path, format: super::ExportFormat) -> Result<bool> {
    use std::io::Read;
    const REQUIRED: [&str; 3] = ["item_id", "sha256", "status"];
    let f = fs::File::open(out).at(out)?;
    if format == super::ExportFormat::Parquet {
        use polars::prelude::*;
        return Ok(ParquetReader::new(f)
            .schema()
            .is_ok_and(|s| REQUIRED.iter().all(|c| s.contains(c))));
    }
    let mut head = Vec::new();
    f.take(64 << 10).read_to_end(&mut head).at(out)?;
    let start = head.iter().position(|b| !b.is_ascii_whitespace());
    Ok(match start {
        Some(i) => head[i..].starts_with(br#"{"item_id":"#),
        None => fs::metadata(out).at(out)?.len() <= head.len() as u64,
    })
}

/// Write rows as JSON lines.
pub fn write_jsonl(rows: &[ExportRow], out: &Path) -> Result<()> {
    use std::io::Write;
    let f = fs::File::create(out).at(out)?;
    let mut w = std::io::BufWriter::new(f);
    for r in rows {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n").at(out)?;
    }
    w.into_inner()
        .map_err(|e| Error::io(out, e.into_error()))?
        .sync_all()
        .at(out)
}

/// Write rows as Parquet through polars.
pub fn write_parquet(rows: &[ExportRow], out: &Path) -> Result<()> {
    use polars::prelude::*;
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    let cols = vec![
        col!("item_id", |r| r.item_id),
        col!("sha256", |r| r.sha256.clone()),
        col!("path", |r| r.path.clone()),
        col!("source", |r| r.source.clone()),
        col!("status", |r| r.status.clone()),
        col!("reason", |r| r.reason.clone()),
        col!("width", |r| r.width),
        col!("height", |r| r.height),
        col!("format", |r| r.format.clone()),
        col!("caption", |r| r.caption.clone()),
        col!("caption_source", |r| r.caption_source.clone()),
        col!("tags", |r| r.tags.clone()),
        col!("prompt", |r| r.prompt.clone()),
        col!("negative", |r| r.negative.clone()),
        col!("seed", |r| r.seed),
        col!("steps", |r| r.steps),
        col!("sampler", |r| r.sampler.clone()),
        col!("schedule", |r| r.schedule.clone()),
        col!("cfg", |r| r.cfg),
        col!("model_hash", |r| r.model_hash.clone()),
        col!("phash", |r| r.phash.clone()),
        col!("dhash", |r| r.dhash.clone()),
        col!("cluster_id", |r| r.cluster_id),
        col!("keeper_id", |r| r.keeper_id),
        col!("bucket_w", |r| r.bucket_w),
        col!("bucket_h", |r| r.bucket_h),
        col!("resized_w", |r| r.resized_w),
        col!("resized_h", |r| r.resized_h),
        col!("crop_top", |r| r.crop_top),
        col!("crop_left", |r| r.crop_left),
        col!("crop_top_resized", |r| r.crop_top_resized),
        col!("crop_left_resized", |r| r.crop_left_resized),
        col!("bucket_path", |r| r.bucket_path.clone()),
    ];
    let mut df = DataFrame::new(cols).map_err(|e| Error::Other(format!("parquet: {e}")))?;
    let mut f = fs::File::create(out).at(out)?;
    ParquetWriter::new(&mut f)
        .finish(&mut df)
        .map_err(|e| Error::Other(format!("{}: parquet write: {e}", out.display())))?;
    f.sync_all().at(out)
}
