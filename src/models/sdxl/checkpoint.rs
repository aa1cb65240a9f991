//! Single-file SDXL checkpoints: bounds-checked mmap loading, per-tensor
//! dtype conversion, validation, prediction-type markers, atomic save and
//! hashes.
//!
//! Why our own safetensors reader: the header is untrusted input. We check
//! the 8-byte header length against the file size and a 100 MiB cap before
//! reading it, and every tensor's byte range against its dtype × shape and
//! the file end, so a crafted or truncated file gives a clear error (never a
//! huge allocation or a panic). Tensor bytes are read from a memory map and
//! converted per tensor (f16 / bf16 / f32 / f64 → the requested dtype; fp8
//! is refused with a message saying what to do).
//!
//! Facts followed (reference/sdxl.md §1.1, trainers-landscape.md §1–2):
//! key prefixes and counts; ignore list (`position_ids`, `logit_scale`,
//! `model_ema.*`, `denoiser.sigmas`); marker keys `v_pred` / `ztsnr`
//! (presence only, ComfyUI `supported_models.py`), `edm_vpred.sigma_max`,
//! `edm_mean`; safetensors `modelspec.prediction_type` metadata (sd-scripts);
//! A1111 "AutoV2" model hash = first 10 hex digits of the SHA-256 of the
//! whole file. Pickle files (`.ckpt`, `.pt`) are never loaded.
//!
//! Models are built through [`Checkpoint::var_builder`] (plain tensors, for
//! inference) or [`Checkpoint::load_unet_trainable`] (every UNet parameter a
//! `Var` in a `VarMap`, for training); the expected key/shape lists come
//! from running the module constructors on a shape-only backend
//! ([`record_shapes`]), so validation can never drift from the modules.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    UNet, UNetConfig, Vae, VaeConfig, CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use crate::error::IoContext;
use crate::{Error, Result};

/// Largest safetensors header we accept (real SDXL headers are ~200 KB).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Marker key: present ⇒ v-prediction (ComfyUI, A1111 dev, Forge).
pub const MARKER_V_PRED: &str = "v_pred";
/// Marker key: present ⇒ zero-terminal-SNR schedule.
pub const MARKER_ZTSNR: &str = "ztsnr";
/// safetensors metadata key written by sd-scripts / ModelSpec.
pub const META_PREDICTION_TYPE: &str = "modelspec.prediction_type";

/// Keys that loaders tolerate and never need (reference §1.1).
pub fn is_ignored_key(key: &str) -> bool {
    key.ends_with("position_ids")
        || key.ends_with("logit_scale")
        || key.starts_with("model_ema.")
        || key == "denoiser.sigmas"
}

fn is_marker_key(key: &str) -> bool {
    matches!(key, MARKER_V_PRED | MARKER_ZTSNR | "edm_mean" | "edm_std")
        || key.starts_with("edm_vpred.")
}

/// Bytes per element of a safetensors dtype string.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// candle dtype of a floating-point safetensors dtype we convert from.
fn float_dtype(dtype: &str) -> Option<DType> {
    Some(match dtype {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => return None,
    })
}

/// safetensors dtype string of a candle dtype we can write.
fn st_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        _ => return None,
    })
}

/// One tensor of the file: dtype, shape and absolute byte range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorEntry {
    /// safetensors dtype string (`F16`, `BF16`, `F32`, `F8_E4M3`…).
    pub dtype: String,
    /// Shape (PyTorch layout).
    pub shape: Vec<usize>,
    /// Absolute start offset in the file.
    #[serde(skip)]
    pub start: usize,
    /// Absolute end offset in the file (exclusive).
    #[serde(skip)]
    pub end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

type Parsed = (BTreeMap<String, TensorEntry>, BTreeMap<String, String>);

/// Parse and bounds-check a safetensors header over the whole file `bytes`.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let p = path.display();
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::model(format!(
            "{p}: file is truncated ({file_len} bytes): a safetensors file starts with an 8-byte header length; re-download it"
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES {
        return Err(Error::model(format!(
            "{p}: bad safetensors header: declared header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; the file is corrupt or not a safetensors file"
        )));
    }
    if n > file_len - 8 {
        return Err(Error::model(format!(
            "{p}: file is truncated: the header declares {n} bytes but only {} follow; re-download it",
            file_len - 8
        )));
    }
    // n ≤ file_len − 8 ≤ usize::MAX here (the bytes are in memory).
    let data_start = 8 + n as usize;
    let header = &bytes[8..data_start];
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| {
            Error::model(format!(
                "{p}: bad safetensors header: invalid JSON ({e}); the file is corrupt or not a safetensors file"
            ))
        })?;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in map {
        if key == "__metadata__" {
            if let serde_json::Value::Object(m) = value {
                for (k, v) in m {
                    let s = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, s);
                }
            }
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value).map_err(|e| {
            Error::model(format!(
                "{p}: bad safetensors header: entry {key}: {e}; the file is corrupt"
            ))
        })?;
        let size = dtype_size(&raw.dtype).ok_or_else(|| {
            Error::model(format!(
                "{p}: bad safetensors header: tensor {key} has unknown dtype {}",
                raw.dtype
            ))
        })?;
        let nbytes = raw
            .shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        let [begin, end] = raw.data_offsets;
        if nbytes != end.checked_sub(begin) {
            return Err(Error::model(format!(
                "{p}: bad safetensors header: tensor {key} ({} {:?}) has byte range {begin}..{end} of the wrong size",
                raw.dtype, raw.shape
            )));
        }
        let abs_end = (data_start as u64).checked_add(end);
        if abs_end.is_none_or(|e| e > file_len) {
            return Err(Error::model(format!(
                "{p}: file is truncated: tensor {key} ends at byte {} but the file has {file_len} bytes; re-download or re-save it",
                data_start as u64 + end.min(u64::MAX - data_start as u64)
            )));
        }
        entries.insert(
            key,
            TensorEntry {
                dtype: raw.dtype,
                shape: raw.shape,
                start: data_start + begin as usize,
                end: data_start + end as usize,
            },
        );
    }
    Ok((entries, metadata))
}

/// Index of the first NaN/±inf element in raw little-endian float bytes
/// (exponent bits all ones), or `None`. Non-float dtypes are never flagged.
fn first_non_finite(dtype: &str, bytes: &[u8]) -> Option<usize> {
    match dtype {
        "F16" => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00),
        "BF16" => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        "F32" => bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        "F64" => bytes.chunks_exact(8).position(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            !f64::from_le_bytes(a).is_finite()
        }),
        _ => None,
    }
}

/// What kind of model a file holds, judged from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Full SDXL base-style checkpoint (UNet with `label_emb`, two text encoders).
    Sdxl,
    /// SDXL-shaped UNet without text encoders (e.g. a UNet-only save).
    SdxlUnet,
    /// SDXL refiner (bigG as `conditioner.embedders.0`).
    SdxlRefiner,
    /// Stable Diffusion 1.x (`cond_stage_model.transformer.*`).
    Sd1,
    /// Stable Diffusion 2.x (`cond_stage_model.model.*`).
    Sd2,
    /// A LoRA / LyCORIS file.
    Lora,
    /// A diffusers-format weights file (`down_blocks.*`).
    Diffusers,
    /// A standalone VAE (`encoder.*` / `decoder.*`).
    Vae,
    /// Nothing recognisable.
    Unknown,
}

impl Family {
    /// Short name (`sdxl`, `sd1`, `lora`…).
    pub fn name(&self) -> &'static str {
        match self {
            Family::Sdxl => "sdxl",
            Family::SdxlUnet => "sdxl-unet",
            Family::SdxlRefiner => "sdxl-refiner",
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Lora => "lora",
            Family::Diffusers => "diffusers",
            Family::Vae => "vae",
            Family::Unknown => "unknown",
        }
    }

    /// What the file looks like, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Family::Sdxl => "an SDXL checkpoint",
            Family::SdxlUnet => "an SDXL UNet without text encoders or VAE",
            Family::SdxlRefiner => "an SDXL refiner checkpoint (conditioner.embedders.0 is OpenCLIP bigG)",
            Family::Sd1 => "a Stable Diffusion 1.x checkpoint (found 1.5-style keys cond_stage_model.transformer.*)",
            Family::Sd2 => "a Stable Diffusion 2.x checkpoint (found cond_stage_model.model.* keys)",
            Family::Lora => "a LoRA (found lora_unet_* / lora_te* keys), not a full model; merge it into an SDXL checkpoint first",
            Family::Diffusers => "a diffusers-format weights file (found down_blocks.* keys); save the model as a single-file LDM checkpoint (diffusers scripts/convert_diffusers_to_original_sdxl.py)",
            Family::Vae => "a standalone VAE (encoder.* / decoder.* keys and no UNet)",
            Family::Unknown => "an unrecognised set of keys",
        }
    }
}

/// Prediction target of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// Noise prediction (the SDXL default).
    Epsilon,
    /// v-prediction.
    V,
    /// EDM v-prediction (CosXL; `edm_vpred.*` keys).
    EdmV,
    /// EDM (Playground 2.5; `edm_mean` / `edm_std` keys).
    Edm,
}

impl Prediction {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v",
            Prediction::EdmV => "edm-v",
            Prediction::Edm => "edm",
        }
    }
}

/// Prediction type, ZTSNR flag and where they were read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PredictionInfo {
    /// The prediction target.
    pub prediction: Prediction,
    /// `ztsnr` marker present.
    pub ztsnr: bool,
    /// Where `prediction` came from.
    pub source: String,
    /// Inconsistencies worth telling the user about.
    pub warnings: Vec<String>,
}

/// A shape that differs from what the model expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShapeMismatch {
    /// The key.
    pub key: String,
    /// Shape the model needs.
    pub expected: Vec<usize>,
    /// Shape in the file.
    pub found: Vec<usize>,
}

/// Result of comparing a file against the keys a model requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Validation {
    /// Expected keys absent from the file.
    pub missing: Vec<String>,
    /// Keys under the component prefix the model does not use (ignore list excluded).
    pub unexpected: Vec<String>,
    /// Keys present with another shape.
    pub mismatched: Vec<ShapeMismatch>,
}

fn list_some(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    let more = keys.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} … and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Validation {
    /// No problems at all.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Merge another component's validation into this one.
    pub fn extend(&mut self, other: Validation) {
        self.missing.extend(other.missing);
        self.unexpected.extend(other.unexpected);
        self.mismatched.extend(other.mismatched);
    }

    /// One error naming every kind of problem, or `Ok` (`what` names the model, e.g. "sdxl_base UNet").
    pub fn into_result(self, path: &Path, what: &str) -> Result<()> {
        if self.is_ok() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "missing {} key{} ({})",
                self.missing.len(),
                if self.missing.len() == 1 { "" } else { "s" },
                list_some(&self.missing)
            ));
        }
        if !self.mismatched.is_empty() {
            let shown: Vec<String> = self
                .mismatched
                .iter()
                .take(5)
                .map(|m| format!("{} expected {:?} found {:?}", m.key, m.expected, m.found))
                .collect();
            parts.push(format!(
                "{} tensor{} with the wrong shape ({}{})",
                self.mismatched.len(),
                if self.mismatched.len() == 1 { "" } else { "s" },
                shown.join("; "),
                if self.mismatched.len() > 5 {
                    "; …"
                } else {
                    ""
                }
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected key{} ({})",
                self.unexpected.len(),
                if self.unexpected.len() == 1 { "" } else { "s" },
                list_some(&self.unexpected)
            ));
        }
        Err(Error::model(format!(
            "{}: does not match the {what}: {}; is this a complete SDXL checkpoint of that size? (pruned, damaged or a different architecture)",
            path.display(),
            parts.join("; ")
        )))
    }
}

/// Does a file shape satisfy an expected shape? VAE mid-attention 1×1 conv
/// weights may be stored as matrices (`[c, c]` for `[c, c, 1, 1]`).
fn shape_ok(key: &str, expected: &[usize], found: &[usize]) -> bool {
    expected == found
        || (key.contains(".attn_1.")
            && expected.len() == 4
            && expected[2..] == [1, 1]
            && found == &expected[..2])
}

// ---------------------------------------------------------------------------
// Shape-only VarBuilder backend.

struct Recorder<'a>(&'a Mutex<Vec<(String, Vec<usize>)>>);

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder lock poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        // A zero-stride broadcast of one scalar: no memory for any shape.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Run a module constructor on a shape-only backend (no weight memory) and
/// return every `(key, shape)` it requested, in request order.
pub fn record_shapes<T>(
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let seen = Mutex::new(Vec::new());
    {
        let vb = VarBuilder::from_backend(Box::new(Recorder(&seen)), DType::F32, Device::Cpu);
        build(vb)?;
    }
    seen.into_inner()
        .map_err(|_| Error::Other("shape recorder lock poisoned".into()))
}

/// The SDXL base key/shape list, enumerated from the sgm architecture by
/// fixtures/scripts/gen_keys_shapes.py and committed as a fixture.
const SDXL_KEYS_SHAPES: &str = include_str!("../../../fixtures/sdxl_keys_shapes.tsv");

/// Keys and shapes of the two SDXL base text encoders (`conditioner.embedders.*`)
/// from the reference list; used to validate full-size files until the text
/// encoder modules can be recorded with [`record_shapes`].
pub fn sdxl_text_encoder_keys() -> Vec<(String, Vec<usize>)> {
    SDXL_KEYS_SHAPES
        .lines()
        .filter(|l| l.starts_with("conditioner.embedders."))
        .filter_map(|l| {
            let (key, shape) = l.split_once('\t')?;
            let dims = shape
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse::<usize>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key.to_string(), dims))
        })
        .collect()
}

/// Keys and shapes of a UNet with `cfg` under `model.diffusion_model.`.
pub fn unet_expected_keys(cfg: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    record_shapes(|vb| UNet::new(vb.pp(UNET_PREFIX), cfg))
}

/// Keys and shapes of a VAE with `cfg` under `prefix` (`first_stage_model` or "").
pub fn vae_expected_keys(cfg: &VaeConfig, prefix: &str) -> Result<Vec<(String, Vec<usize>)>> {
    record_shapes(|vb| {
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        Vae::new(vb, cfg)
    })
}

// ---------------------------------------------------------------------------
// The checkpoint.

/// An opened, header-validated single-file safetensors checkpoint (mmap).
pub struct Checkpoint {
    path: PathBuf,
    mmap: Mmap,
    entries: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn pickle_error(path: &Path) -> Error {
    Error::model(format!(
        "{}: pickle checkpoints (.ckpt/.pt/.pth/.bin) are never loaded because they can run arbitrary code; convert to safetensors first (e.g. with a trusted tool such as kohya's or diffusers' conversion scripts) and pass the .safetensors file",
        path.display()
    ))
}

impl Checkpoint {
    /// Open and validate the header of a `.safetensors` file. Directories
    /// (diffusers folders) and pickle files are refused with a message
    /// saying what to do.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).at(path)?;
        if meta.is_dir() {
            let diffusers = path.join("model_index.json").exists() || path.join("unet").is_dir();
            return Err(Error::model(if diffusers {
                format!(
                    "{}: is a diffusers model folder (model_index.json / unet/); eps2v reads single-file SDXL checkpoints: convert it with diffusers' scripts/convert_diffusers_to_original_sdxl.py",
                    path.display()
                )
            } else {
                format!(
                    "{}: is a directory; pass a single-file .safetensors checkpoint",
                    path.display()
                )
            }));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if matches!(
            ext.as_str(),
            "ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle"
        ) {
            return Err(pickle_error(path));
        }
        let mut file = File::open(path).at(path)?;
        if meta.len() < 8 {
            // Too short to map; parse_header reports the truncation.
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).at(path)?;
            return Err(parse_header(path, &bytes).err().unwrap_or_else(|| {
                Error::model(format!("{}: file is truncated", path.display()))
            }));
        }
        // SAFETY: the map is read-only; like every mmap reader we rely on the
        // file not being truncated by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        let (entries, metadata) = parse_header(path, &mmap).map_err(|e| {
            // A renamed torch file: zip archive or bare pickle (protocol 2–5).
            if mmap.starts_with(b"PK\x03\x04") || (mmap[0] == 0x80 && (2..=5).contains(&mmap[1])) {
                pickle_error(path)
            } else {
                e
            }
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            entries,
            metadata,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Every tensor entry, sorted by key.
    pub fn entries(&self) -> &BTreeMap<String, TensorEntry> {
        &self.entries
    }

    /// The entry of `key`.
    pub fn entry(&self, key: &str) -> Option<&TensorEntry> {
        self.entries.get(key)
    }

    /// Does the file hold `key`?
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// safetensors `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.mmap[e.start..e.end]
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.entries
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// Which model family the keys belong to.
    pub fn family(&self) -> Family {
        let any = |f: &dyn Fn(&str) -> bool| self.entries.keys().any(|k| f(k));
        if any(&|k| {
            k.starts_with("lora_unet_")
                || k.starts_with("lora_te")
                || k.contains(".lora_down.")
                || k.contains(".lora_up.")
                || k.contains(".lora_A.")
                || k.contains(".lora_B.")
        }) {
            return Family::Lora;
        }
        let label = self.contains("model.diffusion_model.label_emb.0.0.weight");
        if self.has_prefix("conditioner.embedders.0.model.") && label {
            return Family::SdxlRefiner;
        }
        if self.has_prefix("conditioner.embedders.") && label {
            return Family::Sdxl;
        }
        if self.has_prefix("cond_stage_model.transformer.") {
            return Family::Sd1;
        }
        if self.has_prefix("cond_stage_model.model.") {
            return Family::Sd2;
        }
        if label {
            return Family::SdxlUnet;
        }
        if any(&|k| {
            k.starts_with("down_blocks.")
                || k.starts_with("unet.")
                || k.starts_with("text_model.")
                || k.starts_with("encoder.down_blocks.")
        }) {
            return Family::Diffusers;
        }
        if self.vae_prefix().is_some() {
            return Family::Vae;
        }
        Family::Unknown
    }

    /// Prediction type from marker keys, then `modelspec.prediction_type`.
    pub fn prediction(&self) -> PredictionInfo {
        let ztsnr = self.contains(MARKER_ZTSNR);
        let mut warnings = Vec::new();
        let meta = self
            .metadata
            .get(META_PREDICTION_TYPE)
            .map(|s| s.trim().to_ascii_lowercase());
        let meta_pred = match meta.as_deref() {
            Some("v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred") => Some(Prediction::V),
            Some("epsilon" | "eps" | "noise") => Some(Prediction::Epsilon),
            _ => None,
        };
        let (prediction, source) = if self.has_prefix("edm_vpred.") {
            (Prediction::EdmV, "marker key edm_vpred.*".to_string())
        } else if self.contains("edm_mean") && self.contains("edm_std") {
            (Prediction::Edm, "marker keys edm_mean/edm_std".to_string())
        } else if self.contains(MARKER_V_PRED) {
            (Prediction::V, format!("marker key {MARKER_V_PRED}"))
        } else if let Some(p) = meta_pred {
            if p == Prediction::V {
                warnings.push(format!(
                    "{META_PREDICTION_TYPE} says v but there is no {MARKER_V_PRED} key: ComfyUI/A1111/Forge will sample it as epsilon; re-save with the v_pred (and ztsnr) markers"
                ));
            }
            (p, format!("metadata {META_PREDICTION_TYPE}"))
        } else {
            (
                Prediction::Epsilon,
                "default (no marker key or metadata)".to_string(),
            )
        };
        if let (Some(mp), true) = (meta_pred, self.contains(MARKER_V_PRED)) {
            if mp == Prediction::Epsilon {
                warnings.push(format!(
                    "marker key {MARKER_V_PRED} contradicts {META_PREDICTION_TYPE}=epsilon; the marker wins"
                ));
            }
        }
        if ztsnr && prediction == Prediction::Epsilon {
            warnings.push("ztsnr marker on an epsilon model: ZTSNR needs v-prediction".into());
        }
        PredictionInfo {
            prediction,
            ztsnr,
            source,
            warnings,
        }
    }

    /// Compare the file's keys under `prefix` with `expected`.
    pub fn validate(&self, expected: &[(String, Vec<usize>)], prefix: &str) -> Validation {
        let mut v = Validation::default();
        let mut wanted = BTreeSet::new();
        for (key, shape) in expected {
            wanted.insert(key.as_str());
            match self.entries.get(key) {
                None if is_ignored_key(key) => {}
                None => v.missing.push(key.clone()),
                Some(e) if !shape_ok(key, shape, &e.shape) => v.mismatched.push(ShapeMismatch {
                    key: key.clone(),
                    expected: shape.clone(),
                    found: e.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        let dotted = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        };
        for key in self.entries.keys() {
            if key.starts_with(&dotted)
                && !wanted.contains(key.as_str())
                && !is_ignored_key(key)
                && !is_marker_key(key)
            {
                v.unexpected.push(key.clone());
            }
        }
        v
    }

    /// Named config whose UNet widths match the file (`sdxl_base` or `tiny`).
    pub fn detect_unet_config(&self) -> Option<(&'static str, UNetConfig)> {
        let conv_in = self.entry(&format!("{UNET_PREFIX}.input_blocks.0.0.weight"))?;
        let label = self.entry(&format!("{UNET_PREFIX}.label_emb.0.0.weight"))?;
        [
            ("sdxl_base", UNetConfig::sdxl_base()),
            ("tiny", UNetConfig::tiny()),
        ]
        .into_iter()
        .find(|(_, c)| {
            conv_in.shape.first() == Some(&c.model_channels)
                && label.shape.get(1) == Some(&c.adm_in_channels())
        })
    }

    /// VAE key prefix in this file (`first_stage_model` or "" for standalone VAEs).
    pub fn vae_prefix(&self) -> Option<&'static str> {
        if self.contains(&format!("{VAE_PREFIX}.encoder.conv_in.weight")) {
            Some(VAE_PREFIX)
        } else if self.contains("encoder.conv_in.weight") {
            Some("")
        } else {
            None
        }
    }

    /// Named config whose VAE widths match the file (`sdxl` or `tiny`).
    pub fn detect_vae_config(&self) -> Option<(&'static str, VaeConfig)> {
        let prefix = self.vae_prefix()?;
        let key = if prefix.is_empty() {
            "encoder.conv_in.weight".to_string()
        } else {
            format!("{prefix}.encoder.conv_in.weight")
        };
        let conv_in = self.entry(&key)?;
        [("sdxl", VaeConfig::sdxl()), ("tiny", VaeConfig::tiny())]
            .into_iter()
            .find(|(_, c)| conv_in.shape.first() == Some(&c.ch))
    }

    /// Refuse non-SDXL files and check the UNet (and the VAE when `vae` is
    /// given and the file has one) key by key; a full-size file with text
    /// encoders also has them checked against the SDXL base key list.
    pub fn check_sdxl(&self, unet: &UNetConfig, vae: Option<&VaeConfig>) -> Result<()> {
        let family = self.family();
        if !matches!(family, Family::Sdxl | Family::SdxlUnet) {
            return Err(Error::model(format!(
                "{}: not an SDXL checkpoint: this looks like {}; eps2v needs a single-file SDXL checkpoint (model.diffusion_model.*, conditioner.embedders.*, first_stage_model.*)",
                self.path.display(),
                family.describe()
            )));
        }
        let mut v = self.validate(&unet_expected_keys(unet)?, UNET_PREFIX);
        if let (Some(cfg), Some(prefix)) = (vae, self.vae_prefix()) {
            v.extend(self.validate(&vae_expected_keys(cfg, prefix)?, prefix));
        }
        if family == Family::Sdxl && *unet == UNetConfig::sdxl_base() {
            v.extend(self.validate(&sdxl_text_encoder_keys(), "conditioner.embedders"));
        }
        v.into_result(&self.path, "SDXL layout")
    }

    /// Fail on the first tensor (under `prefix`, "" for all) holding NaN or ±inf.
    pub fn check_finite(&self, prefix: &str) -> Result<()> {
        for (key, e) in self.entries.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            self.check_entry_finite(key, e)?;
        }
        Ok(())
    }

    fn check_entry_finite(&self, key: &str, e: &TensorEntry) -> Result<()> {
        match first_non_finite(&e.dtype, self.bytes(e)) {
            Some(i) => Err(Error::model(format!(
                "{}: tensor {key} contains NaN or infinite values (first at element {i}); the checkpoint is corrupt: re-download it or use an earlier save",
                self.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// Load `key` converted to `dtype` on `device`. Floating-point storage
    /// (f16/bf16/f32/f64) is converted; fp8 and integer tensors are refused.
    pub fn tensor(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| Error::model(format!("{}: missing key {key}", self.path.display())))?;
        let Some(src) = float_dtype(&e.dtype) else {
            let hint = if e.dtype.starts_with("F8") {
                "fp8 weights are not supported: use an fp16/bf16/fp32 release of the model or re-save it in fp16"
            } else {
                "model weights must be floating point"
            };
            return Err(Error::model(format!(
                "{}: tensor {key} is stored as {}; {hint}",
                self.path.display(),
                e.dtype
            )));
        };
        let raw = Tensor::from_raw_buffer(self.bytes(e), src, &e.shape, &Device::Cpu)?;
        Ok(raw.to_device(device)?.to_dtype(dtype)?)
    }

    /// A `VarBuilder` over this file returning plain (non-trainable) tensors
    /// converted to `dtype`; every tensor is checked for NaN/inf as it loads.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'_> {
        let backend = CkptBackend {
            ckpt: self,
            varmap: None,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// The UNet for inference, after checking the keys against `cfg`.
    pub fn load_unet(&self, cfg: &UNetConfig, dtype: DType, device: &Device) -> Result<UNet> {
        self.validate(&unet_expected_keys(cfg)?, UNET_PREFIX)
            .into_result(&self.path, "UNet config")?;
        UNet::new(self.var_builder(dtype, device).pp(UNET_PREFIX), cfg)
    }

    /// The UNet for training: every parameter is a `Var` held by the
    /// returned `VarMap` (keys are the full checkpoint names).
    pub fn load_unet_trainable(
        &self,
        cfg: &UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(UNet, VarMap)> {
        self.validate(&unet_expected_keys(cfg)?, UNET_PREFIX)
            .into_result(&self.path, "UNet config")?;
        let varmap = VarMap::new();
        let backend = CkptBackend {
            ckpt: self,
            varmap: Some(varmap.clone()),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let unet = UNet::new(vb.pp(UNET_PREFIX), cfg)?;
        Ok((unet, varmap))
    }

    /// The VAE (use `DType::F32`: the SDXL VAE overflows in f16), from
    /// `first_stage_model.*` or a standalone VAE file.
    pub fn load_vae(&self, cfg: &VaeConfig, dtype: DType, device: &Device) -> Result<Vae> {
        let prefix = self.vae_prefix().ok_or_else(|| {
            Error::model(format!(
                "{}: no VAE in this file (no first_stage_model.encoder.conv_in.weight); pass a checkpoint with a VAE or a standalone VAE file",
                self.path.display()
            ))
        })?;
        self.validate(&vae_expected_keys(cfg, prefix)?, prefix)
            .into_result(&self.path, "VAE config")?;
        let vb = self.var_builder(dtype, device);
        Vae::new(if prefix.is_empty() { vb } else { vb.pp(prefix) }, cfg)
    }

    /// Write a copy of this checkpoint to `path` in the same layout, with
    /// `replacements` (same keys and shapes) swapped in, marker keys and
    /// metadata set by `opts`, and optional f16/bf16/f32 storage.
    pub fn save_with(
        &self,
        path: impl AsRef<Path>,
        replacements: &HashMap<String, Tensor>,
        opts: &SaveOptions,
    ) -> Result<()> {
        for (key, t) in replacements {
            let e = self.entries.get(key).ok_or_else(|| {
                Error::model(format!(
                    "save: replacement {key} is not in {}; the layout must stay the same",
                    self.path.display()
                ))
            })?;
            if t.dims() != e.shape.as_slice() {
                return Err(Error::model(format!(
                    "save: replacement {key} has shape {:?}, the checkpoint has {:?}",
                    t.dims(),
                    e.shape
                )));
            }
        }
        let mut items = Vec::new();
        for (key, e) in &self.entries {
            if key == MARKER_V_PRED || key == MARKER_ZTSNR {
                continue;
            }
            let src = match replacements.get(key) {
                Some(t) => Source::Tensor(t.clone()),
                None => Source::Raw {
                    dtype: &e.dtype,
                    shape: &e.shape,
                    bytes: self.bytes(e),
                },
            };
            items.push((key.clone(), src));
        }
        let mut metadata = self.metadata.clone();
        metadata.extend(opts.metadata.clone());
        write_checkpoint(path.as_ref(), items, opts, &metadata)
    }
}

/// Loads tensors from a [`Checkpoint`] on request; with a `VarMap` it wraps
/// each one in a `Var` and registers it under its full key.
struct CkptBackend<'a> {
    ckpt: &'a Checkpoint,
    varmap: Option<VarMap>,
}

impl CkptBackend<'_> {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let msg = |e: Error| candle_core::Error::Msg(e.to_string());
        if let Some(e) = self.ckpt.entries.get(name) {
            self.ckpt.check_entry_finite(name, e).map_err(msg)?;
        }
        let t = self.ckpt.tensor(name, dtype, dev).map_err(msg)?;
        match &self.varmap {
            None => Ok(t),
            Some(vm) => {
                let var = Var::from_tensor(&t)?;
                let out = var.as_tensor().clone();
                vm.data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?
                    .insert(name.to_string(), var);
                Ok(out)
            }
        }
    }
}

impl SimpleBackend for CkptBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let e = self.ckpt.entries.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        if e.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: e.shape.clone().into(),
            }
            .bt());
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

// ---------------------------------------------------------------------------
// Saving.

/// How to write a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Store every floating-point tensor in this dtype (F16, BF16 or F32);
    /// `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
    /// Write the `v_pred` marker key (any existing marker is dropped otherwise).
    pub v_pred: bool,
    /// Write the `ztsnr` marker key.
    pub ztsnr: bool,
    /// Metadata to add or override (e.g. `modelspec.prediction_type`).
    pub metadata: BTreeMap<String, String>,
}

enum Source<'a> {
    Raw {
        dtype: &'a str,
        shape: &'a [usize],
        bytes: &'a [u8],
    },
    Tensor(Tensor),
}

/// Little-endian bytes of `t` stored as `dtype`.
fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(Error::model(format!(
                "save: cannot store dtype {other:?} in safetensors"
            )))
        }
    })
}

/// Save named tensors as a single-file checkpoint (atomic: temp file +
/// rename), with marker keys and metadata from `opts`.
pub fn save_tensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    opts: &SaveOptions,
) -> Result<()> {
    let items = tensors
        .iter()
        .filter(|(k, _)| k != MARKER_V_PRED && k != MARKER_ZTSNR)
        .map(|(k, t)| (k.clone(), Source::Tensor(t.clone())))
        .collect();
    write_checkpoint(path.as_ref(), items, opts, &opts.metadata)
}

fn write_checkpoint(
    path: &Path,
    mut items: Vec<(String, Source<'_>)>,
    opts: &SaveOptions,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if let Some(d) = opts.dtype {
        if !matches!(d, DType::F16 | DType::BF16 | DType::F32) {
            return Err(Error::config(format!(
                "save: storage dtype must be f16, bf16 or f32, not {d:?}"
            )));
        }
    }
    for (flag, key) in [(opts.v_pred, MARKER_V_PRED), (opts.ztsnr, MARKER_ZTSNR)] {
        if flag {
            // The community convention: an empty tensor (`torch.tensor([])`).
            items.push((
                key.to_string(),
                Source::Raw {
                    dtype: "F32",
                    shape: &[0],
                    bytes: &[],
                },
            ));
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));

    // Resolve every item's stored dtype, shape and size.
    struct Planned {
        dtype: String,
        shape: Vec<usize>,
        nbytes: usize,
    }
    let mut plan = Vec::with_capacity(items.len());
    for (key, src) in &items {
        let (dtype, shape) = match src {
            Source::Raw { dtype, shape, .. } => {
                let keep = float_dtype(dtype).is_none() || shape.iter().product::<usize>() == 0;
                let d = match (opts.dtype, keep) {
                    (Some(d), false) => st_dtype_name(d).unwrap_or("F32").to_string(),
                    _ => dtype.to_string(),
                };
                (d, shape.to_vec())
            }
            Source::Tensor(t) => {
                let d = match (opts.dtype, t.dtype().is_float()) {
                    (Some(d), true) => d,
                    _ => t.dtype(),
                };
                let name = st_dtype_name(d).ok_or_else(|| {
                    Error::model(format!("save: tensor {key} has unsupported dtype {d:?}"))
                })?;
                (name.to_string(), t.dims().to_vec())
            }
        };
        let size = dtype_size(&dtype)
            .ok_or_else(|| Error::model(format!("save: tensor {key} has unknown dtype {dtype}")))?;
        plan.push(Planned {
            nbytes: shape.iter().product::<usize>() * size,
            dtype,
            shape,
        });
    }

    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(Error::from)?,
        );
    }
    let mut offset = 0usize;
    for ((key, _), p) in items.iter().zip(&plan) {
        header.insert(
            key.clone(),
            serde_json::json!({
                "dtype": p.dtype,
                "shape": p.shape,
                "data_offsets": [offset, offset + p.nbytes],
            }),
        );
        offset += p.nbytes;
    }
    let mut header = serde_json::to_vec(&header)?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("save: {} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).at(&tmp)?;
        let mut w = BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes()).at(&tmp)?;
        w.write_all(&header).at(&tmp)?;
        for ((key, src), p) in items.iter().zip(&plan) {
            match src {
                Source::Raw { dtype, bytes, .. } if *dtype == p.dtype => {
                    w.write_all(bytes).at(&tmp)?;
                }
                Source::Raw {
                    dtype,
                    shape,
                    bytes,
                } => {
                    let from = float_dtype(dtype).ok_or_else(|| {
                        Error::model(format!("save: cannot convert {key} from {dtype}"))
                    })?;
                    let t = Tensor::from_raw_buffer(bytes, from, shape, &Device::Cpu)?;
                    let to = float_dtype(&p.dtype).unwrap_or(DType::F32);
                    w.write_all(&tensor_bytes(&t, to)?).at(&tmp)?;
                }
                Source::Tensor(t) => {
                    let to = float_dtype(&p.dtype).unwrap_or(t.dtype());
                    w.write_all(&tensor_bytes(t, to)?).at(&tmp)?;
                }
            }
        }
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().at(&tmp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).at(path)
}

// ---------------------------------------------------------------------------
// Hashes and info.

/// Hex SHA-256 of the whole file.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
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

/// Everything `eps2v ckpt info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// The file.
    pub path: String,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Model family.
    pub family: Family,
    /// Matching named UNet config (`sdxl_base`, `tiny`), if any.
    pub unet_config: Option<String>,
    /// Matching named VAE config (`sdxl`, `tiny`), if any.
    pub vae_config: Option<String>,
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
        let sha = if hash {
            Some(sha256_file(&self.path)?)
        } else {
            None
        };
        Ok(CheckpointInfo {
            path: self.path.display().to_string(),
            file_bytes: self.file_len(),
            family: self.family(),
            unet_config: self.detect_unet_config().map(|(n, _)| n.to_string()),
            vae_config: self.detect_vae_config().map(|(n, _)| n.to_string()),
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

    fn golden_unet_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/sdxl/unet_weights.safetensors")
    }

    /// The golden UNet config (see models/sdxl/tests.rs).
    fn cfg() -> UNetConfig {
        UNetConfig {
            model_channels: 8,
            num_head_channels: 8,
            context_dim: 16,
            pooled_dim: 8,
            num_groups: 4,
            ..UNetConfig::tiny()
        }
    }

    fn golden_tensors() -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = candle_core::safetensors::load(golden_unet_path(), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn write(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> PathBuf {
        let p = dir.join(name);
        save_tensors(&p, tensors, &SaveOptions::default()).unwrap();
        p
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Model(_) | Error::Candle(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        e.to_string()
    }

    #[test]
    fn valid_golden_file_passes_checks() {
        let ckpt = Checkpoint::open(golden_unet_path()).unwrap();
        assert_eq!(ckpt.family(), Family::SdxlUnet);
        ckpt.check_sdxl(&cfg(), None).unwrap();
        ckpt.check_finite("").unwrap();
        let p = ckpt.prediction();
        assert_eq!((p.prediction, p.ztsnr), (Prediction::Epsilon, false));
        assert!(p.source.contains("modelspec"), "{}", p.source);
    }

    #[test]
    fn truncated_file_is_reported_as_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(golden_unet_path()).unwrap();
        let p = dir.path().join("cut.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(
            e.contains("truncated") && e.contains("cut.safetensors"),
            "{e}"
        );
        std::fs::write(&p, &bytes[..5]).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn bad_headers_give_clear_errors_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        // Crafted huge header length: refused before any read of that size.
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(
            e.contains("bad safetensors header") && e.contains("limit"),
            "{e}"
        );
        // Header length beyond the end of the file.
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("truncated"), "{e}");
        // Invalid JSON.
        let mut b = 8u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{not js}");
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("bad safetensors header: invalid JSON"), "{e}");
        // Byte range that does not match dtype × shape.
        let h = br#"{"a":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,4]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&[0; 4]);
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("wrong size") && e.contains("tensor a"), "{e}");
    }

    #[test]
    fn sd15_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let p = write(
            dir.path(),
            "sd15.safetensors",
            &[
                (
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                    t.clone(),
                ),
                ("model.diffusion_model.input_blocks.0.0.weight".into(), t),
            ],
        );
        let ckpt = Checkpoint::open(&p).unwrap();
        assert_eq!(ckpt.family(), Family::Sd1);
        let e = err_of(ckpt.check_sdxl(&UNetConfig::sdxl_base(), Some(&VaeConfig::sdxl())));
        assert!(
            e.contains("not an SDXL checkpoint") && e.contains("1.5-style"),
            "{e}"
        );
    }

    #[test]
    fn other_families_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        for (key, family) in [
            ("lora_unet_down_blocks_0_attentions_0.alpha", Family::Lora),
            ("cond_stage_model.model.ln_final.weight", Family::Sd2),
            ("down_blocks.0.resnets.0.conv1.weight", Family::Diffusers),
            ("something.else", Family::Unknown),
        ] {
            let p = write(dir.path(), "f.safetensors", &[(key.into(), t.clone())]);
            assert_eq!(Checkpoint::open(&p).unwrap().family(), family, "{key}");
        }
        // A diffusers folder.
        std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
        let e = err_of(Checkpoint::open(dir.path()));
        assert!(e.contains("diffusers model folder"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut ts = golden_tensors();
        ts.retain(|(k, _)| k != "model.diffusion_model.out.2.weight");
        let p = write(dir.path(), "m.safetensors", &ts);
        let ckpt = Checkpoint::open(&p).unwrap();
        let e = err_of(ckpt.check_sdxl(&cfg(), None));
        assert!(
            e.contains("missing 1 key (model.diffusion_model.out.2.weight)"),
            "{e}"
        );
        let e = err_of(ckpt.load_unet(&cfg(), DType::F32, &Device::Cpu));
        assert!(e.contains("missing 1 key"), "{e}");
    }

    #[test]
    fn wrong_shape_is_named_with_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ts = golden_tensors();
        for (k, t) in ts.iter_mut() {
            if k == "model.diffusion_model.time_embed.0.weight" {
                *t = t.t().unwrap().contiguous().unwrap();
            }
        }
        let p = write(dir.path(), "s.safetensors", &ts);
        let e = err_of(Checkpoint::open(&p).unwrap().check_sdxl(&cfg(), None));
        assert!(
            e.contains("1 tensor with the wrong shape")
                && e.contains("time_embed.0.weight expected [32, 8] found [8, 32]"),
            "{e}"
        );
    }

    #[test]
    fn nan_weights_are_refused_on_check_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut ts = golden_tensors();
        for (k, t) in ts.iter_mut() {
            if k == "model.diffusion_model.middle_block.1.proj_in.weight" {
                let mut v = t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
                v[3] = half::f16::NAN;
                *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            }
        }
        let p = write(dir.path(), "n.safetensors", &ts);
        let ckpt = Checkpoint::open(&p).unwrap();
        ckpt.check_sdxl(&cfg(), None).unwrap();
        let e = err_of(ckpt.check_finite(""));
        assert!(
            e.contains("middle_block.1.proj_in.weight contains NaN") && e.contains("element 3"),
            "{e}"
        );
        let e = err_of(ckpt.load_unet(&cfg(), DType::F32, &Device::Cpu));
        assert!(e.contains("contains NaN"), "{e}");
    }

    #[test]
    fn pickle_and_fp8_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.ckpt");
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("convert to safetensors"), "{e}");
        let p = dir.path().join("renamed.safetensors");
        std::fs::write(&p, b"PK\x03\x04 some zip archive").unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("convert to safetensors"), "{e}");

        let h = br#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&[0x38, 0x40]);
        let p = dir.path().join("fp8.safetensors");
        std::fs::write(&p, &b).unwrap();
        let ckpt = Checkpoint::open(&p).unwrap();
        let e = err_of(ckpt.tensor("w", DType::F32, &Device::Cpu));
        assert!(e.contains("F8_E4M3") && e.contains("fp8"), "{e}");
    }

    #[test]
    fn save_round_trips_markers_dtype_and_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let src = Checkpoint::open(golden_unet_path()).unwrap();
        let key = "model.diffusion_model.out.2.bias";
        let new_bias = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let replacements = HashMap::from([(key.to_string(), new_bias.clone())]);
        let opts = SaveOptions {
            dtype: Some(DType::BF16),
            v_pred: true,
            ztsnr: true,
            metadata: BTreeMap::from([(META_PREDICTION_TYPE.to_string(), "v".to_string())]),
        };
        let out = dir.path().join("v.safetensors");
        src.save_with(&out, &replacements, &opts).unwrap();
        let v = Checkpoint::open(&out).unwrap();
        let p = v.prediction();
        assert_eq!((p.prediction, p.ztsnr), (Prediction::V, true));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(v.entries().len(), src.entries().len() + 2);
        assert!(v
            .entries()
            .values()
            .filter(|e| e.numel() > 0)
            .all(|e| e.dtype == "BF16"));
        assert_eq!(v.metadata()["modelspec.architecture"], "eps2v-golden-sdxl");
        let got = v.tensor(key, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        v.check_sdxl(&cfg(), None).unwrap();
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // Back to epsilon: markers off, f32.
        let out2 = dir.path().join("eps.safetensors");
        let opts = SaveOptions {
            dtype: Some(DType::F32),
            metadata: BTreeMap::from([(META_PREDICTION_TYPE.to_string(), "epsilon".to_string())]),
            ..Default::default()
        };
        v.save_with(&out2, &HashMap::new(), &opts).unwrap();
        let e = Checkpoint::open(&out2).unwrap();
        assert_eq!(e.prediction().prediction, Prediction::Epsilon);
        assert!(!e.contains(MARKER_V_PRED) && !e.contains(MARKER_ZTSNR));
        assert_eq!(e.entry(key).unwrap().dtype, "F32");
        // Wrong replacement shape is refused.
        let bad = HashMap::from([(
            key.to_string(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        )]);
        let err = err_of(src.save_with(
            dir.path().join("x.safetensors"),
            &bad,
            &SaveOptions::default(),
        ));
        assert!(err.contains("replacement") && err.contains("[3]"), "{err}");
    }

    #[test]
    fn text_encoder_reference_keys_are_complete() {
        let keys = sdxl_text_encoder_keys();
        assert_eq!(keys.len(), 586);
        let params: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 123_060_480 + 694_659_841);
    }

    #[test]
    fn autov2_is_first_ten_hex_of_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let sha = sha256_file(&p).unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(autov2(&sha), "ba7816bf8f");
    }

    #[test]
    fn info_counts_components() {
        let ckpt = Checkpoint::open(golden_unet_path()).unwrap();
        let info = ckpt.info(true).unwrap();
        assert_eq!(info.components.len(), 1);
        let unet = &info.components[0];
        assert_eq!(unet.name, "unet");
        assert_eq!(unet.tensors, 500);
        assert_eq!(unet.parameters, 437_588);
        assert_eq!(info.dtypes["F16"], 500);
        assert_eq!(info.autov2.as_deref().map(str::len), Some(10));
    }
}
