//! [`PgTaskHistoryStore`]: the [`TaskHistoryStore`] on PostgreSQL. A thin layer: each
//! method validates its input, hands the operation of [`crate::ops`] to the
//! [executor](crate::exec), and passes committed writes' events to the notifier.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use taskhistory_core::validate::{self, PreparedStep};
use taskhistory_core::{
    CleanupReport, EventCursor, HealthReport, HistoryEntry, HistoryPage, HistoryScan, StepRecord,
    StoreError, TaskEventStream, TaskHistoryStore, TaskPage, TaskQuery, TaskStatus, TaskStepResult,
};

use crate::config::PgConfig;
use crate::connection::Connector;
use crate::exec::{Call, Executor, PoolStats, StoreMetrics, Tx};
use crate::listen::Hub;
use crate::migrate::{self, MigrationState};
use crate::notify::Notifier;
use crate::ops::{self, cleanup::Expired, rows::TaskKey};

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

struct Inner {
    exec: Executor,
    config: PgConfig,
    /// The notification channel of this schema: wake-ups of watchers.
    channel: String,
    /// Wakes other processes' watchers after this store's writes (when notifications are
    /// on).
    notifier: Option<Notifier>,
    hub: Hub,
    /// Combines concurrent single saves (when `save_lanes` is not 0).
    combiner: Option<Arc<crate::combine::Combiner>>,
}

/// The PostgreSQL store: diesel-async over a bb8 pool. Cheap to clone (clones share the pool).
///
/// Every operation is one statement (one round trip), retried on transient errors by the
/// configured [`RetryPolicy`](taskhistory_core::RetryPolicy), bounded by the client command
/// timeout, and traced with a `taskhistory` span (operation, user_id, task_id, rows,
/// elapsed_ms). Single saves of concurrent callers may share a statement and its commit
/// ([`PgConfig::save_lanes`]); each caller is answered after that commit, with its own
/// outcome.
#[derive(Clone)]
pub struct PgTaskHistoryStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for PgTaskHistoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTaskHistoryStore")
            .field("config", &self.inner.config)
            .field("pool", &self.pool_stats())
            .finish()
    }
}

impl PgTaskHistoryStore {
    /// Connects with `config`. One connection is opened at once, so a wrong password, an
    /// unknown database or an unreachable server fails here with the server's own reason;
    /// the pool then fills to `min_size` in the background. Does not migrate: call
    /// [`init_database_schema`](TaskHistoryStore::init_database_schema).
    pub async fn connect(config: PgConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let exec = Executor::connect(&config).await?;
        let channel = format!(
            "taskhistory_{}",
            config.schema.as_deref().unwrap_or("public")
        );
        let notifier = config
            .notifications
            .then(|| Notifier::new(exec.connector().clone(), channel.clone()));
        let combiner = (config.save_lanes > 0).then(|| {
            crate::combine::Combiner::new(
                config.save_lanes,
                config.combine_lone_saves,
                config.pool_timeout,
            )
        });
        Ok(PgTaskHistoryStore {
            inner: Arc::new(Inner {
                exec,
                config,
                notifier,
                channel,
                hub: Hub::default(),
                combiner,
            }),
        })
    }

    /// Opens the pool's minimum (`min_size`) connections now and returns once they are
    /// open, as asyncpg's `create_pool` does before it returns ([`connect`](Self::connect)
    /// opens one and fills the pool in the background). For a service that wants its
    /// first requests to find warm connections, or to fail at start-up when the server
    /// cannot give them (`max_connections`).
    pub async fn warm_up(&self) -> Result<(), StoreError> {
        self.inner.exec.warm(self.inner.config.min_size).await
    }

    /// [`connect`](Self::connect) with [`PgConfig::from_env`].
    pub async fn from_env() -> Result<Self, StoreError> {
        Self::connect(PgConfig::from_env()?).await
    }

    /// The configuration in use (its `Debug` hides the password).
    pub fn config(&self) -> &PgConfig {
        &self.inner.config
    }

    /// Pool figures.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.exec.pool_stats(self.inner.config.max_size)
    }

    /// Operation counters since start.
    pub fn metrics(&self) -> StoreMetrics {
        self.inner.exec.metrics()
    }

    /// Whether the server's messages reach the store untranslated (`lc_messages = 'C'`),
    /// which the error map needs to tell a statement timeout, a deadlock or a shutdown from
    /// other errors on a server that does not speak English. `false` behind a transaction
    /// pooler, or when the role may not set `lc_messages` (PostgreSQL 15+:
    /// `GRANT SET ON PARAMETER lc_messages TO <role>`, part of
    /// [`least_privilege_grants`](crate::least_privilege_grants)).
    pub fn untranslated_messages(&self) -> bool {
        self.inner.exec.connector().untranslated()
    }

    /// The embedded migrations and which are applied.
    pub async fn migration_status(&self) -> Result<Vec<MigrationState>, StoreError> {
        self.inner.exec.ensure_open()?;
        migrate::status(self.connector(), self.inner.config.schema.as_deref()).await
    }

    /// [`cleanup_old_tasks`](TaskHistoryStore::cleanup_old_tasks) with a batch size, a time
    /// limit, a dry run, and `progress` called with the running total after each batch.
    pub async fn cleanup_old_tasks_with(
        &self,
        days_old: i64,
        options: CleanupOptions,
        progress: &(dyn Fn(CleanupReport) + Send + Sync),
    ) -> Result<CleanupReport, StoreError> {
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
        let exec = &self.inner.exec;
        let call = Call::new(ops::cleanup::OP);
        if options.dry_run {
            return exec
                .pooled(call, Tx::Statement, &expired, ops::cleanup::preview)
                .await;
        }
        let started = Instant::now();
        let deadline = options.time_limit.map(|limit| started + limit);
        // Partitioned layout: whole expired partitions go first, then batched deletes take
        // the expired tasks left (in the default partition, or in partitions that keep an
        // active task).
        let mut total = self
            .drop_expired_partitions(expired.days, options.status, deadline, progress)
            .await?;
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

    /// The wake-ups of `user`'s watchers: from this store's writes, and from other
    /// processes' through the store's `LISTEN` connection, started on first use. Behind a
    /// transaction pooler without a direct URL for it (`DB_LISTEN_URL`) there is no
    /// `LISTEN`: watchers then see other processes' writes at their polls.
    pub(crate) async fn watch_wakes(
        &self,
        user: &str,
    ) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        let hub = &self.inner.hub;
        if self.connector().can_listen() {
            hub.ensure_listening(self.connector(), &self.inner.channel)
                .await?;
        }
        Ok(hub.subscribe(user))
    }

    /// Wakes the watchers of the users of committed writes (nothing when notifications are
    /// off): a wake-up, not the event; watchers read the log.
    pub(crate) fn notify<'u>(&self, users: impl IntoIterator<Item = &'u str> + Clone) {
        self.inner.hub.wake(users.clone());
        if let Some(notifier) = &self.inner.notifier {
            notifier.post(users);
        }
    }

    /// The notification channel that wakes this schema's watchers.
    pub(crate) fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Opens dedicated connections (DDL, migrations, LISTEN).
    pub(crate) fn connector(&self) -> &Connector {
        self.inner.exec.connector()
    }

    /// The executor every operation runs through.
    pub(crate) fn exec(&self) -> &Executor {
        &self.inner.exec
    }

    /// Saves validated steps by the upsert statement and notifies watchers after commit.
    pub(crate) async fn save(
        &self,
        call: Call<'_>,
        steps: &[PreparedStep<'_>],
    ) -> Result<(), StoreError> {
        let save = ops::save::SaveSteps {
            operation: call.operation,
            steps,
        };
        self.inner
            .exec
            .pooled(call, save.tx(), &save, ops::save::run)
            .await?;
        self.notify(steps.iter().map(|p| p.user_id));
        Ok(())
    }

    /// Saves a batch by `COPY` when it is large enough ([`PgConfig::copy_min_rows`]) and
    /// every task it touches is new; `false` when it is not (nothing was written).
    async fn copy_new_tasks(
        &self,
        call: Call<'_>,
        steps: &[PreparedStep<'_>],
    ) -> Result<bool, StoreError> {
        let large = self
            .inner
            .config
            .copy_min_rows
            .is_some_and(|min| steps.len() >= usize::try_from(min).unwrap_or(usize::MAX));
        if !large {
            return Ok(false);
        }
        let batch = ops::copy::CopyNewTasks {
            steps,
            connector: self.connector(),
        };
        if !self.inner.exec.copy(call, &batch, ops::copy::run).await? {
            return Ok(false);
        }
        self.notify(steps.iter().map(|p| p.user_id));
        Ok(true)
    }
}

/// Throwaway schemas for a service's integration tests (feature `test-schema`).
#[cfg(feature = "test-schema")]
impl PgTaskHistoryStore {
    /// A store on a new schema of its own (`th_test_<pid>_<n>_<nanos>`), migrated: a test
    /// gets an empty store that no other test sees. Remove it with
    /// [`drop_schema`](Self::drop_schema) when the test ends.
    pub async fn on_fresh_schema(config: PgConfig) -> Result<Self, StoreError> {
        static SCHEMAS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SCHEMAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!("th_test_{}_{n}_{nanos}", std::process::id());
        let store = Self::connect(config.schema(schema)).await?;
        store.init_database_schema().await?;
        Ok(store)
    }

    /// Drops the store's schema with everything in it, then closes the store. Only for a
    /// schema of its own ([`on_fresh_schema`](Self::on_fresh_schema)): a store on the
    /// connection's default schema is refused.
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        use diesel_async::SimpleAsyncConnection;
        let Some(schema) = self.config().schema.clone() else {
            return Err(StoreError::configuration(
                "DB_SCHEMA",
                "the store uses the connection's default schema, which drop_schema never drops",
            ));
        };
        self.close().await;
        let mut conn = self.connector().connect().await?;
        // A plain identifier (checked by PgConfig::validate).
        conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .map_err(|e| crate::error::from_diesel("drop_schema", e))
    }
}

#[async_trait]
impl TaskHistoryStore for PgTaskHistoryStore {
    async fn init_database_schema(&self) -> Result<(), StoreError> {
        self.inner.exec.ensure_open()?;
        let outcome = migrate::run(self.connector(), self.inner.config.schema.as_deref()).await?;
        tracing::info!(
            applied = outcome.applied,
            "taskhistory schema is up to date"
        );
        self.prepare_layout().await?;
        if outcome.adopted {
            // A table the Python service made: its writers are likely still running.
            self.enable_python_compat().await.map_err(|e| {
                StoreError::database(
                    "init_database_schema",
                    format!(
                        "the migrations adopted the Python service's task_history, but switching \
                         the Python compatibility mode on failed ({e}): until `taskhistory \
                         compat on` succeeds, Python INSERTs fail"
                    ),
                )
            })?;
            tracing::info!(
                "adopted the Python service's task_history: the Python compatibility mode is \
                 on until `taskhistory compat off`"
            );
        }
        Ok(())
    }

    async fn save_task_history(
        &self,
        user_id: &str,
        task_id: &str,
        step: i32,
        step_result: &TaskStepResult,
    ) -> Result<(), StoreError> {
        let steps = [validate::prepare_save(user_id, task_id, step, step_result)?];
        if let Some(combiner) = &self.inner.combiner {
            self.inner.exec.ensure_open()?;
            return combiner.save(self, &steps[0]).await;
        }
        self.save(Call::task("save_task_history", user_id, task_id), &steps)
            .await
    }

    async fn save_batch_task_history(&self, records: &[StepRecord]) -> Result<(), StoreError> {
        let steps = validate::prepare_batch(records)?;
        if steps.is_empty() {
            return self.inner.exec.ensure_open();
        }
        let call = Call::new("save_batch_task_history");
        if self.copy_new_tasks(call, &steps).await? {
            return Ok(());
        }
        self.save(call, &steps).await
    }

    async fn load_task_history(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        validate::task(user_id, task_id)?;
        let call = Call::task("load_task_history", user_id, task_id);
        let key = TaskKey { user_id, task_id };
        self.inner
            .exec
            .read(call, &key, ops::read::load_history)
            .await
    }

    async fn mark_task_as_cancelled(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<bool, StoreError> {
        validate::task(user_id, task_id)?;
        let call = Call::task("mark_task_as_cancelled", user_id, task_id);
        let key = TaskKey { user_id, task_id };
        let entry = self
            .inner
            .exec
            .pooled(call, Tx::Statement, &key, ops::cancel::run)
            .await?;
        if entry.is_none() {
            return Ok(false);
        }
        self.notify([user_id]);
        Ok(true)
    }

    async fn check_task_status(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskStatus, StoreError> {
        validate::task(user_id, task_id)?;
        let call = Call::task("check_task_status", user_id, task_id);
        let key = TaskKey { user_id, task_id };
        self.inner
            .exec
            .read(call, &key, ops::read::task_status)
            .await
    }

    async fn get_user_tasks_page(
        &self,
        user_id: &str,
        query: &TaskQuery,
    ) -> Result<TaskPage, StoreError> {
        validate::user_id(user_id)?;
        validate::query(query)?;
        let call = Call::user("get_user_tasks", user_id);
        let list = ops::read::ListTasks { user_id, query };
        self.inner
            .exec
            .read(call, &list, ops::read::list_tasks)
            .await
    }

    async fn scan_history(
        &self,
        user_id: &str,
        scan: &HistoryScan,
    ) -> Result<HistoryPage, StoreError> {
        validate::scan(user_id, scan)?;
        let call = Call {
            task_id: scan.task_id.as_deref(),
            ..Call::user("scan_history", user_id)
        };
        let scan = ops::scan::Scan { user_id, scan };
        self.inner
            .exec
            .pooled(call, Tx::Statement, &scan, ops::scan::run)
            .await
    }

    async fn watch_task(
        &self,
        user_id: &str,
        task_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        validate::task(user_id, task_id)?;
        self.start_watch(user_id, Some(task_id), after).await
    }

    async fn watch_user(
        &self,
        user_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        validate::user_id(user_id)?;
        self.start_watch(user_id, None, after).await
    }

    async fn cleanup_old_tasks(&self, days_old: i64) -> Result<CleanupReport, StoreError> {
        self.cleanup_old_tasks_with(days_old, CleanupOptions::default(), &|_| {})
            .await
    }

    async fn health_check(&self) -> Result<HealthReport, StoreError> {
        let started = Instant::now();
        let health = self
            .inner
            .exec
            .pooled(
                Call::new("health_check"),
                Tx::Statement,
                &(),
                ops::health::run,
            )
            .await?;
        Ok(HealthReport {
            backend: "postgres",
            round_trip: started.elapsed(),
            server_version: Some(health.server_version),
            schema_version: health.schema_version,
        })
    }

    async fn close(&self) {
        if let Some(notifier) = &self.inner.notifier {
            notifier.stop().await;
        }
        self.inner.hub.stop().await;
        self.inner.exec.close().await;
    }
}
