//! The one error type every store returns.

/// A boxed error from a backend, kept as the source of [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a store operation.
///
/// Variants are by meaning, the same for every backend; the backend's own error stays
/// reachable through [`std::error::Error::source`]. No variant ever carries a password or a
/// connection string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's input was refused before anything was written.
    #[error("invalid input: {field}: {reason}")]
    InvalidInput {
        /// The argument or record field at fault, e.g. `"user_id"` or `"records[3].step"`.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// The store's configuration is wrong or does not fit the server (a setting that does
    /// not parse, a certificate file that cannot be read, migrations pending behind a
    /// transaction pooler): not the caller's input, and no retry cures it.
    #[error("invalid configuration: {setting}: {reason}")]
    Configuration {
        /// The setting at fault: the environment variable it was read from (`"DB_PORT"`), or,
        /// for what the server refused when connecting, the connection parameter (`"user"`,
        /// `"dbname"`, `"host"`, `"sslrootcert"`, `"sslmode"`; `"privileges"` for a right
        /// the role lacks), whatever the configuration came from.
        setting: String,
        /// Why it was refused.
        reason: String,
    },
    /// The task is cancelled: the write was refused and nothing was written. A worker that
    /// gets this should stop working on the task.
    #[error("task {task_id:?} of user {user_id:?} is cancelled; the write was refused")]
    TaskCancelled {
        /// The task's user.
        user_id: String,
        /// The cancelled task.
        task_id: String,
    },
    /// The backend cannot be reached right now (connection refused or lost, server shutting
    /// down, pool exhausted). Transient: the operation may be retried.
    #[error("store unavailable during {operation}: {source}")]
    Unavailable {
        /// The store operation, e.g. `"save_task_history"`.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The operation ran out of time (a client command timeout or the server's
    /// statement_timeout). Transient: the operation may be retried.
    #[error("{operation} timed out: {source}")]
    Timeout {
        /// The store operation.
        operation: &'static str,
        /// What timed out.
        #[source]
        source: BoxError,
    },
    /// A transaction conflict the server resolved by aborting us (serialization failure,
    /// deadlock). Transient: the operation may be retried.
    #[error("{operation} conflicted with a concurrent transaction: {source}")]
    Conflict {
        /// The store operation.
        operation: &'static str,
        /// The server's error.
        #[source]
        source: BoxError,
    },
    /// The store was closed with [`close`](crate::TaskHistoryStore::close).
    #[error("the store is closed")]
    Closed,
    /// A limit of the store's own configuration is reached (today: live watchers, at most
    /// `DB_MAX_WATCHERS`): nothing was started. Not transient for the retry policy (an
    /// immediate retry meets the same limit); a caller may try again once others finished
    /// (`taskhistory serve` answers HTTP 429, WebSocket close 1013).
    #[error("{operation} refused: the store's limit of {max} {limit} is reached")]
    LimitReached {
        /// The store operation, e.g. `"watch_task"`.
        operation: &'static str,
        /// What is limited, e.g. `"watchers"`.
        limit: &'static str,
        /// The limit.
        max: usize,
    },
    /// Anything else the backend reported, or data read back that does not parse.
    #[error("database error during {operation}: {source}")]
    Database {
        /// The store operation.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// Every variant with its fields; a backend error kept as a `source` is cloned as its
/// message (its own type is not `Clone`), so the clone displays the same. What lets a mock
/// return the same error every time (`return_const(Err(...))`) and one failure be reported
/// to several callers.
impl Clone for StoreError {
    fn clone(&self) -> Self {
        let text = |source: &BoxError| -> BoxError { source.to_string().into() };
        match self {
            StoreError::InvalidInput { field, reason } => StoreError::InvalidInput {
                field: field.clone(),
                reason: reason.clone(),
            },
            StoreError::Configuration { setting, reason } => StoreError::Configuration {
                setting: setting.clone(),
                reason: reason.clone(),
            },
            StoreError::TaskCancelled { user_id, task_id } => StoreError::TaskCancelled {
                user_id: user_id.clone(),
                task_id: task_id.clone(),
            },
            StoreError::Unavailable { operation, source } => StoreError::Unavailable {
                operation,
                source: text(source),
            },
            StoreError::Timeout { operation, source } => StoreError::Timeout {
                operation,
                source: text(source),
            },
            StoreError::Conflict { operation, source } => StoreError::Conflict {
                operation,
                source: text(source),
            },
            StoreError::Closed => StoreError::Closed,
            StoreError::LimitReached {
                operation,
                limit,
                max,
            } => StoreError::LimitReached {
                operation,
                limit,
                max: *max,
            },
            StoreError::Database { operation, source } => StoreError::Database {
                operation,
                source: text(source),
            },
        }
    }
}

impl StoreError {
    /// A [`StoreError::Configuration`] for `setting`.
    pub fn configuration(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Configuration {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    /// An [`StoreError::InvalidInput`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error with an [`InvalidInput`](StoreError::InvalidInput)'s field placed
    /// under `prefix` (`"result"` becomes `"records[3].result"`; an empty field becomes
    /// `prefix`). Other errors are unchanged.
    pub fn under(self, prefix: &str) -> Self {
        match self {
            StoreError::InvalidInput { field, reason } => StoreError::InvalidInput {
                field: if field.is_empty() {
                    prefix.to_owned()
                } else {
                    format!("{prefix}.{field}")
                },
                reason,
            },
            other => other,
        }
    }

    /// A [`StoreError::Database`] from anything printable (corrupt data read back, say).
    pub fn database(operation: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Database {
            operation,
            source: source.into(),
        }
    }

    /// True for errors that a retry may cure: [`Unavailable`](StoreError::Unavailable),
    /// [`Timeout`](StoreError::Timeout) and [`Conflict`](StoreError::Conflict). Writes are
    /// idempotent, so retrying them is safe.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. }
                | StoreError::Timeout { .. }
                | StoreError::Conflict { .. }
        )
    }

    /// True for [`StoreError::InvalidInput`].
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, StoreError::InvalidInput { .. })
    }

    /// True for [`StoreError::TaskCancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, StoreError::TaskCancelled { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_keeps_the_variant_and_reads_the_same() {
        let errors = [
            StoreError::invalid("user_id", "is empty"),
            StoreError::configuration("DB_PORT", "not a number"),
            StoreError::TaskCancelled {
                user_id: "u".into(),
                task_id: "t".into(),
            },
            StoreError::Unavailable {
                operation: "save_task_history",
                source: "connection refused".into(),
            },
            StoreError::Timeout {
                operation: "load_task_history",
                source: "60 s".into(),
            },
            StoreError::Conflict {
                operation: "save_task_history",
                source: "serialization failure".into(),
            },
            StoreError::Closed,
            StoreError::LimitReached {
                operation: "watch_user",
                limit: "watchers",
                max: 10,
            },
            StoreError::database("stats", "bad row"),
        ];
        for e in &errors {
            let c = e.clone();
            assert_eq!(c.to_string(), e.to_string());
            assert_eq!(c.is_transient(), e.is_transient());
            assert_eq!(std::mem::discriminant(&c), std::mem::discriminant(e));
        }
    }

    #[test]
    fn only_backend_trouble_is_transient() {
        let io = || -> BoxError { "connection reset".into() };
        assert!(StoreError::Unavailable {
            operation: "x",
            source: io()
        }
        .is_transient());
        assert!(StoreError::Timeout {
            operation: "x",
            source: io()
        }
        .is_transient());
        assert!(StoreError::Conflict {
            operation: "x",
            source: io()
        }
        .is_transient());
        assert!(!StoreError::database("x", io()).is_transient());
        assert!(!StoreError::invalid("user_id", "empty").is_transient());
        assert!(!StoreError::Closed.is_transient());
        let cancelled = StoreError::TaskCancelled {
            user_id: "u".into(),
            task_id: "t".into(),
        };
        assert!(!cancelled.is_transient());
        assert!(cancelled.is_cancelled());
    }

    #[test]
    fn invalid_input_names_the_field() {
        let e = StoreError::invalid("records[2].task_id", "empty");
        assert_eq!(e.to_string(), "invalid input: records[2].task_id: empty");
    }
}
