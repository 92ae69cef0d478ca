//! Combined status checks ([`PgConfig::status_lanes`]): the checks waiting go in one
//! statement reading every task asked for ([`TASK_STATUSES`](crate::sql::TASK_STATUSES)),
//! declaring every user of its tasks. Each caller gets its task's status, the same as its
//! own statement would have given (the statement starts after every check it takes was
//! made, so each sees every write that returned before its call). A failure of the
//! statement is every caller's (each would have had it); a row that does not decode (a
//! status this version does not know, written by a newer one) fails only its own task's
//! check. With replicas, the checks of users whose latest write must still be sampled are
//! read apart from the others, in a task of their own, so that neither the other users'
//! checks nor the lane wait for it.
//!
//! History loads are not combined: their rows' decoding, the bulk of a load's client work,
//! would run in one lane's task instead of each caller's (measured slower,
//! docs/performance.md).
//!
//! [`PgConfig::status_lanes`]: crate::PgConfig::status_lanes

use std::collections::VecDeque;
use std::sync::Arc;

use taskhistory_core::{StoreError, TaskStatus};

use super::{Combiner, Kind, Queued, MAX_COMBINED};
use crate::backend::Backend;
use crate::config::PgConfig;
use crate::exec::Call;
use crate::ops::read::{self, TaskKeys, STATUS};
use crate::ops::rows::TaskKey;

/// Status checks, combined.
pub(crate) struct Statuses;

/// One caller's task.
pub(crate) struct Task {
    user_id: String,
    task_id: String,
}

impl Statuses {
    /// The combiner of status checks for a store of `config` (none with no status lanes).
    pub(crate) fn combiner(config: &PgConfig) -> Option<Arc<Combiner<Self>>> {
        (config.status_lanes > 0).then(|| {
            Combiner::new(
                Statuses,
                config.status_lanes,
                config.combine_lone_statuses,
                config.pool_timeout,
            )
        })
    }
}

impl Combiner<Statuses> {
    /// Checks one task's status (`call` is the caller's own, as its check alone declares it).
    pub(crate) async fn check(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        call: Call<'_>,
        key: &TaskKey<'_>,
    ) -> Result<TaskStatus, StoreError> {
        let alone = backend.read(call, key, read::task_status);
        self.call(backend, alone, || Task {
            user_id: key.user_id.to_owned(),
            task_id: key.task_id.to_owned(),
        })
        .await
    }
}

impl Kind for Statuses {
    type Item = Task;
    type Answer = TaskStatus;
    const OP: &'static str = STATUS;
    const LANE: &'static str = "status";

    /// The checks queued now, in order, at most [`MAX_COMBINED`], leaving out those whose
    /// callers stopped waiting.
    fn take(&self, queue: &mut VecDeque<Queued<Self>>) -> Vec<Queued<Self>> {
        let mut batch = Vec::new();
        while batch.len() < MAX_COMBINED {
            let Some(q) = queue.pop_front() else { break };
            if !q.done.is_closed() {
                batch.push(q);
            }
        }
        batch
    }

    async fn run(&self, backend: &Arc<Backend>, batch: Vec<Queued<Self>>, single: bool) {
        // With replicas, checks of a user whose latest write no replica is known to have
        // yet wait for it (or go to the primary): read in a task of their own, so that the
        // other users' checks, and the lane, do not wait with them.
        if let Some(replicas) = backend.replicas() {
            let (waiting, ready): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|q| replicas.waits(&q.item.user_id));
            if !waiting.is_empty() {
                let backend = Arc::clone(backend);
                tokio::spawn(async move { combined(&backend, waiting, single).await });
            }
            return combined(backend, ready, single).await;
        }
        combined(backend, batch, single).await;
    }
}

/// Reads `batch`'s tasks in one statement (a batch of one by its own when `single`) and
/// answers each caller.
async fn combined(backend: &Arc<Backend>, batch: Vec<Queued<Statuses>>, single: bool) {
    if let (true, [one]) = (single, batch.as_slice()) {
        let t = &one.item;
        let key = TaskKey {
            user_id: &t.user_id,
            task_id: &t.task_id,
        };
        let status = backend
            .read(
                Call::task(STATUS, &t.user_id, &t.task_id),
                &key,
                read::task_status,
            )
            .await;
        if let Some(q) = batch.into_iter().next() {
            let _ = q.done.send(status);
        }
        return;
    }
    if batch.is_empty() {
        return;
    }
    let keys = TaskKeys {
        users: batch.iter().map(|q| q.item.user_id.clone()).collect(),
        tasks: batch.iter().map(|q| q.item.task_id.clone()).collect(),
    };
    let mut users: Vec<&str> = keys.users.iter().map(String::as_str).collect();
    users.sort_unstable();
    users.dedup();
    let statuses = backend
        .read(Call::users(STATUS, &users), &keys, read::task_statuses)
        .await;
    match statuses {
        Ok(statuses) => {
            for (q, status) in batch.into_iter().zip(statuses) {
                let _ = q.done.send(status);
            }
        }
        Err(e) => {
            for q in batch {
                let _ = q.done.send(Err(e.clone()));
            }
        }
    }
}
