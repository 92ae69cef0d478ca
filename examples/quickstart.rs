//! The Python DatabaseManager's section 4 scenarios, end to end, on the in-memory store:
//! save steps, an error step, load the history, check status, cancel and the refused write
//! after it, list the user's tasks, clean up.
//!
//! Run with `cargo run --example quickstart`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::json;
use taskhistory::{
    DynStore, ErrorCode, MemoryStore, StepRecord, StoreError, TaskStatus, TaskStepResult,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), StoreError> {
    let store: DynStore = Arc::new(MemoryStore::new());
    store.init_database_schema().await?;
    let (user, task) = ("user_123", "task_456");

    println!("4.2 save task steps");
    let step = TaskStepResult::success(
        "data_processing",
        json!({"processed_rows": 1000}),
        "Data processing completed",
    );
    store.save_task_history(user, task, 1, &step).await?;
    let running = TaskStepResult::running("step_2", json!({"progress": 0.5}), "Step 2 running");
    store.save_task_history(user, task, 2, &running).await?;
    // A retry of the same step replaces it: no duplicate row.
    store.save_task_history(user, task, 2, &running).await?;

    println!("4.2 save an error step");
    let failed = TaskStepResult::failure("step_1", ErrorCode::Execution, "division by zero");
    store
        .save_task_history(user, "task_789", 1, &failed)
        .await?;

    println!("4.2 load the history");
    for entry in store.load_task_history(user, task).await? {
        println!(
            "  step {}: {} - {}",
            entry.step, entry.status, entry.result.result
        );
    }

    println!("4.3 check the status");
    println!("  {task}: {}", store.check_task_status(user, task).await?);
    println!(
        "  task_789: {}",
        store.check_task_status(user, "task_789").await?
    );
    println!(
        "  unknown: {}",
        store.check_task_status(user, "nope").await?
    );

    println!("4.3 cancel the task");
    let cancelled = store.mark_task_as_cancelled(user, task).await?;
    println!(
        "  cancelled: {cancelled}; status now {}",
        store.check_task_status(user, task).await?
    );
    match store.save_task_history(user, task, 3, &running).await {
        Err(e @ StoreError::TaskCancelled { .. }) => println!("  the next write is refused: {e}"),
        other => println!("  unexpected: {other:?}"),
    }
    println!(
        "  cancelling a failed task: {}",
        store.mark_task_as_cancelled(user, "task_789").await?
    );

    println!("4.5 batch save (all or nothing, last duplicate wins)");
    let old = Utc::now() - Duration::days(45);
    let batch: Vec<StepRecord> = (0..3)
        .map(|i| {
            let r = TaskStepResult::success(
                format!("batch_step_{i}"),
                json!({"i": i}),
                format!("Batch step {i}"),
            );
            StepRecord::new(user, "old_task", i, r).at(old)
        })
        .collect();
    store.save_batch_task_history(&batch).await?;

    println!("4.2 list the user's tasks, newest activity first");
    for t in store.get_user_tasks(user, 50).await? {
        println!(
            "  {}: {} ({} steps, last updated {})",
            t.task_id, t.status, t.step_count, t.last_updated
        );
    }

    println!("4.4 clean up tasks idle for 30 days");
    let report = store.cleanup_old_tasks(30).await?;
    println!(
        "  removed {} tasks and {} steps",
        report.tasks_removed, report.steps_removed
    );
    let left: Vec<_> = store
        .get_user_tasks(user, 50)
        .await?
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    println!("  tasks left: {left:?}");
    assert_eq!(
        store.check_task_status(user, task).await?,
        TaskStatus::Cancelled
    );

    store.close().await;
    Ok(())
}
