//! Diffusion maths and sampling for ε- and v-prediction SDXL models, with and
//! without zero terminal SNR (ZTSNR).
//!
//! Facts and formulas: `shared/reference/sdxl.md` §6–7 and
//! `shared/reference/trainers-landscape.md`; goldens from diffusers and
//! k-diffusion (`fixtures/scripts/gen_diffusion_goldens.py` →
//! `fixtures/golden/diffusion/`).
//!
//! - [`schedule`]: scaled-linear betas, ᾱ, σ table, ZTSNR rescale (exact ᾱ_T = 0
//!   for training; terminal clamp for sampling, ComfyUI 4.897e-8 by default or
//!   diffusers 2⁻²⁴), σ ↔ timestep.
//! - [`param`]: [`Prediction`] (eps / v), denoiser scalings c_skip/c_out/c_in,
//!   ε ↔ v ↔ x0 conversions written in (α, s) so they stay finite at ᾱ = 0.
//! - [`spacing`]: σ lists: diffusers spacings (leading / trailing / linspace) and
//!   ComfyUI schedules (normal / karras / simple / sgm_uniform) —
//!   [`ScheduleKind`]; ZTSNR defaults to trailing.
//! - [`sampler`]: the [`Denoiser`] trait (k-form `D(x, σ) ≈ x0`), the
//!   [`ModelDenoiser`] wrapper for raw ε/v UNets, and Euler, Euler ancestral,
//!   DPM++ 2M, DDIM ([`SamplerKind`], [`sample`]).
//! - [`guidance`]: CFG, CFG rescale in v-space (ComfyUI `RescaleCFG`), and
//!   [`UncondMode`] (zero / empty / negative).
//! - [`noise`]: per-image seeded ChaCha noise on the CPU, identical for a seed in
//!   any batch position and on any device.
//! - [`training`]: per-sample noising and ε / v targets on the exact schedule,
//!   loss weights (min-SNR-γ, v-like-ε) that stay finite at SNR = 0.
//!
//! How `eps2v sample` puts it together (the model side lives in `models::sdxl`):
//!
//! ```text
//! schedule = NoiseSchedule::sdxl() or ::sdxl_ztsnr(TerminalClamp::ComfyUi)
//! sigmas   = ScheduleKind::sigmas(&schedule, steps)                       // steps+1, last 0
//! seeds    = noise::batch_seeds(seed, batch)                              // seed + i
//! x        = initial_latent(&seeds, (4, h/8, w/8), &sigmas, &schedule, dev)
//! model    = ModelDenoiser { model: &unet_pair /* impl PairPredictor */, prediction,
//!                            schedule: &schedule, timestep_mode: TimestepMode::Nearest }
//! guided   = CfgDenoiser { inner: model, guidance: Guidance { scale, rescale } }
//! latent   = sample(&guided, &sigmas, x, sampler_kind, &mut SeededNoise::new(&seeds))
//! ```

#![warn(missing_docs)]
pub mod guidance;
pub mod noise;
pub mod param;
pub mod sampler;
pub mod schedule;
pub mod spacing;
pub mod training;

pub use guidance::{CfgDenoiser, CondUncondDenoiser, Guidance, PairPredictor, UncondMode};
pub use noise::{batch_noise, batch_seeds, noise_for_seed, NoiseSource, SeededNoise};
pub use param::{Prediction, Scalings};
pub use sampler::{
    initial_latent, initial_noise_scale, sample, sample_with, Denoiser, ModelDenoiser,
    NoisePredictor, Sampler, SamplerKind, TimestepMode,
};
pub use schedule::{NoiseSchedule, TerminalClamp};
pub use spacing::{ScheduleKind, Spacing};
pub use training::LossWeighting;

/// Shared helpers for the golden and convergence tests of this module.
#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{Device, Tensor};
    use serde_json::Value;

    use super::noise::NoiseSource;
    use super::param::Prediction;
    use super::sampler::NoisePredictor;
    use super::schedule::NoiseSchedule;
    use crate::Result;

    /// A golden JSON from fixtures/golden/diffusion/.
    pub fn golden(name: &str) -> Value {
        let path = format!(
            "{}/fixtures/golden/diffusion/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// A JSON array of numbers as f64.
    pub fn f64s(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    /// An f32 CPU tensor from f64 values.
    pub fn tensor<S: Into<candle_core::Shape>>(v: &[f64], shape: S) -> Tensor {
        Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    }

    /// |a − b| ≤ rel·max(|b|, 1e-12) element-wise, equal lengths.
    pub fn assert_close_rel(a: &[f64], b: &[f64], rel: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= rel * y.abs().max(1e-12),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// An f64 CPU tensor.
    pub fn tensor64<S: Into<candle_core::Shape>>(v: &[f64], shape: S) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// All elements as f64 (any dtype).
    pub fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// |t − want| ≤ tol·max(|want|, 1) element-wise.
    pub fn assert_tensor_close(t: &Tensor, want: &[f64], tol: f64, what: &str) {
        let got = values(t);
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Mean and (population) std of all elements.
    pub fn mean_std(t: &Tensor) -> (f64, f64) {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
        (m, var.sqrt())
    }

    /// An ideal ε/v model for data x0 ~ N(μ, s²) i.i.d. per element: the posterior
    /// mean `E[x0 | x] = μ + s²/(s²+σ²)·(x − μ)` (k-form x = x0 + σε), expressed as
    /// the model's prediction for VP input x_t at a timestep.
    pub struct AnalyticModel<'a> {
        pub mu: f64,
        pub s: f64,
        pub prediction: Prediction,
        pub schedule: &'a NoiseSchedule,
    }

    impl NoisePredictor for AnalyticModel<'_> {
        fn predict(&self, x_t: &Tensor, timestep: f64) -> Result<Tensor> {
            let sigma = self.schedule.sigma_at(timestep);
            let q = sigma * sigma + 1.0;
            let x = x_t.affine(q.sqrt(), 0.0)?; // k-form
            let k = self.s * self.s / (self.s * self.s + sigma * sigma);
            let d = x.affine(k, self.mu * (1.0 - k))?;
            // ε = (x − D)/σ; v = α ε − s_vp D with α = 1/√q, s_vp = σ/√q
            let eps = x.sub(&d)?.affine(1.0 / sigma, 0.0)?;
            Ok(match self.prediction {
                Prediction::Eps => eps,
                Prediction::V => super::param::lin2(1.0 / q.sqrt(), &eps, -sigma / q.sqrt(), &d)?,
            })
        }
    }

    /// Replays fixed noise tensors (one per draw, in order).
    pub struct ReplayNoise {
        noises: Vec<Vec<f64>>,
        next: usize,
    }

    impl ReplayNoise {
        pub fn new(noises: Vec<Vec<f64>>) -> Self {
            Self { noises, next: 0 }
        }
        pub fn used(&self) -> usize {
            self.next
        }
    }

    impl NoiseSource for ReplayNoise {
        fn next_noise(&mut self, like: &Tensor) -> Result<Tensor> {
            let v = self
                .noises
                .get(self.next)
                .ok_or_else(|| crate::Error::Other("replay noise: out of recorded noise".into()))?;
            self.next += 1;
            Ok(tensor(v, like.dims()))
        }
    }
}
