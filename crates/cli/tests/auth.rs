//! Regression tests for every security rule of signed ingest (DESIGN.md §4.1): each
//! failure has its own status and code and stores nothing. Also the operator API's
//! token and the raw read's key checks.

mod common;

use common::{ADMIN_TOKEN, Credential, TestService, batch};
use mcp_metrics_core::promwrite::{STALE_NAN_BITS, TimeSeries, WriteRequest, encode};
use mcp_metrics_core::signature::{compute, sign};
use mcp_metrics_core::time::now_ms;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn body_for(server: &str) -> String {
    batch(
        server,
        json!([{"name":"response_time","value":1,"type":"histogram","timestamp":now_ms() - 1000}]),
    )
}

async fn assert_refused(
    svc: &TestService,
    key: Option<&str>,
    signature: Option<&str>,
    body: &str,
    status: u16,
    code: &str,
) {
    let (got, headers, answer) = svc.push_raw(key, signature, "application/json", body).await;
    assert_eq!(
        (got.as_u16(), answer["code"].as_str()),
        (status, Some(code)),
        "{answer}"
    );
    assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
    // Internal details never leak.
    assert!(!answer.to_string().to_lowercase().contains("sqlite"));
}

async fn stored(svc: &TestService, cred: &Credential) -> usize {
    svc.samples(cred, "").await.len()
}

#[tokio::test]
async fn each_auth_failure_has_its_status_and_code_and_stores_nothing() {
    let svc = TestService::start().await;
    let a = svc.server_with_key("server-a").await;
    let b = svc.server_with_key("server-b").await;
    let body = body_for("server-a");
    let now = now_ms() / 1000;
    let good = sign(a.secret.as_bytes(), now, body.as_bytes());
    let mac = compute(a.secret.as_bytes(), now, body.as_bytes());

    assert_refused(&svc, None, Some(&good), &body, 401, "missing_key").await;
    assert_refused(&svc, Some("mcpm_ak_nope"), Some(&good), &body, 401, "unknown_key").await;
    assert_refused(&svc, Some(&a.api_key), None, &body, 401, "invalid_signature").await;
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&format!("t={now},v1={}", "0".repeat(64))),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&format!("t={now},v1=")),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&format!("t={now},v1={}", &mac[..63])),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&format!("t={now},v1={}", &mac[..32])),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    assert_refused(&svc, Some(&a.api_key), Some("garbage"), &body, 401, "invalid_signature").await;
    // A signature over another body.
    let other = body_for("server-a").replace("\"value\":1", "\"value\":2");
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&sign(a.secret.as_bytes(), now, other.as_bytes())),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    // Signed with server B's secret.
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&sign(b.secret.as_bytes(), now, body.as_bytes())),
        &body,
        401,
        "invalid_signature",
    )
    .await;
    // The clock window is ±300 s (its exact edges are unit-tested in core's
    // signature module). The service reads its clock after `now` was taken, and a
    // second may tick in between, so the future timestamp keeps a margin: `now + 301`
    // was once accepted in CI when the service's clock read `now + 1`.
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&sign(a.secret.as_bytes(), now - 301, body.as_bytes())),
        &body,
        401,
        "stale_timestamp",
    )
    .await;
    let ahead = now_ms() / 1000 + 310;
    assert_refused(
        &svc,
        Some(&a.api_key),
        Some(&sign(a.secret.as_bytes(), ahead, body.as_bytes())),
        &body,
        401,
        "stale_timestamp",
    )
    .await;
    // Key of server B used on server A's data, properly signed with B's secret.
    assert_refused(
        &svc,
        Some(&b.api_key),
        Some(&sign(b.secret.as_bytes(), now, body.as_bytes())),
        &body,
        403,
        "forbidden_server",
    )
    .await;
    assert_eq!(stored(&svc, &a).await, 0);
    assert_eq!(stored(&svc, &b).await, 0);

    // The good request is accepted once; the same request again is a replay.
    let (status, _, _) = svc
        .push_raw(Some(&a.api_key), Some(&good), "application/json", &body)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_refused(&svc, Some(&a.api_key), Some(&good), &body, 409, "replayed_request").await;
    assert_eq!(stored(&svc, &a).await, 1);

    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_requests_rejected_total{code=\"invalid_signature\"} 8\n"),
        "{text}"
    );
    assert!(text.contains("mcp_metrics_ingest_requests_rejected_total{code=\"replayed_request\"} 1\n"));
    svc.stop().await;
}

#[tokio::test]
async fn revoked_key_is_refused_and_rotation_keeps_other_keys_working() {
    let svc = TestService::start().await;
    let first = svc.server_with_key("s1").await;
    let second = svc.issue_key("s1").await;
    let (status, _) = svc
        .admin(
            Method::DELETE,
            &format!("/api/v1/admin/servers/s1/keys/{}", first.key_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let body = body_for("s1");
    let (status, _, answer) = svc.push(&first, &body).await;
    assert_eq!((status.as_u16(), answer["code"].as_str()), (401, Some("revoked_key")));
    let (status, _, _) = svc.push(&second, &body).await;
    assert_eq!(status, StatusCode::OK);
    // Rotation and revocation are on the server's timeline.
    let kinds = svc
        .sql_strings("SELECT kind FROM server_events WHERE server_id = 's1' AND source = 'system' ORDER BY id")
        .await;
    assert_eq!(kinds, vec!["key_rotated", "key_revoked"]);
    svc.stop().await;
}

/// A key revoked elsewhere (by another node, or the CLI in another process) after a write
/// on this node looked it up: the next write of each kind gets `revoked_key` and stores
/// nothing, and the raw read, which no commit checks, refuses it at once and makes the
/// node forget the key, so the write after it is refused before reaching the writer.
/// Writes with nothing to store reach the writer, whose check refuses them
/// (`a_write_whose_key_is_revoked_before_its_commit_is_refused` in influx.rs pins that
/// check for a write with samples).
#[tokio::test]
async fn a_key_revoked_elsewhere_after_this_node_cached_it_writes_and_reads_nothing() {
    let svc = TestService::start().await;
    let key = svc.server_with_key("s1").await;
    let reader = svc.issue_key("s1").await;
    let revoke = format!("UPDATE credentials SET revoked_at = 1 WHERE key_id = '{}'", key.key_id);
    let restore = format!(
        "UPDATE credentials SET revoked_at = NULL WHERE key_id = '{}'",
        key.key_id
    );
    let refused = |status: StatusCode, answer: &Value| {
        assert_eq!(
            (status.as_u16(), answer["code"].as_str()),
            (401, Some("revoked_key")),
            "{answer}"
        );
    };
    let influx = |line: String| {
        svc.client
            .post(svc.url("/api/v1/write?precision=ms"))
            .header("authorization", format!("Token {}", key.api_key))
            .body(line)
            .send()
    };

    // Signed JSON, and the raw read.
    let (status, _, _) = svc.push(&key, &body_for("s1")).await;
    assert_eq!(status, StatusCode::OK);
    svc.sql_execute(&revoke).await;
    let read = svc.read_samples("s1", Some(&key.api_key), "").await;
    refused(read.status(), &read.json().await.unwrap());
    let committed = svc.committed_requests().await;
    let (status, _, answer) = svc.push(&key, &body_for("s1")).await;
    refused(status, &answer);
    assert_eq!(svc.committed_requests().await, committed, "refused at the first check");
    assert_eq!(svc.samples(&reader, "").await.len(), 1);

    // An event.
    svc.sql_execute(&restore).await;
    let event = json!({"server_id": "s1", "kind": "deploy", "title": "v1"}).to_string();
    assert_eq!(svc.post_event(&key, &event).await.status(), StatusCode::CREATED);
    svc.sql_execute(&revoke).await;
    let event = json!({"server_id": "s1", "kind": "deploy", "title": "v2"}).to_string();
    let response = svc.post_event(&key, &event).await;
    refused(response.status(), &response.json().await.unwrap());
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM server_events WHERE source = 'author'")
            .await,
        1
    );

    // Line protocol.
    svc.sql_execute(&restore).await;
    let now = now_ms();
    let response = influx(format!("lines value=1 {now}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    svc.sql_execute(&revoke).await;
    let response = influx(format!("lines value=2 {now}")).await.unwrap();
    refused(response.status(), &response.json().await.unwrap());
    let lines = svc.samples(&reader, "name=lines").await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["value"], 1.0);

    // Writes with nothing to store still commit, so the writer refuses the key: a
    // remote-write body of stale markers only, and an empty OTLP export.
    let post = |path: &'static str, content_type: &'static str, body: Vec<u8>| {
        let mut request = svc
            .client
            .post(svc.url(path))
            .header("authorization", format!("Bearer {}", key.api_key))
            .header("content-type", content_type);
        if path.contains("prom") {
            request = request
                .header("content-encoding", "snappy")
                .header("x-prometheus-remote-write-version", "0.1.0");
        }
        request.body(body).send()
    };
    let stale_only = || {
        encode(&WriteRequest {
            timeseries: vec![TimeSeries::named("up", &[], &[(f64::from_bits(STALE_NAN_BITS), now)])],
        })
    };
    for (path, content_type, body) in [
        ("/api/v1/prom/write", "application/x-protobuf", stale_only()),
        ("/otlp/v1/metrics", "application/json", b"{}".to_vec()),
    ] {
        svc.sql_execute(&restore).await;
        let response = post(path, content_type, body.clone()).await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        svc.sql_execute(&revoke).await;
        let committed = svc.committed_requests().await;
        let response = post(path, content_type, body).await.unwrap();
        assert_eq!(
            svc.committed_requests().await,
            committed + 1.0,
            "{path}: refused by the writer"
        );
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        // Remote-write answers problem+json; OTLP a `google.rpc.Status` whose message
        // starts with the code.
        let code = answer["code"]
            .as_str()
            .or_else(|| answer["message"].as_str()?.split(':').next());
        assert_eq!((status.as_u16(), code), (401, Some("revoked_key")), "{path}: {answer}");
    }

    // A refused write counts none of its rejected samples.
    svc.sql_execute(&restore).await;
    let bad = batch("s1", json!([{"name":"9bad","value":1}]));
    let (status, _, answer) = svc.push(&key, &bad).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    svc.sql_execute(&revoke).await;
    let bad = batch("s1", json!([{"name":"9bad","value":2}]));
    let (status, _, answer) = svc.push(&key, &bad).await;
    refused(status, &answer);
    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_samples_rejected_total{code=\"invalid_name\"} 1\n"),
        "{text}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn several_v1_entries_allow_secret_rotation() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let body = body_for("s1");
    let now = now_ms() / 1000;
    let header = format!(
        "t={now},v1={},v1={}",
        compute(b"old-secret", now, body.as_bytes()),
        compute(cred.secret.as_bytes(), now, body.as_bytes())
    );
    let (status, _, _) = svc
        .push_raw(Some(&cred.api_key), Some(&header), "application/json", &body)
        .await;
    assert_eq!(status, StatusCode::OK);
    svc.stop().await;
}

#[tokio::test]
async fn raw_read_requires_that_servers_key() {
    let svc = TestService::start().await;
    let a = svc.server_with_key("server-a").await;
    let b = svc.server_with_key("server-b").await;
    let status = async |key: Option<&str>| svc.read_samples("server-a", key, "").await.status();
    assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(Some(&b.api_key)).await, StatusCode::FORBIDDEN);
    assert_eq!(status(Some(&a.api_key)).await, StatusCode::OK);
    svc.stop().await;
}

#[tokio::test]
async fn operator_api_requires_the_admin_token() {
    let svc = TestService::start().await;
    for token in [
        None,
        Some("wrong-token-wrong-token"),
        Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
    ] {
        let mut r = svc
            .client
            .post(svc.url("/api/v1/admin/servers"))
            .json(&json!({"id":"x"}));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let response = r.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    let (status, list) = svc.admin(Method::GET, "/api/v1/servers", None).await;
    assert_eq!((status, list["servers"].as_array().unwrap().len()), (StatusCode::OK, 0));
    svc.stop().await;

    let off = TestService::start_with(|c| c.admin_token = None).await;
    let (status, body) = off
        .admin(Method::POST, "/api/v1/admin/servers", Some(json!({"id":"x"})))
        .await;
    assert_eq!((status.as_u16(), body["code"].as_str()), (404, Some("admin_disabled")));
    off.stop().await;
}

#[tokio::test]
async fn operator_manages_servers_and_keys() {
    let svc = TestService::start().await;
    let (status, body) = svc
        .admin(
            Method::POST,
            "/api/v1/admin/servers",
            Some(json!({"id":"acme","name":"Acme","remote_url":"https://acme.example/mcp"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["summary"]["health"], "unknown");
    let (status, _) = svc
        .admin(Method::POST, "/api/v1/admin/servers", Some(json!({"id":"acme"})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = svc
        .admin(Method::POST, "/api/v1/admin/servers", Some(json!({"id":"Bad Id"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = svc
        .admin(
            Method::PATCH,
            "/api/v1/admin/servers/acme",
            Some(json!({"description":"Search"})),
        )
        .await;
    assert_eq!(
        (status, body["description"].as_str(), body["name"].as_str()),
        (StatusCode::OK, Some("Search"), Some("Acme"))
    );
    let detail: Value = svc
        .client
        .get(svc.url("/api/v1/servers/acme"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["description"], "Search");
    assert_eq!(
        svc.client
            .get(svc.url("/api/v1/servers/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    let key = svc.issue_key("acme").await;
    assert!(key.api_key.starts_with("mcpm_ak_") && key.secret.starts_with("mcpm_ss_"));
    let (status, keys) = svc.admin(Method::GET, "/api/v1/admin/servers/acme/keys", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys["keys"][0]["key_id"], key.key_id.as_str());
    assert!(!keys.to_string().contains(&key.api_key) && !keys.to_string().contains(&key.secret));

    // Secrets are stored hashed and sealed, never in plain text.
    if svc.is_postgres() {
        // Every row of the credentials table, as text, holds neither.
        let found = svc
            .sql_i64(&format!(
                "SELECT count(*) FROM credentials c WHERE c::text LIKE '%{}%' OR c::text LIKE '%{}%'",
                key.api_key, key.secret
            ))
            .await;
        assert_eq!(found, 0);
    } else {
        let raw = std::fs::read(svc.db_path()).unwrap();
        let mut wal = std::fs::read(svc.db_path().with_extension("db-wal")).unwrap_or_default();
        wal.extend(raw);
        let contains = |needle: &str| wal.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(!contains(&key.api_key) && !contains(&key.secret));
    }

    let (status, _) = svc.admin(Method::DELETE, "/api/v1/admin/servers/acme", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = svc.admin(Method::DELETE, "/api/v1/admin/servers/acme", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    svc.stop().await;
}

#[tokio::test]
async fn operations_endpoints() {
    let svc = TestService::start().await;
    let health: Value = svc
        .client
        .get(svc.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready: Value = svc
        .client
        .get(svc.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["database"].as_str()),
        (
            Some("ready"),
            Some(if svc.is_postgres() { "postgres" } else { "sqlite" })
        )
    );
    let cred = svc.server_with_key("s1").await;
    assert_eq!(svc.push(&cred, &body_for("s1")).await.0, StatusCode::OK);
    let text = svc.metrics_text().await;
    for needle in [
        "mcp_metrics_ingest_samples_accepted_total 1\n",
        "mcp_metrics_commit_duration_seconds_count",
        "mcp_metrics_commit_batch_samples_bucket",
        "mcp_metrics_ingest_queue_samples 0\n",
        "mcp_metrics_http_requests_total{route=\"/api/v1/metrics\",method=\"POST\",status=\"200\"} 1\n",
        "mcp_metrics_http_request_duration_seconds_bucket{route=\"/api/v1/metrics\"",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let missing = svc.client.get(svc.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
    svc.stop().await;
}

#[tokio::test]
async fn malformed_operator_requests_get_problem_documents_after_the_token_check() {
    let svc = TestService::start().await;
    let post = |token: Option<&'static str>, content_type: &'static str, body: &'static str| {
        let mut r = svc
            .client
            .post(svc.url("/api/v1/admin/servers"))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // Without the token the body is never looked at.
    let r = post(None, "text/plain", "nonsense").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer");
    for (content_type, body, status, code) in [
        ("application/json", "{not json", 400, "invalid_payload"),
        (
            "application/json",
            r#"{"id":"x","colour":"red"}"#,
            400,
            "invalid_payload",
        ),
        ("text/plain", r#"{"id":"x"}"#, 415, "unsupported_media_type"),
    ] {
        let r = post(Some(ADMIN_TOKEN), content_type, body).await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(r.headers().get("content-type").unwrap(), "application/problem+json");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], code);
    }
    let r = svc
        .client
        .get(svc.url("/api/v1/servers?limit=many"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers().get("content-type").unwrap(), "application/problem+json");
    let r = svc.client.put(svc.url("/api/v1/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers().get("content-type").unwrap(), "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "method_not_allowed");
    svc.stop().await;
}

#[tokio::test]
async fn revoking_twice_is_harmless_and_recorded_once() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let path = format!("/api/v1/admin/servers/s1/keys/{}", cred.key_id);
    assert_eq!(svc.admin(Method::DELETE, &path, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(svc.admin(Method::DELETE, &path, None).await.0, StatusCode::NO_CONTENT);
    let (status, _) = svc
        .admin(Method::DELETE, "/api/v1/admin/servers/s1/keys/key_nope", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let revoked = svc
        .sql_i64("SELECT count(*) FROM server_events WHERE kind = 'key_revoked'")
        .await;
    assert_eq!(revoked, 1);
    svc.stop().await;
}

/// The status a write endpoint answers to request headers alone: the body the headers
/// announce is never sent, so an answer proves the server decided without reading it.
async fn status_before_the_body(svc: &TestService, path: &str, content_type: &str, key: &str, length: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(svc.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{key}Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer without the body"))
        .unwrap();
    let line = String::from_utf8_lossy(&answer[..read]).to_string();
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: {line:?}"))
}

/// A write without a valid key is refused before its body is read, so nobody without a
/// key can make the server buffer a body (up to 20 MiB on the exporter endpoints); with a
/// key, a declared length over the limit is refused before reading too.
#[tokio::test]
async fn writes_are_refused_before_their_bodies_are_read() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    // (path, content type, the header that carries a key, the body limit)
    let endpoints = [
        ("/api/v1/metrics", "application/json", "X-API-Key", 1 << 20),
        ("/api/v1/events", "application/json", "X-API-Key", 1 << 20),
        ("/api/v1/write", "text/plain", "Authorization", 20 << 20),
        (
            "/api/v1/prom/write",
            "application/x-protobuf",
            "Authorization",
            20 << 20,
        ),
        ("/otlp/v1/metrics", "application/x-protobuf", "Authorization", 20 << 20),
    ];
    for (path, content_type, header, limit) in endpoints {
        let (unknown, known) = if header == "X-API-Key" {
            (
                "X-API-Key: mcpm_ak_unknown\r\n".to_string(),
                format!("X-API-Key: {}\r\n", cred.api_key),
            )
        } else {
            (
                "Authorization: Bearer mcpm_ak_unknown\r\n".to_string(),
                format!("Authorization: Bearer {}\r\n", cred.api_key),
            )
        };
        assert_eq!(
            status_before_the_body(&svc, path, content_type, "", limit).await,
            401,
            "{path}"
        );
        assert_eq!(
            status_before_the_body(&svc, path, content_type, &unknown, limit).await,
            401,
            "{path}"
        );
        assert_eq!(
            status_before_the_body(&svc, path, content_type, &known, limit + 1).await,
            413,
            "{path}"
        );
    }
    svc.stop().await;
}
