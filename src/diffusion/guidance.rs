//! Classifier-free guidance (CFG), CFG rescale, and what the unconditional
//! branch is made of.
//!
//! Follows `shared/reference/sdxl.md` §6.6 and `trainers-landscape.md` §2/§5:
//! - CFG `D = D_u + w·(D_c − D_u)` on the denoised x0 (equivalent to doing it
//!   on ε or v for a fixed x, since D is affine in the model output);
//! - CFG rescale (Lin et al. 2023, Alg. 2) done **in v-space exactly as ComfyUI
//!   `RescaleCFG`** ([`rescale_cfg_v`]): cond/uncond are converted to
//!   `v = (x/(σ²+1) − D)·√(σ²+1)/σ`, `v_cfg` is rescaled by
//!   `std(v_c)/std(v_cfg)` (unbiased std over all non-batch dims, per sample) and
//!   blended with φ, then mapped back to D. Default φ = 0.7 for v-prediction
//!   models, 0 for ε ([`default_rescale`]). diffusers' `rescale_noise_cfg`, which
//!   rescales in whatever the model predicts, is [`rescale_noise_cfg`].
//! - [`UncondMode`]: SDXL's reference uncond (sgm `force_zero_embeddings`, A1111
//!   with an empty negative) zeroes cross-attention context and pooled text
//!   embedding but keeps the size/crop embeddings — our default.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use super::param::{lin2, Prediction};
use super::sampler::{Denoiser, ModelDenoiser};
use crate::{Error, Result};

/// What the unconditional branch of CFG is conditioned on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum UncondMode {
    /// Zeroed text conditioning: the cross-attention context (CLIP-L + bigG hidden
    /// states) and the pooled bigG embedding are all zeros; the size / crop /
    /// target-size embeddings of the vector `y` are kept. This is what SDXL was
    /// trained with (sgm `ucg_rate` zeroing) and what sgm, A1111/Forge (empty
    /// negative) and diffusers (`force_zeros_for_empty_prompt`, no negative) do.
    /// The default.
    #[default]
    Zero,
    /// The encoded empty prompt `""` (BOS/EOS/padding through both encoders), as
    /// ComfyUI's CLIPTextEncode with an empty box and diffusers with an explicit
    /// `""` do. Models finetuned with `""` caption dropout expect this one.
    Empty,
    /// A negative prompt, encoded like a prompt (e.g. `","` or "lowres, bad anatomy").
    Negative(String),
}

impl UncondMode {
    /// The unconditional mode for CLI flags: a non-empty `--negative` wins;
    /// otherwise `mode` (`zero` / `empty`, default `zero`). An empty `--negative ""`
    /// counts as no negative, as in A1111 (where an empty negative is zeroed).
    pub fn from_flags(mode: Option<&str>, negative: Option<&str>) -> Result<Self> {
        match negative {
            Some(n) if !n.is_empty() => Ok(UncondMode::Negative(n.to_string())),
            _ => mode.map_or(Ok(UncondMode::Zero), str::parse),
        }
    }

    /// The negative prompt text to encode, if any (`""` for `Empty`, `None` for `Zero`).
    pub fn prompt(&self) -> Option<&str> {
        match self {
            UncondMode::Zero => None,
            UncondMode::Empty => Some(""),
            UncondMode::Negative(s) => Some(s),
        }
    }
}

impl FromStr for UncondMode {
    type Err = Error;

    /// `zero`, `empty`, or `text:TEXT` (a fixed negative text, e.g. `text:,`,
    /// the spelling `eps2v train --uncond` records; a negative prompt is
    /// usually given with `--negative`).
    fn from_str(s: &str) -> Result<Self> {
        if let Some(t) = s.strip_prefix("text:") {
            // `text:` with nothing after it encodes "": the empty prompt.
            return Ok(if t.is_empty() {
                UncondMode::Empty
            } else {
                UncondMode::Negative(t.to_string())
            });
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "zero" => Ok(UncondMode::Zero),
            "empty" => Ok(UncondMode::Empty),
            other => Err(Error::config(format!(
                "unknown uncond mode {other:?}; use zero, empty or text:TEXT (or give --negative TEXT)"
            ))),
        }
    }
}

impl fmt::Display for UncondMode {
    /// `zero`, `empty` or `negative` (the infotext value; the text itself goes in
    /// "Negative prompt").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UncondMode::Zero => "zero",
            UncondMode::Empty => "empty",
            UncondMode::Negative(_) => "negative",
        })
    }
}

/// Default CFG-rescale φ: 0.7 for v-prediction (Lin et al.; ComfyUI RescaleCFG
/// default), 0 for ε models.
pub fn default_rescale(prediction: Prediction) -> f64 {
    match prediction {
        Prediction::V => 0.7,
        Prediction::Eps => 0.0,
    }
}

/// Guidance settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    /// CFG scale w (1 = no guidance).
    pub scale: f64,
    /// Rescale φ in [0, 1] (0 = plain CFG).
    pub rescale: f64,
}

/// Plain CFG: `uncond + w·(cond − uncond)`.
pub fn cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    lin2(scale, cond, 1.0 - scale, uncond)
}

/// Unbiased standard deviation over all non-batch dims, shape `(b, 1, …, 1)`.
fn std_per_sample(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::Other(format!(
            "cfg rescale: expected a batched tensor, got shape {dims:?}"
        )));
    }
    let flat = t.flatten_from(1)?; // (b, n)
    if flat.dim(1)? < 2 {
        return Err(Error::Other(
            "cfg rescale: need at least 2 elements per sample for a std".into(),
        ));
    }
    let std = flat.var_keepdim(1)?.sqrt()?; // (b, 1)
    let mut shape = vec![dims[0]];
    shape.extend(std::iter::repeat_n(1, dims.len() - 1));
    Ok(std.reshape(shape)?)
}

/// `φ·x_cfg·std(x_c)/std(x_cfg) + (1−φ)·x_cfg`, per sample.
fn rescale_blend(x_cfg: &Tensor, x_cond: &Tensor, phi: f64) -> Result<Tensor> {
    let ratio = std_per_sample(x_cond)?.broadcast_div(&std_per_sample(x_cfg)?)?; // (b, 1, 1, 1)
    let rescaled = x_cfg.broadcast_mul(&ratio)?;
    lin2(phi, &rescaled, 1.0 - phi, x_cfg)
}

/// diffusers `rescale_noise_cfg`: rescale the guided model output `pred_cfg`
/// (ε or v, whatever the model predicts) towards the std of `pred_cond`.
pub fn rescale_noise_cfg(pred_cfg: &Tensor, pred_cond: &Tensor, phi: f64) -> Result<Tensor> {
    rescale_blend(pred_cfg, pred_cond, phi)
}

/// CFG with rescale in v-space as ComfyUI `RescaleCFG` does, for the k-form
/// input `x` at σ and the cond / uncond denoised estimates. Returns the guided
/// denoised x0. With φ = 0 this is plain CFG on D.
pub fn rescale_cfg_v(
    x: &Tensor,
    d_cond: &Tensor,
    d_uncond: &Tensor,
    sigma: f64,
    scale: f64,
    phi: f64,
) -> Result<Tensor> {
    if phi == 0.0 {
        return cfg(d_cond, d_uncond, scale);
    }
    if sigma.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::Other(format!(
            "cfg rescale: sigma must be > 0, got {sigma}"
        )));
    }
    let q = sigma * sigma + 1.0;
    // v = (x/(σ²+1) − D)·√(σ²+1)/σ = x/(σ√(σ²+1)) − D·√(σ²+1)/σ
    let kx = 1.0 / (sigma * q.sqrt());
    let kd = -q.sqrt() / sigma;
    let v_c = lin2(kx, x, kd, d_cond)?;
    let v_u = lin2(kx, x, kd, d_uncond)?;
    let v_cfg = cfg(&v_c, &v_u, scale)?;
    let v_final = rescale_blend(&v_cfg, &v_c, phi)?;
    // D = x/(σ²+1) − v·σ/√(σ²+1)
    lin2(1.0 / q, x, -sigma / q.sqrt(), &v_final)
}

/// A model that gives both the conditional and the unconditional denoised
/// estimate at once (the SDXL wrapper batches `[uncond, cond]` in one UNet call).
pub trait CondUncondDenoiser {
    /// `(D(x, σ | cond), D(x, σ | uncond))`, each shaped like x.
    fn denoise_pair(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)>;
}

/// A raw model evaluated for the conditional and the unconditional branch in one
/// call (the SDXL wrapper runs the UNet once on the batch `[cond; uncond]`).
pub trait PairPredictor {
    /// `(cond output, uncond output)` (ε or v) for the VP input `x_t` at `timestep`.
    fn predict_pair(&self, x_t: &Tensor, timestep: f64) -> Result<(Tensor, Tensor)>;
}

impl<M: PairPredictor + ?Sized> CondUncondDenoiser for ModelDenoiser<'_, M> {
    fn denoise_pair(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let x_in = self.model_input(x, sigma)?; // (b, c, h, w)
        let (c, u) = self.model.predict_pair(&x_in, self.timestep(sigma))?;
        Ok((
            self.denoised_from_output(x, &c, sigma)?,
            self.denoised_from_output(x, &u, sigma)?,
        ))
    }
}

/// Two separate denoisers as a [`CondUncondDenoiser`] (cond first).
pub struct PairDenoiser<C, U>(pub C, pub U);

impl<C: Denoiser, U: Denoiser> CondUncondDenoiser for PairDenoiser<C, U> {
    fn denoise_pair(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        Ok((self.0.denoise(x, sigma)?, self.1.denoise(x, sigma)?))
    }
}

/// CFG (with optional v-space rescale) as a [`Denoiser`], ready for the samplers.
pub struct CfgDenoiser<M> {
    /// The cond/uncond model.
    pub inner: M,
    /// Scale and rescale.
    pub guidance: Guidance,
}

impl<M: CondUncondDenoiser> Denoiser for CfgDenoiser<M> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let (c, u) = self.inner.denoise_pair(x, sigma)?;
        rescale_cfg_v(x, &c, &u, sigma, self.guidance.scale, self.guidance.rescale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::noise::noise_for_seed;
    use crate::diffusion::sampler::{NoisePredictor, TimestepMode};
    use crate::diffusion::schedule::{NoiseSchedule, TerminalClamp};
    use crate::diffusion::testutil::{
        assert_tensor_close, f64s, golden, tensor, values, AnalyticModel,
    };

    fn shape4(v: &serde_json::Value) -> (usize, usize, usize, usize) {
        let s: Vec<usize> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        (s[0], s[1], s[2], s[3])
    }

    // Equivalent reference code: ComfyUI comfy_extras/nodes_model_advanced.py RescaleCFG
    // (transcribed in the golden script) and diffusers guiders.guider_utils.rescale_noise_cfg.
    #[test]
    fn rescale_matches_comfyui_and_diffusers() {
        let g = golden("cfg.json");
        for case in g["cases"].as_array().unwrap() {
            let shape = shape4(&case["shape"]);
            let (sigma, scale, phi) = (
                case["sigma"].as_f64().unwrap(),
                case["scale"].as_f64().unwrap(),
                case["phi"].as_f64().unwrap(),
            );
            let x = tensor(&f64s(&case["x"]), shape);
            let dc = tensor(&f64s(&case["d_cond"]), shape);
            let du = tensor(&f64s(&case["d_uncond"]), shape);
            let got = rescale_cfg_v(&x, &dc, &du, sigma, scale, phi).unwrap();
            // at σ = 4518 the v-space round trip loses f32 digits of x (|x| ~ 4500)
            let tol = if sigma > 100.0 { 2e-3 } else { 1e-5 };
            assert_tensor_close(&got, &f64s(&case["comfy_rescaled_denoised"]), tol, "comfy");
            let nc = tensor(&f64s(&case["pred_cond"]), shape);
            let nu = tensor(&f64s(&case["pred_uncond"]), shape);
            let guided = cfg(&nc, &nu, scale).unwrap();
            let got = rescale_noise_cfg(&guided, &nc, phi).unwrap();
            assert_tensor_close(&got, &f64s(&case["diffusers_rescaled"]), 1e-5, "diffusers");
        }
    }

    #[test]
    fn cfg_denoiser_combines_pair() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[[[1.0f32, 2.0], [3.0, 4.0]]]], &dev).unwrap();
        let c = |x: &Tensor, _s: f64| -> Result<Tensor> { Ok(x.affine(0.5, 0.0)?) };
        let u = |x: &Tensor, _s: f64| -> Result<Tensor> { Ok(x.affine(0.25, 0.0)?) };
        let den = CfgDenoiser {
            inner: PairDenoiser(c, u),
            guidance: Guidance {
                scale: 3.0,
                rescale: 0.0,
            },
        };
        let d: Vec<f32> = den
            .denoise(&x, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // 0.25x + 3(0.25x) = x
        assert_eq!(d, vec![1.0, 2.0, 3.0, 4.0]);
        // scale 1 with any rescale is the conditional prediction.
        let den1 = CfgDenoiser {
            inner: PairDenoiser(c, u),
            guidance: Guidance {
                scale: 1.0,
                rescale: 0.7,
            },
        };
        let d: Vec<f32> = den1
            .denoise(&x, 2.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in d.iter().zip([0.5f32, 1.0, 1.5, 2.0]) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// Two analytic models (different data means) as one pair predictor.
    struct TwoModels<'a>(AnalyticModel<'a>, AnalyticModel<'a>);

    impl PairPredictor for TwoModels<'_> {
        fn predict_pair(&self, x_t: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
            Ok((self.0.predict(x_t, t)?, self.1.predict(x_t, t)?))
        }
    }

    #[test]
    fn model_pair_cfg_equals_separate_denoisers() {
        let sched = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let mk = |mu| AnalyticModel {
            mu,
            s: 0.5,
            prediction: Prediction::V,
            schedule: &sched,
        };
        let pair = TwoModels(mk(0.4), mk(-0.1));
        fn wrap<'a, M: ?Sized>(m: &'a M, sched: &'a NoiseSchedule) -> ModelDenoiser<'a, M> {
            ModelDenoiser {
                model: m,
                prediction: Prediction::V,
                schedule: sched,
                timestep_mode: TimestepMode::Nearest,
            }
        }
        let guidance = Guidance {
            scale: 5.0,
            rescale: 0.7,
        };
        let joint = CfgDenoiser {
            inner: wrap(&pair, &sched),
            guidance,
        };
        let (c, u) = (mk(0.4), mk(-0.1));
        let separate = CfgDenoiser {
            inner: PairDenoiser(wrap(&c, &sched), wrap(&u, &sched)),
            guidance,
        };
        let x = noise_for_seed(3, (4, 6, 6), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .affine(20.0, 0.0)
            .unwrap();
        for sigma in [20.0, 1.5, 0.1] {
            let a = values(&joint.denoise(&x, sigma).unwrap());
            let b = values(&separate.denoise(&x, sigma).unwrap());
            assert_eq!(a, b);
            // and guidance changes the result relative to the conditional branch alone
            let cond_only = values(&wrap(&c, &sched).denoise(&x, sigma).unwrap());
            assert!(a.iter().zip(&cond_only).any(|(p, q)| (p - q).abs() > 1e-3));
        }
    }

    #[test]
    fn uncond_modes() {
        assert_eq!(UncondMode::default(), UncondMode::Zero);
        assert_eq!(
            UncondMode::from_flags(None, None).unwrap(),
            UncondMode::Zero
        );
        assert_eq!(
            UncondMode::from_flags(Some("empty"), None).unwrap(),
            UncondMode::Empty
        );
        assert_eq!(
            UncondMode::from_flags(Some("zero"), Some(",")).unwrap(),
            UncondMode::Negative(",".into())
        );
        assert_eq!(
            UncondMode::from_flags(None, Some("")).unwrap(),
            UncondMode::Zero
        );
        assert!(UncondMode::from_flags(Some("null"), None).is_err());
        // `text:` with no text is the empty prompt (its infotext too).
        assert_eq!("text:".parse::<UncondMode>().unwrap(), UncondMode::Empty);
        assert_eq!(
            "text:,".parse::<UncondMode>().unwrap(),
            UncondMode::Negative(",".into())
        );
        assert_eq!(UncondMode::Negative("x".into()).to_string(), "negative");
        assert_eq!(UncondMode::Zero.prompt(), None);
        assert_eq!(UncondMode::Empty.prompt(), Some(""));
        assert_eq!(default_rescale(Prediction::V), 0.7);
        assert_eq!(default_rescale(Prediction::Eps), 0.0);
    }
}
