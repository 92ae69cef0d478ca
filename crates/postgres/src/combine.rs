//! Combining concurrent single saves: when more callers save at once than the store lets
//! save statements run (its lanes, [`PgConfig::save_lanes`]), the saves waiting go in one
//! statement and one commit ([`SAVE_COMBINED`](crate::sql::SAVE_COMBINED)).
//!
//! A save joins a queue, then takes a free lane if there is one: the lane's worker (a task
//! of its own, so a caller that gives up never cancels other callers' saves) takes every
//! save queued at that moment, writes them in one statement and answers each caller after
//! the commit, then takes what queued meanwhile, until the queue is empty. A save that finds
//! no save queued and a lane free is written at once in its caller's own task (no hand-over,
//! no waiting for company): combining starts only when saves actually queue. Each caller gets its own outcome:
//! a cancelled task refuses only the saves to it; a statement that fails for a reason a
//! retry cannot cure is split, each save then written alone; a step saved twice in the
//! queue goes in two statements, in the order queued.
//!
//! [`PgConfig::save_lanes`]: crate::PgConfig::save_lanes

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use taskhistory_core::validate::PreparedStep;
use taskhistory_core::{StoreError, TaskStepResult};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;
use crate::exec::{Call, Tx};
use crate::ops::{self, rows::JsonOf, save::Combined};

use crate::ops::save::OP;
/// The most saves one statement takes.
const MAX_COMBINED: usize = 1_000;

/// One caller's save, waiting for its statement.
struct Queued {
    /// Tells the caller's entry from the others (to take it back when it waited too long).
    ticket: u64,
    user_id: String,
    task_id: String,
    step: i32,
    result: TaskStepResult,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The queue of single saves and the lanes they are written on.
pub(crate) struct Combiner {
    queue: Mutex<VecDeque<Queued>>,
    tickets: std::sync::atomic::AtomicU64,
    /// How long a save waits in the queue for a lane ([`PgConfig::pool_timeout`]), as a
    /// save without combining waits for a connection.
    ///
    /// [`PgConfig::pool_timeout`]: crate::PgConfig::pool_timeout
    wait: std::time::Duration,
    lanes: Arc<Semaphore>,
    lanes_total: u32,
    /// A lone save takes the combined statement too ([`PgConfig::combine_lone_saves`]).
    ///
    /// [`PgConfig::combine_lone_saves`]: crate::PgConfig::combine_lone_saves
    lone_combined: bool,
}

impl std::fmt::Debug for Combiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("free_lanes", &self.lanes.available_permits())
            .finish()
    }
}

impl Combiner {
    pub(crate) fn new(lanes: u32, lone_combined: bool, wait: std::time::Duration) -> Arc<Self> {
        Arc::new(Combiner {
            queue: Mutex::new(VecDeque::new()),
            tickets: std::sync::atomic::AtomicU64::new(0),
            wait,
            lanes: Arc::new(Semaphore::new(lanes.max(1) as usize)),
            lanes_total: lanes.max(1),
            lone_combined,
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves one validated step; answers after the commit of the statement that took it.
    pub(crate) async fn save(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        step: &PreparedStep<'_>,
    ) -> Result<(), StoreError> {
        if let Some(lane) = self.lone_lane(backend) {
            // No save waits and a lane is free: written here, in the caller's task, by the
            // single-step statement, with no hand-over to a lane's task.
            let call = Call::task(OP, step.user_id, step.task_id);
            let saved = backend.save(call, std::slice::from_ref(step)).await;
            drop(lane);
            return saved;
        }
        let (done, mut answer) = oneshot::channel();
        let ticket = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue().push_back(Queued {
            ticket,
            user_id: step.user_id.to_owned(),
            task_id: step.task_id.to_owned(),
            step: step.step,
            result: step.result.clone(),
            done,
        });
        self.start_lane(backend);
        let lost = || {
            Err(StoreError::database(
                OP,
                "the save's statement ended without an answer (the runtime is shutting down)",
            ))
        };
        match tokio::time::timeout(self.wait, &mut answer).await {
            Ok(answered) => return answered.unwrap_or_else(|_| lost()),
            Err(_) => {
                // Still queued: every lane stayed busy. Taken back, as a save without
                // combining gives up waiting for a connection.
                let mut queue = self.queue();
                if let Some(at) = queue.iter().position(|q| q.ticket == ticket) {
                    queue.remove(at);
                    return Err(StoreError::Unavailable {
                        operation: OP,
                        source: format!(
                            "no save lane free within {:?} ({} lanes, all busy)",
                            self.wait, self.lanes_total
                        )
                        .into(),
                    });
                }
            }
        }
        // A lane took it: its statement answers (bounded by the command timeout).
        answer.await.unwrap_or_else(|_| lost())
    }

    /// A free lane for a save that finds no other save queued (none when combining every
    /// save, [`PgConfig::combine_lone_saves`](crate::PgConfig)): held by the caller while
    /// it writes; saves that queue meanwhile are taken by a lane's worker when it is
    /// given back.
    fn lone_lane(self: &Arc<Self>, backend: &Arc<Backend>) -> Option<LoneLane> {
        if self.lone_combined {
            return None;
        }
        let queue = self.queue();
        if !queue.is_empty() {
            return None;
        }
        let permit = Arc::clone(&self.lanes).try_acquire_owned().ok()?;
        drop(queue);
        Some(LoneLane {
            combiner: Arc::clone(self),
            backend: Arc::clone(backend),
            permit: Some(permit),
        })
    }

    /// Starts a lane's worker if a lane is free (else a running worker takes the queue).
    fn start_lane(self: &Arc<Self>, backend: &Arc<Backend>) {
        // Outside a runtime (a lone lane given back while the runtime shuts down) there is
        // nothing to start: the queued callers are answered that the runtime is going.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Ok(lane) = Arc::clone(&self.lanes).try_acquire_owned() {
            runtime.spawn(Arc::clone(self).work(Arc::clone(backend), lane));
        }
    }

    /// Writes what is queued until the queue is empty, then frees the lane.
    async fn work(self: Arc<Self>, backend: Arc<Backend>, lane: OwnedSemaphorePermit) {
        let mut lane = Some(lane);
        loop {
            let batch = self.take();
            if batch.is_empty() {
                drop(lane.take());
                // A save queued after the take found no free lane: take the lane again
                // unless another worker already did.
                if self.queue().is_empty() {
                    return;
                }
                match Arc::clone(&self.lanes).try_acquire_owned() {
                    Ok(again) => {
                        lane = Some(again);
                        continue;
                    }
                    Err(_) => return,
                }
            }
            write(&backend, batch, self.lone_combined).await;
        }
    }

    /// The saves queued now, in order, at most one per step key (a key's later saves stay
    /// queued for the next statement).
    fn take(&self) -> Vec<Queued> {
        let mut queue = self.queue();
        let mut keys = HashSet::new();
        let mut batch = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(q) = queue.pop_front() {
            if batch.len() == MAX_COMBINED {
                kept.push_back(q);
                continue;
            }
            // A key's later saves wait, with every later save of that task (its order).
            let task = (q.user_id.clone(), q.task_id.clone());
            if kept
                .iter()
                .any(|k: &Queued| k.user_id == task.0 && k.task_id == task.1)
                || !keys.insert((task.0.clone(), task.1.clone(), q.step))
            {
                kept.push_back(q);
                continue;
            }
            batch.push(q);
        }
        *queue = kept;
        batch
    }
}

/// A lane held by a lone save's caller. Given back when the save ends (or its caller stops
/// waiting, which cuts only its own statement, as for a save without combining); saves that
/// queued meanwhile then get a lane's worker.
struct LoneLane {
    combiner: Arc<Combiner>,
    backend: Arc<Backend>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for LoneLane {
    fn drop(&mut self) {
        drop(self.permit.take());
        if !self.combiner.queue().is_empty() {
            self.combiner.start_lane(&self.backend);
        }
    }
}

/// Writes one statement's saves and answers their callers.
async fn write(backend: &Arc<Backend>, mut batch: Vec<Queued>, lone_combined: bool) {
    // Key order: the order every writer locks tasks in.
    batch.sort_by(|a, b| (&a.user_id, &a.task_id, a.step).cmp(&(&b.user_id, &b.task_id, b.step)));
    if let (false, [one]) = (lone_combined, batch.as_slice()) {
        // Alone: the single-step statement, whose plan the server keeps (see SAVE_STEP).
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
        let result = match JsonOf::new(OP, &q.result) {
            Ok(json) => json,
            Err(e) => {
                // Cannot happen for a validated result; answered alone if it does.
                return split(backend, batch, e, lone_combined).await;
            }
        };
        saves.users.push(q.user_id.clone());
        saves.tasks.push(q.task_id.clone());
        saves.steps.push(q.step);
        saves.results.push(result);
        saves.statuses.push(q.result.status.as_str());
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
            let is_refused =
                |q: &Queued| refused.contains(&(q.user_id.as_str(), q.task_id.as_str()));
            backend.notify(
                batch
                    .iter()
                    .filter(|q| !is_refused(q))
                    .map(|q| q.user_id.as_str()),
            );
            for q in batch {
                let answer = if is_refused(&q) {
                    Err(StoreError::TaskCancelled {
                        user_id: q.user_id,
                        task_id: q.task_id,
                    })
                } else {
                    Ok(())
                };
                let _ = q.done.send(answer);
            }
        }
        Err(e) => split(backend, batch, e, lone_combined).await,
    }
}

/// A combined statement failed (after the retries): a transient error is every caller's
/// (its outcome is unknown to all, as it would be to each alone); any other error may be
/// one save's, so each is written alone and gets its own outcome.
async fn split(backend: &Arc<Backend>, batch: Vec<Queued>, e: StoreError, lone_combined: bool) {
    if e.is_transient() || matches!(e, StoreError::Closed) || batch.len() == 1 {
        for q in batch {
            let _ = q.done.send(Err(e.clone()));
        }
        return;
    }
    for q in batch {
        Box::pin(write(backend, vec![q], lone_combined)).await;
    }
}
