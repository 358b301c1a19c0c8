//! What an auditor can check from the log alone about who acted: that no request's command
//! was recorded after its actor lost the standing it was authenticated on (its key changed,
//! its user stopped, given or stripped of a role, one of its roles changed, its organization
//! suspended, `metadata::ACTOR_*`), after what it was decided against moved on
//! (`metadata::GUARD_*`), or at or after the end its key had then (`ACTOR_VALID_UNTIL`).
//!
//! The writer refuses such commands under its lock, deciding a batch's commands in the order
//! their events take in the log; this walks the log in that order and applies the same rules,
//! so a log the writer wrote shows none. One that does shows commands recorded by something
//! that did not guard them: a writer with a bug, or rows written past it. The chain check
//! says whether the log was changed since it was written; this says whether what it holds
//! was allowed when it was written. Each rule applies to the events whose metadata carries
//! it, so events written before a rule existed are held to the rules of their day (a role
//! given to the user counts for the events that also name their roles, written since both).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate as _;
use futures::TryStreamExt;
use ledgerline_aggregates::api_key::ApiKey;
use ledgerline_aggregates::metadata;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::role::Role;
use ledgerline_aggregates::user::User;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// One event, as far as the check reads it.
struct Seen<'a> {
    pub position: i64,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    /// The metadata as stored (JSON text).
    pub metadata: &'a str,
    pub recorded_at: DateTime<Utc>,
}

/// A command recorded though a rule its metadata carries says it should have been refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unguarded {
    /// The position of the command's first event.
    pub position: i64,
    pub why: String,
}

impl std::fmt::Display for Unguarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "position {}: {}", self.position, self.why)
    }
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Report {
    pub events: u64,
    /// Commands whose metadata carries at least one rule, or cannot be read.
    pub checked: u64,
    /// How many commands broke a rule, and the first [`KEPT`] of them.
    pub unguarded: u64,
    pub first: Vec<Unguarded>,
}

/// How many unguarded commands a report lists (it counts them all).
pub const KEPT: usize = 20;

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let commands = super::count(self.checked, "command", "commands");
        if self.checked == 0 {
            return write!(
                f,
                "actors: no command in the log carries a standing to check (none of a request \
                 since the guards were written)"
            );
        }
        if self.unguarded == 0 {
            return write!(
                f,
                "actors: {commands} of requests checked, none recorded after its actor lost \
                 its standing, after what it was decided against moved on, or past its key's end"
            );
        }
        write!(
            f,
            "UNGUARDED: {} of {commands} of requests recorded though the writer refuses such \
             commands (the first {}):",
            self.unguarded,
            self.first.len()
        )?;
        for u in &self.first {
            write!(f, "\n  {u}")?;
        }
        Ok(())
    }
}

/// An aggregate, compactly: its type interned, its id a UUID where it is one (every
/// aggregate ledgerline writes), so that a log of millions of aggregates fits in memory.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Aggregate {
    kind: u16,
    id: Id,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Id {
    Uuid(Uuid),
    Text(Box<str>),
}

/// The sequence of an aggregate's event and the position it holds in the log.
#[derive(Clone, Copy, Default)]
struct At {
    sequence: i64,
    position: i64,
}

/// What ends a standing, by the event types that do it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Loss {
    /// A user deactivated, erased or stripped of a role.
    UserStopped,
    /// A role given to a user (which may give one they hold again, with a nearer end).
    UserGiven,
    OrganizationSuspended,
    RoleChanged,
}

impl Loss {
    fn of(aggregate_type: &str, event_type: &str) -> Option<Loss> {
        match (aggregate_type, event_type) {
            (User::TYPE, "UserRoleAssigned") => Some(Loss::UserGiven),
            (User::TYPE, t) if metadata::ACTOR_USER_LOSSES.contains(&t) => Some(Loss::UserStopped),
            (Organization::TYPE, t) if metadata::ACTOR_ORGANIZATION_LOSSES.contains(&t) => {
                Some(Loss::OrganizationSuspended)
            }
            (Role::TYPE, t) if metadata::ACTOR_ROLE_LOSSES.contains(&t) => Some(Loss::RoleChanged),
            _ => None,
        }
    }
}

/// The command being read: its events follow one another on one aggregate with the same
/// metadata, and only its first is checked (its own events do not move its guards).
struct Current {
    aggregate: Aggregate,
    sequence: i64,
    metadata: Box<str>,
}

/// The walk's state: the last event so far of each aggregate a guard can name, and the last
/// event of each kind of loss of each user, organization and role.
#[derive(Default)]
struct StandingCheck {
    kinds: Vec<Box<str>>,
    /// The aggregate types whose last events are kept (`None`: all): API keys and those
    /// commands are decided against. Not messages, most of any log's aggregates.
    tracked: Option<HashSet<String>>,
    last: HashMap<Aggregate, At>,
    losses: HashMap<(Aggregate, Loss), At>,
    current: Option<Current>,
    report: Report,
}

impl StandingCheck {
    /// A walk that keeps every aggregate's last event.
    #[cfg(test)]
    fn new() -> Self {
        Self::default()
    }

    /// A walk that keeps the last events of API keys and of the aggregates of `decided_against`
    /// types only: a `guard_aggregate` of any other type then reads as never written to.
    fn tracking<'a>(decided_against: impl IntoIterator<Item = &'a str>) -> Self {
        let mut tracked: HashSet<String> = decided_against.into_iter().map(String::from).collect();
        tracked.insert(ApiKey::TYPE.into());
        Self {
            tracked: Some(tracked),
            ..Self::default()
        }
    }

    fn aggregate(&mut self, aggregate_type: &str, id: &str) -> Aggregate {
        let kind = match self.kinds.iter().position(|k| &**k == aggregate_type) {
            Some(k) => k,
            None => {
                self.kinds.push(aggregate_type.into());
                self.kinds.len() - 1
            }
        };
        // Only the form the writer stores (hyphenated, lower case) is taken as a UUID: the
        // log tells aggregates apart by the text of their ids.
        let canonical = id.len() == 36 && !id.bytes().any(|b| b.is_ascii_uppercase());
        let id = match Uuid::parse_str(id) {
            Ok(u) if canonical => Id::Uuid(u),
            _ => Id::Text(id.into()),
        };
        Aggregate {
            kind: kind as u16,
            id,
        }
    }

    /// Takes the log's next event (in position order).
    fn see(&mut self, e: &Seen<'_>) {
        self.report.events += 1;
        let aggregate = self.aggregate(e.aggregate_type, e.aggregate_id);
        let continues = self.current.as_ref().is_some_and(|c| {
            c.aggregate == aggregate && c.sequence + 1 == e.sequence && &*c.metadata == e.metadata
        });
        if !continues {
            let broken = self.broken_rules(e);
            if !broken.is_empty() {
                self.report.unguarded += 1;
                if self.report.first.len() < KEPT {
                    self.report.first.push(Unguarded {
                        position: e.position,
                        why: broken.join("; "),
                    });
                }
            }
        }
        let at = At {
            sequence: e.sequence,
            position: e.position,
        };
        if let Some(loss) = Loss::of(e.aggregate_type, e.event_type) {
            self.losses.insert((aggregate.clone(), loss), at);
        }
        if self
            .tracked
            .as_ref()
            .is_none_or(|t| t.contains(e.aggregate_type))
        {
            self.last.insert(aggregate.clone(), at);
        }
        self.current = Some(Current {
            aggregate,
            sequence: e.sequence,
            metadata: e.metadata.into(),
        });
    }

    fn finish(self) -> Report {
        self.report
    }

    /// The rules a command's first event carries that the log before it breaks, each said.
    fn broken_rules(&mut self, e: &Seen<'_>) -> Vec<String> {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(e.metadata) else {
            self.report.checked += 1;
            return vec!["its metadata is not a JSON object".into()];
        };
        let text = |key: &str| m.get(key).and_then(Value::as_str);
        // Where a standing sequence is, it must be a number and its id a UUID, which the
        // writer reads as such (so in its own spelling) and refuses otherwise.
        let standing = |sequence_key: &str, id_key: &str| {
            let sequence = text(sequence_key)?;
            Some(match text(id_key).map(Uuid::parse_str) {
                Some(Ok(id)) => {
                    read_sequence(sequence, sequence_key).map(|seq| (id.to_string(), seq))
                }
                _ => Err(format!(
                    "`{sequence_key}` without a readable `{id_key}`, which the writer refuses"
                )),
            })
        };
        let mut broken = Vec::new();
        let mut carried = false;
        let mut rule = |outcome: Result<Option<String>, String>| {
            carried = true;
            match outcome {
                Ok(None) => {}
                Ok(Some(why)) | Err(why) => broken.push(why),
            }
        };
        if let Some(key) = standing(metadata::ACTOR_KEY_SEQUENCE, metadata::ACTOR_KEY_ID) {
            rule(key.map(|(id, seq)| self.unmoved("its API key", ApiKey::TYPE, &id, seq)));
        }
        if let Some(user) = standing(metadata::ACTOR_USER_SEQUENCE, metadata::ACTOR_USER_ID) {
            rule(user.clone().map(|(id, seq)| {
                let lost = (User::TYPE, &*id, Loss::UserStopped);
                self.lost_after(
                    "its user was deactivated, erased or stripped of a role",
                    lost,
                    seq,
                )
            }));
            // A role given counts for the events that name their roles, written since both.
            if let (Ok((id, seq)), true) = (user, m.contains_key(metadata::ACTOR_ROLE_SEQUENCES)) {
                let lost = (User::TYPE, &*id, Loss::UserGiven);
                rule(Ok(self.lost_after("its user was given a role", lost, seq)));
            }
        }
        if let Some(org) = standing(
            metadata::ACTOR_ORGANIZATION_SEQUENCE,
            metadata::ORGANIZATION_ID,
        ) {
            rule(org.map(|(id, seq)| {
                let lost = (Organization::TYPE, &*id, Loss::OrganizationSuspended);
                self.lost_after("its organization was suspended", lost, seq)
            }));
        }
        if let Some(roles) = text(metadata::ACTOR_ROLE_SEQUENCES) {
            for role in metadata::role_sequences(roles) {
                rule(match role {
                    Ok((id, seq)) => Ok(self.lost_after(
                        "one of its user's roles was changed or deleted",
                        (Role::TYPE, &id.to_string(), Loss::RoleChanged),
                        seq,
                    )),
                    Err(part) => Err(format!(
                        "unreadable `{}` {part:?}",
                        metadata::ACTOR_ROLE_SEQUENCES
                    )),
                });
            }
        }
        match (
            text(metadata::GUARD_AGGREGATE),
            text(metadata::GUARD_SEQUENCE),
        ) {
            (Some(aggregate), Some(seq)) => rule(match aggregate.split_once(':') {
                Some((ty, id)) => read_sequence(seq, metadata::GUARD_SEQUENCE)
                    .map(|seq| self.unmoved("what it was decided against", ty, id, seq)),
                None => Err(format!(
                    "unreadable `{}` {aggregate:?}",
                    metadata::GUARD_AGGREGATE
                )),
            }),
            (None, None) => {}
            _ => rule(Err(format!(
                "`{}` without `{}`, or the other way, which the writer refuses",
                metadata::GUARD_AGGREGATE,
                metadata::GUARD_SEQUENCE
            ))),
        }
        if let Some(until) = text(metadata::ACTOR_VALID_UNTIL) {
            rule(match until.parse::<DateTime<Utc>>() {
                Ok(until) if e.recorded_at >= until => Ok(Some(format!(
                    "recorded at {} though its key's standing ended at {until} (`{}`)",
                    e.recorded_at,
                    metadata::ACTOR_VALID_UNTIL
                ))),
                Ok(_) => Ok(None),
                Err(_) => Err(format!(
                    "unreadable `{}` {until:?}",
                    metadata::ACTOR_VALID_UNTIL
                )),
            });
        }
        if carried {
            self.report.checked += 1;
        }
        broken
    }

    /// A guard moved by any event of its aggregate: the aggregate must stand at `seq`.
    fn unmoved(&mut self, what: &str, ty: &str, id: &str, seq: i64) -> Option<String> {
        let aggregate = self.aggregate(ty, id);
        let last = self.last.get(&aggregate).copied().unwrap_or_default();
        (last.sequence != seq).then(|| {
            format!(
                "{what} ({ty} {id}) stood at sequence {} (position {}), not at {seq} as when \
                 the command was authenticated or decided",
                last.sequence, last.position
            )
        })
    }

    /// A guard moved only by a kind of loss: the loss of `loss`'s kind of the aggregate after
    /// sequence `seq`, said, if there is one.
    fn lost_after(
        &mut self,
        what: &str,
        (ty, id, loss): (&str, &str, Loss),
        seq: i64,
    ) -> Option<String> {
        let aggregate = self.aggregate(ty, id);
        self.losses
            .get(&(aggregate, loss))
            .filter(|at| at.sequence > seq)
            .map(|at| {
                format!(
                    "{what} ({ty} {id}, sequence {} at position {}) after it was authenticated \
                     at sequence {seq}",
                    at.sequence, at.position
                )
            })
    }
}

/// A guard's sequence, as the writer reads it (refusing what is not a number).
fn read_sequence(text: &str, key: &str) -> Result<i64, String> {
    text.parse()
        .map_err(|_| format!("unreadable sequence {text:?} in `{key}`"))
}

/// Walks the database's log in position order, up to `head` (the position the chain check
/// verified to): first for the types commands were decided against, whose aggregates' last
/// events the walk must keep, then event by event.
pub async fn check_database(pool: &PgPool, head: i64) -> Result<Report, sqlx::Error> {
    let decided_against: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(metadata::jsonb ->> 'guard_aggregate', ':', 1)
         FROM events WHERE position <= $1 AND metadata::jsonb ? 'guard_aggregate'",
    )
    .bind(head)
    .fetch_all(pool)
    .await?;
    let mut check = StandingCheck::tracking(decided_against.iter().map(String::as_str));
    let mut rows = sqlx::query_as::<_, (i64, String, String, i64, String, String, DateTime<Utc>)>(
        "SELECT position, aggregate_type, aggregate_id, sequence, event_type, metadata::text, \
                recorded_at
         FROM events WHERE position <= $1 ORDER BY position",
    )
    .bind(head)
    .fetch(pool);
    while let Some((
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        metadata,
        recorded_at,
    )) = rows.try_next().await?
    {
        check.see(&Seen {
            position,
            aggregate_type: &aggregate_type,
            aggregate_id: &aggregate_id,
            sequence,
            event_type: &event_type,
            metadata: &metadata,
            recorded_at,
        });
    }
    Ok(check.finish())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Builds a log event by event, as the writer would have positioned them.
    struct Log {
        check: StandingCheck,
        position: i64,
        recorded_at: DateTime<Utc>,
    }

    const KEY: &str = "00000000-0000-0000-0000-00000000000a";
    const USER: &str = "00000000-0000-0000-0000-00000000000b";
    const ORG: &str = "00000000-0000-0000-0000-00000000000c";
    const ROLE: &str = "00000000-0000-0000-0000-00000000000d";
    const TALK: &str = "00000000-0000-0000-0000-00000000000e";

    impl Log {
        fn new() -> Self {
            Self {
                check: StandingCheck::new(),
                position: 0,
                recorded_at: "2026-12-08T00:00:00Z".parse().unwrap(),
            }
        }

        /// Appends a command's events (of one aggregate, from `sequence` on) with `metadata`.
        fn command(
            &mut self,
            (ty, id): (&str, &str),
            sequence: i64,
            types: &[&str],
            metadata: &Value,
        ) {
            let metadata = metadata.to_string();
            for (n, event_type) in types.iter().enumerate() {
                self.position += 1;
                self.check.see(&Seen {
                    position: self.position,
                    aggregate_type: ty,
                    aggregate_id: id,
                    sequence: sequence + n as i64,
                    event_type,
                    metadata: &metadata,
                    recorded_at: self.recorded_at,
                });
            }
        }

        fn system(&mut self, aggregate: (&str, &str), sequence: i64, event_type: &str) {
            self.command(
                aggregate,
                sequence,
                &[event_type],
                &json!({"actor_kind": "cli:test"}),
            );
        }

        /// The positions of the commands found unguarded so far.
        fn unguarded(&self) -> Vec<i64> {
            self.check.report.first.iter().map(|u| u.position).collect()
        }
    }

    /// A request's metadata: its key, user and organization at these sequences.
    fn acting(key: i64, user: i64, org: i64) -> Value {
        json!({"actor_kind": "api_key", "actor_key_id": KEY, "actor_key_sequence": key.to_string(),
               "actor_user_id": USER, "actor_user_sequence": user.to_string(),
               "organization_id": ORG, "actor_organization_sequence": org.to_string()})
    }

    fn with(mut metadata: Value, key: &str, value: &str) -> Value {
        metadata[key] = json!(value);
        metadata
    }

    /// Each rule the writer applies is found broken when the log shows a command recorded
    /// after what ends it, and not otherwise; a command's own events do not move its guards.
    #[test]
    fn a_command_recorded_after_its_actors_standing_was_lost_is_found() {
        let mut log = Log::new();
        log.system(("Organization", ORG), 1, "OrganizationCreated");
        log.system(("User", USER), 1, "UserInvited");
        log.system(("ApiKey", KEY), 1, "ApiKeyIssued");
        log.system(("Role", ROLE), 1, "RoleCreated");
        log.system(("Conversation", TALK), 1, "ConversationCreated");
        let talk = ("Conversation", TALK);
        // Standing intact; then the key rotating itself in two events of one command.
        log.command(talk, 2, &["ConversationUpdated"], &acting(1, 1, 1));
        log.command(
            ("ApiKey", KEY),
            2,
            &["ApiKeyRotated", "ApiKeyLabelled"],
            &acting(1, 1, 1),
        );
        assert_eq!(log.unguarded(), Vec::<i64>::new());
        // 9: the key moved on since (to 3).
        log.command(talk, 3, &["ConversationUpdated"], &acting(1, 1, 1));
        assert_eq!(log.unguarded(), [9]);

        log.system(("User", USER), 2, "UserRoleRevoked");
        log.system(("Organization", ORG), 2, "OrganizationSuspended");
        // 12: the user lost a role and the organization was suspended, both said.
        log.command(talk, 4, &["ConversationUpdated"], &acting(3, 1, 1));
        let said = &log.check.report.first[1].why;
        assert!(
            said.contains("stripped of a role") && said.contains("suspended"),
            "{said}"
        );
        // A new name of the organization or user does not end a standing.
        log.system(("Organization", ORG), 3, "OrganizationUpdated");
        log.system(("User", USER), 3, "UserProfileUpdated");
        log.command(talk, 5, &["ConversationUpdated"], &acting(3, 2, 2));
        assert_eq!(log.unguarded(), [9, 12]);

        // A role given: counted only for events that name their roles (written since).
        log.system(("User", USER), 4, "UserRoleAssigned");
        log.command(talk, 6, &["ConversationUpdated"], &acting(3, 3, 3));
        assert_eq!(log.unguarded(), [9, 12]);
        let under_role = |user: i64, role: i64| {
            with(
                acting(3, user, 3),
                metadata::ACTOR_ROLE_SEQUENCES,
                &format!("{ROLE}@{role}"),
            )
        };
        log.command(talk, 7, &["ConversationUpdated"], &under_role(3, 1));
        assert_eq!(log.unguarded(), [9, 12, 18]);
        log.system(("Role", ROLE), 2, "RoleUpdated");
        log.command(talk, 8, &["ConversationUpdated"], &under_role(4, 1));
        log.command(talk, 9, &["ConversationUpdated"], &under_role(4, 2));
        assert_eq!(log.unguarded(), [9, 12, 18, 20]);

        // What a command was decided against, and the end of its key's standing.
        let decided = |seq: &str| {
            let m = with(
                acting(3, 4, 3),
                metadata::GUARD_AGGREGATE,
                &format!("Conversation:{TALK}"),
            );
            with(m, metadata::GUARD_SEQUENCE, seq)
        };
        log.command(("Role", ROLE), 3, &["RoleUpdated"], &decided("9"));
        log.command(("Role", ROLE), 4, &["RoleUpdated"], &decided("8"));
        let ends = |at: &str| with(acting(3, 4, 3), metadata::ACTOR_VALID_UNTIL, at);
        log.command(
            talk,
            10,
            &["ConversationUpdated"],
            &ends("2026-12-08T00:00:00.000001Z"),
        );
        log.command(
            talk,
            11,
            &["ConversationUpdated"],
            &ends("2026-12-08T00:00:00Z"),
        );
        assert_eq!(log.unguarded(), [9, 12, 18, 20, 23, 25]);

        // What cannot be read is said, not passed over.
        log.command(
            talk,
            12,
            &["ConversationUpdated"],
            &with(acting(3, 4, 3), metadata::ACTOR_KEY_SEQUENCE, "three"),
        );
        log.position += 1;
        log.check.see(&Seen {
            position: log.position,
            aggregate_type: "Conversation",
            aggregate_id: TALK,
            sequence: 13,
            event_type: "ConversationUpdated",
            metadata: "[]",
            recorded_at: log.recorded_at,
        });
        // 28-30: what the writer refuses, a guard's half, a sequence without its id, a role
        // that is not a UUID, is said too.
        let guard_half = with(acting(3, 4, 3), metadata::GUARD_SEQUENCE, "9");
        log.command(talk, 14, &["ConversationUpdated"], &guard_half);
        let mut no_key = acting(3, 4, 3);
        no_key
            .as_object_mut()
            .unwrap()
            .remove(metadata::ACTOR_KEY_ID);
        log.command(talk, 15, &["ConversationUpdated"], &no_key);
        let not_a_role = with(acting(3, 4, 3), metadata::ACTOR_ROLE_SEQUENCES, "ops@1");
        log.command(talk, 16, &["ConversationUpdated"], &not_a_role);
        let report = log.check.finish();
        assert_eq!(report.unguarded, 11);
        let said = |n: usize, what: &str| {
            let why = &report.first[n].why;
            assert!(why.contains(what), "{n}: {why}");
        };
        said(6, "unreadable sequence");
        said(7, "not a JSON object");
        said(8, "without `guard_sequence`, or the other way");
        said(9, "`actor_key_sequence` without a readable `actor_key_id`");
        said(10, "unreadable `actor_role_sequences`");
        assert_eq!(report.events, 30);
        // Every command but the system's was judged.
        assert_eq!(report.checked, 18);
    }
}
