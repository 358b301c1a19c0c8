//! Chain verification: walks the ledger in position order and recomputes every hash from the
//! stored content, never trusting a stored hash (immudb's "linear fake" lesson). Ranges are
//! checked in parallel; the links between ranges are checked when they are joined.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{StreamExt, TryStreamExt};
use ledgerline_projections::copy_in::PG_EPOCH_UNIX_MICROS;
use sqlx::{PgConnection, PgPool};

use super::copy_binary::CopyBinaryReader;
use super::hash::{self, FormatRun, HashVersion, RawFields, GENESIS};

/// What is wrong at the first bad position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The event's content no longer hashes to its stored hash: a field was edited.
    ContentChanged,
    /// The event was written at another position and moved here.
    Reordered { written_at: i64 },
    /// The event's `prev_hash` is not the recomputed hash of the event before it.
    LinkBroken,
    /// No event holds this position: an event was deleted (or positions were renumbered).
    Missing,
    /// A second event holds this position, which the one before it already held: a row
    /// inserted, possible only with the table's unique index dropped.
    Repeated,
    /// `rows` rows hold no position in the chain (none, or one below 1: possible only with
    /// the table's constraints dropped), so no range reads them; the application loads an
    /// aggregate's events by sequence, not position, and would replay them all the same.
    /// Reported at the lowest such position, 0 when all are NULL.
    OutsideTheChain { rows: i64 },
    /// A column holds a value the writer never stores (a `NULL`, a time beyond the hashable
    /// range such as `infinity`, a value of another width): edited, with the table's
    /// constraints or types changed where they forbid it.
    Impossible { column: &'static str, value: String },
    /// A v1 event after a v2 one: the writer switched to v2 for good (migration 0010), so
    /// such a row came past the trigger that refuses it, or is a v2 event relabelled.
    V1AfterV2,
    /// `events` is not the plain table the migrations made (`what` says how): row-level
    /// security or a rule can show one session other rows than another, so the rows this
    /// check read need not be those the application reads. Reported at position 0.
    NotAPlainTable { what: String },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::ContentChanged => {
                f.write_str("content changed: the stored fields do not hash to the stored hash")
            }
            Fault::Reordered { written_at } => write!(
                f,
                "reordered: this event was written at position {written_at}"
            ),
            Fault::LinkBroken => {
                f.write_str("link broken: prev_hash is not the hash of the event before")
            }
            // The kinds are named as docs/ledger-format.md section 4 names them.
            Fault::Missing => {
                f.write_str("missing: no event holds this position (deleted, or moved further on)")
            }
            Fault::Repeated => {
                f.write_str("repeated: a second event holds this position (inserted?)")
            }
            Fault::OutsideTheChain { rows } => write!(
                f,
                "inserted outside the chain: {rows} row(s) with no position or one below 1"
            ),
            Fault::Impossible { column, value } => write!(
                f,
                "impossible value: {column} holds {value}, which the writer never stores"
            ),
            Fault::V1AfterV2 => {
                f.write_str("v1 after v2: a v1 event after a v2 one, which the writer never stores")
            }
            Fault::NotAPlainTable { what } => write!(
                f,
                "not a plain table: {what}, so the rows checked here need not be the rows \
                 another session (the application's) reads"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEvent {
    pub position: i64,
    pub fault: Fault,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub events: u64,
    /// The last position checked and its recomputed hash (genesis and 0 for an empty log).
    pub head_position: i64,
    pub head_hash: [u8; 32],
    pub first_bad: Option<BadEvent>,
    pub elapsed: Duration,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.first_bad.is_none()
    }
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The result of checking one contiguous range on its own.
struct Segment {
    start: i64,
    end: i64,
    events: u64,
    /// The stored prev_hash of the range's first event (checked against the join).
    first_prev: Option<[u8; 32]>,
    /// The recomputed hash of the range's last good event, and its position.
    last_hash: Option<[u8; 32]>,
    last_position: i64,
    first_bad: Option<BadEvent>,
    /// The formats of the range's events, up to the first fault (no v1 event may follow a
    /// v2 one, here or across the join).
    formats: FormatRun,
}

impl Segment {
    /// Every position of the range holds exactly one event, and nothing is wrong with them.
    fn clean_and_full(&self) -> bool {
        self.first_bad.is_none() && u64::try_from(self.end - self.start + 1) == Ok(self.events)
    }
}

/// How far around a position to look for where a moved event was written.
const REORDER_WINDOW: i64 = 4096;
const SEGMENT: i64 = 65_536;

pub async fn verify_database(pool: &PgPool, workers: usize) -> Result<Report, sqlx::Error> {
    let started = Instant::now();
    // First: what could hide rows from every read below, or make them fail (a policy that
    // errors for this session), comes before all else, and no walk is needed to say so.
    if let Some(what) = not_a_plain_table(pool).await? {
        return Ok(Report {
            events: 0,
            head_position: 0,
            head_hash: GENESIS,
            first_bad: Some(BadEvent {
                position: 0,
                fault: Fault::NotAPlainTable { what },
            }),
            elapsed: started.elapsed(),
        });
    }
    let workers = workers.max(1);
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    let max = max.unwrap_or(0);
    // Positions are checked in ranges of SEGMENT, up to `cap`: the highest position, but with
    // N rows the first gap, if any, is at or below N + 1, and a row moved to a huge position
    // must not make us walk billions of empty ranges. So the ranges stop at min(max, N + 1).
    // Counting the rows costs a scan of the position index, and is only needed once a range
    // is found with a gap (or any fault): while every range holds exactly its positions,
    // N >= the range's end and the cap is the highest position. Until then `cap` is `max`.
    let mut cap = max;
    let mut counted = false;
    let mut next = 1; // the first position of the next range to schedule
    let mut in_flight = FuturesOrdered::new();
    let mut segments = Vec::new();
    loop {
        while in_flight.len() < workers && next <= cap {
            let end = next.saturating_add(SEGMENT - 1).min(cap);
            in_flight.push_back(spawn_range(pool, next, end));
            next = end.saturating_add(1);
        }
        let Some(seg) = in_flight.next().await else {
            break;
        };
        let seg = seg?;
        if counted || seg.clean_and_full() {
            segments.push(seg);
            continue;
        }
        counted = true;
        // Rows appended since `max` was read have higher positions: not counted, as not checked.
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE position <= $1")
            .bind(max)
            .fetch_one(pool)
            .await?;
        cap = max.min(count.saturating_add(1));
        // This range and those already under way were cut at `max`, not at `cap`: keep those
        // within the cap, check again the one across it, drop those beyond it.
        let mut scheduled = vec![seg];
        while let Some(seg) = in_flight.next().await {
            scheduled.push(seg?);
        }
        for seg in scheduled {
            if seg.end <= cap {
                segments.push(seg);
            } else if seg.start <= cap {
                segments.push(spawn_range(pool, seg.start, cap).await?);
            }
        }
    }
    let mut report = join(segments, started.elapsed());
    // Such rows come before position 1, so they are the first fault.
    if let Some(outside) = outside_the_chain(pool).await? {
        report.first_bad = Some(outside);
    }
    Ok(report)
}

/// What makes `events` (as this session resolves the name) more than the plain table the
/// migrations made, if anything: a view or another kind of relation, row-level security
/// (enabled or forced, or policies), rules, or tables inheriting from it (a foreign table
/// among them can show each role other rows). Each can show the sessions of one role or
/// application name other rows than another's, so a verifier could be shown an intact log
/// while the application reads a forged one: none of them is ever made by ledgerline, so
/// each is a tampering.
pub async fn not_a_plain_table(pool: &PgPool) -> Result<Option<String>, sqlx::Error> {
    let (kind, enabled, forced, policies, rules, children): (String, bool, bool, i64, i64, i64) =
        sqlx::query_as(
            "SELECT c.relkind::text, c.relrowsecurity, c.relforcerowsecurity, \
                    (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid), \
                    (SELECT count(*) FROM pg_rewrite r WHERE r.ev_class = c.oid), \
                    (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) \
             FROM pg_class c WHERE c.oid = 'events'::regclass",
        )
        .fetch_one(pool)
        .await?;
    let mut found = Vec::new();
    if kind != "r" {
        found.push(format!(
            "`events` is a relation of kind '{kind}', not a table"
        ));
    }
    if enabled {
        found.push("row-level security is enabled".to_string());
    }
    if forced {
        found.push("row-level security is forced on its owner".to_string());
    }
    if policies > 0 {
        found.push(format!("{policies} row-level security policy(ies)"));
    }
    if rules > 0 {
        found.push(format!("{rules} rule(s) rewrite its queries"));
    }
    if children > 0 {
        found.push(format!(
            "{children} table(s) inherit from it (their rows read as its own)"
        ));
    }
    Ok((!found.is_empty()).then(|| found.join("; ")))
}

/// Rows that no range reads: a NULL position or one below 1 (both index look-ups).
async fn outside_the_chain(pool: &PgPool) -> Result<Option<BadEvent>, sqlx::Error> {
    let (rows, lowest): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE position IS NULL) \
                + (SELECT count(*) FROM events WHERE position < 1), \
                (SELECT min(position) FROM events WHERE position < 1)",
    )
    .fetch_one(pool)
    .await?;
    Ok((rows > 0).then(|| BadEvent {
        position: lowest.unwrap_or(0),
        fault: Fault::OutsideTheChain { rows },
    }))
}

/// Checks one range on a task of its own.
fn spawn_range(
    pool: &PgPool,
    start: i64,
    end: i64,
) -> impl Future<Output = Result<Segment, sqlx::Error>> {
    let pool = pool.clone();
    let task = tokio::spawn(async move { verify_range(&pool, start, end).await });
    async move {
        task.await
            .map_err(|e| sqlx::Error::Protocol(format!("verifier task failed: {e}")))?
    }
}

/// Chains the segments in order: a segment's first event must link to the previous
/// segment's last recomputed hash; the first fault in position order wins.
fn join(segments: Vec<Segment>, elapsed: Duration) -> Report {
    let mut events = 0;
    let mut prev_hash = GENESIS;
    let mut head_position = 0;
    let mut first_bad = None;
    let mut formats = FormatRun::default();
    for seg in segments {
        events += seg.events;
        if first_bad.is_some() {
            continue; // count the rest; the head stays at the last good event
        }
        if !seg.formats.may_follow(&formats) {
            first_bad = Some(BadEvent {
                position: seg.start,
                fault: Fault::V1AfterV2,
            });
            continue;
        }
        formats = seg.formats.after(&formats);
        if let Some(first_prev) = seg.first_prev {
            if first_prev != prev_hash {
                first_bad = Some(BadEvent {
                    position: seg.start,
                    fault: Fault::LinkBroken,
                });
                continue;
            }
        }
        first_bad = seg.first_bad.clone();
        if let Some(h) = seg.last_hash {
            prev_hash = h;
            head_position = seg.last_position;
        }
    }
    Report {
        events,
        head_position,
        head_hash: prev_hash,
        first_bad,
        elapsed,
    }
}

/// The columns read, in this order: the hashed fields, then `prev_hash` and `hash`.
const COLUMNS: &str = "position, aggregate_type, aggregate_id, sequence, event_type, \
                       event_version, organization_id, recorded_at, payload, metadata, \
                       prev_hash, hash, hash_version";
const N_COLUMNS: usize = 13;
const COLUMN_NAMES: [&str; N_COLUMNS] = [
    "position",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "organization_id",
    "recorded_at",
    "payload",
    "metadata",
    "prev_hash",
    "hash",
    "hash_version",
];

async fn verify_range(pool: &PgPool, start: i64, end: i64) -> Result<Segment, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let checked = copy_range(&mut conn, start, end).await;
    if checked.is_err() {
        // The connection may have been left inside the COPY: it must not go back to the pool.
        conn.close_on_drop();
    }
    checked
}

/// Reads the range with `COPY ... (FORMAT binary)` and hashes fields borrowed from the
/// received bytes: no per-row decoding into a row type, no per-event allocation.
async fn copy_range(conn: &mut PgConnection, start: i64, end: i64) -> Result<Segment, sqlx::Error> {
    // `json` columns are read in their binary form, which is their exact stored text
    // (`json_send` sends the text as is), sparing the server a cast per row.
    let sql = format!(
        "COPY (SELECT {COLUMNS} FROM events WHERE position BETWEEN {start} AND {end} \
               ORDER BY position) TO STDOUT (FORMAT binary)"
    );
    let mut chunks = conn.copy_out_raw(&sql).await?;
    let mut reader = CopyBinaryReader::<N_COLUMNS>::new();
    let mut walk = RangeWalk::new(start, end);
    while let Some(chunk) = chunks.try_next().await? {
        reader.feed(&chunk, |row| walk.row(row))?;
    }
    reader.finish()?;
    Ok(walk.finish())
}

/// The check of one range, row by row in position order.
struct RangeWalk {
    seg: Segment,
    /// The position the next row must have.
    expected: i64,
    /// The recomputed hash of the previous row.
    prev: Option<[u8; 32]>,
    /// The hash input of the current row (reused: no allocation per row).
    input: Vec<u8>,
}

impl RangeWalk {
    fn new(start: i64, end: i64) -> Self {
        Self {
            seg: Segment {
                start,
                end,
                events: 0,
                first_prev: None,
                last_hash: None,
                last_position: start - 1,
                first_bad: None,
                formats: FormatRun::default(),
            },
            expected: start,
            prev: None,
            input: Vec::with_capacity(4096),
        }
    }

    fn row(&mut self, row: &[Option<&[u8]>; N_COLUMNS]) -> Result<(), sqlx::Error> {
        let seg = &mut self.seg;
        seg.events += 1;
        if seg.first_bad.is_some() {
            return Ok(()); // count the rest, report the first fault only
        }
        let raw = match decode_row(row) {
            Ok(raw) => raw,
            Err((column, value)) => {
                // A gap or a repeat at this row comes first, as for any other row.
                let position = row[0].and_then(int8).unwrap_or(self.expected);
                seg.first_bad = Some(out_of_place(seg.start, self.expected, position).unwrap_or(
                    BadEvent {
                        position: self.expected,
                        fault: Fault::Impossible {
                            column: COLUMN_NAMES[column],
                            value,
                        },
                    },
                ));
                return Ok(());
            }
        };
        if let Some(bad) = out_of_place(seg.start, self.expected, raw.fields.position) {
            seg.first_bad = Some(bad);
            return Ok(());
        }
        if !seg.formats.admit(raw.fields.hash_version) {
            seg.first_bad = Some(BadEvent {
                position: raw.fields.position,
                fault: Fault::V1AfterV2,
            });
            return Ok(());
        }
        let recomputed = hash::raw_hash(&mut self.input, &raw.prev_hash, &raw.fields);
        if raw.hash != recomputed {
            let fault = match hash::written_at(
                &mut self.input,
                &raw.prev_hash,
                &raw.fields,
                REORDER_WINDOW,
                &raw.hash,
            ) {
                Some(q) => Fault::Reordered { written_at: q },
                None => Fault::ContentChanged,
            };
            seg.first_bad = Some(BadEvent {
                position: raw.fields.position,
                fault,
            });
            return Ok(());
        }
        match self.prev {
            None => seg.first_prev = Some(raw.prev_hash),
            Some(p) if p != raw.prev_hash => {
                seg.first_bad = Some(BadEvent {
                    position: raw.fields.position,
                    fault: Fault::LinkBroken,
                });
                return Ok(());
            }
            Some(_) => {}
        }
        self.prev = Some(recomputed);
        seg.last_hash = self.prev;
        seg.last_position = raw.fields.position;
        self.expected += 1;
        Ok(())
    }

    fn finish(mut self) -> Segment {
        if self.seg.first_bad.is_none() && self.expected <= self.seg.end {
            self.seg.first_bad = Some(BadEvent {
                position: self.expected,
                fault: Fault::Missing,
            });
        }
        self.seg
    }
}

/// The fault of a row (or an export's line) at `position` when `expected` is next and every
/// position from `from` on has been held: below `expected` but not below `from`, a second one
/// at `position`; anything else other than `expected`, a gap at `expected`. The database walk
/// and the file walk (`offline.rs`) share it.
pub(crate) fn out_of_place(from: i64, expected: i64, position: i64) -> Option<BadEvent> {
    if position == expected {
        None
    } else if (from..expected).contains(&position) {
        Some(BadEvent {
            position,
            fault: Fault::Repeated,
        })
    } else {
        Some(BadEvent {
            position: expected,
            fault: Fault::Missing,
        })
    }
}

/// One row of `COLUMNS`, its fields borrowed from the COPY data as the bytes that are hashed.
/// Text is not checked for UTF-8: the hash covers the exact bytes, so a row whose bytes are
/// not the valid UTF-8 the writer hashed cannot match its stored hash.
#[derive(Debug, Clone, Copy)]
struct RawRow<'a> {
    fields: RawFields<'a>,
    prev_hash: [u8; 32],
    hash: [u8; 32],
}

/// A row of `COLUMNS` in binary form (`bigint`: 8 bytes big-endian; `text`, `json`, `bytea`:
/// the bytes; `uuid`: 16 bytes; `timestamptz`: 8 bytes big-endian, microseconds since
/// 2000-01-01 UTC). A value no writer can have stored (a `NULL` in a column that is never
/// `NULL`, an integer of the wrong width, a time beyond a signed 64-bit count of microseconds
/// since 1970) is returned as its column's index and what it holds: a fault, not an error; a
/// `prev_hash` or `hash` of the wrong length is kept as a hash that matches nothing, so that
/// it is reported as a changed content.
fn decode_row<'a>(row: &[Option<&'a [u8]>; N_COLUMNS]) -> Result<RawRow<'a>, (usize, String)> {
    let value = |i: usize| row[i].ok_or_else(|| (i, "NULL".to_string()));
    let integer = |i: usize| {
        let v = value(i)?;
        int8(v).ok_or_else(|| (i, format!("a {}-byte bigint", v.len())))
    };
    let organization_id = match row[6] {
        None => None,
        Some(b) => {
            Some(<&[u8; 16]>::try_from(b).map_err(|_| (6, format!("a {}-byte uuid", b.len())))?)
        }
    };
    let recorded_at = {
        let v = value(7)?;
        let pg = int8(v).ok_or_else(|| (7, format!("a {}-byte timestamptz", v.len())))?;
        match pg {
            // PostgreSQL's special values, named as it names them. They are no time: the
            // writer never stores one, and the auditor query (docs/ledger-format.md,
            // section 2) cannot turn one into microseconds since 1970.
            i64::MAX => return Err((7, "infinity".into())),
            i64::MIN => return Err((7, "-infinity".into())),
            // The last days before PostgreSQL's end of time (294277) are past i64 since 1970.
            _ => pg.checked_add(PG_EPOCH_UNIX_MICROS).ok_or_else(|| {
                (
                    7,
                    format!("a time ({pg} µs after 2000-01-01) beyond the hashable range"),
                )
            })?,
        }
    };
    let hash_version = {
        let v = value(12)?;
        let n = <[u8; 2]>::try_from(v).map_err(|_| (12, format!("a {}-byte smallint", v.len())))?;
        let n = i16::from_be_bytes(n);
        HashVersion::from_number(n.into()).ok_or_else(|| (12, n.to_string()))?
    };
    Ok(RawRow {
        fields: RawFields {
            hash_version,
            position: integer(0)?,
            aggregate_type: value(1)?,
            aggregate_id: value(2)?,
            sequence: integer(3)?,
            event_type: value(4)?,
            event_version: value(5)?,
            organization_id,
            recorded_at_micros: recorded_at,
            payload: value(8)?,
            metadata: value(9)?,
        },
        prev_hash: to32(value(10)?),
        hash: to32(value(11)?),
    })
}

/// A `bigint` in binary form.
fn int8(b: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

fn to32(b: &[u8]) -> [u8; 32] {
    b.try_into().unwrap_or([0xff; 32])
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::ledger::hash::{event_hash, EventFields};

    /// An event as stored, with its stored `prev_hash` and `hash`.
    #[derive(Clone)]
    struct Stored {
        hash_version: HashVersion,
        position: i64,
        aggregate_type: String,
        aggregate_id: String,
        sequence: i64,
        event_type: String,
        event_version: String,
        organization_id: Option<Uuid>,
        recorded_at: DateTime<Utc>,
        payload: String,
        metadata: String,
        prev_hash: [u8; 32],
        hash: [u8; 32],
    }

    impl Stored {
        fn fields(&self) -> EventFields<'_> {
            EventFields {
                hash_version: self.hash_version,
                position: self.position,
                aggregate_type: &self.aggregate_type,
                aggregate_id: &self.aggregate_id,
                sequence: self.sequence,
                event_type: &self.event_type,
                event_version: &self.event_version,
                organization_id: self.organization_id,
                recorded_at: self.recorded_at,
                payload: &self.payload,
                metadata: &self.metadata,
            }
        }

        /// The row as `COPY ... (FORMAT binary)` sends the columns of `COLUMNS`.
        fn binary(&self) -> Vec<Option<Vec<u8>>> {
            let micros = self.recorded_at.timestamp_micros() - PG_EPOCH_UNIX_MICROS;
            vec![
                Some(self.position.to_be_bytes().to_vec()),
                Some(self.aggregate_type.as_bytes().to_vec()),
                Some(self.aggregate_id.as_bytes().to_vec()),
                Some(self.sequence.to_be_bytes().to_vec()),
                Some(self.event_type.as_bytes().to_vec()),
                Some(self.event_version.as_bytes().to_vec()),
                self.organization_id.map(|u| u.as_bytes().to_vec()),
                Some(micros.to_be_bytes().to_vec()),
                Some(self.payload.as_bytes().to_vec()),
                Some(self.metadata.as_bytes().to_vec()),
                Some(self.prev_hash.to_vec()),
                Some(self.hash.to_vec()),
                Some(self.hash_version.number().to_be_bytes().to_vec()),
            ]
        }
    }

    fn event(position: i64, prev_hash: [u8; 32]) -> Stored {
        let mut e = Stored {
            hash_version: HashVersion::V2,
            position,
            aggregate_type: "User".into(),
            aggregate_id: Uuid::from_u128(position as u128).to_string(),
            sequence: 1,
            event_type: "UserInvited".into(),
            event_version: "1".into(),
            organization_id: (position % 3 != 0).then(|| Uuid::from_u128(7)),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_123_456 + position).unwrap(),
            payload: format!(r#"{{"n": {position}, "name":"Zoë \u00e9"}}"#),
            metadata: r#"{"request_id":"r"}"#.into(),
            prev_hash,
            hash: [0; 32],
        };
        e.hash = event_hash(&prev_hash, &e.fields());
        e
    }

    /// A valid chain of positions 1..=n.
    fn chain(n: i64) -> Vec<Stored> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|p| {
                let e = event(p, prev);
                prev = e.hash;
                e
            })
            .collect()
    }

    fn walk(rows: &[Vec<Option<Vec<u8>>>], start: i64, end: i64) -> Result<Segment, sqlx::Error> {
        let mut w = RangeWalk::new(start, end);
        for r in rows {
            let fields: [Option<&[u8]>; N_COLUMNS] = std::array::from_fn(|i| r[i].as_deref());
            w.row(&fields)?;
        }
        Ok(w.finish())
    }

    fn walk_events(events: &[Stored], start: i64, end: i64) -> Segment {
        let rows: Vec<_> = events.iter().map(Stored::binary).collect();
        walk(&rows, start, end).expect("no decoding error")
    }

    #[test]
    fn the_one_buffer_encoding_hashes_like_event_hash() {
        let mut cases = vec![event(1, GENESIS), event(3, [9; 32])];
        // docs/ledger-format.md, vector 4: extreme values, non-ASCII, empty text, nil UUID.
        cases.push(Stored {
            hash_version: HashVersion::V1,
            position: 9_007_199_254_740_993,
            aggregate_type: "Édition".into(),
            aggregate_id: String::new(),
            sequence: 0,
            event_type: "X".into(),
            event_version: "1".into(),
            organization_id: Some(Uuid::nil()),
            recorded_at: DateTime::from_timestamp_micros(-1).unwrap(),
            payload: "{}".into(),
            metadata: r#"{"note":"\u00e9 \"quoted\" \\ tab\t"}"#.into(),
            prev_hash: std::array::from_fn(|i| i as u8),
            hash: [0; 32],
        });
        // More than one BLAKE3 chunk (1024 bytes) of input.
        let mut long = event(5, [1; 32]);
        long.payload = format!(r#"{{"sealed":"{}"}}"#, "x".repeat(5000));
        cases.push(long);
        let mut input = Vec::new();
        for e in &cases {
            let bin = e.binary();
            let fields: [Option<&[u8]>; N_COLUMNS] = std::array::from_fn(|i| bin[i].as_deref());
            let raw = decode_row(&fields).unwrap();
            assert_eq!(
                hash::raw_hash(&mut input, &raw.prev_hash, &raw.fields),
                event_hash(&e.prev_hash, &e.fields()),
                "position {}",
                e.position
            );
        }
        // docs/ledger-format.md gives vector 4's hash.
        assert_eq!(
            hex::encode(event_hash(&cases[2].prev_hash, &cases[2].fields())),
            "176e5795e01b6bac2645b1da760928644000669d368711957b7f5ad795cfad78"
        );
    }

    /// A chain of positions 1..=n whose first `v1` events are v1 and the rest `version`.
    fn mixed_chain(n: i64, v1: i64, version: HashVersion) -> Vec<Stored> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|p| {
                let mut e = event(p, prev);
                e.hash_version = if p <= v1 { HashVersion::V1 } else { version };
                e.hash = event_hash(&prev, &e.fields());
                prev = e.hash;
                e
            })
            .collect()
    }

    #[test]
    fn a_log_turns_from_v1_to_v2_once() {
        let upgraded = mixed_chain(10, 4, HashVersion::V2);
        assert!(walk_events(&upgraded, 1, 10).first_bad.is_none());
        // The two formats hash differently: the first v2 event read as v1 (so that no v2
        // event comes before it) is a changed content, and a v1 event read as v2 too.
        for (at, version) in [(4, HashVersion::V1), (3, HashVersion::V2)] {
            let mut misread = upgraded.clone();
            misread[at].hash_version = version;
            assert_eq!(
                walk_events(&misread, 1, 10).first_bad,
                Some(BadEvent {
                    position: at as i64 + 1,
                    fault: Fault::ContentChanged
                })
            );
        }
        // Any later v2 event read as v1 comes after a v2 one.
        let mut misread = upgraded.clone();
        misread[6].hash_version = HashVersion::V1;
        assert_eq!(
            walk_events(&misread, 1, 10).first_bad,
            Some(BadEvent {
                position: 7,
                fault: Fault::V1AfterV2
            })
        );
        // A v1 event after a v2 one, even with a chain recomputed around it.
        let mut events = mixed_chain(10, 4, HashVersion::V2);
        let mut prev = events[5].hash;
        for e in &mut events[6..] {
            e.prev_hash = prev;
            e.hash_version = HashVersion::V1;
            e.hash = event_hash(&prev, &e.fields());
            prev = e.hash;
        }
        assert_eq!(
            walk_events(&events, 1, 10).first_bad,
            Some(BadEvent {
                position: 7,
                fault: Fault::V1AfterV2
            })
        );
        // Across ranges: the join sees a v1 range after a v2 one.
        let seg = |r: std::ops::Range<usize>| {
            walk_events(&events[r.clone()], r.start as i64 + 1, r.end as i64)
        };
        let report = join(vec![seg(0..6), seg(6..10)], Duration::ZERO);
        assert_eq!(
            report.first_bad,
            Some(BadEvent {
                position: 7,
                fault: Fault::V1AfterV2
            })
        );
        assert_eq!(report.head_position, 6);
        let report = join(
            vec![
                walk_events(&upgraded[..2], 1, 2),
                walk_events(&upgraded[2..], 3, 10),
            ],
            Duration::ZERO,
        );
        assert!(report.intact() && report.head_hash == upgraded[9].hash);
    }

    #[test]
    fn an_intact_range() {
        let events = chain(10);
        let seg = walk_events(&events[3..], 4, 10);
        assert!(seg.first_bad.is_none());
        assert_eq!(seg.events, 7);
        assert_eq!(seg.first_prev, Some(events[2].hash));
        assert_eq!(seg.last_hash, Some(events[9].hash));
        assert_eq!(seg.last_position, 10);
        assert!(seg.clean_and_full());
    }

    #[test]
    fn faults_in_a_range() {
        let events = chain(10);
        let first_bad = |events: &[Stored]| walk_events(events, 1, 10).first_bad;
        let bad = |position, fault| Some(BadEvent { position, fault });

        let mut edited = events.clone();
        edited[4].payload.push(' ');
        assert_eq!(first_bad(&edited), bad(5, Fault::ContentChanged));

        // Events 5 and 6 swapped: the row at position 5 was written at 6.
        let mut moved = events.clone();
        moved.swap(4, 5);
        moved[4].position = 5;
        moved[5].position = 6;
        assert_eq!(
            first_bad(&moved),
            bad(5, Fault::Reordered { written_at: 6 })
        );

        let mut deleted = events.clone();
        deleted.remove(4);
        assert_eq!(first_bad(&deleted), bad(5, Fault::Missing));
        assert_eq!(first_bad(&events[..9]), bad(10, Fault::Missing)); // the last one

        // A second row at position 5, and one at the head: each found at its own position.
        let mut repeated = events.clone();
        repeated.insert(5, events[4].clone());
        assert_eq!(first_bad(&repeated), bad(5, Fault::Repeated));
        let mut repeated = events.clone();
        repeated.push(events[9].clone());
        assert_eq!(first_bad(&repeated), bad(10, Fault::Repeated));
        let seg = walk_events(&events[..9], 1, 10);
        assert_eq!(seg.events, 9);
        assert!(!seg.clean_and_full());

        let mut relinked = events.clone();
        relinked[4].prev_hash = [7; 32];
        relinked[4].hash = event_hash(&[7; 32], &relinked[4].fields());
        assert_eq!(first_bad(&relinked), bad(5, Fault::LinkBroken));

        let mut rows: Vec<_> = events.iter().map(Stored::binary).collect();
        rows[2][11] = Some(vec![1, 2, 3]);
        assert_eq!(
            walk(&rows, 1, 10).unwrap().first_bad,
            bad(3, Fault::ContentChanged)
        );

        // After the first fault the rest is counted, not checked.
        let seg = walk_events(&edited, 1, 10);
        assert_eq!((seg.events, seg.last_position), (10, 4));
        assert!(!seg.clean_and_full());
    }

    #[test]
    fn impossible_values_are_faults_naming_the_column() {
        let events = chain(3);
        let fault = |column: usize, value: Option<Vec<u8>>| {
            let mut rows: Vec<_> = events.iter().map(Stored::binary).collect();
            rows[1][column] = value;
            let bad = walk(&rows, 1, 3)
                .expect("a fault, not an error")
                .first_bad
                .expect("a fault");
            (bad.position, bad.fault.to_string())
        };
        let at_2 = |text: &str| {
            (
                2,
                format!("impossible value: {text}, which the writer never stores"),
            )
        };
        assert_eq!(fault(1, None), at_2("aggregate_type holds NULL"));
        assert_eq!(fault(11, None), at_2("hash holds NULL"));
        assert_eq!(
            fault(3, Some(vec![0; 4])),
            at_2("sequence holds a 4-byte bigint")
        );
        assert_eq!(
            fault(6, Some(vec![0; 15])),
            at_2("organization_id holds a 15-byte uuid")
        );
        // timestamptz 'infinity' and '-infinity' (PostgreSQL's largest and smallest 64-bit
        // counts), said as PostgreSQL says them.
        assert_eq!(
            fault(7, Some(i64::MAX.to_be_bytes().to_vec())),
            at_2("recorded_at holds infinity")
        );
        assert_eq!(
            fault(7, Some(i64::MIN.to_be_bytes().to_vec())),
            at_2("recorded_at holds -infinity")
        );
        // No position to name: the one expected there.
        assert_eq!(
            fault(0, Some(vec![1])),
            at_2("position holds a 1-byte bigint")
        );
        // A gap before such a row is the first fault.
        let mut rows: Vec<_> = events.iter().map(Stored::binary).collect();
        rows.remove(1);
        rows[1][1] = None;
        assert_eq!(
            walk(&rows, 1, 3).unwrap().first_bad,
            Some(BadEvent {
                position: 2,
                fault: Fault::Missing
            })
        );

        // Past the first fault nothing is decoded: a NULL there is counted, not reported.
        let mut rows: Vec<_> = events.iter().map(Stored::binary).collect();
        rows[0][8] = Some(b"{}".to_vec());
        rows[1][1] = None;
        let seg = walk(&rows, 1, 3).unwrap();
        assert_eq!(seg.events, 3);
        assert_eq!(
            seg.first_bad,
            Some(BadEvent {
                position: 1,
                fault: Fault::ContentChanged
            })
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_a_content_change() {
        let events = chain(2);
        let mut rows: Vec<_> = events.iter().map(Stored::binary).collect();
        rows[1][2] = Some(vec![0xff, 0xfe]);
        assert_eq!(
            walk(&rows, 1, 2).unwrap().first_bad,
            Some(BadEvent {
                position: 2,
                fault: Fault::ContentChanged
            })
        );
    }

    #[test]
    fn a_copy_stream_in_small_chunks() {
        let events = chain(20);
        let mut stream = b"PGCOPY\n\xff\r\n\0".to_vec();
        stream.extend_from_slice(&0i32.to_be_bytes());
        stream.extend_from_slice(&0i32.to_be_bytes());
        for e in &events {
            let row = e.binary();
            stream.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for f in &row {
                match f {
                    None => stream.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        stream.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        stream.extend_from_slice(b);
                    }
                }
            }
        }
        stream.extend_from_slice(&(-1i16).to_be_bytes());
        for chunk_len in [1, 7, 100, 4096, stream.len()] {
            let mut reader = CopyBinaryReader::<N_COLUMNS>::new();
            let mut w = RangeWalk::new(1, 20);
            for chunk in stream.chunks(chunk_len) {
                reader.feed(chunk, |row| w.row(row)).unwrap();
            }
            reader.finish().unwrap();
            let seg = w.finish();
            assert!(seg.clean_and_full(), "chunks of {chunk_len}");
            assert_eq!(seg.last_hash, Some(events[19].hash));
        }
    }
}
