//! Operator statistics for `taskhistory stats`: tasks and steps per status, activity range,
//! table and index sizes. These statements read the whole summary table and the catalogs;
//! they are not on any service path.

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
use crate::ops::rows::Status;
use crate::sql::{self, Statement};

/// What [`PgTaskHistoryStore::stats`](crate::PgTaskHistoryStore::stats) found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// The pool's figures at the time of the call.
    pub pool: PoolStats,
    /// Tasks and steps per current status (statuses with no task are left out).
    pub statuses: Vec<StatusStats>,
    /// All tasks.
    pub tasks: u64,
    /// All steps.
    pub steps: u64,
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
    /// How many steps those tasks hold.
    pub steps: u64,
    /// The oldest latest activity among them.
    pub oldest_activity: Option<DateTime<Utc>>,
    /// The newest latest activity among them.
    pub newest_activity: Option<DateTime<Utc>>,
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
struct StatusRow {
    #[diesel(sql_type = Text)]
    status: Status,
    #[diesel(sql_type = BigInt)]
    tasks: i64,
    #[diesel(sql_type = BigInt)]
    steps: i64,
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

type Rows = (Vec<StatusRow>, Vec<RelationRow>, PythonCompat);

fn read<'c>(conn: &'c mut AsyncPgConnection, _: &'c ()) -> BoxFuture<'c, Result<Rows, StoreError>> {
    Box::pin(async move {
        let statuses = Statement::new(sql::STATS_BY_STATUS)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("stats", e))?;
        let relations = Statement::new(sql::STATS_RELATIONS)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("stats", e))?;
        let compat = crate::compat::state_on(conn).await?;
        Ok((statuses, relations, compat))
    })
}

/// The operator's statistics (`PgTaskHistoryStore::stats`).
pub(crate) async fn stats(b: &Backend) -> Result<StoreStats, StoreError> {
    let (status_rows, relation_rows, python_compat) = b
        .exec()
        .pooled(Call::new("stats"), Tx::Statement, &(), read)
        .await?;
    let statuses: Vec<StatusStats> = status_rows
        .into_iter()
        .map(|r| StatusStats {
            status: r.status.0,
            tasks: count(r.tasks),
            steps: count(r.steps),
            oldest_activity: r.oldest_activity,
            newest_activity: r.newest_activity,
        })
        .collect();
    Ok(StoreStats {
        pool: b.exec().pool_stats(b.config().max_size),
        tasks: statuses.iter().map(|s| s.tasks).sum(),
        steps: statuses.iter().map(|s| s.steps).sum(),
        oldest_activity: statuses.iter().filter_map(|s| s.oldest_activity).min(),
        newest_activity: statuses.iter().filter_map(|s| s.newest_activity).max(),
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
