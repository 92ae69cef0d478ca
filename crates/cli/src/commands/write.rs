//! The writing command: `cancel` (`import` and `export` are in `transfer.rs`).

use serde_json::json;
use taskhistory_core::DynStore;

use super::read::{exists, not_found};
use crate::error::{exit, CliError};
use crate::output::Output;

pub(super) async fn cancel(
    store: &DynStore,
    user: &str,
    task: &str,
    out: Output,
) -> Result<u8, CliError> {
    let cancelled = store.mark_task_as_cancelled(user, task).await?;
    let status = store.check_task_status(user, task).await?;
    if !cancelled && !exists(store, user, task).await? {
        return Err(not_found(user, task));
    }
    if out.json {
        out.json(
            &json!({"user_id": user, "task_id": task, "cancelled": cancelled, "status": status}),
        )?;
    } else if cancelled {
        out.line("cancelled")?;
    } else {
        out.line(&format!("not cancelled: the task is already {status}"))?;
    }
    Ok(exit::OK)
}
