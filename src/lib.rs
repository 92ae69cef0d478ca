//! `taskhistory`: the execution history of asynchronous tasks, kept in PostgreSQL.
//!
//! Services save each step's result, load a task's history, check or cancel a task, list a
//! user's tasks and clean up old ones through one contract, [`TaskHistoryStore`], whose
//! method names are those of the Python `DatabaseManager` it replaces.
//!
//! This crate is a facade over the workspace's crates:
//! - `taskhistory-core` (always): the contract, domain types, errors, retry policy, validation;
//! - `taskhistory-postgres` (feature `postgres`, default): [`PgTaskHistoryStore`];
//! - `taskhistory-memory` (feature `memory`, default): [`MemoryStore`], the test double;
//! - feature `mock`: mockall's `MockTaskHistoryStore`;
//! - feature `test-schema`: throwaway schemas for a service's integration tests.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), taskhistory::StoreError> {
//! use std::sync::Arc;
//! // Everything the API speaks in comes from the facade: no chrono, serde_json or futures
//! // dependency of the service's own.
//! use taskhistory::futures::StreamExt;
//! use taskhistory::serde_json::json;
//! use taskhistory::{DynStore, MemoryStore, TaskHistoryStore, TaskStepResult};
//!
//! let store: DynStore = Arc::new(MemoryStore::new());
//! let mut events = store.watch_user("user_123", None).await?;
//! let step = TaskStepResult::success("load", json!({"rows": 1000}), "loaded");
//! store.save_task_history("user_123", "task_456", 1, &step).await?;
//! let history = store.load_task_history("user_123", "task_456").await?;
//! assert_eq!(history.len(), 1);
//! let event = events.next().await.expect("a live stream")?;
//! let at: taskhistory::chrono::DateTime<taskhistory::chrono::Utc> = event.timestamp;
//! assert_eq!((event.step, at), (1, history[0].timestamp));
//! # Ok(()) }
//! ```
//!
//! # Guide
//!
//! ## Wiring PostgreSQL from the environment
//!
//! [`PgConfig::from_env`] reads `DATABASE_URL` (or `DB_HOST`, `DB_PORT`, `DB_NAME`,
//! `DB_USER`, `DB_PASSWORD`) and the tuning variables (`docs/operations.md` lists them);
//! a setting that does not parse is [`StoreError::Configuration`] naming the variable.
//! With none of them set it falls back to `postgres@localhost:5432/postgres` (the `taskhistory`
//! CLI refuses to guess and says what to set; a service should check its own deployment).
//! `connect` opens one connection at once and does not retry: a refused or unreachable
//! server fails it with `Unavailable` (retry at start-up if the database may come up after
//! the service); a wrong password, an unknown role or database is `Configuration`.
//! `init_database_schema` applies the migrations (safe from many processes at once);
//! `warm_up` opens the pool's minimum before the service takes traffic. The store logs
//! through `tracing`: install a subscriber (e.g. `tracing-subscriber`) to see its warnings.
//!
//! ```no_run
//! # async fn start() -> Result<(), taskhistory::StoreError> {
//! use std::sync::Arc;
//! use taskhistory::{DynStore, PgConfig, PgTaskHistoryStore, TaskHistoryStore};
//!
//! let pg = PgTaskHistoryStore::connect(PgConfig::from_env()?).await?;
//! pg.init_database_schema().await?;
//! pg.warm_up().await?;
//! // One store per process, shared: it is `Send + Sync` and cheap to clone.
//! let store: DynStore = Arc::new(pg);
//! # let _ = store; Ok(()) }
//! ```
//!
//! ## Errors, and which are retried
//!
//! Every method returns [`StoreError`]. Transient errors ([`StoreError::is_transient`]: a
//! lost connection, a timeout, a serialization conflict) are retried inside the store by
//! its [`RetryPolicy`] before they reach you; writes are idempotent, so a retry never
//! doubles a step. [`StoreError::TaskCancelled`] means "stop working on this task";
//! [`StoreError::InvalidInput`] names the field and nothing was written.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use taskhistory::{MemoryStore, StoreError, TaskHistoryStore, TaskStepResult};
//! let store = MemoryStore::new();
//! let step = TaskStepResult::running("fetch", taskhistory::serde_json::json!({}), "");
//! store.save_task_history("u", "t", 1, &step).await.unwrap();
//! store.mark_task_as_cancelled("u", "t").await.unwrap();
//! match store.save_task_history("u", "t", 2, &step).await {
//!     Err(StoreError::TaskCancelled { .. }) => { /* the worker stops here */ }
//!     other => panic!("{other:?}"),
//! }
//! let bad = store.save_task_history("", "t", 1, &step).await.unwrap_err();
//! assert!(matches!(bad, StoreError::InvalidInput { ref field, .. } if field == "user_id"));
//! assert!(!bad.is_transient());
//! # }
//! ```
//!
//! ## Batches
//!
//! [`save_batch_task_history`](TaskHistoryStore::save_batch_task_history) writes many steps
//! of any tasks all-or-nothing; on PostgreSQL large batches of new tasks go by `COPY`.
//! Concurrent single saves are combined by the PostgreSQL store on its own
//! ([`PgConfig::save_lanes`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use taskhistory::{MemoryStore, StepRecord, TaskHistoryStore, TaskStepResult};
//! let store = MemoryStore::new();
//! let done = TaskStepResult::success("import", taskhistory::serde_json::json!(1), "ok");
//! let batch: Vec<StepRecord> = (0..3).map(|i| StepRecord::new("u", "t", i, done.clone())).collect();
//! store.save_batch_task_history(&batch).await.unwrap();
//! assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 3);
//! # }
//! ```
//!
//! ## Watching
//!
//! [`watch_task`](TaskHistoryStore::watch_task) and
//! [`watch_user`](TaskHistoryStore::watch_user) stream every write after a cursor, once;
//! each [`TaskEvent`] carries the [`EventCursor`] to resume from (an SSE `Last-Event-ID`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), taskhistory::StoreError> {
//! use taskhistory::futures::StreamExt;
//! use taskhistory::{MemoryStore, TaskHistoryStore, TaskStepResult};
//! let store = MemoryStore::new();
//! let mut events = store.watch_user("u", None).await?;
//! let step = TaskStepResult::running("s", taskhistory::serde_json::json!({}), "");
//! store.save_task_history("u", "t", 1, &step).await?;
//! store.save_task_history("u", "t", 2, &step).await?;
//! let first = events.next().await.expect("live")?;
//! // Later, or in another process: resume right after the first event.
//! let mut resumed = store.watch_user("u", Some(first.cursor)).await?;
//! assert_eq!(resumed.next().await.expect("live")?.step, 2);
//! # Ok(()) }
//! ```
//!
//! ## Traces
//!
//! Every operation is a `tracing` span named `taskhistory` (fields `operation`, `user_id`,
//! `task_id`, `rows`, `elapsed_ms`; never a secret), with a warning on each retry. The
//! service's own subscriber decides where they go. To OpenTelemetry, with the
//! `tracing-subscriber`, `tracing-opentelemetry`, `opentelemetry`, `opentelemetry_sdk` and
//! `opentelemetry-otlp` (features `http-proto`, `reqwest-blocking-client`) crates, as
//! `taskhistory serve` does when `OTEL_EXPORTER_OTLP_ENDPOINT` is set:
//!
//! ```ignore
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?; // reads OTEL_EXPORTER_OTLP_ENDPOINT
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_batch_exporter(exporter)
//!     .build();
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-service")))
//!     .init();
//! // ... and `provider.shutdown()` before the process exits, so the last spans are sent.
//! ```
//!
//! ## Shutdown
//!
//! Call [`close`](TaskHistoryStore::close) before the process exits: it sends the
//! watchers' pending wake-ups and closes the pool. Without it nothing is lost; other
//! processes' watchers see the last writes at their next poll instead of at once.
//!
//! ## Testing a service
//!
//! - [`MemoryStore`]: the same contract in memory (the behaviour suite runs on both).
//! - `MockTaskHistoryStore` (feature `mock`, with `mockall` re-exported): interactions.
//!   Errors are `Clone`, so `return_const(Err(...))` works.
//! - A real database (feature `test-schema`): `PgTaskHistoryStore::on_fresh_schema(config)`
//!   gives each test a migrated store on a schema of its own, and `drop_schema()` removes
//!   it when the test ends. A test that panics first leaves its schema; the next
//!   `on_fresh_schema` drops those older than an hour (`ABANDONED_AFTER`). The config is
//!   the service's choice (e.g. `PgConfig::from_url(&std::env::var("TEST_DATABASE_URL")?)`);
//!   see also `examples/task_service.rs`.
//!
//! ```
//! # #[cfg(feature = "mock")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use taskhistory::{MockTaskHistoryStore, StoreError, TaskHistoryStore, TaskStatus};
//! let mut mock = MockTaskHistoryStore::new();
//! mock.expect_check_task_status()
//!     .return_const(Err(StoreError::Closed));
//! assert!(matches!(mock.check_task_status("u", "t").await, Err(StoreError::Closed)));
//! # let _ = TaskStatus::Pending;
//! # }
//! # #[cfg(not(feature = "mock"))]
//! # fn main() {}
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use taskhistory_core::MockTaskHistoryStore;
pub use taskhistory_core::{
    BoxError, CleanupReport, DynStore, ErrorCode, EventCursor, HealthReport, HistoryEntry,
    HistoryPage, HistoryScan, ParseEnumError, RetryPolicy, StepKey, StepRecord, StoreError,
    TaskCursor, TaskEvent, TaskEventKind, TaskEventStream, TaskHistoryStore, TaskPage, TaskQuery,
    TaskStatus, TaskStepResult, TaskSummary,
};

/// The input rules every store applies before touching anything: the limits, and the
/// checks a service may run itself before calling a store (each refuses with
/// [`StoreError::InvalidInput`] naming the field, as the store would).
pub mod validate {
    pub use taskhistory_core::validate::{
        days, limit, step, step_result, task, task_id, user_id, MAX_ID_BYTES, MAX_JSON_DEPTH,
        MAX_PAGE_SIZE, MAX_RESULT_BYTES, MAX_RETENTION_DAYS, MAX_SCAN_SIZE,
    };
}

/// The crates the API speaks in, re-exported so a service needs no dependency of its own
/// (and no version to match): `chrono` (timestamps), `serde_json` (step results),
/// `futures` (`StreamExt` for watch streams) and, with feature `mock`, `mockall` (for
/// writing expectations on `MockTaskHistoryStore`).
pub use chrono;
pub use futures;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use mockall;
pub use serde_json;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use taskhistory_memory::MemoryStore;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use taskhistory_postgres::{
    CleanupOptions, PgConfig, PgTaskHistoryStore, PoolStats, SslMode, StoreMetrics, StoreStats,
};

/// Issuing and verifying the user tokens `taskhistory serve` accepts (feature `tokens`):
/// a service signs its users' tokens with the server's secret.
#[cfg(feature = "tokens")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokens")))]
pub use taskhistory_tokens as tokens;

/// The PostgreSQL backend crate, for everything beyond the store itself.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use taskhistory_postgres as postgres;
