//! Secrets never reach the logs: the store's operations, a retried timeout and a failed
//! start-up, logged at TRACE. Its own test binary: tracing caches each log call site's
//! interest process-wide, and tests running in parallel threads without a subscriber could
//! otherwise make this one's thread-local subscriber miss events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use taskhistory_core::{TaskHistoryStore, TaskStepResult};
use taskhistory_testing::{fresh_config, lock_summary, store_for};

fn step() -> TaskStepResult {
    TaskStepResult::running("s", json!(null), "")
}

/// Everything the store logs, captured on this thread.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_password_never_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let secret = "hunter3-logged-secret";
    // A working store (trust auth ignores the password), its operations, a retried timeout.
    let config = fresh_config()
        .await
        .password(secret)
        .command_timeout(Duration::from_millis(200));
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store.save_task_history("u", "t", 0, &step()).await.unwrap();
    let locker = lock_summary(&schema, "t").await;
    let _ = store.save_task_history("u", "t", 1, &step()).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    tracing::debug!(config = ?store.config(), "the configuration, as a service would log it");
    // A failed start-up.
    let _ = taskhistory_postgres::PgTaskHistoryStore::connect(
        fresh_config()
            .await
            .password(secret)
            .dbname("missing_db_for_log_test"),
    )
    .await;
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("retrying after a transient error"),
        "nothing captured:\n{logs}"
    );
    assert!(logs.contains("PgConfig"), "{logs}");
    assert!(!logs.contains(secret), "the password was logged:\n{logs}");
}
