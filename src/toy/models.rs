//! The `toy` model family: how its configs fit together, and seeded random
//! toy checkpoints / taggers (the starting point of `eps2v toy build`).
//!
//! The family (DESIGN.md §4): [`UNetConfig::toy`] (SDXL block layout,
//! widths 48/48/96), [`VaeConfig::toy`] (SDXL layout, factor 8),
//! [`TextConfigs::toy`] (CLIP-L-like 16 wide + bigG-like 32 wide: context
//! 48, pooled 32, real CLIP tokenizer and vocabulary), and
//! [`TaggerConfig::toy`] over the scene tags ([`super::scenes::all_tags`]).
//! A toy checkpoint is a normal single-file SDXL checkpoint: it loads with
//! no config given (the configs ride in its `eps2v.*_config` metadata, see
//! `models::sdxl::infer`) and reports `toy` for all three parts.

use std::path::Path;

use crate::models::sdxl::{UNetConfig, VaeConfig};
use crate::models::tagger::tiny::{write_random_tagger, TinyTag, TinyTaggerOptions};
use crate::models::tagger::{labels::CATEGORY_GENERAL, TaggerConfig};
use crate::pipeline::tiny::{write_random_model, TinyOptions};
use crate::pipeline::TextConfigs;
use crate::Result;

/// Write a seeded random toy SDXL checkpoint (f32) to `path`.
pub fn write_random_toy_model(path: &Path, opts: TinyOptions) -> Result<()> {
    write_random_model(
        path,
        &UNetConfig::toy(),
        &VaeConfig::toy(),
        &TextConfigs::toy(),
        opts,
    )
}

/// Options for a random toy tagger: [`TaggerConfig::toy`] over the scene
/// tags (Danbooru style, underscores, category general, head bias 0).
pub fn toy_tagger_options(seed: u64) -> TinyTaggerOptions {
    let tags: Vec<TinyTag> = super::scenes::all_tags()
        .iter()
        .map(|t| TinyTag::new(&t.replace(' ', "_"), CATEGORY_GENERAL, 0.0))
        .collect();
    TinyTaggerOptions {
        seed,
        config: TaggerConfig::toy(tags.len()),
        tags,
    }
}

/// Write a seeded random toy tagger folder (`model.safetensors`,
/// `selected_tags.csv`, `config.json`) to `dir`.
pub fn write_random_toy_tagger(dir: &Path, seed: u64) -> Result<()> {
    write_random_tagger(dir, &toy_tagger_options(seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{SamplerKind, UncondMode};
    use crate::pipeline::sample::{generate, SampleConfig};
    use crate::pipeline::{LoadOptions, SdxlModel};

    #[test]
    fn toy_configs_fit_together() {
        let u = UNetConfig::toy();
        u.validate().unwrap();
        VaeConfig::toy().validate().unwrap();
        assert_eq!(
            TextConfigs::toy().unet_dims(),
            (u.context_dim, u.pooled_dim)
        );
        assert_eq!(VaeConfig::toy().downsample_factor(), 8);
        assert_eq!(u.known_name(), Some("toy"));
        assert_eq!(VaeConfig::toy().known_name(), Some("toy"));
        // Every toy bucket gives latents the UNet's two halvings divide.
        for (w, h) in super::super::scenes::TOY_BUCKETS {
            assert_eq!((w / 8) % 4, 0);
            assert_eq!((h / 8) % 4, 0);
        }
        TaggerConfig::toy(61).check().unwrap();
    }

    /// A random toy checkpoint is a single-file SDXL checkpoint that loads
    /// with no config given, is recognised as `toy`, conditions on a toy
    /// prompt with the real CLIP tokenizer, and samples at a toy bucket.
    #[test]
    fn a_random_toy_model_saves_loads_without_config_and_samples() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("toy.safetensors");
        write_random_toy_model(
            &p,
            TinyOptions {
                seed: 11,
                v_pred_ztsnr: false,
            },
        )
        .unwrap();
        let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
        assert_eq!(m.info.unet_config, "toy");
        assert_eq!(m.info.vae_config, "toy");
        assert_eq!(m.info.text_config, "toy");
        assert_eq!(m.unet.config(), &UNetConfig::toy());
        assert_eq!(m.vae.config(), &VaeConfig::toy());
        // SDXL key layout: the three prefixes of a single-file checkpoint.
        let ck = crate::models::sdxl::checkpoint::Checkpoint::open(&p).unwrap();
        for key in [
            "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.text_projection",
            "first_stage_model.decoder.conv_out.weight",
        ] {
            assert!(ck.contains(key), "{key}");
        }
        let cfg = SampleConfig {
            prompt: "1shape, red circle, large, center, simple background, blue background".into(),
            uncond: UncondMode::Empty,
            seed: 1,
            steps: 2,
            cfg: 3.0,
            rescale: None,
            sampler: SamplerKind::Euler,
            schedule: None,
            width: 96,
            height: 64,
            batch: 1,
        };
        let g = generate(&m, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!((g[0].image.width(), g[0].image.height()), (96, 64));
        // The whole random file is about 30 MB (f32: the UNet 16.7, the two
        // 49408-row token tables 9.5; README, toy model configs).
        let mb = std::fs::metadata(&p).unwrap().len() as f64 / 1e6;
        assert!(mb < 32.0, "{mb} MB");
    }

    #[test]
    fn a_random_toy_tagger_loads_with_the_scene_tags() {
        let dir = tempfile::tempdir().unwrap();
        write_random_toy_tagger(dir.path(), 2).unwrap();
        let t = crate::models::tagger::Tagger::load(dir.path(), &candle_core::Device::Cpu).unwrap();
        let n = super::super::scenes::all_tags().len();
        assert_eq!(t.labels.len(), n);
        assert_eq!(t.config.img_size, 64);
    }
}
