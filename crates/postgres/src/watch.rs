//! Live task events: one `LISTEN` connection per store (dedicated, never pooled) fans
//! notifications out to every watcher of the store.
//!
//! Saves notify once per statement, at commit, with each step's key, status and time (what
//! an event holds; never the result, so the size does not depend on the steps), or `*` when
//! the list would pass PostgreSQL's 8,000-byte limit; then watchers read what they have not
//! seen from the history. After a lost connection the
//! listener reconnects by itself and every watcher re-reads what it has not seen yet
//! (resynchronisation), so no committed step is missed and none is delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Integer, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::{
    HistoryScan, StepKey, StoreError, TaskEvent, TaskEventStream, TaskHistoryStore, TaskQuery,
    TaskStatus,
};
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::connection::Connector;
use crate::error::from_diesel;
use crate::sql::{self, Statement};
use crate::store::PgTaskHistoryStore;

/// What the listener tells watchers.
#[derive(Debug, Clone)]
pub(crate) enum Wake {
    /// These steps were written, in this commit, with everything their events carry.
    Steps(Arc<Vec<TaskEvent>>),
    /// A marker a watcher sent itself: everything before it is older than the watch.
    Fence(Arc<str>),
    /// Unknown changes: re-read whatever has not been delivered.
    All,
}

fn parse(payload: &str) -> Wake {
    if let Some(id) = payload.strip_prefix("fence:") {
        return Wake::Fence(Arc::from(id));
    }
    type Row = (String, String, i32, TaskStatus, DateTime<Utc>);
    match serde_json::from_str::<Vec<Row>>(payload) {
        Ok(rows) => Wake::Steps(Arc::new(
            rows.into_iter()
                .map(|(user, task, step, status, at)| {
                    TaskEvent::of_step(&user, &task, step, status, at)
                })
                .collect(),
        )),
        Err(_) => Wake::All,
    }
}

/// Watchers of one user share a channel: an event wakes only the watchers of its user.
type Routes = Arc<std::sync::Mutex<HashMap<String, broadcast::Sender<Wake>>>>;

/// The store's listener and its fan-out.
pub(crate) struct Hub {
    routes: Routes,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Hub")
            .field("watched_users", &routes.len())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            routes: Routes::default(),
            listener: Mutex::new(None),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.listener.try_lock() {
            if let Some(task) = guard.take() {
                task.abort();
            }
        }
    }
}

impl Hub {
    /// Starts the listener if it is not running; its first connection's error is returned.
    async fn ensure_listening(
        &self,
        connector: &Connector,
        channel: &str,
    ) -> Result<(), StoreError> {
        let mut guard = self.listener.lock().await;
        if guard.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let (client, rx) = connector.listen(channel).await?;
        let task = tokio::spawn(listen_loop(
            connector.clone(),
            channel.to_owned(),
            self.routes.clone(),
            client,
            rx,
        ));
        *guard = Some(task);
        Ok(())
    }

    /// A receiver of the wakes that concern `user`.
    fn subscribe(&self, user: &str) -> broadcast::Receiver<Wake> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|_, tx| tx.receiver_count() > 0);
        routes
            .entry(user.to_owned())
            .or_insert_with(|| broadcast::channel(4096).0)
            .subscribe()
    }

    /// Stops the listener (the store is closing).
    pub(crate) async fn stop(&self) {
        if let Some(task) = self.listener.lock().await.take() {
            task.abort();
        }
    }
}

/// Hands a wake to the watchers it concerns: step events to their user's watchers only.
fn route(routes: &Routes, wake: Wake) {
    let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
    match wake {
        Wake::Steps(events) => {
            let mut by_user: HashMap<&str, Vec<TaskEvent>> = HashMap::new();
            for e in events.iter() {
                if routes.contains_key(&e.user_id) {
                    by_user.entry(&e.user_id).or_default().push(e.clone());
                }
            }
            for (user, events) in by_user {
                if let Some(tx) = routes.get(user) {
                    let _ = tx.send(Wake::Steps(Arc::new(events)));
                }
            }
        }
        other => {
            for tx in routes.values() {
                let _ = tx.send(other.clone());
            }
        }
    }
}

async fn listen_loop(
    connector: Connector,
    channel: String,
    routes: Routes,
    mut client: tokio_postgres::Client,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    loop {
        while let Some(payload) = rx.recv().await {
            route(&routes, parse(&payload));
        }
        drop(client);
        let mut backoff = Duration::from_millis(50);
        (client, rx) = loop {
            tokio::time::sleep(backoff).await;
            match connector.listen(&channel).await {
                Ok(connected) => break connected,
                Err(e) => {
                    tracing::warn!(error = %e, "taskhistory: reconnecting the watchers' listener");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        tracing::info!("taskhistory: the watchers' listener is back; watchers catch up");
        route(&routes, Wake::All);
    }
}

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

/// One watcher: what it has delivered, and what it has read but not yet handed out.
struct Watcher {
    store: PgTaskHistoryStore,
    user: String,
    task: Option<String>,
    /// The highest step delivered (or existing when the watch began), per task.
    last: HashMap<String, i32>,
    rx: broadcast::Receiver<Wake>,
    pending: VecDeque<TaskEvent>,
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
        self.run(
            "watch",
            Some(user),
            task,
            &(channel.clone(), id.clone()),
            send_fence,
        )
        .await?;
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(Wake::Fence(f)) if *f == *id => return Ok(()),
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
            rx,
            pending: VecDeque::new(),
        };
        watcher.snapshot().await?;
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next)))
    }
}

impl Watcher {
    /// Records the highest existing step of each watched task: those are not delivered.
    async fn snapshot(&mut self) -> Result<(), StoreError> {
        for (task, step) in self.current().await? {
            self.last.insert(task, step);
        }
        Ok(())
    }

    /// The watched tasks and their highest step now.
    async fn current(&self) -> Result<Vec<(String, i32)>, StoreError> {
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
                    out.extend(page.tasks.iter().map(|t| (t.task_id.clone(), t.last_step)));
                    match page.next {
                        Some(next) => query = query.after(Some(next)),
                        None => return Ok(out),
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
            let wake = match self.rx.recv().await {
                Ok(w) => w,
                Err(broadcast::error::RecvError::Lagged(_)) => Wake::All,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            let read = match wake {
                Wake::Steps(events) => {
                    self.take_steps(&events);
                    Ok(())
                }
                Wake::All => self.resync().await,
                Wake::Fence(_) => Ok(()),
            };
            if let Err(e) = read {
                return Some((Err(e), self));
            }
        }
    }

    /// Queues the events of one commit that concern this watcher: no read needed.
    fn take_steps(&mut self, events: &[TaskEvent]) {
        for e in events {
            if self.watches(&e.user_id, &e.task_id) {
                let last = self.last.entry(e.task_id.clone()).or_insert(-1);
                *last = (*last).max(e.step);
                self.pending.push_back(e.clone());
            }
        }
    }

    /// Reads every step not delivered yet (after a reconnect, a lag or an oversized
    /// notification). Steps saved again at or below the last delivered one are not re-read.
    async fn resync(&mut self) -> Result<(), StoreError> {
        // Wakes queued before this point are covered by what is read now.
        while self.rx.try_recv().is_ok() {}
        if let Some(task) = self.task.clone() {
            // One task: read on from the last step delivered (an index range scan).
            let last = self.last.get(&task).copied().unwrap_or(-1);
            return self.read_task(&task, last).await;
        }
        for (task, step) in self.current().await? {
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
            }
            match page.next {
                Some(next) => scan = scan.after(Some(next)),
                None => return Ok(()),
            }
        }
    }
}
