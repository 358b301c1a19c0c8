//! Typed settings from flags and `LEDGERLINE_*` environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::crypto::MasterKey;
use crate::ledger::checkpoint::LogSigner;
use crate::ledger::tree::CheckpointPolicy;

/// The log's name (checkpoint origin) when none is configured.
pub const DEFAULT_LOG_ORIGIN: &str = "ledgerline.local/log";

/// The longest wait a setting may ask for, in seconds: a week. Timers much further off
/// overflow the clock where they are set, late (in a maintainer's task, at a rebuild's swap).
pub const A_WEEK_SECS: u64 = 604_800;

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
    /// Connections in the pool (`serve` needs at least 8). By default four per core of this
    /// machine, from 8 to 16: statements beyond what the cores can run at once only queue
    /// inside PostgreSQL, where they slow the ledger's writer and the projections that every
    /// command waits for.
    #[arg(long, env = "LEDGERLINE_DB_POOL", default_value_t = default_pool(), global = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool: u32,
}

/// The smallest pool `serve` runs with: per-organization turns (`api/turns.rs`) may hold six
/// connections at once while their work needs more, so a pool of six or fewer could be all
/// held by turns that wait for a connection until the pool's acquire timeout fails them.
pub const MIN_SERVE_POOL: u32 = 8;

/// Four connections per core, from [`MIN_SERVE_POOL`] to 16. On two cores, 8 did 16-30% more
/// commands per second than 16 under `scripts/load` (docs/benchmarks.md, "HTTP load"); no
/// other size of machine was measured (four cores or more keep the earlier 16).
fn default_pool() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores.saturating_mul(4))
        .unwrap_or(u32::MAX)
        .clamp(MIN_SERVE_POOL, 16)
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

#[derive(Debug, Args, Clone)]
pub struct LogArgs {
    /// The log's name: every checkpoint's origin line and its signing key's name.
    #[arg(
        long,
        env = "LEDGERLINE_LOG_ORIGIN",
        default_value = DEFAULT_LOG_ORIGIN
    )]
    pub log_origin: String,
    /// The Ed25519 key that signs checkpoints: a 32-byte seed in 64 hex characters
    /// (`ledgerline keygen` makes one).
    #[arg(long, env = "LEDGERLINE_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<Secret>,
    /// A file holding the signing key, instead of --signing-key.
    #[arg(long, env = "LEDGERLINE_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// A file where the server keeps the newest checkpoint it signed, and which every later
    /// one must extend, across restarts: outside the database, so that nobody who can only
    /// write the database can have it sign a rewritten history. Made if missing.
    #[arg(long, env = "LEDGERLINE_CHECKPOINT_ANCHOR_FILE")]
    pub checkpoint_anchor_file: Option<PathBuf>,
    /// Sign a checkpoint every this many events...
    #[arg(long, env = "LEDGERLINE_CHECKPOINT_EVERY", default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// ...or after this many seconds when fewer arrived (at most a week: a timer much further
    /// off overflows the clock in the maintainer's task, which would sign nothing again).
    #[arg(long, env = "LEDGERLINE_CHECKPOINT_INTERVAL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=A_WEEK_SECS))]
    pub checkpoint_interval_secs: u64,
}

impl LogArgs {
    pub fn signer(&self) -> anyhow::Result<LogSigner> {
        let text = match (&self.signing_key, &self.signing_key_file) {
            (Some(k), _) => k.0.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the signing key file {}", path.display()))?,
            (None, None) => anyhow::bail!(
                "no checkpoint signing key: set LEDGERLINE_SIGNING_KEY (64 hex characters) or \
                 LEDGERLINE_SIGNING_KEY_FILE; `ledgerline keygen` makes one (scripts/dev makes one for local use)"
            ),
        };
        let signer =
            LogSigner::from_hex(&self.log_origin, &text).context("reading the signing key")?;
        match &self.checkpoint_anchor_file {
            Some(path) => signer
                .with_anchor_file(path.clone())
                .context("opening the checkpoint anchor file"),
            None => Ok(signer),
        }
    }

    pub fn policy(&self) -> anyhow::Result<CheckpointPolicy> {
        anyhow::ensure!(
            self.checkpoint_every > 0 && self.checkpoint_interval_secs > 0,
            "checkpoint intervals must be positive"
        );
        Ok(CheckpointPolicy {
            every_events: self.checkpoint_every,
            interval: std::time::Duration::from_secs(self.checkpoint_interval_secs),
        })
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
    /// Recompute the whole hash chain, from the database or (--file) from an export, and check
    /// it against the database's newest checkpoint, or checkpoints kept elsewhere (--since,
    /// --checkpoint). Exit 0 intact, 1 tampered, 2 could not run.
    Verify(VerifyArgs),
    /// Write the ledger (or one organization's view of it) as a verifiable JSON Lines file.
    Export(ExportArgs),
    /// Print a Merkle proof from the database's tree, for an auditor to check offline.
    ///
    /// The checkpoint files are read for their tree sizes and roots; their signatures are not
    /// checked unless --public-key is given (`verify-proof` checks them).
    Prove {
        #[command(subcommand)]
        command: ProveCommand,
        /// The log's verifier key, or a file holding it. Without it the checkpoint files'
        /// signatures are not checked (`verify-proof` checks them); with it each must open
        /// under it (FORGED, exit 1, if one does not), so a root that differs from the
        /// database's tree is known to be the log's own.
        #[arg(long, global = true)]
        public_key: Option<String>,
    },
    /// Check a proof printed by `prove` against signed checkpoints; needs no database.
    VerifyProof(VerifyProofArgs),
    /// Make a checkpoint signing key; prints the secret seed and the public verifier key.
    Keygen {
        /// The log's name the key is for.
        #[arg(
            long,
            env = "LEDGERLINE_LOG_ORIGIN",
            default_value = DEFAULT_LOG_ORIGIN
        )]
        log_origin: String,
    },
    /// Inspect, rebuild and check the projections (the read models).
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Check the unique claims (names, slugs, e-mail addresses, key prefixes) against the log.
    Claims {
        #[command(subcommand)]
        command: ClaimsCommand,
    },
    /// The platform operator's keys (no organization, `platform:admin`): list, issue, rotate,
    /// revoke. No API route reaches them, so that a leaked one can be cut here, by whoever
    /// holds the database, and not by whoever holds the key. Never migrates.
    PlatformKey {
        #[command(subcommand)]
        command: PlatformKeyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlatformKeyCommand {
    /// Print the platform keys as the read models show them, one JSON object per line.
    List,
    /// Issue another platform key; prints its secret once as JSON.
    Issue {
        /// A label for the key.
        #[arg(long, default_value = "platform operator")]
        label: String,
    },
    /// Give a platform key a new secret, printed once as JSON; the old one stops working.
    Rotate {
        /// The key's id (`list` shows it).
        id: uuid::Uuid,
    },
    /// Revoke a platform key: it stops working for good.
    Revoke {
        /// The key's id (`list` shows it).
        id: uuid::Uuid,
        /// Why, kept in the log with the revocation.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Fold the claims every event gives, in log order, and compare them with the table the
    /// writer keeps. Exit 0 equal, 1 different (or the log itself holds two owners of one
    /// key), 2 could not run. Never migrates.
    Check {
        /// Rewrite the rows that differ, under the ledger's append lock (appends wait for the
        /// rewrite only), once the log verifies (chain and checkpoints); exit 0 once the table
        /// equals the log's claims.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LEDGERLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
}

/// How `serve` runs the projections and shares them with other `serve` processes.
#[derive(Debug, Args, Clone)]
pub struct ProjectorArgs {
    /// How long a process's lease on a projection or on the log maintainer lasts unless
    /// renewed (every third of it): how soon another process takes over from one that died.
    #[arg(long, env = "LEDGERLINE_LEASE_TTL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_ttl_secs: u64,
    /// How often projections look for events and for each other's progress without being
    /// notified (the fallback for lost notifications), in milliseconds.
    #[arg(long, env = "LEDGERLINE_PROJECTION_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub projection_poll_ms: u64,
    /// How long a projection batch may take before its database session is ended and the
    /// batch tried again (a batch takes milliseconds, or as long as a rebuild's swap holds
    /// its checkpoint), in seconds.
    #[arg(long, env = "LEDGERLINE_PROJECTION_STALL_SECS",
          default_value_t = ledgerline_projections::Projector::default().stall_limit.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub projection_stall_secs: u64,
}

impl ProjectorArgs {
    pub fn projector(&self) -> ledgerline_projections::Projector {
        ledgerline_projections::Projector {
            poll_interval: std::time::Duration::from_millis(self.projection_poll_ms),
            lease_ttl: std::time::Duration::from_secs(self.lease_ttl_secs),
            stall_limit: std::time::Duration::from_secs(self.projection_stall_secs),
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// A label for the platform key.
    #[arg(long, default_value = "platform operator")]
    pub label: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Ranges (or file chunks) checked in parallel.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Verify this export file instead of the database (no database needed).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// With --file: a signed checkpoint the export must match.
    #[arg(long, requires = "file")]
    pub checkpoint: Option<PathBuf>,
    /// With --file: the organization whose export the file must be; a file of another
    /// organization, or of every organization, is refused.
    #[arg(long, requires = "file")]
    pub org: Option<uuid::Uuid>,
    /// Checkpoints kept earlier: prove the database's log is a consistent extension of each.
    #[arg(long, conflicts_with = "file")]
    pub since: Vec<PathBuf>,
    /// The log's verifier key (`name+id+key`, as `/v1/ledger/public-key` gives it), or a file
    /// holding it. Needed with --checkpoint and --since.
    #[arg(long)]
    pub public_key: Option<String>,
    /// Also check, from the log alone, that no request's command was recorded after its key,
    /// user, roles or organization lost the standing it was authenticated on, after what it
    /// was decided against moved on, or past its key's end (exit 1 if one was).
    #[arg(long, conflicts_with_all = ["file", "since"])]
    pub actors: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only this organization's events in full; every other position as its hash only.
    #[arg(long)]
    pub org: Option<uuid::Uuid>,
    /// First position (default 1).
    #[arg(long, default_value_t = 1)]
    pub from: i64,
    /// Last position (default: the head).
    #[arg(long)]
    pub to: Option<i64>,
    /// The file to write (JSON Lines: a header, then one line per position); written beside
    /// it and renamed into place once whole, so a failed export leaves no partial file.
    #[arg(long)]
    pub out: PathBuf,
    /// The log's name for the export's header (default: the origin of the newest checkpoint
    /// the database holds, so that the file matches the checkpoints; else
    /// `ledgerline.local/log`, the server's default).
    #[arg(long, env = "LEDGERLINE_LOG_ORIGIN")]
    pub log_origin: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProveCommand {
    /// That the event at a position is in the tree a checkpoint signed.
    Inclusion {
        /// The event's position in the log (1 is the first), at most the checkpoint's size.
        #[arg(long)]
        position: u64,
        /// The checkpoint file (a signed note, as `/v1/ledger/checkpoints` serves it): the
        /// proof is for its tree size, and the database's tree must have its root there.
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// That the tree of one checkpoint extends the tree of an older one.
    Consistency {
        /// The older checkpoint file (a signed note): the proof starts at its tree size.
        #[arg(long)]
        from: PathBuf,
        /// The newer checkpoint file (a signed note): the proof ends at its tree size.
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct VerifyProofArgs {
    /// The proof, as `prove` printed it (JSON).
    #[arg(long)]
    pub proof: PathBuf,
    /// The checkpoint(s): one for an inclusion proof, the older then the newer for consistency.
    #[arg(long, required = true, num_args = 1..=2)]
    pub checkpoint: Vec<PathBuf>,
    /// The log's verifier key, or a file holding it.
    #[arg(long)]
    pub public_key: String,
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
    /// Rebuild read models from the log into shadow tables, then swap them in atomically;
    /// the live tables keep serving meanwhile. Run again after an interruption to resume.
    /// Never migrates: refuses (exit 2) unless the database has exactly this binary's
    /// migrations.
    Rebuild(RebuildArgs),
    /// Rebuild into a scratch schema and compare with the live tables row by row.
    /// Exit 0 equal, 1 different, 2 could not run (also when the database's migrations are
    /// not exactly this binary's: it never migrates).
    Check {
        /// Projections to check (all when none is named).
        names: Vec<String>,
        #[command(flatten)]
        batch: BatchArgs,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["names", "all", "abandon"]))]
pub struct RebuildArgs {
    /// Projections to rebuild, as `projections status` names them.
    pub names: Vec<String>,
    /// Rebuild every projection.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
    /// Drop the unfinished rebuild job's shadow tables instead (the live tables stay).
    #[arg(long, conflicts_with_all = ["names", "all"])]
    pub abandon: bool,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Database connections that vacuum the copies, build their indexes and analyse them
    /// once the rows are in, sharing these steps one at a time. More than the server has
    /// cores gains nothing, and each may sort in 256 MB (`maintenance_work_mem`).
    #[arg(long, env = "LEDGERLINE_REBUILD_FINISH_CONNECTIONS",
          default_value_t = ledgerline_projections::RebuildOptions::DEFAULT.finish_connections,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub finish_connections: u16,
    /// Once the copies are complete, how long to wait for transactions whose snapshots are
    /// older (an export or `pg_dump` in one REPEATABLE READ transaction): swapped in under
    /// them, the tables would look half-built to them. The log names them; after this the
    /// run stops and its job keeps its work. At most a week (a deadline far beyond it would
    /// overflow the clock at the swap, after the whole build).
    #[arg(long, env = "LEDGERLINE_REBUILD_SNAPSHOT_WAIT_SECS",
          default_value_t = ledgerline_projections::RebuildOptions::DEFAULT.snapshot_wait.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=A_WEEK_SECS))]
    pub snapshot_wait_secs: u64,
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Events applied per transaction. Longer batches take fewer statements (a message's
    /// later events in its post's batch fold into its row) and more memory: a rebuild of every
    /// projection over a 1M-event log peaked at 320-360 MB with 20,000, at 42-48 MB with
    /// 2,000 (docs/benchmarks.md).
    #[arg(long, env = "LEDGERLINE_REBUILD_BATCH",
          default_value_t = ledgerline_projections::RebuildOptions::DEFAULT.batch_size,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,
    /// How long the build may go without any projection advancing (a batch takes about a
    /// second at most), or a rebuild's swap take, before their database sessions are ended. A
    /// rebuild then resumes on new connections, twice, and then stops, keeping its work; a
    /// check stops at once.
    #[arg(long, env = "LEDGERLINE_REBUILD_STALL_SECS",
          default_value_t = ledgerline_projections::RebuildOptions::DEFAULT.stall_limit.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_secs: u64,
}

impl BatchArgs {
    pub fn stall_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_secs)
    }
}
