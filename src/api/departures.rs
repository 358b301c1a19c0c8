//! What a user's erasure or deactivation does to the conversations they take part in: an
//! erased user leaves every one, and a conversation owned by an erased or deactivated user
//! passes to the longest-standing participant who can act (`ConversationCommand::Withdraw`
//! decides whom). The events go through the Conversation aggregate, attributed to whoever
//! erased or deactivated the user, with `actor_kind` `system:erasure` or
//! `system:deactivation` and that command's request id, so the audit trail says why.
//!
//! [`settle`] makes a user's conversations agree with the status the log gives the user
//! now, so it is safe to run again: what is done already the aggregate refuses, appending
//! nothing. The erase and deactivate handlers run it after their command, also after one
//! refused as already done (finishing a run cut off before), and `serve` runs it at start
//! for every user the read models still show where they should not be ([`settle_all`]).

use std::collections::BTreeSet;

use cqrs_es::Aggregate;
use ledgerline_aggregates::conversation::{ConversationCommand, Departure};
use ledgerline_aggregates::metadata;
use ledgerline_aggregates::user::User;
use uuid::Uuid;

use super::ApiResult;
use crate::app::{Actor, App, CommandError};

/// How often a withdrawal is tried again when another command on the same conversation
/// was appended meanwhile.
const ATTEMPTS: usize = 3;

/// The user's departure as the log tells it now (the newest of their status events), and
/// the actor the events it entails are attributed to; `None` for an active user.
async fn departure(app: &App, user: Uuid) -> ApiResult<Option<(Departure, Actor)>> {
    let newest: Option<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT event_type, metadata::jsonb FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 \
           AND event_type IN ('UserDeactivated', 'UserReactivated', 'UserErased') \
         ORDER BY sequence DESC LIMIT 1",
    )
    .bind(User::TYPE)
    .bind(user.to_string())
    .fetch_optional(&app.pool)
    .await?;
    let Some((event_type, meta)) = newest else {
        return Ok(None);
    };
    let text = |key: &str| meta.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let id = |key: &str| text(key).and_then(|v| v.parse::<Uuid>().ok());
    let by = id(metadata::ACTOR_USER_ID);
    let (departure, cause) = match event_type.as_str() {
        "UserErased" => (Departure::Erased { by }, "erasure"),
        "UserDeactivated" => (Departure::Deactivated, "deactivation"),
        _ => return Ok(None),
    };
    // The request that erased or deactivated them, whoever runs this (a retry, `serve`):
    // these events are its consequence; the kind says the system appended them.
    let actor = Actor {
        kind: format!("system:{cause}"),
        user_id: by,
        key_id: id(metadata::ACTOR_KEY_ID),
        key_prefix: text(metadata::ACTOR_KEY_PREFIX),
        // The system carries out what the key asked for while it was good: not refused for
        // the key's later revocation, nor for the deactivation or erasure it carries out,
        // which stops the user it acts as.
        authenticated_at: None,
        request_id: text(metadata::REQUEST_ID).unwrap_or_else(|| Uuid::new_v4().to_string()),
        idempotency_key: text(metadata::IDEMPOTENCY_KEY),
        client_ip: text(metadata::CLIENT_IP),
        user_agent: text(metadata::USER_AGENT),
    };
    Ok(Some((departure, actor)))
}

/// Withdraws `user` of `org` from the conversations the read models show them in, as their
/// status in the log requires; answers how many conversations changed. An erased user
/// leaves all; a deactivated one hands on only what they own.
pub async fn settle(app: &App, org: Uuid, user: Uuid) -> ApiResult<usize> {
    let Some((departure, actor)) = departure(app, user).await? else {
        return Ok(0);
    };
    let erased = matches!(departure, Departure::Erased { .. });
    // The read models, which the command that changed the user's status waited for; a
    // conversation they do not show yet is the aggregate's to refuse or the next run's.
    let conversations: Vec<Uuid> = sqlx::query_scalar(
        "SELECT p.conversation_id FROM conversation_participants p \
         JOIN conversations c ON c.id = p.conversation_id \
         WHERE p.user_id = $1 AND c.organization_id = $2 AND ($3 OR p.role = 'owner') \
         ORDER BY p.conversation_id",
    )
    .bind(user)
    .bind(org)
    .bind(erased)
    .fetch_all(&app.pool)
    .await?;
    let mut changed = 0;
    for conversation in conversations {
        if withdraw(app, org, conversation, user, departure, &actor).await? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// One conversation's part of [`settle`]: whether it appended anything.
async fn withdraw(
    app: &App,
    org: Uuid,
    conversation: Uuid,
    user: Uuid,
    departure: Departure,
    actor: &Actor,
) -> ApiResult<bool> {
    let mut attempt = 1;
    loop {
        // Who can take ownership over: the participants who are active users, as adding
        // one or giving one a role requires.
        let able: BTreeSet<Uuid> = sqlx::query_scalar(
            "SELECT p.user_id FROM conversation_participants p \
             JOIN users u ON u.id = p.user_id \
             WHERE p.conversation_id = $1 AND p.user_id <> $2 AND u.status = 'active'",
        )
        .bind(conversation)
        .bind(user)
        .fetch_all(&app.pool)
        .await?
        .into_iter()
        .collect();
        if departure == Departure::Deactivated && able.is_empty() {
            // Nobody to hand it on to: the deactivated owner keeps it (and acts again if
            // reactivated). Not asked, so that `settle_all` does not ask at every start.
            return Ok(false);
        }
        let command = ConversationCommand::Withdraw {
            user_id: user,
            departure,
            able,
        };
        match app
            .execute(
                &app.cqrs.conversations,
                conversation,
                Some(org),
                actor,
                command,
            )
            .await
        {
            Ok(()) => return Ok(true),
            // Done already (not a participant, not the owner), or nobody can take over.
            Err(CommandError::Rejected(_)) => return Ok(false),
            Err(CommandError::Conflict) if attempt < ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// [`settle`] for every user the read models show where their status says they should not
/// be: erased users still listed as participants, deactivated users still owning a
/// conversation (kept when no one can take over). Run by `serve` as it starts, for
/// erasures and deactivations whose handler stopped before it finished and nobody retried,
/// and for those made before this rule. One user that cannot be settled now does not hold
/// back the others; answers how many conversations changed.
pub async fn settle_all(app: &App) -> ApiResult<usize> {
    let users: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT DISTINCT u.organization_id, u.id FROM users u \
         JOIN conversation_participants p ON p.user_id = u.id \
         WHERE u.status = 'erased' OR (u.status = 'deactivated' AND p.role = 'owner')",
    )
    .fetch_all(&app.pool)
    .await?;
    let mut changed = 0;
    for (org, user) in users {
        match settle(app, org, user).await {
            Ok(n) => changed += n,
            Err(e) => {
                tracing::warn!(user = %user, error = e.message, "could not settle the conversations of an erased or deactivated user");
            }
        }
    }
    Ok(changed)
}
