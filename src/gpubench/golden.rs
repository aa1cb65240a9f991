//! The golden tiny UNet and VAE (fixtures/golden/sdxl, outputs of Stability's
//! `sgm` in f32 made by fixtures/scripts/gen_sdxl_goldens.py) run on the
//! benchmark's device in f32, bf16 and f16 (VAE: f32 and bf16, never f16),
//! each compared with the f32 reference. On the CPU the unit tests in
//! `models::sdxl::tests` do the same; this is the CUDA run of that check.
//!
//! Tolerances, as max |ours − ref| over max |ref|: f32 1e-3 (cuBLAS and
//! reduction order differ from the CPU), f16 0.005 and bf16 0.03 for the
//! UNet (11 and 8 significant bits, as the CPU test), bf16 0.05 for the VAE
//! (twice the depth of the tiny UNet; measured 0.0057 on the CPU with bf16
//! storage).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{max_abs_diff, rel_l2};
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::models::sdxl::{build_y, SizeCond, UNetConfig, VaeConfig};
use crate::nn::device::dtype_name;
use crate::{Error, Result};

/// The golden UNet's config (must equal `UNET` in
/// fixtures/scripts/gen_sdxl_goldens.py, as the unit tests' copy).
pub fn golden_unet_config() -> UNetConfig {
    UNetConfig {
        model_channels: 8,
        num_head_channels: 8,
        context_dim: 16,
        pooled_dim: 8,
        num_groups: 4,
        ..UNetConfig::tiny()
    }
}

/// The golden VAE's config (must equal `VAE` in gen_sdxl_goldens.py).
pub fn golden_vae_config() -> VaeConfig {
    VaeConfig {
        ch: 8,
        num_groups: 4,
        ..VaeConfig::tiny()
    }
}

/// One golden comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GoldenCheck {
    /// `unet` or `vae_decode`.
    pub model: String,
    /// dtype it ran in.
    pub dtype: String,
    /// max |ours − ref| / max |ref|.
    pub max_rel: f64,
    /// ‖ours − ref‖ / ‖ref‖.
    pub rel_l2: f64,
    /// Tolerance on `max_rel`.
    pub tolerance: f64,
    /// Whether `max_rel ≤ tolerance` (and finite).
    pub ok: bool,
}

fn load_io(dir: &Path, name: &str) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(Error::config(format!(
            "{}: golden fixture missing; run from the repository root or pass --fixtures",
            path.display()
        )));
    }
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

fn get<'a>(io: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    io.get(key)
        .ok_or_else(|| Error::model(format!("golden fixture: missing tensor {key}")))
}

fn check(model: &str, dtype: DType, out: &Tensor, want: &Tensor, tol: f64) -> Result<GoldenCheck> {
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let max_rel = max_abs_diff(out, want)? / scale.max(1e-12);
    Ok(GoldenCheck {
        model: model.to_string(),
        dtype: dtype_name(dtype).to_string(),
        max_rel,
        rel_l2: rel_l2(out, want)?,
        tolerance: tol,
        ok: max_rel.is_finite() && max_rel <= tol,
    })
}

/// Run every golden check on `device` with the fixtures in `dir`
/// (`unet_io`, `unet_weights`, `vae_io`, `vae_weights` .safetensors).
pub fn golden_checks(dir: &Path, device: &Device) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let io = load_io(dir, "unet_io.safetensors")?;
    let sizes: Vec<SizeCond> = get(&io, "sizes")?
        .to_vec2::<f32>()?
        .iter()
        .map(|r| SizeCond {
            original: (r[0], r[1]),
            crop_top_left: (r[2], r[3]),
            target: (r[4], r[5]),
        })
        .collect();
    let ckpt = Checkpoint::open(dir.join("unet_weights.safetensors"))?;
    for (dtype, tol) in [(DType::F32, 1e-3), (DType::F16, 0.005), (DType::BF16, 0.03)] {
        let unet = ckpt.load_unet(&golden_unet_config(), dtype, device)?;
        let on =
            |k: &str| -> Result<Tensor> { Ok(get(&io, k)?.to_device(device)?.to_dtype(dtype)?) };
        let y = build_y(&on("pooled")?, &sizes)?;
        let ts = get(&io, "timesteps")?.to_device(device)?;
        let res = unet.forward(&on("x")?, &ts, &on("context")?, &y)?;
        out.push(check("unet", dtype, &res, get(&io, "out")?, tol)?);
    }
    let io = load_io(dir, "vae_io.safetensors")?;
    let ckpt = Checkpoint::open(dir.join("vae_weights.safetensors"))?;
    for (dtype, tol) in [(DType::F32, 1e-3), (DType::BF16, 0.05)] {
        let vae = ckpt.load_vae(&golden_vae_config(), dtype, device)?;
        let z = get(&io, "z")?.to_device(device)?;
        let res = vae.decode(&z)?;
        out.push(check("vae_decode", dtype, &res, get(&io, "decoded")?, tol)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_models_pass_on_the_cpu_in_every_dtype() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/sdxl");
        let checks = golden_checks(&dir, &Device::Cpu).unwrap();
        assert_eq!(checks.len(), 5);
        for c in &checks {
            eprintln!("{c:?}");
            assert!(c.ok, "{c:?}");
        }
        // f32 on the CPU is the reference implementation itself.
        assert!(checks[0].max_rel < 1e-4, "{:?}", checks[0]);
    }

    #[test]
    fn missing_fixtures_say_where_to_run_from() {
        let e = golden_checks(Path::new("/nonexistent"), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("repository root"), "{e}");
    }
}
