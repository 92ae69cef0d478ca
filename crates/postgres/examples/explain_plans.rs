//! Fills a fresh schema with one million steps (1,000 users x 100 tasks x 10 steps) and prints
//! the plans of the store's read statements, to check they use index scans.
//!
//! `cargo run --release -p taskhistory-postgres --features testing --example explain_plans`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use taskhistory_core::TaskHistoryStore;
use taskhistory_testing::sql;
use taskhistory_testing::{database_url, fresh_config, store_for};
use tokio_postgres::NoTls;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = fresh_config().await;
    let schema = config.get_schema().unwrap_or_default().to_owned();
    let store = store_for(config).await;
    store.close().await;
    let (client, conn) = tokio_postgres::connect(&database_url().await, NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await?;
    let started = std::time::Instant::now();
    client
        .batch_execute(
            r#"
INSERT INTO task_history (user_id, task_id, step, result, timestamp, status, started_at)
SELECT 'user_' || u, 'task_' || t, s,
       jsonb_build_object('step', 'step_' || s, 'result', jsonb_build_object('rows', s), 'completed', true,
                          'message', 'done', 'status', 'completed', 'error_code', null, 'error_message', null),
       now() - make_interval(mins => (u * 100 + t) % 5000) + make_interval(secs => s),
       CASE WHEN s = 9 THEN 'completed' ELSE 'running' END,
       now() - make_interval(mins => (u * 100 + t) % 5000)
FROM generate_series(1, 1000) u, generate_series(1, 100) t, generate_series(0, 9) s;
INSERT INTO task_summary
    (user_id, task_id, status, last_step, step_count, created_at, updated_at, started_at)
SELECT user_id, task_id, 'completed', 9, 10, min(timestamp), max(timestamp), min(started_at)
FROM task_history GROUP BY user_id, task_id;
"#,
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE task_history").await?;
    client.batch_execute("VACUUM ANALYZE task_summary").await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM task_history", &[])
        .await?
        .get(0);
    println!("-- {rows} steps loaded in {:.1?}\n", started.elapsed());
    let plans = [
        (
            "check_task_status",
            sql::TASK_STATUS,
            "'user_500', 'task_50'",
        ),
        (
            "load_task_history",
            sql::LOAD_HISTORY,
            "'user_500', 'task_50'",
        ),
        (
            "get_user_tasks (limit 50)",
            sql::LIST_TASKS,
            "'user_500', 51",
        ),
        (
            "get_user_tasks, next page",
            sql::LIST_TASKS_AFTER,
            "'user_500', now(), 'task_50', 51",
        ),
        (
            "get_user_tasks, status filter",
            sql::LIST_TASKS_WITH_STATUS,
            "'user_500', 'completed', 51",
        ),
        (
            "get_user_tasks, activity range (updated_after / updated_before)",
            sql::LIST_TASKS_IN_RANGE,
            "'user_500', now() - interval '90 minutes', now() - interval '20 minutes', NULL, NULL, 51",
        ),
        (
            "get_user_tasks, status filter, activity range, next page",
            sql::LIST_TASKS_WITH_STATUS_IN_RANGE,
            "'user_500', 'completed', now() - interval '90 minutes', NULL, now() - interval '40 minutes', 'task_50', 51",
        ),
        (
            "get_user_tasks, task id prefix (any other filter)",
            sql::LIST_TASKS_WITH_PREFIX,
            "'user_500', 'task_5', 'task_6', NULL, NULL, NULL, NULL, NULL, 51",
        ),
    ];
    for (i, (name, statement, args)) in plans.iter().enumerate() {
        client
            .batch_execute(&format!("PREPARE p{i} AS {statement}"))
            .await?;
        // Force the generic plan the store's cached prepared statements end up using.
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await?;
        println!(
            "-- {name}\n-- {}",
            statement.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        for row in client
            .query(
                &format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE p{i}({args})"),
                &[],
            )
            .await?
        {
            let line: String = row.get(0);
            println!("{line}");
        }
        println!();
    }
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    Ok(())
}
