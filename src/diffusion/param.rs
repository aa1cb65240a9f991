//! Parameterisations (what the UNet predicts: ε or v), the k-diffusion
//! denoiser scalings (c_skip, c_out, c_in), and conversions between ε, v and
//! x0.
//!
//! Follows `shared/reference/sdxl.md` §6.3: sgm `EpsScaling` / `VScaling`,
//! ComfyUI `EPS` / `V_PREDICTION` (σ_data = 1), diffusers `get_velocity` and
//! the DDIM `pred_original_sample` formulas.
//!
//! Two coordinate systems appear:
//! - **VP form** (training, DDPM/DDIM): `x_t = α·x0 + s·ε` with
//!   `(α, s) = (√ᾱ, √(1−ᾱ))`. All conversions here are written in (α, s) rather
//!   than SNR ratios, so they stay finite at ᾱ = 0 (the ZTSNR terminal step,
//!   where `x_t = ε` and `v = −x0`). The single undefined case — recovering x0
//!   from an ε prediction at ᾱ = 0 (ε carries no information about x0 there) —
//!   is reported as an error rather than returning inf/NaN.
//! - **k-diffusion form** (sampling): `x = x0 + σ·ε = x_t/α`, σ = s/α. The
//!   denoiser `D(x, σ) = c_skip·x + c_out·F(c_in·x, t)`; `c_in·x = x_t`, so the
//!   same UNet serves both forms.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use crate::{Error, Result};

/// What the model's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Prediction {
    /// ε-prediction (SDXL base, most SD checkpoints).
    #[default]
    Eps,
    /// v-prediction, `v = α·ε − s·x0` (diffusers `get_velocity`).
    V,
}

impl FromStr for Prediction {
    type Err = Error;

    /// Accepts `eps`/`epsilon` and `v`/`v_prediction`/`v-prediction`/`vpred` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "eps" | "epsilon" => Ok(Prediction::Eps),
            "v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred" => Ok(Prediction::V),
            other => Err(Error::config(format!(
                "unknown prediction type {other:?}; use eps or v"
            ))),
        }
    }
}

impl fmt::Display for Prediction {
    /// `eps` or `v` (the values our infotext and CLI use).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prediction::Eps => "eps",
            Prediction::V => "v",
        })
    }
}

/// k-diffusion denoiser scalings at one σ: `D = c_skip·x + c_out·F(c_in·x)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalings {
    /// Weight of the input x in the denoised estimate.
    pub c_skip: f64,
    /// Weight of the model output.
    pub c_out: f64,
    /// Input scaling (`c_in·x = x_t`, the VP-form input).
    pub c_in: f64,
}

impl Prediction {
    /// Scalings at σ (σ_data = 1):
    /// ε: c_skip 1, c_out −σ, c_in 1/√(σ²+1);
    /// v: c_skip 1/(σ²+1), c_out −σ/√(σ²+1), c_in 1/√(σ²+1).
    pub fn scalings(self, sigma: f64) -> Scalings {
        let q = sigma * sigma + 1.0;
        let c_in = 1.0 / q.sqrt();
        match self {
            Prediction::Eps => Scalings {
                c_skip: 1.0,
                c_out: -sigma,
                c_in,
            },
            Prediction::V => Scalings {
                c_skip: 1.0 / q,
                c_out: -sigma / q.sqrt(),
                c_in,
            },
        }
    }

    /// Denoised x0 from the k-form input `x` and the model output at σ.
    pub fn denoised(self, x: &Tensor, model_out: &Tensor, sigma: f64) -> Result<Tensor> {
        let c = self.scalings(sigma);
        lin2(c.c_skip, x, c.c_out, model_out)
    }

    /// Training target for clean `x0`, noise `eps` at ᾱ: ε, or `v = α·ε − s·x0`
    /// (finite at ᾱ = 0, where v = −x0).
    pub fn target(self, x0: &Tensor, eps: &Tensor, alpha_bar: f64) -> Result<Tensor> {
        match self {
            Prediction::Eps => Ok(eps.clone()),
            Prediction::V => {
                let (a, s) = vp_coeffs(alpha_bar);
                v_from_x0_eps(x0, eps, a, s)
            }
        }
    }

    /// x0 from a VP input `x_t` and the model output at ᾱ. For ε at ᾱ = 0 the
    /// answer is undefined and an error is returned.
    pub fn x0_from_output(self, x_t: &Tensor, out: &Tensor, alpha_bar: f64) -> Result<Tensor> {
        let (a, s) = vp_coeffs(alpha_bar);
        match self {
            Prediction::V => x0_from_v(x_t, out, a, s),
            Prediction::Eps => x0_from_eps(x_t, out, a, s),
        }
    }

    /// ε from a VP input `x_t` and the model output at ᾱ (always finite).
    pub fn eps_from_output(self, x_t: &Tensor, out: &Tensor, alpha_bar: f64) -> Result<Tensor> {
        match self {
            Prediction::Eps => Ok(out.clone()),
            Prediction::V => {
                let (a, s) = vp_coeffs(alpha_bar);
                eps_from_v(x_t, out, a, s)
            }
        }
    }
}

/// `(α, s) = (√ᾱ, √(1−ᾱ))`, the VP coefficients.
pub fn vp_coeffs(alpha_bar: f64) -> (f64, f64) {
    (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())
}

/// σ (k-form) for ᾱ: `√((1−ᾱ)/ᾱ)`; +∞ at ᾱ = 0.
pub fn sigma_from_alpha_bar(alpha_bar: f64) -> f64 {
    ((1.0 - alpha_bar) / alpha_bar).sqrt()
}

/// ᾱ for a k-form σ: `1/(σ²+1)` (1 at σ = 0).
pub fn alpha_bar_from_sigma(sigma: f64) -> f64 {
    1.0 / (sigma * sigma + 1.0)
}

/// `a·x + b·y` on same-shape tensors (the result has x's dtype).
pub fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    let y = if y.dtype() == x.dtype() {
        y.clone()
    } else {
        y.to_dtype(x.dtype())?
    };
    Ok(x.affine(a, 0.0)?.add(&y.affine(b, 0.0)?)?)
}

/// `x_t = α·x0 + s·ε` (diffusers `add_noise`).
pub fn noisy_from_x0_eps(x0: &Tensor, eps: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    lin2(a, x0, s, eps)
}

/// `v = α·ε − s·x0` (diffusers `get_velocity`).
pub fn v_from_x0_eps(x0: &Tensor, eps: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    lin2(a, eps, -s, x0)
}

/// `x0 = α·x_t − s·v` (finite everywhere; −v at ᾱ = 0).
pub fn x0_from_v(x_t: &Tensor, v: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    lin2(a, x_t, -s, v)
}

/// `ε = s·x_t + α·v` (finite everywhere; x_t at ᾱ = 0).
pub fn eps_from_v(x_t: &Tensor, v: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    lin2(s, x_t, a, v)
}

/// `v = (α·x_t − x0)/s` (finite for s > 0, i.e. every training step).
pub fn v_from_xt_x0(x_t: &Tensor, x0: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    if s <= 0.0 {
        return Err(Error::Other(
            "v from (x_t, x0) is undefined at alpha_bar = 1 (no noise)".into(),
        ));
    }
    lin2(a / s, x_t, -1.0 / s, x0)
}

/// `ε = (x_t − α·x0)/s` (finite for s > 0).
pub fn eps_from_xt_x0(x_t: &Tensor, x0: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    if s <= 0.0 {
        return Err(Error::Other(
            "eps from (x_t, x0) is undefined at alpha_bar = 1 (no noise)".into(),
        ));
    }
    lin2(1.0 / s, x_t, -a / s, x0)
}

/// `x0 = (x_t − s·ε)/α`; an error at ᾱ = 0, where an ε prediction says nothing
/// about x0 (use a v model, or clamp ᾱ_T for sampling).
pub fn x0_from_eps(x_t: &Tensor, eps: &Tensor, a: f64, s: f64) -> Result<Tensor> {
    if a <= 0.0 {
        return Err(Error::Other(
            "x0 from an eps prediction is undefined at alpha_bar = 0 (zero terminal SNR): \
             use v-prediction or a clamped sampling schedule"
                .into(),
        ));
    }
    lin2(1.0 / a, x_t, -s / a, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::{NoiseSchedule, TerminalClamp};
    use crate::diffusion::testutil::{assert_tensor_close, f64s, golden, tensor64, values};
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        values(a)
            .iter()
            .zip(&values(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    // Equivalent diffusers code: DDPMScheduler.add_noise / get_velocity and
    // DDIMScheduler.step(...).pred_original_sample on the exact ZTSNR table.
    #[test]
    fn conversions_match_diffusers_including_zero_alpha_bar() {
        let g = golden("conversions.json");
        let sched = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let shape = (1, 4, 2, 2);
        for case in g["cases"].as_array().unwrap() {
            let t = case["t"].as_u64().unwrap() as usize;
            let ab = sched.alphas_cumprod()[t];
            assert!((ab - case["alpha_bar"].as_f64().unwrap()).abs() <= 1e-9 * ab.max(1e-30));
            let (a, s) = sched.alpha_sigma(t).unwrap();
            let x0 = tensor64(&f64s(&case["x0"]), shape);
            let eps = tensor64(&f64s(&case["eps"]), shape);
            let xt = noisy_from_x0_eps(&x0, &eps, a, s).unwrap();
            assert_tensor_close(&xt, &f64s(&case["x_t"]), 1e-9, "x_t");
            let v = Prediction::V.target(&x0, &eps, ab).unwrap();
            assert_tensor_close(&v, &f64s(&case["v"]), 1e-9, "v");
            let x0v = Prediction::V.x0_from_output(&xt, &v, ab).unwrap();
            assert_tensor_close(&x0v, &f64s(&case["x0_from_v"]), 1e-9, "x0 from v");
            let epsv = Prediction::V.eps_from_output(&xt, &v, ab).unwrap();
            assert!(max_abs_diff(&epsv, &eps) < 1e-9, "eps from v at t={t}");
            if ab > 0.0 {
                // x0 from eps divides by α (1/α ≈ 2254 at t = 998): compare relative to that.
                let x0e = Prediction::Eps.x0_from_output(&xt, &eps, ab).unwrap();
                assert_tensor_close(&x0e, &f64s(&case["x0_from_eps"]), 1e-9 / a, "x0 from eps");
                let v2 = v_from_xt_x0(&xt, &x0, a, s).unwrap();
                assert!(max_abs_diff(&v2, &v) < 1e-9);
                let e2 = eps_from_xt_x0(&xt, &x0, a, s).unwrap();
                assert!(max_abs_diff(&e2, &eps) < 1e-9);
            } else {
                // ᾱ = 0: x_t = ε, v = −x0, and eps cannot give x0.
                assert!(max_abs_diff(&xt, &eps) == 0.0);
                assert!(max_abs_diff(&v, &x0.neg().unwrap()) == 0.0);
                assert!(Prediction::Eps.x0_from_output(&xt, &eps, ab).is_err());
            }
        }
    }

    #[test]
    fn denoiser_scalings_agree_with_vp_conversions() {
        // D(x, σ) from the scalings must equal the VP-form x0 for both parameterisations.
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.3f32, -1.2, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[1.1f32, 0.4, -0.7], &dev).unwrap();
        for &sigma in &[0.03, 1.0, 14.6, 4518.76] {
            let ab = alpha_bar_from_sigma(sigma);
            let x = lin2(1.0, &x0, sigma, &eps).unwrap(); // k-form
            for p in [Prediction::Eps, Prediction::V] {
                let out = p.target(&x0, &eps, ab).unwrap();
                let d = p.denoised(&x, &out, sigma).unwrap();
                let tol = 1e-6 * sigma.max(1.0) * if p == Prediction::Eps { 10.0 } else { 1.0 };
                assert!(max_abs_diff(&d, &x0) < tol, "{p} at σ={sigma}");
            }
            assert!((sigma_from_alpha_bar(ab) - sigma).abs() < 1e-9 * sigma.max(1.0));
        }
    }

    #[test]
    fn prediction_parse_and_display() {
        assert_eq!("epsilon".parse::<Prediction>().unwrap(), Prediction::Eps);
        assert_eq!("V_Prediction".parse::<Prediction>().unwrap(), Prediction::V);
        assert!("x0".parse::<Prediction>().is_err());
        assert_eq!(Prediction::V.to_string(), "v");
        assert_eq!(
            Prediction::Eps.to_string().parse::<Prediction>().unwrap(),
            Prediction::Eps
        );
    }
}
