//! Growing a log seeded through the API to benchmark size, fast: tenant-disjoint copies of
//! it appended after it, each with every id (any JSON string or column that is a UUID)
//! mapped to a fresh one and API key prefixes made unique, hash-chained like the writer
//! chains them. Each copy is the seeded organizations again under new ids, so the mix of
//! event types and the shape of every stream stay those of real traffic, at a fraction of
//! the time the API would take to write a million events on a shared 2-core machine.
//! Organization names and slugs are copied as they are (so is a bootstrap key's issue) and
//! no unique claims are written: the grown log gives one name several owners, which the
//! writer never lets through (`ledgerline claims check` says so). No read model enforces those names, so a
//! rebuild measures the same; claims are not to be tested on such a log.

use std::collections::HashMap;

use anyhow::Context;
use ledgerline::ledger::hash::{event_hash, EventFields, HashVersion};
use ledgerline_projections::{StoredEvent, STORED_EVENT_COLUMNS};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Rows per INSERT.
const CHUNK: usize = 5_000;

/// Appends copies of the log's first `source` events until it holds `target` events.
pub async fn amplify(pool: &PgPool, source: i64, target: i64) -> anyhow::Result<()> {
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position <= $1 ORDER BY position"
    ))
    .bind(source)
    .fetch_all(pool)
    .await?;
    let last: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    let (mut position, prev) = last.context("an empty log cannot be copied")?;
    let mut prev: [u8; 32] = prev
        .try_into()
        .map_err(|_| anyhow::anyhow!("a stored hash is not 32 bytes"))?;
    let mut copy = 0u32;
    let mut rows = Rows::default();
    while position < target {
        copy += 1;
        let mut ids = Ids::new(copy);
        for e in &events {
            if position >= target {
                break;
            }
            position += 1;
            let mut next = StoredEvent {
                position,
                aggregate_id: ids.text(&e.aggregate_id),
                organization_id: e.organization_id.map(|o| ids.map(o)),
                payload: ids.json(&e.payload)?,
                metadata: ids.json(&e.metadata)?,
                prev_hash: prev.to_vec(),
                // The copies are written now, as the writer writes: in the current format.
                hash_version: HashVersion::CURRENT.number(),
                ..e.clone()
            };
            prev = event_hash(&prev, &EventFields::of(&next));
            next.hash = prev.to_vec();
            rows.push(next);
            if rows.len() == CHUNK {
                rows.insert(pool).await?;
            }
        }
    }
    rows.insert(pool).await?;
    Ok(())
}

/// One copy's id mapping: the same old id always maps to the same new one.
struct Ids {
    copy: u32,
    map: HashMap<Uuid, Uuid>,
}

impl Ids {
    fn new(copy: u32) -> Self {
        Self {
            copy,
            map: HashMap::new(),
        }
    }

    /// A fresh id of the old one's kind: a time-ordered id (version 7, as message ids are)
    /// gets one made now, so a copy's ids grow in its positions' order as the API's do (their
    /// time is the copying's, not the events' `recorded_at`).
    fn map(&mut self, old: Uuid) -> Uuid {
        *self
            .map
            .entry(old)
            .or_insert_with(|| match old.get_version_num() {
                7 => Uuid::now_v7(),
                _ => Uuid::new_v4(),
            })
    }

    fn text(&mut self, s: &str) -> String {
        match Uuid::parse_str(s) {
            Ok(old) if s.len() == 36 => self.map(old).to_string(),
            _ => s.to_string(),
        }
    }

    fn json(&mut self, text: &str) -> anyhow::Result<String> {
        let mut value: Value = serde_json::from_str(text)?;
        self.walk(&mut value, None);
        Ok(serde_json::to_string(&value)?)
    }

    fn walk(&mut self, value: &mut Value, key: Option<&str>) {
        match value {
            Value::String(s) if matches!(key, Some("prefix" | "previous_prefix")) => {
                // `api_keys.prefix` is unique.
                *s = format!("{s}c{}", self.copy);
            }
            Value::String(s) => *s = self.text(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.walk(v, None)),
            Value::Object(fields) => {
                for (k, v) in fields.iter_mut() {
                    self.walk(v, Some(k.as_str()));
                }
            }
            _ => {}
        }
    }
}

#[derive(Default)]
struct Rows(Vec<StoredEvent>);

impl Rows {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn push(&mut self, e: StoredEvent) {
        self.0.push(e);
    }

    async fn insert(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.0);
        let col = |f: fn(&StoredEvent) -> String| rows.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, \
             event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash, \
             hash_version) \
             SELECT p, at, ai, s, et, ev, o, r, pl::json, m::json, ph, h, 2 FROM unnest( \
             $1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], \
             $7::uuid[], $8::timestamptz[], $9::text[], $10::text[], $11::bytea[], $12::bytea[]) \
             AS u(p, at, ai, s, et, ev, o, r, pl, m, ph, h)",
        )
        .bind(rows.iter().map(|e| e.position).collect::<Vec<_>>())
        .bind(col(|e| e.aggregate_type.clone()))
        .bind(col(|e| e.aggregate_id.clone()))
        .bind(rows.iter().map(|e| e.sequence).collect::<Vec<_>>())
        .bind(col(|e| e.event_type.clone()))
        .bind(col(|e| e.event_version.clone()))
        .bind(rows.iter().map(|e| e.organization_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
        .bind(col(|e| e.payload.clone()))
        .bind(col(|e| e.metadata.clone()))
        .bind(rows.iter().map(|e| e.prev_hash.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|e| e.hash.clone()).collect::<Vec<_>>())
        .execute(pool)
        .await
        .context("appending a copy of the log")?;
        Ok(())
    }
}
