//! The Python compatibility mode: while the Python `DatabaseManager` still writes beside the
//! store (a rolling migration, one service at a time), its statements, unchanged, keep the
//! store's rules, in their own transaction:
//!
//! - a Python `INSERT` (which names no `started_at`) runs the store's single-save statement
//!   ([`SAVE_STEP`](crate::sql::SAVE_STEP), through `taskhistory_python_save`): it takes
//!   the task's start, creates or merges the summary, replaces a step inserted again (the
//!   Python service's retries), and a cancelled task refuses it with an error the Python
//!   code raises (`check_violation`, "task ... is cancelled");
//! - a Python `UPDATE` (which leaves a row's log position, `xid`, as it was) of a row to
//!   `cancelled` (its `mark_task_as_cancelled`) cancels the task, sticky for both sides;
//!   any other update is a save of that step, refused on a cancelled task;
//! - every legacy write moves its rows to the end of the event log and wakes the
//!   schema's watchers (`pg_notify`), and is counted per server process (the last write's
//!   time is what an operator watches fall silent);
//! - the Python start-up's `CREATE INDEX IF NOT EXISTS` finds a view holding each index
//!   name and makes nothing.
//!
//! The store's own statements never call the triggers' functions: the triggers' `WHEN`
//! clauses (`NEW.started_at IS NULL`, `OLD.xid = NEW.xid`) are false for every row they
//! write. On the partitioned layout the insert trigger is on the default partition only
//! (a row with no start lands there), so `COPY` into the ranged partitions keeps its
//! multi-row inserts; on the plain layout `COPY` inserts row by row while the mode is on
//! (a `BEFORE` row trigger on the table; measured in `docs/performance.md`).
//!
//! Switched on by [`enable_python_compat`](crate::PgTaskHistoryStore::enable_python_compat)
//! (`taskhistory compat on`), and by `init_database_schema` when it adopts a table the
//! Python service made; off by [`disable_python_compat`](crate::PgTaskHistoryStore::disable_python_compat).
//! The conversion to the partitioned layout makes the mode again on the new table.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures::future::BoxFuture;
use serde::Serialize;
use taskhistory_core::StoreError;

use crate::backend::Backend;
use crate::error::from_diesel;
use crate::exec::{Call, Tx};
use crate::layout::Layout;
use crate::ops::layout::layout_on;
use crate::sql::{self, ddl, Statement};

const OP: &str = "python_compat";

/// The state of the Python compatibility mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PythonCompat {
    /// Whether the mode is on: its triggers are in place.
    pub enabled: bool,
    /// When it was switched on.
    pub enabled_at: Option<DateTime<Utc>>,
    /// When the last legacy (Python) write arrived, since the mode was switched on.
    pub last_python_write: Option<DateTime<Utc>>,
    /// Legacy writes (rows inserted or updated by the Python service) since then. Kept in
    /// an unlogged table: a server crash resets it.
    pub python_writes: u64,
    /// The Python service's indexes present on the table (a Python start-up made them
    /// while the mode was off). Every write pays for them; switching the mode on or off
    /// drops them.
    pub python_indexes: Vec<String>,
}

#[derive(QueryableByName)]
struct StateRow {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    enabled_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    triggers: bool,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_write: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    writes: i64,
    #[diesel(sql_type = Array<Text>)]
    python_indexes: Vec<String>,
}

pub(crate) async fn state_on(conn: &mut AsyncPgConnection) -> Result<PythonCompat, StoreError> {
    let row = Statement::new(sql::PYTHON_COMPAT_STATE)
        .fetch::<StateRow, _>(conn)
        .await
        .map_err(|e| from_diesel(OP, e))?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::database(OP, "the state query returned no row"))?;
    Ok(PythonCompat {
        enabled: row.triggers,
        enabled_at: row.enabled_at.filter(|_| row.triggers),
        last_python_write: row.last_write,
        python_writes: u64::try_from(row.writes).unwrap_or(0),
        python_indexes: row.python_indexes,
    })
}

fn state_work<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<PythonCompat, StoreError>> {
    Box::pin(state_on(conn))
}

/// Makes the mode's functions and triggers for the layout `conn` sees, in the caller's
/// transaction (which holds the DDL lock).
pub(crate) async fn install_on(
    conn: &mut AsyncPgConnection,
    channel: &str,
) -> Result<(), StoreError> {
    let insert_on = match layout_on(conn).await? {
        Layout::Plain => "task_history",
        Layout::Partitioned { .. } => ddl::DEFAULT_PARTITION,
    };
    conn.batch_execute(&ddl::python_compat_on(sql::SAVE_STEP, channel, insert_on))
        .await
        .map_err(|e| from_diesel(OP, e))
}

/// The mode's state (`PgTaskHistoryStore::python_compat`).
pub(crate) async fn state(b: &Backend) -> Result<PythonCompat, StoreError> {
    b.exec()
        .pooled(Call::new(OP), Tx::Statement, &(), state_work)
        .await
}

#[allow(clippy::ptr_arg)] // the executor hands a work its parameters by reference
fn enable_work<'c>(
    conn: &'c mut AsyncPgConnection,
    channel: &'c String,
) -> BoxFuture<'c, Result<Option<PythonCompat>, StoreError>> {
    Box::pin(async move {
        install_on(conn, channel).await?;
        state_on(conn).await.map(Some)
    })
}

fn disable_work<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<Option<PythonCompat>, StoreError>> {
    Box::pin(async move {
        conn.batch_execute(&ddl::python_compat_off())
            .await
            .map_err(|e| from_diesel(OP, e))?;
        state_on(conn).await.map(Some)
    })
}

/// Switches the mode on (`PgTaskHistoryStore::enable_python_compat`).
pub(crate) async fn enable(b: &Backend) -> Result<PythonCompat, StoreError> {
    let channel = b.channel().to_owned();
    let state = b
        .exec()
        .dedicated(Call::maintenance(OP), &b.ddl_setup(), &channel, enable_work)
        .await?;
    tracing::info!("Python compatibility mode on");
    state.ok_or_else(|| StoreError::database(OP, "the mode's transaction was rolled back"))
}

/// Switches the mode off (`PgTaskHistoryStore::disable_python_compat`).
pub(crate) async fn disable(b: &Backend) -> Result<PythonCompat, StoreError> {
    let state = b
        .exec()
        .dedicated(Call::maintenance(OP), &b.ddl_setup(), &(), disable_work)
        .await?;
    tracing::info!("Python compatibility mode off");
    state.ok_or_else(|| StoreError::database(OP, "the mode's transaction was rolled back"))
}
