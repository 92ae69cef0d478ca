#![doc = include_str!("../docs/guide.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use taskhistory_core::MockTaskHistoryStore;
pub use taskhistory_core::{
    ActivityHour, BoxError, CleanupReport, DynStore, ErrorCode, EventCursor, HealthReport,
    HistoryEntry, HistoryPage, HistoryScan, ParseEnumError, RetryPolicy, StepKey, StepRecord,
    StoreError, TaskCounts, TaskCursor, TaskEvent, TaskEventKind, TaskEventStream,
    TaskHistoryStore, TaskPage, TaskQuery, TaskStatus, TaskStepResult, TaskSummary,
};

/// The input rules every store applies before touching anything: the limits, and the
/// checks a service may run itself before calling a store (each refuses with
/// [`StoreError::InvalidInput`] naming the field, as the store would).
pub mod validate {
    pub use taskhistory_core::validate::{
        activity, days, limit, step, step_result, task, task_id, user_id, MAX_ACTIVITY_DAYS,
        MAX_ID_BYTES, MAX_JSON_DEPTH, MAX_PAGE_SIZE, MAX_RESULT_BYTES, MAX_RETENTION_DAYS,
        MAX_SCAN_SIZE,
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
    CleanupOptions, PgConfig, PgTaskHistoryStore, PoolStats, ReplicaState, SslMode, StoreMetrics,
    StoreStats,
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
