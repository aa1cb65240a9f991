//! Where a model's device time goes, op by op and module by module: the
//! device benchmark's breakdown of one UNet call (`gpu-bench run`, beside
//! the same breakdown of diffusers' UNet in benches/gpu/reference.py).
//! Per thread: a model's ops are dispatched from the thread that runs it
//! (the kernels' own worker threads never enter a scope).
//!
//! Why our own: candle has no profiler, and the lent GPU machines run
//! without Nsight Systems (and, on some, without Nsight Compute's
//! counters). A [`scope`] synchronises the device before and after its
//! closure while profiling is on, so its wall time is the device time of
//! the work inside it (plus two synchronisations, ~10 µs each); scopes
//! nest, and each row is inclusive (an `op` inside a `unet` module counts
//! in both). Off (the default) a scope costs one thread-local read.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};

/// Per name: calls, time, bytes of device memory still in use after the
/// scope that were not before it (summed; see [`set_memory`]).
type Table = BTreeMap<&'static str, (u64, Duration, i64)>;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static MEMORY: Cell<bool> = const { Cell::new(false) };
    static TABLE: RefCell<Table> = const { RefCell::new(BTreeMap::new()) };
}

/// Also record, while profiling is on, the device memory each scope leaves
/// in use (its output, and in a training forward everything the graph
/// keeps for the backward): the pool's bytes in use after the scope minus
/// before it, summed per name (CUDA; nothing on the CPU). Returns the
/// previous setting.
pub fn set_memory(on: bool) -> bool {
    MEMORY.with(|m| m.replace(on))
}

/// Turn profiling on or off for this thread; returns the previous
/// setting. Turning it on clears the table.
pub fn set_enabled(on: bool) -> bool {
    if on {
        TABLE.with_borrow_mut(BTreeMap::clear);
    }
    ENABLED.with(|e| e.replace(on))
}

/// Run `f`, timing it under `name` while profiling is on (`x`: a tensor
/// on the device the work runs on).
pub fn scope<T>(name: &'static str, x: &Tensor, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ENABLED.with(Cell::get) {
        return f();
    }
    let dev = x.device().clone();
    let used = || -> Result<Option<i64>> {
        if !MEMORY.with(Cell::get) {
            return Ok(None);
        }
        crate::nn::device::gpu_memory::used_bytes(&dev)
            .map(|b| b.map(|b| b as i64))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    dev.synchronize()?;
    let before = used()?;
    let t = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let dt = t.elapsed();
    let retained = match (before, used()?) {
        (Some(a), Some(b)) => b - a,
        _ => 0,
    };
    TABLE.with_borrow_mut(|table| {
        let row = table.entry(name).or_insert((0, Duration::ZERO, 0));
        row.0 += 1;
        row.1 += dt;
        row.2 += retained;
    });
    Ok(out)
}

/// One row of [`take`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileRow {
    /// `op …` (an [`crate::nn::ops`] function) or `unet …` (a module).
    pub name: String,
    /// Number of calls.
    pub calls: u64,
    /// Total time, inclusive of nested scopes (ms).
    pub ms: f64,
    /// Device memory left in use by the calls, inclusive (MiB; with
    /// [`set_memory`] on a GPU, else absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_mb: Option<f64>,
}

/// The rows timed since profiling was turned on, by name, and a cleared
/// table.
pub fn take() -> Vec<ProfileRow> {
    TABLE
        .with_borrow_mut(std::mem::take)
        .into_iter()
        .map(|(name, (calls, d, bytes))| ProfileRow {
            name: name.to_string(),
            calls,
            ms: d.as_secs_f64() * 1e3,
            retained_mb: (bytes != 0).then(|| bytes as f64 / (1u64 << 20) as f64),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scopes_count_only_while_on_and_nest() -> Result<()> {
        let x = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
        scope("op off", &x, || x.sqr())?;
        assert!(!set_enabled(true));
        let y = scope("unet outer", &x, || {
            let a = scope("op inner", &x, || x.sqr())?;
            scope("op inner", &x, || a + 1.0)
        })?;
        assert_eq!(y.to_vec1::<f32>()?, vec![2.0; 4]);
        assert!(set_enabled(false));
        scope("op after", &x, || x.sqr())?;
        let rows = take();
        let names: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.calls)).collect();
        assert_eq!(names, vec![("op inner", 2), ("unet outer", 1)]);
        assert!(rows[1].ms >= rows[0].ms, "inclusive: {rows:?}");
        assert!(take().is_empty());
        Ok(())
    }
}
