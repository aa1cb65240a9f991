//! Tensor operations behind the layers in [`crate::nn`].
//!
//! On CPU with f32/f64 tensors, linear, conv2d, group_norm (+SiLU),
//! layer_norm, GELU / GEGLU, softmax and attention dispatch to the fast custom ops with hand-written
//! backward passes in [`crate::nn::kernels`] (issue 5); half-precision CPU
//! tensors are computed in f32 by the same kernels (as the composites do);
//! every other device (CUDA) uses the composite reference implementations
//! in [`reference`](mod@reference), built from candle primitives that all have a backward
//! pass (so CUDA keeps cuBLAS/cuDNN). The kernels are tested against those
//! composites.
//!
//! Shapes use PyTorch conventions: images `(b, c, h, w)`, sequences
//! `(b, s, d)`, attention `(b, heads, s, head_dim)`.

use crate::nn::kernels;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static CPU_KERNELS: AtomicBool = AtomicBool::new(true);

/// Globally enable (default) or disable the fast CPU kernels; when disabled
/// every op runs its composite [`reference`](mod@reference) implementation. Meant for
/// benchmarks and A/B checks, not for switching mid-graph.
pub fn set_cpu_kernels(enabled: bool) {
    CPU_KERNELS.store(enabled, Ordering::Relaxed);
}

/// Whether the fast CPU kernels are enabled (see [`set_cpu_kernels`]).
pub fn cpu_kernels_enabled() -> bool {
    CPU_KERNELS.load(Ordering::Relaxed)
}

/// The dtype a kernel should run `t` in: `Some(t's dtype)` for f32/f64 on
/// CPU, `Some(F32)` for half types on CPU, `None` (use the reference) else.
fn kernel_dtype(t: &Tensor) -> Option<DType> {
    if !cpu_kernels_enabled() || !matches!(t.device(), Device::Cpu) {
        return None;
    }
    match t.dtype() {
        DType::F32 | DType::F64 => Some(t.dtype()),
        DType::F16 | DType::BF16 => Some(DType::F32),
        _ => None,
    }
}

/// Run `f` on `x` converted to `dt`, converting the result back to `x`'s dtype.
fn in_dtype(x: &Tensor, dt: DType, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.dtype() == dt {
        f(x)
    } else {
        f(&x.to_dtype(dt)?)?.to_dtype(x.dtype())
    }
}

/// `x @ wᵀ + b` for `x` of shape `(..., in)` and `w` of shape `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| kernels::linear::linear(x, w, b)),
        None => reference::linear(x, w, b),
    }
}

/// 2-D convolution with bias; `x (b, cin, h, w)`, `w [cout, cin, k, k]`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| kernels::conv::conv2d(x, w, b, stride, padding)),
        None => reference::conv2d(x, w, b, stride, padding),
    }
}

/// Group normalisation of `x (b, c, ...)` in f32, per-channel affine, then
/// optionally SiLU. Matches `torch.nn.GroupNorm` (biased variance).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| {
            kernels::group_norm::group_norm(x, groups, weight, bias, eps, silu)
        }),
        None => reference::group_norm(x, groups, weight, bias, eps, silu),
    }
}

/// Layer normalisation over the last dimension (biased variance), computed in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| {
            kernels::layer_norm::layer_norm(x, weight, bias, eps)
        }),
        None => reference::layer_norm(x, weight, bias, eps),
    }
}

/// Numerically stable softmax over the last dimension (differentiable).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::attention::softmax_last_dim),
        None => reference::softmax_last_dim(x),
    }
}

/// Scaled dot-product attention: `softmax(q kᵀ · scale [+ causal mask]) v`.
/// `q (b, h, sq, d)`, `k`/`v (b, h, sk, d)` → `(b, h, sq, d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    match kernel_dtype(q) {
        Some(dt) => in_dtype(q, dt, |q| {
            kernels::attention::attention(q, k, v, scale, causal)
        }),
        None => reference::attention(q, k, v, scale, causal),
    }
}

/// [`attention`] on packed heads: `q (b, sq, heads·d)`, `k`/`v (b, sk,
/// heads·d)` → `(b, sq, heads·dv)` — the layout of the q/k/v projections,
/// so no head split/merge is needed around it.
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    match kernel_dtype(q) {
        Some(dt) => in_dtype(q, dt, |q| {
            kernels::attention::attention_packed(q, k, v, heads, scale, causal)
        }),
        None => reference::attention_packed(q, k, v, heads, scale, causal),
    }
}

/// Nearest-neighbour ×2 upsampling of `(b, c, h, w)`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::resample::upsample_nearest2x),
        None => reference::upsample_nearest2x(x),
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` by default.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::act::gelu),
        None => reference::gelu_erf(x),
    }
}

/// GEGLU gate (sgm / diffusers `GEGLU` after its projection):
/// `[value, gate] = x.chunk(2, -1)`, `value · gelu_erf(gate)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::act::geglu),
        None => reference::geglu(x),
    }
}

/// Tanh-approximated GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`
/// (`torch.nn.GELU(approximate='tanh')`, timm's `gelu_tanh`, the WD v3
/// taggers' MLP activation).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::act::gelu_tanh),
        None => reference::gelu_tanh(x),
    }
}

/// OpenAI CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// The composite reference implementations (candle primitives only, all
/// differentiable through candle's own autograd). They run on every device
/// and dtype; the kernels are tested against them, and [`set_cpu_kernels`]
/// (false) routes the public ops here.
pub mod reference {
    use candle_core::{DType, Result, Tensor, D};

    /// `x @ wᵀ + b` for `x` of shape `(..., in)` and `w` of shape `[out, in]`.
    pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let y = match x.dims() {
            [b0, s, d] => x
                .reshape((b0 * s, *d))?
                .matmul(&w.t()?)?
                .reshape((*b0, *s, ()))?,
            _ => x.broadcast_matmul(&w.t()?)?,
        };
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Nearest-neighbour ×2 upsampling of `(b, c, h, w)` as reshape +
    /// broadcast (its backward is a broadcast-sum, unlike candle's
    /// `upsample_nearest2d`, which has none).
    pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w))
    }

    /// Tanh-approximated GELU (candle's unary `gelu`, which has a backward
    /// on every device).
    pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
        x.gelu()
    }

    /// Exact (erf) GELU (candle's `gelu_erf`).
    pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
        x.gelu_erf()
    }

    /// GEGLU gate: `x[..., :n] · gelu_erf(x[..., n:])` for a last dim of `2n`.
    pub fn geglu(x: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)? / 2;
        let value = x.narrow(D::Minus1, 0, n)?;
        let gate = x.narrow(D::Minus1, n, n)?;
        value * gate.gelu_erf()?
    }

    /// 2-D convolution with bias; `x (b, cin, h, w)`, `w [cout, cin, k, k]`.
    pub fn conv2d(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    /// Group normalisation of `x (b, c, ...)` in f32, per-channel affine, then
    /// optionally SiLU. Matches `torch.nn.GroupNorm` (biased variance).
    pub fn group_norm(
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        if c % groups != 0 {
            candle_core::bail!("group_norm: {c} channels not divisible by {groups} groups");
        }
        let xg = x.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.as_slice())?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let w = weight.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
        let bi = bias.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
        let y = xn.broadcast_mul(&w)?.broadcast_add(&bi)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(dtype)
    }

    /// Layer normalisation over the last dimension (biased variance), computed in f32.
    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        let y = xn
            .broadcast_mul(&weight.to_dtype(DType::F32)?)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?;
        y.to_dtype(dtype)
    }

    /// Numerically stable softmax over the last dimension (differentiable).
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// Scaled dot-product attention: `softmax(q kᵀ · scale [+ causal mask]) v`.
    /// `q (b, h, sq, d)`, `k`/`v (b, h, sk, d)` → `(b, h, sq, d)`.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal: bool,
    ) -> Result<Tensor> {
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = if causal {
            let (sq, sk) = (q.dim(2)?, k.dim(2)?);
            let mask: Vec<f32> = (0..sq)
                .flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (sq, sk), q.device())?.to_dtype(scores.dtype())?;
            scores.broadcast_add(&mask)?
        } else {
            scores
        };
        softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
    }

    /// [`attention`] on packed heads: split `(b, s, heads·d)` into
    /// `(b, heads, s, d)`, attend, merge back.
    pub fn attention_packed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        causal: bool,
    ) -> Result<Tensor> {
        let split = |t: &Tensor| -> Result<Tensor> {
            let (b, s, w) = t.dims3()?;
            t.reshape((b, s, heads, w / heads))?.transpose(1, 2)
        };
        let o = attention(&split(q)?, &split(k)?, &split(v)?, scale, causal)?;
        let (b, h, s, dv) = o.dims4()?;
        o.transpose(1, 2)?.reshape((b, s, h * dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn upsample_matches_candle_forward() -> Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0, &Device::Cpu)?.reshape((2, 3, 4, 5))?;
        let a = upsample_nearest2x(&x)?;
        let b = x.upsample_nearest2d(8, 10)?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn half_precision_cpu_inputs_run_through_the_f32_kernels() -> Result<()> {
        // candle's CPU conv/matmul reject bf16; the dispatch computes in f32.
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 5.0 * 5.0, &dev)?
            .reshape((2, 4, 5, 5))?
            .affine(0.01, -0.5)?;
        let w = Tensor::arange(0f32, 3.0 * 4.0 * 9.0, &dev)?
            .reshape((3, 4, 3, 3))?
            .affine(0.003, -0.15)?;
        let b = Tensor::new(&[0.1f32, -0.2, 0.3], &dev)?;
        let y32 = conv2d(&x, &w, Some(&b), 1, 1)?;
        let y16 = conv2d(&x.to_dtype(DType::BF16)?, &w, Some(&b), 1, 1)?;
        assert_eq!(y16.dtype(), DType::BF16);
        let d = (y16.to_dtype(DType::F32)? - &y32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 0.05, "{d}");
        let g = Tensor::ones(4, DType::F32, &dev)?;
        let z = Tensor::zeros(4, DType::F32, &dev)?;
        let n16 = group_norm(&x.to_dtype(DType::BF16)?, 2, &g, &z, 1e-5, true)?;
        let n32 = group_norm(&x, 2, &g, &z, 1e-5, true)?;
        let d = (n16.to_dtype(DType::F32)? - n32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 0.05, "{d}");
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_candle() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.0, 50.0]], &Device::Cpu)?;
        let a = softmax_last_dim(&x)?;
        let b = candle_nn::ops::softmax_last_dim(&x)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
