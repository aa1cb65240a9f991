//! LayerNorm over the last dimension as a candle custom op with backward.
//!
//! Forward per row: mean and biased variance (f64 block accumulation), then
//! `y = (x − μ)·rstd·γ + β`; `(μ, rstd)` per row are kept for the backward.
//! Backward per row: `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = dy·γ`,
//! and per-thread partial `dγ = Σ dy·x̂`, `dβ = Σ dy` reduced at the end.
//! Rows are split over rayon threads.
//!
//! Reference: `torch.nn.LayerNorm` (biased variance) and the composite
//! [`crate::nn::ops::reference::layer_norm`] the tests compare against.

use super::group_norm::{sum_sq_dev, sum_wide};
use super::{tensor_from, with_data, Real, Stats, SUM_PIECES};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

simd_fn! {
    /// One row of the forward; returns `(mean, rstd)`.
    fn forward_row<T: Real>(xr: &[T], yr: &mut [T], w: &[T], b: &[T], eps: f64) -> (f64, f64) {
        let d = xr.len().max(1) as f64;
        let mean = sum_wide(xr) / d;
        let var = sum_sq_dev(xr, T::of(mean)) / d;
        let rstd = 1.0 / (var + eps).sqrt();
        let (m, r) = (T::of(mean), T::of(rstd));
        for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (v - m) * r * wv + bv;
        }
        (mean, rstd)
    }
}

simd_fn! {
    /// Backward over consecutive rows of `d`; accumulates dγ, dβ into `dw`, `db`.
    fn backward_rows<T: Real>(
        dxc: &mut [T],
        xc: &[T],
        dyc: &[T],
        w: &[T],
        stats: &[(f64, f64)],
        d: usize,
        dw: &mut [T],
        db: &mut [T],
    ) {
        for (((dxr, xr), dyr), &(mean, rstd)) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)).zip(stats) {
            let (m, r) = (T::of(mean), T::of(rstd));
            // dx holds g = dy·γ for now; sums of g and g·x̂.
            let (mut s1, mut s2) = (T::ZERO, T::ZERO);
            for ((((o, &xv), &g), &wv), (dwv, dbv)) in dxr
                .iter_mut()
                .zip(xr)
                .zip(dyr)
                .zip(w)
                .zip(dw.iter_mut().zip(db.iter_mut()))
            {
                let xh = (xv - m) * r;
                let gw = g * wv;
                *o = gw;
                s1 += gw;
                s2 += gw * xh;
                *dwv += g * xh;
                *dbv += g;
            }
            let ma = s1 / T::of(d as f64);
            let mb = s2 / T::of(d as f64);
            for (o, &xv) in dxr.iter_mut().zip(xr) {
                let xh = (xv - m) * r;
                *o = r * (*o - ma - xh * mb);
            }
        }
    }
}

/// Forward over `rows × d` data; returns `y` and `(mean, rstd)` per row.
pub fn forward<T: Real>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Result<(Vec<T>, Stats)> {
    if d == 0 || x.len() % d != 0 || w.len() != d || b.len() != d {
        bail!(
            "layer_norm kernel: {} elements, weight {} and bias {} do not fit a last dim of {d}",
            x.len(),
            w.len(),
            b.len()
        )
    }
    let mut y = vec![T::ZERO; x.len()];
    let stats = y
        .par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .map(|(yr, xr)| forward_row(xr, yr, w, b, eps))
        .collect();
    Ok((y, stats))
}

/// Backward: `(dx, dγ, dβ)`.
pub fn backward<T: Real>(
    x: &[T],
    w: &[T],
    stats: &[(f64, f64)],
    dy: &[T],
    d: usize,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    if d == 0
        || x.len() % d != 0
        || w.len() != d
        || dy.len() != x.len()
        || stats.len() != x.len() / d
    {
        bail!("layer_norm kernel backward: data sizes do not match a last dim of {d}")
    }
    let rows = x.len() / d;
    let mut dx = vec![T::ZERO; x.len()];
    // Partial dγ, dβ over row chunks as for SUM_PIECES threads, so that
    // their sums do not depend on the pool.
    let per = rows.div_ceil(SUM_PIECES).max(1);
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(per * d)
        .zip(x.par_chunks(per * d))
        .zip(dy.par_chunks(per * d))
        .enumerate()
        .map(|(ci, ((dxc, xc), dyc))| {
            let mut dw = vec![T::ZERO; d];
            let mut db = vec![T::ZERO; d];
            let st = &stats[ci * per..(ci * per + dxc.len() / d)];
            backward_rows(dxc, xc, dyc, w, st, d, &mut dw, &mut db);
            (dw, db)
        })
        .collect();
    let mut dw = vec![T::ZERO; d];
    let mut db = vec![T::ZERO; d];
    for (pw, pb) in partials {
        for (a, v) in dw.iter_mut().zip(pw) {
            *a += v;
        }
        for (a, v) in db.iter_mut().zip(pb) {
            *a += v;
        }
    }
    Ok((dx, dw, db))
}

/// LayerNorm custom op over `(x, γ, β)`; keeps the forward statistics.
#[derive(Debug)]
pub struct LayerNormOp {
    /// Variance epsilon.
    pub eps: f64,
    stats: Mutex<Option<Stats>>,
}

impl LayerNormOp {
    /// A fresh op (one per call: it stores that call's statistics).
    pub fn new(eps: f64) -> Self {
        Self {
            eps,
            stats: Mutex::new(None),
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "eps2v-layer-norm"
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
        let d = l1.dims().last().copied().unwrap_or(0);
        fn run<T: Real>(
            op: &LayerNormOp,
            d: usize,
            a: (&CpuStorage, &Layout),
            b: (&CpuStorage, &Layout),
            c: (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let x = super::slice_of::<T>(a.0, a.1, "layer_norm x")?;
            let w = super::slice_of::<T>(b.0, b.1, "layer_norm weight")?;
            let bi = super::slice_of::<T>(c.0, c.1, "layer_norm bias")?;
            let (y, stats) = forward(x, w, bi, d, op.eps)?;
            if let Ok(mut s) = op.stats.lock() {
                *s = Some(stats);
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s1.dtype(), "layer_norm kernel", |T| run::<T>(
            self,
            d,
            (s1, l1),
            (s2, l2),
            (s3, l3)
        )?);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dims().last().copied().unwrap_or(0);
        let grad = grad.contiguous()?;
        fn run<T: Real>(
            op: &LayerNormOp,
            d: usize,
            x: &Tensor,
            w: &Tensor,
            grad: &Tensor,
        ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            with_data::<T, _>(x, "layer_norm x", |xs| {
                let stats = match op.stats.lock().ok().and_then(|s| s.clone()) {
                    Some(s) => s,
                    None => xs
                        .chunks(d.max(1))
                        .map(|r| {
                            let mean = sum_wide(r) / d as f64;
                            let var = sum_sq_dev(r, T::of(mean)) / d as f64;
                            (mean, 1.0 / (var + op.eps).sqrt())
                        })
                        .collect(),
                };
                with_data::<T, _>(w, "layer_norm weight", |ws| {
                    with_data::<T, _>(grad, "layer_norm grad", |gs| {
                        backward(xs, ws, &stats, gs, d)
                    })
                })
            })
        }
        let (dx, dw, db) = by_dtype!(x.dtype(), "layer_norm kernel backward", |T| {
            let (a, b2, c) = run::<T>(self, d, x, w, &grad)?;
            (
                tensor_from(a, x.dims())?,
                tensor_from(b2, &[d])?,
                tensor_from(c, &[d])?,
            )
        });
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw.reshape(w.shape())?),
            b.track_op().then_some(db.reshape(b.shape())?),
        ))
    }
}

/// Differentiable LayerNorm over the last dim of a CPU f32/f64 tensor.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3(&w, &b, LayerNormOp::new(eps))
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

    #[test]
    fn layer_norm_forward_and_grads_match_reference_f32_at_any_thread_count() -> Result<()> {
        for dims in [
            vec![2, 5, 7],
            vec![1, 13],
            vec![3, 4, 2, 33],
            vec![4, 77, 64],
        ] {
            let d = *dims.last().unwrap_or(&1);
            let ins = [
                rand(&dims, 1, DType::F32)?.affine(2.0, -0.3)?,
                (rand(&[d], 2, DType::F32)? + 1.0)?,
                rand(&[d], 3, DType::F32)?,
            ];
            let vars = ins
                .iter()
                .map(Var::from_tensor)
                .collect::<Result<Vec<_>>>()?;
            let probe = rand(&dims, 4, DType::F32)?;
            let (y1, g1) = grads(&vars, &probe, &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5))?;
            let (y2, g2) = grads(&vars, &probe, &|t| {
                reference::layer_norm(&t[0], &t[1], &t[2], 1e-5)
            })?;
            assert_matches(&format!("{dims:?}"), (&y1, &g1), (&y2, &g2), 1e-5)?;
            assert_same_bits_at_any_thread_count(&format!("{dims:?}"), &vars, &probe, &|t| {
                layer_norm(&t[0], &t[1], &t[2], 1e-5)
            })?;
        }
        Ok(())
    }

    #[test]
    fn layer_norm_grads_match_finite_differences_f64() -> Result<()> {
        for dims in [vec![2, 3, 7], vec![1, 5], vec![5, 9]] {
            let d = *dims.last().unwrap_or(&1);
            let ins = [
                rand(&dims, 5, DType::F64)?,
                (rand(&[d], 6, DType::F64)? + 1.0)?,
                rand(&[d], 7, DType::F64)?,
            ];
            check_fd(&ins, &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5), 10, 1e-6)?;
        }
        Ok(())
    }
}
