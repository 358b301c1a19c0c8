//! The one error type of the HTTP API and its one JSON shape:
//! `{"error": {"status": 422, "code": "invalid", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cqrs_es::Aggregate;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::role::Role;
use ledgerline_aggregates::user::User;
use ledgerline_aggregates::{claims, Permission, Rejection};
use schemars::JsonSchema;
use serde::Serialize;
use uuid::Uuid;

use super::auth::Caller;
use crate::app::CommandError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    /// The cause goes to the log, never to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    /// The JSON body [`IntoResponse`] answers.
    pub fn json_body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("an error body serializes")
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                code: self.code(),
                message: self.message.clone(),
            },
        }
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::REQUEST_TIMEOUT => "timeout",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        }
    }
}

/// The one error shape of every answer that is not a success.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// The HTTP status again.
    pub status: u16,
    /// The status as a word (`not_found`, `invalid`, ...).
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

/// Something a rejected command can say about itself.
pub trait Rejectable: std::error::Error {
    fn rejection(&self) -> Rejection;
}

macro_rules! rejectable {
    ($($t:ty),*) => {$(
        impl Rejectable for $t {
            fn rejection(&self) -> Rejection {
                <$t>::rejection(self)
            }
        }
    )*};
}
rejectable!(
    ledgerline_aggregates::organization::OrganizationError,
    ledgerline_aggregates::user::UserError,
    ledgerline_aggregates::role::RoleError,
    ledgerline_aggregates::api_key::ApiKeyError,
    ledgerline_aggregates::conversation::ConversationError,
    ledgerline_aggregates::message::MessageError
);

/// What an answer says whose command may or may not have taken effect (its outcome lost,
/// or its time limit struck): how to find out before sending it again without a key.
pub(crate) const LOOK_FOR_IT: &str = "Look for it in the audit events (?request_id= this \
     answer's x-request-id) before sending it again";

impl<E: Rejectable> From<CommandError<E>> for ApiError {
    fn from(e: CommandError<E>) -> Self {
        match e {
            CommandError::Rejected(e) => {
                let status = match e.rejection() {
                    Rejection::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
                    Rejection::NotFound => StatusCode::NOT_FOUND,
                    Rejection::Conflict => StatusCode::CONFLICT,
                    Rejection::Forbidden => StatusCode::FORBIDDEN,
                };
                ApiError::new(status, e.to_string())
            }
            CommandError::Conflict | CommandError::Stale(_) | CommandError::ActorStopped(_) => {
                ApiError::conflict(e.to_string())
            }
            CommandError::KeyChanged => ApiError::unauthorized(e.to_string()),
            CommandError::Taken { scope, .. } => {
                ApiError::conflict(format!("{} is already taken", scope.replace('_', " ")))
            }
            CommandError::Unknown => {
                tracing::error!("a command's outcome is not known: its COMMIT's answer was lost");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e}. {LOOK_FOR_IT}"),
                )
            }
            CommandError::Internal(cause) => ApiError::internal(cause),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A command's refusal as [`From`] words it, except that a name, slug or address that is taken
/// names its holder (`user email is already taken by user <id>`) when `caller` may read that
/// holder: a client whose create's answer was lost learns what it made, without paging
/// through every user (whose addresses are sealed) to find it. Never another tenant's: an
/// e-mail address or role name is unique within `org` (its claim is keyed by it), so its holder
/// is of `org`, named to a key that may read users (roles) there; an organization's name and
/// slug are unique across the platform, so their holder is named only to a key that may read
/// that organization (the platform operator's; a tenant renaming its own onto another's name
/// learns only that it is taken).
pub fn naming_holder<E: Rejectable>(
    caller: &Caller,
    org: Option<Uuid>,
    e: CommandError<E>,
) -> ApiError {
    if let CommandError::Taken { scope, holder } = &e {
        if let Some(named) = readable_holder(caller, org, scope, holder) {
            return ApiError::conflict(format!(
                "{} is already taken by {named}",
                scope.replace('_', " ")
            ));
        }
    }
    ApiError::from(e)
}

/// `holder` (`<aggregate type>:<id>`) as `user <id>`, if `caller` may read it.
fn readable_holder(
    caller: &Caller,
    org: Option<Uuid>,
    scope: &str,
    holder: &str,
) -> Option<String> {
    let (kind, id) = holder.split_once(':')?;
    let id: Uuid = id.parse().ok()?;
    let (noun, tenant, permission) = match (scope, kind) {
        (claims::USER_EMAIL, User::TYPE) => ("user", org?, Permission::UsersRead),
        (claims::ROLE_NAME, Role::TYPE) => ("role", org?, Permission::RolesRead),
        (claims::ORGANIZATION_NAME | claims::ORGANIZATION_SLUG, Organization::TYPE) => {
            ("organization", id, Permission::OrganizationsRead)
        }
        _ => return None,
    };
    caller.require_in(tenant, permission).ok()?;
    Some(format!("{noun} {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::store::AppendError;
    use ledgerline_aggregates::user::UserError;

    /// A command whose COMMIT's answer was lost may be in the log: its 500 says so and how to
    /// find out, not the bare "internal error" of one that surely was not recorded.
    #[test]
    fn an_unknown_outcome_says_it_may_have_been_recorded() {
        let e = ApiError::from(CommandError::<UserError>::from(AppendError::Unknown));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("may have been"), "{}", e.message);
        assert!(e.message.contains("request_id"), "{}", e.message);
        let e = ApiError::from(CommandError::<UserError>::from(AppendError::WriterGone));
        assert_eq!(e.message, "internal error");
    }
}
