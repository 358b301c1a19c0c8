//! A mixed log, written through the HTTP API the way an organization's people and
//! integrations would: many organizations, each with users, roles, keys and conversations,
//! then traffic that is mostly messaging (posts, reactions, read marks, edits, deletions)
//! with the occasional membership, role, key and profile change.
//!
//! Each seeding task owns whole organizations, so no two requests ever race for the same
//! aggregate or conversation: every request has one right answer, and any other status
//! fails the seeding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::api::Api;

const WORDS: [&str; 24] = [
    "deploy",
    "rollback",
    "ticket",
    "review",
    "standup",
    "budget",
    "invoice",
    "draft",
    "release",
    "migration",
    "customer",
    "meeting",
    "tomorrow",
    "friday",
    "agreed",
    "blocked",
    "shipped",
    "question",
    "numbers",
    "latency",
    "database",
    "design",
    "lunch",
    "thanks",
];

/// A chat message of 40 to ~250 bytes.
pub fn content(rng: &mut StdRng) -> String {
    let n = rng.gen_range(6..36);
    let words: Vec<&str> = (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect();
    words.join(" ")
}

const EMOJI: [&str; 6] = ["👍", "🎉", "❤️", "😂", "👀", "🚀"];
/// Members (with a key each) and bystanders (invited, no key) an organization starts with.
const MEMBERS: usize = 8;
const BYSTANDERS: usize = 3;
const CONVERSATIONS: usize = 3;
/// Reactions, edits and deletions pick among a conversation's newest messages.
const RECENT: usize = 40;

/// What to seed.
pub struct Plan {
    /// Seeding stops once the ledger's head has reached this position.
    pub target: i64,
    pub tasks: usize,
    pub organizations: usize,
    /// Makes this seeding's slugs and e-mail addresses its own, so that a ledger can be
    /// seeded again on top of an earlier seeding.
    pub tag: String,
    pub seed: u64,
}

/// What the seeding did: requests answered as expected, by kind.
#[derive(Default)]
pub struct Seeded {
    pub requests: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl Seeded {
    pub fn count(&self, kind: &str) -> u64 {
        self.requests.get(kind).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// Seeds until the head reaches `plan.target`, printing progress every 30 s. The app behind
/// `api` must run its projector: requests read what earlier ones wrote.
pub async fn seed(
    api: &Api,
    admin_key: &str,
    pool: &PgPool,
    plan: &Plan,
) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn(watch_head(pool.clone(), plan.target, Arc::clone(&stop)));
    let mut tasks = JoinSet::new();
    for t in 0..plan.tasks.max(1) {
        let orgs: Vec<usize> = (t..plan.organizations.max(plan.tasks))
            .step_by(plan.tasks.max(1))
            .collect();
        let seeder = Seeder {
            api: api.clone(),
            admin: admin_key.to_string(),
            rng: StdRng::seed_from_u64(plan.seed.wrapping_add(t as u64)),
            tag: plan.tag.clone(),
            requests: BTreeMap::new(),
            names: 0,
        };
        tasks.spawn(seeder.run(orgs, Arc::clone(&stop)));
    }
    let mut seeded = Seeded::default();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a seeding task panicked").and_then(|r| r) {
            Ok(requests) => {
                for (kind, n) in requests {
                    *seeded.requests.entry(kind).or_default() += n;
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    monitor.abort();
    if let Some(e) = failure {
        return Err(e);
    }
    seeded.elapsed = started.elapsed();
    Ok(seeded)
}

async fn watch_head(pool: PgPool, target: i64, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let started = Instant::now();
    let first = head(&pool).await?;
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = head(&pool).await?;
        if now >= target {
            stop.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "  seeding: head {now} of {target}, {:.0} events/s over {secs:.0} s",
                (now - first) as f64 / secs.max(1e-9)
            );
        }
    }
}

pub async fn head(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::bigint FROM events")
        .fetch_one(pool)
        .await
}

struct Member {
    id: Uuid,
    key: String,
}

struct Bystander {
    id: Uuid,
    active: bool,
}

struct Participant {
    member: usize,
    admin: bool,
    muted: bool,
    /// Messages (indexes into `Conversation::messages`) up to here are marked read.
    read: usize,
}

struct Message {
    id: Uuid,
    author: usize,
    deleted: bool,
    /// (member, emoji index)
    reactions: Vec<(usize, usize)>,
}

struct Conversation {
    id: Uuid,
    owner: usize,
    participants: Vec<Participant>,
    messages: Vec<Message>,
}

impl Conversation {
    fn takes_part(&self, member: usize) -> bool {
        self.participants.iter().any(|p| p.member == member)
    }

    /// A random message among the newest that is not deleted and satisfies `ok`.
    fn recent(&self, rng: &mut StdRng, ok: impl Fn(&Message) -> bool) -> Option<usize> {
        let from = self.messages.len().saturating_sub(RECENT);
        let candidates: Vec<usize> = (from..self.messages.len())
            .filter(|&i| !self.messages[i].deleted && ok(&self.messages[i]))
            .collect();
        candidates.choose(rng).copied()
    }
}

struct Org {
    id: Uuid,
    index: usize,
    member_role: Uuid,
    members: Vec<Member>,
    bystanders: Vec<Bystander>,
    roles: Vec<Uuid>,
    /// (member, index into `roles`) of the custom roles assigned.
    assigned: Vec<(usize, usize)>,
    service_keys: Vec<Uuid>,
    conversations: Vec<Conversation>,
}

impl Org {
    fn path(&self, rest: &str) -> String {
        format!("/v1/organizations/{}{rest}", self.id)
    }

    fn conversation_path(&self, c: usize, rest: &str) -> String {
        self.path(&format!(
            "/conversations/{}{rest}",
            self.conversations[c].id
        ))
    }
}

/// What a seeding task does, with weights (per 1,000 operations). An operation that has
/// nothing to act on (no reaction to take back, say) posts instead.
#[derive(Clone, Copy)]
enum Op {
    Post,
    React,
    Unreact,
    MarkRead,
    Edit,
    Delete,
    AddParticipant,
    RemoveParticipant,
    ChangeRole,
    Mute,
    UpdateConversation,
    ArchiveAndUnarchive,
    CreateConversation,
    UpdateUser,
    AssignRole,
    RevokeRole,
    CreateRole,
    UpdateRole,
    IssueKey,
    RotateKey,
    RevokeKey,
    DeactivateOrReactivate,
    Invite,
    UpdateOrganization,
}

const OPS: [(Op, u32); 24] = [
    (Op::Post, 560),
    (Op::React, 125),
    (Op::Unreact, 10),
    (Op::MarkRead, 125),
    (Op::Edit, 50),
    (Op::Delete, 20),
    (Op::AddParticipant, 8),
    (Op::RemoveParticipant, 6),
    (Op::ChangeRole, 4),
    (Op::Mute, 4),
    (Op::UpdateConversation, 4),
    (Op::ArchiveAndUnarchive, 2),
    (Op::CreateConversation, 3),
    (Op::UpdateUser, 20),
    (Op::AssignRole, 12),
    (Op::RevokeRole, 8),
    (Op::CreateRole, 3),
    (Op::UpdateRole, 3),
    (Op::IssueKey, 4),
    (Op::RotateKey, 4),
    (Op::RevokeKey, 2),
    (Op::DeactivateOrReactivate, 4),
    (Op::Invite, 6),
    (Op::UpdateOrganization, 1),
];

struct Seeder {
    api: Api,
    admin: String,
    rng: StdRng,
    tag: String,
    requests: BTreeMap<&'static str, u64>,
    /// For unique names within this task.
    names: usize,
}

impl Seeder {
    async fn run(
        mut self,
        org_indexes: Vec<usize>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut orgs = Vec::new();
        for index in org_indexes {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            orgs.push(self.set_up(index).await?);
        }
        let total: u32 = OPS.iter().map(|(_, w)| w).sum();
        while !orgs.is_empty() && !stop.load(Ordering::Relaxed) {
            let o = self.rng.gen_range(0..orgs.len());
            let mut pick = self.rng.gen_range(0..total);
            let op = OPS
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or(Op::Post, |(op, _)| *op);
            self.step(&mut orgs[o], op).await?;
        }
        Ok(self.requests)
    }

    /// One request of kind `kind`, answered with `status`, or an error.
    async fn call(
        &mut self,
        kind: &'static str,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Value,
        status: u16,
    ) -> anyhow::Result<Value> {
        let key = key.unwrap_or(&self.admin).to_string();
        let body = (!body.is_null()).then_some(body);
        let answer = self
            .api
            .expect(method, path, &key, body.as_ref(), status)
            .await?;
        *self.requests.entry(kind).or_default() += 1;
        Ok(answer)
    }

    fn id(answer: &Value) -> anyhow::Result<Uuid> {
        Ok(answer["id"]
            .as_str()
            .with_context(|| format!("an id in {answer}"))?
            .parse()?)
    }

    fn name(&mut self) -> usize {
        self.names += 1;
        self.names
    }

    async fn invite(&mut self, org: &Org) -> anyhow::Result<Uuid> {
        let n = self.name();
        let email = format!("p{n}.{}.{}@org{}.example", self.tag, org.index, org.index);
        let answer = self
            .call(
                "invite user",
                Method::POST,
                &org.path("/users"),
                None,
                json!({"email": email, "full_name": format!("Person {n} of org {}", org.index)}),
                201,
            )
            .await?;
        Self::id(&answer)
    }

    /// Invites a user, gives them the `member` role and a key of their own.
    async fn add_member(&mut self, org: &mut Org) -> anyhow::Result<()> {
        let id = self.invite(org).await?;
        self.call(
            "assign role",
            Method::PUT,
            &org.path(&format!("/users/{id}/roles/{}", org.member_role)),
            None,
            json!({}),
            200,
        )
        .await?;
        let perms = ledgerline_aggregates::organization::built_in_roles::permissions("member")
            .context("member permissions")?;
        let key = self
            .call(
                "issue key",
                Method::POST,
                &org.path("/api-keys"),
                None,
                json!({"label": "laptop", "permissions": perms, "user_id": id}),
                201,
            )
            .await?;
        let key = key["secret"].as_str().context("a secret")?.to_string();
        org.members.push(Member { id, key });
        Ok(())
    }

    async fn set_up(&mut self, index: usize) -> anyhow::Result<Org> {
        let answer = self
            .call(
                "create organization",
                Method::POST,
                "/v1/organizations",
                None,
                json!({"name": format!("Bench {} {index}", self.tag), "slug": format!("bench-{}-{index}", self.tag)}),
                201,
            )
            .await?;
        let id = Self::id(&answer)?;
        let roles = self
            .call(
                "list roles",
                Method::GET,
                &format!("/v1/organizations/{id}/roles"),
                None,
                Value::Null,
                200,
            )
            .await?;
        let member_role = roles["items"]
            .as_array()
            .context("roles")?
            .iter()
            .find(|r| r["name"] == "member")
            .map(Self::id)
            .context("the built-in member role")??;
        let mut org = Org {
            id,
            index,
            member_role,
            members: Vec::new(),
            bystanders: Vec::new(),
            roles: Vec::new(),
            assigned: Vec::new(),
            service_keys: Vec::new(),
            conversations: Vec::new(),
        };
        for _ in 0..MEMBERS {
            self.add_member(&mut org).await?;
        }
        for _ in 0..BYSTANDERS {
            let id = self.invite(&org).await?;
            org.bystanders.push(Bystander { id, active: true });
        }
        for _ in 0..2 {
            self.create_role(&mut org).await?;
        }
        self.issue_key(&mut org).await?;
        for _ in 0..CONVERSATIONS {
            self.create_conversation(&mut org).await?;
        }
        Ok(org)
    }

    async fn create_role(&mut self, org: &mut Org) -> anyhow::Result<()> {
        let n = self.name();
        let perms = self.permissions();
        let answer = self
            .call(
                "create role",
                Method::POST,
                &org.path("/roles"),
                None,
                json!({"name": format!("team {n}"), "description": "a team's extra rights", "permissions": perms}),
                201,
            )
            .await?;
        org.roles.push(Self::id(&answer)?);
        Ok(())
    }

    fn permissions(&mut self) -> Vec<&'static str> {
        let all = ["users:read", "roles:read", "keys:read", "audit:read"];
        let n = self.rng.gen_range(1..=all.len());
        all.choose_multiple(&mut self.rng, n).copied().collect()
    }

    async fn issue_key(&mut self, org: &mut Org) -> anyhow::Result<()> {
        let answer = self
            .call(
                "issue key",
                Method::POST,
                &org.path("/api-keys"),
                None,
                json!({"label": "integration", "permissions": ["conversations:read", "conversations:write", "users:read"]}),
                201,
            )
            .await?;
        org.service_keys.push(Self::id(&answer)?);
        Ok(())
    }

    /// A group conversation of 3 to 6 members, created by its owner's own key.
    async fn create_conversation(&mut self, org: &mut Org) -> anyhow::Result<()> {
        let size = self.rng.gen_range(3..=6).min(org.members.len());
        let mut chosen: Vec<usize> = (0..org.members.len()).collect();
        chosen.shuffle(&mut self.rng);
        chosen.truncate(size);
        let owner = chosen[0];
        let others: Vec<Uuid> = chosen[1..].iter().map(|&m| org.members[m].id).collect();
        let n = self.name();
        let key = org.members[owner].key.clone();
        let answer = self
            .call(
                "create conversation",
                Method::POST,
                &org.path("/conversations"),
                Some(&key),
                json!({"kind": "group", "title": format!("Project {n}"), "participants": others}),
                201,
            )
            .await?;
        org.conversations.push(Conversation {
            id: Self::id(&answer)?,
            owner,
            participants: chosen
                .iter()
                .map(|&member| Participant {
                    member,
                    admin: false,
                    muted: false,
                    read: 0,
                })
                .collect(),
            messages: Vec::new(),
        });
        Ok(())
    }

    async fn step(&mut self, org: &mut Org, op: Op) -> anyhow::Result<()> {
        let c = self.rng.gen_range(0..org.conversations.len());
        let done = match op {
            Op::Post => false,
            Op::React => self.react(org, c).await?,
            Op::Unreact => self.unreact(org, c).await?,
            Op::MarkRead => self.mark_read(org, c).await?,
            Op::Edit => self.edit(org, c).await?,
            Op::Delete => self.delete(org, c).await?,
            Op::AddParticipant => self.add_participant(org, c).await?,
            Op::RemoveParticipant => self.remove_participant(org, c).await?,
            Op::ChangeRole => self.change_role(org, c).await?,
            Op::Mute => self.mute(org, c).await?,
            Op::UpdateConversation => {
                let n = self.name();
                let path = org.conversation_path(c, "");
                let description = content(&mut self.rng);
                self.call(
                    "update conversation",
                    Method::PATCH,
                    &path,
                    None,
                    json!({"title": format!("Project {n}"), "description": description}),
                    200,
                )
                .await?;
                true
            }
            Op::ArchiveAndUnarchive => {
                for what in ["archive", "unarchive"] {
                    let path = org.conversation_path(c, &format!("/{what}"));
                    let kind = if what == "archive" {
                        "archive conversation"
                    } else {
                        "unarchive conversation"
                    };
                    self.call(kind, Method::POST, &path, None, json!({}), 200)
                        .await?;
                }
                true
            }
            Op::CreateConversation => {
                self.create_conversation(org).await?;
                true
            }
            Op::UpdateUser => {
                let n = self.name();
                let id = self.any_user(org);
                self.call(
                    "update user",
                    Method::PATCH,
                    &org.path(&format!("/users/{id}")),
                    None,
                    json!({"full_name": format!("Person {n}, renamed")}),
                    200,
                )
                .await?;
                true
            }
            Op::AssignRole => self.assign_role(org).await?,
            Op::RevokeRole => self.revoke_role(org).await?,
            Op::CreateRole => {
                self.create_role(org).await?;
                true
            }
            Op::UpdateRole => {
                let role = *org.roles.choose(&mut self.rng).context("a custom role")?;
                let perms = self.permissions();
                let n = self.name();
                self.call(
                    "update role",
                    Method::PATCH,
                    &org.path(&format!("/roles/{role}")),
                    None,
                    json!({"description": format!("revision {n}"), "permissions": perms}),
                    200,
                )
                .await?;
                true
            }
            Op::IssueKey => {
                self.issue_key(org).await?;
                true
            }
            Op::RotateKey => {
                let key = *org.service_keys.choose(&mut self.rng).context("a key")?;
                self.call(
                    "rotate key",
                    Method::POST,
                    &org.path(&format!("/api-keys/{key}/rotate")),
                    None,
                    json!({}),
                    200,
                )
                .await?;
                true
            }
            Op::RevokeKey => self.revoke_key(org).await?,
            Op::DeactivateOrReactivate => {
                let b = self.rng.gen_range(0..org.bystanders.len());
                let (id, active) = (org.bystanders[b].id, org.bystanders[b].active);
                let (kind, what, body) = if active {
                    (
                        "deactivate user",
                        "deactivate",
                        json!({"reason": "left the team"}),
                    )
                } else {
                    ("reactivate user", "reactivate", json!({}))
                };
                let path = org.path(&format!("/users/{id}/{what}"));
                self.call(kind, Method::POST, &path, None, body, 200)
                    .await?;
                org.bystanders[b].active = !active;
                true
            }
            Op::Invite => {
                if self.rng.gen_bool(0.5) {
                    self.add_member(org).await?;
                } else {
                    let id = self.invite(org).await?;
                    org.bystanders.push(Bystander { id, active: true });
                }
                true
            }
            Op::UpdateOrganization => {
                // Never the value it has: an update that changes nothing is refused.
                let days = 30 + self.name();
                self.call(
                    "update organization",
                    Method::PATCH,
                    &org.path(""),
                    None,
                    json!({"settings": {"retention_days": days}}),
                    200,
                )
                .await?;
                true
            }
        };
        if !done {
            self.post(org, c).await?;
        }
        Ok(())
    }

    /// A member or an active bystander.
    fn any_user(&mut self, org: &Org) -> Uuid {
        let active: Vec<Uuid> = org
            .bystanders
            .iter()
            .filter(|b| b.active)
            .map(|b| b.id)
            .chain(org.members.iter().map(|m| m.id))
            .collect();
        active[self.rng.gen_range(0..active.len())]
    }

    async fn post(&mut self, org: &mut Org, c: usize) -> anyhow::Result<()> {
        let conversation = &org.conversations[c];
        let author = conversation.participants
            [self.rng.gen_range(0..conversation.participants.len())]
        .member;
        let mut body = json!({ "content": content(&mut self.rng) });
        // Some posts come from an integration, on the author's behalf.
        let key = if self.rng.gen_bool(0.1) {
            body["author_id"] = json!(org.members[author].id);
            None
        } else {
            Some(org.members[author].key.clone())
        };
        if self.rng.gen_bool(0.2) {
            if let Some(parent) = conversation.recent(&mut self.rng, |_| true) {
                body["parent_message_id"] = json!(conversation.messages[parent].id);
            }
        }
        if self.rng.gen_bool(0.04) {
            let bytes = content(&mut self.rng);
            body["attachments"] = json!([{
                "file_name": "notes.txt",
                "mime_type": "text/plain",
                "size_bytes": bytes.len(),
                "blake3": blake3::hash(bytes.as_bytes()).to_hex().to_string(),
            }]);
        }
        let path = org.conversation_path(c, "/messages");
        let answer = self
            .call(
                "post message",
                Method::POST,
                &path,
                key.as_deref(),
                body,
                201,
            )
            .await?;
        org.conversations[c].messages.push(Message {
            id: Self::id(&answer)?,
            author,
            deleted: false,
            reactions: Vec::new(),
        });
        Ok(())
    }

    async fn react(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let p = self.rng.gen_range(0..conversation.participants.len());
        let member = conversation.participants[p].member;
        let Some(m) = conversation.recent(&mut self.rng, |m| {
            m.reactions.iter().filter(|(who, _)| *who == member).count() < EMOJI.len()
        }) else {
            return Ok(false);
        };
        let message = &conversation.messages[m];
        let free: Vec<usize> = (0..EMOJI.len())
            .filter(|e| !message.reactions.contains(&(member, *e)))
            .collect();
        let emoji = *free.choose(&mut self.rng).context("a free emoji")?;
        let path = org.conversation_path(
            c,
            &format!("/messages/{}/reactions/{}", message.id, EMOJI[emoji]),
        );
        let key = org.members[member].key.clone();
        self.call("react", Method::PUT, &path, Some(&key), json!({}), 200)
            .await?;
        org.conversations[c].messages[m]
            .reactions
            .push((member, emoji));
        Ok(true)
    }

    async fn unreact(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let Some(m) = conversation.recent(&mut self.rng, |m| {
            m.reactions
                .iter()
                .any(|(who, _)| conversation.takes_part(*who))
        }) else {
            return Ok(false);
        };
        let message = &conversation.messages[m];
        let mine: Vec<usize> = (0..message.reactions.len())
            .filter(|&r| conversation.takes_part(message.reactions[r].0))
            .collect();
        let r = *mine.choose(&mut self.rng).context("a reaction")?;
        let (member, emoji) = message.reactions[r];
        let path = org.conversation_path(
            c,
            &format!("/messages/{}/reactions/{}", message.id, EMOJI[emoji]),
        );
        let key = org.members[member].key.clone();
        self.call(
            "unreact",
            Method::DELETE,
            &path,
            Some(&key),
            Value::Null,
            200,
        )
        .await?;
        org.conversations[c].messages[m].reactions.swap_remove(r);
        Ok(true)
    }

    /// A participant who has not read the newest message marks it read.
    async fn mark_read(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let newest = conversation.messages.len();
        let behind: Vec<usize> = (0..conversation.participants.len())
            .filter(|&p| conversation.participants[p].read < newest)
            .collect();
        let Some(&p) = behind.choose(&mut self.rng) else {
            return Ok(false);
        };
        let member = conversation.participants[p].member;
        let message = conversation.messages[newest - 1].id;
        let path = org.conversation_path(c, "/read");
        let key = org.members[member].key.clone();
        self.call(
            "mark read",
            Method::POST,
            &path,
            Some(&key),
            json!({ "message_id": message }),
            200,
        )
        .await?;
        org.conversations[c].participants[p].read = newest;
        Ok(true)
    }

    async fn edit(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let Some(m) = conversation.recent(&mut self.rng, |m| conversation.takes_part(m.author))
        else {
            return Ok(false);
        };
        let message = &conversation.messages[m];
        let path = org.conversation_path(c, &format!("/messages/{}", message.id));
        let key = org.members[message.author].key.clone();
        let text = content(&mut self.rng);
        self.call(
            "edit message",
            Method::PATCH,
            &path,
            Some(&key),
            json!({ "content": text }),
            200,
        )
        .await?;
        Ok(true)
    }

    /// By its author, or by an integration (moderation).
    async fn delete(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let Some(m) = conversation.recent(&mut self.rng, |_| true) else {
            return Ok(false);
        };
        let message = &conversation.messages[m];
        let key = (conversation.takes_part(message.author) && self.rng.gen_bool(0.7))
            .then(|| org.members[message.author].key.clone());
        let path = org.conversation_path(c, &format!("/messages/{}", message.id));
        self.call(
            "delete message",
            Method::DELETE,
            &path,
            key.as_deref(),
            Value::Null,
            204,
        )
        .await?;
        org.conversations[c].messages[m].deleted = true;
        Ok(true)
    }

    async fn add_participant(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let outside: Vec<usize> = (0..org.members.len())
            .filter(|&m| !conversation.takes_part(m))
            .collect();
        let Some(&member) = outside.choose(&mut self.rng) else {
            return Ok(false);
        };
        let path = org.conversation_path(c, "/participants");
        self.call(
            "add participant",
            Method::POST,
            &path,
            None,
            json!({ "user_id": org.members[member].id }),
            201,
        )
        .await?;
        // A newcomer starts with the history read.
        let read = org.conversations[c].messages.len();
        org.conversations[c].participants.push(Participant {
            member,
            admin: false,
            muted: false,
            read,
        });
        Ok(true)
    }

    async fn remove_participant(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        if conversation.participants.len() <= 3 {
            return Ok(false);
        }
        let others: Vec<usize> = (0..conversation.participants.len())
            .filter(|&p| conversation.participants[p].member != conversation.owner)
            .collect();
        let Some(&p) = others.choose(&mut self.rng) else {
            return Ok(false);
        };
        let member = conversation.participants[p].member;
        let path = org.conversation_path(c, &format!("/participants/{}", org.members[member].id));
        self.call(
            "remove participant",
            Method::DELETE,
            &path,
            None,
            Value::Null,
            204,
        )
        .await?;
        org.conversations[c].participants.swap_remove(p);
        Ok(true)
    }

    async fn change_role(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let others: Vec<usize> = (0..conversation.participants.len())
            .filter(|&p| conversation.participants[p].member != conversation.owner)
            .collect();
        let Some(&p) = others.choose(&mut self.rng) else {
            return Ok(false);
        };
        let participant = &conversation.participants[p];
        let role = if participant.admin { "member" } else { "admin" };
        let path = org.conversation_path(
            c,
            &format!("/participants/{}", org.members[participant.member].id),
        );
        self.call(
            "change participant role",
            Method::PATCH,
            &path,
            None,
            json!({ "role": role }),
            200,
        )
        .await?;
        let participant = &mut org.conversations[c].participants[p];
        participant.admin = !participant.admin;
        Ok(true)
    }

    async fn mute(&mut self, org: &mut Org, c: usize) -> anyhow::Result<bool> {
        let conversation = &org.conversations[c];
        let p = self.rng.gen_range(0..conversation.participants.len());
        let participant = &conversation.participants[p];
        let member = &org.members[participant.member];
        let path = org.conversation_path(c, &format!("/participants/{}", member.id));
        let key = member.key.clone();
        let muted = !participant.muted;
        self.call(
            "mute or unmute",
            Method::PATCH,
            &path,
            Some(&key),
            json!({ "muted": muted }),
            200,
        )
        .await?;
        org.conversations[c].participants[p].muted = muted;
        Ok(true)
    }

    async fn assign_role(&mut self, org: &mut Org) -> anyhow::Result<bool> {
        let member = self.rng.gen_range(0..org.members.len());
        let role = self.rng.gen_range(0..org.roles.len());
        if org.assigned.contains(&(member, role)) {
            return Ok(false);
        }
        let path = org.path(&format!(
            "/users/{}/roles/{}",
            org.members[member].id, org.roles[role]
        ));
        self.call(
            "assign role",
            Method::PUT,
            &path,
            None,
            json!({"reason": "joins the team"}),
            200,
        )
        .await?;
        org.assigned.push((member, role));
        Ok(true)
    }

    async fn revoke_role(&mut self, org: &mut Org) -> anyhow::Result<bool> {
        if org.assigned.is_empty() {
            return Ok(false);
        }
        let a = self.rng.gen_range(0..org.assigned.len());
        let (member, role) = org.assigned[a];
        let path = org.path(&format!(
            "/users/{}/roles/{}",
            org.members[member].id, org.roles[role]
        ));
        self.call("revoke role", Method::DELETE, &path, None, Value::Null, 204)
            .await?;
        org.assigned.swap_remove(a);
        Ok(true)
    }

    /// Revokes an integration's key, while it has another.
    async fn revoke_key(&mut self, org: &mut Org) -> anyhow::Result<bool> {
        if org.service_keys.len() < 2 {
            return Ok(false);
        }
        let k = self.rng.gen_range(0..org.service_keys.len());
        let path = org.path(&format!("/api-keys/{}/revoke", org.service_keys[k]));
        self.call(
            "revoke key",
            Method::POST,
            &path,
            None,
            json!({"reason": "replaced"}),
            200,
        )
        .await?;
        org.service_keys.swap_remove(k);
        Ok(true)
    }
}
