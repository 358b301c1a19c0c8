//! Showing a long build's progress: a bar redrawn in place on a terminal, a log event every
//! few seconds otherwise (a job runner's log, a pipe), so that nobody waits without knowing
//! how long for. The log event goes through `tracing` with its figures as fields, so it
//! follows `RUST_LOG` and `--log-format json` like every other line a collector reads.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledgerline_projections::{Phase, Progress, ProgressState};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Redraws the bar this often on a terminal.
const TERMINAL_EVERY: Duration = Duration::from_millis(250);
/// Logs a line this often otherwise.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Whether the bar is drawn on standard error now, with no line end after it.
static BAR_DRAWN: AtomicBool = AtomicBool::new(false);

/// Standard error for the log. A log line written while the bar is drawn would go on the
/// bar's line: it clears the bar first (the next tick draws it again, under the log line).
pub fn log_writer() -> LogWriter {
    LogWriter
}

pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        clear_bar_then_write(&mut std::io::stderr().lock(), buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Held by the caller's lock on standard error, as the bar is drawn under it.
fn clear_bar_then_write(out: &mut impl Write, buf: &[u8]) -> std::io::Result<usize> {
    if BAR_DRAWN.swap(false, Ordering::Relaxed) {
        out.write_all(b"\r\x1b[2K")?;
    }
    out.write(buf)
}

/// A run's progress on display; [`finish`] ends it.
pub struct Display {
    task: JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

/// Shows `progress` until the returned display is passed to [`finish`]: a bar on standard
/// error when it is a terminal, else an `info` event in the log.
pub fn show(label: &'static str, progress: Arc<Progress>) -> Display {
    let terminal = std::io::stderr().is_terminal();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let mut first: Option<i64> = None;
        // Looked at as often as the bar is drawn even when only logged, so that the start
        // is seen before a later phase of the run restarts the count (a rebuild starts it
        // again for the events that arrived while it built its indexes).
        let mut ticker = tokio::time::interval(TERMINAL_EVERY);
        let mut logged = Instant::now();
        ticker.tick().await;
        loop {
            // The last look, when the run is over: where it ended (its end, or where an
            // error stopped it) is shown whatever the interval.
            let last = tokio::select! {
                _ = ticker.tick() => false,
                _ = &mut stopped => true,
            };
            let state = progress.snapshot();
            if !state.positions.is_empty() {
                let first = *first.get_or_insert(state.first);
                let figures = Figures::of(&state, first, started.elapsed());
                if terminal {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{}", fit(figures.line(label), width()));
                    let _ = err.flush();
                    BAR_DRAWN.store(true, Ordering::Relaxed);
                } else if last || logged.elapsed() >= LOG_EVERY {
                    logged = Instant::now();
                    figures.log(label);
                }
            }
            if last {
                // Unless a log line has ended the bar's line already; under the lock, as a
                // log line takes it.
                let mut err = std::io::stderr().lock();
                if BAR_DRAWN.swap(false, Ordering::Relaxed) {
                    let _ = writeln!(err);
                }
                return;
            }
        }
    });
    Display { task, stop }
}

/// Shows where the run ended and stops the display.
pub async fn finish(display: Display) {
    let _ = display.stop.send(());
    let _ = display.task.await;
}

/// Where a run stands, in log positions; its rate is this run's own.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    phase: Phase,
    done: i64,
    total: i64,
    percent: f64,
    /// Events per second since the run started.
    rate: f64,
    /// Seconds left at that rate; unknown until something is done.
    eta: Option<f64>,
}

impl Figures {
    fn of(state: &ProgressState, first: i64, elapsed: Duration) -> Self {
        // Counted in log positions, as `projections status` shows them (a build starts from
        // the log's start), so a resumed job shows what it had done before; the rate is
        // this run's own.
        let reached = state.done().max(first);
        let total = state.target.max(reached);
        let done = reached;
        let percent = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let rate = (reached - first) as f64 / elapsed.as_secs_f64().max(0.001);
        // Only events have a rate to tell the rest by: the phases after them do not.
        let eta = (state.phase == Phase::Applying && rate > 0.0)
            .then(|| (state.target - reached) as f64 / rate);
        Self {
            phase: state.phase,
            done,
            total,
            percent,
            rate,
            eta,
        }
    }

    /// `rebuild: 412,000/1,000,000 events (41%) 52,310 events/s, ETA 11s`, or what the run
    /// does once the events are applied.
    fn line(&self, label: &str) -> String {
        let counted = format!(
            "{label}: {}/{} events ({:.0}%)",
            thousands(self.done),
            thousands(self.total),
            self.percent,
        );
        if self.phase != Phase::Applying {
            return format!("{counted}, {}", self.phase.describe());
        }
        let eta = match self.eta {
            Some(eta) => format!("ETA {eta:.0}s"),
            None => "ETA unknown".to_string(),
        };
        format!("{counted} {} events/s, {eta}", thousands(self.rate as i64))
    }

    fn log(&self, label: &'static str) {
        tracing::info!(
            command = label,
            phase = self.phase.describe(),
            events_done = self.done,
            events_total = self.total,
            percent = self.percent.floor() as i64,
            events_per_second = self.rate.round() as i64,
            eta_seconds = self.eta.map(|eta| eta.round() as i64),
            "{label} progress"
        );
    }
}

/// The terminal's width: `COLUMNS` when the shell exports it, else the common 80.
fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|w| *w >= 20)
        .unwrap_or(80)
}

/// `line` cut to fit in `width` columns with one to spare: the bar is redrawn with `\r`,
/// which returns only to the start of the last physical line, so a line that wrapped would
/// leave its first part behind at every redraw.
fn fit(line: String, width: usize) -> String {
    if line.chars().count() < width {
        return line;
    }
    let mut cut: String = line.chars().take(width.saturating_sub(2)).collect();
    cut.push('…');
    cut
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_counts_what_it_had_done_and_its_own_rate() {
        let state = ProgressState {
            job: None,
            phase: Phase::Applying,
            first: 1_000,
            target: 101_000,
            positions: vec![("users", 51_000), ("messaging", 41_000)],
            ends: vec![],
        };
        let figures = Figures::of(&state, 1_000, Duration::from_secs(4));
        assert_eq!(figures.eta, Some(6.0));
        assert_eq!(
            figures.line("rebuild"),
            "rebuild: 41,000/101,000 events (41%) 10,000 events/s, ETA 6s"
        );
    }

    /// A run in `phase` with its `events` all applied.
    fn all_applied(phase: Phase, events: i64) -> ProgressState {
        ProgressState {
            job: None,
            phase,
            first: 0,
            target: events,
            positions: vec![("users", events)],
            ends: vec![],
        }
    }

    /// Once the events are applied the count stands still: the line says what goes on.
    #[test]
    fn a_line_says_what_the_run_does_after_the_events() {
        let state = all_applied(Phase::Indexing, 5_000);
        assert_eq!(
            Figures::of(&state, 0, Duration::from_secs(2)).line("rebuild"),
            "rebuild: 5,000/5,000 events (100%), building indexes and statistics"
        );
    }

    /// A check compares each projection at its own checkpoint: one stopped far behind the
    /// others, once there, does not pin the whole run at its position.
    #[test]
    fn a_projection_at_its_own_end_holds_nothing_back() {
        let state = ProgressState {
            job: None,
            phase: Phase::Applying,
            first: 0,
            target: 100_000,
            positions: vec![("users", 999), ("messaging", 60_000)],
            ends: vec![("users", 999)],
        };
        assert_eq!(state.done(), 60_000);
        assert_eq!(
            Figures::of(&state, 0, Duration::from_secs(6)).line("check"),
            "check: 60,000/100,000 events (60%) 10,000 events/s, ETA 4s"
        );
        let behind = ProgressState {
            positions: vec![("users", 500), ("messaging", 60_000)],
            ..state
        };
        assert_eq!(behind.done(), 500, "still on its way to its end");
    }

    /// A log line does not go on the end of a drawn bar: the bar is cleared first, once.
    #[test]
    fn a_log_line_clears_the_bar_it_would_follow() {
        let mut out = Vec::new();
        BAR_DRAWN.store(true, Ordering::Relaxed);
        clear_bar_then_write(&mut out, b"INFO one\n").unwrap();
        clear_bar_then_write(&mut out, b"INFO two\n").unwrap();
        assert_eq!(out, b"\r\x1b[2KINFO one\nINFO two\n");
    }

    /// Past the events nothing tells how long the rest takes: no ETA, in the log either.
    #[test]
    fn no_eta_once_the_events_are_applied() {
        let state = all_applied(Phase::Indexing, 5_000);
        assert_eq!(Figures::of(&state, 0, Duration::from_secs(2)).eta, None);
    }

    /// A bar wider than the terminal would wrap, and every redraw leave a line behind.
    #[test]
    fn the_bar_fits_the_terminal() {
        let state = all_applied(Phase::WaitingForSnapshots, 1_000_000_000);
        let line = Figures::of(&state, 0, Duration::from_secs(2)).line("rebuild");
        assert!(line.chars().count() > 80, "{line}");
        let fitted = fit(line, 80);
        assert_eq!(fitted.chars().count(), 79, "{fitted}");
        assert!(fitted.ends_with('…'), "{fitted}");
        assert_eq!(fit("check: 1/2 events".into(), 80), "check: 1/2 events");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
