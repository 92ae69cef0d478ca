//! `MemoryStore`: a [`TaskHistoryStore`] that keeps everything in process memory.
//!
//! It is the test double upstream services use instead of PostgreSQL: it applies the same
//! validation, ordering, errors, timestamp precision (microseconds) and JSON number rules as
//! the PostgreSQL store, and it passes the same behaviour suite
//! (`taskhistory_core::conformance`). It is safe under concurrent use and cheap to clone (all
//! clones share one state).
//!
//! It is not a production store: nothing survives the process, and one lock guards all data.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use taskhistory_core::validate::{self, canonical_result};
use taskhistory_core::{
    ActivityHour, CleanupReport, EventCursor, HealthReport, HistoryEntry, HistoryPage, HistoryScan,
    StepRecord, StoreError, TaskCounts, TaskCursor, TaskEvent, TaskEventStream, TaskHistoryStore,
    TaskPage, TaskQuery, TaskStatus, TaskStepResult, TaskSummary,
};
use tokio::sync::watch;

/// The in-memory store. Clones share the same data.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<HashMap<String, UserTasks>>,
    closed: AtomicBool,
    /// This store's mark in its cursors: another store's cursor is refused.
    instance: u64,
    /// The newest position in the log of events, drawn under the state's write lock: the
    /// log's order is commit order. Watchers wait on it.
    position: watch::Sender<u64>,
    /// Watches open now, and how many may be.
    watchers: AtomicUsize,
    max_watchers: usize,
}

/// How many watches a store allows at once unless told otherwise (the PostgreSQL store's
/// default `DB_MAX_WATCHERS` too).
pub const DEFAULT_MAX_WATCHERS: usize = 100_000;

impl Default for Inner {
    fn default() -> Self {
        static INSTANCES: AtomicU64 = AtomicU64::new(1);
        Inner {
            state: RwLock::default(),
            closed: AtomicBool::default(),
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            position: watch::channel(0).0,
            watchers: AtomicUsize::new(0),
            max_watchers: DEFAULT_MAX_WATCHERS,
        }
    }
}

/// Events a watcher reads from the log at once.
const EVENTS_PER_READ: usize = 1000;

/// One user's tasks, with the listing order kept as an index.
#[derive(Debug, Default)]
struct UserTasks {
    /// By `task_id` in byte order, the order of history scans.
    tasks: BTreeMap<String, Task>,
    /// `(last_updated, task_id)` ascending; listings walk it backwards.
    by_activity: BTreeSet<(DateTime<Utc>, String)>,
    /// The log of events: each stored step (task, step) at the position of its last write.
    log: BTreeMap<u64, (String, i32)>,
    /// Tasks per status, kept by every write (rule 10).
    counts: TaskCounts,
    /// Activity by hour, kept by every write.
    activity: BTreeMap<DateTime<Utc>, ActivityHour>,
}

/// A task's state before a write: its status and number of steps (`None`: it is new).
type Before = Option<(TaskStatus, usize)>;

impl UserTasks {
    /// Counts what a write did to `task_id` (rule 10), given its state before: the same
    /// rule as the PostgreSQL store's triggers, per write (a call's writes to one task
    /// count once, together).
    fn account(&mut self, task_id: &str, before: Before) {
        let Some(task) = self.tasks.get(task_id) else {
            if let Some((status, _)) = before {
                self.counts.decrement(status);
            }
            return;
        };
        let (status, steps, hour) = (
            task.status,
            task.steps.len(),
            validate::hour_of(task.last_updated),
        );
        let changed = before.is_none_or(|(old, _)| old != status);
        if changed {
            if let Some((old, _)) = before {
                self.counts.decrement(old);
            }
            *self.counts.get_mut(status) += 1;
        }
        let added = steps.saturating_sub(before.map_or(0, |(_, n)| n)) as u64;
        let bucket = self
            .activity
            .entry(hour)
            .or_insert_with(|| ActivityHour::empty(hour));
        bucket.steps += added;
        if changed {
            if let Some(reached) = bucket.reached_mut(status) {
                *reached += 1;
            }
        }
        if bucket.is_empty() {
            self.activity.remove(&hour);
        }
    }

    /// Each task's state before a write.
    fn before(&self, task_id: &str) -> Before {
        self.tasks.get(task_id).map(|t| (t.status, t.steps.len()))
    }

    /// Moves a step just written to the end of the log, at `position`.
    fn logged(&mut self, task_id: &str, step: i32, position: u64) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        if let Some(old) = task.positions.insert(step, position) {
            self.log.remove(&old);
        }
        self.log.insert(position, (task_id.to_owned(), step));
    }
}

#[derive(Debug)]
struct Task {
    steps: BTreeMap<i32, HistoryEntry>,
    /// Each step's position in the user's log.
    positions: HashMap<i32, u64>,
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

    /// An empty store that allows at most `max` watches open at once (default
    /// [`DEFAULT_MAX_WATCHERS`], as the PostgreSQL store's `DB_MAX_WATCHERS`): past it a
    /// new watch fails with [`StoreError::LimitReached`]; a stream dropped or ended frees
    /// its place.
    pub fn with_max_watchers(max: usize) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                max_watchers: max,
                ..Inner::default()
            }),
        }
    }

    /// Watches open now.
    pub fn watchers(&self) -> usize {
        self.inner.watchers.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// A cursor at `position` of this store's log.
    fn cursor(&self, position: u64) -> Result<EventCursor, StoreError> {
        EventCursor::parse(&format!("mem.{}.{position}", self.inner.instance))
    }

    /// The position a cursor of this store stands at.
    fn position_of(&self, cursor: &EventCursor) -> Result<u64, StoreError> {
        let foreign = || StoreError::invalid("cursor", "not a cursor of this store");
        let rest = cursor.as_str().strip_prefix("mem.").ok_or_else(foreign)?;
        let (instance, position) = rest.split_once('.').ok_or_else(foreign)?;
        if instance.parse::<u64>().ok() != Some(self.inner.instance) {
            return Err(foreign());
        }
        position.parse().map_err(|_| foreign())
    }

    /// Draws the next position of the log (the caller holds the state's write lock).
    fn next_position(&self) -> u64 {
        let mut next = 0;
        self.inner.position.send_modify(|p| {
            *p += 1;
            next = *p;
        });
        next
    }

    /// A watch of `user_id` (only `task_id`, when given) after `after`, or after now.
    fn subscribe(
        &self,
        operation: &'static str,
        user_id: &str,
        task_id: Option<&str>,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        let position = match after {
            Some(cursor) => self.position_of(&cursor)?,
            // Read under the lock writers draw positions under: exactly "now".
            None => {
                let _state = self.read()?;
                *self.inner.position.borrow()
            }
        };
        self.check_open()?;
        let place = Place::take(&self.inner, operation)?;
        let watcher = MemoryWatcher {
            _place: place,
            store: self.clone(),
            user: user_id.to_owned(),
            task: task_id.map(str::to_owned),
            position,
            wake: self.inner.position.subscribe(),
            pending: VecDeque::new(),
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watcher,
            MemoryWatcher::next,
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
        // Each task's state before this call: a call is one write of each task (rule 10).
        let mut before: HashMap<(String, String), Before> = HashMap::new();
        for w in &writes {
            before
                .entry((w.user_id.clone(), w.task_id.clone()))
                .or_insert_with(|| state.get(&w.user_id).and_then(|u| u.before(&w.task_id)));
        }
        for w in writes {
            // Drawn under the lock: the log's order is commit order.
            let position = self.next_position();
            let (task_id, step) = (w.task_id.clone(), w.step);
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
                        positions: HashMap::new(),
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
            user.logged(&task_id, step, position);
        }
        for ((user_id, task_id), was) in before {
            if let Some(user) = state.get_mut(&user_id) {
                user.account(&task_id, was);
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
        // No step is left for the entry after i32::MAX (as on PostgreSQL).
        if task.status.is_terminal() || task.last_step == i32::MAX {
            return Ok(false);
        }
        let was = Some((task.status, task.steps.len()));
        let now = validate::now();
        let step = task.last_step + 1;
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
        user.by_activity
            .insert((task.last_updated, task_id.to_owned()));
        let position = self.next_position();
        user.logged(task_id, step, position);
        user.account(task_id, was);
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
        validate::list(user_id, query)?;
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
        // The activity index is newest first: nothing older than the range's start follows.
        let (from, _) = query.activity_range();
        let tasks: Vec<TaskSummary> = keys
            .take_while(|(updated, _)| from.is_none_or(|t| *updated >= t))
            .filter_map(|(_, id)| user.tasks.get(id).map(|t| summary(id, t)))
            .filter(|t| query.keeps(t))
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
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        validate::task(user_id, task_id)?;
        self.subscribe("watch_task", user_id, Some(task_id), after)
    }

    async fn watch_user(
        &self,
        user_id: &str,
        after: Option<EventCursor>,
    ) -> Result<TaskEventStream, StoreError> {
        validate::user_id(user_id)?;
        self.subscribe("watch_user", user_id, None, after)
    }

    async fn task_counts(&self, user_id: &str) -> Result<TaskCounts, StoreError> {
        validate::user_id(user_id)?;
        let state = self.read()?;
        Ok(state.get(user_id).map(|u| u.counts).unwrap_or_default())
    }

    async fn task_activity(
        &self,
        user_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ActivityHour>, StoreError> {
        let (from, to) = validate::activity(user_id, from, to)?;
        let state = self.read()?;
        Ok(state
            .get(user_id)
            .map(|u| u.activity.range(from..to).map(|(_, a)| *a).collect())
            .unwrap_or_default())
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
                    for position in task.positions.values() {
                        user.log.remove(position);
                    }
                    user.counts.decrement(task.status);
                    report.tasks_removed += 1;
                    report.steps_removed += task.steps.len() as u64;
                }
            }
        }
        // Activity of the hours before the cutoff goes with them.
        let kept_from = validate::hour_of(cutoff);
        for user in state.values_mut() {
            user.activity = user.activity.split_off(&kept_from);
        }
        state.retain(|_, u| !u.tasks.is_empty() || !u.activity.is_empty());
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
        // Wakes the watchers, which find the store closed and end.
        self.inner.position.send_modify(|_| {});
    }
}

/// A place among the store's open watches, freed when dropped.
struct Place(Arc<Inner>);

impl Place {
    fn take(inner: &Arc<Inner>, operation: &'static str) -> Result<Self, StoreError> {
        let max = inner.max_watchers;
        inner
            .watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| StoreError::LimitReached {
                operation,
                limit: "watchers",
                max,
            })?;
        Ok(Place(Arc::clone(inner)))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One watch: where it stands in the log, and what it has read but not handed out.
struct MemoryWatcher {
    _place: Place,
    store: MemoryStore,
    user: String,
    task: Option<String>,
    position: u64,
    wake: watch::Receiver<u64>,
    pending: VecDeque<TaskEvent>,
    ended: bool,
}

impl MemoryWatcher {
    async fn next(mut self) -> Option<(Result<TaskEvent, StoreError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            // Marked seen before the read: a write after it wakes the wait below.
            self.wake.borrow_and_update();
            match self.read() {
                Ok(()) => {}
                // A closed store ends the stream.
                Err(StoreError::Closed) => return None,
                Err(e) => {
                    self.ended = true;
                    return Some((Err(e), self));
                }
            }
            if self.pending.is_empty() && self.wake.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Reads the next events after the watcher's position.
    fn read(&mut self) -> Result<(), StoreError> {
        let state = self.store.read()?;
        let Some(user) = state.get(&self.user) else {
            return Ok(());
        };
        let after = (Bound::Excluded(self.position), Bound::Unbounded);
        for (&position, (task_id, step)) in user.log.range(after) {
            self.position = position;
            if self.task.as_ref().is_some_and(|t| t != task_id) {
                continue;
            }
            let Some(entry) = user.tasks.get(task_id).and_then(|t| t.steps.get(step)) else {
                continue;
            };
            self.pending.push_back(TaskEvent::of_step(
                &self.user,
                task_id,
                *step,
                entry.status,
                entry.timestamp,
                self.store.cursor(position)?,
            ));
            if self.pending.len() == EVENTS_PER_READ {
                break;
            }
        }
        Ok(())
    }
}
