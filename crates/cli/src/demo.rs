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
use crate::error::{exit, CliError};
use crate::output::{time, Output};
use crate::setup::pg_config;

/// The schema the demo uses on PostgreSQL unless `--schema` is given.
const DEMO_SCHEMA: &str = "taskhistory_demo";

/// What the demo did, scenario by scenario.
#[derive(Debug, Serialize)]
struct DemoReport {
    backend: &'static str,
    /// Where the data went on PostgreSQL (none in memory).
    schema: Option<String>,
    user_id: String,
    /// the history of `task_456` after two steps and a retried step 2.
    history: Vec<HistoryEntry>,
    /// statuses of the running task, the failed task and an unknown task.
    statuses: BTreeMap<String, TaskStatus>,
    /// whether cancelling `task_456` did something, and its status after.
    cancelled: bool,
    status_after_cancel: TaskStatus,
    /// the error the next write to the cancelled task got.
    refused_write: String,
    /// whether cancelling the failed task did something (it must not).
    cancelled_failed_task: bool,
    /// the user's tasks, newest activity first, before the cleanup.
    tasks: Vec<TaskSummary>,
    /// what the cleanup of tasks idle for 30 days removed.
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
    let schema = db.schema.as_deref().unwrap_or(DEMO_SCHEMA).to_owned();
    let (store, user): (DynStore, String) = if db.database_url.is_some() {
        let config = pg_config(db)?.schema(schema.clone());
        let store = PgTaskHistoryStore::connect(config).await?;
        let run_id = Utc::now().timestamp_micros();
        (Arc::new(store), format!("user_123-{run_id}"))
    } else {
        (Arc::new(MemoryStore::new()), "user_123".to_owned())
    };
    let report = scenarios(&store, &user).await;
    store.close().await;
    let mut report = report?;
    if report.backend == "postgres" {
        report.schema = Some(schema);
    }
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

    // save steps; a retried step replaces the first attempt.
    let step = TaskStepResult::success(
        "data_processing",
        json!({"processed_rows": 1000}),
        "Data processing completed",
    );
    store.save_task_history(user, task, 1, &step).await?;
    let running = TaskStepResult::running("step_2", json!({"progress": 0.5}), "Step 2 running");
    store.save_task_history(user, task, 2, &running).await?;
    store.save_task_history(user, task, 2, &running).await?;
    // an error step.
    let failed = TaskStepResult::failure("step_1", ErrorCode::Execution, "division by zero");
    store
        .save_task_history(user, failed_task, 1, &failed)
        .await?;

    let history = store.load_task_history(user, task).await?;
    let steps: Vec<i32> = history.iter().map(|e| e.step).collect();
    check(steps == [1, 2], "the retried step 2 was stored twice")?;

    // statuses.
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

    // cancel, then the next write is refused.
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

    // a batch of an old task, 45 days ago.
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

    // cleanup of tasks idle for 30 days.
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
        schema: None,
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
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut lines = vec![format!(
        "taskhistory demo on the {} store, as user {}: the calls a service makes, each checked",
        r.backend, r.user_id
    )];
    lines.push(
        "1. Save each step of task_456 as it runs (save_task_history); step 2 is saved twice, \
         as a retry would: the second save replaces the first. task_789 records an error."
            .into(),
    );
    lines.push("2. Load task_456's history (load_task_history), steps in order:".into());
    for e in &r.history {
        lines.push(format!(
            "     step {}: {} {} {}",
            e.step, e.status, e.result.step, e.result.result
        ));
    }
    lines.push(
        "3. Check statuses (check_task_status): a task's status is its highest step's; a \
         task never seen is pending."
            .into(),
    );
    for (task, status) in &r.statuses {
        lines.push(format!("     {task}: {status}"));
    }
    lines.push(format!(
        "4. Cancel task_456 (mark_task_as_cancelled): {}; its status is now {}. Cancelling \
         appends one entry after the highest step, so the task has one more step.",
        r.cancelled, r.status_after_cancel
    ));
    lines.push(format!(
        "     the next write is refused: {}",
        r.refused_write
    ));
    lines.push(format!(
        "     cancelling the failed task_789: {} (finished tasks stay as they are)",
        r.cancelled_failed_task
    ));
    lines
        .push("5. Save old_task in one batch (save_batch_task_history), dated 45 days ago.".into());
    lines.push(
        "6. List the user's tasks (get_user_tasks), newest activity first (task_456 counts \
         its cancellation entry):"
            .into(),
    );
    for t in &r.tasks {
        lines.push(format!(
            "     {}: {} ({}, last updated {})",
            t.task_id,
            t.status,
            plural(t.step_count.unsigned_abs(), "step", "steps"),
            time(t.last_updated)
        ));
    }
    lines.push(format!(
        "7. Clean up tasks idle for 30 days (cleanup_old_tasks): removed {} and {}; left: {}",
        plural(r.cleanup.tasks_removed, "task", "tasks"),
        plural(r.cleanup.steps_removed, "step", "steps"),
        r.tasks_after_cleanup.join(", ")
    ));
    if let Some(schema) = &r.schema {
        lines.push(format!(
            "The data is in schema {schema} of your database, as user {user}. Look at it with \
             the other commands, e.g.:\n     taskhistory --schema {schema} tasks {user}\n     \
             taskhistory --schema {schema} history {user} task_456",
            user = r.user_id
        ));
    } else {
        lines.push(
            "The data was in memory and is gone. With a database (--database-url, or \
             DATABASE_URL), the demo writes to schema taskhistory_demo and says how to look \
             at it with the other commands."
                .into(),
        );
    }
    out.line(&lines.join("\n"))
}
