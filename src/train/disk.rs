//! Disk-space check at the start of each training stage: what the run
//! will write at its peak against what the file systems have free, so that
//! a run that cannot fit says so before hours of training rather than at
//! its first checkpoint or its export.
//!
//! The peak is the checkpoint series ([`super::state::save`] keeps the two
//! newest, and writes the next beside them before removing the oldest:
//! three at once; with `--stop-below` the `good-` series adds two more)
//! plus the export (the whole base model at `save_dtype`). A checkpoint
//! holds the f32 weights of every block trained so far, their AdamW
//! moments and their EMA: for the whole SDXL UNet (2.57 G parameters)
//! about 31 GB (41 GB with EMA), so the peak is near 100 GB (130 GB) —
//! easy to miss when one plans for a 7 GB model. Checkpoints already in the run folder count as
//! written. A shortfall is a warning, not an error: free space can change,
//! and a full disk while saving keeps the previous checkpoint anyway.

use std::path::Path;

use crate::models::sdxl::checkpoint::Checkpoint;

/// What a training run writes at its peak, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// One checkpoint of the current stage.
    pub checkpoint: u64,
    /// Checkpoints on disk at once at the peak.
    pub checkpoints: u64,
    /// Checkpoints of this run already on disk (bytes).
    pub existing: u64,
    /// The export.
    pub export: u64,
}

impl Need {
    /// Bytes still to be written in the run folder at the peak.
    pub fn run_dir(&self) -> u64 {
        (self.checkpoints * self.checkpoint).saturating_sub(self.existing)
    }
}

/// One checkpoint: f32 weights of every block trained so far
/// (`trained_params`), the optimizer state (`optimizer_bytes`) and the EMA
/// (`ema_params`).
pub fn checkpoint_bytes(trained_params: usize, optimizer_bytes: usize, ema_params: usize) -> u64 {
    4 * (trained_params as u64 + ema_params as u64) + optimizer_bytes as u64
}

/// The export of `base` at `dtype_bytes` per element (2 for f16 / bf16).
pub fn export_bytes(base: &Checkpoint, dtype_bytes: usize) -> u64 {
    base.entries()
        .values()
        .map(|e| (e.numel() * dtype_bytes) as u64)
        .sum()
}

/// Bytes available to this user on the file system holding `path` (or its
/// nearest existing ancestor); `None` where it cannot be told.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let p = path.ancestors().find(|p| p.exists())?;
    free_bytes_of(p)
}

#[cfg(unix)]
fn free_bytes_of(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The fields' widths differ between platforms.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes_of(_p: &Path) -> Option<u64> {
    None
}

/// The file system id of `path` (or its nearest existing ancestor).
fn device_of(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let p = path.ancestors().find(|p| p.exists())?;
        std::fs::metadata(p).ok().map(|m| m.dev())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// `b` bytes as GB (or MB below one GB), one decimal, for messages.
pub fn gb(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.1} GB", b as f64 / 1e9)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// A warning when `need` does not fit: the run folder `run_dir` and the
/// export `out` on one file system or two. `free` tells a path's free
/// bytes ([`free_bytes`]; a parameter for the tests).
pub fn shortfall(
    need: &Need,
    run_dir: &Path,
    out: &Path,
    free: &dyn Fn(&Path) -> Option<u64>,
) -> Option<String> {
    let same = match (device_of(run_dir), device_of(out)) {
        (Some(a), Some(b)) => a == b,
        _ => out.starts_with(run_dir),
    };
    let what = format!(
        "{} checkpoints of {} at once (two kept, one being written{})",
        need.checkpoints,
        gb(need.checkpoint),
        if need.checkpoints > 3 {
            ", and the --stop-below series"
        } else {
            ""
        }
    );
    let tail = "free space there, train fewer blocks (--blocks, a smaller first stage), or set --out on another disk";
    if same {
        let want = need.run_dir() + need.export;
        let have = free(run_dir)?;
        (have < want).then(|| {
            format!(
                "{}: this run needs about {} more disk ({what}, plus the {} export), but {} is free; {tail}",
                run_dir.display(),
                gb(want),
                gb(need.export),
                gb(have)
            )
        })
    } else {
        let mut short = Vec::new();
        if let Some(have) = free(run_dir).filter(|&h| h < need.run_dir()) {
            short.push(format!(
                "{}: needs about {} more ({what}), {} free",
                run_dir.display(),
                gb(need.run_dir()),
                gb(have)
            ));
        }
        if let Some(have) = free(out).filter(|&h| h < need.export) {
            short.push(format!(
                "{}: the export needs about {}, {} free",
                out.display(),
                gb(need.export),
                gb(have)
            ));
        }
        (!short.is_empty()).then(|| format!("this run may not fit: {}; {tail}", short.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need() -> Need {
        Need {
            checkpoint: 10_000_000_000,
            checkpoints: 3,
            existing: 0,
            export: 7_000_000_000,
        }
    }

    #[test]
    fn a_whole_unet_checkpoint_is_31_gb_or_41_with_ema() {
        // SDXL's UNet, 2.567 G parameters: weights and AdamW m and v, f32.
        let p = 2_567_463_684usize;
        let b = checkpoint_bytes(p, 8 * p, 0);
        assert_eq!(b, 12 * p as u64);
        assert!((30.8e9..30.9e9).contains(&(b as f64)), "{b}");
        // With EMA: 16 bytes a parameter.
        let b = checkpoint_bytes(p, 8 * p, p);
        assert!((41.0e9..41.1e9).contains(&(b as f64)), "{b}");
    }

    #[test]
    fn a_shortfall_on_one_file_system_names_the_sizes() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("runs/3");
        let out = run.join("m.safetensors");
        let n = need();
        // 30 GB of checkpoints + 7 GB export = 37 GB.
        assert_eq!(shortfall(&n, &run, &out, &|_| Some(37_000_000_000)), None);
        let w = shortfall(&n, &run, &out, &|_| Some(36_000_000_000)).unwrap();
        assert!(
            w.contains("37.0 GB more disk")
                && w.contains("3 checkpoints of 10.0 GB")
                && w.contains("7.0 GB export")
                && w.contains("36.0 GB is free")
                && w.contains(&run.display().to_string()),
            "{w}"
        );
        // Checkpoints already written count: 2 on disk, one more to come.
        let resumed = Need {
            existing: 20_000_000_000,
            ..n
        };
        assert_eq!(
            shortfall(&resumed, &run, &out, &|_| Some(17_000_000_000)),
            None
        );
        // Unknown free space: nothing to say.
        assert_eq!(shortfall(&n, &run, &out, &|_| None), None);
    }

    #[test]
    fn free_space_of_a_real_folder_is_known() {
        let d = tempfile::tempdir().unwrap();
        let f = free_bytes(&d.path().join("not/yet/made")).unwrap();
        assert!(f > 0);
    }
}
