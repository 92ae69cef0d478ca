//! `task_counts` ([`TASK_COUNTS`](crate::sql::TASK_COUNTS)), `task_activity`
//! ([`TASK_ACTIVITY`](crate::sql::TASK_ACTIVITY)), the operators' totals
//! ([`TASK_TOTALS`](crate::sql::TASK_TOTALS)) and retention's trim of old activity
//! ([`ACTIVITY_TRIM`](crate::sql::ACTIVITY_TRIM)), and the operators' recent failures
//! ([`RECENT_FAILURES`](crate::sql::RECENT_FAILURES), a partial index of migration 7). The
//! counts are kept by the triggers of migration 6; these statements only sum a bounded
//! number of rows.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Integer, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnectionCore, AsyncPgConnection};
use futures::future::BoxFuture;
use taskhistory_core::{ActivityHour, StoreError, TaskCounts, TaskSummary};

use super::rows::Status;
use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operations' names.
pub(crate) const COUNTS: &str = "task_counts";
/// See [`COUNTS`].
pub(crate) const ACTIVITY: &str = "task_activity";
/// See [`COUNTS`].
pub(crate) const TOTALS: &str = "task_totals";

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = Text)]
    status: Status,
    #[diesel(sql_type = BigInt)]
    tasks: i64,
}

fn counts_of(rows: Vec<CountRow>, op: &'static str) -> Result<TaskCounts, StoreError> {
    let mut counts = TaskCounts::default();
    for row in rows {
        *counts.get_mut(row.status.0) = u64::try_from(row.tasks).map_err(|_| {
            StoreError::database(op, format!("a negative count of {}", row.status.0))
        })?;
    }
    Ok(counts)
}

/// Whose counts.
pub(crate) struct Of<'a> {
    pub(crate) user_id: &'a str,
}

/// A user's tasks per status.
pub(crate) fn counts<'c, 'a>(
    conn: &'c mut &'c AsyncPgConnection,
    of: &'c Of<'a>,
) -> BoxFuture<'c, Result<TaskCounts, StoreError>> {
    counts_on(conn, of.user_id)
}

fn counts_on<'c, C>(
    conn: &'c mut C,
    user_id: &'c str,
) -> BoxFuture<'c, Result<TaskCounts, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, CountRow>,
{
    Box::pin(async move {
        let rows: Vec<CountRow> = Statement::new(sql::TASK_COUNTS)
            .bind::<Text, _>(user_id.to_owned())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(COUNTS, e))?;
        counts_of(rows, COUNTS)
    })
}

/// Every user's tasks per status (operators).
pub(crate) fn totals<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<TaskCounts, StoreError>> {
    totals_on(conn)
}

fn totals_on<'c, C>(conn: &'c mut C) -> BoxFuture<'c, Result<TaskCounts, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, CountRow>,
{
    Box::pin(async move {
        let rows: Vec<CountRow> = Statement::new(sql::TASK_TOTALS)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(TOTALS, e))?;
        counts_of(rows, TOTALS)
    })
}

/// The hours of an activity read.
pub(crate) struct Hours {
    pub(crate) user_id: String,
    pub(crate) from: DateTime<Utc>,
    pub(crate) to: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct ActivityRow {
    #[diesel(sql_type = Timestamptz)]
    hour: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    steps: i64,
    #[diesel(sql_type = BigInt)]
    completed: i64,
    #[diesel(sql_type = BigInt)]
    failed: i64,
    #[diesel(sql_type = BigInt)]
    cancelled: i64,
    #[diesel(sql_type = BigInt)]
    timed_out: i64,
}

/// A user's activity per hour.
pub(crate) fn activity<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    hours: &'c Hours,
) -> BoxFuture<'c, Result<Vec<ActivityHour>, StoreError>> {
    activity_on(conn, hours)
}

fn activity_on<'c, C>(
    conn: &'c mut C,
    hours: &'c Hours,
) -> BoxFuture<'c, Result<Vec<ActivityHour>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, ActivityRow>,
{
    Box::pin(async move {
        let rows: Vec<ActivityRow> = Statement::new(sql::TASK_ACTIVITY)
            .bind::<Text, _>(hours.user_id.clone())
            .bind::<Timestamptz, _>(hours.from)
            .bind::<Timestamptz, _>(hours.to)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(ACTIVITY, e))?;
        let count = |n: i64, what: &str| {
            u64::try_from(n)
                .map_err(|_| StoreError::database(ACTIVITY, format!("a negative count of {what}")))
        };
        rows.into_iter()
            .map(|r| {
                Ok(ActivityHour {
                    hour: r.hour,
                    steps: count(r.steps, "steps")?,
                    completed: count(r.completed, "completed")?,
                    failed: count(r.failed, "failed")?,
                    cancelled: count(r.cancelled, "cancelled")?,
                    timed_out: count(r.timed_out, "timed_out")?,
                })
            })
            .collect()
    })
}

/// Retention's trim of activity: hours before `days` days ago, `limit` rows a statement.
pub(crate) struct Trim {
    pub(crate) days: i32,
    pub(crate) limit: i64,
}

#[derive(QueryableByName)]
struct Trimmed {
    #[diesel(sql_type = BigInt)]
    trimmed: i64,
}

/// Removes one batch of old activity; how many rows went.
pub(crate) fn trim<'c>(
    conn: &'c mut AsyncPgConnection,
    p: &'c Trim,
) -> BoxFuture<'c, Result<i64, StoreError>> {
    Box::pin(async move {
        let rows: Vec<Trimmed> = Statement::new(sql::ACTIVITY_TRIM)
            .bind::<Integer, _>(p.days)
            .bind::<BigInt, _>(p.limit)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(super::cleanup::OP, e))?;
        Ok(rows.first().map_or(0, |r| r.trimmed))
    })
}

/// The operation's name of `PgTaskHistoryStore::recent_failures`.
pub(crate) const RECENT_FAILURES: &str = "recent_failures";

/// A row of [`RECENT_FAILURES`](sql::RECENT_FAILURES).
#[derive(QueryableByName)]
struct FailureRow {
    #[diesel(sql_type = Text)]
    user_id: String,
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

/// The most recent failed or timed-out tasks of any user, with their users (operators).
pub(crate) fn recent_failures<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    limit: &'c i64,
) -> BoxFuture<'c, Result<Vec<(String, TaskSummary)>, StoreError>> {
    failures_on(conn, limit)
}

fn failures_on<'c, C>(
    conn: &'c mut C,
    limit: &'c i64,
) -> BoxFuture<'c, Result<Vec<(String, TaskSummary)>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, FailureRow>,
{
    Box::pin(async move {
        let rows: Vec<FailureRow> = Statement::new(sql::RECENT_FAILURES)
            .bind::<BigInt, _>(*limit)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(RECENT_FAILURES, e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.user_id,
                    TaskSummary {
                        task_id: r.task_id,
                        status: r.status.0,
                        last_step: r.last_step,
                        step_count: r.step_count,
                        created_at: r.created_at,
                        last_updated: r.updated_at,
                    },
                )
            })
            .collect())
    })
}
