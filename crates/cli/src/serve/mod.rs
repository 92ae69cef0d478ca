//! `taskhistory serve`: the task history over HTTP (JSON, Server-Sent Events, WebSocket),
//! a dashboard at `/`, and Prometheus metrics; every route scoped to one user and guarded by
//! bearer tokens (`auth.rs`). Built on axum; TLS by rustls when given a certificate.
//!
//! Routes (`docs/operations.md`, "Serving the history over HTTP"):
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard (one page, served from the binary) |
//! | `GET /healthz` | `{"healthy": true}` or 503; more with the operator's token |
//! | `GET /metrics` | Prometheus text; the metrics token or the operator's |
//! | `GET /v1/whoami` | what the token is: `{"access", "user_id"?}` |
//! | `GET /v1/overview` | every user's tasks per status and the recent failures; the operator's token |
//! | `GET /v1/users/{user}/counts` | the user's tasks per status and their total |
//! | `GET /v1/users/{user}/activity?from=&to=` | the user's activity per hour (default: the last 24 hours) |
//! | `GET /v1/users/{user}/tasks?limit=&status=&cursor=&updated_after=&updated_before=&task_id_prefix=` | a page of the user's tasks |
//! | `GET /v1/users/{user}/tasks/{task}?limit=&after_step=` | status and a page of the history (404 for a task never seen) |
//! | `POST /v1/users/{user}/tasks/{task}/cancel` | `{"cancelled": true\|false}` |
//! | `POST /v1/users/{user}/events/ticket[?stream=&task=]` | a stream ticket: 60 s, that stream only |
//! | `GET /v1/users/{user}/events[?task=&after=]` | Server-Sent Events, `id:` = the cursor; `Last-Event-ID` resumes |
//! | `GET /v1/users/{user}/ws[?task=&after=]` | the same events over a WebSocket, one JSON text message each |
//! | `GET /v1/admin/stats` | the store's statistics; the operator's token |
//! | `GET /v1/admin/retention?days=&status=` | a cleanup dry run; the operator's token |

//!
//! Hostile clients (`docs/operations.md`, "Security"): every connection, header, body,
//! answer, message, event stream and token is bounded in time, size or number ([`Limits`]); errors tell a client
//! the class, a fixed message and a request id, the detail goes to the log under that id;
//! every answer carries the security headers (`headers.rs`).

mod access;
mod api;
mod events;
mod headers;
mod metrics;
mod net;
mod streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use taskhistory_core::DynStore;
use taskhistory_postgres::PgTaskHistoryStore;
use tower_http::cors::CorsLayer;

use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;

use taskhistory_tokens::{self as auth, Keys, Secret, MIN_ADMIN_TOKEN, MIN_SECRET};

/// A user token for `user` that lasts `ttl`, at most `max_ttl` (`taskhistory token`),
/// signed with `TASKHISTORY_SECRET` (read by [`signing_secret`], as the server reads it).
pub(crate) fn issue(user: &str, ttl: Duration, max_ttl: Duration) -> Result<String, CliError> {
    let secret = signing_secret("TASKHISTORY_SECRET")?.ok_or_else(|| {
        CliError::Config(format!(
            "TASKHISTORY_SECRET must be set to the server's signing secret (at least \
             {MIN_SECRET} bytes, e.g. from `openssl rand -hex 32`)"
        ))
    })?;
    auth::issue(&secret, user, ttl, max_ttl).map_err(|e| match e {
        auth::KeyError::TooLong { .. } => CliError::BadInput(format!(
            "--ttl: {e} (raise --max-ttl, and the server's --max-token-ttl, to allow it)"
        )),
        _ => CliError::Other(format!("could not sign the token: {e}")),
    })
}

/// A signing secret from the environment variable `name` (the one rule for
/// `TASKHISTORY_SECRET` and `TASKHISTORY_SECRET_PREVIOUS`: at least [`MIN_SECRET`] bytes,
/// used as raw bytes); `None` when unset.
fn signing_secret(name: &str) -> Result<Option<Secret>, CliError> {
    env_key(name, MIN_SECRET)?
        .map(|s| Secret::new(s.as_bytes()))
        .transpose()
        .map_err(|e| CliError::Config(format!("{name}: {e}")))
}

/// The hours an activity request covers (`GET /v1/users/{user}/activity`, `taskhistory
/// activity`): `to` by default the next hour boundary after `now`, `from` by default 24
/// hours before `to`. The store cuts both to the hour and checks the span.
pub(crate) fn activity_span(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let to = to.unwrap_or_else(|| {
        taskhistory_core::validate::hour_of(now)
            .checked_add_signed(chrono::Duration::hours(1))
            .unwrap_or(now)
    });
    let from = from.unwrap_or_else(|| {
        to.checked_sub_signed(chrono::Duration::hours(24))
            .unwrap_or(to)
    });
    (from, to)
}

/// Parses a duration: a number of seconds, or `90s`, `30m`, `12h`, `7d`.
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{value:?}: expected a number of seconds, or 90s, 30m, 12h, 7d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| {
        format!("{value:?}: expected a positive number of seconds, or 90s, 30m, 12h, 7d")
    })?;
    Ok(Duration::from_secs(secs))
}

/// The bounds `serve` holds every client to (`serve --help` shows the defaults).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Limits {
    /// Seconds a client has to send a request's headers (and the most an idle keep-alive
    /// connection stays open); slower connections are closed.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub(crate) header_timeout: u64,
    /// Seconds a request (not an event stream) may take before it is answered 503.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub(crate) request_timeout: u64,
    /// Open connections at most (TLS handshakes and event streams included); more are
    /// closed at once.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub(crate) max_connections: usize,
    /// Event streams (SSE and WebSocket together) open at once, in all; more are refused
    /// (SSE: 429 with Retry-After: 10; WebSocket: accepted, then closed with 1013). Each
    /// holds a connection (HTTP/1) and a watcher of the store, which costs memory (the
    /// store reads the database once for all its watchers): the default stays under
    /// --max-connections, so requests still get in when every stream is open, and bounds
    /// the server's memory.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub(crate) max_streams: usize,
    /// Event streams one user (the user in the stream's path) may have open at once; more
    /// are refused as past --max-streams. Room for a dozen browser tabs and a service's few
    /// watchers of that user, not for one token opening streams at will.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub(crate) max_streams_per_user: usize,
    /// Largest WebSocket message (and frame) a client may send, in bytes; larger ones close
    /// the socket with 1009.
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    pub(crate) ws_max_message: usize,
    /// Seconds a WebSocket client has to answer a ping before it is disconnected.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub(crate) ws_pong_timeout: u64,
    /// Longest lifetime a user token may have (its `exp` at most this far ahead), e.g.
    /// 3600, 12h, 30d; tokens reaching further are refused.
    #[arg(long, default_value = "30d", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) max_token_ttl: Duration,
    /// Failed authentications a client address may make per minute before its requests are
    /// answered 429 for the rest of the minute (0: no limit). Behind a proxy every client
    /// shares the proxy's address: raise it or limit there.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) auth_failures_per_minute: u32,
    /// Most bytes of steps in one answer of a task's history (at least one step is always
    /// given); the answer's `next_after_step` says where to go on.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub(crate) max_history_bytes: usize,
}

/// What `serve` is given.
#[derive(Debug)]
pub(crate) struct Options {
    /// Where to listen.
    pub(crate) listen: SocketAddr,
    /// Certificate chain and key (PEM) for TLS.
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    /// Origins allowed to call the API from other sites' pages (none by default).
    pub(crate) cors_origins: Vec<String>,
    /// How often an idle event stream gets a heartbeat.
    pub(crate) heartbeat: Duration,
    /// The bounds.
    pub(crate) limits: Limits,
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: DynStore,
    pub(crate) pg: Option<PgTaskHistoryStore>,
    pub(crate) auth: access::Auth,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) heartbeat: Duration,
    pub(crate) limits: Arc<Limits>,
    pub(crate) failures: Arc<access::FailureLimiter>,
    /// The event streams open, under `--max-streams` and `--max-streams-per-user`.
    pub(crate) streams: Arc<streams::Streams>,
    /// Set when the server stops: event streams end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
}

/// Checks an origin for `--cors-origin`: `scheme://host[:port]`, http or https, nothing
/// else (`*` and `null` would let any page, or sandboxed ones, call the API).
fn origin(o: &str) -> Result<HeaderValue, CliError> {
    let bad = |why: &str| CliError::Config(format!("--cors-origin {o:?}: {why}"));
    if o == "*" || o.eq_ignore_ascii_case("null") {
        return Err(bad(
            "not allowed: name each origin whose pages may call the API (https://app.example.com)",
        ));
    }
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or_else(|| bad("expected http(s)://host[:port]"))?;
    let valid = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !valid {
        return Err(bad("expected http(s)://host[:port], no path"));
    }
    HeaderValue::from_str(o).map_err(|_| bad("not a valid origin"))
}

/// The server's routes on `state`.
pub(crate) fn router(state: AppState, cors_origins: &[String]) -> Result<Router, CliError> {
    let origins = cors_origins
        .iter()
        .map(|o| origin(o))
        .collect::<Result<Vec<_>, _>>()?;
    let request_timeout = Duration::from_secs(state.limits.request_timeout.max(1));
    let mut router = Router::new()
        .route("/", get(api::dashboard))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/v1/whoami", get(api::whoami))
        .route("/v1/overview", get(api::overview))
        .route("/v1/users/{user}/counts", get(api::counts))
        .route("/v1/users/{user}/activity", get(api::activity))
        .route("/v1/users/{user}/tasks", get(api::tasks))
        .route("/v1/users/{user}/tasks/{task}", get(api::task))
        .route("/v1/users/{user}/tasks/{task}/cancel", post(api::cancel))
        .route("/v1/users/{user}/events", get(events::sse))
        .route("/v1/users/{user}/events/ticket", post(events::ticket))
        .route("/v1/users/{user}/ws", get(events::websocket))
        .route("/v1/admin/stats", get(api::stats))
        .route("/v1/admin/retention", get(api::retention))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        // Answers (not streams' bodies) within the request timeout; no body over 64 KiB
        // (no route reads one).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(64 * 1024))
        .layer(axum::middleware::from_fn(api::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::count,
        ))
        .with_state(state);
    if !origins.is_empty() {
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderName::from_static("last-event-id"),
                    axum::http::HeaderName::from_static(api::POSITION_HEADER),
                ])
                .expose_headers([axum::http::HeaderName::from_static(api::POSITION_HEADER)]),
        );
    }
    Ok(headers::secure(router))
}

/// Reads a token or secret from the environment, at least `min` bytes.
fn env_key(name: &str, min: usize) -> Result<Option<String>, CliError> {
    match std::env::var(name).ok().filter(|v| !v.is_empty()) {
        Some(v) if v.len() < min => Err(CliError::Config(format!(
            "{name} is too short: at least {min} bytes"
        ))),
        v => Ok(v),
    }
}

/// Serves until interrupted; then stops accepting, ends the event streams, lets other
/// requests finish (10 s at most) and returns.
pub(crate) async fn run(
    store: DynStore,
    pg: Option<PgTaskHistoryStore>,
    options: Options,
) -> Result<u8, CliError> {
    // The server's log (stderr) is installed by `main` (`telemetry.rs`).
    let admin = env_key("TASKHISTORY_ADMIN_TOKEN", MIN_ADMIN_TOKEN)?;
    let metrics_token = env_key("TASKHISTORY_METRICS_TOKEN", MIN_ADMIN_TOKEN)?;
    let current = signing_secret("TASKHISTORY_SECRET")?;
    let previous = signing_secret("TASKHISTORY_SECRET_PREVIOUS")?;
    if previous.is_some() && current.is_none() {
        return Err(CliError::Config(
            "TASKHISTORY_SECRET_PREVIOUS is set without TASKHISTORY_SECRET".to_owned(),
        ));
    }
    if admin.is_some() && admin == metrics_token {
        return Err(CliError::Config(
            "TASKHISTORY_METRICS_TOKEN must differ from TASKHISTORY_ADMIN_TOKEN".to_owned(),
        ));
    }
    let limits = options.limits;
    if limits.max_token_ttl > Duration::from_secs(366 * 86_400) {
        return Err(CliError::Config(
            "--max-token-ttl: at most 366d (a leaked token would work for longer)".to_owned(),
        ));
    }
    if limits.ws_max_message < 125
        || limits.max_connections == 0
        || limits.header_timeout == 0
        || limits.max_streams == 0
        || limits.max_streams_per_user == 0
    {
        return Err(CliError::Config(
            "--ws-max-message is at least 125 bytes (a control frame), --max-connections, \
             --header-timeout, --max-streams and --max-streams-per-user at least 1"
                .to_owned(),
        ));
    }
    let tickets = Secret::random()
        .map_err(|e| CliError::Other(format!("no random bytes for the ticket key: {e}")))?;
    let keys = Keys::new(
        admin.as_deref().map(str::as_bytes),
        metrics_token.as_deref().map(str::as_bytes),
        current,
        previous,
        tickets,
        limits.max_token_ttl,
    );
    let auth = access::Auth::new(keys);
    if !auth.configured() {
        eprintln!(
            "taskhistory: none of TASKHISTORY_ADMIN_TOKEN, TASKHISTORY_SECRET or \
             TASKHISTORY_METRICS_TOKEN is set: every route but /healthz and / will answer 401"
        );
    }
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let metrics = metrics::Metrics::new(pg.clone());
    let state = AppState {
        store,
        pg,
        auth,
        metrics: metrics.clone(),
        heartbeat: options.heartbeat,
        failures: Arc::new(access::FailureLimiter::new(
            limits.auth_failures_per_minute,
            Duration::from_secs(60),
        )),
        streams: streams::Streams::new(
            limits.max_streams,
            limits.max_streams_per_user,
            metrics.clone(),
        ),
        limits: Arc::new(limits.clone()),
        stopping,
    };
    let app =
        router(state, &options.cors_origins)?.into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let mut interrupt = Interrupt::install();
    let stopping = handle.clone();
    tokio::spawn(async move {
        interrupt.wait().await;
        // No new connection; event streams end now; other requests get 10 s to finish.
        // The store is closed after the server stops (with the command's other stores).
        stopping.graceful_shutdown(Some(Duration::from_secs(10)));
        let _ = stop.send(true);
    });
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let capped = net::Capped::new(limits.max_connections, metrics);
    let served = match &options.tls {
        Some((cert, key)) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| CliError::Config(format!("--tls-cert/--tls-key: {e}")))?;
            let handshake = Duration::from_secs(limits.header_timeout);
            let mut server = axum_server::bind_rustls(options.listen, config)
                .map(|tls| tls.handshake_timeout(handshake).acceptor(capped))
                .handle(handle.clone());
            net::configure(&mut server, &limits, options.heartbeat);
            let server = server.first_request_timeout(Duration::from_secs(limits.header_timeout));
            announce(&handle, scheme);
            server.serve(app).await
        }
        None => {
            let mut server = axum_server::bind(options.listen)
                .acceptor(capped)
                .handle(handle.clone());
            net::configure(&mut server, &limits, options.heartbeat);
            let server = server.first_request_timeout(Duration::from_secs(limits.header_timeout));
            announce(&handle, scheme);
            server.serve(app).await
        }
    };
    served.map_err(|e| CliError::Io {
        what: format!("serving on {}", options.listen),
        source: e,
    })?;
    Ok(exit::OK)
}

/// Prints the address once the server listens (a port of 0 is chosen then).
fn announce(handle: &axum_server::Handle<SocketAddr>, scheme: &'static str) {
    let handle = handle.clone();
    tokio::spawn(async move {
        if let Some(addr) = handle.listening().await {
            eprintln!("taskhistory: serving on {scheme}://{addr}/ ; Ctrl-C to stop");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_named_sites_only() {
        for bad in [
            "*",
            "null",
            "NULL",
            "app.example",
            "https://",
            "https://a/b",
            "ftp://a",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "https://[::1]:8443",
        ] {
            assert!(origin(good).is_ok(), "{good}");
        }
    }
}
