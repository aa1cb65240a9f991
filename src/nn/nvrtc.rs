//! Our own CUDA kernels ([`crate::nn::bias`], [`crate::nn::softmax`],
//! [`crate::nn::im2col`]) are CUDA C source compiled to PTX with NVRTC
//! (through cudarc, which candle's CUDA backend already links) once per
//! process at first use, so the CPU-only build and CI compile none of it
//! and the binary needs no `nvcc` where it runs. Half types travel as their
//! bits (`u16`): NVRTC has no CUDA headers here, so [`PRELUDE`] converts
//! them with PTX `cvt` (f16) and bit arithmetic (bf16, round to nearest
//! even, NaN kept a NaN); arithmetic is f32 with one rounding at the end.
//! The prelude also has the warp and block reductions the kernels share.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda::cudarc;
use candle_core::Result;

/// Conversions every kernel source starts with.
pub(crate) const PRELUDE: &str = r#"
typedef unsigned short u16;
union bits32 { unsigned int u; float f; };
__device__ __forceinline__ float bf2f(u16 h) { bits32 c; c.u = ((unsigned int)h) << 16; return c.f; }
__device__ __forceinline__ u16 f2bf(float f) {
    bits32 c; c.f = f;
    unsigned int u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float id(float f) { return f; }
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block-wide max / sum for a blockDim.x that is a multiple of 32; every
// thread gets the result; `sh` is 32 floats of shared memory that no other
// reduction uses (a second one needs its own).
__device__ __forceinline__ float block_max(float v, float* sh) {
    v = warp_max(v);
    unsigned int w = threadIdx.x >> 5, l = threadIdx.x & 31u;
    if (l == 0) sh[w] = v;
    __syncthreads();
    return warp_max(l < (blockDim.x >> 5) ? sh[l] : NEG_INF);
}
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    unsigned int w = threadIdx.x >> 5, l = threadIdx.x & 31u;
    if (l == 0) sh[w] = v;
    __syncthreads();
    return warp_sum(l < (blockDim.x >> 5) ? sh[l] : 0.0f);
}
"#;

/// The PTX of [`PRELUDE`] + `src`, compiled once per process and module
/// name (an error is remembered too: a failed compile is not retried), for
/// NVRTC's default virtual architecture.
pub(crate) fn ptx(module: &'static str, src: &'static str) -> Result<&'static str> {
    ptx_for(module, src, None)
}

/// [`ptx`] for a virtual architecture of at least `arch` (e.g.
/// `compute_80` for the bf16 tensor-core instructions).
pub(crate) fn ptx_for(
    module: &'static str,
    src: &'static str,
    arch: Option<&'static str>,
) -> Result<&'static str> {
    type Cache = Mutex<HashMap<&'static str, std::result::Result<&'static str, String>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry(module)
        .or_insert_with(|| {
            let opts = cudarc::nvrtc::CompileOptions {
                arch,
                ..Default::default()
            };
            cudarc::nvrtc::compile_ptx_with_opts(format!("{PRELUDE}{src}"), opts)
                .map(|p| &*Box::leak(p.to_src().into_boxed_str()))
                .map_err(|e| format!("NVRTC ({module}): {e:?}"))
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}
