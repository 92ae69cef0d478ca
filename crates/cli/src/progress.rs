//! Progress of long commands on stderr: an indicatif bar on a terminal, plain lines (at most
//! one a second, and a last one) when stderr is a file or a pipe.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Progress of one command.
#[derive(Debug)]
pub(crate) struct Progress {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Bar(ProgressBar),
    Lines {
        label: &'static str,
        unit: &'static str,
        total: Option<u64>,
        started: Instant,
        /// When the last line was printed, and the count it showed.
        last: Mutex<Option<(Instant, u64)>>,
    },
}

impl Progress {
    /// Progress of `label` counted in `unit`s, out of `total` when known.
    pub(crate) fn new(label: &'static str, unit: &'static str, total: Option<u64>) -> Self {
        let mode = if std::io::stderr().is_terminal() {
            let (bar, template) = match total {
                Some(n) => (
                    ProgressBar::new(n),
                    "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {msg} ({per_sec}, eta {eta})",
                ),
                None => (
                    ProgressBar::new_spinner(),
                    "{spinner} {prefix} [{elapsed_precise}] {human_pos} {msg} ({per_sec})",
                ),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_prefix(label);
            bar.set_message(unit);
            bar.enable_steady_tick(Duration::from_millis(200));
            Mode::Bar(bar)
        } else {
            Mode::Lines {
                label,
                unit,
                total,
                started: Instant::now(),
                last: Mutex::new(None),
            }
        };
        Progress { mode }
    }

    /// `done` units so far.
    pub(crate) fn set(&self, done: u64) {
        match &self.mode {
            Mode::Bar(bar) => bar.set_position(done),
            Mode::Lines { last, .. } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1)) {
                    *last = Some((Instant::now(), done));
                    self.print_line(done);
                }
            }
        }
    }

    /// The end: `done` units in all.
    pub(crate) fn finish(&self, done: u64) {
        match &self.mode {
            Mode::Bar(bar) => {
                bar.set_position(done);
                bar.finish_and_clear();
            }
            // The last line, unless the count was just printed.
            Mode::Lines { last, .. } => {
                let printed = last
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map(|(_, n)| n);
                if printed != Some(done) {
                    self.print_line(done);
                }
            }
        }
    }

    fn print_line(&self, done: u64) {
        if let Mode::Lines {
            label,
            unit,
            total,
            started,
            ..
        } = &self.mode
        {
            let secs = started.elapsed().as_secs_f64();
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            match total {
                Some(total) => eprintln!(
                    "{label}: {done}/{total} {unit} ({:.0}%, {rate:.0} {unit}/s)",
                    100.0 * done as f64 / (*total).max(1) as f64
                ),
                None => eprintln!("{label}: {done} {unit} ({rate:.0} {unit}/s)"),
            }
        }
    }
}
