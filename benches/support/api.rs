//! The app served in-process, the way tests/common starts it, and a small client of its
//! HTTP API that fails on any status the bench did not expect.

use std::net::SocketAddr;

use anyhow::{ensure, Context};
use ledgerline::app::App;
use ledgerline::crypto::{MasterKey, Vault};
use reqwest::Method;
use serde_json::Value;
use sqlx::PgPool;

#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
}

impl Api {
    /// The status and the body's text; the time a consumer waits for them is the caller's.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, String)> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("sending {path}"))?;
        let status = res.status().as_u16();
        Ok((status, res.text().await?))
    }

    /// The body as JSON (`null` when empty), or an error unless the status is `status`.
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&Value>,
        status: u16,
    ) -> anyhow::Result<Value> {
        let (got, text) = self.send(method.clone(), path, key, body).await?;
        parse(method, path, status, got, &text)
    }
}

/// The body of an answer with status `got` as JSON (`null` when empty), or an error unless
/// `got` is `want`.
pub fn parse(method: Method, path: &str, want: u16, got: u16, text: &str) -> anyhow::Result<Value> {
    ensure!(
        got == want,
        "{method} {path}: expected {want}, got {got}: {text}"
    );
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).with_context(|| format!("{method} {path}: body is not JSON"))
}

/// The app over a migrated database, with its projector (so every command waits for the
/// read models), served on `127.0.0.1:0`, and a platform operator's key.
pub struct Served {
    pub app: App,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    pub api: Api,
    pub admin_key: String,
}

pub async fn serve(pool: PgPool) -> anyhow::Result<Served> {
    let app = App::new(pool, Vault::new(&MasterKey::generate()), true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = ledgerline::api::router(app.clone());
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    let admin_key = operator_key(&app).await?;
    let api = Api {
        client: reqwest::Client::new(),
        base: format!("http://{addr}"),
    };
    Ok(Served {
        app,
        server,
        api,
        admin_key,
    })
}

/// A platform operator's key: the bootstrap key on a fresh ledger, another platform key
/// on one bootstrapped before (a bench database seeded again).
async fn operator_key(app: &App) -> anyhow::Result<String> {
    if let Ok((_, secret)) = ledgerline::cli::bootstrap_key(app, "bench operator").await {
        return Ok(secret);
    }
    ledgerline::cli::platform_key(app, "bench operator", false)
        .await
        .map(|(_, secret)| secret)
        .map_err(|e| anyhow::anyhow!("issuing a platform key: {e}"))
}

impl Served {
    /// Stops serving and the app's background tasks (after their current batch).
    pub async fn stop(self) {
        self.server.abort();
        self.app.shutdown().await;
    }
}
