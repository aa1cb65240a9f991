//! The im2col / col2im layout of [`super`]'s convolutions: the input
//! patches of one sample as a `(cin·kh·kw, oh·ow)` matrix for the GEMM,
//! its adjoint for the input gradient, and the blocked transpose the
//! weight gradient's GEMM reads.

use super::ConvGeom;
use crate::nn::kernels::Real;

/// Row length up to which callers zero the whole im2col block with one fill
/// before [`im2col`] (`zeroed`): the toy UNet's 8×8 latents make rows of
/// 64, where two short memset calls per im2col row (the padding) cost more
/// than the zeros they write (3 % of a step, perf at stop 26).
const SMALL_ROWS: usize = 256;

/// Zero `col` in one fill when its rows (of `row` elements) are short;
/// returns whether it did (pass that to [`im2col`] as `zeroed`).
pub(super) fn zero_small<T: Real>(col: &mut [T], row: usize) -> bool {
    let small = row <= SMALL_ROWS;
    if small {
        col.fill(T::ZERO);
    }
    small
}

/// Fill `col (k, (r1−r0)·ow)` (row stride `ld`) with the im2col matrix of
/// one sample for output rows `r0..r1`. With `zeroed` the caller has zeroed
/// those rows and only the input values are written.
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col<T: Real>(
    g: &ConvGeom,
    x: &[T],
    col: &mut [T],
    ld: usize,
    r0: usize,
    r1: usize,
    zeroed: bool,
) {
    let nt = (r1 - r0) * g.ow;
    let s = g.stride;
    if s == 1 && g.ow == g.w {
        im2col_same(g, x, col, ld, r0, r1, zeroed);
        return;
    }
    for ci in 0..g.cin {
        let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ld..row * ld + nt];
                let (lo, hi) = g.valid_cols(kj);
                for oh in r0..r1 {
                    let d = &mut dst[(oh - r0) * g.ow..(oh - r0 + 1) * g.ow];
                    let ih = (oh * s + ki) as isize - g.pad as isize;
                    if ih < 0 || ih >= g.h as isize || lo >= hi {
                        if !zeroed {
                            d.fill(T::ZERO);
                        }
                        continue;
                    }
                    let xr = &xc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    if !zeroed {
                        d[..lo].fill(T::ZERO);
                        d[hi..].fill(T::ZERO);
                    }
                    let iw0 = lo * s + kj - g.pad;
                    if s == 1 {
                        d[lo..hi].copy_from_slice(&xr[iw0..iw0 + (hi - lo)]);
                    } else {
                        for (o, v) in d[lo..hi].iter_mut().zip(xr[iw0..].iter().step_by(s)) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] for stride-1 convolutions whose output width equals the input
/// width ("same" padding, e.g. 3×3 pad 1): each im2col row is the input
/// plane shifted by `(ki − pad)·w + (kj − pad)`, so it is one contiguous copy
/// plus zeroing of the wrapped-around edge columns (instead of one short copy
/// per output row).
fn im2col_same<T: Real>(
    g: &ConvGeom,
    x: &[T],
    col: &mut [T],
    ld: usize,
    r0: usize,
    r1: usize,
    zeroed: bool,
) {
    let (w, hw) = (g.w, g.h * g.w);
    let nt = (r1 - r0) * w;
    let (n0, n1) = ((r0 * w) as isize, (r1 * w) as isize);
    for ci in 0..g.cin {
        let xc = &x[ci * hw..(ci + 1) * hw];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ld..row * ld + nt];
                let shift =
                    (ki as isize - g.pad as isize) * w as isize + kj as isize - g.pad as isize;
                // Output positions n in [lo, hi) read x[n + shift]; the rest are zero.
                let lo = n0.max(-shift).min(n1);
                let hi = n1.min(hw as isize - shift).max(lo);
                let (a, b) = ((lo - n0) as usize, (hi - n0) as usize);
                if !zeroed {
                    dst[..a].fill(T::ZERO);
                    dst[b..].fill(T::ZERO);
                }
                if b > a {
                    let src0 = (lo + shift) as usize;
                    dst[a..b].copy_from_slice(&xc[src0..src0 + (b - a)]);
                }
                // Columns whose input column iw = ow + kj − pad falls outside [0, w)
                // (one column for 3×3 pad 1: a plain store, not a memset call per row).
                // (At most the whole row: a 5×5 pad 2 kernel on a row one
                // column wide is all padding.)
                if kj < g.pad {
                    let c = (g.pad - kj).min(w);
                    for r in dst.chunks_mut(w) {
                        for v in &mut r[..c] {
                            *v = T::ZERO;
                        }
                    }
                } else if kj > g.pad {
                    let c = (kj - g.pad).min(w);
                    for r in dst.chunks_mut(w) {
                        for v in &mut r[w - c..] {
                            *v = T::ZERO;
                        }
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// `dst[j·ldd + i] = src[i·lds + j]` for `i < rows`, `j < cols`, in 8×8
    /// blocks (the transposed im2col matrix of the weight gradient: it makes
    /// the GEMM's right operand row-major, so gemm packs it with contiguous
    /// copies instead of a strided gather).
    pub(super) fn transpose_into<T: Real>(src: &[T], rows: usize, cols: usize, lds: usize, dst: &mut [T], ldd: usize) {
        let mut i0 = 0;
        while i0 + 8 <= rows {
            let mut j0 = 0;
            while j0 + 8 <= cols {
                let mut blk = [[T::ZERO; 8]; 8];
                for (a, row) in blk.iter_mut().enumerate() {
                    row.copy_from_slice(&src[(i0 + a) * lds + j0..(i0 + a) * lds + j0 + 8]);
                }
                for b in 0..8 {
                    let d = &mut dst[(j0 + b) * ldd + i0..(j0 + b) * ldd + i0 + 8];
                    for a in 0..8 {
                        d[a] = blk[a][b];
                    }
                }
                j0 += 8;
            }
            for a in 0..8 {
                for j in j0..cols {
                    dst[j * ldd + i0 + a] = src[(i0 + a) * lds + j];
                }
            }
            i0 += 8;
        }
        for i in i0..rows {
            for j in 0..cols {
                dst[j * ldd + i] = src[i * lds + j];
            }
        }
    }
}

/// Accumulate `dcol (k, (r1−r0)·ow)` (row stride `ld`) into the input
/// gradient `dx` of one sample (the adjoint of [`im2col`]).
pub(super) fn col2im<T: Real>(
    g: &ConvGeom,
    dcol: &[T],
    ld: usize,
    dx: &mut [T],
    r0: usize,
    r1: usize,
) {
    let nt = (r1 - r0) * g.ow;
    let s = g.stride;
    for ci in 0..g.cin {
        let dxc = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let src = &dcol[row * ld..row * ld + nt];
                let (lo, hi) = g.valid_cols(kj);
                if lo >= hi {
                    continue;
                }
                for oh in r0..r1 {
                    let ih = (oh * s + ki) as isize - g.pad as isize;
                    if ih < 0 || ih >= g.h as isize {
                        continue;
                    }
                    let sr = &src[(oh - r0) * g.ow + lo..(oh - r0) * g.ow + hi];
                    let xr = &mut dxc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let iw0 = lo * s + kj - g.pad;
                    if s == 1 {
                        for (o, v) in xr[iw0..iw0 + (hi - lo)].iter_mut().zip(sr) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in xr[iw0..].iter_mut().step_by(s).zip(sr) {
                            *o += *v;
                        }
                    }
                }
            }
        }
    }
}
