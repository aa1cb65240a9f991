//! Adding a bias vector on a GPU in one pass: the linear layers' `y + b`
//! (over the last dimension), the convolutions' per-channel bias and the
//! ResBlocks' per-(sample, channel) time embedding.
//!
//! Why our own: candle's broadcast add takes its indexed path when one
//! side is broadcast, which reads the dims and strides from device memory
//! and divides per element and per dimension; on the lent H200 the linear
//! layers' bias add was 47 of their 76 ms in one SDXL UNet call at 1024²
//! (`benches/gpu/results/`). [`BiasAdd`] views the activation as
//! `(rows, cols)` and adds `b[col]` or `b[row % len]`: one launch, a 2-D
//! grid, no division per element. It is a candle custom op with a backward
//! (`∂x = ∂y`, `∂b` = the sum over the broadcast axes), so training uses it
//! too. The CUDA kernel is compiled once per process with NVRTC
//! ([`crate::nn::nvrtc`]); if that or its launch fails,
//! the composite broadcast add runs from then on (a warning says so once).
//! On the CPU the composite runs (the CPU kernels have their own bias
//! handling); the op's CPU form exists for the tests.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Where the bias goes in the `(rows, cols)` view of the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// `b[col]` (`cols` = the bias length): a linear layer's bias.
    Col,
    /// `b[row % len]`: a per-channel bias of `(n, c, spatial…)` with
    /// `cols` = the spatial size (`len` = c), or one per (sample, channel)
    /// (`len` = n·c).
    Row,
}

/// `x + b` with `b` along one axis of `x` viewed as `(rows, cols)`.
#[derive(Debug, Clone, Copy)]
struct BiasAdd {
    rows: usize,
    cols: usize,
    len: usize,
    axis: Axis,
}

/// Set when the CUDA kernel could not be built or launched: the composite
/// runs from then on.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

/// `y (…, n) + b (n)`: a linear layer's bias.
pub fn add_last_dim(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = b.elem_count();
    if b.rank() == 1 && y.dim(candle_core::D::Minus1)? == n {
        let op = BiasAdd {
            rows: y.elem_count() / n.max(1),
            cols: n,
            len: n,
            axis: Axis::Col,
        };
        if let Some(out) = try_op(y, b, op)? {
            return Ok(out);
        }
    }
    y.broadcast_add(b)
}

/// `y (n, c, spatial…) + b`, `b` of `c` values (a per-channel bias) or of
/// `n·c` (one per sample and channel), in any shape with that many
/// elements; broadcast as `(1, c, 1…)` or `(n, c, 1…)`.
pub fn add_channels(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = y.dims();
    if dims.len() >= 2 {
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let len = b.elem_count();
        if len == c || len == n * c {
            let op = BiasAdd {
                rows: n * c,
                cols: spatial,
                len,
                axis: Axis::Row,
            };
            if let Some(out) = try_op(y, &b.flatten_all()?, op)? {
                return Ok(out);
            }
        }
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        if len == n * c {
            shape[0] = n;
        }
        return y.broadcast_add(&b.reshape(shape)?);
    }
    y.broadcast_add(b)
}

/// The op on a CUDA device when it applies; `None`: use the composite.
fn try_op(y: &Tensor, b: &Tensor, op: BiasAdd) -> Result<Option<Tensor>> {
    let applies = y.device().is_cuda()
        && !BROKEN.load(Ordering::Relaxed)
        && y.dtype() == b.dtype()
        && matches!(y.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && y.is_contiguous()
        && b.is_contiguous()
        && y.elem_count() <= u32::MAX as usize
        && op.rows > 0
        && op.cols > 0;
    if !applies {
        return Ok(None);
    }
    let out = if y.track_op() || b.track_op() {
        y.apply_op2(b, op)
    } else {
        y.apply_op2_no_bwd(b, &op)
    };
    match out {
        Ok(out) => Ok(Some(out)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "bias-add kernel", "candle's broadcast add", e),
    }
}

impl BiasAdd {
    /// `∂b` from `∂y`: the sum over the axes `b` was broadcast along.
    fn bias_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match self.axis {
            Axis::Col => grad.reshape((self.rows, self.cols))?.sum(0),
            Axis::Row => grad
                .reshape((self.rows / self.len, self.len, self.cols))?
                .sum(2)?
                .sum(0),
        }
    }

    fn bias_index(&self, row: usize, col: usize) -> usize {
        match self.axis {
            Axis::Col => col,
            Axis::Row => row % self.len,
        }
    }
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "eps2v-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: candle_core::WithDType>(
            op: &BiasAdd,
            x: &[T],
            l1: &Layout,
            b: &[T],
            l2: &Layout,
        ) -> Result<Vec<T>> {
            let (Some((x0, x1)), Some((b0, b1))) =
                (l1.contiguous_offsets(), l2.contiguous_offsets())
            else {
                candle_core::bail!("eps2v-bias-add: inputs must be contiguous");
            };
            let (x, b) = (&x[x0..x1], &b[b0..b1]);
            Ok(x.iter()
                .enumerate()
                .map(|(i, v)| {
                    let k = op.bias_index(i / op.cols, i % op.cols);
                    T::from_f64(v.to_f64() + b[k].to_f64())
                })
                .collect())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => CpuStorage::F32(run(self, x, l1, b, l2)?),
            (CpuStorage::F16(x), CpuStorage::F16(b)) => CpuStorage::F16(run(self, x, l1, b, l2)?),
            (CpuStorage::BF16(x), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run(self, x, l1, b, l2)?)
            }
            _ => candle_core::bail!("eps2v-bias-add: f32, f16 or bf16, one dtype"),
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(self.bias_grad(grad)?)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use super::{Axis, BiasAdd};

    /// The kernels, one per dtype (half types as bits, arithmetic in f32,
    /// one rounding; [`crate::nn::nvrtc::PRELUDE`]).
    const SRC: &str = r#"
#define BIAS_ADD(NAME, T, LOAD, STORE) \
extern "C" __global__ void NAME(const T* x, const T* b, T* y, unsigned int rows, \
        unsigned int cols, unsigned int len, unsigned int per_row) { \
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x; \
    if (j >= cols) return; \
    float bc = per_row ? 0.0f : LOAD(b[j]); \
    for (unsigned int r = blockIdx.y; r < rows; r += gridDim.y) { \
        unsigned long long i = (unsigned long long)r * cols + j; \
        float bv = per_row ? LOAD(b[r % len]) : bc; \
        y[i] = STORE(LOAD(x[i]) + bv); \
    } \
}
BIAS_ADD(eps2v_bias_add_f32, float, id, id)
BIAS_ADD(eps2v_bias_add_bf16, u16, bf2f, f2bf)
BIAS_ADD(eps2v_bias_add_f16, u16, h2f, f2h)
"#;

    fn ptx() -> Result<&'static str> {
        crate::nn::nvrtc::ptx("eps2v_bias_add", SRC)
    }

    pub(super) fn forward(
        op: &BiasAdd,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let (Some((x0, x1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("eps2v-bias-add: inputs must be contiguous");
        };
        let n = x1 - x0;
        let block = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (
                (op.cols as u32).div_ceil(block),
                (op.rows as u32).clamp(1, 65_535),
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols, len) = (op.rows as u32, op.cols as u32, op.len as u32);
        let per_row = u32::from(op.axis == Axis::Row);
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let x = s1.as_cuda_slice::<$t>()?.slice(x0..x1);
                let b = s2.as_cuda_slice::<$t>()?.slice(b0..b1);
                let func = dev.get_or_load_custom_func($name, "eps2v_bias_add", ptx()?)?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&b);
                builder.arg(&out);
                builder.arg(&rows);
                builder.arg(&cols);
                builder.arg(&len);
                builder.arg(&per_row);
                // SAFETY: the arguments match the kernel's signature; the
                // grid covers cols × rows within n = rows · cols elements.
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => launch!(f32, "eps2v_bias_add_f32"),
            DType::BF16 => launch!(half::bf16, "eps2v_bias_add_bf16"),
            DType::F16 => launch!(half::f16, "eps2v_bias_add_f16"),
            dt => candle_core::bail!("eps2v-bias-add: no kernel for {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;
    use candle_core::{Device, Var};

    /// The op's own forward and backward (its CPU form; the CUDA kernel is
    /// checked by the device benchmark, whose UNet check runs through it)
    /// against the composite broadcast add.
    #[test]
    fn the_op_matches_the_broadcast_add_with_gradients() -> Result<()> {
        // (activation shape, bias shape, axis, the bias broadcast as)
        let cases = [
            (&[2, 3, 5][..], &[5][..], Axis::Col, &[1, 1, 5][..]),
            (&[2, 4, 3, 2], &[4], Axis::Row, &[1, 4, 1, 1]),
            (&[2, 4, 3, 2], &[2, 4], Axis::Row, &[2, 4, 1, 1]),
        ];
        for (i, (ys, bs, axis, bcast)) in cases.into_iter().enumerate() {
            let y = Var::from_tensor(&rand(ys, 10 + i as u64, DType::F32)?)?;
            let b = Var::from_tensor(&rand(bs, 20 + i as u64, DType::F32)?)?;
            let len = b.elem_count();
            let cols = match axis {
                Axis::Col => len,
                Axis::Row => ys[2..].iter().product(),
            };
            let op = BiasAdd {
                rows: y.elem_count() / cols,
                cols,
                len,
                axis,
            };
            let got = y.as_tensor().apply_op2(&b.flatten_all()?, op)?;
            let want = y.broadcast_add(&b.reshape(bcast.to_vec())?)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "case {i}: {d}");
            let w = rand(ys, 30, DType::F32)?;
            let g1 = (&got * &w)?.sum_all()?.backward()?;
            let g2 = (&want * &w)?.sum_all()?.backward()?;
            for v in [y.as_tensor(), b.as_tensor()] {
                let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let d = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "case {i} grad: {d}");
            }
        }
        // bf16 in, bf16 out, one rounding.
        let y = rand(&[3, 8], 1, DType::F32)?;
        let b = rand(&[8], 2, DType::F32)?;
        let op = BiasAdd {
            rows: 3,
            cols: 8,
            len: 8,
            axis: Axis::Col,
        };
        let got = y
            .to_dtype(DType::BF16)?
            .apply_op2_no_bwd(&b.to_dtype(DType::BF16)?, &op)?;
        let want = y
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .broadcast_add(&b.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)?;
        assert_eq!(got.dtype(), DType::BF16);
        let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    /// Off a CUDA device the public functions are the composite itself.
    #[test]
    fn on_the_cpu_the_composite_runs() -> Result<()> {
        let dev = Device::Cpu;
        let y = rand(&[2, 3, 4, 4], 5, DType::F32)?;
        let b = rand(&[3], 6, DType::F32)?;
        let want = y.broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        let d = (add_channels(&y, &b)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        let e = rand(&[2, 3], 7, DType::F32)?;
        let want = y.broadcast_add(&e.reshape((2, 3, 1, 1))?)?;
        assert_eq!(
            (add_channels(&y, &e)? - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        let l = rand(&[2, 5, 3], 8, DType::F32)?;
        let lb = Tensor::new(&[1f32, 2.0, 3.0], &dev)?;
        assert_eq!(
            (add_last_dim(&l, &lb)? - l.broadcast_add(&lb)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        Ok(())
    }
}
