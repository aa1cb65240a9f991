//! Randomly initialised tiny SDXL checkpoints (UNet `tiny`, text encoders
//! [`TextConfigs::tiny`], VAE `tiny`) in the single-file SDXL key layout,
//! written with the checkpoint module's atomic save.
//!
//! Why: end-to-end tests of loading, sampling and the diagnostics need a
//! complete file that exercises the same code paths as a real SDXL
//! checkpoint (config inference, key checks, markers) in milliseconds. The
//! weights are seeded ([`crate::models::sdxl::init_params`]) so a file is
//! byte-for-byte reproducible; they are untrained, so images are noise.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::model::TextConfigs;
use crate::models::sdxl::checkpoint::{save_tensors, SaveOptions, META_PREDICTION_TYPE};
use crate::models::sdxl::clip::{ClipTextModel, BIGG_MODEL_PREFIX, CLIP_L_MODEL_PREFIX};
use crate::models::sdxl::infer::config_metadata;
use crate::models::sdxl::{init_params, UNet, UNetConfig, Vae, VaeConfig, UNET_PREFIX, VAE_PREFIX};
use crate::Result;

/// Options of [`write_random_checkpoint`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TinyOptions {
    /// Seed of the weights.
    pub seed: u64,
    /// Write the `v_pred` and `ztsnr` marker keys (and
    /// `modelspec.prediction_type = v`); otherwise an eps model.
    pub v_pred_ztsnr: bool,
}

/// Write a seeded random tiny SDXL checkpoint (f32) to `path`.
pub fn write_random_checkpoint(path: &Path, opts: TinyOptions) -> Result<()> {
    write_random_model(
        path,
        &UNetConfig::tiny(),
        &VaeConfig::tiny(),
        &TextConfigs::tiny(),
        opts,
    )
}

/// Write a seeded random single-file SDXL checkpoint (f32) of any configs
/// to `path`, with the configs in its `eps2v.*_config` metadata (so it
/// loads with no config given, whatever its GroupNorm groups and heads).
pub fn write_random_model(
    path: &Path,
    unet: &UNetConfig,
    vae: &VaeConfig,
    text: &TextConfigs,
    opts: TinyOptions,
) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    UNet::new(vb.pp(UNET_PREFIX), unet)?;
    ClipTextModel::new(vb.pp(CLIP_L_MODEL_PREFIX), &text.clip_l)?;
    ClipTextModel::new(vb.pp(BIGG_MODEL_PREFIX), &text.clip_g)?;
    Vae::new(vb.pp(VAE_PREFIX), vae)?;
    init_params(&varmap, opts.seed)?;
    let tensors: Vec<(String, Tensor)> = crate::models::sdxl::varmap_tensors(&varmap)?
        .into_iter()
        .collect();
    // Our own saves record what shapes cannot tell (GroupNorm groups, head
    // widths), so the file loads with no config given.
    let mut metadata = config_metadata(Some(unet), Some(vae), Some((&text.clip_l, &text.clip_g)));
    metadata.insert(
        META_PREDICTION_TYPE.to_string(),
        if opts.v_pred_ztsnr { "v" } else { "epsilon" }.to_string(),
    );
    let save = SaveOptions {
        dtype: Some(DType::F32),
        v_pred: opts.v_pred_ztsnr,
        ztsnr: opts.v_pred_ztsnr,
        metadata,
    };
    save_tensors(path, &tensors, &save)
}
