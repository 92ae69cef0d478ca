//! Event streams: Server-Sent Events and WebSocket, both reading the store's event log
//! after a cursor (`watch_user` / `watch_task`), so a client that reconnects with its last
//! cursor (`Last-Event-ID`, or `?after=`) receives every write after it once.

use std::convert::Infallible;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use taskhistory_core::{EventCursor, StoreError, TaskEvent};

use super::api::{timed, ApiError};
use super::AppState;

/// Event stream parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct Params {
    task: Option<String>,
    after: Option<String>,
    access_token: Option<String>,
}

type Events = futures::stream::BoxStream<'static, Result<TaskEvent, StoreError>>;

/// Checks the token and opens the store's watch after the client's cursor.
async fn open(
    state: &AppState,
    user: &str,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Events, ApiError> {
    state
        .auth
        .for_user(headers, params.access_token.as_deref(), user)?;
    // EventSource sends the last id it saw when it reconnects.
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let after = last_id
        .or(params.after.as_deref().filter(|v| !v.is_empty()))
        .map(EventCursor::parse)
        .transpose()?;
    let store = state.store.clone();
    let events = match params.task.as_deref().filter(|t| !t.is_empty()) {
        Some(task) => timed(state, "watch_task", store.watch_task(user, task, after)).await?,
        None => timed(state, "watch_user", store.watch_user(user, after)).await?,
    };
    Ok(events.boxed())
}

/// Resolves when the server stops.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

fn error_body(e: &StoreError) -> serde_json::Value {
    json!({"error": {"class": super::api::classify(e).1, "message": e.to_string()}})
}

/// `GET /v1/users/{user}/events`: each event as `event: task`, `id:` its cursor, `data:` the
/// event's JSON; an error as `event: error` (the stream's last); a heartbeat comment when
/// idle.
pub(crate) async fn sse(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let events = open(&state, &user, &headers, &params).await?;
    let guard = state.metrics.watcher();
    let metrics = state.metrics.clone();
    let stream = events
        .take_until(Box::pin(stopped(state.stopping.clone())))
        .map(move |item| {
            let _counted = &guard;
            Ok(match item {
                Ok(event) => {
                    metrics.event_sent();
                    Event::default()
                        .event("task")
                        .id(event.cursor.as_str())
                        .json_data(&event)
                        .unwrap_or_else(|_| Event::default().event("error"))
                }
                Err(e) => Event::default()
                    .event("error")
                    .data(error_body(&e).to_string()),
            })
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.heartbeat).text("heartbeat")))
}

/// `GET /v1/users/{user}/ws`: the same events, one JSON text message each
/// (`{"type": "event", "event": {...}}`; an error as `{"type": "error", ...}`, then the
/// socket closes). Pings keep it open.
pub(crate) async fn websocket(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Params>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let events = open(&state, &user, &headers, &params).await?;
    Ok(upgrade
        .on_upgrade(move |socket| forward(state, events, socket))
        .into_response())
}

async fn forward(state: AppState, mut events: Events, mut socket: WebSocket) {
    let _counted = state.metrics.watcher();
    let mut heartbeat = tokio::time::interval(state.heartbeat);
    heartbeat.tick().await;
    let mut stopped = std::pin::pin!(stopped(state.stopping.clone()));
    loop {
        tokio::select! {
            () = &mut stopped => break,
            item = events.next() => {
                let (text, last) = match item {
                    Some(Ok(event)) => {
                        state.metrics.event_sent();
                        (json!({"type": "event", "event": event}).to_string(), false)
                    }
                    Some(Err(e)) => {
                        let mut body = error_body(&e);
                        body["type"] = json!("error");
                        (body.to_string(), true)
                    }
                    None => break,
                };
                if socket.send(Message::Text(text.into())).await.is_err() || last {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = heartbeat.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
