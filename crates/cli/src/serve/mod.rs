//! `taskhistory serve`: the task history over HTTP (JSON, Server-Sent Events, WebSocket),
//! a dashboard at `/`, and Prometheus metrics; every route scoped to one user and guarded by
//! bearer tokens (`auth.rs`). Built on axum; TLS by rustls when given a certificate.
//!
//! Routes (`docs/operations.md`, "Serving the history over HTTP"):
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard (one page, served from the binary) |
//! | `GET /healthz` | `{"healthy": true, ...}` or 503; no token |
//! | `GET /metrics` | Prometheus text; the operator's token |
//! | `GET /v1/users/{user}/tasks?limit=&status=&cursor=` | a page of the user's tasks |
//! | `GET /v1/users/{user}/tasks/{task}` | status and history (404 for a task never seen) |
//! | `POST /v1/users/{user}/tasks/{task}/cancel` | `{"cancelled": true\|false}` |
//! | `GET /v1/users/{user}/events[?task=&after=]` | Server-Sent Events, `id:` = the cursor; `Last-Event-ID` resumes |
//! | `GET /v1/users/{user}/ws[?task=&after=]` | the same events over a WebSocket, one JSON text message each |
//! | `GET /v1/admin/stats` | the store's statistics; the operator's token |
//! | `GET /v1/admin/retention?days=&status=` | a cleanup dry run; the operator's token |

mod api;
mod auth;
mod events;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use taskhistory_core::DynStore;
use taskhistory_postgres::PgTaskHistoryStore;
use tower_http::cors::CorsLayer;

use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;

use auth::MIN_ADMIN_TOKEN;
pub(crate) use auth::{issue, MIN_SECRET};

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
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: DynStore,
    pub(crate) pg: Option<PgTaskHistoryStore>,
    pub(crate) auth: auth::Auth,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) heartbeat: Duration,
    /// Set when the server stops: event streams end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
}

/// The server's routes on `state`.
pub(crate) fn router(state: AppState, cors_origins: &[String]) -> Result<Router, CliError> {
    let mut router = Router::new()
        .route("/", get(api::dashboard))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/v1/users/{user}/tasks", get(api::tasks))
        .route("/v1/users/{user}/tasks/{task}", get(api::task))
        .route("/v1/users/{user}/tasks/{task}/cancel", post(api::cancel))
        .route("/v1/users/{user}/events", get(events::sse))
        .route("/v1/users/{user}/ws", get(events::websocket))
        .route("/v1/admin/stats", get(api::stats))
        .route("/v1/admin/retention", get(api::retention))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn(api::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::count,
        ))
        .with_state(state);
    if !cors_origins.is_empty() {
        let origins = cors_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| {
                    CliError::BadInput(format!("--cors-origin {o:?}: not a valid origin"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderName::from_static("last-event-id"),
                ]),
        );
    }
    Ok(router)
}

/// Serves until interrupted; then stops accepting, ends the event streams, lets other
/// requests finish (10 s at most) and returns.
pub(crate) async fn run(
    store: DynStore,
    pg: Option<PgTaskHistoryStore>,
    options: Options,
) -> Result<u8, CliError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let auth = auth::Auth::new(env("TASKHISTORY_ADMIN_TOKEN"), env("TASKHISTORY_SECRET"));
    if let Some(secret) = env("TASKHISTORY_SECRET") {
        if secret.len() < MIN_SECRET {
            return Err(CliError::Config(format!(
                "TASKHISTORY_SECRET is too short: at least {MIN_SECRET} bytes"
            )));
        }
    }
    if env("TASKHISTORY_ADMIN_TOKEN").is_some_and(|t| t.len() < MIN_ADMIN_TOKEN) {
        return Err(CliError::Config(format!(
            "TASKHISTORY_ADMIN_TOKEN is too short: at least {MIN_ADMIN_TOKEN} bytes"
        )));
    }
    if !auth.configured() {
        eprintln!(
            "taskhistory: neither TASKHISTORY_ADMIN_TOKEN nor TASKHISTORY_SECRET is set: every \
             route but /healthz will answer 401"
        );
    }
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let state = AppState {
        store,
        pg: pg.clone(),
        auth,
        metrics: metrics::Metrics::new(pg),
        heartbeat: options.heartbeat,
        stopping,
    };
    let app = router(state, &options.cors_origins)?;
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
    let served = match &options.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| CliError::Config(format!("--tls-cert/--tls-key: {e}")))?;
            let server = axum_server::bind_rustls(options.listen, config).handle(handle.clone());
            announce(&handle, scheme);
            server.serve(app.into_make_service()).await
        }
        None => {
            let server = axum_server::bind(options.listen).handle(handle.clone());
            announce(&handle, scheme);
            server.serve(app.into_make_service()).await
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
