//! 2-D convolution on a GPU as one im2col kernel and one cuBLAS product
//! whose result is already in `(b, c, h, w)` order; where no gradient is
//! needed (sampling, the frozen part of a finetune).
//!
//! Why our own: candle's CUDA convolution lays the patches out as `(b, h·w,
//! cin·k²)` with 64-bit divisions per element, multiplies, and then copies
//! the `(b, h·w, cout)` product into `(b, cout, h, w)` with its generic
//! strided copy; on the lent H200 that took 55 ms of one SDXL UNet call at
//! 1024² against cuDNN's 13 in PyTorch (`benches/gpu/results/`), and
//! candle's own cuDNN path took 259. Here the patches are laid out as
//! `(b, cin·k², h·w)` (one thread per output position and patch row,
//! 32-bit index arithmetic, coalesced reads and writes), so that `w (cout,
//! cin·k²) · col` is the output in place; a 1×1 convolution with stride 1
//! and no padding needs no patches at all. The kernel is compiled with
//! NVRTC ([`crate::nn::nvrtc`]); if that or its launch fails, candle's
//! convolution runs from then on (a warning says so once).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// The patches of `x (b, c, h, w)` for a square `k × k` kernel:
/// `(b, c·k², h_out·w_out)`, zero where the kernel covers the padding.
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    k: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.padding - self.k) / self.stride + 1,
            (w + 2 * self.padding - self.k) / self.stride + 1,
        )
    }
}

/// Set when the CUDA kernel could not be built or launched.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

/// `x (b, cin, h, w)` convolved with `w (cout, cin, k, k)` (no bias) with
/// the patch kernel and one product, where it applies: CUDA, one float
/// dtype, nothing tracked for a gradient. `None`: use candle's convolution.
pub fn try_conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    let applies = x.device().is_cuda()
        && !BROKEN.load(Ordering::Relaxed)
        && !x.track_op()
        && !w.track_op()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !applies {
        return Ok(None);
    }
    match conv2d_gemm(x, w, stride, padding) {
        Ok(y) => Ok(y),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "convolution (im2col kernel)", "candle's", e),
    }
}

/// The convolution as patches × weights on any device (the tests run it
/// on the CPU against candle's convolution). `None` when the shapes are
/// not ones it takes (a non-square kernel, channels that do not match, or
/// patches past 32-bit indexing).
fn conv2d_gemm(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    // Another rank is the caller's mistake, for candle to report, not a
    // kernel failure (which turns the kernel off for the process).
    let (Ok((b, c, h, wd)), Ok((co, ci, kh, kw))) = (x.dims4(), w.dims4()) else {
        return Ok(None);
    };
    if kh != kw || ci != c || stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        return Ok(None);
    }
    let op = Im2Col {
        k: kh,
        stride,
        padding,
    };
    let (ho, wo) = op.out_hw(h, wd);
    let rows = c * kh * kw;
    if b * rows * ho * wo > u32::MAX as usize {
        return Ok(None);
    }
    let col = if kh == 1 && stride == 1 && padding == 0 {
        x.contiguous()?.reshape((b, c, h * wd))?
    } else {
        crate::nn::profile::scope("op conv2d: im2col", x, || {
            x.contiguous()?.apply_op1_no_bwd(&op)
        })?
    };
    let wm = w.contiguous()?.reshape((co, rows))?;
    let y = crate::nn::profile::scope("op conv2d: gemm", &col, || {
        if b == 1 {
            wm.matmul(&col.squeeze(0)?)?.unsqueeze(0)
        } else {
            wm.unsqueeze(0)?.broadcast_as((b, co, rows))?.matmul(&col)
        }
    })?;
    Ok(Some(y.reshape((b, co, ho, wo))?))
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "eps2v-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = self.out_hw(h, w);
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("eps2v-im2col: the input must be contiguous");
        };
        let k = self.k;
        fn run<T: Copy + Default>(op: &Im2Col, x: &[T], dims: [usize; 6]) -> Vec<T> {
            let [b, c, h, w, ho, wo] = dims;
            let (k, s, p) = (op.k, op.stride, op.padding);
            let mut out = vec![T::default(); b * c * k * k * ho * wo];
            for (r, row) in out.chunks_mut(ho * wo).enumerate() {
                let (bc, t) = (r / (k * k), r % (k * k));
                let (ky, kx) = (t / k, t % k);
                for (i, v) in row.iter_mut().enumerate() {
                    let (oy, ox) = (i / wo, i % wo);
                    let (iy, ix) = (oy * s + ky, ox * s + kx);
                    if iy >= p && iy - p < h && ix >= p && ix - p < w {
                        *v = x[bc * h * w + (iy - p) * w + (ix - p)];
                    }
                }
            }
            debug_assert_eq!(b * c, out.len() / (k * k * ho * wo));
            out
        }
        let dims = [b, c, h, w, ho, wo];
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(run(self, &x[o0..o1], dims)),
            CpuStorage::F16(x) => CpuStorage::F16(run(self, &x[o0..o1], dims)),
            CpuStorage::BF16(x) => CpuStorage::BF16(run(self, &x[o0..o1], dims)),
            _ => candle_core::bail!("eps2v-im2col: f32, f16 or bf16"),
        };
        Ok((out, Shape::from((b, c * k * k, ho * wo))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s, l)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use super::Im2Col;

    /// Patch rows per thread (`RPB` in [`SRC`]): one position each made
    /// blocks too small (run 5: 12.6 ms of patches for 5.6 of products).
    const RPB: usize = 8;

    /// Thread `(p, y)`: output position `p` of the `RPB` patch rows from
    /// `y·RPB` on (row r = (n·c + ch)·k² + ky·k + kx); a copy, so one
    /// variant per element size.
    const SRC: &str = r#"
#define RPB 8
#define IM2COL(NAME, T) \
extern "C" __global__ void NAME(const T* x, T* col, unsigned int rows, unsigned int h, \
        unsigned int w, unsigned int k, unsigned int stride, unsigned int pad, \
        unsigned int wo, unsigned int hwo) { \
    unsigned int p = blockIdx.x * blockDim.x + threadIdx.x; \
    if (p >= hwo) return; \
    unsigned int oy = p / wo, ox = p - oy * wo; \
    unsigned int kk = k * k; \
    for (unsigned int r0 = blockIdx.y * RPB; r0 < rows; r0 += gridDim.y * RPB) \
    for (unsigned int r = r0; r < r0 + RPB && r < rows; ++r) { \
        unsigned int bc = r / kk, t = r - bc * kk; \
        unsigned int ky = t / k, kx = t - ky * k; \
        int iy = (int)(oy * stride + ky) - (int)pad; \
        int ix = (int)(ox * stride + kx) - (int)pad; \
        T v = 0; \
        if (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w) \
            v = x[(unsigned long long)bc * h * w + (unsigned int)iy * w + (unsigned int)ix]; \
        col[(unsigned long long)r * hwo + p] = v; \
    } \
}
IM2COL(eps2v_im2col_b32, unsigned int)
IM2COL(eps2v_im2col_b16, u16)
"#;

    pub(super) fn forward(
        op: &Im2Col,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (b, c, h, w) = l.shape().dims4()?;
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("eps2v-im2col: the input must be contiguous");
        };
        let (ho, wo) = op.out_hw(h, w);
        let rows = b * c * op.k * op.k;
        let n = rows * ho * wo;
        let block = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (
                ((ho * wo) as u32).div_ceil(block),
                (rows.div_ceil(RPB) as u32).clamp(1, 65_535),
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [rows, h, w, op.k, op.stride, op.padding, wo, ho * wo].map(|v| v as u32);
        let ptx = crate::nn::nvrtc::ptx("eps2v_im2col", SRC)?;
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                let func = dev.get_or_load_custom_func($name, "eps2v_im2col", ptx)?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&out);
                for a in &args {
                    builder.arg(a);
                }
                // SAFETY: the arguments match the kernel's signature (an
                // element type of the same size); the grid covers every
                // (row, position) of the `n` outputs.
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => launch!(f32, "eps2v_im2col_b32"),
            DType::BF16 => launch!(half::bf16, "eps2v_im2col_b16"),
            DType::F16 => launch!(half::f16, "eps2v_im2col_b16"),
            dt => candle_core::bail!("eps2v-im2col: no kernel for {dt:?}"),
        };
        Ok((out, Shape::from((b, c * op.k * op.k, ho * wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;

    /// Patches × weights (the op's CPU form, the same product) against
    /// candle's convolution, for the shapes the models use: 3×3 with
    /// padding 1 at strides 1 and 2 (the downsamplers), 1×1, batch 1 and 2,
    /// and a size the stride does not divide.
    #[test]
    fn patches_times_weights_match_candles_convolution() -> Result<()> {
        let cases = [
            (2, 3, 6, 5, 4, 3, 1, 1),
            (1, 4, 7, 7, 5, 3, 2, 1),
            (2, 4, 8, 6, 3, 3, 2, 1),
            (2, 6, 5, 4, 7, 1, 1, 0),
            (1, 2, 5, 5, 2, 3, 1, 0),
        ];
        for (i, (b, c, h, w, co, k, s, p)) in cases.into_iter().enumerate() {
            let x = rand(&[b, c, h, w], 40 + i as u64, DType::F32)?;
            let wt = rand(&[co, c, k, k], 50 + i as u64, DType::F32)?;
            let got = conv2d_gemm(&x, &wt, s, p)?.expect("a shape it takes");
            let want = x.conv2d(&wt, p, s, 1, 1)?;
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "case {i}: {d}");
        }
        // Off CUDA the public function declines.
        let x = rand(&[1, 2, 4, 4], 1, DType::F32)?;
        let wt = rand(&[3, 2, 3, 3], 2, DType::F32)?;
        assert!(try_conv2d(&x, &wt, 1, 1)?.is_none());
        Ok(())
    }
}
