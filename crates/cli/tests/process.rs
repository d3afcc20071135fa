//! Tests that run the real `mcp-metrics` binary: durability across `kill -9`, draining
//! on SIGTERM, and the command-line round trip an operator and an author go through.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{ADMIN_TOKEN, Credential, free_port, register_at, wait_ready_at};
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-metrics");

fn spawn_serve(db: &str, port: u16) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", db])
        .env("MCP_METRICS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mcp-metrics serve")
}

/// Sends batches from several tasks until `stop`, returning the values of every sample
/// the service acknowledged.
async fn load_until(
    client: reqwest::Client,
    base: String,
    key: Arc<Credential>,
    stop: Arc<AtomicBool>,
    worker: u64,
) -> Vec<i64> {
    let mut acked = Vec::new();
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let base_value = (worker as i64) * 1_000_000_000 + n * 100;
        let t = now_ms() - 60_000;
        let metrics: Vec<Value> = (0..100)
            .map(|i| json!({"name":"response_time","type":"histogram","value":base_value + i,"timestamp":t,"tags":{"w":worker.to_string()}}))
            .collect();
        let body = json!({"server_id":"durable","metrics":metrics}).to_string();
        let signature = sign(key.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
        let sent = client
            .post(format!("{base}/api/v1/metrics"))
            .header("content-type", "application/json")
            .header("x-api-key", &key.api_key)
            .header("x-signature", signature)
            .body(body)
            .send()
            .await;
        if let Ok(r) = sent
            && r.status().is_success()
        {
            acked.extend((0..100).map(|i| base_value + i));
        }
        n += 1;
    }
    acked
}

async fn all_values(client: &reqwest::Client, base: &str, key: &Credential) -> Vec<i64> {
    let mut values = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: Value = client
            .get(format!("{base}/api/v1/servers/durable/samples?limit=10000{cursor}"))
            .header("x-api-key", &key.api_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        values.extend(
            page["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["value"].as_f64().unwrap() as i64),
        );
        match page["next"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    values.sort();
    values
}

async fn run_load_then(
    client: &reqwest::Client,
    base: &str,
    key: &Arc<Credential>,
    interrupt: impl FnOnce(),
) -> Vec<i64> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(load_until(
                client.clone(),
                base.to_owned(),
                key.clone(),
                stop.clone(),
                w,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    interrupt();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    acked.sort();
    acked
}

#[tokio::test]
async fn acknowledged_samples_survive_kill_9() {
    mcp_metrics_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("durable.db").display());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut child = spawn_serve(&db, port);
    wait_ready_at(&client, &base).await;
    let key = Arc::new(register_at(&client, &base, "durable").await);

    let acked = run_load_then(&client, &base, &key, || {
        child.kill().expect("SIGKILL");
    })
    .await;
    let _ = child.wait();
    assert!(
        acked.len() >= 1000,
        "the load produced only {} acknowledged samples",
        acked.len()
    );

    let mut child = spawn_serve(&db, port);
    wait_ready_at(&client, &base).await;
    let stored = all_values(&client, &base, &key).await;
    let stored_set: std::collections::HashSet<i64> = stored.iter().copied().collect();
    let lost: Vec<&i64> = acked.iter().filter(|v| !stored_set.contains(v)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged samples lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    child.kill().unwrap();
    let _ = child.wait();
}

#[tokio::test]
async fn sigterm_drains_queued_writes_and_exits_cleanly() {
    mcp_metrics_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("drain.db").display());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut child = spawn_serve(&db, port);
    wait_ready_at(&client, &base).await;
    let key = Arc::new(register_at(&client, &base, "durable").await);
    let pid = child.id().to_string();
    let acked = run_load_then(&client, &base, &key, || {
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    })
    .await;
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(acked.len() >= 1000);

    let mut child = spawn_serve(&db, port);
    wait_ready_at(&client, &base).await;
    let stored = all_values(&client, &base, &key).await;
    assert_eq!(stored, acked, "every acknowledged sample, and only those, is stored");
    child.kill().unwrap();
    let _ = child.wait();
}

fn cli(args: &[&str], db: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .args(["--database", db])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[tokio::test]
async fn cli_round_trip_servers_keys_push_read_back() {
    mcp_metrics_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("cli.db").display());

    let (ok, out, err) = cli(&["migrate"], &db, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("schema version"), "{out}");
    let (ok, out, err) = cli(&["servers", "add", "acme-search", "--name", "Acme Search"], &db, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("Registered server acme-search"));
    let (ok, _, err) = cli(&["servers", "add", "acme-search"], &db, &[]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&["servers", "add", "Bad Id"], &db, &[]);
    assert!(!ok && err.contains("server ids match"), "{err}");
    let (ok, out, _) = cli(&["servers", "list"], &db, &[]);
    assert!(
        ok && out.contains("acme-search") && out.contains("Acme Search"),
        "{out}"
    );
    let (ok, out, err) = cli(&["keys", "issue", "--server", "acme-search", "--json"], &db, &[]);
    assert!(ok, "{err}");
    let issued: Value = serde_json::from_str(&out).unwrap();
    let (api_key, secret) = (
        issued["api_key"].as_str().unwrap(),
        issued["signing_secret"].as_str().unwrap(),
    );
    // The master key file was created beside the database, readable by the owner only.
    let key_file = dir.path().join("cli.db.master-key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // Rotating the master key re-seals the secret: the file changes, the secret still works.
    let before = std::fs::read_to_string(&key_file).unwrap();
    let (ok, out, err) = cli(&["keys", "rotate-master"], &db, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("Re-sealed 1 signing secrets"), "{out}");
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), before);

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = spawn_serve(&db, port);
    wait_ready_at(&client, &base).await;

    let ts = (now_ms() - 5_000).to_string();
    let output = Command::new(BIN)
        .args([
            "push",
            "--server",
            "acme-search",
            "--url",
            &base,
            "--type",
            "histogram",
            "--timestamp",
            &ts,
        ])
        .args(["response_time=120.5,tool=search", "response_time=80,tool=fetch"])
        .env("MCP_METRICS_API_KEY", api_key)
        .env("MCP_METRICS_SIGNING_SECRET", secret)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("accepted 2 of 2"), "{stdout}");

    let page: Value = client
        .get(format!("{base}/api/v1/servers/acme-search/samples"))
        .header("x-api-key", api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ts: i64 = ts.parse().unwrap();
    assert_eq!(
        page["samples"],
        json!([
            {"name":"response_time","tags":{"tool":"search"},"timestamp":ts,"value":120.5},
            {"name":"response_time","tags":{"tool":"fetch"},"timestamp":ts,"value":80.0},
        ])
    );

    // A wrong secret is refused with the service's explanation.
    let output = Command::new(BIN)
        .args([
            "push",
            "--server",
            "acme-search",
            "--url",
            &base,
            "--key",
            api_key,
            "--secret",
            "wrong",
            "x=1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid_signature"));

    let (ok, out, _) = cli(&["keys", "list", "--server", "acme-search"], &db, &[]);
    assert!(ok && out.contains(issued["key_id"].as_str().unwrap()), "{out}");
    assert!(!out.contains(api_key) && !out.contains(secret));
    child.kill().unwrap();
    let _ = child.wait();

    // A lost key file is never silently replaced: the sealed secrets need the old key.
    let saved = std::fs::read_to_string(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let (ok, _, err) = cli(&["keys", "issue", "--server", "acme-search"], &db, &[]);
    assert!(
        !ok && err.contains("master key file") && err.contains("missing"),
        "{err}"
    );
    assert!(!key_file.exists());
    let wrong = "ab".repeat(32);
    let (ok, _, err) = cli(
        &["keys", "issue", "--server", "acme-search"],
        &db,
        &[("MCP_METRICS_MASTER_KEY", &wrong)],
    );
    assert!(!ok && err.contains("does not match"), "{err}");
    std::fs::write(&key_file, saved).unwrap();
    let (ok, out, _) = cli(
        &[
            "keys",
            "revoke",
            "--server",
            "acme-search",
            issued["key_id"].as_str().unwrap(),
        ],
        &db,
        &[],
    );
    assert!(ok, "{out}");
    let (ok, _, err) = cli(&["servers", "remove", "nope"], &db, &[]);
    assert!(!ok && err.contains("no server"));
    let (ok, out, _) = cli(&["servers", "remove", "acme-search"], &db, &[]);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn no_raw_client_address_reaches_the_database_or_the_logs() {
    mcp_metrics_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("private.db");
    let db = format!("sqlite://{}", db_path.display());
    let log_path = dir.path().join("serve.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", &db])
        .env("MCP_METRICS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MCP_METRICS_TRUSTED_PROXIES", "127.0.0.1/32")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    wait_ready_at(&client, &base).await;
    let _key = register_at(&client, &base, "durable").await;
    let addresses = ["203.0.113.77", "2001:db8:abcd:12::77", "198.51.100.201"];
    let ua = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";
    for (i, ip) in addresses.iter().cycle().take(60).enumerate() {
        let event = ["view", "install", "test", "copy_config", "repo_click"][i % 5];
        let forwarded = if i % 2 == 0 {
            ip.to_string()
        } else {
            format!("{ip}, 127.0.0.1")
        };
        let mut request = client
            .post(format!("{base}/api/v1/usage"))
            .header("user-agent", ua)
            .header("x-forwarded-for", forwarded)
            .body(json!({"server_id": if i % 7 == 0 { "unknown" } else { "durable" }, "event": event}).to_string());
        if i % 11 == 0 {
            request = request.header("content-type", "application/xml");
        }
        let _ = request.send().await.unwrap();
    }
    // Usage reads, and a failing ingest, also pass through the logs.
    let _ = client
        .get(format!("{base}/api/v1/servers/durable/usage"))
        .send()
        .await
        .unwrap();
    let _ = client
        .post(format!("{base}/api/v1/metrics"))
        .header("x-forwarded-for", addresses[0])
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored: Value = client
        .get(format!("{base}/api/v1/servers/durable/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stored["raw_totals"]["views"].as_u64().unwrap() > 0, "{stored}");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    child.wait().unwrap();

    let mut haystack = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        haystack.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(haystack.len() > 10_000, "database and logs were written");
    let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    for ip in addresses {
        assert!(!contains(ip.as_bytes()), "{ip} found in the database files or the logs");
        let parsed: std::net::IpAddr = ip.parse().unwrap();
        let octets: Vec<u8> = match parsed {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        assert!(!contains(&octets), "{ip} found in binary form");
    }
}

/// `mcp-metrics bench` against a service whose write allowance it outruns says so, and
/// how to measure the pipeline instead, rather than reporting bare errors.
#[tokio::test]
async fn bench_past_the_write_allowance_says_how_to_raise_it() {
    let svc = common::TestService::start_with(|c| {
        c.ingest.samples_per_second_per_server = 1;
        c.ingest.burst_samples_per_server = 2_000;
        c.ingest.max_samples_per_request = 1_000;
    })
    .await;
    let base = svc.url("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["bench", "--url", base.trim_end_matches('/'), "--mode", "influx"])
            .args(["--samples", "5000", "--batch", "1000", "--connections", "1"])
            .env("MCP_METRICS_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 requests failed, 3 of them refused by the server's write allowance (429)")
            && stderr.contains("samples_per_second_per_server"),
        "{stderr}"
    );
    svc.stop().await;
}
