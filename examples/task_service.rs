//! A service that records its tasks' steps with taskhistory, the way a team moving off the
//! Python `DatabaseManager` would write one: it depends only on `DynStore`, so production
//! hands it the PostgreSQL store, and its own tests hand it the mock (to check what it asks
//! of the store) and the memory store (to check what it does). Copy it as a start.
//!
//! ```sh
//! cargo run --example task_service     # runs two tasks on the memory store
//! cargo test --example task_service --features mock,test-schema
//!                                      # its tests: mock, memory store, and PostgreSQL
//! ```
//!
//! The PostgreSQL test reads `TEST_DATABASE_URL` (default: the local server,
//! `postgres://postgres@127.0.0.1:5432/postgres`), works on a throwaway schema of its own
//! and drops it; a schema a panicking run leaves is swept by a later run after an hour.

use std::sync::Arc;

use taskhistory::serde_json::{json, Value};
use taskhistory::{DynStore, ErrorCode, MemoryStore, StoreError, TaskStatus, TaskStepResult};

/// Runs a task's steps and records each one, stopping when the task is cancelled.
pub struct TaskService {
    store: DynStore,
}

/// What became of one step.
#[derive(Debug, PartialEq)]
pub enum StepOutcome {
    /// Done and recorded as a success.
    Done,
    /// Failed and recorded as a failure.
    Failed,
    /// Not worked on, or not recorded: the task was cancelled.
    Stopped,
}

impl TaskService {
    /// A service recording into `store`.
    pub fn new(store: DynStore) -> Self {
        TaskService { store }
    }

    /// Runs step `step` of `task` unless the task was cancelled, and records its outcome.
    pub async fn run_step(
        &self,
        user: &str,
        task: &str,
        step: i32,
        work: impl FnOnce() -> Result<Value, String>,
    ) -> Result<StepOutcome, StoreError> {
        if self.store.check_task_status(user, task).await? == TaskStatus::Cancelled {
            return Ok(StepOutcome::Stopped);
        }
        let (record, outcome) = match work() {
            Ok(v) => (
                TaskStepResult::success(format!("step_{step}"), v, "done"),
                StepOutcome::Done,
            ),
            Err(e) => (
                TaskStepResult::failure(format!("step_{step}"), ErrorCode::Execution, e),
                StepOutcome::Failed,
            ),
        };
        match self
            .store
            .save_task_history(user, task, step, &record)
            .await
        {
            Ok(()) => Ok(outcome),
            Err(StoreError::TaskCancelled { .. }) => Ok(StepOutcome::Stopped),
            Err(e) => Err(e),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), StoreError> {
    let store: DynStore = Arc::new(MemoryStore::new());
    let service = TaskService::new(store.clone());
    service
        .run_step("user_1", "import", 1, || Ok(json!({"rows": 10})))
        .await?;
    service
        .run_step("user_1", "import", 2, || Err("bad row 7".into()))
        .await?;
    // Another service queued an export; the user cancels it before it runs.
    let queued = TaskStepResult::running("queued", json!(null), "waiting for a worker");
    store
        .save_task_history("user_1", "export", 0, &queued)
        .await?;
    store.mark_task_as_cancelled("user_1", "export").await?;
    let stopped = service
        .run_step("user_1", "export", 2, || Ok(json!(null)))
        .await?;
    for task in ["import", "export"] {
        let status = store.check_task_status("user_1", task).await?;
        println!("{task}: {status:?}");
    }
    println!("export step 1: {stopped:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use taskhistory::MockTaskHistoryStore;

    #[tokio::test]
    async fn mock_a_cancelled_task_is_not_worked_on() {
        let mut mock = MockTaskHistoryStore::new();
        mock.expect_check_task_status()
            .times(1)
            .returning(|_, _| Ok(TaskStatus::Cancelled));
        mock.expect_save_task_history().times(0);
        let service = TaskService {
            store: Arc::new(mock),
        };
        let mut worked = false;
        let outcome = service
            .run_step("u", "t", 1, || {
                worked = true;
                Ok(json!(1))
            })
            .await
            .unwrap();
        assert_eq!(outcome, StepOutcome::Stopped);
        assert!(!worked);
    }

    #[tokio::test]
    async fn mock_a_refused_save_stops_and_other_errors_propagate() {
        let mut mock = MockTaskHistoryStore::new();
        mock.expect_check_task_status()
            .returning(|_, _| Ok(TaskStatus::Running));
        mock.expect_save_task_history()
            .withf(|u, t, step, r| {
                u == "u" && t == "t" && *step == 2 && r.status == TaskStatus::Failed
            })
            .times(1)
            .returning(|u, t, _, _| {
                Err(StoreError::TaskCancelled {
                    user_id: u.into(),
                    task_id: t.into(),
                })
            });
        mock.expect_save_task_history()
            .withf(|_, _, step, _| *step == 3)
            .times(1)
            .returning(|_, _, _, _| {
                Err(StoreError::Unavailable {
                    operation: "save_task_history",
                    source: "down".into(),
                })
            });
        let service = TaskService {
            store: Arc::new(mock),
        };
        assert_eq!(
            service
                .run_step("u", "t", 2, || Err("boom".into()))
                .await
                .unwrap(),
            StepOutcome::Stopped
        );
        let err = service
            .run_step("u", "t", 3, || Ok(json!(3)))
            .await
            .unwrap_err();
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn memory_steps_are_recorded_until_cancelled() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let service = TaskService {
            store: store.clone(),
        };
        assert_eq!(
            service
                .run_step("u", "t", 1, || Ok(json!({"rows": 10})))
                .await
                .unwrap(),
            StepOutcome::Done
        );
        assert_eq!(
            service
                .run_step("u", "t", 2, || Err("bad row".into()))
                .await
                .unwrap(),
            StepOutcome::Failed
        );
        assert_eq!(
            store.check_task_status("u", "t").await.unwrap(),
            TaskStatus::Failed
        );
        // A failed task cannot be cancelled; a running one can.
        assert!(!store.mark_task_as_cancelled("u", "t").await.unwrap());
        store
            .save_task_history("u", "t2", 0, &TaskStepResult::running("s", json!(null), ""))
            .await
            .unwrap();
        assert!(store.mark_task_as_cancelled("u", "t2").await.unwrap());
        assert_eq!(
            service
                .run_step("u", "t2", 1, || Ok(json!(1)))
                .await
                .unwrap(),
            StepOutcome::Stopped
        );
        let history = store.load_task_history("u", "t").await.unwrap();
        assert_eq!(history.iter().map(|e| e.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(history[1].result.error_code, Some(ErrorCode::Execution));
    }

    /// The same service on PostgreSQL, on a schema of its own (feature `test-schema`).
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_records_the_steps_and_stops_on_cancel() {
        use taskhistory::{PgConfig, PgTaskHistoryStore};
        let url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let pg = PgTaskHistoryStore::on_fresh_schema(PgConfig::from_url(&url).unwrap())
            .await
            .unwrap_or_else(|e| {
                panic!("no PostgreSQL at {url:?} ({e}): set TEST_DATABASE_URL to a server")
            });
        let store: DynStore = Arc::new(pg.clone());
        let service = TaskService::new(store.clone());
        let done = service.run_step("u", "t", 1, || Ok(json!({"rows": 10})));
        assert_eq!(done.await.unwrap(), StepOutcome::Done);
        assert_eq!(
            store.check_task_status("u", "t").await.unwrap(),
            TaskStatus::Completed
        );
        // A running task is cancelled from outside: the service's next step stops.
        let running = TaskStepResult::running("s", json!(null), "");
        store
            .save_task_history("u", "t2", 0, &running)
            .await
            .unwrap();
        assert!(store.mark_task_as_cancelled("u", "t2").await.unwrap());
        let stopped = service.run_step("u", "t2", 1, || Ok(json!(2)));
        assert_eq!(stopped.await.unwrap(), StepOutcome::Stopped);
        assert_eq!(
            store.check_task_status("u", "t2").await.unwrap(),
            TaskStatus::Cancelled
        );
        pg.drop_schema().await.unwrap();
    }
}
