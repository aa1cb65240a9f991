//! `eps2v ckpt info`: what a single-file checkpoint holds, per component,
//! with the configs inferred from its shapes (or why they cannot be), its
//! prediction type and hashes. Never fails because an architecture is
//! unknown: inference failures are reported, not raised.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{is_marker_key, Checkpoint, Family, PredictionInfo};
use crate::error::IoContext;
use crate::models::sdxl::infer::{self, Inferred, TextPair};
use crate::models::sdxl::{
    UNetConfig, VaeConfig, CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use crate::Result;

/// What identifies one version of a file without reading it: its path,
/// length and modification time, and on Unix also its device, inode and
/// change time.
type FileStamp = (PathBuf, u64, Option<std::time::SystemTime>, [i64; 4]);

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let extra = {
        use std::os::unix::fs::MetadataExt;
        [m.dev() as i64, m.ino() as i64, m.ctime(), m.ctime_nsec()]
    };
    #[cfg(not(unix))]
    let extra = [0; 4];
    let path = std::fs::canonicalize(path).ok()?;
    Some((path, m.len(), m.modified().ok(), extra))
}

/// Hex SHA-256 of the whole file.
///
/// Remembered for the life of the process by the file's [`FileStamp`], so
/// that the stages of one `eps2v run` (its resume digests, `generate`'s
/// `Model hash`, `train`'s base check) read a 7 GB checkpoint once. A file
/// replaced by rename gets a new inode and any write moves its change time,
/// so a changed file is hashed again.
///
/// Files of [`HASH_CACHE_MIN_LEN`] or more are also remembered across
/// processes in [`hash_cache_path`] (as A1111's `cache.json` does), keyed
/// by the same stamp: a 7 GB checkpoint costs its read once, not once per
/// `sample` or `train`.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    sha256_file_with(
        path.as_ref(),
        hash_cache_path().as_deref(),
        HASH_CACHE_MIN_LEN,
    )
}

/// Files at least this long are remembered in the on-disk hash cache.
pub const HASH_CACHE_MIN_LEN: u64 = 64 << 20;

/// The on-disk hash cache: `$XDG_CACHE_HOME/eps2v/file-hashes.json`, else
/// `$HOME/.cache/eps2v/file-hashes.json`; `None` without either.
pub fn hash_cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("eps2v").join("file-hashes.json"))
}

/// The on-disk cache's key of a stamp.
fn stamp_key(s: &FileStamp) -> String {
    let mtime =
        s.2.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(-1, |d| d.as_nanos() as i128);
    format!(
        "{}|{}|{mtime}|{}|{}|{}|{}",
        s.0.display(),
        s.1,
        s.3[0],
        s.3[1],
        s.3[2],
        s.3[3]
    )
}

/// Entries the on-disk cache keeps at most (one per path); past it, those
/// of files gone are dropped first.
const HASH_CACHE_MAX_ENTRIES: usize = 1024;

/// [`sha256_file`] with the on-disk cache at `cache` (none: `None`) for
/// files of at least `min_len` bytes. The cache is best effort: unreadable,
/// it is ignored; unwritable, the hash is still returned.
fn sha256_file_with(path: &Path, cache: Option<&Path>, min_len: u64) -> Result<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MEMO: OnceLock<Mutex<HashMap<FileStamp, String>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let before = stamp(path);
    if let Some(s) = &before {
        if let Some(h) = memo.lock().ok().and_then(|m| m.get(s).cloned()) {
            return Ok(h);
        }
    }
    let on_disk = cache.filter(|_| before.as_ref().is_some_and(|s| s.1 >= min_len));
    let read_cache = |c: &Path| -> BTreeMap<String, String> {
        std::fs::read(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    if let (Some(c), Some(s)) = (on_disk, &before) {
        if let Some(h) = read_cache(c).remove(&stamp_key(s)) {
            if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(mut m) = memo.lock() {
                    m.insert(s.clone(), h.clone());
                }
                return Ok(h);
            }
        }
    }
    let h = sha256_file_uncached(path)?;
    // Only when nothing changed while it was read.
    if let (Some(s), true) = (&before, before == stamp(path)) {
        if let Ok(mut m) = memo.lock() {
            m.insert(s.clone(), h.clone());
        }
        if let Some(c) = on_disk {
            let mut all = read_cache(c);
            // One entry per path: an older version of this file is gone.
            let prefix = format!("{}|", s.0.display());
            all.retain(|k, _| !k.starts_with(&prefix));
            all.insert(stamp_key(s), h.clone());
            if all.len() > HASH_CACHE_MAX_ENTRIES {
                all.retain(|k, _| k.split('|').next().is_some_and(|p| Path::new(p).exists()));
            }
            // Still over: the files of the lowest keys go (an arbitrary
            // but stable choice; they are only hashed again).
            while all.len() > HASH_CACHE_MAX_ENTRIES {
                all.pop_first();
            }
            if let (Some(dir), Ok(bytes)) = (c.parent(), serde_json::to_vec_pretty(&all)) {
                // Best effort: another process may write it too (each
                // write is whole; the last one wins).
                let _ = std::fs::create_dir_all(dir);
                let _ = crate::atomic::write(c, &bytes, false);
            }
        }
    }
    Ok(h)
}

fn sha256_file_uncached(path: &Path) -> Result<String> {
    let mut file = File::open(path).at(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A1111 "AutoV2" model hash: the first 10 hex digits of the file's SHA-256.
pub fn autov2(sha256_hex: &str) -> String {
    sha256_hex.chars().take(10).collect()
}

/// Tensor / parameter counts of one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentInfo {
    /// Component name (`unet`, `clip_l`, `clip_g`, `vae`, `text_encoder`, `markers`, `other`).
    pub name: String,
    /// Key prefix ("" for `other`).
    pub prefix: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of elements.
    pub parameters: u64,
    /// Tensor count per stored dtype.
    pub dtypes: BTreeMap<String, usize>,
}

/// A component's config as `ckpt info` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum ConfigStatus<T> {
    /// Inferred from the file.
    Inferred(Inferred<T>),
    /// The component is there but its config cannot be inferred.
    Failed {
        /// Which key or shape breaks which rule.
        reason: String,
    },
    /// The file has no such component.
    Absent,
}

impl<T> ConfigStatus<T> {
    fn of(present: bool, r: std::result::Result<Inferred<T>, String>) -> Self {
        match (present, r) {
            (false, _) => ConfigStatus::Absent,
            (true, Ok(i)) => ConfigStatus::Inferred(i),
            (true, Err(reason)) => ConfigStatus::Failed { reason },
        }
    }

    /// The inferred config, if any.
    pub fn inferred(&self) -> Option<&Inferred<T>> {
        match self {
            ConfigStatus::Inferred(i) => Some(i),
            _ => None,
        }
    }
}

/// Everything `eps2v ckpt info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// The file.
    pub path: String,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Model family.
    pub family: Family,
    /// What the family is, in words (with what an unrecognised file's
    /// keys suggest).
    pub family_description: String,
    /// The UNet config inferred from the shapes, or why it cannot be.
    pub unet: ConfigStatus<UNetConfig>,
    /// The VAE config inferred from the shapes, or why it cannot be.
    pub vae: ConfigStatus<VaeConfig>,
    /// The two text-encoder configs inferred from the shapes, or why not.
    pub text: ConfigStatus<TextPair>,
    /// Prediction type, ZTSNR and their source.
    pub prediction: PredictionInfo,
    /// Tensor count per stored dtype, whole file.
    pub dtypes: BTreeMap<String, usize>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of elements.
    pub parameters: u64,
    /// Per-component counts (non-empty components only).
    pub components: Vec<ComponentInfo>,
    /// safetensors metadata.
    pub metadata: BTreeMap<String, String>,
    /// Full SHA-256 (hex), when hashing was requested.
    pub sha256: Option<String>,
    /// A1111 AutoV2 hash (first 10 hex digits), when hashing was requested.
    pub autov2: Option<String>,
}

impl Checkpoint {
    /// Describe the file; `hash` also reads it whole for SHA-256 / AutoV2.
    pub fn info(&self, hash: bool) -> Result<CheckpointInfo> {
        let components = [
            ("unet", format!("{UNET_PREFIX}.")),
            ("clip_l", format!("{CLIP_L_PREFIX}.")),
            ("clip_g", format!("{CLIP_G_PREFIX}.")),
            ("vae", format!("{VAE_PREFIX}.")),
            ("text_encoder", "cond_stage_model.".to_string()),
            // An EMA copy of the UNet (older training scripts): no loader
            // eps2v knows samples it, and eps2v neither reads nor writes it.
            ("model_ema", "model_ema.".to_string()),
        ];
        let mut comps: Vec<ComponentInfo> = components
            .iter()
            .chain(std::iter::once(&("markers", String::new())))
            .chain(std::iter::once(&("other", String::new())))
            .map(|(n, p)| ComponentInfo {
                name: n.to_string(),
                prefix: p.clone(),
                tensors: 0,
                parameters: 0,
                dtypes: BTreeMap::new(),
            })
            .collect();
        let mut dtypes = BTreeMap::new();
        let mut parameters = 0u64;
        for (key, e) in &self.entries {
            let idx = components
                .iter()
                .position(|(_, p)| key.starts_with(p.as_str()))
                .unwrap_or(if is_marker_key(key) {
                    components.len()
                } else {
                    components.len() + 1
                });
            let c = &mut comps[idx];
            c.tensors += 1;
            c.parameters += e.numel() as u64;
            *c.dtypes.entry(e.dtype.clone()).or_insert(0) += 1;
            *dtypes.entry(e.dtype.clone()).or_insert(0) += 1;
            parameters += e.numel() as u64;
        }
        comps.retain(|c| c.tensors > 0);
        let shapes = self.shape_map();
        let unet_prefix = format!("{UNET_PREFIX}.");
        let sha = if hash {
            Some(sha256_file(&self.path)?)
        } else {
            None
        };
        Ok(CheckpointInfo {
            path: self.path.display().to_string(),
            file_bytes: self.file_len(),
            family: self.family(),
            family_description: self.describe_family(),
            unet: ConfigStatus::of(
                self.has_prefix(&unet_prefix),
                infer::infer_unet(&shapes, &unet_prefix, &self.metadata),
            ),
            vae: match self.vae_prefix() {
                None => ConfigStatus::Absent,
                Some(p) => {
                    let dotted = if p.is_empty() {
                        String::new()
                    } else {
                        format!("{p}.")
                    };
                    ConfigStatus::of(true, infer::infer_vae(&shapes, &dotted, &self.metadata))
                }
            },
            text: ConfigStatus::of(
                self.has_prefix("conditioner.embedders."),
                infer::infer_text(&shapes, &self.metadata),
            ),
            prediction: self.prediction(),
            dtypes,
            tensors: self.entries.len(),
            parameters,
            components: comps,
            metadata: self.metadata.clone(),
            autov2: sha.as_deref().map(autov2),
            sha256: sha,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk hash cache answers for a file of the same stamp (as a
    /// later process would ask), a changed file is read again, and small
    /// files stay out of it.
    #[test]
    fn the_hash_cache_answers_for_the_same_file_version_only() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache").join("file-hashes.json");
        let a = d.path().join("a.bin");
        std::fs::write(&a, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file_with(&a, Some(&cache), 0).unwrap(), want);
        let stored: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
        assert_eq!(stored.values().collect::<Vec<_>>(), [want]);
        // What a later process finds: an entry for this very version of b.
        let b = d.path().join("b.bin");
        std::fs::write(&b, b"abc").unwrap();
        let fake = "f".repeat(64);
        let mut stored = stored;
        stored.insert(stamp_key(&stamp(&b).unwrap()), fake.clone());
        std::fs::write(&cache, serde_json::to_vec(&stored).unwrap()).unwrap();
        assert_eq!(sha256_file_with(&b, Some(&cache), 0).unwrap(), fake);
        // Another version of b is read, and replaces the old one's entry.
        std::fs::write(&b, b"abcd").unwrap();
        let abcd = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";
        assert_eq!(sha256_file_with(&b, Some(&cache), 0).unwrap(), abcd);
        let stored: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert!(!stored.values().any(|h| *h == fake));
        // Below the size threshold, nothing is stored.
        let c = d.path().join("c.bin");
        std::fs::write(&c, b"abc").unwrap();
        let before = std::fs::read(&cache).unwrap();
        sha256_file_with(&c, Some(&cache), 1 << 20).unwrap();
        assert_eq!(std::fs::read(&cache).unwrap(), before);
    }
}
