//! [`Backend`]: what every operation of the store runs on (the executor, the settings, the
//! wake-ups of watchers), shared by the store and by the modules that work beneath it:
//! combining saves, watching, partitions, the compatibility mode and the operator
//! statements take a `&Backend`, never the store, so the store sits on top of them and
//! calls them, and nothing below imports it.

use std::sync::Arc;

use taskhistory_core::validate::PreparedStep;
use taskhistory_core::StoreError;

use crate::config::PgConfig;
use crate::connection::Connector;
use crate::exec::{Call, Executor, Read};
use crate::listen::Hub;
use crate::notify::Notifier;
use crate::ops;
use crate::replica::{self, AllWritten, Replicas};
use crate::sql::ddl;

/// How long DDL on the table (making partitions, the compatibility mode's triggers) waits
/// for its locks.
const DDL_LOCK_WAIT_MS: u128 = 5_000;

/// The store's shared state (see the module's doc).
pub(crate) struct Backend {
    exec: Arc<Executor>,
    config: PgConfig,
    /// The notification channel of this schema: wake-ups of watchers.
    channel: String,
    /// Wakes other processes' watchers after this store's writes (when notifications are
    /// on).
    notifier: Option<Notifier>,
    hub: Hub,
    /// The replicas that serve reads ([`PgConfig::read_urls`]), if any.
    replicas: Option<Replicas>,
}

impl Backend {
    /// Connects (one connection at once, see [`Executor::connect`]).
    pub(crate) async fn connect(config: PgConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let exec = Arc::new(Executor::connect(&config).await?);
        let channel = format!("taskhistory_{}", config.get_schema().unwrap_or("public"));
        let notifier = config
            .notifications
            .then(|| Notifier::new(Arc::clone(&exec), channel.clone()));
        let replicas = Replicas::start(&config, &exec)?;
        Ok(Backend {
            exec,
            config,
            channel,
            notifier,
            hub: Hub::default(),
            replicas,
        })
    }

    /// The executor every operation runs through.
    pub(crate) fn exec(&self) -> &Executor {
        &self.exec
    }

    /// The settings.
    pub(crate) fn config(&self) -> &PgConfig {
        &self.config
    }

    /// Opens dedicated connections (LISTEN).
    pub(crate) fn connector(&self) -> &Connector {
        self.exec.connector()
    }

    /// The notification channel that wakes this schema's watchers.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// The store's schema name (`public` when none is set).
    pub(crate) fn schema_name(&self) -> &str {
        self.config.get_schema().unwrap_or("public")
    }

    /// How a DDL transaction begins (see [`Executor::dedicated`]): the store's DDL lock, and
    /// a wait of at most 5 s for the table locks.
    pub(crate) fn ddl_setup(&self) -> String {
        self.ddl_setup_waiting(DDL_LOCK_WAIT_MS)
    }

    /// [`ddl_setup`](Self::ddl_setup) with another wait for the table locks.
    pub(crate) fn ddl_setup_waiting(&self, lock_wait_ms: u128) -> String {
        format!(
            "{}; {}",
            ddl::lock(self.schema_name()),
            ddl::lock_timeout(lock_wait_ms)
        )
    }

    /// The wake-ups of the log's tail, from this store's writes and from other processes'
    /// through the store's `LISTEN` connection, started here on first use. Behind a
    /// transaction pooler without a direct URL for it (`DB_LISTEN_URL`) there is no
    /// `LISTEN`: the tail then sees other processes' writes at its polls.
    pub(crate) async fn wakes(&self) -> Result<&Hub, StoreError> {
        if self.connector().can_listen() {
            self.hub
                .ensure_listening(self.connector(), &self.channel)
                .await?;
        }
        Ok(&self.hub)
    }

    /// The wake-ups, without starting the listener.
    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Wakes the watchers of the users of committed writes (other processes' only when
    /// notifications are on): a wake-up, not the event; the tail reads the log.
    pub(crate) fn notify<'u>(&self, users: impl IntoIterator<Item = &'u str> + Clone) {
        self.wrote(users.clone());
        self.hub.wake(users.clone());
        if let Some(notifier) = &self.notifier {
            notifier.post(users);
        }
    }

    /// Notes writes for `users` that returned (committed, or of unknown outcome): this
    /// store's later reads of those users see them (`replica.rs`). [`notify`](Self::notify)
    /// calls it; a write that failed calls it by itself.
    pub(crate) fn wrote<'u>(&self, users: impl IntoIterator<Item = &'u str>) {
        if let Some(replicas) = &self.replicas {
            replicas.wrote(users);
        }
    }

    /// Notes, when dropped, a write of no one user (cleanup): every later read sees it.
    pub(crate) fn all_written(&self) -> AllWritten<'_> {
        Replicas::all_written(self.replicas.as_ref())
    }

    /// A read that a replica may serve (status, history, task lists, counts, activity): on
    /// a replica that has replayed what the read must see, else on the primary
    /// (`replica.rs`); on the primary without replicas.
    pub(crate) async fn read<P: Sync, T>(
        &self,
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        match &self.replicas {
            // Boxed: the replica path's future (about 3 KB) would otherwise be carried, and
            // moved, by every read, replicas or not.
            Some(replicas) => Box::pin(replicas.read(&self.exec, call, params, work)).await,
            None => self.exec.read(call, params, work).await,
        }
    }

    /// A position token covering every write for `user` through this store that returned
    /// (see `PgTaskHistoryStore::position`).
    pub(crate) async fn position(&self, user: &str) -> Result<Option<String>, StoreError> {
        let lsn = match &self.replicas {
            Some(replicas) => replicas.position(user, self.config.command_timeout).await?,
            None => Some(
                self.exec
                    .pooled(
                        Call::user(replica::SAMPLE, user),
                        crate::exec::Tx::Statement,
                        &(),
                        replica::wal_insert_position,
                    )
                    .await?,
            ),
        };
        Ok(lsn.map(replica::show_lsn))
    }

    /// Reads of `user` must see the position `token` (from [`position`](Self::position) of
    /// any store of this primary).
    pub(crate) fn require_position(&self, user: &str, token: &str) -> Result<(), StoreError> {
        let lsn = replica::parse_lsn(token).ok_or_else(|| {
            StoreError::invalid(
                "position",
                "is not a position token (a WAL position such as 0/16B3748)",
            )
        })?;
        if let Some(replicas) = &self.replicas {
            replicas.require(user, lsn);
        }
        Ok(())
    }

    /// The replicas' state (empty without replicas).
    pub(crate) fn replicas(&self) -> Option<&Replicas> {
        self.replicas.as_ref()
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
        let saved = self
            .exec
            .pooled(call, save.tx(), &save, ops::save::run)
            .await;
        match saved {
            Ok(()) => self.notify(steps.iter().map(|p| p.user_id)),
            // It may have committed all the same (the answer was lost).
            Err(_) => self.wrote(steps.iter().map(|p| p.user_id)),
        }
        saved
    }

    /// Sends the pending wake-ups, stops the listener, closes the pools: every later call
    /// fails with `Closed` (the store ends its watchers first).
    pub(crate) async fn close(&self) {
        if let Some(notifier) = &self.notifier {
            notifier.stop().await;
        }
        if let Some(replicas) = &self.replicas {
            replicas.close().await;
        }
        self.hub.stop().await;
        self.exec.close().await;
    }
}
