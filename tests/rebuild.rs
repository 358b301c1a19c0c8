//! Rebuild equivalence: empty every read model, reset the checkpoints, project the whole log
//! again, and get exactly the tables the live projections built.

mod common;

use common::TestApp;
use serde_json::json;
use uuid::Uuid;

/// Every read-model table, each row as JSON, in a stable order.
async fn snapshot(t: &TestApp) -> Vec<(String, Vec<String>)> {
    let tables = [
        "organizations",
        "users",
        "roles",
        "role_permissions",
        "user_roles",
        "api_keys",
        "audit_events",
        "conversations",
        "conversation_participants",
        "messages",
        "message_attachments",
        "message_reactions",
        "message_reads",
    ];
    let mut out = Vec::new();
    for table in tables {
        let rows: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT row_to_json(t)::text FROM {table} t ORDER BY row_to_json(t)::text"
        ))
        .fetch_all(t.pool())
        .await
        .unwrap();
        out.push((table.to_string(), rows.into_iter().map(|(r,)| r).collect()));
    }
    out
}

#[tokio::test]
async fn rebuilt_read_models_equal_the_live_ones() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Rebuild Co").await;
    let other = t.create_org("Other Co").await;
    let o = format!("/v1/organizations/{org}");
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let bob = t.invite(org, "bob@example.com", "Bob").await;
    t.invite(other, "ada@example.com", "Ada Elsewhere").await;
    assert_eq!(
        t.patch(
            &format!("{o}/users/{ada}"),
            &t.admin_key,
            json!({"full_name": "Ada L."})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.post(
            &format!("{o}/users/{bob}/deactivate"),
            &t.admin_key,
            json!({"reason": "left"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.post(
            &format!("{o}/users/{bob}/reactivate"),
            &t.admin_key,
            json!({})
        )
        .await
        .status,
        200
    );

    messaging_story(&t, org, ada, bob).await;

    let base = t
        .post(
            &format!("{o}/roles"),
            &t.admin_key,
            json!({"name": "base", "permissions": ["users:read"]}),
        )
        .await;
    let base_id = base.body["id"].as_str().unwrap().to_string();
    let child = t
        .post(
            &format!("{o}/roles"),
            &t.admin_key,
            json!({"name": "child", "permissions": ["audit:read"], "parent_role_id": base_id}),
        )
        .await;
    assert_eq!(child.status, 201, "{}", child.body);
    let child_id = child.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        t.patch(
            &format!("{o}/roles/{child_id}"),
            &t.admin_key,
            json!({"permissions": ["audit:read", "keys:read"]})
        )
        .await
        .status,
        200
    );
    let temp = t
        .post(
            &format!("{o}/roles"),
            &t.admin_key,
            json!({"name": "temp", "permissions": []}),
        )
        .await;
    let temp_id = temp.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        t.put(
            &format!("{o}/users/{ada}/roles/{child_id}"),
            &t.admin_key,
            json!({"expires_at": "2099-01-01T00:00:00Z", "reason": "audit"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.put(
            &format!("{o}/users/{ada}/roles/{temp_id}"),
            &t.admin_key,
            json!({})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.delete(&format!("{o}/roles/{temp_id}"), &t.admin_key)
            .await
            .status,
        204
    );
    assert_eq!(
        t.put(
            &format!("{o}/users/{bob}/roles/{base_id}"),
            &t.admin_key,
            json!({})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.delete(&format!("{o}/users/{bob}/roles/{base_id}"), &t.admin_key)
            .await
            .status,
        204
    );

    let key = t
        .post(
            &format!("{o}/api-keys"),
            &t.admin_key,
            json!({"label": "ci", "permissions": ["users:read"]}),
        )
        .await;
    let key_id = key.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        t.post(
            &format!("{o}/api-keys/{key_id}/rotate"),
            &t.admin_key,
            json!({})
        )
        .await
        .status,
        200
    );
    let key2 = t
        .post(
            &format!("{o}/api-keys"),
            &t.admin_key,
            json!({"label": "old", "permissions": ["users:read"], "user_id": ada}),
        )
        .await;
    let key2_id = key2.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        t.post(
            &format!("{o}/api-keys/{key2_id}/revoke"),
            &t.admin_key,
            json!({"reason": "lost"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.patch(
            &o,
            &t.admin_key,
            json!({"country_code": "de", "settings": {"tier": "gold"}})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.post(&format!("{o}/suspend"), &t.admin_key, json!({}))
            .await
            .status,
        200
    );
    assert_eq!(
        t.post(&format!("{o}/reactivate"), &t.admin_key, json!({}))
            .await
            .status,
        200
    );
    assert_eq!(
        t.post(&format!("{o}/users/{bob}/erase"), &t.admin_key, json!({}))
            .await
            .status,
        200
    );

    let live = snapshot(&t).await;
    assert!(
        live.iter().all(|(_, rows)| !rows.is_empty()),
        "every table has rows to compare"
    );

    ledgerline_projections::reset(t.pool(), None).await.unwrap();
    let emptied = snapshot(&t).await;
    assert!(
        emptied.iter().all(|(_, rows)| rows.is_empty()),
        "reset empties every read model"
    );
    ledgerline_projections::catch_up(t.pool()).await.unwrap();
    let rebuilt = snapshot(&t).await;
    for ((table, a), (_, b)) in live.iter().zip(&rebuilt) {
        assert_eq!(a, b, "table {table} differs after rebuild");
    }
}

/// Every kind of messaging event: a conversation created, renamed, archived and unarchived,
/// participants added, removed, promoted and muted, messages posted (with an attachment and
/// a reply), edited, reacted to, read and deleted. `bob` is erased later by the caller.
async fn messaging_story(t: &TestApp, org: Uuid, ada: Uuid, bob: Uuid) {
    let (cy, cy_key) = t.member_with_key(org, "member", "cy@example.com").await;
    let c = format!("/v1/organizations/{org}/conversations");
    let ok = |r: common::Response, status: u16| {
        assert_eq!(r.status, status, "{}", r.body);
        r.body
    };
    let conv = ok(
        t.post(
            &c,
            &t.admin_key,
            json!({"kind": "group", "title": "Ops", "owner_id": ada, "participants": [bob, cy]}),
        )
        .await,
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = format!("{c}/{conv}");
    ok(
        t.patch(&c, &t.admin_key, json!({"title": "Ops room"}))
            .await,
        200,
    );
    ok(
        t.post(&format!("{c}/archive"), &t.admin_key, json!({}))
            .await,
        200,
    );
    ok(
        t.post(&format!("{c}/unarchive"), &t.admin_key, json!({}))
            .await,
        200,
    );
    ok(
        t.patch(
            &format!("{c}/participants/{cy}"),
            &t.admin_key,
            json!({"role": "admin"}),
        )
        .await,
        200,
    );
    ok(
        t.patch(
            &format!("{c}/participants/{cy}"),
            &cy_key,
            json!({"muted": true}),
        )
        .await,
        200,
    );
    let digest = blake3::hash(b"notes").to_hex().to_string();
    let root = ok(
        t.post(
            &format!("{c}/messages"),
            &t.admin_key,
            json!({"content": "agenda", "author_id": bob, "attachments": [
                {"file_name": "notes.txt", "mime_type": "text/plain", "size_bytes": 5, "blake3": digest}
            ]}),
        )
        .await,
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = ok(
        t.post(
            &format!("{c}/messages"),
            &cy_key,
            json!({"content": "noted", "parent_message_id": root}),
        )
        .await,
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        t.patch(
            &format!("{c}/messages/{reply}"),
            &cy_key,
            json!({"content": "noted!"}),
        )
        .await,
        200,
    );
    ok(
        t.put(
            &format!("{c}/messages/{root}/reactions/🎉"),
            &cy_key,
            json!({}),
        )
        .await,
        200,
    );
    ok(
        t.post(&format!("{c}/read"), &cy_key, json!({"message_id": reply}))
            .await,
        200,
    );
    let gone = ok(
        t.post(
            &format!("{c}/messages"),
            &t.admin_key,
            json!({"content": "oops", "author_id": ada}),
        )
        .await,
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        t.delete(&format!("{c}/messages/{gone}"), &t.admin_key)
            .await,
        204,
    );
    let extra = t.invite(org, "dee@example.com", "Dee").await;
    ok(
        t.post(
            &format!("{c}/participants"),
            &t.admin_key,
            json!({"user_id": extra}),
        )
        .await,
        201,
    );
    ok(
        t.delete(&format!("{c}/participants/{extra}"), &t.admin_key)
            .await,
        204,
    );
}
