//! The one execution path. Every database operation of the store goes through an
//! [`Executor`] method, one per connection kind:
//!
//! | method | connection | for |
//! |---|---|---|
//! | [`pooled`](Executor::pooled) | a pooled diesel-async connection, to itself | saves, cancel, cleanup, operator statements |
//! | [`kept`](Executor::kept) | a connection its caller keeps, off the pool | the notifier's wake-ups |
//! | [`read`](Executor::read) | a connection shared by concurrent reads (pipelined), or a pooled one | status, history, task lists |
//! | [`copy`](Executor::copy) | a plain tokio-postgres connection of the `COPY` pool | batches of new tasks |
//! | [`dedicated`](Executor::dedicated) | a connection of its own, one transaction | DDL: partitions, the Python compatibility mode, dropping a test schema |
//! | [`own`](Executor::own) | connections the work opens itself | migrations |
//!
//! and each owns, in one place, what every operation gets: the tracing span, the retry
//! policy, the command timeout of each attempt, the counters, the transaction (with the
//! transaction pooler's set-up, see [`Tx`]), noting faults for the pools' health check
//! ([`Health`]), and throwing away a connection whose statement did not finish (timeout, or
//! the caller dropped the future): a pooled or `COPY` connection is marked broken, with a
//! cancel request to the server; a shared read connection leaves its slot and is replaced,
//! without a cancel request (it would stop whichever caller's statement runs on it at that
//! moment), so its statement runs on until the server's `statement_timeout`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use diesel_async::AsyncPgConnection;
use futures::future::{BoxFuture, FutureExt as _};
use taskhistory_core::StoreError;
use tracing::Instrument;

use crate::config::PgConfig;
use crate::connection::Connector;
use crate::session::{
    add, build_pool, declared, declaring, send_ahead, Declaration, Health, LastError, Lease, Pool,
    PoolSettings, RawSession, Session, Transaction,
};
use crate::sql::declare;

/// Which operation, and for whom: the tracing span's fields, and what it declares to
/// row-level isolation ([`Scope`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    pub(crate) operation: &'static str,
    pub(crate) user_id: Option<&'a str>,
    pub(crate) task_id: Option<&'a str>,
    pub(crate) scope: Scope<'a>,
}

/// Whose rows an operation may see and write, declared to the server with it while
/// row-level isolation is on (or [`PgConfig::declare_users`] is set). Made from the
/// operation's own arguments, never from what its statements send.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// No user's rows (the schema's bookkeeping, notifications): declares nothing, so
    /// under isolation it sees and writes no user's row.
    Nothing,
    /// One user's rows.
    User(&'a str),
    /// These users' rows: a combined save's, a batch's, combined status checks', the log's
    /// tail's.
    Users(&'a [&'a str]),
    /// Every user's rows: retention, partitions, statistics. Under isolation only the
    /// tables' owner (or a member of it) gets through; another role is refused before
    /// anything runs (it would see no row).
    Maintenance,
    /// The schema's own changes (migrations): declared as [`Maintenance`](Scope::Maintenance),
    /// unchecked (a role that may not run them fails on their DDL, and with none pending
    /// they read no user's row).
    Schema,
}

impl<'a> Call<'a> {
    /// An operation on no user's rows (the schema's bookkeeping: health, the layout, the
    /// compatibility mode's state, notifications).
    pub(crate) fn new(operation: &'static str) -> Self {
        Call {
            operation,
            user_id: None,
            task_id: None,
            scope: Scope::Nothing,
        }
    }

    /// An operation on every user's rows (retention, partitions, operator statistics,
    /// migrations).
    pub(crate) fn maintenance(operation: &'static str) -> Self {
        Call {
            scope: Scope::Maintenance,
            ..Call::new(operation)
        }
    }

    /// The schema's migrations.
    pub(crate) fn schema(operation: &'static str) -> Self {
        Call {
            scope: Scope::Schema,
            ..Call::new(operation)
        }
    }

    /// An operation on the rows of `users` (a combined save, a batch, the log's tail).
    pub(crate) fn users(operation: &'static str, users: &'a [&'a str]) -> Self {
        Call {
            scope: Scope::Users(users),
            ..Call::new(operation)
        }
    }

    /// An operation on one user's data.
    pub(crate) fn user(operation: &'static str, user_id: &'a str) -> Self {
        Call {
            user_id: Some(user_id),
            scope: Scope::User(user_id),
            ..Call::new(operation)
        }
    }

    /// An operation on one task.
    pub(crate) fn task(operation: &'static str, user_id: &'a str, task_id: &'a str) -> Self {
        Call {
            task_id: Some(task_id),
            ..Call::user(operation, user_id)
        }
    }
}

/// How a write uses transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tx {
    /// One statement (its own implicit transaction); behind a transaction pooler it runs in
    /// a transaction that starts with the pooler's `SET LOCAL`s.
    Statement,
    /// Several statements that commit together (or not at all, on an error).
    Always,
    /// [`Always`](Tx::Always), the transaction beginning with these settings (`SET LOCAL`).
    With(&'static str),
    /// The work begins its own [`Transaction`] (it decides between commit and rollback).
    Own,
}

/// A write's work: what one attempt does on its connection with the operation's parameters.
pub(crate) type Write<P, T> =
    for<'c> fn(&'c mut AsyncPgConnection, &'c P) -> BoxFuture<'c, Result<T, StoreError>>;

/// A read's work, on a connection that concurrent reads may share.
pub(crate) type Read<P, T> =
    for<'c> fn(&'c mut &'c AsyncPgConnection, &'c P) -> BoxFuture<'c, Result<T, StoreError>>;

/// Work on connections it opens itself ([`Executor::own`]).
pub(crate) type Own<P, T> =
    for<'c> fn(&'c Connector, &'c P) -> BoxFuture<'c, Result<T, StoreError>>;

/// A `COPY` batch's work, on a plain tokio-postgres connection.
pub(crate) type CopyWork<P, T> =
    for<'c> fn(&'c mut RawSession, &'c P) -> BoxFuture<'c, Result<T, StoreError>>;

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
}

/// Connections shared by concurrent reads: tokio-postgres pipelines the statements of every
/// caller using one, so many small reads cost a few socket writes and wake-ups instead of one
/// each. Opened on first use; a connection that failed, timed out, or was opened before the
/// last fault (see [`Health`]) is replaced by the next read.
struct SharedReads {
    slots: Vec<tokio::sync::Mutex<Option<SharedConn>>>,
    next: AtomicUsize,
}

/// A shared read connection and the fault epoch it was opened in.
type SharedConn = (Arc<AsyncPgConnection>, u64);

/// A lent connection that is thrown away, with a cancel request to the server, if it is
/// dropped while its statement is in flight (command timeout, or the caller dropping the
/// future).
struct InFlight<'a, C: Session> {
    lease: Lease<C>,
    connector: &'a Connector,
    done: bool,
}

impl<C: Session> Drop for InFlight<'_, C> {
    fn drop(&mut self) {
        if !self.done {
            self.lease.set_broken();
            self.connector.cancel(self.lease.cancel_token());
        }
    }
}

/// A connection kept by its caller between [`Executor::kept`] calls, and the session
/// settings it starts with (on a direct connection).
pub(crate) struct Kept {
    conn: tokio::sync::Mutex<Option<AsyncPgConnection>>,
    session: &'static str,
}

impl Kept {
    /// None open yet; `session` (may be empty) runs once on each connection opened.
    pub(crate) fn new(session: &'static str) -> Self {
        Kept {
            conn: tokio::sync::Mutex::new(None),
            session,
        }
    }
}

/// Runs every operation (see the module's doc).
pub(crate) struct Executor {
    connector: Connector,
    pool: RwLock<Option<Pool<AsyncPgConnection>>>,
    /// Connections for `COPY` batches (when [`PgConfig::copy_min_rows`] is set).
    copy_pool: RwLock<Option<Pool<RawSession>>>,
    shared: Option<SharedReads>,
    health: Arc<Health>,
    last_error: LastError,
    counters: Counters,
    command_timeout: Duration,
    retry: taskhistory_core::RetryPolicy,
    pool_timeout: Duration,
    max_connections: u32,
    copy_connections: u32,
    isolation: Isolation,
}

/// Whether this store declares its operations' users to row-level isolation, and what it
/// knows of the database's isolation (read when the store opens, and after it switches it).
struct Isolation {
    /// [`PgConfig::declare_users`]: declare even while isolation is off.
    always: bool,
    /// This store has declared: it goes on declaring (its pooled connections hold a
    /// caller's declaration, which a statement sent without one would run under).
    declared_once: std::sync::atomic::AtomicBool,
    /// Isolation is on (enabled and forced on the tables).
    enforced: std::sync::atomic::AtomicBool,
    /// This role may do the cross-user work under isolation (it is the tables' owner or a
    /// member of it).
    maintainer: std::sync::atomic::AtomicBool,
    /// Test-only: the user every declaration names (see `PgConfig::declare_as`).
    declare_as: Option<String>,
}

/// Pool figures, from [`PgTaskHistoryStore::pool_stats`](crate::PgTaskHistoryStore::pool_stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Connections open.
    pub connections: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Connections lent out.
    pub in_use: u32,
    /// The most connections the pool opens.
    pub max: u32,
    /// Checkouts that had to wait for a connection.
    pub waits: u64,
    /// Checkouts that gave up after the pool timeout.
    pub wait_timeouts: u64,
    /// Connections opened since start.
    pub created: u64,
    /// Connections thrown away as broken (when returned, or found dead at checkout).
    pub closed_broken: u64,
}

/// Operation counters, from [`PgTaskHistoryStore::metrics`](crate::PgTaskHistoryStore::metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct StoreMetrics {
    /// Database attempts made (each retry counts).
    pub queries: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Watches open now (`watch_task`, `watch_user` streams).
    pub watchers: u64,
    /// Statements the log's one tail ran (each reads every user due, for all their
    /// watchers).
    pub tail_reads: u64,
    /// Statements watchers ran by themselves, catching up from an older cursor or after
    /// falling behind.
    pub watcher_reads: u64,
    /// Times a watcher fell behind (its buffer of 256 events full) and read by itself.
    pub watcher_fallbacks: u64,
    /// How far the tail was behind at its latest read: from the first wake-up it served
    /// (a write committed) to its events handed to the watchers, in milliseconds.
    pub tail_lag_ms: u64,
    /// How many events the tail's latest read handed out (what it was behind by).
    pub tail_lag_events: u64,
    /// Reads that replicas may serve ([`PgConfig::read_urls`]) served by the primary, as
    /// statements: status checks combined into one statement ([`PgConfig::status_lanes`])
    /// count as that statement.
    pub reads_primary: u64,
    /// Such reads served by a replica (all replicas together; per replica:
    /// [`PgTaskHistoryStore::replicas`](crate::PgTaskHistoryStore::replicas)), counted as
    /// the primary's are.
    pub reads_replicas: u64,
    /// Reads that wanted a replica but went to the primary: none had replayed what the
    /// read must see within the wait, or the replica's attempt failed.
    pub replica_fallbacks: u64,
    /// The largest lag of a replica at the latest check, in milliseconds.
    pub replica_lag_ms: u64,
    /// Replicas in the rotation now (up, replaying, within the lag allowed).
    pub replicas_in_rotation: u64,
    /// Single saves waiting now for a save lane ([`PgConfig::save_lanes`]): the next
    /// statement of a lane takes them together.
    pub queued_saves: u64,
    /// Status checks waiting now for a status lane ([`PgConfig::status_lanes`]); like
    /// `queued_saves`, callers that gave up count until a lane takes them.
    pub queued_status_checks: u64,
}

/// The error of an attempt that did not finish within the command timeout.
fn timed_out(operation: &'static str, timeout: Duration) -> StoreError {
    StoreError::Timeout {
        operation,
        source: format!("no answer within the command timeout of {timeout:?}").into(),
    }
}

impl Executor {
    /// Opens one connection at once (so a wrong password or an unreachable server fails here
    /// with the server's own reason) and builds the pools around it.
    pub(crate) async fn connect(config: &PgConfig) -> Result<Self, StoreError> {
        let connector = Connector::new(config)?;
        let first = connector.connect().await?;
        let health = Arc::new(Health::default());
        let last_error = LastError::default();
        let pool = build_pool(
            PoolSettings {
                max_size: config.max_size,
                min_idle: config.min_size,
                idle_timeout: Some(Duration::from_secs(600)),
                connection_timeout: config.pool_timeout,
            },
            &connector,
            &health,
            &last_error,
        );
        add(&pool, &health, first);
        // `COPY` connections: none opened until a batch needs one, idle ones close after a
        // minute.
        let copy_pool = config.copy_min_rows.map(|_| {
            build_pool(
                PoolSettings {
                    max_size: config.copy_connections,
                    min_idle: 0,
                    idle_timeout: Some(Duration::from_secs(60)),
                    connection_timeout: config.pool_timeout,
                },
                &connector,
                &health,
                &last_error,
            )
        });
        let shared = (config.pipelined_reads > 0 && !config.pgbouncer).then(|| SharedReads {
            slots: (0..config.pipelined_reads)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        });
        Ok(Executor {
            connector,
            pool: RwLock::new(Some(pool)),
            copy_pool: RwLock::new(copy_pool),
            shared,
            health,
            last_error,
            counters: Counters::default(),
            command_timeout: config.command_timeout,
            retry: config.retry.clone(),
            pool_timeout: config.pool_timeout,
            max_connections: config.max_size,
            copy_connections: config.copy_connections,
            isolation: Isolation {
                always: config.declare_users,
                declared_once: std::sync::atomic::AtomicBool::new(false),
                enforced: std::sync::atomic::AtomicBool::new(false),
                maintainer: std::sync::atomic::AtomicBool::new(true),
                declare_as: config.declare_as.clone(),
            },
        })
    }

    /// Notes the database's row-level isolation: on or off, and whether this role may do
    /// the cross-user work under it.
    pub(crate) fn set_isolation(&self, enforced: bool, maintainer: bool) {
        let i = &self.isolation;
        i.enforced.store(enforced, Ordering::Relaxed);
        i.maintainer.store(maintainer, Ordering::Relaxed);
        if enforced {
            i.declared_once.store(true, Ordering::Relaxed);
        }
    }

    /// Whether operations declare their users: isolation is on, or was on since this store
    /// opened (declaring is sticky), or [`PgConfig::declare_users`] asks for it always.
    pub(crate) fn declares(&self) -> bool {
        let i = &self.isolation;
        i.always || i.enforced.load(Ordering::Relaxed) || i.declared_once.load(Ordering::Relaxed)
    }

    /// What `scope` declares (none while this store does not declare), or why this role
    /// may not run it.
    fn declaration(
        &self,
        op: &'static str,
        scope: Scope<'_>,
    ) -> Result<Option<Declaration>, StoreError> {
        if !self.declares() {
            return Ok(None);
        }
        let users = |users: &mut dyn Iterator<Item = &str>| {
            let users: std::collections::BTreeSet<&str> = match &self.isolation.declare_as {
                Some(user) => std::iter::once(user.as_str()).collect(),
                None => users.collect(),
            };
            let array = declare::array(users.iter().copied());
            Some(Declaration {
                users: Some(Arc::from(array)),
            })
        };
        Ok(match scope {
            // Declared too, as no user: a connection's earlier declaration never carries over.
            Scope::Nothing => users(&mut std::iter::empty()),
            Scope::User(user) => users(&mut std::iter::once(user)),
            Scope::Users(list) => users(&mut list.iter().copied()),
            Scope::Maintenance | Scope::Schema => {
                let i = &self.isolation;
                // Refused whenever this store declares (not only once it knows isolation
                // is on: another process may have switched it on since, and the work
                // would then see no row and report nothing done).
                if matches!(scope, Scope::Maintenance) && !i.maintainer.load(Ordering::Relaxed) {
                    return Err(StoreError::configuration(
                        "isolation",
                        format!(
                            "{op} works on every user's rows: under row-level isolation only the \
                             tables' owner (or a role that is a member of it) may run it; run it \
                             with the owner's connection (e.g. `taskhistory` with the migrating \
                             role's DATABASE_URL)"
                        ),
                    ));
                }
                Some(Declaration { users: None })
            }
        })
    }

    /// Holds `n` pooled connections at once (opening the missing ones), then gives them
    /// back idle.
    pub(crate) async fn warm(&self, n: u32) -> Result<(), StoreError> {
        let pool = self.pool()?;
        let held = futures::future::join_all((0..n).map(|_| pool.get())).await;
        for connection in held {
            connection.map_err(|e| StoreError::Unavailable {
                operation: "warm_up",
                source: e.to_string().into(),
            })?;
        }
        Ok(())
    }

    /// Opens connections (dedicated ones: DDL, migrations, LISTEN, the notifier).
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// `Closed` once [`close`](Self::close) ran.
    pub(crate) fn ensure_open(&self) -> Result<(), StoreError> {
        self.pool().map(drop)
    }

    fn pool(&self) -> Result<Pool<AsyncPgConnection>, StoreError> {
        let guard = self.pool.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or(StoreError::Closed)
    }

    /// Any statement on a pooled connection (see [`Tx`]): writes, and reads too large or too
    /// rare to share a connection.
    pub(crate) async fn pooled<P: Sync, T>(
        &self,
        call: Call<'_>,
        tx: Tx,
        params: &P,
        work: Write<P, T>,
    ) -> Result<T, StoreError> {
        let op = call.operation;
        self.execute(call, || async {
            let pool = self.pool()?;
            let max = self.max_connections;
            self.bounded(op, (&pool, max), async |conn: &mut AsyncPgConnection| {
                self.in_tx(conn, op, tx, params, work).await
            })
            .await
        })
        .await
    }

    /// A write on a connection the caller keeps between calls, off the pool (the
    /// notifier's: its wake-ups never wait behind the writers for a pooled connection, nor
    /// hold one from them). Opened when missing or broken; dropped after an attempt that
    /// failed to reach the server or was cut by the command timeout (with a cancel request).
    pub(crate) async fn kept<P: Sync, T>(
        &self,
        call: Call<'_>,
        slot: &Kept,
        tx: Tx,
        params: &P,
        work: Write<P, T>,
    ) -> Result<T, StoreError> {
        self.execute(call, || {
            self.kept_attempt(call.operation, slot, tx, params, work)
        })
        .await
    }

    /// One attempt of [`kept`](Self::kept).
    async fn kept_attempt<P: Sync, T>(
        &self,
        op: &'static str,
        slot: &Kept,
        tx: Tx,
        params: &P,
        work: Write<P, T>,
    ) -> Result<T, StoreError> {
        self.ensure_open()?;
        let mut held = slot.conn.lock().await;
        if held.as_mut().is_none_or(Session::is_broken) {
            *held = None;
        }
        let conn = match &mut *held {
            Some(conn) => conn,
            None => {
                let mut conn = self.connector.connect().await?;
                // A session setting holds on a direct connection only (behind a pooler the
                // work sets it per transaction).
                if !slot.session.is_empty() && self.connector.transaction_setup().is_none() {
                    conn.batch(&self.connector, op, slot.session).await?;
                }
                held.insert(conn)
            }
        };
        let token = conn.cancel_token();
        let (result, finished) = self
            .counted(op, self.in_tx(conn, op, tx, params, work))
            .await;
        if !finished {
            self.connector.cancel(token);
        }
        if !finished || matches!(result, Err(StoreError::Unavailable { .. })) {
            *held = None;
        }
        result
    }

    /// Runs a write's work on `conn`, in a transaction when `tx` asks for one.
    async fn in_tx<P: Sync, T>(
        &self,
        conn: &mut AsyncPgConnection,
        op: &'static str,
        tx: Tx,
        params: &P,
        work: Write<P, T>,
    ) -> Result<T, StoreError> {
        let settings = match tx {
            Tx::Own => return work(conn, params).await,
            Tx::Statement if self.connector.transaction_setup().is_none() => {
                let Some(declaration) = declared() else {
                    return work(conn, params).await;
                };
                // A lone statement in its own implicit transaction: the declaration is the
                // session's, sent ahead in the same round trip. It replaces the one before
                // it whole, and every statement of a declaring store has its own (one that
                // declares no user: `{}`).
                send_ahead(conn, op, &declaration.sql(false)).await?;
                return work(conn, params).await;
            }
            Tx::Statement | Tx::Always => "",
            Tx::With(settings) => settings,
        };
        let mut t = Transaction::begin(conn, &self.connector, op, settings).await?;
        let result = work(&mut t, params).await;
        t.finish(result).await
    }

    /// A read: on a connection shared by concurrent reads when pipelining is on, else on a
    /// pooled connection (in a transaction behind a pooler).
    pub(crate) async fn read<P: Sync, T>(
        &self,
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        // Shared connections interleave their callers' statements: a declaration sent
        // apart from its statement could meet another caller's there. A read of users'
        // rows declares inside its own statement instead (`sql::declaring_in_statement`);
        // the cross-user work reads on a pooled connection.
        let declaration = self.declaration(call.operation, call.scope)?;
        let in_statement = declaration.as_ref().map(|d| d.users.clone());
        let shared = match (&self.shared, &in_statement) {
            (Some(shared), None | Some(Some(_))) => shared,
            // Boxed: the pooled path's future is about 3.5 KB, which the shared path's
            // (well under 1 KB) would otherwise carry and move at every read.
            _ => {
                return Box::pin(self.pooled(call, Tx::Statement, &(params, work), read_on_pooled))
                    .await
            }
        };
        let users = in_statement.flatten();
        self.execute_declared(call, None, || {
            crate::sql::declaring_in_statement(
                users.clone(),
                self.read_shared(shared, call.operation, params, work),
            )
        })
        .await
    }

    /// A batch by `COPY`, on a connection of the `COPY` pool.
    pub(crate) async fn copy<P: Sync, T>(
        &self,
        call: Call<'_>,
        params: &P,
        work: CopyWork<P, T>,
    ) -> Result<T, StoreError> {
        self.execute(call, || async {
            let pool = self
                .copy_pool
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or(StoreError::Closed)?;
            let max = self.copy_connections;
            self.bounded(
                call.operation,
                (&pool, max),
                async |conn: &mut RawSession| work(conn, params).await,
            )
            .await
        })
        .await
    }

    /// DDL and maintenance: one transaction on a connection of its own (never a pooled one:
    /// DDL stays off the service's connections), opened for the attempt and closed after,
    /// that begins with `setup` (the DDL lock, a lock wait limit). Commits when `work`
    /// returns `Some`, rolls back on `None` or an error. An attempt cut by the command
    /// timeout has its statement cancelled.
    pub(crate) async fn dedicated<P: Sync, T>(
        &self,
        call: Call<'_>,
        setup: &str,
        params: &P,
        work: Write<P, Option<T>>,
    ) -> Result<Option<T>, StoreError> {
        self.execute(call, || {
            self.dedicated_attempt(call.operation, setup, params, work)
        })
        .await
    }

    /// One attempt of [`dedicated`](Self::dedicated).
    async fn dedicated_attempt<P: Sync, T>(
        &self,
        op: &'static str,
        setup: &str,
        params: &P,
        work: Write<P, Option<T>>,
    ) -> Result<Option<T>, StoreError> {
        self.ensure_open()?;
        let mut conn = self.connector.connect().await?;
        let token = conn.cancel_token();
        let (result, finished) = self
            .counted(op, async {
                let mut tx = Transaction::begin(&mut conn, &self.connector, op, setup).await?;
                let done = work(&mut tx, params).await;
                match done {
                    Ok(Some(value)) => tx.commit().await.map(|()| Some(value)),
                    Ok(None) => tx.rollback().await.map(|()| None),
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            })
            .await;
        if !finished {
            self.connector.cancel(token);
        }
        result
    }

    /// Work that opens connections of its own through the [`Connector`] (migrations, which
    /// diesel_migrations runs on a connection it holds): the span, the retry policy and the
    /// counters, but no command timeout (each of its statements is bounded by the server's
    /// `statement_timeout`; waiting for another process's migration lock is not a fault).
    pub(crate) async fn own<P: Sync, T>(
        &self,
        call: Call<'_>,
        params: &P,
        work: Own<P, T>,
    ) -> Result<T, StoreError> {
        self.execute(call, || self.own_attempt(params, work)).await
    }

    /// One attempt of [`own`](Self::own).
    async fn own_attempt<P: Sync, T>(&self, params: &P, work: Own<P, T>) -> Result<T, StoreError> {
        self.ensure_open()?;
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let result = work(&self.connector, params).await;
        self.note(&result);
        result
    }

    /// Runs `attempt` until it succeeds or fails for good (the retry policy), in a tracing
    /// span.
    async fn execute<T, F, Fut>(&self, call: Call<'_>, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let declaration = self.declaration(call.operation, call.scope)?;
        self.execute_declared(call, declaration, attempt).await
    }

    /// [`execute`](Self::execute) with the transactions of its attempts declaring
    /// `declaration`.
    async fn execute_declared<T, F, Fut>(
        &self,
        call: Call<'_>,
        declaration: Option<Declaration>,
        attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let span = tracing::info_span!(
            "taskhistory",
            operation = call.operation,
            user_id = call.user_id.unwrap_or(""),
            task_id = call.task_id.unwrap_or(""),
            rows = tracing::field::Empty,
            elapsed_ms = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = declaring(
            declaration,
            self.retry.run(attempt, |error, retry, wait| {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, retry, wait_ms = wait.as_millis() as u64, "retrying after a transient error");
            }),
        )
        .instrument(span.clone())
        .await;
        span.record("elapsed_ms", started.elapsed().as_secs_f64() * 1e3);
        if let Err(error) = &result {
            span.in_scope(|| tracing::debug!(%error, "operation failed"));
        }
        result
    }

    /// One attempt on a connection of `pool`: checked out, run under the command timeout,
    /// counted; thrown away if its statement did not finish.
    async fn bounded<C: Session, T>(
        &self,
        operation: &'static str,
        (pool, max): (&Pool<C>, u32),
        work: impl AsyncFnOnce(&mut C) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lease = self.checkout(operation, pool, max).await?;
        let mut conn = InFlight {
            lease,
            connector: &self.connector,
            done: false,
        };
        let (result, finished) = self.counted(operation, work(&mut conn.lease)).await;
        // An attempt past the command timeout leaves `done` false: the connection is thrown
        // away and its statement cancelled.
        conn.done = finished;
        result
    }

    /// Runs one attempt's database work under the command timeout, counting it and noting
    /// connection-class failures for the pools' health check; `false` with it when the work
    /// did not finish (the command timeout cut it short). As [`timed`](Self::timed), the
    /// deadline starts at the call: await it at once.
    fn counted<'a, T: 'a>(
        &'a self,
        operation: &'static str,
        work: impl Future<Output = Result<T, StoreError>> + 'a,
    ) -> impl Future<Output = (Result<T, StoreError>, bool)> + 'a {
        self.timed(operation, work).map(|(result, finished)| {
            self.note(&result);
            (result, finished)
        })
    }

    /// One attempt under the command timeout, counted as a query; `false` with it when the
    /// timeout cut it short (then its error says so). Combinators, not an `async fn`: one
    /// would hold `work` twice, and every layer of an operation's future would double it
    /// (`docs/performance.md`, "Futures' size"). The deadline and the count start at the
    /// call, not at the first poll: callers await it at once.
    fn timed<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> impl Future<Output = (Result<T, StoreError>, bool)> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let timeout = self.command_timeout;
        tokio::time::timeout(timeout, work).map(move |outcome| match outcome {
            Ok(result) => (result, true),
            Err(_) => (Err(timed_out(operation, timeout)), false),
        })
    }

    /// Counts a failed attempt, and notes a connection-class failure for the pools' health
    /// check.
    fn note<T>(&self, result: &Result<T, StoreError>) {
        if let Err(error) = result {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(error, StoreError::Unavailable { .. }) {
                self.health.fault();
            }
        }
    }

    /// A connection of `pool` (whose size is `max`), or `Unavailable` saying why none.
    async fn checkout<C: Session>(
        &self,
        operation: &'static str,
        pool: &Pool<C>,
        max: u32,
    ) -> Result<Lease<C>, StoreError> {
        match pool.get_owned().await {
            Ok(conn) => Ok(conn),
            Err(bb8::RunError::User(e)) => Err(e),
            Err(bb8::RunError::TimedOut) => {
                let s = pool.state();
                let mut msg = format!(
                    "no connection free within {:?} ({} open, {} idle, max {})",
                    self.pool_timeout, s.connections, s.idle_connections, max
                );
                if let Some(last) = self.last_error.get() {
                    msg.push_str(&format!("; last connection error: {last}"));
                }
                Err(StoreError::Unavailable {
                    operation,
                    source: msg.into(),
                })
            }
        }
    }

    /// One attempt of a read on a shared connection (opened if its slot is empty or its
    /// connection predates the last fault). A connection that fails with a connection error
    /// or does not answer in time leaves its slot; reads still running on it finish or fail
    /// on their own.
    async fn read_shared<P: Sync, T>(
        &self,
        shared: &SharedReads,
        operation: &'static str,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        self.ensure_open()?;
        let n = shared.slots.len().max(1);
        let slot = shared.next.fetch_add(1, Ordering::Relaxed) % n;
        let Some(slot) = shared.slots.get(slot) else {
            return Err(StoreError::Closed);
        };
        let conn = {
            let mut held = slot.lock().await;
            let epoch = self.health.epoch();
            match &*held {
                Some((conn, opened)) if *opened == epoch => Arc::clone(conn),
                _ => {
                    let conn = Arc::new(self.connector.connect_shared().await?);
                    *held = Some((Arc::clone(&conn), epoch));
                    conn
                }
            }
        };
        let (result, _) = self
            .counted(operation, async {
                let mut shared: &AsyncPgConnection = &conn;
                work(&mut shared, params).await
            })
            .await;
        if let Err(StoreError::Unavailable { .. } | StoreError::Timeout { .. }) = &result {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &conn)) {
                *held = None;
            }
        }
        result
    }

    /// A read on a replica's pool (`crate::replica`): one attempt, no retry (its caller
    /// reads the primary instead), with the span, the command timeout and the counters; a
    /// connection whose statement did not finish is thrown away with a cancel request to
    /// the replica. Its failures are not the primary's faults.
    pub(crate) async fn read_on<P: Sync, T>(
        &self,
        (pool, connector, server): (&Pool<AsyncPgConnection>, &Connector, &str),
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        self.ensure_open()?;
        let op = call.operation;
        let span = replica_span(call, server);
        async {
            let lease = match pool.get_owned().await {
                Ok(lease) => lease,
                Err(bb8::RunError::User(e)) => return Err(e),
                Err(bb8::RunError::TimedOut) => {
                    return Err(StoreError::Unavailable {
                        operation: op,
                        source: format!("no connection to the replica {server} free").into(),
                    })
                }
            };
            let mut conn = InFlight {
                lease,
                connector,
                done: false,
            };
            let read = (params, work);
            let declaration = self.declaration(op, call.scope)?;
            let attempt = declaring(
                declaration,
                self.in_tx(&mut conn.lease, op, Tx::Statement, &read, read_on_pooled),
            );
            let (result, finished) = self.replica_attempt(op, attempt).await;
            conn.done = finished;
            result
        }
        .instrument(span)
        .await
    }

    /// Whether a read of `call` may share a connection with other callers' reads: not the
    /// cross-user work under row-level isolation (its declaration is no statement's own).
    pub(crate) fn may_share(&self, call: Call<'_>) -> Result<bool, StoreError> {
        Ok(!matches!(
            self.declaration(call.operation, call.scope)?,
            Some(Declaration { users: None, .. })
        ))
    }

    /// A read on a replica's connection shared by concurrent reads (pipelined; `crate::replica`
    /// holds it; only when [`may_share`](Self::may_share)): one attempt, no retry, with the
    /// span, the declaration inside its statement, the command timeout and the counters.
    /// Its caller drops the connection after a connection error or a timeout.
    pub(crate) async fn read_with<P: Sync, T>(
        &self,
        (conn, server): (&AsyncPgConnection, &str),
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        self.ensure_open()?;
        let op = call.operation;
        let span = replica_span(call, server);
        // As on the primary's shared connections (see `read`): a read of users' rows
        // declares inside its own statement.
        let users = self.declaration(op, call.scope)?.and_then(|d| d.users);
        async {
            let mut shared = conn;
            let attempt = crate::sql::declaring_in_statement(users, work(&mut shared, params));
            self.replica_attempt(op, attempt).await.0
        }
        .instrument(span)
        .await
    }

    /// One attempt on a replica under the command timeout, counted; `false` with it when
    /// the timeout cut it short. Unlike [`counted`](Self::counted), a failure is no fault
    /// of the primary's pools. The deadline starts at the call: await it at once.
    fn replica_attempt<'a, T: 'a>(
        &'a self,
        operation: &'static str,
        work: impl Future<Output = Result<T, StoreError>> + 'a,
    ) -> impl Future<Output = (Result<T, StoreError>, bool)> + 'a {
        self.timed(operation, work).map(|(result, finished)| {
            if result.is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            (result, finished)
        })
    }

    /// Pool figures.
    pub(crate) fn pool_stats(&self, max: u32) -> PoolStats {
        match self.pool() {
            Ok(pool) => {
                let s = pool.state();
                PoolStats {
                    connections: s.connections,
                    idle: s.idle_connections,
                    in_use: s.connections.saturating_sub(s.idle_connections),
                    max,
                    waits: s.statistics.get_waited,
                    wait_timeouts: s.statistics.get_timed_out,
                    created: s.statistics.connections_created,
                    closed_broken: s.statistics.connections_closed_broken
                        + s.statistics.connections_closed_invalid,
                }
            }
            Err(_) => PoolStats {
                connections: 0,
                idle: 0,
                in_use: 0,
                max,
                waits: 0,
                wait_timeouts: 0,
                created: 0,
                closed_broken: 0,
            },
        }
    }

    /// Operation counters since start (watching's are the store's to add).
    pub(crate) fn metrics(&self) -> StoreMetrics {
        let c = &self.counters;
        StoreMetrics {
            queries: c.queries.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            ..StoreMetrics::default()
        }
    }

    /// Closes every pool and shared connection; later calls fail with `Closed`.
    pub(crate) async fn close(&self) {
        drop(self.pool.write().unwrap_or_else(|p| p.into_inner()).take());
        drop(
            self.copy_pool
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(shared) = &self.shared {
            for slot in &shared.slots {
                slot.lock().await.take();
            }
        }
    }
}

/// The tracing span of a read on replica `server`.
fn replica_span(call: Call<'_>, server: &str) -> tracing::Span {
    tracing::info_span!(
        "taskhistory",
        operation = call.operation,
        user_id = call.user_id.unwrap_or(""),
        task_id = call.task_id.unwrap_or(""),
        server,
    )
}

/// A read's work on a pooled connection.
fn read_on_pooled<'c, P: Sync, T>(
    conn: &'c mut AsyncPgConnection,
    (params, work): &'c (&P, Read<P, T>),
) -> BoxFuture<'c, Result<T, StoreError>> {
    Box::pin(async move {
        let mut conn: &AsyncPgConnection = conn;
        work(&mut conn, params).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rows::TaskKey;
    use taskhistory_core::TaskStatus;

    /// The size of what `f` returns, without calling it.
    fn returned<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// An operation's future is moved at each layer it passes through; the connect
    /// handshake and the pooled path, which a read on a shared connection never takes, must
    /// not be carried inline (they made a status read's future 46 KB).
    #[test]
    fn the_hot_paths_futures_stay_small() {
        let read = returned(Executor::read::<TaskKey<'static>, TaskStatus>);
        let backend_read = returned(crate::backend::Backend::read::<TaskKey<'static>, TaskStatus>);
        let pooled = returned(
            |e: &'static Executor, c: Call<'static>, p: &'static (), w: Write<(), ()>| {
                e.pooled(c, Tx::Statement, p, w)
            },
        );
        assert!(read <= 2048, "a read's future is {read} bytes");
        assert!(
            backend_read <= 2048,
            "a read's future, replicas' path included, is {backend_read} bytes"
        );
        assert!(
            pooled <= 4096,
            "a pooled operation's future is {pooled} bytes"
        );
    }
}
