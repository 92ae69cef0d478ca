//! The store's methods for operators and tools (the `taskhistory` commands, dashboards):
//! figures, migrations, retention with options, partitions, the Python compatibility mode,
//! statistics and plans. Each hands the work to the module below that does it.

use std::time::{Duration, Instant};

use taskhistory_core::validate;
use taskhistory_core::{CleanupReport, StoreError, TaskCounts, TaskStatus, TaskSummary};

use super::PgTaskHistoryStore;
use crate::compat::{self, PythonCompat};
use crate::exec::{Call, PoolStats, StoreMetrics, Tx};
use crate::explain::{self, QueryStats, StatementPlan};
use crate::isolation::IsolationState;
use crate::layout::{Layout, PartitionInfo, Partitioning};
use crate::migrate::{self, MigrationState};
use crate::ops::{self, cleanup::Expired};
use crate::partition;
use crate::replica::ReplicaState;
use crate::stats::{self, StoreStats};

/// Options of [`PgTaskHistoryStore::cleanup_old_tasks_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupOptions {
    /// Tasks removed per transaction (default 1,000): small enough that writers never wait
    /// long behind a batch.
    pub batch_size: i64,
    /// Stop after this long, leaving the rest for the next run (default: no limit).
    pub time_limit: Option<Duration>,
    /// Only count what would be removed.
    pub dry_run: bool,
    /// Only tasks whose current status is this one (per-status retention: e.g. keep failed
    /// tasks 90 days and completed ones 30, with two runs). `None`: every status.
    pub status: Option<TaskStatus>,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            batch_size: 1_000,
            time_limit: None,
            dry_run: false,
            status: None,
        }
    }
}

impl PgTaskHistoryStore {
    /// Pool figures.
    pub fn pool_stats(&self) -> PoolStats {
        self.backend.exec().pool_stats(self.config().max_size)
    }

    /// Operation counters since start.
    pub fn metrics(&self) -> StoreMetrics {
        let watch = self.tail.metrics();
        let (
            reads_primary,
            reads_replicas,
            replica_fallbacks,
            replica_lag_ms,
            replicas_in_rotation,
        ) = self
            .backend
            .replicas()
            .map(|r| r.counts())
            .unwrap_or_default();
        StoreMetrics {
            reads_primary,
            reads_replicas,
            replica_fallbacks,
            replica_lag_ms,
            replicas_in_rotation,
            watchers: watch.watchers,
            tail_reads: watch.tail_reads,
            watcher_reads: watch.own_reads,
            watcher_fallbacks: watch.fallbacks,
            tail_lag_ms: watch.lag_ms,
            tail_lag_events: watch.lag_events,
            queued_saves: self.combiner.as_ref().map_or(0, |c| c.queued()),
            queued_status_checks: self.statuses.as_ref().map_or(0, |c| c.queued()),
            ..self.backend.exec().metrics()
        }
    }

    /// Each replica of [`PgConfig::read_urls`](crate::PgConfig::read_urls): in the rotation
    /// or not, reads served, lag, replayed position (empty without replicas).
    pub fn replicas(&self) -> Vec<ReplicaState> {
        self.backend
            .replicas()
            .map(|r| r.states())
            .unwrap_or_default()
    }

    /// A position token for `user`: text to hand to
    /// [`require_position`](Self::require_position) of another store of the same primary
    /// (another process, behind another load balancer), whose reads of `user` then see every
    /// write for `user` that returned through this store before this call. `None`: nothing
    /// to carry (no write of `user` that replicas may not have replayed; only with replicas).
    /// With replicas it waits for the refresher's next sample when the user's latest write
    /// is not covered yet; without, it reads the primary's WAL position (one statement).
    /// The token is a WAL position in PostgreSQL's text form (`16/B374D848`).
    pub async fn position(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        validate::user_id(user_id)?;
        self.backend.position(user_id).await
    }

    /// Reads of `user_id` through this store see the position `token` (from
    /// [`position`](Self::position) of any store of the same primary): they go to a
    /// replica only once it has replayed it. A token that is not one is
    /// `StoreError::InvalidInput` naming `position`. Nothing to do without replicas (the
    /// primary has every write).
    pub fn require_position(&self, user_id: &str, token: &str) -> Result<(), StoreError> {
        validate::user_id(user_id)?;
        self.backend.require_position(user_id, token)
    }

    /// Whether the server's messages reach the store untranslated (`lc_messages = 'C'`),
    /// which the error map needs to tell a statement timeout, a deadlock or a shutdown from
    /// other errors on a server that does not speak English. `false` behind a transaction
    /// pooler, or when the role may not set `lc_messages` (PostgreSQL 15+:
    /// `GRANT SET ON PARAMETER lc_messages TO <role>`, part of
    /// [`least_privilege_grants`](crate::least_privilege_grants)).
    pub fn untranslated_messages(&self) -> bool {
        self.backend.connector().untranslated()
    }

    /// Row-level isolation's state in the store's schema, read from the catalog (and, when
    /// another process switched it since this store opened, taken up: this store declares
    /// its operations' users from now on if it is on).
    pub async fn isolation(&self) -> Result<IsolationState, StoreError> {
        crate::isolation::state(&self.backend).await
    }

    /// Switches row-level isolation on or off (`taskhistory isolation on|off`): `ENABLE`
    /// and `FORCE ROW LEVEL SECURITY` on every table holding users' rows, whose policies
    /// (migration 8) then let each operation see and write only the users it declares.
    /// Must be run by the tables' owner. Stores opened earlier in other processes declare
    /// only if they were opened with [`PgConfig::declare_users`](crate::PgConfig::declare_users)
    /// (or call [`isolation`](Self::isolation)): switch those on first, or restart them
    /// after (docs/reliability.md, "Row-level isolation").
    pub async fn set_isolation(&self, on: bool) -> Result<IsolationState, StoreError> {
        self.every_user("set_isolation")?;
        crate::isolation::set(&self.backend, on).await
    }

    /// The embedded migrations and which are applied.
    pub async fn migration_status(&self) -> Result<Vec<MigrationState>, StoreError> {
        let schema = self.config().get_schema().map(str::to_owned);
        self.backend
            .exec()
            .own(Call::new(migrate::OP), &schema, migrate::status_work)
            .await
    }

    /// [`cleanup_old_tasks`](taskhistory_core::TaskHistoryStore::cleanup_old_tasks) with a batch size, a time
    /// limit, a dry run, and `progress` called with the running total after each batch.
    pub async fn cleanup_old_tasks_with(
        &self,
        days_old: i64,
        options: CleanupOptions,
        progress: &(dyn Fn(CleanupReport) + Send + Sync),
    ) -> Result<CleanupReport, StoreError> {
        self.every_user("cleanup_old_tasks")?;
        validate::days(days_old)?;
        if !(1..=100_000).contains(&options.batch_size) {
            return Err(StoreError::invalid(
                "batch_size",
                format!("is {}; it must be between 1 and 100000", options.batch_size),
            ));
        }
        let expired = Expired {
            days: i32::try_from(days_old)
                .map_err(|_| StoreError::invalid("days_old", "too large"))?,
            status: options.status,
            limit: options.batch_size,
        };
        let b = &*self.backend;
        let exec = b.exec();
        let call = Call::maintenance(ops::cleanup::OP);
        if options.dry_run {
            return exec
                .pooled(call, Tx::Statement, &expired, ops::cleanup::preview)
                .await;
        }
        // Removed tasks of any user: every later read must see the removal.
        let _written = b.all_written();
        let started = Instant::now();
        let deadline = options.time_limit.map(|limit| started + limit);
        // The activity of the hours before the cutoff goes first (a cleanup that runs out
        // of time still trims it; not for a per-status run: those hours hold other
        // statuses' tasks' activity too).
        if options.status.is_none() {
            let trim = ops::counts::Trim {
                days: expired.days,
                limit: expired.limit.saturating_mul(10),
            };
            loop {
                let trimmed = exec
                    .pooled(call, Tx::Statement, &trim, ops::counts::trim)
                    .await?;
                let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
                if trimmed < trim.limit || out_of_time {
                    break;
                }
            }
        }
        // Partitioned layout: whole expired partitions go first, then batched deletes take
        // the expired tasks left (in the default partition, or in partitions that keep an
        // active task).
        let mut total =
            partition::drop_expired(b, expired.days, options.status, deadline, progress).await?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(total);
        }
        loop {
            let batch = exec
                .pooled(call, Tx::Statement, &expired, ops::cleanup::batch)
                .await?;
            total.tasks_removed += batch.tasks_removed;
            total.steps_removed += batch.steps_removed;
            progress(total);
            let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
            if batch.tasks_removed < u64::try_from(expired.limit).unwrap_or(0) || out_of_time {
                return Ok(total);
            }
        }
    }

    /// Every user's tasks per status: kept by the writes like
    /// [`task_counts`](taskhistory_core::TaskHistoryStore::task_counts), read without a scan.
    pub async fn task_totals(&self) -> Result<TaskCounts, StoreError> {
        self.every_user("task_totals")?;
        let call = Call::new(ops::counts::TOTALS);
        self.backend
            .exec()
            .read(call, &(), ops::counts::totals)
            .await
    }

    /// The `limit` (1 to 1,000) most recently updated failed or timed-out tasks of any user,
    /// newest first, each with its user: an operator's view across users (the dashboard's
    /// overview). Read from a partial index holding only those tasks (migration 7), so it
    /// reads `limit` rows whatever the store's size. `InvalidInput` naming `limit` outside
    /// 1 to 1,000.
    pub async fn recent_failures(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, TaskSummary)>, StoreError> {
        self.every_user("recent_failures")?;
        if !(1..=1_000).contains(&limit) {
            return Err(StoreError::invalid(
                "limit",
                format!("{limit} is not between 1 and 1000"),
            ));
        }
        let call = Call::maintenance(ops::counts::RECENT_FAILURES);
        self.backend
            .exec()
            .read(call, &limit, ops::counts::recent_failures)
            .await
    }

    /// Whether `task_history` is plain or partitioned (and by what interval).
    pub async fn layout(&self) -> Result<Layout, StoreError> {
        partition::layout(&self.backend).await
    }

    /// The partitions of the partitioned layout, oldest first, the default one first of
    /// all; empty on the plain layout.
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>, StoreError> {
        partition::list(&self.backend).await
    }

    /// Makes sure a partition exists for the current period and `ahead` more; returns the
    /// names of those it made. Rows the default partition holds for a new partition's range
    /// move into it. Takes only a SHARE UPDATE EXCLUSIVE lock on the table (reads and writes
    /// go on; the default partition is locked while it is checked). Safe to run from many
    /// processes at once. `InvalidInput` on the plain layout.
    pub async fn ensure_partitions(&self, ahead: u32) -> Result<Vec<String>, StoreError> {
        self.every_user("ensure_partitions")?;
        partition::ensure(&self.backend, ahead).await
    }

    /// Converts the plain table into the partitioned layout (documented in
    /// `docs/operations.md`): one transaction that makes the partitioned table, a default
    /// partition and one partition per period from the oldest task's start (at most 120
    /// periods back) to `ahead` periods past the current one, copies every row (each with
    /// its task's start), and drops the plain table. Writes wait while it runs (reads go on);
    /// if it fails, nothing changed. Returns the partitions made; does nothing and returns
    /// none when the table is already partitioned. Grants on the table must be given again
    /// ([`least_privilege_grants`](crate::least_privilege_grants)).
    pub async fn convert_to_partitioned(
        &self,
        partitioning: Partitioning,
    ) -> Result<Vec<String>, StoreError> {
        self.every_user("convert_to_partitioned")?;
        partition::convert(&self.backend, partitioning).await
    }

    /// The Python compatibility mode's state (operators: `taskhistory compat`, `stats`,
    /// `health`).
    pub async fn python_compat(&self) -> Result<PythonCompat, StoreError> {
        compat::state(&self.backend).await
    }

    /// Switches the Python compatibility mode on (the procedure is in
    /// `docs/migrating-from-python.md`): from the commit on, the Python service's unchanged
    /// statements keep the store's rules. Idempotent. Needs the rights to create functions
    /// and triggers on the table (the schema's owner); takes a short exclusive lock on
    /// `task_history` (waiting at most 5 s for it).
    pub async fn enable_python_compat(&self) -> Result<PythonCompat, StoreError> {
        self.every_user("enable_python_compat")?;
        compat::enable(&self.backend).await
    }

    /// Switches the Python compatibility mode off, once no Python writer is left: its
    /// triggers and functions go, and the Python service's indexes (placeholders, or
    /// indexes a Python start-up made again). From then on a Python `INSERT` fails (it
    /// names no `started_at`). Idempotent.
    pub async fn disable_python_compat(&self) -> Result<PythonCompat, StoreError> {
        self.every_user("disable_python_compat")?;
        compat::disable(&self.backend).await
    }

    /// Statistics for operators: tasks and steps per status, activity range, table and index
    /// sizes, pool figures. It reads every summary row (one per task): run it from tools, not
    /// from request paths.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.every_user("stats")?;
        stats::stats(&self.backend).await
    }

    /// The plans PostgreSQL uses for the store's statements (the generic plans its cached
    /// prepared statements get), with `user`/`task` as sample arguments. With `analyze`,
    /// each statement also runs (`EXPLAIN ANALYZE, BUFFERS`) inside a transaction that is
    /// rolled back.
    pub async fn explain(
        &self,
        user: &str,
        task: &str,
        analyze: bool,
    ) -> Result<Vec<StatementPlan>, StoreError> {
        explain::explain(&self.backend, user, task, analyze).await
    }

    /// The store's statements from `pg_stat_statements`, most total time first; a
    /// `StoreError::Database` saying how to enable the extension when it is not.
    pub async fn query_stats(&self, limit: i64) -> Result<Vec<QueryStats>, StoreError> {
        explain::top_queries(&self.backend, limit).await
    }
}
