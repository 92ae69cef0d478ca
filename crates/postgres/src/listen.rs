//! The store's one `LISTEN` connection (dedicated, never pooled) and the hub that fans its
//! notifications out to the store's watchers ([`crate::watch`]). After a lost connection
//! the listener reconnects by itself and tells every watcher to read what it has not seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskhistory_core::{StoreError, TaskEvent, TaskStatus};
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::connection::Connector;

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
    pub(crate) async fn ensure_listening(
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
    pub(crate) fn subscribe(&self, user: &str) -> broadcast::Receiver<Wake> {
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
