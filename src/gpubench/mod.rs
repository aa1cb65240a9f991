//! The Rust half of the device benchmark `benches/gpu/run.sh` (hidden
//! command `eps2v gpu-bench`): our SDXL side by side with diffusers / PyTorch
//! on the same random weights, run as one short script on a lent GPU, and in
//! a tiny CPU configuration here and in CI so that the script cannot rot.
//!
//! - [`weights`]: a seeded random SDXL checkpoint in the real single-file key
//!   layout (every key our loader and diffusers' converters read), made on
//!   the spot, plus the fixed UNet inputs both sides run.
//! - [`run`]: what we measure: our UNet on those inputs (f32 and the bench
//!   dtype, saved for the Python side to compare), the golden tiny models
//!   on the device against the CPU f32 references, `sample` timings, and
//!   one training step with `out`+`OUT08` or the whole UNet trainable
//!   ([`step`]).
//! - [`product`]: the user's commands (generate, caption, train, sample,
//!   merge, diagnose) on the toy world with `--device`, each as its own
//!   process, checked by their `--json` reports, and `sample` / `diagnose`
//!   compared with the CPU.
//! - [`report`]: joins our JSON and the PyTorch side's
//!   (`benches/gpu/reference.py`) into one ratio table, printed and written
//!   as JSON.
//!
//! The two variants share every code path: [`Variant::Full`] is SDXL base
//! (2.57 B UNet parameters, 1024² images), [`Variant::Tiny`] the test
//! configs of [`crate::pipeline::tiny`] (64² images) for the CPU fallback.

pub mod golden;
pub mod product;
pub mod report;
pub mod run;
pub mod step;
pub mod weights;

use crate::models::sdxl::{UNetConfig, VaeConfig};
use crate::pipeline::TextConfigs;
use crate::{Error, Result};

/// Which model size the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// SDXL base: UNet `sdxl_base`, CLIP-L + OpenCLIP bigG, SDXL VAE.
    Full,
    /// The tiny test configs (UNet `tiny`, [`TextConfigs::tiny`], VAE `tiny`).
    Tiny,
}

impl Variant {
    /// Parse `full` / `tiny`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "tiny" => Ok(Self::Tiny),
            _ => Err(Error::config(format!(
                "--variant {s:?}: expected full (SDXL base) or tiny (test configs)"
            ))),
        }
    }

    /// UNet config.
    pub fn unet(self) -> UNetConfig {
        match self {
            Self::Full => UNetConfig::sdxl_base(),
            Self::Tiny => UNetConfig::tiny(),
        }
    }

    /// Text encoder configs.
    pub fn text(self) -> TextConfigs {
        match self {
            Self::Full => TextConfigs::sdxl(),
            Self::Tiny => TextConfigs::tiny(),
        }
    }

    /// VAE config.
    pub fn vae(self) -> VaeConfig {
        match self {
            Self::Full => VaeConfig::sdxl(),
            Self::Tiny => VaeConfig::tiny(),
        }
    }
}

/// Relative L2 error `‖a − b‖ / ‖b‖` of two same-shape tensors (computed in f64).
pub fn rel_l2(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f64> {
    use candle_core::DType;
    let a = a
        .to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?;
    let b = b
        .to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den > 0.0 { num / den } else { num })
}

/// Largest absolute element difference of two same-shape tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f64> {
    use candle_core::DType;
    let a = a
        .to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?;
    let b = b
        .to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?;
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn variants_parse_and_errors_are_relative() {
        assert_eq!(Variant::parse("full").unwrap(), Variant::Full);
        assert_eq!(Variant::parse("tiny").unwrap().unet(), UNetConfig::tiny());
        assert!(Variant::parse("big")
            .unwrap_err()
            .to_string()
            .contains("expected full"));
        let b = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[3f32, 4.5], &Device::Cpu).unwrap();
        assert!((rel_l2(&a, &b).unwrap() - 0.1).abs() < 1e-12);
        assert!((max_abs_diff(&a, &b).unwrap() - 0.5).abs() < 1e-12);
    }
}
