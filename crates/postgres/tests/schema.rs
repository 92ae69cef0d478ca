//! Migrations on a real server: adopting the Python service's table in place, concurrent
//! start-up, the indexes the queries use, and start-up errors with their real cause.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{NaiveDate, TimeZone, Utc};
use serde_json::json;
use taskhistory_core::{StoreError, TaskHistoryStore, TaskStatus, TaskStepResult};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore};
use taskhistory_testing::{database_url, fresh_config, store_for};
use tokio_postgres::NoTls;

/// The Python DatabaseManager's `_create_tables`, verbatim.
const SEED_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS task_history (
id SERIAL PRIMARY KEY,
user_id TEXT NOT NULL,
task_id TEXT NOT NULL,
step INTEGER NOT NULL,
result JSONB NOT NULL,
timestamp TIMESTAMP NOT NULL,
status TEXT NOT NULL DEFAULT 'pending'
);
-- Create indexes to optimize query performance
CREATE INDEX IF NOT EXISTS idx_task_history_user_id ON task_history (user_id);
CREATE INDEX IF NOT EXISTS idx_task_history_task_id ON task_history (task_id);
CREATE INDEX IF NOT EXISTS idx_task_history_status ON task_history (status);
CREATE INDEX IF NOT EXISTS idx_task_history_timestamp ON task_history (timestamp);
-- Composite indexes to optimize common queries
CREATE INDEX IF NOT EXISTS idx_task_history_user_task ON task_history (user_id, task_id);
CREATE INDEX IF NOT EXISTS idx_task_history_user_timestamp ON task_history (user_id, timestamp DESC);
"#;

/// The seed's INSERT, as `save_task_history` ran it.
const SEED_INSERT: &str =
    "INSERT INTO task_history (user_id, task_id, step, result, timestamp, status) VALUES ($1, $2, $3, $4, $5, $6)";

async fn raw(config: &PgConfig) -> tokio_postgres::Client {
    let url = database_url().await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = config.get_schema().unwrap().to_owned();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}"
        ))
        .await
        .unwrap();
    client
}

/// `TaskStepResult.dict()` as the Python service serialized it (json.dumps).
fn python_dict(step: &str, status: &str, message: &str) -> String {
    json!({
        "step": step, "result": {"processed_rows": 1000}, "completed": status == "completed",
        "message": message, "status": status, "error_code": null, "error_message": null
    })
    .to_string()
}

fn naive(h: u32, m: u32, s: u32, micros: u32) -> chrono::NaiveDateTime {
    NaiveDate::from_ymd_opt(2024, 3, 1)
        .unwrap()
        .and_hms_micro_opt(h, m, s, micros)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_the_python_table_in_place_without_losing_a_step() {
    let config = fresh_config().await;
    let client = raw(&config).await;
    client.batch_execute(SEED_DDL).await.unwrap();
    // The seed binds json.dumps(...) text to the JSONB column: send it as text.
    let insert_sql = SEED_INSERT.replace("$4", "$4::text::jsonb");
    let rows: Vec<(&str, &str, i32, String, chrono::NaiveDateTime, &str)> = vec![
        (
            "user_123",
            "task_456",
            0,
            python_dict("step_0", "running", "first try"),
            naive(10, 0, 0, 1),
            "running",
        ),
        // The same step saved again (a retry): the seed kept both rows.
        (
            "user_123",
            "task_456",
            0,
            python_dict("step_0", "running", "second try"),
            naive(10, 0, 5, 2),
            "running",
        ),
        (
            "user_123",
            "task_456",
            1,
            python_dict("step_1", "completed", "done"),
            naive(10, 1, 0, 3),
            "completed",
        ),
        (
            "user_123",
            "task_789",
            0,
            python_dict("step_0", "failed", "boom"),
            naive(9, 0, 0, 4),
            "failed",
        ),
        (
            "user_999",
            "task_456",
            0,
            python_dict("step_0", "running", "other user"),
            naive(11, 0, 0, 5),
            "running",
        ),
        (
            "user_999",
            "task_456",
            0,
            python_dict("step_0", "running", "other user, same time, later id"),
            naive(11, 0, 0, 5),
            "running",
        ),
    ];
    for (u, t, s, r, ts, st) in &rows {
        client
            .execute(insert_sql.as_str(), &[u, t, s, r, ts, st])
            .await
            .unwrap();
    }

    let store = store_for(config.clone()).await;

    // Newest of each duplicate kept; the others moved, nothing lost.
    let h = store
        .load_task_history("user_123", "task_456")
        .await
        .unwrap();
    assert_eq!(h.iter().map(|e| e.step).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(h[0].result.message, "second try");
    assert_eq!(
        h[0].timestamp,
        Utc.from_utc_datetime(&naive(10, 0, 5, 2)),
        "read as UTC, microseconds kept"
    );
    assert_eq!(h[1].result.status, TaskStatus::Completed);
    let other = store
        .load_task_history("user_999", "task_456")
        .await
        .unwrap();
    assert_eq!(other[0].result.message, "other user, same time, later id");
    let kept: i64 = client
        .query_one("SELECT count(*) FROM task_history", &[])
        .await
        .unwrap()
        .get(0);
    let moved: Vec<String> = client
        .query(
            "SELECT result->>'message' FROM task_history_duplicates ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept as usize + moved.len(), rows.len());
    assert_eq!(moved, ["first try", "other user"]);

    // The summary was back-filled.
    assert_eq!(
        store
            .check_task_status("user_123", "task_456")
            .await
            .unwrap(),
        TaskStatus::Completed
    );
    assert_eq!(
        store
            .check_task_status("user_123", "task_789")
            .await
            .unwrap(),
        TaskStatus::Failed
    );
    let tasks = store.get_user_tasks("user_123", 10).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(),
        ["task_456", "task_789"]
    );
    assert_eq!((tasks[0].step_count, tasks[0].last_step), (2, 1));
    assert_eq!(
        tasks[0].created_at,
        Utc.from_utc_datetime(&naive(10, 0, 5, 2))
    );

    // The seed's unused indexes are gone; the unique key now makes saves idempotent.
    let seed_indexes: i64 = client
        .query_one("SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname LIKE 'idx_task_history_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seed_indexes, 0);
    let again = TaskStepResult::success("step_1", json!(1), "again");
    store
        .save_task_history("user_123", "task_456", 1, &again)
        .await
        .unwrap();
    store
        .save_task_history("user_123", "task_456", 1, &again)
        .await
        .unwrap();
    assert_eq!(
        store
            .load_task_history("user_123", "task_456")
            .await
            .unwrap()
            .len(),
        2
    );
    // Rows the Python service reads still have its shape.
    let shape: serde_json::Value =
        client.query_one("SELECT result FROM task_history WHERE step = 1 AND task_id = 'task_456' AND user_id = 'user_123'", &[]).await.unwrap().get(0);
    let mut keys: Vec<_> = shape.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "completed",
            "error_code",
            "error_message",
            "message",
            "result",
            "status",
            "step"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let config = fresh_config().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(PgTaskHistoryStore::connect(config.clone()).await.unwrap());
    }
    let results = futures::future::join_all(stores.iter().map(|s| s.init_database_schema())).await;
    for r in results {
        r.unwrap();
    }
    let client = raw_existing(&config).await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM __diesel_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    let status = stores[0].migration_status().await.unwrap();
    let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
        .unwrap()
        .count();
    assert_eq!(status.len(), embedded, "every migration folder is embedded");
    assert_eq!(applied as usize, embedded);
    assert!(status.iter().all(|m| m.applied));
    let health = stores[0].health_check().await.unwrap();
    assert_eq!(health.backend, "postgres");
    assert!(health.server_version.is_some());
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let newest = status
        .last()
        .map(|m| digits(m.name.split('_').next().unwrap_or("")));
    assert_eq!(health.schema_version, newest);
}

async fn raw_existing(config: &PgConfig) -> tokio_postgres::Client {
    let url = database_url().await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "SET search_path TO {}",
            config.get_schema().unwrap().to_owned()
        ))
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_fails_fast_with_the_real_cause() {
    // Each start-up error is the real cause from the first connection, not bb8's pool
    // timeout ("no connection free within ..."), which would come only after 30 s.
    let base = fresh_config().await;
    let err = PgTaskHistoryStore::connect(base.clone().dbname("no_such_database_here"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    // A deployment's mistake, which no retry cures: configuration, naming the setting.
    assert!(
        matches!(&err, StoreError::Configuration { setting, .. } if setting == "dbname"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let err = PgTaskHistoryStore::connect(base.clone().user("no_such_role_here"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_role_here"), "{err}");
    assert!(
        matches!(&err, StoreError::Configuration { setting, .. } if setting == "user"),
        "{err:?}"
    );
    let err = PgTaskHistoryStore::connect(base.clone().host("127.0.0.1").port(1))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "no server is a transient error: {err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(!err.to_string().contains("no connection free"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn migrations_work_on_a_current_thread_runtime() {
    let store = store_for(fresh_config().await).await;
    store
        .save_task_history("u", "t", 0, &TaskStepResult::running("s", json!(null), ""))
        .await
        .unwrap();
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Running
    );
}

/// Feature `test-schema`: a store on a schema of its own, and `drop_schema` removing it
/// with everything in it (what a service's integration tests use).
#[cfg(feature = "test-schema")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_schema_is_made_migrated_and_dropped() {
    use taskhistory_core::{StoreError, TaskHistoryStore, TaskStepResult};
    let store = taskhistory_postgres::PgTaskHistoryStore::on_fresh_schema(
        taskhistory_testing::fresh_config().await,
    )
    .await
    .unwrap();
    let schema = store.config().get_schema().unwrap().to_owned();
    assert!(schema.starts_with("th_test_"), "{schema}");
    let step = TaskStepResult::running("s", serde_json::json!({}), "");
    store.save_task_history("u", "t", 0, &step).await.unwrap();
    let admin = taskhistory_testing::test_db_client().await;
    assert_eq!(schemas_named(&admin, &schema).await, 1);
    store.drop_schema().await.unwrap();
    assert_eq!(schemas_named(&admin, &schema).await, 0);
    assert!(matches!(
        store.save_task_history("u", "t", 1, &step).await,
        Err(StoreError::Closed)
    ));
}

/// A test that panicked before `drop_schema` left its schema: the next `on_fresh_schema`
/// drops it once it is older than `ABANDONED_AFTER`, and leaves a recent one alone.
#[cfg(feature = "test-schema")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_test_schemas_are_swept_by_age() {
    use taskhistory_postgres::PgTaskHistoryStore;
    let admin = taskhistory_testing::test_db_client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let age = PgTaskHistoryStore::ABANDONED_AFTER.as_secs();
    let pid = std::process::id();
    let old = format!("th_test_{}_{pid}_900001", now - age - 60);
    let recent = format!("th_test_{}_{pid}_900002", now - age / 2);
    for schema in [&old, &recent] {
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.left_behind (x int)"
            ))
            .await
            .unwrap();
    }
    let store = PgTaskHistoryStore::on_fresh_schema(taskhistory_testing::fresh_config().await)
        .await
        .unwrap();
    assert_eq!(
        schemas_named(&admin, &old).await,
        0,
        "the abandoned schema stayed"
    );
    assert_eq!(
        schemas_named(&admin, &recent).await,
        1,
        "a recent schema was dropped"
    );
    admin
        .batch_execute(&format!("DROP SCHEMA {recent} CASCADE"))
        .await
        .unwrap();
    store.drop_schema().await.unwrap();
}

/// How many schemas named `schema` the server has.
async fn schemas_named(admin: &tokio_postgres::Client, schema: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
}
