//! Seeded random SDXL checkpoints in the real single-file key layout, and
//! the fixed UNet inputs of the benchmark's UNet check.
//!
//! Why random: the lent GPU machine reaches no network, the real SDXL file
//! is 7 GB, and the check compares two implementations on *the same*
//! weights — any weights that keep activations finite do. The keys and
//! shapes are exactly those our loader requests
//! ([`unet_expected_keys`], [`TextConfigs::expected_keys`],
//! [`vae_expected_keys`]), which are also what diffusers' single-file
//! converters read, so the Python side loads the same file.
//!
//! Values (PyTorch's default bounds, as [`crate::models::sdxl::init_params`]):
//! tensors with ≥ 2 dims ~ U(±1/√fan_in), 1-D `*weight` (norm scales) = 1,
//! biases = 0. Each tensor has its own ChaCha8 stream seeded from the seed
//! and its key, so tensors are generated in parallel (16 cores make the
//! 3.5 B values of full SDXL in seconds) and the file is the same bytes on
//! any machine. Stored in bf16 by default: half the size, and the f32 runs
//! of both sides see the same (bf16-exact) values.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::Variant;
use crate::diffusion::noise::normals;
use crate::models::sdxl::checkpoint::{
    save_tensors, unet_expected_keys, vae_expected_keys, SaveOptions, META_PREDICTION_TYPE,
};
use crate::models::sdxl::VAE_PREFIX;
use crate::{Error, Result};

/// Every key and shape of a full single-file checkpoint of `variant`
/// (UNet, both text encoders, VAE), sorted by key.
pub fn checkpoint_keys(variant: Variant) -> Result<Vec<(String, Vec<usize>)>> {
    let mut keys = unet_expected_keys(&variant.unet())?;
    keys.extend(variant.text().expected_keys()?);
    keys.extend(vae_expected_keys(&variant.vae(), VAE_PREFIX)?);
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys.dedup_by(|a, b| a.0 == b.0);
    Ok(keys)
}

/// FNV-1a of a key: mixes the key into the seed of its stream.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The values of one tensor (see the module docs), as f32.
pub fn random_values(seed: u64, key: &str, dims: &[usize]) -> Vec<f32> {
    let n: usize = dims.iter().product();
    if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ key_hash(key));
        (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
    } else if key.ends_with("weight") {
        vec![1.0; n]
    } else {
        vec![0.0; n]
    }
}

/// What [`write_random_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightsReport {
    /// The checkpoint file.
    pub path: std::path::PathBuf,
    /// Model size.
    pub variant: Variant,
    /// Seed of the values.
    pub seed: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters.
    pub parameters: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// Wall time (generate + write).
    pub seconds: f64,
}

/// Write a random eps-prediction SDXL checkpoint of `variant` (every value
/// from `seed`) to `path`, stored as `dtype` (f32, bf16 or f16).
pub fn write_random_checkpoint(
    path: &Path,
    variant: Variant,
    seed: u64,
    dtype: DType,
) -> Result<WeightsReport> {
    let t0 = std::time::Instant::now();
    let keys = checkpoint_keys(variant)?;
    let tensors: Vec<(String, Tensor)> = keys
        .par_iter()
        .map(|(key, dims)| {
            let values = random_values(seed, key, dims);
            let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
            Ok((key.clone(), t))
        })
        .collect::<Result<_>>()?;
    let parameters = keys.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(META_PREDICTION_TYPE.to_string(), "epsilon".to_string());
    metadata.insert(
        "eps2v.random_weights".to_string(),
        format!("seed {seed}, variant {variant:?}"),
    );
    save_tensors(
        path,
        &tensors,
        &SaveOptions {
            dtype: Some(dtype),
            v_pred: false,
            ztsnr: false,
            metadata,
        },
    )?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(WeightsReport {
        path: path.to_path_buf(),
        variant,
        seed,
        tensors: tensors.len(),
        parameters,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Write the UNet check's inputs to `path` (f32 safetensors): two rows,
/// `x (2, 4, h, w)` ~ N(0, 1), `timesteps (2,)` = [700, 200],
/// `context (2, 77, ctx)` ~ N(0, 1), `pooled (2, pooled)` ~ N(0, 1) and
/// `time_ids (2, 6)` = SDXL's inference size conditioning for an image of
/// `8h × 8w` pixels (original = target = that size, crop 0, 0; diffusers'
/// `add_time_ids` order = sgm's embedder order).
pub fn write_inputs(
    path: &Path,
    variant: Variant,
    seed: u64,
    latent: (usize, usize),
) -> Result<()> {
    let (h, w) = latent;
    let unet = variant.unet();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ key_hash("gpubench inputs"));
    let cpu = &Device::Cpu;
    let mut normal = |dims: &[usize]| -> Result<Tensor> {
        let n = dims.iter().product();
        Ok(Tensor::from_vec(normals(&mut rng, n), dims, cpu)?)
    };
    let x = normal(&[2, unet.in_channels, h, w])?;
    let context = normal(&[2, 77, unet.context_dim])?;
    let pooled = normal(&[2, unet.pooled_dim])?;
    let (ph, pw) = ((8 * h) as f32, (8 * w) as f32);
    let ids = [ph, pw, 0.0, 0.0, ph, pw];
    let time_ids = Tensor::from_vec([ids, ids].concat(), (2, 6), cpu)?;
    let timesteps = Tensor::new(&[700f32, 200.0], cpu)?;
    let items = [
        ("x", x),
        ("timesteps", timesteps),
        ("context", context),
        ("pooled", pooled),
        ("time_ids", time_ids),
    ];
    let tensors: Vec<(String, Tensor)> =
        items.into_iter().map(|(k, t)| (k.to_string(), t)).collect();
    save_tensors(
        path,
        &tensors,
        &SaveOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::sdxl::checkpoint::Checkpoint;
    use crate::pipeline::{LoadOptions, SdxlModel};

    #[test]
    fn values_depend_on_seed_and_key_only() {
        let a = random_values(1, "k.weight", &[3, 4]);
        assert_eq!(a, random_values(1, "k.weight", &[3, 4]));
        assert_ne!(a, random_values(2, "k.weight", &[3, 4]));
        assert_ne!(a, random_values(1, "j.weight", &[3, 4]));
        assert!(a.iter().all(|v| v.abs() <= 0.5) && a.iter().any(|v| *v != 0.0));
        assert_eq!(random_values(1, "norm.weight", &[3]), vec![1.0; 3]);
        assert_eq!(random_values(1, "norm.bias", &[3]), vec![0.0; 3]);
    }

    #[test]
    fn full_checkpoint_key_list_is_sdxl_base() {
        let keys = checkpoint_keys(Variant::Full).unwrap();
        let params: usize = keys.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
        let unet: usize = keys
            .iter()
            .filter(|(k, _)| k.starts_with("model.diffusion_model."))
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        assert_eq!(unet, 2_567_463_684, "SDXL base UNet parameter count");
        assert!(params > 3_400_000_000 && params < 3_600_000_000, "{params}");
    }

    #[test]
    fn tiny_random_checkpoint_loads_as_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.safetensors");
        let r = write_random_checkpoint(&p, Variant::Tiny, 3, DType::BF16).unwrap();
        assert!(r.parameters > 1_000_000 && r.bytes as usize > 2 * r.parameters);
        let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
        assert_eq!(m.info.unet_config, "tiny");
        let ck = Checkpoint::open(&p).unwrap();
        assert_eq!(ck.entries().len(), r.tensors);
        let io = dir.path().join("io.safetensors");
        write_inputs(&io, Variant::Tiny, 3, (8, 8)).unwrap();
        let t = candle_core::safetensors::load(&io, &Device::Cpu).unwrap();
        assert_eq!(t["x"].dims(), &[2, 4, 8, 8]);
        assert_eq!(
            t["time_ids"].to_vec2::<f32>().unwrap()[1],
            vec![64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
        );
    }
}
