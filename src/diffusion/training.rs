//! Training-side maths: noising a batch at per-sample timesteps, the ε / v
//! targets, and loss weights — all on the **exact** schedule (ᾱ_T = 0 under
//! ZTSNR), in VP form so the terminal step is well defined (x_t = ε, v = −x0).
//!
//! Follows `shared/reference/sdxl.md` §7 (diffusers `train_text_to_image_sdxl.py`,
//! `training_utils.compute_snr`; kohya `custom_train_functions.py`):
//! - x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; target ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0;
//! - SNR weights are computed on the schedule that is trained, i.e. *after*
//!   the ZTSNR rescale. (diffusers does the same; kohya builds its SNR table
//!   before `--zero_terminal_snr` rescales the betas — sd-scripts #1263,
//!   #1905 — so its weights are those of the un-rescaled schedule and never
//!   see SNR = 0.)
//! - min-SNR-γ: ε → min(SNR, γ)/SNR, v → min(SNR, γ)/(SNR+1). At the ZTSNR
//!   terminal step SNR = 0 and the ε weight is 0/0 (NaN in diffusers); we
//!   use its limit, 1 (for SNR < γ the weight is exactly 1). For v the weight
//!   there is exactly 0 and below 1e-3 for every t ≥ 937: min-SNR starves
//!   the steps a v + ZTSNR conversion must learn (predicting from pure
//!   noise), so the trainer's default is plain MSE;
//! - debiased estimation (kohya `--debiased_estimation_loss`): ε → 1/√SNR,
//!   v → 1/(SNR+1), SNR clamped at 1000 (and for ε below at snr_min, so
//!   1/√SNR stays finite at SNR = 0);
//! - kohya `--scale_v_pred_loss_like_noise_pred`: v-loss × SNR/(SNR+1), SNR
//!   clamped at 1000 (0 at the terminal step).

use candle_core::Tensor;

use super::param::Prediction;
use super::schedule::NoiseSchedule;
use crate::{Error, Result};

/// Per-sample loss weighting over timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum LossWeighting {
    /// Weight 1 everywhere.
    #[default]
    Uniform,
    /// Min-SNR-γ (Hang et al. 2023; γ = 5 recommended).
    MinSnr {
        /// The SNR cap γ.
        gamma: f64,
    },
    /// kohya `--scale_v_pred_loss_like_noise_pred`: SNR/(SNR+1), SNR ≤ 1000
    /// (makes a v-loss weigh timesteps like an ε-loss).
    VLikeEps,
    /// Debiased estimation: ε → 1/√SNR with SNR clamped to `[snr_min,
    /// 1000]`, v → 1/(SNR+1) with SNR ≤ 1000 (finite at SNR 0 as it is).
    Debiased {
        /// Lower SNR clamp (> 0; keeps 1/√SNR finite at SNR = 0).
        snr_min: f64,
    },
}

impl LossWeighting {
    /// Weight at signal-to-noise ratio `snr` for a model predicting `prediction`.
    /// Always finite for snr ∈ [0, ∞).
    pub fn weight(self, snr: f64, prediction: Prediction) -> f64 {
        match self {
            LossWeighting::Uniform => 1.0,
            LossWeighting::MinSnr { gamma } => match prediction {
                // min(snr, γ)/snr → 1 as snr → 0 (diffusers/kohya give NaN at snr = 0).
                Prediction::Eps if snr <= gamma => 1.0,
                Prediction::Eps => gamma / snr,
                Prediction::V => snr.min(gamma) / (snr + 1.0),
            },
            LossWeighting::VLikeEps => {
                let s = snr.min(1000.0);
                s / (s + 1.0)
            }
            LossWeighting::Debiased { snr_min } => match prediction {
                Prediction::Eps => 1.0 / snr.max(snr_min).clamp(f64::MIN_POSITIVE, 1000.0).sqrt(),
                Prediction::V => 1.0 / (snr.min(1000.0) + 1.0),
            },
        }
    }

    /// Weights for a batch of timesteps on `schedule`'s exact table.
    pub fn weights(
        self,
        schedule: &NoiseSchedule,
        timesteps: &[usize],
        prediction: Prediction,
    ) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| {
                schedule
                    .snr(t)
                    .map(|snr| self.weight(snr, prediction))
                    .ok_or_else(|| timestep_error(t, schedule))
            })
            .collect()
    }
}

fn timestep_error(t: usize, schedule: &NoiseSchedule) -> Error {
    Error::config(format!(
        "timestep {t} is outside the schedule (0..{})",
        schedule.len()
    ))
}

/// Per-sample coefficients `(b, 1, 1, …)` in `like`'s dtype and device.
fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    Ok(Tensor::from_vec(values.to_vec(), shape, like.device())?.to_dtype(like.dtype())?)
}

/// VP coefficients (√ᾱ_t, √(1−ᾱ_t)) of each timestep on the exact table.
fn coeffs(schedule: &NoiseSchedule, timesteps: &[usize]) -> Result<(Vec<f64>, Vec<f64>)> {
    timesteps
        .iter()
        .map(|&t| {
            schedule
                .alpha_sigma(t)
                .ok_or_else(|| timestep_error(t, schedule))
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}

fn check_batch(x0: &Tensor, eps: &Tensor, timesteps: &[usize]) -> Result<()> {
    if x0.dims() != eps.dims() || x0.dims().first() != Some(&timesteps.len()) {
        return Err(Error::Other(format!(
            "training batch: x0 {:?}, noise {:?} and {} timesteps do not match",
            x0.dims(),
            eps.dims(),
            timesteps.len()
        )));
    }
    Ok(())
}

/// `x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε` with one timestep per sample (diffusers `add_noise`).
/// `x0`, `eps`: `(b, c, h, w)`.
pub fn add_noise(
    x0: &Tensor,
    eps: &Tensor,
    timesteps: &[usize],
    schedule: &NoiseSchedule,
) -> Result<Tensor> {
    check_batch(x0, eps, timesteps)?;
    let (a, s) = coeffs(schedule, timesteps)?;
    let a = per_sample(&a, x0)?; // (b, 1, 1, 1)
    let s = per_sample(&s, x0)?;
    Ok(x0.broadcast_mul(&a)?.add(&eps.broadcast_mul(&s)?)?)
}

/// The regression target for `prediction`: ε, or `v = √ᾱ_t·ε − √(1−ᾱ_t)·x0`
/// (diffusers `get_velocity`), one timestep per sample.
pub fn target(
    x0: &Tensor,
    eps: &Tensor,
    timesteps: &[usize],
    schedule: &NoiseSchedule,
    prediction: Prediction,
) -> Result<Tensor> {
    check_batch(x0, eps, timesteps)?;
    match prediction {
        Prediction::Eps => Ok(eps.clone()),
        Prediction::V => {
            let (a, s) = coeffs(schedule, timesteps)?;
            let a = per_sample(&a, x0)?;
            let s = per_sample(&s, x0)?;
            Ok(eps.broadcast_mul(&a)?.sub(&x0.broadcast_mul(&s)?)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::param::{noisy_from_x0_eps, v_from_x0_eps};
    use crate::diffusion::schedule::TerminalClamp;
    use crate::diffusion::testutil::{assert_close_rel, f64s, golden, tensor64, values};

    // Equivalent diffusers code: training_utils.compute_snr and the min-SNR weights of
    // examples/text_to_image/train_text_to_image_sdxl.py.
    #[test]
    fn snr_and_min_snr_weights_match_diffusers() {
        let g = golden("training.json");
        for case in g["cases"].as_array().unwrap() {
            let sched = match case["ztsnr"].as_str().unwrap() {
                "none" => NoiseSchedule::sdxl(),
                _ => NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi),
            };
            let ts: Vec<usize> = f64s(&case["timesteps"])
                .iter()
                .map(|&t| t as usize)
                .collect();
            let snr: Vec<f64> = ts.iter().map(|&t| sched.snr(t).unwrap()).collect();
            // compute_snr runs in f32
            let want = f64s(&case["snr"]);
            for (a, b) in snr.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-12, "snr {a} vs {b}");
            }
            let gamma = case["min_snr_gamma"].as_f64().unwrap();
            let w = LossWeighting::MinSnr { gamma };
            let wv = w.weights(&sched, &ts, Prediction::V).unwrap();
            assert_close_rel(&wv, &f64s(&case["min_snr_v"]), 1e-5, "min-snr v");
            let we = w.weights(&sched, &ts, Prediction::Eps).unwrap();
            for (i, want) in case["min_snr_eps"].as_array().unwrap().iter().enumerate() {
                match want.as_f64() {
                    Some(b) => assert!((we[i] - b).abs() <= 1e-5 * b, "eps {} vs {b}", we[i]),
                    // diffusers: 0/0 = NaN at the ZTSNR terminal step; ours is the limit 1.
                    None => assert_eq!(we[i], 1.0),
                }
            }
            assert!(we.iter().chain(&wv).all(|x| x.is_finite()));
        }
        let z = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let vl = LossWeighting::VLikeEps
            .weights(&z, &[0, 999], Prediction::V)
            .unwrap();
        assert!((vl[0] - 1000.0 / 1001.0).abs() < 1e-12 && vl[1] == 0.0);
        assert!(LossWeighting::Uniform
            .weights(&z, &[1000], Prediction::V)
            .is_err());
        // Debiased: finite at SNR 0 for both objectives, kohya's values elsewhere.
        let d = LossWeighting::Debiased { snr_min: 1e-3 };
        let de = d.weights(&z, &[0, 500, 999], Prediction::Eps).unwrap();
        let dv = d.weights(&z, &[0, 500, 999], Prediction::V).unwrap();
        assert!((de[2] - 1.0 / 1e-3f64.sqrt()).abs() < 1e-9 && dv[2] == 1.0);
        let s500 = z.snr(500).unwrap();
        assert!((de[1] - 1.0 / s500.sqrt()).abs() < 1e-12);
        assert!((dv[1] - 1.0 / (s500 + 1.0)).abs() < 1e-12);
        assert!(
            (de[0] - 1.0 / 1000f64.sqrt()).abs() < 1e-12,
            "SNR at t=0 is clamped to 1000"
        );
        // Min-SNR for v under ZTSNR: exactly 0 at t = 999, < 1e-3 from t = 937 on.
        let m = LossWeighting::MinSnr { gamma: 5.0 };
        let ts: Vec<usize> = (937..1000).collect();
        let w = m.weights(&z, &ts, Prediction::V).unwrap();
        assert_eq!(w[62], 0.0);
        assert!(w.iter().all(|&x| x < 1e-3), "{w:?}");
    }

    #[test]
    fn batched_noise_and_target_match_per_sample_formulas() {
        let sched = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let ts = [0usize, 500, 999];
        let x0v: Vec<f64> = (0..3 * 8).map(|i| (i as f64 * 0.37).sin()).collect();
        let ev: Vec<f64> = (0..3 * 8).map(|i| (i as f64 * 0.91).cos()).collect();
        let x0 = tensor64(&x0v, (3, 2, 2, 2));
        let eps = tensor64(&ev, (3, 2, 2, 2));
        let xt = add_noise(&x0, &eps, &ts, &sched).unwrap();
        let v = target(&x0, &eps, &ts, &sched, Prediction::V).unwrap();
        for (i, &t) in ts.iter().enumerate() {
            let (a, s) = sched.alpha_sigma(t).unwrap();
            let (x0i, ei) = (x0.get(i).unwrap(), eps.get(i).unwrap());
            let want_xt = values(&noisy_from_x0_eps(&x0i, &ei, a, s).unwrap());
            let want_v = values(&v_from_x0_eps(&x0i, &ei, a, s).unwrap());
            assert_eq!(values(&xt.get(i).unwrap()), want_xt);
            assert_eq!(values(&v.get(i).unwrap()), want_v);
        }
        // terminal ZTSNR step: x_t = ε, v = −x0
        assert_eq!(values(&xt.get(2).unwrap()), values(&eps.get(2).unwrap()));
        assert_eq!(
            values(&v.get(2).unwrap()),
            values(&x0.get(2).unwrap().neg().unwrap())
        );
        let e = target(&x0, &eps, &ts, &sched, Prediction::Eps).unwrap();
        assert_eq!(values(&e), values(&eps));
        assert!(add_noise(&x0, &eps, &[1, 2], &sched).is_err());
    }
}
