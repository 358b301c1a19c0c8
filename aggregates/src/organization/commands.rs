//! Commands of the Organization aggregate. Fields arrive raw; the aggregate validates them.

use serde::Deserialize;
use uuid::Uuid;

#[derive(Debug, Clone, Deserialize)]
pub enum OrganizationCommand {
    Create {
        organization_id: Uuid,
        name: String,
        slug: String,
        country_code: Option<String>,
        domain: Option<String>,
        settings: serde_json::Map<String, serde_json::Value>,
    },
    /// `None` leaves a field as it is; `Some(None)` clears an optional field.
    Update {
        name: Option<String>,
        slug: Option<String>,
        country_code: Option<Option<String>>,
        domain: Option<Option<String>>,
        settings: Option<serde_json::Map<String, serde_json::Value>>,
    },
    Suspend {
        reason: Option<String>,
    },
    Reactivate,
}
