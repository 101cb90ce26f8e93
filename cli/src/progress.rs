//! Progress of long commands on stderr: a bar with rate and ETA on a terminal (indicatif), a
//! plain line every few seconds otherwise (logs, CI), so stdout stays free for data.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Counts `what` (e.g. "messages exported") up to `total` when it is known.
    pub fn new(what: &'static str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total {
                Some(total) => (ProgressBar::new(total), "{bar:30} {human_pos}/{human_len} {msg} ({rate}, {eta} left)"),
                None => (ProgressBar::new_spinner(), "{spinner} {human_pos} {msg} ({rate})"),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                // Whole items per second: indicatif's own `per_sec` prints four decimals.
                bar.set_style(style.with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0}/s", state.per_sec());
                }));
            }
            bar.set_message(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Self { what, total, bar, done: 0, started: now, last_line: now }
    }

    pub fn inc(&mut self, count: u64) {
        self.done += count;
        match &self.bar {
            Some(bar) => bar.inc(count),
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{}", self.line());
    }

    fn line(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / seconds.max(0.001);
        match self.total {
            Some(total) if self.done < total && rate > 0.0 => {
                let left = (total - self.done) as f64 / rate;
                format!("{} / {total} {} in {seconds:.1}s ({rate:.0}/s, {left:.0}s left)", self.done, self.what)
            }
            Some(total) => format!("{} / {total} {} in {seconds:.1}s ({rate:.0}/s)", self.done, self.what),
            None => format!("{} {} in {seconds:.1}s ({rate:.0}/s)", self.done, self.what),
        }
    }
}
