//! Softmax over the last dim and fused scaled-dot-product attention
//! `softmax(q kᵀ · scale [+ causal mask]) v` as candle custom ops with
//! backward passes that materialise no avoidable temporaries.
//!
//! Attention works per (batch·head) on blocks of query rows (at most
//! [`SCORE_BUDGET`] score elements per thread): the forward keeps only the
//! output and one log-sum-exp per query row; the backward recomputes the
//! probabilities block by block from the saved log-sum-exp and applies
//! `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
//! `dQ = scale · dS K`, `dK += scale · dSᵀ Q` (the FlashAttention-2 backward,
//! Dao 2023, Algorithm 2, without the on-chip tiling). Memory is
//! O(tokens · head_dim) plus one score block per thread, instead of the
//! several (tokens × tokens) temporaries of the composite.
//!
//! Softmax: `y = exp(x − max) / Σ`, backward `dx = y ∘ (dy − rowsum(dy ∘ y))`
//! (PyTorch's `_softmax_backward_data`).
//!
//! Reference: [`crate::nn::ops::reference::attention`] /
//! [`crate::nn::ops::reference::softmax_last_dim`], compared in the tests.

use super::group_norm::sum_wide;
use super::{matmul, matmul_ptr, tensor_from, threads, with_data, Mat, Real};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;
use std::sync::Mutex;

/// Largest block of attention scores, in elements, per thread (4 MiB of f32).
pub const SCORE_BUDGET: usize = 1 << 20;

/// In-place softmax of one row; returns `max + ln Σ exp(x − max)`.
/// The max and the sum use lane accumulators and the exponentials are a
/// separate pass, so all three loops vectorise (a running `acc += e` inside
/// the exp loop kept it scalar: 9 ns per score).
#[inline(always)]
fn softmax_row<T: Real>(row: &mut [T]) -> f64 {
    let mut lanes = [T::NEG_INF; 16];
    let mut it = row.chunks_exact(16);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max_of(v);
        }
    }
    let mut mx = T::NEG_INF;
    for &v in it.remainder().iter().chain(lanes.iter()) {
        mx = mx.max_of(v);
    }
    for v in row.iter_mut() {
        *v = (*v - mx).exp_fast();
    }
    let s = sum_wide(row);
    let inv = T::of(1.0 / s);
    for v in row.iter_mut() {
        *v *= inv;
    }
    mx.wide() + s.ln()
}

simd_fn! {
    /// In-place softmax of consecutive rows of `d` elements.
    fn softmax_rows<T: Real>(y: &mut [T], d: usize) {
        for r in y.chunks_mut(d) {
            softmax_row(r);
        }
    }
}

simd_fn! {
    /// `dx = y ∘ (dy − rowsum(dy ∘ y))` for consecutive rows of `d` elements.
    fn softmax_bwd_rows<T: Real>(dx: &mut [T], y: &[T], dy: &[T], d: usize) {
        for ((o, yr), gr) in dx.chunks_mut(d).zip(y.chunks(d)).zip(dy.chunks(d)) {
            let dot: T = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
            for ((o, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                *o = a * (b - dot);
            }
        }
    }
}

/// Rows per rayon task for row-wise kernels (≈ 16k elements).
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// Forward softmax over rows of `d` elements.
pub fn softmax_forward<T: Real>(x: &[T], d: usize) -> Vec<T> {
    let mut y = x.to_vec();
    if d > 0 {
        y.par_chunks_mut(d * rows_per_task(d))
            .for_each(|blk| softmax_rows(blk, d));
    }
    y
}

/// Softmax backward `dx = y ∘ (dy − rowsum(dy ∘ y))` over rows of `d`.
pub fn softmax_backward<T: Real>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    if d > 0 {
        let n = d * rows_per_task(d);
        dx.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(dy.par_chunks(n)))
            .for_each(|(o, (yr, gr))| softmax_bwd_rows(o, yr, gr, d));
    }
    dx
}

/// Softmax custom op over the last dimension.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "eps2v-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        let out = by_dtype!(s.dtype(), "softmax kernel", |T| {
            T::to_cpu_storage_owned(softmax_forward(super::slice_of::<T>(s, l, "softmax x")?, d))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let d = res.dims().last().copied().unwrap_or(1);
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let dx = by_dtype!(res.dtype(), "softmax kernel backward", |T| {
            with_data::<T, _>(&res, "softmax y", |y| {
                with_data::<T, _>(&grad, "softmax grad", |g| {
                    tensor_from(softmax_backward(y, g, d), res.dims())
                })
            })?
        });
        Ok(Some(dx))
    }
}

/// Differentiable softmax over the last dim of a CPU f32/f64 tensor.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// Sizes and memory layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnGeom {
    /// Batch (product of the leading dims).
    pub b: usize,
    /// Heads per sample.
    pub h: usize,
    /// Query tokens.
    pub sq: usize,
    /// Key/value tokens.
    pub sk: usize,
    /// Query/key head dim.
    pub d: usize,
    /// Value head dim.
    pub dv: usize,
    /// `true`: tensors are `(b, s, h·d)` (heads side by side in each token
    /// row, as the q/k/v projections produce them); `false`: `(…, s, d)`
    /// with every leading dim a separate head (`h = 1`).
    pub packed: bool,
}

impl AttnGeom {
    /// Validate `q (..., sq, d)`, `k (..., sk, d)`, `v (..., sk, dv)`.
    pub fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let r = q.len();
        if r < 2
            || k.len() != r
            || v.len() != r
            || q[..r - 2] != k[..r - 2]
            || q[..r - 2] != v[..r - 2]
        {
            bail!("attention kernel: q {q:?}, k {k:?}, v {v:?} must share their leading dims")
        }
        if q[r - 1] != k[r - 1] || k[r - 2] != v[r - 2] {
            bail!("attention kernel: head dims of q {q:?} and k {k:?} or token counts of k and v {v:?} differ")
        }
        Ok(Self {
            b: q[..r - 2].iter().product(),
            h: 1,
            sq: q[r - 2],
            sk: k[r - 2],
            d: q[r - 1],
            dv: v[r - 1],
            packed: false,
        })
    }

    /// Validate packed `q (b, sq, h·d)`, `k (b, sk, h·d)`, `v (b, sk, h·dv)`.
    pub fn packed(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<Self> {
        let (&[b, sq, qd], &[bk, sk, kd], &[bv, sv, vd]) = (q, k, v) else {
            bail!("attention kernel: packed q {q:?}, k {k:?}, v {v:?} must be (batch, tokens, heads·dim)")
        };
        if heads == 0
            || qd % heads != 0
            || vd % heads != 0
            || qd != kd
            || b != bk
            || b != bv
            || sk != sv
        {
            bail!("attention kernel: packed q {q:?}, k {k:?}, v {v:?} do not fit {heads} heads")
        }
        Ok(Self {
            b,
            h: heads,
            sq,
            sk,
            d: qd / heads,
            dv: vd / heads,
            packed: true,
        })
    }

    /// Number of (sample, head) tasks.
    fn tasks(&self) -> usize {
        self.b * self.h
    }

    /// Offset of the first element and row stride of head `i` in a tensor
    /// with `s` tokens of head width `w`.
    fn at(&self, i: usize, s: usize, w: usize) -> (usize, usize) {
        if self.packed {
            let (bi, hi) = (i / self.h, i % self.h);
            (bi * s * self.h * w + hi * w, self.h * w)
        } else {
            (i * s * w, w)
        }
    }

    /// Query rows per score block.
    fn rows(&self) -> usize {
        (SCORE_BUDGET / self.sk.max(1)).clamp(1, self.sq.max(1))
    }

    /// Output dims for query dims `q`.
    fn out_dims(&self, q: &[usize]) -> Vec<usize> {
        let mut dims = q.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = if self.packed {
                self.h * self.dv
            } else {
                self.dv
            };
        }
        dims
    }
}

/// Mask `S[i, j]` for `j > r0 + i` (rows of `sk` scores).
#[inline(always)]
fn mask_causal<T: Real>(s: &mut [T], sk: usize, r0: usize) {
    for (i, row) in s.chunks_mut(sk).enumerate() {
        let first = (r0 + i + 1).min(sk);
        row[first..].fill(T::NEG_INF);
    }
}

simd_fn! {
    /// Scores block (rows of `sk`) → probabilities in place; log-sum-exp per row into `lse`.
    fn softmax_block<T: Real>(sb: &mut [T], sk: usize, lse: &mut [f64], causal: bool, r0: usize) {
        if causal {
            mask_causal(sb, sk, r0);
        }
        for (row, l) in sb.chunks_mut(sk).zip(lse.iter_mut()) {
            *l = softmax_row(row);
        }
    }
}

simd_fn! {
    /// Scores block → probabilities `exp(s − lse)` in place (saved log-sum-exp).
    fn probs_block<T: Real>(p: &mut [T], sk: usize, lse: &[f64], causal: bool, r0: usize) {
        if causal {
            mask_causal(p, sk, r0);
        }
        for (row, &l) in p.chunks_mut(sk).zip(lse) {
            let l = T::of(l);
            for x in row.iter_mut() {
                *x = (*x - l).exp_fast();
            }
        }
    }
}

simd_fn! {
    /// `dS = P ∘ (dP − rowsum(dO ∘ O))` in place over `dp` (rows of `sk`);
    /// `o`, `d_o` hold the block's output rows (`dv` values each, rows `ld` apart).
    fn dscores_block<T: Real>(dp: &mut [T], p: &[T], sk: usize, o: &[T], d_o: &[T], dv: usize, ld: usize) {
        for (r, (dpr, pr)) in dp.chunks_mut(sk).zip(p.chunks(sk)).enumerate() {
            let (or, dor) = (&o[r * ld..r * ld + dv], &d_o[r * ld..r * ld + dv]);
            let di: T = dor.iter().zip(or).map(|(&a, &b)| a * b).sum();
            for (x, &pv) in dpr.iter_mut().zip(pr) {
                *x = pv * (*x - di);
            }
        }
    }
}

/// A raw output pointer shared by the parallel head tasks, each of which
/// writes only its own head's rows/columns (disjoint element sets).
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: only used to write disjoint regions from different threads (see
// the callers); `T` is a plain float.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Forward attention; returns `o` (layout of `g`) and the log-sum-exp per
/// query row (`(b·h, sq)`).
pub fn attention_forward<T: Real>(
    g: &AttnGeom,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: f64,
    causal: bool,
) -> Result<(Vec<T>, Vec<f64>)> {
    let (sq, sk, d, dv) = (g.sq, g.sk, g.d, g.dv);
    let n_h = g.tasks();
    if q.len() != n_h * sq * d || k.len() != n_h * sk * d || v.len() != n_h * sk * dv {
        bail!("attention kernel: data sizes do not match {g:?}")
    }
    let mut o = vec![T::ZERO; n_h * sq * dv];
    let mut lse = vec![0f64; n_h * sq];
    if sq == 0 || dv == 0 || sk == 0 {
        return Ok((o, lse));
    }
    let rb = g.rows();
    let par_gemm = n_h < threads();
    let optr = OutPtr(o.as_mut_ptr());
    lse.par_chunks_mut(sq).enumerate().try_for_each_init(
        || vec![T::ZERO; rb * sk],
        |s, (i, lh)| -> Result<()> {
            let (qo, ldq) = g.at(i, sq, d);
            let (ko, ldk) = g.at(i, sk, d);
            let (vo, ldv) = g.at(i, sk, dv);
            let (oo, ldo) = g.at(i, sq, dv);
            let kh = Mat::t(&k[ko..], sk, d).ld(ldk);
            let vh = Mat::n(&v[vo..], sk, dv).ld(ldv);
            let mut r0 = 0;
            while r0 < sq {
                let r1 = (r0 + rb).min(sq);
                let n = r1 - r0;
                let sb = &mut s[..n * sk];
                let q_blk = Mat::n(&q[qo + r0 * ldq..], n, d).ld(ldq);
                matmul(sb, sk, q_blk, kh, false, T::of(scale), par_gemm)?;
                softmax_block(sb, sk, &mut lh[r0..r1], causal, r0);
                // SAFETY: rows r0..r1 of head i's output block (offset oo,
                // row stride ldo, dv columns) belong to this task only.
                unsafe {
                    let out = optr.get().add(oo + r0 * ldo);
                    matmul_ptr(out, ldo, Mat::n(sb, n, sk), vh, false, T::ONE, par_gemm)?;
                }
                r0 = r1;
            }
            Ok(())
        },
    )?;
    Ok((o, lse))
}

/// Gradients `(dq, dk, dv)` of attention (layouts of `g`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    g: &AttnGeom,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[f64],
    d_o: &[T],
    scale: f64,
    causal: bool,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (sq, sk, d, dv) = (g.sq, g.sk, g.d, g.dv);
    let n_h = g.tasks();
    if q.len() != n_h * sq * d
        || k.len() != n_h * sk * d
        || v.len() != n_h * sk * dv
        || o.len() != n_h * sq * dv
        || d_o.len() != o.len()
        || lse.len() != n_h * sq
    {
        bail!("attention kernel backward: data sizes do not match {g:?}")
    }
    let mut dq = vec![T::ZERO; q.len()];
    let mut dk = vec![T::ZERO; k.len()];
    let mut dvv = vec![T::ZERO; v.len()];
    if sq == 0 || sk == 0 || d == 0 || dv == 0 {
        return Ok((dq, dk, dvv));
    }
    let rb = g.rows();
    let par_gemm = n_h < threads();
    let sc = T::of(scale);
    let (dq_p, dk_p, dv_p) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dvv.as_mut_ptr()),
    );
    (0..n_h).into_par_iter().try_for_each_init(
        || (vec![T::ZERO; rb * sk], vec![T::ZERO; rb * sk]),
        |(pbuf, dpbuf), i| -> Result<()> {
            let (qo, ldq) = g.at(i, sq, d);
            let (ko, ldk) = g.at(i, sk, d);
            let (vo, ldv) = g.at(i, sk, dv);
            let (oo, ldo) = g.at(i, sq, dv);
            let lh = &lse[i * sq..(i + 1) * sq];
            let mut r0 = 0;
            while r0 < sq {
                let r1 = (r0 + rb).min(sq);
                let n = r1 - r0;
                let p = &mut pbuf[..n * sk];
                let dp = &mut dpbuf[..n * sk];
                let q_blk = Mat::n(&q[qo + r0 * ldq..], n, d).ld(ldq);
                let do_blk = Mat::n(&d_o[oo + r0 * ldo..], n, dv).ld(ldo);
                // P = exp(scale · Q Kᵀ − lse)
                matmul(
                    p,
                    sk,
                    q_blk,
                    Mat::t(&k[ko..], sk, d).ld(ldk),
                    false,
                    sc,
                    par_gemm,
                )?;
                probs_block(p, sk, &lh[r0..r1], causal, r0);
                // dP = dO Vᵀ ; dS = P ∘ (dP − rowsum(dO ∘ O))
                matmul(
                    dp,
                    sk,
                    do_blk,
                    Mat::t(&v[vo..], sk, dv).ld(ldv),
                    false,
                    T::ONE,
                    par_gemm,
                )?;
                let (ob, dob) = (&o[oo + r0 * ldo..], &d_o[oo + r0 * ldo..]);
                dscores_block(dp, p, sk, ob, dob, dv, ldo);
                // SAFETY: dq rows r0..r1 and all of dk/dv of head i (offsets
                // and strides from `g.at`) are written by this task only.
                unsafe {
                    // dV += Pᵀ dO
                    let pt = Mat::t(p, n, sk);
                    matmul_ptr(dv_p.get().add(vo), ldv, pt, do_blk, true, T::ONE, par_gemm)?;
                    // dQ = scale · dS K ; dK += scale · dSᵀ Q
                    let kn = Mat::n(&k[ko..], sk, d).ld(ldk);
                    let dq_out = dq_p.get().add(qo + r0 * ldq);
                    matmul_ptr(dq_out, ldq, Mat::n(dp, n, sk), kn, false, sc, par_gemm)?;
                    matmul_ptr(
                        dk_p.get().add(ko),
                        ldk,
                        Mat::t(dp, n, sk),
                        q_blk,
                        true,
                        sc,
                        par_gemm,
                    )?;
                }
                r0 = r1;
            }
            Ok(())
        },
    )?;
    Ok((dq, dk, dvv))
}

/// Fused attention custom op over `(q, k, v)`; keeps the log-sum-exp rows.
#[derive(Debug)]
pub struct AttentionOp {
    /// Score scale (usually `1/√head_dim`).
    pub scale: f64,
    /// Mask keys after the query position.
    pub causal: bool,
    /// `Some(heads)`: packed `(b, s, heads·d)` tensors (see [`AttnGeom`]).
    pub heads: Option<usize>,
    lse: Mutex<Option<Vec<f64>>>,
}

impl AttentionOp {
    /// A fresh op (one per call: it stores that call's log-sum-exp rows).
    pub fn new(scale: f64, causal: bool, heads: Option<usize>) -> Self {
        Self {
            scale,
            causal,
            heads,
            lse: Mutex::new(None),
        }
    }

    fn geom(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<AttnGeom> {
        match self.heads {
            Some(h) => AttnGeom::packed(q, k, v, h),
            None => AttnGeom::new(q, k, v),
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "eps2v-attention"
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
        let g = self.geom(l1.dims(), l2.dims(), l3.dims())?;
        fn run<T: Real>(
            op: &AttentionOp,
            g: &AttnGeom,
            a: (&CpuStorage, &Layout),
            b: (&CpuStorage, &Layout),
            c: (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let q = super::slice_of::<T>(a.0, a.1, "attention q")?;
            let k = super::slice_of::<T>(b.0, b.1, "attention k")?;
            let v = super::slice_of::<T>(c.0, c.1, "attention v")?;
            let (o, lse) = attention_forward(g, q, k, v, op.scale, op.causal)?;
            if let Ok(mut s) = op.lse.lock() {
                *s = Some(lse);
            }
            Ok(T::to_cpu_storage_owned(o))
        }
        let out = by_dtype!(s1.dtype(), "attention kernel", |T| run::<T>(
            self,
            &g,
            (s1, l1),
            (s2, l2),
            (s3, l3)
        )?);
        Ok((out, Shape::from(g.out_dims(l1.dims()))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geom(q.dims(), k.dims(), v.dims())?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        fn run<T: Real>(
            op: &AttentionOp,
            g: &AttnGeom,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let lse = match op.lse.lock().ok().and_then(|s| s.clone()) {
                Some(l) => l,
                // Not saved (should not happen): recompute with a forward pass.
                None => with_data::<T, _>(q, "attention q", |qs| {
                    with_data::<T, _>(k, "attention k", |ks| {
                        with_data::<T, _>(v, "attention v", |vs| {
                            Ok(attention_forward(g, qs, ks, vs, op.scale, op.causal)?.1)
                        })
                    })
                })?,
            };
            let (dq, dk, dv) = with_data::<T, _>(q, "attention q", |qs| {
                with_data::<T, _>(k, "attention k", |ks| {
                    with_data::<T, _>(v, "attention v", |vs| {
                        with_data::<T, _>(res, "attention out", |os| {
                            with_data::<T, _>(grad, "attention grad", |gs| {
                                attention_backward(g, qs, ks, vs, os, &lse, gs, op.scale, op.causal)
                            })
                        })
                    })
                })
            })?;
            Ok((
                tensor_from(dq, q.dims())?,
                tensor_from(dk, k.dims())?,
                tensor_from(dv, v.dims())?,
            ))
        }
        let (dq, dk, dv) = by_dtype!(q.dtype(), "attention kernel backward", |T| run::<T>(
            self, &g, q, k, v, &res, &grad
        )?);
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

/// Differentiable fused attention on CPU f32/f64 tensors:
/// `q (..., sq, d)`, `k (..., sk, d)`, `v (..., sk, dv)` → `(..., sq, dv)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let q = q.contiguous()?;
    let k = k.to_dtype(q.dtype())?.contiguous()?;
    let v = v.to_dtype(q.dtype())?.contiguous()?;
    q.apply_op3(&k, &v, AttentionOp::new(scale, causal, None))
}

/// [`attention`] on packed heads: `q (b, sq, heads·d)`, `k (b, sk, heads·d)`,
/// `v (b, sk, heads·dv)` → `(b, sq, heads·dv)`, i.e. straight from and to
/// the projections, with no head split/merge (each of those is a copy in
/// the forward and two more passes in candle's backward).
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let k = k.to_dtype(q.dtype())?.contiguous()?;
    let v = v.to_dtype(q.dtype())?.contiguous()?;
    q.apply_op3(&k, &v, AttentionOp::new(scale, causal, Some(heads)))
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
