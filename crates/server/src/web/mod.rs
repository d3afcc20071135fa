//! Server-rendered pages (DESIGN.md §6): the directory, a server's page with tabs,
//! comparison and the author dashboard. Templates are compiled into the binary
//! (askama, HTML-escaped); charts are the same server-drawn SVG as `/charts/...`, so
//! every page is readable with JavaScript off. `static/app.js` adds tabs, period
//! switching without reload, live updates and the usage beacon.

pub mod session;

use std::net::SocketAddr;

use askama::Template;
use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use mcp_metrics_core::model::Kind;
use mcp_metrics_core::period::Period;
use mcp_metrics_core::secrets::hash_api_key;
use mcp_metrics_core::time::{format_rfc3339_ms, now_ms};
use mcp_metrics_core::usage::{DAY_MS, UsageKind, day_of};
use serde::Deserialize;

use crate::charts::build_chart;
use crate::charts::svg::{self, Chart, ChartSeries, Style};
use crate::http::metrics::{combined_points, stat_series};
use crate::http::problem::{ApiError, ApiResult};
use crate::http::servers::summary;
use crate::state::AppState;
use session::Session;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(directory))
        .route("/servers/{id}", get(server_page))
        .route("/compare", get(compare_page))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route(
            "/static/app.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../../static/app.css")) }),
        )
        .route(
            "/static/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("../../static/app.js")) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn render(template: &impl Template) -> ApiResult<Response> {
    let html = template.render().map_err(|e| {
        tracing::error!(error = %e, "template rendering failed");
        ApiError::new(
            mcp_metrics_core::codes::Code::Internal,
            "an internal error occurred; it has been logged",
        )
    })?;
    Ok(Html(html).into_response())
}

const PERIODS: [&str; 7] = ["1h", "6h", "24h", "7d", "30d", "90d", "1y"];

fn ms_text(v: Option<f64>) -> String {
    v.map(|v| svg::format_value(v, Some("ms")))
        .unwrap_or_else(|| "–".into())
}

struct DirRow {
    id: String,
    name: String,
    description: String,
    health: &'static str,
    p95: String,
    installs: u64,
    views: u64,
    sparkline: String,
    search_text: String,
}

/// Servers per directory page.
const DIRECTORY_PAGE: usize = 50;

#[derive(Template)]
#[template(path = "directory.html")]
struct DirectoryPage {
    rows: Vec<DirRow>,
    q: String,
    sort: String,
    sorts: Vec<(&'static str, &'static str)>,
    /// Servers matching the search, on all pages.
    total: usize,
    page: usize,
    pages: usize,
}

#[derive(Deserialize)]
struct DirectoryQuery {
    q: Option<String>,
    sort: Option<String>,
    page: Option<usize>,
}

async fn directory(
    State(state): State<AppState>,
    query: Result<Query<DirectoryQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let mut sort = q.sort.unwrap_or_else(|| "popular".into());
    let needle = q.q.clone().unwrap_or_default().trim().to_lowercase();
    let now = now_ms();
    let mut rows = Vec::new();
    for server in state.store.list_servers().await? {
        let name = server.name.clone().unwrap_or_else(|| server.id.clone());
        let description = server.description.clone().unwrap_or_default();
        let search_text = format!("{} {} {}", server.id, name, description).to_lowercase();
        if !needle.is_empty() && !search_text.contains(&needle) {
            continue;
        }
        let s = summary(&state, &server.id).await?;
        rows.push((
            server.clone(),
            s,
            DirRow {
                id: server.id.clone(),
                name,
                description,
                health: "unknown",
                p95: ms_text(s.p95_24h),
                installs: s.installs_30d,
                views: s.views_30d,
                sparkline: String::new(),
                search_text,
            },
        ));
    }
    if !matches!(sort.as_str(), "popular" | "uptime" | "latency" | "name") {
        sort = "popular".into();
    }
    rows.sort_by(|(a, sa, _), (b, sb, _)| crate::http::servers::order(&sort, (a, sa), (b, sb)));
    // Every match is summarised to be sorted; only the shown page draws its sparklines.
    let total = rows.len();
    let pages = total.div_ceil(DIRECTORY_PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let mut shown = Vec::with_capacity(DIRECTORY_PAGE);
    for (_, _, mut row) in rows.into_iter().skip((page - 1) * DIRECTORY_PAGE).take(DIRECTORY_PAGE) {
        let trend = match combined_points(&state, &row.id, "response_time", Period::D7, now).await? {
            Some((Kind::Histogram, _, points, inc)) => {
                stat_series(Kind::Histogram, "p95", &points, &inc, Period::D7.resolution_ms())
            }
            _ => Vec::new(),
        };
        row.sparkline = svg::render_sparkline(&trend, "#4f46e5");
        shown.push(row);
    }
    render(&DirectoryPage {
        rows: shown,
        total,
        page,
        pages,
        q: q.q.unwrap_or_default(),
        sort,
        sorts: vec![
            ("popular", "Popularity"),
            ("latency", "Latency"),
            ("uptime", "Uptime"),
            ("name", "Name"),
        ],
    })
}

struct ChartBox {
    metric: String,
    svg: String,
}

struct EventRow {
    at: String,
    kind: String,
    title: String,
    detail: Option<String>,
    source: &'static str,
}

/// The newest events of a server, for its page and its dashboard.
async fn recent_events(state: &AppState, id: &str) -> ApiResult<Vec<EventRow>> {
    Ok(state
        .store
        .list_events(id, None, 20)
        .await?
        .into_iter()
        .map(|e| EventRow {
            at: format_rfc3339_ms(e.event.at),
            kind: e.event.kind,
            title: e.event.title,
            detail: e.event.detail,
            source: e.event.source.as_str(),
        })
        .collect())
}

#[derive(Template)]
#[template(path = "server.html")]
struct ServerPage {
    id: String,
    name: String,
    description: String,
    repository_url: Option<String>,
    registry_name: Option<String>,
    health: &'static str,
    install_snippet: String,
    period: String,
    periods: [&'static str; 7],
    p95: String,
    requests: String,
    error_rate: String,
    installs: u64,
    views: u64,
    visitors: u64,
    tests: u64,
    charts: Vec<ChartBox>,
    usage_chart: String,
    events: Vec<EventRow>,
}

#[derive(Deserialize)]
struct PeriodQuery {
    period: Option<String>,
}

/// Well-known metrics first, in this order; other metrics follow by name.
const CHARTED: [&str; 5] = ["response_time", "requests", "errors", "tool_calls", "active_sessions"];

async fn server_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<PeriodQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let period = q.period.as_deref().and_then(Period::parse).unwrap_or(Period::H24);
    let server = state
        .store
        .get_server(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    let s = summary(&state, &id).await?;
    let mut names: Vec<String> = state
        .store
        .series_of_server(&id, None)
        .await?
        .into_iter()
        .map(|s| s.key.name)
        .collect();
    names.sort_by_key(|n| (CHARTED.iter().position(|c| c == n).unwrap_or(CHARTED.len()), n.clone()));
    names.dedup();
    names.truncate(8);
    let mut charts = Vec::new();
    for name in &names {
        let chart = build_chart(&state, &id, name, period, None, (640, 240)).await?;
        charts.push(ChartBox {
            metric: name.clone(),
            svg: svg::render_chart(&chart),
        });
    }
    let metrics = crate::http::metrics::compute_metrics(&state, &id, period, None, now_ms()).await?;
    let summary_json = &metrics["summary"];
    let requests = summary_json["requests"]
        .as_f64()
        .map(|v| format!("{v:.0}"))
        .unwrap_or_else(|| "–".into());
    let error_rate = summary_json["error_rate"]
        .as_f64()
        .map(|v| format!("{:.2} %", v * 100.0))
        .unwrap_or_else(|| "–".into());

    let today = day_of(state.clock.now_ms());
    let days = state.store.usage_days(&id, today - 29, today).await?;
    let totals = crate::http::usage::sum_days(&days);
    let mut views = vec![Some(0.0); 30];
    let mut installs = vec![Some(0.0); 30];
    for d in &days {
        let i = (d.day - (today - 29)) as usize;
        views[i] = Some(d.counted[UsageKind::View.index()] as f64);
        installs[i] = Some(d.counted[UsageKind::Install.index()] as f64);
    }
    let usage_chart = svg::render_chart(&Chart {
        title: "Views and installs · 30d".into(),
        unit: None,
        period: Period::D30,
        resolution_ms: DAY_MS,
        t: (0..30).map(|i| (today - 29 + i) * DAY_MS).collect(),
        series: vec![
            ChartSeries {
                label: "views".into(),
                color: "#6366f1",
                style: Style::Bars,
                values: views,
            },
            ChartSeries {
                label: "installs".into(),
                color: "#16a34a",
                style: Style::Bars,
                values: installs,
            },
        ],
        width: 640,
        height: 220,
    });
    let events = recent_events(&state, &id).await?;
    // Built as JSON, so quotes in operator- or registry-supplied fields stay data.
    let entry = match (&server.remote_url, &server.registry_name) {
        (Some(url), _) => serde_json::json!({ "url": url }),
        (None, Some(registry)) => serde_json::json!({ "registry": registry }),
        _ => serde_json::json!({}),
    };
    let install_snippet = serde_json::json!({ "mcpServers": { server.id.clone(): entry } }).to_string();
    render(&ServerPage {
        name: server.name.clone().unwrap_or_else(|| server.id.clone()),
        description: server.description.clone().unwrap_or_default(),
        repository_url: server.repository_url.clone(),
        registry_name: server.registry_name.clone(),
        id,
        health: "unknown",
        install_snippet,
        period: period.as_str().to_owned(),
        periods: PERIODS,
        p95: ms_text(s.p95_24h),
        requests,
        error_rate,
        installs: s.installs_30d,
        views: s.views_30d,
        visitors: totals.visitors,
        tests: totals.counted[UsageKind::Test.index()],
        charts,
        usage_chart,
        events,
    })
}

#[derive(Template)]
#[template(path = "compare.html")]
struct ComparePage {
    servers: String,
    metric: String,
    stat: String,
    period: String,
    periods: [&'static str; 7],
    chart: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct CompareQuery {
    servers: Option<String>,
    metric: Option<String>,
    stat: Option<String>,
    period: Option<String>,
}

const PALETTE: [&str; 6] = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];

async fn compare_page(
    State(state): State<AppState>,
    query: Result<Query<CompareQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let metric = q.metric.unwrap_or_else(|| "response_time".into());
    let stat = q.stat.unwrap_or_else(|| "p95".into());
    let period = q.period.as_deref().and_then(Period::parse).unwrap_or(Period::D7);
    let list = q.servers.unwrap_or_default();
    let ids: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(6)
        .collect();
    let mut error = None;
    let mut chart = None;
    if !ids.is_empty() {
        let now = now_ms();
        let mut series = Vec::new();
        let mut kind = None;
        for (i, id) in ids.iter().enumerate() {
            match combined_points(&state, id, &metric, period, now).await? {
                Some((k, _, points, inc)) if crate::http::metrics::stat_allowed(k, &stat) => {
                    kind = Some(k);
                    series.push(ChartSeries {
                        label: (*id).to_owned(),
                        color: PALETTE[i % PALETTE.len()],
                        style: Style::Line,
                        values: stat_series(k, &stat, &points, &inc, period.resolution_ms()),
                    });
                }
                Some((k, ..)) => error = Some(format!("{stat} does not apply to {metric}, a {}", k.as_str())),
                None => error = Some(format!("{id} has no {metric} data")),
            }
        }
        let (from, _) = period.window(now);
        chart = Some(svg::render_chart(&Chart {
            title: format!("{metric} {stat} · {}", period.as_str()),
            unit: if kind == Some(Kind::Counter) {
                None
            } else {
                crate::charts::unit_of(&metric)
            },
            period,
            resolution_ms: period.resolution_ms(),
            t: (0..period.points())
                .map(|i| from + i * period.resolution_ms())
                .collect(),
            series,
            width: 960,
            height: 320,
        }));
    }
    render(&ComparePage {
        servers: list,
        metric,
        stat,
        period: period.as_str().to_owned(),
        periods: PERIODS,
        chart,
        error,
    })
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
}

struct KeyRow {
    key_id: String,
    created: String,
    last_used: String,
    revoked: String,
}

/// Where a server stands against its write limits.
struct LimitsRow {
    series: usize,
    /// 0: no limit.
    max_series: u64,
    /// Samples a second; 0: no limit.
    rate: u32,
    burst: u32,
    rate_limited: u64,
}

struct SampleRow {
    at: String,
    name: String,
    tags: String,
    value: f64,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    server_id: String,
    csrf: String,
    rejected: Vec<(&'static str, u64)>,
    limits: LimitsRow,
    keys: Vec<KeyRow>,
    samples: Vec<SampleRow>,
    events: Vec<EventRow>,
}

fn session_key(state: &AppState) -> [u8; 32] {
    state.master_key.derive("dashboard session")
}

/// The valid session of a request: signed, unexpired, and its credential not revoked.
async fn current_session(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<Session>> {
    let Some(value) = headers
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(session::from_cookie_header)
    else {
        return Ok(None);
    };
    let Some(s) = Session::decode(value, &session_key(state), now_ms()) else {
        return Ok(None);
    };
    let active = state
        .store
        .list_credentials(Some(&s.server_id))
        .await?
        .iter()
        .any(|c| c.key_id == s.key_id && c.revoked_at.is_none());
    Ok(active.then_some(s))
}

async fn dashboard(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let Some(s) = current_session(&state, &headers).await? else {
        return render(&LoginPage { error: None });
    };
    let id = s.server_id.clone();
    let series = state.store.series_of_server(&id, None).await?;
    let now = now_ms();
    let rows = state
        .store
        .read_samples(&mcp_metrics_store::SampleQuery {
            series_ids: series.iter().map(|s| s.id).collect(),
            // The last minute: raw reads page oldest first, so a wider window on a busy
            // server would show old samples.
            from: now - 60_000,
            to: now + 300_001,
            after: None,
            limit: 10_000,
        })
        .await?;
    let samples = rows
        .iter()
        .rev()
        .take(200)
        .filter_map(|r| {
            let info = series.iter().find(|s| s.id == r.series_id)?;
            Some(SampleRow {
                at: format_rfc3339_ms(r.timestamp),
                name: info.key.name.clone(),
                tags: info
                    .key
                    .tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                value: r.value,
            })
        })
        .collect();
    let keys = state
        .store
        .list_credentials(Some(&id))
        .await?
        .into_iter()
        .map(|c| KeyRow {
            key_id: c.key_id,
            created: format_rfc3339_ms(c.created_at),
            last_used: c.last_used_at.map(format_rfc3339_ms).unwrap_or_else(|| "never".into()),
            revoked: c.revoked_at.map(format_rfc3339_ms).unwrap_or_else(|| "–".into()),
        })
        .collect();
    let events = recent_events(&state, &id).await?;
    let ingest = &state.config.ingest;
    let limits = LimitsRow {
        series: series.len(),
        max_series: ingest.max_series_per_server,
        rate: ingest.samples_per_second_per_server,
        burst: ingest.burst_samples_per_server,
        rate_limited: state.telemetry.rate_limited_of(&id),
    };
    let mut response = render(&DashboardPage {
        csrf: s.csrf(&session_key(&state)),
        rejected: state.telemetry.rejected_of(&id),
        limits,
        server_id: id,
        keys,
        samples,
        events,
    })?;
    // Private data: never stored by shared caches.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Refuses cross-site form posts: a browser always sends Origin on POST.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()), host) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, rest)| rest == host),
        (Some(_), None) => false,
    }
}

#[derive(Deserialize)]
struct LoginForm {
    api_key: String,
}

/// The attributes of the session cookie: `Secure` too when a trusted proxy says the
/// browser came over HTTPS (`X-Forwarded-Proto`), so the cookie never travels in clear
/// text there, while a service reached directly over plain HTTP (loopback, a private
/// network) can still sign in.
fn cookie_attributes(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> &'static str {
    // The last value is the one the trusted proxy added, whether it appended to the
    // header's line or sent a line of its own.
    let https = state.usage.trusts_proxy(peer.ip())
        && headers
            .get_all("x-forwarded-proto")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    if https {
        "Path=/dashboard; HttpOnly; SameSite=Strict; Secure"
    } else {
        "Path=/dashboard; HttpOnly; SameSite=Strict"
    }
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> ApiResult<Response> {
    if !same_origin(&headers) {
        return Ok((StatusCode::FORBIDDEN, "cross-site form posts are refused").into_response());
    }
    let refuse = || -> ApiResult<Response> {
        let mut r = render(&LoginPage {
            error: Some("That API key is not valid.".into()),
        })?;
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        Ok(r)
    };
    let Ok(Form(form)) = form else { return refuse() };
    let credential = state
        .store
        .credential_by_hash(&hash_api_key(form.api_key.trim()))
        .await?;
    let Some(c) = credential.filter(|c| c.revoked_at.is_none()) else {
        return refuse();
    };
    let s = Session {
        server_id: c.server_id,
        key_id: c.key_id,
        expires: now_ms() + session::LIFETIME_MS,
    };
    let cookie = format!(
        "{}={}; {}; Max-Age={}",
        session::COOKIE,
        s.encode(&session_key(&state)),
        cookie_attributes(&state, peer, &headers),
        session::LIFETIME_MS / 1000
    );
    let mut response = Redirect::to("/dashboard").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
    );
    Ok(response)
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, FormRejection>,
) -> ApiResult<Response> {
    let session = current_session(&state, &headers).await?;
    let valid = match (&session, &form) {
        (Some(s), Ok(Form(f))) => {
            let expected = s.csrf(&session_key(&state));
            f.csrf.len() == expected.len()
                && bool::from(subtle::ConstantTimeEq::ct_eq(f.csrf.as_bytes(), expected.as_bytes()))
        }
        _ => false,
    };
    if !valid || !same_origin(&headers) {
        return Ok((StatusCode::FORBIDDEN, "sign-out needs the form's token").into_response());
    }
    let mut response = Redirect::to("/dashboard").into_response();
    let clear = format!(
        "{}=; {}; Max-Age=0",
        session::COOKIE,
        cookie_attributes(&state, peer, &headers)
    );
    response
        .headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("ASCII"));
    Ok(response)
}
