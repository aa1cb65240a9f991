//! Attention on a GPU without the `sq × sk` score matrix ("flash
//! attention": tiles of keys, an online softmax, tensor cores), where no
//! gradient is needed; heads of 64 values in f16/bf16, the SDXL UNet's.
//!
//! Why our own: the materialised form (q·kᵀ, softmax, p·v, and copies to
//! split and merge the heads) writes and reads the scores several times,
//! 671 MB per self-attention at SDXL's second level at 1024²; on the lent
//! H200 it took 50 of the 101 ms of one UNet call against PyTorch's SDPA's
//! 13 (`benches/gpu/results/`, run 5), and its time grows with the batch
//! while PyTorch's kernels stay efficient. candle's `candle-flash-attn`
//! crate builds CUTLASS kernels with nvcc for hours and is not in the
//! chosen dependencies; this kernel is one page of CUDA compiled by NVRTC.
//!
//! One block of 4 warps takes 64 queries of one head of one sample; each
//! warp holds its 16 query rows as `mma.m16n8k16` A fragments, and for
//! every tile of 64 keys (K, and V transposed, in shared memory with rows
//! padded against bank conflicts) computes the scores with tensor cores
//! (f32 accumulation), updates the running row max and sum (base-2
//! exponentials with the scale folded in), and accumulates `p·v` with the
//! probabilities re-packed from the score fragments. The heads are read
//! and written in place in the projections' packed `(b, s, heads·64)`
//! layout, so nothing is split or merged.
//!
//! Checked on the device before first use: the kernel runs on a small
//! problem with ragged query and key counts against the materialised form
//! in f32; if it differs (or fails to build or launch), the materialised
//! form runs from then on and a warning says why.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Head size the kernel is written for.
pub const HEAD_DIM: usize = 64;

/// Packed attention: `q (b, sq, heads·64)`, `k`/`v (b, sk, heads·64)`.
#[derive(Debug, Clone, Copy)]
struct Flash {
    heads: usize,
    scale: f32,
}

/// Set when the kernel could not be built or launched, or failed its check.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether this kernel was turned off in this process (a failed first-use
/// check, build or launch; a warning said why).
pub(crate) fn is_off() -> bool {
    BROKEN.load(Ordering::Relaxed)
}

/// Relative L2 difference to the materialised f32 form (on the same
/// rounded inputs) above which the first-use check turns the kernel off:
/// the kernel rounds the probabilities and the output to the input dtype
/// (~2e-3 each for bf16).
const CHECK_TOLERANCE: f64 = 1e-2;

/// Attention on packed heads with the kernel where it applies: CUDA, f16
/// or bf16 q/k/v of one dtype, 64 values per head, no causal mask, nothing
/// tracked for a gradient. `None`: use another form.
pub fn try_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Option<Tensor>> {
    if !applies(q, k, v, heads, causal)? || !checked(q.device(), q.dtype()) {
        return Ok(None);
    }
    match run(q, k, v, heads, scale) {
        Ok(o) => Ok(Some(o)),
        Err(e) => crate::nn::kernel_failed(&BROKEN, "flash-attention kernel", FALLBACK, e),
    }
}

const FALLBACK: &str = "the materialised attention";

fn applies(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<bool> {
    if !q.device().is_cuda() || BROKEN.load(Ordering::Relaxed) || causal || heads == 0 {
        return Ok(false);
    }
    if [q, k, v]
        .iter()
        .any(|t| t.track_op() || t.dtype() != q.dtype() || t.rank() != 3)
        || !matches!(q.dtype(), DType::F16 | DType::BF16)
    {
        return Ok(false);
    }
    let (b, sq, w) = q.dims3()?;
    let (bk, sk, wk) = k.dims3()?;
    Ok(w == heads * HEAD_DIM
        && b > 0
        && wk == w
        && v.dims() == k.dims()
        && bk == b
        && sq > 0
        && sk > 0
        && heads <= 65_535
        && b <= 65_535
        && (b * sq.max(sk) * w) <= u32::MAX as usize)
}

/// The kernel on contiguous copies (16-byte aligned starts).
fn run(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = Flash {
        heads,
        scale: scale as f32,
    };
    let aligned = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    aligned(q)?.apply_op3_no_bwd(&aligned(k)?, &aligned(v)?, &op)
}

/// Whether the kernel passed its first-use check on this device and dtype
/// ([`crate::nn::FirstUse`]).
fn checked(dev: &candle_core::Device, dtype: DType) -> bool {
    static CHECK: crate::nn::FirstUse = crate::nn::FirstUse::new();
    let kernel = (&BROKEN, "flash-attention kernel", FALLBACK);
    CHECK.passed(dtype, CHECK_TOLERANCE, kernel, || self_check(dev, dtype))
}

/// The largest relative L2 difference between the kernel and the
/// materialised f32 attention over two ragged problems (query counts not
/// a multiple of the 64-query tile, key counts below and above one
/// 64-key tile).
///
/// The values are hashed (`frac(sin(i·12.9898 + …)·43758.5453)`, uniform
/// in (−1, 1), no structure) and q is scaled by 4, so each query attends
/// to a few keys (logits up to ~6) and the output is of the size of `v`.
/// Run 6 checked on smooth sines instead: the attention came out nearly
/// uniform over zero-mean values, an output ~1 % of `v`, so the kernel's
/// normal rounding of the probabilities (2⁻⁹ of `v`) read as 1.6e-2 of it
/// and the check turned a correct kernel off; here the same rounding is
/// ~2e-3, and a wrong key order or tile offset is O(1) (emulated in numpy
/// and by the kernel's CPU form, whose test holds the check to half its
/// tolerance).
fn self_check(dev: &candle_core::Device, dtype: DType) -> Result<f64> {
    let mut worst = 0f64;
    for (i, (sq, sk)) in [(100usize, 77usize), (70, 130)].into_iter().enumerate() {
        let make = |s: usize, salt: f64, gain: f64| -> Result<Tensor> {
            let n = 2 * s * 2 * HEAD_DIM;
            let x =
                Tensor::arange(0u32, n as u32, &candle_core::Device::Cpu)?.to_dtype(DType::F64)?;
            let h = ((x * 12.9898)? + (78.233 * salt + 37.719 * i as f64))?.sin()? * 43758.5453;
            let h = h?;
            let u = ((&h - h.floor()?)? * 2.0)? - 1.0;
            (u? * gain)?
                .reshape((2, s, 2 * HEAD_DIM))?
                .to_dtype(DType::F32)?
                .to_device(dev)
        };
        // The reference sees the same rounded inputs (run 6 compared
        // against unrounded ones, which the rounding alone moves by
        // ~3e-2).
        let (q, k, v) = (
            make(sq, 1.0, 4.0)?,
            make(sk, 2.0, 1.0)?,
            make(sk, 3.0, 1.0)?,
        );
        let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let want = crate::nn::ops::reference::attention_packed(
            &f32(&q)?,
            &f32(&k)?,
            &f32(&v)?,
            2,
            0.125,
            false,
        )?;
        let got = run(&q, &k, &v, 2, 0.125)?.to_dtype(DType::F32)?;
        let num = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let den = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let d = (num / den.max(1e-30)).sqrt();
        worst = worst.max(if d.is_finite() { d } else { f64::INFINITY });
    }
    Ok(worst)
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "eps2v-flash-attention"
    }

    /// The kernel's arithmetic in f64 (for the tests and the check's own
    /// test): keys in tiles of 64 with a running maximum, each tile's
    /// probabilities rounded to the input dtype before the product with
    /// `v` while the row sum adds them unrounded, the output rounded once.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, sq, w) = l1.shape().dims3()?;
        let sk = l2.dims()[1];
        let to64 = |s: &CpuStorage, l: &Layout| -> Result<Vec<f64>> {
            let Some((o0, o1)) = l.contiguous_offsets() else {
                candle_core::bail!("eps2v-flash-attention: inputs must be contiguous");
            };
            Ok(match s {
                CpuStorage::F16(x) => x[o0..o1].iter().map(|v| v.to_f64()).collect(),
                CpuStorage::BF16(x) => x[o0..o1].iter().map(|v| v.to_f64()).collect(),
                _ => candle_core::bail!("eps2v-flash-attention: f16 or bf16"),
            })
        };
        let round: fn(f64) -> f64 = match s1 {
            CpuStorage::F16(_) => |x| half::f16::from_f64(x).to_f64(),
            _ => |x| half::bf16::from_f64(x).to_f64(),
        };
        let (q, k, v) = (to64(s1, l1)?, to64(s2, l2)?, to64(s3, l3)?);
        let d = w / self.heads;
        let mut out = vec![0f64; b * sq * w];
        for n in 0..b {
            for h in 0..self.heads {
                for i in 0..sq {
                    let qi = &q[(n * sq + i) * w + h * d..][..d];
                    let o = &mut out[(n * sq + i) * w + h * d..][..d];
                    let (mut m, mut l) = (f64::NEG_INFINITY, 0f64);
                    for tile in (0..sk).collect::<Vec<_>>().chunks(64) {
                        let s: Vec<f64> = tile
                            .iter()
                            .map(|&j| {
                                let kj = &k[(n * sk + j) * w + h * d..][..d];
                                qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                                    * self.scale as f64
                            })
                            .collect();
                        let mn = s.iter().copied().fold(m, f64::max);
                        let c = (m - mn).exp();
                        l *= c;
                        o.iter_mut().for_each(|a| *a *= c);
                        m = mn;
                        for (&j, sj) in tile.iter().zip(&s) {
                            let p = (sj - m).exp();
                            l += p;
                            let vj = &v[(n * sk + j) * w + h * d..][..d];
                            for (a, b) in o.iter_mut().zip(vj) {
                                *a += round(p) * b;
                            }
                        }
                    }
                    o.iter_mut().for_each(|a| *a /= l);
                }
            }
        }
        let out = match s1 {
            CpuStorage::F16(_) => {
                CpuStorage::F16(out.into_iter().map(half::f16::from_f64).collect())
            }
            _ => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f64).collect()),
        };
        Ok((out, l1.shape().clone()))
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
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use super::{Flash, HEAD_DIM};

    /// Fragment layouts are PTX's for `mma.sync.aligned.m16n8k16` (g = lane
    /// / 4, t = lane % 4): A regs {row g, k 2t..2t+1}, {row g+8, same},
    /// {row g, k+8}, {row g+8, k+8}; B regs {k 2t..2t+1, n g}, {k+8, n g};
    /// C {row g, n 2t..2t+1}, {row g+8, same}. Shared rows are 72 values
    /// (36 words) long, so the 8 rows a fragment load touches fall in 8
    /// different banks.
    const SRC: &str = r#"
#define D 64
#define BQ 64
#define BK 64
#define LDS 72
#define LDW 36
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}
__device__ __forceinline__ unsigned int pack_f16(float lo, float hi) {
    return (unsigned int)f2h(lo) | ((unsigned int)f2h(hi) << 16);
}
#define MMA(TY, d, a, b0, b1) \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 " \
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#define FLASH(NAME, TY, PACK) \
extern "C" __global__ void __launch_bounds__(128) NAME(const u16* q, const u16* k, \
        const u16* v, u16* o, unsigned int sq, unsigned int sk, unsigned int hd, \
        float scale_log2) { \
    __shared__ __align__(16) u16 qs[BQ * LDS]; \
    __shared__ __align__(16) u16 ks[BK * LDS]; \
    __shared__ __align__(16) u16 vt[D * LDS]; \
    const unsigned int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u; \
    const unsigned int g = lane >> 2, t = lane & 3u; \
    const unsigned int q0 = blockIdx.x * BQ, head = blockIdx.y, n = blockIdx.z; \
    const u16* qb = q + (unsigned long long)n * sq * hd + head * D; \
    const u16* kb = k + (unsigned long long)n * sk * hd + head * D; \
    const u16* vb = v + (unsigned long long)n * sk * hd + head * D; \
    u16* ob = o + (unsigned long long)n * sq * hd + head * D; \
    for (unsigned int c = tid; c < BQ * 8; c += 128) { \
        unsigned int r = c >> 3, ch = c & 7u; \
        uint4 val = make_uint4(0u, 0u, 0u, 0u); \
        if (q0 + r < sq) val = *(const uint4*)(qb + (unsigned long long)(q0 + r) * hd + ch * 8); \
        *(uint4*)(qs + r * LDS + ch * 8) = val; \
    } \
    __syncthreads(); \
    const unsigned int* qw = (const unsigned int*)qs; \
    const unsigned int* kw = (const unsigned int*)ks; \
    const unsigned int* vw = (const unsigned int*)vt; \
    const unsigned int r0 = warp * 16 + g; \
    unsigned int qa[4][4]; \
    _Pragma("unroll") \
    for (int kk = 0; kk < 4; ++kk) { \
        qa[kk][0] = qw[r0 * LDW + kk * 8 + t]; \
        qa[kk][1] = qw[(r0 + 8) * LDW + kk * 8 + t]; \
        qa[kk][2] = qw[r0 * LDW + kk * 8 + 4 + t]; \
        qa[kk][3] = qw[(r0 + 8) * LDW + kk * 8 + 4 + t]; \
    } \
    float acc[8][4]; \
    _Pragma("unroll") \
    for (int i = 0; i < 8; ++i) { acc[i][0] = 0.0f; acc[i][1] = 0.0f; acc[i][2] = 0.0f; acc[i][3] = 0.0f; } \
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f; \
    for (unsigned int k0 = 0; k0 < sk; k0 += BK) { \
        __syncthreads(); \
        for (unsigned int c = tid; c < BK * 8; c += 128) { \
            unsigned int r = c >> 3, ch = c & 7u; \
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u); \
            if (k0 + r < sk) { \
                kv = *(const uint4*)(kb + (unsigned long long)(k0 + r) * hd + ch * 8); \
                vv = *(const uint4*)(vb + (unsigned long long)(k0 + r) * hd + ch * 8); \
            } \
            *(uint4*)(ks + r * LDS + ch * 8) = kv; \
            const unsigned int vx[4] = {vv.x, vv.y, vv.z, vv.w}; \
            _Pragma("unroll") \
            for (int e = 0; e < 4; ++e) { \
                vt[(ch * 8 + 2 * e) * LDS + r] = (u16)(vx[e] & 0xffffu); \
                vt[(ch * 8 + 2 * e + 1) * LDS + r] = (u16)(vx[e] >> 16); \
            } \
        } \
        __syncthreads(); \
        float s[8][4]; \
        _Pragma("unroll") \
        for (int nt = 0; nt < 8; ++nt) { \
            s[nt][0] = 0.0f; s[nt][1] = 0.0f; s[nt][2] = 0.0f; s[nt][3] = 0.0f; \
            _Pragma("unroll") \
            for (int kk = 0; kk < 4; ++kk) { \
                unsigned int kr = (nt * 8 + g) * LDW + kk * 8 + t; \
                MMA(TY, s[nt], qa[kk], kw[kr], kw[kr + 4]); \
            } \
        } \
        float mx0 = NEG_INF, mx1 = NEG_INF; \
        _Pragma("unroll") \
        for (int nt = 0; nt < 8; ++nt) { \
            _Pragma("unroll") \
            for (int e = 0; e < 2; ++e) { \
                bool ok = k0 + nt * 8 + t * 2 + e < sk; \
                s[nt][e] = ok ? s[nt][e] * scale_log2 : NEG_INF; \
                s[nt][2 + e] = ok ? s[nt][2 + e] * scale_log2 : NEG_INF; \
                mx0 = fmaxf(mx0, s[nt][e]); \
                mx1 = fmaxf(mx1, s[nt][2 + e]); \
            } \
        } \
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1)); \
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2)); \
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1)); \
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2)); \
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1); \
        const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1); \
        m0 = mn0; m1 = mn1; \
        l0 *= c0; l1 *= c1; \
        _Pragma("unroll") \
        for (int nt = 0; nt < 8; ++nt) { \
            acc[nt][0] *= c0; acc[nt][1] *= c0; acc[nt][2] *= c1; acc[nt][3] *= c1; \
        } \
        unsigned int pa[4][4]; \
        _Pragma("unroll") \
        for (int nt = 0; nt < 8; ++nt) { \
            float p0 = exp2f(s[nt][0] - m0), p1 = exp2f(s[nt][1] - m0); \
            float p2 = exp2f(s[nt][2] - m1), p3 = exp2f(s[nt][3] - m1); \
            l0 += p0 + p1; \
            l1 += p2 + p3; \
            pa[nt >> 1][(nt & 1) * 2] = PACK(p0, p1); \
            pa[nt >> 1][(nt & 1) * 2 + 1] = PACK(p2, p3); \
        } \
        _Pragma("unroll") \
        for (int nt = 0; nt < 8; ++nt) { \
            _Pragma("unroll") \
            for (int kk = 0; kk < 4; ++kk) { \
                unsigned int vr = (nt * 8 + g) * LDW + kk * 8 + t; \
                MMA(TY, acc[nt], pa[kk], vw[vr], vw[vr + 4]); \
            } \
        } \
    } \
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1); \
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2); \
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1); \
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2); \
    const float i0 = 1.0f / l0, i1 = 1.0f / l1; \
    const unsigned int row = q0 + r0; \
    _Pragma("unroll") \
    for (int nt = 0; nt < 8; ++nt) { \
        unsigned int col = nt * 8 + t * 2; \
        if (row < sq) \
            *(unsigned int*)(ob + (unsigned long long)row * hd + col) = PACK(acc[nt][0] * i0, acc[nt][1] * i0); \
        if (row + 8 < sq) \
            *(unsigned int*)(ob + (unsigned long long)(row + 8) * hd + col) = PACK(acc[nt][2] * i1, acc[nt][3] * i1); \
    } \
}
FLASH(eps2v_flash_bf16, "bf16", pack_bf16)
FLASH(eps2v_flash_f16, "f16", pack_f16)
"#;

    pub(super) fn forward(
        op: &Flash,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("eps2v-flash-attention: inputs must be contiguous");
        };
        let (b, sq, w) = l1.shape().dims3()?;
        let sk = l2.dims()[1];
        let cfg = LaunchConfig {
            grid_dim: (sq.div_ceil(64) as u32, op.heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale_log2 = op.scale * std::f32::consts::LOG2_E;
        let (sq32, sk32, w32) = (sq as u32, sk as u32, w as u32);
        debug_assert_eq!(w, op.heads * HEAD_DIM);
        // compute_80: the bf16 `mma.sync` needs sm_80 or later.
        let ptx = crate::nn::nvrtc::ptx_for("eps2v_flash", SRC, Some("compute_80"))?;
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let q = s1.as_cuda_slice::<$t>()?.slice(q0..q1);
                let k = s2.as_cuda_slice::<$t>()?.slice(k0..k1);
                let v = s3.as_cuda_slice::<$t>()?.slice(v0..v1);
                let func = dev.get_or_load_custom_func($name, "eps2v_flash", ptx)?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(q1 - q0)? };
                let mut builder = func.builder();
                builder.arg(&q);
                builder.arg(&k);
                builder.arg(&v);
                builder.arg(&out);
                builder.arg(&sq32);
                builder.arg(&sk32);
                builder.arg(&w32);
                builder.arg(&scale_log2);
                // SAFETY: the arguments match the kernel's signature; the
                // grid is (query tiles, heads, samples) of 64-value heads.
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::BF16 => launch!(half::bf16, "eps2v_flash_bf16"),
            DType::F16 => launch!(half::f16, "eps2v_flash_f16"),
            dt => candle_core::bail!("eps2v-flash-attention: no kernel for {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::rand;

    /// The op's CPU form (the same packed layout and scale as the kernel)
    /// against the materialised attention; off CUDA the public function
    /// declines.
    #[test]
    fn the_packed_op_matches_the_materialised_attention() -> Result<()> {
        let (b, sq, sk, h) = (2, 5, 7, 2);
        let q = rand(&[b, sq, h * HEAD_DIM], 1, DType::F32)?;
        let k = rand(&[b, sk, h * HEAD_DIM], 2, DType::F32)?;
        let v = rand(&[b, sk, h * HEAD_DIM], 3, DType::F32)?;
        let want = crate::nn::ops::reference::attention_packed(&q, &k, &v, h, 0.125, false)?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let op = Flash {
            heads: h,
            scale: 0.125,
        };
        let got = bf(&q)?
            .apply_op3_no_bwd(&bf(&k)?, &bf(&v)?, &op)?
            .to_dtype(DType::F32)?;
        let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 2e-2, "{d}");
        assert!(try_attention_packed(&bf(&q)?, &bf(&k)?, &bf(&v)?, h, 0.125, false)?.is_none());
        Ok(())
    }

    /// The first-use check, run on the kernel's CPU form (its rounding of
    /// the probabilities, tile by tile), passes a correct kernel with room
    /// to spare: run 6's check problem read 1.6e-2 here and turned the
    /// kernel off on the H200.
    #[test]
    fn the_first_use_check_passes_the_kernels_own_rounding() -> Result<()> {
        for dt in [DType::BF16, DType::F16] {
            let d = self_check(&candle_core::Device::Cpu, dt)?;
            assert!(d < CHECK_TOLERANCE / 2.0, "{dt:?}: {d:.2e}");
        }
        Ok(())
    }
}
