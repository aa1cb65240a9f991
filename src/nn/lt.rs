//! A linear layer's product and bias in one cuBLASLt call on a GPU (the
//! bias added in the product's epilogue), where no gradient is needed; f16
//! and bf16.
//!
//! Why: after [`crate::nn::bias`] the separate bias pass of the linear
//! layers was still 12 of the 44 ms they take in one SDXL UNet call at
//! 1024² on the lent H200 (`benches/gpu/results/`, run 6): it reads and
//! writes every output once more. PyTorch adds it inside the product
//! (cuBLASLt's `BIAS` epilogue), and so does this: cudarc's cuBLASLt
//! binding, already linked by candle's CUDA backend (`libcublasLt`). Not
//! for f32 (cudarc's f32 cuBLASLt product computes in TF32, candle's does
//! not). Checked on the device before first use against the product plus
//! the separate bias on a small problem; if it differs, or cannot run, the
//! separate bias add runs from then on, with one warning.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x (…, k) · wᵀ + b` for `w (n, k)`, `b (n)`, viewed as `(m, k)` rows.
#[derive(Debug, Clone, Copy)]
struct LinearBias {
    m: usize,
    n: usize,
    k: usize,
}

/// Set when the fused form could not run or failed its check.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

const FALLBACK: &str = "the product and a separate bias add";

/// `x · wᵀ + b` in one cuBLASLt call where it applies: CUDA, f16/bf16 of
/// one dtype, nothing tracked for a gradient, `w` 2-D, `b` 1-D. `None`:
/// use another form.
pub fn try_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let Some(op) = applies(x, w, b)? else {
        return Ok(None);
    };
    if !checked(x.device(), x.dtype()) {
        return Ok(None);
    }
    match run(x, w, b, op) {
        Ok(y) => Ok(Some(y)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "cuBLASLt linear", FALLBACK, e),
    }
}

fn applies(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<LinearBias>> {
    if !x.device().is_cuda()
        || BROKEN.load(Ordering::Relaxed)
        || [x, w, b]
            .iter()
            .any(|t| t.track_op() || t.dtype() != x.dtype())
        || !matches!(x.dtype(), DType::F16 | DType::BF16)
        || w.rank() != 2
        || b.rank() != 1
        || x.rank() < 2
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.dim(candle_core::D::Minus1)? != k || b.dim(0)? != n || k == 0 || n == 0 {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    let fits = |v: usize| v > 0 && v <= i32::MAX as usize;
    Ok((fits(m) && fits(n) && fits(k)).then_some(LinearBias { m, n, k }))
}

fn run(x: &Tensor, w: &Tensor, b: &Tensor, op: LinearBias) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank ≥ 2") = op.n;
    aligned(x)?
        .apply_op3_no_bwd(&aligned(w)?, &aligned(b)?, &op)?
        .reshape(shape)
}

/// `t` contiguous and starting 256 bytes into its buffer times a whole
/// number (copied if not): cudarc sets no minimum-alignment preference,
/// so cuBLASLt's heuristic assumes 256-byte aligned operands and bias (a
/// narrowed weight or bias, as in the split GEGLU, need not be).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if (t.layout().start_offset() * t.dtype().size_in_bytes()) % 256 == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

/// Whether the fused form passed its first-use check on this dtype
/// ([`crate::nn::FirstUse`]; the same tolerance as the attention's).
fn checked(dev: &candle_core::Device, dtype: DType) -> bool {
    static CHECK: crate::nn::FirstUse = crate::nn::FirstUse::new();
    let kernel = (&BROKEN, "cuBLASLt linear", FALLBACK);
    CHECK.passed(dtype, 1e-2, kernel, || self_check(dev, dtype))
}

/// Relative L2 difference between the fused form and the f32 product plus
/// bias of the same rounded inputs, on a `(2, 35, 96) · (40, 96)ᵀ` problem.
fn self_check(dev: &candle_core::Device, dtype: DType) -> Result<f64> {
    let make = |dims: &[usize], salt: f64| -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let t = Tensor::arange(0u32, n as u32, &candle_core::Device::Cpu)?.to_dtype(DType::F64)?;
        ((t * (0.31 + 0.07 * salt))?.sin()? * 0.5)?
            .reshape(dims)?
            .to_dtype(dtype)?
            .to_device(dev)
    };
    let (x, w, b) = (
        make(&[2, 35, 96], 1.0)?,
        make(&[40, 96], 2.0)?,
        make(&[40], 3.0)?,
    );
    let Some(op) = applies(&x, &w, &b)? else {
        candle_core::bail!("the check problem does not apply");
    };
    let got = run(&x, &w, &b, op)?.to_dtype(DType::F32)?;
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let want = f(&x)?
        .broadcast_matmul(&f(&w)?.t()?)?
        .broadcast_add(&f(&b)?)?;
    let num = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let d = (num / den.max(1e-30)).sqrt();
    Ok(if d.is_finite() { d } else { f64::INFINITY })
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "eps2v-linear-bias"
    }

    /// The same product in f64 (for the tests).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: candle_core::WithDType>(
            op: &LinearBias,
            (x, w, b): (&[T], &[T], &[T]),
        ) -> Vec<T> {
            let mut out = Vec::with_capacity(op.m * op.n);
            for r in 0..op.m {
                let xr = &x[r * op.k..][..op.k];
                for (c, bc) in b.iter().enumerate().take(op.n) {
                    let wc = &w[c * op.k..][..op.k];
                    let s: f64 = xr
                        .iter()
                        .zip(wc)
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum();
                    out.push(T::from_f64(s + bc.to_f64()));
                }
            }
            out
        }
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("eps2v-linear-bias: inputs must be contiguous");
        };
        let out = match (s1, s2, s3) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run(self, (&x[x0..x1], &w[w0..w1], &b[b0..b1])))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(b)) => {
                CpuStorage::F16(run(self, (&x[x0..x1], &w[w0..w1], &b[b0..b1])))
            }
            _ => candle_core::bail!("eps2v-linear-bias: f16 or bf16, one dtype"),
        };
        Ok((out, Shape::from((self.m, self.n))))
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
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::cell::RefCell;
    use std::rc::Rc;

    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};

    use super::LinearBias;

    thread_local! {
        /// This thread's cuBLASLt handles, one per device: a handle's
        /// workspace (32 MiB) is used on the stream it was made for, and
        /// threads may run on streams of their own.
        static HANDLES: RefCell<Vec<(String, Rc<CudaBlasLT>)>> = const { RefCell::new(Vec::new()) };
    }

    fn handle(dev: &CudaDevice) -> Result<Rc<CudaBlasLT>> {
        let key = format!("{:?}", dev.location());
        if let Some(h) =
            HANDLES.with_borrow(|hs| hs.iter().find(|(k, _)| *k == key).map(|(_, h)| h.clone()))
        {
            return Ok(h);
        }
        // cudarc unwraps the workspace allocation: out of memory there
        // panics instead of returning an error.
        let stream = dev.cuda_stream();
        let made =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CudaBlasLT::new(stream)))
                .map_err(|_| {
                    candle_core::Error::Msg(
                        "cuBLASLt: CUDA_ERROR_OUT_OF_MEMORY (its workspace)".into(),
                    )
                })?
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?;
        let h = Rc::new(made);
        HANDLES.with_borrow_mut(|hs| hs.push((key, h.clone())));
        Ok(h)
    }

    /// cuBLASLt is column-major: it computes `D (n × m, ld n) = Aᵀ · B`
    /// with `A` = `w` seen as a `k × n` matrix (ld k), `B` = `x` seen as
    /// `k × m` (ld k), and the bias added along `D`'s `n` rows; `D` is the
    /// row-major `y (m, n)`.
    pub(super) fn forward(
        op: &LinearBias,
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
            candle_core::bail!("eps2v-linear-bias: inputs must be contiguous");
        };
        let lt = handle(&dev)?;
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: op.n as u64,
            n: op.m as u64,
            k: op.k as u64,
            alpha: 1.0,
            lda: op.k as i64,
            ldb: op.k as i64,
            beta: 0.0,
            ldc: op.n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        macro_rules! launch {
            ($t:ty) => {{
                let x = s1.as_cuda_slice::<$t>()?.slice(x0..x1);
                let w = s2.as_cuda_slice::<$t>()?.slice(w0..w1);
                let b = s3.as_cuda_slice::<$t>()?.slice(b0..b1);
                // SAFETY: every element is written by the product (beta 0).
                let mut out = unsafe { dev.alloc::<$t>(op.m * op.n)? };
                // SAFETY: the sizes and leading dimensions above describe
                // exactly the three contiguous buffers and the output.
                unsafe { lt.matmul(cfg, &w, &x, &mut out, Some(&b), None) }
                    .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            dt => candle_core::bail!("eps2v-linear-bias: no product for {dt:?}"),
        };
        Ok((out, Shape::from((op.m, op.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;

    /// The op's CPU form (the same shapes and layout as the cuBLASLt call)
    /// against the product plus bias; off CUDA the public function declines.
    #[test]
    fn the_op_matches_the_product_plus_bias() -> Result<()> {
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        let x = bf(rand(&[2, 3, 8], 1, DType::F32)?)?;
        let w = bf(rand(&[5, 8], 2, DType::F32)?)?;
        let b = bf(rand(&[5], 3, DType::F32)?)?;
        let op = LinearBias { m: 6, n: 5, k: 8 };
        let got = run(&x, &w, &b, op)?.to_dtype(DType::F32)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let want = f(&x)?
            .broadcast_matmul(&f(&w)?.t()?)?
            .broadcast_add(&f(&b)?)?;
        assert_eq!(got.dims(), [2, 3, 5]);
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 2e-2, "{d}");
        assert!(try_linear(&x, &w, &b)?.is_none());
        Ok(())
    }
}
