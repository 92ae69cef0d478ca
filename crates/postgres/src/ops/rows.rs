//! Values and rows more than one operation reads or binds.

use std::io::Write as _;

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{BigInt, Jsonb, Text};
use diesel::QueryableByName;
use taskhistory_core::{CleanupReport, StoreError, TaskStatus, TaskStepResult};

/// A step result encoded as JSON, bound as `jsonb`.
#[derive(Debug, Clone)]
pub(crate) struct JsonOf(Vec<u8>);

impl JsonOf {
    pub(crate) fn new(operation: &'static str, value: &TaskStepResult) -> Result<Self, StoreError> {
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
        Ok(Status(status_of(text)?))
    }
}

/// A status column's text as a status (the error names the column and the text).
pub(crate) fn status_of(text: &str) -> Result<TaskStatus, String> {
    text.parse().map_err(|e| format!("status column: {e}"))
}

/// What a retention statement removed (cleanup batches, previews, partition drops).
#[derive(QueryableByName)]
pub(crate) struct CleanupRow {
    #[diesel(sql_type = BigInt)]
    tasks_removed: i64,
    #[diesel(sql_type = BigInt)]
    steps_removed: i64,
}

/// The report of a retention statement's rows.
pub(crate) fn report(rows: Vec<CleanupRow>) -> CleanupReport {
    rows.into_iter()
        .next()
        .map_or_else(CleanupReport::default, |r| CleanupReport {
            tasks_removed: u64::try_from(r.tasks_removed).unwrap_or(0),
            steps_removed: u64::try_from(r.steps_removed).unwrap_or(0),
            partitions_dropped: 0,
        })
}

/// A task's key: the parameters of the operations on one task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskKey<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) task_id: &'a str,
}
