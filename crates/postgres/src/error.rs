//! The one error map: every diesel, tokio-postgres and pool error becomes a [`StoreError`]
//! through [`classify`], by SQLSTATE.
//!
//! tokio-postgres errors carry their SQLSTATE. diesel-async keeps it only as a
//! [`DatabaseErrorKind`] for some classes (unique, check, not-null, serialization failure,
//! read-only) and drops it for the rest; for those the SQLSTATE is recovered from the server's
//! message, which is reliable because every session of the store asks for untranslated
//! messages (`lc_messages = 'C'`, see `Connector`): where the role may not set that, the store
//! says so at start-up and in `health`. A lost socket has no SQLSTATE at all.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use taskhistory_core::{BoxError, StoreError};
use tokio_postgres::error::SqlState;

/// The one classification: what a failure with this SQLSTATE (`None`: no answer from the
/// server, the connection is gone) means for the caller.
/// The setting a missing right is reported under (`StoreError::Configuration`): the role's
/// privileges, told apart from a refused role (`user`) by callers that go on without the
/// right (retention without partition drops).
pub(crate) const PRIVILEGES: &str = "privileges";

pub(crate) fn classify(
    operation: &'static str,
    code: Option<&SqlState>,
    source: BoxError,
) -> StoreError {
    let Some(code) = code else {
        // I/O, refused connection, TLS handshake, a socket that closed mid-way.
        return StoreError::Unavailable { operation, source };
    };
    if *code == SqlState::QUERY_CANCELED {
        // statement_timeout, or a cancel request.
        StoreError::Timeout { operation, source }
    } else if *code == SqlState::LOCK_NOT_AVAILABLE {
        // lock_timeout (or NOWAIT): the lock wait limit was reached.
        StoreError::Timeout { operation, source }
    } else if *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
    {
        StoreError::Conflict { operation, source }
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        // The role lacks a right (a grant, or ownership for DDL): the deployment's set-up,
        // which no retry cures. (Settings are named by their connection parameter, whatever
        // the configuration came from: a URL, variables or the builder.)
        StoreError::configuration(
            PRIVILEGES,
            format!(
                "the role may not do what {operation} needs ({source}): grant it \
                 (least_privilege_grants lists the store's rights) or run this as the tables' \
                 owner"
            ),
        )
    } else if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        StoreError::configuration(
            "user",
            format!("the server refused this role or its password: {source}"),
        )
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        StoreError::configuration("dbname", format!("no such database: {source}"))
    } else if *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
        // A primary that became a replica (failover): try again on a new connection.
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || code.code().starts_with("08")
    {
        StoreError::Unavailable { operation, source }
    } else {
        // Wrong password, unknown role or database, constraint violations, bad SQL: retrying
        // will not help.
        StoreError::Database { operation, source }
    }
}

/// Maps a diesel error from `operation`.
pub(crate) fn from_diesel(operation: &'static str, e: DieselError) -> StoreError {
    match e {
        DieselError::DatabaseError(kind, info) => {
            let code = sqlstate_of(kind, info.message());
            classify(operation, code.as_ref(), describe(&*info).into())
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

/// The SQLSTATE behind a diesel error kind; for `Unknown`, recovered from the server's
/// untranslated message. `None` for a lost connection.
fn sqlstate_of(kind: DatabaseErrorKind, message: &str) -> Option<SqlState> {
    Some(match kind {
        DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => {
            return None
        }
        DatabaseErrorKind::SerializationFailure => SqlState::T_R_SERIALIZATION_FAILURE,
        DatabaseErrorKind::ReadOnlyTransaction => SqlState::READ_ONLY_SQL_TRANSACTION,
        DatabaseErrorKind::UniqueViolation => SqlState::UNIQUE_VIOLATION,
        DatabaseErrorKind::ForeignKeyViolation => SqlState::FOREIGN_KEY_VIOLATION,
        DatabaseErrorKind::NotNullViolation => SqlState::NOT_NULL_VIOLATION,
        DatabaseErrorKind::CheckViolation => SqlState::CHECK_VIOLATION,
        _ => return Some(sqlstate_of_message(message)),
    })
}

/// The SQLSTATEs diesel-async drops that the store must tell apart, from the server's
/// message in the `C` locale (`src/backend` of PostgreSQL writes these texts).
fn sqlstate_of_message(message: &str) -> SqlState {
    // First match wins: the more specific texts come first.
    const BY_MESSAGE: &[(&str, SqlState)] = &[
        (
            "canceling statement due to lock timeout",
            SqlState::LOCK_NOT_AVAILABLE,
        ),
        ("could not obtain lock", SqlState::LOCK_NOT_AVAILABLE),
        ("canceling statement due to", SqlState::QUERY_CANCELED),
        ("deadlock detected", SqlState::T_R_DEADLOCK_DETECTED),
        (
            "terminating connection because of crash",
            SqlState::CRASH_SHUTDOWN,
        ),
        ("terminating connection", SqlState::ADMIN_SHUTDOWN),
        ("the database system is", SqlState::CANNOT_CONNECT_NOW),
        ("sorry, too many clients", SqlState::TOO_MANY_CONNECTIONS),
        ("permission denied", SqlState::INSUFFICIENT_PRIVILEGE),
        ("must be owner", SqlState::INSUFFICIENT_PRIVILEGE),
        ("server closed the connection", SqlState::CONNECTION_FAILURE),
    ];
    BY_MESSAGE
        .iter()
        .find(|(text, _)| message.starts_with(text) || message.contains(text))
        .map_or(SqlState::INTERNAL_ERROR, |(_, code)| code.clone())
}

fn describe(info: &(dyn diesel::result::DatabaseErrorInformation + Send + Sync)) -> String {
    let mut s = info.message().to_owned();
    if let Some(d) = info.details() {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}

/// Maps a tokio-postgres error (connecting, TLS, `COPY`) by its SQLSTATE.
pub(crate) fn from_postgres(operation: &'static str, e: tokio_postgres::Error) -> StoreError {
    if let Some(refused) = certificate_refused(&e) {
        return refused;
    }
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
    classify(operation, e.code(), text.into())
}

/// A server certificate that `verify-full` refused, found by type in the error's sources
/// (rustls's error, as tokio-rustls wraps it in an `io::Error`): a configuration error that
/// no retry cures, saying what to set.
fn certificate_refused(e: &tokio_postgres::Error) -> Option<StoreError> {
    use rustls::CertificateError as Cert;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let tls = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(why)) = tls {
            let (setting, what) = match why {
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => (
                    "host",
                    "the server's certificate does not hold the host name connected to: \
                     connect by a name it holds, or give the server a certificate for this one",
                ),
                Cert::UnknownIssuer | Cert::BadSignature | Cert::BadEncoding => (
                    "sslrootcert",
                    "the server's certificate is not signed by a trusted root: set sslrootcert \
                     (DB_SSLROOTCERT, --sslrootcert) to the certificate of the CA that signed it",
                ),
                Cert::Expired
                | Cert::ExpiredContext { .. }
                | Cert::NotValidYet
                | Cert::NotValidYetContext { .. } => (
                    "sslmode",
                    "the server's certificate is outside its validity period: renew it (or \
                     check this machine's clock)",
                ),
                _ => ("sslmode", "verify-full refused the server's certificate"),
            };
            return Some(StoreError::configuration(
                setting,
                format!("{what} ({why})"),
            ));
        }
        source = s.source();
    }
    None
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

    fn code(c: &str) -> StoreError {
        classify("op", Some(&SqlState::from_code(c)), "x".into())
    }

    #[test]
    fn diesel_errors_go_through_the_same_classes_as_sqlstates() {
        let same = |a: StoreError, b: StoreError| {
            assert_eq!(
                std::mem::discriminant(&a),
                std::mem::discriminant(&b),
                "{a:?} / {b:?}"
            )
        };
        same(
            db(DatabaseErrorKind::UnableToSendCommand, "broken pipe"),
            classify("op", None, "x".into()),
        );
        same(
            db(DatabaseErrorKind::SerializationFailure, "x"),
            code("40001"),
        );
        same(
            db(DatabaseErrorKind::ReadOnlyTransaction, "x"),
            code("25006"),
        );
        same(
            db(
                DatabaseErrorKind::Unknown,
                "canceling statement due to statement timeout",
            ),
            code("57014"),
        );
        same(
            db(DatabaseErrorKind::Unknown, "deadlock detected"),
            code("40P01"),
        );
        same(
            db(
                DatabaseErrorKind::Unknown,
                "canceling statement due to lock timeout",
            ),
            code("55P03"),
        );
        same(
            db(
                DatabaseErrorKind::Unknown,
                "terminating connection due to unexpected postmaster exit",
            ),
            code("57P01"),
        );
        same(
            db(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
            code("57P01"),
        );
        same(
            db(DatabaseErrorKind::UniqueViolation, "duplicate key"),
            code("23505"),
        );
        same(
            db(DatabaseErrorKind::Unknown, "syntax error"),
            code("42601"),
        );
    }

    #[test]
    fn classes_by_sqlstate() {
        assert!(matches!(code("57014"), StoreError::Timeout { .. }));
        assert!(matches!(code("55P03"), StoreError::Timeout { .. }));
        assert!(matches!(code("40P01"), StoreError::Conflict { .. }));
        assert!(matches!(code("40001"), StoreError::Conflict { .. }));
        for transient in [
            "57P01", "57P02", "57P03", "53300", "25006", "08006", "08001",
        ] {
            assert!(
                matches!(code(transient), StoreError::Unavailable { .. }),
                "{transient}"
            );
        }
        for configuration in ["28P01", "28000", "3D000", "42501"] {
            assert!(
                matches!(code(configuration), StoreError::Configuration { .. }),
                "{configuration}"
            );
        }
        for lasting in ["23505", "42P01"] {
            assert!(
                matches!(code(lasting), StoreError::Database { .. }),
                "{lasting}"
            );
        }
        assert!(matches!(
            classify("op", None, "x".into()),
            StoreError::Unavailable { .. }
        ));
    }
}
