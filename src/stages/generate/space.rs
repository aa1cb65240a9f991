//! Will the images fit? Before rendering, the PNGs still to write are
//! estimated and set against the free space of the dataset's file system
//! (the train stage does the same for its checkpoints, [`crate::train::disk`]).
//!
//! The size per pixel is measured on up to [`SAMPLE`] images this dataset
//! already holds from `generate` (their files against their sizes), else
//! [`DEFAULT_BYTES_PER_PIXEL`]. A shortfall is a warning, not an error:
//! free space changes, and a full disk stops the stage at the image it
//! cannot write with the batches already committed kept and the run row
//! saying why; the rerun goes on once there is room.

use std::path::Path;

use crate::manifest::Manifest;
use crate::train::disk::gb;
use crate::Result;

/// Generated images measured for the estimate (the newest).
pub const SAMPLE: usize = 64;

/// Bytes per pixel of a generated PNG when none is on disk yet. SDXL
/// renders at 1024² are about 1.3–2 MB as PNG (8-bit RGB, `image`'s
/// default compression), 1.2–1.9 bytes per pixel; the upper end, so the
/// estimate errs towards warning.
pub const DEFAULT_BYTES_PER_PIXEL: f64 = 1.9;

/// Bytes per pixel of the newest generated images on disk, with how many
/// were measured; `None` when there are none.
pub fn measured_bytes_per_pixel(m: &Manifest) -> Result<Option<(f64, usize)>> {
    let mut st = m
        .conn()
        .prepare(
            "SELECT path, width, height FROM items \
             WHERE source = 'generate' AND path IS NOT NULL AND width > 0 AND height > 0 \
             ORDER BY id DESC LIMIT ?1",
        )
        .map_err(|e| m.err(e))?;
    let rows: Vec<(String, i64, i64)> = st
        .query_map([SAMPLE as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(|e| m.err(e))?
        .collect::<rusqlite::Result<_>>()
        .map_err(|e| m.err(e))?;
    let (mut bytes, mut pixels, mut n) = (0u64, 0u64, 0usize);
    for (path, w, h) in rows {
        // Files removed by hand are skipped, not an error.
        if let Ok(meta) = std::fs::metadata(m.root().join(&path)) {
            bytes += meta.len();
            pixels += (w * h) as u64;
            n += 1;
        }
    }
    Ok((pixels > 0).then(|| (bytes as f64 / pixels as f64, n)))
}

/// What the images still to render will take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    /// Images still to render.
    pub images: u64,
    /// Their pixels, summed.
    pub pixels: u64,
    /// Bytes per pixel used.
    pub bytes_per_pixel: f64,
    /// Images it was measured on (0: [`DEFAULT_BYTES_PER_PIXEL`]).
    pub measured_on: usize,
}

impl Need {
    /// The estimate, bytes.
    pub fn bytes(&self) -> u64 {
        (self.pixels as f64 * self.bytes_per_pixel).ceil() as u64
    }
}

/// A warning when `need` does not fit in `free` bytes on `dir`'s file
/// system (`None` free: cannot be told, no warning).
pub fn shortfall(need: &Need, dir: &Path, free: Option<u64>) -> Option<String> {
    let have = free?;
    let want = need.bytes();
    (need.images > 0 && have < want).then(|| {
        let per = want / need.images.max(1);
        let how = if need.measured_on > 0 {
            format!("measured on the {} images already here", need.measured_on)
        } else {
            "estimated; none rendered yet".to_string()
        };
        format!(
            "{}: the {} images still to render need about {} ({} each, {how}), but {} is free; \
             free space there, render fewer (--count), or split the plan into shards on other disks (--shard)",
            dir.display(),
            need.images,
            gb(want),
            gb(per),
            gb(have)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_disk_names_the_sizes_and_what_to_do() {
        let need = Need {
            images: 10_000,
            pixels: 10_000 * 1024 * 1024,
            bytes_per_pixel: DEFAULT_BYTES_PER_PIXEL,
            measured_on: 0,
        };
        // 10,000 SDXL images: about 20 GB.
        assert_eq!(need.bytes(), 19_922_944_000);
        let w = shortfall(&need, Path::new("/data/ds"), Some(5_000_000_000)).unwrap();
        for part in [
            "/data/ds: the 10000 images",
            "about 19.9 GB",
            "2.0 MB each",
            "none rendered yet",
            "5.0 GB is free",
            "--shard",
        ] {
            assert!(w.contains(part), "{part:?} not in {w}");
        }
        assert_eq!(
            shortfall(&need, Path::new("/d"), Some(20_000_000_000)),
            None
        );
        assert_eq!(shortfall(&need, Path::new("/d"), None), None);
        let done = Need {
            images: 0,
            pixels: 0,
            ..need
        };
        assert_eq!(shortfall(&done, Path::new("/d"), Some(0)), None);
    }
}
