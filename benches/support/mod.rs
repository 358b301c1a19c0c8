//! What every bench binary shares: a fresh database of its own on the server at
//! `LEDGERLINE_BENCH_ADMIN_URL`, dropped at the end (also on failure or panic), settings
//! from the environment, and how busy the machine was.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

// Each bench binary compiles this folder and uses its own part of it.
#[allow(dead_code)]
pub mod amplify;
#[allow(dead_code)]
pub mod api;
#[allow(dead_code)]
pub mod mixed_log;

/// A database the bench may create and drop databases from.
pub fn admin_url() -> String {
    std::env::var("LEDGERLINE_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn db_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// The bench database (`ll_bench_<uuid>`); dropped on drop (also on panic).
pub struct BenchDb {
    pub name: String,
    url: String,
}

impl BenchDb {
    /// Creates the database; it is empty (the caller migrates it, or not).
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("ll_bench_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url()).await.with_context(|| {
            format!("connecting to {}", ledgerline::db::redact_url(&admin_url()))
        })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await.ok();
        Ok(Self {
            url: db_url(&name),
            name,
        })
    }

    pub async fn pool(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&self.url)
            .await?)
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run outside a runtime, or inside one that is shutting down: a helper
        // thread with its own runtime can always run the DROP.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
        eprintln!("dropped database {}", self.name);
    }
}

/// A comma-separated list of numbers from the environment, or `default`.
#[allow(dead_code)] // not every bench takes a list
pub fn env_list(name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}: `{x}` is not a number"))
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

/// A number from the environment, or `default`.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: `{v}` is not a number")),
        Err(_) => Ok(default),
    }
}

/// A goal's verdict as the summaries print it.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

/// The whole machine's (busy, total) CPU ticks so far, from /proc/stat.
#[allow(dead_code)] // not every bench reports it
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Busy share of the whole machine (all processes) since `before` was read.
#[allow(dead_code)]
pub fn busy_since(before: Option<(u64, u64)>) -> String {
    match (before, machine_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) => {
            format!("{:.0}%", 100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
        }
        _ => "n/a".into(),
    }
}
