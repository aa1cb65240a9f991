//! timm's `VisionTransformer` as the WD v3 ViT taggers use it, under timm's
//! own parameter names, so a tagger's `model.safetensors` loads as it is.
//!
//! Forward (timm `vision_transformer.py`, `forward_features` + `forward_head`):
//! 1. `patch_embed.proj`: conv `P×P`, stride `P` → `(b, D, g, g)` →
//!    flatten + transpose → `(b, g², D)` (row-major patches);
//! 2. optional `cls_token` prepended, then `+ pos_embed` `(1, tokens, D)`;
//! 3. `blocks.N`: `x + attn(norm1(x))`, `x + mlp(norm2(x))`; attention with a
//!    fused `qkv` Linear (`D → 3D`, q/k/v blocks in that order, heads packed
//!    inside each), scale `head_dim^-½`, then `proj`; MLP `fc1` → act → `fc2`;
//! 4. `norm` (when there is no `fc_norm`), pool (mean of the patch tokens or
//!    the class token), `fc_norm` (when configured), `head` → logits.
//!
//! Probabilities are `sigmoid(logits)` (the reference script applies it after
//! the model: timm has no multi-label head activation).
//!
//! Every layer is from [`crate::nn`] or a differentiable candle op (the toy
//! world trains a tiny tagger with this class); a test checks that every
//! parameter receives a gradient. Equivalent reference code:
//! `timm.create_model("vit_base_patch16_224", img_size=448, class_token=False,
//! global_pool="avg", fc_norm=False, act_layer="gelu_tanh", num_classes=N)`;
//! golden: `fixtures/golden/tagger/` (`fixtures/scripts/gen_tagger_goldens.py`).

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{GlobalPool, TaggerActivation, TaggerConfig};
use crate::nn::{ops, Conv2d, LayerNorm, Linear};
use crate::Result;

/// Multi-head self-attention with timm's fused `qkv` projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &TaggerConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            qkv: Linear::new(vb.pp("qkv"), d, 3 * d, cfg.qkv_bias)?,
            proj: Linear::new(vb.pp("proj"), d, d, true)?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let qkv = self.qkv.forward(x)?; // (b, s, 3d): [q | k | v], heads packed in each
        let q = qkv.narrow(2, 0, d)?;
        let k = qkv.narrow(2, d, d)?;
        let v = qkv.narrow(2, 2 * d, d)?;
        let hd = d / self.heads;
        let o = ops::attention_packed(&q, &k, &v, self.heads, (hd as f64).powf(-0.5), false)?;
        self.proj.forward(&o)
    }
}

/// One pre-LN transformer block (`blocks.N`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: TaggerActivation,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &TaggerConfig) -> Result<Self> {
        let (d, eps) = (cfg.embed_dim, cfg.layer_norm_eps);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), d, eps)?,
            attn: Attention::new(vb.pp("attn"), cfg)?,
            norm2: LayerNorm::new(vb.pp("norm2"), d, eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, cfg.mlp_hidden, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), cfg.mlp_hidden, d, true)?,
            act: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = match self.act {
            TaggerActivation::GeluErf => ops::gelu_erf(&h)?,
            TaggerActivation::GeluTanh => ops::gelu_tanh(&h)?,
            TaggerActivation::QuickGelu => ops::quick_gelu(&h)?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// The tagger network: image batch `(b, 3, S, S)` → logits `(b, num_classes)`.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_embed: Conv2d,
    cls_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    fc_norm: Option<LayerNorm>,
    head: Linear,
    cfg: TaggerConfig,
}

impl VisionTransformer {
    /// Build from `vb` (timm key names at its root: `patch_embed.proj.weight`,
    /// `pos_embed`, `blocks.N.*`, `norm.*`, `head.*`).
    pub fn new(vb: VarBuilder, cfg: &TaggerConfig) -> Result<Self> {
        cfg.check()?;
        let d = cfg.embed_dim;
        let patch_embed = Conv2d::new(
            vb.pp("patch_embed.proj"),
            3,
            d,
            cfg.patch_size,
            cfg.patch_size,
            0,
        )?;
        let cls_token = if cfg.class_token {
            Some(vb.get((1, 1, d), "cls_token")?)
        } else {
            None
        };
        let pos_embed = vb.get((1, cfg.tokens(), d), "pos_embed")?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let (norm, fc_norm) = if cfg.fc_norm {
            (
                None,
                Some(LayerNorm::new(vb.pp("fc_norm"), d, cfg.layer_norm_eps)?),
            )
        } else {
            (
                Some(LayerNorm::new(vb.pp("norm"), d, cfg.layer_norm_eps)?),
                None,
            )
        };
        let head = Linear::new(vb.pp("head"), d, cfg.num_classes, true)?;
        Ok(Self {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            fc_norm,
            head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &TaggerConfig {
        &self.cfg
    }

    /// Pooled features before the head: `(b, embed_dim)`.
    pub fn forward_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.cfg.img_size;
        let (b, c, h, w) = x.dims4()?;
        if c != 3 || h != s || w != s {
            candle_core::bail!("tagger input must be (b, 3, {s}, {s}), got {:?}", x.dims());
        }
        let x = self.patch_embed.forward(x)?; // (b, d, g, g)
        let x = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (b, g², d)
        let x = match &self.cls_token {
            Some(cls) => {
                let d = cls.dim(2)?;
                Tensor::cat(&[&cls.broadcast_as((b, 1, d))?, &x], 1)?
            }
            None => x,
        };
        let mut x = x.broadcast_add(&self.pos_embed)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        if let Some(n) = &self.norm {
            x = n.forward(&x)?;
        }
        let prefix = usize::from(self.cls_token.is_some());
        let pooled = match self.cfg.global_pool {
            GlobalPool::Avg => {
                let n = x.dim(1)? - prefix;
                x.narrow(1, prefix, n)?.mean(1)?
            }
            GlobalPool::Token => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        match &self.fc_norm {
            Some(n) => n.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// Logits `(b, num_classes)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&self.forward_features(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::sdxl::init_params;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(cfg: &TaggerConfig, seed: u64) -> (VarMap, VisionTransformer) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let m = VisionTransformer::new(vb, cfg).unwrap();
        init_params(&varmap, seed).unwrap();
        (varmap, m)
    }

    /// Every parameter — for each pooling / norm / activation variant —
    /// gets a non-zero gradient from a loss on the logits.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let variants = [
            TaggerConfig::tiny(5),
            TaggerConfig {
                class_token: true,
                global_pool: GlobalPool::Token,
                fc_norm: false,
                activation: TaggerActivation::GeluErf,
                ..TaggerConfig::tiny(5)
            },
            TaggerConfig {
                fc_norm: true,
                activation: TaggerActivation::QuickGelu,
                ..TaggerConfig::tiny(5)
            },
        ];
        for cfg in variants {
            let (varmap, m) = build(&cfg, 3);
            let x =
                Tensor::randn(0f32, 1.0, (2, 3, cfg.img_size, cfg.img_size), &Device::Cpu).unwrap();
            let target = Tensor::randn(0f32, 1.0, (2, cfg.num_classes), &Device::Cpu).unwrap();
            let loss = (m.forward(&x).unwrap() - target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let data = varmap.data().lock().unwrap();
            assert!(!data.is_empty());
            for (name, var) in data.iter() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{cfg:?}: no gradient for {name}"));
                let n = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0 && n.is_finite(), "{name}: |grad| = {n}");
            }
        }
    }

    #[test]
    fn wrong_input_size_is_an_error() {
        let (_, m) = build(&TaggerConfig::tiny(3), 1);
        let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(m
            .forward(&x)
            .unwrap_err()
            .to_string()
            .contains("(b, 3, 32, 32)"));
    }
}
