//! Watching: reading the log of events after a cursor.
//!
//! Every write stamps its step rows with its transaction's id (`xid`, migration 4), and per
//! task those ids follow commit order (the save and cancel statements enforce it). A
//! watcher holds a position: a snapshot of the database, `from`, whose writes it has
//! delivered. A read ([`EVENTS_AFTER`](crate::sql::EVENTS_AFTER)) takes the rows written by
//! transactions that `from` did not see and the read's own snapshot, `to`, does, in
//! `(xid, id)` order; once it has them all, `to` becomes the new `from`. A transaction
//! in flight at a read is invisible to it and not visible in `to`, so its rows come with a
//! later read, however long it runs: nothing is missed, nothing comes twice, and no clock
//! decides anything. A large catch-up is read in pages; the position then also holds `to`
//! and the last row delivered.
//!
//! Reads happen when the watcher is woken (a notification naming its user, a write of this
//! store, the listener reconnecting) and otherwise every [`PgConfig::watch_poll`]: the
//! wake-ups only make delivery prompt.
//!
//! [`PgConfig::watch_poll`]: crate::PgConfig::watch_poll

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnectionCore, AsyncPgConnection};
use futures::future::BoxFuture;
use taskhistory_core::{EventCursor, StoreError, TaskEvent, TaskEventStream, TaskStatus};
use tokio::sync::watch;

use crate::backend::Backend;
use crate::error::from_diesel;
use crate::exec::Call;
use crate::ops::rows::Status;
use crate::sql::{self, Statement};

const OP: &str = "watch";
/// Events read per statement.
const PAGE: i64 = 1000;
/// The longest pause between attempts while the server cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The shortest time between two reads of a woken watcher: a watcher woken after a quiet
/// spell reads at once; under a stream of writes it reads at most every 50 ms, each read
/// taking all the writes since the last (delivery waits at most that long; what is
/// delivered does not depend on it). Reads cost the writers' server: this keeps them to
/// 20 a second per busy watcher.
const MIN_READ_GAP: Duration = Duration::from_millis(50);

/// Where a watcher stands: every write `from` saw is delivered; when a read is in progress
/// in pages, so are the rows of `to` up to `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    from: Snapshot,
    to: Option<Snapshot>,
    after: Option<(u64, i64)>,
}

/// A snapshot in PostgreSQL's text form, `xmin:xmax:xip,...` (checked: it is bound into
/// statements).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot(String);

impl Snapshot {
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (xmin, xmax, xip) = (parts.next()?, parts.next()?, parts.next()?);
        let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let ok = parts.next().is_none()
            && number(xmin)
            && number(xmax)
            && (xip.is_empty() || xip.split(',').all(number));
        ok.then(|| Snapshot(text.to_owned()))
    }

    /// The oldest transaction it did not see.
    fn xmin(&self) -> u64 {
        self.0
            .split(':')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    }
}

/// Cursor tokens: `pg~FROM~TO~XID~ID`, `-` for what is absent.
const PREFIX: &str = "pg";
const SEP: char = '~';

impl Position {
    fn now(snapshot: Snapshot) -> Self {
        Position {
            from: snapshot,
            to: None,
            after: None,
        }
    }

    fn cursor(&self) -> Result<EventCursor, StoreError> {
        let to = self.to.as_ref().map_or("-", |s| s.0.as_str());
        let (xid, id) = match self.after {
            Some((xid, id)) => (xid.to_string(), id.to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let token = format!("{PREFIX}{SEP}{}{SEP}{to}{SEP}{xid}{SEP}{id}", self.from.0);
        EventCursor::parse(&token)
    }

    fn of(cursor: &EventCursor) -> Result<Self, StoreError> {
        let foreign = || StoreError::invalid("cursor", "not a cursor of this store");
        let mut parts = cursor.as_str().split(SEP);
        if parts.next() != Some(PREFIX) {
            return Err(foreign());
        }
        let mut field = || parts.next().ok_or_else(foreign);
        let from = Snapshot::parse(field()?).ok_or_else(foreign)?;
        let to = match field()? {
            "-" => None,
            s => Some(Snapshot::parse(s).ok_or_else(foreign)?),
        };
        let after = match (field()?, field()?) {
            ("-", "-") => None,
            (xid, id) => Some((
                xid.parse().map_err(|_| foreign())?,
                id.parse().map_err(|_| foreign())?,
            )),
        };
        if parts.next().is_some() || (to.is_none() && after.is_some()) {
            return Err(foreign());
        }
        Ok(Position { from, to, after })
    }
}

#[derive(QueryableByName)]
struct SnapshotRow {
    #[diesel(sql_type = Text)]
    snapshot: String,
}

/// The snapshot of now: a watch without a cursor starts there.
fn current<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<String, StoreError>> {
    current_on(conn)
}

fn current_on<'c, C>(conn: &'c mut C) -> BoxFuture<'c, Result<String, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, SnapshotRow>,
{
    Box::pin(async move {
        let rows: Vec<SnapshotRow> = Statement::new(sql::EVENT_POSITION)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))?;
        rows.into_iter()
            .next()
            .map(|r| r.snapshot)
            .ok_or_else(|| StoreError::database(OP, "the position statement returned no row"))
    })
}

/// One read of the log.
struct Read {
    user: String,
    task: Option<String>,
    position: Position,
}

#[derive(QueryableByName)]
struct EventRow {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = Nullable<Text>)]
    task_id: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    step: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<Status>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    timestamp: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    xid: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    id: Option<i64>,
}

fn events_after<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    read: &'c Read,
) -> BoxFuture<'c, Result<Vec<EventRow>, StoreError>> {
    events_after_on(conn, read)
}

fn events_after_on<'c, C>(
    conn: &'c mut C,
    read: &'c Read,
) -> BoxFuture<'c, Result<Vec<EventRow>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, EventRow>,
{
    Box::pin(async move {
        let p = &read.position;
        // From the oldest transaction `from` did not see, or past the last row delivered.
        let floor = (p.from.xmin(), i64::MIN);
        let (xid, id) = p.after.map_or(floor, |after| after.max(floor));
        let rows: Vec<EventRow> = Statement::new(sql::EVENTS_AFTER)
            .bind::<Text, _>(read.user.clone())
            .bind::<Nullable<Text>, _>(read.task.clone())
            .bind::<Text, _>(xid.to_string())
            .bind::<BigInt, _>(id)
            .bind::<Text, _>(p.from.0.clone())
            .bind::<Nullable<Text>, _>(p.to.as_ref().map(|s| s.0.clone()))
            .bind::<BigInt, _>(PAGE)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(OP, e))?;
        tracing::Span::current().record("rows", rows.len());
        Ok(rows)
    })
}

/// One watch: its position, and what it has read but not handed out yet.
struct Watcher {
    backend: Arc<Backend>,
    user: String,
    task: Option<String>,
    position: Position,
    wake: watch::Receiver<u64>,
    poll: Duration,
    pending: VecDeque<TaskEvent>,
    /// The pause before the next attempt while the server cannot be reached.
    backoff: Option<Duration>,
    /// The last read found the end of the log (it started at this instant): the next one
    /// waits for a wake-up or the poll.
    caught_up: Option<tokio::time::Instant>,
    ended: bool,
}

/// Starts a watch of `user`'s tasks (only `task` when given) after `after`, or now.
pub(crate) async fn start(
    backend: &Arc<Backend>,
    user: &str,
    task: Option<&str>,
    after: Option<EventCursor>,
) -> Result<TaskEventStream, StoreError> {
    let resume = after.as_ref().map(Position::of).transpose()?;
    backend.exec().ensure_open()?;
    // Subscribed before the position is read: a wake-up of any later write reaches it.
    let wake = backend.watch_wakes(user).await?;
    let position = match resume {
        Some(position) => position,
        None => {
            let call = Call {
                task_id: task,
                ..Call::user(OP, user)
            };
            let snapshot = backend.exec().read(call, &(), current).await?;
            let snapshot = Snapshot::parse(&snapshot).ok_or_else(|| {
                StoreError::database(OP, format!("unreadable snapshot {snapshot:?}"))
            })?;
            Position::now(snapshot)
        }
    };
    let watcher = Watcher {
        backend: Arc::clone(backend),
        user: user.to_owned(),
        task: task.map(str::to_owned),
        position,
        wake,
        poll: backend.config().get_watch_poll(),
        pending: VecDeque::new(),
        backoff: None,
        caught_up: None,
        ended: false,
    };
    Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next)))
}

impl Watcher {
    async fn next(mut self) -> Option<(Result<TaskEvent, StoreError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            if let Some(started) = self.caught_up.take() {
                tokio::select! {
                    woken = self.wake.changed() => {
                        // The store closed: its hub dropped every watcher's wake-ups.
                        if woken.is_err() {
                            return None;
                        }
                        // Woken soon after a read: the next read waits a little and
                        // gathers the writes of those milliseconds too.
                        tokio::time::sleep_until(started + MIN_READ_GAP).await;
                    }
                    () = tokio::time::sleep(self.poll) => {}
                }
            }
            // Marked seen before the read: a write after it wakes the wait above.
            self.wake.borrow_and_update();
            let started = tokio::time::Instant::now();
            match self.read().await {
                Ok(more) => {
                    self.backoff = None;
                    if !more {
                        self.caught_up = Some(started);
                    }
                }
                Err(StoreError::Closed) => return None,
                // The store's business, not the caller's: read again once the server is
                // back, from the same position.
                Err(e) if e.is_transient() => {
                    let pause = self
                        .backoff
                        .map_or(Duration::from_millis(50), |b| (b * 2).min(MAX_BACKOFF));
                    self.backoff = Some(pause);
                    tracing::warn!(error = %e, user_id = %self.user, "taskhistory: a watcher's read failed; reading again");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    self.ended = true;
                    return Some((Err(e), self));
                }
            }
        }
    }

    /// Reads the next page of events into `pending`; `true` when more are waiting.
    async fn read(&mut self) -> Result<bool, StoreError> {
        let call = Call {
            task_id: self.task.as_deref(),
            ..Call::user(OP, &self.user)
        };
        let read = Read {
            user: self.user.clone(),
            task: self.task.clone(),
            position: self.position.clone(),
        };
        let rows = self.backend.exec().read(call, &read, events_after).await?;
        let bad = |what: &str| StoreError::database(OP, format!("unreadable {what}"));
        let snapshot = match rows.first() {
            Some(row) => Snapshot::parse(&row.snapshot).ok_or_else(|| bad("snapshot"))?,
            None => return Err(bad("event page (no row)")),
        };
        let to = self.position.to.clone().unwrap_or(snapshot);
        let mut count = 0;
        for row in rows {
            let (Some(task_id), Some(step), Some(status), Some(timestamp), Some(xid), Some(id)) = (
                row.task_id,
                row.step,
                row.status,
                row.timestamp,
                row.xid,
                row.id,
            ) else {
                continue;
            };
            let xid: u64 = xid.parse().map_err(|_| bad("transaction id"))?;
            count += 1;
            let at = Position {
                from: self.position.from.clone(),
                to: Some(to.clone()),
                after: Some((xid, id)),
            };
            let status: TaskStatus = status.0;
            self.pending.push_back(TaskEvent::of_step(
                &self.user,
                &task_id,
                step,
                status,
                timestamp,
                at.cursor()?,
            ));
            self.position = at;
        }
        if count == PAGE {
            return Ok(true);
        }
        // Every write `to` saw is delivered: it is the next read's `from`.
        self.position = Position::now(to);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_cursors() {
        let from = Snapshot::parse("100:105:101,103").unwrap();
        let to = Snapshot::parse("104:110:").unwrap();
        for p in [
            Position::now(from.clone()),
            Position {
                from: from.clone(),
                to: Some(to),
                after: Some((104, 9_000_000_000)),
            },
        ] {
            assert_eq!(Position::of(&p.cursor().unwrap()).unwrap(), p);
        }
        assert_eq!(from.xmin(), 100);
    }

    #[test]
    fn foreign_or_damaged_cursors_are_refused() {
        for token in [
            "mem.1.5",
            "pg",
            "pg~1:2:~-~-",
            "pg~1:2:~-~5~6",
            "pg~1:x:~-~-~-",
            "pg~1:2:3;drop~-~-~-",
            "pg~1:2:~3:4:~-~-~extra",
        ] {
            let cursor = EventCursor::parse(token).unwrap();
            assert!(
                matches!(Position::of(&cursor), Err(StoreError::InvalidInput { ref field, .. }) if field == "cursor"),
                "{token}"
            );
        }
    }
}
