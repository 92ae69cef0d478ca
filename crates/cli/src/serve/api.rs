//! The JSON routes, the dashboard page and the errors every route answers with.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use taskhistory_core::{
    validate, HistoryScan, StepKey, StoreError, TaskCursor, TaskQuery, TaskStatus,
};
use taskhistory_postgres::CleanupOptions;

use super::access::Denied;
use super::streams::{Cap, RETRY_AFTER_SECS};
use super::AppState;
use taskhistory_tokens::Access;

/// An error answer: `{"error": {"class", "field"?, "limit"?, "message", "request_id"}}`
/// with its status code (and `Retry-After` when the client should wait). The message is
/// fixed text (or, for bad input, the library's words on the client's own input); the
/// detail (a store's message: host and port, the server's text) goes to the log under the
/// request id, never to the client.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    class: &'static str,
    field: Option<String>,
    message: String,
    detail: Option<String>,
    /// The stream cap that refused the request (`limit` in the body).
    limit: Option<Cap>,
    /// Seconds to wait before trying again (`Retry-After`).
    retry_after: Option<u64>,
}

tokio::task_local! {
    /// The request id of the request being answered.
    static REQUEST_ID: Arc<str>;
}

/// The id of the request being answered (`-` outside one).
pub(crate) fn request_id() -> Arc<str> {
    REQUEST_ID
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::from("-"))
}

/// A new request id: 16 hex digits, a per-process random part and a counter.
fn new_request_id() -> Arc<str> {
    static SALT: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let salt = SALT.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        u32::from_le_bytes(b)
    });
    Arc::from(format!(
        "{salt:08x}{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, class: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            class,
            field: None,
            message: message.into(),
            detail: None,
            limit: None,
            retry_after: None,
        }
    }

    /// A stream refused at `cap` (`streams.rs`): 429 `limit_reached` naming the cap (not
    /// its size), with `Retry-After`; `detail` goes to the log.
    pub(crate) fn limit_reached(cap: Cap, detail: String) -> Self {
        let (status, class) = LIMIT_REACHED;
        ApiError {
            limit: Some(cap),
            retry_after: Some(RETRY_AFTER_SECS),
            detail: Some(detail),
            ..ApiError::new(status, class, cap.message())
        }
    }

    /// Asks the client to wait `secs` seconds before trying again (`Retry-After`).
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The stream cap that refused the request, if one did.
    pub(crate) fn limit(&self) -> Option<Cap> {
        self.limit
    }

    /// Logs the detail, if any (once), under `request_id`.
    pub(crate) fn log(&mut self, request_id: &str) {
        if let Some(detail) = self.detail.take() {
            if self.status.is_server_error() {
                tracing::error!(request_id, status = self.status.as_u16(), class = self.class, detail = %detail, "store error");
            } else {
                tracing::warn!(request_id, status = self.status.as_u16(), class = self.class, detail = %detail, "request refused");
            }
        }
    }

    /// Bad input on `field` (the library's field names).
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        StoreError::invalid(field, reason.into()).into()
    }

    /// The body a client gets (and logs the detail, if any, under `request_id`).
    pub(crate) fn body(&mut self, request_id: &str) -> serde_json::Value {
        self.log(request_id);
        let mut body =
            json!({"class": self.class, "message": self.message, "request_id": request_id});
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        if let Some(cap) = self.limit {
            body["limit"] = json!(cap.client_name());
        }
        json!({ "error": body })
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(why) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
            }
            Denied::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why),
        }
    }
}

/// A stream refused at a cap, the server's or the store's.
const LIMIT_REACHED: (StatusCode, &str) = (StatusCode::TOO_MANY_REQUESTS, "limit_reached");

/// The one map from a store error to its status code and class (answers, event streams'
/// last items and the metrics' outcomes all read it).
pub(crate) fn classify(e: &StoreError) -> (StatusCode, &'static str) {
    match e {
        StoreError::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "bad_input"),
        StoreError::TaskCancelled { .. } => (StatusCode::CONFLICT, "cancelled"),
        StoreError::Unavailable { .. } | StoreError::Timeout { .. } | StoreError::Closed => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        StoreError::Conflict { .. } => (StatusCode::SERVICE_UNAVAILABLE, "conflict"),
        StoreError::LimitReached { .. } => LIMIT_REACHED,
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::LimitReached { .. } = e {
            // Answered as the server's own cap on streams; the store's limit and its size
            // go to the log only.
            return ApiError::limit_reached(Cap::StoreWatchers, e.to_string());
        }
        let (status, class) = classify(&e);
        let (field, message) = match &e {
            // About the client's own input: the library's words name the field and rule.
            StoreError::InvalidInput { field, .. } => (Some(field.clone()), e.to_string()),
            StoreError::TaskCancelled { .. } => (None, "the task is cancelled".to_owned()),
            StoreError::Conflict { .. } => (
                None,
                "a conflicting write; try again (see the server's log under the request id)"
                    .to_owned(),
            ),
            StoreError::Unavailable { .. } | StoreError::Timeout { .. } | StoreError::Closed => (
                None,
                "the store is unavailable; try again later (see the server's log under the \
                 request id)"
                    .to_owned(),
            ),
            _ => (
                None,
                "an internal error (see the server's log under the request id)".to_owned(),
            ),
        };
        ApiError {
            status,
            class,
            field,
            message,
            detail: Some(e.to_string()),
            limit: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        let id = request_id();
        let body = self.body(&id);
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

/// Runs a store operation, recording its time and outcome.
pub(crate) async fn timed<T>(
    state: &AppState,
    operation: &'static str,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = work.await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => classify(e).1,
    };
    state.metrics.operation(operation, label, started.elapsed());
    result.map_err(ApiError::from)
}

/// Counts every answer by route and status code (the route as declared, never the path:
/// no user id, task id or token reaches the metrics).
pub(crate) async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let response = next.run(req).await;
    state.metrics.request(route, response.status().as_u16());
    response
}

/// Gives each request its id (in the answer's `x-request-id`, and in the log with any
/// error's detail), answers 429 to an address over its failed-authentication limit, and
/// counts each 401 against its address.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let id = new_request_id();
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let response = REQUEST_ID
        .scope(id.clone(), async move {
            if let Some(wait) = ip.and_then(|ip| state.failures.limited(ip)) {
                state.metrics.auth_limited();
                return ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many failed authentications from this address; try again later",
                )
                .retry_after(wait)
                .into_response();
            }
            let response = next.run(req).await;
            if response.status() == StatusCode::UNAUTHORIZED {
                state.metrics.auth_failed();
                if let Some(ip) = ip {
                    state.failures.failed(ip);
                }
            }
            response
        })
        .await;
    let mut response = response;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// A token passed in the URL (refused on every route but the event streams).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenParam {
    access_token: Option<String>,
}

/// `GET /v1/users/{user}/tasks` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct TasksParams {
    limit: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    updated_after: Option<String>,
    updated_before: Option<String>,
    task_id_prefix: Option<String>,
    access_token: Option<String>,
}

/// `GET /v1/users/{user}/activity` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct ActivityParams {
    from: Option<String>,
    to: Option<String>,
    access_token: Option<String>,
}

/// `GET /v1/admin/retention` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct RetentionParams {
    days: Option<String>,
    status: Option<String>,
    access_token: Option<String>,
}

fn parse_status(status: Option<&str>) -> Result<Option<TaskStatus>, ApiError> {
    status
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<TaskStatus>()
                .map_err(|e| ApiError::invalid("status", e.to_string()))
        })
        .transpose()
}

fn parse_number(field: &str, value: Option<&str>, default: i64) -> Result<i64, ApiError> {
    value.filter(|v| !v.is_empty()).map_or(Ok(default), |v| {
        v.parse()
            .map_err(|_| ApiError::invalid(field, format!("{v:?} is not a whole number")))
    })
}

/// An RFC 3339 time given as `field`; empty means absent.
fn parse_time(field: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ApiError::invalid(field, format!("{v:?} is not an RFC 3339 time: {e}"))
                })
        })
        .transpose()
}

pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(super::headers::DASHBOARD)
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method",
    )
}

/// Rejections of axum's own extractors (a malformed query or path, a request to the
/// WebSocket route that is no upgrade) answered as JSON like every other error.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    if status.is_server_error() {
        // The request timeout's answer (tower-http's, empty): logged under the request id.
        let mut error = ApiError::new(status, "timeout", "no answer in time; try again later");
        error.detail = Some(format!("no answer within the request timeout ({status})"));
        return error.into_response();
    }
    // axum's rejection texts describe the client's own request (its query, path or
    // upgrade).
    let message: String = String::from_utf8_lossy(&body)
        .trim()
        .chars()
        .take(300)
        .collect();
    ApiError::new(
        status,
        "bad_request",
        if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            message
        },
    )
    .into_response()
}

/// `GET /healthz`: without a token only whether the store is healthy; with the operator's
/// token also its backend, round trip and schema version (an error's detail is in the log
/// under the request id either way).
pub(crate) async fn healthz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let operator = state.auth.optional(&headers) == Some(Access::Admin);
    match timed(&state, "health_check", state.store.health_check()).await {
        Ok(report) if operator => Json(json!({
            "healthy": true,
            "backend": report.backend,
            "round_trip_ms": report.round_trip.as_secs_f64() * 1e3,
            "schema_version": report.schema_version,
        }))
        .into_response(),
        Ok(_) => Json(json!({"healthy": true})).into_response(),
        Err(mut e) => {
            let id = request_id();
            let error = e.body(&id);
            let mut body = json!({"healthy": false, "request_id": &*id});
            if operator {
                body["error"] = error["error"].clone();
            }
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

pub(crate) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Response, ApiError> {
    state
        .auth
        .for_metrics(&headers, q.access_token.as_deref())?;
    let text = state.metrics.render().map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "encoding the metrics",
        )
    })?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(crate) async fn tasks(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(q): Query<TasksParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = user_request(&state, &headers, q.access_token.as_deref(), &user, true)?;
    let after = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(str::parse::<TaskCursor>)
        .transpose()?;
    let mut query = TaskQuery::first(parse_number("limit", q.limit.as_deref(), 50)?).after(after);
    query.status = parse_status(q.status.as_deref())?;
    query.updated_after = parse_time("updated_after", q.updated_after.as_deref())?;
    query.updated_before = parse_time("updated_before", q.updated_before.as_deref())?;
    query.task_id_prefix = q.task_id_prefix.filter(|p| !p.is_empty());
    let page = timed(
        &state,
        "get_user_tasks_page",
        store.get_user_tasks_page(&user, &query),
    )
    .await?;
    Ok(Json(json!({
        "user_id": user,
        "tasks": page.tasks,
        "next_cursor": page.next.map(|c| c.to_string()),
    })))
}

/// `GET /v1/users/{user}/tasks/{task}` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct TaskParams {
    limit: Option<String>,
    after_step: Option<String>,
    access_token: Option<String>,
}

/// Steps per answer of a task's history at most (and by default).
const MAX_HISTORY_PAGE: i64 = 1000;
/// Steps read from the store at a time while an answer is filled (bounds the memory one
/// answer holds beyond its cap: each step's result is at most 16 MiB).
const HISTORY_CHUNK: i64 = 16;

/// `GET /v1/users/{user}/tasks/{task}?limit=&after_step=`: the task's status and a page of
/// its history, in step order: at most `limit` steps (1-1000, default 1000) after step
/// `after_step`, and at most `--max-history-bytes` of them (at least one step).
/// `next_after_step` is where the next page starts (`null`: this was the last).
pub(crate) async fn task(
    State(state): State<AppState>,
    Path((user, task)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<TaskParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = user_request(&state, &headers, q.access_token.as_deref(), &user, true)?;
    let limit = parse_number("limit", q.limit.as_deref(), MAX_HISTORY_PAGE)?;
    if !(1..=MAX_HISTORY_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is not between 1 and {MAX_HISTORY_PAGE}"),
        ));
    }
    let after_step =
        match q.after_step.as_deref().filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(v.parse::<i32>().map_err(|_| {
                ApiError::invalid("after_step", format!("{v:?} is not a step number"))
            })?),
        };
    let cap = state.limits.max_history_bytes;
    let mut history = Vec::new();
    let mut bytes = 0usize;
    let mut after = after_step.map(|step| StepKey {
        task_id: task.clone(),
        step,
    });
    let mut more = true;
    let mut full = false;
    while more && !full {
        let left = limit - i64::try_from(history.len()).unwrap_or(limit);
        if left <= 0 {
            break;
        }
        let scan = HistoryScan {
            task_id: Some(task.clone()),
            after: after.clone(),
            limit: left.min(HISTORY_CHUNK),
        };
        let page = timed(&state, "scan_history", store.scan_history(&user, &scan)).await?;
        more = page.next.is_some();
        for record in page.steps {
            let entry = json!({
                "step": record.step,
                "status": record.result.status,
                "timestamp": record.timestamp,
                "result": record.result,
            });
            let size = entry.to_string().len();
            if !history.is_empty() && bytes.saturating_add(size) > cap {
                full = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            after = Some(StepKey {
                task_id: task.clone(),
                step: record.step,
            });
            history.push(entry);
        }
    }
    let status = timed(
        &state,
        "check_task_status",
        store.check_task_status(&user, &task),
    )
    .await?;
    if history.is_empty() && after_step.is_none() && status == TaskStatus::Pending {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the task has no step",
        ));
    }
    let last = i64::try_from(history.len()).unwrap_or(limit);
    let next = (full || (more && last >= limit))
        .then(|| after.map(|k| k.step))
        .flatten();
    Ok(Json(json!({
        "user_id": user,
        "task_id": task,
        "status": status,
        "history": history,
        "next_after_step": next,
    })))
}

/// `POST /v1/users/{user}/tasks/{task}/cancel`: `{"cancelled": bool}`; on PostgreSQL the
/// answer carries [`POSITION_HEADER`], a token that makes this server's (and any other's)
/// later reads of the user see the cancellation when sent back with them.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path((user, task)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Response, ApiError> {
    let store = user_request(&state, &headers, q.access_token.as_deref(), &user, false)?;
    let cancelled = timed(
        &state,
        "mark_task_as_cancelled",
        store.mark_task_as_cancelled(&user, &task),
    )
    .await?;
    let mut answer = Json(json!({ "cancelled": cancelled })).into_response();
    if let Some(pg) = &state.pg {
        if let Some(token) = timed(&state, "position", pg.position(&user)).await? {
            if let Ok(value) = axum::http::HeaderValue::from_str(&token) {
                answer.headers_mut().insert(POSITION_HEADER, value);
            }
        }
    }
    Ok(answer)
}

/// The header of position tokens (issue 31): write routes answer with one, read routes of
/// the same user take one, so a client that wrote through one server reads its write
/// through any other, even from a replica. Without it, a read may come from a replica
/// that has not replayed another server's write yet.
pub(crate) const POSITION_HEADER: &str = "taskhistory-position";

/// Makes the reads of `user` see the position token of the request, if it has one (a
/// token that is not one is 400 naming `position`); nothing on the memory store.
fn require_position(state: &AppState, headers: &HeaderMap, user: &str) -> Result<(), ApiError> {
    let (Some(pg), Some(value)) = (&state.pg, headers.get(POSITION_HEADER)) else {
        return Ok(());
    };
    let token = value
        .to_str()
        .map_err(|_| ApiError::invalid("position", "is not a position token"))?;
    pg.require_position(user, token)?;
    Ok(())
}

/// `GET /v1/users/{user}/counts`: the user's tasks per status (kept by the writes, read
/// without a scan) and their total.
pub(crate) async fn counts(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = user_request(&state, &headers, q.access_token.as_deref(), &user, true)?;
    let counts = timed(&state, "task_counts", store.task_counts(&user)).await?;
    Ok(Json(json!({
        "user_id": user,
        "counts": counts,
        "total": counts.total(),
    })))
}

/// `GET /v1/users/{user}/activity?from=&to=`: the user's activity per hour in `[from, to)`
/// (both cut to the hour, at most 92 days apart; see [`super::activity_span`] for the
/// default),
/// only the hours with any activity, oldest first.
pub(crate) async fn activity(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ActivityParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = user_request(&state, &headers, q.access_token.as_deref(), &user, true)?;
    let (from, to) = super::activity_span(
        parse_time("from", q.from.as_deref())?,
        parse_time("to", q.to.as_deref())?,
        Utc::now(),
    );
    let hours = timed(
        &state,
        "task_activity",
        store.task_activity(&user, from, to),
    )
    .await?;
    Ok(Json(json!({
        "user_id": user,
        "from": validate::hour_of(from),
        "to": validate::hour_of(to),
        "hours": hours,
    })))
}

/// `GET /v1/whoami`: what the request's token is, so a page given only a token knows its
/// user: `{"access": "operator"}`, `{"access": "user", "user_id"}`, `{"access":
/// "metrics"}` or `{"access": "ticket", "user_id"}`. The token in the header only.
pub(crate) async fn whoami(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        match state.auth.identify(&headers, q.access_token.as_deref())? {
            Access::Admin => json!({"access": "operator"}),
            Access::Metrics => json!({"access": "metrics"}),
            Access::User(user) => json!({"access": "user", "user_id": user}),
            Access::Ticket { user, .. } => json!({"access": "ticket", "user_id": user}),
        },
    ))
}

/// Failures listed by `GET /v1/overview`.
const RECENT_FAILURES: i64 = 20;

/// `GET /v1/overview` (the operator's token): every user's tasks per status (kept by the
/// writes, no scan), their total, and the most recent failed or timed-out tasks of any user.
pub(crate) async fn overview(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.auth.for_admin(&headers, q.access_token.as_deref())?;
    let pg = postgres(&state)?;
    let totals = timed(&state, "task_totals", pg.task_totals()).await?;
    let failures = timed(
        &state,
        "recent_failures",
        pg.recent_failures(RECENT_FAILURES),
    )
    .await?;
    let failures: Vec<serde_json::Value> = failures
        .into_iter()
        .map(|(user, task)| json!({"user_id": user, "task": task}))
        .collect();
    Ok(Json(json!({
        "totals": totals,
        "total": totals.total(),
        "recent_failures": failures,
    })))
}

fn postgres(state: &AppState) -> Result<&taskhistory_postgres::PgTaskHistoryStore, ApiError> {
    state.pg.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the in-memory store has no operator statistics, overview or retention preview",
        )
    })
}

pub(crate) async fn stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.auth.for_admin(&headers, q.access_token.as_deref())?;
    let pg = postgres(&state)?;
    let stats = timed(&state, "stats", pg.stats()).await?;
    let mut body = json!(stats);
    body["watchers"] = json!(state.metrics.watchers_now());
    Ok(Json(body))
}

pub(crate) async fn retention(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<RetentionParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.auth.for_admin(&headers, q.access_token.as_deref())?;
    let pg = postgres(&state)?;
    // The library's name for it, as `cleanup_old_tasks` reports it.
    let days = parse_number("days_old", q.days.as_deref(), 30)?;
    let options = CleanupOptions {
        dry_run: true,
        status: parse_status(q.status.as_deref())?,
        ..CleanupOptions::default()
    };
    let report = timed(
        &state,
        "cleanup_preview",
        pg.cleanup_old_tasks_with(days, options, &|_| {}),
    )
    .await?;
    Ok(Json(json!({
        "days": days,
        "dry_run": true,
        "tasks_removed": report.tasks_removed,
        "steps_removed": report.steps_removed,
    })))
}

/// A request on `user`'s data: its token checked for that user, the store it runs on
/// ([`store_for`]), and, for a read, the position token it carries taken up
/// ([`require_position`]).
fn user_request(
    state: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
    user: &str,
    read: bool,
) -> Result<taskhistory_core::DynStore, ApiError> {
    let access = state.auth.for_user(headers, token, user)?;
    let store = store_for(state, &access)?;
    if read {
        require_position(state, headers, user)?;
    }
    Ok(store)
}

/// The store a request runs on: for a user's token, a handle that declares only that user to
/// row-level isolation ([`PgTaskHistoryStore::acting_for`]), so that with isolation on a
/// route that passed another user's id would get nothing of that user's from the database;
/// for the operator's token (or the memory store), the store itself.
pub(crate) fn store_for(
    state: &AppState,
    access: &Access,
) -> Result<taskhistory_core::DynStore, ApiError> {
    match (access, &state.pg) {
        (Access::User(user), Some(pg)) => Ok(Arc::new(pg.acting_for(user)?)),
        _ => Ok(state.store.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stores_watcher_limit_is_answered_as_the_servers_cap_without_its_detail() {
        let e = StoreError::LimitReached {
            operation: "watch_user",
            limit: "watchers",
            max: 4242,
        };
        assert_eq!(classify(&e), LIMIT_REACHED);
        let mut error = ApiError::from(e);
        assert_eq!(error.limit(), Some(Cap::StoreWatchers));
        let body = error.body("id").to_string();
        assert!(body.contains(r#""limit":"max_streams""#), "{body}");
        assert!(!body.contains("4242") && !body.contains("watch"), "{body}");
        let response = ApiError::from(StoreError::LimitReached {
            operation: "watch_task",
            limit: "watchers",
            max: 1,
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers()[axum::http::header::RETRY_AFTER],
            RETRY_AFTER_SECS.to_string()
        );
    }
}
