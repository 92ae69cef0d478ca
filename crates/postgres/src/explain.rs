//! Operator insight for `taskhistory explain` and `taskhistory stats --queries`: the plans
//! PostgreSQL uses for the store's own statements, and their figures from
//! `pg_stat_statements`. Not on any service path.

use diesel::sql_types::{BigInt, Double, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures::future::BoxFuture;
use serde::Serialize;
use taskhistory_core::{validate, StoreError};

use crate::backend::Backend;
use crate::connection::Connector;
use crate::error::from_diesel;
use crate::exec::{Call, Tx};
use crate::session::Transaction;
use crate::sql;

/// The plan of one of the store's statements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementPlan {
    /// The statement's name in [`sql::ALL_STATEMENTS`].
    pub name: String,
    /// The plan, one line per element.
    pub plan: Vec<String>,
}

/// One statement's figures from `pg_stat_statements`.
#[derive(Debug, Clone, PartialEq, Serialize, QueryableByName)]
pub struct QueryStats {
    /// The normalised statement text.
    #[diesel(sql_type = Text)]
    pub query: String,
    /// Times executed.
    #[diesel(sql_type = BigInt)]
    pub calls: i64,
    /// Total execution time, milliseconds.
    #[diesel(sql_type = Double)]
    pub total_ms: f64,
    /// Mean execution time, milliseconds.
    #[diesel(sql_type = Double)]
    pub mean_ms: f64,
    /// Rows returned or affected in all.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

#[derive(QueryableByName)]
struct Present {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    present: bool,
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Sample arguments for each statement worth explaining (the generic plan does not depend
/// on them; `EXPLAIN ANALYZE` runs with them). A listing fetches a page of 50 and the row
/// past it.
fn arguments(user: &str, task: &str) -> Vec<(&'static str, String)> {
    let (u, t) = (literal(user), literal(task));
    vec![
        ("save_steps", format!("ARRAY[{u}], ARRAY[{t}], ARRAY[2147483600], ARRAY['{{}}'::jsonb], ARRAY[NULL::timestamptz], ARRAY['running']")),
        ("save_step", format!("{u}, {t}, 2147483600, '{{}}'::jsonb, NULL::timestamptz, 'running'")),
        ("load_history", format!("{u}, {t}")),
        ("task_status", format!("{u}, {t}")),
        ("task_statuses", format!("ARRAY[{u}, {u}], ARRAY[{t}, {t} || 'z']")),
        ("cancel_task", format!("{u}, {t}, '{{}}'::jsonb")),
        ("list_tasks", format!("{u}, 51")),
        ("list_tasks_after", format!("{u}, now(), {t}, 51")),
        ("list_tasks_with_status", format!("{u}, 'running', 51")),
        ("list_tasks_with_status_after", format!("{u}, 'running', now(), {t}, 51")),
        ("list_tasks_in_range", format!("{u}, now() - interval '1 day', now(), NULL, NULL, 51")),
        ("list_tasks_with_status_in_range", format!("{u}, 'running', now() - interval '1 day', NULL, now(), {t}, 51")),
        ("list_tasks_with_prefix", format!("{u}, {t}, {t} || 'z', NULL, now() - interval '1 day', NULL, NULL, NULL, 51")),
        ("scan_history", format!("{u}, '', -1, 5001")),
        ("scan_task_history", format!("{u}, {t}, -1, 5001")),
        ("events_after", format!("ARRAY[{u}], ARRAY[NULL::text], ARRAY['1:1:'], ARRAY[NULL::text], ARRAY['1'], ARRAY[0::int8], 500")),
        ("newest_seen", format!("ARRAY[{u}]")),
        ("task_counts", u.clone()),
        ("task_activity", format!("{u}, now() - interval '7 days', now()")),
        ("recent_failures", "20".to_owned()),
        ("cleanup_preview", "30, NULL".to_owned()),
        ("cleanup_batch", "30, NULL, 1000".to_owned()),
    ]
}

/// The sample task and whether to run the statements (`ANALYZE`).
struct ExplainArgs<'a> {
    user: &'a str,
    task: &'a str,
    analyze: bool,
    connector: &'a Connector,
}

fn explain_all<'c, 'a>(
    conn: &'c mut AsyncPgConnection,
    p: &'c ExplainArgs<'a>,
) -> BoxFuture<'c, Result<Vec<StatementPlan>, StoreError>> {
    Box::pin(async move {
        let op = "explain";
        let fail = |e| from_diesel(op, e);
        let ExplainArgs {
            user,
            task,
            analyze,
            connector,
        } = *p;
        // Writes run by ANALYZE are rolled back.
        let mut conn = Transaction::begin(
            conn,
            connector,
            op,
            "SET LOCAL plan_cache_mode = force_generic_plan",
        )
        .await?;
        let result = async {
            let mut plans = Vec::new();
            for (name, args) in arguments(user, task) {
                let Some((_, text)) = sql::ALL_STATEMENTS.iter().find(|(n, _)| *n == name) else {
                    continue;
                };
                conn.batch_execute(&format!("PREPARE taskhistory_explain AS {text}"))
                    .await
                    .map_err(fail)?;
                let options = if analyze { "(ANALYZE, BUFFERS) " } else { "" };
                let lines: Result<Vec<PlanLine>, _> = diesel_async::RunQueryDsl::load(
                    diesel::sql_query(format!(
                        "EXPLAIN {options}EXECUTE taskhistory_explain({args})"
                    )),
                    &mut *conn,
                )
                .await;
                conn.batch_execute("DEALLOCATE taskhistory_explain")
                    .await
                    .map_err(fail)?;
                plans.push(StatementPlan {
                    name: name.to_owned(),
                    plan: lines.map_err(fail)?.into_iter().map(|l| l.line).collect(),
                });
            }
            Ok(plans)
        }
        .await;
        let rolled_back = conn.rollback().await;
        let plans = result?;
        rolled_back?;
        Ok(plans)
    })
}

fn query_stats<'c>(
    conn: &'c mut AsyncPgConnection,
    limit: &'c i64,
) -> BoxFuture<'c, Result<Vec<QueryStats>, StoreError>> {
    Box::pin(async move {
        let op = "stats --queries";
        let present: Vec<Present> = diesel_async::RunQueryDsl::load(
            diesel::sql_query(sql::PG_STAT_STATEMENTS_PRESENT),
            conn,
        )
        .await
        .map_err(|e| from_diesel(op, e))?;
        // Installed in this database and loaded by the server (else reading it fails).
        if !present.first().is_some_and(|p| p.present) {
            return Err(StoreError::database(op, NOT_ENABLED));
        }
        diesel_async::RunQueryDsl::load(
            diesel::sql_query(sql::PG_STAT_STATEMENTS_TOP).bind::<BigInt, _>(*limit),
            conn,
        )
        .await
        .map_err(|e| from_diesel(op, e))
    })
}

/// What to do when `pg_stat_statements` is missing.
const NOT_ENABLED: &str = "pg_stat_statements is not enabled on this server: add \
    `shared_preload_libraries = 'pg_stat_statements'` to postgresql.conf, restart the server, \
    then run `CREATE EXTENSION pg_stat_statements;` in this database";

/// The plans of the store's statements (`PgTaskHistoryStore::explain`).
pub(crate) async fn explain(
    b: &Backend,
    user: &str,
    task: &str,
    analyze: bool,
) -> Result<Vec<StatementPlan>, StoreError> {
    validate::task(user, task)?;
    let args = ExplainArgs {
        user,
        task,
        analyze,
        connector: b.connector(),
    };
    b.exec()
        .pooled(
            Call::task("explain", user, task),
            Tx::Own,
            &args,
            explain_all,
        )
        .await
}

/// The store's statements from `pg_stat_statements` (`PgTaskHistoryStore::query_stats`).
pub(crate) async fn top_queries(b: &Backend, limit: i64) -> Result<Vec<QueryStats>, StoreError> {
    b.exec()
        .pooled(
            Call::new("stats --queries"),
            Tx::Statement,
            &limit,
            query_stats,
        )
        .await
}
