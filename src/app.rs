//! The wiring: one cqrs-es framework per aggregate over the chained store, the vault, the
//! projector, and the one way commands are executed (metadata in, read-your-writes out).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, EventEnvelope};
use ledgerline_aggregates::api_key::ApiKey;
use ledgerline_aggregates::conversation::Conversation;
use ledgerline_aggregates::message::Message;
use ledgerline_aggregates::metadata;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::role::Role;
use ledgerline_aggregates::user::User;
use ledgerline_projections::lease::{LeaseConfig, Leasing};
use ledgerline_projections::{Projector, ProjectorHandle, Waited};
use sqlx::PgPool;
use uuid::Uuid;

use crate::aggregate_locks::AggregateLocks;
use crate::crypto::Vault;
use crate::ledger::checkpoint::LogSigner;
use crate::ledger::tree::{self, CheckpointPolicy};
use crate::ledger::{AppendError, Appended, LedgerStore};

pub type Framework<A> = CqrsFramework<A, PersistedEventStore<LedgerStore, A>>;

/// How long a command waits for the read models to show its effect before answering anyway.
const READ_YOUR_WRITES_TIMEOUT: Duration = Duration::from_secs(5);

/// The projections stopped at a failure that the log has been told of, each with the
/// position it is stopped at. While a projection is stopped every command finds it so: the
/// stop is said once (the projector logged its error when it stopped), not by each command.
#[derive(Debug, Default)]
struct StopsSaid(std::sync::Mutex<Vec<(&'static str, i64)>>);

impl StopsSaid {
    /// The stops in `waited` not said yet, which the caller says now. A wait that ran to its
    /// end saw every stopped projection, so a stop it did not see has ended (a retry, a
    /// rebuild) and is said again if it comes back; one that timed out may not have looked.
    fn new_in(&self, waited: &Waited) -> Vec<(&'static str, i64)> {
        let mut said = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let new: Vec<_> = waited
            .stopped
            .iter()
            .filter(|s| !said.contains(s))
            .copied()
            .collect();
        if waited.timed_out {
            said.extend(new.iter().copied());
        } else {
            said.clone_from(&waited.stopped);
        }
        new
    }
}

/// Marks the request's answer as given before the read models showed `position`, unless
/// every projection has reached it.
fn mark_unless_reached(projector: &ProjectorHandle, position: i64) {
    if !projector.reached(position) {
        crate::api::read_models_behind();
    }
}

/// Who issued a command and how; becomes every event's metadata.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    /// `api_key` for requests, `cli:<command>` for the CLI, `system:<cause>` for what the
    /// system appends as a request's consequence (`api::departures`).
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    /// The prefix of the key's secret the request presented.
    pub key_prefix: Option<String>,
    /// What the request was authenticated on: its commands are refused if that is lost
    /// before their append. `None` for the CLI and for what follows from a command already
    /// recorded.
    pub authenticated_at: Option<AuthenticatedAt>,
    pub request_id: String,
    /// The request's `Idempotency-Key` (`api::idempotency`), if it was sent with one.
    pub idempotency_key: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Where a request's key stood when it was authenticated, as sequences of the log and the
/// time it ends: its commands are refused if the key changed since
/// (`metadata::ACTOR_KEY_SEQUENCE`: revoked, rotated), its user was deactivated, erased, or
/// given or lost a role (`ACTOR_USER_SEQUENCE`), its organization was suspended
/// (`ACTOR_ORGANIZATION_SEQUENCE`), one of its user's roles was changed or deleted
/// (`ACTOR_ROLE_SEQUENCES`), or they would be recorded at or after `until`
/// (`ACTOR_VALID_UNTIL`). So the log never shows a key acting after one of those events or
/// past the end it had then (an end made nearer meanwhile is one of them: a role given again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedAt {
    pub key: i64,
    /// A user key's user.
    pub user: Option<i64>,
    /// An organization's key's organization, and its sequence.
    pub organization: Option<(Uuid, i64)>,
    /// The soonest of the key's expiry, its secret's grace end and its user's role
    /// assignments' expiries.
    pub until: Option<DateTime<Utc>>,
    /// A user key's user's roles and their ancestors, each with its sequence, by id.
    pub roles: Arc<[(Uuid, i64)]>,
}

impl Actor {
    pub fn cli(command: &str) -> Self {
        Self {
            kind: format!("cli:{command}"),
            request_id: Uuid::new_v4().to_string(),
            ..Self::default()
        }
    }

    /// The same actor for what follows from a command already recorded (an organization's
    /// built-in roles): not refused if its key, user, user's roles or organization change
    /// afterwards.
    pub fn for_what_follows(&self) -> Self {
        Self {
            authenticated_at: None,
            ..self.clone()
        }
    }

    /// A command's metadata: who issued it, for which organization, and what it was decided
    /// against (`guard`).
    fn metadata(
        &self,
        organization_id: Option<Uuid>,
        guard: Option<Guard>,
    ) -> HashMap<String, String> {
        debug_assert!(
            self.authenticated_at
                .as_ref()
                .and_then(|s| s.organization)
                .is_none_or(|(org, _)| Some(org) == organization_id),
            "an organization's key acting outside its organization loses its guard"
        );
        let mut m = HashMap::new();
        if let Some(g) = guard {
            m.insert(
                metadata::GUARD_AGGREGATE.into(),
                format!("{}:{}", g.aggregate_type, g.aggregate_id),
            );
            m.insert(metadata::GUARD_SEQUENCE.into(), g.sequence.to_string());
        }
        m.insert(metadata::ACTOR_KIND.into(), self.kind.clone());
        m.insert(metadata::REQUEST_ID.into(), self.request_id.clone());
        let at = self.authenticated_at.as_ref();
        let optional = [
            (
                metadata::ORGANIZATION_ID,
                organization_id.map(|o| o.to_string()),
            ),
            (metadata::ACTOR_USER_ID, self.user_id.map(|u| u.to_string())),
            (metadata::ACTOR_KEY_ID, self.key_id.map(|k| k.to_string())),
            (metadata::ACTOR_KEY_PREFIX, self.key_prefix.clone()),
            (metadata::ACTOR_KEY_SEQUENCE, at.map(|s| s.key.to_string())),
            (
                metadata::ACTOR_USER_SEQUENCE,
                at.and_then(|s| s.user).map(|s| s.to_string()),
            ),
            // Named by the event's organization, which is the key's: a key acts in no other
            // (were one to, the guard would be left out, so say it in tests).
            (
                metadata::ACTOR_ORGANIZATION_SEQUENCE,
                at.and_then(|s| s.organization)
                    .filter(|(org, _)| Some(*org) == organization_id)
                    .map(|(_, s)| s.to_string()),
            ),
            (
                metadata::ACTOR_ROLE_SEQUENCES,
                at.filter(|s| !s.roles.is_empty())
                    .map(|s| metadata::role_sequences_text(&s.roles)),
            ),
            (
                metadata::ACTOR_VALID_UNTIL,
                at.and_then(|s| s.until)
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            ),
            (metadata::IDEMPOTENCY_KEY, self.idempotency_key.clone()),
            (metadata::CLIENT_IP, self.client_ip.clone()),
            (metadata::USER_AGENT, self.user_agent.clone()),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        m
    }
}

/// Why a command did not take effect, before it is turned into an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    #[error("{0}")]
    Rejected(E),
    #[error("the resource was changed concurrently; reload and retry")]
    Conflict,
    /// A unique name, slug, address or prefix is held by `holder` (`<aggregate type>:<id>`,
    /// not for every caller to learn: see `api::error::naming_holder`).
    #[error("{scope} is already taken")]
    Taken { scope: &'static str, holder: String },
    /// The aggregate the command was decided against (its guard) changed in the meantime.
    #[error("the {0} changed while the command was being decided; retry")]
    Stale(String),
    /// The acting API key was revoked or rotated after its request was authenticated.
    #[error(
        "this API key was revoked or rotated while the request was being carried out: this \
         command was not recorded"
    )]
    KeyChanged,
    /// The acting key's user was stopped or given or lost a role, one of its user's roles
    /// changed, its organization was suspended, or its end passed
    /// (`AppendError::ActorStopped`), after its request was authenticated.
    #[error(
        "{0} while the request was being carried out: this command was not recorded; send \
         it again to have it decided on what holds now"
    )]
    ActorStopped(&'static str),
    /// The answer to the batch's COMMIT was lost and the log could not be read to learn
    /// whether it committed (`AppendError::Unknown`): the command may be in the log.
    #[error("the ledger could not confirm whether the command was recorded: it may have been")]
    Unknown,
    #[error("{0}")]
    Internal(String),
}

impl<E: std::error::Error> From<AggregateError<E>> for CommandError<E> {
    fn from(e: AggregateError<E>) -> Self {
        match e {
            AggregateError::UserError(e) => CommandError::Rejected(e),
            AggregateError::AggregateConflict => CommandError::Conflict,
            AggregateError::UnexpectedError(inner) => match inner.downcast::<AppendError>() {
                Ok(e) => CommandError::from(*e),
                Err(other) => CommandError::Internal(other.to_string()),
            },
            other => CommandError::Internal(other.to_string()),
        }
    }
}

impl<E: std::error::Error> From<AppendError> for CommandError<E> {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Taken { scope, holder } => CommandError::Taken { scope, holder },
            AppendError::Conflict => CommandError::Conflict,
            AppendError::Stale(what) => CommandError::Stale(what),
            AppendError::KeyChanged => CommandError::KeyChanged,
            AppendError::ActorStopped(what) => CommandError::ActorStopped(what),
            AppendError::Unknown => CommandError::Unknown,
            other => CommandError::Internal(other.to_string()),
        }
    }
}

pub struct Frameworks {
    pub organizations: Framework<Organization>,
    pub users: Framework<User>,
    pub roles: Framework<Role>,
    pub api_keys: Framework<ApiKey>,
    pub conversations: Framework<Conversation>,
    pub messages: Framework<Message>,
}

/// What a command on a new aggregate appended ([`App::execute_fresh`]).
#[derive(Debug)]
pub struct Created<A: Aggregate> {
    pub events: Vec<A::Event>,
    pub appended: Appended,
}

/// What a command was decided against: the aggregate's type, id and sequence then. The
/// ledger store refuses the append if that aggregate has moved on (see `metadata::GUARD_*`).
#[derive(Debug, Clone, Copy)]
pub struct Guard {
    pub aggregate_type: &'static str,
    pub aggregate_id: Uuid,
    pub sequence: i64,
}

fn framework<A: Aggregate<Services = ()>>(store: &LedgerStore) -> Framework<A> {
    CqrsFramework::new(
        PersistedEventStore::new_event_store(store.clone()),
        vec![],
        (),
    )
}

pub struct AppInner {
    pub pool: PgPool,
    pub store: LedgerStore,
    pub vault: Vault,
    pub cqrs: Frameworks,
    pub projector: Option<ProjectorHandle>,
    /// Commands on one aggregate take turns from load to append in this process.
    pub aggregate_locks: AggregateLocks,
    /// The log's signing identity, once [`App::start_log`] ran.
    log: std::sync::OnceLock<Arc<LogSigner>>,
    maintainer: std::sync::Mutex<Option<tree::MaintainerHandle>>,
    stops_said: StopsSaid,
}

/// The application, cheap to clone into handlers.
#[derive(Clone)]
pub struct App(pub Arc<AppInner>);

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    /// Wires the app over a migrated database. With `run_projector`, read models follow the
    /// ledger in this process and commands wait for them (read-your-writes).
    pub fn new(pool: PgPool, vault: Vault, run_projector: bool) -> Self {
        Self::with_projector(pool, vault, run_projector.then(Projector::default))
    }

    /// [`App::new`] with the projector's settings (batch size, poll interval, lease TTL).
    pub fn with_projector(pool: PgPool, vault: Vault, projector: Option<Projector>) -> Self {
        let store = LedgerStore::start(pool.clone());
        let projector = projector.map(|p| p.start(pool.clone(), store.committed()));
        let cqrs = Frameworks {
            organizations: framework(&store),
            users: framework(&store),
            roles: framework(&store),
            api_keys: framework(&store),
            conversations: framework(&store),
            messages: framework(&store),
        };
        App(Arc::new(AppInner {
            pool,
            store,
            vault,
            cqrs,
            projector,
            aggregate_locks: AggregateLocks::default(),
            log: std::sync::OnceLock::new(),
            maintainer: std::sync::Mutex::new(None),
            stops_said: StopsSaid::default(),
        }))
    }

    /// Keeps the ledger's Merkle tree and signs checkpoints with `signer` in this process.
    pub fn start_log(&self, signer: Arc<LogSigner>, policy: CheckpointPolicy) {
        if self.log.set(signer.clone()).is_err() {
            return;
        }
        // Under the projector's lease identity, woken by every process's commits.
        let (committed, leasing) = match &self.projector {
            Some(p) => (p.head(), p.leasing()),
            None => (
                self.store.committed(),
                Leasing::standalone(LeaseConfig::default()),
            ),
        };
        let handle = tree::spawn_leased_maintainer(
            self.pool.clone(),
            committed,
            Some(signer),
            policy,
            leasing,
        );
        *self.maintainer.lock().expect("not poisoned") = Some(handle);
    }

    /// Why this process's log maintainer stopped signing for good, if it did.
    pub fn log_halted(&self) -> Option<String> {
        let maintainer = self.maintainer.lock().expect("not poisoned");
        maintainer.as_ref()?.halted().map(str::to_string)
    }

    /// The log's signer, when this process signs checkpoints.
    pub fn log_signer(&self) -> Option<&LogSigner> {
        self.log.get().map(|s| s.as_ref())
    }

    /// The log's name (a checkpoint's origin line).
    pub fn origin(&self) -> &str {
        self.log_signer()
            .map_or(crate::config::DEFAULT_LOG_ORIGIN, |s| s.name())
    }

    /// Executes one command with the actor's metadata; on success waits until every read
    /// model has applied it, so an immediate GET shows its effect.
    pub async fn execute<A>(
        &self,
        framework: &Framework<A>,
        aggregate_id: Uuid,
        organization_id: Option<Uuid>,
        actor: &Actor,
        command: A::Command,
    ) -> Result<(), CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Error: std::error::Error,
        A::Command: std::fmt::Debug,
    {
        self.execute_guarded(
            framework,
            aggregate_id,
            organization_id,
            actor,
            None,
            command,
        )
        .await
    }

    /// [`App::execute_guarded`] as a future that owns what it needs (`framework` picks the
    /// aggregate's), so that it can run in a task of its own ([`crate::api::to_the_end`]).
    pub fn execute_owned<A>(
        &self,
        framework: fn(&Frameworks) -> &Framework<A>,
        aggregate_id: Uuid,
        organization_id: Option<Uuid>,
        actor: &Actor,
        guard: Option<Guard>,
        command: A::Command,
    ) -> impl std::future::Future<Output = Result<(), CommandError<A::Error>>> + Send + 'static
    where
        A: Aggregate<Services = ()> + 'static,
        A::Error: std::error::Error + Send,
        A::Command: std::fmt::Debug + Send,
    {
        let (app, actor) = (self.clone(), actor.clone());
        async move {
            let framework = framework(&app.cqrs);
            app.execute_guarded(
                framework,
                aggregate_id,
                organization_id,
                &actor,
                guard,
                command,
            )
            .await
        }
    }

    /// [`App::execute`] for a command decided against another aggregate's state: it is
    /// refused with [`CommandError::Stale`] if that aggregate changed before the append.
    pub async fn execute_guarded<A>(
        &self,
        framework: &Framework<A>,
        aggregate_id: Uuid,
        organization_id: Option<Uuid>,
        actor: &Actor,
        guard: Option<Guard>,
        command: A::Command,
    ) -> Result<(), CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Error: std::error::Error,
        A::Command: std::fmt::Debug,
    {
        let metadata = actor.metadata(organization_id, guard);
        // Held from the load to the append's answer, not while the read models catch up.
        // The latency metric starts once the turn is ours: it times the command, not the queue.
        let turn = self.aggregate_locks.lock(aggregate_id).await;
        let timer = crate::metrics::CommandTimer::start(A::TYPE, &command);
        let decided = framework
            .execute_with_metadata(&aggregate_id.to_string(), command, metadata)
            .await
            .map_err(CommandError::from);
        drop(turn);
        self.settled(timer, decided).await
    }

    /// [`App::execute_guarded`] for a command that creates aggregate `aggregate_id`, whose id
    /// the handler has just made (a post's message id, a new user's): with no events to
    /// load, cqrs-es's load (a round trip through the store's group loader) is skipped and
    /// the command is decided against the empty aggregate. Were the id taken after all, the append would
    /// refuse it as a conflict (its first sequence number is stored), as it refuses the
    /// second of two commands racing on one aggregate. Returns what was appended, so that
    /// the handler can answer without reading it back.
    pub async fn execute_fresh<A>(
        &self,
        aggregate_id: Uuid,
        organization_id: Option<Uuid>,
        actor: &Actor,
        guard: Option<Guard>,
        command: A::Command,
    ) -> Result<Created<A>, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Error: std::error::Error,
        A::Command: std::fmt::Debug,
    {
        let metadata = actor.metadata(organization_id, guard);
        let timer = crate::metrics::CommandTimer::start(A::TYPE, &command);
        let decided = self.create(aggregate_id, command, metadata).await;
        self.settled(timer, decided).await
    }

    /// Counts a command's outcome (`timer`); on success waits for the read models
    /// (read-your-writes).
    async fn settled<T, E: std::error::Error>(
        &self,
        timer: crate::metrics::CommandTimer,
        decided: Result<T, CommandError<E>>,
    ) -> Result<T, CommandError<E>> {
        timer.finish(&decided);
        let done = decided?;
        self.await_projections().await;
        Ok(done)
    }

    /// Decides `command` against the empty aggregate and appends its events with cqrs-es's
    /// envelopes and serialization, as `execute_with_metadata` does after a load that found
    /// nothing, except that a command deciding no event is an error here (cqrs-es would
    /// count it done). No query is dispatched: the frameworks have none (read models follow
    /// the log).
    async fn create<A>(
        &self,
        aggregate_id: Uuid,
        command: A::Command,
        metadata: HashMap<String, String>,
    ) -> Result<Created<A>, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Error: std::error::Error,
    {
        let mut aggregate = A::default();
        let sink = EventSink::default();
        aggregate
            .handle(command, &(), &sink)
            .await
            .map_err(CommandError::Rejected)?;
        let events = sink.collect().await;
        if events.is_empty() {
            // A creation that appends nothing created nothing: there is no answer to give.
            return Err(CommandError::Internal(format!(
                "a command on the new {} {aggregate_id} decided no event",
                A::TYPE
            )));
        }
        let envelopes: Vec<EventEnvelope<A>> = (1..)
            .zip(events)
            .map(|(sequence, payload)| EventEnvelope {
                aggregate_id: aggregate_id.to_string(),
                sequence,
                payload,
                metadata: metadata.clone(),
            })
            .collect();
        let serialized = envelopes
            .iter()
            .map(SerializedEvent::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CommandError::Internal(e.to_string()))?;
        let appended = self.store.append(&serialized).await?;
        Ok(Created {
            events: envelopes.into_iter().map(|e| e.payload).collect(),
            appended,
        })
    }

    /// Waits until the read models show everything committed so far by any process. A
    /// command refused as stale needs this before it decides again: the change that made
    /// it stale may have been committed by another `serve` process.
    pub async fn await_ledger(&self) {
        self.await_head().await;
    }

    /// [`App::await_ledger`] before an answer (a command that committed although it failed
    /// to say so): marked as behind when the read models do not show the log yet.
    pub async fn await_ledger_for_answer(&self) {
        if let Some((projector, head)) = self.await_head().await {
            mark_unless_reached(projector, head);
        }
    }

    /// Waits for the head committed by any process; returns the projector and that head.
    async fn await_head(&self) -> Option<(&ProjectorHandle, i64)> {
        let projector = self.projector.as_ref()?;
        let head: sqlx::Result<Option<i64>> =
            sqlx::query_scalar("SELECT max(position) FROM events")
                .fetch_one(&self.pool)
                .await;
        let local = *self.store.committed().borrow();
        let target = match head {
            Ok(head) => head.unwrap_or(0).max(local),
            Err(e) => {
                tracing::warn!(error = %e, "reading the ledger head failed; waiting for this process's commits only");
                local
            }
        };
        let waited = projector.wait(target, READ_YOUR_WRITES_TIMEOUT).await;
        self.say_wait(&waited, target, "deciding anyway");
        Some((projector, target))
    }

    /// Waits until the read models show everything this process has committed. When they
    /// do not (in time, or one far behind is not waited for), the answer says so
    /// ([`crate::api::READ_MODELS_BEHIND`]).
    pub async fn await_projections(&self) {
        if let Some(projector) = &self.projector {
            let target = *self.store.committed().borrow();
            let waited = projector.wait(target, READ_YOUR_WRITES_TIMEOUT).await;
            self.say_wait(&waited, target, "answering anyway");
            // Also when one far behind was not waited for (it is catching up).
            mark_unless_reached(projector, target);
        }
    }

    /// Whether every read model shows the log up to `position` (false without a projector
    /// in this process: then nothing here knows).
    pub fn read_models_show(&self, position: i64) -> bool {
        self.projector.as_ref().is_some_and(|p| p.reached(position))
    }

    /// Logs what a wait for the read models found: a timeout each time (it says the
    /// database or the projector is slow now), a stopped projection once per stop.
    fn say_wait(&self, waited: &Waited, position: i64, then: &str) {
        for (projection, stopped_at) in self.stops_said.new_in(waited) {
            tracing::warn!(
                projection,
                stopped_at,
                "read model stopped at a failure: commands {then} without waiting for it, \
                 said once for this stop (`ledgerline projections status` shows it)"
            );
        }
        if waited.timed_out {
            tracing::warn!(
                position,
                "read models did not all catch up in {} s; {then}",
                READ_YOUR_WRITES_TIMEOUT.as_secs()
            );
        }
    }

    /// Stops the background tasks after their current batch and releases their leases, so
    /// another process takes over at once.
    pub async fn shutdown(self) {
        let maintainer = self.maintainer.lock().expect("not poisoned").take();
        if let Some(m) = maintainer {
            m.shutdown().await;
        }
        if let Some(p) = &self.projector {
            p.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waited(stopped: &[(&'static str, i64)], timed_out: bool) -> Waited {
        Waited {
            stopped: stopped.to_vec(),
            timed_out,
        }
    }

    /// 2,400 commands while `users` is stopped say so once; the stop said again only when
    /// it is a new one.
    #[test]
    fn a_stop_is_said_once_while_it_lasts() {
        let said = StopsSaid::default();
        assert_eq!(
            said.new_in(&waited(&[("users", 10)], false)),
            [("users", 10)]
        );
        for _ in 0..2_400 {
            assert!(said.new_in(&waited(&[("users", 10)], false)).is_empty());
        }
        // Another projection stops too: only it is new.
        assert_eq!(
            said.new_in(&waited(&[("users", 10), ("roles", 12)], false)),
            [("roles", 12)]
        );
        // A timed-out wait may not have looked at `roles`: its stop is not taken as ended.
        assert!(said.new_in(&waited(&[("users", 10)], true)).is_empty());
        assert!(said
            .new_in(&waited(&[("users", 10), ("roles", 12)], false))
            .is_empty());
        // Retried and past it, then stopped again later: a new stop.
        assert!(said.new_in(&waited(&[], false)).is_empty());
        assert_eq!(
            said.new_in(&waited(&[("users", 10)], false)),
            [("users", 10)]
        );
        assert_eq!(
            said.new_in(&waited(&[("users", 15)], false)),
            [("users", 15)]
        );
    }
}
