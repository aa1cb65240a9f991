//! Tensor operations behind the layers in [`crate::nn`].
//!
//! On CPU with f32/f64 tensors, linear, conv2d, group_norm (+SiLU),
//! layer_norm, GELU / GEGLU, softmax and attention dispatch to the fast custom ops with hand-written
//! backward passes in [`crate::nn::kernels`] (issue 5); half-precision CPU
//! tensors are computed in f32 by the same kernels (as the composites do);
//! every other device (CUDA) uses the composite reference implementations
//! in [`reference`](mod@reference), built from candle primitives that all have a backward
//! pass (so CUDA keeps cuBLAS/cuDNN). The kernels are tested against those
//! composites. Where no gradient flows on such a device (sampling, the
//! frozen part of a partial finetune), softmax, attention, layer norm and
//! group norm take candle's fused single-kernel forms instead
//! ([`fused`](mod@fused)), which accumulate in f32 even on bf16/f16 tensors.
//! Where a gradient flows there, softmax, group norm and layer norm take
//! custom ops with a backward ([`crate::nn::softmax`], [`crate::nn::norm`]),
//! which keep only their input and output for it (the composites keep
//! every intermediate, in f32).
//!
//! Shapes use PyTorch conventions: images `(b, c, h, w)`, sequences
//! `(b, s, d)`, attention `(b, heads, s, head_dim)`.

use crate::nn::kernels;
use candle_core::{DType, Device, Result, Tensor};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static CPU_KERNELS: AtomicBool = AtomicBool::new(true);

thread_local! {
    static DEVICE_FUSED: Cell<bool> = const { Cell::new(true) };
}

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

/// Enable (default) or disable the [`fused`](mod@fused) forms on non-CPU
/// devices, for ops dispatched from the calling thread (a GPU model runs
/// its ops there); when disabled the composites run with or without a
/// gradient. Returns the previous setting. For A/B checks:
/// `EPS2V_DEVICE_FUSED=0` in the environment disables them for every
/// thread of the process.
pub fn set_device_fused(enabled: bool) -> bool {
    DEVICE_FUSED.with(|c| c.replace(enabled))
}

/// Whether the fused device forms are enabled on this thread (see
/// [`set_device_fused`]).
pub fn device_fused_enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    DEVICE_FUSED.with(Cell::get)
        && *ENV.get_or_init(|| std::env::var("EPS2V_DEVICE_FUSED").map_or(true, |v| v != "0"))
}

/// True when an op on `ts` (its first tensor is the activation) should take
/// the [`fused`](mod@fused) form: a non-CPU device, enabled, no input that
/// needs a gradient, and within the fused kernels' limits.
fn use_fused(ts: &[&Tensor]) -> bool {
    device_fused_enabled() && !matches!(ts[0].device(), Device::Cpu) && fused::supports(ts)
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
    crate::nn::profile::scope("op linear", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| kernels::linear::linear(x, w, b)),
        None if use_fused(&[x, w]) => fused::linear(x, w, b),
        None => reference::linear(x, w, b),
    })
}

/// 2-D convolution with bias; `x (b, cin, h, w)`, `w [cout, cin, k, k]`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    crate::nn::profile::scope("op conv2d", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| kernels::conv::conv2d(x, w, b, stride, padding)),
        None if use_fused(&[x, w]) => fused::conv2d(x, w, b, stride, padding),
        None => reference::conv2d(x, w, b, stride, padding),
    })
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
    crate::nn::profile::scope("op group_norm", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| {
            kernels::group_norm::group_norm(x, groups, weight, bias, eps, silu)
        }),
        None if use_fused(&[x, weight, bias]) => {
            fused::group_norm(x, groups, weight, bias, eps, silu)
        }
        None => match device_fused_enabled() {
            true => crate::nn::norm::try_group_norm(x, groups, weight, bias, eps, silu)?,
            false => None,
        }
        .map_or_else(
            || reference::group_norm(x, groups, weight, bias, eps, silu),
            Ok,
        ),
    })
}

/// Layer normalisation over the last dimension (biased variance), computed in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::nn::profile::scope("op layer_norm", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, |x| {
            kernels::layer_norm::layer_norm(x, weight, bias, eps)
        }),
        None if use_fused(&[x, weight, bias]) => fused::layer_norm(x, weight, bias, eps),
        None => match device_fused_enabled() {
            true => crate::nn::norm::try_layer_norm(x, weight, bias, eps)?,
            false => None,
        }
        .map_or_else(|| reference::layer_norm(x, weight, bias, eps), Ok),
    })
}

/// Numerically stable softmax over the last dimension (differentiable).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::attention::softmax_last_dim),
        None if use_fused(&[x]) => fused::softmax_last_dim(x),
        None => reference::softmax_last_dim(x),
    }
}

/// Scaled dot-product attention: `softmax(q kᵀ · scale [+ causal mask]) v`.
/// `q (b, h, sq, d)`, `k`/`v (b, h, sk, d)` → `(b, h, sq, d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    crate::nn::profile::scope("op attention", q, || match kernel_dtype(q) {
        Some(dt) => in_dtype(q, dt, |q| {
            kernels::attention::attention(q, k, v, scale, causal)
        }),
        None if use_fused(&[q, k, v]) => fused::attention(q, k, v, scale, causal),
        None => reference::attention(q, k, v, scale, causal),
    })
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
    crate::nn::profile::scope("op attention", q, || match kernel_dtype(q) {
        Some(dt) => in_dtype(q, dt, |q| {
            kernels::attention::attention_packed(q, k, v, heads, scale, causal)
        }),
        None if use_fused(&[q, k, v]) => fused::attention_packed(q, k, v, heads, scale, causal),
        None => reference::attention_packed(q, k, v, heads, scale, causal),
    })
}

/// Nearest-neighbour ×2 upsampling of `(b, c, h, w)`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    crate::nn::profile::scope("op upsample", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::resample::upsample_nearest2x),
        None => reference::upsample_nearest2x(x),
    })
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
    crate::nn::profile::scope("op geglu", x, || match kernel_dtype(x) {
        Some(dt) => in_dtype(x, dt, kernels::act::geglu),
        None => reference::geglu(x),
    })
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
            Some(b) => crate::nn::profile::scope("op linear: bias add", &y, || {
                crate::nn::bias::add_last_dim(&y, b)
            }),
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
            Some(b) => crate::nn::profile::scope("op conv2d: bias add", &y, || {
                crate::nn::bias::add_channels(&y, b)
            }),
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
        if groups == 0 || c % groups != 0 {
            candle_core::bail!("group_norm: {c} channels not divisible by {groups} groups");
        }
        let xg = x.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.as_slice())?;
        channel_affine(&xn, weight, bias, silu)?.to_dtype(dtype)
    }

    /// `xn · weight[c] + bias[c]` over dim 1 of `xn (b, c, ...)`, then
    /// optionally SiLU, all in `xn`'s dtype: the tail of a group norm.
    pub(super) fn channel_affine(
        xn: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        let mut shape = vec![1usize; xn.rank()];
        shape[1] = xn.dim(1)?;
        let w = weight.to_dtype(xn.dtype())?.reshape(shape.as_slice())?;
        let bi = bias.to_dtype(xn.dtype())?.reshape(shape.as_slice())?;
        let y = xn.broadcast_mul(&w)?.broadcast_add(&bi)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
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

    /// Numerically stable softmax over the last dimension (differentiable;
    /// on CUDA the one-pass kernel of [`crate::nn::softmax`], which has a
    /// backward too, where it applies).
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::nn::softmax::try_softmax_last_dim(x)? {
            return Ok(y);
        }
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
        // The scale on q (a pass over q, not over the `sq × sk` scores;
        // exact for SDXL's 1/8): a training graph keeps one scores-sized
        // tensor less per attention.
        let scores = (q * scale)?.contiguous()?.matmul(&k.t()?.contiguous()?)?;
        let scores = if causal {
            scores.broadcast_add(&causal_mask(q, k, scores.dtype())?)?
        } else {
            scores
        };
        softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
    }

    /// The additive causal mask `(sq, sk)` for `q (…, sq, d)`, `k (…, sk, d)`:
    /// 0 on and below the diagonal, −∞ above it.
    pub(super) fn causal_mask(q: &Tensor, k: &Tensor, dtype: DType) -> Result<Tensor> {
        let (sq, sk) = (q.dim(D::Minus2)?, k.dim(D::Minus2)?);
        let mask: Vec<f32> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (sq, sk), q.device())?.to_dtype(dtype)
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
        packed(q, k, v, heads, |q, k, v| attention(q, k, v, scale, causal))
    }

    /// Run `attend` on `q`, `k`, `v (b, s, heads·d)` split into `(b, heads,
    /// s, d)`, and merge its `(b, heads, s, dv)` result back into `(b, s,
    /// heads·dv)`.
    pub(super) fn packed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let split = |t: &Tensor| -> Result<Tensor> {
            let (b, s, w) = t.dims3()?;
            t.reshape((b, s, heads, w / heads))?.transpose(1, 2)
        };
        let o = attend(&split(q)?, &split(k)?, &split(v)?)?;
        let (b, h, s, dv) = o.dims4()?;
        crate::nn::profile::scope("op attention: head merge", &o, || {
            o.transpose(1, 2)?.reshape((b, s, h * dv))
        })
    }
}

/// Forward-only forms of the normalisations, softmax, attention and
/// convolution for a GPU where no gradient is needed: our one-pass softmax
/// ([`crate::nn::softmax`]; candle-nn's where it does not apply) and
/// candle-nn's layer norm (one CUDA kernel each, f32 accumulation for half
/// types) in place of the composites' 5–12 kernels with bf16 reductions,
/// and convolutions as patches × weights ([`crate::nn::im2col`]). They run on every
/// device (the tests run them on the CPU against [`reference`](mod@reference)),
/// but [`use_fused`] sends only non-CPU tensors here: the CPU has its own
/// kernels, and a CPU run with those disabled must get the composites.
pub mod fused {
    use super::reference;
    use candle_core::{DType, Result, Tensor};

    /// candle's fused softmax and layer-norm kernels index elements as
    /// `row * ncols + col` in a 32-bit int: larger tensors take the
    /// composites.
    const MAX_ELEMS: usize = i32::MAX as usize;

    /// True when the fused forms can run on `ts` (the activation first):
    /// nothing tracked for a gradient, a float type the kernels have, and
    /// the activation within their index range.
    pub fn supports(ts: &[&Tensor]) -> bool {
        ts.iter().all(|t| !t.track_op())
            && matches!(ts[0].dtype(), DType::F32 | DType::F16 | DType::BF16)
            && ts[0].elem_count() <= MAX_ELEMS
    }

    /// Softmax over the last dimension, one kernel: ours
    /// ([`crate::nn::softmax`], one pass) where it applies, else candle's.
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::nn::softmax::try_softmax_last_dim(x)? {
            return Ok(y);
        }
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }

    /// `x @ wᵀ + b`: on CUDA with f16/bf16 one cuBLASLt call with the bias
    /// in its epilogue ([`crate::nn::lt`]) where it applies, else the
    /// composite.
    pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if let Some(b) = b {
            if let Some(y) = crate::nn::lt::try_linear(x, w, b)? {
                return Ok(y);
            }
        }
        reference::linear(x, w, b)
    }

    /// 2-D convolution with bias as patches × weights on CUDA
    /// ([`crate::nn::im2col`]), else the composite.
    pub fn conv2d(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        match crate::nn::im2col::try_conv2d(x, w, stride, padding)? {
            Some(y) => match b {
                Some(b) => crate::nn::profile::scope("op conv2d: bias add", &y, || {
                    crate::nn::bias::add_channels(&y, b)
                }),
                None => Ok(y),
            },
            None => reference::conv2d(x, w, b, stride, padding),
        }
    }

    /// Layer normalisation over the last dimension, one kernel (statistics
    /// in f32, affine applied before the one rounding to `x`'s dtype).
    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let dt = x.dtype();
        candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &weight.to_dtype(dt)?,
            &bias.to_dtype(dt)?,
            eps as f32,
        )
    }

    /// Longest `(b, group)` row [`group_norm`] normalises with the fused
    /// kernel. That kernel sums x and x² in one pass (variance = E[x²] −
    /// mean²), whose rounding grows with the row and with mean²/variance;
    /// longer rows (the VAE decoder's two full-resolution levels) take the
    /// composite's two-pass f32 statistics.
    pub const MAX_GROUP_ROW: usize = 1 << 20;

    /// Group normalisation of `x (b, c, ...)`: on CUDA our two kernels
    /// ([`crate::nn::norm`]) where they apply; else a layer norm of each
    /// `(b, group)` row with no affine (one kernel), then the per-channel
    /// affine and the optional SiLU in `x`'s dtype. Rows longer than
    /// [`MAX_GROUP_ROW`] take [`reference::group_norm`].
    pub fn group_norm(
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        if groups == 0 || c % groups != 0 {
            candle_core::bail!("group_norm: {c} channels not divisible by {groups} groups");
        }
        if let Some(y) = crate::nn::norm::try_group_norm(x, groups, weight, bias, eps, silu)? {
            return Ok(y);
        }
        if x.elem_count() == 0 {
            return Ok(x.clone());
        }
        if x.elem_count() / (b * groups) > MAX_GROUP_ROW {
            return reference::group_norm(x, groups, weight, bias, eps, silu);
        }
        let dt = x.dtype();
        let rows = x.contiguous()?.reshape((b * groups, ()))?;
        let n = rows.dim(1)?;
        let ones = Tensor::ones(n, dt, x.device())?;
        let zeros = Tensor::zeros(n, dt, x.device())?;
        let xn = candle_nn::ops::layer_norm(&rows, &ones, &zeros, eps as f32)?
            .reshape(dims.as_slice())?;
        reference::channel_affine(&xn, weight, bias, silu)
    }

    /// Scaled dot-product attention with the scale folded into `q` (a pass
    /// over `q`, not over the `sq × sk` scores) and the fused softmax.
    /// `q (b, h, sq, d)`, `k`/`v (b, h, sk, d)` → `(b, h, sq, d)`.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal: bool,
    ) -> Result<Tensor> {
        // The scores are dropped before the last product: one `sq × sk`
        // tensor less at the peak.
        use crate::nn::profile::scope;
        let p = {
            let scores = scope("op attention: q·kᵀ", q, || {
                (q * scale)?.matmul(&k.t()?.contiguous()?)
            })?;
            let scores = if causal {
                scores.broadcast_add(&reference::causal_mask(q, k, scores.dtype())?)?
            } else {
                scores
            };
            scope("op attention: softmax", &scores, || {
                if scores.elem_count() <= MAX_ELEMS {
                    softmax_last_dim(&scores)
                } else {
                    reference::softmax_last_dim(&scores)
                }
            })?
        };
        scope("op attention: p·v", &p, || p.matmul(&v.contiguous()?))
    }

    /// [`attention`] on packed heads, `(b, s, heads·d)` in and out: on
    /// CUDA the flash kernel ([`crate::nn::flash`]) where it applies.
    pub fn attention_packed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        causal: bool,
    ) -> Result<Tensor> {
        if let Some(o) = crate::nn::flash::try_attention_packed(q, k, v, heads, scale, causal)? {
            return Ok(o);
        }
        reference::packed(q, k, v, heads, |q, k, v| attention(q, k, v, scale, causal))
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

    /// Largest |a − b| relative to the largest |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        use crate::nn::kernels::test_util::{max_abs, max_diff};
        Ok(max_diff(a, b)? / max_abs(b)?.max(1e-12))
    }

    #[test]
    fn fused_device_forms_match_the_composites() -> Result<()> {
        use crate::nn::kernels::test_util::rand;
        // Inputs with a non-zero mean per group/row, as activations have.
        let x = ((rand(&[2, 8, 6, 5], 1, DType::F32)? * 3.0)? + 0.7)?;
        let w = (rand(&[8], 2, DType::F32)? + 1.0)?;
        let b = rand(&[8], 3, DType::F32)?;
        for silu in [false, true] {
            let want = reference::group_norm(&x, 4, &w, &b, 1e-5, silu)?;
            let got = fused::group_norm(&x, 4, &w, &b, 1e-5, silu)?;
            assert!(rel_err(&got, &want)? < 1e-5, "group_norm f32 silu={silu}");
            // bf16 activations, f32 affine parameters (as a bf16 UNet's
            // norms get them after a dtype mix-up would): bf16 rounding only.
            let got = fused::group_norm(&x.to_dtype(DType::BF16)?, 4, &w, &b, 1e-5, silu)?;
            assert_eq!(got.dtype(), DType::BF16);
            assert!(rel_err(&got, &want)? < 2e-2, "group_norm bf16 silu={silu}");
        }

        let s = ((rand(&[3, 7, 24], 4, DType::F32)? * 2.0)? - 0.4)?;
        let lw = (rand(&[24], 5, DType::F32)? + 1.0)?;
        let lb = rand(&[24], 6, DType::F32)?;
        let want = reference::layer_norm(&s, &lw, &lb, 1e-5)?;
        assert!(rel_err(&fused::layer_norm(&s, &lw, &lb, 1e-5)?, &want)? < 1e-5);
        let got = fused::layer_norm(&s.to_dtype(DType::BF16)?, &lw, &lb, 1e-5)?;
        assert!(rel_err(&got, &want)? < 2e-2);

        // Rows past MAX_GROUP_ROW get the composite itself, bit for bit.
        let long = ((rand(&[1, 2, 1025, 1024], 14, DType::F32)? * 2.0)? + 3.0)?;
        assert!(long.elem_count() / 2 > fused::MAX_GROUP_ROW);
        let (w2, b2) = (w.narrow(0, 0, 2)?, b.narrow(0, 0, 2)?);
        let want = reference::group_norm(&long, 2, &w2, &b2, 1e-5, true)?;
        let got = fused::group_norm(&long, 2, &w2, &b2, 1e-5, true)?;
        assert_eq!((got - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);

        let z = (rand(&[3, 7, 24], 7, DType::F32)? * 8.0)?;
        let want = reference::softmax_last_dim(&z)?;
        assert!(rel_err(&fused::softmax_last_dim(&z)?, &want)? < 1e-5);
        let got = fused::softmax_last_dim(&z.to_dtype(DType::BF16)?)?;
        assert!(rel_err(&got, &want)? < 2e-2);
        // Transposed (strided) input: made contiguous first.
        let zt = z.transpose(1, 2)?;
        let want = reference::softmax_last_dim(&zt.contiguous()?)?;
        assert!(rel_err(&fused::softmax_last_dim(&zt)?, &want)? < 1e-5);

        // Attention (candle's CPU matmul is f32/f64 only, so f32 here; the
        // packed form gets strided per-head views of the projections).
        let q = rand(&[2, 9, 3 * 8], 8, DType::F32)?;
        let k = rand(&[2, 5, 3 * 8], 9, DType::F32)?;
        let v = rand(&[2, 5, 3 * 4], 10, DType::F32)?;
        let want = reference::attention_packed(&q, &k, &v, 3, 0.35, false)?;
        let got = fused::attention_packed(&q, &k, &v, 3, 0.35, false)?;
        assert_eq!(got.dims(), &[2, 9, 12]);
        assert!(rel_err(&got, &want)? < 1e-5);
        let qs = rand(&[2, 3, 6, 8], 11, DType::F32)?;
        let ks = rand(&[2, 3, 6, 8], 12, DType::F32)?;
        let vs = rand(&[2, 3, 6, 4], 13, DType::F32)?;
        let want = reference::attention(&qs, &ks, &vs, 0.35, true)?;
        assert!(rel_err(&fused::attention(&qs, &ks, &vs, 0.35, true)?, &want)? < 1e-5);
        Ok(())
    }

    #[test]
    fn the_fused_forms_never_take_a_gradient_or_the_cpu() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 3), DType::F32, &dev)?;
        let w = Var::ones(3, DType::F32, &dev)?;
        assert!(fused::supports(&[&x]));
        assert!(fused::supports(&[&x.to_dtype(DType::BF16)?]));
        // A trainable weight, or an activation computed from one, needs the
        // composites' backward.
        assert!(!fused::supports(&[&x, w.as_tensor()]));
        assert!(!fused::supports(&[&x.broadcast_mul(w.as_tensor())?]));
        assert!(!fused::supports(&[&x.to_dtype(DType::U8)?]));
        // On the CPU the kernels (or, with them off, the composites) run.
        assert!(!use_fused(&[&x]));
        // The switch is per thread and returns the previous setting.
        assert!(set_device_fused(false));
        assert!(!device_fused_enabled());
        assert!(std::thread::spawn(device_fused_enabled).join().unwrap());
        assert!(!set_device_fused(true));
        assert!(device_fused_enabled());
        Ok(())
    }
}
