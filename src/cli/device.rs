//! `--device` / `--precision`: where and in which precision a command runs
//! its models. One struct, flattened into the arguments of every command
//! that loads a model (`#[command(flatten)] pub device: DeviceArgs`), so a
//! command gets the flags with one line and turns them into
//! [`LoadOptions`] fields with [`DeviceArgs::load_options`]. The parsing and
//! the policy (CUDA only in a `cuda` build; f32 on the CPU; the VAE never in
//! f16) live in [`crate::nn::device`].
//!
//! The compute precision is `--precision`, not `--dtype`: `--dtype` already
//! names the *storage* dtype of written checkpoints (`ckpt convert`, `merge`).

use candle_core::{DType, Device};
use clap::Args;

use crate::nn::device::parse_dtype;
use crate::pipeline::LoadOptions;
use crate::{Error, Result};

/// Device and precision flags of a model command.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceArgs {
    /// Where models run: cpu, cuda or cuda:N (GPU index as nvidia-smi lists it). Default: CUDA GPU 0 when this binary was built with CUDA and one answers, else cpu.
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,
    /// Precision of the UNet and text encoders: f32, bf16 or f16 (default: bf16 on CUDA, f32 on the CPU, where only f32 is allowed). The VAE runs in bf16 with bf16 and in f32 otherwise, never f16 (the SDXL VAE overflows there).
    #[arg(long, value_name = "f32|bf16|f16")]
    pub precision: Option<String>,
}

impl DeviceArgs {
    /// Open the device and pick the model dtype (config errors, exit 2,
    /// for a bad spec, a binary without CUDA, no GPU, or half precision on
    /// the CPU).
    pub fn resolve(&self) -> Result<(Device, DType)> {
        let device = match &self.device {
            Some(spec) => crate::nn::device(spec)?,
            None => crate::nn::default_device(),
        };
        let requested = match self.precision.as_deref() {
            Some(p) => Some(parse_dtype(p).map_err(|_| {
                Error::config(format!("--precision {p:?}: expected f32, bf16 or f16"))
            })?),
            None => None,
        };
        let dtype = crate::nn::model_dtype(&device, requested)?;
        Ok((device, dtype))
    }

    /// `base` with the device and dtype of these flags filled in.
    pub fn load_options(&self, base: LoadOptions) -> Result<LoadOptions> {
        let (device, dtype) = self.resolve()?;
        Ok(LoadOptions {
            device: Some(device),
            dtype: Some(dtype),
            ..base
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        device: DeviceArgs,
    }

    fn parse(args: &[&str]) -> DeviceArgs {
        Cmd::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .device
    }

    #[test]
    fn flags_resolve_to_a_device_and_dtype() {
        let (d, t) = parse(&["--device", "cpu"]).resolve().unwrap();
        assert!(d.is_cpu());
        assert_eq!(t, DType::F32);
        let o = parse(&["--device", "cpu", "--precision", "fp32"])
            .load_options(LoadOptions {
                hash: true,
                ..Default::default()
            })
            .unwrap();
        assert!(o.hash && o.device.as_ref().unwrap().is_cpu());
        assert_eq!(o.dtype, Some(DType::F32));
        if !cfg!(feature = "cuda") {
            let (d, t) = parse(&[]).resolve().unwrap();
            assert!(d.is_cpu());
            assert_eq!(t, DType::F32);
        }
    }

    #[test]
    fn bad_flags_are_config_errors_that_say_what_to_do() {
        for (args, want) in [
            (&["--device", "gpu"][..], "expected cpu, cuda or cuda:N"),
            (
                &["--device", "cpu", "--precision", "bf16"],
                "use f32 or a CUDA device",
            ),
            (
                &["--device", "cpu", "--precision", "int8"],
                "--precision \"int8\": expected f32",
            ),
        ] {
            let e = parse(args).resolve().unwrap_err();
            assert!(e.to_string().contains(want), "{args:?}: {e}");
            assert_eq!(e.exit_code(), 2);
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = parse(&["--device", "cuda:1"]).resolve().unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }
}
