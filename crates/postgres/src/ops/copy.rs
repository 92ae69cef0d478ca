//! Batches of new tasks by `COPY`: the bulk path of `save_batch_task_history`.
//!
//! An upsert statement costs the server a conflict check per row and one WAL record per row;
//! `COPY` appends rows in multi-row batches. When every task of a large batch is new, no
//! conflict is possible once the batch's transaction has created the tasks' summaries (the
//! summary rows are its own until commit: a concurrent writer of the same task waits on
//! them), so the steps can go in by `COPY`. This module holds that path: a small pool of
//! plain tokio-postgres connections (diesel-async does not speak `COPY`), the per-task
//! summaries a batch starts with, and the transaction `BEGIN; CLAIM_NEW_TASKS; COPY; COMMIT`.
//!
//! Not for batches touching a task that exists: the claim then inserts nothing, the
//! transaction is rolled back, and the caller uses the upsert statement, which also checks
//! for cancelled tasks. The SQL is in [`sql`](crate::sql) like every other statement.
//!
//! A store that declares its users to row-level isolation sends the same rows by `INSERT`s
//! of arrays instead ([`INSERT_NEW_STEPS`](sql::INSERT_NEW_STEPS)): PostgreSQL
//! refuses `COPY FROM` into a table with row-level security, and the claim makes a conflict
//! check per row needless there too.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::SinkExt;
use taskhistory_core::validate::PreparedStep;
use taskhistory_core::StoreError;
use taskhistory_core::TaskStepResult;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};

use futures::future::BoxFuture;

use crate::connection::Connector;
use crate::error::from_postgres;
use crate::session::{RawSession, Transaction};
use crate::sql;

use super::save::{BATCH as OP, CHUNK_ROWS};

/// What each task's summary starts as, as the parallel arrays of
/// [`CLAIM_NEW_TASKS`](sql::CLAIM_NEW_TASKS).
#[derive(Debug, Default, PartialEq)]
struct NewTasks<'a> {
    users: Vec<&'a str>,
    tasks: Vec<&'a str>,
    statuses: Vec<&'static str>,
    last_steps: Vec<i32>,
    counts: Vec<i64>,
    first: Vec<DateTime<Utc>>,
    last: Vec<DateTime<Utc>>,
}

impl<'a> NewTasks<'a> {
    /// One entry per task of `steps` (sorted by key, one entry per step, as
    /// [`prepare_batch`](taskhistory_core::validate::prepare_batch) leaves them); steps
    /// without a timestamp count as `now`.
    fn of(steps: &[PreparedStep<'a>], now: DateTime<Utc>) -> Self {
        let mut out = NewTasks::default();
        for run in steps.chunk_by(|a, b| a.user_id == b.user_id && a.task_id == b.task_id) {
            let (Some(first), Some(highest)) = (run.first(), run.last()) else {
                continue;
            };
            out.users.push(first.user_id);
            out.tasks.push(first.task_id);
            out.statuses.push(highest.result.status.as_str());
            out.last_steps.push(highest.step);
            out.counts
                .push(i64::try_from(run.len()).unwrap_or(i64::MAX));
            let times = run.iter().map(|p| p.timestamp.unwrap_or(now));
            out.first.push(times.clone().min().unwrap_or(now));
            out.last.push(times.max().unwrap_or(now));
        }
        out
    }

    fn len(&self) -> usize {
        self.users.len()
    }

    /// Each step's time (`now` for a step without one) and its task's start (the start its
    /// summary got: the task's earliest step time), in the order of `steps`, the steps
    /// these tasks were made [`of`](Self::of).
    fn times(&self, steps: &[PreparedStep<'_>], now: DateTime<Utc>) -> Vec<StepTimes> {
        steps
            .chunk_by(|a, b| a.user_id == b.user_id && a.task_id == b.task_id)
            .enumerate()
            .flat_map(|(task, run)| {
                let started = self.first.get(task).copied().unwrap_or(now);
                run.iter().map(move |p| StepTimes {
                    at: p.timestamp.unwrap_or(now),
                    started,
                })
            })
            .collect()
    }
}

/// A step's time and its task's start, as both bulk paths write them.
#[derive(Debug, Clone, Copy)]
struct StepTimes {
    at: DateTime<Utc>,
    started: DateTime<Utc>,
}

/// A batch for the bulk path.
pub(crate) struct CopyNewTasks<'a> {
    /// Sorted and de-duplicated by `prepare_batch`.
    pub(crate) steps: &'a [PreparedStep<'a>],
    pub(crate) connector: &'a Connector,
}

/// Saves the steps by `COPY` if every task they touch is new, in one transaction (by
/// [`INSERT_NEW_STEPS`](sql::INSERT_NEW_STEPS) when the operation declares its users to
/// row-level isolation: its transaction then declares them); `false` (nothing written)
/// when one is not, or another writer created one meanwhile: the caller then uses the
/// upsert statement.
pub(crate) fn run<'c, 'a>(
    conn: &'c mut RawSession,
    p: &'c CopyNewTasks<'a>,
) -> BoxFuture<'c, Result<bool, StoreError>> {
    Box::pin(async move {
        // One fact decides both: a declaring operation's transaction declares its users,
        // and its rows cannot go by `COPY`.
        let insert = crate::session::declared().is_some();
        let tx = Transaction::begin(conn, p.connector, OP, "").await?;
        let client = &tx.client;
        p.connector.observe(sql::TRANSACTION_TIME);
        let now = client
            .query_typed(sql::TRANSACTION_TIME, &[])
            .await
            .map_err(|e| from_postgres(OP, e))
            .and_then(|rows| {
                rows.first()
                    .ok_or_else(|| StoreError::database(OP, "SELECT now() returned no row"))?
                    .try_get::<_, DateTime<Utc>>(0)
                    .map_err(|e| StoreError::database(OP, e))
            });
        let result = match now {
            Ok(now) if insert => claim_and_insert(client, p.connector, p.steps, now).await,
            Ok(now) => claim_and_copy(client, p.connector, p.steps, now).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(true) => tx.commit().await.map(|()| true),
            Ok(false) => tx.rollback().await.map(|()| false),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    })
}

/// Bytes of `COPY` data sent at a time: large enough that the connection task is woken a
/// few times per batch, not once per page. The first chunk is encoded while the server runs
/// the claim.
const COPY_CHUNK: usize = 1 << 20;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Creates the summaries of `new`'s tasks ([`CLAIM_NEW_TASKS`](sql::CLAIM_NEW_TASKS)):
/// `true` when every one of them was new.
async fn claim(
    client: &tokio_postgres::Client,
    connector: &Connector,
    new: &NewTasks<'_>,
) -> Result<bool, StoreError> {
    let params: [(&(dyn ToSql + Sync), Type); 7] = [
        (&new.users, Type::TEXT_ARRAY),
        (&new.tasks, Type::TEXT_ARRAY),
        (&new.statuses, Type::TEXT_ARRAY),
        (&new.last_steps, Type::INT4_ARRAY),
        (&new.counts, Type::INT8_ARRAY),
        (&new.first, Type::TIMESTAMPTZ_ARRAY),
        (&new.last, Type::TIMESTAMPTZ_ARRAY),
    ];
    connector.observe(sql::CLAIM_NEW_TASKS);
    let claim = client
        .query_typed(sql::CLAIM_NEW_TASKS, &params)
        .await
        .map_err(|e| from_postgres(OP, e))?;
    let row = claim
        .first()
        .ok_or_else(|| StoreError::database(OP, "the claim statement returned no row"))?;
    let read = |e: tokio_postgres::Error| StoreError::database(OP, e);
    let claimed: i64 = row.try_get("claimed").map_err(read)?;
    Ok(usize::try_from(claimed).ok() == Some(new.len()))
}

/// Claims the tasks, encoding the first chunk of rows while the server runs the claim, then
/// (only if every task was new) sends the rows by `COPY`.
async fn claim_and_copy(
    client: &tokio_postgres::Client,
    connector: &Connector,
    steps: &[PreparedStep<'_>],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let new = NewTasks::of(steps, now);
    let mut rows = Rows::new(steps, &new, now);
    let mut buf = BytesMut::with_capacity(COPY_CHUNK + COPY_CHUNK / 4);
    // The binary COPY header: signature, flags, header extension length.
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0);
    buf.put_i32(0);
    let (claimed, done) = futures::join!(claim(client, connector, &new), async {
        rows.fill(&mut buf, COPY_CHUNK)
    });
    if !claimed? {
        return Ok(false);
    }
    connector.observe(sql::COPY_STEPS);
    match copy_steps(client, &mut rows, buf, done).await {
        Ok(()) => Ok(true),
        // A step row without its task's summary (left by hand, say): the upsert path
        // handles it.
        Err(CopyError::Server(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(CopyError::Server(e)) => Err(from_postgres(OP, e)),
        Err(CopyError::Encode(e)) => Err(StoreError::database(OP, e)),
        Err(CopyError::TooLarge) => Err(StoreError::database(OP, "a COPY field is over 2 GiB")),
    }
}

/// Claims the tasks, then (only if every task was new) sends the rows by `INSERT`s of
/// arrays ([`INSERT_NEW_STEPS`](sql::INSERT_NEW_STEPS), a statement per [`CHUNK_ROWS`]
/// rows): the path of a store that declares its users.
async fn claim_and_insert(
    client: &tokio_postgres::Client,
    connector: &Connector,
    steps: &[PreparedStep<'_>],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let new = NewTasks::of(steps, now);
    if !claim(client, connector, &new).await? {
        return Ok(false);
    }
    let times = new.times(steps, now);
    // In chunks, as the upsert path splits a batch: one statement's arrays stay far below
    // the server's limit on a message.
    for (steps, times) in steps.chunks(CHUNK_ROWS).zip(times.chunks(CHUNK_ROWS)) {
        let users: Vec<&str> = steps.iter().map(|p| p.user_id).collect();
        let tasks: Vec<&str> = steps.iter().map(|p| p.task_id).collect();
        let numbers: Vec<i32> = steps.iter().map(|p| p.step).collect();
        let results: Vec<Json<&TaskStepResult>> = steps.iter().map(|p| Json(p.result)).collect();
        let at: Vec<DateTime<Utc>> = times.iter().map(|t| t.at).collect();
        let statuses: Vec<&str> = steps.iter().map(|p| p.result.status.as_str()).collect();
        let started: Vec<DateTime<Utc>> = times.iter().map(|t| t.started).collect();
        let params: [(&(dyn ToSql + Sync), Type); 7] = [
            (&users, Type::TEXT_ARRAY),
            (&tasks, Type::TEXT_ARRAY),
            (&numbers, Type::INT4_ARRAY),
            (&results, Type::JSONB_ARRAY),
            (&at, Type::TIMESTAMPTZ_ARRAY),
            (&statuses, Type::TEXT_ARRAY),
            (&started, Type::TIMESTAMPTZ_ARRAY),
        ];
        connector.observe(sql::INSERT_NEW_STEPS);
        match client.query_typed(sql::INSERT_NEW_STEPS, &params).await {
            Ok(_) => {}
            // As for `COPY`: a step row without its task's summary goes by the upsert path.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(false),
            Err(e) => return Err(from_postgres(OP, e)),
        }
    }
    Ok(true)
}

/// Sends `buf` (the header and the first rows; `done` says whether they were all) and the
/// rest of `rows`, a chunk at a time.
async fn copy_steps(
    client: &tokio_postgres::Client,
    rows: &mut Rows<'_, '_>,
    mut buf: BytesMut,
    mut done: Result<bool, CopyError>,
) -> Result<(), CopyError> {
    let sink = client.copy_in::<_, Bytes>(sql::COPY_STEPS).await?;
    futures::pin_mut!(sink);
    loop {
        if done? {
            buf.put_i16(-1);
            sink.send(buf.freeze()).await?;
            break;
        }
        sink.send(buf.split().freeze()).await?;
        done = rows.fill(&mut buf, COPY_CHUNK);
    }
    sink.finish().await?;
    Ok(())
}

/// The rows of a `COPY` batch, encoded a chunk at a time.
struct Rows<'s, 'a> {
    steps: &'s [PreparedStep<'a>],
    /// Each step's time and its task's start ([`NewTasks::times`]).
    times: Vec<StepTimes>,
    /// The next step to encode.
    next: usize,
}

impl<'s, 'a> Rows<'s, 'a> {
    fn new(steps: &'s [PreparedStep<'a>], new: &NewTasks<'a>, now: DateTime<Utc>) -> Self {
        Rows {
            steps,
            times: new.times(steps, now),
            next: 0,
        }
    }

    /// Encodes rows into `buf` until it holds `limit` bytes or the rows run out; `true`
    /// when they ran out.
    fn fill(&mut self, buf: &mut BytesMut, limit: usize) -> Result<bool, CopyError> {
        while let (Some(p), Some(t)) = (self.steps.get(self.next), self.times.get(self.next)) {
            if buf.len() >= limit {
                return Ok(false);
            }
            encode_row(buf, p, t.at, t.started)?;
            self.next += 1;
        }
        Ok(true)
    }
}

/// One row of `COPY_STEPS` in PostgreSQL's binary format: a field count, then each field's
/// length and bytes (text as UTF-8, int4 and timestamptz big-endian, jsonb as version 1
/// followed by the JSON text).
fn encode_row(
    buf: &mut BytesMut,
    p: &PreparedStep<'_>,
    ts: DateTime<Utc>,
    started: DateTime<Utc>,
) -> Result<(), CopyError> {
    buf.put_i16(7);
    put_text(buf, p.user_id)?;
    put_text(buf, p.task_id)?;
    buf.put_i32(4);
    buf.put_i32(p.step);
    let at = buf.len();
    buf.put_i32(0);
    buf.put_u8(1);
    serde_json::to_writer((&mut *buf).writer(), p.result).map_err(CopyError::Encode)?;
    let len = i32::try_from(buf.len() - at - 4).map_err(|_| CopyError::TooLarge)?;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    put_time(buf, ts);
    put_text(buf, p.result.status.as_str())?;
    put_time(buf, started);
    Ok(())
}

fn put_text(buf: &mut BytesMut, text: &str) -> Result<(), CopyError> {
    buf.put_i32(i32::try_from(text.len()).map_err(|_| CopyError::TooLarge)?);
    buf.put_slice(text.as_bytes());
    Ok(())
}

fn put_time(buf: &mut BytesMut, t: DateTime<Utc>) {
    buf.put_i32(8);
    buf.put_i64(t.timestamp_micros().saturating_sub(PG_EPOCH_MICROS));
}

/// Why `COPY` data could not be sent.
#[derive(Debug)]
enum CopyError {
    Server(tokio_postgres::Error),
    Encode(serde_json::Error),
    TooLarge,
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        CopyError::Server(e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone;
    use taskhistory_core::{StepRecord, TaskStepResult};

    #[test]
    fn a_summary_per_task_from_its_highest_step_and_its_times() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap();
        let done = TaskStepResult::success("done", serde_json::json!({}), "");
        let run = TaskStepResult::running("s", serde_json::json!({}), "");
        let records = vec![
            StepRecord::new("u", "b", 1, done.clone()).at(t(5)),
            StepRecord::new("u", "a", 0, run.clone()).at(t(9)),
            StepRecord::new("u", "b", 0, run.clone()).at(t(7)),
            StepRecord::new("u", "a", 2, run.clone()),
            StepRecord::new("v", "a", 3, done.clone()),
        ];
        let steps = taskhistory_core::validate::prepare_batch(&records).unwrap();
        let now = t(8);
        let new = NewTasks::of(&steps, now);
        assert_eq!(new.users, ["u", "u", "v"]);
        assert_eq!(new.tasks, ["a", "b", "a"]);
        assert_eq!(new.statuses, ["running", "completed", "completed"]);
        assert_eq!(new.last_steps, [2, 1, 3]);
        assert_eq!(new.counts, [2, 2, 1]);
        // Task u/a: step 0 at t(9), step 2 without a time (now = t(8)).
        assert_eq!(new.first, [t(8), t(5), t(8)]);
        assert_eq!(new.last, [t(9), t(7), t(8)]);
    }
}
