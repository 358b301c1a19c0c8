//! `/v1/organizations/{org}/users`: invite, read, update, deactivate, reactivate, erase.
//! Personal data is validated and sealed here, opened only on the way out.

use std::collections::HashMap;

use axum::extract::State;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::user::{SealedEmail, SealedProfile, User, UserCommand};
use ledgerline_aggregates::{validate, Permission};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::departures;
use super::error::{naming_holder, ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::organizations::{self, Reason};
use super::owners::{keeping_an_owner, Loss};
use super::page::{self, PageQuery};
use super::OptionalJson;
use crate::app::App;
use crate::crypto::DataKey;

#[derive(Debug, sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    organization_id: Uuid,
    email_sealed: Option<String>,
    full_name_sealed: Option<String>,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A user as the API shows it: e-mail and name opened, or null once erased.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UserView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub email: Option<String>,
    pub full_name: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SELECT: &str =
    "SELECT id, organization_id, email_sealed, full_name_sealed, status, created_at, updated_at FROM users";

async fn open(app: &App, rows: Vec<UserRow>) -> ApiResult<Vec<UserView>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let keys: HashMap<Uuid, DataKey> = app.vault.keys(&app.pool, &ids).await?;
    Ok(rows
        .into_iter()
        .map(|r| UserView {
            email: r
                .email_sealed
                .and_then(|s| app.vault.open(&keys, "email", &s)),
            full_name: r
                .full_name_sealed
                .and_then(|s| app.vault.open(&keys, "full_name", &s)),
            id: r.id,
            organization_id: r.organization_id,
            status: r.status,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect())
}

/// The user, which must belong to `org`.
pub async fn find(app: &App, org: Uuid, id: Uuid) -> ApiResult<UserView> {
    let row: UserRow = sqlx::query_as(&format!("{SELECT} WHERE id = $1 AND organization_id = $2"))
        .bind(id)
        .bind(org)
        .fetch_optional(&app.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(open(app, vec![row]).await?.remove(0))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteUser {
    email: String,
    full_name: String,
}

/// Seals an address that `validate::email` has accepted, with its blind index.
fn seal_email(app: &App, key: &DataKey, org: Uuid, user: Uuid, email: &str) -> SealedEmail {
    SealedEmail {
        sealed: app.vault.seal(key, user, "email", email),
        blind_index: app.vault.blind_index(org, &validate::email_identity(email)),
    }
}

pub async fn invite(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Json(body): Json<InviteUser>,
) -> ApiResult<axum::response::Response> {
    caller.require_in(org, Permission::UsersWrite)?;
    organizations::find(&app, org).await?;
    // Validate before a key exists, so bad input leaves nothing behind.
    let email = validate::email(&body.email).map_err(ApiError::invalid)?;
    let full_name = validate::name("full_name", &body.full_name).map_err(ApiError::invalid)?;
    let id = Uuid::new_v4();
    // From the key's creation to its fate, in a task of its own: a client hanging up must not
    // stop the handler halfway and leave a key behind that protects nothing.
    let task = {
        let app = app.clone();
        super::to_the_end(async move {
            let key = app.vault.create_key(&app.pool, id, Some(org)).await?;
            let command = UserCommand::Invite {
                user_id: id,
                organization_id: org,
                profile: SealedProfile {
                    email: seal_email(&app, &key, org, id, &email),
                    full_name: app.vault.seal(&key, id, "full_name", &full_name),
                },
            };
            let Err(e) = app
                .execute_fresh::<User>(id, Some(org), &caller.actor, None, command)
                .await
            else {
                return Ok(());
            };
            // Destroying the key of a user that exists after all would shred its data for
            // good and keep its e-mail address claimed forever.
            if super::created(&app.pool, User::TYPE, id, org).await? {
                app.await_ledger_for_answer().await;
                return Ok(());
            }
            // The user never came to be: its key protects nothing.
            app.vault.destroy_key(&app.pool, id).await?;
            Err(naming_holder(&caller, Some(org), e))
        })
    };
    task.await?;
    super::created_answer(find(&app, org, id).await, id)
}

pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<UserView, String>>> {
    caller.require_in(org, Permission::UsersRead)?;
    let page = q.page::<(DateTime<Utc>, Uuid)>("users")?;
    organizations::find(&app, org).await?;
    let mut sql = page.of_organization(SELECT, org, "created_at, id");
    let mut rows: Vec<UserRow> = sql.build_query_as().fetch_all(&app.pool).await?;
    // Cut before opening: the extra row's keys are not read.
    let next_cursor = page.cut(&mut rows, |u| (u.created_at, u.id));
    Ok(page::answer(open(&app, rows).await?, next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<UserView>> {
    caller.require_in(org, Permission::UsersRead)?;
    Ok(axum::Json(find(&app, org, user).await?))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default, deserialize_with = "super::not_null")]
    #[schemars(transform = super::absent_not_null)]
    email: Option<String>,
    #[serde(default, deserialize_with = "super::not_null")]
    #[schemars(transform = super::absent_not_null)]
    full_name: Option<String>,
}

/// Changes the e-mail address, the full name or both. A field given with its current value
/// is left out; an update that would change nothing is refused and appends nothing.
pub async fn update(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
    Json(body): Json<UpdateUser>,
) -> ApiResult<axum::Json<UserView>> {
    caller.require_in(org, Permission::UsersWrite)?;
    let current = find(&app, org, user).await?;
    let keys = app.vault.keys(&app.pool, &[user]).await?;
    let key = keys
        .get(&user)
        .ok_or_else(|| ApiError::conflict("the user has been erased"))?;
    let email = body
        .email
        .as_deref()
        .map(validate::email)
        .transpose()
        .map_err(ApiError::invalid)?;
    let full_name = body
        .full_name
        .as_deref()
        .map(|n| validate::name("full_name", n))
        .transpose()
        .map_err(ApiError::invalid)?;
    // The aggregate holds only ciphertext (a fresh nonce each time): only here, with the
    // values opened, can an unchanged one be told apart.
    let unchanged = (email.is_some() && email == current.email)
        || (full_name.is_some() && full_name == current.full_name);
    let command = UserCommand::UpdateProfile {
        email: email
            .filter(|e| Some(e) != current.email.as_ref())
            .map(|e| seal_email(&app, key, org, user, &e)),
        full_name: full_name
            .filter(|n| Some(n) != current.full_name.as_ref())
            .map(|n| app.vault.seal(key, user, "full_name", &n)),
        unchanged,
    };
    app.execute(&app.cqrs.users, user, Some(org), &caller.actor, command)
        .await
        .map_err(|e| naming_holder(&caller, Some(org), e))?;
    Ok(axum::Json(find(&app, org, user).await?))
}

pub async fn deactivate(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
    body: OptionalJson<Reason>,
) -> ApiResult<axum::Json<UserView>> {
    let reason = body.0.unwrap_or_default().reason;
    change_status(&app, &caller, org, user, UserCommand::Deactivate { reason }).await
}

pub async fn reactivate(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<axum::Json<UserView>> {
    change_status(&app, &caller, org, user, UserCommand::Reactivate).await
}

/// Deactivating takes away all the user's roles grant, and reactivating gives it back: only
/// for a key that holds it all too, so that an admin can neither lock out the owner nor
/// bring back one that another owner deactivated. (A user key holds no more than its user's
/// roles grant, so one narrower than them cannot deactivate its own user either.)
async fn change_status(
    app: &App,
    caller: &Caller,
    org: Uuid,
    user: Uuid,
    command: UserCommand,
) -> ApiResult<axum::Json<UserView>> {
    caller.require_in(org, Permission::UsersWrite)?;
    find(app, org, user).await?;
    holds_all_they_hold(app, caller, user).await?;
    // Reactivating takes nothing away; the lock is only for what could.
    let deactivating = matches!(command, UserCommand::Deactivate { .. });
    let loss = deactivating.then_some(Loss::User(user));
    let change = app.execute_owned(|f| &f.users, user, Some(org), &caller.actor, None, command);
    let task = app.clone();
    // One task to the end, so a client hanging up stops neither the command nor the handing
    // on of what the user owned.
    super::to_the_end(async move {
        let outcome = keeping_an_owner(&task, org, loss, change).await;
        if deactivating {
            // Outside the organization's turn (its owners are not the conversations'), and
            // also after a refusal: a retry ("already deactivated") finishes a handing on cut
            // off before.
            settle(&task, org, user).await;
        }
        outcome
    })
    .await?;
    Ok(axum::Json(find(app, org, user).await?))
}

/// Hands on what a departed user had in conversations ([`departures::settle`]). Its failure
/// does not change the answer of the command that made them depart, which stands: the next
/// retry of it, or `serve`'s next start ([`departures::settle_all`]), finishes the work.
async fn settle(app: &App, org: Uuid, user: Uuid) {
    if let Err(e) = departures::settle(app, org, user).await {
        tracing::warn!(
            user = %user,
            error = e.message,
            "could not yet hand on the conversations of an erased or deactivated user; a \
             retry of the command or the next start finishes it"
        );
    }
}

/// 403 unless `caller` holds everything `user`'s roles grant.
async fn holds_all_they_hold(app: &App, caller: &Caller, user: Uuid) -> ApiResult<()> {
    let held = super::auth::user_permissions(&app.pool, user).await?;
    super::roles::check_grantable(caller, &held)
}

/// Erasure: the event is appended, and the users projection destroys the user's data key in
/// the same transaction that applies it, so every sealed copy becomes unreadable.
pub async fn erase(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<axum::Json<UserView>> {
    caller.require_in(org, Permission::UsersErase)?;
    find(&app, org, user).await?;
    // Erasing takes away more than deactivating does.
    holds_all_they_hold(&app, &caller, user).await?;
    // The turn, and the key's end after it, run in a task of its own, so a client hanging
    // up can neither leave an erased user's key in place nor end the organization's turn
    // early.
    let erase = app.execute_owned(
        |f| &f.users,
        user,
        Some(org),
        &caller.actor,
        None,
        UserCommand::Erase,
    );
    let task = app.clone();
    super::to_the_end(async move {
        let outcome = keeping_an_owner(&task, org, Some(Loss::User(user)), erase).await;
        // Also here, so the key is gone even while the users projection is behind or
        // stopped; and whenever the ledger holds the erasure, so that a retry ("already
        // erased") finishes an erasure whose answer was lost or whose handler stopped.
        if outcome.is_ok() || super::recorded(&task, User::TYPE, user, "UserErased").await? {
            task.vault.destroy_key(&task.pool, user).await?;
            super::idempotency::forget_answers_naming(&task.pool, user, &caller).await?;
        }
        // The erased user leaves their conversations, after the organization's turn (its
        // owners are not the conversations'); also after a retry refused as "already
        // erased", which so finishes an erasure cut off before.
        settle(&task, org, user).await;
        outcome
    })
    .await?;
    // Read after the key is gone: the answer never shows what was erased.
    Ok(axum::Json(find(&app, org, user).await?))
}
