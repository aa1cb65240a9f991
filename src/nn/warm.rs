//! Keep the rayon pool's idle workers awake through a hot loop.
//!
//! A toy-model training step is hundreds of small parallel ops (convs,
//! GEMMs, norms of a few hundred KiB each). Between two of them rayon parks
//! an idle worker on a futex after a few dozen yields, and the next op wakes
//! it again; on the 2-core VMs here a wake costs tens of microseconds of
//! scheduler work (perf: ~15 % of a step in `finish_task_switch`,
//! `_raw_spin_unlock_irqrestore`, `__schedule`), and the second core then
//! mostly idles: a toy UNet step at batch 16 took 88 ms on two threads and
//! 103 on one. rayon has no setting for how long idle workers spin, so
//! [`keep_warm`] runs a job on every other worker of the current pool that
//! polls the pool for work ([`rayon::yield_now`]) until the guard drops: the
//! owner's `join`s and parallel loops are picked up at once, without a
//! wake-up. Same work split, same results (the kernels split by thread
//! count, never by timing); measured by `cargo bench --profile dev --bench
//! toy`, which prints the step with and without it.
//!
//! A polling worker gives its core away when it is wanted: when nothing is
//! queued it calls `sched_yield`, and when that took long (another thread,
//! e.g. of another process, ran on the core) it sleeps 1 ms before polling
//! again: two processes each training the toy UNet at once ran as fast
//! with it as without. Work on two pools of one process (`toy build`'s
//! side-by-side stages) declares itself with [`share_cores`], and nobody
//! polls meanwhile.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(true);
/// A [`KeepWarm`] has pollers out (one at a time in the process).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Live [`SharedCores`] guards.
static SHARED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread started the [`KeepWarm`] whose pollers are out.
    static OWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the pollers out now were started by this thread (its pool's
/// idle workers poll for it). [`super::lanes`] then declares the cores
/// shared while its own pools run, and only then: other threads' lanes
/// leave other loops' pollers alone.
pub fn polling_for_this_thread() -> bool {
    OWNER.try_with(|o| o.get()).unwrap_or(false)
}

/// A `sched_yield` longer than this means another thread ran on the core.
const PREEMPTED: Duration = Duration::from_micros(200);
/// How long a polling worker steps aside after being preempted.
const BACK_OFF: Duration = Duration::from_millis(1);

/// Globally enable (default) or disable [`keep_warm`]; for benchmarks and
/// A/B checks. `EPS2V_KEEP_WARM=0` in the environment disables it too.
pub fn set_keep_warm(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    ENABLED.load(Ordering::Relaxed)
        && *ENV.get_or_init(|| std::env::var("EPS2V_KEEP_WARM").map_or(true, |v| v != "0"))
}

/// State shared by a [`KeepWarm`] and its pollers.
#[derive(Debug, Default)]
struct Pollers {
    /// Set by the handle: the pollers return.
    done: AtomicBool,
    /// Set by a poller that returned because the cores became shared.
    left: AtomicBool,
}

/// Handle returned by [`keep_warm`]: while it lives, the other workers of
/// the pool that created it poll for work, when they may (see
/// [`keep_warm`]); they go back to rayon's own idling when it drops.
#[derive(Debug)]
pub struct KeepWarm {
    run: Option<Arc<Pollers>>,
}

impl KeepWarm {
    /// Whether workers are polling for this handle now.
    pub fn is_polling(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| !r.left.load(Ordering::Acquire))
    }

    /// Call between the steps of a long loop: starts the pollers when they
    /// may run now but did not (other pools shared the cores when the loop
    /// began, or still did at the last call). Two atomic loads when
    /// nothing changed.
    pub fn refresh(&mut self) {
        if let Some(run) = &self.run {
            if !run.left.load(Ordering::Acquire) {
                return;
            }
            self.stop();
        }
        self.start();
    }

    fn start(&mut self) {
        if !enabled() || SHARED.load(Ordering::Acquire) > 0 || rayon::current_num_threads() < 2 {
            return;
        }
        let Some(owner) = rayon::current_thread_index() else {
            return;
        };
        if ACTIVE
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let run = Arc::new(Pollers::default());
        let theirs = run.clone();
        rayon::spawn_broadcast(move |ctx| {
            // The owner never polls: its own broadcast job runs when it next
            // waits inside the pool, and must return at once.
            if ctx.index() != owner {
                poll(&theirs);
            }
        });
        self.run = Some(run);
        let _ = OWNER.try_with(|o| o.set(true));
    }

    fn stop(&mut self) {
        if let Some(run) = self.run.take() {
            run.done.store(true, Ordering::Release);
            ACTIVE.store(false, Ordering::Release);
            let _ = OWNER.try_with(|o| o.set(false));
        }
    }
}

impl Drop for KeepWarm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keep the other workers of the current rayon pool polling for work while
/// the handle lives. Nothing polls (and [`KeepWarm::refresh`] tries again)
/// when disabled ([`set_keep_warm`]), while other pools share the cores
/// ([`share_cores`]), when the caller is not a pool worker (see
/// [`super::on_pool`]), when the pool has one thread, or while another
/// handle's workers poll (nested hot loops ride on the outer one).
///
/// Create it on the thread that drives the loop, once per loop: starting
/// costs one broadcast.
pub fn keep_warm() -> KeepWarm {
    let mut w = KeepWarm { run: None };
    w.start();
    w
}

/// Guard returned by [`share_cores`].
#[derive(Debug)]
pub struct SharedCores(());

impl Drop for SharedCores {
    fn drop(&mut self) {
        SHARED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Declare that work on other thread pools shares the cores until the guard
/// drops (`toy build`'s side-by-side stages): meanwhile no worker polls
/// (those that did return, and [`KeepWarm::refresh`] restarts them after
/// the drop), so that idle workers leave their cores to the other pool.
pub fn share_cores() -> SharedCores {
    SHARED.fetch_add(1, Ordering::AcqRel);
    SharedCores(())
}

fn poll(p: &Pollers) {
    while !p.done.load(Ordering::Acquire) {
        if SHARED.load(Ordering::Relaxed) > 0 {
            p.left.store(true, Ordering::Release);
            return;
        }
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            continue;
        }
        let t = Instant::now();
        std::thread::yield_now();
        if t.elapsed() > PREEMPTED {
            std::thread::sleep(BACK_OFF);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::Mutex;

    /// Polling is process-wide: tests that check whether it runs must not
    /// overlap (tests elsewhere that poll take it too).
    pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

    pub(crate) fn lock() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh rayon pool of `n` threads.
    pub(crate) fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn only_on_a_multi_thread_pool_and_never_nested() {
        let _one = lock();
        assert!(!keep_warm().is_polling(), "not a pool worker");
        assert!(!pool(1).install(keep_warm).is_polling(), "one thread");
        pool(3).install(|| {
            let outer = keep_warm();
            assert!(outer.is_polling(), "a worker of a 3-thread pool");
            let mut inner = keep_warm();
            assert!(!inner.is_polling(), "nested");
            inner.refresh();
            assert!(!inner.is_polling(), "still nested");
            drop(outer);
            inner.refresh();
            assert!(inner.is_polling(), "free again after the outer drop");
        });
        set_keep_warm(false);
        let off = pool(2).install(keep_warm).is_polling();
        set_keep_warm(true);
        assert!(!off, "disabled");
    }

    #[test]
    fn the_owner_thread_knows_it_is_polled_for() {
        let _one = lock();
        assert!(!polling_for_this_thread());
        pool(2).install(|| {
            let w = keep_warm();
            assert!(w.is_polling());
            assert!(polling_for_this_thread());
            let elsewhere = std::thread::spawn(polling_for_this_thread).join().unwrap();
            assert!(!elsewhere, "another thread");
            drop(w);
            assert!(!polling_for_this_thread());
        });
    }

    #[test]
    fn shared_cores_stop_the_pollers_and_refresh_restarts_them() {
        let _one = lock();
        pool(2).install(|| {
            let shared = share_cores();
            let mut w = keep_warm();
            assert!(!w.is_polling(), "the cores are shared");
            w.refresh();
            assert!(!w.is_polling());
            drop(shared);
            w.refresh();
            assert!(w.is_polling(), "restarted once the cores are ours");

            let shared = share_cores();
            let t = Instant::now();
            while w.is_polling() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "the poller never left"
                );
                std::thread::yield_now();
            }
            w.refresh();
            assert!(!w.is_polling());
            drop(shared);
            w.refresh();
            assert!(w.is_polling());
        });
    }

    #[test]
    fn parallel_work_under_the_guard_gives_the_same_results_and_ends() {
        let _one = lock();
        let p = pool(2);
        // Work split into fixed chunks, as the kernels split it: the result
        // cannot depend on which thread ran which chunk. (rayon's adaptive
        // `sum` would: its reduction tree follows the stealing.)
        let work = || -> Vec<f32> {
            (0..64)
                .map(|i| {
                    let parts: Vec<f32> = (0..16)
                        .into_par_iter()
                        .map(|c| {
                            (0..256)
                                .map(|j| ((i * 4096 + c * 256 + j) as f32).sin())
                                .sum::<f32>()
                        })
                        .collect();
                    parts.iter().sum::<f32>()
                })
                .collect()
        };
        let cold = p.install(work);
        let (warm, polled) = p.install(|| {
            let g = keep_warm();
            let polled = g.is_polling();
            (work(), polled)
        });
        assert!(polled);
        assert_eq!(cold, warm);
        // The polling job ended with the guard: the pool still runs new work.
        assert_eq!(
            p.install(|| (0..1000).into_par_iter().sum::<i32>()),
            499_500
        );
    }
}
