//! Showing a long build's progress: a bar redrawn in place on a terminal, a log line every
//! few seconds otherwise (a job runner's log, a pipe), so that nobody waits without knowing
//! how long for.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledgerline_projections::{Progress, ProgressState};
use tokio::task::JoinHandle;

/// Redraws the bar this often on a terminal.
const TERMINAL_EVERY: Duration = Duration::from_millis(250);
/// Logs a line this often otherwise.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Shows `progress` on standard error until the returned handle is passed to [`finish`].
pub fn show(label: &'static str, progress: Arc<Progress>) -> JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut first: Option<i64> = None;
        let mut ticker = tokio::time::interval(if terminal { TERMINAL_EVERY } else { LOG_EVERY });
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let state = progress.snapshot();
            if state.positions.is_empty() {
                continue;
            }
            let first = *first.get_or_insert(state.first);
            let line = line(label, &state, first, started.elapsed());
            let mut err = std::io::stderr().lock();
            if terminal {
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
    })
}

/// Stops the display and ends its line.
pub async fn finish(display: JoinHandle<()>) {
    display.abort();
    let _ = display.await;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// `rebuild: 412,000/1,000,000 events (41%) 52,310 events/s, ETA 11s`
fn line(label: &str, state: &ProgressState, first: i64, elapsed: Duration) -> String {
    let done = state.done().max(first);
    let total = (state.target - first).max(0);
    let finished = done - first;
    let percent = if total == 0 {
        100.0
    } else {
        finished as f64 * 100.0 / total as f64
    };
    let rate = finished as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = if rate > 0.0 {
        format!("ETA {:.0}s", (state.target - done) as f64 / rate)
    } else {
        "ETA unknown".to_string()
    };
    format!(
        "{label}: {}/{} events ({percent:.0}%) {} events/s, {eta}",
        thousands(finished),
        thousands(total),
        thousands(rate as i64),
    )
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
    fn a_line_counts_from_where_the_run_started() {
        let state = ProgressState {
            first: 1_000,
            target: 101_000,
            positions: vec![("users", 51_000), ("messaging", 41_000)],
        };
        let line = line("rebuild", &state, 1_000, Duration::from_secs(4));
        assert_eq!(
            line,
            "rebuild: 40,000/100,000 events (40%) 10,000 events/s, ETA 6s"
        );
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
