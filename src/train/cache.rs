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
//! - Every entry is written atomically (temp file + rename) and recorded in
//!   the manifest's `cache_entries` with the run that made it; a file that is
//!   missing or unreadable is simply recomputed.
//!
//! Batches of captions with different chunk counts are padded with the
//! cached empty chunk, which is exactly what encoding them together does
//! (A1111 `pad_to_same_chunks`: every chunk is encoded on its own and the
//! pooled vector comes from the first chunk).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{DropoutCond, LatentMode, TrainConfig};
use super::data::{rng_for, stream, TrainItem};
use crate::diffusion::noise::normals;
use crate::error::IoContext;
use crate::manifest::{now, Manifest};
use crate::models::sdxl::checkpoint::{save_tensors, Checkpoint, SaveOptions};
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

/// What the caches hold for one training run.
pub struct Caches {
    /// Scaled latents `(1, 4, h, w)` by item id.
    pub latents: HashMap<i64, Tensor>,
    /// Conditioning by caption.
    pub text: HashMap<String, Cond>,
    /// The empty chunk (padding), `(1, 77, ctx)`.
    pub empty_chunk: Tensor,
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

/// Read a cache file's tensors, or `None` when missing or unreadable.
fn read_entry(root: &Path, rel: &str, names: &[&str], device: &Device) -> Option<Vec<Tensor>> {
    let path = root.join(rel);
    if !path.is_file() {
        return None;
    }
    let ck = Checkpoint::open(&path).ok()?;
    names
        .iter()
        .map(|n| ck.tensor(n, DType::F32, device).ok())
        .collect()
}

fn write_entry(root: &Path, rel: &str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let owned: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), (*t).clone()))
        .collect();
    save_tensors(
        &path,
        &owned,
        &SaveOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
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

/// Load a bucket image as `(1, 3, h, w)` in [−1, 1].
fn load_image(root: &Path, rel: &str, device: &Device) -> Result<Tensor> {
    let path = root.join(rel);
    let img = image::open(&path)
        .map_err(|e| Error::Image {
            path: path.clone(),
            msg: format!("{e}; rerun `eps2v bucket` to recreate the training images"),
        })?
        .to_rgb8();
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
    let vae_hash = inputs.ckpt.component_sha256(&[&format!("{VAE_PREFIX}.")]);
    let text_hash = inputs
        .ckpt
        .component_sha256(&[CLIP_L_PREFIX, CLIP_G_PREFIX]);
    let mut report = CacheReport {
        vae_hash: vae_hash.clone(),
        text_hash: text_hash.clone(),
        ..Default::default()
    };
    let mut rows = Vec::new();

    // Latents.
    let mut latents = HashMap::new();
    let mode = match cfg.latent {
        LatentMode::Mean => "mean".to_string(),
        LatentMode::Sample => format!("sample:{}", cfg.seed),
    };
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
        match read_entry(&root, &rel, &["latent"], &device) {
            Some(t) => {
                latents.insert(it.item_id, t[0].unsqueeze(0)?);
                report.latents_cached += 1;
                bar.inc(1);
            }
            None => todo.entry(it.bucket).or_default().push((it, key)),
        }
    }
    for group in todo.values() {
        for chunk in group.chunks(4) {
            let imgs = chunk
                .iter()
                .map(|(it, _)| load_image(&root, &it.image_path, &device))
                .collect::<Result<Vec<_>>>()?;
            let x = Tensor::cat(&imgs, 0)?; // (b, 3, H, W)
            let z = match cfg.latent {
                LatentMode::Mean => inputs.vae.encode(&x)?,
                LatentMode::Sample => {
                    let (mean, logvar) = inputs.vae.encode_moments(&x)?;
                    let dims = mean.dims().to_vec();
                    let per: usize = dims[1..].iter().product();
                    let noise: Vec<f32> = chunk
                        .iter()
                        .flat_map(|(it, _)| {
                            normals(
                                &mut rng_for(cfg.seed, stream::LATENT, it.item_id as u64, 0),
                                per,
                            )
                        })
                        .collect();
                    let n = Tensor::from_vec(noise, dims, &device)?;
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
                latents.insert(it.item_id, zi.unsqueeze(0)?);
                rows.push(Row {
                    key: key.clone(),
                    kind: "latent",
                    item_id: Some(it.item_id),
                    model_hash: vae_hash.clone(),
                    path: rel,
                    detail: mode.clone(),
                });
                report.latents_encoded += 1;
                bar.inc(1);
            }
            if rows.len() >= 64 {
                record(m, run_id, &mut rows)?;
            }
        }
    }
    bar.finish_and_clear();
    record(m, run_id, &mut rows)?;

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
        match read_entry(&root, &rel, &["context", "pooled"], &device) {
            Some(v) => {
                text.insert(
                    t.clone(),
                    Cond {
                        context: v[0].unsqueeze(0)?,
                        pooled: v[1].unsqueeze(0)?,
                    },
                );
                report.texts_cached += 1;
            }
            None => todo.push((t.clone(), key)),
        }
    }
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
                text.insert(
                    t.clone(),
                    Cond {
                        context: ctxt.unsqueeze(0)?,
                        pooled: pooled.unsqueeze(0)?,
                    },
                );
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

    let empty = text
        .get("")
        .ok_or_else(|| Error::Other("text cache: the empty prompt was not encoded".into()))?;
    let empty_chunk = empty.context.narrow(1, 0, 77)?;
    let uncond = match &cfg.uncond {
        DropoutCond::Zero => None,
        other => {
            let t = other.text().unwrap_or_default();
            Some(
                text.get(t)
                    .cloned()
                    .ok_or_else(|| Error::Other(format!("text cache: {t:?} was not encoded")))?,
            )
        }
    };
    Ok((
        Caches {
            latents,
            text,
            empty_chunk,
            uncond,
        },
        report,
    ))
}

impl Caches {
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
        let conds = captions
            .iter()
            .map(|c| {
                self.text.get(*c).ok_or_else(|| {
                    Error::Other(format!("text cache: caption {c:?} was not encoded"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut k = 1;
        for (c, &d) in conds.iter().zip(dropped) {
            let ck = match (&self.uncond, d) {
                (Some(u), true) => u.chunks()?,
                (None, true) => 1,
                (_, false) => c.chunks()?,
            };
            k = k.max(ck);
        }
        let mut ctxs = Vec::with_capacity(conds.len());
        let mut pooled = Vec::with_capacity(conds.len());
        for (c, &d) in conds.iter().zip(dropped) {
            match (&self.uncond, d) {
                (None, true) => {
                    let shape = (1, 77 * k, c.context.dim(2)?);
                    ctxs.push(Tensor::zeros(shape, DType::F32, c.context.device())?);
                    pooled.push(c.pooled.zeros_like()?);
                }
                (Some(u), true) => {
                    ctxs.push(self.padded(&u.context, k)?);
                    pooled.push(u.pooled.clone());
                }
                (_, false) => {
                    ctxs.push(self.padded(&c.context, k)?);
                    pooled.push(c.pooled.clone());
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
        let cond = |v: f32, chunks: usize| Cond {
            context: Tensor::full(v, (1, 77 * chunks, 3), &d).unwrap(),
            pooled: Tensor::full(v, (1, 2), &d).unwrap(),
        };
        let mut text = HashMap::new();
        text.insert("short".to_string(), cond(1.0, 1));
        text.insert("long".to_string(), cond(2.0, 2));
        text.insert(String::new(), cond(5.0, 1));
        let mut caches = Caches {
            latents: HashMap::new(),
            text,
            empty_chunk: Tensor::full(9f32, (1, 77, 3), &d).unwrap(),
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
        caches.uncond = Some(caches.text[""].clone());
        let (ctx, pooled) = rows(&caches, &[true, false]);
        assert_eq!(ctx, [vec![5., 5., 9., 9.], vec![2., 2., 2., 2.]]);
        assert_eq!(pooled, [vec![5., 5.], vec![2., 2.]]);
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
