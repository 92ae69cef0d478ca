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
use crate::exec::{Call, Executor};
use crate::listen::Hub;
use crate::notify::Notifier;
use crate::ops;
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
        Ok(Backend {
            exec,
            config,
            channel,
            notifier,
            hub: Hub::default(),
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
        self.hub.wake(users.clone());
        if let Some(notifier) = &self.notifier {
            notifier.post(users);
        }
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
        self.exec
            .pooled(call, save.tx(), &save, ops::save::run)
            .await?;
        self.notify(steps.iter().map(|p| p.user_id));
        Ok(())
    }

    /// Sends the pending wake-ups, stops the listener, closes the pools: every later call
    /// fails with `Closed` (the store ends its watchers first).
    pub(crate) async fn close(&self) {
        if let Some(notifier) = &self.notifier {
            notifier.stop().await;
        }
        self.hub.stop().await;
        self.exec.close().await;
    }
}
