//! Softmax over the last dimension on a GPU in one pass over memory: the
//! attention probabilities.
//!
//! Why our own: candle-nn's CUDA softmax gives each row one warp and makes
//! three passes over it (max; exp written out; the division read back and
//! written again), with scalar loads, in the tensor's dtype; on the lent
//! H200 it took 41 of the 74 ms of attention in one SDXL UNet call at 1024²
//! (`benches/gpu/results/`, run 3). Here a block of up to 256 threads holds
//! its row in registers (up to 32 values per thread, so rows of up to 8,192,
//! SDXL's 4,096 self-attention keys at 1024² included): one read, one write,
//! max and sum in f32, one rounding. Longer rows take the composite.
//!
//! It is a candle custom op with a backward (`∂x = y·(∂y − Σ ∂y·y)`, in
//! f32), so a GPU training step keeps only `x` and `y` for it instead of
//! the composite's five intermediates. The kernel is compiled with NVRTC
//! ([`crate::nn::nvrtc`]); if that or its launch fails, the composite runs
//! from then on (a warning says so once). Off CUDA nothing here runs but
//! the op's CPU form in the tests.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Longest row the kernel takes: 256 threads × 32 values.
pub const MAX_COLS: usize = 256 * 32;

/// Softmax over the last dimension of a contiguous `(rows, cols)` view.
#[derive(Debug, Clone, Copy)]
struct Softmax {
    cols: usize,
}

/// Set when the CUDA kernel could not be built or launched.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

/// Softmax over the last dimension with the kernel where it applies (a
/// CUDA tensor of f32/f16/bf16 with rows of up to [`MAX_COLS`]); `None`:
/// use another form.
pub fn try_softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    let cols = x.dim(D::Minus1)?;
    let applies = x.device().is_cuda()
        && !BROKEN.load(Ordering::Relaxed)
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && (1..=MAX_COLS).contains(&cols)
        && x.elem_count() > 0
        && x.elem_count() / cols <= i32::MAX as usize;
    if !applies {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let op = Softmax { cols };
    let out = if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    };
    match out {
        Ok(y) => Ok(Some(y)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "softmax kernel", "the composite", e),
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "eps2v-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: candle_core::WithDType>(x: &[T], l: &Layout, cols: usize) -> Result<Vec<T>> {
            let Some((o0, o1)) = l.contiguous_offsets() else {
                candle_core::bail!("eps2v-softmax: the input must be contiguous");
            };
            let mut out = Vec::with_capacity(o1 - o0);
            for row in x[o0..o1].chunks(cols) {
                let m = row
                    .iter()
                    .map(|v| v.to_f64())
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|v| (v.to_f64() - m).exp()).collect();
                let s: f64 = e.iter().sum();
                out.extend(e.iter().map(|v| T::from_f64(v / s)));
            }
            Ok(out)
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(run(x, l, self.cols)?),
            CpuStorage::F16(x) => CpuStorage::F16(run(x, l, self.cols)?),
            CpuStorage::BF16(x) => CpuStorage::BF16(run(x, l, self.cols)?),
            _ => candle_core::bail!("eps2v-softmax: f32, f16 or bf16"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let yf = y.to_dtype(DType::F32)?;
        let gf = grad.to_dtype(DType::F32)?;
        let dot = (&gf * &yf)?.sum_keepdim(D::Minus1)?;
        Ok(Some(
            (gf.broadcast_sub(&dot)? * yf)?.to_dtype(grad.dtype())?,
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use super::Softmax;

    /// One block per row; thread `t` holds columns `t + k·blockDim` for
    /// `k < PER` in registers. Variants per dtype and `PER`.
    const SRC: &str = r#"
#define SOFTMAX(NAME, T, LOAD, STORE, PER) \
extern "C" __global__ void NAME(const T* x, T* y, unsigned int cols) { \
    __shared__ float shm[32]; \
    __shared__ float shs[32]; \
    const unsigned long long base = (unsigned long long)blockIdx.x * cols; \
    float v[PER]; \
    float m = NEG_INF; \
    _Pragma("unroll") \
    for (int k = 0; k < PER; ++k) { \
        unsigned int c = threadIdx.x + k * blockDim.x; \
        v[k] = c < cols ? LOAD(x[base + c]) : NEG_INF; \
        m = fmaxf(m, v[k]); \
    } \
    m = block_max(m, shm); \
    if (m == NEG_INF) m = 0.0f; \
    float s = 0.0f; \
    _Pragma("unroll") \
    for (int k = 0; k < PER; ++k) { \
        v[k] = __expf(v[k] - m); \
        s += v[k]; \
    } \
    s = block_sum(s, shs); \
    const float inv = 1.0f / s; \
    _Pragma("unroll") \
    for (int k = 0; k < PER; ++k) { \
        unsigned int c = threadIdx.x + k * blockDim.x; \
        if (c < cols) y[base + c] = STORE(v[k] * inv); \
    } \
}
#define SOFTMAX_ALL(PER) \
SOFTMAX(eps2v_softmax_f32_##PER, float, id, id, PER) \
SOFTMAX(eps2v_softmax_bf16_##PER, u16, bf2f, f2bf, PER) \
SOFTMAX(eps2v_softmax_f16_##PER, u16, h2f, f2h, PER)
SOFTMAX_ALL(1)
SOFTMAX_ALL(4)
SOFTMAX_ALL(8)
SOFTMAX_ALL(16)
SOFTMAX_ALL(32)
"#;

    /// `(values per thread, threads)` for a row of `cols`: one value each
    /// for rows of up to 256 (a block rounded up to whole warps), else 256
    /// threads with the fewest values that cover the row.
    pub(super) fn shape(cols: usize) -> (usize, usize) {
        if cols <= 256 {
            return (1, cols.div_ceil(32) * 32);
        }
        let per = [4, 8, 16, 32]
            .into_iter()
            .find(|p| 256 * p >= cols)
            .unwrap_or(32);
        (per, 256)
    }

    pub(super) fn forward(
        op: &Softmax,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("eps2v-softmax: the input must be contiguous");
        };
        let n = o1 - o0;
        let rows = n / op.cols;
        let (per, threads) = shape(op.cols);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = op.cols as u32;
        let ptx = crate::nn::nvrtc::ptx("eps2v_softmax", SRC)?;
        macro_rules! launch {
            ($t:ty, $kind:literal) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                let name = format!("eps2v_softmax_{}_{per}", $kind);
                let func = dev.get_or_load_custom_func(&name, "eps2v_softmax", ptx)?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&out);
                builder.arg(&cols);
                // SAFETY: the arguments match the kernel's signature; one
                // block per row, each covering its `cols` ≤ per · threads.
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::BF16 => launch!(half::bf16, "bf16"),
            DType::F16 => launch!(half::f16, "f16"),
            dt => candle_core::bail!("eps2v-softmax: no kernel for {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;
    use candle_core::Var;

    /// The op's own forward and backward (its CPU form; the CUDA kernel is
    /// checked by the device benchmark, whose UNet runs through it) against
    /// the composite softmax.
    #[test]
    fn the_op_matches_the_composite_with_gradients() -> Result<()> {
        let x = Var::from_tensor(&(rand(&[2, 3, 7], 1, DType::F32)? * 4.0)?)?;
        let got = x.as_tensor().apply_op1(Softmax { cols: 7 })?;
        let want = crate::nn::ops::reference::softmax_last_dim(x.as_tensor())?;
        let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        let w = rand(&[2, 3, 7], 2, DType::F32)?;
        let g1 = (&got * &w)?.sum_all()?.backward()?;
        let g2 = (&want * &w)?.sum_all()?.backward()?;
        let (a, e) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let d = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "grad: {d}");
        // Off CUDA the public function declines.
        assert!(try_softmax_last_dim(x.as_tensor())?.is_none());
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn the_launch_shape_covers_every_row_length() {
        for cols in [1, 31, 77, 256, 257, 1024, 4096, 4097, MAX_COLS] {
            let (per, threads) = cuda::shape(cols);
            assert!(per * threads >= cols && threads % 32 == 0 && threads <= 256);
        }
    }
}
