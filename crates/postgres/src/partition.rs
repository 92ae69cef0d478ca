//! The partitioned layout (opt-in): `task_history` range-partitioned by each task's start
//! time, partitions made ahead of time, a default partition so that no write ever fails for
//! lack of one, and retention that drops whole expired partitions instead of deleting rows.
//!
//! The key is the task's start (`started_at`, fixed when the task is first saved and carried
//! on every step row), not the step's own timestamp: all of a task's steps live in one
//! partition, so dropping a partition removes whole tasks, never the early steps of a task
//! that is still active. A partition is dropped only when none of its tasks has activity
//! inside the cutoff (nor, with a status filter, is in another status); its tasks' summary
//! rows go in the same transaction. Every other expired task is removed by the batched
//! deletes of the plain layout.
//!
//! Not for: the plain layout (nothing here runs unless the table is partitioned), or
//! partitioning by anything but time.

use std::time::Instant;

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Utc};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures::future::BoxFuture;
use taskhistory_core::{CleanupReport, StoreError, TaskStatus};

use crate::backend::Backend;
use crate::compat;
use crate::error::{from_diesel, PRIVILEGES};
use crate::exec::{Call, Tx};
use crate::ops::{
    self,
    rows::{report, CleanupRow},
};
use crate::sql::{self, ddl, Statement};

use crate::layout::{Layout, PartitionInfo, PartitionInterval, Partitioning};

/// Partitions further back than this are not made by a conversion: older tasks go to the
/// default partition (and leave by batched deletes).
const MAX_PERIODS_BACK: i64 = 120;
/// How long a retention drop waits for its locks before giving up on this partition (it
/// is tried again, then left for the next run): writers never queue longer than this.
const DROP_LOCK_WAIT_MS: u128 = 50;

#[derive(QueryableByName)]
struct PartitionRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    range_from: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    range_to: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    #[diesel(sql_type = BigInt)]
    estimated_rows: i64,
}

#[derive(QueryableByName)]
struct StartRange {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct Kept {
    #[diesel(sql_type = Bool)]
    kept: bool,
}

use crate::ops::layout::OP;
const CLEANUP: &str = "cleanup_old_tasks";

async fn list_on(conn: &mut AsyncPgConnection) -> Result<Vec<PartitionInfo>, StoreError> {
    let rows: Vec<PartitionRow> = Statement::new(sql::PARTITION_LIST)
        .fetch(conn)
        .await
        .map_err(|e| from_diesel(OP, e))?;
    Ok(rows
        .into_iter()
        .map(|r| PartitionInfo {
            name: r.name,
            from: r.range_from,
            to: r.range_to,
            bytes: u64::try_from(r.bytes).unwrap_or(0),
            estimated_rows: u64::try_from(r.estimated_rows).unwrap_or(0),
        })
        .collect())
}

fn list_work<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<Vec<PartitionInfo>, StoreError>> {
    Box::pin(list_on(conn))
}

/// A partition that retention may drop: its name and range, the cutoff in days, the
/// status filter.
struct Retire {
    name: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    days: i32,
    status: Option<TaskStatus>,
}

/// Whether a task in the partition's range must stay (activity inside the cutoff, or
/// another status than the one retention removes).
fn keeps_tasks<'c>(
    conn: &'c mut AsyncPgConnection,
    args: &'c Retire,
) -> BoxFuture<'c, Result<bool, StoreError>> {
    Box::pin(async move {
        let rows: Vec<Kept> = Statement::new(sql::PARTITION_KEEPS_TASKS)
            .bind::<Timestamptz, _>(args.from)
            .bind::<Timestamptz, _>(args.to)
            .bind::<Integer, _>(args.days)
            .bind::<Nullable<Text>, _>(args.status.map(TaskStatus::as_str))
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(CLEANUP, e))?;
        Ok(rows.first().is_none_or(|r| r.kept))
    })
}

/// A partition's name: `task_history_p` and its first day, `YYYYMMDD`.
fn partition_name(from: DateTime<Utc>) -> Option<String> {
    (1..=9999)
        .contains(&from.year())
        .then(|| format!("task_history_p{}", from.format("%Y%m%d")))
}

/// An instant as a SQL literal's text (UTC, RFC 3339).
fn literal(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Ranged partitions (name, from, to) for the periods from `first` to `last` inclusive,
/// skipping any that overlaps one of `existing`.
fn periods(
    interval: PartitionInterval,
    first: DateTime<Utc>,
    count: i64,
    existing: &[PartitionInfo],
) -> Vec<(String, String, String)> {
    (0..count)
        .filter_map(|n| {
            let from = interval.shift(first, n)?;
            let to = interval.shift(first, n + 1)?;
            if existing.iter().any(|p| p.overlaps(from, to)) {
                return None;
            }
            Some((partition_name(from)?, literal(from), literal(to)))
        })
        .collect()
}

/// At start-up, after the migrations: converts to the partitioned layout when the
/// configuration asks for it ([`PgConfig::partitioning`](crate::PgConfig::partitioning)),
/// and on the partitioned layout makes the partitions ahead.
pub(crate) async fn prepare(b: &Backend) -> Result<(), StoreError> {
    let wanted = b.config().get_partitioning();
    if let Some(partitioning) = wanted {
        convert(b, partitioning).await?;
    }
    if matches!(layout(b).await?, Layout::Partitioned { .. }) {
        let ahead = wanted.unwrap_or_default().ahead;
        // A role without DDL rights cannot make partitions; writes still land (in the
        // default partition), so the store starts and says why.
        if let Err(error) = ensure(b, ahead).await {
            tracing::warn!(%error, "could not make partitions ahead; writes go to the default partition until `taskhistory partitions ensure` runs");
        }
    }
    Ok(())
}

/// The layout (`PgTaskHistoryStore::layout`).
pub(crate) async fn layout(b: &Backend) -> Result<Layout, StoreError> {
    b.exec()
        .pooled(Call::new(OP), Tx::Statement, &(), ops::layout::run)
        .await
}

/// The partitions (`PgTaskHistoryStore::partitions`).
pub(crate) async fn list(b: &Backend) -> Result<Vec<PartitionInfo>, StoreError> {
    b.exec()
        .pooled(Call::new(OP), Tx::Statement, &(), list_work)
        .await
}

fn ensure_work<'c>(
    c: &'c mut AsyncPgConnection,
    &(interval, ahead): &'c (PartitionInterval, u32),
) -> BoxFuture<'c, Result<Option<Vec<String>>, StoreError>> {
    Box::pin(async move {
        // Listed under the lock: another process may just have made some.
        let existing = list_on(c).await?;
        let first = interval.floor(Utc::now());
        let missing = periods(interval, first, i64::from(ahead) + 1, &existing);
        for (name, from, to) in &missing {
            c.batch_execute(&ddl::add_partition(name, from, to))
                .await
                .map_err(|e| from_diesel(OP, e))?;
        }
        Ok(Some(missing.into_iter().map(|(name, _, _)| name).collect()))
    })
}

/// Makes the partitions ahead (`PgTaskHistoryStore::ensure_partitions`).
pub(crate) async fn ensure(b: &Backend, ahead: u32) -> Result<Vec<String>, StoreError> {
    let Layout::Partitioned { interval } = layout(b).await? else {
        return Err(StoreError::invalid(
            "layout",
            "task_history is not partitioned: convert it first (`taskhistory partitions \
             convert`, or PgConfig::partitioning with init_database_schema)",
        ));
    };
    let made = b
        .exec()
        .dedicated(
            Call::new(OP),
            &b.ddl_setup(),
            &(interval, ahead),
            ensure_work,
        )
        .await?
        .unwrap_or_default();
    if !made.is_empty() {
        tracing::info!(partitions = ?made, "partitions made");
    }
    Ok(made)
}

fn convert_work<'c>(
    c: &'c mut AsyncPgConnection,
    (partitioning, channel): &'c (Partitioning, String),
) -> BoxFuture<'c, Result<Option<Vec<String>>, StoreError>> {
    Box::pin(async move {
        if ops::layout::layout_on(c).await? != Layout::Plain {
            // Another process converted it while this one waited for the lock.
            return Ok(Some(Vec::new()));
        }
        let oldest = Statement::new(sql::PARTITION_START_RANGE)
            .fetch::<StartRange, _>(c)
            .await
            .map_err(|e| from_diesel(OP, e))?
            .into_iter()
            .next()
            .and_then(|r| r.oldest);
        let interval = partitioning.interval;
        let now = interval.floor(Utc::now());
        let back = oldest.map_or(0, |o| {
            let o = interval.floor(o);
            (0..MAX_PERIODS_BACK)
                .find(|n| interval.shift(now, -n).is_some_and(|s| s <= o))
                .unwrap_or(MAX_PERIODS_BACK)
        });
        let first = interval.shift(now, -back).unwrap_or(now);
        let count = back + i64::from(partitioning.ahead) + 1;
        let parts = periods(interval, first, count, &[]);
        // The Python compatibility mode's triggers go with the plain table: made again on
        // the new one.
        let compat_on = compat::state_on(c).await?.enabled;
        c.batch_execute(&ddl::convert(interval.as_str(), &parts))
            .await
            .map_err(|e| from_diesel(OP, e))?;
        if compat_on {
            compat::install_on(c, channel).await?;
        }
        Ok(Some(parts.into_iter().map(|(name, _, _)| name).collect()))
    })
}

/// Converts to the partitioned layout (`PgTaskHistoryStore::convert_to_partitioned`).
pub(crate) async fn convert(
    b: &Backend,
    partitioning: Partitioning,
) -> Result<Vec<String>, StoreError> {
    if layout(b).await? != Layout::Plain {
        return Ok(Vec::new());
    }
    let args = (partitioning, b.channel().to_owned());
    let made = b
        .exec()
        .dedicated(Call::maintenance(OP), &b.ddl_setup(), &args, convert_work)
        .await?
        .unwrap_or_default();
    tracing::info!(
        partitions = made.len(),
        "task_history converted to the partitioned layout"
    );
    Ok(made)
}

/// Retention on the partitioned layout: drops each partition whose range ended before the
/// cutoff and none of whose tasks must stay, with its tasks' summaries; returns what went.
/// Each drop waits at most 50 ms for its locks (so writers queue no longer behind it), is
/// retried by the retry policy, and is otherwise left to the batched deletes and the next
/// run. Nothing on the plain layout.
pub(crate) async fn drop_expired(
    b: &Backend,
    days: i32,
    status: Option<TaskStatus>,
    deadline: Option<Instant>,
    progress: &(dyn Fn(CleanupReport) + Send + Sync),
) -> Result<CleanupReport, StoreError> {
    let mut total = CleanupReport::default();
    if !matches!(layout(b).await?, Layout::Partitioned { .. }) {
        return Ok(total);
    }
    let cutoff = Utc::now() - TimeDelta::days(i64::from(days));
    let candidates: Vec<PartitionInfo> = b
        .exec()
        .pooled(Call::new(CLEANUP), Tx::Statement, &(), list_work)
        .await?
        .into_iter()
        .filter(|p| p.to.is_some_and(|to| to <= cutoff))
        .collect();
    let setup = b.ddl_setup_waiting(DROP_LOCK_WAIT_MS);
    for partition in candidates {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (Some(from), Some(to)) = (partition.from, partition.to) else {
            continue;
        };
        let args = Retire {
            name: partition.name,
            from,
            to,
            days,
            status,
        };
        if b.exec()
            .pooled(
                Call::maintenance(CLEANUP),
                Tx::Statement,
                &args,
                keeps_tasks,
            )
            .await?
        {
            continue;
        }
        match b
            .exec()
            .dedicated(Call::maintenance(CLEANUP), &setup, &args, retire)
            .await
        {
            Ok(Some(report)) => {
                tracing::info!(partition = %args.name, tasks = report.tasks_removed, steps = report.steps_removed, "partition dropped");
                total.tasks_removed += report.tasks_removed;
                total.steps_removed += report.steps_removed;
                total.partitions_dropped += 1;
                progress(total);
            }
            Ok(None) => {}
            // The lock wait limit reached, or a deadlock with a writer, on every attempt:
            // the writers go on, the partition waits for the next run.
            Err(e @ (StoreError::Timeout { .. } | StoreError::Conflict { .. })) => {
                tracing::debug!(partition = %args.name, error = %e, "partition drop gave way");
            }
            // A role with only the store's DML rights may not lock or drop a partition
            // (the error map makes a missing right a configuration error): retention then
            // goes on by batched deletes.
            Err(StoreError::Configuration { setting, reason }) if setting == PRIVILEGES => {
                let e = StoreError::Configuration { setting, reason };
                tracing::warn!(error = %e, "this role may not drop partitions; expired tasks are removed by batched deletes (run cleanup as the tables' owner to drop whole partitions)");
                return Ok(total);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// One partition drop: writes into it stop, its expired tasks' summaries go, and if no task
/// is left in its range it is dropped; otherwise everything is rolled back (`None`, also
/// when the partition is gone already).
fn retire<'c>(
    c: &'c mut AsyncPgConnection,
    args: &'c Retire,
) -> BoxFuture<'c, Result<Option<CleanupReport>, StoreError>> {
    Box::pin(async move {
        let fail = |e| from_diesel(CLEANUP, e);
        // Dropped already: by another process's cleanup that held the advisory lock before
        // this one, or by this cleanup's earlier attempt whose answer was lost.
        let present: Vec<Kept> = Statement::new(sql::PARTITION_PRESENT)
            .bind::<Text, _>(args.name.clone())
            .fetch(c)
            .await
            .map_err(fail)?;
        if !present.first().is_some_and(|r| r.kept) {
            return Ok(None);
        }
        c.batch_execute(&ddl::lock_partition(&args.name))
            .await
            .map_err(fail)?;
        let retired: Vec<CleanupRow> = Statement::new(sql::PARTITION_RETIRE_TASKS)
            .bind::<Timestamptz, _>(args.from)
            .bind::<Timestamptz, _>(args.to)
            .bind::<Integer, _>(args.days)
            .bind::<Nullable<Text>, _>(args.status.map(TaskStatus::as_str))
            .fetch(c)
            .await
            .map_err(fail)?;
        let left: Vec<Kept> = Statement::new(sql::PARTITION_HAS_TASKS)
            .bind::<Timestamptz, _>(args.from)
            .bind::<Timestamptz, _>(args.to)
            .fetch(c)
            .await
            .map_err(fail)?;
        if left.first().is_none_or(|r| r.kept) {
            return Ok(None);
        }
        c.batch_execute(&ddl::drop_partition(&args.name))
            .await
            .map_err(fail)?;
        Ok(Some(report(retired)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_start_on_calendar_boundaries() {
        let t = at("2026-11-25T13:45:00Z");
        assert_eq!(PartitionInterval::Day.floor(t), at("2026-11-25T00:00:00Z"));
        assert_eq!(PartitionInterval::Week.floor(t), at("2026-11-23T00:00:00Z"));
        assert_eq!(
            PartitionInterval::Month.floor(t),
            at("2026-11-01T00:00:00Z")
        );
        let m = PartitionInterval::Month;
        assert_eq!(m.shift(m.floor(t), 2), Some(at("2027-01-01T00:00:00Z")));
        assert_eq!(m.shift(m.floor(t), -11), Some(at("2025-12-01T00:00:00Z")));
        assert_eq!("Weekly".parse(), Ok(PartitionInterval::Week));
        assert!("hourly".parse::<PartitionInterval>().is_err());
    }

    #[test]
    fn periods_skip_existing_ranges() {
        let m = PartitionInterval::Month;
        let existing = [PartitionInfo {
            name: "task_history_p20261201".into(),
            from: Some(at("2026-12-01T00:00:00Z")),
            to: Some(at("2027-01-01T00:00:00Z")),
            bytes: 0,
            estimated_rows: 0,
        }];
        let made = periods(m, at("2026-11-01T00:00:00Z"), 3, &existing);
        let names: Vec<&str> = made.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["task_history_p20261101", "task_history_p20270101"]);
        assert_eq!(made[0].1, "2026-11-01T00:00:00Z");
        assert_eq!(made[0].2, "2026-12-01T00:00:00Z");
    }
}
