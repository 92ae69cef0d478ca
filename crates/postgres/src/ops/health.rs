//! `health_check`: statements [`HEALTH`](crate::sql::HEALTH) (server version, whether the
//! schema is migrated) and [`SCHEMA_VERSION`](crate::sql::SCHEMA_VERSION).

use diesel::sql_types::{Bool, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::StoreError;

use crate::error::from_diesel;
use crate::sql::{self, Statement};

/// The operation's name (spans, metrics, errors).
pub(crate) const OP: &str = "health_check";

#[derive(QueryableByName)]
struct HealthRow {
    #[diesel(sql_type = Text)]
    server_version: String,
    #[diesel(sql_type = Bool)]
    migrated: bool,
}

#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Nullable<Text>)]
    version: Option<String>,
}

/// What the server says of itself and of the schema.
pub(crate) struct Health {
    pub(crate) server_version: String,
    pub(crate) schema_version: Option<String>,
}

pub(crate) fn run<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<Health, StoreError>> {
    Box::pin(async move {
        let op = OP;
        let rows: Vec<HealthRow> = Statement::new(sql::HEALTH)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(op, e))?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::database(op, "no row"))?;
        let schema_version = if row.migrated {
            let v: Vec<VersionRow> = Statement::new(sql::SCHEMA_VERSION)
                .fetch(conn)
                .await
                .map_err(|e| from_diesel(op, e))?;
            v.into_iter().next().and_then(|r| r.version)
        } else {
            None
        };
        Ok(Health {
            server_version: row.server_version,
            schema_version,
        })
    })
}
