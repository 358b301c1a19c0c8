//! The keys of every event's metadata: who did it and how. The service layer writes them;
//! the ledger store reads the tenant from them; the audit projection copies them out.

/// The organization the event belongs to; absent for platform events.
pub const ORGANIZATION_ID: &str = "organization_id";
/// `api_key` for requests, `cli:bootstrap` (or another `cli:` command) for the CLI,
/// `system:erasure` (or another `system:` cause) for what the system appends as a request's
/// consequence, with that request's actor and id.
pub const ACTOR_KIND: &str = "actor_kind";
pub const ACTOR_USER_ID: &str = "actor_user_id";
pub const ACTOR_KEY_ID: &str = "actor_key_id";
/// The prefix of the secret the request presented (the organization's key lists show it):
/// which of the key's secrets acted, the current one or, in the grace period a rotation gave
/// it, the one rotated away. Events of requests made with an organization's keys since the
/// third release of 2026-12-07 (not the platform operator's, which rotate with no grace).
pub const ACTOR_KEY_PREFIX: &str = "actor_key_prefix";
pub const REQUEST_ID: &str = "request_id";
/// The `Idempotency-Key` the request was sent with, if any. Unlike the request id (the
/// client's `x-request-id`, which many requests may share), the key names one request of its
/// API key at a time: what a keyed request's failure looks for in the log.
pub const IDEMPOTENCY_KEY: &str = "idempotency_key";
pub const CLIENT_IP: &str = "client_ip";
pub const USER_AGENT: &str = "user_agent";

/// A guard: the command was decided against this aggregate (`<type>:<id>`) at sequence
/// `GUARD_SEQUENCE`; the ledger store refuses the append (409) if that aggregate has moved
/// on since. A message command is guarded by its conversation's version, so a post cannot
/// slip in after its author was removed or the conversation archived.
pub const GUARD_AGGREGATE: &str = "guard_aggregate";
pub const GUARD_SEQUENCE: &str = "guard_sequence";
/// The acting key's sequence when its request was authenticated (`ACTOR_KEY_ID` at this
/// sequence): the ledger store refuses the append (401) if the key has changed since, so
/// that nothing is recorded in the name of a key revoked or rotated while its request
/// waited (for a turn, a lock, a slow body). Requests' commands carry it; what the system
/// appends as a request's consequence (`system:` kinds) does not.
pub const ACTOR_KEY_SEQUENCE: &str = "actor_key_sequence";
/// A user key's user's sequence when its request was authenticated (`ACTOR_USER_ID` at this
/// sequence, read from the log): the ledger store refuses the append (409) if the user was
/// deactivated or erased, or given or lost a role ([`ACTOR_USER_LOSSES`]), since, so that
/// nothing is recorded in a user's name after one of those events. A role given counts
/// because giving a role again replaces its assignment, with a nearer expiry say, which
/// `ACTOR_VALID_UNTIL` did not know. Other changes of the user (a new name) do not refuse
/// it. Carried like `ACTOR_KEY_SEQUENCE`.
pub const ACTOR_USER_SEQUENCE: &str = "actor_user_sequence";
/// The user's events that refuse what their key's requests still had in flight.
pub const ACTOR_USER_LOSSES: [&str; 4] = [
    "UserDeactivated",
    "UserErased",
    "UserRoleAssigned",
    "UserRoleRevoked",
];
/// For an organization's key: the version of its organization (the event's `ORGANIZATION_ID`)
/// at which its request's authentication found no suspension pending (its read model's, which
/// may be behind the log's): the append is refused (409) if the organization was suspended
/// ([`ACTOR_ORGANIZATION_LOSSES`]) after it. Carried like `ACTOR_KEY_SEQUENCE`.
pub const ACTOR_ORGANIZATION_SEQUENCE: &str = "actor_organization_sequence";
/// The organization's events that refuse what its keys' requests still had in flight.
pub const ACTOR_ORGANIZATION_LOSSES: [&str; 1] = ["OrganizationSuspended"];
/// A user key's user's roles when its request was authenticated, with their ancestors: each
/// as `<role id>@<sequence>` (the role's last sequence in the log then), comma-separated,
/// ordered by id. The ledger store refuses the append (409) if one of them was changed or
/// deleted ([`ACTOR_ROLE_LOSSES`]) since, so that nothing is recorded on the authority of a
/// role after it was narrowed, re-parented or deleted. Any change counts, also one that takes
/// nothing away (a new name): which of the role's permissions a command needed is the
/// handler's to know, not the writer's. Carried like `ACTOR_KEY_SEQUENCE`, when the user
/// holds a role.
pub const ACTOR_ROLE_SEQUENCES: &str = "actor_role_sequences";
/// [`ACTOR_ROLE_SEQUENCES`] as written, from each role's id and sequence (in the order given,
/// which the caller makes the id's).
pub fn role_sequences_text(roles: &[(uuid::Uuid, i64)]) -> String {
    let parts: Vec<String> = roles
        .iter()
        .map(|(id, seq)| format!("{id}@{seq}"))
        .collect();
    parts.join(",")
}

/// [`ACTOR_ROLE_SEQUENCES`] read: each role's id and sequence, or the part that is not
/// `<uuid>@<sequence>` (an empty text is one such part). The writer and the auditor's check
/// read it alike.
pub fn role_sequences(text: &str) -> impl Iterator<Item = Result<(uuid::Uuid, i64), &str>> {
    text.split(',').map(|part| {
        let (id, seq) = part.split_once('@').ok_or(part)?;
        Ok((
            id.parse().map_err(|_| part)?,
            seq.parse().map_err(|_| part)?,
        ))
    })
}

/// A role's events that refuse what its holders' requests still had in flight: every event
/// of a role after its creation.
pub const ACTOR_ROLE_LOSSES: [&str; 2] = ["RoleUpdated", "RoleDeleted"];
/// When what the request was authenticated on stops holding, at the soonest: the acting
/// key's expiry, the end of the grace period of the secret it presented (a rotated-away one),
/// or the expiry of one of its user's role assignments (RFC 3339, microseconds, UTC; a year
/// past 9999 written `+10000-...`, as chrono does). The ledger store refuses the append (409)
/// if the event would be recorded at or after it, so that the log never shows a key acting
/// past the end it had when its request was authenticated (the event's `recorded_at` says
/// when it acted; an end made nearer meanwhile, by an assignment given again with a nearer
/// expiry, refuses it by `ACTOR_USER_SEQUENCE`). Carried like `ACTOR_KEY_SEQUENCE`, when any
/// of those ends is set.
pub const ACTOR_VALID_UNTIL: &str = "actor_valid_until";

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::{role_sequences, role_sequences_text};

    /// What the app writes reads back; any part not `<uuid>@<sequence>` is handed back as it
    /// is, for the writer to refuse and the auditor's check to name.
    #[test]
    fn role_sequences_read_back_and_bad_parts_are_named() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let text = role_sequences_text(&[(a, 3), (b, 1)]);
        assert_eq!(text, format!("{a}@3,{b}@1"));
        assert_eq!(
            role_sequences(&text).collect::<Vec<_>>(),
            [Ok((a, 3)), Ok((b, 1))]
        );
        for bad in [
            "",
            "x@1",
            &format!("{a}"),
            &format!("{a}@one"),
            &format!("{a}@1,"),
        ] {
            assert!(
                role_sequences(bad).any(|r| r.is_err()),
                "{bad:?} read as {:?}",
                role_sequences(bad).collect::<Vec<_>>()
            );
        }
    }
}
