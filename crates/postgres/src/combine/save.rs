//! Combined single saves ([`PgConfig::save_lanes`]): the saves waiting go in one statement
//! and one commit ([`SAVE_COMBINED`](crate::sql::SAVE_COMBINED)). Each caller gets its own
//! outcome: a cancelled task refuses only the saves to it; a statement that fails for a
//! reason a retry cannot cure is split, each save then written alone; a step saved twice in
//! the queue goes in two statements, in the order queued. Each caller is answered after
//! the commit.
//!
//! [`PgConfig::save_lanes`]: crate::PgConfig::save_lanes

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use taskhistory_core::validate::PreparedStep;
use taskhistory_core::{StoreError, TaskStepResult};

use super::{Combiner, Kind, Queued, MAX_COMBINED};
use crate::backend::Backend;
use crate::exec::{Call, Tx};
use crate::ops::save::OP;
use crate::ops::{self, rows::JsonOf, save::Combined};

/// Single saves, combined.
pub(crate) struct Saves;

/// One caller's save, waiting for its statement.
pub(crate) struct Save {
    user_id: String,
    task_id: String,
    step: i32,
    result: TaskStepResult,
}

impl Combiner<Saves> {
    /// Saves one validated step; answers after the commit of the statement that took it.
    pub(crate) async fn save(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        step: &PreparedStep<'_>,
    ) -> Result<(), StoreError> {
        let alone = backend.save(
            Call::task(OP, step.user_id, step.task_id),
            std::slice::from_ref(step),
        );
        self.call(backend, alone, || Save {
            user_id: step.user_id.to_owned(),
            task_id: step.task_id.to_owned(),
            step: step.step,
            result: step.result.clone(),
        })
        .await
    }
}

impl Kind for Saves {
    type Item = Save;
    type Answer = ();
    const OP: &'static str = OP;
    const LANE: &'static str = "save";

    /// The saves queued now, in order, at most one per step key (a key's later saves stay
    /// queued for the next statement, with every later save of that task: its order).
    fn take(&self, queue: &mut VecDeque<Queued<Self>>) -> Vec<Queued<Self>> {
        let mut keys = HashSet::new();
        let mut batch = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(q) = queue.pop_front() {
            if batch.len() == MAX_COMBINED {
                kept.push_back(q);
                continue;
            }
            let s = &q.item;
            if kept
                .iter()
                .any(|k: &Queued<Saves>| k.item.user_id == s.user_id && k.item.task_id == s.task_id)
                || !keys.insert((s.user_id.clone(), s.task_id.clone(), s.step))
            {
                kept.push_back(q);
                continue;
            }
            batch.push(q);
        }
        *queue = kept;
        batch
    }

    async fn run(&self, backend: &Arc<Backend>, batch: Vec<Queued<Self>>, single: bool) {
        write(backend, batch, single).await;
    }
}

/// Writes one statement's saves and answers their callers.
async fn write(backend: &Arc<Backend>, mut batch: Vec<Queued<Saves>>, single: bool) {
    // Key order: the order every writer locks tasks in.
    batch.sort_by(|a, b| {
        let (a, b) = (&a.item, &b.item);
        (&a.user_id, &a.task_id, a.step).cmp(&(&b.user_id, &b.task_id, b.step))
    });
    if let (true, [one]) = (single, batch.as_slice()) {
        // Alone: the single-step statement, whose plan the server keeps (see SAVE_STEP).
        let one = &one.item;
        let step = PreparedStep {
            user_id: &one.user_id,
            task_id: &one.task_id,
            step: one.step,
            timestamp: None,
            result: &one.result,
        };
        let outcome = backend
            .save(Call::task(OP, &one.user_id, &one.task_id), &[step])
            .await;
        if let Some(q) = batch.pop() {
            let _ = q.done.send(outcome);
        }
        return;
    }
    let mut saves = Combined::default();
    for q in &batch {
        let result = match JsonOf::new(OP, &q.item.result) {
            Ok(json) => json,
            Err(e) => {
                // Cannot happen for a validated result; answered alone if it does.
                return split(backend, batch, e, single).await;
            }
        };
        saves.users.push(q.item.user_id.clone());
        saves.tasks.push(q.item.task_id.clone());
        saves.steps.push(q.item.step);
        saves.results.push(result);
        saves.statuses.push(q.item.result.status.as_str());
    }
    let users: Vec<&str> = saves.users.iter().map(|u| u.as_ref()).collect();
    let outcome = backend
        .exec()
        .pooled(
            Call::users(OP, &users),
            Tx::Statement,
            &saves,
            ops::save::run_combined,
        )
        .await;
    match outcome {
        Ok(refused) => {
            let refused: HashSet<(&str, &str)> = refused
                .iter()
                .map(|(u, t)| (u.as_str(), t.as_str()))
                .collect();
            let is_refused = |s: &Save| refused.contains(&(s.user_id.as_str(), s.task_id.as_str()));
            backend.notify(
                batch
                    .iter()
                    .filter(|q| !is_refused(&q.item))
                    .map(|q| q.item.user_id.as_str()),
            );
            for q in batch {
                let answer = if is_refused(&q.item) {
                    Err(StoreError::TaskCancelled {
                        user_id: q.item.user_id,
                        task_id: q.item.task_id,
                    })
                } else {
                    Ok(())
                };
                let _ = q.done.send(answer);
            }
        }
        Err(e) => split(backend, batch, e, single).await,
    }
}

/// A combined statement failed (after the retries): a transient error is every caller's
/// (its outcome is unknown to all, as it would be to each alone); any other error may be
/// one save's, so each is written alone and gets its own outcome.
async fn split(backend: &Arc<Backend>, batch: Vec<Queued<Saves>>, e: StoreError, single: bool) {
    if e.is_transient() || matches!(e, StoreError::Closed) || batch.len() == 1 {
        for q in batch {
            let _ = q.done.send(Err(e.clone()));
        }
        return;
    }
    for q in batch {
        Box::pin(write(backend, vec![q], single)).await;
    }
}
