//! Chain verification: walks the ledger in position order and recomputes every hash from the
//! stored content, never trusting a stored hash (immudb's "linear fake" lesson). Ranges are
//! checked in parallel; the links between ranges are checked when they are joined.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{StreamExt, TryStreamExt};
use sqlx::{PgConnection, PgPool};

use super::copy_binary::CopyBinaryReader;
use super::hash::GENESIS;

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
            Fault::Missing => f.write_str("position gap: no event holds this position (deleted?)"),
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
    Ok(join(segments, started.elapsed()))
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
    for seg in segments {
        events += seg.events;
        if first_bad.is_some() {
            continue; // count the rest; the head stays at the last good event
        }
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
                       prev_hash, hash";
const N_COLUMNS: usize = 12;
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
    /// The v1 hash input of the current row (reused: no allocation per row).
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
        let raw = decode_row(row)?;
        if raw.position != self.expected {
            seg.first_bad = Some(BadEvent {
                position: self.expected,
                fault: Fault::Missing,
            });
            return Ok(());
        }
        encode_v1(&mut self.input, &raw);
        let recomputed: [u8; 32] = blake3::hash(&self.input).into();
        if raw.hash != recomputed {
            let fault = match written_at(&mut self.input, raw.position, &raw.hash) {
                Some(q) => Fault::Reordered { written_at: q },
                None => Fault::ContentChanged,
            };
            seg.first_bad = Some(BadEvent {
                position: raw.position,
                fault,
            });
            return Ok(());
        }
        match self.prev {
            None => seg.first_prev = Some(raw.prev_hash),
            Some(p) if p != raw.prev_hash => {
                seg.first_bad = Some(BadEvent {
                    position: raw.position,
                    fault: Fault::LinkBroken,
                });
                return Ok(());
            }
            Some(_) => {}
        }
        self.prev = Some(recomputed);
        seg.last_hash = self.prev;
        seg.last_position = raw.position;
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

/// One row of `COLUMNS`, its fields borrowed from the COPY data as the bytes that are hashed.
/// Text is not checked for UTF-8: the hash covers the exact bytes, so a row whose bytes are
/// not the valid UTF-8 the writer hashed cannot match its stored hash.
#[derive(Debug, Clone, Copy)]
struct RawRow<'a> {
    position: i64,
    aggregate_type: &'a [u8],
    aggregate_id: &'a [u8],
    sequence: i64,
    event_type: &'a [u8],
    event_version: &'a [u8],
    organization_id: Option<&'a [u8; 16]>,
    /// Microseconds since the Unix epoch.
    recorded_at: i64,
    payload: &'a [u8],
    metadata: &'a [u8],
    prev_hash: [u8; 32],
    hash: [u8; 32],
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A row of `COLUMNS` in binary form (`bigint`: 8 bytes big-endian; `text`, `json`, `bytea`:
/// the bytes; `uuid`: 16 bytes; `timestamptz`: 8 bytes big-endian, microseconds since
/// 2000-01-01 UTC). A value no writer can have stored (a `NULL` in a column that is never
/// `NULL`, an integer of the wrong width, a time beyond a signed 64-bit count of microseconds
/// since 1970) is an error naming the column and the position; a `prev_hash` or `hash` of the
/// wrong length is kept as a hash that matches nothing, so that it is reported as a fault.
fn decode_row<'a>(row: &[Option<&'a [u8]>; N_COLUMNS]) -> Result<RawRow<'a>, sqlx::Error> {
    let bad = |i: usize, what: String| {
        let at = match row[0].and_then(int8) {
            Some(p) => format!("at position {p}"),
            None => "in a row without a valid position".to_string(),
        };
        sqlx::Error::ColumnDecode {
            index: COLUMN_NAMES[i].to_string(),
            source: format!("{what} {at}").into(),
        }
    };
    let value = |i: usize| row[i].ok_or_else(|| bad(i, "NULL".to_string()));
    let integer = |i: usize| {
        let v = value(i)?;
        int8(v).ok_or_else(|| bad(i, format!("a {}-byte bigint", v.len())))
    };
    let organization_id = match row[6] {
        None => None,
        Some(b) => {
            Some(<&[u8; 16]>::try_from(b).map_err(|_| bad(6, format!("a {}-byte uuid", b.len())))?)
        }
    };
    let recorded_at = {
        let v = value(7)?;
        let pg = int8(v).ok_or_else(|| bad(7, format!("a {}-byte timestamptz", v.len())))?;
        pg.checked_add(PG_EPOCH_UNIX_MICROS).ok_or_else(|| {
            bad(
                7,
                format!("a time ({pg} µs after 2000-01-01) beyond the hashable range"),
            )
        })?
    };
    Ok(RawRow {
        position: integer(0)?,
        aggregate_type: value(1)?,
        aggregate_id: value(2)?,
        sequence: integer(3)?,
        event_type: value(4)?,
        event_version: value(5)?,
        organization_id,
        recorded_at,
        payload: value(8)?,
        metadata: value(9)?,
        prev_hash: to32(value(10)?),
        hash: to32(value(11)?),
    })
}

/// A `bigint` in binary form.
fn int8(b: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

/// The domain string of format v1 (`hash::event_hash`).
const DOMAIN_V1: &[u8] = b"ledgerline.event.v1";
/// Where the position sits in the v1 hash input: after the length-prefixed domain and
/// `prev_hash`.
const POSITION_AT: usize = 8 + DOMAIN_V1.len() + 32;

/// Writes the v1 hash input of `row` (docs/ledger-format.md, section 3) into `out`: the same
/// bytes `hash::event_hash` feeds to BLAKE3 piece by piece, in one buffer so that BLAKE3 runs
/// over it in one call. The unit tests check the two against each other.
fn encode_v1(out: &mut Vec<u8>, row: &RawRow<'_>) {
    fn string(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    }
    out.clear();
    string(out, DOMAIN_V1);
    out.extend_from_slice(&row.prev_hash);
    debug_assert_eq!(out.len(), POSITION_AT);
    out.extend_from_slice(&(row.position as u64).to_be_bytes());
    string(out, row.aggregate_type);
    string(out, row.aggregate_id);
    out.extend_from_slice(&(row.sequence as u64).to_be_bytes());
    string(out, row.event_type);
    string(out, row.event_version);
    match row.organization_id {
        None => out.push(0),
        Some(org) => {
            out.push(1);
            out.extend_from_slice(org);
        }
    }
    out.extend_from_slice(&row.recorded_at.to_be_bytes());
    string(out, row.payload);
    string(out, row.metadata);
}

/// For an event whose hash does not match: the nearby position at which it does, if any.
/// `input` is the event's v1 hash input; its position is rewritten in place.
fn written_at(input: &mut [u8], at: i64, stored_hash: &[u8; 32]) -> Option<i64> {
    (at.saturating_sub(REORDER_WINDOW).max(1)..=at.saturating_add(REORDER_WINDOW))
        .filter(|q| *q != at)
        .find(|q| {
            input[POSITION_AT..POSITION_AT + 8].copy_from_slice(&(*q as u64).to_be_bytes());
            blake3::hash(input) == *stored_hash
        })
}

fn to32(b: &[u8]) -> [u8; 32] {
    b.try_into().unwrap_or([0xff; 32])
}
