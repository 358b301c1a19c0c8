//! Rebuild benchmark: how fast `ledgerline_projections::rebuild` rebuilds every read model
//! from a log of a million mixed events, against replaying the same log the way cqrs-es
//! does (one event at a time, one transaction per event per projection).
//!
//! The log is written through the HTTP API of an app running in-process (see
//! `support::mixed_log`), then `VACUUM (ANALYZE)`. Then, in the same run: `rebuild` of all
//! projections over the whole log, `LEDGERLINE_BENCH_RUNS` times; the one-event-at-a-time
//! baseline (`reset`, then `run_batch(pool, projection, 1)` for every projection, event
//! after event) over the first `LEDGERLINE_BENCH_BASELINE_EVENTS` events only; `catch_up`
//! back to the head, so the database stays valid. After each of these every checkpoint
//! must be at the head and every read-model table hold the same rows (count and a digest of
//! their contents) as before the first rebuild, or the run exits non-zero (after printing
//! its figures); the last check is of the projector's own batches (`catch_up`), so a rebuild
//! that folds differently cannot pass. A rebuild job left unfinished by an earlier run is
//! abandoned first: resuming it would time only its remainder. A plain binary
//! (`harness = false`): `cargo bench --bench rebuild`. See docs/benchmarks.md.
//!
//! Environment:
//! - `LEDGERLINE_BENCH_ADMIN_URL`: a PostgreSQL database the bench may create and drop
//!   databases from (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - `LEDGERLINE_BENCH_DATABASE_URL`: use this (existing) database instead of a fresh one,
//!   and keep it: seeded only while its log is shorter than asked, so that a seeded log
//!   serves many runs.
//! - `LEDGERLINE_BENCH_EVENTS`: events in the log (default 1,000,000).
//! - `LEDGERLINE_BENCH_GROW_FROM`: instead of seeding the rest through the API, append
//!   tenant-disjoint copies of the log's first N events (fresh ids, same mix and stream
//!   shapes; `support::amplify`) until the log holds `LEDGERLINE_BENCH_EVENTS`: minutes
//!   instead of an hour on a shared 2-core machine.
//! - `LEDGERLINE_BENCH_RUNS`: rebuilds measured (default 2).
//! - `LEDGERLINE_BENCH_BASELINE_EVENTS`: events the baseline replays (default 50,000).
//! - `LEDGERLINE_BENCH_SEEDERS`: concurrent seeding tasks (default 48).
//! - `LEDGERLINE_BENCH_ORGS`: organizations seeded (default: events / 5,000, at least one
//!   per seeding task).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use ledgerline_projections::{
    abandon_rebuild, catch_up, rebuild, reset, run_batch, status, BatchOutcome, Progress,
    Projection, RebuildOptions,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

mod support;
use support::api::serve;
use support::mixed_log::{self, head, Plan};
use support::{busy_since, env_num, machine_ticks, met, BenchDb};

/// The app's pool while seeding: 16, `serve`'s default before 2026-12-06 (and still on four
/// cores or more), kept so that seeding compares with the earlier runs.
const APP_POOL: u32 = 16;
const GOAL_EVENTS_PER_SEC: f64 = 50_000.0;
const GOAL_LOG: i64 = 1_000_000;

/// Every read-model table's rows, by table, in `Projection::ALL` order: how many, and a
/// digest of their contents, the sum of each row's text's MD5 (its first 64 bits): a row off
/// by one column changes it, and it needs neither a sort nor one long string of a million
/// rows.
type Contents = Vec<(&'static str, (i64, String))>;

async fn contents(pool: &PgPool) -> anyhow::Result<Contents> {
    let mut out = Vec::new();
    for table in Projection::ALL
        .iter()
        .flat_map(|p| p.tables().iter().copied())
    {
        let rows: (i64, String) = sqlx::query_as(&format!(
            "SELECT count(*), \
                    coalesce(sum(('x' || left(md5(r::text), 16))::bit(64)::bigint), 0)::text \
             FROM {table} r"
        ))
        .fetch_one(pool)
        .await?;
        out.push((table, rows));
    }
    Ok(out)
}

/// What is wrong with the read models after `what`: checkpoints not at `head`, recorded
/// failures, or rows other than `want`.
async fn check(
    pool: &PgPool,
    what: &str,
    head: i64,
    want: &Contents,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for s in status(pool).await? {
        if s.position != head || !s.failures.is_empty() {
            problems.push(format!(
                "after {what}: projection {} is at {} (head {head}) with {} failures",
                s.name,
                s.position,
                s.failures.len()
            ));
        }
    }
    let got = contents(pool).await?;
    for ((table, (n, digest)), (_, (w, wanted))) in got.iter().zip(want) {
        if n != w {
            problems.push(format!("after {what}: {table} has {n} rows, expected {w}"));
        } else if digest != wanted {
            problems.push(format!(
                "after {what}: {table} has its {n} rows, but other contents (digest {digest}, expected {wanted})"
            ));
        }
    }
    if problems.is_empty() {
        println!(
            "  checked: every checkpoint at {head}, the rows of all {} tables (counts and contents) as before",
            got.len()
        );
    }
    for p in &problems {
        println!("  PROBLEM {p}");
    }
    Ok(problems)
}

struct Rebuilt {
    secs: f64,
    /// Until the job had started (lock, job row, shadow schema), the build, and from the
    /// moment every projection reached the target to the return: what the job does after
    /// the build (secondary indexes, statistics of the copies) and the swap.
    setup: Option<f64>,
    build: Option<f64>,
    finish: Option<f64>,
    busy: String,
}

/// One `rebuild` of every projection, timed; its phases told apart by polling `progress`.
async fn measure_rebuild(pool: &PgPool, head: i64) -> anyhow::Result<Rebuilt> {
    let progress = Arc::new(Progress::default());
    let marks: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let sampler = {
        let (progress, marks) = (Arc::clone(&progress), Arc::clone(&marks));
        tokio::spawn(async move {
            loop {
                let state = progress.snapshot();
                let now = Instant::now();
                {
                    let mut m = marks.lock().unwrap_or_else(|e| e.into_inner());
                    if state.target > 0 && m.0.is_none() {
                        m.0 = Some(now);
                    }
                    if state.target >= head && state.done() >= state.target {
                        m.1 = Some(now);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let busy = machine_ticks();
    let started = Instant::now();
    let summary = rebuild(pool, None, RebuildOptions::default(), &progress).await;
    let secs = started.elapsed().as_secs_f64();
    let busy = busy_since(busy);
    sampler.abort();
    let summary = summary.context("rebuild")?;
    if summary.resumed {
        bail!("the rebuild resumed an unfinished job: its time is not a whole rebuild's");
    }
    if summary.position != head {
        bail!(
            "the rebuild swapped in tables at {}, the head is {head}",
            summary.position
        );
    }
    let (job_started, built) = *marks.lock().unwrap_or_else(|e| e.into_inner());
    let since = |t: Instant| t.duration_since(started).as_secs_f64();
    Ok(Rebuilt {
        secs,
        setup: job_started.map(since),
        build: job_started
            .zip(built)
            .map(|(a, b)| b.duration_since(a).as_secs_f64()),
        finish: built.map(|b| secs - since(b)),
        busy,
    })
}

/// The cqrs-es way: each event, for each projection, in a transaction of its own.
async fn measure_baseline(pool: &PgPool, events: i64) -> anyhow::Result<(f64, String)> {
    reset(pool, None).await?;
    let busy = machine_ticks();
    let started = Instant::now();
    let mut reported = Instant::now();
    for i in 1..=events {
        for projection in Projection::ALL {
            match run_batch(pool, projection, 1).await? {
                BatchOutcome::Applied {
                    applied: 1,
                    checkpoint,
                } if checkpoint == i => {}
                other => bail!("baseline, {}: event {i}: {other:?}", projection.name()),
            }
        }
        if reported.elapsed() >= Duration::from_secs(30) {
            reported = Instant::now();
            println!(
                "  baseline: {i} of {events} events, {:.0} events/s so far",
                i as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok((started.elapsed().as_secs_f64(), busy_since(busy)))
}

async fn vacuum(pool: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await?;
    println!(
        "  VACUUM (ANALYZE) of the database: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Event types by count, with their share; `upto` limits it to a prefix of the log.
async fn mix(pool: &PgPool, upto: i64) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT event_type, count(*) FROM events WHERE position <= $1 GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    .bind(upto)
    .fetch_all(pool)
    .await?)
}

fn print_mix(rows: &[(String, i64)]) {
    let total: i64 = rows.iter().map(|(_, n)| n).sum();
    println!("| event type | events | share |");
    println!("|---|--:|--:|");
    for (t, n) in rows {
        println!(
            "| {t} | {n} | {:.2}% |",
            100.0 * *n as f64 / total.max(1) as f64
        );
    }
}

async fn run(pool: &PgPool, database: &str, kept: bool) -> anyhow::Result<()> {
    let events = env_num("LEDGERLINE_BENCH_EVENTS", GOAL_LOG)?.max(1);
    let runs = env_num("LEDGERLINE_BENCH_RUNS", 2usize)?.max(1);
    let baseline_events = env_num("LEDGERLINE_BENCH_BASELINE_EVENTS", 50_000i64)?.max(1);
    let seeders = env_num("LEDGERLINE_BENCH_SEEDERS", 48usize)?.max(1);
    let orgs = env_num("LEDGERLINE_BENCH_ORGS", (events / 5_000) as usize)?.max(seeders);

    ledgerline::db::migrate(pool).await?;
    let (version,): (String,) = sqlx::query_as("SELECT version()").fetch_one(pool).await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ledgerline rebuild benchmark, {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!(
        "machine: {cpus} CPUs, shared by the bench (with the rebuild's workers), the app while seeding, and PostgreSQL; load average before: {}",
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
         'synchronous_commit', 'shared_buffers', 'max_wal_size') ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    println!(
        "settings: {}",
        settings
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let options = RebuildOptions::default();
    println!(
        "rebuild options: batch_size {}, swap_tail {}; {runs} runs; baseline over the first {baseline_events} events",
        options.batch_size, options.swap_tail
    );

    // The log.
    let before = head(pool).await?;
    let posted_before = posted(pool).await?;
    let mut posts_answered = None;
    let grow_from = env_num("LEDGERLINE_BENCH_GROW_FROM", 0i64)?;
    if before >= events {
        println!(
            "database: {database}: REUSED, its log has {before} events (>= {events} asked): not seeded"
        );
    } else if grow_from > 0 && before >= grow_from {
        println!(
            "database: {database}: {before} events seeded through the API; growing to {events} \
             with tenant-disjoint copies of its first {grow_from} (support::amplify)"
        );
        let started = Instant::now();
        support::amplify::amplify(pool, grow_from, events).await?;
        println!(
            "grew the log to {} events in {:.0} s",
            head(pool).await?,
            started.elapsed().as_secs_f64()
        );
        vacuum(pool).await?;
    } else {
        println!(
            "database: {database} ({}): {before} events, seeding to {events} with {seeders} tasks over {orgs} organizations",
            if kept { "kept" } else { "fresh, dropped at the end" }
        );
        let served = serve(pool.clone()).await?;
        let plan = Plan {
            target: events,
            tasks: seeders,
            organizations: orgs,
            tag: Uuid::new_v4().simple().to_string()[..8].to_string(),
            seed: 42,
        };
        let busy = machine_ticks();
        let seeded = mixed_log::seed(&served.api, &served.admin_key, pool, &plan).await;
        let busy = busy_since(busy);
        served.stop().await;
        let seeded = seeded?;
        let after = head(pool).await?;
        let secs = seeded.elapsed.as_secs_f64();
        println!(
            "seeded {} events with {} requests in {secs:.0} s: {:.0} events/s, {:.0} requests/s (machine {busy} busy)",
            after - before,
            seeded.total(),
            (after - before) as f64 / secs,
            seeded.total() as f64 / secs
        );
        println!(
            "  requests: {}",
            seeded
                .requests
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        posts_answered = Some(seeded.count("post message"));
        vacuum(pool).await?;
    }
    // A run that died in the middle of the baseline left the read models behind.
    let started = Instant::now();
    catch_up(pool)
        .await
        .context("catching up before measuring")?;
    let head = head(pool).await?;
    println!(
        "read models caught up to {head} before measuring in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let log_bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('events')")
        .fetch_one(pool)
        .await?;
    println!(
        "log: {head} events, events table {:.0} MB with indexes",
        log_bytes as f64 / 1e6
    );
    let event_mix = mix(pool, head).await?;
    print_mix(&event_mix);
    // A job an earlier run left (killed, or stopped after its stalls) would be resumed, and
    // only its remainder timed.
    if let Some(job) = abandon_rebuild(pool).await? {
        println!("abandoned rebuild job {job}, left unfinished by an earlier run");
    }
    let reference = contents(pool).await?;
    println!(
        "read models before the first rebuild (as the projector made them, or an earlier run's rebuild; the baseline's catch_up is checked against them too): {}",
        reference
            .iter()
            .map(|(t, (n, _))| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut problems = Vec::new();
    let messages = reference
        .iter()
        .find(|(t, _)| *t == "messages")
        .map_or(0, |(_, (n, _))| *n);
    let posted_now = posted(pool).await?;
    if messages != posted_now {
        problems.push(format!(
            "messages has {messages} rows, the log {posted_now} MessagePosted events"
        ));
    }
    if let Some(answered) = posts_answered {
        if posted_now - posted_before != answered as i64 {
            problems.push(format!(
                "{answered} posts were answered 201, the log gained {} MessagePosted events",
                posted_now - posted_before
            ));
        }
    }

    // (a) rebuild
    let mut rebuilt = Vec::new();
    for i in 1..=runs {
        let r = measure_rebuild(pool, head).await?;
        let phase = |p: Option<f64>| p.map_or("?".to_string(), |s| format!("{s:.1} s"));
        println!(
            "rebuild run {i}: {head} events in {:.1} s = {:.0} events/s (job start {}, build {}, indexes, statistics and swap {}; machine {} busy)",
            r.secs,
            head as f64 / r.secs,
            phase(r.setup),
            phase(r.build),
            r.finish.map_or("?".to_string(), |s| format!("{:.3} s", s)),
            r.busy
        );
        problems.extend(check(pool, &format!("rebuild run {i}"), head, &reference).await?);
        rebuilt.push(r);
    }

    // (b) baseline, over a prefix
    let prefix = baseline_events.min(head);
    println!(
        "baseline: reset, then one event at a time, one transaction per event per projection ({} projections), over the first {prefix} events of {head} only",
        Projection::ALL.len()
    );
    let (base_secs, base_busy) = measure_baseline(pool, prefix).await?;
    let base_rate = prefix as f64 / base_secs;
    println!(
        "baseline: {prefix} events in {base_secs:.1} s = {base_rate:.0} events/s (machine {base_busy} busy)"
    );
    let prefix_mix = mix(pool, prefix).await?;
    println!(
        "  the prefix's mix: {}",
        prefix_mix
            .iter()
            .take(8)
            .map(|(t, n)| format!("{t} {:.1}%", 100.0 * *n as f64 / prefix as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    catch_up(pool)
        .await
        .context("catch_up after the baseline")?;
    let catch_up_secs = started.elapsed().as_secs_f64();
    println!(
        "restored: catch_up of the other {} events in {catch_up_secs:.1} s = {:.0} events/s (batches of 1,000, projections one after another)",
        head - prefix,
        (head - prefix) as f64 / catch_up_secs
    );
    problems.extend(check(pool, "the baseline and catch_up", head, &reference).await?);
    vacuum(pool).await?;

    // (c) summary
    println!("\n================================ summary ================================");
    println!(
        "log: {head} mixed events ({}); database {database}",
        if kept { "kept" } else { "dropped" }
    );
    let rates: Vec<f64> = rebuilt.iter().map(|r| head as f64 / r.secs).collect();
    for (i, (r, rate)) in rebuilt.iter().zip(&rates).enumerate() {
        println!(
            "rebuild run {}: {rate:.0} events/s ({:.1} s; after the build: indexes, statistics and swap {}; machine {} busy)",
            i + 1,
            r.secs,
            r.finish.map_or("?".to_string(), |s| format!("{:.3} s", s)),
            r.busy
        );
    }
    println!(
        "baseline, one event at a time, over the first {prefix} events only: {base_rate:.0} events/s ({base_secs:.1} s)"
    );
    println!(
        "ratio rebuild / baseline: {}",
        rates
            .iter()
            .map(|r| format!("{:.1}x", r / base_rate))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let big_enough = head >= GOAL_LOG;
    println!(
        "goal 50,000 events/s (every run, over a log of at least {GOAL_LOG} events): slowest run {slowest:.0} events/s over {head} events{}: {}",
        if big_enough { "" } else { " (log too small for the goal)" },
        met(big_enough && slowest >= GOAL_EVENTS_PER_SEC)
    );
    if !problems.is_empty() {
        bail!("{} problems: {}", problems.len(), problems.join("; "));
    }
    Ok(())
}

async fn posted(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessagePosted'")
            .fetch_one(pool)
            .await?,
    )
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(APP_POOL)
        .acquire_timeout(Duration::from_secs(60))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", ledgerline::db::redact_url(url)))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = rt.block_on(async {
        match std::env::var("LEDGERLINE_BENCH_DATABASE_URL") {
            Ok(url) => {
                let pool = connect(&url).await?;
                let outcome = run(&pool, &ledgerline::db::redact_url(&url), true).await;
                pool.close().await;
                outcome
            }
            Err(_) => {
                let db = BenchDb::create().await?;
                let pool = db.pool(APP_POOL).await?;
                let outcome = run(&pool, &db.name, false).await;
                pool.close().await;
                drop(db);
                outcome
            }
        }
    });
    drop(rt);
    if let Err(e) = outcome {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
