//! `save_task_history` and the upsert path of `save_batch_task_history`: statements
//! [`SAVE_STEP`](crate::sql::SAVE_STEP) (one step) and [`SAVE_STEPS`](crate::sql::SAVE_STEPS)
//! (many, as arrays), in chunks of [`CHUNK_ROWS`] inside one transaction past that; and
//! [`SAVE_COMBINED`](crate::sql::SAVE_COMBINED), the single saves of several callers in one
//! statement (`combine/save.rs`).

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::validate::PreparedStep;
use taskhistory_core::StoreError;

use super::rows::JsonOf;
use crate::error::from_diesel;
use crate::exec::Tx;
use crate::sql::{self, Statement};

/// The operations' names (spans, metrics, errors): the contract's method names.
pub(crate) const OP: &str = "save_task_history";
/// See [`OP`].
pub(crate) const BATCH: &str = "save_batch_task_history";

/// Rows per statement when a batch is split (inside one transaction).
pub(crate) const CHUNK_ROWS: usize = 10_000;

/// The steps to save: validated, and for a batch sorted and de-duplicated by
/// [`prepare_batch`](taskhistory_core::validate::prepare_batch).
pub(crate) struct SaveSteps<'a> {
    pub(crate) operation: &'static str,
    pub(crate) steps: &'a [PreparedStep<'a>],
}

impl SaveSteps<'_> {
    /// One statement, or several chunks that must commit together.
    pub(crate) fn tx(&self) -> Tx {
        if self.steps.len() > CHUNK_ROWS {
            Tx::Always
        } else {
            Tx::Statement
        }
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
}

/// Saves the steps, a chunk per statement; a chunk touching a cancelled task fails the whole
/// call with `TaskCancelled` (the executor's transaction rolls the earlier chunks back).
pub(crate) fn run<'c, 'a>(
    conn: &'c mut AsyncPgConnection,
    p: &'c SaveSteps<'a>,
) -> BoxFuture<'c, Result<(), StoreError>> {
    Box::pin(async move {
        for chunk in chunks(p.steps) {
            save_chunk(conn, p.operation, chunk).await?;
        }
        Ok(())
    })
}

/// The batch in chunks of about [`CHUNK_ROWS`], each ending where a task does (the steps
/// are sorted by task): a task's steps are written by one statement, so its summary changes
/// once, as the counts and activity of rule 10 count it (a task with more steps than a
/// chunk is a chunk of its own).
fn chunks<'s, 'a>(steps: &'s [PreparedStep<'a>]) -> impl Iterator<Item = &'s [PreparedStep<'a>]> {
    let mut rest = steps;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(CHUNK_ROWS);
        if end < rest.len() {
            let same = |a: &PreparedStep<'_>, b: &PreparedStep<'_>| {
                a.user_id == b.user_id && a.task_id == b.task_id
            };
            // Back to the start of the task the cut falls in; if that is the chunk's start,
            // forward to its end.
            let mut cut = end;
            while cut > 0 && same(&rest[cut - 1], &rest[cut]) {
                cut -= 1;
            }
            if cut == 0 {
                cut = end;
                while cut < rest.len() && same(&rest[cut - 1], &rest[cut]) {
                    cut += 1;
                }
            }
            end = cut;
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

async fn save_chunk(
    conn: &mut AsyncPgConnection,
    op: &'static str,
    steps: &[PreparedStep<'_>],
) -> Result<(), StoreError> {
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
            refused_user: Some(user_id),
            refused_task: Some(task_id),
            ..
        }) => Err(StoreError::TaskCancelled { user_id, task_id }),
        Some(SaveOutcome { rows_written, .. }) => {
            tracing::Span::current().record("rows", rows_written);
            Ok(())
        }
        None => Err(StoreError::database(
            op,
            "the save statement returned no row",
        )),
    }
}

/// Single saves of several callers in one statement, as parallel arrays (one entry per
/// step, no key twice; each step saved with the store's clock).
#[derive(Default)]
pub(crate) struct Combined {
    pub(crate) users: Vec<String>,
    pub(crate) tasks: Vec<String>,
    pub(crate) steps: Vec<i32>,
    pub(crate) results: Vec<JsonOf>,
    pub(crate) statuses: Vec<&'static str>,
}

#[derive(QueryableByName)]
struct CombinedOutcome {
    #[diesel(sql_type = Array<Text>)]
    refused_users: Vec<String>,
    #[diesel(sql_type = Array<Text>)]
    refused_tasks: Vec<String>,
    #[diesel(sql_type = BigInt)]
    rows_written: i64,
}

/// Saves the combined steps; returns the tasks that refused theirs (cancelled).
pub(crate) fn run_combined<'c>(
    conn: &'c mut AsyncPgConnection,
    p: &'c Combined,
) -> BoxFuture<'c, Result<Vec<(String, String)>, StoreError>> {
    Box::pin(async move {
        let op = OP;
        let times: Vec<Option<DateTime<Utc>>> = vec![None; p.steps.len()];
        let rows: Vec<CombinedOutcome> = Statement::new(sql::SAVE_COMBINED)
            .bind::<Array<Text>, _>(p.users.clone())
            .bind::<Array<Text>, _>(p.tasks.clone())
            .bind::<Array<Integer>, _>(p.steps.clone())
            .bind::<Array<Jsonb>, _>(p.results.clone())
            .bind::<Array<Nullable<Timestamptz>>, _>(times)
            .bind::<Array<Text>, _>(p.statuses.clone())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(op, e))?;
        let outcome = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::database(op, "the combined save returned no row"))?;
        tracing::Span::current().record("rows", outcome.rows_written);
        Ok(outcome
            .refused_users
            .into_iter()
            .zip(outcome.refused_tasks)
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskhistory_core::TaskStepResult;

    #[test]
    fn chunks_end_where_tasks_do() {
        let r = TaskStepResult::running("s", serde_json::json!(1), "");
        let names: Vec<String> = (0..40).map(|t| format!("t{t:02}")).collect();
        // Tasks of 3,000 steps, one of 25,000 (longer than a chunk), then small ones.
        let sizes: Vec<usize> = (0..40)
            .map(|t| match t {
                5 => 25_000,
                t if t < 10 => 3_000,
                _ => 7,
            })
            .collect();
        let steps: Vec<PreparedStep<'_>> = names
            .iter()
            .zip(&sizes)
            .flat_map(|(task, &n)| {
                (0..n).map(|step| PreparedStep {
                    user_id: "u",
                    task_id: task,
                    step: step as i32,
                    timestamp: None,
                    result: &r,
                })
            })
            .collect();
        let parts: Vec<_> = chunks(&steps).collect();
        assert_eq!(parts.iter().map(|c| c.len()).sum::<usize>(), steps.len());
        let mut at = 0;
        for part in &parts {
            assert!(!part.is_empty());
            let (first, last) = (&part[0], &part[part.len() - 1]);
            // No task is cut: the step before a chunk belongs to another task.
            if at > 0 {
                assert_ne!(steps[at - 1].task_id, first.task_id);
            }
            at += part.len();
            if at < steps.len() {
                assert_ne!(steps[at].task_id, last.task_id);
            }
            let tasks: std::collections::BTreeSet<_> = part.iter().map(|p| p.task_id).collect();
            assert!(
                part.len() <= CHUNK_ROWS || tasks.len() == 1,
                "{}",
                part.len()
            );
        }
        assert!(parts.iter().any(|p| p.len() == 25_000));
    }
}
