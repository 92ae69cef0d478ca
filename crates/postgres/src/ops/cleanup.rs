//! `cleanup_old_tasks`, on the plain layout (and for what partition drops leave): statements
//! [`CLEANUP_BATCH`](crate::sql::CLEANUP_BATCH) (removes up to `limit` whole tasks, skipping
//! tasks a writer holds) and [`CLEANUP_PREVIEW`](crate::sql::CLEANUP_PREVIEW) (counts, for a
//! dry run). Partition drops are in [`crate::partition`].

use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::{CleanupReport, StoreError, TaskStatus};

use super::rows::{report, CleanupRow};
use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operation's name.
pub(crate) const OP: &str = "cleanup_old_tasks";

/// Which tasks expire.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expired {
    /// Last updated more than this many days ago.
    pub(crate) days: i32,
    /// Only tasks in this status.
    pub(crate) status: Option<TaskStatus>,
    /// Tasks removed per statement.
    pub(crate) limit: i64,
}

/// Removes one batch of expired tasks.
pub(crate) fn batch<'c>(
    conn: &'c mut AsyncPgConnection,
    p: &'c Expired,
) -> BoxFuture<'c, Result<CleanupReport, StoreError>> {
    Box::pin(async move {
        let rows: Vec<CleanupRow> = Statement::new(sql::CLEANUP_BATCH)
            .bind::<Integer, _>(p.days)
            .bind::<Nullable<Text>, _>(p.status.map(TaskStatus::as_str))
            .bind::<BigInt, _>(p.limit)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))?;
        Ok(report(rows))
    })
}

/// Counts what [`batch`] would remove, all batches together.
pub(crate) fn preview<'c>(
    conn: &'c mut AsyncPgConnection,
    p: &'c Expired,
) -> BoxFuture<'c, Result<CleanupReport, StoreError>> {
    Box::pin(async move {
        let rows: Vec<CleanupRow> = Statement::new(sql::CLEANUP_PREVIEW)
            .bind::<Integer, _>(p.days)
            .bind::<Nullable<Text>, _>(p.status.map(TaskStatus::as_str))
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))?;
        Ok(report(rows))
    })
}
