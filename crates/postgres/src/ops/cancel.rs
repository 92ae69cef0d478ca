//! `mark_task_as_cancelled`: statement [`CANCEL_TASK`](crate::sql::CANCEL_TASK), which appends
//! the cancellation entry under the task's summary lock.

use diesel::sql_types::{Integer, Jsonb, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::{StoreError, TaskStepResult};

use super::rows::{JsonOf, TaskKey};
use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operation's name (spans, metrics, errors).
pub(crate) const OP: &str = "mark_task_as_cancelled";

/// The cancellation entry written (none when the task was missing or already final).
#[derive(QueryableByName)]
pub(crate) struct Cancelled {
    #[diesel(sql_type = Integer)]
    #[allow(dead_code)]
    pub(crate) step: i32,
}

pub(crate) fn run<'c, 'a>(
    conn: &'c mut AsyncPgConnection,
    key: &'c TaskKey<'a>,
) -> BoxFuture<'c, Result<Option<Cancelled>, StoreError>> {
    Box::pin(async move {
        let op = OP;
        let entry = TaskStepResult::cancellation();
        let rows: Vec<Cancelled> = Statement::new(sql::CANCEL_TASK)
            .bind::<Text, _>(key.user_id.to_owned())
            .bind::<Text, _>(key.task_id.to_owned())
            .bind::<Jsonb, _>(JsonOf::new(op, &entry)?)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(op, e))?;
        Ok(rows.into_iter().next())
    })
}
