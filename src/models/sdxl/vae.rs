//! The SDXL VAE (sgm / LDM `AutoencoderKL`: `Encoder`, `Decoder`,
//! `quant_conv`, `post_quant_conv`) with LDM key names.
//!
//! Follows reference/sdxl.md §1.9 and §5 (sgm
//! `sgm/modules/diffusionmodules/model.py`): GroupNorm eps 1e-6 everywhere,
//! asymmetric (0,1,0,1) zero padding before the stride-2 3×3 downsample conv,
//! nearest ×2 + conv upsample, single-head mid attention whose q/k/v/proj_out
//! weights may be stored as 1×1 convs `[c, c, 1, 1]` (original files) or
//! matrices `[c, c]` (some re-saved files). Built with a `VarBuilder` rooted at
//! `first_stage_model` (or at the root for standalone A1111 VAE files).
//!
//! Decoding never runs in f16 (the SDXL VAE overflows there, §5): the
//! checkpoint loader loads the VAE in f32, or in bf16 when the model runs in
//! bf16 (CUDA's default; bf16 has f32's range) — [`crate::nn::vae_dtype`];
//! `decode` returns f32.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use crate::nn::{ops, Conv2d, GroupNorm};

/// GroupNorm eps of every VAE norm.
const EPS: f64 = 1e-6;

/// LDM `ResnetBlock` without time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, EPS)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, EPS)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            nin_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("nin_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `(b, cin, h, w)` → `(b, cout, h, w)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Query rows per attention chunk in the mid block: at a 1024² image the
/// latent has 16384 positions, and one full score matrix would be 1 GiB
/// (f32); chunking the queries bounds it to 4096 × 16384 per step.
const ATTN_CHUNK: usize = 4096;

/// `softmax(q kᵀ · scale) v` computed `chunk` query rows at a time
/// (`q (b, 1, s, c)`, same result as one call; differentiable).
fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: usize,
) -> Result<Tensor> {
    let s = q.dim(2)?;
    if s <= chunk {
        return ops::attention(q, k, v, scale, false);
    }
    let mut outs = Vec::with_capacity(s.div_ceil(chunk));
    let mut start = 0;
    while start < s {
        let n = chunk.min(s - start);
        outs.push(ops::attention(&q.narrow(2, start, n)?, k, v, scale, false)?);
        start += n;
    }
    Tensor::cat(&outs, 2)
}

/// Load a 1×1 conv stored either as `[c, c, 1, 1]` or as a `[c, c]` matrix.
fn conv1x1_or_matrix(vb: VarBuilder, c: usize) -> Result<Conv2d> {
    let weight = match vb.get((c, c, 1, 1), "weight") {
        Ok(w) => w,
        Err(err4) => match vb.get((c, c), "weight") {
            Ok(w) => w.reshape((c, c, 1, 1))?,
            Err(_) => return Err(err4),
        },
    };
    Ok(Conv2d {
        weight,
        bias: Some(vb.get(c, "bias")?),
        stride: 1,
        padding: 0,
    })
}

/// LDM `AttnBlock`: single-head self-attention over the `h·w` positions.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, c, EPS)?,
            q: conv1x1_or_matrix(vb.pp("q"), c)?,
            k: conv1x1_or_matrix(vb.pp("k"), c)?,
            v: conv1x1_or_matrix(vb.pp("v"), c)?,
            proj_out: conv1x1_or_matrix(vb.pp("proj_out"), c)?,
        })
    }

    /// `(b, c, h, w)` → `(b, c, h, w)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let tokens = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, c, h * w))?.transpose(1, 2)?.unsqueeze(1) // (b, 1, hw, c)
        };
        let q = tokens(self.q.forward(&n)?)?;
        let k = tokens(self.k.forward(&n)?)?;
        let v = tokens(self.v.forward(&n)?)?;
        let o = chunked_attention(&q, &k, &v, 1.0 / (c as f64).sqrt(), ATTN_CHUNK)?; // (b, 1, hw, c)
        let o = o.squeeze(1)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&o)?
    }
}

/// Pad right and bottom by one zero row/column, then conv 3×3 stride 2 pad 0.
fn downsample(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?; // (b, c, h+1, w+1)
    conv.forward(&x) // (b, c, h/2, w/2)
}

/// One resolution level: ResnetBlocks then an optional resample conv.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

/// Mid block: `block_1`, `attn_1`, `block_2`.
#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), c, c, groups)?,
            attn_1: AttnBlock::new(vb.pp("attn_1"), c, groups)?,
            block_2: ResnetBlock::new(vb.pp("block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

/// LDM `Encoder` (double_z: outputs mean ‖ logvar).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.num_groups;
        let mut ch = cfg.ch;
        let mut down = Vec::new();
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let vbl = vb.pp(format!("down.{i}"));
            let out = cfg.ch * mult;
            let mut blocks = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(vbl.pp(format!("block.{j}")), ch, out, g)?);
                ch = out;
            }
            let resample = if i + 1 != cfg.ch_mult.len() {
                Some(Conv2d::new(vbl.pp("downsample.conv"), ch, ch, 3, 2, 0)?)
            } else {
                None
            };
            down.push(Level { blocks, resample });
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, cfg.ch, 3, 1, 1)?,
            down,
            mid: Mid::new(vb.pp("mid"), ch, g)?,
            norm_out: GroupNorm::new(vb.pp("norm_out"), g, ch, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch, 2 * cfg.z_channels, 3, 1, 1)?,
        })
    }

    /// `(b, 3, H, W)` → `(b, 2·z, H/f, W/f)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                h = downsample(conv, &h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// LDM `Decoder`; `up[i]` is level `i` (processed from the last level down).
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.num_groups;
        let levels = cfg.ch_mult.len();
        let mut ch = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.z_channels, ch, 3, 1, 1)?;
        let mid = Mid::new(vb.pp("mid"), ch, g)?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vbl = vb.pp(format!("up.{i}"));
            let out = cfg.ch * cfg.ch_mult[i];
            let mut blocks = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(vbl.pp(format!("block.{j}")), ch, out, g)?);
                ch = out;
            }
            let resample = if i != 0 {
                Some(Conv2d::new(vbl.pp("upsample.conv"), ch, ch, 3, 1, 1)?)
            } else {
                None
            };
            up.push(Level { blocks, resample });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: GroupNorm::new(vb.pp("norm_out"), g, ch, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch, cfg.in_channels, 3, 1, 1)?,
        })
    }

    /// `(b, z, h, w)` → `(b, 3, h·f, w·f)`.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in self.up.iter().rev() {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&ops::upsample_nearest2x(&h)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The SDXL VAE (`AutoencoderKL`).
#[derive(Debug, Clone)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    cfg: VaeConfig,
}

impl Vae {
    /// Build from `vb` rooted at `first_stage_model` (keys `encoder.*`,
    /// `decoder.*`, `quant_conv`, `post_quant_conv`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> crate::Result<Self> {
        cfg.validate()?;
        let z2 = 2 * cfg.z_channels;
        let e2 = 2 * cfg.embed_dim;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: Conv2d::new(vb.pp("quant_conv"), z2, e2, 1, 1, 0)?,
            post_quant_conv: Conv2d::new(
                vb.pp("post_quant_conv"),
                cfg.embed_dim,
                cfg.z_channels,
                1,
                1,
                0,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration this VAE was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.quant_conv.weight.dtype()
    }

    /// Latent distribution of images `x (b, 3, H, W)` in [−1, 1]: returns
    /// `(mean, logvar)`, each `(b, 4, H/8, W/8)`, logvar clamped to [−30, 20].
    pub fn encode_moments(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        let f = self.cfg.downsample_factor();
        if c != self.cfg.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "vae: image {:?} must have {} channels and sides divisible by {f}",
                x.dims(),
                self.cfg.in_channels
            );
        }
        let moments = self
            .quant_conv
            .forward(&self.encoder.forward(&x.to_dtype(self.dtype())?)?)?; // (b, 2·e, h/f, w/f)
        let e = self.cfg.embed_dim;
        let mean = moments.narrow(1, 0, e)?;
        let logvar = moments.narrow(1, e, e)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Mean of the latent distribution (unscaled), `(b, 4, H/8, W/8)`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(x)?.0)
    }

    /// A sample `mean + exp(logvar/2)·noise` with caller-provided `noise`
    /// `(b, 4, H/8, W/8)` (seeded by the caller; unscaled).
    pub fn encode_sample(&self, x: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (mean, logvar) = self.encode_moments(x)?;
        sample_moments(&mean, &logvar, noise)
    }

    /// Decode unscaled latents `z (b, 4, h, w)` to images `(b, 3, 8h, 8w)`
    /// (roughly in [−1, 1], not clamped), returned in f32.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.post_quant_conv.forward(&z.to_dtype(self.dtype())?)?;
        self.decoder.forward(&z)?.to_dtype(DType::F32)
    }

    /// Latent scale factor (0.13025 for SDXL): UNet latents = `encode(x)·scale`.
    pub fn scale_factor(&self) -> f64 {
        self.cfg.scale_factor
    }

    /// Images → UNet-scale latents (`mean · scale_factor`).
    pub fn encode_scaled(&self, x: &Tensor) -> Result<Tensor> {
        self.encode(x)? * self.cfg.scale_factor
    }

    /// UNet-scale latents → images (`decode(z / scale_factor)`), f32.
    pub fn decode_scaled(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(&(z / self.cfg.scale_factor)?)
    }
}

/// A sample `mean + exp(logvar/2)·noise` of the moments
/// [`Vae::encode_moments`] gave (unscaled).
pub fn sample_moments(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let std = (logvar * 0.5)?.exp()?;
    mean + std.mul(&noise.to_dtype(std.dtype())?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_one_call() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 1, 23, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 1, 23, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 1, 23, 8), &dev)?;
        let full = ops::attention(&q, &k, &v, 0.3, false)?;
        let chunked = chunked_attention(&q, &k, &v, 0.3, 5)?;
        let d = (full - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
