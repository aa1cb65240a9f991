//! Samplers: Euler, Euler ancestral, DPM++ 2M and DDIM, in the k-diffusion
//! form `x = x0 + σ·ε`, on candle tensors (any device, the dtype of `x_init`).
//!
//! Follows `shared/reference/sdxl.md` §6.5 (k-diffusion as in ComfyUI
//! `comfy/k_diffusion/sampling.py`: `sample_euler`, `sample_euler_ancestral`,
//! `sample_dpmpp_2m`) and diffusers `DDIMScheduler.step` for DDIM (written in VP
//! form: `x_t = √ᾱ·x0 + √(1−ᾱ−σ_η²)·ε + σ_η·z`, then mapped back to k-form).
//! With η = 0 DDIM is algebraically the Euler step, and with η > 0 it equals
//! Euler ancestral with the same η; it is kept as its own sampler because users
//! ask for it by name and its golden is diffusers' DDIM.
//!
//! The model plugs in through [`Denoiser`] (`D(x, σ) ≈ x0`). A raw UNet that
//! predicts ε or v from the VP input `x_t` and a timestep implements
//! [`NoisePredictor`] and is wrapped by [`ModelDenoiser`], which applies
//! c_in / c_skip / c_out and converts σ → timestep. Classifier-free guidance is
//! another `Denoiser` wrapper (`guidance::CfgDenoiser`). The `sample` CLI
//! composes: `ScheduleKind::sigmas` → [`initial_latent`] (per-seed noise ×
//! [`initial_noise_scale`]) → [`sample`] with a `noise::SeededNoise`. A raw model that
//! runs cond and uncond in one batch implements `guidance::PairPredictor`.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use super::noise::NoiseSource;
use super::param::{lin2, Prediction};
use super::schedule::NoiseSchedule;
use super::spacing::ScheduleKind;
use crate::{Error, Result};

/// A denoiser in k-diffusion form: given `x = x0 + σ·ε` (shape `(b, c, h, w)`)
/// and σ > 0, return the estimate of x0 (same shape).
pub trait Denoiser {
    /// `D(x, σ)`.
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

impl<F> Denoiser for F
where
    F: Fn(&Tensor, f64) -> Result<Tensor>,
{
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        self(x, sigma)
    }
}

/// A raw diffusion model (the UNet with its conditioning bound): maps the VP
/// input `x_t = x/√(σ²+1)` and a (possibly fractional) timestep to its ε or v
/// prediction.
pub trait NoisePredictor {
    /// Model output for input `x_t` (`(b, c, h, w)`) at `timestep` ∈ [0, T].
    fn predict(&self, x_t: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// How σ becomes the timestep fed to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimestepMode {
    /// Nearest table index in ln σ (ComfyUI `timestep()`, sgm quantisation,
    /// A1111's default "quantization"). The default.
    #[default]
    Nearest,
    /// Fractional timestep interpolated in ln σ (diffusers `_sigma_to_t`).
    Interpolated,
}

/// Wraps a [`NoisePredictor`] into a [`Denoiser`]:
/// `D = c_skip·x + c_out·F(c_in·x, t(σ))` (sgm `DiscreteDenoiser`, ComfyUI
/// `BaseModel.apply_model`).
pub struct ModelDenoiser<'a, M: ?Sized> {
    /// The raw model.
    pub model: &'a M,
    /// What the model predicts.
    pub prediction: Prediction,
    /// The schedule that maps σ to timesteps.
    pub schedule: &'a NoiseSchedule,
    /// σ → timestep rule.
    pub timestep_mode: TimestepMode,
}

impl<M: ?Sized> ModelDenoiser<'_, M> {
    /// The timestep the model is evaluated at for σ.
    pub fn timestep(&self, sigma: f64) -> f64 {
        match self.timestep_mode {
            TimestepMode::Nearest => self.schedule.timestep_nearest(sigma) as f64,
            TimestepMode::Interpolated => self.schedule.timestep_interp(sigma),
        }
    }

    /// `c_skip·x + c_out·out` for a model output at σ.
    pub fn denoised_from_output(&self, x: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
        self.prediction.denoised(x, out, sigma)
    }

    /// The model input `c_in·x` (= the VP sample x_t).
    pub fn model_input(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(x.affine(self.prediction.scalings(sigma).c_in, 0.0)?)
    }
}

impl<M: NoisePredictor + ?Sized> Denoiser for ModelDenoiser<'_, M> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let x_in = self.model_input(x, sigma)?; // (b, c, h, w), = x_t
        let out = self.model.predict(&x_in, self.timestep(sigma))?;
        self.denoised_from_output(x, &out, sigma)
    }
}

/// Sampler names (`--sampler`): A1111/ComfyUI names on input, A1111 infotext
/// names on output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SamplerKind {
    /// `euler` / "Euler".
    #[default]
    Euler,
    /// `euler_a` / "Euler a" (η = 1).
    EulerAncestral,
    /// `dpmpp_2m` / "DPM++ 2M" (usually with the Karras schedule).
    DpmPp2m,
    /// `ddim` / "DDIM" (η = 0 by default).
    Ddim,
}

impl SamplerKind {
    /// All kinds, in CLI order.
    pub const ALL: [SamplerKind; 4] = [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
        SamplerKind::Ddim,
    ];

    /// CLI / ComfyUI name.
    pub fn cli_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::Ddim => "ddim",
        }
    }

    /// Default η (stochasticity): 1 for Euler ancestral, 0 otherwise.
    pub fn default_eta(self) -> f64 {
        match self {
            SamplerKind::EulerAncestral => 1.0,
            _ => 0.0,
        }
    }

    /// Whether the sampler draws fresh noise at each step (with its default η).
    pub fn is_ancestral(self) -> bool {
        self.default_eta() > 0.0
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// Accepts `euler`, `euler_a` (`euler_ancestral`), `dpmpp_2m`, `ddim` and the
    /// A1111 names ("Euler a", "DPM++ 2M", …), any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "euler" => Ok(SamplerKind::Euler),
            "euler_a" | "euler a" | "euler_ancestral" | "k_euler_a" => {
                Ok(SamplerKind::EulerAncestral)
            }
            "dpmpp_2m" | "dpm++ 2m" | "dpm++_2m" | "k_dpmpp_2m" => Ok(SamplerKind::DpmPp2m),
            "ddim" => Ok(SamplerKind::Ddim),
            _ => Err(Error::config(format!(
                "unknown sampler {s:?}; use one of euler, euler_a, dpmpp_2m, ddim"
            ))),
        }
    }
}

impl fmt::Display for SamplerKind {
    /// A1111 infotext names: "Euler", "Euler a", "DPM++ 2M", "DDIM".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::DpmPp2m => "DPM++ 2M",
            SamplerKind::Ddim => "DDIM",
        })
    }
}

/// Parses an A1111 infotext `Sampler:` value, including the pre-1.9 form that
/// carried the schedule in the name ("DPM++ 2M Karras").
pub fn parse_a1111_sampler(s: &str) -> Result<(SamplerKind, Option<ScheduleKind>)> {
    let t = s.trim();
    for (suffix, kind) in [
        (" karras", ScheduleKind::Karras),
        (" sgm uniform", ScheduleKind::SgmUniform),
    ] {
        if t.len() > suffix.len() && t.to_ascii_lowercase().ends_with(suffix) {
            let head = &t[..t.len() - suffix.len()];
            return Ok((head.parse()?, Some(kind)));
        }
    }
    Ok((t.parse()?, None))
}

/// `--sampler` and `--schedule`: the sampler may be an A1111 name that
/// carries its schedule ("DPM++ 2M Karras", A1111 before 1.9), which then
/// is the schedule unless `--schedule` names the same.
pub fn sampler_and_schedule(
    sampler: &str,
    schedule: Option<&str>,
) -> Result<(SamplerKind, Option<ScheduleKind>)> {
    let (kind, implied) = parse_a1111_sampler(sampler)?;
    let given = schedule.map(str::parse::<ScheduleKind>).transpose()?;
    match (implied, given) {
        (Some(i), Some(g)) if i != g => Err(Error::config(format!(
            "sampler {sampler:?} names the {} schedule, and the schedule given is {}; give one of them",
            i.cli_name(),
            g.cli_name()
        ))),
        (i, g) => Ok((kind, g.or(i))),
    }
}

/// A sampler with its options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// Which update rule.
    pub kind: SamplerKind,
    /// Ancestral strength η (Euler ancestral and DDIM; ignored by the others).
    pub eta: f64,
}

impl Sampler {
    /// A sampler with its default η.
    pub fn new(kind: SamplerKind) -> Self {
        Self {
            kind,
            eta: kind.default_eta(),
        }
    }
}

impl From<SamplerKind> for Sampler {
    fn from(kind: SamplerKind) -> Self {
        Sampler::new(kind)
    }
}

/// What a step callback sees (after the step).
pub struct StepInfo<'a> {
    /// 0-based step index.
    pub step: usize,
    /// Total number of steps.
    pub steps: usize,
    /// σ the model was evaluated at.
    pub sigma: f64,
    /// σ after the step.
    pub sigma_next: f64,
    /// Denoised estimate at `sigma`.
    pub denoised: &'a Tensor,
    /// Sample after the step (k-form, at `sigma_next`).
    pub x: &'a Tensor,
}

/// Scale for the unit initial noise of txt2img, as ComfyUI (`noise_scaling` with
/// `max_denoise`): `√(1+σ₀²)` when the first σ is the schedule's σ_max (or above),
/// else σ₀.
pub fn initial_noise_scale(sigma0: f64, schedule: &NoiseSchedule) -> f64 {
    let max = schedule.sigma_max();
    if sigma0 >= max || (sigma0 - max).abs() <= 1e-5 * max {
        (1.0 + sigma0 * sigma0).sqrt()
    } else {
        sigma0
    }
}

/// The txt2img starting point: per-seed unit noise `(b, c, h, w)` (see
/// [`super::noise::batch_noise`]) scaled by [`initial_noise_scale`] for `sigmas[0]`.
pub fn initial_latent(
    seeds: &[u64],
    shape: (usize, usize, usize),
    sigmas: &[f64],
    schedule: &NoiseSchedule,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let sigma0 = *sigmas
        .first()
        .ok_or_else(|| Error::config("initial latent: empty sigma list"))?;
    let noise = super::noise::batch_noise(seeds, shape, device)?;
    Ok(noise.affine(initial_noise_scale(sigma0, schedule), 0.0)?)
}

/// Checks a σ list: at least 2 entries, finite, σ_i > 0 before the last, non-increasing.
pub fn validate_sigmas(sigmas: &[f64]) -> Result<()> {
    if sigmas.len() < 2 {
        return Err(Error::config(format!(
            "sampler: need at least 2 sigmas (one step), got {}",
            sigmas.len()
        )));
    }
    for (i, w) in sigmas.windows(2).enumerate() {
        if !(w[0].is_finite() && w[1].is_finite() && w[0] > 0.0 && w[1] >= 0.0 && w[1] <= w[0]) {
            return Err(Error::config(format!(
                "sampler: sigmas must be finite, positive and non-increasing (last may be 0); \
                 got sigma[{i}] = {}, sigma[{}] = {}",
                w[0],
                i + 1,
                w[1]
            )));
        }
    }
    Ok(())
}

/// k-diffusion `get_ancestral_step`: `(σ_down, σ_up)` with
/// `σ_up = min(σ_to, η·√(σ_to²(σ_from²−σ_to²)/σ_from²))`, `σ_down = √(σ_to² − σ_up²)`.
pub fn ancestral_step(sigma_from: f64, sigma_to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (sigma_to, 0.0);
    }
    let up = (eta
        * (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .max(0.0)
            .sqrt())
    .min(sigma_to);
    let down = (sigma_to * sigma_to - up * up).max(0.0).sqrt();
    (down, up)
}

/// Runs `sampler` over `sigmas` from `x_init` (already scaled noise, k-form,
/// `(b, c, h, w)`), returning the final sample at σ = `sigmas.last()` (the
/// latent, when the list ends in 0).
pub fn sample(
    denoiser: &dyn Denoiser,
    sigmas: &[f64],
    x_init: Tensor,
    sampler: impl Into<Sampler>,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    sample_with(denoiser, sigmas, x_init, sampler.into(), noise, &mut |_| {
        Ok(())
    })
}

/// [`sample`] with a callback after every step (progress bars, previews,
/// trajectory tests). An error from the callback stops sampling.
pub fn sample_with(
    denoiser: &dyn Denoiser,
    sigmas: &[f64],
    x_init: Tensor,
    sampler: Sampler,
    noise: &mut dyn NoiseSource,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    validate_sigmas(sigmas)?;
    let _warm = crate::nn::keep_warm();
    let steps = sigmas.len() - 1;
    let mut x = x_init; // (b, c, h, w)
    let mut old_denoised: Option<Tensor> = None;
    for i in 0..steps {
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        let d = denoiser.denoise(&x, sigma)?;
        let d = if d.dtype() == x.dtype() {
            d
        } else {
            d.to_dtype(x.dtype())?
        };
        if d.dims() != x.dims() {
            return Err(Error::Other(format!(
                "denoiser returned shape {:?} for input {:?}",
                d.dims(),
                x.dims()
            )));
        }
        x = match sampler.kind {
            SamplerKind::Euler => euler_step(&x, &d, sigma, next)?,
            SamplerKind::EulerAncestral => {
                euler_ancestral_step(&x, &d, sigma, next, sampler.eta, noise)?
            }
            SamplerKind::DpmPp2m => {
                let prev = if i > 0 {
                    old_denoised.as_ref().map(|od| (od, sigmas[i - 1]))
                } else {
                    None
                };
                dpmpp_2m_step(&x, &d, sigma, next, prev)?
            }
            SamplerKind::Ddim => ddim_step(&x, &d, sigma, next, sampler.eta, noise)?,
        };
        callback(&StepInfo {
            step: i,
            steps,
            sigma,
            sigma_next: next,
            denoised: &d,
            x: &x,
        })?;
        old_denoised = Some(d);
    }
    Ok(x)
}

/// Euler: `d = (x − D)/σ; x ← x + d·(σ_next − σ)`.
fn euler_step(x: &Tensor, d: &Tensor, sigma: f64, next: f64) -> Result<Tensor> {
    // x + (x − D)(σn − σ)/σ = (σn/σ)·x + (1 − σn/σ)·D
    let r = next / sigma;
    lin2(r, x, 1.0 - r, d)
}

/// Euler ancestral: step to σ_down with Euler, then add σ_up·z.
fn euler_ancestral_step(
    x: &Tensor,
    d: &Tensor,
    sigma: f64,
    next: f64,
    eta: f64,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let (down, up) = ancestral_step(sigma, next, eta);
    // σ_down = 0: on the denoised sample (ComfyUI); with σ_next = 0 (the
    // last step) σ_up is 0 too, but with η > 1 it need not be.
    let x = if down == 0.0 {
        d.clone()
    } else {
        let r = down / sigma;
        lin2(r, x, 1.0 - r, d)?
    };
    if up == 0.0 {
        return Ok(x);
    }
    let z = noise.next_noise(&x)?;
    lin2(1.0, &x, up, &z)
}

/// DPM++ 2M (data prediction, midpoint), `t = −ln σ`, `h = t_next − t`:
/// first order on the first and last step, else with
/// `D' = (1 + 1/2r)·D − (1/2r)·D_prev`, `r = h_last/h`;
/// `x ← (σ_next/σ)·x − expm1(−h)·D'`.
fn dpmpp_2m_step(
    x: &Tensor,
    d: &Tensor,
    sigma: f64,
    next: f64,
    prev: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    if next == 0.0 {
        return Ok(d.clone());
    }
    let h = (sigma / next).ln();
    let coef = -(-h).exp_m1(); // 1 − σn/σ
    let ratio = next / sigma;
    // A repeated σ (h_last = 0) would make r = 0; fall back to first order there.
    let prev = prev.filter(|&(_, sp)| sp > sigma);
    match prev {
        None => lin2(ratio, x, coef, d),
        Some((d_prev, sigma_prev)) => {
            let h_last = (sigma_prev / sigma).ln();
            let r = h_last / h;
            let a = 1.0 + 1.0 / (2.0 * r);
            let b = -1.0 / (2.0 * r);
            let d2 = lin2(a, d, b, d_prev)?;
            lin2(ratio, x, coef, &d2)
        }
    }
}

/// DDIM (diffusers `DDIMScheduler.step`) in VP terms, on the k-form state:
/// with ᾱ = 1/(1+σ²), ᾱ' = 1/(1+σ_next²),
/// `σ_η = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')`,
/// `x_t' = √ᾱ'·x0 + √(1−ᾱ'−σ_η²)·ε + σ_η·z`, returned as `x_t'/√ᾱ'`.
fn ddim_step(
    x: &Tensor,
    d: &Tensor,
    sigma: f64,
    next: f64,
    eta: f64,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    // 1−ᾱ and 1−ᾱ/ᾱ' written without cancellation.
    let one_minus_ab = sigma * sigma / (1.0 + sigma * sigma);
    let one_minus_abp = next * next / (1.0 + next * next);
    let ratio_term = (sigma * sigma - next * next) / (1.0 + sigma * sigma); // 1 − ᾱ/ᾱ'
    let sigma_eta = eta * (one_minus_abp / one_minus_ab * ratio_term).max(0.0).sqrt();
    let sqrt_abp = 1.0 / (1.0 + next * next).sqrt();
    // ε = (x − D)/σ; x_t' = √ᾱ'·D + c_eps·ε (+ σ_η z); k-form = x_t'/√ᾱ'.
    let c_eps = (one_minus_abp - sigma_eta * sigma_eta).max(0.0).sqrt() / sqrt_abp;
    let c = c_eps / sigma; // coefficient on (x − D)
    let out = lin2(c, x, 1.0 - c, d)?;
    if sigma_eta == 0.0 {
        return Ok(out);
    }
    let z = noise.next_noise(&out)?;
    lin2(1.0, &out, sigma_eta / sqrt_abp, &z)
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
