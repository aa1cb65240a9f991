//! Export of a trained UNet as a single-file SDXL checkpoint in the base
//! file's own key layout: the base file with the UNet tensors replaced
//! (text encoders and VAE copied byte for byte, or converted to the chosen
//! storage dtype), written atomically.
//!
//! Markers (reference/trainers-landscape.md §11): a v export gets the
//! `v_pred` key, plus `ztsnr` when trained on the ZTSNR schedule (ComfyUI,
//! A1111 dev, Forge and reForge detect both), and the metadata
//! `modelspec.prediction_type = "v"`; an eps export drops both keys and says
//! `epsilon`. `--no-markers` leaves the keys out (the metadata still says v,
//! and `eps2v.ztsnr`), for tools that choke on extra keys. The metadata also
//! records the caption-dropout conditioning (`eps2v.uncond`), which `sample`
//! and `diagnose uncond` use as their default.
//!
//! The optional A1111 `.yaml` is the sgm inference config with `VScaling` +
//! `VWeighting` (A1111's own `sd_xl_v.yaml`): A1111 prefers a yaml beside the
//! checkpoint over key detection, so an EpsScaling yaml (as OneTrainer
//! writes) would silently turn a v model back into eps there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::blocks::BlockSet;
use super::config::{DropoutCond, SaveDtype, TrainConfig};
use crate::diffusion::Prediction;
use crate::error::IoContext;
use crate::models::sdxl::checkpoint::{
    Checkpoint, SaveOptions, META_PREDICTION_TYPE, META_UNCOND, META_ZTSNR,
};
use crate::models::sdxl::UNetConfig;
use crate::pipeline::sample::write_atomic;
use crate::{Error, Result};

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// Objective the UNet was trained with.
    pub objective: Prediction,
    /// Trained on the ZTSNR schedule.
    pub ztsnr: bool,
    /// Storage dtype.
    pub dtype: SaveDtype,
    /// Write marker keys.
    pub markers: bool,
    /// Write `<stem>.yaml` for A1111 (v only).
    pub a1111_yaml: bool,
    /// Caption-dropout conditioning used in training.
    pub uncond: DropoutCond,
    /// Extra metadata (training summary).
    pub metadata: BTreeMap<String, String>,
}

/// Write `out` from `base` with `unet` (full keys → f32 tensors) swapped in.
/// Returns the paths written (the checkpoint, and the yaml when asked).
pub fn export(
    base: &Checkpoint,
    unet: &BTreeMap<String, Tensor>,
    unet_cfg: &UNetConfig,
    out: &Path,
    spec: &ExportSpec,
) -> Result<Vec<PathBuf>> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let replacements: HashMap<String, Tensor> =
        unet.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    let v = spec.objective == Prediction::V;
    let mut metadata = spec.metadata.clone();
    metadata.insert(META_UNCOND.into(), spec.uncond.to_string());
    let opts = marked(
        v,
        spec.ztsnr,
        spec.markers,
        Some(spec.dtype.dtype()),
        metadata,
    );
    // The yaml is refused before the checkpoint is written.
    let yaml = spec
        .a1111_yaml
        .then(|| {
            if !v {
                return Err(Error::config(A1111_YAML_EPS));
            }
            a1111_v_yaml(unet_cfg)
        })
        .transpose()?;
    // A base's EMA copy of its UNet (`model_ema.*`, older trainers) is
    // the unconverted model: written beside the converted one it would
    // be ~5 GB of eps weights in a v file, for any loader that prefers
    // it. `merge` leaves it out too.
    base.save_with_except(out, &replacements, &opts, |k| k.starts_with("model_ema."))?;
    let mut written = vec![out.to_path_buf()];
    if let Some(text) = yaml {
        let path = out.with_extension("yaml");
        write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// The save options of a `v` (with `ztsnr`) or eps file: the marker keys
/// (v only, and only with `markers`) and the prediction metadata
/// (`modelspec.prediction_type`, `eps2v.ztsnr`) added to `metadata`.
pub fn marked(
    v: bool,
    ztsnr: bool,
    markers: bool,
    dtype: Option<candle_core::DType>,
    mut metadata: BTreeMap<String, String>,
) -> SaveOptions {
    metadata.insert(
        META_PREDICTION_TYPE.into(),
        if v { "v" } else { "epsilon" }.into(),
    );
    metadata.insert(META_ZTSNR.into(), (v && ztsnr).to_string());
    SaveOptions {
        dtype,
        v_pred: v && markers,
        ztsnr: v && ztsnr && markers,
        metadata,
    }
}

/// Why an eps export gets no A1111 yaml.
pub const A1111_YAML_EPS: &str =
    "--a1111-yaml is for v exports (an eps model needs no yaml: A1111 defaults to eps)";

/// The sgm v-prediction inference config for an SDXL-base-shaped UNet.
pub fn a1111_v_yaml(cfg: &UNetConfig) -> Result<String> {
    if cfg != &UNetConfig::sdxl_base() {
        return Err(Error::config(
            "--a1111-yaml: A1111 configs describe the SDXL base architecture; this UNet differs (a yaml would not load)",
        ));
    }
    Ok(SD_XL_V_YAML.to_string())
}

/// sgm `DiffusionEngine` config of SDXL base with v scaling and weighting.
const SD_XL_V_YAML: &str = r#"# Written by eps2v: SDXL v-prediction (sgm VScaling + VWeighting), for A1111.
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000

        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.VWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization

    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers

    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256

    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"#;

/// `runs/<id>/<base stem>-<v-ztsnr|v|eps>.safetensors`.
pub(super) fn default_out(cfg: &TrainConfig, rdir: &Path) -> PathBuf {
    let stem = cfg
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tag = match (cfg.objective, cfg.ztsnr) {
        (Prediction::V, true) => "v-ztsnr",
        (Prediction::V, false) => "v",
        (Prediction::Eps, _) => "eps",
    };
    rdir.join(format!("{stem}-{tag}.safetensors"))
}

/// The UNet the export writes: the live weights (their EMA when EMA is
/// on), or, for a run stopped by `--stop-below`, the last good checkpoint.
/// That checkpoint holds only the blocks trained up to its own stage, so
/// every other block a stage since has trained goes back to the base
/// model's value (`base`), not the degraded one in hand.
pub fn export_weights(
    live: &BTreeMap<String, Tensor>,
    ema: Option<&BTreeMap<String, Tensor>>,
    good: Option<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>)>,
    trained: &[BlockSet],
    base: impl Fn(&str) -> Result<Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut w = live.clone();
    match good {
        Some((gw, gema)) => {
            for (k, t) in w.iter_mut() {
                if !gw.contains_key(k) && trained.iter().any(|b| b.contains_key(k)) {
                    *t = base(k)?;
                }
            }
            w.extend(gw);
            if ema.is_some() {
                w.extend(gema);
            }
        }
        None => {
            if let Some(e) = ema {
                w.extend(e.iter().map(|(k, t)| (k.clone(), t.clone())));
            }
        }
    }
    Ok(w)
}
