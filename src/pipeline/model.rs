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

/// The sampler's prediction of a checkpoint's: eps or v; `None` for EDM
/// (not a discrete-schedule model).
pub fn discrete_prediction(p: CkptPrediction) -> Option<Prediction> {
    match p {
        CkptPrediction::Epsilon => Some(Prediction::Eps),
        CkptPrediction::V => Some(Prediction::V),
        CkptPrediction::EdmV | CkptPrediction::Edm => None,
    }
}

/// Map the checkpoint's prediction type to the sampler's, refusing EDM.
fn sampling_prediction(path: &Path, p: CkptPrediction) -> Result<Prediction> {
    discrete_prediction(p).ok_or_else(|| {
        Error::model(format!(
            "{}: is an EDM model ({}); eps2v samples discrete-schedule SDXL models only (eps or v); pass --prediction eps|v to force one",
            path.display(),
            p.name()
        ))
    })
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
                ckpt.describe_family()
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
        let mut warnings: Vec<String> = match opts.prediction {
            // The file's own contradictions no longer decide anything.
            Some(p) if Some(p) != discrete_prediction(pinfo.prediction) => pinfo
                .warnings
                .iter()
                .map(|w| format!("{w} (this run samples it as {p}: --prediction)"))
                .collect(),
            _ => pinfo.warnings.clone(),
        };
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
        check_size(self.unet.config(), self.vae.config(), width, height)?;
        let f = self.vae.config().downsample_factor();
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
/// applied. Prompt editing, alternation and `AND` are warned about once.
fn without_networks(prompt: &str) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    static WARNED_SYNTAX: AtomicBool = AtomicBool::new(false);
    let (text, had) = crate::models::sdxl::prompt::strip_extra_networks(prompt);
    if had && !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: prompts' extra-network tags (<lora:…>, <hypernet:…>) are left out of the text; eps2v applies no LoRA or hypernetwork"
        );
    }
    if let Some(what) = crate::models::sdxl::prompt::unsupported_syntax(&text) {
        if !WARNED_SYNTAX.swap(true, Ordering::Relaxed) {
            eprintln!(
                "warning: A1111's {what} is encoded as plain text here (eps2v does not change the prompt during sampling): {text:?}"
            );
        }
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
#[path = "model_tests.rs"]
mod tests;

/// [`check_size`] against the shapes of the checkpoint at `path` (its
/// header only). A checkpoint whose configs cannot be inferred is not
/// judged here: loading it says why.
pub fn check_size_of(path: &std::path::Path, width: u32, height: u32) -> Result<()> {
    let ck = crate::models::sdxl::checkpoint::Checkpoint::open(path)?;
    if let (Ok(u), Ok(v)) = (ck.infer_unet_config(), ck.infer_vae_config()) {
        check_size(&u.config, &v.config, width, height)?;
    }
    Ok(())
}

/// The largest image side any command samples or trains at (ComfyUI's
/// `MAX_RESOLUTION`): past it, memory, not the model, is the limit.
pub const MAX_SIDE: u32 = 16384;

/// Whether an image of `width × height` fits a model of these configs:
/// both sides positive multiples of the VAE factor times 2 per UNet level
/// below the first (32 for SDXL), at most [`MAX_SIDE`]; a config error says
/// which multiple and the nearest size that fits.
pub fn check_size(
    unet: &crate::models::sdxl::UNetConfig,
    vae: &crate::models::sdxl::VaeConfig,
    width: u32,
    height: u32,
) -> Result<()> {
    let f = vae.downsample_factor();
    let levels = unet.channel_mult.len();
    let m = f << levels.saturating_sub(1);
    if width == 0 || height == 0 || width as usize % m != 0 || height as usize % m != 0 {
        // The nearest size that fits, each side rounded to a multiple of m.
        let near = |x: u32| ((x as usize + m / 2) / m).max(1).min(MAX_SIDE as usize / m) * m;
        return Err(Error::config(format!(
            "size {width}x{height}: width and height must be positive multiples of {m} for this model (VAE factor {f}, UNet {levels} levels); the nearest is {}x{}",
            near(width),
            near(height)
        )));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::config(format!(
            "size {width}x{height}: at most {MAX_SIDE} pixels a side (ComfyUI's limit too; SDXL draws best near 1024x1024, e.g. 832x1216)"
        )));
    }
    Ok(())
}
