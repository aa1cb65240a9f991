//! GroupNorm (+ optional fused SiLU) as a candle custom op with a one-pass
//! backward.
//!
//! Forward per (sample, group): mean and biased variance (two passes over
//! the group, accumulated in f64 per 256-element block), then one fused pass
//! `y = silu?((x − μ)·rstd·γ_c + β_c)`; `(μ, rstd)` are kept in the op for
//! the backward. Backward per (sample, group): pass 1 forms `dz = dy·silu'(z)`
//! (stored in the dx buffer) and the per-channel sums `Σdz`, `Σdz·x̂`
//! (→ dβ, dγ); pass 2 rewrites it in place as
//! `dx = rstd·(dz·γ − mean(dz·γ) − x̂·mean(dz·γ·x̂))`.
//! Work is parallel over (sample, group) with rayon; element loops run in an
//! AVX2 copy when the CPU has it.
//!
//! Reference: `torch.nn.GroupNorm` (biased variance; PyTorch's
//! `native_group_norm_backward` has the same closed form) and the composite
//! [`crate::nn::ops::reference::group_norm`] that the tests compare against.

use super::{sigmoid, tensor_from, with_data, Real, Stats};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Sum of `v` accumulated in 8 lanes per 256-element block, blocks in f64.
#[inline(always)]
pub(crate) fn sum_wide<T: Real>(v: &[T]) -> f64 {
    let mut total = 0f64;
    for blk in v.chunks(256) {
        let mut acc = [T::ZERO; 8];
        let mut it = blk.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                acc[l] += c[l];
            }
        }
        let mut s = it.remainder().iter().copied().sum::<T>();
        for a in acc {
            s += a;
        }
        total += s.wide();
    }
    total
}

/// `Σ (v − m)²`, same accumulation scheme as [`sum_wide`].
#[inline(always)]
pub(crate) fn sum_sq_dev<T: Real>(v: &[T], m: T) -> f64 {
    let mut total = 0f64;
    for blk in v.chunks(256) {
        let mut acc = [T::ZERO; 8];
        let mut it = blk.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                let d = c[l] - m;
                acc[l] += d * d;
            }
        }
        let mut s = T::ZERO;
        for &r in it.remainder() {
            s += (r - m) * (r - m);
        }
        for a in acc {
            s += a;
        }
        total += s.wide();
    }
    total
}

/// `Σ a·(b − m)`, same accumulation scheme as [`sum_wide`].
#[inline(always)]
pub(crate) fn dot_dev<T: Real>(a: &[T], b: &[T], m: T) -> f64 {
    let mut total = 0f64;
    for (ab, bb) in a.chunks(256).zip(b.chunks(256)) {
        let mut acc = [T::ZERO; 8];
        let mut ia = ab.chunks_exact(8);
        let mut ib = bb.chunks_exact(8);
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for l in 0..8 {
                acc[l] += ca[l] * (cb[l] - m);
            }
        }
        let mut s = T::ZERO;
        for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
            s += x * (y - m);
        }
        for v in acc {
            s += v;
        }
        total += s.wide();
    }
    total
}

/// Sizes of a GroupNorm call.
#[derive(Debug, Clone, Copy)]
pub struct GnGeom {
    /// Batch.
    pub b: usize,
    /// Channels.
    pub c: usize,
    /// Elements per channel (product of the spatial dims).
    pub hw: usize,
    /// Groups.
    pub groups: usize,
}

impl GnGeom {
    /// Validate `x (b, c, ...)` against `groups`.
    pub fn new(dims: &[usize], groups: usize) -> Result<Self> {
        if dims.len() < 2 {
            bail!("group_norm kernel: expected x (b, c, ...), got {dims:?}")
        }
        let (b, c) = (dims[0], dims[1]);
        if groups == 0 || c % groups != 0 {
            bail!("group_norm: {c} channels not divisible by {groups} groups")
        }
        Ok(Self {
            b,
            c,
            hw: dims[2..].iter().product(),
            groups,
        })
    }
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn group_len(&self) -> usize {
        self.cg() * self.hw
    }
}

simd_fn! {
    /// One (sample, group) of the forward: `xg`/`yg` hold `w.len()` channels
    /// of `hw` elements; `w`, `bias` are that group's channel parameters.
    fn forward_group<T: Real>(
        xg: &[T],
        yg: &mut [T],
        w: &[T],
        bias: &[T],
        hw: usize,
        eps: f64,
        silu: bool,
    ) -> (f64, f64) {
        let n = xg.len().max(1) as f64;
        let mean = sum_wide(xg) / n;
        let var = sum_sq_dev(xg, T::of(mean)) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for (ci, (&wc, &bc)) in w.iter().zip(bias).enumerate() {
            let a = rstd * wc.wide();
            let sh = T::of(bc.wide() - mean * a);
            let a = T::of(a);
            let ys = &mut yg[ci * hw..(ci + 1) * hw];
            let xs = &xg[ci * hw..(ci + 1) * hw];
            if silu {
                for (o, &v) in ys.iter_mut().zip(xs) {
                    let z = v * a + sh;
                    *o = z * sigmoid(z);
                }
            } else {
                for (o, &v) in ys.iter_mut().zip(xs) {
                    *o = v * a + sh;
                }
            }
        }
        (mean, rstd)
    }
}

simd_fn! {
    /// One (sample, group) of the backward. Writes `dx` for the group and the
    /// per-channel sums `Σdz·x̂` (→ dγ) into `pw`, `Σdz` (→ dβ) into `pb`.
    fn backward_group<T: Real>(
        dxg: &mut [T],
        xg: &[T],
        dyg: &[T],
        w: &[T],
        bias: &[T],
        hw: usize,
        stat: (f64, f64),
        silu: bool,
        pw: &mut [f64],
        pb: &mut [f64],
    ) {
        let (m, r) = (T::of(stat.0), T::of(stat.1));
        let (mut sa, mut sb) = (0f64, 0f64);
        // Pass 1: dz = dy·silu'(z) (into dx), then the channel sums
        // Σdz and Σdz·x̂ (separate simple loops so that each vectorises).
        for ci in 0..w.len() {
            let (wc, bc) = (w[ci], bias[ci]);
            let rng = ci * hw..(ci + 1) * hw;
            let dz = &mut dxg[rng.clone()];
            let xs = &xg[rng.clone()];
            if silu {
                for ((d, &xv), &gv) in dz.iter_mut().zip(xs).zip(&dyg[rng.clone()]) {
                    let z = (xv - m) * r * wc + bc;
                    let s = sigmoid(z);
                    *d = gv * s * (T::ONE + z * (T::ONE - s));
                }
            } else {
                dz.copy_from_slice(&dyg[rng.clone()]);
            }
            let s1 = sum_wide(dz);
            let s2 = dot_dev(dz, xs, m) * stat.1;
            pb[ci] = s1;
            pw[ci] = s2;
            sa += wc.wide() * s1;
            sb += wc.wide() * s2;
        }
        // Pass 2: dx = rstd·(dz·γ − Σ(dz·γ)/n − x̂·Σ(dz·γ·x̂)/n).
        let n = xg.len().max(1) as f64;
        let ma = T::of(sa / n);
        let mb = T::of(sb / n);
        for (ci, &wc) in w.iter().enumerate() {
            let wr = wc * r;
            let rng = ci * hw..(ci + 1) * hw;
            for (d, &xv) in dxg[rng.clone()].iter_mut().zip(&xg[rng]) {
                let xh = (xv - m) * r;
                *d = *d * wr - r * (ma + xh * mb);
            }
        }
    }
}

/// Forward: returns `y` and the per-(sample, group) `(mean, rstd)` pairs.
pub fn forward<T: Real>(
    g: &GnGeom,
    x: &[T],
    w: &[T],
    bias: &[T],
    eps: f64,
    silu: bool,
) -> Result<(Vec<T>, Stats)> {
    let (cg, gl) = (g.cg(), g.group_len());
    if x.len() != g.b * g.c * g.hw || w.len() != g.c || bias.len() != g.c {
        bail!("group_norm kernel: data sizes do not match {g:?}")
    }
    let mut y = vec![T::ZERO; x.len()];
    if gl == 0 {
        return Ok((y, vec![(0.0, 0.0); g.b * g.groups]));
    }
    let stats: Vec<(f64, f64)> = y
        .par_chunks_mut(gl)
        .zip(x.par_chunks(gl))
        .enumerate()
        .map(|(bg, (yg, xg))| {
            let c0 = (bg % g.groups) * cg;
            forward_group(xg, yg, &w[c0..c0 + cg], &bias[c0..c0 + cg], g.hw, eps, silu)
        })
        .collect();
    Ok((y, stats))
}

/// Backward: `(dx, dγ, dβ)` from `x`, `γ`, `β`, the saved statistics and `dy`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    g: &GnGeom,
    x: &[T],
    w: &[T],
    bias: &[T],
    stats: &[(f64, f64)],
    dy: &[T],
    silu: bool,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (cg, gl) = (g.cg(), g.group_len());
    if x.len() != g.b * g.c * g.hw || dy.len() != x.len() || stats.len() != g.b * g.groups {
        bail!("group_norm kernel backward: data sizes do not match {g:?}")
    }
    let mut dx = vec![T::ZERO; x.len()];
    // Per-sample partial dγ, dβ: (b, c) each, reduced over b below.
    let mut pw = vec![0f64; g.b * g.c];
    let mut pb = vec![0f64; g.b * g.c];
    if gl > 0 {
        dx.par_chunks_mut(gl)
            .zip(x.par_chunks(gl))
            .zip(dy.par_chunks(gl))
            .zip(pw.par_chunks_mut(cg).zip(pb.par_chunks_mut(cg)))
            .enumerate()
            .for_each(|(bg, (((dxg, xg), dyg), (pwg, pbg)))| {
                let c0 = (bg % g.groups) * cg;
                let (wg, bg2) = (&w[c0..c0 + cg], &bias[c0..c0 + cg]);
                backward_group(dxg, xg, dyg, wg, bg2, g.hw, stats[bg], silu, pwg, pbg);
            });
    }
    let mut dw = vec![T::ZERO; g.c];
    let mut db = vec![T::ZERO; g.c];
    for c in 0..g.c {
        dw[c] = T::of((0..g.b).map(|s| pw[s * g.c + c]).sum::<f64>());
        db[c] = T::of((0..g.b).map(|s| pb[s * g.c + c]).sum::<f64>());
    }
    Ok((dx, dw, db))
}

/// GroupNorm custom op over `(x, γ, β)`; keeps the forward statistics.
#[derive(Debug)]
pub struct GroupNormOp {
    /// Number of groups.
    pub groups: usize,
    /// Variance epsilon.
    pub eps: f64,
    /// Apply SiLU after the affine.
    pub silu: bool,
    /// `(mean, rstd)` per (sample, group), saved by the forward.
    stats: Mutex<Option<Stats>>,
}

impl GroupNormOp {
    /// A fresh op (one per call: it stores that call's statistics).
    pub fn new(groups: usize, eps: f64, silu: bool) -> Self {
        Self {
            groups,
            eps,
            silu,
            stats: Mutex::new(None),
        }
    }

    fn saved(&self) -> Option<Stats> {
        self.stats.lock().ok().and_then(|s| s.clone())
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "eps2v-group-norm"
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
        let g = GnGeom::new(l1.dims(), self.groups)?;
        fn run<T: Real>(
            op: &GroupNormOp,
            g: &GnGeom,
            a: (&CpuStorage, &Layout),
            b: (&CpuStorage, &Layout),
            c: (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let x = super::slice_of::<T>(a.0, a.1, "group_norm x")?;
            let w = super::slice_of::<T>(b.0, b.1, "group_norm weight")?;
            let bi = super::slice_of::<T>(c.0, c.1, "group_norm bias")?;
            let (y, stats) = forward(g, x, w, bi, op.eps, op.silu)?;
            if let Ok(mut s) = op.stats.lock() {
                *s = Some(stats);
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s1.dtype(), "group_norm kernel", |T| run::<T>(
            self,
            &g,
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
        let g = GnGeom::new(x.dims(), self.groups)?;
        let grad = grad.contiguous()?;
        fn run<T: Real>(
            op: &GroupNormOp,
            g: &GnGeom,
            x: &Tensor,
            w: &Tensor,
            b: &Tensor,
            grad: &Tensor,
        ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            with_data::<T, _>(x, "group_norm x", |xs| {
                let stats = match op.saved() {
                    Some(s) => s,
                    None => xs
                        .chunks(g.group_len().max(1))
                        .map(|xg| {
                            let n = xg.len().max(1) as f64;
                            let mean = sum_wide(xg) / n;
                            let var = sum_sq_dev(xg, T::of(mean)) / n;
                            (mean, 1.0 / (var + op.eps).sqrt())
                        })
                        .collect(),
                };
                with_data::<T, _>(w, "group_norm weight", |ws| {
                    with_data::<T, _>(b, "group_norm bias", |bs| {
                        with_data::<T, _>(grad, "group_norm grad", |gs| {
                            backward(g, xs, ws, bs, &stats, gs, op.silu)
                        })
                    })
                })
            })
        }
        let (dx, dw, db) = by_dtype!(x.dtype(), "group_norm kernel backward", |T| {
            let (a, b2, c) = run::<T>(self, &g, x, w, b, &grad)?;
            (
                tensor_from(a, x.dims())?,
                tensor_from(b2, &[g.c])?,
                tensor_from(c, &[g.c])?,
            )
        });
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw.reshape(w.shape())?),
            b.track_op().then_some(db.reshape(b.shape())?),
        ))
    }
}

/// Differentiable GroupNorm (+ SiLU) on CPU f32/f64 tensors `x (b, c, ...)`
/// with per-channel `γ`, `β` of `c` elements.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let c = x.dim(1)?;
    let w = weight.to_dtype(x.dtype())?.reshape(c)?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.reshape(c)?.contiguous()?;
    x.apply_op3(&w, &b, GroupNormOp::new(groups, eps, silu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::{assert_matches, check_fd, grads, rand};
    use crate::nn::ops::reference;
    use candle_core::DType;
    use candle_core::Var;

    /// (dims, groups)
    fn cases() -> Vec<(Vec<usize>, usize)> {
        vec![
            (vec![2, 6, 5, 7], 3),
            (vec![1, 4, 3, 3], 4),
            (vec![3, 10, 2, 9], 5),
            (vec![2, 8, 11], 2), // 3-D input
            (vec![1, 9, 1, 1], 3),
        ]
    }

    #[test]
    fn group_norm_forward_and_grads_match_reference_f32() -> Result<()> {
        for (dims, groups) in cases() {
            for silu in [false, true] {
                let c = dims[1];
                let x = rand(&dims, 1, DType::F32)?.affine(3.0, 0.5)?;
                let ins = [
                    x,
                    (rand(&[c], 2, DType::F32)? + 1.0)?,
                    rand(&[c], 3, DType::F32)?,
                ];
                let vars = ins
                    .iter()
                    .map(Var::from_tensor)
                    .collect::<Result<Vec<_>>>()?;
                let probe = rand(&dims, 4, DType::F32)?;
                let (y1, g1) = grads(&vars, &probe, &|t| {
                    group_norm(&t[0], groups, &t[1], &t[2], 1e-5, silu)
                })?;
                let (y2, g2) = grads(&vars, &probe, &|t| {
                    reference::group_norm(&t[0], groups, &t[1], &t[2], 1e-5, silu)
                })?;
                let label = format!("{dims:?} silu={silu}");
                assert_matches(&label, (&y1, &g1), (&y2, &g2), 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_grads_match_finite_differences_f64() -> Result<()> {
        for (dims, groups) in cases() {
            for silu in [false, true] {
                let c = dims[1];
                let ins = [
                    rand(&dims, 5, DType::F64)?,
                    (rand(&[c], 6, DType::F64)? + 1.0)?,
                    rand(&[c], 7, DType::F64)?,
                ];
                check_fd(
                    &ins,
                    &|t| group_norm(&t[0], groups, &t[1], &t[2], 1e-5, silu),
                    10,
                    1e-6,
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_rejects_bad_groups() -> Result<()> {
        let x = rand(&[1, 6, 2, 2], 1, DType::F32)?;
        let w = rand(&[6], 2, DType::F32)?;
        assert!(group_norm(&x, 4, &w, &w, 1e-5, false).is_err());
        Ok(())
    }
}
