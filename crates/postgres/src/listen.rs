//! The store's one `LISTEN` connection (dedicated, never pooled) and the hub that wakes the
//! store's watchers ([`crate::watch`]). A notification names users whose tasks were
//! written; it wakes their watchers, which read the log of events: a wake-up is never the
//! event itself. After a lost connection the listener reconnects by itself and wakes every
//! watcher (what was written meanwhile is in the log).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use taskhistory_core::StoreError;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;

use crate::connection::Connector;

/// Who a notification wakes: the users it names, or everyone when it cannot be read.
fn parse(payload: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(payload).ok()
}

/// Watchers of one user share a wake-up counter: a notification wakes only the watchers of
/// its users, and wake-ups that come while a watcher reads fold into one.
type Routes = Arc<std::sync::Mutex<HashMap<String, watch::Sender<u64>>>>;

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

    /// The wake-ups of `user`'s watchers.
    pub(crate) fn subscribe(&self, user: &str) -> watch::Receiver<u64> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|_, tx| tx.receiver_count() > 0);
        routes
            .entry(user.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the watchers of `users` in this process (a write of this store committed;
    /// other processes hear of it by notification).
    pub(crate) fn wake<'u>(&self, users: impl IntoIterator<Item = &'u str>) {
        wake(&self.routes, Some(users));
    }

    /// Stops the listener and ends every watch (the store is closing).
    pub(crate) async fn stop(&self) {
        if let Some(task) = self.listener.lock().await.take() {
            task.abort();
        }
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Wakes the watchers of `users`, or of everyone (`None`).
fn wake<'u>(routes: &Routes, users: Option<impl IntoIterator<Item = &'u str>>) {
    let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
    match users {
        Some(users) => users
            .into_iter()
            .filter_map(|u| routes.get(u))
            .for_each(bump),
        None => routes.values().for_each(bump),
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
            match parse(&payload) {
                Some(users) => wake(&routes, Some(users.iter().map(String::as_str))),
                None => wake(&routes, None::<[&str; 0]>),
            }
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
        wake(&routes, None::<[&str; 0]>);
    }
}
