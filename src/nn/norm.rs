//! Group normalisation (+ the per-channel affine, + an optional SiLU) on a
//! GPU in two kernels: forward-only where no gradient is needed (sampling,
//! the frozen part of a finetune), and as a custom op with a backward in a
//! training graph, where layer normalisation takes it too (a layer norm is
//! a group norm of `(rows, d, 1)` with one group).
//!
//! Why our own: the forward-only form before this was candle-nn's layer
//! norm over `(n·groups, …)` rows and then the affine and SiLU as three
//! broadcast ops. That layer norm gives each row one block, and an SDXL
//! UNet at 1024² has 64 rows of 163,840 values at its first level, too few
//! blocks for a GPU of 132 SMs; it sums x and x² in one pass (so rows over
//! 2²⁰ values had to take the composite); and the broadcast ops take
//! candle's indexed path. On the lent H200 group norm took 16 ms of one
//! UNet call against PyTorch's 7 (`benches/gpu/results/`, run 3).
//!
//! Why a backward: in a training graph the composites (statistics and
//! affine as candle primitives, in f32) keep every intermediate for the
//! backward pass: about 30 bytes per element of a bf16 activation for a
//! group norm with SiLU, 26 for a layer norm, against 4 here (the input and
//! the output). The backward recomputes the statistics from the input, in
//! f32 (`∂x = rstd·(ĝ − mean ĝ − x̂·mean(ĝ·x̂))` per group, with
//! `ĝ = ∂y·w[c]`, through the SiLU's derivative first if there is one), and
//! computes no gradient for a frozen (untracked) input, weight or bias.
//!
//! Here a first kernel splits every row into chunks of 4,096 values, one
//! block each, and writes each chunk's mean and sum of squared deviations
//! (two passes over registers, f32); the second merges a row's chunks in
//! a fixed order (Chan et al.'s pairwise update: deterministic, and exact
//! for any row length) and writes `(x − mean)·rstd·w[c] + b[c]`, SiLU'd if
//! asked, with one rounding. The kernels are compiled with NVRTC
//! ([`crate::nn::nvrtc`]); if that or a launch fails, the previous form
//! runs from then on (a warning says so once).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Group norm of a contiguous `(n, c, spatial…)` activation with an f32
/// per-channel weight and bias.
#[derive(Debug, Clone, Copy)]
struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// Set when the CUDA kernels could not be built or launched.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

const FALLBACK: &str = "the previous form";

/// Group norm + affine (+ SiLU) of `x (n, c, spatial…)` with the kernels,
/// where they apply: CUDA, f32/f16/bf16, `c` divisible by `groups`, at most
/// 65,535 `(n, group)` rows. With a backward when any input is tracked for
/// a gradient. `None`: use another form.
pub fn try_group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || BROKEN.load(Ordering::Relaxed) || !applies(x, groups, weight, bias)
    {
        return Ok(None);
    }
    match apply(x, groups, weight, bias, eps, silu) {
        Ok(y) => Ok(Some(y)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "group-norm kernels", FALLBACK, e),
    }
}

/// Layer norm over the last dimension of `x` with the group-norm kernels
/// (`x` as `(rows, d, 1)`, one group), where they apply: CUDA, f32/f16/bf16,
/// at most 65,535 rows, `weight` and `bias` of `d` values. For training
/// graphs (the forward-only path has candle-nn's one-kernel layer norm).
/// `None`: use another form.
pub fn try_layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || BROKEN.load(Ordering::Relaxed) || x.rank() == 0 {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count().checked_div(d).unwrap_or(0);
    let x3 = x.reshape((rows, d, 1))?;
    if !applies(&x3, 1, weight, bias) {
        return Ok(None);
    }
    match apply(&x3, 1, weight, bias, eps, false).and_then(|y| y.reshape(x.dims())) {
        Ok(y) => Ok(Some(y)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "group-norm kernels", FALLBACK, e),
    }
}

/// Whether the kernels take `x (n, c, spatial…)` in `groups` groups.
fn applies(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor) -> bool {
    let dims = x.dims();
    x.elem_count() > 0
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && dims.len() >= 3
        && groups > 0
        && dims[1] % groups == 0
        && dims[0] * groups <= 65_535
        && x.elem_count() / (dims[0] * groups) <= u32::MAX as usize / 2
        && weight.elem_count() == dims[1]
        && bias.elem_count() == dims[1]
}

/// The op on `x` on any device (the CPU form for the tests), recorded for
/// the backward when `x`, `weight` or `bias` is tracked.
fn apply(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNorm {
        groups,
        eps: eps as f32,
        silu,
    };
    let w = weight.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    let b = bias.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    let x = x.contiguous()?;
    if [&x, &w, &b].iter().any(|t| t.track_op()) {
        x.apply_op3(&w, &b, op)
    } else {
        x.apply_op3_no_bwd(&w, &b, &op)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "eps2v-group-norm"
    }

    /// Two-pass statistics in f64 (for the tests).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("eps2v-group-norm: inputs must be contiguous");
        };
        let (CpuStorage::F32(w), CpuStorage::F32(b)) = (s2, s3) else {
            candle_core::bail!("eps2v-group-norm: weight and bias must be f32");
        };
        let (w, b) = (&w[w0..w1], &b[b0..b1]);
        fn run<T: candle_core::WithDType>(
            op: &GroupNorm,
            x: &[T],
            w: &[f32],
            b: &[f32],
            (n, c, hw): (usize, usize, usize),
        ) -> Vec<T> {
            let len = c / op.groups * hw;
            let mut out = Vec::with_capacity(x.len());
            for (r, row) in x.chunks(len).enumerate().take(n * op.groups) {
                let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / len as f64;
                let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / len as f64;
                let rstd = 1.0 / (var + op.eps as f64).sqrt();
                let g = r % op.groups;
                for (i, v) in row.iter().enumerate() {
                    let ch = g * (c / op.groups) + i / hw;
                    let mut y = (v.to_f64() - mean) * rstd * w[ch] as f64 + b[ch] as f64;
                    if op.silu {
                        y /= 1.0 + (-y).exp();
                    }
                    out.push(T::from_f64(y));
                }
            }
            out
        }
        let shape = (n, c, hw);
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(run(self, &x[x0..x1], w, b, shape)),
            CpuStorage::F16(x) => CpuStorage::F16(run(self, &x[x0..x1], w, b, shape)),
            CpuStorage::BF16(x) => CpuStorage::BF16(run(self, &x[x0..x1], w, b, shape)),
            _ => candle_core::bail!("eps2v-group-norm: f32, f16 or bf16"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, (s1, l1), (s2, l2), (s3, l3))
    }

    /// Gradients of `x`, `w` and `b` (each only where tracked), in f32,
    /// from the statistics recomputed from `x` (see the module docs).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Which gradients are wanted, then computed from detached inputs: a
        // Var's gradient is stored as returned (candle detaches only those
        // of intermediate nodes), and one computed from the tracked `x`
        // would hold the whole forward graph until the optimizer step.
        let want = (x.track_op(), w.track_op(), b.track_op());
        let (x, w, b, grad) = (&x.detach(), &w.detach(), &b.detach(), &grad.detach());
        let dims = x.dims();
        let (n, c, g) = (dims[0], dims[1], self.groups);
        let xg = x.to_dtype(DType::F32)?.reshape((n, g, ()))?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let rstd = (xc.sqr()?.mean_keepdim(2)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let xhat_c = xhat.reshape((n, c, ()))?;
        let wc = w.reshape((1, c, 1))?;
        let mut gy = grad.to_dtype(DType::F32)?.reshape((n, c, ()))?;
        if self.silu {
            // silu'(y) = s·(1 + y·(1 − s)), s = sigmoid(y).
            let y = xhat_c
                .broadcast_mul(&wc)?
                .broadcast_add(&b.reshape((1, c, 1))?)?;
            let s = candle_nn::ops::sigmoid(&y)?;
            let d = ((y * s.affine(-1.0, 1.0)?)? + 1.0)?.mul(&s)?;
            gy = gy.mul(&d)?;
        }
        let gw = if want.1 {
            Some(gy.mul(&xhat_c)?.sum((0, 2))?)
        } else {
            None
        };
        let gb = if want.2 { Some(gy.sum((0, 2))?) } else { None };
        let gx = if want.0 {
            let gh = gy.broadcast_mul(&wc)?.reshape((n, g, ()))?;
            let m1 = gh.mean_keepdim(2)?;
            let m2 = gh.mul(&xhat)?.mean_keepdim(2)?;
            let gx = gh
                .broadcast_sub(&m1)?
                .sub(&xhat.broadcast_mul(&m2)?)?
                .broadcast_mul(&rstd)?;
            Some(gx.reshape(dims)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use super::GroupNorm;

    /// Values per chunk of the statistics kernel: 256 threads × 16 (the
    /// `CHUNK` of [`SRC`]).
    const CHUNK: usize = 4096;

    /// `stats`: grid (chunks, rows), 256 threads, 16 values each in
    /// registers; writes (mean, M2) per chunk. `apply`: grid (slabs of
    /// 2,048 values, rows); thread 0 merges the row's chunks in order.
    const SRC: &str = r#"
#define CHUNK 4096
#define GN(SUFFIX, T, LOAD, STORE) \
extern "C" __global__ void eps2v_gn_stats_##SUFFIX(const T* x, float* part, unsigned int len, \
        unsigned int chunks) { \
    __shared__ float sh1[32]; \
    __shared__ float sh2[32]; \
    const unsigned int row = blockIdx.y, chunk = blockIdx.x; \
    const unsigned int start = chunk * CHUNK; \
    const unsigned int count = min(len - start, (unsigned int)CHUNK); \
    const unsigned long long base = (unsigned long long)row * len + start; \
    float v[16]; \
    float s = 0.0f; \
    _Pragma("unroll") \
    for (int k = 0; k < 16; ++k) { \
        unsigned int i = threadIdx.x + k * 256; \
        v[k] = i < count ? LOAD(x[base + i]) : 0.0f; \
        s += v[k]; \
    } \
    const float mean = block_sum(s, sh1) / (float)count; \
    float m2 = 0.0f; \
    _Pragma("unroll") \
    for (int k = 0; k < 16; ++k) { \
        unsigned int i = threadIdx.x + k * 256; \
        float d = v[k] - mean; \
        if (i < count) m2 += d * d; \
    } \
    m2 = block_sum(m2, sh2); \
    if (threadIdx.x == 0) { \
        part[2 * (row * chunks + chunk)] = mean; \
        part[2 * (row * chunks + chunk) + 1] = m2; \
    } \
} \
extern "C" __global__ void eps2v_gn_apply_##SUFFIX(const T* x, const float* part, const float* w, \
        const float* b, T* y, unsigned int len, unsigned int chunks, unsigned int groups, \
        unsigned int cpg, unsigned int hw, float eps, unsigned int silu) { \
    __shared__ float stat[2]; \
    const unsigned int row = blockIdx.y; \
    if (threadIdx.x == 0) { \
        float n = 0.0f, mean = 0.0f, m2 = 0.0f; \
        for (unsigned int c = 0; c < chunks; ++c) { \
            float nb = (float)min(len - c * CHUNK, (unsigned int)CHUNK); \
            float mb = part[2 * (row * chunks + c)], m2b = part[2 * (row * chunks + c) + 1]; \
            float tot = n + nb, d = mb - mean; \
            mean += d * (nb / tot); \
            m2 += m2b + d * d * (n * nb / tot); \
            n = tot; \
        } \
        stat[0] = mean; \
        stat[1] = rsqrtf(m2 / n + eps); \
    } \
    __syncthreads(); \
    const float mean = stat[0], rstd = stat[1]; \
    const unsigned int g = row % groups; \
    const unsigned long long base = (unsigned long long)row * len; \
    _Pragma("unroll") \
    for (int k = 0; k < 8; ++k) { \
        unsigned int i = blockIdx.x * 2048 + k * 256 + threadIdx.x; \
        if (i < len) { \
            unsigned int ch = g * cpg + i / hw; \
            float o = (LOAD(x[base + i]) - mean) * rstd * w[ch] + b[ch]; \
            if (silu) o = o / (1.0f + __expf(-o)); \
            y[base + i] = STORE(o); \
        } \
    } \
}
GN(f32, float, id, id)
GN(bf16, u16, bf2f, f2bf)
GN(f16, u16, h2f, f2h)
"#;

    pub(super) fn forward(
        op: &GroupNorm,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("eps2v-group-norm: inputs must be contiguous");
        };
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let rows = n * op.groups;
        let len = c / op.groups * hw;
        let chunks = len.div_ceil(CHUNK);
        let total = x1 - x0;
        let ptx = crate::nn::nvrtc::ptx("eps2v_group_norm", SRC)?;
        let w = s2.as_cuda_slice::<f32>()?.slice(w0..w1);
        let b = s3.as_cuda_slice::<f32>()?.slice(b0..b1);
        // SAFETY: every (row, chunk) pair is written by the stats kernel.
        let part = unsafe { dev.alloc::<f32>(2 * rows * chunks)? };
        let (len32, chunks32) = (len as u32, chunks as u32);
        let (groups, cpg, hw32) = (op.groups as u32, (c / op.groups) as u32, hw as u32);
        let silu = u32::from(op.silu);
        let stats_cfg = LaunchConfig {
            grid_dim: (chunks32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let apply_cfg = LaunchConfig {
            grid_dim: (len.div_ceil(2048) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty, $kind:literal) => {{
                let x = s1.as_cuda_slice::<$t>()?.slice(x0..x1);
                let stats = dev.get_or_load_custom_func(
                    concat!("eps2v_gn_stats_", $kind),
                    "eps2v_group_norm",
                    ptx,
                )?;
                let apply = dev.get_or_load_custom_func(
                    concat!("eps2v_gn_apply_", $kind),
                    "eps2v_group_norm",
                    ptx,
                )?;
                let mut builder = stats.builder();
                builder.arg(&x);
                builder.arg(&part);
                builder.arg(&len32);
                builder.arg(&chunks32);
                // SAFETY: the arguments match the kernel's signature; the
                // grid is (chunks, rows) of a `rows × len` input.
                unsafe { builder.launch(stats_cfg) }.w()?;
                // SAFETY: every element is written by the apply kernel.
                let out = unsafe { dev.alloc::<$t>(total)? };
                let mut builder = apply.builder();
                builder.arg(&x);
                builder.arg(&part);
                builder.arg(&w);
                builder.arg(&b);
                builder.arg(&out);
                builder.arg(&len32);
                builder.arg(&chunks32);
                builder.arg(&groups);
                builder.arg(&cpg);
                builder.arg(&hw32);
                builder.arg(&op.eps);
                builder.arg(&silu);
                // SAFETY: as above; slabs of 2,048 cover every row.
                unsafe { builder.launch(apply_cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::BF16 => launch!(half::bf16, "bf16"),
            DType::F16 => launch!(half::f16, "f16"),
            dt => candle_core::bail!("eps2v-group-norm: no kernel for {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;

    /// The op's CPU form against the composite group norm, with and
    /// without SiLU, on a row longer than one chunk with an offset mean.
    #[test]
    fn the_op_matches_the_composite() -> Result<()> {
        for (i, silu) in [false, true].into_iter().enumerate() {
            let x = (rand(&[2, 6, 40, 50], 60 + i as u64, DType::F32)? * 3.0)?.affine(1.0, 5.0)?;
            let w = rand(&[6], 70, DType::F32)?;
            let b = rand(&[6], 71, DType::F32)?;
            let op = GroupNorm {
                groups: 2,
                eps: 1e-5,
                silu,
            };
            let got = x.apply_op3_no_bwd(&w, &b, &op)?;
            let want = crate::nn::ops::reference::group_norm(&x, 2, &w, &b, 1e-5, silu)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "silu {silu}: {d}");
        }
        let x = rand(&[1, 4, 3, 3], 1, DType::F32)?;
        let w = rand(&[4], 2, DType::F32)?;
        assert!(try_group_norm(&x, 2, &w, &w, 1e-5, false)?.is_none());
        assert!(try_layer_norm(&x, &w, &w, 1e-5)?.is_none());
        Ok(())
    }

    /// The op's backward against candle's autograd through the composite:
    /// group norm with and without SiLU, and layer norm as one group of
    /// `(rows, d, 1)`, in f32 and bf16 activations; every input tracked.
    #[test]
    fn the_backward_matches_the_composite() -> Result<()> {
        use crate::nn::kernels::test_util::{grads, max_abs, max_diff};
        use crate::nn::ops::reference;
        use candle_core::Var;
        type Norm = dyn Fn(&[Tensor]) -> Result<Tensor>;
        type Case = (&'static str, Vec<usize>, usize, Box<Norm>, Box<Norm>);
        let gn = |silu: bool| -> Box<Norm> {
            Box::new(move |t: &[Tensor]| apply(&t[0], 3, &t[1], &t[2], 1e-5, silu))
        };
        let gn_ref = |silu: bool| -> Box<Norm> {
            Box::new(move |t: &[Tensor]| reference::group_norm(&t[0], 3, &t[1], &t[2], 1e-5, silu))
        };
        let ln: Box<Norm> = Box::new(|t: &[Tensor]| {
            let (r, d) = t[0].dims2()?;
            apply(&t[0].reshape((r, d, 1))?, 1, &t[1], &t[2], 1e-5, false)?.reshape((r, d))
        });
        let ln_ref: Box<Norm> =
            Box::new(|t: &[Tensor]| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5));
        let cases: Vec<Case> = vec![
            ("group norm", vec![2, 6, 5, 7], 6, gn(false), gn_ref(false)),
            (
                "group norm + silu",
                vec![2, 6, 5, 7],
                6,
                gn(true),
                gn_ref(true),
            ),
            ("layer norm", vec![9, 40], 40, ln, ln_ref),
        ];
        for (i, (name, dims, c, op, composite)) in cases.into_iter().enumerate() {
            for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
                let seed = 10 * i as u64;
                let x = (rand(&dims, seed, DType::F32)? * 2.0)?.affine(1.0, 0.7)?;
                let vars = [
                    Var::from_tensor(&x.to_dtype(dt)?)?,
                    Var::from_tensor(&rand(&[c], seed + 1, DType::F32)?.affine(0.5, 1.0)?)?,
                    Var::from_tensor(&rand(&[c], seed + 2, DType::F32)?)?,
                ];
                let probe = rand(&dims, seed + 3, dt)?;
                let (y, g) = grads(&vars, &probe, op.as_ref())?;
                let (y_ref, g_ref) = grads(&vars, &probe, composite.as_ref())?;
                let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                    Ok(max_diff(a, b)? / max_abs(b)?.max(1e-12))
                };
                assert!(rel(&y, &y_ref)? < tol, "{name} {dt:?}: output");
                for (k, which) in ["x", "weight", "bias"].iter().enumerate() {
                    let d = rel(&g[k], &g_ref[k])?;
                    assert!(d < tol, "{name} {dt:?}: ∂{which} off by {d:.2e}");
                }
            }
        }
        Ok(())
    }

    /// A frozen (untracked) weight and bias get no gradient and no
    /// computation; the input's gradient is still there.
    #[test]
    fn frozen_parameters_get_no_gradient() -> Result<()> {
        let x = candle_core::Var::from_tensor(&rand(&[2, 4, 3, 3], 5, DType::F32)?)?;
        let w = rand(&[4], 6, DType::F32)?;
        let b = rand(&[4], 7, DType::F32)?;
        let y = apply(x.as_tensor(), 2, &w, &b, 1e-5, true)?;
        let g = (y * rand(&[2, 4, 3, 3], 8, DType::F32)?)?
            .sum_all()?
            .backward()?;
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        // A Var's gradient comes back as the op returned it: untracked, or
        // it would hold the forward graph (and the optimizer's moments with
        // it). Here the weight and bias are Vars used as they are.
        let (wv, bv) = (
            candle_core::Var::from_tensor(&w)?,
            candle_core::Var::from_tensor(&b)?,
        );
        let y = apply(x.as_tensor(), 2, wv.as_tensor(), bv.as_tensor(), 1e-5, true)?;
        let g = (y * rand(&[2, 4, 3, 3], 8, DType::F32)?)?
            .sum_all()?
            .backward()?;
        for v in [x.as_tensor(), wv.as_tensor(), bv.as_tensor()] {
            assert!(!g.get(v).unwrap().track_op());
        }
        // Nothing tracked: no graph at all.
        assert!(!apply(&x.as_tensor().detach(), 2, &w, &b, 1e-5, true)?.track_op());
        Ok(())
    }
}
