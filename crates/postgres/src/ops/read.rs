//! The reads that may share a pipelined connection: `load_task_history`
//! ([`LOAD_HISTORY`](crate::sql::LOAD_HISTORY)), `check_task_status`
//! ([`TASK_STATUS`](crate::sql::TASK_STATUS)) and `get_user_tasks_page`
//! ([`LIST_TASKS`](crate::sql::LIST_TASKS) and its three variants, by status filter and
//! cursor; with an activity range [`LIST_TASKS_IN_RANGE`](crate::sql::LIST_TASKS_IN_RANGE) or
//! [`LIST_TASKS_WITH_STATUS_IN_RANGE`](crate::sql::LIST_TASKS_WITH_STATUS_IN_RANGE); with a
//! task id prefix [`LIST_TASKS_WITH_PREFIX`](crate::sql::LIST_TASKS_WITH_PREFIX)); and the
//! combined status checks of several callers ([`TASK_STATUSES`](crate::sql::TASK_STATUSES),
//! `crate::combine::status`).

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnectionCore, AsyncPgConnection};
use futures::future::BoxFuture;
use taskhistory_core::{
    HistoryEntry, StoreError, TaskCursor, TaskPage, TaskQuery, TaskStatus, TaskSummary,
};

use super::rows::{status_of, Status, Stored, TaskKey};
use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operations' names (spans, metrics, errors): the contract's method names.
pub(crate) const LOAD: &str = "load_task_history";
/// See [`LOAD`].
pub(crate) const STATUS: &str = "check_task_status";
/// See [`LOAD`].
pub(crate) const LIST: &str = "get_user_tasks_page";

#[derive(QueryableByName)]
struct HistoryRow {
    #[diesel(sql_type = Integer)]
    step: i32,
    #[diesel(sql_type = Jsonb)]
    result: Stored,
    #[diesel(sql_type = Timestamptz)]
    timestamp: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    status: Status,
}

/// A task's history, oldest step first.
pub(crate) fn load_history<'c, 'a>(
    conn: &'c mut &'c AsyncPgConnection,
    key: &'c TaskKey<'a>,
) -> BoxFuture<'c, Result<Vec<HistoryEntry>, StoreError>> {
    load_history_on(conn, key)
}

fn load_history_on<'c, 'a, C>(
    conn: &'c mut C,
    key: &'c TaskKey<'a>,
) -> BoxFuture<'c, Result<Vec<HistoryEntry>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, HistoryRow>,
{
    Box::pin(async move {
        let rows: Vec<HistoryRow> = Statement::new(sql::LOAD_HISTORY)
            .bind::<Text, _>(key.user_id.to_owned())
            .bind::<Text, _>(key.task_id.to_owned())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(LOAD, e))?;
        tracing::Span::current().record("rows", rows.len());
        Ok(rows
            .into_iter()
            .map(|r| HistoryEntry {
                step: r.step,
                result: r.result.0,
                timestamp: r.timestamp,
                status: r.status.0,
            })
            .collect())
    })
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    status: Status,
}

/// A task's status; `Pending` for a task with no step.
pub(crate) fn task_status<'c, 'a>(
    conn: &'c mut &'c AsyncPgConnection,
    key: &'c TaskKey<'a>,
) -> BoxFuture<'c, Result<TaskStatus, StoreError>> {
    task_status_on(conn, key)
}

fn task_status_on<'c, 'a, C>(
    conn: &'c mut C,
    key: &'c TaskKey<'a>,
) -> BoxFuture<'c, Result<TaskStatus, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, StatusRow>,
{
    Box::pin(async move {
        let rows: Vec<StatusRow> = Statement::new(sql::TASK_STATUS)
            .bind::<Text, _>(key.user_id.to_owned())
            .bind::<Text, _>(key.task_id.to_owned())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(STATUS, e))?;
        Ok(rows
            .into_iter()
            .next()
            .map_or(TaskStatus::Pending, |r| r.status.0))
    })
}

/// The tasks of combined status checks, in the order their callers asked (a task may come
/// twice).
pub(crate) struct TaskKeys {
    pub(crate) users: Vec<String>,
    pub(crate) tasks: Vec<String>,
}

#[derive(QueryableByName)]
struct StatusOfRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
    /// As text: a status that does not decode is its own task's error, not the statement's.
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
}

/// Several tasks' statuses, in the order of `keys`; `Pending` for a task with no step; an
/// error for a task whose status does not decode (only that task's).
pub(crate) fn task_statuses<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    keys: &'c TaskKeys,
) -> BoxFuture<'c, Result<Vec<Result<TaskStatus, StoreError>>, StoreError>> {
    task_statuses_on(conn, keys)
}

fn task_statuses_on<'c, C>(
    conn: &'c mut C,
    keys: &'c TaskKeys,
) -> BoxFuture<'c, Result<Vec<Result<TaskStatus, StoreError>>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, StatusOfRow>,
{
    Box::pin(async move {
        let rows: Vec<StatusOfRow> = Statement::new(sql::TASK_STATUSES)
            .bind::<Array<Text>, _>(keys.users.clone())
            .bind::<Array<Text>, _>(keys.tasks.clone())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(STATUS, e))?;
        let asked = keys.tasks.len();
        let mut statuses: Vec<Result<TaskStatus, StoreError>> =
            (0..asked).map(|_| Ok(TaskStatus::Pending)).collect();
        for r in rows {
            // `n` is the task's place in the arrays, from 1.
            let slot = usize::try_from(r.n)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| statuses.get_mut(i))
                .ok_or_else(|| {
                    StoreError::database(
                        STATUS,
                        format!("a row for task {} of the {asked} asked", r.n),
                    )
                })?;
            if let Some(text) = r.status {
                *slot = status_of(&text).map_err(|e| StoreError::database(STATUS, e));
            }
        }
        Ok(statuses)
    })
}

/// The parameters of a task list.
pub(crate) struct ListTasks<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) query: &'a TaskQuery,
}

#[derive(QueryableByName)]
struct SummaryRow {
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

/// A page of a user's tasks, most recently updated first.
pub(crate) fn list_tasks<'c, 'a>(
    conn: &'c mut &'c AsyncPgConnection,
    p: &'c ListTasks<'a>,
) -> BoxFuture<'c, Result<TaskPage, StoreError>> {
    list_tasks_on(conn, p)
}

fn list_tasks_on<'c, 'a, C>(
    conn: &'c mut C,
    p: &'c ListTasks<'a>,
) -> BoxFuture<'c, Result<TaskPage, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, SummaryRow>,
{
    Box::pin(async move {
        let user_id = p.user_id.to_owned();
        let fetch = p.query.limit + 1;
        let (from, until) = p.query.activity_range();
        let cursor_at = p.query.after.as_ref().map(|c| c.last_updated);
        let cursor_id = p.query.after.as_ref().map(|c| c.task_id.clone());
        let statement = if let Some(prefix) = &p.query.task_id_prefix {
            Statement::new(sql::LIST_TASKS_WITH_PREFIX)
                .bind::<Text, _>(user_id)
                .bind::<Text, _>(prefix.clone())
                .bind::<Text, _>(prefix_end(prefix))
                .bind::<Nullable<Text>, _>(p.query.status.map(TaskStatus::as_str))
                .bind::<Nullable<Timestamptz>, _>(from)
                .bind::<Nullable<Timestamptz>, _>(until)
                .bind::<Nullable<Timestamptz>, _>(cursor_at)
                .bind::<Nullable<Text>, _>(cursor_id)
                .bind::<BigInt, _>(fetch)
        } else if from.is_some() || until.is_some() {
            match p.query.status {
                None => Statement::new(sql::LIST_TASKS_IN_RANGE).bind::<Text, _>(user_id),
                Some(status) => Statement::new(sql::LIST_TASKS_WITH_STATUS_IN_RANGE)
                    .bind::<Text, _>(user_id)
                    .bind::<Text, _>(status.as_str()),
            }
            .bind::<Nullable<Timestamptz>, _>(from)
            .bind::<Nullable<Timestamptz>, _>(until)
            .bind::<Nullable<Timestamptz>, _>(cursor_at)
            .bind::<Nullable<Text>, _>(cursor_id)
            .bind::<BigInt, _>(fetch)
        } else {
            match (&p.query.status, &p.query.after) {
                (None, None) => Statement::new(sql::LIST_TASKS)
                    .bind::<Text, _>(user_id)
                    .bind::<BigInt, _>(fetch),
                (
                    None,
                    Some(TaskCursor {
                        last_updated,
                        task_id,
                    }),
                ) => Statement::new(sql::LIST_TASKS_AFTER)
                    .bind::<Text, _>(user_id)
                    .bind::<Timestamptz, _>(*last_updated)
                    .bind::<Text, _>(task_id.clone())
                    .bind::<BigInt, _>(fetch),
                (Some(status), None) => Statement::new(sql::LIST_TASKS_WITH_STATUS)
                    .bind::<Text, _>(user_id)
                    .bind::<Text, _>(status.as_str())
                    .bind::<BigInt, _>(fetch),
                (
                    Some(status),
                    Some(TaskCursor {
                        last_updated,
                        task_id,
                    }),
                ) => Statement::new(sql::LIST_TASKS_WITH_STATUS_AFTER)
                    .bind::<Text, _>(user_id)
                    .bind::<Text, _>(status.as_str())
                    .bind::<Timestamptz, _>(*last_updated)
                    .bind::<Text, _>(task_id.clone())
                    .bind::<BigInt, _>(fetch),
            }
        };
        let rows: Vec<SummaryRow> = statement
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(LIST, e))?;
        let tasks: Vec<TaskSummary> = rows
            .into_iter()
            .map(|r| TaskSummary {
                task_id: r.task_id,
                status: r.status.0,
                last_step: r.last_step,
                step_count: r.step_count,
                created_at: r.created_at,
                last_updated: r.updated_at,
            })
            .collect();
        let page = TaskPage::from_overfetch(tasks, p.query.limit);
        tracing::Span::current().record("rows", page.tasks.len());
        Ok(page)
    })
}

/// The least string above every string that starts with `prefix` (in byte order, which is
/// code point order): the prefix with its last character raised by one, dropping trailing
/// characters that cannot be raised. A prefix of U+10FFFF only has no such string; then a
/// run of them longer than any id stands in (every id is below it).
fn prefix_end(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return chars.into_iter().collect();
        }
    }
    std::iter::repeat_n(char::MAX, taskhistory_core::validate::MAX_ID_BYTES / 4 + 1).collect()
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_bounds_exactly_the_strings_with_the_prefix() {
        assert_eq!(prefix_end("task-"), "task.");
        assert_eq!(prefix_end("a\u{7f}"), "a\u{80}");
        assert_eq!(prefix_end("a\u{d7ff}"), "a\u{e000}");
        assert_eq!(prefix_end("a\u{10ffff}"), "b");
        let top = prefix_end("\u{10ffff}");
        assert!(top.len() > taskhistory_core::validate::MAX_ID_BYTES);
        let longest = "\u{10ffff}".repeat(63) + "\u{ffff}";
        assert!(longest.len() <= taskhistory_core::validate::MAX_ID_BYTES);
        assert!(longest.as_str() < top.as_str());
        for (prefix, id) in [("ab", "ab"), ("ab", "ab\u{10ffff}"), ("é", "éz")] {
            assert!(id >= prefix && id < prefix_end(prefix).as_str(), "{id}");
        }
        for (prefix, id) in [("ab", "ac"), ("ab", "b"), ("é", "ê"), ("é", "ëa")] {
            assert!(id >= prefix_end(prefix).as_str(), "{id}");
        }
    }
}
