//! Seeded random tagger folders (`config.json`, `model.safetensors`,
//! `selected_tags.csv`) in the WD layout, as `pipeline::tiny` does for SDXL.
//!
//! Why: caption / filter tests, their benchmark and the toy world need a
//! complete tagger that exercises the real loading path in milliseconds.
//! Weights are [`crate::models::sdxl::init_params`] from a seed, so a folder
//! is byte-for-byte reproducible. Each tag can get a head bias: with
//! untrained weights the logits stay within a few units of the bias, so a
//! bias of ±8 makes a tag certain (p > 0.99) or absent (p < 0.01) on every
//! image — tests choose exactly what the tagger "sees".

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::config::TaggerConfig;
use super::labels::{Labels, CATEGORY_CHARACTER, CATEGORY_GENERAL, CATEGORY_RATING};
use super::vit::VisionTransformer;
use super::{CONFIG_FILE, MODEL_FILE, TAGS_FILE};
use crate::error::IoContext;
use crate::models::sdxl::checkpoint::{save_tensors, SaveOptions};
use crate::models::sdxl::init_params;
use crate::{Error, Result};

/// One output of a tiny tagger.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyTag {
    /// Name as in `selected_tags.csv` (underscores).
    pub name: String,
    /// Danbooru category (0 general, 4 character, 9 rating).
    pub category: u32,
    /// Added to the head bias of this output (logit offset).
    pub bias: f32,
}

impl TinyTag {
    /// A tag with a head bias.
    pub fn new(name: &str, category: u32, bias: f32) -> Self {
        Self {
            name: name.into(),
            category,
            bias,
        }
    }
}

/// What [`write_random_tagger`] writes.
#[derive(Debug, Clone)]
pub struct TinyTaggerOptions {
    /// Seed of the weights.
    pub seed: u64,
    /// Architecture; `num_classes` is set to `tags.len()`.
    pub config: TaggerConfig,
    /// Outputs in order.
    pub tags: Vec<TinyTag>,
}

impl TinyTaggerOptions {
    /// A small Danbooru-like vocabulary: four ratings (`general` certain),
    /// count / hair / eye / expression / framing tags, a kaomoji and one
    /// character, with biases: `1girl`, `solo`, `long_hair`, `smile`
    /// certain; `red_hair`, `1boy`, `^_^` and the character absent; the rest
    /// left to the random weights.
    pub fn with_default_tags(seed: u64) -> Self {
        let g = CATEGORY_GENERAL;
        let tags = vec![
            TinyTag::new("general", CATEGORY_RATING, 8.0),
            TinyTag::new("sensitive", CATEGORY_RATING, -8.0),
            TinyTag::new("questionable", CATEGORY_RATING, -8.0),
            TinyTag::new("explicit", CATEGORY_RATING, -8.0),
            TinyTag::new("1girl", g, 8.0),
            TinyTag::new("solo", g, 8.0),
            TinyTag::new("long_hair", g, 8.0),
            TinyTag::new("smile", g, 8.0),
            TinyTag::new("red_hair", g, -8.0),
            TinyTag::new("1boy", g, -8.0),
            TinyTag::new("^_^", g, -8.0),
            TinyTag::new("blue_eyes", g, 0.0),
            TinyTag::new("upper_body", g, 0.0),
            TinyTag::new("white_background", g, 0.0),
            TinyTag::new("hatsune_miku", CATEGORY_CHARACTER, -8.0),
        ];
        Self {
            seed,
            config: TaggerConfig::tiny(tags.len()),
            tags,
        }
    }
}

/// Write a seeded random tagger folder to `dir` (created if missing; each
/// file written atomically).
pub fn write_random_tagger(dir: &Path, opts: &TinyTaggerOptions) -> Result<()> {
    if opts.tags.is_empty() {
        return Err(Error::config("tiny tagger: at least one tag is needed"));
    }
    let mut cfg = opts.config.clone();
    cfg.num_classes = opts.tags.len();
    std::fs::create_dir_all(dir).at(dir)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    VisionTransformer::new(vb, &cfg)?;
    init_params(&varmap, opts.seed)?;
    let mut tensors = crate::models::sdxl::varmap_tensors(&varmap)?;
    let bias: Vec<f32> = opts.tags.iter().map(|t| t.bias).collect();
    tensors.insert(
        "head.bias".into(),
        Tensor::from_vec(bias, cfg.num_classes, &Device::Cpu)?,
    );
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let labels = Labels::new(
        opts.tags
            .iter()
            .map(|t| (t.name.clone(), t.category))
            .collect(),
    );
    save_tagger_folder(dir, &cfg, &labels, &tensors)
}

/// Write a tagger folder: `model.safetensors` (f32, timm key names, as
/// given), `selected_tags.csv` from `labels` and `config.json` from `cfg`,
/// each atomically; `dir` is created if missing. Used by the random
/// taggers here and by trained ones (the toy tagger).
pub fn save_tagger_folder(
    dir: &Path,
    cfg: &TaggerConfig,
    labels: &Labels,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    if labels.len() != cfg.num_classes {
        return Err(Error::config(format!(
            "tagger {}: {} labels for {} outputs; selected_tags.csv needs one row per output",
            dir.display(),
            labels.len(),
            cfg.num_classes
        )));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    save_tensors(
        dir.join(MODEL_FILE),
        tensors,
        &SaveOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )?;
    crate::atomic::write(&dir.join(TAGS_FILE), labels.to_csv().as_bytes(), false)?;
    let json = serde_json::to_vec_pretty(&cfg.to_json())?;
    crate::atomic::write(&dir.join(CONFIG_FILE), &json, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tagger::Tagger;

    #[test]
    fn written_folder_loads_and_is_reproducible() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let opts = TinyTaggerOptions::with_default_tags(5);
        write_random_tagger(a.path(), &opts).unwrap();
        write_random_tagger(b.path(), &opts).unwrap();
        for f in [MODEL_FILE, TAGS_FILE, CONFIG_FILE] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        let t = Tagger::load(a.path(), &Device::Cpu).unwrap();
        assert_eq!(t.labels.len(), opts.tags.len());
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let p = t.probabilities(&x).unwrap();
        assert_eq!(p.len(), 2);
        // Biased outputs are certain either way.
        let i = t.labels.index_of("1girl").unwrap();
        let j = t.labels.index_of("red hair").unwrap();
        assert!(p[0][i] > 0.99 && p[0][j] < 0.01, "{:?}", p[0]);
    }
}
