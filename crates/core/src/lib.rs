//! The domain core of `taskhistory`: task statuses and error codes, the records kept per step,
//! the [`TaskHistoryStore`] contract with its [`StoreError`], the [`RetryPolicy`], the input
//! rules every store applies ([`validate`]) and, behind the `conformance` feature, the
//! behaviour suite every store must pass.
//!
//! It holds no storage: backends live in `taskhistory-postgres` and `taskhistory-memory`.
//! Feature `mock` adds mockall's `MockTaskHistoryStore` for interaction tests.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod model;
mod retry;
mod rules;
mod status;
mod store;
pub mod validate;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use error::{BoxError, StoreError};
pub use model::{
    ActivityHour, CleanupReport, EventCursor, HealthReport, HistoryEntry, HistoryPage, HistoryScan,
    StepKey, StepRecord, TaskCounts, TaskCursor, TaskEvent, TaskEventKind, TaskPage, TaskQuery,
    TaskStepResult, TaskSummary,
};
pub use retry::RetryPolicy;
pub use status::{ErrorCode, ParseEnumError, TaskStatus};
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use store::MockTaskHistoryStore;
pub use store::{DynStore, TaskEventStream, TaskHistoryStore};
