//! Uniqueness that spans aggregates (organization names and slugs, e-mail addresses and role
//! names within an organization, key prefixes) as claims the ledger store takes and releases
//! in the same transaction that appends the events. The claims are derived from the events
//! themselves, so no command can bypass them.

use serde_json::Value;

use crate::api_key::ApiKeyEvent;
use crate::organization::OrganizationEvent;
use crate::role::RoleEvent;
use crate::user::UserEvent;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClaimOp {
    /// Take `key` in `scope`; the command is refused if another owner holds it.
    Claim { scope: &'static str, key: String },
    /// Give `key` back, so that it may be claimed again.
    Release { scope: &'static str, key: String },
}

pub const ORGANIZATION_NAME: &str = "organization_name";
pub const ORGANIZATION_SLUG: &str = "organization_slug";
pub const USER_EMAIL: &str = "user_email";
pub const ROLE_NAME: &str = "role_name";
pub const API_KEY_PREFIX: &str = "api_key_prefix";
pub const PLATFORM_BOOTSTRAP: &str = "platform_bootstrap";

impl ClaimOp {
    pub fn scope(&self) -> &'static str {
        match self {
            ClaimOp::Claim { scope, .. } | ClaimOp::Release { scope, .. } => scope,
        }
    }
    pub fn key(&self) -> &str {
        match self {
            ClaimOp::Claim { key, .. } | ClaimOp::Release { key, .. } => key,
        }
    }
}

fn claim(scope: &'static str, key: impl Into<String>) -> ClaimOp {
    ClaimOp::Claim {
        scope,
        key: key.into(),
    }
}

fn release(scope: &'static str, key: impl Into<String>) -> ClaimOp {
    ClaimOp::Release {
        scope,
        key: key.into(),
    }
}

/// Names compare case-insensitively, so `Acme` and `acme` cannot both exist.
fn fold(name: &str) -> String {
    name.to_lowercase()
}

/// The aggregate types whose events take or release claims; [`claims_for`] gives nothing for
/// any other.
pub const CLAIMING_AGGREGATES: [&str; 4] = ["Organization", "User", "Role", "ApiKey"];

/// The claims one stored event takes and releases. `tenant` is the event's organization;
/// `aggregate_id` its aggregate (for events that do not repeat their tenant or name).
pub fn claims_for(
    aggregate_type: &str,
    tenant: Option<uuid::Uuid>,
    payload: &Value,
) -> Result<Vec<ClaimOp>, serde_json::Error> {
    let scoped = |k: &str| match tenant {
        Some(t) => format!("{t}:{k}"),
        None => k.to_string(),
    };
    Ok(match aggregate_type {
        "Organization" => match serde_json::from_value::<OrganizationEvent>(payload.clone())? {
            OrganizationEvent::OrganizationCreated { profile, .. } => vec![
                claim(ORGANIZATION_NAME, fold(&profile.name)),
                claim(ORGANIZATION_SLUG, profile.slug),
            ],
            OrganizationEvent::OrganizationUpdated { before, after } => {
                let mut ops = Vec::new();
                if fold(&before.name) != fold(&after.name) {
                    ops.push(release(ORGANIZATION_NAME, fold(&before.name)));
                    ops.push(claim(ORGANIZATION_NAME, fold(&after.name)));
                }
                if before.slug != after.slug {
                    ops.push(release(ORGANIZATION_SLUG, before.slug));
                    ops.push(claim(ORGANIZATION_SLUG, after.slug));
                }
                ops
            }
            _ => vec![],
        },
        "User" => match serde_json::from_value::<UserEvent>(payload.clone())? {
            UserEvent::UserInvited {
                email_blind_index, ..
            } => {
                vec![claim(USER_EMAIL, scoped(&email_blind_index))]
            }
            UserEvent::UserProfileUpdated {
                email_blind_index: Some(new),
                previous_email_blind_index: Some(old),
                ..
            } if new != old => vec![
                release(USER_EMAIL, scoped(&old)),
                claim(USER_EMAIL, scoped(&new)),
            ],
            UserEvent::UserErased { email_blind_index } => {
                vec![release(USER_EMAIL, scoped(&email_blind_index))]
            }
            _ => vec![],
        },
        "Role" => match serde_json::from_value::<RoleEvent>(payload.clone())? {
            RoleEvent::RoleCreated { spec, .. } => {
                vec![claim(ROLE_NAME, scoped(&fold(&spec.name)))]
            }
            RoleEvent::RoleUpdated { before, after } if fold(&before.name) != fold(&after.name) => {
                vec![
                    release(ROLE_NAME, scoped(&fold(&before.name))),
                    claim(ROLE_NAME, scoped(&fold(&after.name))),
                ]
            }
            RoleEvent::RoleDeleted { name } => vec![release(ROLE_NAME, scoped(&fold(&name)))],
            _ => vec![],
        },
        "ApiKey" => match serde_json::from_value::<ApiKeyEvent>(payload.clone())? {
            ApiKeyEvent::ApiKeyIssued {
                prefix, bootstrap, ..
            } => {
                let mut ops = vec![claim(API_KEY_PREFIX, prefix)];
                if bootstrap {
                    ops.push(claim(PLATFORM_BOOTSTRAP, "platform"));
                }
                ops
            }
            // The old prefix stays claimed: a prefix names one secret for ever.
            ApiKeyEvent::ApiKeyRotated { prefix, .. } => vec![claim(API_KEY_PREFIX, prefix)],
            _ => vec![],
        },
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::organization::OrganizationProfile;

    fn profile(name: &str, slug: &str) -> OrganizationProfile {
        OrganizationProfile {
            name: name.into(),
            slug: slug.into(),
            country_code: None,
            domain: None,
            settings: Default::default(),
        }
    }

    #[test]
    fn renaming_an_organization_releases_the_old_name_and_claims_the_new() {
        let ev = OrganizationEvent::OrganizationUpdated {
            before: profile("Acme", "acme"),
            after: profile("ACME Corp", "acme"),
        };
        let ops = claims_for("Organization", None, &serde_json::to_value(ev).unwrap()).unwrap();
        assert_eq!(
            ops,
            vec![
                release(ORGANIZATION_NAME, "acme"),
                claim(ORGANIZATION_NAME, "acme corp")
            ]
        );
    }

    #[test]
    fn role_names_are_scoped_to_their_organization() {
        let org = uuid::Uuid::nil();
        let ev = RoleEvent::RoleDeleted { name: "Ops".into() };
        let ops = claims_for("Role", Some(org), &serde_json::to_value(ev).unwrap()).unwrap();
        assert_eq!(ops, vec![release(ROLE_NAME, format!("{org}:ops"))]);
    }
}
