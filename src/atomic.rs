//! Atomic file writes: the bytes go to a temporary sibling (`.tmp*`, swept
//! after a kill by [`crate::stages::import::sweep_temp_files`]), which is
//! renamed over the target, so a reader sees the old file or the new one,
//! never half of one.
//!
//! The temporary file is created with mode 0666 less the umask, as
//! `fs::write` would (`tempfile` defaults to 0600 for secrets). Dataset
//! images, buckets and the kohya export (hard links of the buckets) must
//! stay readable by a trainer running as another user or in a container.

use std::path::Path;

use tempfile::NamedTempFile;

use crate::error::{Error, IoContext, Result};

/// A temporary file in `dir`, readable as a file written with
/// `fs::write` would be.
pub fn temp_in(dir: &Path) -> Result<NamedTempFile> {
    let mut b = tempfile::Builder::new();
    b.prefix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // open(2) applies the umask to this mode.
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir).at(dir)
}

/// Write `bytes` to `path` atomically, replacing any file there; with
/// `sync`, the bytes reach the disk before the rename.
pub fn write(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    staged(path, bytes, sync)?
        .persist(path)
        .map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The folder `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether `a` and `b` name the same file (links and `..` resolved);
/// paths that cannot be resolved (missing) compare as written.
pub fn same_file(a: &Path, b: &Path) -> bool {
    // Hard links of one file are the same file too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return (x.dev(), x.ino()) == (y.dev(), y.ino());
        }
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Make `dst` a hard link of `src` (one file on disk), atomically
/// replacing what is there: a link made under a temporary name, then
/// renamed over `dst`. `Ok(false)`, nothing changed, where no link can be
/// made (another filesystem, no link support): write the bytes instead.
/// Replacing or removing `dst` later never touches `src`.
pub fn link(src: &Path, dst: &Path) -> Result<bool> {
    #[cfg(unix)]
    {
        // Already this file: a rename onto a link of the same file does
        // nothing and would leave the temporary name.
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        if id(dst).is_some() && id(dst) == id(src) {
            return Ok(true);
        }
    }
    let made = tempfile::Builder::new()
        .prefix(".tmp")
        .make_in(parent_of(dst), |p| std::fs::hard_link(src, p));
    let Ok(tmp) = made else {
        return Ok(false);
    };
    tmp.persist(dst).map_err(|e| Error::io(dst, e.error))?;
    Ok(true)
}

/// `bytes` in a temporary sibling of `path`, synced with `sync`.
fn staged(path: &Path, bytes: &[u8], sync: bool) -> Result<NamedTempFile> {
    let mut tmp = temp_in(parent_of(path))?;
    std::io::Write::write_all(&mut tmp, bytes).at(tmp.path())?;
    if sync {
        tmp.as_file().sync_all().at(path)?;
    }
    Ok(tmp)
}

/// [`write`] to `path` unless a file is there: `Ok(false)`, nothing
/// written (two processes picking one name both keep their file).
pub fn write_new(path: &Path, bytes: &[u8], sync: bool) -> Result<bool> {
    match staged(path, bytes, sync)?.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, e.error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written files get 0666 less the umask, like `fs::write`'s, not
    /// tempfile's private 0600.
    #[cfg(unix)]
    #[test]
    fn files_are_as_readable_as_fs_write_makes_them() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let atomic = d.path().join("atomic");
        write(&atomic, b"y", true).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&atomic), mode(&plain));
        assert_ne!(mode(&atomic) & 0o044, 0, "{:o}", mode(&atomic));
        assert_eq!(std::fs::read(&atomic).unwrap(), b"y");
        // Replacing keeps it atomic and leaves no temporary behind.
        write(&atomic, b"z", false).unwrap();
        assert_eq!(std::fs::read(&atomic).unwrap(), b"z");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn write_new_keeps_a_file_that_is_there() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        assert!(write_new(&p, b"first", false).unwrap());
        assert!(!write_new(&p, b"second", false).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
