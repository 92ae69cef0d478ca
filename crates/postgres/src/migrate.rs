//! Schema migrations: the SQL files of the top-level `migrations/` folder, embedded, applied
//! under an advisory lock so that several processes starting at once apply them once.

use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use taskhistory_core::StoreError;

use futures::future::BoxFuture;

use crate::connection::Connector;
use crate::session::Transaction;
use crate::sql::{self, Statement};

/// The store's migrations, embedded at build time from the workspace's `migrations/` (the
/// crate's `migrations` is a link to it, so that the packaged crate carries them).
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// One migration and whether it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    /// The migration's name (`<version>_<name>`).
    pub name: String,
    /// Whether it has been applied to the store's schema.
    pub applied: bool,
}

/// The operation's name (spans, metrics, errors).
pub(crate) const OP: &str = "init_database_schema";

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::database(OP, e.to_string())
}

/// Opens a dedicated connection, creates the schema if needed and takes the migration lock
/// (released when the connection closes).
async fn locked_connection(
    connector: &Connector,
    schema: Option<&str>,
) -> Result<AsyncPgConnection, StoreError> {
    let mut conn = connector.connect().await?;
    let lock_name = format!("taskhistory:migrations:{}", schema.unwrap_or("public"));
    // Schema names are validated identifiers (letters, digits, _): safe inside quotes.
    let mut sql = format!("SELECT pg_advisory_lock(hashtextextended('{lock_name}', 0));");
    if let Some(s) = schema {
        sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS \"{s}\";"));
    }
    // Migrations are cross-user work: under row-level isolation the session declares it
    // (a connection of their own, closed after).
    if let Some(declaration) = crate::session::declared() {
        sql.push_str(&declaration.sql(false));
        sql.push(';');
    }
    conn.batch_execute(&sql)
        .await
        .map_err(|e| crate::error::from_diesel(OP, e))?;
    Ok(conn)
}

/// Runs `work` with a synchronous harness on a blocking thread (diesel's harness blocks; this
/// keeps it off the async workers and works on a current-thread runtime too).
async fn with_harness<T: Send + 'static>(
    conn: AsyncPgConnection,
    work: impl FnOnce(&mut AsyncConnectionWrapper<AsyncPgConnection>) -> Result<T, StoreError>
        + Send
        + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || {
        let mut wrapper = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        work(&mut wrapper)
    })
    .await
    .map_err(failed)?
}

#[derive(diesel::QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}

#[derive(diesel::QueryableByName)]
struct Migrated {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    migrated: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    history_table: bool,
}

/// What [`run`] did.
pub(crate) struct Outcome {
    /// Migrations applied.
    pub(crate) applied: usize,
    /// Whether they adopted a `task_history` table the store did not make (the Python
    /// service's): the Python compatibility mode is then switched on.
    pub(crate) adopted: bool,
}

/// The versions recorded in the migrations table (none when it does not exist yet), and
/// whether a `task_history` table exists, read in
/// one transaction (so that behind a transaction pooler both reads see one server
/// connection). Connection errors are returned, not taken for "nothing applied".
async fn applied_versions(connector: &Connector) -> Result<(Vec<String>, bool), StoreError> {
    let fail = |e| crate::error::from_diesel(OP, e);
    let mut conn = connector.connect().await?;
    let mut tx = Transaction::begin(&mut conn, connector, OP, "").await?;
    let versions = async {
        let row = Statement::new(sql::HEALTH)
            .fetch::<Migrated, _>(&mut *tx)
            .await
            .map_err(fail)?;
        let (migrated, history_table) = row
            .first()
            .map_or((false, false), |m| (m.migrated, m.history_table));
        if !migrated {
            return Ok((Vec::new(), history_table));
        }
        let versions = Statement::new(sql::APPLIED_MIGRATIONS)
            .fetch::<VersionRow, _>(&mut *tx)
            .await
            .map_err(fail)?
            .into_iter()
            .map(|r| r.version)
            .collect();
        Ok((versions, history_table))
    }
    .await;
    tx.finish(versions).await
}

/// Every embedded migration, given the applied versions.
fn states(applied: &[String]) -> Result<Vec<MigrationState>, StoreError> {
    let embedded = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(failed)?;
    Ok(embedded
        .iter()
        .map(|m| MigrationState {
            name: m.name().to_string(),
            applied: applied.contains(&m.name().version().to_string()),
        })
        .collect())
}

/// [`run`] as the executor's work (see [`Executor::own`](crate::exec::Executor::own)), on
/// the store's schema.
pub(crate) fn run_work<'c>(
    connector: &'c Connector,
    schema: &'c Option<String>,
) -> BoxFuture<'c, Result<Outcome, StoreError>> {
    Box::pin(run(connector, schema.as_deref()))
}

/// [`status`] as the executor's work.
pub(crate) fn status_work<'c>(
    connector: &'c Connector,
    schema: &'c Option<String>,
) -> BoxFuture<'c, Result<Vec<MigrationState>, StoreError>> {
    Box::pin(status(connector, schema.as_deref()))
}

/// Applies pending migrations. When none is pending it only reads the migrations table: a
/// role with no DDL rights (least privilege), or a connection through a transaction pooler,
/// can call it.
pub(crate) async fn run(
    connector: &Connector,
    schema: Option<&str>,
) -> Result<Outcome, StoreError> {
    let (applied, history_table) = applied_versions(connector).await?;
    // A table no migration of the store made: the Python service's.
    let adopted = history_table && applied.is_empty();
    let pending = states(&applied)?.iter().filter(|m| !m.applied).count();
    if pending == 0 {
        return Ok(Outcome {
            applied: 0,
            adopted: false,
        });
    }
    if connector.transaction_setup().is_some() {
        return Err(StoreError::configuration(
            "DB_PGBOUNCER",
            format!(
                "{pending} migration(s) pending: apply them on a direct connection to the \
                 server (`taskhistory migrate` without PgBouncer); a transaction pooler cannot \
                 hold the migration lock"
            ),
        ));
    }
    let conn = locked_connection(connector, schema).await?;
    let applied = with_harness(conn, |h| {
        h.run_pending_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(failed)
    })
    .await?;
    Ok(Outcome { applied, adopted })
}

/// The statements that give `role` what the store needs in `schema`, and nothing more: use
/// of the schema, `SELECT, INSERT, UPDATE, DELETE` on the two tables and the counts their
/// triggers keep (`task_counts`, `task_totals`, `task_activity`), the history's id
/// sequence, reading the migrations table (health, start-up check) and the layout's settings
/// (`taskhistory_layout`), and on PostgreSQL 15+
/// setting `lc_messages` (so its sessions get untranslated messages, which the error map
/// reads: a superuser must run that grant). Migrations are run by the schema's owner, a
/// different role. `schema` and `role` must be plain identifiers.
pub fn least_privilege_grants(schema: &str, role: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\";\n\
         GRANT SELECT, INSERT, UPDATE, DELETE ON \"{schema}\".task_history, \"{schema}\".task_summary, \
         \"{schema}\".task_counts, \"{schema}\".task_totals, \"{schema}\".task_activity TO \"{role}\";\n\
         GRANT USAGE ON SEQUENCE \"{schema}\".task_history_id_seq TO \"{role}\";\n\
         GRANT SELECT ON \"{schema}\".__diesel_schema_migrations, \"{schema}\".taskhistory_layout, \
         \"{schema}\".taskhistory_python_compat, \"{schema}\".taskhistory_python_writes TO \"{role}\";\n\
         DO $$ BEGIN IF current_setting('server_version_num')::int >= 150000 THEN \
         EXECUTE 'GRANT SET ON PARAMETER lc_messages TO \"{role}\"'; END IF; END $$;\n"
    )
}

/// Every embedded migration and whether it is applied.
pub(crate) async fn status(
    connector: &Connector,
    schema: Option<&str>,
) -> Result<Vec<MigrationState>, StoreError> {
    if connector.transaction_setup().is_some() {
        return states(&applied_versions(connector).await?.0);
    }
    let conn = locked_connection(connector, schema).await?;
    with_harness(conn, |h| {
        let pending = h.pending_migrations(MIGRATIONS).map_err(failed)?;
        let pending: Vec<String> = pending.iter().map(|m| m.name().to_string()).collect();
        let all = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
            .map_err(failed)?;
        Ok(all
            .iter()
            .map(|m| {
                let name = m.name().to_string();
                MigrationState {
                    applied: !pending.contains(&name),
                    name,
                }
            })
            .collect())
    })
    .await
}
