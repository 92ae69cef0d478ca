//! From diesel, bb8 and tokio-postgres errors to [`StoreError`].
//!
//! diesel-async keeps the SQLSTATE only as a [`DatabaseErrorKind`] for some classes (unique,
//! check, not-null, serialization failure, read-only); query_canceled (57014), deadlock
//! (40P01) and admin_shutdown (57P01) arrive as `Unknown` with the code dropped, so for those
//! three the server's (English) message is matched. A lost socket arrives as
//! `UnableToSendCommand`.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use taskhistory_core::{BoxError, StoreError};

/// Maps a diesel error from `operation`.
pub(crate) fn from_diesel(operation: &'static str, e: DieselError) -> StoreError {
    match e {
        DieselError::DatabaseError(kind, info) => {
            let message = info.message().to_owned();
            let source: BoxError = describe(&*info).into();
            match kind {
                DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => {
                    StoreError::Unavailable { operation, source }
                }
                DatabaseErrorKind::SerializationFailure => {
                    StoreError::Conflict { operation, source }
                }
                // A primary that became a replica (failover): try again on a new connection.
                DatabaseErrorKind::ReadOnlyTransaction => {
                    StoreError::Unavailable { operation, source }
                }
                _ => classify_message(operation, &message, source),
            }
        }
        DieselError::BrokenTransactionManager => StoreError::Unavailable {
            operation,
            source: "the connection's transaction state is broken".into(),
        },
        other => StoreError::Database {
            operation,
            source: Box::new(other),
        },
    }
}

fn describe(info: &(dyn diesel::result::DatabaseErrorInformation + Send + Sync)) -> String {
    let mut s = info.message().to_owned();
    if let Some(d) = info.details() {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}

/// SQLSTATEs diesel-async drops, recognised by the server's message.
fn classify_message(operation: &'static str, message: &str, source: BoxError) -> StoreError {
    if message.starts_with("canceling statement due to") {
        // 57014: statement_timeout, or pg_cancel_backend / a client cancel request.
        StoreError::Timeout { operation, source }
    } else if message.starts_with("deadlock detected") {
        // 40P01
        StoreError::Conflict { operation, source }
    } else if message.starts_with("terminating connection")
        || message.starts_with("the database system is")
        || message.contains("server closed the connection")
    {
        // 57P01 admin_shutdown, 57P02, 57P03 cannot_connect_now.
        StoreError::Unavailable { operation, source }
    } else {
        StoreError::Database { operation, source }
    }
}

/// Maps a tokio-postgres error (connecting, TLS) by its SQLSTATE where it has one.
pub(crate) fn from_postgres(operation: &'static str, e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let code = e.code().cloned();
    // tokio-postgres prints only "db error" or "error connecting to server": spell out the
    // server's message, or the underlying I/O error, so the real cause reaches the user.
    let text = match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    };
    let e: BoxError = text.into();
    match code.as_ref() {
        Some(code)
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *code == SqlState::INVALID_CATALOG_NAME
                || *code == SqlState::INSUFFICIENT_PRIVILEGE =>
        {
            // Wrong password, unknown role or database: retrying will not help.
            StoreError::Database {
                operation,
                source: e,
            }
        }
        Some(code) if *code == SqlState::QUERY_CANCELED => StoreError::Timeout {
            operation,
            source: e,
        },
        Some(code)
            if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            StoreError::Conflict {
                operation,
                source: e,
            }
        }
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS =>
        {
            StoreError::Unavailable {
                operation,
                source: e,
            }
        }
        Some(_) => StoreError::Database {
            operation,
            source: e,
        },
        // No SQLSTATE: I/O, refused connection, TLS handshake, timeout while connecting.
        None => StoreError::Unavailable {
            operation,
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Info(&'static str);
    impl diesel::result::DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn db(kind: DatabaseErrorKind, msg: &'static str) -> StoreError {
        from_diesel("op", DieselError::DatabaseError(kind, Box::new(Info(msg))))
    }

    #[test]
    fn classes() {
        assert!(matches!(
            db(DatabaseErrorKind::UnableToSendCommand, "broken pipe"),
            StoreError::Unavailable { .. }
        ));
        assert!(matches!(
            db(DatabaseErrorKind::SerializationFailure, "x"),
            StoreError::Conflict { .. }
        ));
        assert!(matches!(
            db(
                DatabaseErrorKind::Unknown,
                "canceling statement due to statement timeout"
            ),
            StoreError::Timeout { .. }
        ));
        assert!(matches!(
            db(DatabaseErrorKind::Unknown, "deadlock detected"),
            StoreError::Conflict { .. }
        ));
        assert!(matches!(
            db(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command"
            ),
            StoreError::Unavailable { .. }
        ));
        assert!(matches!(
            db(DatabaseErrorKind::UniqueViolation, "duplicate key"),
            StoreError::Database { .. }
        ));
        assert!(matches!(
            db(DatabaseErrorKind::Unknown, "syntax error"),
            StoreError::Database { .. }
        ));
    }
}
