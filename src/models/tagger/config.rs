//! Hyper-parameters of a WD-style ViT tagger and their `config.json`.
//!
//! The WD v3 taggers ship a timm-style `config.json` next to
//! `model.safetensors` and `selected_tags.csv`. For `SmilingWolf/wd-vit-tagger-v3`
//! it names the timm architecture `vit_base_patch16_224` and overrides it
//! through `model_args`: `img_size` 448, `class_token` false, `global_pool`
//! "avg", `fc_norm` false, `act_layer` "gelu_tanh"; `pretrained_cfg` gives the
//! eval transform: `input_size` [3, 448, 448], `interpolation` "bicubic",
//! `crop_pct` 1.0, `crop_mode` "center", `mean` = `std` = [0.5, 0.5, 0.5];
//! `num_classes` 10861. (Facts from the model card / config of the
//! Hugging Face repo and timm's `vision_transformer.py`; the structure is
//! read generally so `wd-vit-large-tagger-v3` and tiny test models load the
//! same way.)
//!
//! How the fields map onto timm's `VisionTransformer` (timm ≥ 0.9):
//! - widths from the architecture name `vit_{tiny,small,base,large,huge}_patch{P}_{S}`
//!   (192/384/768/1024/1280 wide, 12/12/12/24/32 blocks, 3/6/12/16/16
//!   heads, MLP ratio 4), each overridable by `model_args` (`embed_dim`,
//!   `depth`, `num_heads`, `patch_size`, `mlp_ratio`, `img_size`,
//!   `qkv_bias`);
//! - `class_token` (default true), `global_pool` ("token" default, "avg"),
//!   `fc_norm` (default: true exactly when pooling is "avg"; then the final
//!   `norm` is replaced by `fc_norm` after pooling), `act_layer`
//!   ("gelu" = erf GELU, timm's ViT default; "gelu_tanh"; "quick_gelu");
//! - LayerNorm eps 1e-6 (timm's ViT `norm_layer`).
//!
//! Architecture arguments this port does not implement (register tokens,
//! layer scale `init_values`, `qk_norm`, `pre_norm`, `no_embed_class`,
//! dynamic image size, other pooling) are refused with an error naming the
//! key, never silently ignored. Dropout arguments are accepted and unused
//! (inference; the trainer adds its own regularisation).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::IoContext;
use crate::{Error, Result};

/// MLP activation (timm `act_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaggerActivation {
    /// `gelu`: exact erf GELU (timm ViT default).
    GeluErf,
    /// `gelu_tanh`: tanh-approximated GELU (WD v3).
    GeluTanh,
    /// `quick_gelu`: `x·sigmoid(1.702x)`.
    QuickGelu,
}

impl TaggerActivation {
    /// timm's name.
    pub fn name(self) -> &'static str {
        match self {
            TaggerActivation::GeluErf => "gelu",
            TaggerActivation::GeluTanh => "gelu_tanh",
            TaggerActivation::QuickGelu => "quick_gelu",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "gelu" => TaggerActivation::GeluErf,
            "gelu_tanh" => TaggerActivation::GeluTanh,
            "quick_gelu" => TaggerActivation::QuickGelu,
            _ => return None,
        })
    }
}

/// How the token sequence becomes one feature vector (timm `global_pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalPool {
    /// Mean over the patch tokens (prefix tokens excluded).
    Avg,
    /// The class token.
    Token,
}

impl GlobalPool {
    /// timm's name.
    pub fn name(self) -> &'static str {
        match self {
            GlobalPool::Avg => "avg",
            GlobalPool::Token => "token",
        }
    }
}

/// Resampling filter of the eval transform (`pretrained_cfg.interpolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Pillow `BICUBIC` (WD v3).
    Bicubic,
    /// Pillow `LANCZOS`.
    Lanczos,
}

impl Interpolation {
    /// timm's name.
    pub fn name(self) -> &'static str {
        match self {
            Interpolation::Bicubic => "bicubic",
            Interpolation::Lanczos => "lanczos",
        }
    }
}

/// Everything needed to build a ViT tagger and its input transform.
#[derive(Debug, Clone, PartialEq)]
pub struct TaggerConfig {
    /// timm architecture name as written in `config.json` (e.g. `vit_base_patch16_224`).
    pub architecture: String,
    /// Number of outputs (= rows of `selected_tags.csv`).
    pub num_classes: usize,
    /// Input side in pixels (square).
    pub img_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (`embed_dim` must divide evenly).
    pub num_heads: usize,
    /// MLP hidden width (`embed_dim · mlp_ratio`).
    pub mlp_hidden: usize,
    /// Bias on the fused q/k/v projection.
    pub qkv_bias: bool,
    /// A learned class token is prepended.
    pub class_token: bool,
    /// Pooling of the token sequence.
    pub global_pool: GlobalPool,
    /// LayerNorm after pooling (`fc_norm`) instead of before it (`norm`).
    pub fc_norm: bool,
    /// MLP activation.
    pub activation: TaggerActivation,
    /// LayerNorm epsilon (1e-6 in timm's ViT).
    pub layer_norm_eps: f64,
    /// Per-channel mean of the input normalisation (RGB order).
    pub mean: [f32; 3],
    /// Per-channel std of the input normalisation (RGB order).
    pub std: [f32; 3],
    /// Resampling filter of the eval transform.
    pub interpolation: Interpolation,
}

/// `(embed_dim, depth, heads)` of timm's named ViT sizes.
fn size_widths(size: &str) -> Option<(usize, usize, usize)> {
    Some(match size {
        "tiny" => (192, 12, 3),
        "small" => (384, 12, 6),
        "base" => (768, 12, 12),
        "large" => (1024, 24, 16),
        "huge" => (1280, 32, 16),
        _ => return None,
    })
}

/// Parse `vit_<size>_patch<P>_<S>` (an optional `.tag` suffix is ignored)
/// into `(embed_dim, depth, heads, patch, img_size)`.
fn parse_vit_name(name: &str) -> Option<(usize, usize, usize, usize, usize)> {
    let base = name.split('.').next()?;
    let mut parts = base.split('_');
    if parts.next()? != "vit" {
        return None;
    }
    let (d, depth, heads) = size_widths(parts.next()?)?;
    let patch: usize = parts.next()?.strip_prefix("patch")?.parse().ok()?;
    let img: usize = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((d, depth, heads, patch, img))
}

impl TaggerConfig {
    /// `SmilingWolf/wd-vit-tagger-v3`: ViT-B/16 at 448², no class token,
    /// average pooling, no `fc_norm`, tanh GELU, 10861 tags.
    pub fn wd_vit_v3() -> Self {
        Self {
            architecture: "vit_base_patch16_224".into(),
            num_classes: 10861,
            img_size: 448,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_hidden: 3072,
            qkv_bias: true,
            class_token: false,
            global_pool: GlobalPool::Avg,
            fc_norm: false,
            activation: TaggerActivation::GeluTanh,
            layer_norm_eps: 1e-6,
            mean: [0.5; 3],
            std: [0.5; 3],
            interpolation: Interpolation::Bicubic,
        }
    }

    /// A tiny tagger with the v3 model arguments (tests, toy world): 32×32
    /// input, 8×8 patches (16 tokens), 32 wide, 2 blocks, 4 heads, MLP 64.
    pub fn tiny(num_classes: usize) -> Self {
        Self {
            architecture: "vit_tiny_patch16_224".into(),
            num_classes,
            img_size: 32,
            patch_size: 8,
            embed_dim: 32,
            depth: 2,
            num_heads: 4,
            mlp_hidden: 64,
            ..Self::wd_vit_v3()
        }
    }

    /// The toy-world tagger (DESIGN.md §4), trained on toy scenes: the v3
    /// model arguments at a 64×64 input (toy scenes are 64–96 px), 8×8
    /// patches (64 tokens), 64 wide, 4 blocks, 4 heads, MLP 128.
    /// `num_classes` is the length of its tag list
    /// (`toy::scenes::all_tags()`: 61).
    pub fn toy(num_classes: usize) -> Self {
        Self {
            img_size: 64,
            embed_dim: 64,
            depth: 4,
            num_heads: 4,
            mlp_hidden: 128,
            ..Self::tiny(num_classes)
        }
    }

    /// Tokens per image (patches, plus the class token when present).
    pub fn tokens(&self) -> usize {
        let g = self.img_size / self.patch_size.max(1);
        g * g + usize::from(self.class_token)
    }

    /// Check the sizes fit together.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::model(format!("tagger config: {m}")));
        if self.num_heads == 0 || self.embed_dim % self.num_heads != 0 {
            return bad(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.patch_size == 0 || self.img_size == 0 || self.img_size % self.patch_size != 0 {
            return bad(format!(
                "img_size {} is not a multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_classes == 0 || self.depth == 0 || self.mlp_hidden == 0 {
            return bad("num_classes, depth and the MLP width must be positive".into());
        }
        if self.global_pool == GlobalPool::Token && !self.class_token {
            return bad("global_pool \"token\" needs a class token (class_token true)".into());
        }
        if self.std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            return bad(format!("std {:?} must be positive", self.std));
        }
        Ok(())
    }

    /// Read a WD/timm `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(format!("{}: not valid JSON: {e}", path.display())))?;
        Self::from_json(&v).map_err(|e| Error::model(format!("{}: {e}", path.display())))
    }

    /// Parse the JSON of a WD/timm `config.json` (errors are relative to the file).
    pub fn from_json(v: &Value) -> Result<Self> {
        let arch = v
            .get("architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::model("no \"architecture\" string; is this a timm model config.json?")
            })?;
        let Some((mut embed_dim, mut depth, mut num_heads, mut patch_size, mut img_size)) =
            parse_vit_name(arch)
        else {
            return Err(Error::model(format!(
                "architecture {arch:?} is not supported: eps2v implements the ViT taggers (timm vit_<tiny|small|base|large|huge>_patch<P>_<S>, e.g. SmilingWolf/wd-vit-tagger-v3); SwinV2 / ConvNeXt / EVA02 taggers are not implemented"
            )));
        };
        let empty = Map::new();
        let args = match v.get("model_args") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return Err(Error::model("\"model_args\" must be an object")),
        };
        let usize_arg = |key: &str, cur: usize| -> Result<usize> {
            match args.get(key) {
                None | Some(Value::Null) => Ok(cur),
                Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                    Error::model(format!(
                        "model_args.{key} must be a positive integer, found {x}"
                    ))
                }),
            }
        };
        let bool_arg = |key: &str| -> Result<Option<bool>> {
            match args.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(x) => Err(Error::model(format!(
                    "model_args.{key} must be true or false, found {x}"
                ))),
            }
        };
        embed_dim = usize_arg("embed_dim", embed_dim)?;
        depth = usize_arg("depth", depth)?;
        num_heads = usize_arg("num_heads", num_heads)?;
        patch_size = usize_arg("patch_size", patch_size)?;
        img_size = match args.get("img_size") {
            Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => a[0]
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::model("model_args.img_size must be integers"))?,
            Some(Value::Array(a)) => {
                return Err(Error::model(format!(
                    "model_args.img_size {a:?}: only square inputs are supported"
                )))
            }
            _ => usize_arg("img_size", img_size)?,
        };
        let mlp_ratio = match args.get("mlp_ratio") {
            None | Some(Value::Null) => 4.0,
            Some(x) => x.as_f64().filter(|r| *r > 0.0).ok_or_else(|| {
                Error::model(format!(
                    "model_args.mlp_ratio must be a positive number, found {x}"
                ))
            })?,
        };
        // Arguments that change the architecture in ways not implemented here.
        for (key, default_ok) in [
            ("reg_tokens", json!(0)),
            ("init_values", Value::Null),
            ("qk_norm", json!(false)),
            ("pre_norm", json!(false)),
            ("no_embed_class", json!(false)),
            ("dynamic_img_size", json!(false)),
            ("dynamic_img_pad", json!(false)),
            ("final_norm", json!(true)),
            ("in_chans", json!(3)),
            ("pos_embed", json!("learn")),
        ] {
            if let Some(x) = args.get(key) {
                if *x != default_ok && !x.is_null() {
                    return Err(Error::model(format!(
                        "model_args.{key} = {x} is not supported by eps2v's ViT tagger (only timm's defaults)"
                    )));
                }
            }
        }
        let class_token = bool_arg("class_token")?.unwrap_or(true);
        let global_pool = match args.get("global_pool").or_else(|| v.get("global_pool")) {
            None | Some(Value::Null) => GlobalPool::Token,
            Some(Value::String(s)) if s == "avg" => GlobalPool::Avg,
            Some(Value::String(s)) if s == "token" => GlobalPool::Token,
            Some(x) => {
                return Err(Error::model(format!(
                    "global_pool {x} is not supported (only \"avg\" and \"token\")"
                )))
            }
        };
        let fc_norm = bool_arg("fc_norm")?.unwrap_or(global_pool == GlobalPool::Avg);
        let activation = match args.get("act_layer") {
            None | Some(Value::Null) => TaggerActivation::GeluErf,
            Some(Value::String(s)) => TaggerActivation::parse(s).ok_or_else(|| {
                Error::model(format!(
                    "model_args.act_layer {s:?} is not supported (gelu, gelu_tanh, quick_gelu)"
                ))
            })?,
            Some(x) => {
                return Err(Error::model(format!(
                    "model_args.act_layer must be a string, found {x}"
                )))
            }
        };
        let qkv_bias = bool_arg("qkv_bias")?.unwrap_or(true);
        let pcfg = v.get("pretrained_cfg").and_then(Value::as_object);
        let num_classes = v
            .get("num_classes")
            .or_else(|| args.get("num_classes"))
            .or_else(|| pcfg.and_then(|p| p.get("num_classes")))
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                Error::model(
                    "no \"num_classes\"; the config must say how many tags the model outputs",
                )
            })? as usize;
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match pcfg.and_then(|p| p.get(key)) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| {
                            Error::model(format!("pretrained_cfg.{key} must hold numbers"))
                        })? as f32;
                    }
                    Ok(out)
                }
                Some(x) => Err(Error::model(format!(
                    "pretrained_cfg.{key} must be three numbers, found {x}"
                ))),
            }
        };
        let mean = triple("mean", [0.5; 3])?;
        let std = triple("std", [0.5; 3])?;
        let interpolation = match pcfg.and_then(|p| p.get("interpolation")) {
            None | Some(Value::Null) => Interpolation::Bicubic,
            Some(Value::String(s)) if s == "bicubic" => Interpolation::Bicubic,
            Some(Value::String(s)) if s == "lanczos" => Interpolation::Lanczos,
            Some(x) => {
                return Err(Error::model(format!(
                    "pretrained_cfg.interpolation {x} is not supported (bicubic, lanczos)"
                )))
            }
        };
        if let Some(c) = pcfg.and_then(|p| p.get("crop_pct")).and_then(Value::as_f64) {
            if (c - 1.0).abs() > 1e-9 {
                return Err(Error::model(format!(
                    "pretrained_cfg.crop_pct {c} is not supported (WD taggers use 1.0: the padded square is resized whole)"
                )));
            }
        }
        if let Some(Value::Array(a)) = pcfg.and_then(|p| p.get("input_size")) {
            let side = a.get(1).and_then(Value::as_u64).map(|n| n as usize);
            if a.len() != 3 || side != a.get(2).and_then(Value::as_u64).map(|n| n as usize) {
                return Err(Error::model(format!(
                    "pretrained_cfg.input_size {a:?}: expected [3, S, S]"
                )));
            }
            if side != Some(img_size) {
                return Err(Error::model(format!(
                    "pretrained_cfg.input_size {a:?} differs from the model's img_size {img_size}"
                )));
            }
        }
        let cfg = Self {
            architecture: arch.to_string(),
            num_classes,
            img_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            mlp_hidden: (embed_dim as f64 * mlp_ratio).round() as usize,
            qkv_bias,
            class_token,
            global_pool,
            fc_norm,
            activation,
            layer_norm_eps: 1e-6,
            mean,
            std,
            interpolation,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The `config.json` the WD taggers ship, for this config (architecture
    /// overrides written into `model_args`, as timm's `create_model` takes
    /// them).
    pub fn to_json(&self) -> Value {
        let mut args = Map::new();
        args.insert("img_size".into(), json!(self.img_size));
        args.insert("class_token".into(), json!(self.class_token));
        args.insert("global_pool".into(), json!(self.global_pool.name()));
        args.insert("fc_norm".into(), json!(self.fc_norm));
        args.insert("act_layer".into(), json!(self.activation.name()));
        let named = parse_vit_name(&self.architecture);
        let (d, depth, heads, patch) = named
            .map(|(d, depth, heads, patch, _)| (d, depth, heads, patch))
            .unwrap_or((0, 0, 0, 0));
        if d != self.embed_dim {
            args.insert("embed_dim".into(), json!(self.embed_dim));
        }
        if depth != self.depth {
            args.insert("depth".into(), json!(self.depth));
        }
        if heads != self.num_heads {
            args.insert("num_heads".into(), json!(self.num_heads));
        }
        if patch != self.patch_size {
            args.insert("patch_size".into(), json!(self.patch_size));
        }
        if self.mlp_hidden != self.embed_dim * 4 {
            args.insert(
                "mlp_ratio".into(),
                json!(self.mlp_hidden as f64 / self.embed_dim as f64),
            );
        }
        if !self.qkv_bias {
            args.insert("qkv_bias".into(), json!(false));
        }
        json!({
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "num_features": self.embed_dim,
            "global_pool": self.global_pool.name(),
            "model_args": args,
            "pretrained_cfg": {
                "custom_load": false,
                "input_size": [3, self.img_size, self.img_size],
                "fixed_input_size": false,
                "interpolation": self.interpolation.name(),
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": self.mean,
                "std": self.std,
                "num_classes": self.num_classes,
                "pool_size": null,
                "first_conv": null,
                "classifier": null
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of `SmilingWolf/wd-vit-tagger-v3/config.json`.
    fn wd_v3_json() -> Value {
        json!({
            "architecture": "vit_base_patch16_224",
            "num_classes": 10861,
            "num_features": 768,
            "global_pool": "avg",
            "model_args": {"img_size": 448, "class_token": false, "global_pool": "avg",
                           "fc_norm": false, "act_layer": "gelu_tanh"},
            "pretrained_cfg": {"custom_load": false, "input_size": [3, 448, 448],
                               "fixed_input_size": false, "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "center",
                               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                               "num_classes": 10861, "pool_size": null,
                               "first_conv": null, "classifier": null}
        })
    }

    #[test]
    fn wd_vit_v3_config_parses_to_the_named_constructor() {
        let c = TaggerConfig::from_json(&wd_v3_json()).unwrap();
        assert_eq!(c, TaggerConfig::wd_vit_v3());
        assert_eq!(c.tokens(), 784);
    }

    #[test]
    fn to_json_round_trips() {
        for c in [TaggerConfig::wd_vit_v3(), TaggerConfig::tiny(7)] {
            assert_eq!(TaggerConfig::from_json(&c.to_json()).unwrap(), c);
        }
    }

    #[test]
    fn timm_defaults_apply_without_model_args() {
        let c = TaggerConfig::from_json(
            &json!({"architecture": "vit_large_patch16_448", "num_classes": 5}),
        )
        .unwrap();
        assert_eq!(
            (c.embed_dim, c.depth, c.num_heads, c.img_size),
            (1024, 24, 16, 448)
        );
        assert!(c.class_token);
        assert_eq!(c.global_pool, GlobalPool::Token);
        assert!(!c.fc_norm);
        assert_eq!(c.activation, TaggerActivation::GeluErf);
        // avg pooling turns fc_norm on unless it is set.
        let c = TaggerConfig::from_json(&json!({"architecture": "vit_small_patch16_224",
            "num_classes": 5, "model_args": {"global_pool": "avg"}}))
        .unwrap();
        assert!(c.fc_norm);
    }

    #[test]
    fn unsupported_configs_name_the_problem() {
        let cases = [
            (
                json!({"architecture": "swinv2_base_window8_256", "num_classes": 3}),
                "not supported",
            ),
            (
                json!({"architecture": "vit_base_patch16_224"}),
                "num_classes",
            ),
            (
                json!({"architecture": "vit_base_patch16_224", "num_classes": 3,
                    "model_args": {"reg_tokens": 4}}),
                "reg_tokens",
            ),
            (
                json!({"architecture": "vit_base_patch16_224", "num_classes": 3,
                    "model_args": {"class_token": false}}),
                "class token",
            ),
            (
                json!({"architecture": "vit_base_patch16_224", "num_classes": 3,
                    "model_args": {"img_size": 100}}),
                "multiple of patch_size",
            ),
            (
                json!({"architecture": "vit_base_patch16_224", "num_classes": 3,
                    "pretrained_cfg": {"crop_pct": 0.875}}),
                "crop_pct",
            ),
            (
                json!({"architecture": "vit_base_patch16_224", "num_classes": 3,
                    "model_args": {"act_layer": "relu"}}),
                "act_layer",
            ),
        ];
        for (v, want) in cases {
            let e = TaggerConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
