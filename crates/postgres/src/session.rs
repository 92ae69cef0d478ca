//! What every connection kind of the store shares: the [`Session`] trait (diesel-async
//! connections and the plain tokio-postgres ones of `COPY`), the one transaction helper
//! ([`Transaction`]), and the pools of both kinds ([`Pool`]) with their health check.
//!
//! Pool health: a checkout costs no round trip ("fast" checkout), except after a fault.
//! Every connection-class failure the executor sees starts a new fault epoch
//! ([`Health::fault`]); a pooled connection last checked before the current epoch is checked
//! with one round trip before it is handed out, and dropped if it fails, so once the server
//! answers again no caller is handed a connection that died with the old one. A connection
//! whose socket is known closed is never handed out.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::TransactionManager;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, SimpleAsyncConnection};
use taskhistory_core::StoreError;

use crate::connection::Connector;
use crate::error::{from_diesel, from_postgres};

/// A connection a transaction can run on, and a pool can keep.
pub(crate) trait Session: Sized + Send + 'static {
    /// Opens one, with the store's settings.
    fn open(connector: &Connector) -> impl Future<Output = Result<Self, StoreError>> + Send;
    /// Runs `sql` (one or more statements, no parameters) in one round trip.
    fn batch(
        &mut self,
        connector: &Connector,
        operation: &'static str,
        sql: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Known to be unusable (socket closed, marked broken), without a round trip.
    fn is_broken(&mut self) -> bool;
    /// Marks it unusable: its pool drops it instead of taking it back.
    fn set_broken(&mut self);
    /// What asks the server to stop the statement it runs.
    fn cancel_token(&self) -> tokio_postgres::CancelToken;
}

impl Session for AsyncPgConnection {
    fn open(connector: &Connector) -> impl Future<Output = Result<Self, StoreError>> + Send {
        connector.connect()
    }

    async fn batch(
        &mut self,
        _connector: &Connector,
        operation: &'static str,
        sql: &str,
    ) -> Result<(), StoreError> {
        // diesel's instrumentation hands the text to the statement observer.
        self.batch_execute(sql)
            .await
            .map_err(|e| from_diesel(operation, e))
    }

    fn is_broken(&mut self) -> bool {
        PoolableConnection::is_broken(self)
    }

    fn set_broken(&mut self) {
        AnsiTransactionManager::transaction_manager_status_mut(self).set_in_error();
    }

    fn cancel_token(&self) -> tokio_postgres::CancelToken {
        AsyncPgConnection::cancel_token(self)
    }
}

/// A plain tokio-postgres connection, for what diesel-async cannot send (binary `COPY`).
pub(crate) struct RawSession {
    pub(crate) client: tokio_postgres::Client,
    broken: bool,
}

impl Session for RawSession {
    async fn open(connector: &Connector) -> Result<Self, StoreError> {
        Ok(RawSession {
            client: connector.connect_raw().await?,
            broken: false,
        })
    }

    async fn batch(
        &mut self,
        connector: &Connector,
        operation: &'static str,
        sql: &str,
    ) -> Result<(), StoreError> {
        connector.observe(sql);
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| from_postgres(operation, e))
    }

    fn is_broken(&mut self) -> bool {
        self.broken || self.client.is_closed()
    }

    fn set_broken(&mut self) {
        self.broken = true;
    }

    fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.client.cancel_token()
    }
}

/// What an operation declares to row-level isolation (migration 8's policies read it): the
/// users (a text array's literal; what a read declares inside its own statement), or the
/// cross-user work (`None`). Its `SET` is made when a path needs one ([`sql`](Self::sql)).
#[derive(Debug, Clone)]
pub(crate) struct Declaration {
    pub(crate) users: Option<Arc<str>>,
}

impl Declaration {
    /// The `SET` that declares it, for a transaction (`local`: sent with its `BEGIN`) or a
    /// session (sent ahead of a lone statement on a direct connection).
    pub(crate) fn sql(&self, local: bool) -> String {
        match &self.users {
            Some(array) => crate::sql::declare::users(array, local),
            None => crate::sql::declare::maintenance(local),
        }
    }
}

tokio::task_local! {
    /// The declaration of the operation whose attempts run in this scope (set by the
    /// executor): every [`Transaction`] begun inside declares it.
    static DECLARED: Option<Declaration>;
}

/// Runs `work` with `declaration` as the current operation's (see [`Transaction::begin`]).
pub(crate) fn declaring<F: Future>(
    declaration: Option<Declaration>,
    work: F,
) -> impl Future<Output = F::Output> {
    // Not an `async fn`: one would hold `work` twice (as its argument and as the scope
    // awaiting it), and move both at every call (`docs/performance.md`, "Futures' size").
    DECLARED.scope(declaration, work)
}

/// The current operation's declaration, if it makes one.
pub(crate) fn declared() -> Option<Declaration> {
    DECLARED.try_with(Clone::clone).ok().flatten()
}

/// Sends `sql` (no parameters) on `conn` ahead of what is sent next, without waiting for its
/// answer: the first poll of a request queues its message on the connection, and the
/// server runs a connection's statements in the order they were queued, so the statement
/// sent next runs after it, in the same round trip. Its answer is read and dropped by the
/// connection. Used for what a statement needs in place and whose failure would fail the
/// statement anyway: row-level isolation's declaration before a lone statement.
pub(crate) async fn send_ahead(
    conn: &AsyncPgConnection,
    operation: &'static str,
    sql: &str,
) -> Result<(), StoreError> {
    let mut shared = conn;
    let sending = shared.batch_execute(sql);
    let mut sending = std::pin::pin!(sending);
    match futures::poll!(sending.as_mut()) {
        std::task::Poll::Ready(result) => result.map_err(|e| from_diesel(operation, e)),
        std::task::Poll::Pending => Ok(()),
    }
}

/// An open transaction: the one way the crate runs one. [`begin`](Self::begin) sends `BEGIN`,
/// the transaction pooler's `SET LOCAL`s (behind PgBouncer), the operation's declaration to
/// row-level isolation (when it makes one, see [`declaring`]) and `extra` in one round trip;
/// [`commit`](Self::commit) or [`rollback`](Self::rollback) end it. Dropped without either
/// (an error returned early, a future dropped), it marks its connection broken, so no pool
/// takes back a connection inside a transaction.
pub(crate) struct Transaction<'c, C: Session> {
    conn: &'c mut C,
    connector: &'c Connector,
    operation: &'static str,
    open: bool,
}

impl<'c, C: Session> Transaction<'c, C> {
    /// Begins a transaction on `conn`; `extra` (may be empty) runs right after the set-up.
    pub(crate) async fn begin(
        conn: &'c mut C,
        connector: &'c Connector,
        operation: &'static str,
        extra: &str,
    ) -> Result<Self, StoreError> {
        let mut sql = String::from("BEGIN");
        let declared = declared().map(|d| d.sql(true)).unwrap_or_default();
        let declared = declared.as_str();
        for part in [connector.transaction_setup().unwrap_or(""), declared, extra] {
            if !part.is_empty() {
                sql.push_str("; ");
                sql.push_str(part);
            }
        }
        let tx = Transaction {
            conn,
            connector,
            operation,
            open: true,
        };
        tx.conn.batch(connector, operation, &sql).await?;
        Ok(tx)
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        self.end("COMMIT").await
    }

    /// Rolls back.
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        self.end("ROLLBACK").await
    }

    /// Commits when `result` is a success, else rolls back and returns the work's own error
    /// (which says more than a failed rollback after it).
    pub(crate) async fn finish<T>(self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match result {
            Ok(value) => self.commit().await.map(|()| value),
            Err(e) => {
                let _ = self.rollback().await;
                Err(e)
            }
        }
    }

    async fn end(mut self, sql: &str) -> Result<(), StoreError> {
        let result = self.conn.batch(self.connector, self.operation, sql).await;
        // Ended either way: a failed COMMIT ends the transaction on the server, and a failed
        // send means the connection is gone.
        self.open = false;
        result
    }
}

impl<C: Session> Deref for Transaction<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        self.conn
    }
}

impl<C: Session> DerefMut for Transaction<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn
    }
}

impl<C: Session> Drop for Transaction<'_, C> {
    fn drop(&mut self) {
        if self.open {
            self.conn.set_broken();
        }
    }
}

/// Fault epochs (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Health {
    epoch: AtomicU64,
}

impl Health {
    /// Notes a connection-class failure: connections last checked before it are checked
    /// again before reuse.
    pub(crate) fn fault(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
}

/// A pooled connection and the fault epoch it was last known good in.
pub(crate) struct Pooled<C> {
    conn: C,
    checked: u64,
}

impl<C> Deref for Pooled<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.conn
    }
}

impl<C> DerefMut for Pooled<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.conn
    }
}

/// Opens, checks and judges the connections of a [`Pool`].
pub(crate) struct Manager<C> {
    connector: Connector,
    health: Arc<Health>,
    _kind: std::marker::PhantomData<fn() -> C>,
}

impl<C: Session> bb8::ManageConnection for Manager<C> {
    type Connection = Pooled<C>;
    type Error = StoreError;

    async fn connect(&self) -> Result<Pooled<C>, StoreError> {
        let checked = self.health.epoch();
        Ok(Pooled {
            conn: C::open(&self.connector).await?,
            checked,
        })
    }

    async fn is_valid(&self, conn: &mut Pooled<C>) -> Result<(), StoreError> {
        if conn.conn.is_broken() {
            return Err(StoreError::Unavailable {
                operation: "checkout",
                source: "the connection was closed".into(),
            });
        }
        let epoch = self.health.epoch();
        if conn.checked != epoch {
            conn.conn.batch(&self.connector, "checkout", "").await?;
            conn.checked = epoch;
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut Pooled<C>) -> bool {
        conn.conn.is_broken()
    }
}

/// A pool of `C` connections.
pub(crate) type Pool<C> = bb8::Pool<Manager<C>>;

/// A connection lent by a [`Pool`].
pub(crate) type Lease<C> = bb8::PooledConnection<'static, Manager<C>>;

/// The settings of one pool.
pub(crate) struct PoolSettings {
    pub(crate) max_size: u32,
    pub(crate) min_idle: u32,
    pub(crate) idle_timeout: Option<std::time::Duration>,
    pub(crate) connection_timeout: std::time::Duration,
}

/// Builds a pool. It opens nothing by itself (the caller may add a first connection it
/// opened directly, so start-up errors are the real ones); it fills up to `min_idle` in the
/// background. The connection used last goes out first (LIFO): under light load the same few
/// server processes stay warm.
pub(crate) fn build_pool<C: Session>(
    settings: PoolSettings,
    connector: &Connector,
    health: &Arc<Health>,
    last_error: &LastError,
) -> Pool<C> {
    bb8::Pool::builder()
        .max_size(settings.max_size)
        .min_idle(Some(settings.min_idle))
        .idle_timeout(settings.idle_timeout)
        .connection_timeout(settings.connection_timeout)
        .test_on_check_out(true)
        .queue_strategy(bb8::QueueStrategy::Lifo)
        .error_sink(Box::new(last_error.clone()))
        .build_unchecked(Manager {
            connector: connector.clone(),
            health: Arc::clone(health),
            _kind: std::marker::PhantomData,
        })
}

/// Adds an open connection to `pool` (the first one, opened at start-up).
pub(crate) fn add<C: Session>(pool: &Pool<C>, health: &Health, conn: C) {
    // The pool may already be full if min_idle connections raced us; that is fine.
    let _ = pool.add(Pooled {
        conn,
        checked: health.epoch(),
    });
}

/// The last error a pool met while opening connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl bb8::ErrorSink<StoreError> for LastError {
    fn sink(&self, error: StoreError) {
        tracing::warn!(error = %error, "taskhistory: opening or checking a pooled connection failed");
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<StoreError>> {
        Box::new(self.clone())
    }
}
