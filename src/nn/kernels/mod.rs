//! Fast CPU training kernels behind [`crate::nn::ops`]: candle custom ops
//! (`CustomOp1/2/3`) with a hand-written backward for linear, conv2d,
//! GroupNorm (+ fused SiLU), LayerNorm, GELU / GEGLU, softmax, fused
//! scaled-dot-product attention and nearest ×2 upsampling.
//!
//! Why: candle 0.11's CPU conv2d backward goes through `conv_transpose2d` and
//! a dimension-swapped conv, and its GroupNorm/softmax are chains of small
//! ops (issue 5 measured candle 12× slower than PyTorch per training step on
//! two cores). These kernels use im2col/col2im + the `gemm` crate (the same
//! GEMM candle's CPU matmul uses) and one fused pass per normalisation, and
//! are parallel over batch/groups/heads with rayon. Reference for the maths:
//! the composite ops in [`crate::nn::ops::reference`] (which the tests compare
//! against) and the usual closed-form gradients (PyTorch's
//! `native_group_norm_backward`, `_softmax_backward_data`, FlashAttention's
//! `dS = P ∘ (dP − rowsum(dO ∘ O))`).
//!
//! Every kernel works on contiguous CPU tensors of dtype f32 (the training
//! dtype) or f64 (finite-difference tests); `ops` runs f16/bf16 CPU inputs
//! through them in f32 and keeps every other device (CUDA) on candle's own
//! ops. Backward ops return fresh tensors without a graph (no double
//! backward). Normalisation ops keep their forward `(mean, rstd)` and
//! attention its log-sum-exp rows inside the op instance (one op per call),
//! so the backward needs no second statistics pass. Scratch buffers (im2col,
//! GEMM staging) come from a small per-thread pool (`take_scratch`).
//! The crate is compiled for baseline x86-64, so element loops are compiled
//! twice (`simd_fn!`) and the AVX2+FMA copy is picked at run time.
//! Benchmark: `benches/train.rs` (numbers in the README).

use candle_core::{bail, DType, Device, Layout, Result, Storage, Tensor, WithDType};

/// Per-row (or per-group) `(mean, rstd)` saved by a normalisation forward.
pub type Stats = Vec<(f64, f64)>;

/// Floating-point element type a kernel runs on (f32 or f64).
pub trait Real:
    WithDType + std::ops::Neg<Output = Self> + std::iter::Sum + Send + Sync + 'static
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Negative infinity (masked attention scores).
    const NEG_INF: Self;
    /// `e^x`; for f32 a branch-free polynomial that auto-vectorises
    /// (≤ 2 ulp on the normal range), for f64 the libm `exp`.
    fn exp_fast(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Larger of the two (NaN-propagation is not needed here).
    fn max_of(self, other: Self) -> Self;
    /// Lossy conversion from f64 (statistics are accumulated in f64).
    fn of(v: f64) -> Self;
    /// Widening conversion to f64.
    fn wide(self) -> f64;
    /// Run `f` on this thread's pool of scratch buffers of this type.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R;
    /// `erf(z)` given `e = e^{−z²}` (which callers often need anyway): for
    /// f32 Abramowitz & Stegun 7.1.26 (|error| ≤ 6e-7 in f32, branch-free, so
    /// loops over it vectorise), for f64 libm's `erf` (`e` unused).
    fn erf_with_exp(z: Self, e: Self) -> Self;
    /// The data of a CPU storage of this dtype, mutably (`None` for another dtype).
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [Self]>;
}

thread_local! {
    static POOL_F32: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    static POOL_F64: std::cell::RefCell<Vec<Vec<f64>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept per thread (and type) for reuse.
const POOL_BUFFERS: usize = 6;

/// A scratch buffer of at least `len` elements from this thread's pool
/// (allocated on first use). Its contents are unspecified: callers write
/// every element they later read. Give it back with [`give_scratch`].
pub(crate) fn take_scratch<T: Real>(len: usize) -> Vec<T> {
    let mut v = T::with_pool(|p| {
        // Prefer the smallest buffer that is large enough.
        let best = p
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => Some(p.swap_remove(i)),
            None => p.pop(),
        }
    })
    .unwrap_or_default();
    if v.len() < len {
        v.resize(len, T::ZERO);
    }
    v
}

/// Return a buffer from [`take_scratch`] to this thread's pool.
pub(crate) fn give_scratch<T: Real>(v: Vec<T>) {
    if v.is_empty() {
        return;
    }
    T::with_pool(|p| {
        if p.len() < POOL_BUFFERS {
            p.push(v);
        }
    })
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max_of(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R {
        POOL_F32.with(|p| f(&mut p.borrow_mut()))
    }
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [Self]> {
        match s {
            candle_core::CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn erf_with_exp(z: Self, e: Self) -> Self {
        let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
        let mut p = 1.061_405_4_f32;
        p = p * t - 1.453_152_1;
        p = p * t + 1.421_413_8;
        p = p * t - 0.284_496_74;
        p = p * t + 0.254_829_6;
        (1.0 - p * t * e).copysign(z)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn max_of(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R {
        POOL_F64.with(|p| f(&mut p.borrow_mut()))
    }
    fn storage_mut(s: &mut candle_core::CpuStorage) -> Option<&mut [Self]> {
        match s {
            candle_core::CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn erf_with_exp(z: Self, _e: Self) -> Self {
        libm::erf(z)
    }
}

/// Branch-free `e^x` for f32 (Cephes-style range reduction + degree-6
/// polynomial); only adds, multiplies and bit casts, so loops over it
/// vectorise. Inputs below −87.33 give 0, above 88 give +inf (true e^x
/// overflows f32 at 88.72; the 88..88.72 band is not needed here); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let big = x > 88.0;
    let small = x < -87.33;
    let xc = x.clamp(-87.33, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^n from the integer held in t's low mantissa bits.
    let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32).wrapping_add(127) << 23;
    let y = p * f32::from_bits(bits as u32);
    let y = if big { f32::INFINITY } else { y };
    let y = if small { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Logistic sigmoid `1 / (1 + e^{-x})` using [`Real::exp_fast`].
#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp_fast())
}

/// True when the running CPU has AVX2 and FMA (checked once; used to run
/// the auto-vectorised element loops in an AVX2-compiled copy).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a generic kernel function `fn name<T: Real>(args) -> ret` (or a
/// non-generic `fn name(args) -> ret`) whose body is compiled twice, once for the baseline target and once with
/// AVX2+FMA enabled, and picks the AVX2 copy at run time when the CPU has
/// it (the crate is built for baseline x86-64, so without this the element
/// loops would only use SSE2). The body is an `#[inline(always)]` function,
/// so it (and the small helpers it calls) is inlined into both copies.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Real>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Real>($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<T: Real>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Real>($($a: $t),*) $(-> $r)? {
                    imp::<T>($($a),*)
                }
                if $crate::nn::kernels::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { avx2::<T>($($a),*) };
                }
            }
            imp::<T>($($a),*)
        }
    };
    // The same for a non-generic function (byte kernels, e.g. the Pillow
    // resampling in `imaging::hash`).
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    imp($($a),*)
                }
                if $crate::nn::kernels::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { avx2($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// The dtype dispatch of every kernel entry point: evaluates `body` with the
/// type alias `T` = f32 or f64 for those dtypes, and for any other dtype
/// returns the error `"{what}: unsupported dtype … (use f32 or f64)"`.
macro_rules! by_dtype {
    ($dt:expr, $what:expr, |$T:ident| $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?} (use f32 or f64)", $what),
        }
    };
}

pub mod act;
pub mod attention;
pub mod conv;
pub mod group_norm;
pub(crate) mod invariant;
pub mod layer_norm;
pub mod linear;
pub mod resample;

/// True for the dtypes the kernels run natively.
pub fn native_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// True when `t` lives on the CPU and has a dtype the kernels run natively.
pub fn runs_here(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && native_dtype(t.dtype())
}

/// Borrow the contiguous CPU data of a storage as `&[T]`.
pub(crate) fn slice_of<'a, T: WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: kernel input must be contiguous (call .contiguous() first)")
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Run `f` on the contiguous CPU data of `t` (no copy).
pub(crate) fn with_data<T: WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cs) => f(slice_of::<T>(cs, l, what)?),
        _ => bail!("{what}: CPU kernel called on a non-CPU tensor"),
    }
}

/// A new CPU tensor from `data` with shape `dims`.
pub(crate) fn tensor_from<T: WithDType>(data: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Elements per parallel task for an elementwise pass over `total`
/// elements (whole rows of `row`): an even split over [`threads`], but at
/// least 16 Ki, below which rayon's wake-up costs more than the work.
pub(crate) fn chunk_elems(total: usize, row: usize) -> usize {
    let row = row.max(1);
    let per = total.div_ceil(threads().max(1)).max(1 << 14);
    per.div_ceil(row).max(1) * row
}

/// Number of threads kernels split work into (rayon's pool size, which
/// follows `RAYON_NUM_THREADS`, as candle's own CPU kernels do).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Pieces that a kernel cuts a sum over samples or rows into (the weight,
/// bias and norm-parameter gradients), whatever the pool's size: as many
/// as on a two-thread pool. The partial sums, and with them a gradient's
/// last bits, then do not depend on the thread count, so a training step
/// computes the same bytes on one thread (a lane: `nn::lanes`), two or
/// sixteen, and the committed toy models (built on two threads) are
/// reproduced at any thread count. Only the pieces are fixed: a piece's
/// GEMM still uses the whole pool when there are fewer pieces than threads.
pub const SUM_PIECES: usize = 2;

/// `dst (m×n) = alpha·dst + beta·(lhs (m×k) · rhs (k×n))` with arbitrary
/// element strides (`*_rs` row stride, `*_cs` column stride), through the
/// `gemm` crate. `parallel` lets gemm use the rayon pool. Batch-invariant:
/// an output element gets the same bits whatever m and n are
/// ([`invariant`]).
///
/// # Safety
/// All pointers must be valid for the index ranges the strides and sizes
/// describe, and `dst` must not alias `lhs`/`rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    accumulate: bool,
    beta: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = T::ZERO;
                }
            }
        }
        return;
    }
    // Batch invariance (invariant.rs): shapes in one of gemm's special
    // regimes run padded, so an element's arithmetic never depends on m or n.
    let padded = invariant::padded_dims(m, n, k, lhs_cs == 1, rhs_rs == 1);
    if padded != (m, n) {
        invariant::gemm_padded(
            (m, n, k),
            padded,
            dst,
            (dst_rs, dst_cs),
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            accumulate,
            beta,
            parallel,
        );
        return;
    }
    let par = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::ONE,
        beta,
        false,
        false,
        false,
        par,
    )
}

/// A row-major matrix view for [`matmul`]: data, rows, cols, row stride
/// and whether it is read transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    /// Row-major storage of the *stored* matrix.
    pub data: &'a [T],
    /// Rows of the stored matrix.
    pub rows: usize,
    /// Columns of the stored matrix.
    pub cols: usize,
    /// Row stride (leading dimension) of the stored matrix, ≥ `cols`.
    pub ld: usize,
    /// Use the transpose of the stored matrix.
    pub t: bool,
}

impl<'a, T> Mat<'a, T> {
    /// The stored matrix as is.
    pub fn n(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld: cols,
            t: false,
        }
    }
    /// The transpose of the stored matrix.
    pub fn t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld: cols,
            t: true,
        }
    }
    /// The same view with row stride `ld`.
    pub fn ld(self, ld: usize) -> Self {
        Self { ld, ..self }
    }
    /// (rows, cols, row stride, col stride) of the logical matrix.
    fn logical(&self) -> (usize, usize, usize, usize) {
        if self.t {
            (self.cols, self.rows, 1, self.ld)
        } else {
            (self.rows, self.cols, self.ld, 1)
        }
    }
    /// True when the stored matrix fits in `data`.
    fn fits(&self) -> bool {
        self.ld >= self.cols
            && (self.rows == 0 || self.data.len() >= (self.rows - 1) * self.ld + self.cols)
    }
}

/// Safe row-major GEMM: `dst (m×n, row stride ldd) = [dst +] beta · a · b`.
/// Panics never; returns an error when the sizes do not fit.
pub(crate) fn matmul<T: Real>(
    dst: &mut [T],
    ldd: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    beta: T,
    parallel: bool,
) -> Result<()> {
    let (m, n) = (a.logical().0, b.logical().1);
    if m > 0 && n > 0 && dst.len() < (m - 1) * ldd + n {
        bail!(
            "kernel matmul: destination of {} elements is too small for {m}×{n} (row stride {ldd})",
            dst.len()
        )
    }
    // SAFETY: `dst` covers the m×n block (checked above) and is a distinct
    // &mut borrow, so it cannot alias `a`/`b`.
    unsafe { matmul_ptr(dst.as_mut_ptr(), ldd, a, b, accumulate, beta, parallel) }
}

/// [`matmul`] into a raw destination: `out (m×n, row stride ldo) = [out +]
/// beta · a · b`, for outputs shared by parallel tasks that each write a
/// disjoint block (attention heads). Operand sizes are checked here.
///
/// # Safety
/// `out` must be valid for writes (and reads when `accumulate`) of the m×n
/// block with row stride `ldo`, not alias `a`/`b`, and no other thread may
/// access that block meanwhile.
pub(crate) unsafe fn matmul_ptr<T: Real>(
    out: *mut T,
    ldo: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    beta: T,
    parallel: bool,
) -> Result<()> {
    let (m, k, a_rs, a_cs) = a.logical();
    let (k2, n, b_rs, b_cs) = b.logical();
    if k != k2 || !a.fits() || !b.fits() || ldo < n {
        bail!("kernel matmul: inconsistent sizes m={m} k={k}/{k2} n={n} ldd={ldo}")
    }
    gemm_raw(
        m,
        n,
        k,
        out,
        ldo,
        1,
        a.data.as_ptr(),
        a_rs,
        a_cs,
        b.data.as_ptr(),
        b_rs,
        b_cs,
        accumulate,
        beta,
        parallel,
    );
    Ok(())
}

#[cfg(test)]
#[path = "test_util.rs"]
pub(crate) mod test_util;

#[cfg(test)]
#[path = "mod_tests.rs"]
mod tests;
