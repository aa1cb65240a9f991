//! WD-style image taggers: the ViT of the WD v3 taggers
//! (`SmilingWolf/wd-vit-tagger-v3`) in candle, its tag list, its input
//! transform, and loading a tagger folder as the WD repos ship it.
//!
//! - [`config`]: [`TaggerConfig`] from/to the timm `config.json`
//!   (`wd_vit_v3()`, `tiny()`).
//! - [`vit`]: [`VisionTransformer`], timm key names, differentiable.
//! - [`labels`]: `selected_tags.csv` ([`Labels`]), kaomoji-aware tag names.
//! - [`preprocess`]: white alpha composite + centred white square pad +
//!   Pillow-exact bicubic resize + normalise + RGB→BGR ([`Preprocess`]).
//! - [`tiny`]: seeded random tagger folders for tests and the toy world.
//!
//! A tagger folder holds `model.safetensors` (timm state dict),
//! `selected_tags.csv` and `config.json`. Without `config.json` the
//! architecture is inferred from the tensor shapes, with the v3 defaults
//! for what shapes cannot tell ([`infer_config`]). ONNX-only folders are
//! refused with a hint.

pub mod config;
pub mod labels;
pub mod preprocess;
pub mod tiny;
pub mod vit;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::{GlobalPool, Interpolation, TaggerActivation, TaggerConfig};
pub use labels::{display_name, tag_key, Labels};
pub use preprocess::Preprocess;
pub use vit::VisionTransformer;

use crate::models::sdxl::checkpoint::{record_shapes, sha256_file, Checkpoint};
use crate::{Error, Result};

/// File names inside a tagger folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The tag list.
pub const TAGS_FILE: &str = "selected_tags.csv";
/// The timm config.
pub const CONFIG_FILE: &str = "config.json";

/// The files of one tagger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggerFiles {
    /// The tagger folder.
    pub dir: PathBuf,
    /// `model.safetensors`.
    pub model: PathBuf,
    /// `selected_tags.csv`.
    pub tags: PathBuf,
    /// `config.json`, when present.
    pub config: Option<PathBuf>,
}

impl TaggerFiles {
    /// Find the files of a tagger given its folder (or its `.safetensors`
    /// file, whose folder then holds the tag list and config).
    pub fn locate(path: &Path) -> Result<Self> {
        let (dir, model) = if path.is_dir() {
            (path.to_path_buf(), path.join(MODEL_FILE))
        } else if path.is_file() {
            // An SDXL checkpoint, a LoRA, a VAE given as the tagger: say
            // what it is (its folder has no tag list either).
            let family = Checkpoint::open(path)?.family();
            if family != crate::models::sdxl::checkpoint::Family::Unknown {
                return Err(Error::config(format!(
                    "{}: this is {}, not a WD tagger; --tagger takes a WD tagger folder (model.safetensors, selected_tags.csv, config.json, e.g. SmilingWolf/wd-vit-tagger-v3)",
                    path.display(),
                    family.describe()
                )));
            }
            let dir = crate::atomic::parent_of(path).to_path_buf();
            (dir, path.to_path_buf())
        } else {
            return Err(Error::config(format!(
                "{}: no such tagger folder; pass a WD tagger folder (model.safetensors, selected_tags.csv, config.json) with --tagger",
                path.display()
            )));
        };
        if !model.is_file() {
            let onnx = dir.join("model.onnx").is_file();
            return Err(Error::model(format!(
                "{}: no {MODEL_FILE}{}; eps2v runs the timm safetensors weights of the WD ViT taggers (download model.safetensors, selected_tags.csv and config.json from e.g. SmilingWolf/wd-vit-tagger-v3)",
                dir.display(),
                if onnx { " (only model.onnx)" } else { "" }
            )));
        }
        let tags = dir.join(TAGS_FILE);
        if !tags.is_file() {
            return Err(Error::model(format!(
                "{}: no {TAGS_FILE} beside the model; the tag list names the model's outputs and ships with it",
                dir.display()
            )));
        }
        let config = Some(dir.join(CONFIG_FILE)).filter(|p| p.is_file());
        Ok(Self {
            dir,
            model,
            tags,
            config,
        })
    }
}

/// Architecture from the tensor shapes of a timm ViT state dict, for tagger
/// folders without `config.json`: width and patch from
/// `patch_embed.proj.weight`, tokens (hence image size and class token) from
/// `pos_embed` / `cls_token`, depth from the `blocks.N` keys, MLP width from
/// `fc1`, `fc_norm` from its key, outputs from `head.weight`. What shapes
/// cannot tell takes the WD v3 values: 64-wide heads (every timm ViT size
/// but huge), tanh GELU, mean = std = 0.5, bicubic, average pooling unless
/// there is a class token.
pub fn infer_config(ck: &Checkpoint) -> Result<TaggerConfig> {
    let shape = |k: &str| -> Result<Vec<usize>> {
        ck.entry(k).map(|e| e.shape.clone()).ok_or_else(|| {
            Error::model(format!(
                "{}: no {k}; this is not a timm ViT state dict (and there is no config.json to say what it is)",
                ck.path().display()
            ))
        })
    };
    let pe = shape("patch_embed.proj.weight")?;
    let pos = shape("pos_embed")?;
    let fc1 = shape("blocks.0.mlp.fc1.weight")?;
    let head = shape("head.weight")?;
    let (&[d, 3, p, p2], &[1, tokens, d2], &[hidden, _], &[classes, _]) = (
        pe.as_slice(),
        pos.as_slice(),
        fc1.as_slice(),
        head.as_slice(),
    ) else {
        return Err(Error::model(format!(
            "{}: unexpected ViT shapes (patch_embed {pe:?}, pos_embed {pos:?}); add the model's config.json",
            ck.path().display()
        )));
    };
    let class_token = ck.contains("cls_token");
    let grid = ((tokens - usize::from(class_token)) as f64).sqrt().round() as usize;
    if p != p2 || d != d2 || grid * grid + usize::from(class_token) != tokens || d % 64 != 0 {
        return Err(Error::model(format!(
            "{}: cannot infer the architecture from its shapes (patch_embed {pe:?}, pos_embed {pos:?}); add the model's config.json",
            ck.path().display()
        )));
    }
    let depth = (0..)
        .take_while(|i| ck.contains(&format!("blocks.{i}.norm1.weight")))
        .count();
    let size = match d {
        192 => "tiny",
        384 => "small",
        1024 => "large",
        1280 => "huge",
        _ => "base",
    };
    let cfg = TaggerConfig {
        architecture: format!("vit_{size}_patch{p}_{}", grid * p),
        num_classes: classes,
        img_size: grid * p,
        patch_size: p,
        embed_dim: d,
        depth,
        num_heads: d / 64,
        mlp_hidden: hidden,
        qkv_bias: ck.contains("blocks.0.attn.qkv.bias"),
        class_token,
        global_pool: if class_token {
            GlobalPool::Token
        } else {
            GlobalPool::Avg
        },
        fc_norm: ck.contains("fc_norm.weight"),
        ..TaggerConfig::wd_vit_v3()
    };
    cfg.check()?;
    Ok(cfg)
}

/// A loaded tagger: model, tag list, transform.
#[derive(Debug)]
pub struct Tagger {
    /// Architecture and transform parameters.
    pub config: TaggerConfig,
    /// The outputs' tags.
    pub labels: Labels,
    /// The network.
    pub model: VisionTransformer,
    /// The input transform.
    pub preprocess: Preprocess,
    /// Identity recorded in the manifest: `<folder name>@<first 12 hex of
    /// sha256(model.safetensors)>`.
    pub id: String,
    /// The architecture was inferred from the shapes (no `config.json`):
    /// what shapes cannot tell (head width, activation) took WD v3's values.
    pub inferred_config: bool,
    device: Device,
    dtype: DType,
}

impl Tagger {
    /// Load a tagger folder (see [`TaggerFiles::locate`]) onto `device` in f32.
    /// Every problem — unsupported architecture, a tag list that does not
    /// match the model's outputs, missing / unexpected / mis-shaped keys —
    /// is an error naming the file, before anything else happens.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, DType::F32)
    }

    /// [`Tagger::load`] with the weights in `dtype` (`caption --precision`;
    /// the input batch is cast to it, the probabilities come back as f32).
    pub fn load_with(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let files = TaggerFiles::locate(path)?;
        let ck = Checkpoint::open(&files.model)?;
        let config = match &files.config {
            Some(p) => TaggerConfig::from_file(p)?,
            None => infer_config(&ck)?,
        };
        let labels = Labels::from_file(&files.tags)?;
        let outputs = ck.entry("head.weight").map(|e| e.shape.clone());
        if labels.len() != config.num_classes
            || outputs
                .as_ref()
                .is_some_and(|s| s.first() != Some(&labels.len()))
        {
            return Err(Error::model(format!(
                "{}: {} tags, but the model has {} outputs (config num_classes {}, head.weight {:?}); this tag list does not belong to this model",
                files.tags.display(),
                labels.len(),
                outputs
                    .as_ref()
                    .and_then(|s| s.first().copied())
                    .unwrap_or(config.num_classes),
                config.num_classes,
                outputs.unwrap_or_default()
            )));
        }
        let expected = record_shapes(|vb| VisionTransformer::new(vb, &config))?;
        ck.validate(&expected, "").into_result(
            &files.model,
            &format!("{} tagger layout of its config", config.architecture),
        )?;
        let model = VisionTransformer::new(ck.var_builder(dtype, device), &config)?;
        let sha = sha256_file(&files.model)?;
        let name = files
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tagger".into());
        Ok(Self {
            preprocess: Preprocess::new(&config),
            config,
            labels,
            model,
            id: format!("{name}@{}", &sha[..12]),
            inferred_config: files.config.is_none(),
            device: device.clone(),
            dtype,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of its weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sigmoid probabilities for a preprocessed batch `(b, 3, S, S)`: one
    /// vector of `labels.len()` values per image.
    pub fn probabilities(&self, batch: &Tensor) -> Result<Vec<Vec<f32>>> {
        let logits = self.model.forward(&batch.to_dtype(self.dtype)?)?;
        let probs = candle_nn::ops::sigmoid(&logits)?.to_dtype(DType::F32)?;
        let probs = probs.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        check_finite(&self.id, self.dtype, probs)
    }
}

/// A non-finite output would read as "no tag seen" (and the last rating
/// as the best): every image rejected by the alignment filter, silently.
fn check_finite(id: &str, dtype: DType, probs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
    match probs.iter().flatten().find(|p| !p.is_finite()) {
        None => Ok(probs),
        Some(p) => Err(Error::model(format!(
            "tagger {id}: a {p} among its outputs in {dtype:?}; rerun with --precision f32, or check the tagger's weights"
        ))),
    }
}
