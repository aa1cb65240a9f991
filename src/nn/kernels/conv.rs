//! 2-D convolution (any square-or-not kernel, stride, symmetric zero
//! padding, no groups/dilation) as a candle custom op with a backward pass,
//! via im2col + GEMM.
//!
//! Forward: `y[b] (cout, oh·ow) = W (cout, cin·kh·kw) · col(x[b]) + bias`.
//! Backward: `dW += dy[b] · col(x[b])ᵀ`, `db = Σ dy`, and `dx` either as the
//! convolution of `dy` with the flipped, transposed kernel (stride 1: deep
//! GEMMs, no scatter) or as `col2im(Wᵀ · dy[b])` (strided convs).
//! 1×1 stride-1 unpadded convolutions skip im2col entirely.
//! The batch is split into one chunk per rayon thread (each with its own
//! im2col scratch and dW partial, reduced at the end); within a chunk, small
//! images are processed several samples at a time (their im2col matrices
//! side by side, so one GEMM has n = samples·oh·ow); with fewer samples than
//! threads the GEMMs themselves run in parallel. Large images are tiled over
//! output rows so that the scratch stays ≤ [`COL_BUDGET`] elements per
//! thread even for SDXL-sized activations.
//!
//! Reference: the composite `candle_core::Tensor::conv2d` (tests compare
//! against it) and the textbook im2col formulation (Chellapilla et al. 2006,
//! as in Caffe/PyTorch's `slow_conv2d`).

mod im2col;

use super::{
    give_scratch, matmul, take_scratch, tensor_from, threads, with_data, Mat, Real, SUM_PIECES,
};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use im2col::{col2im, im2col, transpose_into, zero_small};
use rayon::prelude::*;

/// Largest im2col tile, in elements, per thread (512 KiB of f32: the tile
/// and the GEMM's packed copy of it stay in a core's L2; with 4 MiB tiles
/// the `gemm` crate ran 2–3× slower on the toy UNet's 32-channel convs).
pub const COL_BUDGET: usize = 1 << 17;

/// Below this many output channels the weight gradient is computed from a
/// transposed im2col copy (`dy · colᵀ`); from it on, as `dWᵀ = col · dyᵀ`
/// straight from the im2col tile (no copy; faster there, much slower for
/// very few channels).
const DWT_MIN_COUT: usize = 16;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch.
    pub b: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeom {
    /// Validate shapes `x (b, cin, h, w)` and `w (cout, cin, kh, kw)`.
    pub fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, cin, h, wd], &[cout, cin2, kh, kw]) = (x, w) else {
            bail!("conv2d kernel: expected x (b, c, h, w) and weight (out, in, kh, kw), got {x:?} and {w:?}")
        };
        if cin != cin2 {
            bail!("conv2d kernel: input has {cin} channels but the weight expects {cin2}")
        }
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            bail!("conv2d kernel: kernel {kh}x{kw} stride {stride} padding {pad} does not fit input {h}x{wd}")
        }
        Ok(Self {
            b,
            cin,
            h,
            w: wd,
            cout,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (wd + 2 * pad - kw) / stride + 1,
        })
    }

    /// im2col rows: `cin · kh · kw`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// Output pixels per channel.
    fn n(&self) -> usize {
        self.oh * self.ow
    }
    /// Input elements per sample.
    fn in_per(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// Output elements per sample.
    fn out_per(&self) -> usize {
        self.cout * self.n()
    }
    /// 1×1, stride 1, no padding: the input already is the im2col matrix.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Output rows per im2col tile.
    fn tile_rows(&self) -> usize {
        if self.direct() {
            self.oh.max(1)
        } else {
            (COL_BUDGET / (self.k() * self.ow).max(1)).clamp(1, self.oh.max(1))
        }
    }
    /// Samples whose im2col matrices are concatenated into one GEMM (≥ 1;
    /// 1 means the per-sample, row-tiled path).
    fn group(&self, samples: usize) -> usize {
        if self.direct() {
            1
        } else {
            (COL_BUDGET / (self.k() * self.n()).max(1)).clamp(1, samples.max(1))
        }
    }
    /// For stride 1 with `pad ≤ k − 1` and a square kernel, the input
    /// gradient is itself a convolution of `dy` with the flipped, transposed
    /// kernel and padding `k − 1 − pad`; returns that geometry.
    fn transposed(&self) -> Option<ConvGeom> {
        if self.direct() || self.stride != 1 || self.kh != self.kw || self.pad + 1 > self.kh {
            return None;
        }
        let t = ConvGeom::new(
            &[self.b, self.cout, self.oh, self.ow],
            &[self.cin, self.cout, self.kh, self.kw],
            1,
            self.kh - 1 - self.pad,
        )
        .ok()?;
        (t.oh == self.h && t.ow == self.w).then_some(t)
    }
    /// Range of output columns `ow` whose input column `ow·s + kj − pad`
    /// lies inside `[0, w)`.
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if kj >= self.pad {
            0
        } else {
            (self.pad - kj).div_ceil(s)
        };
        let hi = if self.w + self.pad > kj {
            (self.w + self.pad - kj).div_ceil(s).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
    /// Output shape `(b, cout, oh, ow)`.
    pub fn out_dims(&self) -> [usize; 4] {
        [self.b, self.cout, self.oh, self.ow]
    }
}

/// Split `b` samples into at most `pieces` contiguous chunks; returns the
/// chunk size and whether the GEMMs should themselves run in parallel
/// (fewer chunks than threads).
fn batch_split(b: usize, pieces: usize) -> (usize, bool) {
    let chunks = b.clamp(1, pieces.max(1));
    (b.div_ceil(chunks).max(1), chunks < threads())
}

/// Forward convolution of contiguous `x`, `w` (and `bias`), returning
/// `y (b, cout, oh, ow)` row-major.
pub fn forward<T: Real>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
    let (k, n) = (g.k(), g.n());
    if x.len() != g.b * g.in_per() || w.len() != g.cout * k {
        bail!("conv2d kernel: data sizes do not match shapes {g:?}")
    }
    if let Some(bs) = bias {
        if bs.len() != g.cout {
            bail!(
                "conv2d kernel: bias has {} entries for {} output channels",
                bs.len(),
                g.cout
            )
        }
    }
    let mut y = vec![T::ZERO; g.b * g.out_per()];
    if y.is_empty() {
        return Ok(y);
    }
    let (chunk, par_gemm) = batch_split(g.b, threads());
    let tr = g.tile_rows();
    let nb = g.group(chunk);
    let col_len = match (g.direct(), nb) {
        (true, _) => 0,
        (false, 1) => k * tr * g.ow,
        (false, _) => k * nb * n,
    };
    let acc = bias.is_some();
    y.par_chunks_mut(chunk * g.out_per())
        .zip(x.par_chunks(chunk * g.in_per()))
        .try_for_each(|(yc, xc)| -> Result<()> {
            let mut col = take_scratch::<T>(col_len);
            let mut out = take_scratch::<T>(if nb > 1 { g.cout * nb * n } else { 0 });
            let ns = xc.len() / g.in_per();
            let mut s0 = 0;
            while s0 < ns {
                let m = nb.min(ns - s0);
                if m > 1 {
                    // Several samples side by side: one (cout × m·n) GEMM.
                    let ld = m * n;
                    let z = zero_small(&mut col[..k * ld], n);
                    for j in 0..m {
                        let xs = &xc[(s0 + j) * g.in_per()..(s0 + j + 1) * g.in_per()];
                        im2col(g, xs, &mut col[j * n..], ld, 0, g.oh, z);
                    }
                    let o = &mut out[..g.cout * ld];
                    if let Some(bs) = bias {
                        for (row, &bv) in o.chunks_mut(ld).zip(bs) {
                            row.fill(bv);
                        }
                    }
                    let cm = Mat::n(&col[..k * ld], k, ld);
                    matmul(o, ld, Mat::n(w, g.cout, k), cm, acc, T::ONE, par_gemm)?;
                    for j in 0..m {
                        let ys = &mut yc[(s0 + j) * g.out_per()..(s0 + j + 1) * g.out_per()];
                        for (c, yr) in ys.chunks_mut(n).enumerate() {
                            yr.copy_from_slice(&o[c * ld + j * n..c * ld + (j + 1) * n]);
                        }
                    }
                    s0 += m;
                    continue;
                }
                let ys = &mut yc[s0 * g.out_per()..(s0 + 1) * g.out_per()];
                let xs = &xc[s0 * g.in_per()..(s0 + 1) * g.in_per()];
                s0 += 1;
                if let Some(bs) = bias {
                    for (row, &bv) in ys.chunks_mut(n).zip(bs) {
                        row.fill(bv);
                    }
                }
                if g.direct() {
                    let xm = Mat::n(xs, k, n);
                    matmul(ys, n, Mat::n(w, g.cout, k), xm, acc, T::ONE, par_gemm)?;
                    continue;
                }
                let mut r0 = 0;
                while r0 < g.oh {
                    let r1 = (r0 + tr).min(g.oh);
                    let nt = (r1 - r0) * g.ow;
                    let z = zero_small(&mut col[..k * nt], nt);
                    im2col(g, xs, &mut col[..k * nt], nt, r0, r1, z);
                    let cm = Mat::n(&col[..k * nt], k, nt);
                    matmul(
                        &mut ys[r0 * g.ow..],
                        n,
                        Mat::n(w, g.cout, k),
                        cm,
                        acc,
                        T::ONE,
                        par_gemm,
                    )?;
                    r0 = r1;
                }
            }
            give_scratch(col);
            give_scratch(out);
            Ok(())
        })?;
    Ok(y)
}

/// Gradients of a convolution: `(dx, dw, db)`, each computed only when asked.
pub struct ConvGrads<T> {
    /// `(b, cin, h, w)`
    pub dx: Option<Vec<T>>,
    /// `(cout, cin, kh, kw)`
    pub dw: Option<Vec<T>>,
    /// `(cout,)`
    pub db: Option<Vec<T>>,
}

/// `w [cout, cin, kh, kw]` → `w' [cin, cout, kh, kw]` with both spatial axes
/// flipped (the kernel of the transposed convolution).
fn flip_transpose<T: Real>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut out = vec![T::ZERO; w.len()];
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * kk..(co * g.cin + ci + 1) * kk];
            let dst = &mut out[(ci * g.cout + co) * kk..(ci * g.cout + co + 1) * kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
}

/// Backward convolution: from `x`, `w` and the output gradient `dy`.
pub fn backward<T: Real>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    need: [bool; 3],
) -> Result<ConvGrads<T>> {
    let [need_dx, need_dw, need_db] = need;
    let (k, n) = (g.k(), g.n());
    if x.len() != g.b * g.in_per() || w.len() != g.cout * k || dy.len() != g.b * g.out_per() {
        bail!("conv2d kernel backward: data sizes do not match shapes {g:?}")
    }
    // Stride 1: dx is a plain convolution of dy (deep GEMMs, no col2im).
    let dx_conv = if need_dx { g.transposed() } else { None };
    let dx_col2im = need_dx && dx_conv.is_none();
    // Partial weight gradients are accumulated as dWᵀ (k, cout) on this path.
    let dwt_path = !g.direct() && g.cout >= DWT_MIN_COUT;
    // The partial dW / db of each chunk are summed below: chunks as for
    // SUM_PIECES threads, so that the sums do not depend on the pool.
    let (chunk, par_gemm) = batch_split(g.b, SUM_PIECES);
    let nchunks = g.b.div_ceil(chunk).max(1);
    let tr = g.tile_rows();
    let nb = if need_dw || dx_col2im {
        g.group(chunk)
    } else {
        1
    };
    let tile = match (g.direct(), nb) {
        (true, _) => 0,
        (false, 1) => k * tr * g.ow,
        (false, _) => k * nb * n,
    };
    let mut dx = if dx_col2im {
        vec![T::ZERO; g.b * g.in_per()]
    } else {
        Vec::new()
    };
    let dx_chunks: Vec<Option<&mut [T]>> = if dx_col2im && !dx.is_empty() {
        dx.chunks_mut(chunk * g.in_per()).map(Some).collect()
    } else {
        (0..nchunks).map(|_| None).collect()
    };
    let partials = dx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(ci, mut dxc)| -> Result<(Vec<T>, Vec<T>)> {
            let mut dw = vec![T::ZERO; if need_dw { g.cout * k } else { 0 }];
            let mut db = vec![T::ZERO; if need_db { g.cout } else { 0 }];
            let mut col = take_scratch::<T>(if need_dw { tile } else { 0 });
            // One sample's (or tile's) im2col before its transposition into `col`.
            let mut colt = take_scratch::<T>(if need_dw && !dwt_path {
                k * tr * g.ow
            } else {
                0
            });
            let mut dcol = take_scratch::<T>(if dx_col2im { tile } else { 0 });
            let mut dycat = take_scratch::<T>(if nb > 1 { g.cout * nb * n } else { 0 });
            let s_begin = ci * chunk;
            let s_end = (s_begin + chunk).min(g.b);
            if need_db {
                for s in s_begin..s_end {
                    let dys = &dy[s * g.out_per()..(s + 1) * g.out_per()];
                    for (acc, row) in db.iter_mut().zip(dys.chunks(n)) {
                        *acc += row.iter().copied().sum::<T>();
                    }
                }
            }
            if !need_dw && !dx_col2im {
                return Ok((dw, db));
            }
            let mut s = s_begin;
            while s < s_end {
                let m = nb.min(s_end - s);
                if m > 1 {
                    // Several samples side by side: dy_cat (cout × m·n).
                    let ld = m * n;
                    for j in 0..m {
                        let dys = &dy[(s + j) * g.out_per()..(s + j + 1) * g.out_per()];
                        for (c, row) in dys.chunks(n).enumerate() {
                            dycat[c * ld + j * n..c * ld + (j + 1) * n].copy_from_slice(row);
                        }
                    }
                    let dym = Mat::n(&dycat[..g.cout * ld], g.cout, ld);
                    if need_dw && dwt_path {
                        let z = zero_small(&mut col[..k * ld], n);
                        for j in 0..m {
                            let xs = &x[(s + j) * g.in_per()..(s + j + 1) * g.in_per()];
                            im2col(g, xs, &mut col[j * n..], ld, 0, g.oh, z);
                        }
                        // dWᵀ (k, cout) += col_cat (k, m·n) · dy_catᵀ (m·n, cout)
                        let cm = Mat::n(&col[..k * ld], k, ld);
                        let dyt = Mat::t(&dycat[..g.cout * ld], g.cout, ld);
                        matmul(&mut dw, g.cout, cm, dyt, true, T::ONE, par_gemm)?;
                    } else if need_dw {
                        for j in 0..m {
                            let xs = &x[(s + j) * g.in_per()..(s + j + 1) * g.in_per()];
                            let z = zero_small(&mut colt[..k * n], n);
                            im2col(g, xs, &mut colt[..k * n], n, 0, g.oh, z);
                            transpose_into(
                                &colt[..k * n],
                                k,
                                n,
                                n,
                                &mut col[j * n * k..(j + 1) * n * k],
                                k,
                            );
                        }
                        // dW (cout, k) += dy_cat (cout, m·n) · col_catᵀ (m·n, k)
                        let cm = Mat::n(&col[..k * ld], ld, k);
                        matmul(&mut dw, k, dym, cm, true, T::ONE, par_gemm)?;
                    }
                    if let Some(d) = dxc.as_deref_mut() {
                        // dcol_cat (k, m·n) = Wᵀ (k, cout) · dy_cat (cout, m·n)
                        let wt = Mat::t(w, g.cout, k);
                        matmul(&mut dcol[..k * ld], ld, wt, dym, false, T::ONE, par_gemm)?;
                        for j in 0..m {
                            let o = (s + j - s_begin) * g.in_per();
                            col2im(g, &dcol[j * n..], ld, &mut d[o..o + g.in_per()], 0, g.oh);
                        }
                    }
                    s += m;
                    continue;
                }
                let xs = &x[s * g.in_per()..(s + 1) * g.in_per()];
                let dys = &dy[s * g.out_per()..(s + 1) * g.out_per()];
                let o = (s - s_begin) * g.in_per();
                let mut dxs = dxc.as_deref_mut().map(|d| &mut d[o..o + g.in_per()]);
                s += 1;
                if g.direct() {
                    if need_dw {
                        // dW (cout, cin) += dy (cout, n) · xᵀ (n, cin)
                        let xm = Mat::t(xs, k, n);
                        matmul(
                            &mut dw,
                            k,
                            Mat::n(dys, g.cout, n),
                            xm,
                            true,
                            T::ONE,
                            par_gemm,
                        )?;
                    }
                    if let Some(d) = dxs.as_deref_mut() {
                        // dx (cin, n) = Wᵀ (cin, cout) · dy (cout, n)
                        let wt = Mat::t(w, g.cout, k);
                        matmul(d, n, wt, Mat::n(dys, g.cout, n), false, T::ONE, par_gemm)?;
                    }
                    continue;
                }
                let mut r0 = 0;
                while r0 < g.oh {
                    let r1 = (r0 + tr).min(g.oh);
                    let nt = (r1 - r0) * g.ow;
                    let dyt = Mat::n(&dys[r0 * g.ow..], g.cout, nt).ld(n);
                    if need_dw && dwt_path {
                        let z = zero_small(&mut col[..k * nt], nt);
                        im2col(g, xs, &mut col[..k * nt], nt, r0, r1, z);
                        // dWᵀ (k, cout) += col (k, nt) · dy_tileᵀ (nt, cout)
                        let cm = Mat::n(&col[..k * nt], k, nt);
                        let dytt = Mat::t(&dys[r0 * g.ow..], g.cout, nt).ld(n);
                        matmul(&mut dw, g.cout, cm, dytt, true, T::ONE, par_gemm)?;
                    } else if need_dw {
                        let z = zero_small(&mut colt[..k * nt], nt);
                        im2col(g, xs, &mut colt[..k * nt], nt, r0, r1, z);
                        transpose_into(&colt[..k * nt], k, nt, nt, &mut col[..k * nt], k);
                        // dW (cout, k) += dy_tile (cout, nt) · colᵀ (nt, k)
                        let cm = Mat::n(&col[..k * nt], nt, k);
                        matmul(&mut dw, k, dyt, cm, true, T::ONE, par_gemm)?;
                    }
                    if let Some(d) = dxs.as_deref_mut() {
                        // dcol (k, nt) = Wᵀ (k, cout) · dy_tile (cout, nt)
                        let wt = Mat::t(w, g.cout, k);
                        matmul(&mut dcol[..k * nt], nt, wt, dyt, false, T::ONE, par_gemm)?;
                        col2im(g, &dcol[..k * nt], nt, d, r0, r1);
                    }
                    r0 = r1;
                }
            }
            for b in [col, colt, dcol, dycat] {
                give_scratch(b);
            }
            Ok((dw, db))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut parts = partials.into_iter();
    let (mut dw, mut db) = parts.next().unwrap_or_default();
    for (pw, pb) in parts {
        for (a, b) in dw.iter_mut().zip(pw) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(pb) {
            *a += b;
        }
    }
    if dwt_path && !dw.is_empty() {
        // dWᵀ (k, cout) → dW (cout, k)
        let mut t = vec![T::ZERO; dw.len()];
        transpose_into(&dw, k, g.cout, g.cout, &mut t, k);
        dw = t;
    }
    let dx = match dx_conv {
        Some(gt) => Some(forward(&gt, dy, &flip_transpose(g, w), None)?),
        None => need_dx.then_some(dx),
    };
    Ok(ConvGrads {
        dx,
        dw: need_dw.then(|| {
            if dw.is_empty() {
                vec![T::ZERO; g.cout * k]
            } else {
                dw
            }
        }),
        db: need_db.then(|| {
            if db.is_empty() {
                vec![T::ZERO; g.cout]
            } else {
                db
            }
        }),
    })
}

/// Convolution custom op; `bias` selects the 3-input (x, w, b) form.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub padding: usize,
}

impl Conv2dOp {
    fn fwd_dtype(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::new(x.1.dims(), w.1.dims(), self.stride, self.padding)?;
        fn run<T: Real>(
            g: &ConvGeom,
            x: (&CpuStorage, &Layout),
            w: (&CpuStorage, &Layout),
            b: Option<(&CpuStorage, &Layout)>,
        ) -> Result<CpuStorage> {
            let xs = super::slice_of::<T>(x.0, x.1, "conv2d x")?;
            let ws = super::slice_of::<T>(w.0, w.1, "conv2d weight")?;
            let bs = b
                .map(|b| super::slice_of::<T>(b.0, b.1, "conv2d bias"))
                .transpose()?;
            Ok(T::to_cpu_storage_owned(forward(g, xs, ws, bs)?))
        }
        let out = by_dtype!(x.0.dtype(), "conv2d kernel", |T| run::<T>(&g, x, w, b)?);
        Ok((out, Shape::from(g.out_dims().to_vec())))
    }

    fn bwd_any(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = ConvGeom::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let grad = grad.contiguous()?;
        let need = [x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op())];
        fn run<T: Real>(
            g: &ConvGeom,
            x: &Tensor,
            w: &Tensor,
            grad: &Tensor,
            need: [bool; 3],
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let gr = with_data::<T, _>(x, "conv2d x", |xs| {
                with_data::<T, _>(w, "conv2d weight", |ws| {
                    with_data::<T, _>(grad, "conv2d grad", |gs| backward(g, xs, ws, gs, need))
                })
            })?;
            let dx = gr
                .dx
                .map(|d| tensor_from(d, &[g.b, g.cin, g.h, g.w]))
                .transpose()?;
            let dw = gr
                .dw
                .map(|d| tensor_from(d, &[g.cout, g.cin, g.kh, g.kw]))
                .transpose()?;
            let db = gr.db.map(|d| tensor_from(d, &[g.cout])).transpose()?;
            Ok((dx, dw, db))
        }
        by_dtype!(x.dtype(), "conv2d kernel backward", |T| run::<T>(
            &g, x, w, &grad, need
        ))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "eps2v-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd_dtype((s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.bwd_any(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "eps2v-conv2d-bias"
    }
    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd_dtype((s1, l1), (s2, l2), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.bwd_any(x, w, Some(b), grad)
    }
}

/// Differentiable conv2d on CPU f32/f64 tensors: `x (b, cin, h, w)`,
/// `w [cout, cin, kh, kw]`, optional `bias [cout]` → `(b, cout, oh, ow)`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = Conv2dOp { stride, padding };
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    match bias {
        Some(b) => {
            let b = b.to_dtype(x.dtype())?.contiguous()?;
            x.apply_op3(&w, &b, op)
        }
        None => x.apply_op2(&w, op),
    }
}

#[cfg(test)]
#[path = "conv_tests.rs"]
mod tests;
