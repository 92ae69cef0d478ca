//! [`PgTaskHistoryStore`]: the [`TaskHistoryStore`] on PostgreSQL. The top layer: each
//! method validates its input and hands the operation of [`crate::ops`] to the
//! [executor](crate::exec), or calls the module below that does the work (combining,
//! watching, partitions, the compatibility mode) with the store's [`Backend`]. The
//! operator's methods are in `operator.rs`.

mod operator;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use taskhistory_core::validate::{self, PreparedStep};
use taskhistory_core::{
    ActivityHour, CleanupReport, EventCursor, HealthReport, HistoryEntry, HistoryPage, HistoryScan,
    StepRecord, StoreError, TaskCounts, TaskEventStream, TaskHistoryStore, TaskPage, TaskQuery,
    TaskStatus, TaskStepResult,
};

use crate::backend::Backend;
use crate::combine::{save::Saves, status::Statuses, Combiner};
use crate::config::PgConfig;
use crate::exec::{Call, Tx};
use crate::migrate;
use crate::ops::{self, rows::TaskKey};
use crate::{compat, partition, watch};

pub use operator::CleanupOptions;

/// The PostgreSQL store: diesel-async over a bb8 pool. Cheap to clone (clones share the pool).
///
/// Every operation is one statement (one round trip), retried on transient errors by the
/// configured [`RetryPolicy`](taskhistory_core::RetryPolicy), bounded by the client command
/// timeout, and traced with a `taskhistory` span (operation, user_id, task_id, rows,
/// elapsed_ms). Single saves of concurrent callers may share a statement and its commit
/// ([`PgConfig::save_lanes`]); each caller is answered after that commit, with its own
/// outcome. Status checks of concurrent callers may share a statement too
/// ([`PgConfig::status_lanes`]), each caller getting its own task's status.
#[derive(Clone)]
pub struct PgTaskHistoryStore {
    backend: Arc<Backend>,
    /// Combines concurrent single saves (when `save_lanes` is not 0).
    combiner: Option<Arc<Combiner<Saves>>>,
    /// Combines concurrent status checks (when `status_lanes` is not 0).
    statuses: Option<Arc<Combiner<Statuses>>>,
    /// The one reader of the log of events for every watch of this store.
    tail: Arc<watch::Tail>,
    /// The only user this handle declares ([`acting_for`](Self::acting_for)).
    acting: Option<Arc<str>>,
}

impl fmt::Debug for PgTaskHistoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTaskHistoryStore")
            .field("config", self.backend.config())
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
        let backend = Backend::connect(config).await?;
        let c = backend.config();
        let combiner = (c.save_lanes > 0)
            .then(|| Combiner::new(Saves, c.save_lanes, c.combine_lone_saves, c.pool_timeout));
        let statuses = Statuses::combiner(c);
        // Whether to declare each operation's users (row-level isolation on): one read of
        // the catalog.
        crate::isolation::state(&backend).await?;
        let backend = Arc::new(backend);
        Ok(PgTaskHistoryStore {
            tail: Arc::new(watch::Tail::new(Arc::clone(&backend))),
            backend,
            combiner,
            statuses,
            acting: None,
        })
    }

    /// A handle on the same store (pools, tail, settings) that declares `user` and no one
    /// else to row-level isolation, whatever user its calls name: for code serving one
    /// user's request (`taskhistory serve` uses one per request carrying a user token), so
    /// that with isolation on a bug that passes another user's id reads and writes nothing
    /// of that user's (the database refuses it). Its single saves and status checks are
    /// never combined (a combined statement declares every user of its tasks); a watch of
    /// another user is refused by the store (`InvalidInput` on `user_id`), since the log's
    /// one tail reads every watched user in one statement, and so is the work on every
    /// user's rows (retention, statistics, migrations, the operator's switches). Its
    /// `close` closes nothing: the store it shares goes on. Without isolation it behaves as
    /// the store. `user` must be a valid user id.
    pub fn acting_for(&self, user: &str) -> Result<Self, StoreError> {
        validate::user_id(user)?;
        Ok(PgTaskHistoryStore {
            acting: Some(Arc::from(user)),
            ..self.clone()
        })
    }

    /// `call` as this handle declares it: only its user when it acts for one.
    fn scoped<'a>(&'a self, call: Call<'a>) -> Call<'a> {
        match &self.acting {
            Some(user) => Call {
                scope: crate::exec::Scope::User(user),
                ..call
            },
            None => call,
        }
    }

    /// Refuses work on every user's rows (retention, statistics, the schema and its
    /// switches) to a handle acting for one user.
    fn every_user(&self, operation: &'static str) -> Result<(), StoreError> {
        match &self.acting {
            Some(_) => Err(StoreError::invalid(
                "user_id",
                format!("{operation} works on every user's rows: not through a handle acting for one user"),
            )),
            None => Ok(()),
        }
    }

    /// Refuses a watch of another user than the one this handle acts for.
    fn may_watch(&self, user_id: &str) -> Result<(), StoreError> {
        match &self.acting {
            Some(user) if **user != *user_id => Err(StoreError::invalid(
                "user_id",
                "this store handle acts for another user",
            )),
            _ => Ok(()),
        }
    }

    /// Opens the pool's minimum (`min_size`) connections now and returns once they are
    /// open, as asyncpg's `create_pool` does before it returns ([`connect`](Self::connect)
    /// opens one and fills the pool in the background). For a service that wants its
    /// first requests to find warm connections, or to fail at start-up when the server
    /// cannot give them (`max_connections`).
    pub async fn warm_up(&self) -> Result<(), StoreError> {
        self.backend.exec().warm(self.config().min_size).await
    }

    /// [`connect`](Self::connect) with [`PgConfig::from_env`].
    pub async fn from_env() -> Result<Self, StoreError> {
        Self::connect(PgConfig::from_env()?).await
    }

    /// The configuration in use (its `Debug` hides the password).
    pub fn config(&self) -> &PgConfig {
        self.backend.config()
    }

    /// Saves a batch by `COPY` when it is large enough ([`PgConfig::copy_min_rows`]) and
    /// every task it touches is new; `false` when it is not (nothing was written). A store
    /// that declares its users (row-level isolation) sends the rows by `INSERT`s of arrays
    /// instead: PostgreSQL refuses `COPY FROM` into a table with row-level security.
    async fn copy_new_tasks(
        &self,
        call: Call<'_>,
        steps: &[PreparedStep<'_>],
    ) -> Result<bool, StoreError> {
        let large = self
            .config()
            .copy_min_rows
            .is_some_and(|min| steps.len() >= usize::try_from(min).unwrap_or(usize::MAX));
        if !large {
            return Ok(false);
        }
        // A declaring store sends the rows by `INSERT` (`copy.rs`): it may meet isolation
        // switched on by another process since it last looked, and `COPY` would be refused.
        let batch = ops::copy::CopyNewTasks {
            steps,
            connector: self.backend.connector(),
        };
        if !self
            .backend
            .exec()
            .copy(call, &batch, ops::copy::run)
            .await
            .inspect_err(|_| self.backend.wrote(steps.iter().map(|p| p.user_id)))?
        {
            return Ok(false);
        }
        self.backend.notify(steps.iter().map(|p| p.user_id));
        Ok(true)
    }
}

/// Throwaway schemas for a service's integration tests (feature `test-schema`).
#[cfg(feature = "test-schema")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-schema")))]
impl PgTaskHistoryStore {
    /// A store on a new schema of its own (`th_test_<unix seconds>_<pid>_<n>`), migrated: a
    /// test gets an empty store that no other test sees. Remove it with
    /// [`drop_schema`](Self::drop_schema) when the test ends. A test that panics before
    /// that leaves its schema behind: every call first drops the test schemas made more
    /// than an hour ago ([`ABANDONED_AFTER`](Self::ABANDONED_AFTER)) by its role, so
    /// leftovers never pile up (by the server's clock against the client's that named the
    /// schema: a test running longer than that, or clocks an hour apart, must not share the
    /// database). The sweep is best effort: it never fails this call.
    pub async fn on_fresh_schema(config: PgConfig) -> Result<Self, StoreError> {
        static SCHEMAS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SCHEMAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let schema = format!("th_test_{secs}_{}_{n}", std::process::id());
        let store = Self::connect(config.schema(schema)).await?;
        let age = i64::try_from(Self::ABANDONED_AFTER.as_secs()).unwrap_or(i64::MAX);
        // Best effort: a sweep that fails (another role's schema, a race with another
        // process) is said in the log and never fails the test that asked for a schema.
        let swept = store
            .backend
            .exec()
            .dedicated(Call::new("on_fresh_schema"), "", &age, sweep_work)
            .await;
        if let Err(error) = swept {
            tracing::warn!(%error, "abandoned test schemas were not all dropped");
        }
        store.init_database_schema().await?;
        Ok(store)
    }

    /// How old a test schema must be for [`on_fresh_schema`](Self::on_fresh_schema) to
    /// take it for abandoned and drop it.
    pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

    /// Drops the store's schema with everything in it, then closes the store. Only for a
    /// schema of its own ([`on_fresh_schema`](Self::on_fresh_schema)): a store on the
    /// connection's default schema is refused.
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let Some(schema) = self.config().get_schema() else {
            return Err(StoreError::configuration(
                "DB_SCHEMA",
                "the store uses the connection's default schema, which drop_schema never drops",
            ));
        };
        // On a connection of its own (the DROP waits for the store's statements still
        // running); the store closes after it.
        let schema = schema.to_owned();
        let dropped = self
            .backend
            .exec()
            .dedicated(Call::new("drop_schema"), "", &schema, drop_work)
            .await;
        self.close().await;
        dropped.map(drop)
    }
}

/// Drops the test schemas made more than `age` seconds ago.
#[cfg(feature = "test-schema")]
fn sweep_work<'c>(
    conn: &'c mut diesel_async::AsyncPgConnection,
    age: &'c i64,
) -> futures::future::BoxFuture<'c, Result<Option<()>, StoreError>> {
    use diesel_async::SimpleAsyncConnection;
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    Box::pin(async move {
        let fail = |e| crate::error::from_diesel("on_fresh_schema", e);
        let old: Vec<Name> = crate::sql::Statement::new(crate::sql::TEST_SCHEMAS_ABANDONED)
            .bind::<diesel::sql_types::BigInt, _>(*age)
            .fetch(conn)
            .await
            .map_err(fail)?;
        for Name { name } in old {
            // Matched `th_test_<digits>_...` of identifier characters: safe to quote.
            conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .await
                .map_err(fail)?;
        }
        Ok(Some(()))
    })
}

/// Drops a test schema (a plain identifier: checked by `PgConfig::validate`).
#[cfg(feature = "test-schema")]
#[allow(clippy::ptr_arg)] // the executor hands a work its parameters by reference
fn drop_work<'c>(
    conn: &'c mut diesel_async::AsyncPgConnection,
    schema: &'c String,
) -> futures::future::BoxFuture<'c, Result<Option<()>, StoreError>> {
    use diesel_async::SimpleAsyncConnection;
    Box::pin(async move {
        conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .map(Some)
            .map_err(|e| crate::error::from_diesel("drop_schema", e))
    })
}

#[async_trait]
impl TaskHistoryStore for PgTaskHistoryStore {
    async fn init_database_schema(&self) -> Result<(), StoreError> {
        self.every_user("init_database_schema")?;
        let b = &*self.backend;
        // Tables made or changed: reads wait for replicas to replay them.
        let _written = b.all_written();
        let schema = b.config().get_schema().map(str::to_owned);
        let outcome = b
            .exec()
            .own(Call::schema(migrate::OP), &schema, migrate::run_work)
            .await?;
        tracing::info!(
            applied = outcome.applied,
            "taskhistory schema is up to date"
        );
        crate::isolation::state(b).await?;
        partition::prepare(b).await?;
        if outcome.adopted {
            // A table the Python service made: its writers are likely still running.
            compat::enable(b).await.map_err(|e| {
                StoreError::database(
                    migrate::OP,
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
        if let Some(combiner) = self.combiner.as_ref().filter(|_| self.acting.is_none()) {
            self.backend.exec().ensure_open()?;
            return combiner.save(&self.backend, &steps[0]).await;
        }
        let call = self.scoped(Call::task(ops::save::OP, user_id, task_id));
        self.backend.save(call, &steps).await
    }

    async fn save_batch_task_history(&self, records: &[StepRecord]) -> Result<(), StoreError> {
        let steps = validate::prepare_batch(records)?;
        if steps.is_empty() {
            return self.backend.exec().ensure_open();
        }
        let users: Vec<&str> = steps.iter().map(|p| p.user_id).collect();
        let call = self.scoped(Call::users(ops::save::BATCH, &users));
        if self.copy_new_tasks(call, &steps).await? {
            return Ok(());
        }
        self.backend.save(call, &steps).await
    }

    async fn load_task_history(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        validate::task(user_id, task_id)?;
        let call = self.scoped(Call::task(ops::read::LOAD, user_id, task_id));
        let key = TaskKey { user_id, task_id };
        self.backend.read(call, &key, ops::read::load_history).await
    }

    async fn mark_task_as_cancelled(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<bool, StoreError> {
        validate::task(user_id, task_id)?;
        let call = self.scoped(Call::task(ops::cancel::OP, user_id, task_id));
        let key = TaskKey { user_id, task_id };
        let entry = self
            .backend
            .exec()
            .pooled(call, Tx::Statement, &key, ops::cancel::run)
            .await
            .inspect_err(|_| self.backend.wrote([user_id]))?;
        if entry.is_none() {
            return Ok(false);
        }
        self.backend.notify([user_id]);
        Ok(true)
    }

    async fn check_task_status(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskStatus, StoreError> {
        validate::task(user_id, task_id)?;
        let call = self.scoped(Call::task(ops::read::STATUS, user_id, task_id));
        let key = TaskKey { user_id, task_id };
        // A handle acting for one user declares only that user: its checks are its own.
        if let Some(statuses) = self.statuses.as_ref().filter(|_| self.acting.is_none()) {
            self.backend.exec().ensure_open()?;
            return statuses.check(&self.backend, call, &key).await;
        }
        self.backend.read(call, &key, ops::read::task_status).await
    }

    async fn get_user_tasks_page(
        &self,
        user_id: &str,
        query: &TaskQuery,
    ) -> Result<TaskPage, StoreError> {
        validate::list(user_id, query)?;
        let call = self.scoped(Call::user(ops::read::LIST, user_id));
        let list = ops::read::ListTasks { user_id, query };
        self.backend.read(call, &list, ops::read::list_tasks).await
    }

    async fn scan_history(
        &self,
        user_id: &str,
        scan: &HistoryScan,
    ) -> Result<HistoryPage, StoreError> {
        validate::scan(user_id, scan)?;
        let call = self.scoped(Call {
            task_id: scan.task_id.as_deref(),
            ..Call::user(ops::scan::OP, user_id)
        });
        let scan = ops::scan::Scan { user_id, scan };
        self.backend
            .exec()
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
        self.may_watch(user_id)?;
        watch::start(&self.tail, "watch_task", user_id, Some(task_id), after).await
    }

    async fn watch_user(
        &self,
        user_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        validate::user_id(user_id)?;
        self.may_watch(user_id)?;
        watch::start(&self.tail, "watch_user", user_id, None, after).await
    }

    async fn task_counts(&self, user_id: &str) -> Result<TaskCounts, StoreError> {
        validate::user_id(user_id)?;
        let call = self.scoped(Call::user(ops::counts::COUNTS, user_id));
        self.backend
            .read(call, &ops::counts::Of { user_id }, ops::counts::counts)
            .await
    }

    async fn task_activity(
        &self,
        user_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ActivityHour>, StoreError> {
        let (from, to) = validate::activity(user_id, from, to)?;
        let call = self.scoped(Call::user(ops::counts::ACTIVITY, user_id));
        let hours = ops::counts::Hours {
            user_id: user_id.to_owned(),
            from,
            to,
        };
        self.backend.read(call, &hours, ops::counts::activity).await
    }

    async fn cleanup_old_tasks(&self, days_old: i64) -> Result<CleanupReport, StoreError> {
        self.cleanup_old_tasks_with(days_old, CleanupOptions::default(), &|_| {})
            .await
    }

    async fn health_check(&self) -> Result<HealthReport, StoreError> {
        let started = Instant::now();
        let call = Call::new(ops::health::OP);
        let health = self
            .backend
            .exec()
            .pooled(call, Tx::Statement, &(), ops::health::run)
            .await?;
        Ok(HealthReport {
            backend: "postgres",
            round_trip: started.elapsed(),
            server_version: Some(health.server_version),
            schema_version: health.schema_version,
        })
    }

    async fn close(&self) {
        // A handle acting for one user shares the store: closing it closes nothing.
        if self.acting.is_some() {
            return;
        }
        self.tail.stop();
        self.backend.close().await;
    }
}
