//! Combining concurrent calls of one kind into one statement: when more callers make a
//! call at once than the store lets such statements run (its lanes), the calls waiting go
//! in one statement. Single saves ([`save`]: one statement and one commit,
//! [`PgConfig::save_lanes`]) and status checks ([`status`]: one statement reading every
//! task asked for, [`PgConfig::status_lanes`]).
//!
//! A call that finds no call of its kind queued and a lane free is made at once in its
//! caller's own task, by the single call's statement (no hand-over, no waiting for
//! company): combining starts only when calls actually queue. A queued call takes a free
//! lane if there is one: the lane's worker (a task of its own, so a caller that gives up
//! never cancels other callers' calls) takes the calls queued at that moment (at most
//! 1,000, and what its kind admits together), makes them in one statement and answers each
//! caller, then takes what queued meanwhile, until the
//! queue is empty. A call waits in the queue at most the pool timeout, as a call without
//! combining waits for a connection.
//!
//! [`PgConfig::save_lanes`]: crate::PgConfig::save_lanes
//! [`PgConfig::status_lanes`]: crate::PgConfig::status_lanes

pub(crate) mod save;
pub(crate) mod status;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use taskhistory_core::StoreError;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;

/// The most calls one statement takes.
const MAX_COMBINED: usize = 1_000;

/// One kind of call that concurrent callers' calls are combined for: what a statement takes
/// from the queue, and how it is made and answered.
pub(crate) trait Kind: Send + Sync + Sized + 'static {
    /// One caller's call, as queued.
    type Item: Send + 'static;
    /// What its caller is answered.
    type Answer: Send + 'static;
    /// The operation's name (errors).
    const OP: &'static str;
    /// What a lane is a lane for, in the error of a call that found none free in time.
    const LANE: &'static str;

    /// The next statement's calls, in the order queued; what stays waits for the next.
    fn take(&self, queue: &mut VecDeque<Queued<Self>>) -> Vec<Queued<Self>> {
        let n = queue.len().min(MAX_COMBINED);
        queue.drain(..n).collect()
    }

    /// Makes `batch` (at least one call) in one statement and answers each caller; a batch
    /// of one by the single call's statement when `single`.
    fn run(
        &self,
        backend: &Arc<Backend>,
        batch: Vec<Queued<Self>>,
        single: bool,
    ) -> impl Future<Output = ()> + Send;
}

/// A queued call and where its answer goes.
pub(crate) struct Queued<K: Kind> {
    /// Tells the caller's entry from the others (to take it back when it waited too long).
    ticket: u64,
    pub(crate) item: K::Item,
    pub(crate) done: oneshot::Sender<Result<K::Answer, StoreError>>,
}

/// The queue of one kind of call and the lanes its statements run on.
pub(crate) struct Combiner<K: Kind> {
    kind: K,
    queue: Mutex<VecDeque<Queued<K>>>,
    tickets: AtomicU64,
    /// How long a call waits in the queue for a lane ([`PgConfig::pool_timeout`]), as a
    /// call without combining waits for a connection.
    ///
    /// [`PgConfig::pool_timeout`]: crate::PgConfig::pool_timeout
    wait: Duration,
    lanes: Arc<Semaphore>,
    lanes_total: u32,
    /// A lone call is queued and takes the combined statement too (tests only:
    /// `PgConfig::combine_lone_saves`, `combine_lone_statuses`).
    lone_combined: bool,
}

impl<K: Kind> std::fmt::Debug for Combiner<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("operation", &K::OP)
            .field("free_lanes", &self.lanes.available_permits())
            .finish()
    }
}

impl<K: Kind> Combiner<K> {
    /// A combiner of `lanes` lanes (at least one).
    pub(crate) fn new(kind: K, lanes: u32, lone_combined: bool, wait: Duration) -> Arc<Self> {
        Arc::new(Combiner {
            kind,
            queue: Mutex::new(VecDeque::new()),
            tickets: AtomicU64::new(0),
            wait,
            lanes: Arc::new(Semaphore::new(lanes.max(1) as usize)),
            lanes_total: lanes.max(1),
            lone_combined,
        })
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Queued<K>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls waiting for a lane now.
    pub(crate) fn queued(&self) -> u64 {
        self.queue().len() as u64
    }

    /// One call: made by `alone` in the caller's task when no call of this kind is queued
    /// and a lane is free; else queued as `item()` and answered by a lane's statement.
    pub(crate) async fn call(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        alone: impl Future<Output = Result<K::Answer, StoreError>>,
        item: impl FnOnce() -> K::Item,
    ) -> Result<K::Answer, StoreError> {
        if let Some(lane) = self.lone_lane(backend) {
            let answer = alone.await;
            drop(lane);
            return answer;
        }
        let (done, mut answer) = oneshot::channel();
        let queued = Queued {
            ticket: self.tickets.fetch_add(1, Ordering::Relaxed),
            item: item(),
            done,
        };
        let ticket = queued.ticket;
        self.queue().push_back(queued);
        self.start_lane(backend);
        let lost = || {
            Err(StoreError::database(
                K::OP,
                "the statement ended without an answer (the runtime is shutting down)",
            ))
        };
        match tokio::time::timeout(self.wait, &mut answer).await {
            Ok(answered) => return answered.unwrap_or_else(|_| lost()),
            Err(_) => {
                // Still queued: every lane stayed busy. Taken back, as a call without
                // combining gives up waiting for a connection.
                let mut queue = self.queue();
                if let Some(at) = queue.iter().position(|q| q.ticket == ticket) {
                    queue.remove(at);
                    return Err(StoreError::Unavailable {
                        operation: K::OP,
                        source: format!(
                            "no {} lane free within {:?} ({})",
                            K::LANE,
                            self.wait,
                            match self.lanes_total {
                                1 => "its one lane busy".to_owned(),
                                n => format!("{n} lanes, all busy"),
                            }
                        )
                        .into(),
                    });
                }
            }
        }
        // A lane took it: its statement answers (bounded by the command timeout).
        answer.await.unwrap_or_else(|_| lost())
    }

    /// A free lane for a call that finds no other call queued (none when combining every
    /// call): held by the caller while it runs; calls that queue meanwhile are taken by a
    /// lane's worker when it is given back.
    fn lone_lane(self: &Arc<Self>, backend: &Arc<Backend>) -> Option<Lane<K>> {
        if self.lone_combined {
            return None;
        }
        let queue = self.queue();
        if !queue.is_empty() {
            return None;
        }
        let permit = Arc::clone(&self.lanes).try_acquire_owned().ok()?;
        drop(queue);
        Some(Lane {
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

    /// Makes what is queued until the queue is empty, then frees the lane (whose drop
    /// starts a worker again for a call that queued after the last take, or when this one
    /// ends by a panic).
    async fn work(self: Arc<Self>, backend: Arc<Backend>, permit: OwnedSemaphorePermit) {
        let _lane = Lane {
            combiner: Arc::clone(&self),
            backend: Arc::clone(&backend),
            permit: Some(permit),
        };
        loop {
            let batch = self.kind.take(&mut self.queue());
            if batch.is_empty() {
                return;
            }
            self.kind.run(&backend, batch, !self.lone_combined).await;
        }
    }
}

/// A lane held: by a lone call's caller, given back when the call ends (or its caller stops
/// waiting, which cuts only its own statement, as without combining); or by a lane's
/// worker, given back when the queue is empty. Calls that queued meanwhile then get a
/// lane's worker.
struct Lane<K: Kind> {
    combiner: Arc<Combiner<K>>,
    backend: Arc<Backend>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<K: Kind> Drop for Lane<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        if !self.combiner.queue().is_empty() {
            self.combiner.start_lane(&self.backend);
        }
    }
}
