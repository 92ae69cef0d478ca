//! The store's notifier: after their commit, saves and cancellations wake the watchers of
//! their users (in every process), in batches, from the notifier's own short transaction on
//! its own connection (off the pool, through [`Executor::kept`]), never from a writer's
//! transaction.
//!
//! Why: PostgreSQL holds one database-wide lock from the moment a transaction that notified
//! starts to commit until its commit record is flushed, so transactions that notify commit
//! one at a time and lose group commit. Writers here never notify: after its commit a write
//! hands its users to the notifier, which gathers them for a few milliseconds and sends
//! them in one statement with `synchronous_commit = off` (a wake-up is not data; its
//! transaction holds the lock only for a moment). A wake-up names users, never an event:
//! watchers read the events from the log (`watch.rs`). If the process dies between a commit
//! and the next send, or a send fails, watchers read the events at their next poll.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::StoreError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::from_diesel;
use crate::exec::{Call, Executor, Kept, Tx};
use crate::sql::{self, Statement};

/// How long the notifier gathers events before sending them.
const GATHER: Duration = Duration::from_millis(10);
/// PostgreSQL refuses payloads of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;
const OP: &str = "notify";

/// The running notifier: where the users of committed writes go, and its task.
type Running = (mpsc::UnboundedSender<Vec<String>>, JoinHandle<()>);

/// The notifier of one store; started on first use, stopped by [`Notifier::stop`].
pub(crate) struct Notifier {
    exec: Arc<Executor>,
    channel: String,
    sender: Mutex<Option<Running>>,
}

impl Notifier {
    pub(crate) fn new(exec: Arc<Executor>, channel: String) -> Self {
        Notifier {
            exec,
            channel,
            sender: Mutex::new(None),
        }
    }

    /// Hands the users of a committed write over; their watchers are woken within a few
    /// milliseconds.
    pub(crate) fn post<'u>(&self, users: impl IntoIterator<Item = &'u str>) {
        let mut users: Vec<String> = users.into_iter().map(str::to_owned).collect();
        users.dedup();
        if users.is_empty() {
            return;
        }
        let mut sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        // (Re)start when not running: first use, or the runtime that ran it has ended.
        if sender
            .as_ref()
            .is_none_or(|(tx, task)| tx.is_closed() || task.is_finished())
        {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(run(rx, Arc::clone(&self.exec), self.channel.clone()));
            *sender = Some((tx, task));
        }
        if let Some((tx, _)) = sender.as_ref() {
            let _ = tx.send(users);
        }
    }

    /// Sends what is pending (waiting at most a second) and stops.
    pub(crate) async fn stop(&self) {
        let taken = self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, task)) = taken {
            drop(tx);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Ok(mut sender) = self.sender.lock() {
            if let Some((_, task)) = sender.take() {
                task.abort();
            }
        }
    }
}

/// The users as JSON arrays of strings, packed into payloads under PostgreSQL's limit.
pub(crate) fn payloads<'u>(users: impl IntoIterator<Item = &'u String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::from("[");
    for user in users {
        let Ok(item) = serde_json::to_string(user) else {
            continue;
        };
        if current.len() > 1 && current.len() + item.len() + 2 > MAX_PAYLOAD {
            current.push(']');
            out.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&item);
    }
    if current.len() > 1 {
        current.push(']');
        out.push(current);
    }
    out
}

#[derive(QueryableByName)]
struct Sent {
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    sent: i64,
}

/// One send: the wake-ups' payloads, on the channel.
struct Send<'a> {
    channel: &'a str,
    payloads: Vec<String>,
}

/// Sends the payloads (in a transaction that does not wait for the disk at commit, see
/// [`Notifier::post`]'s caller in `run`).
fn send<'c>(
    conn: &'c mut AsyncPgConnection,
    send: &'c Send<'_>,
) -> BoxFuture<'c, Result<(), StoreError>> {
    Box::pin(async move {
        Statement::new(sql::NOTIFY_USERS)
            .bind::<Text, _>(send.channel.to_owned())
            .bind::<Array<Text>, _>(send.payloads.clone())
            .fetch::<Sent, _>(conn)
            .await
            .map(drop)
            .map_err(|e| from_diesel(OP, e))
    })
}

async fn run(mut rx: mpsc::UnboundedReceiver<Vec<String>>, exec: Arc<Executor>, channel: String) {
    // The notifier's own connection, off the pool: wake-ups never wait behind writers. It
    // does not wait for the disk at commit (a wake-up is not data: its transaction holds
    // the notify lock only for a moment): set once for the session on a direct connection
    // (one round trip a send), per transaction behind a pooler.
    let conn = Kept::new(sql::NOTIFY_SESSION);
    let tx = if exec.connector().transaction_setup().is_some() {
        Tx::With(sql::NOTIFY_LOCAL)
    } else {
        Tx::Statement
    };
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut batch: std::collections::BTreeSet<String> = first.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        let wake = Send {
            channel: &channel,
            payloads: payloads(&batch),
        };
        // Retried on transient errors like every statement: a wake-up sent twice costs a
        // watcher one read that finds nothing new.
        if let Err(error) = exec.kept(Call::new(OP), &conn, tx, &wake, send).await {
            tracing::warn!(%error, users = batch.len(), "taskhistory: watchers may not have been woken; they read the new events at their next poll");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_keep_every_user() {
        let users: Vec<String> = (0..500)
            .map(|i| format!("{}-{i}", "u".repeat(100)))
            .collect();
        let out = payloads(&users);
        assert!(out.len() > 1);
        let mut back = Vec::new();
        for p in &out {
            assert!(p.len() < MAX_PAYLOAD, "{}", p.len());
            back.extend(serde_json::from_str::<Vec<String>>(p).unwrap());
        }
        assert_eq!(back, users);
        assert!(payloads(&Vec::new()).is_empty());
    }
}
