//! Process-wide metrics and the text `GET /metrics` answers (Prometheus exposition format
//! 0.0.4). Hand-rolled on atomics rather than `prometheus-client`: one counter family and three
//! fixed-bucket histograms do not justify a dependency, and their text is a few dozen lines.
//! Ledger, projection and checkpoint gauges are read from the database at scrape time, so
//! they are right whichever process wrote the events.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use ledgerline_projections::{ProjectionStatus, RebuildProgress, RunError};
use sqlx::PgPool;

use crate::app::CommandError;
use crate::ledger::checkpoint_row::{self, CheckpointRow};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How a command ended, one per [`CommandError`] variant (label `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Rejected,
    Conflict,
    Taken,
    Stale,
    KeyChanged,
    ActorStopped,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Rejected,
        Outcome::Conflict,
        Outcome::Taken,
        Outcome::Stale,
        Outcome::KeyChanged,
        Outcome::ActorStopped,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Conflict => "conflict",
            Outcome::Taken => "taken",
            Outcome::Stale => "stale",
            Outcome::KeyChanged => "key_changed",
            Outcome::ActorStopped => "actor_stopped",
            Outcome::Error => "error",
        }
    }

    pub fn of<T, E: std::error::Error>(result: &Result<T, CommandError<E>>) -> Self {
        match result {
            Ok(_) => Outcome::Ok,
            Err(CommandError::Rejected(_)) => Outcome::Rejected,
            Err(CommandError::Conflict) => Outcome::Conflict,
            Err(CommandError::Taken { .. }) => Outcome::Taken,
            Err(CommandError::Stale(_)) => Outcome::Stale,
            Err(CommandError::KeyChanged) => Outcome::KeyChanged,
            Err(CommandError::ActorStopped(_)) => Outcome::ActorStopped,
            Err(CommandError::Unknown | CommandError::Internal(_)) => Outcome::Error,
        }
    }
}

/// A histogram with fixed upper bounds. `_count` is derived from the buckets, so a scrape
/// always shows `+Inf` equal to `_count` even while observations race with it.
struct Histogram<const N: usize> {
    bounds: [f64; N],
    /// Per bucket, not cumulative.
    counts: [AtomicU64; N],
    /// Observations above every bound.
    overflow: AtomicU64,
    /// The f64 bits of the sum of observations.
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds: [f64; N]) -> Self {
        Self {
            bounds,
            counts: [const { AtomicU64::new(0) }; N],
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        match self.bounds.iter().position(|b| value <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.overflow.fetch_add(1, Relaxed),
        };
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.overflow.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", f64::from_bits(self.sum.load(Relaxed)));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Per command label, a count per [`Outcome`] in `Outcome::ALL` order. Labels are
/// `<aggregate>.<variant>`, so their number is fixed by the code, never by the data.
static COMMANDS: Mutex<BTreeMap<String, [u64; Outcome::ALL.len()]>> = Mutex::new(BTreeMap::new());
static APPEND_LATENCY: Histogram<14> = Histogram::new([
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
]);
static BATCH_COMMANDS: Histogram<10> =
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]);
static BATCH_EVENTS: Histogram<12> = Histogram::new([
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
]);

const COMMANDS_HELP: &str = "Commands executed (each attempt, retries included), by \
     aggregate.command and outcome (ok, rejected by the aggregate, conflict on its sequence, \
     taken unique claim, stale guard, acting key changed, error)";
const LATENCY_HELP: &str = "Seconds App::execute took for a command that committed: loading \
     the aggregate (none for a creation, such as a post), deciding, waiting in the writer queue \
     and for the group commit; neither the wait for the aggregate's turn in the process before it \
     nor the wait for read models after it is included";

/// Times one command and counts its outcome.
#[must_use = "finish() records the command"]
pub struct CommandTimer {
    command: String,
    started: Instant,
}

impl CommandTimer {
    pub fn start(aggregate: &str, command: &impl fmt::Debug) -> Self {
        Self {
            command: command_label(aggregate, command),
            started: Instant::now(),
        }
    }

    pub fn finish<T, E: std::error::Error>(self, result: &Result<T, CommandError<E>>) {
        let outcome = Outcome::of(result);
        if outcome == Outcome::Ok {
            APPEND_LATENCY.observe(self.started.elapsed().as_secs_f64());
        }
        count_command(&self.command, outcome);
    }
}

fn count_command(command: &str, outcome: Outcome) {
    let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
    let mut commands = COMMANDS.lock().unwrap_or_else(|e| e.into_inner());
    match commands.get_mut(command) {
        Some(counts) => counts[index] += 1,
        None => {
            let mut counts = [0; Outcome::ALL.len()];
            counts[index] = 1;
            commands.insert(command.to_string(), counts);
        }
    }
}

/// The size of one group commit as the writer takes it in: commands, and the events they
/// carry (refused commands included).
pub fn record_batch(commands: usize, events: usize) {
    BATCH_COMMANDS.observe(commands as f64);
    BATCH_EVENTS.observe(events as f64);
}

/// `organization.create` for `OrganizationCommand::Create { .. }`: the aggregate type and
/// the command's variant name (what its derived `Debug` prints first), in snake case.
pub fn command_label(aggregate: &str, command: &impl fmt::Debug) -> String {
    let mut variant = Ident(String::new());
    // The writer refuses the first character after the name, which ends the formatting
    // there: the fields (sealed data, message text) are never formatted.
    let _ = write!(variant, "{command:?}");
    let variant = match variant.0.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => snake_case(&variant.0),
        _ => "unknown".to_string(),
    };
    format!("{}.{variant}", snake_case(aggregate))
}

/// Collects an identifier and fails at the first character that cannot be part of one.
struct Ident(String);

impl fmt::Write for Ident {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if !(c.is_ascii_alphanumeric() || c == '_') {
                return Err(fmt::Error);
            }
            self.0.push(c);
        }
        Ok(())
    }
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// What the gauges show, read from the database at scrape time.
struct Gauges {
    statuses: Vec<ProjectionStatus>,
    /// `recorded_at` of each lagging projection's first event not applied yet.
    recorded_at: HashMap<i64, DateTime<Utc>>,
    /// This process's clock when they were read. `recorded_at` is the writing process's
    /// clock: the lag, like the checkpoint's age, takes the hosts' clocks as in step (NTP).
    now: DateTime<Utc>,
    /// The newest checkpoint row (by its `tree_size` column), read through its note.
    checkpoint: Option<CheckpointRow>,
    /// One row per projection of the unfinished rebuild job.
    rebuilds: Vec<RebuildProgress>,
}

async fn read_gauges(pool: &PgPool) -> Result<Gauges, RunError> {
    let statuses = ledgerline_projections::status(pool).await?;
    let waiting: Vec<i64> = statuses
        .iter()
        .filter(|s| s.position < s.head)
        .map(|s| s.position + 1)
        .collect();
    // Read only where `DateTime` can hold it (an altered log may hold `infinity`, whose
    // decoding would panic): a lag in seconds is then left out, as for a missing event.
    let recorded_at: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT position, recorded_at FROM events WHERE position = ANY($1) \
         AND NOT {}",
        ledgerline_projections::IMPOSSIBLE_TIME
    ))
    .bind(&waiting)
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    let checkpoint = sqlx::query_as(&format!(
        "SELECT {} FROM checkpoints ORDER BY tree_size DESC LIMIT 1",
        checkpoint_row::COLUMNS
    ))
    .fetch_optional(pool)
    .await?;
    let rebuilds = ledgerline_projections::rebuild_progress(pool).await?;
    Ok(Gauges {
        statuses,
        recorded_at: recorded_at.into_iter().collect(),
        now,
        checkpoint,
        rebuilds,
    })
}

/// The whole `/metrics` text. Database gauges are left out (and `ledgerline_database_up` is
/// 0) when the database cannot be read: the process metrics are still worth a scrape then.
/// `log_halted`: whether this process's log maintainer stopped signing for good.
pub async fn render(pool: &PgPool, log_halted: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    render_process(&mut out);
    let name = "ledgerline_log_maintainer_halted";
    family(
        &mut out,
        name,
        "gauge",
        "1 when this process's log maintainer stopped for good (the ledger does not verify, its \
         tree cannot be signed, or the newest checkpoint is another signing key's): nothing \
         more is signed; checkpoint age alone cannot tell this from a quiet log",
    );
    sample(&mut out, name, &[], log_halted as u8);
    let gauges = read_gauges(pool).await;
    family(
        &mut out,
        "ledgerline_database_up",
        "gauge",
        "1 when this scrape could read the ledger, projection and checkpoint gauges, else 0",
    );
    sample(
        &mut out,
        "ledgerline_database_up",
        &[],
        gauges.is_ok() as u8,
    );
    match gauges {
        Ok(g) => render_gauges(&mut out, &g, Utc::now()),
        Err(e) => tracing::warn!(error = %e, "metrics: database gauges unavailable"),
    }
    out
}

fn render_process(out: &mut String) {
    let name = "ledgerline_commands_total";
    family(out, name, "counter", COMMANDS_HELP);
    let commands = COMMANDS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (command, counts) in &commands {
        for (outcome, count) in Outcome::ALL.iter().zip(counts) {
            let labels = [("command", command.as_str()), ("outcome", outcome.as_str())];
            sample(out, name, &labels, count);
        }
    }
    APPEND_LATENCY.render(out, "ledgerline_append_latency_seconds", LATENCY_HELP);
    BATCH_COMMANDS.render(
        out,
        "ledgerline_append_batch_commands",
        "Commands the writer took into one group-commit transaction (refused ones included)",
    );
    BATCH_EVENTS.render(
        out,
        "ledgerline_append_batch_events",
        "Events carried by the commands of one group-commit transaction",
    );
    let name = "ledgerline_projection_bulk_fallbacks_total";
    family(
        out,
        name,
        "counter",
        "Batches a projection's multi-row path handed to its one-event-at-a-time path",
    );
    sample(out, name, &[], ledgerline_projections::bulk_fallbacks());
    let name = "ledgerline_projection_batch_errors_total";
    family(
        out,
        name,
        "counter",
        "Live batches of this process that failed for a reason that says nothing about the \
         event (connection, deadlock, disk full, timeout) and are retried at the next poll",
    );
    for (projection, n) in ledgerline_projections::batch_errors() {
        sample(out, name, &[("projection", projection)], n);
    }
}

fn render_gauges(out: &mut String, g: &Gauges, now: DateTime<Utc>) {
    let head = g.statuses.first().map_or(0, |s| s.head);
    let name = "ledgerline_ledger_head_position";
    family(
        out,
        name,
        "gauge",
        "Position of the newest event in the ledger",
    );
    sample(out, name, &[], head);

    type Value = fn(&Gauges, &ProjectionStatus) -> Option<f64>;
    let per_projection: [(&str, &str, Value); 5] = [
        (
            "ledgerline_projection_position",
            "Last ledger position the projection has applied",
            |_, s| Some(s.position as f64),
        ),
        (
            "ledgerline_projection_lag_events",
            "Ledger events the projection has not applied yet (head minus position)",
            |_, s| Some(s.lag as f64),
        ),
        (
            "ledgerline_projection_lag_seconds",
            "How long the oldest event the projection has not applied has waited: now minus \
             its recorded_at, growing while the projection is stopped or stalled; 0 when \
             caught up",
            lag_seconds,
        ),
        (
            "ledgerline_projection_failed",
            "1 when the projection is stopped on an event it could not apply, else 0",
            |_, s| Some(if s.failures.is_empty() { 0.0 } else { 1.0 }),
        ),
        (
            "ledgerline_projection_failed_position",
            "Position of the event a stopped projection is stopped at (stopped ones only)",
            |_, s| s.failures.first().map(|f| f.position as f64),
        ),
    ];
    for (name, help, value) in per_projection {
        family(out, name, "gauge", help);
        for s in &g.statuses {
            if let Some(v) = value(g, s) {
                sample(out, name, &[("projection", s.name)], v);
            }
        }
    }

    // What the newest note signs, not the columns beside it, which anyone who can write the
    // database can set; the mismatch gauge says when they differ.
    let newest = g.checkpoint.as_ref().map(CheckpointRow::read);
    let signed = newest.as_ref().and_then(|(read, _)| read.as_ref().ok());
    let name = "ledgerline_checkpoint_size";
    family(
        out,
        name,
        "gauge",
        "Tree size the newest checkpoint's signed note states (0 when none is signed yet; \
         absent when that note is no readable checkpoint)",
    );
    match (&newest, signed) {
        (None, _) => sample(out, name, &[], 0),
        (Some(_), Some(cp)) => sample(out, name, &[], cp.tree_size),
        (Some(_), None) => {}
    }
    let name = "ledgerline_checkpoint_age_seconds";
    family(
        out,
        name,
        "gauge",
        "Seconds since the time the newest checkpoint's signed note states (absent when none \
         is signed, or that note is no readable checkpoint)",
    );
    if let Some(cp) = signed {
        sample(out, name, &[], seconds(now - cp.time));
    }
    let name = "ledgerline_checkpoint_mismatch";
    family(
        out,
        name,
        "gauge",
        "1 for each column of the newest checkpoint row (tree_size, root, chain_head, \
         signed_at) that is not what its signed note states, and for note when the note is no \
         readable checkpoint: the row was written after signing (ledgerline verify names every \
         such row)",
    );
    let mismatch = newest.as_ref().map_or(&[][..], |(_, m)| m.as_slice());
    for column in checkpoint_row::MISMATCH_NAMES {
        sample(
            out,
            name,
            &[("column", column)],
            mismatch.contains(&column) as u8,
        );
    }

    type Field = fn(&RebuildProgress, DateTime<Utc>) -> f64;
    let per_rebuild: [(&str, &str, Field); 3] = [
        (
            "ledgerline_rebuild_position",
            "Position the unfinished rebuild job has replayed the projection to",
            |r, _| r.position as f64,
        ),
        (
            "ledgerline_rebuild_target",
            "Ledger position the unfinished rebuild job replays the projection up to",
            |r, _| r.target as f64,
        ),
        (
            "ledgerline_rebuild_progress_age_seconds",
            "Seconds since the unfinished rebuild job last recorded a batch of the projection \
             (it also grows while a live job builds its indexes, waits for older snapshots and \
             swaps, at the end)",
            |r, now| seconds(now - r.updated_at).max(0.0),
        ),
    ];
    for (name, help, value) in per_rebuild {
        family(out, name, "gauge", help);
        for r in &g.rebuilds {
            let job = r.job.to_string();
            let labels = [("job", job.as_str()), ("projection", r.name.as_str())];
            sample(out, name, &labels, value(r, now));
        }
    }
    // Per job: the job's row stays `running` after its process was killed or failed, so
    // position and target alone look the same whether anything works on it.
    let name = "ledgerline_rebuild_lock_held";
    family(
        out,
        name,
        "gauge",
        "1 while a process holds the rebuild lock (the unfinished job is at work), 0 when \
         nothing runs it (killed or failed: `projections rebuild` resumes it, `--abandon` \
         drops it)",
    );
    if let Some(r) = g.rebuilds.first() {
        sample(out, name, &[("job", &r.job.to_string())], r.held as u8);
    }
}

/// The age of the oldest event waiting for the projection, as an operator's alert wants it:
/// the head's time minus the last applied event's would stand still while a stopped
/// projection waits on a quiet log, and count the quiet spell before a fresh event as lag.
fn lag_seconds(g: &Gauges, s: &ProjectionStatus) -> Option<f64> {
    if s.position >= s.head {
        return Some(0.0);
    }
    let waiting = g.recorded_at.get(&(s.position + 1))?;
    Some(seconds(g.now - *waiting).max(0.0))
}

fn seconds(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds()
        .map_or(d.num_seconds() as f64, |us| us as f64 / 1e6)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)]
    enum ApiKeyCommand {
        Issue { label: String },
        Rotate(u32),
        Revoke,
    }

    #[test]
    fn command_labels_are_aggregate_and_variant_in_snake_case() {
        let issue = ApiKeyCommand::Issue {
            label: "secret \"stuff\"".into(),
        };
        assert_eq!(command_label("ApiKey", &issue), "api_key.issue");
        assert_eq!(
            command_label("ApiKey", &ApiKeyCommand::Rotate(7)),
            "api_key.rotate"
        );
        assert_eq!(
            command_label("ApiKey", &ApiKeyCommand::Revoke),
            "api_key.revoke"
        );
        assert_eq!(command_label("User", &"free text"), "user.unknown");
        assert_eq!(command_label("User", &42), "user.unknown");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let h = Histogram::new([1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 100.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert_eq!(
            out,
            "# HELP x help\n# TYPE x histogram\nx_bucket{le=\"1\"} 2\nx_bucket{le=\"10\"} 3\n\
             x_bucket{le=\"+Inf\"} 4\nx_sum 104.5\nx_count 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\"y\\z\nw"), ("b", "ok")], 3);
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\nw\",b=\"ok\"} 3\n");
    }

    /// Each outcome has its count (an array one short once made every `error` panic).
    #[test]
    fn every_outcome_is_counted() {
        for outcome in Outcome::ALL {
            count_command("test.every_outcome", outcome);
        }
        let commands = COMMANDS.lock().unwrap();
        assert_eq!(commands["test.every_outcome"], [1; Outcome::ALL.len()]);
    }

    #[test]
    fn outcomes_follow_command_errors() {
        type R = Result<(), CommandError<std::fmt::Error>>;
        let cases: [(R, &str); 8] = [
            (Ok(()), "ok"),
            (Err(CommandError::Rejected(std::fmt::Error)), "rejected"),
            (Err(CommandError::Conflict), "conflict"),
            (
                Err(CommandError::Taken {
                    scope: "slug",
                    holder: "Organization:o".into(),
                }),
                "taken",
            ),
            (Err(CommandError::Stale("conversation".into())), "stale"),
            (Err(CommandError::KeyChanged), "key_changed"),
            (
                Err(CommandError::ActorStopped(
                    "this key's user was deactivated",
                )),
                "actor_stopped",
            ),
            (Err(CommandError::Internal("boom".into())), "error"),
        ];
        for (result, outcome) in cases {
            assert_eq!(Outcome::of(&result).as_str(), outcome);
            // One left out of the list would be counted as `ok`.
            assert!(Outcome::ALL.contains(&Outcome::of(&result)), "{outcome}");
        }
    }
}
