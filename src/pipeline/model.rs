//! Loading a single-file SDXL checkpoint (UNet + CLIP-L + OpenCLIP bigG +
//! VAE) for inference, turning prompts into conditioning, and binding the
//! UNet to that conditioning as the raw ε/v predictor the samplers of
//! [`crate::diffusion`] drive.
//!
//! Config detection follows `eps2v ckpt info`: the UNet and VAE widths are
//! matched against the named configs (`sdxl_base` / `tiny`,
//! [`Checkpoint::detect_unet_config`]); the text encoders are matched by the
//! widths of their token embeddings against [`TextConfigs::candidates`], and
//! every key of the chosen configs is then checked (missing / unexpected /
//! wrong shape is a model error, exit 2).
//!
//! Prediction type: marker keys (`v_pred`, `ztsnr`), then
//! `modelspec.prediction_type` ([`Checkpoint::prediction`]); both can be
//! overridden ([`LoadOptions`]). EDM checkpoints (CosXL, Playground) are
//! refused: their σ parameterisation is not the SDXL discrete schedule.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::diffusion::{
    NoisePredictor, NoiseSchedule, PairPredictor, Prediction, TerminalClamp, UncondMode,
};
use crate::models::sdxl::checkpoint::{
    self, record_shapes, Checkpoint, Family, Prediction as CkptPrediction,
};
use crate::models::sdxl::clip::{
    ClipTextConfig, ClipTextModel, SdxlTextEncoder, TextConditioning, BIGG_MODEL_PREFIX,
    CLIP_L_MODEL_PREFIX,
};
use crate::models::sdxl::{build_y, SizeCond, UNet, UNetConfig, Vae, VaeConfig};
use crate::{Error, Result};

/// The two text-encoder configs of one SDXL variant.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfigs {
    /// Name (`sdxl`, `tiny`).
    pub name: &'static str,
    /// Text encoder 1 (CLIP-L).
    pub clip_l: ClipTextConfig,
    /// Text encoder 2 (OpenCLIP bigG).
    pub clip_g: ClipTextConfig,
}

impl TextConfigs {
    /// The SDXL base encoders (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14).
    pub fn sdxl() -> Self {
        Self {
            name: "sdxl",
            clip_l: ClipTextConfig::clip_l(),
            clip_g: ClipTextConfig::open_clip_bigg(),
        }
    }

    /// Tiny encoders that fit [`UNetConfig::tiny`] (context 64 = 32 + 32,
    /// pooled 32): `clip_l_tiny()` and a bigG-shaped encoder 32 wide
    /// (4 heads, MLP 128, projection 32). `open_clip_bigg_tiny()` is 40 wide,
    /// which does not add up to the tiny UNet's context width.
    pub fn tiny() -> Self {
        Self {
            name: "tiny",
            clip_l: ClipTextConfig::clip_l_tiny(),
            clip_g: ClipTextConfig {
                width: 32,
                heads: 4,
                intermediate: 128,
                projection_dim: Some(32),
                ..ClipTextConfig::open_clip_bigg_tiny()
            },
        }
    }

    /// Every named pair, in detection order.
    pub fn candidates() -> Vec<Self> {
        vec![Self::sdxl(), Self::tiny()]
    }

    /// Context width (`clip_l.width + clip_g.width`) and pooled width.
    pub fn unet_dims(&self) -> (usize, usize) {
        (
            self.clip_l.width + self.clip_g.width,
            self.clip_g.projection_dim.unwrap_or(0),
        )
    }

    /// Keys and shapes both encoders request from a checkpoint.
    pub fn expected_keys(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut keys =
            record_shapes(|vb| ClipTextModel::new(vb.pp(CLIP_L_MODEL_PREFIX), &self.clip_l))?;
        keys.extend(record_shapes(|vb| {
            ClipTextModel::new(vb.pp(BIGG_MODEL_PREFIX), &self.clip_g)
        })?);
        Ok(keys)
    }
}

/// How to load a checkpoint for sampling.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Override the prediction type read from the file (`--prediction`).
    pub prediction: Option<Prediction>,
    /// Override the ZTSNR flag read from the file (`--ztsnr`).
    pub ztsnr: Option<bool>,
    /// Compute the SHA-256 / AutoV2 hash (reads the whole file once).
    pub hash: bool,
    /// Device to load onto (`--device`, [`crate::nn::device`]); `None`:
    /// [`crate::nn::default_device`] (CUDA 0 in a CUDA build with a GPU, else CPU).
    pub device: Option<Device>,
    /// dtype of the UNet and text encoders; `None`: f32 on the CPU, bf16 on
    /// CUDA ([`crate::nn::model_dtype`]). The VAE follows
    /// [`crate::nn::vae_dtype`] (bf16 or f32, never f16).
    pub dtype: Option<DType>,
}

/// What was loaded and how it was judged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The checkpoint file.
    pub path: PathBuf,
    /// File stem (A1111 infotext `Model`).
    pub stem: String,
    /// A1111 AutoV2 hash (first 10 hex of SHA-256), when hashing was asked.
    pub autov2: Option<String>,
    /// Named UNet config (`sdxl_base`, `tiny`).
    pub unet_config: String,
    /// Named VAE config (`sdxl`, `tiny`).
    pub vae_config: String,
    /// Named text-encoder pair (`sdxl`, `tiny`).
    pub text_config: String,
    /// Prediction type used (`eps` / `v`).
    #[serde(serialize_with = "ser_display")]
    pub prediction: Prediction,
    /// ZTSNR used.
    pub ztsnr: bool,
    /// Where the prediction type came from (marker, metadata, default, `--prediction`).
    pub prediction_source: String,
    /// Warnings about the file's markers (contradictions, ZTSNR on ε, …).
    pub warnings: Vec<String>,
}

/// Serialise a value through its `Display` (A1111 / CLI names).
pub(crate) fn ser_display<S: serde::Serializer, T: std::fmt::Display>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A loaded SDXL model ready to sample: UNet, both text encoders, f32 VAE.
pub struct SdxlModel {
    /// The UNet.
    pub unet: UNet,
    /// Both text encoders and the tokenizer.
    pub text: SdxlTextEncoder,
    /// The VAE (f32, or bf16 with a bf16 model; never f16: the SDXL VAE overflows in f16).
    pub vae: Vae,
    /// What was loaded.
    pub info: ModelInfo,
    /// Device everything lives on.
    pub device: Device,
}

impl std::fmt::Debug for SdxlModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdxlModel")
            .field("info", &self.info)
            .finish()
    }
}

/// Match the text encoders of `ckpt` against [`TextConfigs::candidates`]
/// by token-embedding widths, then check every key.
pub fn detect_text_configs(ckpt: &Checkpoint) -> Result<TextConfigs> {
    let width = |key: String| ckpt.entry(&key).and_then(|e| e.shape.get(1).copied());
    let wl = width(format!(
        "{CLIP_L_MODEL_PREFIX}.embeddings.token_embedding.weight"
    ));
    let wg = width(format!("{BIGG_MODEL_PREFIX}.token_embedding.weight"));
    let (Some(wl), Some(wg)) = (wl, wg) else {
        return Err(Error::model(format!(
            "{}: no SDXL text encoders (need {CLIP_L_MODEL_PREFIX}.* and {BIGG_MODEL_PREFIX}.*); sampling needs a full single-file SDXL checkpoint with both text encoders",
            ckpt.path().display()
        )));
    };
    let cfg = TextConfigs::candidates()
        .into_iter()
        .find(|c| c.clip_l.width == wl && c.clip_g.width == wg)
        .ok_or_else(|| {
            Error::model(format!(
                "{}: text encoder widths {wl} (CLIP-L) and {wg} (bigG) match no known config (sdxl: 768/1280, tiny: 32/32)",
                ckpt.path().display()
            ))
        })?;
    ckpt.validate(&cfg.expected_keys()?, "conditioner.embedders")
        .into_result(ckpt.path(), &format!("{} text encoder config", cfg.name))?;
    Ok(cfg)
}

/// Map the checkpoint's prediction type to the sampler's, refusing EDM.
fn sampling_prediction(path: &Path, p: CkptPrediction) -> Result<Prediction> {
    match p {
        CkptPrediction::Epsilon => Ok(Prediction::Eps),
        CkptPrediction::V => Ok(Prediction::V),
        CkptPrediction::EdmV | CkptPrediction::Edm => Err(Error::model(format!(
            "{}: is an EDM model ({}); eps2v samples discrete-schedule SDXL models only (eps or v); pass --prediction eps|v to force one",
            path.display(),
            p.name()
        ))),
    }
}

impl SdxlModel {
    /// Open `path`, detect the configs, check the keys and load every part
    /// onto `opts.device` in `opts.dtype` (defaults: CUDA device 0 in bf16
    /// when built with the `cuda` feature and one is present, else the CPU
    /// in f32; the VAE in [`crate::nn::vae_dtype`]).
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let family = ckpt.family();
        if family != Family::Sdxl {
            return Err(Error::model(format!(
                "{}: not a full SDXL checkpoint: this looks like {}; sampling needs UNet, both text encoders and a VAE in one single-file .safetensors",
                path.display(),
                family.describe()
            )));
        }
        let (unet_name, unet_cfg) = ckpt.detect_unet_config().ok_or_else(|| {
            Error::model(format!(
                "{}: the UNet widths match no known config (sdxl_base, tiny); is this an SDXL base-architecture model?",
                path.display()
            ))
        })?;
        let (vae_name, vae_cfg) = ckpt.detect_vae_config().ok_or_else(|| {
            Error::model(format!(
                "{}: no VAE (first_stage_model.*) of a known config (sdxl, tiny); bake a VAE into the checkpoint",
                path.display()
            ))
        })?;
        ckpt.check_sdxl(&unet_cfg, Some(&vae_cfg))?;
        let text_cfg = detect_text_configs(&ckpt)?;
        check_dims(path, &unet_cfg, &text_cfg, &vae_cfg)?;

        let pinfo = ckpt.prediction();
        let (prediction, source) = match opts.prediction {
            Some(p) => (p, "--prediction".to_string()),
            None => (
                sampling_prediction(path, pinfo.prediction)?,
                pinfo.source.clone(),
            ),
        };
        let ztsnr = opts.ztsnr.unwrap_or(pinfo.ztsnr);
        let mut warnings = pinfo.warnings.clone();
        if ztsnr && prediction == Prediction::Eps && opts.prediction.is_some() {
            warnings.push(
                "ZTSNR with eps prediction: the first step (alpha_bar ~ 0) cannot be predicted from eps; use --prediction v".into(),
            );
        }

        let device = opts
            .device
            .clone()
            .unwrap_or_else(crate::nn::default_device);
        let dtype = crate::nn::model_dtype(&device, opts.dtype)?;
        let unet = ckpt.load_unet(&unet_cfg, dtype, &device)?;
        let text = SdxlTextEncoder::new(
            ckpt.var_builder(dtype, &device),
            &text_cfg.clip_l,
            &text_cfg.clip_g,
        )?;
        let vae = ckpt.load_vae(&vae_cfg, crate::nn::vae_dtype(dtype), &device)?;
        let autov2 = if opts.hash {
            Some(checkpoint::autov2(&checkpoint::sha256_file(path)?))
        } else {
            None
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            unet,
            text,
            vae,
            info: ModelInfo {
                path: path.to_path_buf(),
                stem,
                autov2,
                unet_config: unet_name.to_string(),
                vae_config: vae_name.to_string(),
                text_config: text_cfg.name.to_string(),
                prediction,
                ztsnr,
                prediction_source: source,
                warnings,
            },
            device,
        })
    }

    /// The sampling schedule: SDXL's, rescaled to zero terminal SNR with the
    /// ComfyUI/A1111 terminal clamp (σ_max ≈ 4518.8) for ZTSNR models.
    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule::sdxl_with(self.info.ztsnr, TerminalClamp::ComfyUi)
    }

    /// Latent shape `(4, h/8, w/8)` for an image of `width × height`, or a
    /// config error when the sides do not fit the UNet and VAE.
    pub fn latent_shape(&self, width: u32, height: u32) -> Result<(usize, usize, usize)> {
        let f = self.vae.config().downsample_factor();
        let levels = self.unet.config().channel_mult.len();
        let m = f << levels.saturating_sub(1);
        if width == 0 || height == 0 || width as usize % m != 0 || height as usize % m != 0 {
            return Err(Error::config(format!(
                "size {width}x{height}: width and height must be positive multiples of {m} for this model (VAE factor {f}, UNet {levels} levels)"
            )));
        }
        Ok((
            self.unet.config().in_channels,
            height as usize / f,
            width as usize / f,
        ))
    }

    /// Conditioning of one prompt and its unconditional counterpart, both
    /// `(1, 77·k, ctx)` / `(1, pooled)` with the same chunk count k:
    /// `Zero` zeroes context and pooled (size embeddings are added later by
    /// [`Bound`], so they are kept), `Empty` encodes `""`, `Negative`
    /// encodes its text (A1111 chunking and emphasis for all).
    pub fn conditioning(
        &self,
        prompt: &str,
        uncond: &UncondMode,
    ) -> Result<(TextConditioning, TextConditioning)> {
        match uncond.prompt() {
            None => {
                let c = self.text.encode(&[prompt])?;
                let u = c.zeros_like()?;
                Ok((c, u))
            }
            Some(neg) => self.text.encode_pair(&[prompt], &[neg]),
        }
    }
}

/// UNet/text/VAE widths must agree.
fn check_dims(path: &Path, unet: &UNetConfig, text: &TextConfigs, vae: &VaeConfig) -> Result<()> {
    let (ctx, pooled) = text.unet_dims();
    if ctx != unet.context_dim || pooled != unet.pooled_dim {
        return Err(Error::model(format!(
            "{}: the text encoders give context {ctx} / pooled {pooled} but the UNet expects {} / {}; the checkpoint mixes parts of different models",
            path.display(),
            unet.context_dim,
            unet.pooled_dim
        )));
    }
    if vae.z_channels != unet.in_channels {
        return Err(Error::model(format!(
            "{}: the VAE has {} latent channels but the UNet takes {}",
            path.display(),
            vae.z_channels,
            unet.in_channels
        )));
    }
    Ok(())
}

/// The UNet bound to one image's conditioning: `context`/`y` for the cond
/// branch and (optionally) the uncond branch, with `y = [pooled, size
/// embeddings]` built by [`build_y`] (original = target = image size, crop
/// 0,0). Implements [`NoisePredictor`] (cond only, for CFG 1) and
/// [`PairPredictor`] (one UNet call on the batch `[cond; uncond]`).
pub struct Bound<'a> {
    unet: &'a UNet,
    /// `(b, 77·k, ctx)` per branch; cond rows first then uncond rows.
    context: Tensor,
    /// `(b, adm)` per branch, same order.
    y: Tensor,
    /// Images per branch.
    batch: usize,
    /// Whether `context`/`y` hold an uncond branch after the cond one.
    paired: bool,
}

impl<'a> Bound<'a> {
    /// Bind `unet` to `cond` (and `uncond`), each of batch b, for images of
    /// `height × width` pixels.
    pub fn new(
        unet: &'a UNet,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        height: u32,
        width: u32,
    ) -> Result<Self> {
        let batch = cond.pooled.dim(0)?;
        let sizes = vec![SizeCond::inference(height as f32, width as f32); batch];
        let y_c = build_y(&cond.pooled, &sizes)?; // (b, pooled + 1536)
        let (context, y) = match uncond {
            None => (cond.context.clone(), y_c),
            Some(u) => {
                if u.context.dims() != cond.context.dims() {
                    return Err(Error::Other(format!(
                        "uncond context {:?} differs from cond {:?}",
                        u.context.dims(),
                        cond.context.dims()
                    )));
                }
                let y_u = build_y(&u.pooled, &sizes)?;
                (
                    Tensor::cat(&[&cond.context, &u.context], 0)?, // (2b, 77·k, ctx)
                    Tensor::cat(&[&y_c, &y_u], 0)?,                // (2b, adm)
                )
            }
        };
        Ok(Self {
            unet,
            context,
            y,
            batch,
            paired: uncond.is_some(),
        })
    }

    /// Raw UNet call on rows that match `context`/`y`.
    fn call(&self, x_t: &Tensor, timestep: f64) -> Result<Tensor> {
        let rows = x_t.dim(0)?;
        let ts = Tensor::full(timestep as f32, rows, x_t.device())?; // (rows,)
        Ok(self.unet.forward(x_t, &ts, &self.context, &self.y)?)
    }

    /// Output for the cond rows and for the uncond rows on the same input
    /// (`x_t (b, 4, h, w)` is given to both).
    pub fn outputs(&self, x_t: &Tensor, timestep: f64) -> Result<(Tensor, Tensor)> {
        if !self.paired {
            return Err(Error::Other("bound unet has no uncond branch".into()));
        }
        let b = self.batch;
        let x2 = Tensor::cat(&[x_t, x_t], 0)?; // (2b, 4, h, w)
        let out = self.call(&x2, timestep)?;
        Ok((out.narrow(0, 0, b)?, out.narrow(0, b, b)?))
    }
}

impl NoisePredictor for Bound<'_> {
    fn predict(&self, x_t: &Tensor, timestep: f64) -> Result<Tensor> {
        if self.paired {
            Ok(self.outputs(x_t, timestep)?.0)
        } else {
            self.call(x_t, timestep)
        }
    }
}

impl PairPredictor for Bound<'_> {
    fn predict_pair(&self, x_t: &Tensor, timestep: f64) -> Result<(Tensor, Tensor)> {
        self.outputs(x_t, timestep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};

    fn tiny(v: bool) -> (tempfile::TempDir, SdxlModel) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write_random_checkpoint(
            &p,
            TinyOptions {
                seed: 5,
                v_pred_ztsnr: v,
            },
        )
        .unwrap();
        let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
        (dir, m)
    }

    #[test]
    fn tiny_text_configs_fit_the_tiny_unet() {
        let u = UNetConfig::tiny();
        assert_eq!(
            TextConfigs::tiny().unet_dims(),
            (u.context_dim, u.pooled_dim)
        );
        let s = UNetConfig::sdxl_base();
        assert_eq!(
            TextConfigs::sdxl().unet_dims(),
            (s.context_dim, s.pooled_dim)
        );
    }

    #[test]
    fn tiny_checkpoint_is_detected_with_its_markers() {
        let (_d, m) = tiny(true);
        assert_eq!(m.info.unet_config, "tiny");
        assert_eq!(m.info.vae_config, "tiny");
        assert_eq!(m.info.text_config, "tiny");
        assert_eq!(m.info.prediction, Prediction::V);
        assert!(m.info.ztsnr);
        assert!(m.schedule().is_ztsnr());
        assert!(
            m.info.prediction_source.contains("v_pred"),
            "{}",
            m.info.prediction_source
        );
        let (_d, m) = tiny(false);
        assert_eq!(m.info.prediction, Prediction::Eps);
        assert!(!m.info.ztsnr);
        assert!(!m.schedule().is_ztsnr());
        assert!(m.latent_shape(64, 96).is_ok());
        let e = m.latent_shape(64, 100).unwrap_err().to_string();
        assert!(e.contains("multiples of 32"), "{e}");
    }

    #[test]
    fn zero_uncond_zeroes_text_but_keeps_size_embeddings() {
        let (_d, m) = tiny(false);
        let (c, u) = m.conditioning("a red circle", &UncondMode::Zero).unwrap();
        let b = Bound::new(&m.unet, &c, Some(&u), 64, 96).unwrap();
        assert_eq!(b.context.dims()[0], 2);
        let y = b.y.to_vec2::<f32>().unwrap(); // (2, 32 + 1536)
        let pooled = m.unet.config().pooled_dim;
        assert!(y[1][..pooled].iter().all(|&v| v == 0.0));
        assert!(y[0][..pooled].iter().any(|&v| v != 0.0));
        assert_eq!(y[0][pooled..], y[1][pooled..]);
        let ctx_u = b.context.narrow(0, 1, 1).unwrap();
        assert_eq!(
            ctx_u
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        // `empty` encodes "": not zeros, same chunk count as the prompt.
        let (c2, e) = m.conditioning("a red circle", &UncondMode::Empty).unwrap();
        assert_eq!(e.context.dims(), c2.context.dims());
        assert!(
            e.pooled
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn pair_call_matches_separate_calls() {
        let (_d, m) = tiny(false);
        let (c, u) = m.conditioning("1shape", &UncondMode::Empty).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
        let pair = Bound::new(&m.unet, &c, Some(&u), 64, 64).unwrap();
        let (pc, pu) = pair.predict_pair(&x, 500.0).unwrap();
        let only_c = Bound::new(&m.unet, &c, None, 64, 64).unwrap();
        let only_u = Bound::new(&m.unet, &u, None, 64, 64).unwrap();
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(d(&pc, &only_c.predict(&x, 500.0).unwrap()) < 1e-4);
        assert!(d(&pu, &only_u.predict(&x, 500.0).unwrap()) < 1e-4);
        assert!(d(&pc, &pu) > 1e-4, "cond and uncond outputs should differ");
    }

    #[test]
    fn text_encoder_widths_must_fit_the_unet() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.safetensors");
        write_random_checkpoint(&src, TinyOptions::default()).unwrap();
        // Drop one bigG key: the text encoder check names it.
        let ck = Checkpoint::open(&src).unwrap();
        let dropped = format!("{BIGG_MODEL_PREFIX}.ln_final.weight");
        let tensors: Vec<(String, Tensor)> = ck
            .entries()
            .keys()
            .filter(|k| **k != dropped)
            .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        let bad = dir.path().join("b.safetensors");
        checkpoint::save_tensors(&bad, &tensors, &Default::default()).unwrap();
        let e = SdxlModel::load(&bad, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ln_final.weight") && e.contains("tiny text encoder"),
            "{e}"
        );
    }
}
