//! Store set-up for the commands: which store (`--memory` or PostgreSQL), the PostgreSQL
//! configuration from flags and the environment, and the stores a run opened (closed
//! before the process exits).

use std::sync::{Arc, Mutex};

use taskhistory_core::{DynStore, StoreError};
use taskhistory_memory::MemoryStore;
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore};

use crate::args::DbArgs;
use crate::error::CliError;

/// The store a command works on.
pub(crate) enum Backend {
    /// An empty in-memory store (`--memory`, and `demo` by default).
    Memory(MemoryStore),
    /// PostgreSQL.
    Postgres(PgTaskHistoryStore),
}

impl Backend {
    /// The store as the trait object every command but a few PostgreSQL-only ones uses.
    pub(crate) fn store(&self) -> DynStore {
        match self {
            Backend::Memory(m) => Arc::new(m.clone()),
            Backend::Postgres(p) => Arc::new(p.clone()),
        }
    }

    pub(crate) fn postgres(&self, command: &str) -> Result<&PgTaskHistoryStore, CliError> {
        match self {
            Backend::Postgres(p) => Ok(p),
            Backend::Memory(_) => Err(CliError::Other(format!(
                "{command} needs PostgreSQL; drop --memory"
            ))),
        }
    }
}

/// The settings that name a server; without one of them there is no database to use
/// (the library's defaults, `postgres@localhost/postgres`, are not a guess the tool makes).
const SERVER_SETTINGS: [&str; 6] = [
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
];

/// The PostgreSQL configuration: flags over environment over defaults.
pub(crate) fn pg_config(db: &DbArgs) -> Result<PgConfig, CliError> {
    if SERVER_SETTINGS.iter().all(|k| db.lookup(k).is_none()) {
        return Err(CliError::Config(
            "no database configured: set DATABASE_URL (postgres://user:password@host:5432/db) \
             or DB_HOST and DB_NAME (with DB_PORT, DB_USER, DB_PASSWORD), or pass \
             --database-url; --memory tries the commands on an empty in-memory store"
                .to_owned(),
        ));
    }
    let config = PgConfig::from_lookup(|key| db.lookup(key))
        .and_then(|config| config.validate().map(|()| config));
    config.map_err(|e| match e {
        // A setting given as a flag is named as the user typed it.
        StoreError::Configuration { setting, reason } => {
            let flag = match setting.as_str() {
                "DATABASE_URL" if db.database_url.is_some() => "--database-url",
                "DB_SCHEMA" if db.schema.is_some() => "--schema",
                "DB_SSLMODE" if db.sslmode.is_some() => "--sslmode",
                "DB_SSLROOTCERT" if db.sslrootcert.is_some() => "--sslrootcert",
                "DB_COMMAND_TIMEOUT" if db.command_timeout.is_some() => "--command-timeout",
                "DB_CONNECT_TIMEOUT" if db.connect_timeout.is_some() => "--connect-timeout",
                _ => setting.as_str(),
            };
            CliError::Store(StoreError::configuration(flag, reason))
        }
        other => CliError::Store(other),
    })
}

/// The stores a run opened. They are closed before the process exits, so the wake-ups of
/// its last writes leave for other processes' watchers at once (else those watchers would
/// see the writes only at their next poll).
#[derive(Default)]
pub(crate) struct Opened(Mutex<Vec<DynStore>>);

impl Opened {
    /// Opens the store `db` names, to be closed by [`close_all`](Self::close_all).
    pub(crate) async fn open(&self, db: &DbArgs) -> Result<Backend, CliError> {
        let backend = if db.memory {
            Backend::Memory(MemoryStore::new())
        } else {
            Backend::Postgres(PgTaskHistoryStore::connect(pg_config(db)?).await?)
        };
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(backend.store());
        Ok(backend)
    }

    /// Closes every store opened.
    pub(crate) async fn close_all(&self) {
        let opened = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for store in opened {
            store.close().await;
        }
    }
}
