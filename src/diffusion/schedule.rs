//! The discrete noise schedule of SDXL: scaled-linear betas, ᾱ (alphas_cumprod),
//! the σ table, zero-terminal-SNR rescaling, and σ ↔ timestep conversions.
//!
//! Follows `shared/reference/sdxl.md` §6.1–6.2 and §6.3 (c_noise): sgm
//! `LegacyDDPMDiscretization` / diffusers `scaled_linear` / ComfyUI
//! `make_beta_schedule("linear")`; zero terminal SNR as Lin et al. 2023
//! Algorithm 1 (diffusers `rescale_zero_terminal_snr`, kohya
//! `fix_noise_scheduler_betas_for_zero_terminal_snr`, ComfyUI
//! `rescale_zero_terminal_snr_sigmas`).
//!
//! Two views of one schedule are kept apart on purpose:
//! - **training** uses the exact ᾱ table ([`NoiseSchedule::alphas_cumprod`]);
//!   with ZTSNR ᾱ₉₉₉ = 0 exactly, which the VP form handles (x_t = ε, v = −x0);
//! - **sampling** uses the σ table ([`NoiseSchedule::sigmas`]), where the
//!   terminal ᾱ of a ZTSNR schedule is clamped to a tiny positive value so that
//!   σ_max is finite ([`TerminalClamp`]; ComfyUI/A1111/Forge 4.897e-8 by
//!   default, diffusers 2⁻²⁴ as an option).
//!
//! All arithmetic is f64 (the references use f64 for the betas and f32 for
//! stored tables; the goldens are compared at 1e-5 relative).

use crate::{Error, Result};

/// Number of training timesteps of SD/SDXL.
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;
/// First beta of SDXL's scaled-linear schedule.
pub const BETA_START: f64 = 0.00085;
/// Last beta of SDXL's scaled-linear schedule.
pub const BETA_END: f64 = 0.012;
/// Terminal ᾱ used for sampling ZTSNR models by ComfyUI (`rescale_zero_terminal_snr_sigmas`),
/// A1111 ("Zero Terminal SNR" noise schedule) and Forge: σ_max ≈ 4518.76.
pub const COMFY_TERMINAL_ALPHA_BAR: f64 = 4.897_345_189_085_343_5e-8;
/// Terminal ᾱ used by diffusers samplers with `rescale_betas_zero_snr=True`
/// (2⁻²⁴, the smallest positive f16 subnormal): σ_max ≈ 4096.
pub const DIFFUSERS_TERMINAL_ALPHA_BAR: f64 = 5.960_464_477_539_063e-8;

/// How the terminal ᾱ = 0 of a zero-terminal-SNR schedule is made finite for
/// sampling (training always keeps the exact 0).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum TerminalClamp {
    /// ᾱ_T = 4.8973451890853435e-08 (ComfyUI, A1111, Forge; σ_max ≈ 4518.76). The default,
    /// so that our images match what users see in those UIs.
    #[default]
    ComfyUi,
    /// ᾱ_T = 2⁻²⁴ (diffusers Euler / DPM-Solver / UniPC; σ_max ≈ 4096).
    Diffusers,
}

impl TerminalClamp {
    /// The terminal ᾱ this clamp stands for.
    pub fn alpha_bar(self) -> f64 {
        match self {
            TerminalClamp::ComfyUi => COMFY_TERMINAL_ALPHA_BAR,
            TerminalClamp::Diffusers => DIFFUSERS_TERMINAL_ALPHA_BAR,
        }
    }
}

impl std::str::FromStr for TerminalClamp {
    type Err = Error;

    /// `comfyui` (also `comfy`, `a1111`, `forge`) or `diffusers`, any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "comfyui" | "comfy" | "a1111" | "forge" => Ok(TerminalClamp::ComfyUi),
            "diffusers" => Ok(TerminalClamp::Diffusers),
            other => Err(Error::config(format!(
                "unknown ZTSNR terminal clamp {other:?}; use comfyui (4.897e-8) or diffusers (2^-24)"
            ))),
        }
    }
}

impl std::fmt::Display for TerminalClamp {
    /// `comfyui` or `diffusers`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TerminalClamp::ComfyUi => "comfyui",
            TerminalClamp::Diffusers => "diffusers",
        })
    }
}

/// Scaled-linear betas: `β_i = (√start + (√end − √start)·i/(n−1))²`, i = 0..n.
pub fn scaled_linear_betas(n: usize, start: f64, end: f64) -> Vec<f64> {
    let (a, b) = (start.sqrt(), end.sqrt());
    if n == 1 {
        return vec![start];
    }
    (0..n)
        .map(|i| {
            let r = a + (b - a) * i as f64 / (n - 1) as f64;
            r * r
        })
        .collect()
}

/// ᾱ_i = Π_{j≤i} (1 − β_j).
pub fn alphas_cumprod_from_betas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// Betas back from ᾱ: α_0 = ᾱ_0, α_i = ᾱ_i/ᾱ_{i−1}, β = 1 − α (β_T = 1 under ZTSNR).
pub fn betas_from_alphas_cumprod(acp: &[f64]) -> Vec<f64> {
    let mut prev = 1.0;
    acp.iter()
        .map(|&a| {
            let beta = 1.0 - a / prev;
            prev = a;
            beta
        })
        .collect()
}

/// Zero-terminal-SNR rescale of an ᾱ table (Lin et al. 2023, Algorithm 1):
/// shift √ᾱ so the last entry is exactly 0, then scale so the first entry is
/// unchanged. Returns the new ᾱ with `ᾱ_T = 0` exactly.
pub fn rescale_zero_terminal_snr(acp: &[f64]) -> Vec<f64> {
    let Some((&first, &last)) = acp.first().zip(acp.last()) else {
        return Vec::new();
    };
    let (s0, st) = (first.sqrt(), last.sqrt());
    let k = s0 / (s0 - st);
    let mut out: Vec<f64> = acp
        .iter()
        .map(|&a| {
            let s = (a.sqrt() - st) * k;
            s * s
        })
        .collect();
    if let Some(l) = out.last_mut() {
        *l = 0.0;
    }
    out
}

/// A discrete noise schedule: the exact ᾱ table for training and the finite σ
/// table for sampling (σ_i = √((1−ᾱ_i)/ᾱ_i), increasing in i).
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// Exact ᾱ (may end in 0 for ZTSNR).
    alphas_cumprod: Vec<f64>,
    /// Sampling σ table (terminal clamped, all finite and > 0).
    sigmas: Vec<f64>,
    /// ln σ_i.
    log_sigmas: Vec<f64>,
    /// Whether the schedule was rescaled to zero terminal SNR.
    ztsnr: bool,
}

impl NoiseSchedule {
    /// SDXL's base schedule (eps models, or v models without ZTSNR).
    pub fn sdxl() -> Self {
        Self::sdxl_with(false, TerminalClamp::default())
    }

    /// SDXL's schedule rescaled to zero terminal SNR; `clamp` fixes the
    /// sampling σ_max.
    pub fn sdxl_ztsnr(clamp: TerminalClamp) -> Self {
        Self::sdxl_with(true, clamp)
    }

    /// SDXL's schedule, with or without ZTSNR.
    pub fn sdxl_with(ztsnr: bool, clamp: TerminalClamp) -> Self {
        let betas = scaled_linear_betas(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END);
        let mut acp = alphas_cumprod_from_betas(&betas);
        if ztsnr {
            acp = rescale_zero_terminal_snr(&acp);
        }
        // Built-in tables and clamps are valid by construction.
        Self::build(acp, clamp, ztsnr)
    }

    /// A schedule from an arbitrary ᾱ table (decreasing, in (0, 1), only the
    /// last entry may be 0: ᾱ = 1 is σ = 0, whose log the σ interpolation
    /// cannot take). A terminal 0 marks the schedule as ZTSNR and is
    /// clamped for sampling with `clamp`.
    pub fn from_alphas_cumprod(acp: Vec<f64>, clamp: TerminalClamp) -> Result<Self> {
        if acp.len() < 2 {
            return Err(Error::config(format!(
                "noise schedule: need at least 2 alphas_cumprod entries, got {}",
                acp.len()
            )));
        }
        let n = acp.len();
        for (i, &a) in acp.iter().enumerate() {
            let ok = a.is_finite() && a < 1.0 && (a > 0.0 || (a == 0.0 && i == n - 1));
            if !ok {
                return Err(Error::config(format!(
                    "noise schedule: alphas_cumprod[{i}] = {a} is outside (0, 1) \
                     (only the last entry may be 0, for zero terminal SNR)"
                )));
            }
            if i > 0 && a > acp[i - 1] {
                return Err(Error::config(format!(
                    "noise schedule: alphas_cumprod must decrease, but entry {i} ({a}) > entry {} ({})",
                    i - 1,
                    acp[i - 1]
                )));
            }
        }
        let c = clamp.alpha_bar();
        // The clamp stands in for a terminal 0 only; other tables never use it.
        if acp[n - 1] == 0.0 && !(c > 0.0 && c < acp[n - 2]) {
            return Err(Error::config(format!(
                "noise schedule: terminal clamp {c} must be in (0, {}) (the second to last alphas_cumprod)",
                acp[n - 2]
            )));
        }
        let ztsnr = acp[n - 1] == 0.0;
        Ok(Self::build(acp, clamp, ztsnr))
    }

    fn build(acp: Vec<f64>, clamp: TerminalClamp, ztsnr: bool) -> Self {
        let n = acp.len();
        let sigmas: Vec<f64> = acp
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let a = if i == n - 1 && a == 0.0 {
                    clamp.alpha_bar()
                } else {
                    a
                };
                ((1.0 - a) / a).sqrt()
            })
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            alphas_cumprod: acp,
            sigmas,
            log_sigmas,
            ztsnr,
        }
    }

    /// Number of discrete timesteps (1000 for SDXL).
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Never true for a constructed schedule (kept for API completeness).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Whether this is a zero-terminal-SNR schedule (exact ᾱ_T = 0 for training).
    pub fn is_ztsnr(&self) -> bool {
        self.ztsnr
    }

    /// Exact ᾱ table, for training (ᾱ_T = 0 under ZTSNR).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Betas of the exact table (β_T = 1 under ZTSNR).
    pub fn betas(&self) -> Vec<f64> {
        betas_from_alphas_cumprod(&self.alphas_cumprod)
    }

    /// VP coefficients (α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)) of the exact table; `None` when `t` is out of range.
    pub fn alpha_sigma(&self, t: usize) -> Option<(f64, f64)> {
        self.alphas_cumprod
            .get(t)
            .map(|&a| (a.sqrt(), (1.0 - a).sqrt()))
    }

    /// SNR_t = ᾱ_t/(1−ᾱ_t) of the exact table (0 at the ZTSNR terminal step).
    pub fn snr(&self, t: usize) -> Option<f64> {
        self.alphas_cumprod.get(t).map(|&a| a / (1.0 - a))
    }

    /// Sampling σ table, increasing with t (finite, terminal clamped).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Smallest σ (t = 0).
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    /// Largest σ (t = T); ≈ 14.6146 for SDXL, ≈ 4518.76 / 4096 for ZTSNR.
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// σ at a possibly fractional timestep, interpolating ln σ linearly
    /// (ComfyUI `ModelSamplingDiscrete.sigma`, k-diffusion `t_to_sigma`);
    /// `t` is clamped to [0, T].
    pub fn sigma_at(&self, t: f64) -> f64 {
        let last = (self.len() - 1) as f64;
        let t = t.clamp(0.0, last);
        let lo = t.floor();
        let w = t - lo;
        let lo = lo as usize;
        let hi = (t.ceil() as usize).min(self.len() - 1);
        ((1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
    }

    /// σ at a possibly fractional timestep, interpolating σ linearly
    /// (diffusers `set_timesteps` with `interpolation_type="linear"`, i.e. `np.interp`);
    /// `t` is clamped to [0, T].
    pub fn sigma_at_linear(&self, t: f64) -> f64 {
        let last = (self.len() - 1) as f64;
        let t = t.clamp(0.0, last);
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(self.len() - 1);
        let w = t - lo as f64;
        (1.0 - w) * self.sigmas[lo] + w * self.sigmas[hi]
    }

    /// Nearest discrete timestep in ln σ (ComfyUI `ModelSamplingDiscrete.timestep`,
    /// k-diffusion `sigma_to_t(quantize=True)`, sgm's index quantisation); ties go to
    /// the lower index.
    pub fn timestep_nearest(&self, sigma: f64) -> usize {
        let ls = sigma.ln();
        let k = self.log_sigmas.partition_point(|&v| v <= ls);
        if k == 0 {
            return 0;
        }
        if k >= self.len() {
            return self.len() - 1;
        }
        let (d_lo, d_hi) = (
            (ls - self.log_sigmas[k - 1]).abs(),
            (self.log_sigmas[k] - ls).abs(),
        );
        if d_hi < d_lo {
            k
        } else {
            k - 1
        }
    }

    /// Fractional timestep for σ, interpolating linearly in ln σ between the two
    /// neighbouring table entries and clamping to [0, T] (diffusers `_sigma_to_t`,
    /// k-diffusion `sigma_to_t(quantize=False)`). Inverse of [`Self::sigma_at`].
    pub fn timestep_interp(&self, sigma: f64) -> f64 {
        let ls = sigma.max(1e-10).ln();
        let n = self.len();
        let k = self.log_sigmas.partition_point(|&v| v <= ls);
        let lo = if k == 0 { 0 } else { (k - 1).min(n - 2) };
        let hi = lo + 1;
        let (l, h) = (self.log_sigmas[lo], self.log_sigmas[hi]);
        let w = ((l - ls) / (l - h)).clamp(0.0, 1.0);
        (1.0 - w) * lo as f64 + w * hi as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::testutil::{assert_close_rel, f64s, golden};

    // Equivalent diffusers code: `betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000)**2`,
    // `alphas_cumprod = torch.cumprod(1 - betas, 0)`, `rescale_zero_terminal_snr(betas)`.
    #[test]
    fn schedule_matches_diffusers_golden() {
        let g = golden("schedule.json");
        let base = NoiseSchedule::sdxl();
        assert_close_rel(&base.betas(), &f64s(&g["betas"]), 1e-9, "betas");
        assert_close_rel(
            base.alphas_cumprod(),
            &f64s(&g["alphas_cumprod"]),
            1e-9,
            "acp",
        );
        let z = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let zacp = f64s(&g["ztsnr_alphas_cumprod"]);
        assert_eq!(zacp[999], 0.0);
        assert_eq!(z.alphas_cumprod()[999], 0.0, "training table must be exact");
        assert_close_rel(z.alphas_cumprod(), &zacp, 1e-8, "ztsnr acp");
        // betas from the golden betas (β_T = 1)
        let zb = f64s(&g["ztsnr_betas"]);
        assert_close_rel(&z.betas(), &zb, 1e-7, "ztsnr betas");
        let comfy = g["ztsnr_sigma_max_comfy"].as_f64().unwrap();
        let diff = g["ztsnr_sigma_max_diffusers"].as_f64().unwrap();
        assert!((z.sigma_max() - comfy).abs() < 1e-9 * comfy);
        let zd = NoiseSchedule::sdxl_ztsnr(TerminalClamp::Diffusers);
        assert!((zd.sigma_max() - diff).abs() < 1e-9 * diff);
    }

    // Values from shared/reference/sdxl.md §6.1/§6.2 (computed independently).
    #[test]
    fn schedule_reference_values() {
        let s = NoiseSchedule::sdxl();
        assert!((s.alphas_cumprod()[999] - 0.004_660_098_5).abs() < 1e-9);
        assert!((s.sigma_max() - 14.614_641_2).abs() < 1e-6);
        assert!((s.sigma_min() - 0.029_167_2).abs() < 1e-6);
        assert!((s.sigmas()[499] - 1.612_886).abs() < 1e-5);
        let z = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        assert!((z.sigmas()[998] - 2254.24).abs() < 0.01);
        assert!((z.sigma_max() - 4518.76).abs() < 0.01);
        assert!((z.sigmas()[499] - 1.768_080).abs() < 1e-5);
        assert!((z.betas()[998] - 0.751_14).abs() < 1e-5);
        assert_eq!(z.betas()[999], 1.0);
        assert_eq!(z.snr(999), Some(0.0));
        assert_eq!(z.alpha_sigma(999), Some((0.0, 1.0)));
        assert!((z.sigma_min() - s.sigma_min()).abs() < 1e-12);
        assert!(
            (NoiseSchedule::sdxl_ztsnr(TerminalClamp::Diffusers).sigma_max() - 4096.0).abs() < 0.01
        );
    }

    // Equivalent k-diffusion code: `DiscreteSchedule.sigma_to_t(quantize=True/False)`, `t_to_sigma`.
    #[test]
    fn sigma_timestep_conversions_match_kdiffusion() {
        let g = golden("spacing.json");
        for case in g["sigma_to_t"].as_array().unwrap() {
            let s = match case["ztsnr"].as_str().unwrap() {
                "none" => NoiseSchedule::sdxl(),
                _ => NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi),
            };
            let sig = f64s(&case["sigmas"]);
            let near: Vec<f64> = sig.iter().map(|&x| s.timestep_nearest(x) as f64).collect();
            assert_eq!(near, f64s(&case["t_nearest"]));
            let interp: Vec<f64> = sig.iter().map(|&x| s.timestep_interp(x)).collect();
            let want = f64s(&case["t_interp"]);
            for (a, b) in interp.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "t_interp {a} vs {b}");
            }
            let ts = f64s(&case["t"]);
            let sg: Vec<f64> = ts.iter().map(|&t| s.sigma_at(t)).collect();
            assert_close_rel(&sg, &f64s(&case["sigma_of_t"]), 1e-5, "sigma_at");
        }
    }

    #[test]
    fn sigma_at_and_timestep_interp_are_inverse() {
        let s = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        for &t in &[0.0, 0.25, 17.5, 500.0, 998.9, 999.0] {
            let back = s.timestep_interp(s.sigma_at(t));
            assert!((back - t).abs() < 1e-9, "{t} -> {back}");
        }
    }

    #[test]
    fn from_alphas_cumprod_validates() {
        assert!(
            NoiseSchedule::from_alphas_cumprod(vec![0.9, 0.95], TerminalClamp::ComfyUi).is_err()
        );
        assert!(
            NoiseSchedule::from_alphas_cumprod(vec![0.9, 0.0, 0.0], TerminalClamp::ComfyUi)
                .is_err()
        );
        // the clamp must stay below the second to last entry
        assert!(
            NoiseSchedule::from_alphas_cumprod(vec![0.9, 1e-8, 0.0], TerminalClamp::ComfyUi)
                .is_err()
        );
        // ᾱ = 1 (σ = 0) has no log σ.
        assert!(
            NoiseSchedule::from_alphas_cumprod(vec![1.0, 0.5, 0.1], TerminalClamp::ComfyUi)
                .is_err()
        );
        // Without a terminal 0 the clamp is unused, and does not refuse the table.
        let s = NoiseSchedule::from_alphas_cumprod(vec![0.9, 1e-8, 1e-9], TerminalClamp::ComfyUi)
            .unwrap();
        assert!(!s.is_ztsnr());
        for c in [TerminalClamp::ComfyUi, TerminalClamp::Diffusers] {
            assert_eq!(c.to_string().parse::<TerminalClamp>().unwrap(), c);
        }
        assert!("zero".parse::<TerminalClamp>().is_err());
        let s = NoiseSchedule::from_alphas_cumprod(vec![0.9, 0.5, 0.0], TerminalClamp::ComfyUi)
            .unwrap();
        assert!(s.is_ztsnr() && s.sigma_max().is_finite());
    }
}
