//! Messaging benchmark: does a conversation's history cost its writers and readers anything?
//! Posting latency at growing history sizes (each post paired with posts to 10-message
//! control conversations on the same ledger and on a fresh one, so that the machine's other
//! load can be told apart), and the latency of reading a page of 50 (newest, and before
//! random cursors), all through the HTTP API of an app running in-process (auth, facts,
//! sealing, the append, read-your-writes, the response), the way tests/common starts it.
//! For contrast, what loading a stream of as many events costs, which is what a
//! Conversation aggregate that held its messages would pay on every command. A plain binary
//! (`harness = false`): `cargo bench --bench messaging`. See docs/benchmarks.md.
//!
//! Environment:
//! - `LEDGERLINE_BENCH_ADMIN_URL`: a PostgreSQL database the bench may create and drop
//!   databases from (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - `LEDGERLINE_BENCH_HISTORY`: history sizes, ascending (default `10,10000,100000`).
//! - `LEDGERLINE_BENCH_SAMPLES`: sequential posts measured per size (default 300).
//! - `LEDGERLINE_BENCH_READS`: sequential page reads measured per size and kind (default 1000).
//! - `LEDGERLINE_BENCH_SEEDERS`: concurrent posters growing the history (default 32).
//! - `LEDGERLINE_BENCH_CONTRAST=0`: skip the replay contrast.
//! - `LEDGERLINE_BENCH_SKIP_VACUUM=1`: no `VACUUM (ANALYZE)` after each seeding step, as on
//!   a server without autovacuum (the CI server here runs with `autovacuum = off`).
//!
//! Diagnosis only: `LEDGERLINE_BENCH_DIAG_SLOW_MS=<ms>` has PostgreSQL's `auto_explain` log
//! the plan of every statement of the bench database slower than that (server log), and
//! prints table statistics after each post series.
//!
//! Any request answered with an unexpected status, a page that is not what the history
//! says it must be, or a count that does not add up makes the run exit non-zero.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::Utc;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, EventStore};
use ledgerline::ledger::LedgerStore;
use ledgerline_aggregates::message::MessageEvent;
use ledgerline_aggregates::metadata as md;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

mod support;
use support::api::{parse, serve, Api};
use support::mixed_log::content;
use support::{busy_since, env_list, env_num, machine_ticks, met, BenchDb};

/// The app's pool: 16, `serve`'s default before 2026-12-06 (and still on four cores or
/// more), kept so that runs compare with the earlier ones.
const APP_POOL: u32 = 16;
/// Users of the organization, all `member`s and participants of the one conversation.
const USERS: usize = 8;
const PAGE: usize = 50;
/// Unmeasured requests before each measured series.
const WARM_UP: usize = 20;

const GOAL_POST_RATIO: f64 = 1.5;
const GOAL_READ_P99_MS: f64 = 10.0;

// ---------------------------------------------------------------------------------------
// Figures.

#[derive(Clone, Copy)]
struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
    max: f64,
}

/// Nearest-rank percentiles of latencies in microseconds, in milliseconds.
fn stats(mut us: Vec<u32>) -> Stats {
    us.sort_unstable();
    let at = |p: f64| {
        if us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        us[rank - 1] as f64 / 1000.0
    };
    Stats {
        n: us.len(),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        mean: us.iter().map(|&u| u as f64).sum::<f64>() / us.len().max(1) as f64 / 1000.0,
        max: at(1.0),
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, mean {:.2} ms, max {:.2} ms",
            self.n, self.p50, self.p90, self.p99, self.mean, self.max
        )
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

// ---------------------------------------------------------------------------------------
// The app in-process and its HTTP API.

struct Chat {
    api: Api,
    org: Uuid,
    conversation: Uuid,
    /// (user id, key secret), each holding the built-in `member` role.
    users: Vec<(Uuid, String)>,
    /// Every message's position, in the order the posts were answered.
    positions: Vec<i64>,
}

impl Chat {
    fn messages_path(&self) -> String {
        self.messages_path_of(self.conversation)
    }

    fn messages_path_of(&self, conversation: Uuid) -> String {
        format!(
            "/v1/organizations/{}/conversations/{conversation}/messages",
            self.org
        )
    }
}

/// A group conversation of all `users`, owned by the first.
async fn create_conversation(
    api: &Api,
    org: Uuid,
    users: &[(Uuid, String)],
    title: &str,
) -> anyhow::Result<Uuid> {
    let others: Vec<Uuid> = users[1..].iter().map(|(u, _)| *u).collect();
    let conversation = api
        .expect(
            Method::POST,
            &format!("/v1/organizations/{org}/conversations"),
            &users[0].1,
            Some(&json!({"kind": "group", "title": title, "participants": others})),
            201,
        )
        .await?;
    Ok(conversation["id"]
        .as_str()
        .context("conversation id")?
        .parse()?)
}

/// The app exactly as tests/common starts it, over a migrated database, with the
/// organization, users and conversation of [`set_up`].
async fn start_app(
    pool: PgPool,
) -> anyhow::Result<(tokio::task::JoinHandle<std::io::Result<()>>, Chat)> {
    let served = serve(pool).await?;
    let chat = set_up(&served.api, &served.admin_key).await?;
    Ok((served.server, chat))
}

/// An organization with `USERS` members, each with a key of the `member` role (as
/// tests/common's `member_with_key` makes them), and a group conversation of all of them.
async fn set_up(api: &Api, admin_key: &str) -> anyhow::Result<Chat> {
    let org = api
        .expect(
            Method::POST,
            "/v1/organizations",
            admin_key,
            Some(&json!({"name": "Bench Chat", "slug": "bench-chat"})),
            201,
        )
        .await?;
    let org: Uuid = org["id"].as_str().context("org id")?.parse()?;
    let roles = api
        .expect(
            Method::GET,
            &format!("/v1/organizations/{org}/roles"),
            admin_key,
            None,
            200,
        )
        .await?;
    let member_role = roles["items"]
        .as_array()
        .context("roles")?
        .iter()
        .find(|r| r["name"] == "member")
        .and_then(|r| r["id"].as_str())
        .context("the built-in member role")?
        .to_string();
    let perms = ledgerline_aggregates::organization::built_in_roles::permissions("member")
        .context("member permissions")?;
    let mut users = Vec::new();
    for i in 0..USERS {
        let user = api
            .expect(
                Method::POST,
                &format!("/v1/organizations/{org}/users"),
                admin_key,
                Some(&json!({"email": format!("user{i}@bench.example"), "full_name": format!("Bench User {i}")})),
                201,
            )
            .await?;
        let user: Uuid = user["id"].as_str().context("user id")?.parse()?;
        api.expect(
            Method::PUT,
            &format!("/v1/organizations/{org}/users/{user}/roles/{member_role}"),
            admin_key,
            Some(&json!({})),
            200,
        )
        .await?;
        let key = api
            .expect(
                Method::POST,
                &format!("/v1/organizations/{org}/api-keys"),
                admin_key,
                Some(&json!({"label": format!("member key {i}"), "permissions": perms, "user_id": user})),
                201,
            )
            .await?;
        users.push((user, key["secret"].as_str().context("secret")?.to_string()));
    }
    let conversation = create_conversation(api, org, &users, "Bench history").await?;
    Ok(Chat {
        api: api.clone(),
        org,
        conversation,
        users,
        positions: Vec::new(),
    })
}

/// One post; returns the new message's position.
async fn post(api: &Api, path: &str, key: &str, text: String) -> anyhow::Result<(i64, Duration)> {
    let body = json!({ "content": text });
    let started = Instant::now();
    let (status, text) = api.send(Method::POST, path, key, Some(&body)).await?;
    let took = started.elapsed();
    let message = parse(Method::POST, path, 201, status, &text)?;
    let position = message["position"].as_i64().context("a position")?;
    Ok((position, took))
}

// ---------------------------------------------------------------------------------------
// Phases.

/// Grows the history to `target` messages with `seeders` concurrent posters; returns the
/// messages added and the time it took.
async fn seed(chat: &mut Chat, target: usize, seeders: usize) -> anyhow::Result<(usize, Duration)> {
    let to_add = target.saturating_sub(chat.positions.len());
    if to_add == 0 {
        return Ok((0, Duration::ZERO));
    }
    let next = Arc::new(AtomicUsize::new(0));
    let path = Arc::new(chat.messages_path());
    let keys: Arc<Vec<String>> = Arc::new(chat.users.iter().map(|(_, k)| k.clone()).collect());
    let started = Instant::now();
    let tasks: Vec<_> = (0..seeders.max(1))
        .map(|t| {
            let (api, next, path, keys) =
                (chat.api.clone(), next.clone(), path.clone(), keys.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64 ^ 0x5eed);
                let mut positions = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to_add {
                        return anyhow::Ok(positions);
                    }
                    let key = &keys[(t + i) % keys.len()];
                    let (position, _) = post(&api, &path, key, content(&mut rng)).await?;
                    positions.push(position);
                }
            })
        })
        .collect();
    for task in tasks {
        chat.positions.extend(task.await??);
    }
    Ok((to_add, started.elapsed()))
}

/// History of the control conversations when their series starts, like the smallest size.
const CONTROL_HISTORY: usize = 10;

/// Latencies of one series of posts to one conversation.
struct Series {
    chat_index: usize,
    path: String,
    latencies: Vec<u32>,
}

/// `samples` sequential posts by one client (after a warm-up) to the conversation, each
/// timed from sending the request to the whole response received. Each is one of a round of
/// three, in rotating order, with a post to a control conversation created now with
/// `CONTROL_HISTORY` messages on the same ledger, and one to such a conversation on the
/// nearly empty ledger of `fresh`: the machine's other work then shows in all three alike,
/// the cost of the conversation's history in the first against the second, and the cost of
/// the ledger's size in the second against the third. Returns the three series' figures.
async fn measure_posts(
    chat: &mut Chat,
    fresh: &Chat,
    samples: usize,
    seed: u64,
) -> anyhow::Result<[Stats; 3]> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut series = vec![Series {
        chat_index: 0,
        path: chat.messages_path(),
        latencies: Vec::with_capacity(samples),
    }];
    for (chat_index, c) in [(0, &*chat), (1, fresh)] {
        let control = create_conversation(&c.api, c.org, &c.users, "Bench control").await?;
        let path = c.messages_path_of(control);
        for _ in 0..CONTROL_HISTORY {
            post(&c.api, &path, &c.users[1].1, content(&mut rng)).await?;
        }
        series.push(Series {
            chat_index,
            path,
            latencies: Vec::with_capacity(samples),
        });
    }
    for i in 0..WARM_UP + samples {
        for k in 0..series.len() {
            let which = (i + k) % series.len();
            let s = &mut series[which];
            let c = if s.chat_index == 0 { &*chat } else { fresh };
            let (position, took) = post(&c.api, &s.path, &c.users[1].1, content(&mut rng)).await?;
            if i >= WARM_UP {
                s.latencies.push(micros(took));
            }
            if which == 0 {
                chat.positions.push(position);
            }
        }
    }
    let mut out = series.into_iter().map(|s| stats(s.latencies));
    Ok([
        out.next().context("series")?,
        out.next().context("series")?,
        out.next().context("series")?,
    ])
}

/// `reads` sequential reads of a page of `limit`: the newest page (`cursor` none), or pages
/// that start at a random message with at least `limit` older ones. Each page is checked
/// against the positions the posts were answered with.
async fn measure_pages(
    chat: &Chat,
    sorted: &[i64],
    reads: usize,
    limit: usize,
    deep: bool,
    seed: u64,
) -> anyhow::Result<Option<Stats>> {
    if deep && sorted.len() <= limit {
        return Ok(None);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let base = chat.messages_path();
    let key = &chat.users[2].1;
    let mut latencies = Vec::with_capacity(reads);
    for i in 0..WARM_UP + reads {
        // Index into `sorted` (ascending) of the first message the page must hold.
        let (path, newest) = if deep {
            let c = rng.gen_range(limit..sorted.len());
            (format!("{base}?limit={limit}&cursor={}", sorted[c]), c - 1)
        } else {
            (format!("{base}?limit={limit}"), sorted.len() - 1)
        };
        let started = Instant::now();
        let (status, text) = chat.api.send(Method::GET, &path, key, None).await?;
        let took = started.elapsed();
        let page = parse(Method::GET, &path, 200, status, &text)?;
        let got: Vec<i64> = page["items"]
            .as_array()
            .context("items")?
            .iter()
            .map(|m| m["position"].as_i64().unwrap_or(-1))
            .collect();
        let oldest = newest.saturating_sub(limit - 1);
        let want: Vec<i64> = sorted[oldest..=newest].iter().rev().copied().collect();
        ensure!(
            got == want,
            "GET {path}: positions {got:?}, expected {want:?}"
        );
        let next = page["next_cursor"].as_i64();
        let want_next = (oldest > 0).then(|| sorted[oldest]);
        ensure!(
            next == want_next,
            "GET {path}: next_cursor {next:?}, expected {want_next:?}"
        );
        if i >= WARM_UP {
            latencies.push(micros(took));
        }
    }
    Ok(Some(stats(latencies)))
}

/// The conversation as a participant sees it (with its unread count), sequentially.
async fn measure_view(chat: &Chat, reads: usize) -> anyhow::Result<(Stats, i64, i64)> {
    let path = format!(
        "/v1/organizations/{}/conversations/{}",
        chat.org, chat.conversation
    );
    let key = &chat.users[3].1;
    let mut latencies = Vec::with_capacity(reads);
    let mut last = Value::Null;
    for i in 0..WARM_UP + reads {
        let started = Instant::now();
        let (status, text) = chat.api.send(Method::GET, &path, key, None).await?;
        let took = started.elapsed();
        last = parse(Method::GET, &path, 200, status, &text)?;
        if i >= WARM_UP {
            latencies.push(micros(took));
        }
    }
    let count = last["message_count"].as_i64().context("message_count")?;
    let unread = last["me"]["unread_count"]
        .as_i64()
        .context("unread_count")?;
    Ok((stats(latencies), count, unread))
}

/// The columns and subqueries of the page query (src/api/messages.rs `SELECT`), for plans.
const PAGE_SELECT: &str = "SELECT m.id, m.conversation_id, m.author_id, m.parent_message_id, \
     m.thread_root_id, m.content_sealed, m.position, m.created_at, m.edited_at, m.deleted_at, \
     COALESCE((SELECT json_agg(json_build_object('file_name', a.file_name_sealed, \
        'mime_type', a.mime_type, 'size_bytes', a.size_bytes, 'blake3', a.blake3) ORDER BY a.ordinal) \
        FROM message_attachments a WHERE a.message_id = m.id), '[]') AS attachments, \
     COALESCE((SELECT json_agg(json_build_object('emoji', r.emoji, 'user_id', r.user_id) \
        ORDER BY r.created_at, r.user_id) \
        FROM message_reactions r WHERE r.message_id = m.id), '[]') AS reactions \
     FROM messages m";

/// `EXPLAIN (ANALYZE, BUFFERS)` of `sql` run as a prepared statement with parameters of
/// `types` and the literal `args`, the way sqlx runs the app's statements, under a plan cache
/// mode: `force_custom_plan` (what the first five executions on a connection get) or
/// `force_generic_plan` (what PostgreSQL may keep using after them).
async fn explain(
    pool: &PgPool,
    types: &str,
    sql: &str,
    args: &str,
    mode: &str,
) -> anyhow::Result<String> {
    let mut conn = pool.acquire().await?;
    sqlx::query(&format!("PREPARE bench_stmt({types}) AS {sql}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("SET plan_cache_mode = {mode}"))
        .execute(&mut *conn)
        .await?;
    let plan: Result<Vec<(String,)>, _> = sqlx::query_as(&format!(
        "EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_stmt({args})"
    ))
    .fetch_all(&mut *conn)
    .await;
    sqlx::query("DEALLOCATE bench_stmt")
        .execute(&mut *conn)
        .await?;
    sqlx::query("RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    Ok(plan?
        .into_iter()
        .map(|(l,)| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Plans of the page query's two shapes (newest page; page before a cursor) at the oldest
/// full page, the cursor a plan that walks down from the newest message pays most for.
async fn explain_pages(pool: &PgPool, conversation: Uuid, sorted: &[i64]) -> anyhow::Result<()> {
    let limit = PAGE + 1;
    let newest =
        format!("{PAGE_SELECT} WHERE m.conversation_id = $1 ORDER BY m.position DESC LIMIT $2");
    let before = format!(
        "{PAGE_SELECT} WHERE m.conversation_id = $1 AND m.position < $2 \
         ORDER BY m.position DESC LIMIT $3"
    );
    println!(
        "  plan of the newest page (generic plan):\n{}",
        explain(
            pool,
            "uuid, bigint",
            &newest,
            &format!("'{conversation}', {limit}"),
            "force_generic_plan"
        )
        .await?
    );
    if let Some(cursor) = sorted.get(PAGE) {
        println!(
            "  plan of the page before cursor {cursor}, the oldest full page (generic plan):\n{}",
            explain(
                pool,
                "uuid, bigint, bigint",
                &before,
                &format!("'{conversation}', {cursor}, {limit}"),
                "force_generic_plan"
            )
            .await?
        );
    }
    Ok(())
}

/// Diagnosis: plans of what a post reads twice (its conversation's row, which the messaging
/// projection updates on every post) and of a participant's unread count.
async fn explain_diag(
    pool: &PgPool,
    org: Uuid,
    conversation: Uuid,
    user: Uuid,
) -> anyhow::Result<()> {
    println!(
        "  plan of the conversation row lookup (generic plan):\n{}",
        explain(
            pool,
            "uuid, uuid",
            "SELECT c.id, c.organization_id, c.kind, c.title, c.description, c.created_by, \
             c.status, c.archived_at, c.last_message_at, c.message_count, c.created_at, \
             c.updated_at, c.version FROM conversations c WHERE c.id = $1 AND c.organization_id = $2",
            &format!("'{conversation}', '{org}'"),
            "force_generic_plan"
        )
        .await?
    );
    println!(
        "  plan of an unread count (custom plan):\n{}",
        explain(
            pool,
            "uuid, uuid",
            "SELECT p.role, (SELECT count(*) FROM messages m WHERE m.conversation_id = p.conversation_id \
             AND m.position > p.last_read_position AND m.deleted_at IS NULL \
             AND m.author_id <> p.user_id) AS unread_count \
             FROM conversation_participants p WHERE p.conversation_id = $1 AND p.user_id = $2",
            &format!("'{conversation}', '{user}'"),
            "force_custom_plan"
        )
        .await?
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Contrast: a Conversation aggregate that held its messages would be loaded, in cqrs-es's
// plain event-sourced mode, from all of its events before every command. The bench copies
// the conversation's first n MessagePosted events into one stream of n events in a
// separate ledger database (the app's projector never sees them), and times cqrs-es's
// `load_aggregate` of that stream through `LedgerStore`: load, deserialize, apply. The
// aggregate only counts what it applies, so this is a lower bound on what such an
// aggregate would pay.

#[derive(Debug, Default, Serialize, Deserialize)]
struct HeldHistory {
    messages: u64,
}

struct NoCommand;

impl Aggregate for HeldHistory {
    const TYPE: &'static str = "BenchHeldHistory";
    type Command = NoCommand;
    type Event = MessageEvent;
    type Error = std::convert::Infallible;
    type Services = ();

    async fn handle(
        &mut self,
        _command: NoCommand,
        _services: &(),
        _sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    fn apply(&mut self, _event: MessageEvent) {
        self.messages += 1;
    }
}

struct Replay {
    events: usize,
    loads: usize,
    p50_ms: f64,
    mean_ms: f64,
}

async fn contrast(
    app_pool: &PgPool,
    conversation: Uuid,
    sizes: &[usize],
) -> anyhow::Result<Vec<Replay>> {
    const CHUNK: i64 = 1000;
    let db = BenchDb::create().await?;
    let pool = db.pool(4).await?;
    ledgerline::db::migrate(&pool).await?;
    let store = LedgerStore::start(pool.clone());
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let streams: Vec<(usize, String)> = sizes
        .iter()
        .map(|&n| (n, Uuid::new_v4().to_string()))
        .collect();
    let started = Instant::now();
    let (mut copied, mut after) = (0usize, 0i64);
    while copied < largest {
        let rows: Vec<(i64, String, String, Value, Value)> = sqlx::query_as(
            "SELECT m.position, e.event_type, e.event_version, e.payload, e.metadata \
             FROM messages m JOIN events e ON e.position = m.position \
             WHERE m.conversation_id = $1 AND m.position > $2 AND e.event_type = 'MessagePosted' \
             ORDER BY m.position LIMIT $3",
        )
        .bind(conversation)
        .bind(after)
        .bind(CHUNK.min((largest - copied) as i64))
        .fetch_all(app_pool)
        .await?;
        if rows.is_empty() {
            bail!("the conversation has {copied} MessagePosted events, fewer than {largest}");
        }
        after = rows.last().map(|r| r.0).unwrap_or(after);
        for (n, id) in &streams {
            let take = n.saturating_sub(copied).min(rows.len());
            if take == 0 {
                continue;
            }
            let events: Vec<SerializedEvent> = rows[..take]
                .iter()
                .enumerate()
                .map(|(i, (_, event_type, version, payload, metadata))| {
                    let mut metadata = metadata.clone();
                    // The guards name the real conversation, key, user, organization and
                    // roles, which this ledger lacks, and the key's end, long past when the
                    // bench runs.
                    if let Some(m) = metadata.as_object_mut() {
                        for guard in [
                            md::GUARD_AGGREGATE,
                            md::GUARD_SEQUENCE,
                            md::ACTOR_KEY_SEQUENCE,
                            md::ACTOR_USER_SEQUENCE,
                            md::ACTOR_ORGANIZATION_SEQUENCE,
                            md::ACTOR_ROLE_SEQUENCES,
                            md::ACTOR_VALID_UNTIL,
                        ] {
                            m.remove(guard);
                        }
                    }
                    SerializedEvent::new(
                        id.clone(),
                        copied + i + 1,
                        HeldHistory::TYPE.to_string(),
                        event_type.clone(),
                        version.clone(),
                        payload.clone(),
                        metadata,
                    )
                })
                .collect();
            store.persist::<HeldHistory>(&events, None).await?;
        }
        copied += rows.len();
    }
    println!(
        "  copied {copied} MessagePosted events into {} streams in {:.1} s",
        streams.len(),
        started.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;
    let es = PersistedEventStore::<LedgerStore, HeldHistory>::new_event_store(store.clone());
    let mut out = Vec::new();
    for (n, id) in &streams {
        let loads = (1_000_000 / n.max(&1)).clamp(3, 100);
        es.load_aggregate(id).await?; // warm-up
        let mut times = Vec::with_capacity(loads);
        for _ in 0..loads {
            let t = Instant::now();
            let context = es.load_aggregate(id).await?;
            times.push(micros(t.elapsed()));
            ensure!(
                context.aggregate.messages == *n as u64,
                "loaded {} events of a stream of {n}",
                context.aggregate.messages
            );
        }
        let s = stats(times);
        println!(
            "  load_aggregate of {n} events: p50 {:.2} ms, mean {:.2} ms ({loads} loads)",
            s.p50, s.mean
        );
        out.push(Replay {
            events: *n,
            loads,
            p50_ms: s.p50,
            mean_ms: s.mean,
        });
    }
    pool.close().await;
    drop(db);
    Ok(out)
}

// ---------------------------------------------------------------------------------------

struct Level {
    history: usize,
    seeded: usize,
    seed_time: Duration,
    seed_busy: String,
    newest: Stats,
    deep: Option<Stats>,
    view: Stats,
    read_busy: String,
    single: Stats,
    unread: i64,
    posts: Stats,
    control: Stats,
    fresh_control: Stats,
    post_busy: String,
}

async fn run(db: &BenchDb) -> anyhow::Result<()> {
    let sizes = env_list("LEDGERLINE_BENCH_HISTORY", &[10, 10_000, 100_000])?;
    ensure!(
        !sizes.is_empty() && sizes.windows(2).all(|w| w[0] < w[1]),
        "LEDGERLINE_BENCH_HISTORY must be ascending"
    );
    let samples = env_num("LEDGERLINE_BENCH_SAMPLES", 300)?.max(1);
    let reads = env_num("LEDGERLINE_BENCH_READS", 1000)?.max(1);
    let seeders = env_num("LEDGERLINE_BENCH_SEEDERS", 32)?.max(1);
    let replay = std::env::var("LEDGERLINE_BENCH_CONTRAST").map_or(true, |v| v != "0");
    let vacuum = std::env::var("LEDGERLINE_BENCH_SKIP_VACUUM").map_or(true, |v| v != "1");

    let mut pool = db.pool(APP_POOL).await?;
    ledgerline::db::migrate(&pool).await?;
    let slow_ms = env_num("LEDGERLINE_BENCH_DIAG_SLOW_MS", 0)?;
    if slow_ms > 0 {
        // Settings of this database only, taken by connections opened after them.
        for setting in [
            "session_preload_libraries = 'auto_explain'".to_string(),
            format!("auto_explain.log_min_duration = '{slow_ms}ms'"),
        ] {
            sqlx::query(&format!("ALTER DATABASE {} SET {setting}", db.name))
                .execute(&pool)
                .await?;
        }
        pool.close().await;
        pool = db.pool(APP_POOL).await?;
        println!(
            "diagnosis: plans of statements over {slow_ms} ms go to the server log, tagged @{}",
            db.name
        );
    }
    let (version,): (String,) = sqlx::query_as("SELECT version()").fetch_one(&pool).await?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "ledgerline messaging benchmark, {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!(
        "machine: {cpus} CPUs, shared by the bench, the app and PostgreSQL; load average before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("postgres: {version}");
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'fsync', \
         'synchronous_commit', 'shared_buffers') ORDER BY name",
    )
    .fetch_all(&pool)
    .await?;
    println!(
        "settings: {}; VACUUM (ANALYZE) after each seeding step: {}",
        settings
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        if vacuum { "yes" } else { "no" }
    );
    println!("database: {} (fresh, dropped at the end)", db.name);
    println!(
        "history sizes {sizes:?}, {samples} sequential posts and {reads} page reads per size and kind, {seeders} seeders, app pool {APP_POOL}\n"
    );

    let (server, mut chat) = start_app(pool.clone()).await?;
    // A second app on a ledger of its own that stays nearly empty: its conversations are the
    // "history 10 on a fresh ledger" posts are paired with.
    let fresh_db = BenchDb::create().await?;
    let fresh_pool = fresh_db.pool(APP_POOL).await?;
    ledgerline::db::migrate(&fresh_pool).await?;
    let (fresh_server, fresh) = start_app(fresh_pool.clone()).await?;

    let mut levels = Vec::new();
    for (i, &history) in sizes.iter().enumerate() {
        let busy = machine_ticks();
        let (seeded, seed_time) = seed(&mut chat, history, seeders).await?;
        let seed_busy = busy_since(busy);
        let total = chat.positions.len();
        println!(
            "history {total}: seeded {seeded} messages in {:.1} s ({:.0} posts/s, {seeders} posters, machine {seed_busy} busy)",
            seed_time.as_secs_f64(),
            seeded as f64 / seed_time.as_secs_f64().max(1e-9),
        );
        if vacuum {
            // What autovacuum would have done after this many changes: statistics (which
            // also make PostgreSQL re-plan the prepared statements cached on the young
            // tables) and the dead row versions of the conversation's row.
            let started = Instant::now();
            sqlx::query("VACUUM (ANALYZE)").execute(&pool).await?;
            println!(
                "  VACUUM (ANALYZE) of the database: {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let mut sorted = chat.positions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        ensure!(
            sorted.len() == total,
            "{total} posts answered but {} distinct positions",
            sorted.len()
        );
        let busy = machine_ticks();
        let newest = measure_pages(&chat, &sorted, reads, PAGE, false, i as u64)
            .await?
            .context("newest page")?;
        println!("  read newest page of {PAGE}:      {newest}");
        let deep = measure_pages(&chat, &sorted, reads, PAGE, true, 100 + i as u64).await?;
        match &deep {
            Some(s) => println!("  read page at a random cursor: {s}"),
            None => println!("  read page at a random cursor: skipped (history <= {PAGE})"),
        }
        let read_busy = busy_since(busy);
        println!("  machine {read_busy} busy during the page reads");
        // The same request with one message: what a page costs besides its messages.
        let single = measure_pages(&chat, &sorted, reads, 1, false, 200 + i as u64)
            .await?
            .context("newest message")?;
        println!("  read newest page of 1:       {single}");
        let (view, count, unread) = measure_view(&chat, (reads / 10).max(10)).await?;
        ensure!(
            count == total as i64,
            "the conversation counts {count} messages, {total} were posted"
        );
        println!("  read the conversation (unread {unread}): {view}");
        if i + 1 == sizes.len() {
            explain_pages(&pool, chat.conversation, &sorted).await?;
        }
        let busy = machine_ticks();
        let [posts, control, fresh_control] =
            measure_posts(&mut chat, &fresh, samples, 1000 + i as u64).await?;
        let post_busy = busy_since(busy);
        println!(
            "  post (history {total} -> {}): {posts}, machine {post_busy} busy",
            chat.positions.len()
        );
        println!(
            "  post to a control on the same ledger (history {CONTROL_HISTORY} -> {}): {control}",
            CONTROL_HISTORY + WARM_UP + samples
        );
        println!(
            "  post to a control on a fresh ledger (history {CONTROL_HISTORY} -> {}): {fresh_control}",
            CONTROL_HISTORY + WARM_UP + samples
        );
        if slow_ms > 0 {
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT format('%s: live %s, dead %s, updates %s (HOT %s), vacuums %s, \
                 %s heap pages, %s index pages', relname, n_live_tup, n_dead_tup, n_tup_upd, \
                 n_tup_hot_upd, vacuum_count + autovacuum_count, pg_relation_size(relid) / 8192, \
                 pg_indexes_size(relid) / 8192) \
                 FROM pg_stat_user_tables \
                 WHERE relname IN ('conversations', 'messages', 'message_keys', 'events', \
                 'projection_checkpoints', 'audit_events') ORDER BY relname",
            )
            .fetch_all(&pool)
            .await?;
            for (line,) in tables {
                println!("    {line}");
            }
            explain_diag(&pool, chat.org, chat.conversation, chat.users[3].0).await?;
        }
        levels.push(Level {
            history: total,
            seeded,
            seed_time,
            seed_busy,
            newest,
            deep,
            view,
            read_busy,
            single,
            unread,
            posts,
            control,
            fresh_control,
            post_busy,
        });
    }

    let replays = if replay {
        println!("\ncontrast: loading an aggregate that holds n message events (cqrs-es plain mode, LedgerStore)");
        contrast(&pool, chat.conversation, &sizes).await?
    } else {
        Vec::new()
    };

    server.abort();
    fresh_server.abort();
    pool.close().await;
    fresh_pool.close().await;
    drop(fresh_db);

    println!("\n================================ summary ================================");
    println!("posting ({samples} sequential posts by one client after {WARM_UP} unmeasured; history grows by {} during each series; each post in a round with one to a {CONTROL_HISTORY}-message control conversation on the same ledger and one on a fresh ledger)", WARM_UP + samples);
    println!("| history | p50 ms | p90 ms | p99 ms | mean ms | max ms | machine busy | control p50 ms (same ledger) | control p50 ms (fresh ledger) | p50 / same-ledger control | p50 / fresh-ledger control |");
    println!("|--------:|-------:|-------:|-------:|--------:|-------:|-------------:|-----------------------------:|------------------------------:|--------------------------:|---------------------------:|");
    for l in &levels {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
            l.history,
            l.posts.p50,
            l.posts.p90,
            l.posts.p99,
            l.posts.mean,
            l.posts.max,
            l.post_busy,
            l.control.p50,
            l.fresh_control.p50,
            l.posts.p50 / l.control.p50,
            l.posts.p50 / l.fresh_control.p50
        );
    }
    println!("\nreading a page of {PAGE} ({reads} sequential reads per kind)");
    println!("| history | newest p50 ms | newest p99 ms | random cursor p50 ms | random cursor p99 ms | machine busy | page of 1 p50 ms | p99 ms | conversation view p50 ms | p99 ms | its unread count |");
    println!("|--------:|--------------:|--------------:|---------------------:|---------------------:|-------------:|-----------------:|-------:|-------------------------:|-------:|-----------------:|");
    for l in &levels {
        let (dp50, dp99) = l
            .deep
            .map(|d| (format!("{:.2}", d.p50), format!("{:.2}", d.p99)))
            .unwrap_or(("-".into(), "-".into()));
        println!(
            "| {} | {:.2} | {:.2} | {dp50} | {dp99} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            l.history,
            l.newest.p50,
            l.newest.p99,
            l.read_busy,
            l.single.p50,
            l.single.p99,
            l.view.p50,
            l.view.p99,
            l.unread
        );
    }
    println!("\nseeding ({seeders} concurrent posters)");
    println!("| to history | messages | seconds | posts/s | machine busy |");
    println!("|-----------:|---------:|--------:|--------:|-------------:|");
    for l in &levels {
        println!(
            "| {} | {} | {:.1} | {:.0} | {} |",
            l.history,
            l.seeded,
            l.seed_time.as_secs_f64(),
            l.seeded as f64 / l.seed_time.as_secs_f64().max(1e-9),
            l.seed_busy
        );
    }
    if !replays.is_empty() {
        println!("\ncontrast: cqrs-es load_aggregate of one stream of n MessagePosted events (lower bound)");
        println!("| events | loads | p50 ms | mean ms | µs per event |");
        println!("|-------:|------:|-------:|--------:|-------------:|");
        for r in &replays {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.1} |",
                r.events,
                r.loads,
                r.p50_ms,
                r.mean_ms,
                1000.0 * r.p50_ms / r.events.max(1) as f64
            );
        }
    }

    println!("\ngoals:");
    if let (Some(first), Some(last)) = (levels.first(), levels.last()) {
        let ratio = last.posts.p50 / first.posts.p50;
        println!(
            "  post p50 at history {} within {GOAL_POST_RATIO}x of p50 at {}: {:.2} / {:.2} ms = {ratio:.2}x  {}",
            last.history,
            first.history,
            last.posts.p50,
            first.posts.p50,
            met(ratio <= GOAL_POST_RATIO)
        );
        for (what, control) in [
            ("on the same ledger", last.control),
            ("on a fresh ledger", last.fresh_control),
        ] {
            let paired = last.posts.p50 / control.p50;
            println!(
                "    at the same moment, against a {CONTROL_HISTORY}-message conversation {what}: {:.2} / {:.2} ms = {paired:.2}x  {}",
                last.posts.p50,
                control.p50,
                met(paired <= GOAL_POST_RATIO)
            );
        }
        let worst = last
            .deep
            .map_or(last.newest.p99, |d| d.p99.max(last.newest.p99));
        println!(
            "  p99 of a page of {PAGE} at history {} under {GOAL_READ_P99_MS} ms: newest {:.2} ms, random cursor {}  {}",
            last.history,
            last.newest.p99,
            last.deep
                .map_or("-".to_string(), |d| format!("{:.2} ms", d.p99)),
            met(worst < GOAL_READ_P99_MS)
        );
    }
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = rt.block_on(async {
        let db = BenchDb::create().await?;
        let outcome = run(&db).await;
        drop(db);
        outcome
    });
    drop(rt);
    if let Err(e) = outcome {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
