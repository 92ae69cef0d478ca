//! Which layout `task_history` has: plain, or partitioned by task start (and by what
//! period). SQL: [`PARTITION_LAYOUT`](crate::sql::PARTITION_LAYOUT). Read by the partition
//! maintenance, the compatibility mode (its insert trigger goes where rows without a start
//! land) and operators.

use diesel::sql_types::{Bool, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::StoreError;

use crate::error::from_diesel;
use crate::layout::Layout;
use crate::sql::{self, Statement};

/// The operation's name.
pub(crate) const OP: &str = "partitions";

#[derive(QueryableByName)]
struct LayoutRow {
    #[diesel(sql_type = Bool)]
    partitioned: bool,
    #[diesel(sql_type = Nullable<Text>)]
    interval: Option<String>,
}

fn read_layout(rows: Vec<LayoutRow>) -> Result<Layout, StoreError> {
    let Some(row) = rows.into_iter().next() else {
        return Err(StoreError::database(OP, "the layout query returned no row"));
    };
    if !row.partitioned {
        return Ok(Layout::Plain);
    }
    // The period is what the conversion recorded (migration 3's table), never a guess.
    match row.interval.as_deref().map(str::parse) {
        Some(Ok(interval)) => Ok(Layout::Partitioned { interval }),
        Some(Err(e)) => Err(StoreError::database(
            OP,
            format!("taskhistory_layout.partition_interval: {e}"),
        )),
        None => Err(StoreError::database(
            OP,
            "task_history is partitioned but taskhistory_layout.partition_interval is not set \
             (partitioned by hand?): set it to day, week or month",
        )),
    }
}

/// The layout, read on `conn` (inside a DDL transaction, or any).
pub(crate) async fn layout_on(conn: &mut AsyncPgConnection) -> Result<Layout, StoreError> {
    let rows = Statement::new(sql::PARTITION_LAYOUT)
        .fetch(conn)
        .await
        .map_err(|e| from_diesel(OP, e))?;
    read_layout(rows)
}

/// The work of reading the layout on a pooled connection.
pub(crate) fn run<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<Layout, StoreError>> {
    Box::pin(layout_on(conn))
}
