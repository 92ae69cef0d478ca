//! `taskhistory demo`: the Python `DatabaseManager`'s section 4 scenarios, end to end. Each
//! scenario checks what the store did, so the demo fails (exit 1) if a rule is broken.
//!
//! By default it runs on the in-memory store. With `--database-url` it runs on PostgreSQL in
//! its own schema, `taskhistory_demo` (or `--schema`), as a user id unique to the run, so it
//! never touches a service's data: its cleanup step only sees that schema.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, Utc};
use serde::Serialize;
use serde_json::json;
use taskhistory_core::{
    CleanupReport, DynStore, ErrorCode, HistoryEntry, StepRecord, StoreError, TaskStatus,
    TaskStepResult, TaskSummary,
};
use taskhistory_memory::MemoryStore;
use taskhistory_postgres::PgTaskHistoryStore;

use crate::args::DbArgs;
use crate::commands::pg_config;
use crate::error::{exit, CliError};
use crate::output::{time, Output};

/// The schema the demo uses on PostgreSQL unless `--schema` is given.
const DEMO_SCHEMA: &str = "taskhistory_demo";

/// What the demo did, scenario by scenario.
#[derive(Debug, Serialize)]
struct DemoReport {
    backend: &'static str,
    user_id: String,
    /// 4.2: the history of `task_456` after two steps and a retried step 2.
    history: Vec<HistoryEntry>,
    /// 4.3: statuses of the running task, the failed task and an unknown task.
    statuses: BTreeMap<String, TaskStatus>,
    /// 4.3: whether cancelling `task_456` did something, and its status after.
    cancelled: bool,
    status_after_cancel: TaskStatus,
    /// 4.3: the error the next write to the cancelled task got.
    refused_write: String,
    /// 4.3: whether cancelling the failed task did something (it must not).
    cancelled_failed_task: bool,
    /// 4.2: the user's tasks, newest activity first, before the cleanup.
    tasks: Vec<TaskSummary>,
    /// 4.4: what the cleanup of tasks idle for 30 days removed.
    cleanup: CleanupReport,
    /// The tasks left after it.
    tasks_after_cleanup: Vec<String>,
}

fn check(ok: bool, what: &str) -> Result<(), CliError> {
    if ok {
        Ok(())
    } else {
        Err(CliError::Other(format!("demo: {what}")))
    }
}

/// Runs the demo on the store `db` chooses.
pub(crate) async fn run(db: &DbArgs, out: Output) -> Result<u8, CliError> {
    let (store, user): (DynStore, String) = if db.database_url.is_some() {
        let config = pg_config(db)?.schema(db.schema.as_deref().unwrap_or(DEMO_SCHEMA));
        let store = PgTaskHistoryStore::connect(config).await?;
        let run_id = Utc::now().timestamp_micros();
        (Arc::new(store), format!("user_123-{run_id}"))
    } else {
        (Arc::new(MemoryStore::new()), "user_123".to_owned())
    };
    let report = scenarios(&store, &user).await;
    store.close().await;
    let report = report?;
    if out.json {
        out.json(&report)?;
    } else {
        print(&report, out)?;
    }
    Ok(exit::OK)
}

async fn scenarios(store: &DynStore, user: &str) -> Result<DemoReport, CliError> {
    store.init_database_schema().await?;
    let (task, failed_task) = ("task_456", "task_789");

    // 4.2: save steps; a retried step replaces the first attempt.
    let step = TaskStepResult::success(
        "data_processing",
        json!({"processed_rows": 1000}),
        "Data processing completed",
    );
    store.save_task_history(user, task, 1, &step).await?;
    let running = TaskStepResult::running("step_2", json!({"progress": 0.5}), "Step 2 running");
    store.save_task_history(user, task, 2, &running).await?;
    store.save_task_history(user, task, 2, &running).await?;
    // 4.2: an error step.
    let failed = TaskStepResult::failure("step_1", ErrorCode::Execution, "division by zero");
    store
        .save_task_history(user, failed_task, 1, &failed)
        .await?;

    let history = store.load_task_history(user, task).await?;
    let steps: Vec<i32> = history.iter().map(|e| e.step).collect();
    check(steps == [1, 2], "the retried step 2 was stored twice")?;

    // 4.3: statuses.
    let mut statuses = BTreeMap::new();
    for t in [task, failed_task, "unknown_task"] {
        statuses.insert(t.to_owned(), store.check_task_status(user, t).await?);
    }
    check(
        statuses.get(task) == Some(&TaskStatus::Running)
            && statuses.get(failed_task) == Some(&TaskStatus::Failed)
            && statuses.get("unknown_task") == Some(&TaskStatus::Pending),
        "unexpected statuses",
    )?;

    // 4.3: cancel, then the next write is refused.
    let cancelled = store.mark_task_as_cancelled(user, task).await?;
    let status_after_cancel = store.check_task_status(user, task).await?;
    check(
        cancelled && status_after_cancel == TaskStatus::Cancelled,
        "the task was not cancelled",
    )?;
    let refused_write = match store.save_task_history(user, task, 3, &running).await {
        Err(e @ StoreError::TaskCancelled { .. }) => e.to_string(),
        Err(e) => return Err(e.into()),
        Ok(()) => {
            return Err(CliError::Other(
                "demo: a write after the cancellation was accepted".into(),
            ))
        }
    };
    let cancelled_failed_task = store.mark_task_as_cancelled(user, failed_task).await?;
    check(!cancelled_failed_task, "a failed task was cancelled")?;

    // 4.5: a batch of an old task, 45 days ago.
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
    let tasks = store.get_user_tasks(user, 50).await?;

    // 4.4: cleanup of tasks idle for 30 days.
    let cleanup = store.cleanup_old_tasks(30).await?;
    let tasks_after_cleanup: Vec<String> = store
        .get_user_tasks(user, 50)
        .await?
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    check(
        !tasks_after_cleanup.iter().any(|t| t == "old_task") && tasks_after_cleanup.len() == 2,
        "the cleanup did not remove exactly the old task",
    )?;
    Ok(DemoReport {
        backend: store.health_check().await?.backend,
        user_id: user.to_owned(),
        history,
        statuses,
        cancelled,
        status_after_cancel,
        refused_write,
        cancelled_failed_task,
        tasks,
        cleanup,
        tasks_after_cleanup,
    })
}

fn print(r: &DemoReport, out: Output) -> Result<(), CliError> {
    let mut lines = vec![format!(
        "taskhistory demo on the {} store, user {}",
        r.backend, r.user_id
    )];
    lines
        .push("4.2 save steps (step 2 saved twice: a retry replaces it), and an error step".into());
    lines.push("4.2 load the history of task_456".into());
    for e in &r.history {
        lines.push(format!(
            "    step {}: {} {} {}",
            e.step, e.status, e.result.step, e.result.result
        ));
    }
    lines.push("4.3 check statuses".into());
    for (task, status) in &r.statuses {
        lines.push(format!("    {task}: {status}"));
    }
    lines.push(format!(
        "4.3 cancel task_456: {}; status now {}",
        r.cancelled, r.status_after_cancel
    ));
    lines.push(format!(
        "    the next write is refused: {}",
        r.refused_write
    ));
    lines.push(format!(
        "    cancelling the failed task_789: {} (terminal tasks stay as they are)",
        r.cancelled_failed_task
    ));
    lines.push("4.5 batch-save old_task, last active 45 days ago".into());
    lines.push("4.2 the user's tasks, newest activity first".into());
    for t in &r.tasks {
        lines.push(format!(
            "    {}: {} ({} steps, last updated {})",
            t.task_id,
            t.status,
            t.step_count,
            time(t.last_updated)
        ));
    }
    lines.push(format!(
        "4.4 clean up tasks idle for 30 days: removed {} task(s) and {} step(s); left: {}",
        r.cleanup.tasks_removed,
        r.cleanup.steps_removed,
        r.tasks_after_cleanup.join(", ")
    ));
    out.line(&lines.join("\n"))
}
