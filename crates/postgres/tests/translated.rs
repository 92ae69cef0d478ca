//! Errors are classified by SQLSTATE whatever language the server speaks: on a server whose
//! `lc_messages` is German, a statement timeout is still a (retried) `Timeout`, because the
//! store's sessions ask for untranslated messages. A role that may not set `lc_messages`
//! still connects, and the store says the messages may be translated.
//!
//! Needs the `de_DE.UTF-8` locale (`scripts/ensure-postgres.sh` generates it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use taskhistory_core::{RetryPolicy, StoreError, TaskHistoryStore, TaskStepResult};
use taskhistory_postgres::{least_privilege_grants, PgConfig, SslMode};
use taskhistory_testing::{store_for, OwnServer};

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_on_a_german_server_is_a_timeout() {
    let server = OwnServer::start(&["lc_messages=de_DE.UTF-8"]);
    // The server really speaks German to a session that does not ask otherwise.
    let plain = client(&server.url()).await;
    let err = plain.batch_execute("SELECT 1/0").await.unwrap_err();
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(
        message.contains("Division durch Null"),
        "the test server does not speak German ({message}); generate the locale: \
         localedef -i de_DE -f UTF-8 de_DE.UTF-8 (scripts/ensure-postgres.sh does it)"
    );

    let config = PgConfig::from_url(&server.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema("german")
        .pool_size(1, 4)
        .statement_timeout(Duration::from_millis(300))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        });
    let store = store_for(config.clone()).await;
    assert!(store.untranslated_messages());
    let run = TaskStepResult::running("s", json!({}), "");
    store.save_task_history("u", "t", 0, &run).await.unwrap();
    // Hold the task's summary row: the cancel waits past the statement timeout.
    plain
        .batch_execute(
            "SET search_path TO german; BEGIN; \
             SELECT 1 FROM task_summary WHERE user_id = 'u' AND task_id = 't' FOR UPDATE",
        )
        .await
        .unwrap();
    let retries_before = store.metrics().retries;
    let err = store.mark_task_as_cancelled("u", "t").await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(
        store.metrics().retries - retries_before,
        2,
        "a timeout is retried"
    );
    plain.batch_execute("ROLLBACK").await.unwrap();
    assert!(store.mark_task_as_cancelled("u", "t").await.unwrap());
    store.close().await;

    // A role without the right to set lc_messages: it connects, and the store says so.
    plain
        .batch_execute(&format!(
            "CREATE ROLE th_plain LOGIN; {}",
            least_privilege_grants("german", "th_plain").replace(
                "GRANT SET ON PARAMETER lc_messages",
                "GRANT SET ON PARAMETER search_path"
            )
        ))
        .await
        .unwrap();
    let limited = connect(config.clone().user("th_plain")).await;
    assert!(!limited.untranslated_messages());
    // Its watchers' LISTEN connection falls back the same way.
    drop(limited.watch_task("u", "t", None).await.unwrap());
    assert_eq!(
        limited.check_task_status("u", "t").await.unwrap(),
        taskhistory_core::TaskStatus::Cancelled
    );
    limited.close().await;
    // With the grant (PostgreSQL 15+, part of least_privilege_grants), it asks again.
    plain
        .batch_execute("GRANT SET ON PARAMETER lc_messages TO th_plain")
        .await
        .unwrap();
    let granted = connect(config.user("th_plain")).await;
    assert!(granted.untranslated_messages());
    granted.close().await;
}

async fn connect(config: PgConfig) -> taskhistory_postgres::PgTaskHistoryStore {
    taskhistory_postgres::PgTaskHistoryStore::connect(config)
        .await
        .unwrap()
}
