//! The records the store keeps and returns.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StoreError;
use crate::status::{ErrorCode, TaskStatus};

/// The outcome of one step, stored as the `result` JSON of a history row.
///
/// Its JSON is field for field what the Python service's `TaskStepResult.dict()` produces
/// (`step`, `result`, `completed`, `message`, `status`, `error_code`, `error_message`, with
/// `null` for absent codes and messages), so rows written by either side stay readable by both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStepResult {
    /// The step's name, e.g. `"data_processing"`.
    pub step: String,
    /// What the step produced; any JSON value.
    #[serde(default)]
    pub result: Value,
    /// Whether the step finished.
    #[serde(default)]
    pub completed: bool,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// The task's status after this step.
    pub status: TaskStatus,
    /// The error code, for failed steps.
    #[serde(default)]
    pub error_code: Option<ErrorCode>,
    /// The error's text, for failed steps.
    #[serde(default)]
    pub error_message: Option<String>,
}

impl TaskStepResult {
    /// A step that finished successfully with `result`: completed, status `completed`.
    pub fn success(step: impl Into<String>, result: Value, message: impl Into<String>) -> Self {
        TaskStepResult {
            step: step.into(),
            result,
            completed: true,
            message: message.into(),
            status: TaskStatus::Completed,
            error_code: None,
            error_message: None,
        }
    }

    /// A step that is still going: not completed, status `running`.
    pub fn running(step: impl Into<String>, result: Value, message: impl Into<String>) -> Self {
        TaskStepResult {
            step: step.into(),
            result,
            completed: false,
            message: message.into(),
            status: TaskStatus::Running,
            error_code: None,
            error_message: None,
        }
    }

    /// A step that failed: no result, not completed, status `failed`, with the code and the
    /// error's text (also used as the message, as the seed's examples do).
    pub fn failure(step: impl Into<String>, code: ErrorCode, error: impl Into<String>) -> Self {
        let error = error.into();
        TaskStepResult {
            step: step.into(),
            result: Value::Null,
            completed: false,
            message: error.clone(),
            status: TaskStatus::Failed,
            error_code: Some(code),
            error_message: Some(error),
        }
    }

    /// What the Python service's `save_task_error` records for step number `step`: name
    /// `step_{step}`, message `Step {step} execution failed: {error}`, status `failed`, code
    /// E003, and the error's text.
    pub fn step_error(step: i32, error: impl std::fmt::Display) -> Self {
        let error = error.to_string();
        TaskStepResult {
            message: format!("Step {step} execution failed: {error}"),
            ..TaskStepResult::failure(format!("step_{step}"), ErrorCode::Execution, error)
        }
    }

    /// The same result with `result` as what the step produced.
    pub fn with_result(mut self, result: Value) -> Self {
        self.result = result;
        self
    }

    /// The same result, finished or not.
    pub fn with_completed(mut self, completed: bool) -> Self {
        self.completed = completed;
        self
    }

    /// The same result with another message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// The same result with an error code and text (the status is left as it is).
    pub fn with_error(mut self, code: ErrorCode, message: impl Into<String>) -> Self {
        self.error_code = Some(code);
        self.error_message = Some(message.into());
        self
    }

    /// The same result with another status.
    pub fn with_status(mut self, status: TaskStatus) -> Self {
        self.status = status;
        self
    }

    /// The history entry [`TaskHistoryStore::mark_task_as_cancelled`](crate::TaskHistoryStore)
    /// records: step `"cancelled"`, status `cancelled`, code E004.
    pub fn cancellation() -> Self {
        TaskStepResult {
            step: "cancelled".to_owned(),
            result: Value::Null,
            completed: false,
            message: "Task cancelled".to_owned(),
            status: TaskStatus::Cancelled,
            error_code: Some(ErrorCode::Cancelled),
            error_message: Some("task cancelled by request".to_owned()),
        }
    }
}

/// One step to save in a batch (the seed's batch record), and the line format of export and
/// import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The owner of the task.
    pub user_id: String,
    /// The task.
    pub task_id: String,
    /// The step number, 0 or more.
    pub step: i32,
    /// When the step happened; `None` lets the store use its clock. Kept to the microsecond.
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
    /// The step's outcome.
    pub result: TaskStepResult,
}

impl StepRecord {
    /// A record stamped by the store's clock when saved.
    pub fn new(
        user_id: impl Into<String>,
        task_id: impl Into<String>,
        step: i32,
        result: TaskStepResult,
    ) -> Self {
        StepRecord {
            user_id: user_id.into(),
            task_id: task_id.into(),
            step,
            timestamp: None,
            result,
        }
    }

    /// The same record with an explicit timestamp (imports, back-fills, tests of retention).
    pub fn at(mut self, timestamp: DateTime<Utc>) -> Self {
        self.timestamp = Some(timestamp);
        self
    }
}

/// One stored step, as [`TaskHistoryStore::load_task_history`](crate::TaskHistoryStore)
/// returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The step number.
    pub step: i32,
    /// The step's outcome (the row's `result` JSON).
    pub result: TaskStepResult,
    /// When the step was saved (or the timestamp it was saved with), UTC, microseconds.
    pub timestamp: DateTime<Utc>,
    /// The row's status column; equal to `result.status`, except on a row the Python
    /// service's cancel (an `UPDATE` of the column) changed during a rolling migration.
    pub status: TaskStatus,
}

/// One task of a user, as listed by
/// [`TaskHistoryStore::get_user_tasks`](crate::TaskHistoryStore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The task.
    pub task_id: String,
    /// The status of its highest step.
    pub status: TaskStatus,
    /// Its highest step number.
    pub last_step: i32,
    /// How many distinct steps it has.
    pub step_count: i64,
    /// When it was first written.
    pub created_at: DateTime<Utc>,
    /// Its latest activity: the greatest timestamp ever written to it.
    pub last_updated: DateTime<Utc>,
}

impl TaskCursor {
    /// Checks the cursor's parts: an id of 1 to 255 bytes without NUL, a time in the years 1
    /// to 9999.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        crate::rules::id("cursor", &self.task_id)?;
        crate::rules::timestamp("cursor", self.last_updated)?;
        Ok(())
    }
}

impl TaskSummary {
    /// The cursor that continues a listing after this task.
    pub fn cursor(&self) -> TaskCursor {
        TaskCursor {
            last_updated: self.last_updated,
            task_id: self.task_id.clone(),
        }
    }
}

/// Where a listing of a user's tasks continues: after the task with this `last_updated` and
/// `task_id` in the listing order (newest activity first, then `task_id` descending).
///
/// Its text form (`Display` / `FromStr`) is `<unix microseconds>:<task_id>`, safe to hand to
/// a client and back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskCursor {
    /// The `last_updated` of the last task already seen.
    pub last_updated: DateTime<Utc>,
    /// The `task_id` of the last task already seen.
    pub task_id: String,
}

impl fmt::Display for TaskCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.last_updated.timestamp_micros(),
            self.task_id
        )
    }
}

impl FromStr for TaskCursor {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| StoreError::invalid("cursor", why);
        let (micros, task_id) = s
            .split_once(':')
            .ok_or_else(|| bad("expected <micros>:<task_id>"))?;
        let micros: i64 = micros
            .parse()
            .map_err(|_| bad("the time part is not an integer"))?;
        let last_updated = DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| bad("the time is out of range"))?;
        let cursor = TaskCursor {
            last_updated,
            task_id: task_id.to_owned(),
        };
        cursor.check()?;
        Ok(cursor)
    }
}

/// What [`TaskHistoryStore::get_user_tasks_page`](crate::TaskHistoryStore) lists: a user's
/// tasks, newest activity first, narrowed by any combination of the filters below (each one
/// keeps a task only if it holds; with none set every task is listed).
///
/// The activity range is half-open, `[updated_after, updated_before)` on the task's
/// `last_updated` (the listing's order key): `updated_after(t)` keeps tasks updated at or
/// after `t`, `updated_before(t)` those updated strictly before `t`, so consecutive ranges
/// neither overlap nor leave a gap. Both bounds are cut to the microsecond, the precision
/// stores keep.
///
/// Build it with [`first`](Self::first) and the methods that narrow it; it is
/// `#[non_exhaustive]` so that later filters are not a breaking change (its fields stay
/// public to read and to set).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskQuery {
    /// How many tasks at most, 1 to [`MAX_PAGE_SIZE`](crate::validate::MAX_PAGE_SIZE).
    pub limit: i64,
    /// Continue after this task; `None` starts at the newest.
    pub after: Option<TaskCursor>,
    /// Only tasks whose current status is this one.
    pub status: Option<TaskStatus>,
    /// Only tasks last updated at or after this time (inclusive).
    pub updated_after: Option<DateTime<Utc>>,
    /// Only tasks last updated strictly before this time (exclusive).
    pub updated_before: Option<DateTime<Utc>>,
    /// Only tasks whose `task_id` starts with these bytes (byte-wise, as ids are ordered);
    /// checked like a `task_id` (1 to [`MAX_ID_BYTES`](crate::validate::MAX_ID_BYTES)
    /// bytes, no NUL).
    pub task_id_prefix: Option<String>,
}

impl TaskQuery {
    /// The first page of `limit` tasks, any status.
    pub fn first(limit: i64) -> Self {
        TaskQuery {
            limit,
            after: None,
            status: None,
            updated_after: None,
            updated_before: None,
            task_id_prefix: None,
        }
    }

    /// The same query continuing after `cursor`.
    pub fn after(mut self, cursor: Option<TaskCursor>) -> Self {
        self.after = cursor;
        self
    }

    /// The same query restricted to tasks whose current status is `status`.
    pub fn with_status(mut self, status: TaskStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The same query restricted to tasks last updated at or after `time` (inclusive).
    pub fn updated_after(mut self, time: DateTime<Utc>) -> Self {
        self.updated_after = Some(time);
        self
    }

    /// The same query restricted to tasks last updated strictly before `time` (exclusive).
    pub fn updated_before(mut self, time: DateTime<Utc>) -> Self {
        self.updated_before = Some(time);
        self
    }

    /// The same query restricted to tasks whose `task_id` starts with `prefix` (byte-wise).
    pub fn task_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.task_id_prefix = Some(prefix.into());
        self
    }

    /// The activity range's bounds as stores apply them, cut to the microsecond:
    /// `(updated_after, updated_before)`.
    pub fn activity_range(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let cut = |t: &DateTime<Utc>| t.trunc_subsecs(6);
        (
            self.updated_after.as_ref().map(cut),
            self.updated_before.as_ref().map(cut),
        )
    }

    /// Whether `summary` passes this query's filters (status, activity range, prefix; not
    /// the cursor or the limit): the listing's meaning, for stores that filter in memory.
    pub fn keeps(&self, summary: &TaskSummary) -> bool {
        let (from, until) = self.activity_range();
        self.status.is_none_or(|s| s == summary.status)
            && from.is_none_or(|t| summary.last_updated >= t)
            && until.is_none_or(|t| summary.last_updated < t)
            && self
                .task_id_prefix
                .as_deref()
                .is_none_or(|p| summary.task_id.as_bytes().starts_with(p.as_bytes()))
    }
}

/// How many of a user's tasks are in each status now (or, from an operator's totals, of
/// every user's): kept by the writes themselves, read without counting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Tasks whose highest step is pending.
    pub pending: u64,
    /// Tasks running.
    pub running: u64,
    /// Tasks completed.
    pub completed: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks timed out.
    pub timed_out: u64,
    /// Tasks failed.
    pub failed: u64,
}

impl TaskCounts {
    /// The tasks in `status`.
    pub fn get(&self, status: TaskStatus) -> u64 {
        match status {
            TaskStatus::Pending => self.pending,
            TaskStatus::Running => self.running,
            TaskStatus::Completed => self.completed,
            TaskStatus::Cancelled => self.cancelled,
            TaskStatus::TimedOut => self.timed_out,
            TaskStatus::Failed => self.failed,
        }
    }

    /// The count of `status`, to change.
    pub fn get_mut(&mut self, status: TaskStatus) -> &mut u64 {
        match status {
            TaskStatus::Pending => &mut self.pending,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Cancelled => &mut self.cancelled,
            TaskStatus::TimedOut => &mut self.timed_out,
            TaskStatus::Failed => &mut self.failed,
        }
    }

    /// One task less in `status` (never below zero).
    pub fn decrement(&mut self, status: TaskStatus) {
        let n = self.get_mut(status);
        *n = n.saturating_sub(1);
    }

    /// Every task, whatever its status.
    pub fn total(&self) -> u64 {
        TaskStatus::ALL.iter().map(|&s| self.get(s)).sum()
    }
}

/// Counts tasks by their statuses (what the kept counts must equal for a listing of every
/// task: `tasks.iter().map(|t| t.status).collect()`).
impl FromIterator<TaskStatus> for TaskCounts {
    fn from_iter<I: IntoIterator<Item = TaskStatus>>(statuses: I) -> Self {
        let mut counts = TaskCounts::default();
        for status in statuses {
            *counts.get_mut(status) += 1;
        }
        counts
    }
}

/// One hour of a user's activity ([`TaskHistoryStore::task_activity`]).
///
/// A write is counted in the hour of the task's `last_updated` after it (for a step saved
/// with the store's clock, the hour it was saved). A write that moves a task into a
/// terminal status counts one task in that status's column; `steps` counts the steps a
/// write added to its task (saving a step again adds none).
///
/// [`TaskHistoryStore::task_activity`]: crate::TaskHistoryStore::task_activity
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityHour {
    /// The hour's start, UTC.
    pub hour: DateTime<Utc>,
    /// Steps added to tasks.
    pub steps: u64,
    /// Tasks that reached completed.
    pub completed: u64,
    /// Tasks that reached failed.
    pub failed: u64,
    /// Tasks that reached cancelled.
    pub cancelled: u64,
    /// Tasks that reached timed out.
    pub timed_out: u64,
}

impl ActivityHour {
    /// An hour with nothing in it.
    pub fn empty(hour: DateTime<Utc>) -> Self {
        ActivityHour {
            hour,
            steps: 0,
            completed: 0,
            failed: 0,
            cancelled: 0,
            timed_out: 0,
        }
    }

    /// The column of tasks that reached `status` (`None` for a status that is not terminal).
    pub fn reached_mut(&mut self, status: TaskStatus) -> Option<&mut u64> {
        match status {
            TaskStatus::Completed => Some(&mut self.completed),
            TaskStatus::Failed => Some(&mut self.failed),
            TaskStatus::Cancelled => Some(&mut self.cancelled),
            TaskStatus::TimedOut => Some(&mut self.timed_out),
            TaskStatus::Pending | TaskStatus::Running => None,
        }
    }

    /// Whether nothing happened in it.
    pub fn is_empty(&self) -> bool {
        self.steps == 0
            && self.completed == 0
            && self.failed == 0
            && self.cancelled == 0
            && self.timed_out == 0
    }
}

/// One page of a user's tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPage {
    /// The tasks, newest activity first.
    pub tasks: Vec<TaskSummary>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<TaskCursor>,
}

impl TaskPage {
    /// A page from a listing that fetched one task more than `limit` (to learn whether
    /// another page follows): keeps `limit` tasks, and the cursor after the last one when
    /// there were more.
    pub fn from_overfetch(mut tasks: Vec<TaskSummary>, limit: i64) -> Self {
        let limit = usize::try_from(limit).unwrap_or(0);
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(TaskSummary::cursor)
        } else {
            None
        };
        TaskPage { tasks, next }
    }
}

/// A step's place in a user's history in export order: by `task_id` (byte order), then
/// `step`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StepKey {
    /// The task.
    pub task_id: String,
    /// The step number.
    pub step: i32,
}

/// What [`TaskHistoryStore::scan_history`](crate::TaskHistoryStore) reads: one page of a
/// user's steps in [`StepKey`] order, for exports and backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryScan {
    /// Only this task's steps; `None` reads every task of the user.
    pub task_id: Option<String>,
    /// Continue strictly after this step; `None` starts at the beginning.
    pub after: Option<StepKey>,
    /// How many steps at most, 1 to [`MAX_SCAN_SIZE`](crate::validate::MAX_SCAN_SIZE).
    pub limit: i64,
}

impl HistoryScan {
    /// The first `limit` steps of all the user's tasks.
    pub fn all(limit: i64) -> Self {
        HistoryScan {
            task_id: None,
            after: None,
            limit,
        }
    }

    /// The first `limit` steps of one task.
    pub fn task(task_id: impl Into<String>, limit: i64) -> Self {
        HistoryScan {
            task_id: Some(task_id.into()),
            after: None,
            limit,
        }
    }

    /// The same scan continuing after `key`.
    pub fn after(mut self, key: Option<StepKey>) -> Self {
        self.after = key;
        self
    }

    /// Where the scan resumes inside `task_id`: `Some(step)` to read the steps strictly
    /// after `step` (`-1` from the first), `None` when the whole task lies before the cursor.
    pub fn resume_in(&self, task_id: &str) -> Option<i32> {
        match &self.after {
            Some(a) if a.task_id.as_str() == task_id => Some(a.step),
            Some(a) if a.task_id.as_str() > task_id => None,
            _ => Some(-1),
        }
    }
}

/// One page of a user's steps, as [`StepRecord`]s with their stored timestamps: the lines
/// `taskhistory export` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The steps, in [`StepKey`] order.
    pub steps: Vec<StepRecord>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<StepKey>,
}

impl HistoryPage {
    /// A page from a scan that fetched one step more than `limit`.
    pub fn from_overfetch(mut steps: Vec<StepRecord>, limit: i64) -> Self {
        let limit = usize::try_from(limit).unwrap_or(0);
        let next = if steps.len() > limit {
            steps.truncate(limit);
            steps.last().map(|s| StepKey {
                task_id: s.task_id.clone(),
                step: s.step,
            })
        } else {
            None
        };
        HistoryPage { steps, next }
    }
}

/// What happened to a task, as watchers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventKind {
    /// A step was saved (or saved again).
    StepSaved,
    /// The task was cancelled: the step is the cancellation entry.
    Cancelled,
}

/// A position in a store's log of task events: where a watcher stands, and where it
/// resumes.
///
/// Every [`TaskEvent`] carries the cursor just after itself. Handed back to
/// [`watch_task`](crate::TaskHistoryStore::watch_task) or
/// [`watch_user`](crate::TaskHistoryStore::watch_user), it resumes the watch with the first
/// write the holder has not received: nothing lost, nothing twice. It is an opaque token,
/// printable ASCII without spaces (at most [`EventCursor::MAX_LEN`] bytes), that survives a
/// round trip through text: an SSE `id:` / `Last-Event-ID`, a URL query, a file. A cursor
/// belongs to the store (the database) that made it; another store refuses it as
/// [`InvalidInput`](crate::StoreError::InvalidInput) on field `"cursor"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventCursor(String);

impl EventCursor {
    /// The longest token accepted.
    pub const MAX_LEN: usize = 16 * 1024;

    /// A cursor from its token (as printed by [`Display`](std::fmt::Display) or
    /// [`as_str`](Self::as_str)); refused when it cannot be a token of any store. Whether
    /// it is one of *this* store's is checked when a watch starts.
    pub fn parse(token: &str) -> Result<Self, crate::StoreError> {
        if token.is_empty() || token.len() > Self::MAX_LEN {
            return Err(crate::StoreError::invalid(
                "cursor",
                format!("must be 1 to {} bytes long", Self::MAX_LEN),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::StoreError::invalid(
                "cursor",
                "must be printable ASCII without spaces",
            ));
        }
        Ok(EventCursor(token.to_owned()))
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for EventCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for EventCursor {
    type Err = crate::StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventCursor::parse(s)
    }
}

impl TryFrom<String> for EventCursor {
    type Error = crate::StoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        EventCursor::parse(&s)
    }
}

impl From<EventCursor> for String {
    fn from(c: EventCursor) -> String {
        c.0
    }
}

/// One committed write to a task, from
/// [`TaskHistoryStore::watch_task`](crate::TaskHistoryStore::watch_task) and
/// [`watch_user`](crate::TaskHistoryStore::watch_user): a step saved (or saved again) or a
/// cancellation, with its position in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task's user.
    pub user_id: String,
    /// The task.
    pub task_id: String,
    /// The step saved (for a cancellation, its entry's step).
    pub step: i32,
    /// The step's own status (a save of a lower step than the highest does not change the
    /// task's status).
    pub status: TaskStatus,
    /// The step's timestamp.
    pub timestamp: DateTime<Utc>,
    /// What happened.
    pub kind: TaskEventKind,
    /// The position just after this event: resume a watch from here to receive the
    /// writes after it.
    pub cursor: EventCursor,
}

impl TaskEvent {
    /// The event of a stored step at `cursor`.
    pub fn of_step(
        user_id: &str,
        task_id: &str,
        step: i32,
        status: TaskStatus,
        timestamp: DateTime<Utc>,
        cursor: EventCursor,
    ) -> Self {
        TaskEvent {
            user_id: user_id.to_owned(),
            task_id: task_id.to_owned(),
            step,
            status,
            timestamp,
            kind: if status == TaskStatus::Cancelled {
                TaskEventKind::Cancelled
            } else {
                TaskEventKind::StepSaved
            },
            cursor,
        }
    }
}

/// What [`TaskHistoryStore::cleanup_old_tasks`](crate::TaskHistoryStore) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    /// Whole tasks removed.
    pub tasks_removed: u64,
    /// Steps (history rows) removed with them.
    pub steps_removed: u64,
    /// Whole partitions dropped to remove them (PostgreSQL's partitioned layout; always 0
    /// elsewhere). Their tasks and steps are counted above too.
    #[serde(default)]
    pub partitions_dropped: u64,
}

/// What [`TaskHistoryStore::health_check`](crate::TaskHistoryStore) found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// `"memory"` or `"postgres"`.
    pub backend: &'static str,
    /// Time of one round trip to the backend.
    pub round_trip: Duration,
    /// The server's version, where there is a server.
    pub server_version: Option<String>,
    /// The newest applied schema migration, where there is a schema.
    pub schema_version: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_what_they_name_and_step_error_reads_as_the_python_service_wrote_it() {
        let r = TaskStepResult::running("load", Value::Null, "")
            .with_result(serde_json::json!({"rows": 3}))
            .with_completed(true)
            .with_message("loaded")
            .with_status(TaskStatus::Completed);
        assert_eq!(
            (
                r.result["rows"].as_i64(),
                r.completed,
                r.message.as_str(),
                r.status
            ),
            (Some(3), true, "loaded", TaskStatus::Completed)
        );
        let e = TaskStepResult::step_error(2, "disk full");
        assert_eq!(e.step, "step_2");
        assert_eq!(e.message, "Step 2 execution failed: disk full");
        assert_eq!(
            (e.status, e.error_code, e.error_message.as_deref()),
            (
                TaskStatus::Failed,
                Some(ErrorCode::Execution),
                Some("disk full")
            )
        );
        let timed_out = TaskStepResult::running("s", Value::Null, "")
            .with_error(ErrorCode::Timeout, "slow")
            .with_status(TaskStatus::TimedOut);
        assert_eq!(timed_out.error_code, Some(ErrorCode::Timeout));
    }
}
