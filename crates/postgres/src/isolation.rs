//! Row-level isolation by user: the database itself refuses one user's rows to an operation
//! on another's, whatever the code above it does.
//!
//! Migration 8 gives every table holding a user's rows (`sql::ISOLATED_TABLES`) two
//! policies: a transaction sees and writes only the rows of the users it declared
//! (`taskhistory.declared`), and the cross-user work gets through only as the tables' owner
//! (or a member of it) declaring `maintenance` there. Migration 10 rewrote the first as a
//! filter on the rows each statement's own conditions found, so that it never takes part
//! in choosing an index (see that migration). [`set`] switches them on
//! (`ENABLE` and `FORCE ROW LEVEL SECURITY`, so the owner is held too) or off; [`state`]
//! reads them back from the catalog, and tells the executor, which then declares every
//! operation's users (`exec::Scope`): with a lone statement ahead of it in the same round
//! trip, in a transaction with its `BEGIN`.

use diesel::sql_types::{Bool, Integer, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures::future::BoxFuture;
use serde::Serialize;
use taskhistory_core::StoreError;

use crate::backend::Backend;
use crate::error::from_diesel;
use crate::exec::{Call, Tx};
use crate::sql::{self, ddl, Statement};

const OP: &str = "isolation";

/// Row-level isolation's state on one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableIsolation {
    /// The table.
    pub table: String,
    /// Row-level security is enabled on it.
    pub enabled: bool,
    /// It is forced (the table's owner is held too).
    pub forced: bool,
    /// The store's two policies are there (migration 8).
    pub policies: bool,
}

/// Row-level isolation's state in the store's schema
/// ([`PgTaskHistoryStore::isolation`](crate::PgTaskHistoryStore::isolation)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsolationState {
    /// Each table that holds users' rows.
    pub tables: Vec<TableIsolation>,
    /// This connection's role may run the cross-user work (retention, partitions,
    /// statistics) while isolation is on: it is the tables' owner or a member of it.
    pub maintainer: bool,
    /// This store declares its operations' users to the server (isolation is on, or
    /// [`PgConfig::declare_users`](crate::PgConfig::declare_users) is set).
    pub declaring: bool,
    /// The tables' owner is a superuser or has `BYPASSRLS`: isolation never holds it, nor
    /// the Python compatibility mode's functions, which run as the owner.
    pub owner_bypasses: bool,
    /// This connection's role is a superuser or has `BYPASSRLS`: isolation never holds it.
    pub role_bypasses: bool,
}

impl IsolationState {
    /// Isolation is on: enabled and forced on every table, with the store's policies.
    pub fn on(&self) -> bool {
        !self.tables.is_empty()
            && self
                .tables
                .iter()
                .all(|t| t.enabled && t.forced && t.policies)
    }

    /// Every table has the store's policies (migration 8 is applied).
    pub fn ready(&self) -> bool {
        !self.tables.is_empty() && self.tables.iter().all(|t| t.policies)
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Bool)]
    enabled: bool,
    #[diesel(sql_type = Bool)]
    forced: bool,
    #[diesel(sql_type = Integer)]
    policies: i32,
    #[diesel(sql_type = Bool)]
    maintainer: bool,
    #[diesel(sql_type = Bool)]
    owner_bypasses: bool,
    #[diesel(sql_type = Bool)]
    role_bypasses: bool,
}

fn read_work<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<Vec<Row>, StoreError>> {
    Box::pin(async move {
        Statement::new(sql::ISOLATION_STATE)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))
    })
}

fn switch_work<'c>(
    conn: &'c mut AsyncPgConnection,
    on: &'c bool,
) -> BoxFuture<'c, Result<Option<()>, StoreError>> {
    Box::pin(async move {
        conn.batch_execute(&ddl::isolation(*on))
            .await
            .map_err(|e| from_diesel(OP, e))?;
        Ok(Some(()))
    })
}

/// Reads the state back from the catalog, and has the executor declare (or not) from now.
pub(crate) async fn state(b: &Backend) -> Result<IsolationState, StoreError> {
    let rows = b
        .exec()
        .pooled(Call::new(OP), Tx::Statement, &(), read_work)
        .await?;
    let maintainer = rows.iter().all(|r| r.maintainer);
    let owner_bypasses = rows.iter().any(|r| r.owner_bypasses);
    let role_bypasses = rows.iter().any(|r| r.role_bypasses);
    let tables: Vec<TableIsolation> = rows
        .into_iter()
        .map(|r| TableIsolation {
            table: r.table_name,
            enabled: r.enabled,
            forced: r.forced,
            policies: r.policies == 2,
        })
        .collect();
    let mut state = IsolationState {
        tables,
        maintainer,
        declaring: false,
        owner_bypasses,
        role_bypasses,
    };
    // Declaring from the first table switched on: an operation that finds any table
    // holding it declares (a partly switched schema is not left readable by nobody).
    let enforced = state.tables.iter().any(|t| t.enabled);
    b.exec().set_isolation(enforced, maintainer);
    state.declaring = b.exec().declares();
    Ok(state)
}

/// Switches isolation on or off (one transaction under the store's DDL lock), and returns
/// the state read back.
pub(crate) async fn set(b: &Backend, on: bool) -> Result<IsolationState, StoreError> {
    let before = state(b).await?;
    if on && !before.ready() {
        return Err(StoreError::configuration(
            "isolation",
            "the schema has no isolation policies yet: apply the migrations first \
             (`taskhistory migrate`, or init_database_schema)",
        ));
    }
    b.exec()
        .dedicated(Call::new(OP), &b.ddl_setup(), &on, switch_work)
        .await?;
    state(b).await
}
