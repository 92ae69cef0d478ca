//! [`PgTaskHistoryStore`]: the [`TaskHistoryStore`] on PostgreSQL.

use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::methods::LoadQuery;
use diesel_async::{
    AnsiTransactionManager, AsyncConnectionCore, AsyncPgConnection, SimpleAsyncConnection,
    TransactionManager,
};
use futures::future::BoxFuture;
use taskhistory_core::validate::{self, PreparedStep};
use taskhistory_core::{
    CleanupReport, HealthReport, HistoryEntry, HistoryPage, HistoryScan, StepRecord, StoreError,
    TaskCursor, TaskEvent, TaskEventStream, TaskHistoryStore, TaskPage, TaskQuery, TaskStatus,
    TaskStepResult, TaskSummary,
};
use tracing::Instrument;

use crate::config::PgConfig;
use crate::connection::{build_pool, Connector, LastError, Manager, Pool};
use crate::copy::{self, CopyPool};
use crate::error::from_diesel;
use crate::migrate::{self, MigrationState};
use crate::notify::{Notifier, Sequenced};
use crate::partition::Layout;
use crate::sql::{self, Statement};
use crate::watch::Hub;

/// Rows per statement when a batch is split (inside one transaction).
const CHUNK_ROWS: usize = 10_000;

/// Pool figures, from [`PgTaskHistoryStore::pool_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Connections open.
    pub connections: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Connections lent out.
    pub in_use: u32,
    /// The most connections the pool opens.
    pub max: u32,
    /// Checkouts that had to wait for a connection.
    pub waits: u64,
    /// Checkouts that gave up after the pool timeout.
    pub wait_timeouts: u64,
    /// Connections opened since start.
    pub created: u64,
    /// Connections thrown away as broken.
    pub closed_broken: u64,
}

/// Operation counters, from [`PgTaskHistoryStore::metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreMetrics {
    /// Database attempts made (each retry counts).
    pub queries: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// Retries after transient failures.
    pub retries: u64,
}

/// Options of [`PgTaskHistoryStore::cleanup_old_tasks_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupOptions {
    /// Tasks removed per transaction (default 1,000): small enough that writers never wait
    /// long behind a batch.
    pub batch_size: i64,
    /// Stop after this long, leaving the rest for the next run (default: no limit).
    pub time_limit: Option<Duration>,
    /// Only count what would be removed.
    pub dry_run: bool,
    /// Only tasks whose current status is this one (per-status retention: e.g. keep failed
    /// tasks 90 days and completed ones 30, with two runs). `None`: every status.
    pub status: Option<TaskStatus>,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            batch_size: 1_000,
            time_limit: None,
            dry_run: false,
            status: None,
        }
    }
}

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
}

struct Inner {
    pool: RwLock<Option<Pool>>,
    /// Connections for `COPY` batches (when [`PgConfig::copy_min_rows`] is set).
    copy_pool: RwLock<Option<CopyPool>>,
    config: PgConfig,
    connector: Connector,
    last_error: LastError,
    counters: Counters,
    /// The notification channel of this schema, when saves notify watchers.
    channel: Option<String>,
    /// Sends committed writes' events to the channel (when it is set).
    notifier: Option<Notifier>,
    hub: Hub,
    /// Connections shared by concurrent reads, when pipelining is on.
    shared: Option<SharedReads>,
}

/// The PostgreSQL store: diesel-async over a bb8 pool. Cheap to clone (clones share the pool).
///
/// Every operation is one statement (one round trip), retried on transient errors by the
/// configured [`RetryPolicy`](taskhistory_core::RetryPolicy), bounded by the client command
/// timeout, and traced with a `taskhistory` span (operation, user_id, task_id, rows,
/// elapsed_ms).
#[derive(Clone)]
pub struct PgTaskHistoryStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for PgTaskHistoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTaskHistoryStore")
            .field("config", &self.inner.config)
            .field("pool", &self.pool_stats())
            .finish()
    }
}

/// A checked-out connection that is thrown away, not returned to the pool, if it is dropped
/// while a statement is in flight (command timeout, or the caller dropping the future).
struct Checkout<'s> {
    conn: bb8::PooledConnection<'static, Manager>,
    in_flight: bool,
    connector: &'s Connector,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if self.in_flight {
            // Marks the connection broken so the pool discards it, and asks the server to
            // stop the statement.
            AnsiTransactionManager::transaction_manager_status_mut(&mut *self.conn).set_in_error();
            self.connector.cancel(self.conn.cancel_token());
        }
    }
}

/// Runs `work` inside a transaction that starts with `setup` (behind a transaction pooler).
async fn in_transaction<A: Sync, T>(
    operation: &'static str,
    conn: &mut AsyncPgConnection,
    setup: &str,
    args: &A,
    work: Work<A, T>,
) -> Result<T, StoreError> {
    AnsiTransactionManager::begin_transaction(conn)
        .await
        .map_err(|e| from_diesel(operation, e))?;
    let result = match conn.batch_execute(setup).await {
        Ok(()) => work(conn, args).await,
        Err(e) => Err(from_diesel(operation, e)),
    };
    match result {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn)
                .await
                .map_err(|e| from_diesel(operation, e))?;
            Ok(value)
        }
        Err(e) => {
            let _ = AnsiTransactionManager::rollback_transaction(conn).await;
            Err(e)
        }
    }
}

/// The error of an attempt that did not finish within the command timeout.
fn timed_out(operation: &'static str, timeout: Duration) -> StoreError {
    StoreError::Timeout {
        operation,
        source: format!("no answer within the command timeout of {timeout:?}").into(),
    }
}

/// What one attempt does with its connection.
pub(crate) type Work<A, T> =
    for<'c> fn(&'c mut AsyncPgConnection, &'c A) -> BoxFuture<'c, Result<T, StoreError>>;

/// What one read does on a connection shared by concurrent reads (see [`SharedReads`]).
type SharedWork<A, T> =
    for<'c> fn(&'c mut &'c AsyncPgConnection, &'c A) -> BoxFuture<'c, Result<T, StoreError>>;

/// The reads that may share a connection, as [`SharedWork`].
fn load_history_shared<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    args: &'c (&str, &str),
) -> BoxFuture<'c, Result<Vec<HistoryEntry>, StoreError>> {
    load_history(conn, args)
}

fn task_status_shared<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    args: &'c (&str, &str),
) -> BoxFuture<'c, Result<TaskStatus, StoreError>> {
    task_status(conn, args)
}

fn list_tasks_shared<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    args: &'c (&str, &TaskQuery),
) -> BoxFuture<'c, Result<TaskPage, StoreError>> {
    list_tasks(conn, args)
}

/// Connections shared by concurrent reads (status checks, history loads, task lists):
/// tokio-postgres pipelines the statements of every caller using one, so many small reads
/// cost a few socket writes and wake-ups instead of one each. Opened on first use; a
/// connection that fails or times out is dropped from its slot and replaced by the next
/// read. Off behind a transaction pooler ([`PgConfig::pgbouncer`]) and when
/// [`PgConfig::pipelined_reads`] is 0.
struct SharedReads {
    slots: Vec<tokio::sync::Mutex<Option<Arc<AsyncPgConnection>>>>,
    next: AtomicUsize,
}

/// A step result encoded as JSON, bound as `jsonb`.
#[derive(Debug)]
struct JsonOf(Vec<u8>);

impl JsonOf {
    fn new(operation: &'static str, value: &TaskStepResult) -> Result<Self, StoreError> {
        serde_json::to_vec(value)
            .map(JsonOf)
            .map_err(|e| StoreError::database(operation, e))
    }
}

impl ToSql<Jsonb, Pg> for JsonOf {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(&[1])?;
        out.write_all(&self.0)?;
        Ok(IsNull::No)
    }
}

/// A step result read from `jsonb`.
pub(crate) struct Stored(pub(crate) TaskStepResult);

impl FromSql<Jsonb, Pg> for Stored {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let bytes = value.as_bytes();
        match bytes.split_first() {
            Some((1, json)) => {
                Ok(Stored(serde_json::from_slice(json).map_err(|e| {
                    format!("task_history.result is not a step result: {e}")
                })?))
            }
            _ => Err("task_history.result: unsupported jsonb encoding".into()),
        }
    }
}

/// A status read from a `text` column.
pub(crate) struct Status(pub(crate) TaskStatus);

impl FromSql<Text, Pg> for Status {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = std::str::from_utf8(value.as_bytes())?;
        Ok(Status(
            text.parse().map_err(|e| format!("status column: {e}"))?,
        ))
    }
}

#[derive(QueryableByName)]
struct SaveOutcome {
    #[diesel(sql_type = Nullable<Text>)]
    refused_user: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    refused_task: Option<String>,
    #[diesel(sql_type = BigInt)]
    rows_written: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Timestamptz)]
    saved_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct HistoryRow {
    #[diesel(sql_type = Integer)]
    step: i32,
    #[diesel(sql_type = Jsonb)]
    result: Stored,
    #[diesel(sql_type = Timestamptz)]
    timestamp: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    status: Status,
}

#[derive(QueryableByName)]
struct ScanRow {
    #[diesel(sql_type = Text)]
    task_id: String,
    #[diesel(sql_type = Integer)]
    step: i32,
    #[diesel(sql_type = Jsonb)]
    result: Stored,
    #[diesel(sql_type = Timestamptz)]
    timestamp: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    status: Status,
}

#[derive(QueryableByName)]
struct CancelRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Integer)]
    step: i32,
    #[diesel(sql_type = Timestamptz)]
    timestamp: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct SummaryRow {
    #[diesel(sql_type = Text)]
    task_id: String,
    #[diesel(sql_type = Text)]
    status: Status,
    #[diesel(sql_type = Integer)]
    last_step: i32,
    #[diesel(sql_type = BigInt)]
    step_count: i64,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
}

/// What a retention statement removed (cleanup batches, previews, partition drops).
#[derive(QueryableByName)]
pub(crate) struct CleanupRow {
    #[diesel(sql_type = BigInt)]
    tasks_removed: i64,
    #[diesel(sql_type = BigInt)]
    steps_removed: i64,
}

#[derive(QueryableByName)]
struct HealthRow {
    #[diesel(sql_type = Text)]
    server_version: String,
    #[diesel(sql_type = Bool)]
    migrated: bool,
}

#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Nullable<Text>)]
    version: Option<String>,
}

/// What one save statement did: refused a cancelled task, or saved (with what watchers'
/// events need: the statement's `seq` and `now()`).
enum Chunk {
    Refused(String, String),
    Saved(Saved),
}

/// A saved chunk: its length, `seq` and the time of steps saved without one.
#[derive(Clone, Copy)]
struct Saved {
    len: usize,
    seq: i64,
    at: DateTime<Utc>,
}

/// Saves one chunk.
async fn save_chunk(
    conn: &mut AsyncPgConnection,
    steps: &[PreparedStep<'_>],
) -> Result<Chunk, StoreError> {
    let op = "save_task_history";
    let statement = match steps {
        // One step: the scalar statement (its generic plan is cached; see sql::SAVE_STEP).
        [p] => Statement::new(sql::SAVE_STEP)
            .bind::<Text, _>(p.user_id.to_owned())
            .bind::<Text, _>(p.task_id.to_owned())
            .bind::<Integer, _>(p.step)
            .bind::<Jsonb, _>(JsonOf::new(op, p.result)?)
            .bind::<Nullable<Timestamptz>, _>(p.timestamp)
            .bind::<Text, _>(p.result.status.as_str()),
        _ => {
            let users: Vec<String> = steps.iter().map(|p| p.user_id.to_owned()).collect();
            let tasks: Vec<String> = steps.iter().map(|p| p.task_id.to_owned()).collect();
            let numbers: Vec<i32> = steps.iter().map(|p| p.step).collect();
            let results = steps
                .iter()
                .map(|p| JsonOf::new(op, p.result))
                .collect::<Result<Vec<_>, _>>()?;
            let times: Vec<Option<DateTime<Utc>>> = steps.iter().map(|p| p.timestamp).collect();
            let statuses: Vec<&'static str> =
                steps.iter().map(|p| p.result.status.as_str()).collect();
            Statement::new(sql::SAVE_STEPS)
                .bind::<Array<Text>, _>(users)
                .bind::<Array<Text>, _>(tasks)
                .bind::<Array<Integer>, _>(numbers)
                .bind::<Array<Jsonb>, _>(results)
                .bind::<Array<Nullable<Timestamptz>>, _>(times)
                .bind::<Array<Text>, _>(statuses)
        }
    };
    let rows: Vec<SaveOutcome> = statement
        .fetch(conn)
        .await
        .map_err(|e| from_diesel(op, e))?;
    match rows.into_iter().next() {
        Some(SaveOutcome {
            refused_user: Some(u),
            refused_task: Some(t),
            ..
        }) => Ok(Chunk::Refused(u, t)),
        Some(SaveOutcome {
            rows_written,
            seq,
            saved_at,
            ..
        }) => {
            tracing::Span::current().record("rows", rows_written);
            Ok(Chunk::Saved(Saved {
                len: steps.len(),
                seq: seq.unwrap_or(0),
                at: saved_at,
            }))
        }
        None => Err(StoreError::database(
            op,
            "the save statement returned no row",
        )),
    }
}

/// Saves steps in one statement, or in chunks inside one transaction; returns each chunk's
/// figures for the watchers' events.
fn save_steps<'c, 'a>(
    conn: &'c mut AsyncPgConnection,
    steps: &'c &'a [PreparedStep<'a>],
) -> BoxFuture<'c, Result<Vec<Saved>, StoreError>> {
    Box::pin(async move {
        let op = "save_batch_task_history";
        let refused = if steps.len() <= CHUNK_ROWS {
            match save_chunk(conn, steps).await? {
                Chunk::Saved(saved) => return Ok(vec![saved]),
                Chunk::Refused(u, t) => (u, t),
            }
        } else {
            AnsiTransactionManager::begin_transaction(conn)
                .await
                .map_err(|e| from_diesel(op, e))?;
            let mut saved = Vec::new();
            let mut refused = None;
            for chunk in steps.chunks(CHUNK_ROWS) {
                match save_chunk(conn, chunk).await {
                    Ok(Chunk::Saved(s)) => saved.push(s),
                    Ok(Chunk::Refused(u, t)) => {
                        refused = Some((u, t));
                        break;
                    }
                    Err(e) => {
                        let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                        return Err(e);
                    }
                }
            }
            match refused {
                Some(r) => {
                    AnsiTransactionManager::rollback_transaction(conn)
                        .await
                        .map_err(|e| from_diesel(op, e))?;
                    r
                }
                None => {
                    AnsiTransactionManager::commit_transaction(conn)
                        .await
                        .map_err(|e| from_diesel(op, e))?;
                    return Ok(saved);
                }
            }
        };
        let (user_id, task_id) = refused;
        Err(StoreError::TaskCancelled { user_id, task_id })
    })
}

/// The watchers' events of saved steps, chunk by chunk.
fn step_events(steps: &[PreparedStep<'_>], saved: &[Saved]) -> Vec<Sequenced> {
    let mut out = Vec::with_capacity(steps.len());
    let mut rest = steps;
    for chunk in saved {
        let (these, more) = rest.split_at(chunk.len.min(rest.len()));
        rest = more;
        out.extend(these.iter().map(|p| {
            let at = p.timestamp.unwrap_or(chunk.at);
            let event = TaskEvent::of_step(p.user_id, p.task_id, p.step, p.result.status, at);
            (chunk.seq, event)
        }));
    }
    out
}

fn load_history<'c, C>(
    conn: &'c mut C,
    (user_id, task_id): &'c (&str, &str),
) -> BoxFuture<'c, Result<Vec<HistoryEntry>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, HistoryRow>,
{
    Box::pin(async move {
        let rows: Vec<HistoryRow> = Statement::new(sql::LOAD_HISTORY)
            .bind::<Text, _>(user_id.to_string())
            .bind::<Text, _>(task_id.to_string())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("load_task_history", e))?;
        tracing::Span::current().record("rows", rows.len());
        Ok(rows
            .into_iter()
            .map(|r| HistoryEntry {
                step: r.step,
                result: r.result.0,
                timestamp: r.timestamp,
                status: r.status.0,
            })
            .collect())
    })
}

fn scan_history<'c>(
    conn: &'c mut AsyncPgConnection,
    (user_id, scan): &'c (&str, &HistoryScan),
) -> BoxFuture<'c, Result<HistoryPage, StoreError>> {
    Box::pin(async move {
        let fetch = scan.limit + 1;
        let statement = match &scan.task_id {
            Some(task_id) => match scan.resume_in(task_id) {
                Some(after) => Statement::new(sql::SCAN_TASK_HISTORY)
                    .bind::<Text, _>(user_id.to_string())
                    .bind::<Text, _>(task_id.clone())
                    .bind::<Integer, _>(after)
                    .bind::<BigInt, _>(fetch),
                None => return Ok(HistoryPage::from_overfetch(Vec::new(), scan.limit)),
            },
            None => {
                let (task_id, step) = scan
                    .after
                    .as_ref()
                    .map_or((String::new(), -1), |a| (a.task_id.clone(), a.step));
                Statement::new(sql::SCAN_HISTORY)
                    .bind::<Text, _>(user_id.to_string())
                    .bind::<Text, _>(task_id)
                    .bind::<Integer, _>(step)
                    .bind::<BigInt, _>(fetch)
            }
        };
        let rows: Vec<ScanRow> = statement
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("scan_history", e))?;
        tracing::Span::current().record("rows", rows.len());
        let steps = rows
            .into_iter()
            .map(|r| StepRecord::new(*user_id, r.task_id, r.step, r.result.0).at(r.timestamp))
            .collect();
        Ok(HistoryPage::from_overfetch(steps, scan.limit))
    })
}

fn task_status<'c, C>(
    conn: &'c mut C,
    (user_id, task_id): &'c (&str, &str),
) -> BoxFuture<'c, Result<TaskStatus, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, StatusRow>,
{
    Box::pin(async move {
        let rows: Vec<StatusRow> = Statement::new(sql::TASK_STATUS)
            .bind::<Text, _>(user_id.to_string())
            .bind::<Text, _>(task_id.to_string())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("check_task_status", e))?;
        Ok(rows
            .into_iter()
            .next()
            .map_or(TaskStatus::Pending, |r| r.status.0))
    })
}

fn cancel_task<'c>(
    conn: &'c mut AsyncPgConnection,
    (user_id, task_id): &'c (&str, &str),
) -> BoxFuture<'c, Result<Option<CancelRow>, StoreError>> {
    Box::pin(async move {
        let entry = TaskStepResult::cancellation();
        let rows: Vec<CancelRow> = Statement::new(sql::CANCEL_TASK)
            .bind::<Text, _>(user_id.to_string())
            .bind::<Text, _>(task_id.to_string())
            .bind::<Jsonb, _>(JsonOf::new("mark_task_as_cancelled", &entry)?)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("mark_task_as_cancelled", e))?;
        Ok(rows.into_iter().next())
    })
}

fn list_tasks<'c, C>(
    conn: &'c mut C,
    (user_id, query): &'c (&str, &TaskQuery),
) -> BoxFuture<'c, Result<TaskPage, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, SummaryRow>,
{
    Box::pin(async move {
        let fetch = query.limit + 1;
        let statement = match (&query.status, &query.after) {
            (None, None) => Statement::new(sql::LIST_TASKS)
                .bind::<Text, _>(user_id.to_string())
                .bind::<BigInt, _>(fetch),
            (
                None,
                Some(TaskCursor {
                    last_updated,
                    task_id,
                }),
            ) => Statement::new(sql::LIST_TASKS_AFTER)
                .bind::<Text, _>(user_id.to_string())
                .bind::<Timestamptz, _>(*last_updated)
                .bind::<Text, _>(task_id.clone())
                .bind::<BigInt, _>(fetch),
            (Some(status), None) => Statement::new(sql::LIST_TASKS_WITH_STATUS)
                .bind::<Text, _>(user_id.to_string())
                .bind::<Text, _>(status.as_str())
                .bind::<BigInt, _>(fetch),
            (
                Some(status),
                Some(TaskCursor {
                    last_updated,
                    task_id,
                }),
            ) => Statement::new(sql::LIST_TASKS_WITH_STATUS_AFTER)
                .bind::<Text, _>(user_id.to_string())
                .bind::<Text, _>(status.as_str())
                .bind::<Timestamptz, _>(*last_updated)
                .bind::<Text, _>(task_id.clone())
                .bind::<BigInt, _>(fetch),
        };
        let rows: Vec<SummaryRow> = statement
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("get_user_tasks", e))?;
        tracing::Span::current().record("rows", rows.len());
        let tasks: Vec<TaskSummary> = rows
            .into_iter()
            .map(|r| TaskSummary {
                task_id: r.task_id,
                status: r.status.0,
                last_step: r.last_step,
                step_count: r.step_count,
                created_at: r.created_at,
                last_updated: r.updated_at,
            })
            .collect();
        Ok(TaskPage::from_overfetch(tasks, query.limit))
    })
}

fn cleanup_batch<'c>(
    conn: &'c mut AsyncPgConnection,
    (days, limit, status): &'c (i32, i64, Option<TaskStatus>),
) -> BoxFuture<'c, Result<CleanupReport, StoreError>> {
    Box::pin(async move {
        let rows: Vec<CleanupRow> = Statement::new(sql::CLEANUP_BATCH)
            .bind::<Integer, _>(*days)
            .bind::<Nullable<Text>, _>(status.map(TaskStatus::as_str))
            .bind::<BigInt, _>(*limit)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("cleanup_old_tasks", e))?;
        Ok(report(rows))
    })
}

fn cleanup_preview<'c>(
    conn: &'c mut AsyncPgConnection,
    (days, status): &'c (i32, Option<TaskStatus>),
) -> BoxFuture<'c, Result<CleanupReport, StoreError>> {
    Box::pin(async move {
        let rows: Vec<CleanupRow> = Statement::new(sql::CLEANUP_PREVIEW)
            .bind::<Integer, _>(*days)
            .bind::<Nullable<Text>, _>(status.map(TaskStatus::as_str))
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("cleanup_old_tasks", e))?;
        Ok(report(rows))
    })
}

pub(crate) fn report(rows: Vec<CleanupRow>) -> CleanupReport {
    rows.into_iter()
        .next()
        .map_or_else(CleanupReport::default, |r| CleanupReport {
            tasks_removed: u64::try_from(r.tasks_removed).unwrap_or(0),
            steps_removed: u64::try_from(r.steps_removed).unwrap_or(0),
            partitions_dropped: 0,
        })
}

fn health<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<(String, Option<String>), StoreError>> {
    Box::pin(async move {
        let op = "health_check";
        let rows: Vec<HealthRow> = Statement::new(sql::HEALTH)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(op, e))?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::database(op, "no row"))?;
        let version = if row.migrated {
            let v: Vec<VersionRow> = Statement::new(sql::SCHEMA_VERSION)
                .fetch(conn)
                .await
                .map_err(|e| from_diesel(op, e))?;
            v.into_iter().next().and_then(|r| r.version)
        } else {
            None
        };
        Ok((row.server_version, version))
    })
}

impl PgTaskHistoryStore {
    /// Connects with `config`. One connection is opened at once, so a wrong password, an
    /// unknown database or an unreachable server fails here with the server's own reason;
    /// the pool then fills to `min_size` in the background. Does not migrate: call
    /// [`init_database_schema`](TaskHistoryStore::init_database_schema).
    pub async fn connect(config: PgConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        let first = connector.connect().await?;
        let channel = config.notifications.then(|| {
            format!(
                "taskhistory_{}",
                config.schema.as_deref().unwrap_or("public")
            )
        });
        let last_error = LastError::default();
        let pool = build_pool(&config, &connector, &last_error);
        let notifier = channel.clone().map(|c| Notifier::new(connector.clone(), c));
        let copy_pool = config
            .copy_min_rows
            .map(|_| copy::build_copy_pool(&config, &connector));
        let shared = (config.pipelined_reads > 0 && !config.pgbouncer).then(|| SharedReads {
            slots: (0..config.pipelined_reads)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        });
        // The pool may already be full if min_size connections raced us; that is fine.
        let _ = pool.add(first);
        Ok(PgTaskHistoryStore {
            inner: Arc::new(Inner {
                pool: RwLock::new(Some(pool)),
                copy_pool: RwLock::new(copy_pool),
                config,
                connector,
                last_error,
                counters: Counters::default(),
                notifier,
                channel,
                hub: Hub::default(),
                shared,
            }),
        })
    }

    /// [`connect`](Self::connect) with [`PgConfig::from_env`].
    pub async fn from_env() -> Result<Self, StoreError> {
        Self::connect(PgConfig::from_env()?).await
    }

    /// The configuration in use (its `Debug` hides the password).
    pub fn config(&self) -> &PgConfig {
        &self.inner.config
    }

    /// Pool figures.
    pub fn pool_stats(&self) -> PoolStats {
        let max = self.inner.config.max_size;
        match self.pool() {
            Ok(pool) => {
                let s = pool.state();
                PoolStats {
                    connections: s.connections,
                    idle: s.idle_connections,
                    in_use: s.connections.saturating_sub(s.idle_connections),
                    max,
                    waits: s.statistics.get_waited,
                    wait_timeouts: s.statistics.get_timed_out,
                    created: s.statistics.connections_created,
                    closed_broken: s.statistics.connections_closed_broken,
                }
            }
            Err(_) => PoolStats {
                connections: 0,
                idle: 0,
                in_use: 0,
                max,
                waits: 0,
                wait_timeouts: 0,
                created: 0,
                closed_broken: 0,
            },
        }
    }

    /// Operation counters since start.
    pub fn metrics(&self) -> StoreMetrics {
        let c = &self.inner.counters;
        StoreMetrics {
            queries: c.queries.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    /// The embedded migrations and which are applied.
    pub async fn migration_status(&self) -> Result<Vec<MigrationState>, StoreError> {
        self.pool()?;
        migrate::status(&self.inner.connector, self.inner.config.schema.as_deref()).await
    }

    /// [`cleanup_old_tasks`](TaskHistoryStore::cleanup_old_tasks) with a batch size, a time
    /// limit, a dry run, and `progress` called with the running total after each batch.
    pub async fn cleanup_old_tasks_with(
        &self,
        days_old: i64,
        options: CleanupOptions,
        progress: &(dyn Fn(CleanupReport) + Send + Sync),
    ) -> Result<CleanupReport, StoreError> {
        validate::days(days_old)?;
        if !(1..=100_000).contains(&options.batch_size) {
            return Err(StoreError::invalid(
                "batch_size",
                format!("is {}; it must be between 1 and 100000", options.batch_size),
            ));
        }
        let days =
            i32::try_from(days_old).map_err(|_| StoreError::invalid("days_old", "too large"))?;
        if options.dry_run {
            return self
                .run(
                    "cleanup_old_tasks",
                    None,
                    None,
                    &(days, options.status),
                    cleanup_preview,
                )
                .await;
        }
        let started = Instant::now();
        let deadline = options.time_limit.map(|limit| started + limit);
        // Partitioned layout: whole expired partitions go first, then batched deletes take
        // the expired tasks left (in the default partition, or in partitions that keep an
        // active task).
        let mut total = self
            .drop_expired_partitions(days, options.status, deadline, progress)
            .await?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(total);
        }
        loop {
            let batch = self
                .run(
                    "cleanup_old_tasks",
                    None,
                    None,
                    &(days, options.batch_size, options.status),
                    cleanup_batch,
                )
                .await?;
            total.tasks_removed += batch.tasks_removed;
            total.steps_removed += batch.steps_removed;
            progress(total);
            let out_of_time = options
                .time_limit
                .is_some_and(|limit| started.elapsed() >= limit);
            if batch.tasks_removed < u64::try_from(options.batch_size).unwrap_or(0) || out_of_time {
                return Ok(total);
            }
        }
    }

    /// What a watch needs: the hub, the connector and the channel; an error saying why when
    /// watching cannot work with this configuration.
    pub(crate) fn watch_parts(&self) -> Result<(&Hub, &Connector, String), StoreError> {
        self.pool()?;
        let Some(channel) = &self.inner.channel else {
            return Err(StoreError::invalid(
                "DB_NOTIFY",
                "watching needs notifications: saves do not notify with DB_NOTIFY=false",
            ));
        };
        if !self.inner.connector.can_listen() {
            return Err(StoreError::invalid(
                "DB_LISTEN_URL",
                "LISTEN cannot work through PgBouncer in transaction mode: give the watchers a \
                 direct URL (DB_LISTEN_URL or PgConfig::listen_url)",
            ));
        }
        Ok((&self.inner.hub, &self.inner.connector, channel.clone()))
    }

    /// Hands committed writes' events to the notifier (nothing when notifications are off).
    fn notify(&self, events: Vec<Sequenced>) {
        if let Some(notifier) = &self.inner.notifier {
            notifier.post(events);
        }
    }

    fn notify_steps(&self, steps: &[PreparedStep<'_>], saved: &[Saved]) {
        if self.inner.notifier.is_some() {
            self.notify(step_events(steps, saved));
        }
    }

    /// Opens connections (dedicated ones for DDL and LISTEN).
    pub(crate) fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    fn pool(&self) -> Result<Pool, StoreError> {
        let guard = self.inner.pool.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or(StoreError::Closed)
    }

    async fn checkout(&self, operation: &'static str) -> Result<Checkout<'_>, StoreError> {
        let pool = self.pool()?;
        match pool.get_owned().await {
            Ok(conn) => Ok(Checkout {
                conn,
                in_flight: false,
                connector: &self.inner.connector,
            }),
            Err(bb8::RunError::User(e)) => Err(StoreError::Unavailable {
                operation,
                source: e.to_string().into(),
            }),
            Err(bb8::RunError::TimedOut) => {
                let s = pool.state();
                let mut msg = format!(
                    "no connection free within {:?} ({} open, {} idle, max {})",
                    self.inner.config.pool_timeout,
                    s.connections,
                    s.idle_connections,
                    self.inner.config.max_size
                );
                if let Some(last) = self.inner.last_error.get() {
                    msg.push_str(&format!("; last connection error: {last}"));
                }
                Err(StoreError::Unavailable {
                    operation,
                    source: msg.into(),
                })
            }
        }
    }

    /// One attempt: check out, run under the command timeout, discard the connection if
    /// the statement did not finish.
    async fn attempt<A: Sync, T>(
        &self,
        operation: &'static str,
        args: &A,
        work: Work<A, T>,
    ) -> Result<T, StoreError> {
        let mut checkout = self.checkout(operation).await?;
        self.inner.counters.queries.fetch_add(1, Ordering::Relaxed);
        checkout.in_flight = true;
        let timeout = self.inner.config.command_timeout;
        let conn = &mut *checkout.conn;
        let setup = self.inner.connector.transaction_setup();
        let outcome = tokio::time::timeout(timeout, async move {
            match setup {
                None => work(conn, args).await,
                Some(setup) => in_transaction(operation, conn, setup, args, work).await,
            }
        })
        .await;
        let result = match outcome {
            Ok(result) => {
                checkout.in_flight = false;
                result
            }
            Err(_) => Err(timed_out(operation, timeout)),
        };
        if result.is_err() {
            self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// A batch by `COPY` (see [`copy`]) when it is large enough and every task it touches
    /// is new; `None` when it is not, or `COPY` batches are off: then nothing was written.
    async fn copy_new_tasks(
        &self,
        steps: &[PreparedStep<'_>],
    ) -> Result<Option<copy::Copied>, StoreError> {
        let large = self
            .inner
            .config
            .copy_min_rows
            .is_some_and(|min| steps.len() >= usize::try_from(min).unwrap_or(usize::MAX));
        if !large {
            return Ok(None);
        }
        let op = "save_batch_task_history";
        self.retried(op, None, None, || self.attempt_copy(steps))
            .await
    }

    /// One attempt of [`copy_new_tasks`](Self::copy_new_tasks), under the command timeout.
    async fn attempt_copy(
        &self,
        steps: &[PreparedStep<'_>],
    ) -> Result<Option<copy::Copied>, StoreError> {
        let op = "save_batch_task_history";
        let pool = self
            .inner
            .copy_pool
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Closed)?;
        let mut conn = match pool.get().await {
            Ok(conn) => conn,
            Err(bb8::RunError::User(e)) => return Err(e),
            Err(bb8::RunError::TimedOut) => {
                return Err(StoreError::Unavailable {
                    operation: op,
                    source: format!(
                        "no COPY connection free within {:?} (max {})",
                        self.inner.config.pool_timeout, self.inner.config.copy_connections
                    )
                    .into(),
                })
            }
        };
        // On timeout the connection is left unclean, so the pool discards it (closing it
        // ends the transaction on the server).
        let connector = &self.inner.connector;
        self.bounded(op, copy::save_new_tasks(&mut conn, connector, steps))
            .await
    }

    /// Runs one attempt's database work under the command timeout, counting it.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.inner.counters.queries.fetch_add(1, Ordering::Relaxed);
        let timeout = self.inner.config.command_timeout;
        let result = tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(timed_out(operation, timeout)));
        if result.is_err() {
            self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// A read: on a connection shared by concurrent reads when pipelining is on (else as
    /// [`run`](Self::run)), with the same retries, timeout and span.
    async fn read<A: Sync, T>(
        &self,
        operation: &'static str,
        user_id: Option<&str>,
        task_id: Option<&str>,
        args: &A,
        work: Work<A, T>,
        shared_work: SharedWork<A, T>,
    ) -> Result<T, StoreError> {
        match &self.inner.shared {
            Some(shared) => {
                self.retried(operation, user_id, task_id, || {
                    self.attempt_shared(shared, operation, args, shared_work)
                })
                .await
            }
            None => self.run(operation, user_id, task_id, args, work).await,
        }
    }

    /// One attempt of a read on a shared connection (opened if its slot is empty). A
    /// connection that fails with a connection error or does not answer in time leaves its
    /// slot; reads still running on it finish or fail on their own.
    async fn attempt_shared<A: Sync, T>(
        &self,
        shared: &SharedReads,
        operation: &'static str,
        args: &A,
        work: SharedWork<A, T>,
    ) -> Result<T, StoreError> {
        self.pool()?;
        let n = shared.slots.len().max(1);
        let slot = shared.next.fetch_add(1, Ordering::Relaxed) % n;
        let Some(slot) = shared.slots.get(slot) else {
            return Err(StoreError::Closed);
        };
        let conn = {
            let mut held = slot.lock().await;
            match &*held {
                Some(conn) => Arc::clone(conn),
                None => {
                    let conn = Arc::new(self.inner.connector.connect().await?);
                    *held = Some(Arc::clone(&conn));
                    conn
                }
            }
        };
        let result = self
            .bounded(operation, async {
                let mut conn: &AsyncPgConnection = &conn;
                work(&mut conn, args).await
            })
            .await;
        if let Err(error) = &result {
            if matches!(
                error,
                StoreError::Unavailable { .. } | StoreError::Timeout { .. }
            ) {
                let mut held = slot.lock().await;
                if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                    *held = None;
                }
            }
        }
        result
    }

    /// Runs `work` with retries, in a tracing span.
    pub(crate) async fn run<A: Sync, T>(
        &self,
        operation: &'static str,
        user_id: Option<&str>,
        task_id: Option<&str>,
        args: &A,
        work: Work<A, T>,
    ) -> Result<T, StoreError> {
        self.retried(operation, user_id, task_id, || {
            self.attempt(operation, args, work)
        })
        .await
    }

    /// Runs `attempt` until it succeeds or fails for good (the retry policy), in a tracing
    /// span.
    async fn retried<T, F, Fut>(
        &self,
        operation: &'static str,
        user_id: Option<&str>,
        task_id: Option<&str>,
        attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let span = tracing::info_span!(
            "taskhistory",
            operation,
            user_id = user_id.unwrap_or(""),
            task_id = task_id.unwrap_or(""),
            rows = tracing::field::Empty,
            elapsed_ms = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = self
            .inner
            .config
            .retry
            .run(
                attempt,
                |error, retry, wait| {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retry, wait_ms = wait.as_millis() as u64, "retrying after a transient error");
                },
            )
            .instrument(span.clone())
            .await;
        span.record("elapsed_ms", started.elapsed().as_secs_f64() * 1e3);
        if let Err(error) = &result {
            span.in_scope(|| tracing::debug!(%error, "operation failed"));
        }
        result
    }
}

#[async_trait]
impl TaskHistoryStore for PgTaskHistoryStore {
    async fn init_database_schema(&self) -> Result<(), StoreError> {
        self.pool()?;
        let applied =
            migrate::run(&self.inner.connector, self.inner.config.schema.as_deref()).await?;
        tracing::info!(applied, "taskhistory schema is up to date");
        let wanted = self.inner.config.partitioning;
        if let Some(partitioning) = wanted {
            self.convert_to_partitioned(partitioning).await?;
        }
        if matches!(self.layout().await?, Layout::Partitioned { .. }) {
            let ahead = wanted.unwrap_or_default().ahead;
            // A role without DDL rights cannot make partitions; writes still land (in the
            // default partition), so the store starts and says why.
            if let Err(error) = self.ensure_partitions(ahead).await {
                tracing::warn!(%error, "could not make partitions ahead; writes go to the default partition until `taskhistory partitions ensure` runs");
            }
        }
        Ok(())
    }

    async fn save_task_history(
        &self,
        user_id: &str,
        task_id: &str,
        step: i32,
        step_result: &TaskStepResult,
    ) -> Result<(), StoreError> {
        let steps = [validate::prepare_save(user_id, task_id, step, step_result)?];
        let saved = self
            .run(
                "save_task_history",
                Some(user_id),
                Some(task_id),
                &&steps[..],
                save_steps,
            )
            .await?;
        self.notify_steps(&steps, &saved);
        Ok(())
    }

    async fn save_batch_task_history(&self, records: &[StepRecord]) -> Result<(), StoreError> {
        let steps = validate::prepare_batch(records)?;
        if steps.is_empty() {
            return self.pool().map(drop);
        }
        if let Some(copied) = self.copy_new_tasks(&steps).await? {
            let saved = Saved {
                len: steps.len(),
                seq: copied.seq,
                at: copied.at,
            };
            self.notify_steps(&steps, &[saved]);
            return Ok(());
        }
        let saved = self
            .run(
                "save_batch_task_history",
                None,
                None,
                &&steps[..],
                save_steps,
            )
            .await?;
        self.notify_steps(&steps, &saved);
        Ok(())
    }

    async fn load_task_history(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        validate::task(user_id, task_id)?;
        self.read(
            "load_task_history",
            Some(user_id),
            Some(task_id),
            &(user_id, task_id),
            load_history,
            load_history_shared,
        )
        .await
    }

    async fn mark_task_as_cancelled(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<bool, StoreError> {
        validate::task(user_id, task_id)?;
        let entry = self
            .run(
                "mark_task_as_cancelled",
                Some(user_id),
                Some(task_id),
                &(user_id, task_id),
                cancel_task,
            )
            .await?;
        Ok(match entry {
            Some(e) => {
                let event = TaskEvent::of_step(
                    user_id,
                    task_id,
                    e.step,
                    TaskStatus::Cancelled,
                    e.timestamp,
                );
                self.notify(vec![(e.seq, event)]);
                true
            }
            None => false,
        })
    }

    async fn check_task_status(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskStatus, StoreError> {
        validate::task(user_id, task_id)?;
        self.read(
            "check_task_status",
            Some(user_id),
            Some(task_id),
            &(user_id, task_id),
            task_status,
            task_status_shared,
        )
        .await
    }

    async fn get_user_tasks_page(
        &self,
        user_id: &str,
        query: &TaskQuery,
    ) -> Result<TaskPage, StoreError> {
        validate::user_id(user_id)?;
        validate::query(query)?;
        self.read(
            "get_user_tasks",
            Some(user_id),
            None,
            &(user_id, query),
            list_tasks,
            list_tasks_shared,
        )
        .await
    }

    async fn scan_history(
        &self,
        user_id: &str,
        scan: &HistoryScan,
    ) -> Result<HistoryPage, StoreError> {
        validate::scan(user_id, scan)?;
        self.run(
            "scan_history",
            Some(user_id),
            scan.task_id.as_deref(),
            &(user_id, scan),
            scan_history,
        )
        .await
    }

    async fn watch_task(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskEventStream, StoreError> {
        validate::task(user_id, task_id)?;
        self.start_watch(user_id, Some(task_id)).await
    }

    async fn watch_user(&self, user_id: &str) -> Result<TaskEventStream, StoreError> {
        validate::user_id(user_id)?;
        self.start_watch(user_id, None).await
    }

    async fn cleanup_old_tasks(&self, days_old: i64) -> Result<CleanupReport, StoreError> {
        self.cleanup_old_tasks_with(days_old, CleanupOptions::default(), &|_| {})
            .await
    }

    async fn health_check(&self) -> Result<HealthReport, StoreError> {
        let started = Instant::now();
        let (server_version, schema_version) =
            self.run("health_check", None, None, &(), health).await?;
        Ok(HealthReport {
            backend: "postgres",
            round_trip: started.elapsed(),
            server_version: Some(server_version),
            schema_version,
        })
    }

    async fn close(&self) {
        if let Some(notifier) = &self.inner.notifier {
            notifier.stop().await;
        }
        self.inner.hub.stop().await;
        let pool = self
            .inner
            .pool
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(pool);
        let copy_pool = self
            .inner
            .copy_pool
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(copy_pool);
        if let Some(shared) = &self.inner.shared {
            for slot in &shared.slots {
                slot.lock().await.take();
            }
        }
    }
}
