//! The set of projections, as an enum: each knows its stable name (the checkpoint key), the
//! tables it owns (what a rebuild truncates) and how to apply one event.

use sqlx::PgConnection;

use crate::{
    api_keys, audit_events, messaging, messaging_batch, organizations, roles, user_roles, users,
    ProjectionError, StoredEvent,
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

    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Applies `events` in order inside the caller's transaction; on failure, the index of
    /// the failing event and why. `audit_events` and `messaging` apply a long batch with a
    /// few multi-row statements; the others (a small share of any log) one event at a time.
    pub async fn apply_many(
        self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), (usize, ProjectionError)> {
        match self {
            Projection::AuditEvents => return audit_events::apply_many(conn, events).await,
            Projection::Messaging => return messaging_batch::apply_many(conn, events).await,
            _ => {}
        }
        for (index, event) in events.iter().enumerate() {
            self.apply(conn, event).await.map_err(|e| (index, e))?;
        }
        Ok(())
    }

    /// Applies one event inside the caller's transaction. Events of aggregate types the
    /// projection does not read are accepted and change nothing.
    pub async fn apply(
        self,
        conn: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
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
