//! Server-rendered pages over HTTP: they render with data and without JavaScript, and
//! the author dashboard only opens with a valid key and only shows its own server.

mod common;

use common::{TestService, batch};
use mcp_metrics_core::time::now_ms;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn page(svc: &TestService, path: &str) -> (StatusCode, String) {
    let r = svc.client.get(svc.url(path)).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn pages_render_the_directory_a_server_and_a_comparison() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    svc.create_server("beta").await;
    let m = (now_ms() / 60_000 - 3) * 60_000;
    let metrics: Vec<_> = (0..30)
        .map(|i| json!({"name":"response_time","type":"histogram","value":50 + i,"timestamp":m + i}))
        .collect();
    assert_eq!(
        svc.push(&cred, &batch("acme", serde_json::Value::Array(metrics)))
            .await
            .0,
        StatusCode::OK
    );
    svc.admin(Method::POST, "/api/v1/admin/aggregate", None).await;

    let (status, html) = page(&svc, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"href="/servers/acme""#) && html.contains(r#"href="/servers/beta""#));
    let (_, filtered) = page(&svc, "/?q=bet").await;
    assert!(!filtered.contains(r#"href="/servers/acme""#) && filtered.contains(r#"href="/servers/beta""#));

    let (status, html) = page(&svc, "/servers/acme?period=1h").await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        r#"id="overview""#,
        r#"id="metrics""#,
        r#"id="usage""#,
        r#"id="events""#,
        r#"data-metric="response_time""#,
        "<svg",
        r#"class="pt""#,
    ] {
        assert!(html.contains(needle), "server page lacks {needle}");
    }
    assert_eq!(page(&svc, "/servers/nope").await.0, StatusCode::NOT_FOUND);
    let (_, cmp) = page(
        &svc,
        "/compare?servers=acme,beta&metric=response_time&stat=p95&period=1h",
    )
    .await;
    assert!(
        cmp.contains("<svg") && cmp.contains("beta has no response_time data"),
        "{cmp}"
    );
    let (status, js) = page(&svc, "/static/app.js").await;
    assert!(status == StatusCode::OK && js.contains("EventSource"));
    svc.stop().await;
}

#[tokio::test]
async fn templates_escape_what_authors_and_operators_write() {
    let svc = TestService::start().await;
    let (status, _) = svc
        .admin(
            Method::POST,
            "/api/v1/admin/servers",
            Some(json!({"id":"x","name":"<script>alert(1)</script>","description":"a & b"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, html) = page(&svc, "/").await;
    assert!(!html.contains("<script>alert(1)"));
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") || html.contains("&#60;script&#62;"),
        "{html}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn dashboard_refuses_a_wrong_key_and_shows_only_its_own_server() {
    let svc = TestService::start().await;
    let a = svc.server_with_key("alpha").await;
    let b = svc.server_with_key("bravo").await;
    let t = now_ms() - 1000;
    svc.push(
        &a,
        &batch(
            "alpha",
            json!([{"name":"alpha_only_metric","value":1,"timestamp":t},{"name":"9bad","value":1}]),
        ),
    )
    .await;
    svc.push(
        &b,
        &batch("bravo", json!([{"name":"bravo_only_metric","value":2,"timestamp":t}])),
    )
    .await;
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .unwrap();

    let (status, html) = {
        let r = browser.get(svc.url("/dashboard")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(
        status == StatusCode::OK && html.contains(r#"name="api_key""#),
        "login form first"
    );
    let r = browser
        .post(svc.url("/dashboard/login"))
        .form(&[("api_key", "mcpm_ak_wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("not valid"));
    let r = browser.get(svc.url("/dashboard")).send().await.unwrap();
    assert!(
        r.text().await.unwrap().contains(r#"name="api_key""#),
        "still signed out"
    );

    // A cross-site post is refused even with a good key.
    let r = browser
        .post(svc.url("/dashboard/login"))
        .header("origin", "https://evil.example")
        .form(&[("api_key", a.api_key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let r = browser
        .post(svc.url("/dashboard/login"))
        .form(&[("api_key", a.api_key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "redirected to the dashboard");
    let html = r.text().await.unwrap();
    assert!(html.contains("Dashboard: alpha"));
    assert!(html.contains("alpha_only_metric") && !html.contains("bravo_only_metric"));
    assert!(html.contains("invalid_name"), "rejected samples by code");
    assert!(html.contains(&a.key_id) && !html.contains(&b.key_id));
    assert!(!html.contains(&a.api_key), "the key is never echoed");

    // The session cookie is HttpOnly and SameSite=Strict.
    let cookie = login_cookie(&svc, &a.api_key, &[]).await;
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // Not `Secure` over plain HTTP, nor when an untrusted peer claims HTTPS: the browser
    // would not send it back.
    assert!(!cookie.contains("Secure"), "{cookie}");
    let cookie = login_cookie(&svc, &a.api_key, &["https"]).await;
    assert!(!cookie.contains("Secure"), "no trusted proxy: {cookie}");

    // Signing out needs the form's token.
    let r = browser
        .post(svc.url("/dashboard/logout"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let token = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let r = browser
        .post(svc.url("/dashboard/logout"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains(r#"name="api_key""#), "signed out");
    svc.stop().await;
}

/// The `Set-Cookie` of a dashboard login with `api_key`, sent with one
/// `X-Forwarded-Proto` line per entry of `protos` (redirects not followed, so the login's
/// own answer is read).
async fn login_cookie(svc: &TestService, api_key: &str, protos: &[&str]) -> String {
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut request = raw.post(svc.url("/dashboard/login")).form(&[("api_key", api_key)]);
    for proto in protos {
        request = request.header("x-forwarded-proto", *proto);
    }
    let r = request.send().await.unwrap();
    r.headers().get("set-cookie").unwrap().to_str().unwrap().to_owned()
}

/// Behind a trusted proxy that says (last, in its own `X-Forwarded-Proto` entry) the
/// browser came over HTTPS, the session cookie is `Secure`.
#[tokio::test]
async fn the_session_cookie_is_secure_behind_an_https_proxy() {
    let svc = TestService::start_with(|c| c.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let key = svc.server_with_key("alpha").await;
    let secure = login_cookie(&svc, &key.api_key, &["http, https"]).await;
    assert!(secure.contains("; Secure") && secure.contains("HttpOnly"), "{secure}");
    // The proxy's value on a line of its own counts the same.
    let own_line = login_cookie(&svc, &key.api_key, &["http", "https"]).await;
    assert!(own_line.contains("; Secure"), "{own_line}");
    let plain = login_cookie(&svc, &key.api_key, &["http"]).await;
    assert!(!plain.contains("Secure"), "{plain}");
}

/// The directory shows 50 servers a page, in the chosen order, with links that keep the
/// search and the order.
#[tokio::test]
async fn the_directory_is_paged() {
    let svc = TestService::start().await;
    for i in 0..52 {
        svc.create_server(&format!("srv-{i:02}")).await;
    }
    let shown = |html: &str| {
        (0..52)
            .filter(|i| html.contains(&format!(r#"href="/servers/srv-{i:02}""#)))
            .collect::<Vec<_>>()
    };

    let (status, first) = page(&svc, "/?sort=name").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown(&first), (0..50).collect::<Vec<_>>());
    assert!(first.contains("Page 1 of 2 · 52 servers"), "pager");
    assert!(first.contains(r#"href="/?q=&amp;sort=name&amp;page=2""#) && !first.contains(r#"rel="prev""#));

    let (_, second) = page(&svc, "/?sort=name&page=2").await;
    assert_eq!(shown(&second), vec![50, 51]);
    assert!(second.contains(r#"href="/?q=&amp;sort=name&amp;page=1""#) && !second.contains(r#"rel="next""#));
    let (_, beyond) = page(&svc, "/?sort=name&page=99").await;
    assert_eq!(shown(&beyond), vec![50, 51], "a page past the end shows the last");

    let (_, searched) = page(&svc, "/?q=srv-5&sort=name").await;
    assert_eq!(shown(&searched), vec![50, 51]);
    assert!(!searched.contains("Page 1 of"), "one page needs no pager");
}
