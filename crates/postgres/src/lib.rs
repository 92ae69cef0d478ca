//! `PgTaskHistoryStore`: the [`TaskHistoryStore`](taskhistory_core::TaskHistoryStore) on
//! PostgreSQL, with diesel-async over a bb8 pool.
//!
//! What it is for: keeping task histories in production. Every write is one statement that
//! keeps a per-task summary row right in the same transaction, so status checks and task
//! lists cost the same however long histories grow. Migrations (the top-level `migrations/`
//! folder, embedded) are applied by `init_database_schema`, and adopt a database made by the
//! Python `DatabaseManager` in place. An opt-in partitioned layout (by task start) makes
//! retention drop whole partitions ([`PgTaskHistoryStore::convert_to_partitioned`]); live
//! task events are a log each watcher reads after its cursor, woken through LISTEN/NOTIFY
//! (sent by a per-store notifier outside the writers' transactions); concurrent single
//! saves are combined into one statement when they queue for the store's save lanes, and
//! concurrent status checks when they queue for its status lanes.
//!
//! What it is not for: tests of code that merely uses a store (use `taskhistory-memory`), or
//! arbitrary queries over the history (the SQL is fixed, in the crate's `sql` module).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod combine;
mod compat;
mod config;
mod connection;
mod error;
mod exec;
mod explain;
mod isolation;
mod layout;
mod listen;
mod migrate;
mod notify;
mod ops;
mod partition;
mod replica;
mod session;
// Public texts for the workspace's tests (feature `test-internals`); without it, items only
// those tests read are unused here.
#[cfg_attr(not(feature = "test-internals"), allow(unreachable_pub, dead_code))]
mod sql;
mod stats;
mod store;
mod watch;

pub use compat::PythonCompat;
pub use config::{PgConfig, SslMode, StatementObserver};
pub use exec::{PoolStats, StoreMetrics};
pub use explain::{QueryStats, StatementPlan};
pub use isolation::{IsolationState, TableIsolation};
pub use layout::{Layout, PartitionInfo, PartitionInterval, Partitioning};
pub use migrate::{least_privilege_grants, MigrationState};
pub use replica::ReplicaState;
pub use stats::{RelationSize, StatusStats, StoreStats};
pub use store::{CleanupOptions, PgTaskHistoryStore};

/// Every SQL statement's text (feature `test-internals`, no semver promise): for the workspace's
/// statement tests, plan examples and like-for-like benchmarks, which reach it through the
/// testing crate (`taskhistory_testing::sql`). A service never needs it.
#[cfg(feature = "test-internals")]
#[doc(hidden)]
pub mod sql_texts {
    pub use crate::sql::*;
}
