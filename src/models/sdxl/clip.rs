//! The two SDXL text encoders under their single-file checkpoint names:
//! CLIP ViT-L/14 text (HF `CLIPTextModel` names, quick-GELU) and OpenCLIP
//! ViT-bigG/14 text (open_clip names, fused `in_proj`, exact GELU, bare
//! `text_projection`), plus [`SdxlTextEncoder`], which turns A1111-style
//! prompts into SDXL's `context` and pooled vector.
//!
//! Facts: `shared/reference/sdxl.md` §1.7–§1.8 (keys, shapes), §3.1 (which
//! outputs SDXL uses), §3.3 (long prompts, emphasis, uncond), §8.3 (only
//! differentiable layers from [`crate::nn`]; never candle_nn's LayerNorm or
//! `softmax_last_dim`, which silently drop gradients).
//! - Both: pre-LN residual blocks, additive causal mask, positions always
//!   `0..seq` (a checkpoint's `position_ids` buffer is ignored).
//! - CLIP-L output: hidden state after all but the last layer, no final LN
//!   (HF `hidden_states[-2]`); the last layer and `final_layer_norm` are
//!   loaded (so files validate) but not run.
//! - bigG outputs: the input of the last block (penultimate, no `ln_final`),
//!   and pooled = `ln_final(last block output)` at the EOS position (argmax of
//!   the ids) `@ text_projection` (x @ P, P stored `[width, proj]`, as sgm).
//!
//! Equivalent reference code: transformers `CLIPTextModel`, open_clip
//! `TextTransformer`, sgm `FrozenCLIPEmbedder` / `FrozenOpenCLIPEmbedder2`.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::prompt::{self, TokenizedPrompt};
use super::tokenizer::{ClipTokenizer, Padding, CONTEXT_LEN, VOCAB_SIZE};
use crate::nn::{ops, LayerNorm, Linear};
use crate::{Error, Result};

/// Checkpoint prefix of the CLIP-L text model (text encoder 1), below the
/// component prefix `sdxl::CLIP_L_PREFIX` (`…transformer`).
pub const CLIP_L_MODEL_PREFIX: &str = "conditioner.embedders.0.transformer.text_model";
/// Checkpoint prefix of the OpenCLIP bigG model (text encoder 2; the same
/// as the component prefix `sdxl::CLIP_G_PREFIX`).
pub const BIGG_MODEL_PREFIX: &str = "conditioner.embedders.1.model";

/// MLP activation of the transformer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// OpenAI CLIP's `x · sigmoid(1.702 x)` (CLIP-L).
    QuickGelu,
    /// Exact erf GELU (`nn.GELU`, OpenCLIP bigG).
    GeluErf,
}

/// Which family of parameter names the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// HF transformers `CLIPTextModel` names (`embeddings.token_embedding`,
    /// `encoder.layers.N.self_attn.q_proj`, …, `final_layer_norm`).
    HfClip,
    /// open_clip names (`token_embedding`, `positional_embedding`,
    /// `transformer.resblocks.N.attn.in_proj_weight`, …, `ln_final`,
    /// `text_projection`).
    OpenClip,
}

/// Hyper-parameters of one CLIP text transformer (serialised into our
/// saves' `eps2v.text_config` metadata, see [`super::infer`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary (49408 for the real tokenizer).
    pub vocab_size: usize,
    /// Model width.
    pub width: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Attention heads (width must divide evenly).
    pub heads: usize,
    /// MLP hidden size.
    pub intermediate: usize,
    /// Position-embedding rows (77).
    pub max_positions: usize,
    /// MLP activation.
    pub activation: Activation,
    /// Parameter naming.
    pub naming: Naming,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Output size of `text_projection` (`None`: the model has none, as
    /// SDXL's CLIP-L). Only [`Naming::OpenClip`] models load one.
    pub projection_dim: Option<usize>,
}

impl ClipTextConfig {
    /// SDXL text encoder 1: CLIP ViT-L/14 text (768 wide, 12 layers, 12 heads).
    pub fn clip_l() -> Self {
        Self {
            vocab_size: VOCAB_SIZE,
            width: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            max_positions: CONTEXT_LEN,
            activation: Activation::QuickGelu,
            naming: Naming::HfClip,
            layer_norm_eps: 1e-5,
            projection_dim: None,
        }
    }

    /// SDXL text encoder 2: OpenCLIP ViT-bigG/14 text (1280 wide, 32 layers,
    /// 20 heads, projection 1280).
    pub fn open_clip_bigg() -> Self {
        Self {
            vocab_size: VOCAB_SIZE,
            width: 1280,
            layers: 32,
            heads: 20,
            intermediate: 5120,
            max_positions: CONTEXT_LEN,
            activation: Activation::GeluErf,
            naming: Naming::OpenClip,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
        }
    }

    /// Tiny CLIP-L-shaped encoder (tests, toy world): 32 wide, 3 layers,
    /// 4 heads, real vocabulary.
    pub fn clip_l_tiny() -> Self {
        Self {
            width: 32,
            layers: 3,
            heads: 4,
            intermediate: 128,
            ..Self::clip_l()
        }
    }

    /// Tiny bigG-shaped encoder (tests, toy world): 40 wide, 3 layers,
    /// 5 heads, projection 40, real vocabulary.
    pub fn open_clip_bigg_tiny() -> Self {
        Self {
            width: 40,
            layers: 3,
            heads: 5,
            intermediate: 160,
            projection_dim: Some(40),
            ..Self::open_clip_bigg()
        }
    }

    /// A tiny bigG-shaped encoder 32 wide (4 heads, MLP 128, projection
    /// 32): with [`Self::clip_l_tiny`] it gives the context 64 / pooled 32
    /// of `UNetConfig::tiny()`.
    pub fn open_clip_bigg_tiny32() -> Self {
        Self {
            width: 32,
            heads: 4,
            intermediate: 128,
            projection_dim: Some(32),
            ..Self::open_clip_bigg_tiny()
        }
    }

    /// Toy-world CLIP-L-shaped encoder: 16 wide, 2 layers, 2 heads, MLP
    /// 64, real vocabulary (the token table, 49408 × width, is most of a
    /// toy checkpoint, hence the narrow width).
    pub fn clip_l_toy() -> Self {
        Self {
            width: 16,
            layers: 2,
            heads: 2,
            intermediate: 64,
            ..Self::clip_l()
        }
    }

    /// Toy-world bigG-shaped encoder: 32 wide, 2 layers, 2 heads, MLP 128,
    /// projection 32, real vocabulary. With [`Self::clip_l_toy`]: context
    /// 16 + 32 = 48, pooled 32 (`UNetConfig::toy()`).
    pub fn open_clip_bigg_toy() -> Self {
        Self {
            width: 32,
            layers: 2,
            heads: 2,
            intermediate: 128,
            projection_dim: Some(32),
            ..Self::open_clip_bigg()
        }
    }

    /// One line for summaries (`ckpt info`).
    pub fn summary(&self) -> String {
        format!(
            "width {}, {} layers, {} heads, MLP {} ({}), vocab {}, {} positions{}",
            self.width,
            self.layers,
            self.heads,
            self.intermediate,
            match self.activation {
                Activation::QuickGelu => "quick-GELU",
                Activation::GeluErf => "GELU",
            },
            self.vocab_size,
            self.max_positions,
            match self.projection_dim {
                Some(p) => format!(", projection {p}"),
                None => String::new(),
            }
        )
    }

    /// The named configs, in the order `known_name` tries them.
    pub fn named() -> Vec<(&'static str, Self)> {
        vec![
            ("clip_l", Self::clip_l()),
            ("open_clip_bigg", Self::open_clip_bigg()),
            ("clip_l_tiny", Self::clip_l_tiny()),
            ("open_clip_bigg_tiny", Self::open_clip_bigg_tiny()),
            ("open_clip_bigg_tiny32", Self::open_clip_bigg_tiny32()),
            ("clip_l_toy", Self::clip_l_toy()),
            ("open_clip_bigg_toy", Self::open_clip_bigg_toy()),
        ]
    }

    /// Name of the named config equal to this one, if any.
    pub fn known_name(&self) -> Option<&'static str> {
        Self::named()
            .into_iter()
            .find(|(_, c)| c == self)
            .map(|(n, _)| n)
    }

    /// Is `other` the same network apart from what shapes cannot tell
    /// (heads, activation, LayerNorm eps)?
    pub fn same_shapes(&self, other: &Self) -> bool {
        Self {
            heads: other.heads,
            activation: other.activation,
            layer_norm_eps: other.layer_norm_eps,
            ..self.clone()
        } == *other
    }

    /// Check the invariants the model constructor relies on.
    pub fn check(&self) -> Result<()> {
        if self.heads == 0 || self.width % self.heads != 0 {
            return Err(Error::config(format!(
                "clip config: width {} is not divisible by {} heads",
                self.width, self.heads
            )));
        }
        if self.layers < 2 {
            return Err(Error::config(format!(
                "clip config: {} layers; SDXL uses the penultimate layer, so at least 2 are needed",
                self.layers
            )));
        }
        Ok(())
    }
}

/// q/k/v projections: three Linears (HF) or one fused `in_proj` (open_clip).
#[derive(Debug, Clone)]
enum Qkv {
    Separate(Linear, Linear, Linear),
    Fused(Linear),
}

/// Multi-head causal self-attention.
#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Qkv,
    out: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let w = cfg.width;
        Ok(match cfg.naming {
            Naming::HfClip => Self {
                qkv: Qkv::Separate(
                    Linear::new(vb.pp("q_proj"), w, w, true)?,
                    Linear::new(vb.pp("k_proj"), w, w, true)?,
                    Linear::new(vb.pp("v_proj"), w, w, true)?,
                ),
                out: Linear::new(vb.pp("out_proj"), w, w, true)?,
                heads: cfg.heads,
            },
            Naming::OpenClip => Self {
                qkv: Qkv::Fused(Linear {
                    weight: vb.get((3 * w, w), "in_proj_weight")?,
                    bias: Some(vb.get(3 * w, "in_proj_bias")?),
                }),
                out: Linear::new(vb.pp("out_proj"), w, w, true)?,
                heads: cfg.heads,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, w) = x.dims3()?;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate(q, k, v) => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(p) => {
                // (b, s, 3w): rows 0..w = q, w..2w = k, 2w..3w = v
                let y = p.forward(x)?;
                (
                    y.narrow(2, 0, w)?,
                    y.narrow(2, w, w)?,
                    y.narrow(2, 2 * w, w)?,
                )
            }
        };
        let hd = w / self.heads;
        // (b, s, w) -> (b, heads, s, hd)
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let o = ops::attention(
            &split(q)?,
            &split(k)?,
            &split(v)?,
            (hd as f64).powf(-0.5),
            true,
        )?;
        // (b, heads, s, hd) -> (b, s, w)
        let o = o.transpose(1, 2)?.reshape((b, s, w))?;
        self.out.forward(&o)
    }
}

/// One pre-LN transformer block.
#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let (w, eps) = (cfg.width, cfg.layer_norm_eps);
        let (ln1, attn, ln2, fc1, fc2) = match cfg.naming {
            Naming::HfClip => (
                LayerNorm::new(vb.pp("layer_norm1"), w, eps)?,
                SelfAttention::new(vb.pp("self_attn"), cfg)?,
                LayerNorm::new(vb.pp("layer_norm2"), w, eps)?,
                Linear::new(vb.pp("mlp.fc1"), w, cfg.intermediate, true)?,
                Linear::new(vb.pp("mlp.fc2"), cfg.intermediate, w, true)?,
            ),
            Naming::OpenClip => (
                LayerNorm::new(vb.pp("ln_1"), w, eps)?,
                SelfAttention::new(vb.pp("attn"), cfg)?,
                LayerNorm::new(vb.pp("ln_2"), w, eps)?,
                Linear::new(vb.pp("mlp.c_fc"), w, cfg.intermediate, true)?,
                Linear::new(vb.pp("mlp.c_proj"), cfg.intermediate, w, true)?,
            ),
        };
        Ok(Self {
            ln1,
            attn,
            ln2,
            fc1,
            fc2,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.activation {
            Activation::QuickGelu => ops::quick_gelu(&h)?,
            Activation::GeluErf => ops::gelu_erf(&h)?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// Outputs SDXL takes from a text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// Hidden state after all but the last block, no final LN: `(b, s, width)`.
    pub penultimate: Tensor,
    /// `final_ln(last block)[eos] @ text_projection`: `(b, proj)`, when the
    /// model has a projection.
    pub pooled: Option<Tensor>,
}

/// A CLIP text transformer (either naming).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    projection: Option<Tensor>,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// Load from `vb` positioned at the encoder's prefix ([`CLIP_L_MODEL_PREFIX`]
    /// or [`BIGG_MODEL_PREFIX`] in an SDXL file).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.check()?;
        let (w, eps) = (cfg.width, cfg.layer_norm_eps);
        let (token_embedding, position_embedding, blocks_vb, final_ln, projection) =
            match cfg.naming {
                Naming::HfClip => (
                    vb.get((cfg.vocab_size, w), "embeddings.token_embedding.weight")?,
                    vb.get(
                        (cfg.max_positions, w),
                        "embeddings.position_embedding.weight",
                    )?,
                    vb.pp("encoder.layers"),
                    LayerNorm::new(vb.pp("final_layer_norm"), w, eps)?,
                    None,
                ),
                Naming::OpenClip => (
                    vb.get((cfg.vocab_size, w), "token_embedding.weight")?,
                    vb.get((cfg.max_positions, w), "positional_embedding")?,
                    vb.pp("transformer.resblocks"),
                    LayerNorm::new(vb.pp("ln_final"), w, eps)?,
                    match cfg.projection_dim {
                        Some(p) => Some(vb.get((w, p), "text_projection")?),
                        None => None,
                    },
                ),
            };
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(blocks_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            blocks,
            final_ln,
            projection,
            cfg: cfg.clone(),
        })
    }

    /// The configuration this model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Token + position embeddings of `ids (b, s)` → `(b, s, width)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if s > self.cfg.max_positions {
            return Err(Error::model(format!(
                "clip: {s} tokens per row, the model has {} positions",
                self.cfg.max_positions
            )));
        }
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let tok = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, s, self.cfg.width))?;
        // positions are always 0..s (checkpoint position_ids ignored)
        let pos = self.position_embedding.narrow(0, 0, s)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// Run the encoder on token ids `(b, s)` (u32 or i64).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let mut x = self.embed(ids)?;
        let n = self.blocks.len();
        for block in &self.blocks[..n - 1] {
            x = block.forward(&x)?;
        }
        let penultimate = x.clone();
        let pooled = match &self.projection {
            None => None,
            Some(p) => {
                let last = self.blocks[n - 1].forward(&x)?;
                let o = self.final_ln.forward(&last)?;
                Some(pool_at_eos(&o, ids)?.matmul(p)?)
            }
        };
        Ok(ClipTextOutput {
            penultimate,
            pooled,
        })
    }
}

/// `o[i, argmax(ids[i])]` for `o (b, s, d)` → `(b, d)` (first maximum, as
/// torch's argmax on CPU and the EOS convention of §3.1).
fn pool_at_eos(o: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, s, d) = o.dims3()?;
    let rows = ids
        .to_dtype(DType::I64)?
        .to_device(&Device::Cpu)?
        .to_vec2::<i64>()?;
    let mut index = Vec::with_capacity(b);
    for (i, row) in rows.iter().enumerate() {
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        index.push((i * s + best) as u32);
    }
    let index = Tensor::from_vec(index, b, o.device())?;
    Ok(o.reshape((b * s, d))?.index_select(&index, 0)?)
}

/// SDXL conditioning from text.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// `cat(CLIP-L, bigG)` penultimate states: `(b, 77·chunks, 768+1280)`.
    pub context: Tensor,
    /// bigG pooled vector of the first chunk: `(b, 1280)`.
    pub pooled: Tensor,
}

impl TextConditioning {
    /// Zero tensors of the same shapes: sgm's `force_uc_zero_embeddings`
    /// unconditional input (§3.3).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.zeros_like()?,
        })
    }

    /// Number of 77-token chunks in `context`.
    pub fn chunks(&self) -> Result<usize> {
        Ok(self.context.dim(1)? / CONTEXT_LEN)
    }
}

/// How emphasis weights act on the encoder output (A1111 option "Emphasis
/// mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Emphasis {
    /// Multiply each token's output by its weight, then restore the mean
    /// (A1111 default, [`emphasis_original`]).
    #[default]
    Original,
    /// Multiply by the weights without restoring the mean (A1111 "No norm").
    NoNorm,
    /// Parse the syntax but ignore the weights (A1111 "Ignore").
    Ignore,
    /// Do not parse: brackets and `BREAK` are plain text (A1111 "None").
    None,
}

/// Both SDXL text encoders and the tokenizer: prompt strings in, SDXL
/// `context` and pooled vector out, with A1111 long-prompt chunking and
/// "Original" emphasis (see [`super::prompt`]).
#[derive(Debug, Clone)]
pub struct SdxlTextEncoder {
    /// Text encoder 1.
    pub clip_l: ClipTextModel,
    /// Text encoder 2.
    pub clip_g: ClipTextModel,
    /// Emphasis mode (default [`Emphasis::Original`]).
    pub emphasis: Emphasis,
    tokenizer: ClipTokenizer,
}

impl SdxlTextEncoder {
    /// Load both encoders from `vb` at the checkpoint root (the prefixes
    /// [`CLIP_L_MODEL_PREFIX`] and [`BIGG_MODEL_PREFIX`] are applied here).
    pub fn new(vb: VarBuilder, cfg_l: &ClipTextConfig, cfg_g: &ClipTextConfig) -> Result<Self> {
        if cfg_g.projection_dim.is_none() {
            return Err(Error::config(
                "sdxl text encoder: the bigG config needs a projection_dim (the pooled vector)",
            ));
        }
        Ok(Self {
            clip_l: ClipTextModel::new(vb.pp(CLIP_L_MODEL_PREFIX), cfg_l)?,
            clip_g: ClipTextModel::new(vb.pp(BIGG_MODEL_PREFIX), cfg_g)?,
            emphasis: Emphasis::default(),
            tokenizer: ClipTokenizer::new()?,
        })
    }

    /// The tokenizer both encoders share.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Parse and chunk `prompts` (A1111 rules); every prompt is padded with
    /// empty chunks to `min_chunks` and to the longest prompt's count.
    pub fn tokenize(&self, prompts: &[&str], min_chunks: usize) -> Result<Vec<TokenizedPrompt>> {
        let mut out = prompts
            .iter()
            .map(|p| {
                prompt::tokenize_prompt_with(&self.tokenizer, p, self.emphasis != Emphasis::None)
            })
            .collect::<Result<Vec<_>>>()?;
        prompt::pad_to_same_chunks(&mut out, min_chunks);
        Ok(out)
    }

    /// Encode a batch of prompts → `context (b, 77·k, dl+dg)`, `pooled (b, p)`.
    pub fn encode(&self, prompts: &[&str]) -> Result<TextConditioning> {
        let toks = self.tokenize(prompts, 1)?;
        self.encode_tokenized(&toks)
    }

    /// Encode a positive and a negative prompt batch, each at its own chunk
    /// count: A1111 (without its off-by-default "Pad conds" option) runs
    /// cond and uncond of different lengths in separate UNet calls, so a
    /// long negative does not add empty chunks to the prompt, nor the other
    /// way round. [`crate::pipeline::Bound`] joins the two exactly.
    pub fn encode_pair(
        &self,
        cond: &[&str],
        uncond: &[&str],
    ) -> Result<(TextConditioning, TextConditioning)> {
        Ok((self.encode(cond)?, self.encode(uncond)?))
    }

    /// Encode already chunked prompts (all with the same chunk count).
    pub fn encode_tokenized(&self, toks: &[TokenizedPrompt]) -> Result<TextConditioning> {
        let b = toks.len();
        let k = toks.first().map(|t| t.chunks.len()).unwrap_or(0);
        if b == 0 || k == 0 || toks.iter().any(|t| t.chunks.len() != k) {
            return Err(Error::config(
                "sdxl text encoder: need at least one prompt, all with the same number of chunks",
            ));
        }
        let dev = self.clip_l.token_embedding.device().clone();
        // All chunks of all prompts go through the encoders as one batch,
        // chunk-major: row c·b + i is chunk c of prompt i. Each row is
        // encoded on its own (causal mask, no cross-row mixing), exactly as
        // A1111 encodes chunk by chunk.
        let n = k * b;
        let ids = |pad: Padding| -> Result<Tensor> {
            let rows: Vec<u32> = (0..k)
                .flat_map(|c| toks.iter().flat_map(move |t| t.chunks[c].ids(pad)))
                .collect();
            Ok(Tensor::from_vec(rows, (n, CONTEXT_LEN), &dev)?)
        };
        let mults: Vec<f32> = (0..k)
            .flat_map(|c| {
                toks.iter()
                    .flat_map(move |t| t.chunks[c].multipliers.iter().map(|&m| m as f32))
            })
            .collect();
        let weighted = mults.iter().any(|&m| m != 1.0);
        let mults = Tensor::from_vec(mults, (n, CONTEXT_LEN, 1), &dev)?;
        let l = self.clip_l.forward(&ids(Padding::Eos)?)?;
        let g = self.clip_g.forward(&ids(Padding::Zero)?)?;
        // (n, 77, dl), (n, 77, dg)
        let (zl, zg) = match self.emphasis {
            Emphasis::Original if weighted => (
                emphasis_original(&l.penultimate, &mults)?,
                emphasis_original(&g.penultimate, &mults)?,
            ),
            Emphasis::NoNorm if weighted => (
                l.penultimate
                    .broadcast_mul(&mults.to_dtype(l.penultimate.dtype())?)?,
                g.penultimate
                    .broadcast_mul(&mults.to_dtype(g.penultimate.dtype())?)?,
            ),
            _ => (l.penultimate, g.penultimate),
        };
        // (n, 77, dl + dg), CLIP-L first
        let z = Tensor::cat(&[&zl, &zg.to_dtype(zl.dtype())?], D::Minus1)?;
        let d = z.dim(2)?;
        // (k, b, 77, d) -> (b, k, 77, d) -> (b, 77·k, d)
        let context = z
            .reshape((k, b, CONTEXT_LEN, d))?
            .transpose(0, 1)?
            .reshape((b, k * CONTEXT_LEN, d))?;
        // pooled from each prompt's first chunk: rows 0..b, (b, p)
        let pooled = g
            .pooled
            .ok_or_else(|| Error::model("sdxl text encoder: bigG gave no pooled output"))?
            .narrow(0, 0, b)?;
        Ok(TextConditioning { context, pooled })
    }
}

/// A1111 "Original" emphasis on one chunk: `z · w`, then rescaled so each
/// sample's mean equals its unweighted mean. `z (b, 77, d)`, `w (b, 77, 1)`.
/// (A1111 takes the mean over the whole batch; per sample keeps a prompt's
/// encoding independent of what else is in the batch — identical for b = 1.)
pub fn emphasis_original(z: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dtype = z.dtype();
    let zf = z.to_dtype(DType::F32)?;
    let b = zf.dim(0)?;
    let mean = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.reshape((b, ()))?.mean_keepdim(1)?.reshape((b, 1, 1))
    };
    let before = mean(&zf)?;
    let weighted = zf.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let after = mean(&weighted)?;
    Ok(weighted
        .broadcast_mul(&(before / after)?)?
        .to_dtype(dtype)?)
}

#[cfg(test)]
#[path = "clip_tests.rs"]
mod tests;
