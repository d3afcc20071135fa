//! Live updates of one server: Server-Sent Events at `GET /api/v1/servers/{id}/live`
//! and the same messages over a WebSocket at `/api/v1/servers/{id}/ws` (DESIGN.md §4.3).
//!
//! Messages say what changed (`metric`: rollup buckets of these series changed;
//! `usage`; `event`); clients refetch what they show. A client that falls behind is
//! disconnected and reconnects, which SSE does by itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::Stream;
use mcp_metrics_core::codes::Code;
use tokio::sync::broadcast::error::RecvError;

use super::problem::{ApiError, ApiResult};
use crate::live::{Refused, Subscription};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/servers/{id}/live", get(sse))
        .route("/api/v1/servers/{id}/ws", get(ws))
}

async fn subscribe(state: &AppState, id: &str, peer: SocketAddr, headers: &HeaderMap) -> ApiResult<Subscription> {
    if !super::servers::exists(state, id).await? {
        return Err(ApiError::not_found("server"));
    }
    let client = state
        .usage
        .client_network(peer.ip(), super::usage::forwarded_for(headers).as_deref());
    state.live.subscribe(id, client).map_err(|refused| match refused {
        Refused::Full => ApiError::new(Code::Overloaded, "too many live streams are open; retry later").retry_after(5),
        Refused::ClientLimit => ApiError::new(
            Code::RateLimited,
            "too many live streams are open from your network; close some and retry",
        )
        .retry_after(5),
    })
}

fn events(subscription: Subscription) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(subscription, |mut sub| async move {
        match sub.receiver.recv().await {
            Ok(message) => {
                let event = Event::default().event(message.kind).data(message.data.to_string());
                Some((Ok(event), sub))
            }
            // Lagged: this client is too slow; ending the stream drops it. Closed: the
            // service is stopping.
            Err(RecvError::Lagged(_) | RecvError::Closed) => None,
        }
    })
}

async fn sse(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let subscription = subscribe(&state, &id, peer, &headers).await?;
    let hello = futures_util::stream::once(async { Ok(Event::default().event("ready").data("{}")) });
    let stream = futures_util::StreamExt::chain(hello, events(subscription));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn ws(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let subscription = subscribe(&state, &id, peer, &headers).await?;
    Ok(upgrade
        .max_message_size(4096)
        .max_frame_size(4096)
        .on_upgrade(move |socket| forward(socket, subscription)))
}

async fn forward(mut socket: WebSocket, mut subscription: Subscription) {
    let _ = socket.send(Message::Text(r#"{"type":"ready","data":{}}"#.into())).await;
    loop {
        tokio::select! {
            message = subscription.receiver.recv() => match message {
                Ok(m) => {
                    let text = serde_json::json!({ "type": m.kind, "data": m.data }).to_string();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                // Clients only listen; a close or an error ends the session.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
