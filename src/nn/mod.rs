//! Neural-network layers shared by every model (SDXL UNet, text encoders,
//! VAE, tagger).
//!
//! Why our own instead of `candle_nn`'s: several `candle_nn` layers take
//! forward-only fast paths that silently detach gradients (`LayerNorm`,
//! `softmax_last_dim`, `sdpa`), GEGLU there uses the tanh GELU, and
//! nearest-upsample backward is wrong/slow (reference/sdxl.md §8.3). Every
//! layer here is differentiable end to end and loads its parameters from a
//! `candle_nn::VarBuilder` under the checkpoint's own key names
//! (`weight`, `bias`), so `vb.pp("model.diffusion_model.input_blocks.1.0")`
//! paths are the LDM names.
//!
//! The numeric work is in [`ops`]: plain functions over tensors. They are
//! the single place where fast CPU kernels (custom ops with backward) plug
//! in; the layer structs never change when a kernel does. The kernels
//! themselves (custom ops with backward: conv2d, GroupNorm+SiLU, LayerNorm,
//! softmax, fused attention) live in [`kernels`]. [`device()`] parses
//! `--device` specs and picks the dtypes models run in per device.

#[macro_use]
pub mod kernels;
pub mod bias;
pub mod device;
pub mod flash;
pub mod im2col;
pub mod lanes;
pub mod lt;
pub mod norm;
#[cfg(feature = "cuda")]
mod nvrtc;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod softmax;
pub mod warm;

pub use device::{default_device, device, model_dtype, vae_dtype};
pub use warm::{keep_warm, set_keep_warm, share_cores, KeepWarm, SharedCores};

use candle_core::{Module, Result, Tensor};

/// The GPU kernels turned off in this process so far (each said why in a
/// warning once); their callers took the previous forms since.
pub fn kernels_off() -> Vec<&'static str> {
    [
        ("flash attention", flash::is_off()),
        ("cuBLASLt linear", lt::is_off()),
        ("softmax", softmax::is_off()),
        ("group norm", norm::is_off()),
        ("im2col", im2col::is_off()),
        ("bias add", bias::is_off()),
    ]
    .into_iter()
    .filter_map(|(name, off)| off.then_some(name))
    .collect()
}

/// What a failure of one of our GPU kernels ([`bias`], [`softmax`],
/// [`im2col`], [`norm`], [`flash`], [`lt`]) means. Out of device memory is the
/// caller's error: the kernel is fine, and the fallback would need the same
/// memory (run 2 of stop 43 turned the softmax kernel off for a whole-UNet
/// training step that did not fit). Anything else (it did not compile,
/// load or launch) turns the kernel off for the process: `broken` is set
/// and one warning names the kernel, the fallback and the first line of
/// the error (candle appends a backtrace). `Ok(None)`: use the fallback.
pub(crate) fn kernel_failed<T>(
    broken: &std::sync::atomic::AtomicBool,
    kernel: &str,
    fallback: &str,
    e: candle_core::Error,
) -> Result<Option<T>> {
    let text = e.to_string();
    if text.contains("OUT_OF_MEMORY") {
        return Err(e);
    }
    if !broken.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let first = text.lines().next().unwrap_or_default();
        eprintln!("warning: eps2v's GPU {kernel} failed ({first}); using {fallback}");
    }
    Ok(None)
}

/// The first-use check of a GPU kernel that has a plain form to fall back
/// on ([`flash`], [`lt`]): once per process and half dtype, `check`
/// returns the kernel's relative difference to the plain form on a small
/// problem; within `tolerance` the kernel runs from then on, else (or when
/// the check fails) it is turned off through [`kernel_failed`]. Out of
/// memory is not the kernel's fault: not remembered, checked again at the
/// next call.
pub(crate) struct FirstUse {
    f16: std::sync::OnceLock<bool>,
    bf16: std::sync::OnceLock<bool>,
}

impl FirstUse {
    pub(crate) const fn new() -> Self {
        Self {
            f16: std::sync::OnceLock::new(),
            bf16: std::sync::OnceLock::new(),
        }
    }

    /// Whether the kernel passed (running `check` the first time).
    pub(crate) fn passed(
        &self,
        dtype: candle_core::DType,
        tolerance: f64,
        (broken, kernel, fallback): (&std::sync::atomic::AtomicBool, &str, &str),
        check: impl FnOnce() -> Result<f64>,
    ) -> bool {
        let cell = if dtype == candle_core::DType::F16 {
            &self.f16
        } else {
            &self.bf16
        };
        if let Some(&ok) = cell.get() {
            return ok;
        }
        let e = match check() {
            Ok(d) if d <= tolerance => {
                let _ = cell.set(true);
                return true;
            }
            Ok(d) => candle_core::Error::Msg(format!(
                "its first-use check on {dtype:?} differs from {fallback} by {d:.3e}"
            )),
            Err(e) => e,
        };
        if kernel_failed::<()>(broken, kernel, fallback, e).is_ok() {
            let _ = cell.set(false);
        }
        false
    }
}

/// Run `f` on one of the rayon pool's worker threads and wait for it.
/// The thread that drives a model also runs its serial ops; when it is a
/// worker of the pool that the kernels use, the cores are shared by the
/// pool's threads only, instead of by those plus a caller thread that
/// competes with the idle workers' spinning (about 9 % of a toy-UNet
/// training step on two cores). The binary runs every command this way.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `rayon::scope` runs its closure on a pool worker (injecting it into
    // the pool when called from outside) and blocks until it is done.
    rayon::scope(|_| f())
}

/// Process-wide CPU runtime settings for running models; call once at
/// start-up, before any other thread exists (the binary and the training
/// benchmarks do). Measured on the 2-core machines here, each is worth
/// 5–10 % of a toy-UNet training step:
/// - Heap: keep freed memory in the process (glibc `mallopt`: no `mmap` for
///   blocks up to 32 MiB, no trimming). A training step frees and
///   re-allocates the same activation-sized buffers every step; with
///   glibc's defaults they are fresh mappings whose pages fault in on first
///   write (a 1 MiB GroupNorm backward took 1.9 ms instead of 0.4).
/// - Threads: candle ≥ 0.11 runs its parallel elementwise ops on a pool of
///   its own that spins while idle, beside the rayon pool that our kernels
///   and gemm use; with two cores the spinning pool took CPU from the
///   working one. Unless `CANDLE_NUM_THREADS` is set, candle's elementwise
///   ops are kept on the calling thread (`CANDLE_NUM_THREADS=1`); the heavy
///   ops (our kernels, GEMMs) still use every rayon thread.
pub fn tune_cpu_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Read once by candle when its pool is first used (after this).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
use candle_nn::VarBuilder;

/// Fully connected layer, PyTorch layout: weight `[out, in]`, optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` (and `bias` when `bias` is true) from `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// 2-D convolution, weight `[out, in, kh, kw]`, symmetric padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, kh, kw]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Option<Tensor>,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub padding: usize,
}

impl Conv2d {
    /// Load a `k×k` convolution with bias.
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, k, k), "weight")?;
        let bias = Some(vb.get(out_ch, "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}

/// Group normalisation over `(b, c, ...)` with per-channel affine.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// `[c]`
    pub weight: Tensor,
    /// `[c]`
    pub bias: Tensor,
    /// Number of groups.
    pub groups: usize,
    /// Variance epsilon.
    pub eps: f64,
}

impl GroupNorm {
    /// Load `weight`/`bias` for `channels` channels.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// GroupNorm followed by SiLU (fused where a kernel exists).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false)
    }
}

/// Layer normalisation over the last dimension (differentiable).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[d]`
    pub weight: Tensor,
    /// `[d]`
    pub bias: Tensor,
    /// Variance epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight`/`bias` of size `dim`.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
