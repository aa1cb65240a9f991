//! GELU (exact erf, and the tanh approximation) and the GEGLU gate as
//! candle custom ops with backward.
//!
//! Why: candle's `gelu_erf` runs libm's scalar `erf` on one thread and its
//! backward is a chain of seven elementwise ops (the toy UNet's GEGLU
//! backward took 12× its forward); its tanh `gelu` forward is scalar libm
//! `tanhf` and its backward a chain of ten ops with `powf` and `tanh` (about
//! 35 % of a toy tagger training step, perf at stop 25). Here forward and
//! backward are one vectorised pass each, split over rayon threads.
//!
//! `gelu(x) = x·Φ(x)`, `Φ(x) = ½(1 + erf(x/√2))`, `gelu'(x) = Φ(x) + x·φ(x)`
//! with `φ(x) = e^{−x²/2}/√(2π)` (the exponential is shared with the erf).
//! Tanh GELU (`approximate='tanh'`): `½x(1 + tanh u)`, `u = k(x + 0.044715x³)`,
//! `k = √(2/π)`; since `½(1 + tanh u) = σ(2u)` it is `x·s` with `s = σ(2u)`
//! (the vectorised `exp_fast` sigmoid), and its derivative is
//! `s + x·s(1 − s)·2k(1 + 3·0.044715x²)`.
//! GEGLU (sgm / diffusers `GEGLU`): `[a, g] = x.chunk(2, -1)`,
//! `out = a · gelu(g)`; backward `da = dy·gelu(g)`, `dg = dy·a·gelu'(g)`.
//! erf: f64 uses libm; f32 uses Abramowitz & Stegun 7.1.26 (absolute error
//! ≤ 1.5e-7 in exact arithmetic, ≤ 6e-7 evaluated in f32: a few ulp of
//! values near 1), which vectorises.
//!
//! Reference: `torch.nn.functional.gelu` (approximate='none' / 'tanh'); the
//! tests compare with candle's `gelu_erf` / `gelu` and finite differences.

use super::{chunk_elems, tensor_from, with_data, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `(Φ(x), φ(x))` — normal CDF and density.
#[inline(always)]
fn cdf_pdf<T: Real>(x: T) -> (T, T) {
    let z = x * T::of(std::f64::consts::FRAC_1_SQRT_2);
    let e = (-(z * z)).exp_fast(); // e^{−x²/2}
    let erf = T::erf_with_exp(z, e);
    let half = T::of(0.5);
    (half + half * erf, e * T::of(0.398_942_280_401_432_7))
}

simd_fn! {
    fn gelu_fwd<T: Real>(y: &mut [T], x: &[T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * cdf_pdf(v).0;
        }
    }
}

simd_fn! {
    fn gelu_bwd<T: Real>(dx: &mut [T], x: &[T], dy: &[T]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let (c, p) = cdf_pdf(v);
            *o = g * (c + v * p);
        }
    }
}

/// `(s, ds/dx)` of the tanh GELU's gate `s = σ(2k(x + 0.044715x³))`.
#[inline(always)]
fn tanh_gate<T: Real>(x: T) -> (T, T) {
    const K2: f64 = 2.0 * 0.797_884_560_802_865_4; // 2·√(2/π)
    let x2 = x * x;
    let s = super::sigmoid(T::of(K2) * x * (T::ONE + T::of(0.044_715) * x2));
    let du = T::of(K2) * (T::ONE + T::of(3.0 * 0.044_715) * x2);
    (s, s * (T::ONE - s) * du)
}

simd_fn! {
    fn gelu_tanh_fwd<T: Real>(y: &mut [T], x: &[T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * tanh_gate(v).0;
        }
    }
}

simd_fn! {
    fn gelu_tanh_bwd<T: Real>(dx: &mut [T], x: &[T], dy: &[T]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let (s, ds) = tanh_gate(v);
            *o = g * (s + v * ds);
        }
    }
}

simd_fn! {
    /// Rows of `2n` inputs → rows of `n` outputs.
    fn geglu_fwd<T: Real>(y: &mut [T], x: &[T], n: usize) {
        for (yr, xr) in y.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
            let (a, g) = xr.split_at(n);
            for ((o, &av), &gv) in yr.iter_mut().zip(a).zip(g) {
                *o = av * gv * cdf_pdf(gv).0;
            }
        }
    }
}

simd_fn! {
    fn geglu_bwd<T: Real>(dx: &mut [T], x: &[T], dy: &[T], n: usize) {
        for ((dxr, xr), dyr) in dx.chunks_exact_mut(2 * n).zip(x.chunks_exact(2 * n)).zip(dy.chunks_exact(n)) {
            let (a, g) = xr.split_at(n);
            let (da, dg) = dxr.split_at_mut(n);
            for ((((dav, dgv), &av), &gv), &d) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(dyr) {
                let (c, p) = cdf_pdf(gv);
                *dav = d * gv * c;
                *dgv = d * av * (c + gv * p);
            }
        }
    }
}

/// Which GELU an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `x·Φ(x)`.
    Erf,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
    Tanh,
}

/// GELU, exact or tanh-approximated.
#[derive(Debug, Clone, Copy)]
pub struct GeluOp(pub Gelu);

/// GEGLU gate over the last dim (`2n` → `n`).
#[derive(Debug, Clone, Copy)]
pub struct GegluOp;

fn last_dim(dims: &[usize], what: &str) -> Result<usize> {
    match dims.last() {
        Some(&d) => Ok(d),
        None => bail!("{what} kernel: needs at least one dimension, got a scalar"),
    }
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Gelu::Erf => "eps2v-gelu",
            Gelu::Tanh => "eps2v-gelu-tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(s: &CpuStorage, l: &Layout, kind: Gelu) -> Result<CpuStorage> {
            let x = super::slice_of::<T>(s, l, "gelu x")?;
            let mut y = vec![T::ZERO; x.len()];
            let c = chunk_elems(x.len(), 1);
            y.par_chunks_mut(c)
                .zip(x.par_chunks(c))
                .for_each(|(yc, xc)| match kind {
                    Gelu::Erf => gelu_fwd(yc, xc),
                    Gelu::Tanh => gelu_tanh_fwd(yc, xc),
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s.dtype(), "gelu kernel", |T| run::<T>(s, l, self.0)?);
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        fn run<T: Real>(x: &Tensor, grad: &Tensor, kind: Gelu) -> Result<Tensor> {
            let dx = with_data::<T, _>(x, "gelu x", |xs| {
                with_data::<T, _>(grad, "gelu grad", |gs| {
                    let mut dx = vec![T::ZERO; xs.len()];
                    let c = chunk_elems(xs.len(), 1);
                    dx.par_chunks_mut(c)
                        .zip(xs.par_chunks(c).zip(gs.par_chunks(c)))
                        .for_each(|(o, (xc, gc))| match kind {
                            Gelu::Erf => gelu_bwd(o, xc, gc),
                            Gelu::Tanh => gelu_tanh_bwd(o, xc, gc),
                        });
                    Ok(dx)
                })
            })?;
            tensor_from(dx, x.dims())
        }
        by_dtype!(x.dtype(), "gelu kernel backward", |T| Ok(Some(run::<T>(
            x, &grad, self.0
        )?)))
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "eps2v-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l.dims(), "geglu")?;
        if d % 2 != 0 {
            bail!(
                "geglu kernel: last dim of {:?} must be even ([value, gate])",
                l.dims()
            )
        }
        let n = d / 2;
        fn run<T: Real>(s: &CpuStorage, l: &Layout, n: usize) -> Result<CpuStorage> {
            let x = super::slice_of::<T>(s, l, "geglu x")?;
            let mut y = vec![T::ZERO; x.len() / 2];
            if n > 0 {
                let c = chunk_elems(y.len(), n);
                y.par_chunks_mut(c)
                    .zip(x.par_chunks(2 * c))
                    .for_each(|(yc, xc)| geglu_fwd(yc, xc, n));
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s.dtype(), "geglu kernel", |T| run::<T>(s, l, n)?);
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = last_dim(x.dims(), "geglu")? / 2;
        let grad = grad.contiguous()?;
        fn run<T: Real>(x: &Tensor, grad: &Tensor, n: usize) -> Result<Tensor> {
            let dx = with_data::<T, _>(x, "geglu x", |xs| {
                with_data::<T, _>(grad, "geglu grad", |gs| {
                    let mut dx = vec![T::ZERO; xs.len()];
                    if n > 0 {
                        let c = chunk_elems(gs.len(), n);
                        dx.par_chunks_mut(2 * c)
                            .zip(xs.par_chunks(2 * c).zip(gs.par_chunks(c)))
                            .for_each(|(o, (xc, gc))| geglu_bwd(o, xc, gc, n));
                    }
                    Ok(dx)
                })
            })?;
            tensor_from(dx, x.dims())
        }
        by_dtype!(x.dtype(), "geglu kernel backward", |T| Ok(Some(run::<T>(
            x, &grad, n
        )?)))
    }
}

/// Differentiable exact GELU of a CPU f32/f64 tensor.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp(Gelu::Erf))
}

/// Differentiable tanh-approximated GELU of a CPU f32/f64 tensor.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp(Gelu::Tanh))
}

/// Differentiable GEGLU gate: `x (..., 2n)` → `x[..., :n] · gelu(x[..., n:])`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GegluOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::{check_fd, grads, max_abs, max_diff, rand};
    use crate::nn::ops::reference;
    use candle_core::DType;
    use candle_core::{Device, Var};

    #[test]
    fn erf_f32_is_within_its_bound() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let e = f32::erf_with_exp(x, (-(x * x)).exp()) as f64;
            worst = worst.max((e - libm::erf(x as f64)).abs());
            x += 0.001;
        }
        assert!(worst < 6e-7, "max |erf error| {worst}");
    }

    #[test]
    fn gelu_and_geglu_match_reference_f32() -> Result<()> {
        for dims in [vec![2, 3, 10], vec![1, 2], vec![7, 130, 6], vec![40_000, 2]] {
            let x = (rand(&dims, 1, DType::F32)? * 5.0)?;
            let vars = [Var::from_tensor(&x)?];
            let probe = rand(&dims, 2, DType::F32)?;
            let (y1, g1) = grads(&vars, &probe, &|t| gelu(&t[0]))?;
            let (y2, g2) = grads(&vars, &probe, &|t| reference::gelu_erf(&t[0]))?;
            let d = max_diff(&y1, &y2)?;
            assert!(
                d < 1e-6 * (1.0 + max_abs(&y2)?),
                "gelu {dims:?} forward diff {d}"
            );
            let d = max_diff(&g1[0], &g2[0])?;
            assert!(d < 1e-5, "gelu {dims:?} grad diff {d}");

            let mut half = dims.clone();
            *half.last_mut().unwrap_or(&mut 0) /= 2;
            let probe = rand(&half, 3, DType::F32)?;
            let (y1, g1) = grads(&vars, &probe, &|t| geglu(&t[0]))?;
            let (y2, g2) = grads(&vars, &probe, &|t| reference::geglu(&t[0]))?;
            let d = max_diff(&y1, &y2)?;
            assert!(
                d < 1e-5 * (1.0 + max_abs(&y2)?),
                "geglu {dims:?} forward diff {d}"
            );
            let d = max_diff(&g1[0], &g2[0])?;
            assert!(
                d < 1e-5 * (1.0 + max_abs(&g2[0])?),
                "geglu {dims:?} grad diff {d}"
            );
        }
        Ok(())
    }

    #[test]
    fn gelu_tanh_matches_candle_f32_and_f64() -> Result<()> {
        // candle's `gelu` is the tanh form (scalar tanhf; its backward uses
        // 6-digit constants, hence the gradient tolerance).
        for dims in [vec![2, 3, 10], vec![1, 2], vec![7, 130, 6], vec![40_000, 2]] {
            for dt in [DType::F32, DType::F64] {
                // Wide enough that the tails (|x| up to 12) are exercised.
                let x = (rand(&dims, 1, dt)? * 12.0)?;
                let vars = [Var::from_tensor(&x)?];
                let probe = rand(&dims, 2, dt)?;
                let (y1, g1) = grads(&vars, &probe, &|t| gelu_tanh(&t[0]))?;
                let (y2, g2) = grads(&vars, &probe, &|t| reference::gelu_tanh(&t[0]))?;
                let d = max_diff(&y1, &y2)?;
                assert!(
                    d < 2e-6 * (1.0 + max_abs(&y2)?),
                    "gelu_tanh {dims:?} {dt:?} forward diff {d}"
                );
                let d = max_diff(&g1[0], &g2[0])?;
                assert!(d < 2e-5, "gelu_tanh {dims:?} {dt:?} grad diff {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn gelu_and_geglu_grads_match_finite_differences_f64() -> Result<()> {
        for dims in [vec![3, 8], vec![1, 2], vec![2, 5, 6]] {
            let x = (rand(&dims, 4, DType::F64)? * 3.0)?;
            check_fd(std::slice::from_ref(&x), &|t| gelu_tanh(&t[0]), 16, 1e-6)?;
            check_fd(std::slice::from_ref(&x), &|t| gelu(&t[0]), 16, 1e-6)?;
            check_fd(&[x], &|t| geglu(&t[0]), 16, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn odd_geglu_width_is_an_error() {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let err = geglu(&x).unwrap_err().to_string();
        assert!(err.contains("must be even"), "{err}");
    }
}
