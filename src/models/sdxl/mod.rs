//! Stable Diffusion XL in candle, loading single-file checkpoints under their
//! native LDM/sgm key names (DESIGN.md §3, reference/sdxl.md §1).
//!
//! - [`config`]: `UNetConfig::sdxl_base()` / `ssd_1b()` / `tiny()`…,
//!   `VaeConfig::sdxl()` / `tiny()` (per-block UNet layout).
//! - [`infer`]: every config inferred from a file's keys and shapes, with
//!   our `eps2v.*_config` metadata for what shapes cannot tell.
//! - [`unet`]: the UNet (`model.diffusion_model.*`) with `label_emb`
//!   micro-conditioning ([`unet::build_y`]) and per-sample timesteps.
//! - [`vae`]: the VAE (`first_stage_model.*`), f32 decode.
//! - [`checkpoint`]: bounds-checked mmap loading with per-tensor dtype
//!   conversion, validation, prediction-type markers, atomic save, hashes.
//! - [`blocks`]: merge-block-weighted (MBW) block ids (`IN00`…`OUT08`).
//! - [`clip`]: CLIP-L and OpenCLIP ViT-bigG text encoders, and the combined
//!   SDXL text conditioning.
//! - [`tokenizer`]: the CLIP BPE tokenizer (embedded vocabulary).
//! - [`prompt`]: A1111 prompt syntax (emphasis, `BREAK`, 75-token chunks).

pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod infer;
pub mod prompt;
pub mod tokenizer;
pub mod unet;
pub mod vae;

#[cfg(test)]
mod tests;

pub use config::{MiddleBlock, UNetConfig, VaeConfig};
pub use unet::{build_y, timestep_embedding, SizeCond, UNet};
pub use vae::Vae;

/// Key prefix of the UNet in single-file checkpoints.
pub const UNET_PREFIX: &str = "model.diffusion_model";
/// Key prefix of the VAE in single-file checkpoints.
pub const VAE_PREFIX: &str = "first_stage_model";
/// Key prefix of the CLIP-L text encoder (HF transformers names).
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer";
/// Key prefix of the OpenCLIP ViT-bigG text encoder (open_clip names).
pub const CLIP_G_PREFIX: &str = "conditioner.embedders.1.model";

/// Every parameter of a `VarMap` by name, sorted (for saving).
pub fn varmap_tensors(
    varmap: &candle_nn::VarMap,
) -> crate::Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| crate::Error::Other("varmap lock poisoned".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

/// Initialise every parameter of a `VarMap` for training from scratch,
/// deterministically from `seed` (ChaCha8, keys visited in sorted order):
/// weights with ≥ 2 dims ~ U(±1/√fan_in) (PyTorch's default bound), 1-D
/// weights (all norms here) = 1, biases = 0.
pub fn init_params(varmap: &candle_nn::VarMap, seed: u64) -> crate::Result<()> {
    use rand::{Rng, SeedableRng};
    let data = varmap
        .data()
        .lock()
        .map_err(|_| crate::Error::Other("varmap lock poisoned".into()))?;
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for key in keys {
        let var = &data[key];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
        } else if key.ends_with("weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        let t = candle_core::Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
