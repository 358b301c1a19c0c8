//! The set of projections, as an enum: each knows its stable name (the checkpoint key), the
//! tables it owns (what a rebuild truncates) and how to apply one event.

use sqlx::PgConnection;

use crate::give_up::BULK_FROM;
use crate::{
    api_keys, api_keys_batch, audit_events, messaging, messaging_batch, organizations, roles,
    roles_batch, user_roles, user_roles_batch, users, users_batch, ProjectionError, StoredEvent,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Organizations,
    Users,
    Roles,
    UserRoles,
    ApiKeys,
    Messaging,
    AuditEvents,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Organizations,
        Projection::Users,
        Projection::Roles,
        Projection::UserRoles,
        Projection::ApiKeys,
        Projection::Messaging,
        Projection::AuditEvents,
    ];

    /// Stable: it keys `projection_checkpoints` and `projection_failures`.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Organizations => organizations::NAME,
            Projection::Users => users::NAME,
            Projection::Roles => roles::NAME,
            Projection::UserRoles => user_roles::NAME,
            Projection::ApiKeys => api_keys::NAME,
            Projection::Messaging => messaging::NAME,
            Projection::AuditEvents => audit_events::NAME,
        }
    }

    /// The tables of all of `projections`, in their order.
    pub fn tables_of(projections: &[Projection]) -> Vec<&'static str> {
        projections
            .iter()
            .flat_map(|p| p.tables().iter().copied())
            .collect()
    }

    /// The read-model tables this projection alone writes.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Projection::Organizations => organizations::TABLES,
            Projection::Users => users::TABLES,
            Projection::Roles => roles::TABLES,
            Projection::UserRoles => user_roles::TABLES,
            Projection::ApiKeys => api_keys::TABLES,
            Projection::Messaging => messaging::TABLES,
            Projection::AuditEvents => audit_events::TABLES,
        }
    }

    /// What the projection reads: whole aggregate types, and single `Aggregate.EventType`s
    /// of others; `None` for everything. An event it does not read changes nothing in its
    /// tables ([`Projection::apply`] returns before decoding it), so the live projector passes
    /// over such events without a transaction (`tail.rs`) and `status` counts them as reached.
    pub fn read_set(self) -> Option<(&'static [&'static str], &'static [&'static str])> {
        Some(match self {
            Projection::Organizations => (&["Organization"], &[]),
            Projection::Users => (&["User"], &[]),
            Projection::Roles => (&["Role"], &[]),
            Projection::UserRoles => (&["User", "Role"], &[]),
            Projection::ApiKeys => (&["ApiKey"], &[]),
            // Erasure drops the author's message keys; no other user event matters.
            Projection::Messaging => (&["Conversation", "Message"], &["User.UserErased"]),
            Projection::AuditEvents => return None,
        })
    }

    /// Whether the projection reads an event of this aggregate and event type
    /// ([`Projection::read_set`]).
    pub fn reads(self, aggregate_type: &str, event_type: &str) -> bool {
        let Some((aggregates, events)) = self.read_set() else {
            return true;
        };
        aggregates.contains(&aggregate_type)
            || events.iter().any(|e| {
                e.split_once('.')
                    .is_some_and(|(a, t)| a == aggregate_type && t == event_type)
            })
    }

    /// This projection's bit in a mask of projections (its index in [`Projection::ALL`]).
    pub(crate) fn bit(self) -> u8 {
        1 << self.index()
    }

    /// Its place in [`Projection::ALL`].
    pub(crate) fn index(self) -> usize {
        Projection::ALL
            .iter()
            .position(|p| *p == self)
            .expect("every projection is in ALL")
    }

    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Applies `events` in order inside the caller's transaction; on failure, the index of
    /// the failing event and why. All but `organizations` (a small share of any log) apply a
    /// long batch with a few multi-row statements.
    pub async fn apply_many(
        self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), (usize, ProjectionError)> {
        #[cfg(feature = "fault-injection")]
        crate::fault::check(self, events, crate::fault::When::BeforeWriting);
        #[cfg(feature = "fault-injection")]
        crate::fault::hang(self, conn, events).await;
        #[cfg(feature = "fault-injection")]
        let applied = crate::fault::cutting_copy(self, events, self.apply_all(conn, events)).await;
        #[cfg(not(feature = "fault-injection"))]
        let applied = self.apply_all(conn, events).await;
        #[cfg(feature = "fault-injection")]
        if applied.is_ok() {
            crate::fault::check(self, events, crate::fault::When::AfterWriting);
        }
        applied
    }

    async fn apply_all(
        self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), (usize, ProjectionError)> {
        let folded = match self {
            Projection::AuditEvents => return audit_events::apply_many(conn, events).await,
            _ if events.len() < BULK_FROM => None,
            Projection::Messaging => Some(messaging_batch::bulk(conn, events).await),
            Projection::Users => Some(users_batch::bulk(conn, events).await),
            Projection::UserRoles => Some(user_roles_batch::bulk(conn, events).await),
            Projection::Roles => Some(roles_batch::bulk(conn, events).await),
            Projection::ApiKeys => Some(api_keys_batch::bulk(conn, events).await),
            _ => None,
        };
        match folded {
            Some(Ok(())) => return Ok(()),
            // The per-event code, the definition, says what is wrong, if anything.
            Some(Err(why)) => crate::note_bulk_fallback(self.name(), &why),
            None => {}
        }
        for (index, event) in events.iter().enumerate() {
            self.apply(conn, event).await.map_err(|e| (index, e))?;
        }
        Ok(())
    }

    /// Applies one event inside the caller's transaction. Events the projection does not
    /// read ([`Projection::reads`]) are accepted and change nothing.
    pub async fn apply(
        self,
        conn: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !self.reads(&event.aggregate_type, &event.event_type) {
            return Ok(());
        }
        match self {
            Projection::Organizations => organizations::apply(conn, event).await,
            Projection::Users => users::apply(conn, event).await,
            Projection::Roles => roles::apply(conn, event).await,
            Projection::UserRoles => user_roles::apply(conn, event).await,
            Projection::ApiKeys => api_keys::apply(conn, event).await,
            Projection::Messaging => messaging::apply(conn, event).await,
            Projection::AuditEvents => audit_events::apply(conn, event).await,
        }
    }
}
