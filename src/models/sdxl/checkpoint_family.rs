//! What a file holds, judged from its keys: the model family (SDXL, UNet
//! only, refiner, SD 1.x / 2.x, LoRA, diffusers, VAE) and the prediction
//! type (marker keys `v_pred` / `ztsnr` / `edm_*`, then sd-scripts'
//! `modelspec.prediction_type`; reference/sdxl.md §1.1).

use serde::Serialize;

use super::{Checkpoint, MARKER_V_PRED, MARKER_ZTSNR, META_PREDICTION_TYPE, META_ZTSNR};

/// What kind of model a file holds, judged from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Full SDXL base-style checkpoint (UNet with `label_emb`, two text encoders).
    Sdxl,
    /// SDXL-shaped UNet without text encoders (e.g. a UNet-only save).
    SdxlUnet,
    /// SDXL refiner (bigG as `conditioner.embedders.0`).
    SdxlRefiner,
    /// Stable Diffusion 1.x (`cond_stage_model.transformer.*`).
    Sd1,
    /// Stable Diffusion 2.x (`cond_stage_model.model.*`).
    Sd2,
    /// A LoRA / LyCORIS file.
    Lora,
    /// A diffusers-format weights file (`down_blocks.*`).
    Diffusers,
    /// A standalone VAE (`encoder.*` / `decoder.*`).
    Vae,
    /// Nothing recognisable.
    Unknown,
}

impl Family {
    /// Short name (`sdxl`, `sd1`, `lora`…).
    pub fn name(&self) -> &'static str {
        match self {
            Family::Sdxl => "sdxl",
            Family::SdxlUnet => "sdxl-unet",
            Family::SdxlRefiner => "sdxl-refiner",
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Lora => "lora",
            Family::Diffusers => "diffusers",
            Family::Vae => "vae",
            Family::Unknown => "unknown",
        }
    }

    /// What the file looks like, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Family::Sdxl => "an SDXL checkpoint",
            Family::SdxlUnet => "an SDXL UNet without text encoders or VAE",
            Family::SdxlRefiner => "an SDXL refiner checkpoint (conditioner.embedders.0 is OpenCLIP bigG)",
            Family::Sd1 => "a Stable Diffusion 1.x checkpoint (found 1.5-style keys cond_stage_model.transformer.*)",
            Family::Sd2 => "a Stable Diffusion 2.x checkpoint (found cond_stage_model.model.* keys)",
            Family::Lora => "a LoRA / LyCORIS (found adapter keys: lora_unet_*, lora_te*, lycoris_*, *.lora_down / lora_A …), not a full model; give the base checkpoint the LoRA was trained on (its ss_sd_model_name metadata names it)",
            Family::Diffusers => "a diffusers-format weights file (found down_blocks.* keys); save the model as a single-file LDM checkpoint (diffusers scripts/convert_diffusers_to_original_sdxl.py)",
            Family::Vae => "a standalone VAE (encoder.* / decoder.* keys and no UNet)",
            Family::Unknown => "an unrecognised set of keys",
        }
    }
}

/// Prediction target of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// Noise prediction (the SDXL default).
    Epsilon,
    /// v-prediction.
    V,
    /// EDM v-prediction (CosXL; `edm_vpred.*` keys).
    EdmV,
    /// EDM (Playground 2.5; `edm_mean` / `edm_std` keys).
    Edm,
}

impl Prediction {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v",
            Prediction::EdmV => "edm-v",
            Prediction::Edm => "edm",
        }
    }
}

/// Prediction type, ZTSNR flag and where they were read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PredictionInfo {
    /// The prediction target.
    pub prediction: Prediction,
    /// `ztsnr` marker present.
    pub ztsnr: bool,
    /// Where `prediction` came from.
    pub source: String,
    /// Inconsistencies worth telling the user about.
    pub warnings: Vec<String>,
}

impl Checkpoint {
    /// Which model family the keys belong to.
    pub fn family(&self) -> Family {
        let any = |f: &dyn Fn(&str) -> bool| self.entries.keys().any(|k| f(k));
        let lora = |k: &str| {
            k.starts_with("lora_unet_")
                || k.starts_with("lora_te")
                || k.starts_with("lycoris_")
                || k.contains(".lora_down.")
                || k.contains(".lora_up.")
                || k.contains(".lora_A.")
                || k.contains(".lora_B.")
                || k.contains(".hada_w1_")
                || k.contains(".lokr_w1")
        };
        // UNet weights of its own (a LoRA may name its keys after them).
        let unet = any(&|k| k.starts_with("model.diffusion_model.") && !lora(k));
        // A stray LoRA key beside a full model (a merge tool's leftover)
        // does not make it a LoRA: only a file without a UNet is one.
        if !unet && any(&lora) {
            return Family::Lora;
        }
        let label = self.contains("model.diffusion_model.label_emb.0.0.weight");
        // The text encoders say SDXL even when the UNet lacks `label_emb`
        // (a damaged file): config inference then names the missing key.
        let embedders = self.has_prefix("conditioner.embedders.");
        let refiner_te = self.has_prefix("conditioner.embedders.0.model.");
        if embedders && (label || unet) {
            return if refiner_te {
                Family::SdxlRefiner
            } else {
                Family::Sdxl
            };
        }
        if self.has_prefix("cond_stage_model.transformer.") {
            return Family::Sd1;
        }
        if self.has_prefix("cond_stage_model.model.") {
            return Family::Sd2;
        }
        if label {
            // The refiner's UNet alone: its adm is 1280 pooled + 5·256
            // (aesthetic score, no target size), not base's 2816.
            let adm = self
                .entry("model.diffusion_model.label_emb.0.0.weight")
                .and_then(|e| e.shape.get(1).copied());
            if adm == Some(2560) {
                return Family::SdxlRefiner;
            }
            return Family::SdxlUnet;
        }
        if any(&|k| {
            k.starts_with("down_blocks.")
                || k.starts_with("unet.")
                || k.starts_with("text_model.")
                || k.starts_with("encoder.down_blocks.")
        }) {
            return Family::Diffusers;
        }
        if self.vae_prefix().is_some() && !unet {
            return Family::Vae;
        }
        Family::Unknown
    }

    /// [`Family::describe`] of this file's family, with what the keys of
    /// an unrecognised file suggest.
    pub fn describe_family(&self) -> String {
        let f = self.family();
        let hint = if f == Family::Unknown {
            self.unknown_hint()
        } else {
            ""
        };
        format!("{}{hint}", f.describe())
    }

    /// For a file of [`Family::Unknown`]: what its keys suggest, to say
    /// in errors ("" when nothing does).
    fn unknown_hint(&self) -> &'static str {
        let any = |f: &dyn Fn(&str) -> bool| self.entries.keys().any(|k| f(k));
        if any(&|k| k.contains("joint_blocks.")) {
            "; its joint_blocks.* keys are SD3's MMDiT, which eps2v does not convert"
        } else if any(&|k| k.contains("double_blocks.") || k.contains("single_blocks.")) {
            "; its double_blocks.* / single_blocks.* keys are Flux's, which eps2v does not convert"
        } else if any(&|k| k.starts_with("input_blocks.") || k.starts_with("output_blocks.")) {
            "; its input_blocks.* keys look like a UNet saved without the `model.diffusion_model.` prefix (ComfyUI's diffusion_models folder): give the full single-file checkpoint"
        } else if self.has_prefix("model.diffusion_model.") {
            "; it has a UNet under model.diffusion_model.* but without SDXL's label_emb (an SD 1.x/2.x UNet, or a damaged SDXL one) and no text encoders"
        } else {
            ""
        }
    }

    /// Prediction type from marker keys, then `modelspec.prediction_type`.
    pub fn prediction(&self) -> PredictionInfo {
        let ztsnr = self.contains(MARKER_ZTSNR)
            || self.metadata.get(META_ZTSNR).is_some_and(|v| v == "true");
        let mut warnings = Vec::new();
        let meta = self
            .metadata
            .get(META_PREDICTION_TYPE)
            .map(|s| s.trim().to_ascii_lowercase());
        let meta_pred = match meta.as_deref() {
            Some("v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred") => Some(Prediction::V),
            Some("epsilon" | "eps" | "noise") => Some(Prediction::Epsilon),
            _ => None,
        };
        if let (Some(m), None) = (&meta, meta_pred) {
            warnings.push(format!(
                "metadata {META_PREDICTION_TYPE} = {m:?} is neither epsilon nor v; not used (give --prediction, or fix it with `eps2v ckpt mark`)"
            ));
        }
        let (prediction, source) = if self.has_prefix("edm_vpred.") {
            (Prediction::EdmV, "marker key edm_vpred.*".to_string())
        } else if self.contains("edm_mean") && self.contains("edm_std") {
            (Prediction::Edm, "marker keys edm_mean/edm_std".to_string())
        } else if self.contains(MARKER_V_PRED) {
            (Prediction::V, format!("marker key {MARKER_V_PRED}"))
        } else if let Some(p) = meta_pred {
            if p == Prediction::V {
                warnings.push(format!(
                    "{META_PREDICTION_TYPE} says v but there is no {MARKER_V_PRED} key: ComfyUI/A1111/Forge will sample it as epsilon; add the markers with `eps2v ckpt mark FILE --prediction v [--ztsnr] --out NEW`"
                ));
            }
            (p, format!("metadata {META_PREDICTION_TYPE}"))
        } else {
            (
                Prediction::Epsilon,
                "default (no marker key or metadata)".to_string(),
            )
        };
        if let (Some(mp), true) = (meta_pred, self.contains(MARKER_V_PRED)) {
            if mp == Prediction::Epsilon {
                warnings.push(format!(
                    "marker key {MARKER_V_PRED} contradicts {META_PREDICTION_TYPE}=epsilon; the marker wins"
                ));
            }
        }
        if ztsnr && prediction == Prediction::Epsilon {
            warnings.push("ztsnr marker on an epsilon model: ZTSNR needs v-prediction; sampled on the plain schedule (pass --prediction v --ztsnr if the model is v + ZTSNR)".into());
        }
        PredictionInfo {
            prediction,
            ztsnr,
            source,
            warnings,
        }
    }
}
