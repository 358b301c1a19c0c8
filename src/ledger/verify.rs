//! Chain verification: walks the ledger in position order and recomputes every hash from the
//! stored content, never trusting a stored hash (immudb's "linear fake" lesson). Ranges are
//! checked in parallel; the links between ranges are checked when they are joined.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::hash::{event_hash, EventFields, GENESIS};

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
    events: u64,
    /// The stored prev_hash of the range's first event (checked against the join).
    first_prev: Option<[u8; 32]>,
    /// The recomputed hash of the range's last good event, and its position.
    last_hash: Option<[u8; 32]>,
    last_position: i64,
    first_bad: Option<BadEvent>,
}

/// How far around a position to look for where a moved event was written.
const REORDER_WINDOW: i64 = 4096;
const SEGMENT: i64 = 65_536;

pub async fn verify_database(pool: &PgPool, workers: usize) -> Result<Report, sqlx::Error> {
    let started = Instant::now();
    let (count, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(position) FROM events")
            .fetch_one(pool)
            .await?;
    // With N rows the first gap, if any, is at or below N + 1: a row moved to a huge position
    // must not make us walk billions of empty ranges.
    let max = max.unwrap_or(0).min(count.saturating_add(1));
    let ranges: Vec<(i64, i64)> = (0..)
        .map(|i| (1 + i * SEGMENT, ((i + 1) * SEGMENT).min(max)))
        .take_while(|(s, _)| *s <= max)
        .collect();

    let mut segments = Vec::with_capacity(ranges.len());
    let mut pending = futures::stream::iter(ranges.into_iter().map(|(s, e)| {
        let pool = pool.clone();
        tokio::spawn(async move { verify_range(&pool, s, e).await })
    }))
    .buffered(workers.max(1));
    use futures::StreamExt;
    while let Some(joined) = pending.next().await {
        let seg =
            joined.map_err(|e| sqlx::Error::Protocol(format!("verifier task failed: {e}")))??;
        segments.push(seg);
    }
    Ok(join(segments, started.elapsed()))
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

async fn verify_range(pool: &PgPool, start: i64, end: i64) -> Result<Segment, sqlx::Error> {
    // `json` columns are read as sent (the binary form of `json` is its exact text), which
    // spares the server a cast per row.
    let sql =
        "SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version, \
               organization_id, recorded_at, payload, metadata, prev_hash, hash \
               FROM events WHERE position BETWEEN $1 AND $2 ORDER BY position";
    // Raw rows, fields borrowed from them: no per-event allocation on the hot path.
    let mut rows = sqlx::query(sql).bind(start).bind(end).fetch(pool);
    let mut seg = Segment {
        start,
        events: 0,
        first_prev: None,
        last_hash: None,
        last_position: start - 1,
        first_bad: None,
    };
    let mut expected = start;
    let mut prev: Option<[u8; 32]> = None;
    while let Some(row) = rows.try_next().await? {
        seg.events += 1;
        if seg.first_bad.is_some() {
            continue; // count the rest, report the first fault only
        }
        let fields = borrowed_fields(&row)?;
        let stored_prev = to32(row.try_get::<&[u8], _>(10)?);
        let stored_hash = to32(row.try_get::<&[u8], _>(11)?);
        if fields.position != expected {
            seg.first_bad = Some(BadEvent {
                position: expected,
                fault: Fault::Missing,
            });
            continue;
        }
        let recomputed = event_hash(&stored_prev, &fields);
        if stored_hash != recomputed {
            let fault = match written_at(fields, &stored_prev, &stored_hash) {
                Some(q) => Fault::Reordered { written_at: q },
                None => Fault::ContentChanged,
            };
            seg.first_bad = Some(BadEvent {
                position: fields.position,
                fault,
            });
            continue;
        }
        match prev {
            None => seg.first_prev = Some(stored_prev),
            Some(p) if p != stored_prev => {
                seg.first_bad = Some(BadEvent {
                    position: fields.position,
                    fault: Fault::LinkBroken,
                });
                continue;
            }
            Some(_) => {}
        }
        prev = Some(recomputed);
        seg.last_hash = prev;
        seg.last_position = fields.position;
        expected += 1;
    }
    if seg.first_bad.is_none() && expected <= end {
        seg.first_bad = Some(BadEvent {
            position: expected,
            fault: Fault::Missing,
        });
    }
    Ok(seg)
}

/// The hashed fields of a row of the query above, by column index.
fn borrowed_fields(row: &PgRow) -> Result<EventFields<'_>, sqlx::Error> {
    Ok(EventFields {
        position: row.try_get(0)?,
        aggregate_type: row.try_get(1)?,
        aggregate_id: row.try_get(2)?,
        sequence: row.try_get(3)?,
        event_type: row.try_get(4)?,
        event_version: row.try_get(5)?,
        organization_id: row.try_get(6)?,
        recorded_at: row.try_get(7)?,
        payload: row.try_get_unchecked(8)?,
        metadata: row.try_get_unchecked(9)?,
    })
}

/// For an event whose hash does not match: the nearby position at which it does, if any.
fn written_at(
    mut fields: EventFields<'_>,
    stored_prev: &[u8; 32],
    stored_hash: &[u8; 32],
) -> Option<i64> {
    let at = fields.position;
    (at.saturating_sub(REORDER_WINDOW).max(1)..=at.saturating_add(REORDER_WINDOW))
        .filter(|q| *q != at)
        .find(|q| {
            fields.position = *q;
            event_hash(stored_prev, &fields) == *stored_hash
        })
}

fn to32(b: &[u8]) -> [u8; 32] {
    b.try_into().unwrap_or([0xff; 32])
}
