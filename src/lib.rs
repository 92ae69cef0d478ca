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
//! - feature `mock`: mockall's `MockTaskHistoryStore`.
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

pub use taskhistory_core::*;

/// The crates the API speaks in, re-exported so a service needs no dependency of its own
/// (and no version to match): `chrono` (timestamps), `serde_json` (step results),
/// `futures` (`StreamExt` for watch streams) and, with feature `mock`, `mockall` (for
/// writing expectations on `MockTaskHistoryStore`).
pub use chrono;
pub use futures;
#[cfg(feature = "mock")]
pub use mockall;
pub use serde_json;

#[cfg(feature = "memory")]
pub use taskhistory_memory::MemoryStore;

#[cfg(feature = "postgres")]
pub use taskhistory_postgres::{
    CleanupOptions, PgConfig, PgTaskHistoryStore, PoolStats, SslMode, StoreMetrics, StoreStats,
};

/// The PostgreSQL backend crate, for everything beyond the store itself.
#[cfg(feature = "postgres")]
pub use taskhistory_postgres as postgres;
