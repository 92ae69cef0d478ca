//! The JSON routes, the dashboard page and the errors every route answers with.

use std::future::Future;
use std::time::Instant;

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use taskhistory_core::{StoreError, TaskCursor, TaskQuery, TaskStatus};
use taskhistory_postgres::CleanupOptions;

use super::auth::Denied;
use super::AppState;

/// An error answer: `{"error": {"class", "field"?, "message"}}` with its status code.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    class: &'static str,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, class: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            class,
            field: None,
            message: message.into(),
        }
    }

    /// Bad input on `field` (the library's field names).
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        StoreError::invalid(field, reason.into()).into()
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
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, class) = classify(&e);
        let message = e.to_string();
        let field = match e {
            StoreError::InvalidInput { field, .. } => Some(field),
            _ => None,
        };
        ApiError {
            status,
            class,
            field,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"class": self.class, "message": self.message});
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        let mut response = (self.status, Json(json!({ "error": body }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
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

/// The token a browser passes where it cannot set a header.
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

pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
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
    let message = String::from_utf8_lossy(&body).trim().to_owned();
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

pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    match timed(&state, "health_check", state.store.health_check()).await {
        Ok(report) => Json(json!({
            "healthy": true,
            "backend": report.backend,
            "round_trip_ms": report.round_trip.as_secs_f64() * 1e3,
            "schema_version": report.schema_version,
        }))
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"healthy": false, "reason": e.message})),
        )
            .into_response(),
    }
}

pub(crate) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Response, ApiError> {
    state.auth.for_admin(&headers, q.access_token.as_deref())?;
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
    state
        .auth
        .for_user(&headers, q.access_token.as_deref(), &user)?;
    let after = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(str::parse::<TaskCursor>)
        .transpose()?;
    let mut query = TaskQuery::first(parse_number("limit", q.limit.as_deref(), 50)?).after(after);
    query.status = parse_status(q.status.as_deref())?;
    let page = timed(
        &state,
        "get_user_tasks_page",
        state.store.get_user_tasks_page(&user, &query),
    )
    .await?;
    Ok(Json(json!({
        "user_id": user,
        "tasks": page.tasks,
        "next_cursor": page.next.map(|c| c.to_string()),
    })))
}

pub(crate) async fn task(
    State(state): State<AppState>,
    Path((user, task)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .auth
        .for_user(&headers, q.access_token.as_deref(), &user)?;
    let history = timed(
        &state,
        "load_task_history",
        state.store.load_task_history(&user, &task),
    )
    .await?;
    let status = timed(
        &state,
        "check_task_status",
        state.store.check_task_status(&user, &task),
    )
    .await?;
    if history.is_empty() && status == TaskStatus::Pending {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("task {task:?} of user {user:?} has no step"),
        ));
    }
    Ok(Json(json!({
        "user_id": user,
        "task_id": task,
        "status": status,
        "history": history,
    })))
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path((user, task)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<TokenParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .auth
        .for_user(&headers, q.access_token.as_deref(), &user)?;
    let cancelled = timed(
        &state,
        "mark_task_as_cancelled",
        state.store.mark_task_as_cancelled(&user, &task),
    )
    .await?;
    Ok(Json(json!({ "cancelled": cancelled })))
}

fn postgres(state: &AppState) -> Result<&taskhistory_postgres::PgTaskHistoryStore, ApiError> {
    state.pg.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the in-memory store has no statistics or retention preview",
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
