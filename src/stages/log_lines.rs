//! Progress for a stderr that is not a terminal (`nohup`, Slurm, `2> log`).
//!
//! indicatif hides its bars there, so a job of hours would log nothing
//! until its summary. This draw target turns the bars' state into plain
//! lines, at most one every [`EVERY`] and the first [`EVERY`] after the
//! bar began (short commands print nothing extra):
//! `progress: train 340/1200 (3.1/s, 4m 40s elapsed, eta 4m 37s)`.
//! Written here because indicatif has no line-per-interval mode; it is
//! its documented `TermLike` hook.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressDrawTarget, TermLike};

/// Time between two lines (and before the first).
pub const EVERY: Duration = Duration::from_secs(30);

/// The bars' template off a terminal: no bar graphic, the message, counts,
/// rate, elapsed time and ETA.
pub const TEMPLATE: &str = "{msg} {pos}/{len} ({per_sec}, {elapsed} elapsed, eta {eta})";

/// Whether stderr is a terminal (bars) or not (lines).
pub fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal()
}

/// A draw target writing lines to stderr.
pub fn target() -> ProgressDrawTarget {
    ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(EVERY, Sink::Stderr)), 1)
}

/// Where the lines go.
#[derive(Debug)]
enum Sink {
    Stderr,
    #[cfg(test)]
    Memory(std::sync::Arc<Mutex<Vec<String>>>),
}

#[derive(Debug)]
struct LogLines {
    every: Duration,
    sink: Sink,
    /// The draw being assembled, and when the last line was written
    /// (the start at first).
    state: Mutex<(String, Instant)>,
}

impl LogLines {
    fn new(every: Duration, sink: Sink) -> Self {
        Self {
            every,
            sink,
            state: Mutex::new((String::new(), Instant::now())),
        }
    }

    fn emit(&self, line: String) {
        match &self.sink {
            Sink::Stderr => {
                let _ = writeln!(io::stderr().lock(), "{line}");
            }
            #[cfg(test)]
            Sink::Memory(v) => v.lock().unwrap_or_else(|e| e.into_inner()).push(line),
        }
    }
}

/// One draw as one line: indicatif pads each bar's line to the width
/// with spaces (no newline), so runs of spaces separate the bars.
fn one_line(draw: &str) -> String {
    draw.split("   ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        160
    }

    fn height(&self) -> u16 {
        // Every bar of a multi-bar fits.
        100
    }

    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)?;
        self.write_str("   ")
    }

    fn write_str(&self, s: &str) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.push_str(s);
        Ok(())
    }

    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let line = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let draw = std::mem::take(&mut st.0);
            let line = one_line(&draw.replace('\r', ""));
            if line.is_empty() || st.1.elapsed() < self.every {
                return Ok(());
            }
            st.1 = Instant::now();
            line
        };
        self.emit(format!("progress: {line}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use std::sync::Arc;

    fn bar(target: ProgressDrawTarget, len: u64, msg: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(Some(len), target);
        pb.set_style(ProgressStyle::with_template(TEMPLATE).unwrap());
        pb.set_message(msg.to_string());
        pb
    }

    /// Nothing before the interval; then one line per interval with the
    /// bar's state; several bars share a line.
    #[test]
    fn lines_come_once_per_interval_with_the_state() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let every = Duration::from_millis(300);
        let target = || {
            ProgressDrawTarget::term_like(Box::new(LogLines::new(
                every,
                Sink::Memory(lines.clone()),
            )))
        };
        let pb = bar(target(), 100, "train");
        for _ in 0..10 {
            pb.inc(1);
        }
        assert!(lines.lock().unwrap().is_empty(), "{:?}", lines.lock());
        std::thread::sleep(every + Duration::from_millis(50));
        pb.inc(1);
        pb.inc(1);
        {
            let l = lines.lock().unwrap();
            assert_eq!(l.len(), 1, "{l:?}");
            assert!(l[0].starts_with("progress: train 11/100 ("), "{l:?}");
            assert!(l[0].contains("elapsed, eta "), "{l:?}");
        }
        pb.finish_and_clear();
        assert_eq!(lines.lock().unwrap().len(), 1);

        lines.lock().unwrap().clear();
        let multi = MultiProgress::with_draw_target(target());
        let a = multi.add(bar(ProgressDrawTarget::hidden(), 10, "generate"));
        let b = multi.add(bar(ProgressDrawTarget::hidden(), 20, "caption"));
        // Both bars have drawn once (within the interval: no line yet).
        a.inc(1);
        b.inc(5);
        assert!(lines.lock().unwrap().is_empty());
        std::thread::sleep(every + Duration::from_millis(50));
        a.inc(2);
        let l = lines.lock().unwrap();
        assert!(!l.is_empty(), "{l:?}");
        let last = l.last().unwrap();
        assert!(
            last.contains("generate 3/10") && last.contains(" | caption 5/20"),
            "{last}"
        );
    }

    #[test]
    fn one_line_joins_padded_bars() {
        assert_eq!(one_line("     train 1/2 (x)        "), "train 1/2 (x)");
        assert_eq!(one_line("a 1/2      b 2/3     "), "a 1/2 | b 2/3");
    }
}
