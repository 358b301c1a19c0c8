//! The `api_keys` projection applied a batch at a time: each key's events in the batch are
//! folded into the row they leave, written with at most two statements per batch (the keys
//! issued in it inserted as they end it, the others updated once each) instead of one per
//! event (16,000 in a million-event rebuild).
//!
//! `api_keys.rs` stays the definition. One by one, an event fails when it does not decode,
//! when an issue names another key or finds its key there already, when a revocation or
//! rotation finds no key (a rotation: none with the prefix it names as the previous one),
//! and when a row it leaves breaks the table's rules: a secret hash that is not 64 lower-case
//! hex digits, a prefix another key holds at that moment. The fold gives up, so that the
//! batch goes one event at a time and the per-event code says what is wrong, on:
//! - an event that does not decode or an issue that names another key;
//! - an issue after another event of its key in the batch;
//! - a rotation whose previous prefix is not the prefix the batch's events left the key
//!   with (for a key issued before the batch, its first rotation's previous prefix is
//!   checked against the row by the update, which must touch every such key);
//! - any hash in the batch that breaks the rule, even one a later rotation replaces;
//! - a prefix the batch gives twice, or gives while one of its rotations lets go of it
//!   after a key held it from before the batch: then whether one by one fails depends on
//!   the order, which the fold does not keep; and a prefix the batch gives and lets go
//!   again (so that no final row holds it) that a key held before the batch. Any other
//!   prefix the batch gives is held from then to the batch's end by the key it was given
//!   to, and the prefixes held before the batch that it does not let go are held all
//!   along, so the final rows break uniqueness exactly when one row on the way does;
//! - a statement that fails or touches another number of rows than keys.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ledgerline_aggregates::api_key::ApiKeyEvent;
use ledgerline_aggregates::metadata;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{self, Metadata};
use crate::give_up::{self, exactly, GiveUp};
use crate::StoredEvent;

/// Applies a batch of 8 events or more folded; `Err` when it gave up, its writes undone.
pub(crate) async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    let folded = Fold::of(events)?;
    give_up::under_savepoint(conn, async |conn| folded.write(conn).await).await
}

/// What an issue writes and the later events leave as they are.
struct Issued {
    organization: Option<Uuid>,
    user: Option<Uuid>,
    label: String,
    permissions: Vec<&'static str>,
    expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    created_by: Option<Uuid>,
}

/// One key as the batch's events leave it.
#[derive(Default)]
struct Key {
    issued: Option<Issued>,
    /// The prefix the row must hold before the batch: its first rotation's previous one
    /// (keys issued before the batch only).
    expected: Option<String>,
    /// The prefix and hash the batch's events left it with, if any set them.
    prefix: Option<String>,
    hash: Option<String>,
    rotated_at: Option<DateTime<Utc>>,
    /// When revoked and why, if the batch revoked it.
    revoked: Option<(DateTime<Utc>, Option<String>)>,
    version: i64,
}

struct Fold {
    keys: Vec<(Uuid, Key)>,
    /// Prefixes the batch gives and lets go again.
    fleeting: Vec<String>,
}

/// As the table's check has it: `^[0-9a-f]{64}$`.
fn hash_is_valid(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Fold {
    fn of(events: &[StoredEvent]) -> Result<Self, GiveUp> {
        let mut keys: Vec<(Uuid, Key)> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        // The prefixes the batch gives; those it lets go that keys held before it; and those
        // it gives and lets go again.
        let (mut given, mut let_go) = (HashSet::new(), HashSet::new());
        let mut fleeting = Vec::new();
        for event in events.iter().filter(|e| e.aggregate_type == "ApiKey") {
            let id = decode::aggregate_id(event)?;
            let kind = give_up::payload::<ApiKeyEvent>(event)?;
            let first = !index.contains_key(&id);
            let slot = *index.entry(id).or_insert_with(|| {
                keys.push((id, Key::default()));
                keys.len() - 1
            });
            let key = &mut keys[slot].1;
            key.version = event.sequence;
            match kind {
                ApiKeyEvent::ApiKeyIssued {
                    key_id,
                    organization_id,
                    user_id,
                    label,
                    permissions,
                    expires_at,
                    prefix,
                    secret_hash,
                    bootstrap: _,
                } => {
                    if key_id != id || !first || !hash_is_valid(&secret_hash) {
                        return Err(GiveUp::Uncovered);
                    }
                    if !given.insert(prefix.clone()) {
                        return Err(GiveUp::Uncovered);
                    }
                    key.issued = Some(Issued {
                        organization: organization_id,
                        user: user_id,
                        label,
                        permissions: permissions.iter().map(|p| p.as_str()).collect(),
                        expires_at,
                        created_at: event.recorded_at,
                        created_by: Metadata::of(event)?.uuid(metadata::ACTOR_KEY_ID)?,
                    });
                    (key.prefix, key.hash) = (Some(prefix), Some(secret_hash));
                }
                ApiKeyEvent::ApiKeyRevoked { reason } => {
                    key.revoked = Some((event.recorded_at, reason));
                }
                ApiKeyEvent::ApiKeyRotated {
                    prefix,
                    secret_hash,
                    previous_prefix,
                    ..
                } => {
                    match &key.prefix {
                        Some(now) if *now != previous_prefix => return Err(GiveUp::Uncovered),
                        Some(_) => fleeting.push(previous_prefix),
                        None => {
                            key.expected = Some(previous_prefix.clone());
                            let_go.insert(previous_prefix);
                        }
                    }
                    if !hash_is_valid(&secret_hash) || !given.insert(prefix.clone()) {
                        return Err(GiveUp::Uncovered);
                    }
                    (key.prefix, key.hash) = (Some(prefix), Some(secret_hash));
                    key.rotated_at = Some(event.recorded_at);
                }
            }
        }
        if !given.is_disjoint(&let_go) {
            return Err(GiveUp::Uncovered);
        }
        Ok(Fold { keys, fleeting })
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if !self.fleeting.is_empty() {
            // Held by no key at the batch's end, so no statement meets them: no key may
            // have held one before it either.
            let held: i64 =
                sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE prefix = ANY($1)")
                    .bind(&self.fleeting)
                    .fetch_one(&mut *conn)
                    .await?;
            exactly(0, held)?;
        }
        let mut issued = Issues::default();
        let mut changed = Changes::default();
        for (id, key) in self.keys {
            match key.issued {
                Some(ref i) => issued.push(id, i, &key),
                None => changed.push(id, key),
            }
        }
        issued.write(conn).await?;
        changed.write(conn).await
    }
}

/// Keys issued in the batch, as columns.
#[derive(Default)]
struct Issues {
    id: Vec<Uuid>,
    organization: Vec<Option<Uuid>>,
    user: Vec<Option<Uuid>>,
    label: Vec<String>,
    prefix: Vec<Option<String>>,
    hash: Vec<Option<String>>,
    /// Each key's permissions, one text each, as PostgreSQL has no arrays of arrays of
    /// unequal lengths: `{a,b}` literals.
    permissions: Vec<String>,
    status: Vec<&'static str>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    created_at: Vec<DateTime<Utc>>,
    revoked_at: Vec<Option<DateTime<Utc>>>,
    reason: Vec<Option<String>>,
    rotated_at: Vec<Option<DateTime<Utc>>>,
    created_by: Vec<Option<Uuid>>,
    version: Vec<i64>,
}

/// `items` as a PostgreSQL array literal of text, each element quoted.
fn text_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

impl Issues {
    fn push(&mut self, id: Uuid, i: &Issued, key: &Key) {
        self.id.push(id);
        self.organization.push(i.organization);
        self.user.push(i.user);
        self.label.push(i.label.clone());
        self.prefix.push(key.prefix.clone());
        self.hash.push(key.hash.clone());
        self.permissions.push(text_array(&i.permissions));
        self.status.push(if key.revoked.is_some() {
            "revoked"
        } else {
            "active"
        });
        self.expires_at.push(i.expires_at);
        self.created_at.push(i.created_at);
        self.revoked_at.push(key.revoked.as_ref().map(|r| r.0));
        self.reason
            .push(key.revoked.as_ref().and_then(|r| r.1.clone()));
        self.rotated_at.push(key.rotated_at);
        self.created_by.push(i.created_by);
        self.version.push(key.version);
    }

    /// As `api_keys::apply` writes an issue, with what the batch's later events set.
    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.id.is_empty() {
            return Ok(());
        }
        let done = sqlx::query(
            "INSERT INTO api_keys (id, organization_id, user_id, label, prefix, key_hash, \
             permissions, status, expires_at, created_at, revoked_at, revocation_reason, \
             rotated_at, created_by_key_id, version) \
             SELECT t.id, t.organization_id, t.user_id, t.label, t.prefix, t.key_hash, \
             t.permissions::text[], t.status, t.expires_at, t.created_at, t.revoked_at, \
             t.reason, t.rotated_at, t.created_by, t.version \
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], \
             $11::timestamptz[], $12::text[], $13::timestamptz[], $14::uuid[], $15::bigint[]) \
             AS t(id, organization_id, user_id, label, prefix, key_hash, permissions, status, \
             expires_at, created_at, revoked_at, reason, rotated_at, created_by, version)",
        )
        .bind(&self.id)
        .bind(&self.organization)
        .bind(&self.user)
        .bind(&self.label)
        .bind(&self.prefix)
        .bind(&self.hash)
        .bind(&self.permissions)
        .bind(&self.status)
        .bind(&self.expires_at)
        .bind(&self.created_at)
        .bind(&self.revoked_at)
        .bind(&self.reason)
        .bind(&self.rotated_at)
        .bind(&self.created_by)
        .bind(&self.version)
        .execute(&mut *conn)
        .await?;
        exactly(self.id.len(), done.rows_affected() as i64)
    }
}

/// Keys issued before the batch, as columns: what the batch set (`None`: left as it is).
#[derive(Default)]
struct Changes {
    id: Vec<Uuid>,
    expected: Vec<Option<String>>,
    prefix: Vec<Option<String>>,
    hash: Vec<Option<String>>,
    rotated_at: Vec<Option<DateTime<Utc>>>,
    revoked: Vec<bool>,
    revoked_at: Vec<Option<DateTime<Utc>>>,
    reason: Vec<Option<String>>,
    version: Vec<i64>,
}

impl Changes {
    fn push(&mut self, id: Uuid, key: Key) {
        self.id.push(id);
        self.expected.push(key.expected);
        self.prefix.push(key.prefix);
        self.hash.push(key.hash);
        self.rotated_at.push(key.rotated_at);
        self.revoked.push(key.revoked.is_some());
        let (at, reason) = key.revoked.unzip();
        self.revoked_at.push(at);
        self.reason.push(reason.flatten());
        self.version.push(key.version);
    }

    /// As `api_keys::apply` writes revocations and rotations: a rotated key must hold the
    /// prefix its first rotation names as the previous one.
    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.id.is_empty() {
            return Ok(());
        }
        let done = sqlx::query(
            "UPDATE api_keys k SET prefix = COALESCE(t.prefix, k.prefix), \
             key_hash = COALESCE(t.key_hash, k.key_hash), \
             rotated_at = COALESCE(t.rotated_at, k.rotated_at), \
             status = CASE WHEN t.revoked THEN 'revoked' ELSE k.status END, \
             revoked_at = CASE WHEN t.revoked THEN t.revoked_at ELSE k.revoked_at END, \
             revocation_reason = CASE WHEN t.revoked THEN t.reason \
                 ELSE k.revocation_reason END, \
             version = t.version \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
             $6::bool[], $7::timestamptz[], $8::text[], $9::bigint[]) \
             AS t(id, expected, prefix, key_hash, rotated_at, revoked, revoked_at, reason, \
             version) \
             WHERE k.id = t.id AND (t.expected IS NULL OR k.prefix = t.expected)",
        )
        .bind(&self.id)
        .bind(&self.expected)
        .bind(&self.prefix)
        .bind(&self.hash)
        .bind(&self.rotated_at)
        .bind(&self.revoked)
        .bind(&self.revoked_at)
        .bind(&self.reason)
        .bind(&self.version)
        .execute(&mut *conn)
        .await?;
        exactly(self.id.len(), done.rows_affected() as i64)
    }
}
