//! Live task events: one `LISTEN` connection per store (dedicated, never pooled) fans
//! notifications out to every watcher of the store.
//!
//! After their commit, saves and cancellations hand their events (each step's key, status and
//! time; never the result) to the store's notifier (`notify.rs`), which sends them in batches
//! from its own transaction. After a lost connection the listener reconnects by itself and
//! every watcher re-reads what it has not seen yet (resynchronisation); every watcher also
//! resynchronises every 10 s, which catches the events of a process that died between a
//! commit and its notifier's next send. A notification that arrives after a read already
//! delivered its step (a send in flight while the watch started or resynchronised) is
//! dropped, so no committed step is missed and none is delivered twice.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Integer, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::{
    HistoryScan, StepKey, StoreError, TaskEvent, TaskEventStream, TaskHistoryStore, TaskQuery,
};
use tokio::sync::broadcast;

use crate::error::from_diesel;
use crate::exec::{Call, Tx};
use crate::sql::{self, Statement};
use crate::store::PgTaskHistoryStore;

use crate::listen::Wake;

#[derive(QueryableByName)]
struct Fenced {
    #[diesel(sql_type = Integer)]
    #[allow(dead_code)]
    one: i32,
}

fn send_fence<'c>(
    conn: &'c mut AsyncPgConnection,
    (channel, id): &'c (String, String),
) -> BoxFuture<'c, Result<(), StoreError>> {
    Box::pin(async move {
        let _: Vec<Fenced> = Statement::new(sql::WATCH_FENCE)
            .bind::<Text, _>(channel.clone())
            .bind::<Text, _>(format!("fence:{id}"))
            .fetch(conn)
            .await
            .map_err(|e| from_diesel("watch", e))?;
        Ok(())
    })
}

/// How often a watcher re-reads history without being told to.
const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// How long after a read a notification of a step it covered is taken as late (sent before
/// the read, arriving after it) and dropped.
const SETTLE: Duration = Duration::from_secs(2);
/// A periodic resynchronisation of a user's tasks looks at tasks active since its previous
/// one, less this margin (for clocks and commit delays).
const RESYNC_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// One watcher: what it has delivered, and what it has read but not yet handed out.
struct Watcher {
    store: PgTaskHistoryStore,
    user: String,
    task: Option<String>,
    /// The highest step delivered (or existing when the watch began), per task.
    last: HashMap<String, i32>,
    /// Per task, the highest step a history read covered and until when a notification at
    /// or below it is late.
    settled: HashMap<String, (i32, Instant)>,
    rx: broadcast::Receiver<Wake>,
    pending: VecDeque<TaskEvent>,
    /// When the next periodic resynchronisation is due, and when the previous one started.
    next_resync: Instant,
    last_resync: DateTime<Utc>,
}

impl PgTaskHistoryStore {
    /// Starts a watch of `user`'s tasks (only `task` when given).
    pub(crate) async fn start_watch(
        &self,
        user: &str,
        task: Option<&str>,
    ) -> Result<TaskEventStream, StoreError> {
        let (hub, connector, channel) = self.watch_parts()?;
        hub.ensure_listening(connector, &channel).await?;
        let mut rx = hub.subscribe(user);
        // Fence: every notification before ours is of a write older than this watch.
        let id = format!("{:016x}", fastrand::u64(..));
        let call = Call {
            task_id: task,
            ..Call::user("watch", user)
        };
        let fence = (channel.clone(), id.clone());
        self.exec()
            .pooled(call, Tx::Statement, &fence, send_fence)
            .await?;
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(Wake::Fence(f)) if *f == *id => return Ok(()),
                    // The listener is back after losing its connection: the fence may have
                    // been sent while it was away, so it goes again.
                    Ok(Wake::All) => {
                        self.exec()
                            .pooled(call, Tx::Statement, &fence, send_fence)
                            .await?;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(StoreError::Unavailable {
                            operation: "watch",
                            source: "the listener stopped".into(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| StoreError::Timeout {
                operation: "watch",
                source: "the listener did not relay the watch's own notification within 10 s"
                    .into(),
            })??;
        let mut watcher = Watcher {
            store: self.clone(),
            user: user.to_owned(),
            task: task.map(str::to_owned),
            last: HashMap::new(),
            settled: HashMap::new(),
            rx,
            pending: VecDeque::new(),
            next_resync: Instant::now() + RESYNC_EVERY,
            last_resync: Utc::now(),
        };
        watcher.snapshot().await?;
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next)))
    }
}

impl Watcher {
    /// Records the highest existing step of each watched task: those are not delivered.
    async fn snapshot(&mut self) -> Result<(), StoreError> {
        let until = Instant::now() + SETTLE;
        for (task, step) in self.current(None).await? {
            self.settled.insert(task.clone(), (step, until));
            self.last.insert(task, step);
        }
        Ok(())
    }

    /// The watched tasks and their highest step now (for a user's watch: only tasks active
    /// since `since`, when given).
    async fn current(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, i32)>, StoreError> {
        match &self.task {
            Some(task) => Ok(self
                .store
                .load_task_history(&self.user, task)
                .await?
                .last()
                .map(|e| vec![(task.clone(), e.step)])
                .unwrap_or_default()),
            None => {
                let mut out = Vec::new();
                let mut query = TaskQuery::first(1000);
                loop {
                    let page = self.store.get_user_tasks_page(&self.user, &query).await?;
                    let recent = |t: &&taskhistory_core::TaskSummary| {
                        since.is_none_or(|s| t.last_updated >= s)
                    };
                    out.extend(
                        page.tasks
                            .iter()
                            .filter(recent)
                            .map(|t| (t.task_id.clone(), t.last_step)),
                    );
                    // Newest activity first: past `since`, nothing further is recent.
                    let older = page.tasks.last().is_some_and(|t| !recent(&t));
                    match page.next {
                        Some(next) if !older => query = query.after(Some(next)),
                        _ => return Ok(out),
                    }
                }
            }
        }
    }

    fn watches(&self, user: &str, task: &str) -> bool {
        user == self.user && self.task.as_deref().is_none_or(|t| t == task)
    }

    async fn next(mut self) -> Option<(Result<TaskEvent, StoreError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            let received = tokio::select! {
                r = self.rx.recv() => Some(r),
                () = tokio::time::sleep_until(self.next_resync) => None,
            };
            let read = match received {
                Some(Ok(Wake::Steps(events))) => self.take_steps(&events).await,
                Some(Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_))) => {
                    self.resync(None).await
                }
                Some(Ok(Wake::Fence(_))) => Ok(()),
                Some(Err(broadcast::error::RecvError::Closed)) => return None,
                None => {
                    let since = self.last_resync - RESYNC_MARGIN;
                    self.last_resync = Utc::now();
                    self.next_resync = Instant::now() + RESYNC_EVERY;
                    self.resync(Some(since)).await
                }
            };
            if let Err(e) = read {
                return Some((Err(e), self));
            }
        }
    }

    /// Queues the events of one commit that concern this watcher: no read needed.
    ///
    /// A step beyond the next one after the last delivered (a gap: a step whose
    /// notification is late or was lost with a process that died after its commit, or
    /// steps that simply skip numbers) is not taken on trust: the task's steps after the
    /// last delivered one are read from history first, in step order, and notifications
    /// of steps that read covered are dropped when they come.
    async fn take_steps(&mut self, events: &[TaskEvent]) -> Result<(), StoreError> {
        for e in events {
            if !self.watches(&e.user_id, &e.task_id) {
                continue;
            }
            let late = self
                .settled
                .get(&e.task_id)
                .is_some_and(|(step, until)| Instant::now() < *until && e.step <= *step);
            if late {
                continue;
            }
            let last = self.last.get(&e.task_id).copied().unwrap_or(-1);
            if e.step > last.saturating_add(1) {
                self.read_task(&e.task_id, last).await?;
                if self.last.get(&e.task_id).is_some_and(|l| *l >= e.step) {
                    continue;
                }
            }
            let last = self.last.entry(e.task_id.clone()).or_insert(-1);
            *last = (*last).max(e.step);
            self.pending.push_back(e.clone());
        }
        Ok(())
    }

    /// Reads every step not delivered yet (after a reconnect or a lag, and periodically,
    /// then only of tasks active since `since`). Steps saved again at or below the last
    /// delivered one are not re-read.
    async fn resync(&mut self, since: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        // A full re-read covers every wake queued before it. A periodic one reads only
        // recently active tasks (by their steps' times, which a save may set in the past),
        // so its queued wakes stay: steps it reads are dropped from them as late copies.
        if since.is_none() {
            while self.rx.try_recv().is_ok() {}
        }
        let now = Instant::now();
        self.settled.retain(|_, (_, until)| *until > now);
        if let Some(task) = self.task.clone() {
            // One task: read on from the last step delivered (an index range scan).
            let last = self.last.get(&task).copied().unwrap_or(-1);
            return self.read_task(&task, last).await;
        }
        for (task, step) in self.current(since).await? {
            let last = self.last.get(&task).copied().unwrap_or(-1);
            if step > last {
                self.read_task(&task, last).await?;
            }
        }
        Ok(())
    }

    /// Queues the events of `task`'s steps after `after`.
    async fn read_task(&mut self, task: &str, after: i32) -> Result<(), StoreError> {
        let mut scan = HistoryScan::task(task, 1000).after((after >= 0).then(|| StepKey {
            task_id: task.to_owned(),
            step: after,
        }));
        loop {
            let page = self.store.scan_history(&self.user, &scan).await?;
            for r in &page.steps {
                let timestamp = r.timestamp.unwrap_or_default();
                self.pending.push_back(TaskEvent::of_step(
                    &self.user,
                    task,
                    r.step,
                    r.result.status,
                    timestamp,
                ));
                let last = self.last.entry(task.to_owned()).or_insert(-1);
                *last = (*last).max(r.step);
                self.settled
                    .insert(task.to_owned(), (*last, Instant::now() + SETTLE));
            }
            match page.next {
                Some(next) => scan = scan.after(Some(next)),
                None => return Ok(()),
            }
        }
    }
}
