//! Recursive listing of the image files under a folder, for `import`.
//!
//! Symbolic links are followed, because image folders are often made of
//! them: the Hugging Face hub cache stores every snapshot file as a link
//! into `blobs/`, and users link folders of outputs together.
//!
//! - A link to a file counts as that file, listed under the link's own path
//!   (its name carries the extension; hub blobs have none). Size and mtime
//!   are the target's.
//! - A link to a folder is walked, unless its target is the folder being
//!   walked or one of its ancestors: that is a loop, reported by path and
//!   not walked. A folder reached a second time by another way (two links
//!   to one folder) is walked once.
//! - Broken links, FIFOs, sockets and device files are skipped and counted
//!   (a FIFO named `x.png` would block a reader forever); a folder that
//!   cannot be read is reported and the walk goes on.
//!
//! Identity of a folder is its canonical path (`fs::canonicalize`), which
//! resolves every link on the way; the walk is depth-first and the result
//! sorted, so the listing is deterministic.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// File extensions considered images (case-insensitive). The content is
/// sniffed regardless; a mismatch is recorded as a note.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "jpe", "jfif", "webp", "gif", "bmp", "tif", "tiff",
];

/// Extensions of image formats eps2v does not decode: counted and named
/// by import (a folder of AVIFs was "0 files found" without a word).
pub const UNREAD_IMAGE_EXTENSIONS: &[&str] = &[
    "avif", "heic", "heif", "jxl", "jp2", "j2k", "psd", "tga", "exr", "hdr", "ico", "svg", "dng",
    "cr2", "nef", "arw",
];

/// What the walk skipped, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Links whose target does not exist (or cannot be reached).
    pub broken_links: usize,
    /// Named pipes.
    pub fifos: usize,
    /// Unix sockets.
    pub sockets: usize,
    /// Block and character devices.
    pub devices: usize,
    /// Links to a folder that is being walked (the folder itself or an
    /// ancestor): reported, not walked.
    pub loops: Vec<PathBuf>,
    /// Folders reached a second time through another link (walked once).
    pub repeated_folders: usize,
    /// Folders that could not be read: `(path, error)`.
    pub unreadable: Vec<(PathBuf, String)>,
    /// The folder left out by request (the dataset itself, when the source
    /// holds it: its images, buckets and exports are not new images).
    pub excluded: Option<PathBuf>,
    /// Files in image formats eps2v does not read
    /// ([`UNREAD_IMAGE_EXTENSIONS`]); not in [`Skipped::total`].
    pub unread_formats: usize,
    /// The first few of them.
    pub unread_examples: Vec<PathBuf>,
}

impl Skipped {
    /// Total number of skipped entries.
    pub fn total(&self) -> usize {
        self.broken_links
            + self.fifos
            + self.sockets
            + self.devices
            + self.loops.len()
            + self.repeated_folders
            + self.unreadable.len()
            + usize::from(self.excluded.is_some())
    }
}

/// The image files found under a folder and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Image files (by extension), sorted; links listed under their own path.
    pub files: Vec<PathBuf>,
    /// Entries that were not listed, by kind.
    pub skipped: Skipped,
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// What one directory entry is, after following links.
enum Kind {
    File,
    Dir,
    Fifo,
    Socket,
    Device,
    Broken,
}

fn kind_of(meta: &fs::Metadata) -> Kind {
    let ft = meta.file_type();
    if ft.is_file() {
        return Kind::File;
    }
    if ft.is_dir() {
        return Kind::Dir;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return Kind::Fifo;
        }
        if ft.is_socket() {
            return Kind::Socket;
        }
        if ft.is_block_device() || ft.is_char_device() {
            return Kind::Device;
        }
    }
    Kind::Device
}

/// List the image files under `from` (recursive, links followed with loop
/// detection); see the module docs.
pub fn list_images(from: &Path) -> Result<Listing> {
    list_images_except(from, None)
}

/// [`list_images`], leaving out the folder `except` (by canonical path)
/// wherever the walk meets it.
pub fn list_images_except(from: &Path, except: Option<&Path>) -> Result<Listing> {
    if !from.is_dir() {
        return Err(Error::config(format!(
            "{}: not a folder; pass the folder of images to import with --from",
            from.display()
        )));
    }
    let root = fs::canonicalize(from).map_err(|e| Error::io(from, e))?;
    let mut listing = Listing::default();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    seen.insert(root.clone());
    let mut ancestors = vec![root];
    let except = except.and_then(|p| fs::canonicalize(p).ok());
    if except.as_ref() == ancestors.first() {
        listing.skipped.excluded = Some(from.to_path_buf());
        return Ok(listing);
    }
    walk(
        from,
        &mut ancestors,
        &mut seen,
        except.as_deref(),
        &mut listing,
    );
    listing.files.sort();
    Ok(listing)
}

/// Walk `dir`, whose canonical path is the last of `ancestors`.
fn walk(
    dir: &Path,
    ancestors: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    except: Option<&Path>,
    out: &mut Listing,
) {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            out.skipped
                .unreadable
                .push((dir.to_path_buf(), e.to_string()));
            return;
        }
    };
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => names.push(e.path()),
            Err(e) => {
                out.skipped
                    .unreadable
                    .push((dir.to_path_buf(), e.to_string()));
                return;
            }
        }
    }
    names.sort();
    for path in names {
        // `metadata` follows links; `symlink_metadata` tells whether it is one.
        let is_link = fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        let kind = match fs::metadata(&path) {
            Ok(m) => kind_of(&m),
            Err(_) if is_link => Kind::Broken,
            Err(e) => {
                out.skipped.unreadable.push((path.clone(), e.to_string()));
                continue;
            }
        };
        match kind {
            Kind::File => {
                if has_image_extension(&path) {
                    out.files.push(path);
                } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    UNREAD_IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                }) {
                    out.skipped.unread_formats += 1;
                    if out.skipped.unread_examples.len() < 5 {
                        out.skipped.unread_examples.push(path);
                    }
                }
            }
            Kind::Dir => {
                let canon = match fs::canonicalize(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        out.skipped.unreadable.push((path.clone(), e.to_string()));
                        continue;
                    }
                };
                if except == Some(canon.as_path()) {
                    out.skipped.excluded = Some(path);
                } else if ancestors.contains(&canon) {
                    out.skipped.loops.push(path);
                } else if !seen.insert(canon.clone()) {
                    out.skipped.repeated_folders += 1;
                } else {
                    ancestors.push(canon);
                    walk(&path, ancestors, seen, except, out);
                    ancestors.pop();
                }
            }
            Kind::Fifo => out.skipped.fifos += 1,
            Kind::Socket => out.skipped.sockets += 1,
            Kind::Device => out.skipped.devices += 1,
            Kind::Broken => out.skipped.broken_links += 1,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(l: &Listing, root: &Path) -> Vec<String> {
        l.files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn follows_file_and_folder_links_like_the_hub_cache() {
        // hub layout: snapshots/<rev>/img.png -> ../../blobs/<hash>
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/rev1/sub")).unwrap();
        std::fs::write(repo.join("blobs/aaa"), b"x").unwrap();
        std::fs::write(repo.join("blobs/bbb"), b"y").unwrap();
        symlink("../../blobs/aaa", repo.join("snapshots/rev1/a.png")).unwrap();
        symlink("../../../blobs/bbb", repo.join("snapshots/rev1/sub/b.JPG")).unwrap();
        // a linked folder elsewhere
        let other = d.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("c.webp"), b"z").unwrap();
        std::fs::write(other.join("notes.md"), b"not an image").unwrap();
        symlink(&other, repo.join("snapshots/rev1/linked")).unwrap();
        let l = list_images(&repo.join("snapshots")).unwrap();
        assert_eq!(
            names(&l, &repo.join("snapshots")),
            ["rev1/a.png", "rev1/linked/c.webp", "rev1/sub/b.JPG"]
        );
        assert_eq!(l.skipped, Skipped::default());
    }

    #[test]
    fn loops_broken_links_and_fifos_are_counted_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/x.png"), b"x").unwrap();
        // Formats eps2v does not read are counted, not listed.
        std::fs::write(root.join("c.AVIF"), b"x").unwrap();
        std::fs::write(root.join("d.heic"), b"x").unwrap();
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        symlink("..", root.join("a/b/up")).unwrap(); // -> a: an ancestor
        symlink(&root, root.join("a/top")).unwrap(); // -> root: an ancestor
        symlink("missing.png", root.join("a/dangling.png")).unwrap();
        symlink("a/b", root.join("again")).unwrap(); // a/b twice: walked once
        let fifo = root.join("pipe.png");
        let st = std::process::Command::new("mkfifo").arg(&fifo).status();
        let made_fifo = st.map(|s| s.success()).unwrap_or(false);
        let l = list_images(&root).unwrap();
        assert_eq!(names(&l, &root), ["a/b/x.png"]);
        assert_eq!(l.skipped.unread_formats, 2);
        assert_eq!(l.skipped.broken_links, 1);
        assert_eq!(l.skipped.repeated_folders, 1);
        let mut loops: Vec<String> = l
            .skipped
            .loops
            .iter()
            .map(|p| {
                p.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        loops.sort();
        assert_eq!(loops, ["a/b/up", "a/top"]);
        assert_eq!(l.skipped.fifos, usize::from(made_fifo));
        assert_eq!(l.skipped.total(), 4 + usize::from(made_fifo));
    }

    /// Regression: `import ds --from .` in the folder holding `ds` took
    /// the dataset's own images, buckets and exports for new images.
    #[test]
    fn the_excepted_folder_is_left_out_however_it_is_reached() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("pics");
        std::fs::create_dir_all(src.join("ds/buckets")).unwrap();
        std::fs::write(src.join("a.png"), b"a").unwrap();
        std::fs::write(src.join("ds/buckets/b.png"), b"b").unwrap();
        symlink(src.join("ds"), src.join("again")).unwrap();
        let l = list_images_except(&src, Some(&src.join("ds"))).unwrap();
        assert_eq!(names(&l, &src), ["a.png"]);
        assert!(l.skipped.excluded.is_some());
        // The dataset as the source itself: nothing.
        let l = list_images_except(&src.join("ds"), Some(&src.join("ds"))).unwrap();
        assert!(l.files.is_empty() && l.skipped.excluded.is_some());
        // Without it, both ways in are walked (once).
        assert_eq!(list_images(&src).unwrap().files.len(), 2);
    }

    #[test]
    fn a_link_given_as_the_root_is_walked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("real")).unwrap();
        std::fs::write(d.path().join("real/i.gif"), b"g").unwrap();
        symlink(d.path().join("real"), d.path().join("link")).unwrap();
        let l = list_images(&d.path().join("link")).unwrap();
        assert_eq!(l.files, [d.path().join("link/i.gif")]);
    }
}
