//! `eps2v diagnose uncond`: does this model treat the encoded empty prompt
//! `""` like the zeroed conditioning?
//!
//! Why (`shared/reference/trainers-landscape.md`, "non-zero null uncond"):
//! SDXL was trained with caption dropout that *zeroes* the text
//! conditioning, and sgm / A1111 (empty negative) / diffusers sample with
//! zeros; ComfyUI's empty CLIPTextEncode and many finetunes trained with `""`
//! dropout use the *encoded* empty prompt instead. If a model's predictions
//! for the two differ, the UI's choice changes every image.
//!
//! Method: for a few timesteps t and seeds, the VP input `x_t` is seeded
//! N(0, 1) noise (what the model sees at high noise; at lower noise a real
//! x_t also has unit variance), the size embeddings are the same for both
//! branches (original = target = `--size`, crop 0,0), and the model
//! outputs for `""` (e) and zeros (z), both as v, are compared by
//! `rel = ‖e − z‖ / ‖z‖` and cosine similarity over the whole latent. An
//! eps model's ε is turned into v with its schedule (`v = √(1+σ²)·ε −
//! σ·x_t`): in ε itself one change of the predicted image is √ᾱ_t times
//! smaller (0.07 at t = 999), so an eps model and its exact v conversion
//! got different verdicts.
//!
//! Verdict thresholds (on the mean over all probes, documented in
//! [`Verdict::from_stats`]):
//! - `rel < 0.05` and `cos > 0.99`: **same** — the model treats `""` like
//!   zeros (trained with zeroed dropout / SDXL base behaviour);
//! - `rel > 0.25` or `cos < 0.9`: **different** — `""` and zeros differ
//!   strongly, the UI's uncond choice matters;
//! - otherwise **moderate**.

use candle_core::Tensor;

use super::model::{Bound, SdxlModel};
use crate::diffusion::noise::noise_for_seed;
use crate::diffusion::{NoiseSchedule, Prediction, TerminalClamp};
use crate::Result;

/// A model output at noise level `sigma` (k-diffusion σ of the VP input
/// `x_t`) as v: v itself, or `√(1+σ²)·ε − σ·x_t` for ε.
pub fn as_v(out: &Tensor, x_t: &Tensor, sigma: f64, prediction: Prediction) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::V => out.clone(),
        Prediction::Eps => ((out * (1.0 + sigma * sigma).sqrt())? - (x_t * sigma)?)?,
    })
}

/// What to probe.
#[derive(Debug, Clone)]
pub struct DiagnoseConfig {
    /// Timesteps (0..=999) to evaluate at.
    pub timesteps: Vec<f64>,
    /// Seeds of the probe inputs.
    pub seeds: Vec<u64>,
    /// Image width in pixels (latent = width / 8).
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

/// One probe.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Probe {
    /// Timestep.
    pub timestep: f64,
    /// Seed of `x_t`.
    pub seed: u64,
    /// `‖e − z‖ / ‖z‖`.
    pub rel_l2: f64,
    /// Cosine similarity of e and z.
    pub cosine: f64,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// `""` behaves like zeros.
    Same,
    /// In between.
    Moderate,
    /// `""` and zeros differ strongly.
    Different,
}

/// Below this mean relative L2 (and above [`SAME_COS`]) the two unconds count as the same.
pub const SAME_REL: f64 = 0.05;
/// Cosine above which (with [`SAME_REL`]) the two unconds count as the same.
pub const SAME_COS: f64 = 0.99;
/// Above this mean relative L2 the two unconds differ strongly.
pub const DIFF_REL: f64 = 0.25;
/// Below this mean cosine the two unconds differ strongly.
pub const DIFF_COS: f64 = 0.9;

impl Verdict {
    /// Same if `rel < 0.05 && cos > 0.99`; different if `rel > 0.25 || cos < 0.9`;
    /// else moderate.
    pub fn from_stats(mean_rel: f64, mean_cos: f64) -> Self {
        if mean_rel < SAME_REL && mean_cos > SAME_COS {
            Verdict::Same
        } else if mean_rel > DIFF_REL || mean_cos < DIFF_COS || !mean_rel.is_finite() {
            Verdict::Different
        } else {
            Verdict::Moderate
        }
    }

    /// The verdict's name (`same`, `moderate`, `different`), as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Same => "same",
            Verdict::Moderate => "moderate",
            Verdict::Different => "different",
        }
    }

    /// A sentence for the user. `trained` is the caption-dropout
    /// conditioning the model was trained with, when its file says so
    /// (`eps2v.uncond`: `zero`, `empty`, `text:…`): then the advice follows
    /// it instead of guessing from the numbers (a model trained with zeroed
    /// dropout can still read `""` as a prompt of its own, as the toy model
    /// does).
    pub fn message(self, trained: Option<&str>) -> String {
        let how = match self {
            Verdict::Same => {
                return match trained {
                    Some(t) => format!("this model treats '' like zeros: the uncond choice of a UI hardly matters (trained by eps2v with caption dropout to {t:?})"),
                    None => "this model treats '' like zeros (trained with zeroed dropout / SDXL base behaviour): the uncond choice of a UI hardly matters".into(),
                }
            }
            Verdict::Moderate => "moderately",
            Verdict::Different => "strongly",
        };
        match (self, trained) {
            (_, Some("zero")) => format!("'' and zeros differ {how}; this model was trained by eps2v with caption dropout to zeros, so sample it with zeros: `eps2v sample`'s default for it, A1111/Forge with an empty negative, ComfyUI with ConditioningZeroOut on the negative (its empty CLIPTextEncode encodes '')"),
            (_, Some("empty")) => format!("'' and zeros differ {how}; this model was trained by eps2v with caption dropout to '', so sample it with '': `eps2v sample`'s default for it, ComfyUI's empty CLIPTextEncode (A1111/Forge zero an empty negative)"),
            (_, Some(t)) => format!("'' and zeros differ {how}; this model was trained by eps2v with caption dropout to {t:?}, which `eps2v sample` uses by default"),
            (Verdict::Moderate, None) => "'' and zeros differ moderately: images will shift somewhat between UIs that use '' (ComfyUI) and zeros (A1111, sgm); eps2v default is zero".into(),
            _ => "'' and zeros differ strongly: the UI's uncond choice matters (the model was likely finetuned with '' dropout); eps2v default is zero, try --uncond empty".into(),
        }
    }
}

/// What `diagnose uncond` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UncondReport {
    /// The model as loaded.
    pub model: super::model::ModelInfo,
    /// Every probe.
    pub probes: Vec<Probe>,
    /// Mean relative L2.
    pub mean_rel_l2: f64,
    /// Largest relative L2.
    pub max_rel_l2: f64,
    /// Mean cosine.
    pub mean_cosine: f64,
    /// Verdict.
    pub verdict: Verdict,
    /// The verdict as a sentence.
    pub message: String,
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Relative L2 `‖a − b‖/‖b‖` and cosine of two same-shape tensors.
pub fn compare(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_dtype(candle_core::DType::F64)?;
    let b = b.to_dtype(candle_core::DType::F64)?;
    let diff = sum_f64(&(&a - &b)?.sqr()?)?.sqrt();
    let nb = sum_f64(&b.sqr()?)?.sqrt();
    let na = sum_f64(&a.sqr()?)?.sqrt();
    let dot = sum_f64(&(&a * &b)?)?;
    let rel = if nb > 0.0 {
        diff / nb
    } else if diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let cos = if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else if diff == 0.0 {
        1.0
    } else {
        0.0
    };
    Ok((rel, cos))
}

/// Run the probes.
pub fn uncond(model: &SdxlModel, cfg: &DiagnoseConfig) -> Result<UncondReport> {
    if cfg.timesteps.is_empty() || cfg.seeds.is_empty() {
        return Err(crate::Error::config(
            "diagnose uncond: need at least one timestep and one seed",
        ));
    }
    if let Some(t) = cfg.timesteps.iter().find(|t| !(0.0..=999.0).contains(*t)) {
        return Err(crate::Error::config(format!(
            "diagnose uncond: timestep {t} is outside 0..=999"
        )));
    }
    let shape = model.latent_shape(cfg.width, cfg.height)?;
    let empty = model.text.encode(&[""])?;
    let zero = empty.zeros_like()?;
    // cond rows = "", uncond rows = zeros; one UNet call per probe.
    let bound = Bound::new(&model.unet, &empty, Some(&zero), cfg.height, cfg.width)?;
    let schedule = NoiseSchedule::sdxl_with(model.info.ztsnr, TerminalClamp::ComfyUi);
    let mut probes = Vec::new();
    for &seed in &cfg.seeds {
        let x_t = noise_for_seed(seed, shape, &model.device)?.unsqueeze(0)?; // (1, 4, h, w)
        for &t in &cfg.timesteps {
            let (e, z) = bound.outputs(&x_t, t)?;
            let sigma = schedule.sigma_at(t);
            let x = x_t.to_dtype(e.dtype())?;
            let (e, z) = (
                as_v(&e, &x, sigma, model.info.prediction)?,
                as_v(&z, &x, sigma, model.info.prediction)?,
            );
            let (rel_l2, cosine) = compare(&e, &z)?;
            probes.push(Probe {
                timestep: t,
                seed,
                rel_l2,
                cosine,
            });
        }
    }
    let n = probes.len() as f64;
    let mean_rel_l2 = probes.iter().map(|p| p.rel_l2).sum::<f64>() / n;
    let max_rel_l2 = probes.iter().map(|p| p.rel_l2).fold(0.0, f64::max);
    let mean_cosine = probes.iter().map(|p| p.cosine).sum::<f64>() / n;
    let verdict = Verdict::from_stats(mean_rel_l2, mean_cosine);
    Ok(UncondReport {
        model: model.info.clone(),
        probes,
        mean_rel_l2,
        max_rel_l2,
        mean_cosine,
        verdict,
        message: verdict.message(model.info.trained_uncond.as_deref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One denoiser written as ε or as v gives one v, so its two forms
    /// get one verdict (in ε the same change read √ᾱ times smaller).
    #[test]
    fn eps_and_v_forms_of_one_denoiser_compare_alike() {
        let d = Device::Cpu;
        let x_t = Tensor::new(&[0.3f64, -1.2, 0.8], &d).unwrap();
        let (x0_e, x0_z) = (
            Tensor::new(&[0.5f64, 0.1, -0.4], &d).unwrap(),
            Tensor::new(&[0.4f64, 0.2, -0.1], &d).unwrap(),
        );
        for sigma in [0.03, 1.0, 14.6] {
            let (a, s) = (
                1.0 / (1.0f64 + sigma * sigma).sqrt(),
                sigma / (1.0f64 + sigma * sigma).sqrt(),
            );
            // x_t = a·x0 + s·ε  →  ε = (x_t − a·x0)/s,  v = a·ε − s·x0.
            let eps = |x0: &Tensor| ((&x_t - (x0 * a).unwrap()).unwrap() / s).unwrap();
            let v = |x0: &Tensor| ((eps(x0) * a).unwrap() - (x0 * s).unwrap()).unwrap();
            let from_eps = compare(
                &as_v(&eps(&x0_e), &x_t, sigma, Prediction::Eps).unwrap(),
                &as_v(&eps(&x0_z), &x_t, sigma, Prediction::Eps).unwrap(),
            )
            .unwrap();
            let from_v = compare(&v(&x0_e), &v(&x0_z)).unwrap();
            assert!(
                (from_eps.0 - from_v.0).abs() < 1e-9,
                "σ {sigma}: {from_eps:?} {from_v:?}"
            );
            assert!((from_eps.1 - from_v.1).abs() < 1e-9);
            // Compared as ε the two differ at high noise (the bias this
            // removes; at low noise ε and v nearly agree).
            if sigma >= 1.0 {
                let raw = compare(&eps(&x0_e), &eps(&x0_z)).unwrap();
                assert!((raw.0 - from_v.0).abs() > 1e-2, "σ {sigma}");
            }
        }
    }

    #[test]
    fn verdict_thresholds() {
        assert_eq!(Verdict::from_stats(0.01, 0.999), Verdict::Same);
        assert_eq!(Verdict::from_stats(0.01, 0.95), Verdict::Moderate);
        assert_eq!(Verdict::from_stats(0.1, 0.995), Verdict::Moderate);
        assert_eq!(Verdict::from_stats(0.3, 0.995), Verdict::Different);
        assert_eq!(Verdict::from_stats(0.1, 0.5), Verdict::Different);
        assert_eq!(Verdict::from_stats(f64::NAN, 1.0), Verdict::Different);
    }

    #[test]
    fn a_known_training_uncond_decides_the_advice() {
        let d = Verdict::Different;
        assert!(d.message(None).contains("try --uncond empty"));
        let zero = d.message(Some("zero"));
        assert!(
            zero.contains("sample it with zeros") && !zero.contains("--uncond empty"),
            "{zero}"
        );
        let empty = Verdict::Moderate.message(Some("empty"));
        assert!(
            empty.contains("differ moderately") && empty.contains("sample it with ''"),
            "{empty}"
        );
        assert!(Verdict::Same
            .message(Some("zero"))
            .contains("hardly matters"));
        assert!(Verdict::Same.message(None).contains("hardly matters"));
        let text = d.message(Some("text:lowres"));
        assert!(text.contains("\"text:lowres\""), "{text}");
    }

    #[test]
    fn compare_values() {
        let d = Device::Cpu;
        let b = Tensor::new(&[3f32, 4.0], &d).unwrap();
        let a = Tensor::new(&[3f32, 4.0], &d).unwrap();
        let (rel, cos) = compare(&a, &b).unwrap();
        assert!(rel.abs() < 1e-12 && (cos - 1.0).abs() < 1e-12);
        let a = Tensor::new(&[-4f32, 3.0], &d).unwrap(); // orthogonal, same norm
        let (rel, cos) = compare(&a, &b).unwrap();
        assert!((rel - 2f64.sqrt()).abs() < 1e-9, "{rel}");
        assert!(cos.abs() < 1e-12, "{cos}");
    }
}
