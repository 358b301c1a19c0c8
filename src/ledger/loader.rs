//! Group loading: cqrs-es loads an aggregate's events before every command. Under load,
//! one query per command costs more than the append itself, so concurrent loads queued while
//! the previous load ran are answered together, by one query.

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// How many loads one query may answer.
const MAX_BATCH_LOADS: usize = 256;

pub(super) struct LoadRequest {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub after_sequence: i64,
    pub reply: oneshot::Sender<Result<Vec<SerializedEvent>, PersistenceError>>,
}

type LoadedRow = (i64, String, String, i64, String, String, String, String);

pub(super) async fn run(pool: PgPool, mut receiver: mpsc::Receiver<LoadRequest>) {
    let mut batch = Vec::with_capacity(MAX_BATCH_LOADS);
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH_LOADS {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let requests = std::mem::take(&mut batch);
        match load_batch(&pool, &requests).await {
            Ok(mut answers) => {
                for (r, events) in requests.into_iter().zip(answers.drain(..)) {
                    let _ = r.reply.send(events);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for r in requests {
                    let _ = r.reply.send(Err(PersistenceError::ConnectionError(
                        message.clone().into(),
                    )));
                }
            }
        }
    }
}

async fn load_batch(
    pool: &PgPool,
    requests: &[LoadRequest],
) -> Result<Vec<Result<Vec<SerializedEvent>, PersistenceError>>, sqlx::Error> {
    let types: Vec<&str> = requests.iter().map(|r| r.aggregate_type).collect();
    let ids: Vec<&str> = requests.iter().map(|r| r.aggregate_id.as_str()).collect();
    let after: Vec<i64> = requests.iter().map(|r| r.after_sequence).collect();
    let rows: Vec<LoadedRow> = sqlx::query_as(
        "SELECT t.idx, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                e.payload::text, e.metadata::text
         FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS t(ty, id, after, idx)
         JOIN events e ON e.aggregate_type = t.ty AND e.aggregate_id = t.id AND e.sequence > t.after
         ORDER BY t.idx, e.sequence",
    )
    // Planned on every execution: a generic plan cached while `events` was small (or before
    // its first ANALYZE) joins by scanning the whole table, on every command, for ever.
    .persistent(false)
    .bind(&types)
    .bind(&ids)
    .bind(&after)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Result<Vec<SerializedEvent>, PersistenceError>> =
        requests.iter().map(|_| Ok(Vec::new())).collect();
    for (idx, ty, id, seq, et, ev, pl, md) in rows {
        let slot = &mut answers[idx as usize - 1];
        if let Ok(events) = slot {
            match (serde_json::from_str(&pl), serde_json::from_str(&md)) {
                (Ok(payload), Ok(metadata)) => events.push(SerializedEvent::new(
                    id,
                    seq as usize,
                    ty,
                    et,
                    ev,
                    payload,
                    metadata,
                )),
                (Err(e), _) | (_, Err(e)) => *slot = Err(e.into()),
            }
        }
    }
    Ok(answers)
}
