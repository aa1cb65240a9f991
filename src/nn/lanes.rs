//! Independent jobs on several small thread pools at once ("lanes").
//!
//! Sampling a tiny model (the toy world's 8×8 to 12×8 latents) is hundreds
//! of small ops per step, and two cores split each of them poorly: 192 toy
//! images (`eps2v generate`, 20 steps, CFG) took 25.9 s on one thread and
//! 19.1 s on two, while two processes of one thread each, one half of the
//! plan each, rendered them in 12.0 s together. [`run`] does that in one
//! process: the jobs (batches of images) go to `lanes` rayon pools of
//! `threads / lanes` threads each, in index order as lanes free up, and
//! their results come back to the calling thread **in index order**, so a
//! stage commits exactly what it would have committed one job after the
//! other, and a failed job stops the others without losing the results
//! before it.
//!
//! A job's numbers do not depend on its pool's size: the CPU kernels split
//! work by thread count into fixed pieces and compute each row with the
//! same arithmetic however many threads there are
//! (`nn::kernels::invariant`); the sampling tests check pixels with and
//! without lanes. When the caller's own pool is kept warm for it
//! ([`super::keep_warm`]), the cores are declared shared
//! ([`super::share_cores`]) while the lanes run, so its idle workers stop
//! polling.
//!
//! [`lanes_for_latent`] says when lanes pay: on the CPU, for latents of at
//! most 16×16 (images up to 128×128), one lane per thread; never on CUDA,
//! and never for real image sizes, whose ops are big enough to use every
//! core (and whose activations would be held once per lane).
//! `EPS2V_LANES=N` overrides the count (`1`: one job after the other).
//!
//! The trainer runs a step's micro-batches (`--grad-accum`) on lanes by the
//! same rule and sums their gradients in micro-batch order; the kernels'
//! sums do not depend on the thread count (`kernels::SUM_PIECES`), so the
//! bytes are those of one micro-batch after the other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use candle_core::Device;

use crate::{Error, Result};

/// Largest latent (width × height, in latent pixels) sampled in lanes.
pub const MAX_LANE_LATENT: usize = 16 * 16;

/// Lane count set by [`set_lanes`] (0: none).
static OVERRIDE: AtomicUsize = AtomicUsize::new(0);

/// Override [`lanes_for_latent`] for the whole process (`Some(1)`: one job
/// after the other), or go back to the default (`None`); for benchmarks
/// and A/B checks, like `EPS2V_LANES`, which this takes precedence over.
pub fn set_lanes(lanes: Option<usize>) {
    OVERRIDE.store(lanes.unwrap_or(0), Ordering::SeqCst);
}

/// The [`set_lanes`] override, else `EPS2V_LANES` when set to a positive
/// integer.
fn env_lanes() -> Option<usize> {
    let o = OVERRIDE.load(Ordering::SeqCst);
    if o > 0 {
        return Some(o);
    }
    std::env::var("EPS2V_LANES")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// How many lanes to sample latents of `latent_w × latent_h` on `device`
/// with: [`set_lanes`]' or `EPS2V_LANES`' count when set; else, on the CPU and for latents of at
/// most [`MAX_LANE_LATENT`] pixels, one per thread of the current pool;
/// else 1.
pub fn lanes_for_latent(device: &Device, latent_w: usize, latent_h: usize) -> usize {
    if let Some(n) = env_lanes() {
        return n;
    }
    if device.is_cpu() && latent_w * latent_h <= MAX_LANE_LATENT {
        super::kernels::threads()
    } else {
        1
    }
}

/// Run `job(0) … job(n − 1)` on `lanes` thread pools of `threads / lanes`
/// threads each (threads: the current pool's), handing each result to
/// `sink` on the calling thread in index order. With one lane (or one job)
/// the jobs run one after the other on the calling thread, job then sink.
///
/// Errors: the first failing job in index order (every job before it still
/// runs and is sunk first; none after it starts), or the first error of
/// `sink` (nothing after it is sunk, no new job starts). Jobs already
/// running finish. A lane runs at most `2 × lanes` jobs ahead of the sink.
pub fn run<T, J, S>(n: usize, lanes: usize, job: J, mut sink: S) -> Result<()>
where
    T: Send,
    J: Fn(usize) -> Result<T> + Sync,
    S: FnMut(usize, T) -> Result<()>,
{
    let lanes = lanes.clamp(1, n.max(1));
    if lanes == 1 {
        for i in 0..n {
            let t = job(i)?;
            sink(i, t)?;
        }
        return Ok(());
    }
    let threads = (super::kernels::threads() / lanes).max(1);
    // The caller's own pool may be kept warm for it: its idle workers would
    // poll while it waits here. Only then are the cores declared shared
    // (process-wide), so that lanes elsewhere leave others' pollers alone.
    let _shared = super::warm::polling_for_this_thread().then(super::share_cores);
    let window = 2 * lanes;
    let next = AtomicUsize::new(0);
    // Jobs from this index on are not started: the first failed job's
    // index, or 0 once the sink failed.
    let limit = AtomicUsize::new(n);
    // Index of the next result the sink wants; lanes wait on it.
    let sunk = (Mutex::new(0usize), Condvar::new());
    let halt_at = |i: usize| {
        limit.fetch_min(i, Ordering::SeqCst);
        let _g = sunk.0.lock().unwrap_or_else(|e| e.into_inner());
        sunk.1.notify_all();
    };
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<T>)>();
    std::thread::scope(|s| {
        for k in 0..lanes {
            let tx = tx.clone();
            let (next, limit, sunk, job) = (&next, &limit, &sunk, &job);
            s.spawn(move || {
                let pool = match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |i| format!("eps2v-lane{k}-{i}"))
                    .build()
                {
                    Ok(p) => p,
                    Err(e) => {
                        let msg = format!("cannot start a thread pool for lane {k}: {e}");
                        let _ = tx.send((0, Err(Error::Other(msg))));
                        return;
                    }
                };
                pool.install(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= limit.load(Ordering::SeqCst) {
                        break;
                    }
                    {
                        let mut want = sunk.0.lock().unwrap_or_else(|e| e.into_inner());
                        while i >= *want + window && i < limit.load(Ordering::SeqCst) {
                            want = sunk.1.wait(want).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if i >= limit.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = job(i);
                    let failed = r.is_err();
                    if tx.send((i, r)).is_err() || failed {
                        break;
                    }
                });
            });
        }
        drop(tx);
        let mut ready: BTreeMap<usize, T> = BTreeMap::new();
        let mut want = 0usize;
        // (index, error) of the first failed job in index order.
        let mut failed: Option<(usize, Error)> = None;
        let mut sink_err: Option<Error> = None;
        for (i, r) in rx {
            match r {
                Err(e) => {
                    if failed.as_ref().is_none_or(|(j, _)| i < *j) {
                        failed = Some((i, e));
                    }
                    halt_at(i);
                }
                Ok(t) => {
                    ready.insert(i, t);
                }
            }
            if sink_err.is_some() {
                continue;
            }
            while failed.as_ref().is_none_or(|(j, _)| want < *j) {
                let Some(t) = ready.remove(&want) else {
                    break;
                };
                if let Err(e) = sink(want, t) {
                    sink_err = Some(e);
                    halt_at(0);
                    break;
                }
                want += 1;
                let mut w = sunk.0.lock().unwrap_or_else(|e| e.into_inner());
                *w = want;
                sunk.1.notify_all();
            }
        }
        if let Some(e) = sink_err {
            return Err(e);
        }
        if let Some((_, e)) = failed {
            return Err(e);
        }
        if want != n {
            return Err(Error::Other(format!(
                "lanes: {want} of {n} jobs came back (a lane stopped early)"
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::warm::tests::pool;

    #[test]
    fn results_come_back_in_order_on_pools_of_the_shared_threads() {
        for lanes in [1, 2, 3, 7] {
            let mut got = Vec::new();
            let threads = pool(4)
                .install(|| {
                    let seen = Mutex::new(Vec::new());
                    run(
                        23,
                        lanes,
                        |i| {
                            // Later jobs finish first now and then.
                            if i % 5 == 0 {
                                std::thread::sleep(std::time::Duration::from_millis(3));
                            }
                            seen.lock().unwrap().push(rayon::current_num_threads());
                            Ok(i * i)
                        },
                        |i, v| {
                            assert_eq!(v, i * i);
                            got.push(i);
                            Ok(())
                        },
                    )
                    .map(|()| seen.into_inner().unwrap())
                })
                .unwrap();
            assert_eq!(got, (0..23).collect::<Vec<_>>(), "lanes {lanes}");
            let want = if lanes == 1 { 4 } else { (4 / lanes).max(1) };
            assert!(
                threads.iter().all(|&t| t == want),
                "lanes {lanes}: {threads:?}"
            );
        }
    }

    #[test]
    fn a_failed_job_stops_the_rest_after_sinking_everything_before_it() {
        for lanes in [1, 2, 4] {
            let mut got = Vec::new();
            let started = AtomicUsize::new(0);
            let err = pool(4)
                .install(|| {
                    run(
                        200,
                        lanes,
                        |i| {
                            started.fetch_add(1, Ordering::SeqCst);
                            if i == 9 {
                                Err(Error::Other("job 9 broke".into()))
                            } else {
                                Ok(i)
                            }
                        },
                        |i, _| {
                            got.push(i);
                            Ok(())
                        },
                    )
                })
                .unwrap_err();
            assert!(err.to_string().contains("job 9 broke"), "{err}");
            assert_eq!(got, (0..9).collect::<Vec<_>>(), "lanes {lanes}");
            // The window keeps the lanes close to the sink.
            assert!(started.load(Ordering::SeqCst) <= 9 + 1 + 2 * lanes + lanes);
        }
    }

    #[test]
    fn a_sink_error_stops_the_lanes() {
        let mut got = Vec::new();
        let err = pool(2)
            .install(|| {
                run(100, 2, Ok, |i, _| {
                    if i == 3 {
                        return Err(Error::Other("disk full".into()));
                    }
                    got.push(i);
                    Ok(())
                })
            })
            .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn only_small_latents_on_the_cpu_get_lanes() {
        if env_lanes().is_some() {
            return; // overridden for this process
        }
        pool(2).install(|| {
            assert_eq!(lanes_for_latent(&Device::Cpu, 8, 8), 2);
            assert_eq!(lanes_for_latent(&Device::Cpu, 16, 16), 2);
            assert_eq!(lanes_for_latent(&Device::Cpu, 128, 128), 1);
        });
        pool(1).install(|| assert_eq!(lanes_for_latent(&Device::Cpu, 8, 8), 1));
    }

    #[test]
    fn no_jobs_is_fine() {
        run(0, 4, |_| Ok(()), |_, _| panic!("nothing to sink")).unwrap();
    }
}
