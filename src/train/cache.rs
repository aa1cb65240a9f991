//! Latent and text-conditioning caches, so that the VAE and the text
//! encoders run once per image / caption across runs.
//!
//! - Latents: `cache/latents/<k2>/<key>.safetensors` with one tensor
//!   `latent (4, h/8, w/8)`, already multiplied by the VAE scale factor.
//!   The key hashes what the latent depends on: the item's content hash and
//!   its bucket (size, cover-scaled size, crop), the VAE's component hash
//!   ([`Checkpoint::component_sha256`]), the latent mode (mean or sample) and,
//!   for samples, the seed. A re-bucketed item or another VAE gets a new key.
//!   Off f32 (`train --precision bf16|f16` on CUDA) the precision is part
//!   of both keys too.
//! - Text: `cache/text/<k2>/<key>.safetensors` with `context (77·k, ctx)` and
//!   `pooled (p)`, keyed by the text encoders' component hash, the chunk
//!   limit and the caption. The unconditional conditioning of caption
//!   dropout (`""` or a fixed text) and the empty padding chunk are cached
//!   the same way, so dropout works *with* caching (kohya cannot combine them).
//! - Every entry is written atomically (temp file + rename, no fsync: an
//!   entry lost to a host crash is recomputed) with a checksum of its data
//!   in its metadata, and recorded in the manifest's `cache_entries` with
//!   the run that made it; a file that is missing or unreadable is simply
//!   recomputed, and one whose data does not match its checksum (a valid
//!   header over data lost to a crash) is removed when read, so that the
//!   next run recomputes it.
//! - [`Caches`] holds each entry's file, not its tensors: a batch reads its
//!   latents and conditionings from disk (the page cache keeps the hot
//!   ones), so memory does not grow with the dataset. Held in memory, 50k
//!   images at 1024² would be 12 GiB of latents and 30–60 GiB of
//!   conditioning, on the training device.
//!
//! Batches of captions with different chunk counts are padded with the
//! cached empty chunk, which is exactly what encoding them together does
//! (A1111 `pad_to_same_chunks`: every chunk is encoded on its own and the
//! pooled vector comes from the first chunk).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{DropoutCond, TrainConfig};
use super::data::TrainItem;
use crate::error::IoContext;
use crate::manifest::{now, Manifest};
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::models::sdxl::clip::SdxlTextEncoder;
use crate::models::sdxl::prompt::tokenize_prompt_with;
use crate::models::sdxl::{Vae, CLIP_G_PREFIX, CLIP_L_PREFIX};
use crate::nn::device::dtype_name;
use crate::stages::Ctx;
use crate::{Error, Result};

#[path = "cache_latents.rs"]
mod latent;
#[cfg(test)]
use latent::{latent_key, latent_mode};
pub use latent::{latents, vae_hash, LatentEntries, LatentInputs};

/// One caption's conditioning: `context (1, 77·k, ctx)`, `pooled (1, p)`.
#[derive(Debug, Clone)]
pub struct Cond {
    /// Penultimate hidden states of both encoders, concatenated.
    pub context: Tensor,
    /// bigG pooled vector.
    pub pooled: Tensor,
}

impl Cond {
    /// Number of 77-token chunks.
    pub fn chunks(&self) -> Result<usize> {
        Ok(self.context.dim(1)? / 77)
    }
}

/// Where the caches of one training run are: each entry's file, read
/// when a batch needs it ([`Caches::latent`], [`Caches::batch_cond`]).
pub struct Caches {
    /// The dataset folder the entries' paths are relative to.
    root: PathBuf,
    /// Where the tensors are loaded to.
    device: Device,
    /// Scaled latents `(4, h, w)` by item id (entry paths).
    latents: HashMap<i64, String>,
    /// Conditioning by caption (entry paths).
    text: HashMap<String, String>,
    /// The empty chunk (padding), `(1, 77, ctx)`.
    pub empty_chunk: Tensor,
    /// The empty prompt's pooled vector `(1, p)` (its shape: a zeroed
    /// dropout's).
    empty_pooled: Tensor,
    /// Conditioning of a dropped caption (`None`: zeroed).
    pub uncond: Option<Cond>,
}

/// How much was computed and how much was read back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CacheReport {
    /// Latents computed by the VAE in this run.
    pub latents_encoded: usize,
    /// Latents read from the cache.
    pub latents_cached: usize,
    /// Captions encoded in this run (including the uncond and padding entries).
    pub texts_encoded: usize,
    /// Captions read from the cache.
    pub texts_cached: usize,
    /// Component hash of the VAE.
    pub vae_hash: String,
    /// Component hash of the text encoders.
    pub text_hash: String,
}

fn key_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// The cache key of `parts` computed in `dtype`: f32 adds nothing (the keys
/// of every f32 cache stay what they were), any other dtype adds its name.
/// How captions become tokens, part of the text cache key: entries from
/// an earlier rule (which parsed A1111 emphasis) are not reused.
const CAPTION_TOKENS: &str = "literal";

/// A caption as the text encoders see it in training: its words as written,
/// truncated to `max_chunks` chunks of 75 tokens (A1111's chunking, comma
/// backtracking included). Never parsed as A1111 emphasis: a caption is a
/// description, not prompt syntax — a tag like `saber (fate)` keeps its
/// brackets (the tokens a user gets at inference from `saber \(fate\)`),
/// and kohya weights captions only with `--weighted_captions`.
pub(crate) fn caption_tokens(
    tok: &crate::models::sdxl::tokenizer::ClipTokenizer,
    caption: &str,
    max_chunks: usize,
) -> Result<crate::models::sdxl::prompt::TokenizedPrompt> {
    let mut tp = tokenize_prompt_with(tok, caption, false)?;
    tp.chunks.truncate(max_chunks);
    Ok(tp)
}

fn keyed(parts: &[&[u8]], dtype: DType) -> String {
    if dtype == DType::F32 {
        return key_of(parts);
    }
    let mut all = parts.to_vec();
    all.push(dtype_name(dtype).as_bytes());
    key_of(&all)
}

fn entry_path(kind: &str, key: &str) -> String {
    format!("cache/{kind}/{}/{key}.safetensors", &key[..2])
}

/// Metadata key of an entry's checksum: sha256 (hex) of its tensors' f32
/// bytes in name order. Entries are not fsynced, so a host crash may leave
/// a valid header over data that never reached the disk; the checksum
/// tells, when the entry is read.
const CHECKSUM_KEY: &str = "eps2v.sha256";

/// sha256 (hex) of the f32 bytes of `tensors`, in order.
fn checksum(tensors: &[&Tensor]) -> Result<String> {
    let mut h = Sha256::new();
    for t in tensors {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize()))
}

/// Read a cache file's tensors onto `device`, or why not: missing,
/// unreadable, or (with a checksum, every entry written since stop 47)
/// corrupt. An unreadable or corrupt entry is removed, so that the next
/// `build` recomputes it.
fn read_entry(
    root: &Path,
    rel: &str,
    names: &[&str],
    device: &Device,
) -> std::result::Result<Vec<Tensor>, String> {
    let path = root.join(rel);
    if !path.is_file() {
        return Err("missing".into());
    }
    // An entry that cannot be read is removed too: it is recomputed.
    let unreadable = |e: Error| {
        let _ = std::fs::remove_file(&path);
        format!("unreadable ({e}); removed")
    };
    let ck = Checkpoint::open(&path).map_err(unreadable)?;
    let cpu = names
        .iter()
        .map(|n| ck.tensor(n, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()
        .map_err(unreadable)?;
    if let Some(want) = ck.metadata().get(CHECKSUM_KEY) {
        let mut sorted: Vec<(&str, &Tensor)> = names.iter().copied().zip(&cpu).collect();
        sorted.sort_by_key(|(n, _)| *n);
        let got = checksum(&sorted.iter().map(|(_, t)| *t).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        if &got != want {
            let _ = std::fs::remove_file(&path);
            return Err("corrupt (its data does not match its checksum: written before a host crash?); removed".into());
        }
    }
    cpu.into_iter()
        .map(|t| t.to_device(device).map_err(|e| e.to_string()))
        .collect()
}

/// The scaled latent `(4, h, w)` of a latent entry (`rel` under `root`),
/// as f32 on the CPU, or why not: missing, unreadable or corrupt (then
/// removed, so that the next [`latents`] recomputes it).
pub fn read_latent(root: &Path, rel: &str) -> std::result::Result<Tensor, String> {
    Ok(read_entry(root, rel, &["latent"], &Device::Cpu)?.remove(0))
}

/// Whether the cache file holds every tensor of `names`, as f32 (its
/// header only: the data is read when a batch needs it).
fn entry_ok(root: &Path, rel: &str, names: &[&str]) -> bool {
    let path = root.join(rel);
    path.is_file()
        && Checkpoint::open(&path).is_ok_and(|ck| {
            names
                .iter()
                .all(|n| ck.entry(n).is_some_and(|e| e.dtype == "F32"))
        })
}

/// Write the f32 tensors as one safetensors file, atomically. No fsync
/// and no sweep of the folder (one `read_dir` per entry made writing the
/// cache of a large dataset quadratic): a killed write leaves a `.tmp*`
/// file, which [`build`] sweeps once.
fn write_entry(root: &Path, rel: &str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    // f32 on the CPU first: candle's safetensors view of a tensor then
    // only reads its bytes (it unwraps a device copy).
    let cpu = tensors
        .iter()
        .map(|(n, t)| Ok((*n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut sorted: Vec<&(&str, Tensor)> = cpu.iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    let sum = checksum(&sorted.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
    let meta = std::collections::HashMap::from([(CHECKSUM_KEY.to_string(), sum)]);
    let bytes = safetensors::tensor::serialize(cpu.iter().map(|(n, t)| (*n, t)), Some(meta))
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    crate::atomic::write(&path, &bytes, false)
}

/// A pending manifest row of `cache_entries`.
struct Row {
    /// An entry found on disk, not written now: recorded only when its
    /// row is missing (a killed run wrote the file, not yet its row), its
    /// run kept.
    hit: bool,
    key: String,
    kind: &'static str,
    item_id: Option<i64>,
    model_hash: String,
    path: String,
    detail: String,
}

fn record(m: &mut Manifest, run_id: i64, rows: &mut Vec<Row>) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let path = m.db_path().to_path_buf();
    let tx = m.conn_mut().transaction().map_err(|e| Error::Manifest {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    {
        let t = now();
        for r in rows.drain(..) {
            let mut st = tx
                .prepare_cached(if r.hit {
                    "INSERT OR IGNORE INTO cache_entries (key, kind, item_id, model_hash, path, detail, run_id, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                } else {
                    "INSERT OR REPLACE INTO cache_entries (key, kind, item_id, model_hash, path, detail, run_id, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                })
                .map_err(|e| Error::Manifest {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            st.execute(rusqlite::params![
                r.key,
                r.kind,
                r.item_id,
                r.model_hash,
                r.path,
                r.detail,
                run_id,
                t
            ])
            .map_err(|e| Error::Manifest {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        }
    }
    tx.commit().map_err(|e| Error::Manifest {
        path,
        msg: e.to_string(),
    })
}

/// Inputs of [`build`].
pub struct CacheInputs<'a> {
    /// The base checkpoint (for the component hashes).
    pub ckpt: &'a Checkpoint,
    /// Its VAE.
    pub vae: &'a Vae,
    /// Its text encoders.
    pub text: &'a SdxlTextEncoder,
    /// Every item that trains or validates.
    pub items: &'a [&'a TrainItem],
    /// Extra texts to encode (evaluation prompts are sampled directly, so
    /// this is for callers that need more).
    pub extra_texts: &'a [String],
    /// Where the models run (and the cached tensors are loaded to).
    pub device: &'a Device,
    /// dtype the text encoders run in (the VAE runs in
    /// [`crate::nn::vae_dtype`] of it). Anything but f32 is part of the
    /// cache keys, so half-precision latents and conditionings never stand
    /// in for f32 ones (f32 keys are those of f32-only versions).
    pub dtype: DType,
}

/// Remove what killed cache writes of `kind` left, once an hour old:
/// a `train` on the same dataset (train takes no writer lock) may be
/// writing its own right now, and a write takes milliseconds.
/// Best effort.
fn sweep(root: &Path, kind: &str) {
    let _ = crate::stages::import::sweep_temp_files_older_than(
        &root.join("cache").join(kind),
        std::time::Duration::from_secs(3600),
    );
}

/// Fill the caches for `inputs.items` (computing only what is missing).
pub fn build(
    m: &mut Manifest,
    cfg: &TrainConfig,
    inputs: &CacheInputs<'_>,
    run_id: i64,
    ctx: &Ctx,
) -> Result<(Caches, CacheReport)> {
    let root = m.root().to_path_buf();
    let device = inputs.device.clone();
    let vae_dtype = crate::nn::vae_dtype(inputs.dtype);
    let vae_hash = vae_hash(inputs.ckpt);
    let text_hash = inputs
        .ckpt
        .component_sha256(&[CLIP_L_PREFIX, CLIP_G_PREFIX]);
    let mut report = CacheReport {
        vae_hash: vae_hash.clone(),
        text_hash: text_hash.clone(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    sweep(&root, "text");

    // Latents.
    let encoded = latents(
        m,
        &LatentInputs {
            vae_hash: &vae_hash,
            vae: inputs.vae,
            items: inputs.items,
            mode: cfg.latent,
            seed: cfg.seed,
            flipped: false,
            device: &device,
            vae_dtype,
            keep_going: false,
        },
        run_id,
        ctx,
    )?;
    report.latents_cached = encoded.cached;
    report.latents_encoded = encoded.encoded;
    let latents = encoded.entries;

    // Text.
    let mut texts: Vec<String> = inputs.items.iter().map(|it| it.caption.clone()).collect();
    texts.extend(inputs.extra_texts.iter().cloned());
    let uncond_text = cfg.uncond.text().map(str::to_string);
    texts.extend(uncond_text.iter().cloned());
    texts.push(String::new()); // the padding chunk
    texts.sort();
    texts.dedup();
    let limit = cfg.max_chunks.to_string();
    let mut text = HashMap::new();
    let mut todo = Vec::new();
    for t in &texts {
        let key = keyed(
            &[
                b"text",
                CAPTION_TOKENS.as_bytes(),
                text_hash.as_bytes(),
                limit.as_bytes(),
                t.as_bytes(),
            ],
            inputs.dtype,
        );
        let rel = entry_path("text", &key);
        if entry_ok(&root, &rel, &["context", "pooled"]) {
            rows.push(Row {
                hit: true,
                key: key.clone(),
                kind: "text",
                item_id: None,
                model_hash: text_hash.clone(),
                path: rel.clone(),
                detail: t.clone(),
            });
            text.insert(t.clone(), rel);
            report.texts_cached += 1;
        } else {
            todo.push((t.clone(), key));
        }
    }
    let todo_texts = todo.len();
    let bar = ctx.bar(todo.len() as u64, "captions");
    // Tokenize, truncate to the chunk limit, encode in groups of equal chunk count.
    let mut by_k: BTreeMap<
        usize,
        Vec<(String, String, crate::models::sdxl::prompt::TokenizedPrompt)>,
    > = BTreeMap::new();
    for (t, key) in todo {
        let tp = caption_tokens(inputs.text.tokenizer(), &t, cfg.max_chunks)?;
        by_k.entry(tp.chunks.len()).or_default().push((t, key, tp));
    }
    for group in by_k.values() {
        for chunk in group.chunks(16) {
            if ctx.should_stop() {
                bar.finish_and_clear();
                record(m, run_id, &mut rows)?;
                return Err(Error::Interrupted(format!(
                    "captions: stopped after encoding {} of {}; they are kept in {}, so rerunning the same command goes on from there",
                    report.texts_encoded,
                    todo_texts,
                    root.join("cache/text").display()
                )));
            }
            let toks: Vec<_> = chunk.iter().map(|(_, _, tp)| tp.clone()).collect();
            let c = inputs.text.encode_tokenized(&toks)?;
            let c = crate::models::sdxl::clip::TextConditioning {
                context: c.context.to_dtype(DType::F32)?,
                pooled: c.pooled.to_dtype(DType::F32)?,
            };
            for (i, (t, key, _)) in chunk.iter().enumerate() {
                let ctxt = c.context.get(i)?.contiguous()?;
                let pooled = c.pooled.get(i)?.contiguous()?;
                let rel = entry_path("text", key);
                write_entry(&root, &rel, &[("context", &ctxt), ("pooled", &pooled)])?;
                text.insert(t.clone(), rel.clone());
                rows.push(Row {
                    hit: false,
                    key: key.clone(),
                    kind: "text",
                    item_id: None,
                    model_hash: text_hash.clone(),
                    path: rel,
                    detail: t.clone(),
                });
                report.texts_encoded += 1;
                bar.inc(1);
            }
            if rows.len() >= 64 {
                record(m, run_id, &mut rows)?;
            }
        }
    }
    bar.finish_and_clear();
    record(m, run_id, &mut rows)?;

    let empty = read_cond(&root, &device, &text, "")?;
    let uncond = match &cfg.uncond {
        DropoutCond::Zero => None,
        other => Some(read_cond(
            &root,
            &device,
            &text,
            other.text().unwrap_or_default(),
        )?),
    };
    let caches = Caches {
        root,
        device,
        latents,
        text,
        empty_chunk: empty.context.narrow(1, 0, 77)?,
        empty_pooled: empty.pooled,
        uncond,
    };
    Ok((caches, report))
}

/// The conditioning of `caption` (`(1, 77·k, ctx)`, `(1, p)`), read from
/// its entry in `text` (entry paths under `root`).
fn read_cond(
    root: &Path,
    device: &Device,
    text: &HashMap<String, String>,
    caption: &str,
) -> Result<Cond> {
    let rel = text
        .get(caption)
        .ok_or_else(|| Error::Other(format!("text cache: caption {caption:?} was not encoded")))?;
    let v = read_entry(root, rel, &["context", "pooled"], device).map_err(|why| {
        Error::Other(format!(
            "text cache: caption {caption:?}: {} is {why}; rerun `eps2v train` with --resume to recompute it and go on from the last save",
            root.join(rel).display()
        ))
    })?;
    Ok(Cond {
        context: v[0].unsqueeze(0)?,
        pooled: v[1].unsqueeze(0)?,
    })
}

impl Caches {
    /// The scaled latent `(1, 4, h, w)` of `item_id`, read from its entry.
    pub fn latent(&self, item_id: i64) -> Result<Tensor> {
        let rel = self
            .latents
            .get(&item_id)
            .ok_or_else(|| Error::Other(format!("latent cache: item {item_id} missing")))?;
        let t = read_entry(&self.root, rel, &["latent"], &self.device).map_err(|why| {
            Error::Other(format!(
                "latent cache: item {item_id}: {} is {why}; rerun `eps2v train` with --resume to recompute it and go on from the last save",
                self.root.join(rel).display()
            ))
        })?;
        Ok(t[0].unsqueeze(0)?)
    }

    /// The conditioning of `caption`, read from its entry.
    fn cond(&self, caption: &str) -> Result<Cond> {
        read_cond(&self.root, &self.device, &self.text, caption)
    }

    /// Pad `c` to `k` chunks with the empty chunk.
    fn padded(&self, c: &Tensor, k: usize) -> Result<Tensor> {
        let have = c.dim(1)? / 77;
        if have >= k {
            return Ok(c.clone());
        }
        let mut parts = vec![c.clone()];
        for _ in have..k {
            parts.push(self.empty_chunk.clone());
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// The conditioning of a batch: `dropped[i]` replaces item i's caption
    /// by the dropout conditioning. Returns `context (b, 77·k, ctx)` and
    /// `pooled (b, p)` with k the batch's largest chunk count.
    pub fn batch_cond(&self, captions: &[&str], dropped: &[bool]) -> Result<(Tensor, Tensor)> {
        // A dropped row reads no entry: it takes the dropout conditioning.
        let conds = captions
            .iter()
            .zip(dropped)
            .map(|(c, &d)| if d { Ok(None) } else { self.cond(c).map(Some) })
            .collect::<Result<Vec<_>>>()?;
        let mut k = 1;
        for c in &conds {
            let ck = match (c, &self.uncond) {
                (Some(c), _) => c.chunks()?,
                (None, Some(u)) => u.chunks()?,
                (None, None) => 1,
            };
            k = k.max(ck);
        }
        let mut ctxs = Vec::with_capacity(conds.len());
        let mut pooled = Vec::with_capacity(conds.len());
        for c in &conds {
            match (c, &self.uncond) {
                (Some(c), _) => {
                    ctxs.push(self.padded(&c.context, k)?);
                    pooled.push(c.pooled.clone());
                }
                (None, Some(u)) => {
                    ctxs.push(self.padded(&u.context, k)?);
                    pooled.push(u.pooled.clone());
                }
                (None, None) => {
                    let e = &self.empty_chunk;
                    ctxs.push(Tensor::zeros(
                        (1, 77 * k, e.dim(2)?),
                        DType::F32,
                        e.device(),
                    )?);
                    pooled.push(self.empty_pooled.zeros_like()?);
                }
            }
        }
        Ok((Tensor::cat(&ctxs, 0)?, Tensor::cat(&pooled, 0)?))
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
