//! Stop requests: SIGINT / SIGTERM set a flag that long loops check at
//! their safe points (the trainer between steps, `import`, `generate`,
//! `caption` and `bucket` between batches, `export` between files (it then
//! drops its staging folder), a merge sweep between merges,
//! `run`'s evaluation between models, `run` and `toy build` between
//! stages), so Ctrl-C or a scheduler's termination keeps everything done
//! so far, records the run as stopped and exits with 130
//! ([`crate::Error::Interrupted`]) instead of dying mid-write. A second
//! signal while the first is being honoured ends the process at once (the
//! default action), for a step that takes minutes; every write is atomic,
//! so that loses only the unfinished step or batch. A second signal within
//! [`SAME_REQUEST_NS`] of the first is the same request delivered twice
//! (coreutils `timeout` sends its SIGTERM to the process and then to its
//! process group; a wrapper may forward the terminal's Ctrl-C that the
//! process also got) and is ignored.
//!
//! Written on `libc` (already a dependency) rather than a crate such as
//! `ctrlc`: all that is needed is an async-signal-safe store to an atomic
//! and, on the second signal, restoring the default action. While a guard
//! is alive SIGXFSZ is ignored too, so a write past the file size limit
//! (`ulimit -f`, the way the tests simulate a full disk) fails with an
//! error the save reports, instead of killing the process.
//!
//! Guards nest (a `run` pipeline installs one, and the trainer inside it
//! another): only the outermost installs and restores the handlers and
//! clears an earlier request, so a Ctrl-C between two stages is not lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

static STOP: AtomicBool = AtomicBool::new(false);

/// When the first signal came (monotonic clock, ns; 0: none yet).
static FIRST_NS: AtomicU64 = AtomicU64::new(0);

/// Signals this close to the first one are the same request.
pub const SAME_REQUEST_NS: u64 = 1_000_000_000;

/// The monotonic clock in ns, at least 1 (`clock_gettime` is
/// async-signal-safe).
#[cfg(unix)]
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
        .max(1)
}

/// Printed (with `write(2)`, which is async-signal-safe) on the first signal.
#[cfg(unix)]
const NOTICE: &[u8] =
    b"\neps2v: stopping at the next safe point, keeping what is done (Ctrl-C again, a second from now, to quit at once)\n";

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    let now = now_ns();
    // The first signal claims the clock before it raises the flag, so a
    // second one that interrupts this handler sees when it came.
    let first = match FIRST_NS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => now,
        Err(t) => t,
    };
    if STOP.swap(true, Ordering::SeqCst) {
        if now.saturating_sub(first) < SAME_REQUEST_NS {
            return;
        }
        // SAFETY: signal() and raise() are async-signal-safe; the signal
        // is blocked while this handler runs, so the default action (end
        // the process) takes effect as soon as it returns.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    } else {
        // SAFETY: write(2) on stderr is async-signal-safe; a short or
        // failed write only loses the notice.
        unsafe {
            libc::write(2, NOTICE.as_ptr().cast(), NOTICE.len());
        }
    }
}

/// Handlers in place, and what they replaced.
struct Installed {
    depth: usize,
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

static STATE: Mutex<Installed> = Mutex::new(Installed {
    depth: 0,
    #[cfg(unix)]
    previous: Vec::new(),
});

/// Keeps the handlers installed; the outermost restores the previous ones
/// when dropped.
pub struct Guard(());

/// Install the handlers, unless a guard is already alive (then only count
/// this one). The outermost clears any earlier request.
pub fn install() -> Guard {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if st.depth == 0 {
        STOP.store(false, Ordering::SeqCst);
        FIRST_NS.store(0, Ordering::SeqCst);
        #[cfg(unix)]
        {
            let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            st.previous.clear();
            for (sig, h) in [
                (libc::SIGINT, handler),
                (libc::SIGTERM, handler),
                (libc::SIGXFSZ, libc::SIG_IGN),
            ] {
                // SAFETY: the handler only touches an atomic and calls
                // async-signal-safe functions; SIG_IGN is always valid.
                let old = unsafe { libc::signal(sig, h) };
                st.previous.push((sig, old));
                // An interrupt the launcher ignores (a background job of a
                // non-interactive shell, nohup) stays ignored: Ctrl-C in
                // that terminal is not meant for this process.
                if sig == libc::SIGINT && old == libc::SIG_IGN {
                    // SAFETY: as above.
                    unsafe {
                        libc::signal(sig, libc::SIG_IGN);
                    }
                }
            }
        }
    }
    st.depth += 1;
    Guard(())
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        st.depth = st.depth.saturating_sub(1);
        #[cfg(unix)]
        if st.depth == 0 {
            for (sig, old) in std::mem::take(&mut st.previous) {
                if old != libc::SIG_ERR {
                    // SAFETY: restoring a handler that was installed before.
                    unsafe {
                        libc::signal(sig, old);
                    }
                }
            }
        }
    }
}

/// Whether a stop was requested since the outermost [`install`].
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
