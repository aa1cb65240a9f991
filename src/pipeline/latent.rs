//! Sampling one image from a given starting latent: the whole of `eps2v
//! sample` for one image (prompt → both text encoders → CFG with rescale →
//! sampler → f32 VAE decode → RGB), with the initial latent, σ list and
//! schedule supplied by the caller instead of drawn from a seed.
//!
//! Why: an end-to-end golden against diffusers' `StableDiffusionXLPipeline`
//! needs the same starting point on both sides (diffusers takes
//! `latents=`), and the schedule diffusers uses (its ZTSNR terminal ᾱ is
//! 2⁻²⁴, [`TerminalClamp::Diffusers`](crate::diffusion::TerminalClamp)).
//! [`crate::pipeline::sample::generate`] composes the same pieces with its
//! seeded latent; a test below checks the two give identical images, and
//! the golden test (`fixtures/scripts/gen_pipeline_goldens.py`) checks this
//! path against diffusers within 1e-3 on the decoded floats.
//!
//! The result also counts the UNet calls and rows ([`Bound::unet_calls`]),
//! so tests can see that CFG 1 skips the unconditional branch.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::model::{Bound, SdxlModel};
use crate::diffusion::noise::NoiseSource;
use crate::diffusion::sampler::{sample_with, Sampler};
use crate::diffusion::{
    CfgDenoiser, Denoiser, Guidance, ModelDenoiser, NoiseSchedule, SamplerKind, TimestepMode,
    UncondMode,
};
use crate::{Error, Result};

/// What to sample (everything but the model and the starting latent).
#[derive(Debug, Clone)]
pub struct LatentRequest<'a> {
    /// Prompt (A1111 syntax).
    pub prompt: &'a str,
    /// Unconditional branch.
    pub uncond: &'a UncondMode,
    /// CFG scale; 1 runs the conditional branch only.
    pub cfg: f64,
    /// CFG rescale φ (applied in v-space, ComfyUI `RescaleCFG`).
    pub rescale: f64,
    /// Sampler.
    pub sampler: SamplerKind,
    /// The noise schedule (σ ↔ timestep table).
    pub schedule: &'a NoiseSchedule,
    /// σ list, descending, ending in 0 (`steps + 1` entries).
    pub sigmas: &'a [f64],
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

/// One sampled image and how it was made.
#[derive(Debug)]
pub struct LatentSample {
    /// The final latent, `(1, 4, h/8, w/8)` (UNet scale, before the VAE).
    pub latent: Tensor,
    /// The decoded image `(1, 3, H, W)`, f32 in [0, 1]: `clamp((x+1)/2)`
    /// before quantisation (diffusers' `output_type="np"`).
    pub decoded: Tensor,
    /// The image as RGB8 (`round(255·decoded)`).
    pub image: RgbImage,
    /// UNet calls made.
    pub unet_calls: usize,
    /// UNet rows run (images × branches, summed over calls).
    pub unet_rows: usize,
}

/// Sample one image starting from `x_init`, the k-form sample at
/// `req.sigmas[0]` (`(1, 4, h/8, w/8)`: unit noise times the initial noise
/// scale). `noise` feeds ancestral samplers (unused by Euler / DPM++ 2M).
pub fn sample_from_latent(
    model: &SdxlModel,
    req: &LatentRequest<'_>,
    x_init: Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<LatentSample> {
    let (c, h, w) = model.latent_shape(req.width, req.height)?;
    if x_init.dims() != [1, c, h, w] {
        return Err(Error::config(format!(
            "initial latent has shape {:?}; a {}x{} image needs (1, {c}, {h}, {w})",
            x_init.dims(),
            req.width,
            req.height
        )));
    }
    let guided = req.cfg != 1.0;
    let (cond, uncond) = model.conditioning(req.prompt, req.uncond)?;
    let bound = Bound::new(
        &model.unet,
        &cond,
        guided.then_some(&uncond),
        req.height,
        req.width,
    )?;
    let inner = ModelDenoiser {
        model: &bound,
        prediction: model.info.prediction,
        schedule: req.schedule,
        timestep_mode: TimestepMode::Nearest,
    };
    let cfg_denoiser;
    let denoiser: &dyn Denoiser = if guided {
        cfg_denoiser = CfgDenoiser {
            inner,
            guidance: Guidance {
                scale: req.cfg,
                rescale: req.rescale,
            },
        };
        &cfg_denoiser
    } else {
        &inner
    };
    let x = x_init.to_device(&model.device)?;
    let latent = sample_with(
        denoiser,
        req.sigmas,
        x,
        Sampler::new(req.sampler),
        noise,
        &mut |_| Ok(()),
    )?;
    let decoded = decode_unit(model, &latent)?;
    let image = to_rgb8(&decoded)?;
    let (unet_calls, unet_rows) = bound.unet_calls();
    Ok(LatentSample {
        latent,
        decoded,
        image,
        unet_calls,
        unet_rows,
    })
}

/// VAE-decode a UNet-scale latent `(1, 4, h, w)` in f32 to `(1, 3, H, W)`
/// floats in [0, 1] (`clamp((x + 1) / 2, 0, 1)`, as diffusers'
/// `VaeImageProcessor.postprocess`), on the CPU; NaN/inf is a model error.
pub fn decode_unit(model: &SdxlModel, latent: &Tensor) -> Result<Tensor> {
    let img = model.vae.decode_scaled(&latent.to_dtype(DType::F32)?)?; // (1, 3, H, W)
    let img = ((img.to_device(&Device::Cpu)? + 1.0)? * 0.5)?;
    let finite = img
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(Error::model(
            "the model produced NaN/inf (check the prediction type with --prediction, or the checkpoint with `eps2v ckpt check`)",
        ));
    }
    Ok(img.clamp(0f32, 1f32)?)
}

/// RGB8 → `(1, 3, H, W)` floats in [−1, 1] on `device` (what the VAE
/// encoder takes: `v / 127.5 − 1`).
pub fn from_rgb8(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let x: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(x, (1, h as usize, w as usize, 3), device)?.permute((0, 3, 1, 2))?)
}

/// `(1, 3, H, W)` floats in [0, 1] → RGB8 (`round(255·x)`).
pub fn to_rgb8(unit: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = unit.dims4()?;
    if c != 3 {
        return Err(Error::model(format!(
            "vae decoded {c} channels, expected 3"
        )));
    }
    let data = unit
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?; // (H·W·3)
    let bytes: Vec<u8> = data.iter().map(|v| (v * 255.0).round() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::Other("decoded image buffer has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_nn::VarBuilder;

    use super::*;
    use crate::diffusion::noise::SeededNoise;
    use crate::diffusion::sampler::initial_latent;
    use crate::diffusion::{Prediction, ScheduleKind, TerminalClamp};
    use crate::models::sdxl::clip::{ClipTextConfig, SdxlTextEncoder};
    use crate::models::sdxl::tokenizer::VOCAB_SIZE;
    use crate::models::sdxl::{UNet, UNetConfig, Vae, VaeConfig, UNET_PREFIX, VAE_PREFIX};
    use crate::pipeline::model::{LoadOptions, ModelInfo};
    use crate::pipeline::sample::{generate, SampleConfig};
    use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn load(rel: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
    }

    /// The tiny single-file model of fixtures/scripts/gen_pipeline_goldens.py:
    /// UNet / VAE from fixtures/golden/sdxl (sgm), text encoders 8 wide with
    /// sparse token embeddings; f16 weights widened to f32.
    fn golden_model(prediction: Prediction, ztsnr: bool) -> SdxlModel {
        let mut ts = load("fixtures/golden/sdxl/unet_weights.safetensors");
        ts.extend(load("fixtures/golden/sdxl/vae_weights.safetensors"));
        let text = load("fixtures/golden/pipeline/sdxl_e2e_text.safetensors");
        for (k, v) in &text {
            if let Some(key) = k.strip_prefix("__rows.") {
                let rows = v.to_vec1::<i64>().unwrap();
                let vals = text[key].to_vec2::<f32>().unwrap();
                let w = vals[0].len();
                let mut full = vec![0f32; VOCAB_SIZE * w];
                for (r, row) in rows.iter().zip(&vals) {
                    full[*r as usize * w..(*r as usize + 1) * w].copy_from_slice(row);
                }
                ts.insert(
                    key.to_string(),
                    Tensor::from_vec(full, (VOCAB_SIZE, w), &Device::Cpu).unwrap(),
                );
            } else if !text.contains_key(&format!("__rows.{k}")) {
                ts.insert(k.clone(), v.clone());
            }
        }
        let ts: HashMap<String, Tensor> = ts
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
            .collect();
        let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
        // = golden_unet_config / golden_vae_config of src/models/sdxl/tests.rs.
        let unet_cfg = UNetConfig {
            model_channels: 8,
            num_head_channels: 8,
            context_dim: 16,
            pooled_dim: 8,
            num_groups: 4,
            ..UNetConfig::tiny()
        };
        let vae_cfg = VaeConfig {
            ch: 8,
            num_groups: 4,
            ..VaeConfig::tiny()
        };
        let text_cfg = |base: ClipTextConfig, projection| ClipTextConfig {
            width: 8,
            layers: 2,
            heads: 2,
            intermediate: 32,
            projection_dim: projection,
            ..base
        };
        SdxlModel {
            unet: UNet::new(vb.pp(UNET_PREFIX), &unet_cfg).unwrap(),
            text: SdxlTextEncoder::new(
                vb.clone(),
                &text_cfg(ClipTextConfig::clip_l(), None),
                &text_cfg(ClipTextConfig::open_clip_bigg(), Some(8)),
            )
            .unwrap(),
            vae: Vae::new(vb.pp(VAE_PREFIX), &vae_cfg).unwrap(),
            info: ModelInfo {
                path: fixture("fixtures/golden/pipeline"),
                stem: "golden".into(),
                autov2: None,
                unet_config: "golden".into(),
                vae_config: "golden".into(),
                text_config: "golden".into(),
                prediction,
                ztsnr,
                prediction_source: "test".into(),
                warnings: Vec::new(),
                trained_uncond: None,
                native_size: (64, 64),
            },
            device: Device::Cpu,
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Golden: diffusers `StableDiffusionXLPipeline` (Euler + CFG 5 on an eps
    /// model, leading spacing; Euler + CFG 5 with rescale 0.7 on a v + ZTSNR
    /// model, trailing spacing, terminal ᾱ 2⁻²⁴) from the same initial
    /// latents, on the same weights converted by diffusers' converters.
    #[test]
    fn whole_pipeline_matches_diffusers_sdxl() {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("fixtures/golden/pipeline/sdxl_e2e.json")).unwrap(),
        )
        .unwrap();
        let io = load("fixtures/golden/pipeline/sdxl_e2e_io.safetensors");
        let prompt = meta["prompt"].as_str().unwrap();
        let (width, height) = (
            meta["width"].as_u64().unwrap() as u32,
            meta["height"].as_u64().unwrap() as u32,
        );
        let steps = meta["steps"].as_u64().unwrap() as usize;
        for (case, prediction, ztsnr, kind) in [
            ("eps", Prediction::Eps, false, ScheduleKind::Leading),
            ("v_ztsnr", Prediction::V, true, ScheduleKind::Trailing),
        ] {
            let m = &meta["cases"][case];
            let model = golden_model(prediction, ztsnr);
            let schedule = NoiseSchedule::sdxl_with(ztsnr, TerminalClamp::Diffusers);
            let sigmas = kind.sigmas(&schedule, steps).unwrap();
            // Our σ list is diffusers' (they compute it in f32).
            let want: Vec<f64> = m["sigmas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(sigmas.len(), want.len(), "{case}");
            for (a, b) in sigmas.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{case}: σ {a} vs {b}");
            }
            let req = LatentRequest {
                prompt,
                uncond: &UncondMode::Zero,
                cfg: meta["cfg"].as_f64().unwrap(),
                rescale: m["rescale"].as_f64().unwrap(),
                sampler: SamplerKind::Euler,
                schedule: &schedule,
                sigmas: &sigmas,
                width,
                height,
            };
            let x_init = io[&format!("{case}.x_init")].clone();
            let out =
                sample_from_latent(&model, &req, x_init, &mut SeededNoise::new(&[0])).unwrap();
            let lat_err = max_abs(&out.latent, &io[&format!("{case}.latent")]);
            let img_err = max_abs(&out.decoded, &io[&format!("{case}.image")]);
            eprintln!("{case}: latent max abs err {lat_err:e}, image max abs err {img_err:e}");
            assert!(
                img_err <= 1e-3,
                "{case}: decoded image differs by {img_err}"
            );
            assert_eq!(out.image.dimensions(), (width, height));
            // CFG: one UNet call per step, two rows (cond + uncond) each.
            assert_eq!((out.unet_calls, out.unet_rows), (steps, 2 * steps));
        }
    }

    /// The counted path and `generate` make the same image from the same
    /// seed; CFG 1 runs one UNet row per step (no unconditional branch).
    #[test]
    fn cfg_one_skips_the_uncond_branch_and_generate_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write_random_checkpoint(
            &p,
            TinyOptions {
                seed: 11,
                v_pred_ztsnr: true,
            },
        )
        .unwrap();
        let model = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
        let schedule = model.schedule();
        for cfg in [1.0, 4.0] {
            let sc = SampleConfig {
                prompt: "1shape, red circle".into(),
                uncond: UncondMode::Zero,
                seed: 5,
                steps: 3,
                cfg,
                rescale: None,
                sampler: SamplerKind::Euler,
                schedule: None,
                width: 64,
                height: 96,
                batch: 1,
            };
            let r = sc.resolve(&model);
            let sigmas = r.schedule.sigmas(&schedule, sc.steps).unwrap();
            let x = initial_latent(&[5], (4, 12, 8), &sigmas, &schedule, &Device::Cpu).unwrap();
            let req = LatentRequest {
                prompt: &sc.prompt,
                uncond: &sc.uncond,
                cfg,
                rescale: r.rescale,
                sampler: sc.sampler,
                schedule: &schedule,
                sigmas: &sigmas,
                width: sc.width,
                height: sc.height,
            };
            let out = sample_from_latent(&model, &req, x, &mut SeededNoise::new(&[5])).unwrap();
            let rows_per_step = if cfg == 1.0 { 1 } else { 2 };
            assert_eq!(
                (out.unet_calls, out.unet_rows),
                (3, 3 * rows_per_step),
                "cfg {cfg}"
            );
            let g = generate(&model, &sc, &mut |_, _| {}).unwrap();
            assert_eq!(g[0].image.as_raw(), out.image.as_raw(), "cfg {cfg}");
        }
    }

    #[test]
    fn a_latent_of_the_wrong_shape_is_a_config_error() {
        let model = golden_model(Prediction::Eps, false);
        let schedule = NoiseSchedule::sdxl();
        let sigmas = ScheduleKind::Normal.sigmas(&schedule, 2).unwrap();
        let req = LatentRequest {
            prompt: "x",
            uncond: &UncondMode::Zero,
            cfg: 1.0,
            rescale: 0.0,
            sampler: SamplerKind::Euler,
            schedule: &schedule,
            sigmas: &sigmas,
            width: 96,
            height: 64,
        };
        // (h, w) swapped: 12 x 8 instead of 8 x 12.
        let x = Tensor::zeros((1, 4, 12, 8), DType::F32, &Device::Cpu).unwrap();
        let e = sample_from_latent(&model, &req, x, &mut SeededNoise::new(&[0])).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }
}
