//! Crash safety: a real `ledgerline serve` is killed with SIGKILL in the middle of a load
//! of concurrent commands. After a restart on the same database, every command that was
//! answered 2xx is in the log and readable, the chain verifies, and the read models equal
//! a fresh rebuild from the log.

mod common;
mod server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use reqwest::Method;
use serde_json::{json, Value};
use server::{
    call, eventually, id_of, lease_names, leases, ledgerline, positions, projections_at, Answer,
    Server, Setup,
};
use tokio::task::JoinSet;
use uuid::Uuid;

const LEASE_TTL_SECS: u64 = 2;
const POLL_MS: u64 = 1000;
const TASKS: usize = 32;
/// Acknowledged commands to wait for before the kill; the load keeps going meanwhile.
const BEFORE_KILL: usize = 200;

/// A command the server answered 2xx, and what it created.
#[derive(Debug, Clone)]
struct Acknowledged {
    aggregate_type: &'static str,
    id: Uuid,
}

async fn ok(a: Result<Answer, reqwest::Error>, status: u16, what: &str) -> Value {
    let a = a.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(a.status, status, "{what}: {}", a.body);
    a.body
}

/// An organization, a member with a key of her own, and a group conversation of hers.
/// Returns (organization, conversation, the member's key).
async fn prepare(client: &reqwest::Client, base: &str, admin: &str) -> (Uuid, Uuid, String) {
    let post = |path: String, key: String, body: Value| {
        let client = client.clone();
        let base = base.to_string();
        async move { call(&client, &base, Method::POST, &path, &key, Some(body)).await }
    };
    let org = ok(
        post(
            "/v1/organizations".into(),
            admin.into(),
            json!({"name": "Crash Co", "slug": "crash-co"}),
        )
        .await,
        201,
        "create org",
    )
    .await;
    let org: Uuid = org["id"].as_str().unwrap().parse().unwrap();
    let o = format!("/v1/organizations/{org}");
    let mut members = Vec::new();
    for name in ["alice", "bob"] {
        let user = ok(
            post(
                format!("{o}/users"),
                admin.into(),
                json!({"email": format!("{name}@crash.example"), "full_name": name}),
            )
            .await,
            201,
            "invite",
        )
        .await;
        members.push(user["id"].as_str().unwrap().to_string());
    }
    let roles = ok(
        call(
            client,
            base,
            Method::GET,
            &format!("{o}/roles"),
            admin,
            None,
        )
        .await,
        200,
        "roles",
    )
    .await;
    let member = roles["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "member")
        .expect("the built-in member role")["id"]
        .as_str()
        .unwrap()
        .to_string();
    for user in &members {
        ok(
            call(
                client,
                base,
                Method::PUT,
                &format!("{o}/users/{user}/roles/{member}"),
                admin,
                Some(json!({})),
            )
            .await,
            200,
            "assign member",
        )
        .await;
    }
    let permissions =
        ledgerline_aggregates::organization::built_in_roles::permissions("member").unwrap();
    let key = ok(
        post(
            format!("{o}/api-keys"),
            admin.into(),
            json!({"label": "alice", "permissions": permissions, "user_id": members[0]}),
        )
        .await,
        201,
        "issue alice's key",
    )
    .await;
    let alice = key["secret"].as_str().unwrap().to_string();
    let conversation = ok(
        post(
            format!("{o}/conversations"),
            alice.clone(),
            json!({"kind": "group", "title": "Crash", "participants": [members[1]]}),
        )
        .await,
        201,
        "create conversation",
    )
    .await;
    let conversation: Uuid = conversation["id"].as_str().unwrap().parse().unwrap();
    (org, conversation, alice)
}

#[tokio::test]
async fn every_acknowledged_command_survives_a_kill_9() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    let mut first = Server::start(&setup, LEASE_TTL_SECS, POLL_MS).await;
    let client = reqwest::Client::new();
    let (org, conversation, alice) = prepare(&client, &first.base, &setup.admin_key).await;

    // The load: each task alternates inviting a user and posting a message until the
    // server stops answering.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let client = client.clone();
        let base = first.base.clone();
        let (admin, alice) = (setup.admin_key.clone(), alice.clone());
        let counter = acknowledged.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            for i in 0.. {
                let (aggregate_type, answer) = if (task + i) % 2 == 0 {
                    let email = format!("{}@crash.example", Uuid::new_v4().simple());
                    let body = json!({"email": email, "full_name": "Load Person"});
                    let path = format!("/v1/organizations/{org}/users");
                    (
                        "User",
                        call(&client, &base, Method::POST, &path, &admin, Some(body)).await,
                    )
                } else {
                    let body = json!({"content": format!("message {i} of task {task}")});
                    let path =
                        format!("/v1/organizations/{org}/conversations/{conversation}/messages");
                    (
                        "Message",
                        call(&client, &base, Method::POST, &path, &alice, Some(body)).await,
                    )
                };
                match answer {
                    Ok(a) if (200..300).contains(&a.status) => {
                        acked.push(Acknowledged {
                            aggregate_type,
                            id: id_of(&a),
                        });
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => refused.push((a.status, a.body.to_string())),
                    // The server is gone.
                    Err(_) => break,
                }
            }
            (acked, refused)
        });
    }
    assert!(
        eventually(Duration::from_secs(120), || async {
            acknowledged.load(Ordering::Relaxed) >= BEFORE_KILL
        })
        .await,
        "the load gets going: {}",
        first.log_text()
    );
    first.kill9().await;
    let mut acked = Vec::new();
    for (a, refused) in tasks.join_all().await {
        assert!(refused.is_empty(), "no command was refused: {refused:?}");
        acked.extend(a);
    }
    assert!(acked.len() >= BEFORE_KILL);
    println!("{} commands acknowledged before the kill", acked.len());

    // A restart on the same database takes the dead server's leases once they expire and
    // brings every projection to the head.
    let second = Server::start(&setup, LEASE_TTL_SECS, POLL_MS).await;
    let (head, gap_free) = positions(&db.pool).await;
    assert!(gap_free, "positions are exactly 1..={head}");
    let taken_over = || async {
        let held = leases(&db.pool).await;
        held.iter().map(|(n, ..)| n.clone()).collect::<Vec<_>>() == lease_names()
            && held.iter().all(|(_, h, live)| *live && second.holds(h))
    };
    assert!(
        eventually(Duration::from_secs(60), taken_over).await,
        "the restarted server takes the dead one's leases: {:?}\n{}",
        leases(&db.pool).await,
        second.log_text()
    );
    assert!(
        eventually(Duration::from_secs(60), || projections_at(&db.pool, head)).await,
        "the projections reach the head {head}: {}",
        second.log_text()
    );

    // Every acknowledged command is in the log and in the read models.
    for a in &acked {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             AND sequence = 1",
        )
        .bind(a.aggregate_type)
        .bind(a.id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "{a:?} is in the log");
        let path = match a.aggregate_type {
            "User" => format!("/v1/organizations/{org}/users/{}", a.id),
            _ => format!(
                "/v1/organizations/{org}/conversations/{conversation}/messages/{}",
                a.id
            ),
        };
        let key = if a.aggregate_type == "User" {
            &setup.admin_key
        } else {
            &alice
        };
        let r = call(&client, &second.base, Method::GET, &path, key, None)
            .await
            .unwrap();
        assert_eq!(
            r.status, 200,
            "{a:?} is readable after the restart: {}",
            r.body
        );
    }

    let (code, out, err) = ledgerline(&db.url, &["verify"]).await;
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(out.contains(&format!("{head} events verified")), "{out}");
    let (code, out, err) = ledgerline(&db.url, &["projections", "check"]).await;
    assert_eq!(
        code, 0,
        "the read models equal a rebuild from the log: {out}{err}"
    );
}

/// An organization whose built-in roles could not be made when it was created (an error, the
/// process running on: here a trigger that refuses them for a moment) gets them in the
/// background, without waiting for the next start.
#[tokio::test]
async fn an_organization_whose_roles_failed_gets_them_while_the_server_runs() {
    use ledgerline_aggregates::organization::built_in_roles;

    let t = common::TestApp::spawn().await;
    common::tamper(
        t.pool(),
        &[
            "CREATE FUNCTION refuse_roles() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.aggregate_type = 'Role' THEN RAISE EXCEPTION 'refused by the test'; \
                 END IF; RETURN NEW; END $$"
                .to_string(),
            "CREATE TRIGGER refuse_roles BEFORE INSERT ON events FOR EACH ROW \
                 EXECUTE FUNCTION refuse_roles()"
                .to_string(),
        ],
    )
    .await;
    let body = json!({"name": "Half Made", "slug": "half-made"});
    let r = t.post("/v1/organizations", &t.admin_key, body).await;
    assert_eq!(r.status, 500, "{}", r.body);
    common::tamper(
        t.pool(),
        &["DROP TRIGGER refuse_roles ON events".to_string()],
    )
    .await;
    let org: Uuid = sqlx::query_scalar(
        "SELECT organization_id FROM events WHERE event_type = 'OrganizationCreated' \
         AND payload::jsonb #>> '{OrganizationCreated,profile,slug}' = 'half-made'",
    )
    .fetch_one(t.pool())
    .await
    .expect("the organization was created");
    let roles = || async {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'Role' AND organization_id = $1",
        )
        .bind(org)
        .fetch_one(t.pool())
        .await
        .unwrap();
        found
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            roles().await == built_in_roles::NAMES.len() as i64
        })
        .await,
        "made in the background, {} of {}",
        roles().await,
        built_in_roles::NAMES.len()
    );
}

/// A process that died between creating an organization and its built-in roles (five
/// commands, not one transaction) left an organization without them; the next `serve`
/// makes them as it starts, from the log.
#[tokio::test]
async fn an_organization_cut_off_before_its_roles_gets_them_at_the_next_start() {
    use ledgerline::app::{Actor, App};
    use ledgerline::crypto::{MasterKey, Vault};
    use ledgerline_aggregates::organization::{built_in_roles, OrganizationCommand};

    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    // The organization's own command, as the handler runs it first, and nothing after.
    let app = App::new(db.pool.clone(), Vault::new(&MasterKey::generate()), false);
    let org = Uuid::new_v4();
    let command = OrganizationCommand::Create {
        organization_id: org,
        name: "Cut Off".into(),
        slug: "cut-off".into(),
        country_code: None,
        domain: None,
        settings: Default::default(),
    };
    app.execute(
        &app.cqrs.organizations,
        org,
        Some(org),
        &Actor::cli("test"),
        command,
    )
    .await
    .unwrap();
    let roles = || async {
        let ids: Vec<String> = built_in_roles::NAMES
            .into_iter()
            .map(|name| built_in_roles::role_id(org, name).to_string())
            .collect();
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'Role' AND sequence = 1 \
             AND aggregate_id = ANY($1) AND organization_id = $2",
        )
        .bind(&ids)
        .bind(org)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        found
    };
    assert_eq!(roles().await, 0);

    let mut server = Server::start(&setup, LEASE_TTL_SECS, POLL_MS).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            roles().await == built_in_roles::NAMES.len() as i64
        })
        .await,
        "made as it starts"
    );
    assert_eq!(server.terminate().await, 0);
}
