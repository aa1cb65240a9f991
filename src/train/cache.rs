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

use super::config::{DropoutCond, LatentMode, TrainConfig};
use super::data::{rng_for, stream, TrainItem};
use crate::diffusion::noise::normals;
use crate::error::IoContext;
use crate::manifest::{now, Manifest};
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::models::sdxl::clip::SdxlTextEncoder;
use crate::models::sdxl::prompt::tokenize_prompt_with;
use crate::models::sdxl::{Vae, CLIP_G_PREFIX, CLIP_L_PREFIX, VAE_PREFIX};
use crate::nn::device::dtype_name;
use crate::stages::Ctx;
use crate::{Error, Result};

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
        let mut st = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO cache_entries (key, kind, item_id, model_hash, path, detail, run_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(|e| Error::Manifest {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let t = now();
        for r in rows.drain(..) {
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

/// Load a bucket image (mirrored left to right when `flipped`) as
/// `(1, 3, h, w)` in [−1, 1].
fn load_image(root: &Path, rel: &str, flipped: bool, device: &Device) -> Result<Tensor> {
    let path = root.join(rel);
    let mut img = image::open(&path)
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("{e}; rerun `eps2v bucket` to recreate the training images"),
        })?
        .into_rgb8();
    if flipped {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    crate::pipeline::latent::from_rgb8(&img, device)
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

/// What [`latents`] encodes, and with which VAE.
pub struct LatentInputs<'a> {
    /// The VAE's component hash ([`vae_hash`]), part of every key.
    pub vae_hash: &'a str,
    /// The VAE.
    pub vae: &'a Vae,
    /// The items whose bucket images are encoded.
    pub items: &'a [&'a TrainItem],
    /// Mean or seeded sample of the latent distribution.
    pub mode: LatentMode,
    /// Seed of [`LatentMode::Sample`].
    pub seed: u64,
    /// Encode the horizontally mirrored bucket image (kohya's
    /// `latents_flipped`); a key of its own.
    pub flipped: bool,
    /// Where the VAE runs.
    pub device: &'a Device,
    /// dtype the VAE runs in (anything but f32 is part of the key).
    pub vae_dtype: DType,
}

/// The component hash of a file's VAE, which keys its latents: the
/// tensors under `first_stage_model.` of a checkpoint, or every tensor of a
/// standalone VAE file (the same weights in the two layouts hash
/// differently, which only costs a recomputation).
pub fn vae_hash(ckpt: &Checkpoint) -> String {
    match ckpt.vae_prefix() {
        Some("") => ckpt.component_sha256(&[""]),
        _ => ckpt.component_sha256(&[&format!("{VAE_PREFIX}.")]),
    }
}

/// The scaled latent entry (relative to the dataset folder) of each item
/// in `inputs.items`, computing only those missing from the cache, with
/// how many were read back and how many encoded. Each entry is recorded in
/// the manifest's `cache_entries` under `run_id` as it is written, so a
/// killed run keeps what it encoded.
pub fn latents(
    m: &mut Manifest,
    inputs: &LatentInputs<'_>,
    run_id: i64,
    ctx: &Ctx,
) -> Result<(HashMap<i64, String>, usize, usize)> {
    let root = m.root().to_path_buf();
    let device = inputs.device;
    let vae_dtype = inputs.vae_dtype;
    let vae_hash = inputs.vae_hash.to_string();
    let (mut cached, mut encoded) = (0, 0);
    let mut rows = Vec::new();
    let mut latents = HashMap::new();
    sweep(&root, "latents");
    let mut mode = match inputs.mode {
        LatentMode::Mean => "mean".to_string(),
        LatentMode::Sample => format!("sample:{}", inputs.seed),
    };
    if inputs.flipped {
        mode.push_str(" flipped");
    }
    let bar = ctx.bar(inputs.items.len() as u64, "latents");
    let mut todo: BTreeMap<(u32, u32), Vec<(&TrainItem, String)>> = BTreeMap::new();
    for it in inputs.items {
        let geometry = format!(
            "{}x{} {}x{} {},{}",
            it.bucket.0,
            it.bucket.1,
            it.resized.0,
            it.resized.1,
            it.size.crop_top_left.0,
            it.size.crop_top_left.1
        );
        let key = keyed(
            &[
                b"latent",
                it.sha256.as_bytes(),
                geometry.as_bytes(),
                vae_hash.as_bytes(),
                mode.as_bytes(),
            ],
            vae_dtype,
        );
        let rel = entry_path("latents", &key);
        if entry_ok(&root, &rel, &["latent"]) {
            latents.insert(it.item_id, rel);
            cached += 1;
            bar.inc(1);
        } else {
            todo.entry(it.bucket).or_default().push((it, key));
        }
    }
    let to_encode: usize = todo.values().map(Vec::len).sum();
    for group in todo.values() {
        for chunk in group.chunks(4) {
            // Ctrl-C (a stage that installed `signal`) stops here, between
            // chunks; what was encoded stays in the cache.
            if ctx.should_stop() {
                bar.finish_and_clear();
                record(m, run_id, &mut rows)?;
                return Err(Error::Interrupted(format!(
                    "latents: stopped after encoding {encoded} of {to_encode}; they are kept in {}, so rerunning the same command goes on from there",
                    root.join("cache/latents").display()
                )));
            }
            let imgs = chunk
                .iter()
                .map(|(it, _)| load_image(&root, &it.image_path, inputs.flipped, device))
                .collect::<Result<Vec<_>>>()?;
            let x = Tensor::cat(&imgs, 0)?; // (b, 3, H, W)
            let z = match inputs.mode {
                LatentMode::Mean => inputs.vae.encode(&x)?,
                LatentMode::Sample => {
                    let (mean, logvar) = inputs.vae.encode_moments(&x)?;
                    let dims = mean.dims().to_vec();
                    let per: usize = dims[1..].iter().product();
                    let noise: Vec<f32> = chunk
                        .iter()
                        .flat_map(|(it, _)| {
                            normals(
                                &mut rng_for(inputs.seed, stream::LATENT, it.item_id as u64, 0),
                                per,
                            )
                        })
                        .collect();
                    let n = Tensor::from_vec(noise, dims, device)?;
                    // One encoder pass: the moments are those above.
                    crate::models::sdxl::vae::sample_moments(&mean, &logvar, &n)?
                }
            };
            let z = (z.to_dtype(DType::F32)? * inputs.vae.scale_factor())?; // (b, 4, h, w)
            if z.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(Error::model(format!(
                    "the VAE produced NaN/inf latents for items {:?}; check the VAE (an f16 SDXL VAE overflows: use f32 or the fp16-fix VAE)",
                    chunk.iter().map(|(it, _)| it.item_id).collect::<Vec<_>>()
                )));
            }
            for (i, (it, key)) in chunk.iter().enumerate() {
                let zi = z.get(i)?.contiguous()?;
                let rel = entry_path("latents", key);
                write_entry(&root, &rel, &[("latent", &zi)])?;
                latents.insert(it.item_id, rel.clone());
                rows.push(Row {
                    key: key.clone(),
                    kind: "latent",
                    item_id: Some(it.item_id),
                    model_hash: vae_hash.clone(),
                    path: rel,
                    detail: mode.clone(),
                });
                encoded += 1;
                bar.inc(1);
            }
            if rows.len() >= 64 {
                record(m, run_id, &mut rows)?;
            }
        }
    }
    bar.finish_and_clear();
    record(m, run_id, &mut rows)?;

    Ok((latents, cached, encoded))
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
    let (latents, cached, encoded) = latents(
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
        },
        run_id,
        ctx,
    )?;
    report.latents_cached = cached;
    report.latents_encoded = encoded;

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
mod tests {
    use super::*;

    #[test]
    fn captions_train_as_written_not_as_prompt_syntax() {
        use crate::models::sdxl::prompt::tokenize_prompt_with;
        use crate::models::sdxl::tokenizer::ClipTokenizer;
        let tok = ClipTokenizer::new().unwrap();
        // Brackets, weights and BREAK are the caption's words: all
        // multipliers 1, and the tokens of the literal text (which the A1111
        // parser would drop or turn into weights, or fail on).
        for caption in ["1girl, saber (fate), [red] eyes", "(v:1.2.3), x BREAK y"] {
            let tp = caption_tokens(&tok, caption, 3).unwrap();
            assert!(tp
                .chunks
                .iter()
                .all(|c| c.multipliers.iter().all(|&m| m == 1.0)));
            let ids: Vec<u32> = tp.chunks[0].tokens.clone();
            let literal = tok.encode(caption).unwrap();
            assert_eq!(&ids[1..1 + literal.len()], &literal[..], "{caption}");
            if let Ok(parsed) = tokenize_prompt_with(&tok, caption, true) {
                assert_ne!(parsed.chunks[0].tokens, ids, "{caption}");
            }
        }
        // Long captions keep at most max_chunks chunks.
        let long = vec!["red circle"; 200].join(", ");
        assert_eq!(caption_tokens(&tok, &long, 2).unwrap().chunks.len(), 2);
    }

    /// Caption dropout: a dropped row is zeros (`zero`) or the encoded
    /// dropout text (`empty`, `"…"`), never its caption; every row is
    /// padded with the empty chunk to the batch's longest caption.
    #[test]
    fn dropped_captions_take_the_dropout_conditioning_padded_to_the_batch() {
        let d = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        // Entries on disk, as `build` leaves them: (77·k, ctx) and (p).
        let mut text = HashMap::new();
        for (caption, v, chunks) in [("short", 1f32, 1), ("long", 2.0, 2), ("", 5.0, 1)] {
            let rel = entry_path("text", &key_of(&[caption.as_bytes(), b"test"]));
            let context = Tensor::full(v, (77 * chunks, 3), &d).unwrap();
            let pooled = Tensor::full(v, 2, &d).unwrap();
            write_entry(
                dir.path(),
                &rel,
                &[("context", &context), ("pooled", &pooled)],
            )
            .unwrap();
            assert!(entry_ok(dir.path(), &rel, &["context", "pooled"]));
            text.insert(caption.to_string(), rel);
        }
        let mut caches = Caches {
            root: dir.path().to_path_buf(),
            device: d.clone(),
            latents: HashMap::new(),
            text,
            empty_chunk: Tensor::full(9f32, (1, 77, 3), &d).unwrap(),
            empty_pooled: Tensor::full(5f32, (1, 2), &d).unwrap(),
            uncond: None,
        };
        // (row, token) → value of the context, and the pooled row.
        let rows = |c: &Caches, dropped: &[bool]| {
            let (ctx, pooled) = c.batch_cond(&["short", "long"], dropped).unwrap();
            let ctx: Vec<Vec<f32>> = (0..2)
                .map(|i| {
                    let r = ctx.get(i).unwrap();
                    [0usize, 76, 77, 153]
                        .iter()
                        .map(|&t| r.get(t).unwrap().get(0).unwrap().to_scalar().unwrap())
                        .collect()
                })
                .collect();
            (ctx, pooled.to_vec2::<f32>().unwrap())
        };
        let (ctx, pooled) = rows(&caches, &[false, false]);
        assert_eq!(ctx, [vec![1., 1., 9., 9.], vec![2., 2., 2., 2.]]);
        assert_eq!(pooled, [vec![1., 1.], vec![2., 2.]]);
        let (ctx, pooled) = rows(&caches, &[true, false]);
        assert_eq!(ctx, [vec![0., 0., 0., 0.], vec![2., 2., 2., 2.]]);
        assert_eq!(pooled, [vec![0., 0.], vec![2., 2.]]);
        caches.uncond = Some(caches.cond("").unwrap());
        let (ctx, pooled) = rows(&caches, &[true, false]);
        assert_eq!(ctx, [vec![5., 5., 9., 9.], vec![2., 2., 2., 2.]]);
        assert_eq!(pooled, [vec![5., 5.], vec![2., 2.]]);
    }

    /// An entry reads back with the bits it was written with (training
    /// reads every batch from disk), and a missing or foreign file is no
    /// entry.
    #[test]
    fn entries_read_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let z = (crate::nn::kernels::test_util::rand(&[4, 5, 6], 3, DType::F32).unwrap() * 7.3)
            .unwrap();
        let rel = entry_path("latents", &key_of(&[b"z"]));
        assert!(!entry_ok(dir.path(), &rel, &["latent"]));
        write_entry(dir.path(), &rel, &[("latent", &z)]).unwrap();
        assert!(entry_ok(dir.path(), &rel, &["latent"]));
        assert!(!entry_ok(dir.path(), &rel, &["context"]));
        let back = read_entry(dir.path(), &rel, &["latent"], &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(back[0].dims(), z.dims());
        assert_eq!(bits(&back[0]), bits(&z));
        // Data lost under a valid header (a host crash before the unsynced
        // data reached the disk): found when read, and the file removed so
        // that the next build recomputes it.
        let path = dir.path().join(&rel);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 8..].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            entry_ok(dir.path(), &rel, &["latent"]),
            "the header is fine"
        );
        let e = read_entry(dir.path(), &rel, &["latent"], &Device::Cpu).unwrap_err();
        assert!(e.starts_with("corrupt"), "{e}");
        assert!(!path.exists());
        std::fs::write(dir.path().join(&rel), b"not safetensors").unwrap();
        assert!(!entry_ok(dir.path(), &rel, &["latent"]));
    }

    /// f32 keys are the plain hash of their parts (those of the caches
    /// written before `--precision`); half precision gets keys of its own.
    #[test]
    fn only_half_precision_changes_a_cache_key() {
        let parts: [&[u8]; 3] = [b"latent", b"abc", b"1024x1024"];
        let plain = key_of(&parts);
        assert_eq!(keyed(&parts, DType::F32), plain);
        let bf16 = keyed(&parts, DType::BF16);
        let f16 = keyed(&parts, DType::F16);
        assert!(bf16 != plain && f16 != plain && bf16 != f16);
        assert_eq!(bf16, key_of(&[b"latent", b"abc", b"1024x1024", b"bf16"]));
    }
}
