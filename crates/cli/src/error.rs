//! The tool's errors and the exit code of each class.

use taskhistory_core::StoreError;

/// Exit codes, one per class of failure (also listed in `--help`).
pub(crate) mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// Any other failure; also `health` when the store is not healthy.
    pub(crate) const OTHER: u8 = 1;
    /// Bad input or configuration: a malformed argument, an invalid id, limit or cursor,
    /// bad import lines, no database configured (clap's own usage errors use 2 as well).
    pub(crate) const BAD_INPUT: u8 = 2;
    /// The task asked for does not exist.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// The database cannot be reached, or did not answer in time; or a limit of the store's
    /// configuration is reached (live watchers): temporary, try again later.
    pub(crate) const UNAVAILABLE: u8 = 4;

    /// The table printed at the end of `--help`.
    pub(crate) const HELP: &str = "\
Exit codes:
  0  success
  1  other failure (health: the store is not healthy)
  2  bad input or configuration: bad arguments, invalid ids/limits/cursors, refused
     import lines, no database configured
  3  not found: the task does not exist
  4  unavailable: the database cannot be reached or did not answer in time, or a limit
     of the store is reached (DB_MAX_WATCHERS): try again later
  130, 143  interrupted (Ctrl-C, SIGTERM): export stops after whole lines (a file being
     written is removed), import after the batch being written commits; both say what
     was done

Configuration (flags over environment over defaults): DATABASE_URL, or DB_HOST, DB_PORT,
DB_NAME, DB_USER, DB_PASSWORD; DB_SCHEMA, DB_SSLMODE, DB_SSLROOTCERT, DB_COMMAND_TIMEOUT,
DB_STATEMENT_TIMEOUT, DB_CONNECT_TIMEOUT, DB_POOL_TIMEOUT, DB_MIN_SIZE (default 1 here),
DB_MAX_SIZE (default 4 here), DB_APPLICATION_NAME (default taskhistory-cli), DB_PGBOUNCER
(true behind PgBouncer in transaction mode), DB_NOTIFY, DB_LISTEN_URL (watch through PgBouncer),
DB_COPY_MIN_ROWS (imports of new tasks by COPY from this batch size; 0 = never), DB_COPY_CONNECTIONS,
DB_PIPELINED_READS (connections shared by reads; 0 = reads use the pool), DB_SAVE_LANES
(single saves written at once; more queue and are combined; 0 = no combining), DB_STATUS_LANES
(status checks read at once; more queue and are combined; 0 = no combining), DB_WATCH_POLL
(seconds between a watcher's reads when nothing wakes it; default 1), DB_READ_URLS (streaming
replicas that serve reads, comma-separated), DB_REPLICA_WAIT (seconds a read waits for a
replica to catch up; default 0.05), DB_MAX_REPLICA_LAG (seconds; a replica further behind
leaves the rotation; default 5).";
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task or user asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An argument or input file is wrong.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The tool is not configured to reach a database.
    #[error("{0}")]
    Config(String),
    /// Reading or writing a file or a stream failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code for this error's class.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Store(e) if e.is_invalid_input() => exit::BAD_INPUT,
            CliError::Store(StoreError::Configuration { .. }) => exit::BAD_INPUT,
            CliError::Store(
                StoreError::Unavailable { .. }
                | StoreError::Timeout { .. }
                | StoreError::Closed
                | StoreError::LimitReached { .. },
            ) => exit::UNAVAILABLE,
            CliError::Store(_) | CliError::Io { .. } | CliError::Other(_) => exit::OTHER,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::BadInput(_) | CliError::Config(_) => exit::BAD_INPUT,
        }
    }

    /// The class of the error, as `--json` names it.
    pub(crate) fn class(&self) -> &'static str {
        match self.exit_code() {
            exit::BAD_INPUT => "bad_input",
            exit::NOT_FOUND => "not_found",
            exit::UNAVAILABLE => "unavailable",
            _ => "other",
        }
    }

    /// What to do about it, when the tool can tell: a database the store's tables are
    /// missing from has not been migrated.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        let text = self.to_string();
        let missing = |table: &str| text.contains(&format!("relation \"{table}\" does not exist"));
        if missing("task_summary") || missing("task_history") || missing("taskhistory_layout") {
            return Some("the schema is not migrated: run `taskhistory migrate` first");
        }
        // PgBouncer refuses the start-up options the store sends on a direct connection.
        if text.contains("unsupported startup parameter") {
            return Some(
                "a connection pooler (PgBouncer) refused the start-up options: set \
                 DB_PGBOUNCER=true when the URL points at PgBouncer in transaction mode",
            );
        }
        None
    }

    /// An I/O error while doing `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_limit_is_a_temporary_condition() {
        let e = CliError::Store(StoreError::LimitReached {
            operation: "watch_user",
            limit: "watchers",
            max: 8,
        });
        assert_eq!(
            (e.exit_code(), e.class()),
            (exit::UNAVAILABLE, "unavailable")
        );
    }
}
