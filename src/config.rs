//! Typed settings from flags and `LEDGERLINE_*` environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::crypto::MasterKey;

/// A string that never prints in `Debug` output.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "ledgerline",
    version,
    about = "An audit-first, event-sourced backend with a hash-chained ledger"
)]
pub struct Cli {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Log format.
    #[arg(long, env = "LEDGERLINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/ledgerline
    #[arg(
        long,
        env = "LEDGERLINE_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<Secret>,
    /// Connections in the pool.
    #[arg(long, env = "LEDGERLINE_DB_POOL", default_value_t = 16, global = true)]
    pub db_pool: u32,
}

impl DatabaseArgs {
    pub fn url(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_ref()
            .map(|s| s.0.as_str())
            .context("no database configured: set LEDGERLINE_DATABASE_URL or pass --database-url (scripts/dev sets one up locally)")
    }
}

#[derive(Debug, Args, Clone)]
pub struct KeyArgs {
    /// The master key wrapping every personal-data key: 64 hex characters.
    #[arg(long, env = "LEDGERLINE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<Secret>,
    /// A file holding the master key (64 hex characters), instead of --master-key.
    #[arg(long, env = "LEDGERLINE_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
}

impl KeyArgs {
    pub fn load(&self) -> anyhow::Result<MasterKey> {
        let text = match (&self.master_key, &self.master_key_file) {
            (Some(k), _) => k.0.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the master key file {}", path.display()))?,
            (None, None) => anyhow::bail!(
                "no master key: set LEDGERLINE_MASTER_KEY (64 hex characters) or LEDGERLINE_MASTER_KEY_FILE; \
                 `openssl rand -hex 32` makes one (scripts/dev makes one for local use)"
            ),
        };
        MasterKey::from_hex(&text).context("reading the master key")
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (applies migrations first).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Create the platform operator's API key and print it once as JSON.
    Bootstrap(BootstrapArgs),
    /// Recompute the whole hash chain from the database. Exit 0 intact, 1 tampered, 2 could not run.
    Verify(VerifyArgs),
    /// Inspect the projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LEDGERLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// A label for the platform key.
    #[arg(long, default_value = "platform operator")]
    pub label: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Ranges checked in parallel.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Each projection's position, lag and failures.
    Status,
    /// Clear a stopped projection's failure so it tries the failed event again.
    Retry {
        /// The projection's name, as `projections status` shows it.
        name: String,
    },
}
