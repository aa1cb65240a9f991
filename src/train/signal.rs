//! Stop requests: SIGINT / SIGTERM set a flag that the training loop checks
//! between steps, so Ctrl-C or a scheduler's termination saves a resumable
//! checkpoint instead of losing the run.
//!
//! Written on `libc` (already a dependency) rather than a crate such as
//! `ctrlc`: all that is needed is an async-signal-safe store to an atomic.
//! While a guard is alive SIGXFSZ is ignored too, so a write past the file
//! size limit (`ulimit -f`, the way the tests simulate a full disk) fails
//! with an error the save reports, instead of killing the process.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Restores the previous handlers when dropped.
pub struct Guard {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

/// Install the handlers (and clear any earlier request).
pub fn install() -> Guard {
    STOP.store(false, Ordering::SeqCst);
    #[cfg(unix)]
    {
        let mut previous = Vec::new();
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        for (sig, h) in [
            (libc::SIGINT, handler),
            (libc::SIGTERM, handler),
            (libc::SIGXFSZ, libc::SIG_IGN),
        ] {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe; SIG_IGN is always valid.
            let old = unsafe { libc::signal(sig, h) };
            previous.push((sig, old));
        }
        Guard { previous }
    }
    #[cfg(not(unix))]
    Guard {}
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(unix)]
        for &(sig, old) in &self.previous {
            if old != libc::SIG_ERR {
                // SAFETY: restoring a handler that was installed before.
                unsafe {
                    libc::signal(sig, old);
                }
            }
        }
    }
}

/// Whether a stop was requested since [`install`].
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
