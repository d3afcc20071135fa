//! InfluxDB line protocol over HTTP, as `curl` or Telegraf send it: every precision,
//! the three ways to pass the key, refused lines named, auth failures and size limits.

mod common;

use common::TestService;
use mcp_metrics_core::time::now_ms;
use reqwest::StatusCode;
use serde_json::Value;

async fn write(svc: &TestService, auth: Option<(&str, &str)>, query: &str, body: String) -> (StatusCode, Value) {
    let mut r = svc.client.post(svc.url(&format!("/api/v1/write{query}"))).body(body);
    if let Some((header, value)) = auth {
        r = r.header(header, value);
    }
    let response = r.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn line_protocol_lands_with_every_precision_and_key_style() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let base = now_ms() - 60_000;
    let bearer = format!("Bearer {}", cred.api_key);
    let token = format!("Token {}", cred.api_key);
    let cases: [(&str, i64, (&str, &str)); 4] = [
        ("ns", (base + 1) * 1_000_000, ("x-api-key", cred.api_key.as_str())),
        ("us", (base + 2) * 1_000, ("authorization", bearer.as_str())),
        ("ms", base + 3, ("authorization", token.as_str())),
        ("s", base / 1000 + 10, ("x-api-key", cred.api_key.as_str())),
    ];
    for (i, (precision, ts, auth)) in cases.iter().enumerate() {
        let body = format!("mcp,tool=search\\ v2 latency={}.5,ok=t,calls={i}i {ts}\n", 100 + i);
        let (status, answer) = write(&svc, Some(*auth), &format!("?precision={precision}"), body).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{precision}: {answer}");
    }
    let samples = svc.samples(&cred, "name=mcp_latency").await;
    let got: Vec<(i64, f64)> = samples
        .iter()
        .map(|s| (s["timestamp"].as_i64().unwrap(), s["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (base + 1, 100.5),
            (base + 2, 101.5),
            (base + 3, 102.5),
            ((base / 1000 + 10) * 1000, 103.5)
        ]
    );
    assert_eq!(samples[0]["tags"], serde_json::json!({"tool": "search v2"}));
    assert_eq!(svc.samples(&cred, "name=mcp_ok").await.len(), 4);
    assert_eq!(svc.samples(&cred, "name=mcp_calls").await[3]["value"], 3.0);
    svc.stop().await;
}

#[tokio::test]
async fn refused_lines_are_named_and_the_rest_is_stored() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let t = now_ms() - 1000;
    let body = format!(
        "good value=1 {t}\nlog msg=\"hello\" {t}\nbad-name value=2 {t}\nalso_good value=3 {t}\nbroken\nm,k=a,k=b value=4 {t}\n"
    );
    let (status, answer) = write(&svc, Some(("x-api-key", &cred.api_key)), "?precision=ms", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["accepted"], 2);
    let lines: Vec<(u64, &str)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (2, "invalid_payload"),
            (3, "invalid_name"),
            (5, "invalid_payload"),
            (6, "invalid_payload")
        ]
    );
    assert!(answer["detail"].as_str().unwrap().contains("line 2"));
    assert_eq!(svc.samples(&cred, "").await.len(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn auth_failures_and_limits() {
    let svc = TestService::start_with(|c| c.ingest.max_samples_per_request = 3).await;
    let cred = svc.server_with_key("acme").await;
    let body = || "m value=1\n".to_string();
    let (status, answer) = write(&svc, None, "", body()).await;
    assert_eq!((status.as_u16(), answer["code"].as_str()), (401, Some("missing_key")));
    let (status, answer) = write(&svc, Some(("authorization", "Bearer nope")), "", body()).await;
    assert_eq!((status.as_u16(), answer["code"].as_str()), (401, Some("unknown_key")));
    let (status, answer) = write(&svc, Some(("authorization", "Basic abc")), "", body()).await;
    assert_eq!((status.as_u16(), answer["code"].as_str()), (401, Some("missing_key")));
    let (status, _) = write(&svc, Some(("x-api-key", &cred.api_key)), "?precision=h", body()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let many = "m value=1\n".repeat(4);
    let (status, answer) = write(&svc, Some(("x-api-key", &cred.api_key)), "", many).await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (413, Some("too_many_samples"))
    );
    let huge = format!("m,pad={} value=1\n", "p".repeat(21 << 20));
    let (status, answer) = write(&svc, Some(("x-api-key", &cred.api_key)), "", huge).await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(svc.samples(&cred, "").await.is_empty());
    svc.stop().await;
}

#[tokio::test]
async fn gzip_bodies_as_telegraf_sends_them() {
    use std::io::Write;
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let t = now_ms() - 1000;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    writeln!(gz, "disk used=42i {t}").unwrap();
    let response = svc
        .client
        .post(svc.url("/api/v1/write?precision=ms"))
        .header("x-api-key", &cred.api_key)
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(svc.samples(&cred, "name=disk_used").await[0]["value"], 42.0);
    // A gzip bomb: 21 MiB of spaces in a few kilobytes is refused after decompression.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 21 << 20]).unwrap();
    let response = svc
        .client
        .post(svc.url("/api/v1/write"))
        .header("x-api-key", &cred.api_key)
        .header("content-encoding", "gzip")
        .body(bomb.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    svc.stop().await;
}

/// A server deleted while one of its writes waits for the writer (here: between the
/// write's key check and its commit) answers that write as an unknown key and stores
/// nothing; the service goes on. The deletion holds what `delete_server` holds first
/// (PostgreSQL: the server's row; SQLite: the write lock) so the write waits behind it.
#[tokio::test]
async fn a_write_whose_server_is_deleted_before_its_commit_is_refused() {
    a_write_waiting_while_its_server_goes("DELETE FROM servers WHERE id = 'gone'; COMMIT", "unknown_key").await;
}

/// The same when the key is revoked meanwhile: the answer says so.
#[tokio::test]
async fn a_write_whose_key_is_revoked_before_its_commit_is_refused() {
    a_write_waiting_while_its_server_goes(
        "UPDATE credentials SET revoked_at = 1 WHERE server_id = 'gone'; COMMIT",
        "revoked_key",
    )
    .await;
}

/// The same when the server is created again under the same id before the write commits:
/// the new server has other keys, so the write authenticated with the old one is refused
/// and lands in neither.
#[tokio::test]
async fn a_write_whose_server_is_deleted_and_created_again_before_its_commit_is_refused() {
    a_write_waiting_while_its_server_goes(
        "DELETE FROM servers WHERE id = 'gone';
         INSERT INTO servers (id, created_at, updated_at) VALUES ('gone', 1, 1);
         COMMIT",
        "unknown_key",
    )
    .await;
}

/// A write of server "gone" waits for the writer behind a transaction that then runs
/// `deletion` (which ends with COMMIT); the write must get 401 with `code` and store
/// nothing, and a write of another server must still be stored.
async fn a_write_waiting_while_its_server_goes(deletion: &str, code: &str) {
    let svc = TestService::start().await;
    let gone = svc.server_with_key("gone").await;
    let other = svc.server_with_key("other").await;
    let (pg, lite) = if svc.is_postgres() {
        let client = svc.pg_client().await;
        client
            .batch_execute("BEGIN; SELECT id FROM servers WHERE id = 'gone' FOR UPDATE")
            .await
            .unwrap();
        (Some(client), None)
    } else {
        let conn = rusqlite::Connection::open(svc.db_path()).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        (None, Some(conn))
    };
    let pending = {
        let (svc_client, url, key) = (svc.client.clone(), svc.url("/api/v1/write"), gone.api_key.clone());
        tokio::spawn(async move {
            let response = svc_client
                .post(url)
                .header("x-api-key", key)
                .body("fresh,host=a value=1")
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    // Queued means past the key check (the gauge counts samples handed to the writer and
    // drops only once their commit returned): the 401 below must come from the writer.
    common::eventually(std::time::Duration::from_secs(5), "the write queued", || async {
        svc.metrics_text()
            .await
            .contains("\nmcp_metrics_ingest_queue_samples 1\n")
    })
    .await;
    assert!(!pending.is_finished(), "the write waits in the queue for the deletion");
    match (pg, lite) {
        (Some(client), _) => client.batch_execute(deletion).await.unwrap(),
        (_, Some(conn)) => conn.execute_batch(deletion).unwrap(),
        _ => unreachable!(),
    }
    let (status, answer) = pending.await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    assert_eq!(svc.sql_i64("SELECT COUNT(*) FROM series").await, 0);
    let (status, answer) = write(&svc, Some(("x-api-key", &other.api_key)), "", "m value=2".into()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    svc.stop().await;
}
