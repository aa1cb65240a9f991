//! `eps2v toy scenes`: write scenes as PNG files with `.txt` tag sidecars,
//! the kohya layout that `eps2v import` reads (caption source
//! `sidecar_txt`).
//!
//! Files are `scene_{index:06}.png` / `.txt`, each written atomically
//! (temp file + rename, [`crate::stages::import::write_atomic_replace`]);
//! the PNG goes first, so a scene whose `.txt` exists is complete. A rerun
//! after a kill skips complete scenes (they are a pure function of seed
//! and index, so redrawing would give the same bytes) and redraws the rest.
//! `scenes.json` records the seed: a folder of another seed's scenes is
//! refused (skipping its files would keep the other seed's scenes), and
//! scenes past `count` of a larger earlier set are removed.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::scenes::Scene;
use crate::error::IoContext;
use crate::stages::import::write_atomic_replace;
use crate::stages::Ctx;
use crate::{Error, Result};

/// What [`write_scenes`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteScenes {
    /// Number of scenes (indices `0..count`).
    pub count: u64,
    /// Seed of the scene set.
    pub seed: u64,
}

/// What [`write_scenes`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriteReport {
    /// Output folder.
    pub dir: PathBuf,
    /// Seed used.
    pub seed: u64,
    /// Scenes drawn and written now.
    pub written: u64,
    /// Scenes already complete (PNG + `.txt`), left alone.
    pub skipped: u64,
    /// Scenes per size (`"64x64"` → count), all `count` scenes.
    pub sizes: BTreeMap<String, u64>,
    /// Scenes per tag, all `count` scenes.
    pub tags: BTreeMap<String, u64>,
    /// Scenes past `count` (an earlier, larger set) removed.
    pub removed: u64,
}

/// The folder's record of the seed its scenes are drawn from.
pub const SCENES_RECORD: &str = "scenes.json";

/// The index of a scene file `scene_NNNNNN.png` / `.txt`.
fn scene_index(name: &str) -> Option<u64> {
    let stem = name
        .strip_suffix(".png")
        .or_else(|| name.strip_suffix(".txt"))?;
    stem.strip_prefix("scene_")?.parse().ok()
}

/// Claim `dir` for the scenes of `seed`: refused when it holds another
/// seed's scenes, or scene files without a record of their seed.
fn claim(dir: &Path, seed: u64) -> Result<()> {
    let record = dir.join(SCENES_RECORD);
    let other = |what: String| {
        Error::config(format!(
            "{}: holds {what}; write seed {seed} into another folder, or delete this one",
            dir.display()
        ))
    };
    match std::fs::read(&record) {
        Ok(raw) => {
            let had = serde_json::from_slice::<serde_json::Value>(&raw)
                .ok()
                .and_then(|v| v.get("seed")?.as_u64());
            match had {
                Some(s) if s == seed => return Ok(()),
                Some(s) => return Err(other(format!("the scenes of seed {s} ({SCENES_RECORD})"))),
                None => return Err(other(format!("an unreadable {SCENES_RECORD}"))),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&record, e)),
    }
    for e in std::fs::read_dir(dir).at(dir)? {
        let name = e.at(dir)?.file_name();
        if scene_index(&name.to_string_lossy()).is_some() {
            return Err(other(format!(
                "scene files of an unknown seed (no {SCENES_RECORD})"
            )));
        }
    }
    write_atomic_replace(
        &record,
        serde_json::json!({ "seed": seed }).to_string().as_bytes(),
    )
}

/// File stem of scene `index`.
pub fn scene_stem(index: u64) -> String {
    format!("scene_{index:06}")
}

/// Write scenes `0..count` of `seed` into `dir` (created if missing).
pub fn write_scenes(dir: &Path, opts: WriteScenes, ctx: &Ctx) -> Result<WriteReport> {
    if dir.is_file() {
        return Err(Error::config(format!(
            "{}: is a file; give a folder for the scenes",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    claim(dir, opts.seed)?;
    let mut rep = WriteReport {
        dir: dir.to_path_buf(),
        seed: opts.seed,
        ..Default::default()
    };
    let bar = ctx.bar(opts.count, "scenes");
    for index in 0..opts.count {
        let scene = Scene::random(opts.seed, index);
        let stem = scene_stem(index);
        let png = dir.join(format!("{stem}.png"));
        let txt = dir.join(format!("{stem}.txt"));
        *rep.sizes
            .entry(format!("{}x{}", scene.width, scene.height))
            .or_default() += 1;
        for t in scene.tags() {
            *rep.tags.entry(t).or_default() += 1;
        }
        if png.is_file() && txt.is_file() {
            rep.skipped += 1;
        } else {
            let mut bytes = Vec::new();
            scene
                .render()
                .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
                .map_err(|e| Error::Other(format!("{}: png encode: {e}", png.display())))?;
            write_atomic_replace(&png, &bytes)?;
            write_atomic_replace(&txt, format!("{}\n", scene.caption()).as_bytes())?;
            rep.written += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut past = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        if let Some(i) = scene_index(&e.file_name().to_string_lossy()).filter(|i| *i >= opts.count)
        {
            std::fs::remove_file(e.path()).at(e.path())?;
            past.insert(i);
        }
    }
    rep.removed = past.len() as u64;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pngs_and_sidecars_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("scenes");
        let opts = WriteScenes { count: 6, seed: 4 };
        let r = write_scenes(&out, opts, &Ctx::quiet()).unwrap();
        assert_eq!((r.written, r.skipped), (6, 0));
        for i in 0..6 {
            let s = Scene::random(4, i);
            let txt = std::fs::read_to_string(out.join(format!("{}.txt", scene_stem(i)))).unwrap();
            assert_eq!(txt.trim_end(), s.caption());
            let img = image::open(out.join(format!("{}.png", scene_stem(i))))
                .unwrap()
                .to_rgb8();
            assert_eq!(img, s.render());
        }
        assert_eq!(r.sizes.values().sum::<u64>(), 6);
        assert_eq!(
            r.tags.get("1shape").copied().unwrap_or(0)
                + r.tags.get("2shapes").copied().unwrap_or(0),
            6
        );
        // A scene cut short (PNG without .txt) is redrawn; the rest skipped.
        std::fs::remove_file(out.join(format!("{}.txt", scene_stem(2)))).unwrap();
        let r = write_scenes(&out, opts, &Ctx::quiet()).unwrap();
        assert_eq!((r.written, r.skipped), (1, 5));
        assert!(out.join(format!("{}.txt", scene_stem(2))).is_file());
        // Only our files: no temp files left behind.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 13);
        // Fewer scenes: those past the count go.
        let r = write_scenes(&out, WriteScenes { count: 4, seed: 4 }, &Ctx::quiet()).unwrap();
        assert_eq!((r.written, r.skipped, r.removed), (0, 4, 2));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 9);
    }

    /// Regression: a folder of seed 4's scenes was "written" with seed 5
    /// by skipping every file, so it still held seed 4's scenes.
    #[test]
    fn another_seeds_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("scenes");
        write_scenes(&out, WriteScenes { count: 2, seed: 4 }, &Ctx::quiet()).unwrap();
        let e = write_scenes(&out, WriteScenes { count: 2, seed: 5 }, &Ctx::quiet()).unwrap_err();
        assert!(e.to_string().contains("the scenes of seed 4"), "{e}");
        std::fs::remove_file(out.join(SCENES_RECORD)).unwrap();
        let e = write_scenes(&out, WriteScenes { count: 2, seed: 4 }, &Ctx::quiet()).unwrap_err();
        assert!(e.to_string().contains("unknown seed"), "{e}");
    }

    #[test]
    fn a_file_as_folder_is_a_config_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e =
            write_scenes(f.path(), WriteScenes { count: 1, seed: 0 }, &Ctx::quiet()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("give a folder"));
    }
}
