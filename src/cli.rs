//! The `ledgerline` commands: serve, migrate, bootstrap, verify, export, prove, keygen,
//! projections (status, retry, rebuild, check) and claims (check).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::api_key::ApiKeyCommand;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::{Permission, PermissionSet};
use serde_json::json;
use uuid::Uuid;

use crate::app::{Actor, App, CommandError};
use crate::config::{
    BootstrapArgs, ClaimsCommand, Cli, Command, ExportArgs, PlatformKeyCommand, ProjectionsCommand,
    ProveCommand, RebuildArgs, ServeArgs, VerifyArgs,
};
use crate::crypto::Vault;
use crate::ledger::verify::verify_database;
use crate::out::outln;
use crate::{api, auditor, db, keys, progress};

/// Runs one command. Errors that stop a command from running exit with 2, so that
/// `verify`'s 1 always means "tampered".
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(&cli.db, args).await.map(|_| ExitCode::SUCCESS),
        Command::Migrate => migrate(&cli.db).await.map(|_| ExitCode::SUCCESS),
        Command::Bootstrap(args) => bootstrap(&cli.db, args).await,
        Command::Verify(args) => verify(&cli.db, args).await,
        Command::Export(args) => export(&cli.db, args).await,
        Command::Prove {
            command,
            public_key,
        } => prove(&cli.db, command, public_key.as_deref()).await,
        Command::VerifyProof(args) => {
            auditor::verify_proof(&args.proof, &args.checkpoint, &args.public_key)
        }
        Command::Keygen { log_origin } => auditor::keygen(&log_origin),
        Command::Projections {
            command: ProjectionsCommand::Status,
        } => status(&cli.db).await,
        Command::Projections {
            command: ProjectionsCommand::Retry { name },
        } => retry(&cli.db, &name).await.map(|_| ExitCode::SUCCESS),
        Command::Projections {
            command: ProjectionsCommand::Rebuild(args),
        } => rebuild(&cli.db, args).await.map(|_| ExitCode::SUCCESS),
        Command::Projections {
            command: ProjectionsCommand::Check { names, batch },
        } => check(&cli.db, &names, &batch).await,
        Command::Claims {
            command: ClaimsCommand::Check { repair },
        } => check_claims(&cli.db, repair).await,
        Command::PlatformKey { command } => platform_keys(&cli.db, command).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", causes(&e));
        ExitCode::from(2)
    })
}

/// The error and its causes, each said once: sqlx's errors (and ours that wrap them) repeat
/// their cause in their own message, which `{:#}` then prints again.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out == text || out.ends_with(&format!(": {text}")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A pool for `projections status` and `retry`, which read and clear the projections'
/// bookkeeping: they refuse a database that lacks this binary's migrations (an empty one,
/// say) with their names, rather than with PostgreSQL's "relation ... does not exist". A
/// newer release's migrations are no reason to refuse: an operator asks for the status
/// during a deploy with the binary at hand.
async fn pool_with_tables(db_args: &crate::config::DatabaseArgs) -> anyhow::Result<sqlx::PgPool> {
    let pool = db::connect(db_args.url()?, db_args.db_pool).await?;
    let incomplete = db::MigrationMismatch::read(&pool)
        .await
        .context("reading the database's migrations")?
        .incomplete();
    if !incomplete.is_empty() {
        anyhow::bail!(
            "the database lacks this binary's migrations: {}; apply them with `ledgerline \
             migrate` (or start `ledgerline serve`, which applies them)",
            incomplete.join("; ")
        );
    }
    Ok(pool)
}

/// A pool for `projections check` and `rebuild`, which never migrate: a newer binary's
/// migrations run by an auditor's check (or a rebuild ahead of a deploy) would change the
/// schema under the running servers, and older servers then refuse to start. They refuse,
/// changing nothing, unless the database has exactly this binary's migrations.
///
/// Their long statements (reading the log, `VACUUM (ANALYZE)` of a copy, building its
/// indexes) are what they are for: sqlx's warnings about slow statements are turned off.
///
/// Their sessions are named `application` in `pg_stat_activity` (those working on a build
/// schema after it), so an operator, and `projections status` naming who holds the
/// rebuild lock, can tell them from others.
async fn pool_as_migrated(
    db_args: &crate::config::DatabaseArgs,
    application: &str,
) -> anyhow::Result<sqlx::PgPool> {
    let pool = db::connect_with(db_args.url()?, db_args.db_pool, |options| {
        use sqlx::ConnectOptions;
        options
            .log_slow_statements(log::LevelFilter::Off, std::time::Duration::ZERO)
            .application_name(application)
    })
    .await?;
    let mismatch = db::MigrationMismatch::read(&pool)
        .await
        .context("reading the database's migrations")?
        .all();
    if !mismatch.is_empty() {
        anyhow::bail!(
            "the database's migrations are not this binary's: {}; this command never \
             migrates: run it with the binary the servers run, or apply the migrations \
             with `ledgerline migrate` when deploying this version",
            mismatch.join("; ")
        );
    }
    Ok(pool)
}

async fn migrate(db_args: &crate::config::DatabaseArgs) -> anyhow::Result<()> {
    let pool = db::connect(db_args.url()?, db_args.db_pool).await?;
    let applied = db::migrate(&pool).await?;
    outln!("migrations applied: {applied} new");
    Ok(())
}

async fn serve(db_args: &crate::config::DatabaseArgs, args: ServeArgs) -> anyhow::Result<()> {
    use crate::config::MIN_SERVE_POOL;
    anyhow::ensure!(
        db_args.db_pool >= MIN_SERVE_POOL,
        "LEDGERLINE_DB_POOL (--db-pool) is {}: `serve` needs at least {MIN_SERVE_POOL} \
         connections (per-organization turns may hold six at once, and their work needs more)",
        db_args.db_pool
    );
    let mut signals = StopSignals::catch().context("catching SIGINT and SIGTERM")?;
    let master = args.keys.load()?;
    let signer = args.log.signer()?;
    if args.log.checkpoint_anchor_file.is_none() {
        // Not refused: a first run, tests and one-off servers have no place to keep one.
        tracing::warn!(
            "no LEDGERLINE_CHECKPOINT_ANCHOR_FILE: after a restart this server trusts the \
             newest checkpoint stored in the database, so someone who can write the database \
             and deletes or alters the notes while it is down gets whatever they left signed; \
             set the file (outside the database) in production"
        );
    }
    let policy = args.log.policy()?;
    let start = async {
        let pool = db::connect_with(db_args.url()?, db_args.db_pool, |options| {
            options.application_name(db::SERVE_APPLICATION_NAME)
        })
        .await?;
        let applied = db::migrate(&pool).await?;
        if applied > 0 {
            tracing::info!(migrations = applied, "applied migrations");
        }
        // A key that is not the log's is a configuration error, like a malformed one: refused
        // before serving, so that a deploy with the wrong key stops at its first process
        // while the others go on signing (a maintainer that finds one later halts instead).
        crate::ledger::tree::observe_signed(&pool, &signer)
            .await
            .context("refusing to start with this signing key")?;
        // Bound before the app starts its leased tasks: a port in use then ends the process
        // holding no lease, rather than leave the others waiting a TTL for leases it took.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        anyhow::Ok((pool, listener))
    };
    // Nothing is held yet: a signal while connecting (to a database that may not answer)
    // or migrating just ends the process.
    let (pool, listener) = tokio::select! {
        started = start => started?,
        _ = signals.next() => {
            tracing::info!("shutdown signal received before serving; stopping");
            return Ok(());
        }
    };
    let vault = Vault::new(&master);
    if !vault
        .opens_stored_keys(&pool)
        .await
        .context("reading the data keys")?
    {
        anyhow::bail!(
            "the master key does not open this database's data keys (none of the newest \
             opened): is LEDGERLINE_MASTER_KEY (or _FILE) this database's? Not serving: with \
             another key every user would read as erased, and what it sealed the right key \
             could not open"
        );
    }
    let app = App::with_projector(pool, vault, Some(args.projector.projector()));
    app.start_log(std::sync::Arc::new(signer), policy);
    // The repairs of work cut off before (in the background: their commands may wait for
    // read models that are catching up, and start-up must still answer signals). Not a
    // reason to refuse to serve: logged, and tried again at the next start.
    let completing = app.clone();
    tokio::spawn(async move {
        finished_at_start(
            "interrupted organization creations",
            api::organizations::complete_interrupted(&completing).await,
        );
        finished_at_start(
            "the conversations of erased or deactivated users",
            api::departures::settle_all(&completing).await,
        );
    });
    tracing::info!(address = %listener.local_addr()?, "ledgerline serving");
    let served = axum::serve(
        listener,
        api::router(app.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(signals.first())
    .await;
    tracing::info!("in-flight requests finished; stopping projections");
    // Also when serving failed: the leases go back at once either way.
    app.shutdown().await;
    served.context("serving HTTP")
}

/// Logs what a repair `serve` runs as it starts did: `n` things made whole, or why it could
/// not (tried again at the next start).
fn finished_at_start(what: &str, done: Result<usize, api::error::ApiError>) {
    match done {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "completed {what}"),
        Err(e) => tracing::warn!(error = e.message, "could not complete {what}"),
    }
}

/// SIGINT and SIGTERM, caught from the moment `serve` starts: one arriving while it starts its
/// leased tasks is kept for the graceful stop, where the default action would end the process
/// holding leases the others then wait a TTL for.
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn catch() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's number.
    async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => 2,
            _ = self.terminate.recv() => 15,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            2
        }
    }

    /// Forgets signals already delivered: a Ctrl-C and a SIGTERM forwarded with it (a
    /// terminal and a process manager, say) are one request to stop, not two.
    fn forget_pending(&mut self) {
        #[cfg(unix)]
        {
            use futures::FutureExt;
            let _ = self.interrupt.recv().now_or_never();
            let _ = self.terminate.recv().now_or_never();
        }
    }

    /// Resolves at the first signal: stop accepting, let in-flight requests finish. A second
    /// signal while that goes on (a request that takes its time: up to the 30 s request
    /// timeout, or an export streaming a large log) ends the process at once, with status
    /// 128 + its number (130 for SIGINT, 143 for SIGTERM); its leases then expire after
    /// their TTL.
    pub async fn first(mut self) {
        self.next().await;
        self.forget_pending();
        tracing::info!("shutdown signal received; a second one stops at once");
        tokio::spawn(async move {
            let signal = self.next().await;
            tracing::warn!("second shutdown signal: exiting without waiting for requests");
            std::process::exit(128 + signal);
        });
    }
}

/// Makes the platform operator's key; the ledger's unique claim makes a second run fail.
pub async fn bootstrap_key(
    app: &App,
    label: &str,
) -> Result<(Uuid, String), CommandError<ledgerline_aggregates::api_key::ApiKeyError>> {
    platform_key(app, label, true).await
}

/// Issues a platform key (every permission grantable) and returns its id and secret. Only
/// the `bootstrap` one is limited to one per ledger; others are for whoever holds the
/// database (`platform-key issue`, benchmarks reusing a seeded log).
pub async fn platform_key(
    app: &App,
    label: &str,
    bootstrap: bool,
) -> Result<(Uuid, String), CommandError<ledgerline_aggregates::api_key::ApiKeyError>> {
    let id = Uuid::new_v4();
    let secret = keys::generate();
    let all: PermissionSet = Permission::ALL.into_iter().collect();
    let command = ApiKeyCommand::Issue {
        key_id: id,
        organization_id: None,
        user_id: None,
        label: label.to_string(),
        permissions: PermissionSet::from([Permission::PlatformAdmin]),
        expires_at: None,
        prefix: secret.prefix,
        secret_hash: secret.hash,
        bootstrap,
        grantable: all,
        now: Utc::now(),
    };
    app.execute(
        &app.cqrs.api_keys,
        id,
        None,
        // The audit trail tells the one-time bootstrap key from a key issued later.
        &Actor::cli(if bootstrap {
            "bootstrap"
        } else {
            "platform-key"
        }),
        command,
    )
    .await?;
    Ok((id, secret.secret))
}

async fn bootstrap(
    db_args: &crate::config::DatabaseArgs,
    args: BootstrapArgs,
) -> anyhow::Result<ExitCode> {
    let url = db_args.url()?;
    let pool = db::connect(url, db_args.db_pool).await?;
    // A new database works in either order (bootstrap, then serve), but an operator who
    // pointed it at the wrong database learns that it just made the tables there.
    let applied = db::migrate(&pool).await?;
    if applied > 0 {
        eprintln!(
            "bootstrap: applied {} to {}",
            crate::ledger::count(applied as u64, "migration", "migrations"),
            db::redact_url(url)
        );
    }
    // No personal data is sealed here; a throwaway vault keeps the wiring uniform.
    let app = App::new(
        pool.clone(),
        Vault::new(&crate::crypto::MasterKey::generate()),
        false,
    );
    match bootstrap_key(&app, &args.label).await {
        Ok((id, secret)) => show_secret(&pool, id, &secret, true).await,
        Err(CommandError::Taken { .. }) => {
            eprintln!(
                "error: the platform is already bootstrapped; its operator key was shown when \
                 it was made (`ledgerline platform-key list` shows it, `rotate` gives it a new \
                 secret, `issue` makes another)"
            );
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// Prints a platform key's new secret, once, as JSON, then lets the read models show it.
/// Shown before anything else can fail: only its hash is kept, so a secret not shown now is
/// lost. Not quietly, then, even to a reader that went away. `recorded` is false when the
/// commit's outcome was lost: the secret is shown all the same (it works only if its hash
/// was recorded), marked `"recorded": "unknown"`, and the command exits 2.
async fn show_secret(
    pool: &sqlx::PgPool,
    id: Uuid,
    secret: &str,
    recorded: bool,
) -> anyhow::Result<ExitCode> {
    let mut answer = json!({ "id": id, "api_key": secret });
    if !recorded {
        answer["recorded"] = json!("unknown");
    }
    let shown = crate::out::try_write(format_args!("{answer}\n"));
    if let Err(e) = &shown {
        eprintln!(
            "error: the platform key could not be written to standard output ({e}): it is in \
             the log, but its secret is lost (only its hash is kept); give it a new one with \
             `ledgerline platform-key rotate {id}`"
        );
    }
    if !recorded {
        eprintln!(
            "error: the ledger could not confirm whether the change was recorded: if the \
             secret does not work, run `ledgerline platform-key rotate {id}`"
        );
    }
    // Either way: a key shown works, and one whose secret was lost is listed for rotation.
    show_in_read_models(pool).await;
    Ok(if shown.is_ok() && recorded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Brings the read models up to the log (a running server does that too), so that a key
/// just changed works, or stops working, in `api_keys` as in the log.
async fn show_in_read_models(pool: &sqlx::PgPool) {
    if let Err(e) = ledgerline_projections::catch_up(pool).await {
        eprintln!(
            "warning: the change is in the log, but the read models could not show it yet \
             ({e}); they do once a server runs them (`ledgerline projections status`)"
        );
    }
}

/// `ledgerline platform-key`: the operator's own keys, changed through the log like any
/// other key. Exit 0 done, 1 refused (not a platform key, already revoked), 2 could not run.
async fn platform_keys(
    db_args: &crate::config::DatabaseArgs,
    command: PlatformKeyCommand,
) -> anyhow::Result<ExitCode> {
    let pool = pool_as_migrated(db_args, db::PLATFORM_KEY_APPLICATION_NAME).await?;
    // No personal data is sealed here; a throwaway vault keeps the wiring uniform.
    let app = App::new(
        pool.clone(),
        Vault::new(&crate::crypto::MasterKey::generate()),
        false,
    );
    let actor = Actor::cli("platform-key");
    match command {
        PlatformKeyCommand::List => {
            type Row = (
                Uuid,
                String,
                String,
                String,
                DateTime<Utc>,
                Option<DateTime<Utc>>,
                Option<DateTime<Utc>>,
            );
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT id, label, prefix, status, created_at, rotated_at, revoked_at \
                 FROM api_keys WHERE organization_id IS NULL ORDER BY created_at, id",
            )
            .fetch_all(&pool)
            .await
            .context("reading the platform keys")?;
            // Auth reads key changes from the log; this list reads the read models, which may
            // lag or be stopped: said, so that a revoked key shown active misleads nobody.
            let (shown, last): (i64, i64) = sqlx::query_as(
                "SELECT COALESCE((SELECT position FROM projection_checkpoints \
                 WHERE name = 'api_keys'), 0), COALESCE((SELECT max(position) FROM events \
                 WHERE aggregate_type = 'ApiKey'), 0)",
            )
            .fetch_one(&pool)
            .await
            .context("reading how far the read models show the keys")?;
            if shown < last {
                eprintln!(
                    "warning: the read models show the keys as of position {shown}, and the log \
                     changed a key at {last}: this list may be out of date (`ledgerline \
                     projections status`); the API goes by the log"
                );
            }
            for (id, label, prefix, status, created_at, rotated_at, revoked_at) in rows {
                outln!(
                    "{}",
                    json!({
                        "id": id, "label": label, "prefix": prefix, "status": status,
                        "created_at": created_at, "rotated_at": rotated_at,
                        "revoked_at": revoked_at,
                    })
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PlatformKeyCommand::Issue { label } => match platform_key(&app, &label, false).await {
            Ok((id, secret)) => show_secret(&pool, id, &secret, true).await,
            Err(e) => refused(e),
        },
        // A rotation shows its new secret; a revocation only that it is done.
        PlatformKeyCommand::Rotate { id } => {
            let secret = keys::generate();
            // No grace period: a platform key is rotated here because it leaked.
            let command = ApiKeyCommand::Rotate {
                prefix: secret.prefix.clone(),
                secret_hash: secret.hash.clone(),
                previous_valid_until: None,
                now: Utc::now(),
            };
            change_platform_key(&app, &actor, id, command, Some(secret.secret)).await
        }
        PlatformKeyCommand::Revoke { id, reason } => {
            let command = ApiKeyCommand::Revoke { reason };
            change_platform_key(&app, &actor, id, command, None).await
        }
    }
}

/// Appends `command` to platform key `id`, once the log says it is one; then shows the new
/// `secret` a rotation made, or says the key is revoked.
async fn change_platform_key(
    app: &App,
    actor: &Actor,
    id: Uuid,
    command: ApiKeyCommand,
    secret: Option<String>,
) -> anyhow::Result<ExitCode> {
    let pool = &app.pool;
    if let Some(refused) = unless_a_platform_key(pool, id).await? {
        return Ok(refused);
    }
    let done = app
        .execute(&app.cqrs.api_keys, id, None, actor, command)
        .await;
    match (done, secret) {
        (Ok(()), Some(secret)) => show_secret(pool, id, &secret, true).await,
        // The rotation may be in the log, the old secret then dead.
        (Err(CommandError::Unknown), Some(secret)) => show_secret(pool, id, &secret, false).await,
        (Ok(()), None) => {
            outln!("{}", json!({ "id": id, "status": "revoked" }));
            show_in_read_models(pool).await;
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), _) => refused(e),
    }
}

/// A command the key's aggregate refused is exit 1, saying why; any other failure could not
/// run (2).
fn refused(
    e: CommandError<ledgerline_aggregates::api_key::ApiKeyError>,
) -> anyhow::Result<ExitCode> {
    match e {
        CommandError::Rejected(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        other => Err(anyhow::anyhow!("{other}")),
    }
}

/// Exit 1, saying why, unless key `id` is a platform key, told from the log (not the read
/// models, which may lag) by its issue's own payload: an organization's keys are changed
/// through the API, by that organization's admins.
async fn unless_a_platform_key(pool: &sqlx::PgPool, id: Uuid) -> anyhow::Result<Option<ExitCode>> {
    // The event's type, and the JSON type and text of the organization its issue names.
    let issued: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT event_type, jsonb_typeof(payload::jsonb -> 'ApiKeyIssued' -> 'organization_id'), \
                payload::jsonb -> 'ApiKeyIssued' ->> 'organization_id' \
         FROM events WHERE aggregate_type = 'ApiKey' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await
    .context("reading the key's issue from the log")?;
    let refusal = match issued {
        None => format!("the log holds no API key {id}"),
        Some((event, Some(json_type), _)) if event == "ApiKeyIssued" && json_type == "null" => {
            return Ok(None)
        }
        Some((event, Some(json_type), Some(org)))
            if event == "ApiKeyIssued" && json_type == "string" =>
        {
            format!(
                "API key {id} belongs to organization {org}: its admins revoke or rotate it \
                 through the API"
            )
        }
        Some((event, ..)) => {
            format!("API key {id}'s first event ({event}) does not say whose key it is")
        }
    };
    eprintln!("error: {refusal}");
    Ok(Some(ExitCode::from(1)))
}

async fn verify(
    db_args: &crate::config::DatabaseArgs,
    args: VerifyArgs,
) -> anyhow::Result<ExitCode> {
    let key = args
        .public_key
        .as_deref()
        .map(auditor::load_verifier)
        .transpose()?;
    if let Some(file) = &args.file {
        let checkpoint = match (&args.checkpoint, &key) {
            (Some(path), Some(key)) => Some((
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                key,
            )),
            (Some(_), None) => anyhow::bail!("--checkpoint needs --public-key"),
            (None, _) => None,
        };
        return offline(file, checkpoint, args.org, args.workers);
    }
    let pool = db::connect(db_args.url()?, db_args.db_pool).await?;
    if !args.since.is_empty() {
        let key = key.context("--since needs --public-key")?;
        return auditor::verify_since(&pool, args.workers, &args.since, &key).await;
    }
    let report = verify_database(&pool, args.workers)
        .await
        .context("reading the ledger")?;
    let secs = report.elapsed.as_secs_f64();
    match &report.first_bad {
        None => {
            let records = auditor::check_records(&pool, &report, key.as_ref(), false)
                .await
                .context("reading the log's checkpoints")?;
            if !records.intact() {
                outln!("{records}");
                return Ok(ExitCode::from(1));
            }
            outln!(
                "intact: {} verified in {secs:.3}s ({:.0} events/s); head position {} hash {}; {records}",
                crate::ledger::count(report.events, "event", "events"),
                report.rate(),
                report.head_position,
                hex::encode(report.head_hash)
            );
            if !args.actors {
                return Ok(ExitCode::SUCCESS);
            }
            let standing = crate::ledger::standing::check_database(&pool, report.head_position)
                .await
                .context("reading the log's actors")?;
            outln!("{standing}");
            Ok(match standing.unguarded {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            })
        }
        Some(bad) => {
            outln!(
                "TAMPERED: first bad position {}: {} ({} read in {secs:.3}s)",
                bad.position,
                bad.fault,
                crate::ledger::count(report.events, "event", "events")
            );
            Ok(ExitCode::from(1))
        }
    }
}

async fn export(
    db_args: &crate::config::DatabaseArgs,
    args: ExportArgs,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(db_args.url()?, db_args.db_pool).await?;
    // A file of the rows this session is shown would verify, whatever the application reads.
    if let Some(what) = crate::ledger::verify::not_a_plain_table(&pool).await? {
        anyhow::bail!(
            "the events table is not a plain table ({what}): nothing exported; \
             `ledgerline verify` reports it"
        );
    }
    // A mistyped id would give a file of stubs alone that verifies as intact.
    if let Some(org) = args.org {
        let created = api::created(&pool, Organization::TYPE, org, org).await?;
        anyhow::ensure!(
            created,
            "no organization {org} in the log: nothing exported"
        );
    }
    // Written beside the target and renamed into place once whole: a refused range or a
    // failure part-way leaves a file already there as it was, and never a cut-off export
    // under the name an auditor will verify.
    // Checked against a checkpoint, a header naming another origin is a fault: an export made
    // without the server's setting takes the one its checkpoints are signed under.
    let origin = match args.log_origin {
        Some(origin) => origin,
        None => sqlx::query_scalar::<_, String>(
            "SELECT split_part(note, E'\\n', 1) FROM checkpoints ORDER BY tree_size DESC LIMIT 1",
        )
        .fetch_optional(&pool)
        .await
        .context("reading the newest checkpoint's origin")?
        .unwrap_or_else(|| crate::config::DEFAULT_LOG_ORIGIN.to_string()),
    };
    let mut partial = args.out.clone().into_os_string();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let written = async {
        let file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("creating {}", partial.display()))?;
        let mut out = tokio::io::BufWriter::new(file);
        let scope = crate::ledger::export::ExportScope {
            organization: args.org,
            from: args.from,
            to: args.to,
        };
        let summary = crate::ledger::export::export(&pool, scope, &origin, &mut out)
            .await
            .context("exporting")?;
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        anyhow::Ok(summary)
    }
    .await;
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&partial, &args.out)
        .await
        .with_context(|| format!("moving the export into {}", args.out.display()))?;
    outln!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

fn offline(
    file: &std::path::Path,
    checkpoint: Option<(String, &crate::ledger::checkpoint::NoteVerifier)>,
    organization: Option<uuid::Uuid>,
    workers: usize,
) -> anyhow::Result<ExitCode> {
    let report = crate::ledger::offline::verify_file_of(
        file,
        checkpoint.as_ref().map(|(note, key)| (note.as_str(), *key)),
        organization,
        workers,
    )
    .with_context(|| format!("verifying {}", file.display()))?;
    outln!("{report}");
    Ok(if report.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn prove(
    db_args: &crate::config::DatabaseArgs,
    command: ProveCommand,
    public_key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let key = public_key.map(auditor::load_verifier).transpose()?;
    let pool = db::connect(db_args.url()?, db_args.db_pool).await?;
    crate::ledger::tree::catch_up(
        &pool,
        None,
        crate::ledger::tree::CheckpointPolicy {
            every_events: u64::MAX,
            interval: std::time::Duration::from_secs(1),
        },
        false,
    )
    .await?;
    match command {
        ProveCommand::Inclusion {
            position,
            checkpoint,
        } => auditor::prove_inclusion(&pool, position, &checkpoint, key.as_ref()).await,
        ProveCommand::Consistency { from, to } => {
            auditor::prove_consistency(&pool, &from, &to, key.as_ref()).await
        }
    }
}

/// Exit 1 while a projection is stopped on a failure, so that scripts and probes can tell.
async fn status(db_args: &crate::config::DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = pool_with_tables(db_args).await?;
    let statuses = ledgerline_projections::status(&pool)
        .await
        .context("reading projection status")?;
    outln!(
        "{:<16} {:>10} {:>10} {:>8}  failures",
        "projection",
        "position",
        "head",
        "lag"
    );
    let stopped = statuses.iter().any(|s| !s.failures.is_empty());
    for s in statuses {
        outln!(
            "{:<16} {:>10} {:>10} {:>8}  {}",
            s.name,
            s.position,
            s.head,
            s.lag,
            s.failures.len()
        );
        for f in &s.failures {
            outln!(
                "  at position {}: {} ({})",
                f.position,
                f.error,
                f.failed_at
            );
        }
    }
    let leases = ledgerline_projections::lease::holders(&pool)
        .await
        .context("reading the leases")?;
    print_leases(&leases);
    let jobs = ledgerline_projections::rebuild_progress(&pool)
        .await
        .context("reading rebuild jobs")?;
    print_rebuild_job(&jobs, Utc::now());
    if stopped {
        outln!("a projection is stopped on a failure: fix its cause, then `ledgerline projections retry NAME`");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Which `serve` process runs each background job: its lease's holder (`host:pid:random`,
/// new at each start) and how long the lease has left unless renewed (a third of the TTL
/// after each renewal; below 0 it is free for another process to take).
fn print_leases(leases: &[ledgerline_projections::lease::LeaseHolder]) {
    outln!();
    if leases.is_empty() {
        outln!("leases: none held (no `ledgerline serve` runs the background jobs)");
        return;
    }
    outln!("{:<26} {:<40} expires in", "lease", "holder");
    for l in leases {
        let expires = if l.expires_in_ms < 0 {
            format!(
                "expired {:.1} s ago: free to take",
                -l.expires_in_ms as f64 / 1000.0
            )
        } else {
            format!("{:.1} s", l.expires_in_ms as f64 / 1000.0)
        };
        outln!("{:<26} {:<40} {expires}", l.name, l.holder);
    }
}

/// The unfinished rebuild job, if any: a killed or failed one keeps its `running` row, so
/// what tells it from one at work is whether anyone holds the rebuild lock.
fn print_rebuild_job(rows: &[ledgerline_projections::RebuildProgress], now: DateTime<Utc>) {
    let Some(job) = rows.first() else {
        return;
    };
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let what_next = ledgerline_projections::resume_or_abandon(&names);
    outln!();
    outln!(
        "rebuild job {} ({}), started {}: {}",
        job.job,
        job.schema,
        job.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        match &job.holder {
            Some(holder) => format!("RUNNING (the session holding the rebuild lock: {holder})"),
            None => "STOPPED (no process holds the rebuild lock: killed, or stopped by an error)"
                .to_string(),
        }
    );
    outln!(
        "  {:<16} {:>10} {:>10}  last progress",
        "projection",
        "position",
        "target"
    );
    for r in rows {
        outln!(
            "  {:<16} {:>10} {:>10}  {} ({}s ago)",
            r.name,
            r.position,
            r.target,
            r.updated_at.format("%Y-%m-%d %H:%M:%S UTC"),
            (now - r.updated_at).num_seconds().max(0)
        );
    }
    if !job.held {
        outln!("  {what_next} (it resumes from these positions; the live tables are unchanged until its swap)");
    }
}

/// After the cause is fixed: the running projector picks the event up on its next poll.
async fn retry(db_args: &crate::config::DatabaseArgs, name: &str) -> anyhow::Result<()> {
    let pool = pool_with_tables(db_args).await?;
    let cleared = ledgerline_projections::retry(&pool, name)
        .await
        .with_context(|| format!("retrying projection `{name}`"))?;
    if cleared == 0 {
        outln!("{name}: no failure recorded; nothing to retry");
    } else {
        outln!(
            "{name}: {} cleared; the projection resumes at the failed event",
            crate::ledger::count(cleared, "failure", "failures")
        );
    }
    Ok(())
}

/// Rebuilds and checks take the log as the truth: one that does not verify would pass its
/// edits into the read models (or flag the honest live rows as wrong) as if it were intact.
/// So they verify it first, chain and checkpoints as `verify` does, and refuse (exit 2,
/// nothing started) on any fault. Events appended after this, by the writer, are not
/// verified again.
async fn require_intact_log(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    tracing::info!("verifying the log before building from it");
    let report = auditor::verify_before_trusting(pool)
        .await
        .context("verifying the log first")?
        .map_err(|why| {
            anyhow::anyhow!(
                "the log does not verify ({why}): read models built from it would show it as \
                 intact; `ledgerline verify` reports it, and nothing was started"
            )
        })?;
    tracing::info!(
        events = report.events,
        seconds = report.elapsed.as_secs_f64(),
        "the log verifies"
    );
    Ok(())
}

async fn rebuild(db_args: &crate::config::DatabaseArgs, args: RebuildArgs) -> anyhow::Result<()> {
    let pool = pool_as_migrated(db_args, db::REBUILD_APPLICATION_NAME).await?;
    if args.abandon {
        match ledgerline_projections::abandon_rebuild(&pool).await? {
            Some(job) => outln!("rebuild job {job} abandoned; the live tables are unchanged"),
            None => outln!("no unfinished rebuild job"),
        }
        return Ok(());
    }
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    // A wrong name is said before any long work.
    ledgerline_projections::resolve(Some(&names))?;
    // A job at work refuses this run; said at once, not after verifying the log.
    let unfinished = ledgerline_projections::rebuild_progress(&pool).await?;
    if unfinished.iter().any(|r| r.held) {
        return Err(ledgerline_projections::RunError::RebuildRunning.into());
    }
    require_intact_log(&pool).await?;
    // With none to resume this run starts a job: say what the last one did, which a run
    // killed just after its swap had no time to.
    if unfinished.is_empty() {
        if let Some(last) = ledgerline_projections::last_swapped(&pool).await? {
            eprintln!(
                "the last rebuild, job {} ({}), was swapped in at position {} ({}); this run \
                 starts a new one",
                last.job,
                last.projections.join(", "),
                last.position,
                last.finished_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
    }
    let names = (!args.all).then_some(names.as_slice());
    let options = ledgerline_projections::RebuildOptions {
        batch_size: args.batch.batch_size,
        stall_limit: args.batch.stall_limit(),
        finish_connections: args.finish_connections,
        snapshot_wait: std::time::Duration::from_secs(args.snapshot_wait_secs),
        ..Default::default()
    };
    let wanted = ledgerline_projections::resolve(names)?;
    let monitor = std::sync::Arc::new(ledgerline_projections::Progress::default());
    let display = progress::show("rebuild", monitor.clone());
    let started = std::time::Instant::now();
    let result = ledgerline_projections::rebuild(&pool, names, options, &monitor).await;
    progress::finish(display).await;
    let summary = match (result, monitor.snapshot().job) {
        (Ok(summary), _) => summary,
        // Failed once its job existed: what it did is kept, and the operator is told how to
        // go on (errors that say it themselves, or that dropped the job, are left as they are).
        (Err(e), Some(job)) if !says_what_next(&e) => {
            let names: Vec<&str> = wanted.iter().map(|p| p.name()).collect();
            let error = anyhow::Error::from(e).context("rebuilding projections");
            anyhow::bail!(
                "{}\n{}",
                causes(&error),
                ledgerline_projections::job_kept(job, &names)
            )
        }
        (Err(e), _) => return Err(anyhow::Error::from(e).context("rebuilding projections")),
    };
    outln!(
        "rebuild job {}{}: {} swapped in at position {} in {:.1}s",
        summary.job,
        if summary.resumed { " (resumed)" } else { "" },
        summary.projections.join(", "),
        summary.position,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether a rebuild's error already says what to do next, or leaves no job to resume.
fn says_what_next(e: &ledgerline_projections::RunError) -> bool {
    use ledgerline_projections::RunError;
    matches!(
        e,
        RunError::SwapBusy { .. }
            | RunError::LockLost { .. }
            | RunError::OldSnapshots { .. }
            | RunError::Dependents { .. }
            | RunError::LiveTablesChanged(_)
            | RunError::RebuildInProgress { .. }
            | RunError::RebuildRunning
    )
}

/// Exit 0 when every table equals its rebuild, 1 when one differs.
async fn check(
    db_args: &crate::config::DatabaseArgs,
    names: &[String],
    batch: &crate::config::BatchArgs,
) -> anyhow::Result<ExitCode> {
    let pool = pool_as_migrated(db_args, db::CHECK_APPLICATION_NAME).await?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ledgerline_projections::resolve(Some(&names))?;
    require_intact_log(&pool).await?;
    let names = (!names.is_empty()).then_some(names.as_slice());
    let monitor = std::sync::Arc::new(ledgerline_projections::Progress::default());
    let display = progress::show("check", monitor.clone());
    let result = ledgerline_projections::check(
        &pool,
        names,
        batch.batch_size,
        batch.stall_limit(),
        &monitor,
    )
    .await;
    progress::finish(display).await;
    let report = result.context("checking projections")?;
    for projection in &report.projections {
        match projection.stopped_at {
            None => outln!("{} (at position {})", projection.name, projection.position),
            // Equal tables would otherwise pass for a projection at work.
            Some(failed) => outln!(
                "{} (at position {}) STOPPED on a failure at the event at position {failed} \
                 (the head is at {}): compared at its checkpoint; `ledgerline projections \
                 status` shows the error",
                projection.name,
                projection.position,
                report.head
            ),
        }
        for t in &projection.tables {
            let verdict = if t.equal() {
                "equal".to_string()
            } else {
                format!(
                    "DIFFERENT: {} row(s) missing from live, {} unexpected in live",
                    t.missing_from_live, t.unexpected_in_live
                )
            };
            outln!(
                "  {:<28} {:>9} live {:>9} rebuilt  {verdict}",
                t.table,
                t.live_rows,
                t.rebuilt_rows
            );
            for row in &t.missing_rows {
                outln!("    missing from live:  {row}");
            }
            for row in &t.unexpected_rows {
                outln!("    unexpected in live: {row}");
            }
        }
    }
    let stopped: Vec<String> = report
        .projections
        .iter()
        .filter_map(|p| {
            p.stopped_at
                .map(|at| format!("{} at position {at}", p.name))
        })
        .collect();
    if !stopped.is_empty() {
        outln!(
            "stopped on a failure (compared up to its checkpoint only): {}; fix the cause, \
             then `ledgerline projections retry NAME`",
            stopped.join(", ")
        );
    }
    if report.equal() {
        outln!("the live read models equal a rebuild from the log");
        Ok(ExitCode::SUCCESS)
    } else {
        outln!("the live read models differ from a rebuild from the log");
        Ok(ExitCode::from(1))
    }
}

async fn check_claims(
    db_args: &crate::config::DatabaseArgs,
    repair: bool,
) -> anyhow::Result<ExitCode> {
    let pool = pool_as_migrated(db_args, db::CLAIMS_CHECK_APPLICATION_NAME).await?;
    let report = crate::ledger::claims_check::check_claims(&pool, repair)
        .await
        .context("checking the unique claims")?;
    outln!(
        "unique claims at position {}: {} held, folded from {} events of the aggregates \
         that hold claims",
        report.position,
        report.claims,
        report.events
    );
    let owner = |o: &Option<String>| o.clone().unwrap_or_else(|| "nobody".into());
    for d in &report.differences {
        outln!(
            "  {} {} {}: table {}, log {}",
            if report.repaired {
                "REWRITTEN"
            } else {
                "DIFFERENT"
            },
            d.scope,
            d.key,
            owner(&d.in_table),
            owner(&d.from_log)
        );
    }
    for c in &report.contests {
        outln!(
            "  CONTESTED {} {}: position {} claims it for {} while {} held it",
            c.scope,
            c.key,
            c.position,
            c.claimant,
            c.holder
        );
    }
    let equal = report.consistent() || report.repaired;
    match (equal, report.repaired) {
        (true, false) => outln!("the unique claims equal the log's"),
        (true, true) => outln!(
            "repaired: {} row(s) rewritten; the unique claims now equal the log's",
            report.differences.len()
        ),
        (false, _) => outln!(
            "the unique claims differ from the log's in {} key(s); `--repair` rewrites them",
            report.differences.len()
        ),
    }
    if !report.contests.is_empty() {
        outln!(
            "the log itself gives {} key(s) a second owner while the first held it; the \
             first keeps it, and no repair of the table can undo that",
            report.contests.len()
        );
    }
    Ok(if equal && report.contests.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
