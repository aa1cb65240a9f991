//! Batch-invariant GEMM shapes: every call of [`super::gemm_raw`] computes
//! each output element with the same arithmetic whatever the other rows and
//! columns of the call are, so a sample's result does not depend on which
//! batch it was run in (issue 13: a seed's pixels must be the same at any
//! batch size and position when images are batched through the UNet).
//!
//! Why this is needed: the `gemm` crate (0.19, `gemm-common/src/gemm.rs`)
//! picks its algorithm from the shape. Its blocked micro-kernel path sums
//! each element as an FMA chain over k in blocks of `kc`, where `kc` depends
//! on k alone in the general case (`gemm_common::cache::kernel_params`) —
//! position-independent. But it leaves that path for
//! - `m·n ≤ 256` with a unit-stride lhs row and rhs column: a "horizontal"
//!   dot-product kernel (different summation order);
//! - `m ≤ 1` or `n ≤ 1`: GEMV kernels;
//! - `m ≤ 64 && n ≤ 64`: `kc = min(k, 512)` instead of the cache-derived
//!   split, which differs once `k > 512`;
//! - a destination with one column is not transposed internally like the
//!   others.
//!
//! With a batch in the rows (linear layers: `m = batch·tokens`) or columns
//! (convolutions whose im2col matrices of several samples sit side by side),
//! the batch size moves a call between these regimes — measured on the tiny
//! UNet: the same latent differed by ~1e-6 between batch 1 and 2. So a call
//! in one of those regimes is run on a zero-padded copy that is outside all
//! of them ([`padded_dims`]); the padding rows/columns are dropped
//! afterwards. Only small GEMMs are affected (a few hundred rows at most),
//! so the copies cost nothing measurable; large GEMMs are untouched.

use super::{threads, Real};

/// Shape `(m', n')` (≥ `(m, n)`) at which a GEMM of `m×k · k×n` takes the
/// `gemm` crate's blocked path with the k-only `kc`; equal to `(m, n)` when
/// no padding is needed. `lhs_unit_col` / `rhs_unit_row`: the lhs has unit
/// column stride, the rhs unit row stride (together, the horizontal
/// kernel's condition). A padded lhs is laid out row-major (unit column
/// stride), a padded rhs row-major with row stride `n' ≥ 2`.
pub(crate) fn padded_dims(
    m: usize,
    n: usize,
    k: usize,
    lhs_unit_col: bool,
    rhs_unit_row: bool,
) -> (usize, usize) {
    let np = n.max(2);
    let mut mp = m.max(2);
    if k > 512 && mp <= 64 && np <= 64 {
        mp = 65;
    }
    // After padding, an operand keeps its strides only when it was not copied.
    let rhs_unit = np == n && rhs_unit_row;
    let lhs_unit = mp != m || lhs_unit_col;
    if lhs_unit && rhs_unit && mp * np <= 256 {
        // Growing m copies the lhs (unit stride), so only the size can help.
        mp = mp.max(256 / np + 1);
    }
    (mp, np)
}

/// `dst (m×n) = [dst +] beta · lhs · rhs` computed at the padded shape
/// `(mp, np)` from [`padded_dims`]: copies of lhs (rows m..mp zero), rhs
/// (columns n..np zero) and dst, then the `m×n` block is written back.
///
/// # Safety
/// As [`super::gemm_raw`]: the pointers are valid for the ranges the
/// strides and sizes describe and `dst` does not alias `lhs`/`rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_padded<T: Real>(
    (m, n, k): (usize, usize, usize),
    (mp, np): (usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    beta: T,
    parallel: bool,
) {
    let mut a = vec![T::ZERO; mp * k]; // (mp, k) row-major
    for i in 0..m {
        for p in 0..k {
            a[i * k + p] = *lhs.add(i * lhs_rs + p * lhs_cs);
        }
    }
    let b_copy;
    let (b_ptr, b_rs, b_cs) = if np != n {
        let mut b = vec![T::ZERO; k * np]; // (k, np) row-major
        for p in 0..k {
            for j in 0..n {
                b[p * np + j] = *rhs.add(p * rhs_rs + j * rhs_cs);
            }
        }
        b_copy = b;
        (b_copy.as_ptr(), np, 1)
    } else {
        (rhs, rhs_rs, rhs_cs)
    };
    let mut d = vec![T::ZERO; mp * np]; // (mp, np) row-major
    if accumulate {
        for i in 0..m {
            for j in 0..n {
                d[i * np + j] = *dst.add(i * dst_rs + j * dst_cs);
            }
        }
    }
    let par = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        mp,
        np,
        k,
        d.as_mut_ptr(),
        1,
        np as isize,
        accumulate,
        a.as_ptr(),
        1,
        k as isize,
        b_ptr,
        b_cs as isize,
        b_rs as isize,
        T::ONE,
        beta,
        false,
        false,
        false,
        par,
    );
    for i in 0..m {
        for j in 0..n {
            *dst.add(i * dst_rs + j * dst_cs) = d[i * np + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{matmul, Mat};
    use super::*;

    #[test]
    fn padded_dims_leave_every_special_regime() {
        for m in [1usize, 2, 4, 8, 40, 64, 65, 100] {
            for n in [1usize, 2, 3, 8, 32, 64, 65, 300] {
                for k in [3usize, 64, 512, 513, 2000] {
                    for (lu, ru) in [(true, true), (true, false), (false, true), (false, false)] {
                        let (mp, np) = padded_dims(m, n, k, lu, ru);
                        assert!(mp >= m.max(2) && np >= n.max(2), "{m}x{n}");
                        let lhs_unit = mp != m || lu;
                        let rhs_unit = np == n && ru;
                        let case = format!("m {m} n {n} k {k} units {lu} {ru} -> {mp}x{np}");
                        assert!(
                            !(mp * np <= 256 && lhs_unit && rhs_unit),
                            "horizontal: {case}"
                        );
                        assert!(!(k > 512 && mp <= 64 && np <= 64), "small kc: {case}");
                    }
                }
            }
        }
        // Already in the general regime: untouched.
        assert_eq!(padded_dims(64, 64, 64, true, true), (64, 64));
        assert_eq!(padded_dims(100, 3, 600, false, false), (100, 3));
        assert_eq!(padded_dims(4, 64, 64, false, true), (4, 64));
    }

    /// Regression (issue 13): a row's linear output depended on how many
    /// other rows were in the call (horizontal / GEMV / small-kc kernels).
    #[test]
    fn rows_get_the_same_bits_in_any_call() {
        let rand = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as f32 * 0.7311 + seed as f32).sin() * 43758.547).fract())
                .collect()
        };
        for (n, k) in [(64usize, 64usize), (16, 600), (1, 40), (300, 2000)] {
            let rows = 9;
            let x = rand(rows * k, 1);
            let w = rand(n * k, 2);
            let mut all = vec![0f32; rows * n];
            matmul(
                &mut all,
                n,
                Mat::n(&x, rows, k),
                Mat::t(&w, n, k),
                false,
                1.0,
                true,
            )
            .unwrap();
            for r in [1usize, 2, 3, 4] {
                for start in (0..rows).step_by(r) {
                    let rr = r.min(rows - start);
                    let mut part = vec![0f32; rr * n];
                    matmul(
                        &mut part,
                        n,
                        Mat::n(&x[start * k..(start + rr) * k], rr, k),
                        Mat::t(&w, n, k),
                        false,
                        1.0,
                        false,
                    )
                    .unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&part),
                        bits(&all[start * n..(start + rr) * n]),
                        "n {n} k {k} rows {start}+{rr}"
                    );
                }
            }
        }
    }
}
