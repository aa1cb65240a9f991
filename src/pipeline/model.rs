//! Loading a single-file SDXL checkpoint (UNet + CLIP-L + OpenCLIP bigG +
//! VAE) for inference, turning prompts into conditioning, and binding the
//! UNet to that conditioning as the raw ε/v predictor the samplers of
//! [`crate::diffusion`] drive.
//!
//! Configs are never given: the UNet, VAE and both text-encoder configs are
//! inferred from the file's keys and shapes ([`crate::models::sdxl::infer`],
//! as `eps2v ckpt info` shows them), the parts must fit together (context,
//! pooled and latent widths), and every key of the inferred configs is
//! checked (missing / unexpected / wrong shape is a model error, exit 2).
//!
//! Prediction type: marker keys (`v_pred`, `ztsnr`), then
//! `modelspec.prediction_type` ([`Checkpoint::prediction`]); both can be
//! overridden ([`LoadOptions`]). EDM checkpoints (CosXL, Playground) are
//! refused: their σ parameterisation is not the SDXL discrete schedule.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

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
use crate::models::sdxl::infer::{self, TextPair};
use crate::models::sdxl::{build_y, SizeCond, UNet, Vae};
use crate::{Error, Result};

/// The two text-encoder configs of one SDXL variant.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfigs {
    /// Name (`sdxl`, `tiny`, `toy`, or `custom` for inferred configs matching none).
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

    /// Tiny encoders that fit [`crate::models::sdxl::UNetConfig::tiny`] (context 64 = 32 + 32,
    /// pooled 32): `clip_l_tiny()` and a bigG-shaped encoder 32 wide
    /// (4 heads, MLP 128, projection 32). `open_clip_bigg_tiny()` is 40 wide,
    /// which does not add up to the tiny UNet's context width.
    pub fn tiny() -> Self {
        Self {
            name: "tiny",
            clip_l: ClipTextConfig::clip_l_tiny(),
            clip_g: ClipTextConfig::open_clip_bigg_tiny32(),
        }
    }

    /// The toy-world encoders (DESIGN.md §4) that fit
    /// [`crate::models::sdxl::UNetConfig::toy`]: `clip_l_toy()` (16 wide)
    /// and `open_clip_bigg_toy()` (32 wide, projection 32) → context 48,
    /// pooled 32; real CLIP tokenizer and vocabulary.
    pub fn toy() -> Self {
        Self {
            name: "toy",
            clip_l: ClipTextConfig::clip_l_toy(),
            clip_g: ClipTextConfig::open_clip_bigg_toy(),
        }
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
    /// The caption-dropout conditioning the model was trained with, as
    /// eps2v's export records it (`eps2v.uncond`: `zero`, `empty`, `text:…`).
    pub trained_uncond: Option<String>,
    /// Image size `(width, height)` that `sample` and `diagnose uncond` use
    /// when none is asked for: see [`super::size::native_size`].
    pub native_size: (u32, u32),
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

/// Infer both text-encoder configs of `ckpt` from its shapes (with our
/// metadata for heads) and check every key.
pub fn detect_text_configs(ckpt: &Checkpoint) -> Result<TextConfigs> {
    let pair = ckpt.infer_text_configs()?;
    Ok(TextConfigs {
        name: pair.name.unwrap_or("custom"),
        clip_l: pair.config.clip_l,
        clip_g: pair.config.clip_g,
    })
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
        let unet = ckpt.infer_unet_config()?;
        let vae = ckpt.infer_vae_config()?;
        let text_cfg = detect_text_configs(&ckpt)?;
        let (unet_name, unet_cfg) = (unet.name.unwrap_or("custom"), unet.config);
        let (vae_name, vae_cfg) = (vae.name.unwrap_or("custom"), vae.config);
        let pair = TextPair {
            clip_l: text_cfg.clip_l.clone(),
            clip_g: text_cfg.clip_g.clone(),
        };
        infer::check_compatible(&unet_cfg, Some(&pair), Some(&vae_cfg))
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        ckpt.check_sdxl(&unet_cfg, Some(&vae_cfg))?;

        let pinfo = ckpt.prediction();
        let (prediction, source) = match opts.prediction {
            Some(p) => (p, "--prediction".to_string()),
            None => (
                sampling_prediction(path, pinfo.prediction)?,
                pinfo.source.clone(),
            ),
        };
        // A file's `ztsnr` marker counts for v prediction only, as in
        // ComfyUI (it reads it inside its `v_pred` branch): an eps model
        // with a stray marker samples on the plain schedule (the file's
        // warning says so).
        let ztsnr = opts
            .ztsnr
            .unwrap_or(pinfo.ztsnr && prediction == Prediction::V);
        let mut warnings = pinfo.warnings.clone();
        let native_size = super::size::native_size(ckpt.metadata(), unet_name, &mut warnings);
        // Asked for on the command line (a file's own contradiction is in
        // the checkpoint's warnings already).
        let asked = opts.prediction.is_some() || opts.ztsnr == Some(true);
        if ztsnr && prediction == Prediction::Eps && asked {
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
                trained_uncond: ckpt.metadata().get(checkpoint::META_UNCOND).cloned(),
                native_size,
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

    /// Conditioning of one prompt and its unconditional counterpart,
    /// `(1, 77·k, ctx)` / `(1, pooled)`, each with its own chunk count k
    /// (see [`Bound::new`] for how a pair of different lengths runs):
    /// `Zero` zeroes context and pooled (size embeddings are added later by
    /// [`Bound`], so they are kept), `Empty` encodes `""`, `Negative`
    /// encodes its text (A1111 chunking and emphasis for all).
    pub fn conditioning(
        &self,
        prompt: &str,
        uncond: &UncondMode,
    ) -> Result<(TextConditioning, TextConditioning)> {
        let prompt = without_networks(prompt);
        match uncond.prompt() {
            None => {
                let c = self.text.encode(&[prompt.as_str()])?;
                let u = c.zeros_like()?;
                Ok((c, u))
            }
            Some(neg) => self
                .text
                .encode_pair(&[prompt.as_str()], &[without_networks(neg).as_str()]),
        }
    }
}

/// `prompt` without its A1111 extra-network tags, as A1111 encodes it
/// (copied prompts carry `<lora:…>`; its characters would otherwise be
/// encoded as words), with a warning the first time: no network is
/// applied.
fn without_networks(prompt: &str) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    let (text, had) = crate::models::sdxl::prompt::strip_extra_networks(prompt);
    if had && !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: prompts' extra-network tags (<lora:…>, <hypernet:…>) are left out of the text; eps2v applies no LoRA or hypernetwork"
        );
    }
    text
}

/// Cond and uncond contexts of different lengths (a prompt and a negative
/// of different chunk counts) made one length for a single UNet call
/// without changing what either branch computes: each is repeated whole to
/// the least common multiple of the two token counts. Cross-attention over
/// a sequence repeated r times gives every key r copies of its softmax
/// weight over r times the sum — the same average (ComfyUI joins conds
/// this way) — unlike padding with empty chunks, which adds keys.
fn same_length(c: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let (cd, ud) = (c.dims(), u.dims());
    if cd == ud {
        return Ok((c.clone(), u.clone()));
    }
    if cd.len() != 3 || ud.len() != 3 || cd[0] != ud[0] || cd[2] != ud[2] {
        return Err(Error::Other(format!(
            "uncond context {ud:?} does not fit cond {cd:?}"
        )));
    }
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let lcm = cd[1] / gcd(cd[1], ud[1]) * ud[1];
    Ok((
        c.repeat((1, lcm / cd[1], 1))?,
        u.repeat((1, lcm / ud[1], 1))?,
    ))
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
    /// UNet calls made so far, and the rows (images × branches) they ran.
    calls: AtomicUsize,
    rows: AtomicUsize,
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
                let (c_ctx, u_ctx) = same_length(&cond.context, &u.context)?;
                let y_u = build_y(&u.pooled, &sizes)?;
                (
                    Tensor::cat(&[&c_ctx, &u_ctx], 0)?, // (2b, 77·k, ctx)
                    Tensor::cat(&[&y_c, &y_u], 0)?,     // (2b, adm)
                )
            }
        };
        Ok(Self {
            unet,
            context,
            y,
            batch,
            paired: uncond.is_some(),
            calls: AtomicUsize::new(0),
            rows: AtomicUsize::new(0),
        })
    }

    /// UNet calls made through this binding so far, and the rows they ran
    /// (a CFG step runs 2 rows per image in one call; CFG 1 runs 1).
    pub fn unet_calls(&self) -> (usize, usize) {
        (
            self.calls.load(Ordering::Relaxed),
            self.rows.load(Ordering::Relaxed),
        )
    }

    /// Raw UNet call on rows that match `context`/`y`.
    fn call(&self, x_t: &Tensor, timestep: f64) -> Result<Tensor> {
        let rows = x_t.dim(0)?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
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
    use crate::models::sdxl::UNetConfig;
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
        assert_eq!(m.info.native_size, (64, 64));
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
        // Regression: a stray `ztsnr` marker on an eps file put eps
        // sampling on the ZTSNR schedule; as in ComfyUI it counts for v
        // only (and the file's warning says so). Asked for, it holds.
        let d = tempfile::tempdir().unwrap();
        let (plain, stray) = (
            d.path().join("e.safetensors"),
            d.path().join("z.safetensors"),
        );
        write_random_checkpoint(
            &plain,
            TinyOptions {
                seed: 5,
                v_pred_ztsnr: false,
            },
        )
        .unwrap();
        let opts = crate::models::sdxl::checkpoint::SaveOptions {
            ztsnr: true,
            ..Default::default()
        };
        Checkpoint::open(&plain)
            .unwrap()
            .save_with(&stray, &Default::default(), &opts)
            .unwrap();
        let m = SdxlModel::load(&stray, &LoadOptions::default()).unwrap();
        assert_eq!((m.info.prediction, m.info.ztsnr), (Prediction::Eps, false));
        assert!(m.info.warnings.iter().any(|w| w.contains("plain schedule")));
        let asked = LoadOptions {
            ztsnr: Some(true),
            ..Default::default()
        };
        assert!(SdxlModel::load(&stray, &asked).unwrap().info.ztsnr);
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
        // A negative longer than the prompt (2 chunks against 1): each branch
        // computes what it computes alone (A1111's default runs them apart),
        // and the prompt's own context is not padded.
        let long_neg = "lowres, bad anatomy, ".repeat(20);
        let (c, u) = m
            .conditioning("1shape", &UncondMode::Negative(long_neg))
            .unwrap();
        assert_eq!(
            (c.context.dim(1).unwrap(), u.context.dim(1).unwrap()),
            (77, 154)
        );
        let pair = Bound::new(&m.unet, &c, Some(&u), 64, 64).unwrap();
        let (pc, pu) = pair.predict_pair(&x, 500.0).unwrap();
        let only_c = Bound::new(&m.unet, &c, None, 64, 64).unwrap();
        let only_u = Bound::new(&m.unet, &u, None, 64, 64).unwrap();
        assert!(d(&pc, &only_c.predict(&x, 500.0).unwrap()) < 1e-4);
        assert!(d(&pu, &only_u.predict(&x, 500.0).unwrap()) < 1e-4);
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
            e.contains("cannot infer the text encoder configs: bigG")
                && e.contains("missing conditioner.embedders.1.model.ln_final.weight"),
            "{e}"
        );
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// A checkpoint written by sgm `UNetModel` + HF `CLIPTextModel` +
    /// open_clip `TextTransformer` + sgm VAE at a config of its own, with no
    /// eps2v metadata (fixtures/scripts/gen_infer_golden.py), loads with no
    /// config given: every config is inferred (GroupNorm 32 and 64-channel
    /// heads from the sgm defaults), and every part matches its reference
    /// within 1e-4.
    #[test]
    fn golden_checkpoint_loads_with_no_config() {
        use crate::models::sdxl::infer::HiddenSource;
        use crate::models::sdxl::{MiddleBlock, VaeConfig};
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/golden/infer");
        let path = format!("{dir}/model.safetensors");
        let m = SdxlModel::load(&path, &LoadOptions::default()).unwrap();
        assert_eq!(
            (
                m.info.unet_config.as_str(),
                m.info.vae_config.as_str(),
                m.info.text_config.as_str()
            ),
            ("custom", "custom", "custom")
        );
        let want = UNetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 32,
            channel_mult: vec![1, 2],
            num_res_blocks: vec![2, 1],
            transformer_depth: vec![0, 0, 1],
            transformer_depth_output: vec![1, 0, 0, 0, 0],
            middle: MiddleBlock::NoTransformer,
            num_head_channels: 64,
            context_dim: 128,
            pooled_dim: 32,
            num_groups: 32,
            use_linear_in_transformer: false,
        };
        assert_eq!(m.unet.config(), &want);
        assert_eq!(
            m.vae.config(),
            &VaeConfig {
                ch: 32,
                ch_mult: vec![1, 1, 1],
                num_res_blocks: 1,
                ..VaeConfig::sdxl()
            }
        );
        let (l, g) = (m.text.clip_l.config(), m.text.clip_g.config());
        assert_eq!(
            (l.width, l.layers, l.heads, l.intermediate),
            (64, 2, 1, 128)
        );
        assert_eq!(
            (g.width, g.layers, g.heads, g.intermediate),
            (64, 2, 1, 256)
        );
        assert_eq!(g.projection_dim, Some(32));
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(
            ckpt.infer_unet_config().unwrap().hidden,
            HiddenSource::Defaults
        );

        let io =
            candle_core::safetensors::load(format!("{dir}/io.safetensors"), &Device::Cpu).unwrap();
        let sizes: Vec<SizeCond> = io["unet.sizes"]
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| SizeCond {
                original: (r[0], r[1]),
                crop_top_left: (r[2], r[3]),
                target: (r[4], r[5]),
            })
            .collect();
        let y = build_y(&io["unet.pooled"], &sizes).unwrap();
        let out = m
            .unet
            .forward(
                &io["unet.x"],
                &io["unet.timesteps"],
                &io["unet.context"],
                &y,
            )
            .unwrap();
        let d = max_abs(&out, &io["unet.out"]);
        eprintln!("golden unet max abs err {d:e}");
        assert!(d <= 1e-4, "unet max abs err {d}");

        let ol = m.text.clip_l.forward(&io["text.ids_l"]).unwrap();
        let og = m.text.clip_g.forward(&io["text.ids_g"]).unwrap();
        let errs = [
            max_abs(&ol.penultimate, &io["text.penultimate_l"]),
            max_abs(&og.penultimate, &io["text.penultimate_g"]),
            max_abs(&og.pooled.unwrap(), &io["text.pooled"]),
        ];
        eprintln!("golden text max abs errs {errs:?}");
        assert!(errs.iter().all(|e| *e <= 1e-4), "{errs:?}");
        // The whole prompt path (our tokenizer, both encoders, concat).
        let prompts = ["a red circle on a blue background", "1shape, large, left"];
        for (i, p) in prompts.iter().enumerate() {
            let c = m.text.encode(&[p]).unwrap();
            let want = io["text.context"].narrow(0, i, 1).unwrap();
            let d = max_abs(&c.context, &want);
            assert!(d <= 1e-4, "{p}: context max abs err {d}");
            let d = max_abs(&c.pooled, &io["text.pooled"].narrow(0, i, 1).unwrap());
            assert!(d <= 1e-4, "{p}: pooled max abs err {d}");
        }

        let (mean, logvar) = m.vae.encode_moments(&io["vae.image"]).unwrap();
        let dec = m.vae.decode(&io["vae.z"]).unwrap();
        let errs = [
            max_abs(&mean, &io["vae.mean"]),
            max_abs(&logvar, &io["vae.logvar"]),
            max_abs(&dec, &io["vae.decoded"]),
        ];
        eprintln!("golden vae max abs errs {errs:?}");
        assert!(errs.iter().all(|e| *e <= 1e-4), "{errs:?}");
    }

    /// Our own saves of a spread of configs (tiny widths, non-32 groups,
    /// per-block depths, middle variants, conv proj_in) load back with no
    /// config given — the metadata carries groups and heads — and run.
    #[test]
    fn random_models_of_other_configs_load_and_run() {
        use crate::models::sdxl::{MiddleBlock, VaeConfig};
        use crate::pipeline::tiny::write_random_model;
        let dir = tempfile::tempdir().unwrap();
        let text = TextConfigs::tiny();
        let tiny = UNetConfig::tiny();
        let unets = [
            UNetConfig {
                num_res_blocks: vec![1, 2, 1],
                transformer_depth: vec![0, 2, 0, 1],
                transformer_depth_output: vec![1, 0, 0, 2, 1, 0, 0],
                middle: MiddleBlock::ResBlockOnly,
                ..tiny.clone()
            },
            UNetConfig {
                channel_mult: vec![1, 1],
                num_res_blocks: vec![1, 1],
                transformer_depth: vec![1, 1],
                transformer_depth_output: vec![1, 1, 0, 1],
                middle: MiddleBlock::Absent,
                use_linear_in_transformer: false,
                num_groups: 4,
                num_head_channels: 8,
                ..tiny.clone()
            },
        ];
        let vae = VaeConfig {
            ch: 8,
            ch_mult: vec![1, 2],
            num_groups: 4,
            num_res_blocks: 1,
            ..VaeConfig::tiny()
        };
        for (i, u) in unets.iter().enumerate() {
            let p = dir.path().join(format!("m{i}.safetensors"));
            write_random_model(&p, u, &vae, &text, TinyOptions::default()).unwrap();
            let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
            assert_eq!(m.unet.config(), u);
            assert_eq!(m.vae.config(), &vae);
            assert_eq!(m.info.text_config, "tiny");
            let (c, un) = m.conditioning("1shape", &UncondMode::Zero).unwrap();
            let b = Bound::new(&m.unet, &c, Some(&un), 32, 32).unwrap();
            let (h, w) = (32 / vae.downsample_factor(), 32 / vae.downsample_factor());
            let x = Tensor::randn(0f32, 1.0, (1, 4, h, w), &Device::Cpu).unwrap();
            let (pc, _) = b.predict_pair(&x, 500.0).unwrap();
            assert_eq!(pc.dims(), x.dims());
            let img = m.vae.decode_scaled(&x).unwrap();
            assert_eq!(img.dims(), &[1, 3, 32, 32]);
        }
    }
}
