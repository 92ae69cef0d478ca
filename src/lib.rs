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
//! ```no_run
//! # async fn demo() -> Result<(), taskhistory::StoreError> {
//! use std::sync::Arc;
//! use taskhistory::{DynStore, MemoryStore, TaskHistoryStore, TaskStepResult};
//!
//! let store: DynStore = Arc::new(MemoryStore::new());
//! let step = TaskStepResult::success("load", serde_json::json!({"rows": 1000}), "loaded");
//! store.save_task_history("user_123", "task_456", 1, &step).await?;
//! let history = store.load_task_history("user_123", "task_456").await?;
//! assert_eq!(history.len(), 1);
//! # Ok(()) }
//! ```

pub use taskhistory_core::*;

#[cfg(feature = "memory")]
pub use taskhistory_memory::MemoryStore;

#[cfg(feature = "postgres")]
pub use taskhistory_postgres::{
    CleanupOptions, PgConfig, PgTaskHistoryStore, PoolStats, SslMode, StoreMetrics, StoreStats,
};

/// The PostgreSQL backend crate, for everything beyond the store itself.
#[cfg(feature = "postgres")]
pub use taskhistory_postgres as postgres;
