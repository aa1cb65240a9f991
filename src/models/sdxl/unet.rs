//! The SDXL UNet (sgm `UNetModel`) with LDM key names, per-sample timesteps
//! and `label_emb` micro-conditioning.
//!
//! Follows reference/sdxl.md §1.2–§1.5 and §4 (sgm
//! `sgm/modules/diffusionmodules/openaimodel.py`, `sgm/modules/attention.py`,
//! `util.timestep_embedding`, `encoders/modules.ConcatTimestepEmbedderND`).
//! Built with a `VarBuilder` rooted at the UNet prefix
//! ([`super::UNET_PREFIX`], `model.diffusion_model`), so every parameter is
//! requested under its checkpoint name (`input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight`…).
//! All layers come from [`crate::nn`] and are differentiable (no candle fast
//! paths that detach gradients, reference §8.3).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{MiddleBlock, UNetConfig, SIZE_COND_COUNT, SIZE_EMBED_DIM};
use crate::nn::{ops, profile, Conv2d, GroupNorm, LayerNorm, Linear};

/// GroupNorm eps of ResBlocks and the output norm (sgm `GroupNorm32`).
const RES_NORM_EPS: f64 = 1e-5;
/// GroupNorm eps of SpatialTransformer (sgm `Normalize`).
const ST_NORM_EPS: f64 = 1e-6;
/// LayerNorm eps inside transformer blocks.
const LN_EPS: f64 = 1e-5;

/// Sinusoidal embedding of per-sample scalars, sgm `timestep_embedding`:
/// `freq_i = exp(-ln(max_period)·i/half)`, output `[cos(t·f), sin(t·f)]`
/// (cos first), always computed in f32. `t (b,)` → `(b, dim)` f32.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?; // (b,)
    let half = dim / 2;
    // f32 arithmetic as torch does it: exp(-ln(P) * i / half).
    let scale = -(max_period.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (scale * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?; // (1, half)
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?; // (b, half)
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?; // (b, 2·half)
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// SDXL size / crop micro-conditioning of one sample, in pixels
/// (height before width everywhere, reference §4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizeCond {
    /// Original image size `(height, width)` before resizing.
    pub original: (f32, f32),
    /// Crop offset `(top, left)` in the resized image.
    pub crop_top_left: (f32, f32),
    /// Target (bucket) size `(height, width)`.
    pub target: (f32, f32),
}

impl SizeCond {
    /// The usual inference conditioning: original = target = `(h, w)`, no crop.
    pub fn inference(height: f32, width: f32) -> Self {
        Self {
            original: (height, width),
            crop_top_left: (0.0, 0.0),
            target: (height, width),
        }
    }

    /// The six scalars in sgm embedder order: orig h, w, crop top, left, target h, w.
    pub fn to_array(&self) -> [f32; SIZE_COND_COUNT] {
        [
            self.original.0,
            self.original.1,
            self.crop_top_left.0,
            self.crop_top_left.1,
            self.target.0,
            self.target.1,
        ]
    }
}

/// Build the vector conditioning `y (b, pooled + 6·256)` from the pooled text
/// embedding `(b, pooled)` and one [`SizeCond`] per sample: each of the six
/// scalars is embedded with [`timestep_embedding`] (dim 256, period 10000)
/// and the results are concatenated after the pooled vector (sgm
/// `GeneralConditioner` with `ConcatTimestepEmbedderND`, reference §4).
pub fn build_y(pooled: &Tensor, sizes: &[SizeCond]) -> Result<Tensor> {
    let (b, _) = pooled.dims2()?;
    if sizes.len() != b {
        candle_core::bail!(
            "build_y: {} size conditionings for a batch of {b} pooled embeddings",
            sizes.len()
        );
    }
    let flat: Vec<f32> = sizes.iter().flat_map(|s| s.to_array()).collect();
    let scalars = Tensor::from_vec(flat, b * SIZE_COND_COUNT, pooled.device())?; // (b·6,)
    let emb = timestep_embedding(&scalars, SIZE_EMBED_DIM, 10000.0)? // (b·6, 256)
        .reshape((b, SIZE_COND_COUNT * SIZE_EMBED_DIM))? // (b, 1536)
        .to_dtype(pooled.dtype())?;
    Tensor::cat(&[pooled, &emb], 1) // (b, pooled + 1536)
}

/// sgm `ResBlock` (no scale-shift norm): `skip(x) + conv(SiLU(GN(h + emb)))`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    norm_in: GroupNorm,
    conv_in: Conv2d,
    emb_proj: Linear,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    /// Keys `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`.
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        emb_dim: usize,
        groups: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm_in: GroupNorm::new(vb.pp("in_layers.0"), groups, in_ch, RES_NORM_EPS)?,
            conv_in: Conv2d::new(vb.pp("in_layers.2"), in_ch, out_ch, 3, 1, 1)?,
            emb_proj: Linear::new(vb.pp("emb_layers.1"), emb_dim, out_ch, true)?,
            norm_out: GroupNorm::new(vb.pp("out_layers.0"), groups, out_ch, RES_NORM_EPS)?,
            conv_out: Conv2d::new(vb.pp("out_layers.3"), out_ch, out_ch, 3, 1, 1)?,
            skip: if in_ch != out_ch {
                Some(Conv2d::new(
                    vb.pp("skip_connection"),
                    in_ch,
                    out_ch,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    /// `x (b, cin, h, w)`, `emb_act = SiLU(emb) (b, emb_dim)` → `(b, cout, h, w)`.
    pub fn forward(&self, x: &Tensor, emb_act: &Tensor) -> Result<Tensor> {
        profile::scope("unet resblock", x, || {
            let h = self.conv_in.forward(&self.norm_in.forward_silu(x)?)?; // (b, cout, h, w)
            let e = self.emb_proj.forward(emb_act)?.to_dtype(h.dtype())?; // (b, cout)
            let h = crate::nn::bias::add_channels(&h, &e)?; // + e[n, c] over (h, w)
            let h = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
            match &self.skip {
                Some(s) => s.forward(x)? + h,
                None => x + h,
            }
        })
    }
}

/// sgm `CrossAttention`: bias-free q/k/v, `to_out.0` with bias, plain softmax.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    /// `dim` query width, `ctx_dim` key/value input width.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), ctx_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), ctx_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `x (b, s, dim)`, `ctx (b, sk, ctx_dim)` (self-attention when `None`) → `(b, s, dim)`.
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> Result<Tensor> {
        let name = match ctx {
            None => "unet self-attention",
            Some(_) => "unet cross-attention",
        };
        profile::scope(name, x, || {
            let ctx = ctx.unwrap_or(x);
            let q = self.to_q.forward(x)?; // (b, s, heads·head_dim)
            let k = self.to_k.forward(ctx)?;
            let v = self.to_v.forward(ctx)?;
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let o = ops::attention_packed(&q, &k, &v, self.heads, scale, false)?; // (b, s, inner)
            self.to_out.forward(&o)
        })
    }
}

/// GEGLU feed-forward: `net.2(value · GELU_erf(gate))` with `[value, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// Keys `net.0.proj` (`[8·dim, dim]`) and `net.2` (`[dim, 4·dim]`).
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// The GEGLU of `net.0.proj` as two products, one per half of its rows
    /// (the GPU form): the GELU and the product then run on contiguous
    /// tensors, where on the halves of one product (strided views)
    /// candle's elementwise kernels take their slow indexed path. The same
    /// arithmetic as `ops::geglu(proj(x))`.
    fn gated_split(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.proj.weight.dim(0)? / 2;
        let half = |start: usize| -> Result<Tensor> {
            let b = match &self.proj.bias {
                Some(b) => Some(b.narrow(0, start, n)?),
                None => None,
            };
            ops::linear(x, &self.proj.weight.narrow(0, start, n)?, b.as_ref())
        };
        let (value, gate) = (half(0)?, half(n)?);
        profile::scope("op geglu", &gate, || value * ops::gelu_erf(&gate)?)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::scope("unet feed-forward", x, || {
            if x.device().is_cpu() {
                let h = self.proj.forward(x)?; // (b, s, 2·inner) = [value, gate]
                return self.out.forward(&ops::geglu(&h)?);
            }
            self.out.forward(&self.gated_split(x)?)
        })
    }
}

/// sgm `BasicTransformerBlock`: pre-norm self-attention, cross-attention, GEGLU.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Keys `norm1..3`, `attn1`, `attn2`, `ff`.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, LN_EPS)?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, LN_EPS)?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, ctx_dim, heads, head_dim)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, LN_EPS)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// `x (b, s, dim)`, `ctx (b, sk, ctx_dim)` → `(b, s, dim)`.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(ctx))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// `proj_in` / `proj_out` of a SpatialTransformer: a Linear `[c, c]`
/// (`use_linear=True`, SDXL) or a 1×1 convolution `[c, c, 1, 1]` (sgm
/// `use_linear=False`), loaded as its `[c, c]` matrix. A 1×1 convolution on
/// `(b, c, h, w)` is the same map as the Linear on the `(b, h·w, c)` tokens,
/// so both run as a Linear after the reshape (gradients reach the 4-D weight
/// through the squeeze).
fn proj(vb: VarBuilder, ch: usize, linear: bool) -> Result<Linear> {
    if linear {
        return Linear::new(vb, ch, ch, true);
    }
    Ok(Linear {
        weight: vb.get((ch, ch, 1, 1), "weight")?.squeeze(3)?.squeeze(2)?,
        bias: Some(vb.get(ch, "bias")?),
    })
}

/// sgm `SpatialTransformer`: GroupNorm, `proj_in`, transformer blocks,
/// `proj_out`, residual. `proj_in`/`proj_out` are Linear or 1×1 conv
/// ([`UNetConfig::use_linear_in_transformer`]); the two are the same map.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    /// Keys `norm`, `proj_in`, `transformer_blocks.{0..depth}`, `proj_out`
    /// (`linear`: Linear projections, else 1×1 convolutions).
    pub fn new(
        vb: VarBuilder,
        ch: usize,
        depth: usize,
        ctx_dim: usize,
        head_dim: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Self> {
        let heads = ch / head_dim;
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    ch,
                    ctx_dim,
                    heads,
                    head_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, ch, ST_NORM_EPS)?,
            proj_in: proj(vb.pp("proj_in"), ch, linear)?,
            blocks,
            proj_out: proj(vb.pp("proj_out"), ch, linear)?,
        })
    }

    /// `x (b, c, h, w)`, `ctx (b, sk, ctx_dim)` → `(b, c, h, w)`.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        profile::scope("unet spatial transformer", x, || {
            let (b, c, h, w) = x.dims4()?;
            let t = self.norm.forward(x)?;
            let t = t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?; // (b, hw, c)
            let mut t = self.proj_in.forward(&t)?;
            for block in &self.blocks {
                t = block.forward(&t, ctx)?;
            }
            let t = self.proj_out.forward(&t)?; // (b, hw, c)
            let t = t.transpose(1, 2)?.reshape((b, c, h, w))?;
            t + x
        })
    }
}

pub(crate) mod recompute;

/// One layer inside an `input_blocks.N` / `middle_block` / `output_blocks.N` sequence.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    /// Conv 3×3 stride 2 pad 1 (key `op`).
    Down(Conv2d),
    /// Nearest ×2 then conv 3×3 (key `conv`).
    Up(Conv2d),
}

/// A `TimestepEmbedSequential`: layers applied in order.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(&self, x: &Tensor, emb_act: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(c) => c.forward(&h)?,
                Layer::Down(c) => profile::scope("unet downsample", &h, || c.forward(&h))?,
                Layer::Res(r) => r.forward(&h, emb_act)?,
                Layer::Attn(a) => a.forward(&h, ctx)?,
                Layer::Up(c) => profile::scope("unet upsample", &h, || {
                    c.forward(&ops::upsample_nearest2x(&h)?)
                })?,
            };
        }
        Ok(h)
    }
}

/// The SDXL UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    time_embed_0: Linear,
    time_embed_2: Linear,
    label_emb_0: Linear,
    label_emb_2: Linear,
    input_blocks: Vec<Block>,
    /// `None` when the config has no middle block (KOALA-700M style).
    middle_block: Option<Block>,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    cfg: UNetConfig,
}

impl UNet {
    /// Build from `vb` rooted at the UNet prefix (`model.diffusion_model`).
    /// Module order and indices follow sgm `UNetModel.__init__`, with the
    /// per-block transformer depths and middle-block variants of
    /// [`UNetConfig`] (ComfyUI's `UNetModel` reads the same per-block lists).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> crate::Result<Self> {
        cfg.validate()?;
        Ok(Self::build(vb, cfg)?)
    }

    fn build(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let mc = cfg.model_channels;
        let ted = cfg.time_embed_dim();
        let g = cfg.num_groups;
        let hd = cfg.num_head_channels;
        let levels = cfg.channel_mult.len();
        let st = |vb: VarBuilder, ch: usize, depth: usize| {
            SpatialTransformer::new(
                vb,
                ch,
                depth,
                cfg.context_dim,
                hd,
                g,
                cfg.use_linear_in_transformer,
            )
        };

        let vbi = vb.pp("input_blocks");
        let mut input_blocks = vec![Block(vec![Layer::Conv(Conv2d::new(
            vbi.pp("0.0"),
            cfg.in_channels,
            mc,
            3,
            1,
            1,
        )?)])];
        let mut chans = vec![mc];
        let mut ch = mc;
        for level in 0..levels {
            for i in 0..cfg.num_res_blocks[level] {
                let vbb = vbi.pp(input_blocks.len());
                let out = cfg.level_width(level);
                let mut layers = vec![Layer::Res(ResBlock::new(vbb.pp("0"), ch, out, ted, g)?)];
                ch = out;
                let depth = cfg.input_depth(level, i);
                if depth > 0 {
                    layers.push(Layer::Attn(st(vbb.pp("1"), ch, depth)?));
                }
                input_blocks.push(Block(layers));
                chans.push(ch);
            }
            if level + 1 != levels {
                let vbb = vbi.pp(input_blocks.len());
                let down = Conv2d::new(vbb.pp("0.op"), ch, ch, 3, 2, 1)?;
                input_blocks.push(Block(vec![Layer::Down(down)]));
                chans.push(ch);
            }
        }

        let vbm = vb.pp("middle_block");
        let res = |i: usize| -> Result<Layer> {
            Ok(Layer::Res(ResBlock::new(vbm.pp(i), ch, ch, ted, g)?))
        };
        let middle_block = match cfg.middle {
            MiddleBlock::Transformer { depth } => Some(Block(vec![
                res(0)?,
                Layer::Attn(st(vbm.pp("1"), ch, depth)?),
                res(2)?,
            ])),
            // sgm `disable_middle_transformer`: index 1 is an Identity.
            MiddleBlock::NoTransformer => Some(Block(vec![res(0)?, res(2)?])),
            MiddleBlock::ResBlockOnly => Some(Block(vec![res(0)?])),
            MiddleBlock::Absent => None,
        };

        let vbo = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for level in (0..levels).rev() {
            let nrb = cfg.num_res_blocks[level];
            for i in 0..=nrb {
                let vbb = vbo.pp(output_blocks.len());
                let skip_ch = chans.pop().ok_or_else(|| {
                    candle_core::Error::Msg("unet config: skip channel stack underflow".into())
                })?;
                let out = cfg.level_width(level);
                let mut layers = vec![Layer::Res(ResBlock::new(
                    vbb.pp("0"),
                    ch + skip_ch,
                    out,
                    ted,
                    g,
                )?)];
                ch = out;
                let depth = cfg.output_depth(level, i);
                if depth > 0 {
                    layers.push(Layer::Attn(st(vbb.pp(layers.len()), ch, depth)?));
                }
                if level > 0 && i == nrb {
                    let up =
                        Conv2d::new(vbb.pp(format!("{}.conv", layers.len())), ch, ch, 3, 1, 1)?;
                    layers.push(Layer::Up(up));
                }
                output_blocks.push(Block(layers));
            }
        }

        Ok(Self {
            time_embed_0: Linear::new(vb.pp("time_embed.0"), mc, ted, true)?,
            time_embed_2: Linear::new(vb.pp("time_embed.2"), ted, ted, true)?,
            label_emb_0: Linear::new(vb.pp("label_emb.0.0"), cfg.adm_in_channels(), ted, true)?,
            label_emb_2: Linear::new(vb.pp("label_emb.0.2"), ted, ted, true)?,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: GroupNorm::new(vb.pp("out.0"), g, ch, RES_NORM_EPS)?,
            out_conv: Conv2d::new(vb.pp("out.2"), ch, cfg.out_channels, 3, 1, 1)?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration this UNet was built with.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// dtype of the weights (inputs are cast to it; the timestep sinusoid is f32).
    pub fn dtype(&self) -> DType {
        self.out_conv.weight.dtype()
    }

    /// The shape checks of [`UNet::forward`].
    fn check_inputs(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: &Tensor,
    ) -> Result<()> {
        let (b, c, h, w) = x.dims4()?;
        let cfg = &self.cfg;
        let div = 1usize << (cfg.channel_mult.len() - 1);
        if c != cfg.in_channels || h % div != 0 || w % div != 0 {
            candle_core::bail!(
                "unet: latent {:?} must have {} channels and sides divisible by {div}",
                x.dims(),
                cfg.in_channels
            );
        }
        if timesteps.elem_count() != b {
            candle_core::bail!(
                "unet: {} timesteps for a batch of {b}",
                timesteps.elem_count()
            );
        }
        let (cb, _, cd) = context.dims3()?;
        if cb != b || cd != cfg.context_dim {
            candle_core::bail!(
                "unet: context {:?} must be (batch {b}, tokens, {})",
                context.dims(),
                cfg.context_dim
            );
        }
        if y.dims() != [b, cfg.adm_in_channels()] {
            candle_core::bail!(
                "unet: y {:?} must be ({b}, {}) (pooled + 6×256 size embeddings)",
                y.dims(),
                cfg.adm_in_channels()
            );
        }
        Ok(())
    }

    /// `SiLU(time_embed(t) + label_emb(y))`, `(b, ted)`: the SiLU that
    /// `emb_layers.0` of every ResBlock would apply, applied once.
    fn embedding(&self, timesteps: &Tensor, y: &Tensor) -> Result<Tensor> {
        let dtype = self.dtype();
        let t_emb =
            timestep_embedding(timesteps, self.cfg.model_channels, 10000.0)?.to_dtype(dtype)?; // (b, mc)
        let emb = self
            .time_embed_2
            .forward(&self.time_embed_0.forward(&t_emb)?.silu()?)?; // (b, ted)
        let label = self
            .label_emb_2
            .forward(&self.label_emb_0.forward(&y.to_dtype(dtype)?)?.silu()?)?;
        (emb + label)?.silu()
    }

    /// Predict the model output (eps or v, depending on the checkpoint).
    ///
    /// `x (b, 4, h, w)` latents (h, w divisible by 2^(levels−1)), `timesteps (b,)`
    /// per-sample (fractional allowed), `context (b, s, context_dim)`,
    /// `y (b, adm_in_channels)` from [`build_y`] → `(b, 4, h, w)` in the weight dtype.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: &Tensor,
    ) -> Result<Tensor> {
        self.check_inputs(x, timesteps, context, y)?;
        let dtype = self.dtype();
        let emb_act = self.embedding(timesteps, y)?;
        let ctx = context.to_dtype(dtype)?;

        let mut h = x.to_dtype(dtype)?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        for block in &self.input_blocks {
            h = block.forward(&h, &emb_act, &ctx)?;
            skips.push(h.clone());
        }
        if let Some(middle) = &self.middle_block {
            h = middle.forward(&h, &emb_act, &ctx)?;
        }
        for block in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("unet: skip stack underflow".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?; // [current, skip] on channels
            h = block.forward(&h, &emb_act, &ctx)?;
        }
        self.out_conv.forward(&self.out_norm.forward_silu(&h)?) // (b, 4, h, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The reference values are exact (f64); sgm computes in f32, where one
    /// ulp of an argument near 1000 is ~6e-5.
    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 2e-4
    }

    /// Values computed in reference/sdxl.md §1.4 and §4 (pure-Python sgm formula).
    #[test]
    fn timestep_embedding_matches_reference_values() -> Result<()> {
        let t = Tensor::new(&[999f32, 1024.0], &Device::Cpu)?;
        let e = timestep_embedding(&t.narrow(0, 0, 1)?, 320, 10000.0)?.to_vec2::<f32>()?;
        let want: [f64; 3] = [0.99964985, 0.80268102, -0.27811401];
        for (i, w) in want.iter().enumerate() {
            assert!(close(e[0][i], *w), "{i}: {} vs {w}", e[0][i]);
        }
        let want: [f64; 3] = [-0.02646075, 0.59640857, -0.96054807];
        for (i, w) in want.iter().enumerate() {
            assert!(
                close(e[0][160 + i], *w),
                "{}: {} vs {w}",
                160 + i,
                e[0][160 + i]
            );
        }
        let e = timestep_embedding(&t.narrow(0, 1, 1)?, 256, 10000.0)?.to_vec2::<f32>()?;
        let want: [f64; 3] = [0.98735362, -0.53761032, 0.68343484];
        for (i, w) in want.iter().enumerate() {
            assert!(close(e[0][i], *w), "{i}: {} vs {w}", e[0][i]);
        }
        let want: [f64; 3] = [-0.15853338, -0.84319342, 0.73001152];
        for (i, w) in want.iter().enumerate() {
            assert!(
                close(e[0][128 + i], *w),
                "{}: {} vs {w}",
                128 + i,
                e[0][128 + i]
            );
        }
        Ok(())
    }

    /// The GPU form of the feed-forward (two half products) is the CPU
    /// form's arithmetic, gradients included.
    #[test]
    fn feed_forward_split_matches_the_fused_geglu() -> Result<()> {
        use crate::nn::kernels::test_util::rand;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let ff = FeedForward::new(vb, 8)?;
        let x = candle_core::Var::from_tensor(&rand(&[2, 5, 8], 3, DType::F32)?)?;
        let whole = ff.forward(x.as_tensor())?;
        let split = ff.out.forward(&ff.gated_split(x.as_tensor())?)?;
        let d = (&whole - &split)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let g1 = whole.sqr()?.sum_all()?.backward()?;
        let g2 = split.sqr()?.sum_all()?.backward()?;
        for t in [x.as_tensor(), &ff.proj.weight] {
            let (a, b) = (g1.get(t).unwrap(), g2.get(t).unwrap());
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{d}");
        }
        Ok(())
    }

    #[test]
    fn build_y_orders_pooled_then_six_sizes() -> Result<()> {
        let pooled = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        let sizes = [
            SizeCond::inference(1024.0, 768.0),
            SizeCond {
                original: (500.0, 400.0),
                crop_top_left: (16.0, 0.0),
                target: (832.0, 1216.0),
            },
        ];
        let y = build_y(&pooled, &sizes)?;
        assert_eq!(y.dims(), &[2, 3 + 6 * 256]);
        // The crop-top block of sample 1 equals the embedding of 16.
        let got = y.get(1)?.narrow(0, 3 + 2 * 256, 256)?;
        let want = timestep_embedding(&Tensor::new(&[16f32], &Device::Cpu)?, 256, 1e4)?.get(0)?;
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-7, "{d}");
        assert!(build_y(&pooled, &sizes[..1]).is_err());
        Ok(())
    }
}
