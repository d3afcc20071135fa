//! Test harness: starts the real service on port 0 with a fresh database and talks to
//! it over real HTTP.
//!
//! The database is SQLite in a temporary directory, or, when
//! `MCP_METRICS_TEST_BACKEND=postgres`, a fresh PostgreSQL database of its own on the
//! server named by `MCP_METRICS_TEST_POSTGRES` (`scripts/test` runs the suite both ways).
//! Tests that look inside the database use [`TestService::sql_i64`] and
//! [`TestService::sql_execute`], which speak to either backend.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_server::RunOptions;
use mcp_metrics_server::config::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub enum WriteBlocker {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl WriteBlocker {
    pub async fn release(self) {
        match self {
            WriteBlocker::Sqlite(conn) => conn.execute_batch("COMMIT").unwrap(),
            WriteBlocker::Postgres(client) => client.batch_execute("COMMIT").await.unwrap(),
        }
    }
}

/// Which database the integration tests run on.
pub fn postgres_backend() -> Option<String> {
    let wanted = std::env::var("MCP_METRICS_TEST_BACKEND").unwrap_or_default();
    if wanted != "postgres" {
        return None;
    }
    let url = std::env::var("MCP_METRICS_TEST_POSTGRES")
        .expect("MCP_METRICS_TEST_BACKEND=postgres needs MCP_METRICS_TEST_POSTGRES (a PostgreSQL URL)");
    Some(url)
}

pub struct TestService {
    pub addr: SocketAddr,
    /// The database URL the service runs on.
    pub database: String,
    /// The PostgreSQL server's admin URL, when the test runs on PostgreSQL.
    pub postgres_admin: Option<String>,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub struct Credential {
    pub server_id: String,
    pub key_id: String,
    pub api_key: String,
    pub secret: String,
}

impl TestService {
    pub async fn start() -> TestService {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestService {
        Self::start_full(adjust, RunOptions::default()).await
    }

    pub async fn start_full(adjust: impl FnOnce(&mut Config), options: RunOptions) -> TestService {
        mcp_metrics_server::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let postgres_admin = postgres_backend();
        let database = match &postgres_admin {
            Some(admin) => mcp_metrics_store::postgres::testing::fresh_database(admin)
                .await
                .expect("create a PostgreSQL test database"),
            None => format!("sqlite://{}", dir.path().join("test.db").display()),
        };
        let mut config = Config {
            database: database.clone(),
            admin_token: Some(ADMIN_TOKEN.into()),
            ..Config::default()
        };
        if postgres_admin.is_some() {
            // PostgreSQL has no key file beside the database: nodes share a configured key.
            config.master_key = Some(mcp_metrics_core::secrets::MasterKey::generate().to_hex());
        }
        // Tests survive a process crash, not a power cut: skip the fsync cost.
        config.sqlite.synchronous = mcp_metrics_server::config::Synchronous::Normal;
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mcp_metrics_server::run(
            config,
            listener,
            async move {
                let _ = stopped.await;
            },
            options,
        ));
        let service = TestService {
            addr,
            database,
            postgres_admin,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            dir,
            stop: Some(stop),
            task: Some(task),
        };
        service.wait_ready().await;
        service
    }

    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("service did not become ready");
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("service task").expect("service result");
        }
        if let Some(admin) = self.postgres_admin.take() {
            let _ = mcp_metrics_store::postgres::testing::drop_database(&admin, &self.database).await;
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres_admin.is_some()
    }

    /// Runs a query returning one integer (e.g. `SELECT count(*) ...`) on whichever
    /// database the service uses. Write literals inline: the SQL must suit both.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        if self.is_postgres() {
            let client = self.pg_client().await;
            let row = client
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            row.try_get::<_, Option<i64>>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .unwrap_or(0)
        } else {
            let conn = rusqlite::Connection::open(self.db_path()).unwrap();
            conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .unwrap_or(0)
        }
    }

    /// Runs a query returning one text column, row by row.
    pub async fn sql_strings(&self, sql: &str) -> Vec<String> {
        if self.is_postgres() {
            let client = self.pg_client().await;
            let rows = client.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter().map(|r| r.get::<_, String>(0)).collect()
        } else {
            let conn = rusqlite::Connection::open(self.db_path()).unwrap();
            let mut statement = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            statement
                .query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
    }

    /// Holds the database's write path (SQLite's write lock; on PostgreSQL an exclusive
    /// lock on the table every write starts with) until the blocker is released.
    pub async fn block_writes(&self) -> WriteBlocker {
        if self.is_postgres() {
            let client = self.pg_client().await;
            client
                .batch_execute("BEGIN; LOCK TABLE request_digests IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            WriteBlocker::Postgres(client)
        } else {
            let conn = rusqlite::Connection::open(self.db_path()).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            WriteBlocker::Sqlite(conn)
        }
    }

    /// Runs statements on whichever database the service uses.
    pub async fn sql_execute(&self, sql: &str) {
        if self.is_postgres() {
            self.pg_client()
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        } else {
            rusqlite::Connection::open(self.db_path())
                .unwrap()
                .execute_batch(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    /// A direct connection to the test's PostgreSQL database.
    pub async fn pg_client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.database, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn create_server(&self, id: &str) {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/admin/servers",
                Some(json!({"id": id, "name": id})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn issue_key(&self, server_id: &str) -> Credential {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                &format!("/api/v1/admin/servers/{server_id}/keys"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Credential {
            server_id: server_id.into(),
            key_id: body["key_id"].as_str().unwrap().into(),
            api_key: body["api_key"].as_str().unwrap().into(),
            secret: body["signing_secret"].as_str().unwrap().into(),
        }
    }

    /// A server with one credential.
    pub async fn server_with_key(&self, id: &str) -> Credential {
        self.create_server(id).await;
        self.issue_key(id).await
    }

    /// POSTs `body` signed now with the credential.
    pub async fn push(&self, cred: &Credential, body: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let signature = sign(cred.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
        self.push_raw(Some(&cred.api_key), Some(&signature), "application/json", body)
            .await
    }

    /// POSTs a server event signed now with the credential.
    pub async fn post_event(&self, cred: &Credential, body: &str) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/events"))
            .header("content-type", "application/json")
            .header("x-api-key", &cred.api_key)
            .header(
                "x-signature",
                sign(cred.secret.as_bytes(), now_ms() / 1000, body.as_bytes()),
            )
            .body(body.to_owned())
            .send()
            .await
            .expect("request")
    }

    pub async fn push_raw(
        &self,
        api_key: Option<&str>,
        signature: Option<&str>,
        content_type: &str,
        body: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self
            .client
            .post(self.url("/api/v1/metrics"))
            .header("content-type", content_type)
            .body(body.to_owned());
        if let Some(key) = api_key {
            request = request.header("x-api-key", key);
        }
        if let Some(signature) = signature {
            request = request.header("x-signature", signature);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.json().await.unwrap_or(Value::Null))
    }

    /// One raw-read request (`GET /api/v1/servers/{id}/samples?{query}`), with the key
    /// in `X-API-Key` when one is given.
    pub async fn read_samples(&self, server_id: &str, api_key: Option<&str>, query: &str) -> reqwest::Response {
        let mut request = self
            .client
            .get(self.url(&format!("/api/v1/servers/{server_id}/samples?{query}")));
        if let Some(key) = api_key {
            request = request.header("x-api-key", key);
        }
        request.send().await.unwrap()
    }

    /// All raw samples of a server, following `next` links.
    pub async fn samples(&self, cred: &Credential, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let query = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.to_owned(),
            };
            let response = self.read_samples(&cred.server_id, Some(&cred.api_key), &query).await;
            assert_eq!(response.status(), StatusCode::OK);
            let page: Value = response.json().await.unwrap();
            out.extend(page["samples"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return out,
            }
        }
    }

    /// The values of [`samples`](Self::samples), in the order they are read back.
    pub async fn sample_values(&self, cred: &Credential, query: &str) -> Vec<f64> {
        self.samples(cred, query)
            .await
            .iter()
            .map(|s| s["value"].as_f64().expect("a numeric value"))
            .collect()
    }

    /// The value of an unlabelled series of `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Requests the writer has taken into a commit, stored or refused.
    pub async fn committed_requests(&self) -> f64 {
        self.metric("mcp_metrics_commit_batch_requests_sum").await
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A free loopback port, for tests that spawn the binary with `--listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the service at `base` answers `/readyz` with a success.
pub async fn wait_ready_at(client: &reqwest::Client, base: &str) {
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the service at {base} did not become ready");
}

/// Registers a server through the operator API of the service at `base` and issues it a
/// credential (for tests that run the binary rather than a [`TestService`]).
pub async fn register_at(client: &reqwest::Client, base: &str, id: &str) -> Credential {
    let r = client
        .post(format!("{base}/api/v1/admin/servers"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let key: Value = client
        .post(format!("{base}/api/v1/admin/servers/{id}/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Credential {
        server_id: id.into(),
        key_id: key["key_id"].as_str().unwrap().into(),
        api_key: key["api_key"].as_str().unwrap().into(),
        secret: key["signing_secret"].as_str().unwrap().into(),
    }
}

/// A batch body for `server_id`.
pub fn batch(server_id: &str, metrics: Value) -> String {
    json!({ "server_id": server_id, "metrics": metrics }).to_string()
}

/// A test that ends without `stop()` (or panics) still drops its PostgreSQL database.
impl Drop for TestService {
    fn drop(&mut self) {
        if let Some(admin) = self.postgres_admin.take() {
            mcp_metrics_store::postgres::testing::drop_database_blocking(&admin, &self.database);
        }
    }
}

/// Polls `check` every 100 ms until it holds; fails naming `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within {within:?}");
}
