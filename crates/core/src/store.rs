//! The [`TaskHistoryStore`] contract.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::model::{
    ActivityHour, CleanupReport, EventCursor, HealthReport, HistoryEntry, HistoryPage, HistoryScan,
    StepRecord, TaskCounts, TaskEvent, TaskPage, TaskQuery, TaskStepResult, TaskSummary,
};
use crate::status::TaskStatus;
use chrono::{DateTime, Utc};

/// A shared, type-erased store: what services hold.
pub type DynStore = Arc<dyn TaskHistoryStore>;

/// The events of [`TaskHistoryStore::watch_task`] and [`TaskHistoryStore::watch_user`].
pub type TaskEventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<TaskEvent, StoreError>> + Send>>;

/// Keeps the execution history of asynchronous tasks.
///
/// The method names are those of the Python `DatabaseManager` it replaces. Every store
/// (PostgreSQL, memory) keeps the same contract, and the behaviour suite
/// ([`conformance`](crate::conformance), feature `conformance`) checks each rule on each store.
///
/// # Contract
///
/// 1. **Keys.** A step is keyed by `(user_id, task_id, step)`. Saving the same step again
///    replaces it (result, status and timestamp): retries are idempotent and never duplicate
///    a step.
/// 2. **Status.** A task's status is the status of its highest step. A task the store has
///    never seen is [`TaskStatus::Pending`].
/// 3. **Cancellation is sticky.** [`mark_task_as_cancelled`](Self::mark_task_as_cancelled) on
///    a task that exists and is not [terminal](TaskStatus::is_terminal) appends one history
///    entry (step = highest step + 1, [`TaskStepResult::cancellation`]) without rewriting
///    earlier steps, and returns `true`. On an unknown or terminal task, or one whose
///    highest step is `i32::MAX` (no step is left for the entry), it returns `false` and
///    changes nothing. Every later save to a cancelled task (whatever its step number)
///    fails with [`StoreError::TaskCancelled`] and writes nothing.
/// 4. **Order.** [`load_task_history`](Self::load_task_history) returns steps in ascending
///    step order. [`get_user_tasks_page`](Self::get_user_tasks_page) lists a user's tasks
///    newest activity first (`last_updated` descending), ties broken by `task_id` descending
///    (byte order); a cursor continues strictly after the last task seen, so paging through
///    a listing that no one writes to meanwhile returns every task exactly once. A task
///    written between two pages moves to the front and is not seen again on later pages.
///    A [`TaskQuery`]'s filters (status; activity range `[updated_after, updated_before)`
///    on `last_updated`, bounds cut to the microsecond; `task_id` byte prefix) combine
///    with each other and with the cursor: a listing returns, in this order, exactly the
///    tasks that pass every filter.
/// 5. **Batches.** [`save_batch_task_history`](Self::save_batch_task_history) is
///    all-or-nothing, may span many users and tasks, has no size limit, and when one step
///    appears more than once the last occurrence wins. If any task it touches is cancelled
///    it fails with [`StoreError::TaskCancelled`] and writes nothing. An empty batch is a
///    no-op.
/// 6. **Retention.** [`cleanup_old_tasks`](Self::cleanup_old_tasks)`(days)` removes whole
///    tasks whose `last_updated` is older than now minus `days` (never part of a history),
///    and reports the tasks and steps removed.
/// 7. **Input.** Bad input gets [`StoreError::InvalidInput`] naming the field and changes
///    nothing; the rules are in [`validate`](crate::validate). Timestamps are UTC with
///    microsecond precision in every store, so a step read back compares equal to what was
///    saved. JSON numbers come back as PostgreSQL's `jsonb` keeps them
///    ([`canonical_json`](crate::validate::canonical_json)).
/// 8. **Isolation.** No method returns or touches another user's data.
/// 9. **Events.** Every write (a step saved, a step saved again, a cancellation) takes a
///    position in the store's log of events when it commits. A watch
///    ([`watch_task`](Self::watch_task), [`watch_user`](Self::watch_user)) reads that log
///    after a cursor and delivers each write after it exactly once, a task's writes in
///    their commit order; each [`TaskEvent`] carries the [`EventCursor`] just after itself,
///    from which a new watch resumes. What the watcher is told never depends on a clock:
///    wake-ups (PostgreSQL's notifications) and polls only decide how soon it reads. A
///    step saved several times before a watcher reads it is delivered once, in its newest
///    version, at its newest position; a step saved again after the watcher received it is
///    delivered again. Writes refused (a cancelled task, bad input) are not events.
/// 10. **Counts and activity** are kept by the writes, in the same transaction: after any
///     write, cancel or cleanup, [`task_counts`](Self::task_counts) equals the user's tasks
///     counted by status, and [`task_activity`](Self::task_activity) holds what each write
///     did in the hour of the task's `last_updated` after it ([`ActivityHour`]): a call is
///     one write of each task it touches (concurrent single saves that a store combines
///     into one statement count as one write of their task). Reading
///     either costs the same for ten tasks or ten million. Cleanup removes the counts of the
///     tasks it removes, and the activity of hours older than its cutoff.
///
/// # Event streams
///
/// A watch is a [`TaskEventStream`] of `Result<TaskEvent, StoreError>`:
/// - errors that a retry may cure (a lost connection, a restarting server: those
///   [`StoreError::is_transient`] calls transient) are the store's business: it reconnects
///   and reads on from where the stream stands, and the stream never yields them;
/// - any other error (the schema is gone, the role lost its rights) is yielded once, as the
///   stream's last item; a consumer may resume from the last event's cursor once it is fixed;
/// - the stream ends (`None`) when the store is [closed](Self::close);
/// - a slow consumer never holds writers back and never loses an event: the store reads
///   the log at the consumer's pace (so `stream.try_next().await?` is a sound loop).
///
/// `last_updated` of a task is the greatest timestamp ever written to it; `step_count` is
/// its number of distinct steps.
///
/// Stores are `Send + Sync` and cheap to share; use them as [`DynStore`] (`Arc<dyn
/// TaskHistoryStore>`). Transient failures ([`StoreError::is_transient`]) are retried inside
/// the store by its [`RetryPolicy`](crate::RetryPolicy) before they reach the caller.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait TaskHistoryStore: Send + Sync + std::fmt::Debug {
    /// Creates or upgrades the store's schema. Safe to call from several processes at once
    /// and again at every start; a no-op for stores without a schema.
    async fn init_database_schema(&self) -> Result<(), StoreError>;

    /// Saves (or replaces) one step of a task, stamped with the store's clock.
    async fn save_task_history(
        &self,
        user_id: &str,
        task_id: &str,
        step: i32,
        step_result: &TaskStepResult,
    ) -> Result<(), StoreError>;

    /// Saves many steps, of any tasks, in one all-or-nothing write (rule 5).
    async fn save_batch_task_history(&self, records: &[StepRecord]) -> Result<(), StoreError>;

    /// A task's steps in ascending step order; empty for an unknown task.
    async fn load_task_history(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError>;

    /// Cancels a task that exists and is not terminal (rule 3); `false` when there was nothing
    /// to cancel.
    async fn mark_task_as_cancelled(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<bool, StoreError>;

    /// The status of a task's highest step; [`TaskStatus::Pending`] for an unknown task.
    async fn check_task_status(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskStatus, StoreError>;

    /// One page of a user's tasks (rule 4), optionally only those in one status, updated in
    /// a time range, or whose id starts with a prefix (see [`TaskQuery`]).
    async fn get_user_tasks_page(
        &self,
        user_id: &str,
        query: &TaskQuery,
    ) -> Result<TaskPage, StoreError>;

    /// The user's `limit` most recently active tasks: the first page of
    /// [`get_user_tasks_page`](Self::get_user_tasks_page), which every store's default
    /// calls. `MockTaskHistoryStore` mocks each method on its own: code that calls
    /// `get_user_tasks` needs `expect_get_user_tasks`, not `expect_get_user_tasks_page`.
    async fn get_user_tasks(
        &self,
        user_id: &str,
        limit: i64,
    ) -> Result<Vec<TaskSummary>, StoreError> {
        Ok(self
            .get_user_tasks_page(user_id, &TaskQuery::first(limit))
            .await?
            .tasks)
    }

    /// One page of a user's steps in `(task_id, step)` order, optionally of one task, each
    /// with its stored timestamp: what exports and backups read. Paging with
    /// [`HistoryPage::next`](crate::HistoryPage) visits every step once, in constant memory,
    /// however long the history.
    async fn scan_history(
        &self,
        user_id: &str,
        scan: &HistoryScan,
    ) -> Result<HistoryPage, StoreError>;

    /// How many of the user's tasks are in each status (rule 10).
    async fn task_counts(&self, user_id: &str) -> Result<TaskCounts, StoreError>;

    /// The user's activity per hour from `from` (inclusive) to `to` (exclusive), both cut
    /// to the hour, at most [`MAX_ACTIVITY_DAYS`](crate::validate::MAX_ACTIVITY_DAYS) days
    /// apart: the hours with any activity, oldest first (rule 10).
    async fn task_activity(
        &self,
        user_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ActivityHour>, StoreError>;

    /// Removes whole tasks inactive for more than `days_old` days (rule 6).
    async fn cleanup_old_tasks(&self, days_old: i64) -> Result<CleanupReport, StoreError>;

    /// The events of one task (rule 9): the writes committed after `after`, or with
    /// `None`, after the call.
    async fn watch_task(
        &self,
        user_id: &str,
        task_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError>;

    /// The events of all of a user's tasks (rule 9), in commit order per task; never
    /// another user's. `after` as for [`watch_task`](Self::watch_task).
    async fn watch_user(
        &self,
        user_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError>;

    /// Checks that the store can serve requests.
    async fn health_check(&self) -> Result<HealthReport, StoreError>;

    /// Releases the store's resources. Later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}
