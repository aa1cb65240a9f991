//! Fully connected layer `y = x·Wᵀ (+ b)` as candle custom ops with backward.
//!
//! Why not candle's `matmul` + `broadcast_add`: the bias add is a separate
//! single-threaded pass, and its backward is a broadcast-sum that candle
//! runs as a strided reduction (on the toy UNet's `64→64` projections over
//! 2,048 tokens the bias made the backward 4× slower than the GEMMs), and
//! `Wᵀ` is a strided view that candle's backward turns into copies.
//!
//! Forward: the output rows are filled with `b`, then one GEMM accumulates
//! `x·Wᵀ` into them (`W` is read transposed in place). Rows are split over
//! the rayon threads, each running a single-threaded GEMM on its rows.
//! Backward: `dx = dy·W` (same row split), `dW = dyᵀ·x` and `db = Σ_rows dy`
//! as per-thread partial sums over row chunks, added at the end (for few
//! rows, one GEMM parallel over the output instead).
//!
//! Reference: `torch.nn.functional.linear`; the tests compare with candle's
//! `matmul` + `broadcast_add` and finite differences.

use super::{matmul, tensor_from, threads, with_data, Mat, Real, SUM_PIECES};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Sizes of one call: `m` rows (all leading dims), `k` inputs, `n` outputs.
#[derive(Debug, Clone, Copy)]
struct Geom {
    m: usize,
    k: usize,
    n: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize]) -> Result<Self> {
        let (Some(&k), [n, k2]) = (x.last(), w) else {
            bail!("linear kernel: x {x:?} must be (..., in) and weight {w:?} [out, in]")
        };
        if k != *k2 {
            bail!("linear kernel: x {x:?} has {k} inputs but weight {w:?} expects {k2}")
        }
        Ok(Self {
            m: x[..x.len() - 1].iter().product(),
            k,
            n: *n,
        })
    }

    /// Rows per parallel task: whole row blocks of at least 32 rows, about
    /// one block per thread of `t` (none when the GEMM is too small to
    /// split).
    fn rows_per_task(&self, t: usize) -> usize {
        if t == 1 || self.m * self.n * self.k < (1 << 16) || self.m < 64 {
            return self.m.max(1);
        }
        self.m.div_ceil(t).next_multiple_of(8).max(32)
    }

    fn out_dims(&self, x: &[usize]) -> Vec<usize> {
        let mut d = x.to_vec();
        if let Some(last) = d.last_mut() {
            *last = self.n;
        }
        d
    }
}

simd_fn! {
    /// `acc[j] += Σ_rows rows[r·n + j]`.
    fn add_col_sums<T: Real>(acc: &mut [T], rows: &[T], n: usize) {
        for r in rows.chunks_exact(n) {
            for (a, &v) in acc.iter_mut().zip(r) {
                *a += v;
            }
        }
    }
}

simd_fn! {
    /// `dst[i] += src[i]`.
    fn add_into<T: Real>(dst: &mut [T], src: &[T]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// `y (m×n) = x (m×k) · wᵀ + b`.
fn forward<T: Real>(g: &Geom, x: &[T], w: &[T], b: Option<&[T]>) -> Result<Vec<T>> {
    let Geom { m, k, n } = *g;
    if x.len() != m * k || w.len() != n * k || b.is_some_and(|b| b.len() != n) {
        bail!("linear kernel: data sizes do not match {g:?}")
    }
    let mut y = vec![T::ZERO; m * n];
    if m == 0 || n == 0 {
        return Ok(y);
    }
    let rows = g.rows_per_task(threads());
    y.par_chunks_mut(rows * n)
        .zip(x.par_chunks(rows * k))
        .try_for_each(|(yc, xc)| -> Result<()> {
            let r = yc.len() / n;
            if let Some(b) = b {
                for row in yc.chunks_exact_mut(n) {
                    row.copy_from_slice(b);
                }
            }
            matmul(
                yc,
                n,
                Mat::n(xc, r, k),
                Mat::t(w, n, k),
                b.is_some(),
                T::ONE,
                false,
            )
        })?;
    Ok(y)
}

/// `(dx, dW, db)` data, each only when asked for.
type GradData<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

/// `(dx, dW, db)` for `dy (m×n)`; each only when asked for.
fn backward<T: Real>(
    g: &Geom,
    x: &[T],
    w: &[T],
    dy: &[T],
    want: (bool, bool, bool),
) -> Result<GradData<T>> {
    let Geom { m, k, n } = *g;
    if x.len() != m * k || w.len() != n * k || dy.len() != m * n {
        bail!("linear kernel backward: data sizes do not match {g:?}")
    }
    let rows = g.rows_per_task(threads());
    let dx = if want.0 {
        let mut dx = vec![T::ZERO; m * k];
        if m > 0 && k > 0 {
            dx.par_chunks_mut(rows * k)
                .zip(dy.par_chunks(rows * n))
                .try_for_each(|(dxc, dyc)| -> Result<()> {
                    let r = dxc.len() / k;
                    matmul(
                        dxc,
                        k,
                        Mat::n(dyc, r, n),
                        Mat::n(w, n, k),
                        false,
                        T::ONE,
                        false,
                    )
                })?;
        }
        Some(dx)
    } else {
        None
    };
    let (want_w, want_b) = (want.1, want.2);
    if !want_w && !want_b {
        return Ok((dx, None, None));
    }
    // (dW, db) of one row chunk of (dy, x); `parallel` lets its GEMM use the pool.
    let chunk_grads = |dyc: &[T], xc: &[T], parallel: bool| -> Result<(Vec<T>, Vec<T>)> {
        let r = dyc.len() / n.max(1);
        let mut pw = vec![T::ZERO; if want_w { n * k } else { 0 }];
        let mut pb = vec![T::ZERO; if want_b { n } else { 0 }];
        if want_w && k > 0 && r > 0 {
            let (dyt, xm) = (Mat::t(dyc, r, n), Mat::n(xc, r, k));
            matmul(&mut pw, k, dyt, xm, false, T::ONE, parallel)?;
        }
        if want_b {
            add_col_sums(&mut pb, dyc, n);
        }
        Ok((pw, pb))
    };
    // Partial sums over row chunks as for SUM_PIECES threads, so that dW and
    // db do not depend on the pool.
    let rows = g.rows_per_task(SUM_PIECES);
    if m == 0 || n == 0 || rows >= m {
        // One chunk: a single GEMM, parallel over the output.
        let (dw, db) = chunk_grads(dy, x, true)?;
        return Ok((dx, want_w.then_some(dw), want_b.then_some(db)));
    }
    // Partial (dW, db) per row chunk, summed afterwards.
    let mut partial = dy
        .par_chunks(rows * n)
        .zip(x.par_chunks(rows * k))
        .map(|(dyc, xc)| chunk_grads(dyc, xc, false))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let (mut dw, mut db) = partial.next().unwrap_or_default();
    for (pw, pb) in partial {
        add_into(&mut dw, &pw);
        add_into(&mut db, &pb);
    }
    Ok((dx, want_w.then_some(dw), want_b.then_some(db)))
}

/// Linear without bias: `(x, W)`.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

/// Linear with bias: `(x, W, b)`.
#[derive(Debug, Clone, Copy)]
pub struct LinearBiasOp;

fn fwd_storage(
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    c: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let g = Geom::new(a.1.dims(), b.1.dims())?;
    fn run<T: Real>(
        g: &Geom,
        a: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        c: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let x = super::slice_of::<T>(a.0, a.1, "linear x")?;
        let w = super::slice_of::<T>(b.0, b.1, "linear weight")?;
        let bias = match c {
            Some(c) => Some(super::slice_of::<T>(c.0, c.1, "linear bias")?),
            None => None,
        };
        Ok(T::to_cpu_storage_owned(forward(g, x, w, bias)?))
    }
    let out = by_dtype!(a.0.dtype(), "linear kernel", |T| run::<T>(&g, a, b, c)?);
    Ok((out, Shape::from(g.out_dims(a.1.dims()))))
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn bwd_tensors(x: &Tensor, w: &Tensor, b: Option<&Tensor>, grad: &Tensor) -> Result<Grads> {
    let g = Geom::new(x.dims(), w.dims())?;
    let grad = grad.contiguous()?;
    let want = (x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op()));
    fn run<T: Real>(
        g: &Geom,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        want: (bool, bool, bool),
    ) -> Result<GradData<T>> {
        with_data::<T, _>(x, "linear x", |xs| {
            with_data::<T, _>(w, "linear weight", |ws| {
                with_data::<T, _>(grad, "linear grad", |gs| backward(g, xs, ws, gs, want))
            })
        })
    }
    fn wrap<T: Real>(v: Option<Vec<T>>, dims: &[usize]) -> Result<Option<Tensor>> {
        v.map(|v| tensor_from(v, dims)).transpose()
    }
    let bdims = [g.n];
    by_dtype!(x.dtype(), "linear kernel backward", |T| {
        let (a, bw, c) = run::<T>(&g, x, w, &grad, want)?;
        Ok((wrap(a, x.dims())?, wrap(bw, w.dims())?, wrap(c, &bdims)?))
    })
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "eps2v-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fwd_storage((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = bwd_tensors(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "eps2v-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fwd_storage((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads> {
        let (dx, dw, db) = bwd_tensors(x, w, Some(b), grad)?;
        Ok((dx, dw, db.map(|d| d.reshape(b.shape())).transpose()?))
    }
}

/// Differentiable `x·Wᵀ (+ b)` on CPU f32/f64 tensors: `x (..., in)`,
/// `w [out, in]`, `b [out]` → `(..., out)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    match b {
        Some(b) => {
            let b = b.to_dtype(x.dtype())?.contiguous()?;
            if b.elem_count() != w.dim(0)? {
                bail!(
                    "linear kernel: bias {:?} does not match weight {:?}",
                    b.dims(),
                    w.dims()
                )
            }
            x.apply_op3(&w, &b, LinearBiasOp)
        }
        None => x.apply_op2(&w, LinearOp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::{
        assert_matches, assert_same_bits_at_any_thread_count, check_fd, grads, rand,
    };
    use crate::nn::ops::reference;
    use candle_core::DType;
    use candle_core::Var;

    /// (x dims, out features): 2-D and 3-D inputs, one row, odd sizes,
    /// enough rows to split over threads.
    fn cases() -> Vec<(Vec<usize>, usize)> {
        vec![
            (vec![1, 7], 5),
            (vec![3, 5, 9], 11),
            (vec![2, 300, 24], 40),
            (vec![1, 1, 1], 1),
            (vec![513, 17], 3),
        ]
    }

    #[test]
    fn linear_forward_and_grads_match_reference_f32_at_any_thread_count() -> Result<()> {
        for (dims, n) in cases() {
            let k = *dims.last().unwrap_or(&1);
            for bias in [true, false] {
                let mut ins = vec![rand(&dims, 1, DType::F32)?, rand(&[n, k], 2, DType::F32)?];
                if bias {
                    ins.push(rand(&[n], 3, DType::F32)?);
                }
                let vars = ins
                    .iter()
                    .map(Var::from_tensor)
                    .collect::<Result<Vec<_>>>()?;
                let mut od = dims.clone();
                *od.last_mut().unwrap_or(&mut 0) = n;
                let probe = rand(&od, 4, DType::F32)?;
                let (y1, g1) = grads(&vars, &probe, &|t| linear(&t[0], &t[1], t.get(2)))?;
                let (y2, g2) = grads(&vars, &probe, &|t| {
                    reference::linear(&t[0], &t[1], t.get(2))
                })?;
                let label = format!("{dims:?}→{n} bias {bias}");
                assert_matches(&label, (&y1, &g1), (&y2, &g2), 1e-5)?;
                assert_same_bits_at_any_thread_count(&label, &vars, &probe, &|t| {
                    linear(&t[0], &t[1], t.get(2))
                })?;
            }
        }
        Ok(())
    }

    #[test]
    fn linear_grads_match_finite_differences_f64() -> Result<()> {
        for (dims, n) in cases() {
            let k = *dims.last().unwrap_or(&1);
            let ins = [
                rand(&dims, 5, DType::F64)?,
                rand(&[n, k], 6, DType::F64)?,
                rand(&[n], 7, DType::F64)?,
            ];
            check_fd(&ins, &|t| linear(&t[0], &t[1], Some(&t[2])), 12, 1e-6)?;
            check_fd(&ins[..2], &|t| linear(&t[0], &t[1], None), 12, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn untracked_weight_gets_no_gradient() -> Result<()> {
        let x = Var::from_tensor(&rand(&[4, 6], 1, DType::F32)?)?;
        let w = rand(&[3, 6], 2, DType::F32)?;
        let b = rand(&[3], 3, DType::F32)?;
        let g = linear(x.as_tensor(), &w, Some(&b))?.sum_all()?.backward()?;
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = Tensor::zeros((2, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        let err = linear(&x, &w, None).unwrap_err().to_string();
        assert!(err.contains("expects 4"), "{err}");
    }
}
