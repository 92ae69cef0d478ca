//! Event streams: Server-Sent Events and WebSocket, both reading the store's event log
//! after a cursor (`watch_user` / `watch_task`), so a client that reconnects with its last
//! cursor (`Last-Event-ID`, or `?after=`) receives every write after it once.
//!
//! A browser cannot set a header on these requests, so they alone take a token in the URL:
//! best a stream ticket (`POST .../events/ticket`: 60 s, that stream only), else a user
//! token; never the operator's (`access.rs`). A WebSocket client may send messages of a few
//! KiB at most (`--ws-max-message`; larger ones close the socket with 1009 before they are
//! buffered) and must answer pings within `--ws-pong-timeout`.
//!
//! Each stream holds a slot under `--max-streams` and `--max-streams-per-user`
//! (`streams.rs`) until it ends; past a cap, or the store's own cap on watchers, SSE is
//! answered 429 with `Retry-After` and a WebSocket is accepted and closed with 1013.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, TryFutureExt};
use serde::Deserialize;
use serde_json::json;
use taskhistory_core::{EventCursor, StoreError, TaskEvent};

use super::api::{request_id, timed, ApiError};
use super::streams::{Cap, Slot};
use super::AppState;

/// Event stream parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct Params {
    task: Option<String>,
    after: Option<String>,
    access_token: Option<String>,
}

type Events = futures::stream::BoxStream<'static, Result<TaskEvent, StoreError>>;

/// Checks the token, takes a slot under the stream caps and opens the store's watch after
/// the client's cursor: the events and the slot the stream holds until it ends.
async fn open(
    state: &AppState,
    user: &str,
    headers: &HeaderMap,
    params: &Params,
    kind: &str,
) -> Result<(Events, Slot), ApiError> {
    let task = params.task.as_deref().filter(|t| !t.is_empty());
    let access =
        state
            .auth
            .for_stream(headers, params.access_token.as_deref(), user, kind, task)?;
    // EventSource sends the last id it saw when it reconnects.
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let after = last_id
        .or(params.after.as_deref().filter(|v| !v.is_empty()))
        .map(EventCursor::parse)
        .transpose()?;
    // Counted by the user in the path (the token names that user).
    let slot = state.streams.open(user).map_err(|cap| {
        let (max, per_user) = state.streams.caps();
        let detail = match cap {
            Cap::PerUser => {
                format!("user {user:?} has --max-streams-per-user ({per_user}) streams open")
            }
            Cap::Streams | Cap::StoreWatchers => {
                format!("--max-streams ({max}) streams are open")
            }
        };
        ApiError::limit_reached(cap, detail)
    })?;
    let store = super::api::store_for(state, &access)?;
    let metrics = state.metrics.clone();
    let refused = move |e: &StoreError| {
        if let StoreError::LimitReached { .. } = e {
            metrics.stream_refused(Cap::StoreWatchers);
        }
    };
    let events = match task {
        Some(task) => {
            let watch = store.watch_task(user, task, after).inspect_err(refused);
            timed(state, "watch_task", watch).await?
        }
        None => {
            let watch = store.watch_user(user, after).inspect_err(refused);
            timed(state, "watch_user", watch).await?
        }
    };
    Ok((events.boxed(), slot))
}

/// Resolves when the server stops.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// A stream's last item: the class, a fixed message and the request id of the request that
/// opened the stream; the detail goes to the log under that id.
fn error_body(e: &StoreError, request_id: &str) -> serde_json::Value {
    ApiError::from(e.clone()).body(request_id)
}

/// `POST /v1/users/{user}/events/ticket` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct TicketParams {
    /// `sse` (default) or `ws`.
    stream: Option<String>,
    /// The stream's task filter.
    task: Option<String>,
    access_token: Option<String>,
}

/// `POST /v1/users/{user}/events/ticket?stream=sse|ws&task=`: with the user's (or the
/// operator's) token in the header, a ticket that opens that user's stream of that kind and
/// task filter, for 60 s: what a page puts in the stream's URL instead of a long-lived token.
pub(crate) async fn ticket(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(q): Query<TicketParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    state
        .auth
        .for_user(&headers, q.access_token.as_deref(), &user)?;
    taskhistory_core::validate::user_id(&user)?;
    let kind = match q.stream.as_deref().filter(|s| !s.is_empty()) {
        None | Some("sse") => "sse",
        Some("ws") => "ws",
        Some(_) => return Err(ApiError::invalid("stream", "expected sse or ws")),
    };
    let task = q.task.as_deref().filter(|t| !t.is_empty());
    if let Some(task) = task {
        taskhistory_core::validate::task_id(task)?;
    }
    let ticket = state.auth.keys().ticket(&user, kind, task).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not sign the ticket",
        )
    })?;
    Ok(axum::Json(json!({
        "ticket": ticket,
        "expires_in": taskhistory_tokens::TICKET_TTL.as_secs(),
        "stream": kind,
        "task": task,
    })))
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
    let (events, slot) = open(&state, &user, &headers, &params, "sse").await?;
    let id = request_id();
    let metrics = state.metrics.clone();
    let stream = events
        .take_until(Box::pin(stopped(state.stopping.clone())))
        .map(move |item| {
            // The slot lives as long as the stream (the body is dropped when it ends).
            let _slot = &slot;
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
                    .data(error_body(&e, &id).to_string()),
            })
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.heartbeat).text("heartbeat")))
}

/// `GET /v1/users/{user}/ws`: the same events, one JSON text message each
/// (`{"type": "event", "event": {...}}`; an error as `{"type": "error", ...}`, then the
/// socket closes). A ping every heartbeat; a client that does not answer within
/// `--ws-pong-timeout` is disconnected. Past a stream cap the socket is accepted, then
/// closed with 1013 (Try Again Later).
pub(crate) async fn websocket(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Params>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let id = request_id();
    let max = state.limits.ws_max_message;
    let upgrade = upgrade.max_message_size(max).max_frame_size(max);
    match open(&state, &user, &headers, &params, "ws").await {
        Ok((events, slot)) => Ok(upgrade
            .on_upgrade(move |socket| forward(state, events, slot, socket, id))
            .into_response()),
        Err(mut e) => match e.limit() {
            Some(cap) => {
                e.log(&id);
                Ok(upgrade
                    .on_upgrade(move |mut socket| async move {
                        close(&mut socket, close_code::AGAIN, cap.close_reason()).await;
                    })
                    .into_response())
            }
            None => Err(e),
        },
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Sends `events` on `socket` until either ends; `_slot` is given back when it returns.
async fn forward(
    state: AppState,
    mut events: Events,
    _slot: Slot,
    mut socket: WebSocket,
    id: Arc<str>,
) {
    let mut heartbeat = tokio::time::interval(state.heartbeat);
    heartbeat.tick().await;
    let pong_timeout = Duration::from_secs(state.limits.ws_pong_timeout.max(1));
    // When the oldest unanswered ping was sent.
    let mut unanswered: Option<Instant> = None;
    let mut stopped = std::pin::pin!(stopped(state.stopping.clone()));
    let deadline = |unanswered: Option<Instant>| async move {
        match unanswered {
            Some(since) => tokio::time::sleep_until((since + pong_timeout).into()).await,
            None => std::future::pending().await,
        }
    };
    loop {
        tokio::select! {
            () = &mut stopped => {
                close(&mut socket, close_code::AWAY, "the server is stopping").await;
                return;
            }
            () = deadline(unanswered) => {
                close(&mut socket, close_code::POLICY, "no pong in time").await;
                return;
            }
            item = events.next() => {
                let (text, last) = match item {
                    Some(Ok(event)) => {
                        state.metrics.event_sent();
                        (json!({"type": "event", "event": event}).to_string(), false)
                    }
                    Some(Err(e)) => {
                        let mut body = error_body(&e, &id);
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
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(Message::Pong(_))) => unanswered = None,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    // Over --ws-max-message (tungstenite refuses it from the frame's header,
                    // before buffering it) or a protocol error.
                    let too_big = std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), ToString::to_string)
                        .contains("Space limit exceeded")
                        || e.to_string().contains("Space limit exceeded");
                    if too_big {
                        close(&mut socket, close_code::SIZE, "message too big").await;
                    } else {
                        close(&mut socket, close_code::PROTOCOL, "protocol error").await;
                    }
                    return;
                }
            },
            _ = heartbeat.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
                unanswered.get_or_insert_with(Instant::now);
            }
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
