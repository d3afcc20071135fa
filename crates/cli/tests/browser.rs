//! The web pages in a real browser: Debian's headless Chromium driven by playwright-core
//! (tests/browser/check.mjs). The test starts the real binary with demo-like data,
//! then the script opens the directory, a server, its Metrics tab, pushes a sample and
//! waits for the live update, checks the page view was counted, and saves screenshots
//! in crates/cli/tests/browser/screenshots.
//!
//! Without Chromium or the npm package the test is skipped, except when `CI` is set:
//! then it fails, so CI cannot pass without running it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::ADMIN_TOKEN;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-metrics");

#[tokio::test]
async fn pages_work_in_headless_chromium() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = Path::new(&chromium).exists() && here.join("node_modules/playwright-core").exists();
    if !ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {chromium} or tests/browser/node_modules is missing: .ci/run installs them"
        );
        eprintln!("skipping: install chromium and run `npm ci` in {}", here.display());
        return;
    }
    mcp_metrics_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    // Rollups every 0.2 s, as the live tests use, so the 2-second budget measures the
    // page and the stream rather than the job's tick.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[rollup]\ninterval_secs = 0.2\n").unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
            config.to_str().unwrap(),
        ])
        .args([
            "--database",
            &format!("sqlite://{}", dir.path().join("web.db").display()),
        ])
        .env("MCP_METRICS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends, so a failure leaves no service running.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(child);
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..400 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the service did not become ready");
    let admin = |path: &str| client.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN);
    admin("/api/v1/admin/servers")
        .json(&json!({"id":"acme","name":"Acme Search","description":"Search for agents"}))
        .send()
        .await
        .unwrap();
    let key: Value = admin("/api/v1/admin/servers/acme/keys")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (api_key, secret) = (
        key["api_key"].as_str().unwrap(),
        key["signing_secret"].as_str().unwrap(),
    );
    // An hour of latency observations so the charts have data.
    let now = mcp_metrics_core::time::now_ms();
    let metrics: Vec<Value> = (0..600)
        .map(|i| json!({"name":"response_time","type":"histogram","value":40 + (i * 37) % 90,"timestamp":now - 3_500_000 + i * 5_800}))
        .collect();
    let body = json!({"server_id":"acme","metrics":metrics}).to_string();
    let signature = mcp_metrics_core::signature::sign(secret.as_bytes(), now / 1000, body.as_bytes());
    let r = client
        .post(format!("{base}/api/v1/metrics"))
        .header("content-type", "application/json")
        .header("x-api-key", api_key)
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    admin("/api/v1/admin/aggregate").send().await.unwrap();

    let output = Command::new("node")
        .arg(here.join("check.mjs"))
        .env("BASE_URL", &base)
        .env("SERVER", "acme")
        .env("API_KEY", api_key)
        .env("SIGNING_SECRET", secret)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOTS", here.join("screenshots"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok - the page view was counted"));
    for shot in ["directory.png", "metrics.png", "live.png"] {
        assert!(here.join("screenshots").join(shot).exists(), "{shot} saved");
    }
}
