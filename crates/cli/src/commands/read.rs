//! The reading commands: `history`, `status`, `tasks`, `counts`, `activity`, `watch`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use taskhistory_core::validate;
use taskhistory_core::{DynStore, EventCursor, HistoryScan, StoreError, TaskQuery, TaskStatus};

use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;
use crate::output::{clip, time, Output};

pub(super) async fn watch(
    store: &DynStore,
    user: &str,
    task: Option<&str>,
    after: Option<EventCursor>,
    count: Option<u64>,
    out: Output,
) -> Result<u8, CliError> {
    use futures::StreamExt;
    let mut events = match task {
        Some(t) => store.watch_task(user, t, after).await?,
        None => store.watch_user(user, after).await?,
    };
    eprintln!(
        "watching {}; Ctrl-C to stop",
        task.map_or_else(
            || format!("user {user:?}"),
            |t| format!("task {t:?} of user {user:?}")
        )
    );
    let mut seen = 0;
    let mut last = None;
    // Watching until interrupted is the command's normal end: it exits 0.
    let mut interrupt = Interrupt::install();
    while count.is_none_or(|c| seen < c) {
        let event = tokio::select! {
            e = events.next() => e,
            _ = interrupt.wait() => None,
        };
        let Some(event) = event else { break };
        match event {
            Ok(e) => {
                seen += 1;
                last = Some(e.cursor.clone());
                if out.json {
                    let line = serde_json::to_string(&e)
                        .map_err(|err| CliError::Other(format!("writing JSON: {err}")))?;
                    out.line(&line)?;
                } else {
                    out.line(&format!(
                        "{}  {}  step {}  {}{}",
                        time(e.timestamp),
                        e.task_id,
                        e.step,
                        e.status,
                        if e.kind == taskhistory_core::TaskEventKind::Cancelled {
                            "  (cancelled)"
                        } else {
                            ""
                        }
                    ))?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(cursor) = last {
        eprintln!("to go on from here: --after {cursor}");
    }
    Ok(exit::OK)
}

/// Whether a task has any step: what tells "unknown" from "pending".
pub(super) async fn exists(store: &DynStore, user: &str, task: &str) -> Result<bool, StoreError> {
    let page = store
        .scan_history(user, &HistoryScan::task(task, 1))
        .await?;
    Ok(!page.steps.is_empty())
}

pub(super) fn not_found(user: &str, task: &str) -> CliError {
    CliError::NotFound(format!("task {task:?} of user {user:?}"))
}

pub(super) async fn history(
    store: &DynStore,
    user: &str,
    task: &str,
    out: Output,
) -> Result<u8, CliError> {
    let steps = store.load_task_history(user, task).await?;
    if steps.is_empty() {
        return Err(not_found(user, task));
    }
    if out.json {
        out.json(&steps)?;
    } else {
        let rows = steps
            .iter()
            .map(|e| {
                let r = &e.result;
                let detail = match (&r.error_code, &r.error_message) {
                    (Some(code), Some(msg)) => format!("{code}: {msg}"),
                    (Some(code), None) => code.to_string(),
                    _ => r.result.to_string(),
                };
                vec![
                    e.step.to_string(),
                    e.status.to_string(),
                    time(e.timestamp),
                    clip(&r.step, 24),
                    clip(&r.message, 40),
                    clip(&detail, 60),
                ]
            })
            .collect();
        out.table(
            &["STEP", "STATUS", "TIMESTAMP", "NAME", "MESSAGE", "RESULT"],
            rows,
        )?;
    }
    Ok(exit::OK)
}

/// The API's answer: a task the store has never seen is `pending` (exit 0), as
/// `check_task_status` says; `history` tells an unknown task apart.
pub(super) async fn status(
    store: &DynStore,
    user: &str,
    task: &str,
    out: Output,
) -> Result<u8, CliError> {
    let status = store.check_task_status(user, task).await?;
    if out.json {
        out.json(&json!({"user_id": user, "task_id": task, "status": status}))?;
    } else {
        out.line(status.as_str())?;
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct TasksPage<'a> {
    tasks: &'a [taskhistory_core::TaskSummary],
    next_cursor: Option<String>,
}

pub(super) async fn tasks(
    store: &DynStore,
    user: &str,
    query: &TaskQuery,
    out: Output,
) -> Result<u8, CliError> {
    let page = store.get_user_tasks_page(user, query).await?;
    let next_cursor = page.next.as_ref().map(ToString::to_string);
    if out.json {
        out.json(&TasksPage {
            tasks: &page.tasks,
            next_cursor,
        })?;
        return Ok(exit::OK);
    }
    let rows = page
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                t.status.to_string(),
                t.last_step.to_string(),
                t.step_count.to_string(),
                time(t.created_at),
                time(t.last_updated),
            ]
        })
        .collect();
    out.table(
        &[
            "TASK",
            "STATUS",
            "LAST STEP",
            "STEPS",
            "CREATED",
            "LAST UPDATED",
        ],
        rows,
    )?;
    match next_cursor {
        Some(c) => out.line(&format!("more: --cursor '{c}'"))?,
        None => out.line(&format!("{} task(s); no more", page.tasks.len()))?,
    }
    Ok(exit::OK)
}

/// `taskhistory counts USER`: the user's tasks per status and their total.
pub(super) async fn counts(store: &DynStore, user: &str, out: Output) -> Result<u8, CliError> {
    let counts = store.task_counts(user).await?;
    if out.json {
        out.json(&json!({"user_id": user, "counts": counts, "total": counts.total()}))?;
        return Ok(exit::OK);
    }
    let mut rows: Vec<Vec<String>> = TaskStatus::ALL
        .iter()
        .map(|s| vec![s.to_string(), counts.get(*s).to_string()])
        .collect();
    rows.push(vec!["total".to_owned(), counts.total().to_string()]);
    out.table(&["STATUS", "TASKS"], rows)?;
    Ok(exit::OK)
}

/// `taskhistory activity USER [--from] [--to]`: the user's activity per hour in
/// `[from, to)` (both cut to the hour).
pub(super) async fn activity(
    store: &DynStore,
    user: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    out: Output,
) -> Result<u8, CliError> {
    let hours = store.task_activity(user, from, to).await?;
    let (from, to) = (validate::hour_of(from), validate::hour_of(to));
    if out.json {
        out.json(&json!({"user_id": user, "from": from, "to": to, "hours": hours}))?;
        return Ok(exit::OK);
    }
    let rows = hours
        .iter()
        .map(|h| {
            vec![
                time(h.hour),
                h.steps.to_string(),
                h.completed.to_string(),
                h.failed.to_string(),
                h.cancelled.to_string(),
                h.timed_out.to_string(),
            ]
        })
        .collect();
    out.table(
        &[
            "HOUR",
            "STEPS",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMED OUT",
        ],
        rows,
    )?;
    out.line(&format!(
        "{} hour(s) with activity from {} to {}",
        hours.len(),
        time(from),
        time(to)
    ))?;
    Ok(exit::OK)
}
