//! Operator statistics for `taskhistory stats`: tasks per status (kept by the writes,
//! migration 6), the activity range (the ends of the retention index), table and index
//! sizes (the catalogs). Nothing here scans the store's tables.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use serde::Serialize;
use taskhistory_core::{StoreError, TaskStatus};

use crate::backend::Backend;
use crate::compat::PythonCompat;
use crate::error::from_diesel;
use crate::exec::{Call, PoolStats, Tx};
use crate::ops;
use crate::sql::{self, Statement};

/// What [`PgTaskHistoryStore::stats`](crate::PgTaskHistoryStore::stats) found: figures the
/// writes keep or an index holds; nothing here scans the tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// The pool's figures at the time of the call.
    pub pool: PoolStats,
    /// Tasks per current status (statuses with no task are left out), kept by the writes.
    pub statuses: Vec<StatusStats>,
    /// All tasks.
    pub tasks: u64,
    /// The planner's estimate of all steps (the history's rows; 0 before the first
    /// `ANALYZE`). An exact count would read the whole history.
    pub estimated_steps: u64,
    /// The oldest `last_updated` of any task: what retention looks at next.
    pub oldest_activity: Option<DateTime<Utc>>,
    /// The newest `last_updated` of any task.
    pub newest_activity: Option<DateTime<Utc>>,
    /// The store's tables and indexes in its schema, with their size on disk.
    pub relations: Vec<RelationSize>,
    /// The Python compatibility mode: on or off, and the legacy writes it has seen.
    pub python_compat: PythonCompat,
}

/// Tasks in one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusStats {
    /// The status.
    pub status: TaskStatus,
    /// How many tasks are in it.
    pub tasks: u64,
}

/// One table or index and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelationSize {
    /// Its name.
    pub name: String,
    /// `"table"` or `"index"`.
    pub kind: String,
    /// The table it belongs to (itself for a table).
    pub table: String,
    /// Bytes on disk (tables include their TOAST data).
    pub bytes: u64,
    /// The planner's estimate of its rows (0 before the first ANALYZE).
    pub estimated_rows: u64,
}

#[derive(QueryableByName)]
struct ActivityRange {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest_activity: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    newest_activity: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct RelationRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    #[diesel(sql_type = BigInt)]
    estimated_rows: i64,
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

type Rows = (Vec<ActivityRange>, Vec<RelationRow>, PythonCompat);

fn read<'c>(conn: &'c mut AsyncPgConnection, _: &'c ()) -> BoxFuture<'c, Result<Rows, StoreError>> {
    Box::pin(async move {
        let range = Statement::new(sql::STATS_ACTIVITY_RANGE)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("stats", e))?;
        let relations = Statement::new(sql::STATS_RELATIONS)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("stats", e))?;
        let compat = crate::compat::state_on(conn).await?;
        Ok((range, relations, compat))
    })
}

/// The operator's statistics (`PgTaskHistoryStore::stats`).
pub(crate) async fn stats(b: &Backend) -> Result<StoreStats, StoreError> {
    let (range, relation_rows, python_compat) = b
        .exec()
        .pooled(Call::maintenance("stats"), Tx::Statement, &(), read)
        .await?;
    let totals = b
        .exec()
        .read(Call::new("stats"), &(), ops::counts::totals)
        .await?;
    let statuses: Vec<StatusStats> = TaskStatus::ALL
        .iter()
        .map(|&status| StatusStats {
            status,
            tasks: totals.get(status),
        })
        .filter(|s| s.tasks > 0)
        .collect();
    let range = range.into_iter().next();
    let estimated_steps = relation_rows
        .iter()
        .filter(|r| {
            r.kind == "table"
                && r.table_name.starts_with("task_history")
                && r.table_name != "task_history_duplicates"
        })
        .map(|r| count(r.estimated_rows))
        .sum();
    Ok(StoreStats {
        pool: b.exec().pool_stats(b.config().max_size),
        tasks: totals.total(),
        estimated_steps,
        oldest_activity: range.as_ref().and_then(|r| r.oldest_activity),
        newest_activity: range.and_then(|r| r.newest_activity),
        statuses,
        relations: relation_rows
            .into_iter()
            .map(|r| RelationSize {
                name: r.name,
                kind: r.kind,
                table: r.table_name,
                bytes: count(r.bytes),
                estimated_rows: count(r.estimated_rows),
            })
            .collect(),
        python_compat,
    })
}
