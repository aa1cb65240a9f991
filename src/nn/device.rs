//! Choosing the device and dtypes models run on (`--device cpu|cuda|cuda:N`).
//!
//! - [`device`] parses a device spec. `cuda` needs a binary built with the
//!   `cuda` cargo feature (scripts/cuda-toolchain.sh) and a usable GPU; each
//!   case fails with a config error (exit 2) that says which and what to do.
//! - [`default_device`]: CUDA device 0 when the build has CUDA and it opens,
//!   else the CPU (what model commands use without `--device`).
//! - [`model_dtype`] / [`vae_dtype`]: f32 on the CPU (candle's CPU matmul has
//!   no bf16 and the CPU kernels compute in f32 anyway); on CUDA bf16 by
//!   default, f16 or f32 on request. The SDXL VAE overflows in f16 (reference
//!   sdxl.md §5: NaNs in the decoder's mid block), so it runs in bf16 when the
//!   model is bf16 and in f32 otherwise — never f16.
//! - On CUDA, [`device`] also makes the device's default memory pool keep
//!   freed memory (release threshold = max): candle allocates stream-ordered
//!   (`cuMemAllocAsync`) from that pool, whose default threshold of 0 hands
//!   memory back to the driver at every synchronisation, so each sampling
//!   step or training step would map its activations afresh. PyTorch's
//!   caching allocator keeps them likewise.
//! - [`gpu_memory`] reads the pool's high-water mark (peak memory in use,
//!   the counterpart of `torch.cuda.max_memory_allocated`) for benchmarks.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parse a device spec: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`, and open it.
pub fn device(spec: &str) -> Result<Device> {
    device_as(spec, &DeviceSource::FLAG)
}

/// Where a device spec came from, for its error messages.
pub struct DeviceSource<'a> {
    /// How the setting is named (`--device`, `device.device`).
    pub name: &'a str,
    /// How to ask for the CPU instead.
    pub use_cpu: &'a str,
}

impl DeviceSource<'_> {
    /// The command line's `--device`.
    pub const FLAG: DeviceSource<'static> = DeviceSource {
        name: "--device",
        use_cpu: "use --device cpu",
    };
}

/// [`device`], its errors naming the setting as `from` says.
pub fn device_as(spec: &str, from: &DeviceSource<'_>) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad_spec(spec, from))?,
        None => return Err(bad_spec(spec, from)),
    };
    open_cuda(ordinal, from)
}

fn bad_spec(spec: &str, from: &DeviceSource<'_>) -> Error {
    Error::config(format!(
        "{} {spec:?}: expected cpu, cuda or cuda:N (N = GPU index, as nvidia-smi lists them)",
        from.name
    ))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize, from: &DeviceSource<'_>) -> Result<Device> {
    Err(Error::config(format!(
        "{} cuda:{ordinal}: this eps2v was built without CUDA support; rebuild with `scripts/cuda-toolchain.sh cargo build --features cuda` (README, section GPU) or {}",
        from.name, from.use_cpu
    )))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, from: &DeviceSource<'_>) -> Result<Device> {
    let dev = Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace when RUST_BACKTRACE is set: keep the cause.
        let e = e.to_string();
        let cause = e.lines().next().unwrap_or_default();
        Error::config(format!(
            "{} cuda:{ordinal}: no usable CUDA device ({cause}); check `nvidia-smi` and that the driver's libcuda.so.1 is on the library path, or {}",
            from.name, from.use_cpu
        ))
    })?;
    gpu_memory::keep_freed_memory(&dev)?;
    Ok(dev)
}

/// CUDA device 0 when this build has CUDA and the device opens, else the CPU.
pub fn default_device() -> Device {
    if cfg!(feature = "cuda") {
        device("cuda:0").unwrap_or(Device::Cpu)
    } else {
        Device::Cpu
    }
}

/// Parse a dtype name: `f32`, `bf16`, `f16` (also `fp32`, `fp16`, `float16`,
/// `bfloat16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        _ => Err(Error::config(format!(
            "dtype {s:?}: expected f32, bf16 or f16"
        ))),
    }
}

/// The dtype UNet and text encoders run in on `device`: `requested` when
/// given (f32/bf16/f16), else bf16 on CUDA and f32 on the CPU. Half
/// precision on the CPU is refused: it is slower there (the CPU kernels
/// compute in f32 and convert) and only loses precision.
pub fn model_dtype(device: &Device, requested: Option<DType>) -> Result<DType> {
    match requested {
        None if device.is_cpu() => Ok(DType::F32),
        None => Ok(DType::BF16),
        Some(DType::F32) => Ok(DType::F32),
        Some(d @ (DType::BF16 | DType::F16)) if !device.is_cpu() => Ok(d),
        Some(d) if device.is_cpu() => Err(Error::config(format!(
            "precision {} on the cpu: models run in f32 there; use f32 or a CUDA device",
            dtype_name(d)
        ))),
        Some(d) => Err(Error::config(format!(
            "precision {}: models run in f32, bf16 or f16",
            dtype_name(d)
        ))),
    }
}

/// The VAE's dtype for a model running in `model`: bf16 stays bf16, f16
/// becomes f32 (the SDXL VAE overflows in f16), f32 stays f32.
pub fn vae_dtype(model: DType) -> DType {
    match model {
        DType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// Short lowercase name of a float dtype (`f32`, `bf16`, `f16`, …) for
/// reports and file names.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// GPU memory accounting through the device's default memory pool (the one
/// candle's stream-ordered allocations come from). Every function is a no-op
/// returning `None`/`Ok` on the CPU and in builds without CUDA.
pub mod gpu_memory {
    use candle_core::Device;

    /// Make the default memory pool of `dev` keep freed memory (see the
    /// module docs). No-op on the CPU.
    pub fn keep_freed_memory(dev: &Device) -> crate::Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(c) = dev {
            cuda::set_attr(c, cuda::Attr::ReleaseThreshold, u64::MAX)?;
        }
        let _ = dev;
        Ok(())
    }

    /// Reset the high-water mark of memory in use (start of a measurement).
    pub fn reset_peak(dev: &Device) -> crate::Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(c) = dev {
            dev.synchronize()?;
            cuda::set_attr(c, cuda::Attr::UsedHigh, 0)?;
        }
        let _ = dev;
        Ok(())
    }

    /// Peak bytes in use in the pool since the last [`reset_peak`]
    /// (`None` on the CPU).
    pub fn peak_bytes(dev: &Device) -> crate::Result<Option<u64>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(c) = dev {
            dev.synchronize()?;
            return cuda::get_attr(c, cuda::Attr::UsedHigh).map(Some);
        }
        let _ = dev;
        Ok(None)
    }

    /// Bytes in use in the pool now (`None` on the CPU).
    pub fn used_bytes(dev: &Device) -> crate::Result<Option<u64>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(c) = dev {
            dev.synchronize()?;
            return cuda::get_attr(c, cuda::Attr::UsedCurrent).map(Some);
        }
        let _ = dev;
        Ok(None)
    }

    #[cfg(feature = "cuda")]
    mod cuda {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::CudaDevice;

        use crate::Error;

        #[derive(Clone, Copy)]
        pub(super) enum Attr {
            ReleaseThreshold,
            UsedCurrent,
            UsedHigh,
        }

        impl Attr {
            fn raw(self) -> sys::CUmemPool_attribute {
                match self {
                    Attr::ReleaseThreshold => {
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
                    }
                    Attr::UsedCurrent => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                    Attr::UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                }
            }
        }

        fn check(r: sys::CUresult, what: &str) -> crate::Result<()> {
            if r == sys::CUresult::CUDA_SUCCESS {
                Ok(())
            } else {
                Err(Error::Other(format!(
                    "cuda memory pool: {what} failed: {r:?}"
                )))
            }
        }

        fn pool(c: &CudaDevice) -> crate::Result<sys::CUmemoryPool> {
            let ctx = c.cuda_stream().context().clone();
            ctx.bind_to_thread()
                .map_err(|e| Error::Other(format!("cuda: binding the context failed: {e:?}")))?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: plain driver query into a local out-pointer; the
            // context is current and `cu_device` is its device.
            let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
            check(r, "cuDeviceGetDefaultMemPool")?;
            Ok(pool)
        }

        pub(super) fn set_attr(c: &CudaDevice, a: Attr, value: u64) -> crate::Result<()> {
            let pool = pool(c)?;
            let mut v = value;
            // SAFETY: these attributes take a cuuint64_t, passed by pointer.
            let r =
                unsafe { sys::cuMemPoolSetAttribute(pool, a.raw(), (&mut v as *mut u64).cast()) };
            check(r, "cuMemPoolSetAttribute")
        }

        pub(super) fn get_attr(c: &CudaDevice, a: Attr) -> crate::Result<u64> {
            let pool = pool(c)?;
            let mut v = 0u64;
            // SAFETY: these attributes fill a cuuint64_t.
            let r =
                unsafe { sys::cuMemPoolGetAttribute(pool, a.raw(), (&mut v as *mut u64).cast()) };
            check(r, "cuMemPoolGetAttribute")?;
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_specs_parse_and_bad_specs_say_what_is_wanted() {
        assert!(device("cpu").unwrap().is_cpu());
        assert!(device(" CPU ").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", "cuda:-1", ""] {
            let e = device(bad).unwrap_err();
            assert!(
                e.to_string().contains("expected cpu, cuda or cuda:N"),
                "{bad}: {e}"
            );
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_rebuild() {
        for spec in ["cuda", "cuda:1"] {
            let e = device(spec).unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
        assert!(default_device().is_cpu());
    }

    #[test]
    fn dtypes_follow_the_device() {
        let cpu = Device::Cpu;
        assert_eq!(model_dtype(&cpu, None).unwrap(), DType::F32);
        assert_eq!(model_dtype(&cpu, Some(DType::F32)).unwrap(), DType::F32);
        let e = model_dtype(&cpu, Some(DType::BF16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use f32 or a CUDA device"), "{e}");
        assert_eq!(vae_dtype(DType::BF16), DType::BF16);
        assert_eq!(vae_dtype(DType::F16), DType::F32);
        assert_eq!(vae_dtype(DType::F32), DType::F32);
        for (s, d) in [
            ("bf16", DType::BF16),
            ("FP16", DType::F16),
            ("f32", DType::F32),
        ] {
            assert_eq!(parse_dtype(s).unwrap(), d);
            assert_eq!(parse_dtype(dtype_name(d)).unwrap(), d);
        }
        assert!(parse_dtype("int8").is_err());
    }

    #[test]
    fn memory_accounting_is_absent_on_the_cpu() {
        let cpu = Device::Cpu;
        gpu_memory::keep_freed_memory(&cpu).unwrap();
        gpu_memory::reset_peak(&cpu).unwrap();
        assert_eq!(gpu_memory::peak_bytes(&cpu).unwrap(), None);
        assert_eq!(gpu_memory::used_bytes(&cpu).unwrap(), None);
    }
}
