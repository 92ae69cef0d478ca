//! Timeouts on a real server: both fire as typed errors, and a connection whose statement did
//! not finish is thrown away, never handed back to the pool half-used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use taskhistory_core::{RetryPolicy, StoreError, TaskHistoryStore, TaskStepResult};
use taskhistory_testing::{fresh_config, lock_summary, store_for, test_db_client};

fn step() -> TaskStepResult {
    TaskStepResult::running("s", json!(null), "")
}

/// Sessions of application `app` in `state` (a `LIKE` pattern), waiting or not.
async fn sessions(app: &str, state: &str) -> i64 {
    test_db_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state LIKE $2",
            &[&app, &state],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until no session of `app` is `state` (bounded by a count of polls, not a clock).
async fn until_none(app: &str, state: &str) {
    for _ in 0..400 {
        if sessions(app, state).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("sessions of {app} still {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_discards_the_connection_and_cancels_its_statement() {
    let app = format!("th-cmd-timeout-{}", std::process::id());
    let config = fresh_config()
        .await
        .application_name(&app)
        .pool_size(1, 1)
        .command_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_secs(30))
        .retry(RetryPolicy::never());
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store.save_task_history("u", "t", 0, &step()).await.unwrap();
    let locker = lock_summary(&schema, "t").await;

    let err = store
        .save_task_history("u", "t", 1, &step())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    // The server was asked to cancel: the statement stops waiting while the lock is still
    // held (without the cancel it would wait the 30 s statement timeout).
    until_none(&app, "active").await;
    locker.batch_execute("ROLLBACK").await.unwrap();

    // The only connection was discarded (broken), not reused mid-statement; the pool opens a
    // fresh one and serves again. The cancelled save stored nothing.
    store.save_task_history("u", "t", 2, &step()).await.unwrap();
    let steps: Vec<i32> = store
        .load_task_history("u", "t")
        .await
        .unwrap()
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(steps, [0, 2]);
    let stats = store.pool_stats();
    assert!(stats.closed_broken >= 1, "{stats:?}");
    assert!(store.metrics().errors >= 1);
}

/// The command timeout with retries on: each attempt has its own timeout, its own
/// connection thrown away and its statement cancelled; the caller gets `Timeout` after the
/// last attempt, and nothing was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_with_retries_cancels_every_attempt() {
    let app = format!("th-cmd-retries-{}", std::process::id());
    let config = fresh_config()
        .await
        .application_name(&app)
        .pool_size(1, 2)
        .command_timeout(Duration::from_millis(200))
        .statement_timeout(Duration::from_secs(30))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        });
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store.save_task_history("u", "t", 0, &step()).await.unwrap();
    let broken_before = store.pool_stats().closed_broken;
    let locker = lock_summary(&schema, "t").await;
    let err = store
        .save_task_history("u", "t", 1, &step())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    assert_eq!(store.metrics().retries, 2, "{:?}", store.metrics());
    until_none(&app, "active").await;
    assert_eq!(store.pool_stats().closed_broken - broken_before, 3);
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_a_typed_timeout_and_the_pool_stays_healthy() {
    let config = fresh_config()
        .await
        .pool_size(1, 1)
        .statement_timeout(Duration::from_millis(200))
        .retry(RetryPolicy::never());
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store.save_task_history("u", "t", 0, &step()).await.unwrap();
    let locker = lock_summary(&schema, "t").await;
    let err = store.mark_task_as_cancelled("u", "t").await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    // Same connection, still usable: the server cancelled the statement cleanly.
    assert!(store.mark_task_as_cancelled("u", "t").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_ride_out_a_lock_held_briefly() {
    let config = fresh_config()
        .await
        .statement_timeout(Duration::from_millis(150))
        .retry(RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        });
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store.save_task_history("u", "t", 0, &step()).await.unwrap();
    let locker = lock_summary(&schema, "t").await;
    // The lock goes once the store has retried (an event, not a time): the save rides it out.
    let watched = store.clone();
    let release = tokio::spawn(async move {
        while watched.metrics().retries == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        locker.batch_execute("ROLLBACK").await.unwrap();
    });
    store.save_task_history("u", "t", 1, &step()).await.unwrap();
    release.await.unwrap();
    assert!(store.metrics().retries >= 1, "{:?}", store.metrics());
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows() {
    let config = fresh_config().await.password("hunter2-very-secret");
    let store = store_for(config).await;
    let shown = format!("{store:?} {:?}", store.config());
    assert!(!shown.contains("hunter2-very-secret"), "{shown}");
    let err = taskhistory_postgres::PgTaskHistoryStore::connect(
        fresh_config()
            .await
            .password("hunter2-very-secret")
            .dbname("missing_db_for_pw_test"),
    )
    .await
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2-very-secret"));
}

/// A `COPY` batch that cannot finish in time (its claim waits on another transaction's
/// uncommitted summary of the same task) fails with `Timeout`; its connection, left inside
/// a transaction, is thrown away, and the next batch gets a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_during_a_copy_batch_discards_its_connection() {
    use taskhistory_core::StepRecord;
    let app = format!("th-copy-timeout-{}", std::process::id());
    let config = fresh_config()
        .await
        .application_name(&app)
        .copy_min_rows(Some(1))
        .command_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_secs(30))
        .retry(RetryPolicy::never());
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    let blocker = test_db_client().await;
    blocker
        .batch_execute(&format!(
            "SET search_path TO {schema}; BEGIN; INSERT INTO task_summary \
             (user_id, task_id, status, last_step, step_count, created_at, updated_at, started_at) \
             VALUES ('u', 'new', 'running', 0, 1, now(), now(), now())"
        ))
        .await
        .unwrap();
    let batch: Vec<StepRecord> = (0..3)
        .map(|i| StepRecord::new("u", "new", i, step()))
        .collect();
    let err = store.save_batch_task_history(&batch).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    blocker.batch_execute("ROLLBACK").await.unwrap();

    // Kept, the connection would now sit idle inside the claim's transaction; thrown away,
    // its server process is gone (the store's sessions carry their application name).
    until_none(&app, "idle in transaction%").await;
    until_none(&app, "active").await;

    // Twice: with two COPY connections at most, a reused half-open transaction would show.
    for task in ["new", "other"] {
        let batch: Vec<StepRecord> = (0..3)
            .map(|i| StepRecord::new("u", task, i, step()))
            .collect();
        store.save_batch_task_history(&batch).await.unwrap();
        assert_eq!(store.load_task_history("u", task).await.unwrap().len(), 3);
    }
}
