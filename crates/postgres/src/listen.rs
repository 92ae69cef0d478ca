//! The store's one `LISTEN` connection (dedicated, never pooled) and the hub that collects
//! wake-ups for the log's tail ([`crate::watch`]). A notification names users whose tasks
//! were written; the hub marks those of them that are watched, and the tail reads their
//! events from the log: a wake-up is never the event itself. After a lost connection the
//! listener reconnects by itself and marks every user (what was written meanwhile is in the
//! log).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use taskhistory_core::StoreError;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::task::JoinHandle;

use crate::connection::Connector;

/// Who a notification wakes: the users it names, or everyone when it cannot be read.
fn parse(payload: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(payload).ok()
}

/// The users woken since the tail last took them.
#[derive(Debug, Default)]
pub(crate) struct Woken {
    /// Watched users written since.
    pub(crate) users: HashSet<String>,
    /// Every user may have been written (a listener came back, a notification could not be
    /// read).
    pub(crate) all: bool,
    /// When the first of these wake-ups came.
    pub(crate) since: Option<tokio::time::Instant>,
}

#[derive(Debug, Default)]
struct Marks {
    /// The users the tail reads for; wake-ups of others are dropped at once.
    watched: HashSet<String>,
    woken: Woken,
}

/// Wake-ups, shared by the hub's callers (the store's writes, the listener) and the tail.
#[derive(Debug, Default)]
struct Wakes {
    marks: std::sync::Mutex<Marks>,
    ready: Notify,
}

impl Wakes {
    fn mark<'u>(&self, users: Option<impl IntoIterator<Item = &'u str>>) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if marks.watched.is_empty() {
            return;
        }
        let Marks { watched, woken } = &mut *marks;
        let before = woken.users.len() + usize::from(woken.all);
        match users {
            Some(users) => {
                for user in users {
                    if watched.contains(user) && !woken.users.contains(user) {
                        woken.users.insert(user.to_owned());
                    }
                }
            }
            None => woken.all = true,
        }
        if woken.users.len() + usize::from(woken.all) > before {
            woken.since.get_or_insert_with(tokio::time::Instant::now);
            drop(marks);
            self.ready.notify_one();
        }
    }
}

/// The store's listener and its wake-ups.
pub(crate) struct Hub {
    wakes: Arc<Wakes>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Stopped for good (the store closed): no listener starts again.
    stopped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let marks = self.wakes.marks.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Hub")
            .field("watched_users", &marks.watched.len())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            wakes: Arc::default(),
            listener: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
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
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if guard.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let (client, rx) = connector.listen(channel).await?;
        let task = tokio::spawn(listen_loop(
            connector.clone(),
            channel.to_owned(),
            Arc::clone(&self.wakes),
            client,
            rx,
        ));
        *guard = Some(task);
        Ok(())
    }

    /// Marks `users` written in this process (a write of this store committed; other
    /// processes hear of it by notification).
    pub(crate) fn wake<'u>(&self, users: impl IntoIterator<Item = &'u str>) {
        self.wakes.mark(Some(users));
    }

    /// Whose wake-ups count from now on: `user` is watched (`true`) or no longer (`false`).
    pub(crate) fn watched(&self, user: &str, watched: bool) {
        let mut marks = self.wakes.marks.lock().unwrap_or_else(|p| p.into_inner());
        if watched {
            marks.watched.insert(user.to_owned());
        } else {
            marks.watched.remove(user);
            marks.woken.users.remove(user);
        }
    }

    /// Takes the wake-ups so far.
    pub(crate) fn take(&self) -> Woken {
        let mut marks = self.wakes.marks.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut marks.woken)
    }

    /// Whether a wake-up is waiting to be taken.
    pub(crate) fn any_woken(&self) -> bool {
        let marks = self.wakes.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.woken.all || !marks.woken.users.is_empty()
    }

    /// Returns once a wake-up came since the last call (at once if one came meanwhile).
    pub(crate) async fn woken(&self) {
        self.wakes.ready.notified().await;
    }

    /// Stops the listener (the store is closing).
    pub(crate) async fn stop(&self) {
        let mut guard = self.listener.lock().await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(task) = guard.take() {
            task.abort();
        }
    }
}

async fn listen_loop(
    connector: Connector,
    channel: String,
    wakes: Arc<Wakes>,
    mut client: tokio_postgres::Client,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    loop {
        while let Some(payload) = rx.recv().await {
            match parse(&payload) {
                Some(users) => wakes.mark(Some(users.iter().map(String::as_str))),
                None => wakes.mark(None::<[&str; 0]>),
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
        wakes.mark(None::<[&str; 0]>);
    }
}
