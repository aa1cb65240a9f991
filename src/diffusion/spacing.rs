//! Which noise levels a sampler visits: diffusers timestep spacings
//! (leading / trailing / linspace) and ComfyUI σ schedules (normal, karras,
//! simple, sgm_uniform).
//!
//! Follows `shared/reference/sdxl.md` §6.4:
//! - spacings as diffusers `EulerDiscreteScheduler.set_timesteps` (1000 train
//!   steps, `steps_offset` = 1 for leading as in SDXL's scheduler config, σ
//!   interpolated linearly in t, final σ = 0);
//! - schedules as ComfyUI `comfy/samplers.py` (`normal_scheduler`,
//!   `simple_scheduler`, sgm_uniform = normal with N+1 points and the last
//!   dropped) and k-diffusion `get_sigmas_karras` (ρ = 7, between the table's
//!   σ_min and σ_max), each with a final 0 appended.
//!
//! Every list returned here has `steps + 1` entries: the σ of each step
//! followed by the final 0. Zero-terminal-SNR models default to `trailing`,
//! whose first step is t = 999 (pure noise), see [`ScheduleKind::default_for`].

use std::fmt;
use std::str::FromStr;

use super::schedule::NoiseSchedule;
use crate::{Error, Result};

/// `steps_offset` of SDXL's official scheduler config (used by `leading`).
pub const SDXL_STEPS_OFFSET: usize = 1;

/// diffusers `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Spacing {
    /// `t = [0, r, …, (N−1)r]` reversed + offset, r = T//N (SDXL default; never reaches t = 999).
    Leading,
    /// `t = round(arange(T, 0, −T/N)) − 1` (starts at t = 999; Lin et al. Table 2).
    Trailing,
    /// `t = linspace(0, T−1, N)` reversed, fractional.
    Linspace,
}

impl Spacing {
    /// Timesteps (descending) for `steps` inference steps over `num_train` train
    /// steps; `steps_offset` only affects `Leading`.
    pub fn timesteps(
        self,
        steps: usize,
        num_train: usize,
        steps_offset: usize,
    ) -> Result<Vec<f64>> {
        if steps == 0 || steps > num_train {
            return Err(Error::config(format!(
                "steps must be between 1 and {num_train}, got {steps}"
            )));
        }
        let n = steps;
        Ok(match self {
            Spacing::Leading => {
                let ratio = num_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                // numpy's float `arange` fills `start + i·δ` with
                // δ = (start + step) − start, not the exact step; at some
                // counts (48, 96, 112, …) that moves an x.5 value across
                // the rounding point, so the same δ keeps diffusers' list.
                // numpy also returns one extra value (t = −1) at 62 counts
                // (61, 103, …); diffusers' list has n + 1 steps there, this
                // one keeps n.
                let start = num_train as f64;
                let delta = (start - start / n as f64) - start;
                (0..n)
                    .map(|i| (start + i as f64 * delta).round_ties_even() - 1.0)
                    .collect()
            }
            Spacing::Linspace => {
                let last = (num_train - 1) as f64;
                if n == 1 {
                    vec![0.0]
                } else {
                    let step = last / (n - 1) as f64;
                    (0..n)
                        .rev()
                        .map(|i| if i == n - 1 { last } else { i as f64 * step })
                        .collect()
                }
            }
        })
    }

    /// σ list (with the final 0) for this spacing: σ interpolated linearly in t
    /// from the schedule's σ table (diffusers Euler, `interpolation_type="linear"`).
    pub fn sigmas(self, schedule: &NoiseSchedule, steps: usize) -> Result<Vec<f64>> {
        let ts = self.timesteps(steps, schedule.len(), SDXL_STEPS_OFFSET)?;
        let mut s: Vec<f64> = ts.iter().map(|&t| schedule.sigma_at_linear(t)).collect();
        s.push(0.0);
        Ok(s)
    }
}

/// A σ schedule for sampling: the A1111 "Schedule type" / ComfyUI "scheduler",
/// plus the diffusers spacings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// ComfyUI `normal`: linspace in t from t(σ_max) to t(σ_min), σ by log-σ interpolation.
    Normal,
    /// Karras et al. (ρ = 7) between the table's σ_min and σ_max.
    Karras,
    /// ComfyUI `simple`: every (T/N)-th entry of the σ table from the top.
    Simple,
    /// ComfyUI `sgm_uniform`: `normal` with N+1 points, last dropped.
    SgmUniform,
    /// diffusers `leading` spacing (steps_offset 1).
    Leading,
    /// diffusers `trailing` spacing (first step at t = 999; the ZTSNR default).
    Trailing,
    /// diffusers `linspace` spacing.
    Linspace,
}

impl ScheduleKind {
    /// All kinds, in CLI order.
    pub const ALL: [ScheduleKind; 7] = [
        ScheduleKind::Normal,
        ScheduleKind::Karras,
        ScheduleKind::Simple,
        ScheduleKind::SgmUniform,
        ScheduleKind::Leading,
        ScheduleKind::Trailing,
        ScheduleKind::Linspace,
    ];

    /// Default schedule: `trailing` for zero-terminal-SNR models (the first step
    /// must start from pure noise, Lin et al. §3.3), ComfyUI's `normal` otherwise.
    pub fn default_for(ztsnr: bool) -> Self {
        if ztsnr {
            ScheduleKind::Trailing
        } else {
            ScheduleKind::Normal
        }
    }

    /// The CLI / ComfyUI name (`normal`, `karras`, `simple`, `sgm_uniform`, `leading`, …).
    pub fn cli_name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "normal",
            ScheduleKind::Karras => "karras",
            ScheduleKind::Simple => "simple",
            ScheduleKind::SgmUniform => "sgm_uniform",
            ScheduleKind::Leading => "leading",
            ScheduleKind::Trailing => "trailing",
            ScheduleKind::Linspace => "linspace",
        }
    }

    /// σ list for `steps` steps (`steps + 1` entries, last 0).
    pub fn sigmas(self, schedule: &NoiseSchedule, steps: usize) -> Result<Vec<f64>> {
        if steps == 0 || steps > schedule.len() {
            return Err(Error::config(format!(
                "steps must be between 1 and {}, got {steps}",
                schedule.len()
            )));
        }
        match self {
            ScheduleKind::Normal => Ok(normal_sigmas(schedule, steps, false)),
            ScheduleKind::SgmUniform => Ok(normal_sigmas(schedule, steps, true)),
            ScheduleKind::Simple => Ok(simple_sigmas(schedule, steps)),
            ScheduleKind::Karras => Ok(karras_sigmas(
                steps,
                schedule.sigma_min(),
                schedule.sigma_max(),
                7.0,
            )),
            ScheduleKind::Leading => Spacing::Leading.sigmas(schedule, steps),
            ScheduleKind::Trailing => Spacing::Trailing.sigmas(schedule, steps),
            ScheduleKind::Linspace => Spacing::Linspace.sigmas(schedule, steps),
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;

    /// Accepts the CLI names and A1111's infotext names, any case
    /// (`sgm_uniform` = `SGM Uniform`).
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase().replace([' ', '-'], "_");
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.cli_name() == key)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown schedule {s:?}; use one of normal, karras, simple, sgm_uniform, leading, trailing, linspace"
                ))
            })
    }
}

impl fmt::Display for ScheduleKind {
    /// A1111 infotext "Schedule type" names ("Normal", "Karras", "Simple", "SGM Uniform";
    /// the diffusers spacings, which A1111 lacks, as "Leading" / "Trailing" / "Linspace").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Normal => "Normal",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Simple => "Simple",
            ScheduleKind::SgmUniform => "SGM Uniform",
            ScheduleKind::Leading => "Leading",
            ScheduleKind::Trailing => "Trailing",
            ScheduleKind::Linspace => "Linspace",
        })
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (torch.linspace; `[a]` for n = 1).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { b } else { a + i as f64 * step })
        .collect()
}

/// ComfyUI `normal_scheduler` (`sgm = false`) and `sgm_uniform` (`sgm = true`).
fn normal_sigmas(schedule: &NoiseSchedule, steps: usize, sgm: bool) -> Vec<f64> {
    let start = schedule.timestep_nearest(schedule.sigma_max()) as f64;
    let end = schedule.timestep_nearest(schedule.sigma_min()) as f64;
    let (ts, append_zero) = if sgm {
        let mut t = linspace(start, end, steps + 1);
        t.pop();
        (t, true)
    } else if schedule.sigma_at(end).abs() <= 1e-5 {
        // A schedule whose σ_min is already ~0 ends on it instead of appending 0.
        (linspace(start, end, steps + 1), false)
    } else {
        (linspace(start, end, steps), true)
    };
    let mut s: Vec<f64> = ts.iter().map(|&t| schedule.sigma_at(t)).collect();
    if append_zero {
        s.push(0.0);
    }
    s
}

/// ComfyUI `simple_scheduler`: `σ_table[−(1 + ⌊i·T/N⌋)]` for i < N, then 0.
fn simple_sigmas(schedule: &NoiseSchedule, steps: usize) -> Vec<f64> {
    let table = schedule.sigmas();
    let ss = table.len() as f64 / steps as f64;
    let mut s: Vec<f64> = (0..steps)
        .map(|i| table[table.len() - 1 - (i as f64 * ss) as usize])
        .collect();
    s.push(0.0);
    s
}

/// Karras et al. (2022) σ list: `(σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`,
/// i = 0..n, then 0 (k-diffusion `get_sigmas_karras`).
pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    let mut s: Vec<f64> = linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (hi + r * (lo - hi)).powf(rho))
        .collect();
    s.push(0.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::TerminalClamp;
    use crate::diffusion::testutil::{assert_close_rel, f64s, golden};

    /// diffusers' trailing list where numpy's `arange` rounding differs
    /// from the exact ratio (values from `np.round(np.arange(1000, 0,
    /// -1000 / n)) - 1`; the exact ratio gives 937 at n = 48, i = 3).
    #[test]
    fn trailing_follows_numpy_arange_rounding() {
        let t = |n| Spacing::Trailing.timesteps(n, 1000, 1).unwrap();
        assert_eq!(
            t(48)[..8],
            [999.0, 978.0, 957.0, 936.0, 916.0, 895.0, 874.0, 853.0]
        );
        assert_eq!(
            t(96)[..8],
            [999.0, 989.0, 978.0, 968.0, 957.0, 947.0, 937.0, 926.0]
        );
        let l = t(61);
        assert_eq!((l.len(), l[60]), (61, 15.0));
    }

    fn sched(ztsnr: &str) -> NoiseSchedule {
        match ztsnr {
            "none" => NoiseSchedule::sdxl(),
            "diffusers" => NoiseSchedule::sdxl_ztsnr(TerminalClamp::Diffusers),
            "comfy" => NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi),
            other => panic!("unknown ztsnr {other}"),
        }
    }

    // Equivalent reference code: diffusers EulerDiscreteScheduler.set_timesteps (leading /
    // trailing / linspace, steps_offset 1; use_karras_sigmas), k-diffusion
    // DiscreteSchedule.get_sigmas / get_sigmas_karras, ComfyUI simple_scheduler.
    #[test]
    fn spacings_and_schedules_match_golden() {
        let g = golden("spacing.json");
        let mut checked = 0;
        for case in g["cases"].as_array().unwrap() {
            let kind = case["kind"].as_str().unwrap();
            let s = sched(case["ztsnr"].as_str().unwrap());
            let n = case["steps"].as_u64().unwrap() as usize;
            let want = f64s(&case["sigmas"]);
            let what = format!("{kind} {} N={n}", case["ztsnr"]);
            let got = if kind == "karras_diffusers" {
                ScheduleKind::Karras.sigmas(&s, n).unwrap()
            } else {
                kind.parse::<ScheduleKind>().unwrap().sigmas(&s, n).unwrap()
            };
            assert_eq!(got.len(), n + 1, "{what}");
            assert_close_rel(&got, &want, 1e-5, &what);
            if let Some(ts) = case.get("timesteps") {
                if kind != "karras_diffusers" {
                    let sp = match kind {
                        "leading" => Spacing::Leading,
                        "trailing" => Spacing::Trailing,
                        _ => Spacing::Linspace,
                    };
                    let got_t = sp.timesteps(n, 1000, SDXL_STEPS_OFFSET).unwrap();
                    let want_t = f64s(ts);
                    for (a, b) in got_t.iter().zip(&want_t) {
                        assert!((a - b).abs() < 1e-3, "{what}: t {a} vs {b}");
                    }
                }
            }
            checked += 1;
        }
        assert!(checked >= 40, "only {checked} golden cases");
    }

    // shared/reference/sdxl.md §6.4 worked examples.
    #[test]
    fn reference_lists() {
        let t = Spacing::Leading.timesteps(30, 1000, 1).unwrap();
        assert_eq!(&t[..3], &[958.0, 925.0, 892.0]);
        assert_eq!(&t[28..], &[34.0, 1.0]);
        let t = Spacing::Trailing.timesteps(30, 1000, 1).unwrap();
        assert_eq!(&t[..3], &[999.0, 966.0, 932.0]);
        assert_eq!(&t[27..], &[99.0, 66.0, 32.0]);
        let k = ScheduleKind::Karras
            .sigmas(&NoiseSchedule::sdxl(), 10)
            .unwrap();
        let want = [
            14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0.0,
        ];
        for (a, b) in k.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // ZTSNR default starts from pure noise.
        let z = NoiseSchedule::sdxl_ztsnr(TerminalClamp::ComfyUi);
        let s = ScheduleKind::default_for(true).sigmas(&z, 30).unwrap();
        assert_eq!(s[0], z.sigma_max());
    }

    #[test]
    fn names_round_trip() {
        for k in ScheduleKind::ALL {
            assert_eq!(k.to_string().parse::<ScheduleKind>().unwrap(), k);
            assert_eq!(k.cli_name().parse::<ScheduleKind>().unwrap(), k);
        }
        assert_eq!(ScheduleKind::SgmUniform.to_string(), "SGM Uniform");
        assert!("exponential".parse::<ScheduleKind>().is_err());
        assert!(ScheduleKind::Normal
            .sigmas(&NoiseSchedule::sdxl(), 0)
            .is_err());
    }
}
