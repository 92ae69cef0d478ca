//! The store's notifier: the events of committed saves and cancellations leave for the
//! watchers (of every process) in batches, from the notifier's own short transaction on its
//! own connection, never from a writer's transaction.
//!
//! Why: PostgreSQL holds one database-wide lock from the moment a transaction that notified
//! starts to commit until its commit record is flushed, so transactions that notify commit
//! one at a time and lose group commit. Writers here never notify: after its commit a save
//! hands its events to the notifier, which gathers them for a couple of milliseconds and
//! sends them in one statement with `synchronous_commit = off` (a notification is not data;
//! its transaction holds the lock only for a moment). Within a batch events are sent in `seq` order, which
//! per task is commit order. If the process dies between a commit and the next send, or a
//! send's outcome is unknown, those events are not sent: watchers re-read history
//! periodically and catch up (`watch.rs`).

use std::sync::Mutex;
use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use taskhistory_core::{StoreError, TaskEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::connection::Connector;
use crate::error::from_diesel;
use crate::session::Transaction;
use crate::sql::{self, Statement};

/// How long the notifier gathers events before sending them.
const GATHER: Duration = Duration::from_millis(10);
/// PostgreSQL refuses payloads of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;
const OP: &str = "notify";

/// An event with its ordering key (see [`sql::SAVE_STEPS`]).
pub(crate) type Sequenced = (i64, TaskEvent);

/// The running notifier: where events go, and its task.
type Running = (mpsc::UnboundedSender<Vec<Sequenced>>, JoinHandle<()>);

/// The notifier of one store; started on first use, stopped by [`Notifier::stop`].
pub(crate) struct Notifier {
    connector: Connector,
    channel: String,
    sender: Mutex<Option<Running>>,
}

impl Notifier {
    pub(crate) fn new(connector: Connector, channel: String) -> Self {
        Notifier {
            connector,
            channel,
            sender: Mutex::new(None),
        }
    }

    /// Hands committed events over; they are sent within a few milliseconds.
    pub(crate) fn post(&self, events: Vec<Sequenced>) {
        if events.is_empty() {
            return;
        }
        let mut sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        // (Re)start when not running: first use, or the runtime that ran it has ended.
        if sender
            .as_ref()
            .is_none_or(|(tx, task)| tx.is_closed() || task.is_finished())
        {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(run(rx, self.connector.clone(), self.channel.clone()));
            *sender = Some((tx, task));
        }
        if let Some((tx, _)) = sender.as_ref() {
            let _ = tx.send(events);
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

/// The events as JSON arrays `[user, task, step, status, time]`, packed into payloads under
/// PostgreSQL's limit, in the order given.
fn payloads(events: &[Sequenced]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::from("[");
    for (_, e) in events {
        let Ok(item) =
            serde_json::to_string(&(&e.user_id, &e.task_id, e.step, e.status, e.timestamp))
        else {
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

/// Why a send failed: refused by the server (nothing was sent: try again), or the outcome
/// is unknown (the connection went: sending again could deliver twice).
enum Failure {
    Refused(StoreError),
    Unknown(StoreError),
}

fn failure(e: diesel::result::Error) -> Failure {
    // `Unavailable`: the connection went or the server is going away; the outcome is unknown.
    match from_diesel(OP, e) {
        error @ StoreError::Unavailable { .. } => Failure::Unknown(error),
        error => Failure::Refused(error),
    }
}

/// Opens the notifier's connection. On a direct connection its session does not wait for
/// the disk at commit, and each send is one statement in its own transaction (one round
/// trip); behind a transaction pooler the setting is made per transaction instead.
async fn open(connector: &Connector) -> Result<AsyncPgConnection, Failure> {
    let mut conn = connector.connect().await.map_err(Failure::Refused)?;
    if connector.transaction_setup().is_none() {
        conn.batch_execute(sql::NOTIFY_SESSION)
            .await
            .map_err(failure)?;
    }
    Ok(conn)
}

async fn send(
    conn: &mut Option<AsyncPgConnection>,
    connector: &Connector,
    channel: &str,
    payloads: &[String],
) -> Result<(), Failure> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(open(connector).await?),
    };
    let statement = Statement::new(sql::NOTIFY_EVENTS)
        .bind::<Text, _>(channel.to_owned())
        .bind::<Array<Text>, _>(payloads.to_vec());
    if connector.transaction_setup().is_none() {
        // One statement, its own transaction (the session does not wait for the disk).
        return statement
            .fetch::<Sent, _>(c)
            .await
            .map(drop)
            .map_err(failure);
    }
    let tx = Transaction::begin(c, connector, OP, sql::NOTIFY_LOCAL)
        .await
        .map_err(Failure::Refused)?;
    let mut tx = tx;
    let sent = statement.fetch::<Sent, _>(&mut *tx).await;
    match sent {
        Ok(_) => tx.commit().await.map_err(Failure::Unknown),
        Err(e) => {
            let _ = tx.rollback().await;
            Err(failure(e))
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Vec<Sequenced>>,
    connector: Connector,
    channel: String,
) {
    let mut conn = None;
    while let Some(mut batch) = rx.recv().await {
        tokio::time::sleep(GATHER).await;
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        // Stable: the events of one statement keep their order.
        batch.sort_by_key(|(seq, _)| *seq);
        let payloads = payloads(&batch);
        for attempt in 1..=3u32 {
            match send(&mut conn, &connector, &channel, &payloads).await {
                Ok(()) => break,
                Err(Failure::Refused(error)) => {
                    conn = None;
                    tracing::warn!(%error, attempt, "taskhistory: sending watchers' events failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                Err(Failure::Unknown(error)) => {
                    conn = None;
                    tracing::warn!(%error, events = batch.len(), "taskhistory: watchers' events may not have been sent; watchers catch up at their next resynchronisation");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use taskhistory_core::TaskStatus;

    #[test]
    fn payloads_stay_under_the_limit_and_keep_every_event_in_order() {
        let events: Vec<Sequenced> = (0..200)
            .map(|i| {
                let e = TaskEvent::of_step(
                    "u".repeat(100).as_str(),
                    &format!("t{i}"),
                    i,
                    TaskStatus::Running,
                    Utc::now(),
                );
                (i64::from(i), e)
            })
            .collect();
        let out = payloads(&events);
        assert!(out.len() > 1);
        let mut steps = Vec::new();
        for p in &out {
            assert!(p.len() < MAX_PAYLOAD, "{}", p.len());
            let rows: Vec<(String, String, i32, TaskStatus, chrono::DateTime<Utc>)> =
                serde_json::from_str(p).unwrap();
            steps.extend(rows.into_iter().map(|r| r.2));
        }
        assert_eq!(steps, (0..200).collect::<Vec<_>>());
        assert!(payloads(&[]).is_empty());
    }
}
