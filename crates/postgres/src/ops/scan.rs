//! `scan_history`: statements [`SCAN_HISTORY`](crate::sql::SCAN_HISTORY) (every task of a
//! user) and [`SCAN_TASK_HISTORY`](crate::sql::SCAN_TASK_HISTORY) (one task), keyset-paged
//! by `(task_id, step)`. On a pooled connection: a page of up to 10,000 rows would hold up the
//! small reads pipelined behind it on a shared one.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Integer, Jsonb, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::{HistoryPage, HistoryScan, StepRecord, StoreError};

use super::rows::Stored;
use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operation's name (spans, metrics, errors).
pub(crate) const OP: &str = "scan_history";

/// The parameters of a scan.
pub(crate) struct Scan<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) scan: &'a HistoryScan,
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

pub(crate) fn run<'c, 'a>(
    conn: &'c mut AsyncPgConnection,
    p: &'c Scan<'a>,
) -> BoxFuture<'c, Result<HistoryPage, StoreError>> {
    Box::pin(async move {
        let Scan { user_id, scan } = *p;
        let fetch = scan.limit + 1;
        let statement = match &scan.task_id {
            Some(task_id) => match scan.resume_in(task_id) {
                Some(after) => Statement::new(sql::SCAN_TASK_HISTORY)
                    .bind::<Text, _>(user_id.to_owned())
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
                    .bind::<Text, _>(user_id.to_owned())
                    .bind::<Text, _>(task_id)
                    .bind::<Integer, _>(step)
                    .bind::<BigInt, _>(fetch)
            }
        };
        let rows: Vec<ScanRow> = statement
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))?;
        tracing::Span::current().record("rows", rows.len());
        let steps = rows
            .into_iter()
            .map(|r| StepRecord::new(user_id, r.task_id, r.step, r.result.0).at(r.timestamp))
            .collect();
        Ok(HistoryPage::from_overfetch(steps, scan.limit))
    })
}
