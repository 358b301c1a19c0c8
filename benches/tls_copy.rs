//! TLS stress: large binary `COPY`s over TLS, on a few connections at once, for a while,
//! each under a watch; a `COPY`'s transaction (well under a second here) that has not ended
//! after 20 s counts as a hang, reported with the server's view of the sessions in a `COPY`,
//! and the run exits 3. It is the check for the sqlx-core
//! fixes in `vendor/` (vendor/README.md): with the published sqlx-core 0.8.6 (the
//! `[patch.crates-io]` entry removed) it hung within minutes here; with the vendored one it
//! must not. A plain binary (`harness = false`): `cargo bench --bench tls_copy`. See
//! docs/benchmarks.md.
//!
//! Environment:
//! - `LEDGERLINE_BENCH_ADMIN_URL`: the server (default postgres://postgres@127.0.0.1:5432/postgres);
//!   `sslmode=require` is added, so the server must offer TLS.
//! - `LEDGERLINE_BENCH_TLS_SECONDS`: how long to go on (default 300).
//! - `LEDGERLINE_BENCH_TLS_CONNECTIONS`: connections copying at once (default 4).
//!
//! Each `COPY` sends 20,000 rows of about 600 bytes (11.4 MB, as a rebuild's batch of
//! `audit_events` does) into a temporary table, inside a transaction with a savepoint, and
//! the rows are counted back.

// Only its settings and server are used here: no database of the bench's own.
#[allow(dead_code)]
mod support;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ledgerline_projections::copy_in::{BinaryCopy, Field};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgPool};

const ROWS: usize = 20_000;
const WIDTH: usize = 600;
/// A `COPY` of 11.4 MB takes well under a second here; twenty without an end is a hang.
const HANG: Duration = Duration::from_secs(20);

#[tokio::main(worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = support::env_num("LEDGERLINE_BENCH_TLS_SECONDS", 300)?;
    let connections: usize = support::env_num("LEDGERLINE_BENCH_TLS_CONNECTIONS", 4)?;
    let options = PgConnectOptions::from_str(&support::admin_url())?
        .ssl_mode(PgSslMode::Require)
        .application_name("ledgerline_tls_copy");
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32 + 1)
        .connect_with(options)
        .await
        .context("connecting with sslmode=require (does the server offer TLS?)")?;
    let data = Arc::new(copy_data()?);
    println!(
        "{connections} connections, {seconds} s, COPYs of {ROWS} rows ({:.1} MB) over TLS",
        data.len() as f64 / 1e6
    );
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let (pool, data) = (pool.clone(), Arc::clone(&data));
        workers.spawn(async move {
            let mut copies = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                match tokio::time::timeout(HANG, copy_once(&pool, &data)).await {
                    Ok(copied) => copied?,
                    Err(_) => return Err(hang(&pool, worker, copies, started).await),
                }
                copies += 1;
            }
            Ok::<u64, anyhow::Error>(copies)
        });
    }
    let mut copies = 0;
    while let Some(joined) = workers.join_next().await {
        match joined? {
            Ok(n) => copies += n,
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(3);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "no hang: {copies} COPYs in {secs:.0} s ({:.1}/s, {:.0} MB/s)",
        copies as f64 / secs,
        copies as f64 * data.len() as f64 / 1e6 / secs
    );
    Ok(())
}

/// One `COPY` in a transaction of its own, its rows counted back.
async fn copy_once(pool: &PgPool, data: &[u8]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("CREATE TEMP TABLE tls_copy (n bigint, text text) ON COMMIT DROP")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SAVEPOINT tls_copy").execute(&mut *tx).await?;
    let mut copy = tx
        .copy_in_raw("COPY tls_copy (n, text) FROM STDIN (FORMAT binary)")
        .await?;
    copy.send(data).await?;
    copy.finish().await?;
    sqlx::query("RELEASE SAVEPOINT tls_copy")
        .execute(&mut *tx)
        .await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tls_copy")
        .fetch_one(&mut *tx)
        .await?;
    ensure!(rows == ROWS as i64, "{rows} rows copied of {ROWS}");
    tx.commit().await?;
    Ok(())
}

/// The hang, as the server sees the worker's session (another connection's view).
async fn hang(pool: &PgPool, worker: usize, copies: u64, started: Instant) -> anyhow::Error {
    let sessions: Vec<(i32, String, Option<String>, String)> = sqlx::query_as(
        "SELECT pid, coalesce(state, ''), wait_event, left(query, 60) FROM pg_stat_activity \
         WHERE application_name = 'ledgerline_tls_copy' AND pid <> pg_backend_pid() \
         AND query LIKE 'COPY%' AND state = 'active'",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    anyhow::anyhow!(
        "HANG: worker {worker}'s COPY transaction had not ended after {} s, after {copies} \
         COPYs, {:.0} s into the run; the server's sessions in a COPY: {sessions:?}",
        HANG.as_secs(),
        started.elapsed().as_secs_f64()
    )
}

/// The binary `COPY` data, encoded as a rebuild's is (`copy_in`): `ROWS` rows of a bigint
/// and a text of about `WIDTH` bytes.
fn copy_data() -> anyhow::Result<Vec<u8>> {
    let text = "x".repeat(WIDTH);
    let mut copy = BinaryCopy::new();
    for i in 0..ROWS {
        // Lengths vary, so records and chunks end at different places each row.
        let width = WIDTH - i % 97;
        copy.row(&[Field::Bigint(i as i64), Field::Text(&text[..width])])?;
    }
    Ok(copy.finish())
}
