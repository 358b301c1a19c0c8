//! Ledger benchmark: append throughput and latency of the chained store against plain
//! postgres-es, and `verify` throughput over a million-event chain. A plain binary
//! (`harness = false`): `cargo bench --bench ledger`. See docs/benchmarks.md.
//!
//! Environment:
//! - `LEDGERLINE_BENCH_ADMIN_URL`: a PostgreSQL database the bench may create and drop
//!   databases from (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - `LEDGERLINE_BENCH_SECONDS`: measured seconds per writer level and store (default 5).
//! - `LEDGERLINE_BENCH_WRITERS`: comma-separated writer levels (default `1,8,32,64`).
//! - `LEDGERLINE_BENCH_VERIFY_EVENTS`: events generated for the verify phase (default 1000000).
//! - `LEDGERLINE_BENCH_VERIFY_WORKERS`: comma-separated verify worker counts (default `1,2,4`).
//!
//! Diagnosis only (the default run uses none of these):
//! - `LEDGERLINE_BENCH_POOL`: pool size per store (default 16; two pools must fit in
//!   PostgreSQL's `max_connections`).
//! - `LEDGERLINE_BENCH_NO_TREE=1`: skip measuring the Merkle tree's cost (each level run
//!   again with the log maintainer on).
//! - `LEDGERLINE_BENCH_DIAG=1`: also append through each repository's `persist` directly
//!   (no cqrs-es load), and print the plan of the store's per-batch conflict check.
//! - `LEDGERLINE_BENCH_SKIP_ANALYZE=1`: do not ANALYZE the fresh tables after the warm-up.
//!
//! A failed command or a verify report that is not intact makes the run exit non-zero.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, CqrsFramework, DomainEvent};
use ledgerline::ledger::checkpoint::LogSigner;
use ledgerline::ledger::hash::{event_hash, truncate_to_micros, EventFields, HashVersion};
use ledgerline::ledger::store::read_head;
use ledgerline::ledger::tree::{self, CheckpointPolicy};
use ledgerline::ledger::verify::verify_database;
use ledgerline::ledger::LedgerStore;
use ledgerline_aggregates::metadata as md;
use postgres_es::PostgresEventRepository;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

mod support;
use support::{env_list, env_num, met, BenchDb};

/// The same pool size for both stores (the size the DESIGN-NOTES figures were taken with);
/// `LEDGERLINE_BENCH_POOL` overrides it for diagnosis only.
fn pool_size() -> u32 {
    env_num("LEDGERLINE_BENCH_POOL", 16).unwrap_or(16).max(1) as u32
}
/// Tenants the append-phase commands are spread over.
const TENANTS: usize = 100;
/// Unmeasured run per store before the first level: connections, caches, plans.
const WARM_UP: Duration = Duration::from_secs(1);

const GOAL_RATIO: f64 = 2.0;
const GOAL_RATIO_AT: [usize; 2] = [32, 64];
const GOAL_APPEND_EVENTS_PER_S: f64 = 10_000.0;
const GOAL_VERIFY_EVENTS_PER_S: f64 = 300_000.0;

// ---------------------------------------------------------------------------------------
// The bench aggregate: one command, one event, no unique claims (the chained store derives
// claims only for the app's four aggregate types), a ~300-byte payload.

#[derive(Debug, Default, Serialize, Deserialize)]
struct Asset {
    registered: bool,
}

#[derive(Debug, Clone)]
enum AssetCommand {
    Register {
        asset_id: Uuid,
        organization_id: Uuid,
        name: String,
        serial: String,
        description: String,
        tags: Vec<String>,
        registered_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum AssetEvent {
    AssetRegistered {
        asset_id: Uuid,
        organization_id: Uuid,
        name: String,
        serial: String,
        description: String,
        tags: Vec<String>,
        registered_at: DateTime<Utc>,
    },
}

impl DomainEvent for AssetEvent {
    fn event_type(&self) -> String {
        "AssetRegistered".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
enum AssetError {
    #[error("the asset is already registered")]
    AlreadyRegistered,
}

impl Aggregate for Asset {
    const TYPE: &'static str = "Asset";
    type Command = AssetCommand;
    type Event = AssetEvent;
    type Error = AssetError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AssetCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AssetError> {
        if self.registered {
            return Err(AssetError::AlreadyRegistered);
        }
        let AssetCommand::Register {
            asset_id,
            organization_id,
            name,
            serial,
            description,
            tags,
            registered_at,
        } = command;
        let event = AssetEvent::AssetRegistered {
            asset_id,
            organization_id,
            name,
            serial,
            description,
            tags,
            registered_at,
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: AssetEvent) {
        match event {
            AssetEvent::AssetRegistered { .. } => self.registered = true,
        }
    }
}

type ChainedCqrs = CqrsFramework<Asset, PersistedEventStore<LedgerStore, Asset>>;
type PlainCqrs = CqrsFramework<Asset, PersistedEventStore<PostgresEventRepository, Asset>>;

#[derive(Clone)]
enum Target {
    /// The app's path: cqrs-es loads the aggregate, handles, persists through the store.
    Chained(Arc<ChainedCqrs>),
    Plain(Arc<PlainCqrs>),
    /// Diagnosis only (`LEDGERLINE_BENCH_DIAG`): the repository's `persist` called directly,
    /// without cqrs-es's load, to separate the append from the load.
    ChainedPersist(LedgerStore),
    PlainPersist(Arc<PostgresEventRepository>),
}

const WORDS: [&str; 16] = [
    "laptop", "rack", "switch", "north", "spare", "leased", "primary", "backup", "floor", "london",
    "berlin", "audit", "finance", "ops", "edge", "cold",
];

fn words(rng: &mut StdRng, n: usize) -> Vec<&'static str> {
    (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect()
}

fn asset_command(rng: &mut StdRng, asset_id: Uuid, organization_id: Uuid) -> AssetCommand {
    AssetCommand::Register {
        asset_id,
        organization_id,
        name: format!(
            "{}-{:05}",
            words(rng, 2).join("-"),
            rng.gen_range(0..100_000)
        ),
        serial: format!("SN-{:016X}", rng.gen::<u64>()),
        description: format!(
            "{} asset registered for the {} team, kept at site {}",
            words(rng, 6).join(" "),
            words(rng, 1)[0],
            rng.gen_range(1..400)
        ),
        tags: words(rng, 3).into_iter().map(String::from).collect(),
        registered_at: Utc::now(),
    }
}

/// Metadata as `app::Actor::metadata` writes it for a request made with an API key, less
/// the guards and the key's prefix and end.
fn request_metadata(rng: &mut StdRng, organization_id: Option<Uuid>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert(md::ACTOR_KIND.into(), "api_key".into());
    m.insert(md::REQUEST_ID.into(), Uuid::new_v4().to_string());
    if let Some(org) = organization_id {
        m.insert(md::ORGANIZATION_ID.into(), org.to_string());
    }
    m.insert(md::ACTOR_USER_ID.into(), Uuid::new_v4().to_string());
    m.insert(md::ACTOR_KEY_ID.into(), Uuid::new_v4().to_string());
    m.insert(
        md::CLIENT_IP.into(),
        format!(
            "10.{}.{}.{}",
            rng.gen_range(0..256),
            rng.gen_range(0..256),
            rng.gen_range(1..255)
        ),
    );
    m.insert(
        md::USER_AGENT.into(),
        "ledgerline-client/0.4.1 (rust; reqwest 0.12)".into(),
    );
    m
}

// ---------------------------------------------------------------------------------------
// CPU accounting from /proc (Linux): the whole machine and this process, in the same ticks.

#[derive(Clone, Copy)]
struct Cpu {
    machine_busy: u64,
    machine_total: u64,
    this_process: u64,
}

fn cpu_now() -> Option<Cpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are already in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = own.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after the command: state(0) ... utime(11) stime(12)
    let this_process = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Cpu {
        machine_busy: total - idle,
        machine_total: total,
        this_process,
    })
}

/// (machine busy %, this process %), both as a share of the whole machine.
fn cpu_between(a: Option<Cpu>, b: Option<Cpu>) -> Option<(f64, f64)> {
    let (a, b) = (a?, b?);
    let total = (b.machine_total - a.machine_total).max(1) as f64;
    Some((
        100.0 * (b.machine_busy - a.machine_busy) as f64 / total,
        100.0 * (b.this_process - a.this_process) as f64 / total,
    ))
}

fn fmt_cpu(c: Option<(f64, f64)>) -> String {
    match c {
        Some((m, p)) => format!("{m:.0}% / {p:.0}%"),
        None => "n/a".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Append phase.

struct Run {
    commands: u64,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    cpu: Option<(f64, f64)>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
}

async fn writer(
    target: Target,
    tenants: Arc<Vec<Uuid>>,
    deadline: Instant,
    seed: u64,
) -> Result<Vec<u32>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut latencies = Vec::with_capacity(8192);
    while Instant::now() < deadline {
        let org = tenants[rng.gen_range(0..tenants.len())];
        let id = Uuid::new_v4();
        let command = asset_command(&mut rng, id, org);
        let metadata = request_metadata(&mut rng, Some(org));
        let started = Instant::now();
        let outcome = match &target {
            Target::Chained(cqrs) => {
                cqrs.execute_with_metadata(&id.to_string(), command, metadata)
                    .await
            }
            Target::Plain(cqrs) => {
                cqrs.execute_with_metadata(&id.to_string(), command, metadata)
                    .await
            }
            Target::ChainedPersist(repo) => repo
                .persist::<Asset>(&[serialized(id, command, metadata)], None)
                .await
                .map_err(cqrs_es::AggregateError::from),
            Target::PlainPersist(repo) => repo
                .persist::<Asset>(&[serialized(id, command, metadata)], None)
                .await
                .map_err(cqrs_es::AggregateError::from),
        };
        outcome.map_err(|e| format!("command on new aggregate {id} failed: {e}"))?;
        latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    Ok(latencies)
}

/// The event `Asset::handle` makes, serialized as cqrs-es serializes it.
fn serialized(
    id: Uuid,
    command: AssetCommand,
    metadata: HashMap<String, String>,
) -> SerializedEvent {
    let AssetCommand::Register {
        asset_id,
        organization_id,
        name,
        serial,
        description,
        tags,
        registered_at,
    } = command;
    let event = AssetEvent::AssetRegistered {
        asset_id,
        organization_id,
        name,
        serial,
        description,
        tags,
        registered_at,
    };
    SerializedEvent::new(
        id.to_string(),
        1,
        Asset::TYPE.to_string(),
        event.event_type(),
        event.event_version(),
        serde_json::to_value(&event).expect("event serializes"),
        serde_json::to_value(&metadata).expect("metadata serializes"),
    )
}

/// `writers` concurrent writers, each issuing one-event commands on new aggregates until
/// `duration` has passed; the elapsed time runs until the last command in flight finished.
async fn run_level(
    target: &Target,
    tenants: &Arc<Vec<Uuid>>,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    let cpu_before = cpu_now();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            tokio::spawn(writer(
                target.clone(),
                tenants.clone(),
                deadline,
                rand::random::<u64>() ^ w as u64,
            ))
        })
        .collect();
    let mut all = Vec::new();
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(l)) => all.extend(l),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(format!("writer task failed: {e}"))),
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_between(cpu_before, cpu_now());
    if let Some(e) = first_error {
        bail!("{e}");
    }
    all.sort_unstable();
    Ok(Run {
        commands: all.len() as u64,
        elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        cpu,
    })
}

struct Level {
    writers: usize,
    chained: Run,
    plain: Run,
    /// Transactions the chained store's writer committed (distinct `recorded_at` values).
    chained_commits: u64,
}

impl Level {
    fn ratio(&self) -> f64 {
        self.chained.rate() / self.plain.rate()
    }
}

async fn max_position(pool: &PgPool) -> anyhow::Result<i64> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(max.unwrap_or(0))
}

/// Writes out dirty buffers before measuring, so that no checkpoint left over from earlier
/// work (another run's COPY, a dropped database) competes with the measured one; as pgbench
/// does. Needs superuser or pg_checkpoint; skipped with a note otherwise.
async fn checkpoint(pool: &PgPool) {
    match sqlx::query("CHECKPOINT").execute(pool).await {
        Ok(_) => println!("checkpoint done before measuring"),
        Err(e) => println!("checkpoint skipped ({e})"),
    }
}

/// Sequential scans so far of (events, rows they read, plain_events, rows they read).
/// The statistics collector lags by up to a second; this is for orientation only.
async fn seq_scans(pool: &PgPool) -> anyhow::Result<(i64, i64, i64, i64)> {
    tokio::time::sleep(Duration::from_millis(600)).await;
    Ok(sqlx::query_as(
        "SELECT coalesce(sum(seq_scan) FILTER (WHERE relname = 'events'), 0)::bigint,
                coalesce(sum(seq_tup_read) FILTER (WHERE relname = 'events'), 0)::bigint,
                coalesce(sum(seq_scan) FILTER (WHERE relname = 'plain_events'), 0)::bigint,
                coalesce(sum(seq_tup_read) FILTER (WHERE relname = 'plain_events'), 0)::bigint
         FROM pg_stat_user_tables",
    )
    .fetch_one(pool)
    .await?)
}

async fn commits_between(pool: &PgPool, after: i64, upto: i64) -> anyhow::Result<u64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(DISTINCT recorded_at) FROM events WHERE position > $1 AND position <= $2",
    )
    .bind(after)
    .bind(upto)
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

async fn create_plain_tables(pool: &PgPool) -> anyhow::Result<()> {
    // postgres-es 0.5.0's db/init.sql, under other names.
    sqlx::query(
        "CREATE TABLE plain_events
         (
             aggregate_type text                         NOT NULL,
             aggregate_id   text                         NOT NULL,
             sequence       bigint CHECK (sequence >= 0) NOT NULL,
             event_type     text                         NOT NULL,
             event_version  text                         NOT NULL,
             payload        json                         NOT NULL,
             metadata       json                         NOT NULL,
             PRIMARY KEY (aggregate_type, aggregate_id, sequence)
         )",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE plain_snapshots
         (
             aggregate_type   text                                 NOT NULL,
             aggregate_id     text                                 NOT NULL,
             last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
             current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
             payload          json                                 NOT NULL,
             PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
         )",
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn append_phase(
    db: &BenchDb,
    levels: &[usize],
    seconds: Duration,
) -> anyhow::Result<(Vec<Level>, Vec<TreeLevel>, PgPool)> {
    let chained_pool = db.pool(pool_size()).await?;
    let plain_pool = db.pool(pool_size()).await?;
    create_plain_tables(&plain_pool).await?;

    // (a) exactly the app's wiring (app.rs `framework`): the chained store behind cqrs-es.
    let store = LedgerStore::start(chained_pool.clone());
    let chained = Target::Chained(Arc::new(CqrsFramework::new(
        PersistedEventStore::new_event_store(store.clone()),
        vec![],
        (),
    )));
    // (b) `postgres_es::postgres_cqrs`, with its tables renamed.
    let repo = PostgresEventRepository::new(plain_pool.clone())
        .with_tables("plain_events", "plain_snapshots");
    let plain = Target::Plain(Arc::new(CqrsFramework::new(
        PersistedEventStore::new_event_store(repo),
        vec![],
        (),
    )));

    let tenants: Arc<Vec<Uuid>> = Arc::new((0..TENANTS).map(|_| Uuid::new_v4()).collect());

    // Payload and metadata sizes as stored.
    let (pl, mdl): (i64, i64) = {
        if let Target::Chained(cqrs) = &chained {
            let mut rng = StdRng::seed_from_u64(1);
            let (id, org) = (Uuid::new_v4(), tenants[0]);
            let (command, metadata) = (
                asset_command(&mut rng, id, org),
                request_metadata(&mut rng, Some(org)),
            );
            cqrs.execute_with_metadata(&id.to_string(), command, metadata)
                .await?;
        }
        sqlx::query_as("SELECT avg(octet_length(payload::text))::bigint, avg(octet_length(metadata::text))::bigint FROM events")
            .fetch_one(&chained_pool)
            .await?
    };
    println!("workload: one-event command `Asset::Register` on a new aggregate per command;");
    println!("          stored payload ~{pl} bytes, metadata ~{mdl} bytes (app-style, with organization_id);");
    println!(
        "          pool {} connections per store; {} s per level and store\n",
        pool_size(),
        seconds.as_secs_f64()
    );

    for (name, target) in [("plain", &plain), ("chained", &chained)] {
        let w = run_level(target, &tenants, 16, WARM_UP).await?;
        println!(
            "warm-up {name:<7}: {:>7.0} cmd/s (16 writers, not counted)",
            w.rate()
        );
    }
    // A ledger in service has planner statistics; a fresh database gets them from
    // autovacuum within about a minute. Until then, plans cached on a near-empty table can
    // scan it. Both stores' tables are analyzed, once, before anything is measured.
    if std::env::var_os("LEDGERLINE_BENCH_SKIP_ANALYZE").is_none() {
        sqlx::query("ANALYZE events, plain_events")
            .execute(&chained_pool)
            .await?;
        println!("analyzed events and plain_events after the warm-up");
    } else {
        println!("NOT analyzing after the warm-up (LEDGERLINE_BENCH_SKIP_ANALYZE)");
    }
    checkpoint(&chained_pool).await;
    let scans_before = seq_scans(&chained_pool).await?;
    println!();
    println!(
        "{:>7} | {:>9} {:>8} {:>8} {:>15} | {:>9} {:>8} {:>8} {:>15} | {:>6} | {:>9} {:>9}",
        "writers",
        "chained/s",
        "p50 ms",
        "p99 ms",
        "cpu mach/bench",
        "plain/s",
        "p50 ms",
        "p99 ms",
        "cpu mach/bench",
        "ratio",
        "commits/s",
        "cmd/commit"
    );

    let mut out = Vec::new();
    for &writers in levels {
        // Plain first, then chained, at every level: both see the same machine and a
        // database of about the same size.
        let plain_run = run_level(&plain, &tenants, writers, seconds).await?;
        let before = max_position(&chained_pool).await?;
        let chained_run = run_level(&chained, &tenants, writers, seconds).await?;
        let after = max_position(&chained_pool).await?;
        ensure!(
            (after - before) as u64 == chained_run.commands,
            "chained store: {} commands answered but {} events appended",
            chained_run.commands,
            after - before
        );
        let commits = commits_between(&chained_pool, before, after).await?;
        let level = Level {
            writers,
            chained: chained_run,
            plain: plain_run,
            chained_commits: commits,
        };
        println!(
            "{:>7} | {:>9.0} {:>8.2} {:>8.2} {:>15} | {:>9.0} {:>8.2} {:>8.2} {:>15} | {:>5.2}x | {:>9.0} {:>10.1}",
            writers,
            level.chained.rate(),
            level.chained.p50_ms,
            level.chained.p99_ms,
            fmt_cpu(level.chained.cpu),
            level.plain.rate(),
            level.plain.p50_ms,
            level.plain.p99_ms,
            fmt_cpu(level.plain.cpu),
            level.ratio(),
            commits as f64 / level.chained.elapsed.as_secs_f64(),
            level.chained.commands as f64 / commits.max(1) as f64,
        );
        out.push(level);
    }
    let scans_after = seq_scans(&chained_pool).await?;
    println!(
        "sequential scans during the levels: events {} ({} rows read), plain_events {} ({} rows read)",
        scans_after.0 - scans_before.0,
        scans_after.1 - scans_before.1,
        scans_after.2 - scans_before.2,
        scans_after.3 - scans_before.3
    );
    let tree_levels = if std::env::var_os("LEDGERLINE_BENCH_NO_TREE").is_some() {
        Vec::new()
    } else {
        tree_phase(&chained_pool, &store, &chained, &tenants, levels, seconds).await?
    };
    if std::env::var_os("LEDGERLINE_BENCH_DIAG").is_some() {
        diagnose(
            &store,
            &plain_pool,
            &chained_pool,
            &tenants,
            levels,
            seconds,
        )
        .await?;
    }
    drop(chained);
    drop(store);
    plain_pool.close().await;
    Ok((out, tree_levels, chained_pool))
}

/// One writer level with and without the log maintainer (Merkle tree + checkpoints).
struct TreeLevel {
    writers: usize,
    without: Run,
    with: Run,
    /// Events not yet integrated when the run with the tree ended.
    lag_at_end: i64,
}

impl TreeLevel {
    fn cost(&self) -> f64 {
        1.0 - self.with.rate() / self.without.rate()
    }
}

/// What keeping the Merkle tree up to date (and signing a checkpoint every 1,000 events)
/// costs the append path: each level run without the maintainer, then with it, after the
/// maintainer has integrated the backlog, so it pays only for the events of its run.
async fn tree_phase(
    pool: &PgPool,
    store: &LedgerStore,
    chained: &Target,
    tenants: &Arc<Vec<Uuid>>,
    levels: &[usize],
    seconds: Duration,
) -> anyhow::Result<Vec<TreeLevel>> {
    let signer = Arc::new(LogSigner::generate("ledgerline.bench/log")?);
    let policy = CheckpointPolicy {
        every_events: 1000,
        interval: Duration::from_secs(10),
    };
    println!("\nthe Merkle tree's cost: chained store without and with the log maintainer");
    println!(
        "{:>7} | {:>12} {:>8} {:>15} | {:>12} {:>8} {:>15} | {:>6} | {:>10}",
        "writers",
        "no tree/s",
        "p99 ms",
        "cpu mach/bench",
        "with tree/s",
        "p99 ms",
        "cpu mach/bench",
        "cost",
        "lag at end"
    );
    let mut out = Vec::new();
    for &writers in levels {
        let without = run_level(chained, tenants, writers, seconds).await?;
        tree::catch_up(pool, Some(&signer), policy, false).await?;
        let maintainer = tree::spawn_maintainer(
            pool.clone(),
            store.committed(),
            Some(signer.clone()),
            policy,
        );
        let with = run_level(chained, tenants, writers, seconds).await?;
        let lag_at_end = max_position(pool).await? - tree::integrated_size(pool).await? as i64;
        maintainer.abort();
        let level = TreeLevel {
            writers,
            without,
            with,
            lag_at_end,
        };
        println!(
            "{:>7} | {:>12.0} {:>8.2} {:>15} | {:>12.0} {:>8.2} {:>15} | {:>5.1}% | {:>10}",
            writers,
            level.without.rate(),
            level.without.p99_ms,
            fmt_cpu(level.without.cpu),
            level.with.rate(),
            level.with.p99_ms,
            fmt_cpu(level.with.cpu),
            level.cost() * 100.0,
            level.lag_at_end
        );
        out.push(level);
    }
    // Whatever the runs left, integrated, so the verify phase starts from a complete tree.
    tree::catch_up(pool, Some(&signer), policy, true).await?;
    let (size, root) = (
        tree::integrated_size(pool).await?,
        tree::root_at(pool, tree::integrated_size(pool).await?).await?,
    );
    println!(
        "tree integrated to {size} events, root {}",
        hex::encode(root)
    );
    Ok(out)
}

/// Diagnosis only: append without cqrs-es's load, and the plan of the store's per-batch
/// conflict check.
async fn diagnose(
    store: &LedgerStore,
    plain_pool: &PgPool,
    chained_pool: &PgPool,
    tenants: &Arc<Vec<Uuid>>,
    levels: &[usize],
    seconds: Duration,
) -> anyhow::Result<()> {
    let chained = Target::ChainedPersist(store.clone());
    let plain = Target::PlainPersist(Arc::new(
        PostgresEventRepository::new(plain_pool.clone())
            .with_tables("plain_events", "plain_snapshots"),
    ));
    println!("\ndiagnosis: `persist` called directly (no cqrs-es load before it)");
    println!(
        "{:>7} | {:>9} {:>8} {:>8} {:>15} | {:>9} {:>8} {:>8} {:>15} | {:>6} | {:>9} {:>9}",
        "writers",
        "chained/s",
        "p50 ms",
        "p99 ms",
        "cpu mach/bench",
        "plain/s",
        "p50 ms",
        "p99 ms",
        "cpu mach/bench",
        "ratio",
        "commits/s",
        "cmd/commit"
    );
    for &writers in levels {
        let p = run_level(&plain, tenants, writers, seconds).await?;
        let before = max_position(chained_pool).await?;
        let c = run_level(&chained, tenants, writers, seconds).await?;
        let after = max_position(chained_pool).await?;
        let commits = commits_between(chained_pool, before, after).await?;
        println!(
            "{:>7} | {:>9.0} {:>8.2} {:>8.2} {:>15} | {:>9.0} {:>8.2} {:>8.2} {:>15} | {:>5.2}x | {:>9.0} {:>10.1}",
            writers, c.rate(), c.p50_ms, c.p99_ms, fmt_cpu(c.cpu), p.rate(), p.p50_ms, p.p99_ms,
            fmt_cpu(p.cpu), c.rate() / p.rate(), commits as f64 / c.elapsed.as_secs_f64(),
            c.commands as f64 / commits.max(1) as f64,
        );
    }
    // The conflict check of store.rs `existing_first_events`, for a 32-command batch.
    let ids: Vec<String> = (0..32).map(|_| Uuid::new_v4().to_string()).collect();
    let types: Vec<&str> = vec![Asset::TYPE; 32];
    let seqs: Vec<i64> = vec![1; 32];
    let plan: Vec<(String,)> = sqlx::query_as(
        "EXPLAIN (ANALYZE, BUFFERS) SELECT t.idx FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS t(ty, id, seq, idx)
         JOIN events e ON e.aggregate_type = t.ty AND e.aggregate_id = t.id AND e.sequence = t.seq",
    )
    .bind(&types)
    .bind(&ids)
    .bind(&seqs)
    .fetch_all(chained_pool)
    .await?;
    println!("\ndiagnosis: plan of the per-batch conflict check (32 commands)");
    for (line,) in plan {
        println!("  {line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Verify phase: a valid chain written directly with COPY, continuing from the current head,
// hashed exactly as the store hashes (`event_hash` over the stored text).

struct Live {
    ty: &'static str,
    id: Uuid,
    org: Option<Uuid>,
    seq: i64,
}

struct ChainGen {
    rng: StdRng,
    tenants: Vec<Uuid>,
    live: Vec<Live>,
    position: i64,
    prev: [u8; 32],
    recorded_at: DateTime<Utc>,
    left_in_commit: u32,
    payload_bytes: u64,
    metadata_bytes: u64,
}

const PERMS: [&str; 11] = [
    "organizations:read",
    "organizations:write",
    "users:read",
    "users:write",
    "users:erase",
    "roles:read",
    "roles:write",
    "keys:read",
    "keys:write",
    "audit:read",
    "ledger:read",
];

impl ChainGen {
    fn new(head_position: i64, head_hash: [u8; 32], tenants: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(0x1ed9e7),
            tenants: (0..tenants).map(|_| Uuid::new_v4()).collect(),
            live: Vec::new(),
            position: head_position,
            prev: head_hash,
            recorded_at: truncate_to_micros(Utc::now()),
            left_in_commit: 0,
            payload_bytes: 0,
            metadata_bytes: 0,
        }
    }

    fn sealed(&mut self, len: usize) -> String {
        let bytes: Vec<u8> = (0..len).map(|_| self.rng.gen()).collect();
        format!(
            "sealed:v1:{}:{}",
            Uuid::new_v4(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    fn hex32(&mut self) -> String {
        hex::encode(self.rng.gen::<[u8; 32]>())
    }

    fn perms(&mut self) -> Vec<&'static str> {
        let n = self.rng.gen_range(1..=PERMS.len());
        let mut p: Vec<&'static str> = PERMS
            .iter()
            .copied()
            .filter(|_| self.rng.gen_bool(n as f64 / PERMS.len() as f64))
            .collect();
        if p.is_empty() {
            p.push(PERMS[0]);
        }
        p
    }

    fn profile(&mut self) -> Value {
        let n = self.rng.gen_range(0..1_000_000);
        let country = ["DE", "FR", "GB", "US", "NL"][self.rng.gen_range(0..5)];
        json!({
            "name": format!("Organization {n}"),
            "slug": format!("org-{n}"),
            "country_code": country,
            "domain": format!("org{n}.example.com"),
            "settings": {"locale": "en-GB", "timezone": "Europe/London", "retention_days": 365},
        })
    }

    fn spec(&mut self) -> Value {
        let perms = self.perms();
        json!({
            "name": format!("{} {}", words(&mut self.rng, 1)[0], self.rng.gen_range(0..1000)),
            "description": format!("{} role for the {} team", words(&mut self.rng, 3).join(" "), words(&mut self.rng, 1)[0]),
            "permissions": perms,
            "parent_role_id": if self.rng.gen_bool(0.5) { Some(Uuid::new_v4()) } else { None },
        })
    }

    /// The next event's aggregate, sequence, type and payload: new aggregates of the four
    /// app types and follow-up events on recently created ones, across the tenants.
    fn next_event(&mut self) -> (usize, &'static str, Value) {
        const LIVE: usize = 2000;
        let create = self.live.len() < LIVE || self.rng.gen_bool(0.35);
        let slot = if create {
            let ty = ["Organization", "User", "User", "Role", "ApiKey", "ApiKey"]
                [self.rng.gen_range(0..6)];
            let org = if ty == "Organization" {
                Some(Uuid::new_v4())
            } else if ty == "ApiKey" && self.rng.gen_bool(0.02) {
                None // a platform key
            } else {
                Some(self.tenants[self.rng.gen_range(0..self.tenants.len())])
            };
            let l = Live {
                ty,
                id: if ty == "Organization" {
                    org.unwrap_or_default()
                } else {
                    Uuid::new_v4()
                },
                org,
                seq: 0,
            };
            if self.live.len() < LIVE {
                self.live.push(l);
                self.live.len() - 1
            } else {
                let i = self.rng.gen_range(0..LIVE);
                self.live[i] = l;
                i
            }
        } else {
            self.rng.gen_range(0..self.live.len())
        };
        self.live[slot].seq += 1;
        let (ty, id, org, first) = (
            self.live[slot].ty,
            self.live[slot].id,
            self.live[slot].org,
            self.live[slot].seq == 1,
        );
        let org_s = org.map(|o| o.to_string());
        let (event_type, payload) = match (ty, first) {
            ("Organization", true) => (
                "OrganizationCreated",
                json!({"OrganizationCreated": {"organization_id": id, "profile": self.profile()}}),
            ),
            ("Organization", false) => {
                let (before, after) = (self.profile(), self.profile());
                (
                    "OrganizationUpdated",
                    json!({"OrganizationUpdated": {"before": before, "after": after}}),
                )
            }
            ("User", true) => {
                let (email, name, idx) = (self.sealed(48), self.sealed(24), self.hex32());
                (
                    "UserInvited",
                    json!({"UserInvited": {"user_id": id, "organization_id": org_s, "email": email, "full_name": name, "email_blind_index": idx}}),
                )
            }
            ("User", false) if self.rng.gen_bool(0.6) => {
                let reason = format!("{} access", words(&mut self.rng, 2).join(" "));
                (
                    "UserRoleAssigned",
                    json!({"UserRoleAssigned": {"role_id": Uuid::new_v4(), "expires_at": null, "reason": reason}}),
                )
            }
            ("User", false) => {
                let (email, idx, old, name) =
                    (self.sealed(48), self.hex32(), self.hex32(), self.sealed(24));
                (
                    "UserProfileUpdated",
                    json!({"UserProfileUpdated": {"email": email, "email_blind_index": idx, "previous_email_blind_index": old, "full_name": name}}),
                )
            }
            ("Role", true) => {
                let spec = self.spec();
                (
                    "RoleCreated",
                    json!({"RoleCreated": {"role_id": id, "organization_id": org_s, "spec": spec, "built_in": false}}),
                )
            }
            ("Role", false) => {
                let (before, after) = (self.spec(), self.spec());
                (
                    "RoleUpdated",
                    json!({"RoleUpdated": {"before": before, "after": after}}),
                )
            }
            ("ApiKey", true) => {
                let perms = self.perms();
                let (prefix, hash) = (format!("ll_{}", &self.hex32()[..12]), self.hex32());
                let label = format!("{} key", words(&mut self.rng, 2).join(" "));
                (
                    "ApiKeyIssued",
                    json!({"ApiKeyIssued": {"key_id": id, "organization_id": org_s, "user_id": Uuid::new_v4(), "label": label,
                    "permissions": perms, "expires_at": null, "prefix": prefix, "secret_hash": hash, "bootstrap": false}}),
                )
            }
            (_, false) if self.rng.gen_bool(0.3) => (
                "ApiKeyRevoked",
                json!({"ApiKeyRevoked": {"reason": "rotated out by the owner"}}),
            ),
            _ => {
                let (prefix, hash, old) = (
                    format!("ll_{}", &self.hex32()[..12]),
                    self.hex32(),
                    format!("ll_{}", &self.hex32()[..12]),
                );
                (
                    "ApiKeyRotated",
                    json!({"ApiKeyRotated": {"prefix": prefix, "secret_hash": hash, "previous_prefix": old}}),
                )
            }
        };
        (slot, event_type, payload)
    }

    /// Appends `n` events as CSV rows for `COPY events (...) FROM STDIN (FORMAT csv)`.
    fn chunk(&mut self, n: usize) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(n * 1100);
        for _ in 0..n {
            if self.left_in_commit == 0 {
                // A group commit: a batch of events shares one commit time.
                self.left_in_commit = self.rng.gen_range(1..=64);
                self.recorded_at += chrono::Duration::microseconds(self.rng.gen_range(200..3000));
            }
            self.left_in_commit -= 1;
            let (slot, event_type, payload) = self.next_event();
            let (ty, id, org, seq) = {
                let l = &self.live[slot];
                (l.ty, l.id.to_string(), l.org, l.seq)
            };
            // Through serde_json::Value as cqrs-es serializes; the store stores `to_string()`.
            let payload = payload.to_string();
            let metadata = serde_json::to_value(request_metadata(&mut self.rng, org))
                .expect("metadata")
                .to_string();
            self.position += 1;
            let hash = event_hash(
                &self.prev,
                &EventFields {
                    hash_version: HashVersion::CURRENT,
                    position: self.position,
                    aggregate_type: ty,
                    aggregate_id: &id,
                    sequence: seq,
                    event_type,
                    event_version: "1",
                    organization_id: org,
                    recorded_at: self.recorded_at,
                    payload: &payload,
                    metadata: &metadata,
                },
            );
            self.payload_bytes += payload.len() as u64;
            self.metadata_bytes += metadata.len() as u64;
            let _ = writeln!(
                out,
                "{ty},{id},{seq},{event_type},1,{},{},{},{},{},\\x{},\\x{},{}",
                csv_quote(&payload),
                csv_quote(&metadata),
                self.position,
                org.map(|o| o.to_string()).unwrap_or_default(),
                self.recorded_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
                hex::encode(self.prev),
                hex::encode(hash),
                HashVersion::CURRENT.number(),
            );
            self.prev = hash;
        }
        out.into_bytes()
    }
}

fn csv_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

struct VerifyRun {
    workers: usize,
    events: u64,
    elapsed: Duration,
    rate: f64,
    cpu: Option<(f64, f64)>,
}

async fn verify_phase(
    pool: &PgPool,
    events: u64,
    worker_levels: &[usize],
) -> anyhow::Result<(Vec<VerifyRun>, u64, u64, Duration)> {
    let head = read_head(pool).await?;
    let started = Instant::now();
    const CHUNK: usize = 20_000;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    // Generation and hashing (serial: it is a chain) on a blocking thread, COPY here.
    let generator = tokio::task::spawn_blocking(move || {
        let mut g = ChainGen::new(head.position, head.hash, 500);
        let mut left = events;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            if tx.blocking_send(g.chunk(n)).is_err() {
                break;
            }
            left -= n as u64;
        }
        (
            g.position,
            g.payload_bytes / events.max(1),
            g.metadata_bytes / events.max(1),
        )
    });
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                          position, organization_id, recorded_at, prev_hash, hash, hash_version)
                          FROM STDIN WITH (FORMAT csv)",
        )
        .await?;
    while let Some(chunk) = rx.recv().await {
        copy.send(chunk).await?;
    }
    let copied = copy.finish().await?;
    drop(conn);
    let (last_position, payload_avg, metadata_avg) = generator.await?;
    ensure!(
        copied == events,
        "COPY wrote {copied} rows, expected {events}"
    );
    let load_time = started.elapsed();
    println!(
        "\nverify: generated and copied {events} events in {:.1} s (payload ~{payload_avg} bytes, metadata ~{metadata_avg} bytes)",
        load_time.as_secs_f64()
    );
    // What autovacuum would have done to a table this size by the time anyone verifies it.
    let t = Instant::now();
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    println!(
        "verify: VACUUM ANALYZE events took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (size,): (String,) =
        sqlx::query_as("SELECT pg_size_pretty(pg_total_relation_size('events'))")
            .fetch_one(pool)
            .await?;
    println!("verify: events table with indexes: {size}");

    let total = last_position as u64;
    checkpoint(pool).await;
    // verify_database reads the head with a query like this one (after a look at the table's
    // make-up in the catalogue); timed alone to show its share of each run.
    let t = Instant::now();
    sqlx::query("SELECT count(*), max(position) FROM events")
        .fetch_one(pool)
        .await?;
    println!(
        "verify: its `SELECT count(*), max(position)` prelude alone takes {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let mut runs = Vec::new();
    println!(
        "\n{:>7} | {:>9} | {:>8} | {:>11} | {:>15}",
        "workers", "events", "seconds", "events/s", "cpu mach/bench"
    );
    for &workers in worker_levels {
        let cpu_before = cpu_now();
        let report = verify_database(pool, workers).await?;
        let cpu = cpu_between(cpu_before, cpu_now());
        if !report.intact() {
            bail!(
                "verify with {workers} workers found a fault: {:?}",
                report.first_bad
            );
        }
        ensure!(
            report.events == total && report.head_position == last_position,
            "verify checked {} events up to {}, expected {total} up to {last_position}",
            report.events,
            report.head_position
        );
        let run = VerifyRun {
            workers,
            events: report.events,
            elapsed: report.elapsed,
            rate: report.rate(),
            cpu,
        };
        println!(
            "{:>7} | {:>9} | {:>8.2} | {:>11.0} | {:>15}",
            run.workers,
            run.events,
            run.elapsed.as_secs_f64(),
            run.rate,
            fmt_cpu(run.cpu)
        );
        runs.push(run);
    }
    Ok((runs, total, events, load_time))
}

// ---------------------------------------------------------------------------------------

async fn run(db: &BenchDb) -> anyhow::Result<()> {
    let seconds = Duration::from_secs(env_num("LEDGERLINE_BENCH_SECONDS", 5)?.max(1));
    let levels = env_list("LEDGERLINE_BENCH_WRITERS", &[1, 8, 32, 64])?;
    let verify_events = env_num("LEDGERLINE_BENCH_VERIFY_EVENTS", 1_000_000)?;
    let verify_workers = env_list("LEDGERLINE_BENCH_VERIFY_WORKERS", &[1, 2, 4])?;

    let setup = db.pool(pool_size()).await?;
    ledgerline::db::migrate(&setup).await?;
    let (version,): (String,) = sqlx::query_as("SELECT version()").fetch_one(&setup).await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit', 'shared_buffers', 'fsync', 'max_connections') ORDER BY name",
    )
    .fetch_all(&setup)
    .await?;
    setup.close().await;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "ledgerline ledger benchmark, {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {cpus} CPUs ({model}), shared by the bench and PostgreSQL");
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average before the run: {}",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("postgres: {version}");
    println!(
        "settings: {}",
        settings
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("database: {} (fresh, dropped at the end)\n", db.name);
    println!("cpu columns: machine busy % / this bench process % (both of all {cpus} CPUs)\n");

    let (levels_out, tree_out, pool) = append_phase(db, &levels, seconds).await?;
    let (verify_out, verified_total, generated, load_time) =
        verify_phase(&pool, verify_events, &verify_workers).await?;
    pool.close().await;

    // Summary.
    println!("\n================================ summary ================================");
    println!(
        "append (one-event commands on new aggregates, pool {}, {} s per level)",
        pool_size(),
        seconds.as_secs()
    );
    println!("| writers | chained cmd/s | p50 ms | p99 ms | CPU busy | plain cmd/s | p50 ms | p99 ms | CPU busy | chained/plain | chained commits/s | cmd/commit |");
    println!("|--------:|--------------:|-------:|-------:|---------:|------------:|-------:|-------:|---------:|--------------:|------------------:|-----------:|");
    let busy = |c: Option<(f64, f64)>| {
        c.map(|(m, _)| format!("{m:.0}%"))
            .unwrap_or_else(|| "n/a".into())
    };
    for l in &levels_out {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {:.2} | {} | {:.2}x | {:.0} | {:.1} |",
            l.writers,
            l.chained.rate(),
            l.chained.p50_ms,
            l.chained.p99_ms,
            busy(l.chained.cpu),
            l.plain.rate(),
            l.plain.p50_ms,
            l.plain.p99_ms,
            busy(l.plain.cpu),
            l.ratio(),
            l.chained_commits as f64 / l.chained.elapsed.as_secs_f64(),
            l.chained.commands as f64 / l.chained_commits.max(1) as f64
        );
    }
    if !tree_out.is_empty() {
        println!("\nthe Merkle tree's cost (log maintainer on, checkpoint every 1,000 events)");
        println!("| writers | without tree cmd/s | with tree cmd/s | cost | CPU busy without / with | not yet integrated at the end |");
        println!("|--------:|-------------------:|----------------:|-----:|------------------------:|------------------------------:|");
        for t in &tree_out {
            println!(
                "| {} | {:.0} | {:.0} | {:.1}% | {} / {} | {} |",
                t.writers,
                t.without.rate(),
                t.with.rate(),
                t.cost() * 100.0,
                busy(t.without.cpu),
                busy(t.with.cpu),
                t.lag_at_end
            );
        }
    }
    println!("\nverify ({verified_total} events: {generated} generated with COPY in {:.1} s + the append phase's)", load_time.as_secs_f64());
    println!("| workers | events | seconds | events/s | CPU busy |");
    println!("|--------:|-------:|--------:|---------:|---------:|");
    for v in &verify_out {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} |",
            v.workers,
            v.events,
            v.elapsed.as_secs_f64(),
            v.rate,
            busy(v.cpu)
        );
    }

    println!("\ngoals:");
    for &w in &GOAL_RATIO_AT {
        match levels_out.iter().find(|l| l.writers == w) {
            Some(l) => println!(
                "  chained >= {GOAL_RATIO}x plain at {w} writers: {:.2}x  {}",
                l.ratio(),
                met(l.ratio() >= GOAL_RATIO)
            ),
            None => println!("  chained >= {GOAL_RATIO}x plain at {w} writers: level not run"),
        }
    }
    if let Some(best) = levels_out
        .iter()
        .max_by(|a, b| a.chained.rate().total_cmp(&b.chained.rate()))
    {
        println!(
            "  >= {GOAL_APPEND_EVENTS_PER_S:.0} events/s appended (chained): best {:.0} at {} writers  {}",
            best.chained.rate(),
            best.writers,
            met(best.chained.rate() >= GOAL_APPEND_EVENTS_PER_S)
        );
    }
    if let Some(best) = verify_out.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)) {
        println!(
            "  verify >= {GOAL_VERIFY_EVENTS_PER_S:.0} events/s: best {:.0} with {} workers  {}",
            best.rate,
            best.workers,
            met(best.rate >= GOAL_VERIFY_EVENTS_PER_S)
        );
    }
    for t in &tree_out {
        println!(
            "  Merkle tree costs < 10% of append throughput at {} writers: {:.1}%  {}",
            t.writers,
            t.cost() * 100.0,
            met(t.cost() < 0.10)
        );
    }
    println!("  verify reports intact: yes ({} runs)", verify_out.len());
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
