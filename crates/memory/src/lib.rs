//! `MemoryStore`: a [`TaskHistoryStore`] that keeps everything in process memory.
//!
//! It is the test double upstream services use instead of PostgreSQL: it applies the same
//! validation, ordering, errors, timestamp precision (microseconds) and JSON number rules as
//! the PostgreSQL store, and it passes the same behaviour suite
//! (`taskhistory_core::conformance`). It is safe under concurrent use and cheap to clone (all
//! clones share one state).
//!
//! It is not a production store: nothing survives the process, and one lock guards all data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use taskhistory_core::validate::{self, canonical_result};
use taskhistory_core::{
    CleanupReport, HealthReport, HistoryEntry, HistoryPage, HistoryScan, StepRecord, StoreError,
    TaskCursor, TaskEvent, TaskEventStream, TaskHistoryStore, TaskPage, TaskQuery, TaskStatus,
    TaskStepResult, TaskSummary,
};
use tokio::sync::broadcast;

/// The in-memory store. Clones share the same data.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<HashMap<String, UserTasks>>,
    closed: AtomicBool,
    /// Every committed step, in commit order, for watchers.
    events: broadcast::Sender<Arc<TaskEvent>>,
}

/// Events kept for watchers that are behind; past it they get `StoreError::Lagged`.
pub const EVENT_BUFFER: usize = 4096;

impl Default for Inner {
    fn default() -> Self {
        Inner {
            state: RwLock::default(),
            closed: AtomicBool::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

/// One user's tasks, with the listing order kept as an index.
#[derive(Debug, Default)]
struct UserTasks {
    /// By `task_id` in byte order, the order of history scans.
    tasks: BTreeMap<String, Task>,
    /// `(last_updated, task_id)` ascending; listings walk it backwards.
    by_activity: BTreeSet<(DateTime<Utc>, String)>,
}

#[derive(Debug)]
struct Task {
    steps: BTreeMap<i32, HistoryEntry>,
    status: TaskStatus,
    last_step: i32,
    created_at: DateTime<Utc>,
    last_updated: DateTime<Utc>,
}

/// One validated step to write.
struct Write {
    user_id: String,
    task_id: String,
    step: i32,
    timestamp: DateTime<Utc>,
    result: TaskStepResult,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// A stream of the events of `user_id` (and of `task_id` only, when given) from now on.
    fn subscribe(
        &self,
        user_id: &str,
        task_id: Option<&str>,
    ) -> Result<TaskEventStream, StoreError> {
        self.check_open()?;
        let rx = self.inner.events.subscribe();
        let filter = (user_id.to_owned(), task_id.map(str::to_owned));
        Ok(Box::pin(futures::stream::unfold(
            (rx, filter),
            |(mut rx, filter)| async move {
                loop {
                    match rx.recv().await {
                        Ok(event) => {
                            let (user, task) = &filter;
                            if event.user_id == *user
                                && task.as_ref().is_none_or(|t| *t == event.task_id)
                            {
                                return Some((Ok((*event).clone()), (rx, filter)));
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            return Some((Err(StoreError::Lagged { missed }), (rx, filter)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        )))
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, HashMap<String, UserTasks>>, StoreError> {
        self.check_open()?;
        Ok(self
            .inner
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, HashMap<String, UserTasks>>, StoreError> {
        self.check_open()?;
        Ok(self
            .inner
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Applies validated writes all-or-nothing: refused whole if any task is cancelled.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut state = self.write()?;
        for w in &writes {
            let cancelled = state
                .get(&w.user_id)
                .and_then(|u| u.tasks.get(&w.task_id))
                .is_some_and(|t| t.status == TaskStatus::Cancelled);
            if cancelled {
                return Err(StoreError::TaskCancelled {
                    user_id: w.user_id.clone(),
                    task_id: w.task_id.clone(),
                });
            }
        }
        for w in writes {
            // Sent under the lock: watchers see writes in commit order.
            let _ = self.inner.events.send(Arc::new(TaskEvent::of_step(
                &w.user_id,
                &w.task_id,
                w.step,
                w.result.status,
                w.timestamp,
            )));
            let user = state.entry(w.user_id).or_default();
            let entry = HistoryEntry {
                step: w.step,
                status: w.result.status,
                result: canonical_result(&w.result),
                timestamp: w.timestamp,
            };
            match user.tasks.get_mut(&w.task_id) {
                Some(task) => {
                    user.by_activity
                        .remove(&(task.last_updated, w.task_id.clone()));
                    if w.step >= task.last_step {
                        task.last_step = w.step;
                        task.status = entry.status;
                    }
                    task.created_at = task.created_at.min(w.timestamp);
                    task.last_updated = task.last_updated.max(w.timestamp);
                    task.steps.insert(w.step, entry);
                    user.by_activity.insert((task.last_updated, w.task_id));
                }
                None => {
                    let task = Task {
                        status: entry.status,
                        last_step: w.step,
                        created_at: w.timestamp,
                        last_updated: w.timestamp,
                        steps: BTreeMap::from([(w.step, entry)]),
                    };
                    user.by_activity
                        .insert((task.last_updated, w.task_id.clone()));
                    user.tasks.insert(w.task_id, task);
                }
            }
        }
        Ok(())
    }
}

fn summary(task_id: &str, t: &Task) -> TaskSummary {
    TaskSummary {
        task_id: task_id.to_owned(),
        status: t.status,
        last_step: t.last_step,
        step_count: t.steps.len() as i64,
        created_at: t.created_at,
        last_updated: t.last_updated,
    }
}

#[async_trait]
impl TaskHistoryStore for MemoryStore {
    async fn init_database_schema(&self) -> Result<(), StoreError> {
        self.check_open()
    }

    async fn save_task_history(
        &self,
        user_id: &str,
        task_id: &str,
        step: i32,
        step_result: &TaskStepResult,
    ) -> Result<(), StoreError> {
        validate::save(user_id, task_id, step, step_result)?;
        self.apply(vec![Write {
            user_id: user_id.to_owned(),
            task_id: task_id.to_owned(),
            step,
            timestamp: validate::now(),
            result: step_result.clone(),
        }])
    }

    async fn save_batch_task_history(&self, records: &[StepRecord]) -> Result<(), StoreError> {
        let prepared = validate::prepare_batch(records)?;
        if prepared.is_empty() {
            return self.check_open();
        }
        let now = validate::now();
        let writes = prepared
            .into_iter()
            .map(|p| Write {
                user_id: p.user_id.to_owned(),
                task_id: p.task_id.to_owned(),
                step: p.step,
                timestamp: p.timestamp.unwrap_or(now),
                result: p.result.clone(),
            })
            .collect();
        self.apply(writes)
    }

    async fn load_task_history(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        validate::task(user_id, task_id)?;
        let state = self.read()?;
        Ok(state
            .get(user_id)
            .and_then(|u| u.tasks.get(task_id))
            .map(|t| t.steps.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn mark_task_as_cancelled(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<bool, StoreError> {
        validate::task(user_id, task_id)?;
        let mut state = self.write()?;
        let Some(user) = state.get_mut(user_id) else {
            return Ok(false);
        };
        let Some(task) = user.tasks.get_mut(task_id) else {
            return Ok(false);
        };
        if task.status.is_terminal() {
            return Ok(false);
        }
        let now = validate::now();
        let step = task.last_step.saturating_add(1);
        let result = TaskStepResult::cancellation();
        user.by_activity
            .remove(&(task.last_updated, task_id.to_owned()));
        task.steps.insert(
            step,
            HistoryEntry {
                step,
                status: result.status,
                result,
                timestamp: now,
            },
        );
        task.last_step = step;
        task.status = TaskStatus::Cancelled;
        task.last_updated = task.last_updated.max(now);
        let _ = self.inner.events.send(Arc::new(TaskEvent::of_step(
            user_id,
            task_id,
            step,
            TaskStatus::Cancelled,
            now,
        )));
        user.by_activity
            .insert((task.last_updated, task_id.to_owned()));
        Ok(true)
    }

    async fn check_task_status(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskStatus, StoreError> {
        validate::task(user_id, task_id)?;
        let state = self.read()?;
        Ok(state
            .get(user_id)
            .and_then(|u| u.tasks.get(task_id))
            .map_or(TaskStatus::Pending, |t| t.status))
    }

    async fn get_user_tasks_page(
        &self,
        user_id: &str,
        query: &TaskQuery,
    ) -> Result<TaskPage, StoreError> {
        validate::user_id(user_id)?;
        validate::query(query)?;
        let state = self.read()?;
        let Some(user) = state.get(user_id) else {
            return Ok(TaskPage {
                tasks: Vec::new(),
                next: None,
            });
        };
        let keys: Box<dyn Iterator<Item = &(DateTime<Utc>, String)>> = match &query.after {
            Some(TaskCursor {
                last_updated,
                task_id,
            }) => Box::new(
                user.by_activity
                    .range(..(*last_updated, task_id.clone()))
                    .rev(),
            ),
            None => Box::new(user.by_activity.iter().rev()),
        };
        let tasks: Vec<TaskSummary> = keys
            .filter_map(|(_, id)| user.tasks.get(id).map(|t| summary(id, t)))
            .filter(|t| query.status.is_none_or(|s| s == t.status))
            .take(usize::try_from(query.limit).unwrap_or(0).saturating_add(1))
            .collect();
        Ok(TaskPage::from_overfetch(tasks, query.limit))
    }

    async fn scan_history(
        &self,
        user_id: &str,
        scan: &HistoryScan,
    ) -> Result<HistoryPage, StoreError> {
        validate::scan(user_id, scan)?;
        let state = self.read()?;
        let Some(user) = state.get(user_id) else {
            return Ok(HistoryPage::from_overfetch(Vec::new(), scan.limit));
        };
        let after = scan.after.as_ref();
        // Tasks from the one holding the cursor on (or just the one asked for).
        let tasks: Box<dyn Iterator<Item = (&String, &Task)>> = match (&scan.task_id, after) {
            (Some(id), _) => Box::new(user.tasks.get_key_value(id.as_str()).into_iter()),
            (None, Some(a)) => Box::new(user.tasks.range(a.task_id.clone()..)),
            (None, None) => Box::new(user.tasks.iter()),
        };
        let wanted = usize::try_from(scan.limit).unwrap_or(0).saturating_add(1);
        let steps: Vec<StepRecord> = tasks
            .flat_map(|(task_id, task)| {
                let from = scan.resume_in(task_id).unwrap_or(i32::MAX);
                task.steps
                    .range((Bound::Excluded(from), Bound::Unbounded))
                    .map(move |(_, e)| {
                        StepRecord::new(user_id, task_id.as_str(), e.step, e.result.clone())
                            .at(e.timestamp)
                    })
            })
            .take(wanted)
            .collect();
        Ok(HistoryPage::from_overfetch(steps, scan.limit))
    }

    async fn watch_task(
        &self,
        user_id: &str,
        task_id: &str,
    ) -> Result<TaskEventStream, StoreError> {
        validate::task(user_id, task_id)?;
        self.subscribe(user_id, Some(task_id))
    }

    async fn watch_user(&self, user_id: &str) -> Result<TaskEventStream, StoreError> {
        validate::user_id(user_id)?;
        self.subscribe(user_id, None)
    }

    async fn cleanup_old_tasks(&self, days_old: i64) -> Result<CleanupReport, StoreError> {
        validate::days(days_old)?;
        let cutoff = validate::now() - Duration::days(days_old);
        let mut state = self.write()?;
        let mut report = CleanupReport::default();
        for user in state.values_mut() {
            let expired: Vec<(DateTime<Utc>, String)> = user
                .by_activity
                .range(..(cutoff, String::new()))
                .cloned()
                .collect();
            for key in expired {
                user.by_activity.remove(&key);
                if let Some(task) = user.tasks.remove(&key.1) {
                    report.tasks_removed += 1;
                    report.steps_removed += task.steps.len() as u64;
                }
            }
        }
        state.retain(|_, u| !u.tasks.is_empty());
        Ok(report)
    }

    async fn health_check(&self) -> Result<HealthReport, StoreError> {
        let started = Instant::now();
        drop(self.read()?);
        Ok(HealthReport {
            backend: "memory",
            round_trip: started.elapsed(),
            server_version: None,
            schema_version: None,
        })
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let mut state = self
            .inner
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.clear();
    }
}
