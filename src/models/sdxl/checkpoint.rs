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
//! The configs themselves are inferred from the file
//! ([`Checkpoint::infer_unet_config`], [`Checkpoint::infer_vae_config`],
//! [`Checkpoint::infer_text_configs`]; rules in [`super::infer`]).
//!
//! Parts live in child files: `checkpoint_header.rs` (the safetensors
//! header parse and dtypes), `checkpoint_family.rs` (family, prediction
//! type), `checkpoint_keys.rs` (expected keys, validation),
//! `checkpoint_save.rs` (atomic writing), `checkpoint_info.rs` (`ckpt info`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use memmap2::Mmap;

use super::infer::{self, Inferred, ShapeMap, TextPair};
use super::{UNet, UNetConfig, Vae, VaeConfig, UNET_PREFIX, VAE_PREFIX};
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
/// Metadata key eps2v writes for ZTSNR-trained models (`"true"`): lets a
/// file saved without marker keys (`--no-markers`) still say so.
pub const META_ZTSNR: &str = "eps2v.ztsnr";
/// Metadata key eps2v writes with the unconditional conditioning a model
/// was trained with (`zero`, `empty`, `text:…`), the default of `sample`.
pub const META_UNCOND: &str = "eps2v.uncond";
/// safetensors metadata key written by sd-scripts / ModelSpec: the image
/// size the model was trained at, `WIDTHxHEIGHT` (`1024x1024`).
pub const META_RESOLUTION: &str = "modelspec.resolution";

/// Keys that loaders tolerate and never need (reference §1.1).
pub fn is_ignored_key(key: &str) -> bool {
    key.ends_with("position_ids")
        || key.ends_with("logit_scale")
        || key.starts_with("model_ema.")
        || key == "denoiser.sigmas"
}

/// A key that says how the model predicts: `v_pred`, `ztsnr`, and EDM's
/// `edm_vpred.*`, `edm_mean`, `edm_std`.
pub fn is_marker_key(key: &str) -> bool {
    matches!(key, MARKER_V_PRED | MARKER_ZTSNR | "edm_mean" | "edm_std")
        || key.starts_with("edm_vpred.")
}

#[path = "checkpoint_header.rs"]
mod header;
pub use header::TensorEntry;
use header::{dtype_size, first_non_finite, float_dtype, parse_header, st_dtype_name};

#[path = "checkpoint_family.rs"]
mod family;
pub use family::{Family, Prediction, PredictionInfo};

#[path = "checkpoint_keys.rs"]
mod keys;
pub(crate) use keys::shape_ok;
pub use keys::{
    record_shapes, sdxl_text_encoder_keys, unet_expected_keys, vae_expected_keys, ShapeMismatch,
    Validation,
};

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

/// What a file that is not safetensors holds, judged from its first
/// bytes, as an error naming the fix (`None`: nothing recognisable).
fn not_safetensors(path: &Path, head: &[u8]) -> Option<Error> {
    let p = path.display();
    // A renamed torch file: zip archive or bare pickle (protocol 2–5).
    if head.starts_with(b"PK\x03\x04")
        || (head.len() > 1 && head[0] == 0x80 && (2..=5).contains(&head[1]))
    {
        return Some(pickle_error(path));
    }
    // A real file starts with its header length, little-endian: NUL bytes
    // (≤ 100 MB). Text is judged only where the first 8 bytes are text, so
    // a truncated file whose length byte happens to be `{` or `<` is not
    // called JSON or HTML.
    let text = head.len() >= 8
        && head[..8]
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    let what = if text && head.starts_with(b"version https://git-lfs") {
        "is a Git LFS pointer (a small text file), not the weights: the clone was made without LFS; run `git lfs pull` in it, or download the file itself"
    } else if head.starts_with(b"GGUF") {
        "is a GGUF file (llama.cpp's quantised format); eps2v reads single-file .safetensors checkpoints"
    } else if text && head.trim_ascii_start().starts_with(b"<") {
        "is an HTML/XML page, not weights (a failed download, e.g. a login or error page); download the file again"
    } else if text && head.trim_ascii_start().starts_with(b"{") {
        "is JSON text, not weights (a config or index file?); give the .safetensors weights file"
    } else {
        return None;
    };
    Some(Error::model(format!("{p}: {what}")))
}

impl Checkpoint {
    /// Open and validate the header of a `.safetensors` file. Directories
    /// (diffusers folders) and pickle files are refused with a message
    /// saying what to do.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Ok(target) = std::fs::read_link(path) {
                    return Err(Error::model(format!(
                        "{}: a broken link (to {}, which does not exist); fix the link or give the checkpoint's own path",
                        path.display(),
                        target.display()
                    )));
                }
                return Err(Error::model(format!(
                    "{}: no such file; give the path of a single-file .safetensors checkpoint{}",
                    path.display(),
                    crate::error::relative_to_cwd(path)
                )));
            }
            m => m.at(path)?,
        };
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
        if !meta.is_file() {
            // A FIFO or device would block or stream forever.
            return Err(Error::model(format!(
                "{}: not a regular file (a pipe, socket or device); give a .safetensors file",
                path.display()
            )));
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
        let (entries, metadata) = parse_header(path, &mmap)
            .map_err(|e| not_safetensors(path, &mmap[..mmap.len().min(64)]).unwrap_or(e))?;
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

    /// Hex SHA-256 of every tensor under `prefixes` (key, dtype, shape and
    /// stored bytes, in key order): identifies one component (the VAE, the
    /// text encoders) independently of the rest of the file, e.g. to key
    /// caches that stay valid when only the UNet changes.
    pub fn component_sha256(&self, prefixes: &[&str]) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (k, e) in &self.entries {
            if prefixes.iter().any(|p| k.starts_with(p)) {
                h.update((k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                h.update(e.dtype.as_bytes());
                for d in &e.shape {
                    h.update((*d as u64).to_le_bytes());
                }
                h.update(self.bytes(e));
            }
        }
        hex::encode(h.finalize())
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.entries
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
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

    /// Key → shape of every tensor (input of [`super::infer`]).
    pub fn shape_map(&self) -> ShapeMap {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.shape.clone()))
            .collect()
    }

    /// The UNet config inferred from the file's keys and shapes (and our
    /// metadata for groups / head width), or a model error saying which key
    /// or shape breaks which rule.
    pub fn infer_unet_config(&self) -> Result<Inferred<UNetConfig>> {
        infer::infer_unet(
            &self.shape_map(),
            &format!("{UNET_PREFIX}."),
            &self.metadata,
        )
        .map_err(|e| {
            Error::model(format!(
                "{}: cannot infer the UNet config: {e}",
                self.path.display()
            ))
        })
    }

    /// The VAE config inferred from the file (`first_stage_model.*` or a
    /// standalone VAE), or a model error with the reason.
    pub fn infer_vae_config(&self) -> Result<Inferred<VaeConfig>> {
        let prefix = self.vae_prefix().ok_or_else(|| {
            Error::model(format!(
                "{}: no VAE in this file (no first_stage_model.encoder.conv_in.weight); eps2v needs the VAE in the checkpoint itself: give one with the VAE baked in (ComfyUI's CheckpointSave writes such a file; only `export --latents` also takes a standalone VAE file)",
                self.path.display()
            ))
        })?;
        let dotted = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        };
        infer::infer_vae(&self.shape_map(), &dotted, &self.metadata).map_err(|e| {
            Error::model(format!(
                "{}: cannot infer the VAE config: {e}",
                self.path.display()
            ))
        })
    }

    /// Both text-encoder configs inferred from the file, or a model error.
    pub fn infer_text_configs(&self) -> Result<Inferred<TextPair>> {
        infer::infer_text(&self.shape_map(), &self.metadata).map_err(|e| {
            Error::model(format!(
                "{}: cannot infer the text encoder configs: {e}",
                self.path.display()
            ))
        })
    }

    /// The inferred UNet config with its name (`sdxl_base`, `ssd_1b`,
    /// `tiny`…, or `custom`), or `None` when it cannot be inferred
    /// ([`Self::infer_unet_config`] says why).
    pub fn detect_unet_config(&self) -> Option<(&'static str, UNetConfig)> {
        let i = self.infer_unet_config().ok()?;
        Some((i.name.unwrap_or("custom"), i.config))
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

    /// The inferred VAE config with its name (`sdxl`, `tiny` or `custom`),
    /// or `None` ([`Self::infer_vae_config`] says why).
    pub fn detect_vae_config(&self) -> Option<(&'static str, VaeConfig)> {
        let i = self.infer_vae_config().ok()?;
        Some((i.name.unwrap_or("custom"), i.config))
    }

    /// Refuse anything that is not an SDXL base-style checkpoint (or UNet),
    /// with the family it looks like.
    pub fn require_sdxl_family(&self) -> Result<Family> {
        let family = self.family();
        if !matches!(family, Family::Sdxl | Family::SdxlUnet) {
            return Err(Error::model(format!(
                "{}: not an SDXL checkpoint: this looks like {}; eps2v needs a single-file SDXL checkpoint (model.diffusion_model.*, conditioner.embedders.*, first_stage_model.*)",
                self.path.display(),
                self.describe_family()
            )));
        }
        Ok(family)
    }

    /// Refuse non-SDXL files and check the UNet (and the VAE when `vae` is
    /// given and the file has one) key by key; a full-size file with text
    /// encoders also has them checked against the SDXL base key list.
    pub fn check_sdxl(&self, unet: &UNetConfig, vae: Option<&VaeConfig>) -> Result<()> {
        let family = self.require_sdxl_family()?;
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

    /// Fail when tensor `key` holds NaN or ±inf (an error naming the file
    /// and the key; a key not in the file passes).
    pub fn check_key_finite(&self, key: &str) -> Result<()> {
        match self.entries.get(key) {
            Some(e) => self.check_entry_finite(key, e),
            None => Ok(()),
        }
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
                "{}: no VAE in this file (no first_stage_model.encoder.conv_in.weight); eps2v needs the VAE in the checkpoint itself: give one with the VAE baked in (ComfyUI's CheckpointSave writes such a file; only `export --latents` also takes a standalone VAE file)",
                self.path.display()
            ))
        })?;
        self.validate(&vae_expected_keys(cfg, prefix)?, prefix)
            .into_result(&self.path, "VAE config")?;
        let vb = self.var_builder(dtype, device);
        Vae::new(if prefix.is_empty() { vb } else { vb.pp(prefix) }, cfg)
    }

    /// Write a copy of this checkpoint to `path` in the same layout, with
    /// `replacements` (same keys and shapes) swapped in, marker keys
    /// (all of [`is_marker_key`]'s, EDM's too) and metadata set by `opts`, and optional f16/bf16/f32 storage.
    pub fn save_with(
        &self,
        path: impl AsRef<Path>,
        replacements: &HashMap<String, Tensor>,
        opts: &SaveOptions,
    ) -> Result<()> {
        self.save_with_except(path, replacements, opts, |_| false)
    }

    /// [`Checkpoint::save_with`] leaving out the keys `drop` names (not
    /// replaced ones).
    pub fn save_with_except(
        &self,
        path: impl AsRef<Path>,
        replacements: &HashMap<String, Tensor>,
        opts: &SaveOptions,
        drop: impl Fn(&str) -> bool,
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
            // The prediction is `opts`' alone: a base's EDM keys would
            // override `v_pred` in ComfyUI.
            if is_marker_key(key) || (drop(key) && !replacements.contains_key(key)) {
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

#[path = "checkpoint_save.rs"]
mod save;
pub use save::{
    check_safetensors_name, is_partial_save, remove_partial_saves, save_lazy, save_tensors,
    LazyTensor, SaveOptions,
};
use save::{write_checkpoint, Source};

impl Checkpoint {
    /// A lazy copy of `key` as stored (for streaming saves); producing it
    /// fails on a NaN or ±inf in it.
    pub fn lazy(&self, key: &str) -> Result<LazyTensor<'_>> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| Error::model(format!("{}: no tensor {key}", self.path.display())))?;
        let dtype = float_dtype(&e.dtype).ok_or_else(|| {
            Error::model(format!(
                "{}: tensor {key} has dtype {} which eps2v cannot convert",
                self.path.display(),
                e.dtype
            ))
        })?;
        let key = key.to_string();
        Ok(LazyTensor {
            dtype,
            shape: e.shape.clone(),
            // A NaN or ±inf is refused as it streams (a merge would carry
            // it), not by a scan of the whole file first.
            produce: Box::new(move || {
                self.check_key_finite(&key)?;
                self.tensor(&key, dtype, &Device::Cpu)
            }),
        })
    }
}

#[path = "checkpoint_info.rs"]
mod info;
pub use info::{autov2, sha256_file, CheckpointInfo, ComponentInfo, ConfigStatus};

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
