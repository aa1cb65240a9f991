//! Prompt adherence of a model, measured by a tagger: sample a fixed
//! prompt × seed set with the model read as a given prediction type (eps,
//! or v + ZTSNR), tag each image, and score what the tagger sees against
//! the prompt. The run's summary and report show it for the base model as
//! eps, the same weights as v + ZTSNR before training, the converted model
//! and each merge.
//!
//! Two scores, one per kind of tagger:
//! - the toy world (a toy tagger and toy scene prompts): the attribute
//!   comparison of `eps2v toy eval` ([`crate::toy::eval`]): per image,
//!   count, shape kinds, shape colours and background read right; overall =
//!   the mean of the four shares. So the run's numbers and the toy gates are
//!   the same measure ([`score_toy`]);
//! - any other tagger and prompts (a real WD tagger on 1girl prompts): the
//!   share of each prompt's tagger-known tags that the tagger sees
//!   (probability ≥ the threshold), averaged over images, also per tag
//!   group ([`score`]).
//!
//! `eps2v run` only calls an [`AdherenceFn`]: any function of (model,
//! prediction settings) → [`Adherence`]; [`TaggerAdherence`] is the one it
//! uses by default.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::diffusion::Prediction;
use crate::models::tagger::labels::tag_key;
use crate::models::tagger::Tagger;
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::train::eval::{compose_grid, sample_set, EvalSpec};
use crate::Result;

/// Adherence of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adherence {
    /// 0..=1. Toy world: the mean of the four attribute shares; otherwise
    /// the mean over images of the share of the prompt's (tagger-known)
    /// tags that the tagger sees (module docs).
    pub overall: f64,
    /// Toy world: share of images with each attribute read right (`count`,
    /// `shapes`, `colours`, `background`). Otherwise: share of prompt tags
    /// seen per group (`count`, `shape`, `size`, `position`, `background`,
    /// `background colour`, `other`).
    pub per_attribute: BTreeMap<String, f64>,
    /// Share of images in which the tagger sees at least one
    /// `"{colour} {shape}"` tag ("still has shapes"); `None` when the
    /// tagger knows no shape tags (not the toy world).
    pub has_shapes: Option<f64>,
    /// Images sampled.
    pub images: usize,
}

/// What to measure: the model file and how to read it.
#[derive(Debug, Clone)]
pub struct AdherenceRequest<'a> {
    /// Single-file checkpoint.
    pub model: &'a Path,
    /// Prediction type to sample it as.
    pub prediction: Prediction,
    /// Sample on the ZTSNR schedule.
    pub ztsnr: bool,
    /// Write the sampled images here as a grid (rows: prompts; columns: seeds).
    pub grid: Option<&'a Path>,
}

/// The hook `eps2v run` measures adherence with.
pub type AdherenceFn<'a> = dyn Fn(&AdherenceRequest<'_>) -> Result<Adherence> + 'a;

/// The attribute of one toy tag (`other` for anything else).
pub fn attribute(tag: &str) -> &'static str {
    match crate::toy::parse_tags(tag) {
        Ok(s) if s.count.is_some() => "count",
        Ok(s) if !s.shapes.is_empty() => "shape",
        Ok(s) if s.size.is_some() => "size",
        Ok(s) if s.hpos.is_some() || s.vpos.is_some() => "position",
        Ok(s) if s.background.is_some() => "background",
        Ok(s) if s.background_colour.is_some() => "background colour",
        _ => "other",
    }
}

/// Score tagged images against their prompts: `probs[i]` are the tagger's
/// probabilities for the image of `prompts[i]`, over `labels`.
pub fn score(
    prompts: &[String],
    probs: &[Vec<f32>],
    labels: &[String],
    threshold: f32,
) -> Adherence {
    let index: BTreeMap<String, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (tag_key(l), i))
        .collect();
    let shape_idx: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, l)| attribute(&l.replace('_', " ")) == "shape")
        .map(|(i, _)| i)
        .collect();
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut sum, mut n, mut with_shapes) = (0.0, 0usize, 0usize);
    for (prompt, p) in prompts.iter().zip(probs) {
        let (mut hit, mut asked) = (0usize, 0usize);
        for tag in prompt.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let Some(&i) = index.get(&tag_key(tag)) else {
                continue;
            };
            let seen = p.get(i).is_some_and(|&x| x >= threshold);
            let e = per.entry(attribute(tag).to_string()).or_default();
            e.1 += 1;
            asked += 1;
            if seen {
                e.0 += 1;
                hit += 1;
            }
        }
        if asked > 0 {
            sum += hit as f64 / asked as f64;
            n += 1;
        }
        if shape_idx
            .iter()
            .any(|&i| p.get(i).is_some_and(|&x| x >= threshold))
        {
            with_shapes += 1;
        }
    }
    Adherence {
        overall: if n > 0 { sum / n as f64 } else { 0.0 },
        per_attribute: per
            .into_iter()
            .map(|(k, (h, a))| (k, h as f64 / a.max(1) as f64))
            .collect(),
        has_shapes: (!shape_idx.is_empty() && !probs.is_empty())
            .then(|| with_shapes as f64 / probs.len() as f64),
        images: probs.len(),
    }
}

/// Toy-world adherence (module docs): `None` unless `tagger` has every
/// scene tag and every prompt asks for a count, shapes and a background.
pub fn score_toy(tagger: &Tagger, prompts: &[String], probs: &[Vec<f32>]) -> Option<Adherence> {
    use crate::toy::eval::{judge, sees_a_shape};
    let asked: Vec<_> = prompts
        .iter()
        .map(|p| crate::toy::parse_tags(p).ok())
        .collect::<Option<Vec<_>>>()?;
    if asked.is_empty()
        || asked
            .iter()
            .any(|s| s.count.is_none() || s.shapes.is_empty() || s.background.is_none())
    {
        return None;
    }
    let mut oks = Vec::with_capacity(probs.len());
    let mut with_shapes = 0usize;
    for (a, p) in asked.iter().zip(probs) {
        oks.push(judge(tagger, a, p).ok()?.0);
        with_shapes += usize::from(sees_a_shape(tagger, p));
    }
    let shares = crate::toy::eval::shares(&oks);
    Some(Adherence {
        overall: shares.mean(),
        per_attribute: [
            ("count", shares.count),
            ("shapes", shares.shapes),
            ("colours", shares.colours),
            ("background", shares.background),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        has_shapes: Some(with_shapes as f64 / oks.len().max(1) as f64),
        images: oks.len(),
    })
}

/// Adherence by a WD tagger over a fixed prompt × seed set.
pub struct TaggerAdherence {
    tagger: Tagger,
    spec: EvalSpec,
    threshold: f32,
    placement: LoadOptions,
}

impl TaggerAdherence {
    /// Load the tagger folder; `spec` is the prompt × seed set and its
    /// sampling settings; `placement` the device and dtype of the models.
    pub fn new(
        tagger: &Path,
        spec: EvalSpec,
        threshold: f32,
        placement: LoadOptions,
    ) -> Result<Self> {
        Ok(Self {
            tagger: Tagger::load(tagger, &Device::Cpu)?,
            spec,
            threshold,
            placement,
        })
    }

    /// Sample, tag and score (see the module docs).
    pub fn measure(&self, req: &AdherenceRequest<'_>) -> Result<Adherence> {
        let model = SdxlModel::load(
            req.model,
            &LoadOptions {
                prediction: Some(req.prediction),
                ztsnr: Some(req.ztsnr),
                hash: false,
                ..self.placement.clone()
            },
        )?;
        let images = sample_set(&model, &self.spec)?;
        drop(model);
        if let Some(grid) = req.grid {
            write_grid(grid, &images, &self.spec)?;
        }
        let mut probs = Vec::with_capacity(images.len());
        for chunk in images.chunks(16) {
            let pre: Vec<Vec<f32>> = chunk
                .iter()
                .map(|i| self.tagger.preprocess.image(i))
                .collect();
            let batch = self.tagger.preprocess.batch(&pre, self.tagger.device())?;
            probs.extend(self.tagger.probabilities(&batch)?);
        }
        let prompts: Vec<String> = self
            .spec
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), self.spec.seeds.len()))
            .collect();
        Ok(score_toy(&self.tagger, &prompts, &probs)
            .unwrap_or_else(|| score(&prompts, &probs, &self.tagger.labels.names, self.threshold)))
    }
}

/// Write prompt-major `images` as a grid: one row per prompt, one column
/// per seed.
pub fn write_grid(path: &Path, images: &[RgbImage], spec: &EvalSpec) -> Result<()> {
    let s = spec.seeds.len().max(1);
    let columns: Vec<Vec<RgbImage>> = (0..s)
        .map(|c| images.iter().skip(c).step_by(s).cloned().collect())
        .collect();
    let g = compose_grid(&columns, spec.width, spec.height);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    crate::pipeline::sample::write_atomic(path, &crate::stages::bucket::encode_png_fast(&g)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toy_tags_fall_into_attributes() {
        assert_eq!(attribute("1shape"), "count");
        assert_eq!(attribute("red circle"), "shape");
        assert_eq!(attribute("large"), "size");
        assert_eq!(attribute("left"), "position");
        assert_eq!(attribute("top"), "position");
        assert_eq!(attribute("striped background"), "background");
        assert_eq!(attribute("blue background"), "background colour");
        assert_eq!(attribute("masterpiece"), "other");
    }

    #[test]
    fn scores_count_seen_prompt_tags() {
        let labels: Vec<String> = ["1shape", "red_circle", "blue_square", "blue_background"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let prompts = vec![
            "1shape, red circle, blue background".to_string(),
            "1shape, blue square, blue background, masterpiece".to_string(),
        ];
        // Image 0: everything seen; image 1: only the count.
        let probs = vec![vec![0.9, 0.8, 0.1, 0.5], vec![0.9, 0.1, 0.2, 0.1]];
        let a = score(&prompts, &probs, &labels, 0.35);
        assert!((a.overall - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12, "{a:?}");
        assert_eq!(a.per_attribute["count"], 1.0);
        assert_eq!(a.per_attribute["shape"], 0.5);
        assert_eq!(a.per_attribute["background colour"], 0.5);
        assert!(!a.per_attribute.contains_key("other"));
        assert_eq!(a.has_shapes, Some(0.5));
        assert_eq!(a.images, 2);
    }

    /// With a toy tagger and toy prompts the score is `toy eval`'s
    /// attribute comparison; other prompts fall back to tag recall.
    #[test]
    fn toy_prompts_are_scored_by_attributes() {
        let dir = tempfile::tempdir().unwrap();
        crate::toy::models::write_random_toy_tagger(dir.path(), 1).unwrap();
        let tagger = Tagger::load(dir.path(), &Device::Cpu).unwrap();
        let names = &tagger.labels.names;
        let probs_for = |on: &[&str]| -> Vec<f32> {
            names
                .iter()
                .map(|n| if on.contains(&n.as_str()) { 0.9 } else { 0.05 })
                .collect()
        };
        let prompt =
            "1shape, red circle, large, center, simple background, blue background".to_string();
        // Right but for the shape's colour (a green circle drawn).
        let seen = probs_for(&[
            "1shape",
            "green_circle",
            "large",
            "simple_background",
            "blue_background",
        ]);
        let a = score_toy(&tagger, std::slice::from_ref(&prompt), &[seen]).unwrap();
        assert_eq!(a.per_attribute["count"], 1.0);
        assert_eq!(a.per_attribute["shapes"], 1.0);
        assert_eq!(a.per_attribute["colours"], 0.0);
        assert_eq!(a.per_attribute["background"], 1.0);
        assert!((a.overall - 0.75).abs() < 1e-12);
        assert_eq!((a.has_shapes, a.images), (Some(1.0), 1));
        // Nothing above 0.5: the reading still names a shape, has_shapes does not.
        let a = score_toy(&tagger, &[prompt], &[vec![0.1; names.len()]]).unwrap();
        assert_eq!(a.has_shapes, Some(0.0));
        // A 1girl prompt is not a toy prompt.
        assert!(score_toy(
            &tagger,
            &["1girl, solo".to_string()],
            &[vec![0.1; names.len()]]
        )
        .is_none());
    }
}
