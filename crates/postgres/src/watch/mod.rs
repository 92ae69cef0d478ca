//! Watching: reading the log of events after a cursor, once per store for all watchers.
//!
//! Every write stamps its step rows with its transaction's id (`xid`, migration 4), and per
//! task those ids follow commit order (the save and cancel statements enforce it). A
//! position ([`position`]) is a snapshot of the database, `from`, whose writes are
//! delivered. A read ([`log`], [`EVENTS_AFTER`](crate::sql::EVENTS_AFTER)) takes the rows
//! written by transactions that `from` did not see and the read's own snapshot, `to`, does,
//! in `(xid, id)` order; once it has them all, `to` becomes the new `from` (held below a
//! horizon: "After a crash" below). A transaction
//! in flight at a read is invisible to it and not visible in `to`, so its rows come with a
//! later read, however long it runs: nothing is missed, nothing comes twice, and no clock
//! decides anything. A large read goes in pages; the position then also holds `to` and
//! the last row delivered.
//!
//! One reader, the [`tail`], reads for every watched user of the store and hands the events
//! out in memory. A watcher reads by itself only to catch up: from an older cursor, or
//! after it fell behind (its inbox of [`tail::INBOX`] events filled). It then joins the
//! tail at a position `J` of the tail's whose read saw all its own position `B` sees (that
//! read's snapshot covers `B`; `J` itself may stop short of transactions with no write of
//! the user's), reads the rows between `B` and `J` by itself (`to` fixed at `J`), then takes
//! the tail's events after `J`. Delivered: the rows `J` sees and `B` does not, then those of
//! the tail's reads after `J`, which `J` does not see: each row once, none missed, as the
//! tail's reads follow each other from `J` on. A task's rows come in commit order: those
//! `J` sees committed before those it does not.
//!
//! The tail reads when woken (a notification naming a watched user, a write of this store,
//! the listener reconnecting) and otherwise every [`PgConfig::watch_poll`]: the wake-ups
//! only make delivery prompt.
//!
//! # After a crash
//!
//! PostgreSQL flushes the end of a transaction that wrote nothing durable (a `NOTIFY`'s,
//! such as the notifier's; a rollback; a transaction that only took an id) lazily, and
//! after a crash gives out again the ids whose end it had not flushed. A snapshot taken
//! after such an end sees that id as finished; were a position that snapshot, the write
//! that gets the id after the crash would count as delivered and never come. So a whole
//! position is its read's snapshot *below* a horizon ([`position::Snapshot::below`]): just
//! past the newest write it delivered (or where it stood before), and for a first position
//! just past the newest write of the user that its snapshot sees
//! ([`NEWEST_SEEN`](crate::sql::NEWEST_SEEN)). That write committed durably (a save's
//! commit is flushed before it is visible), so no id below the horizon is given again;
//! the read saw no write of the user's above it, so the position delivers the same events.
//!
//! Two more places hold a snapshot taken before a crash. A position mid-page keeps its
//! read's whole snapshot as `to` (in the cursors of its events too): a read whose own
//! snapshot does not cover it (the server ran again since) keeps `to` only below just past
//! the last row delivered or `from`'s horizon, and takes the rest as unseen
//! (`log::Found::settle`; a cursor from before a crash resumes instead of being refused; the
//! tail reads the rest at once, and joiners wait for that read). And joining compares the tail's
//! read's whole snapshot, kept beside its position: if the tail last read before a crash
//! and the watcher after it, the watcher may have delivered a write that took an id both
//! saw end; it then skips the events of transactions its own position saw, the tail's and
//! its own reads' after a fall-back (`Watcher::join`).
//!
//! The horizon rests on the newest delivered write being durable. Where saves commit with
//! `synchronous_commit = off` (a server's or role's setting), or the server comes back from
//! an asynchronous standby promoted or a point-in-time restore, the last writes can be
//! lost, and with them this guarantee for the ids that follow. A cursor made before this
//! horizon existed carries its read's whole snapshot until the user's writes pass it.
//!
//! [`PgConfig::watch_poll`]: crate::PgConfig::watch_poll

mod log;
mod position;
mod tail;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use taskhistory_core::{EventCursor, StoreError, TaskEvent, TaskEventStream};

use crate::exec::Call;
use log::Want;
use position::Position;
pub(crate) use tail::Tail;
use tail::{Admitted, End, Inbox, Shared};

const OP: &str = "watch";
/// Events a watcher reads by itself per statement.
const PAGE: i64 = 1000;
/// The longest pause between attempts while the server cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Watching's counters, for [`crate::StoreMetrics`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WatchMetrics {
    pub(crate) watchers: u64,
    pub(crate) tail_reads: u64,
    pub(crate) own_reads: u64,
    pub(crate) fallbacks: u64,
    pub(crate) lag_ms: u64,
    pub(crate) lag_events: u64,
}

impl Tail {
    /// Watching's counters so far.
    pub(crate) fn metrics(&self) -> WatchMetrics {
        let c = &self.shared.counters;
        WatchMetrics {
            watchers: c.watchers.load(Ordering::Relaxed) as u64,
            tail_reads: c.tail_reads.load(Ordering::Relaxed),
            own_reads: c.own_reads.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            lag_ms: c.lag_ms.load(Ordering::Relaxed),
            lag_events: c.lag_events.load(Ordering::Relaxed),
        }
    }
}

/// One watch: where it stands, and whether it takes the tail's events.
struct Watcher {
    shared: Arc<Shared>,
    user: String,
    task: Option<String>,
    /// Delivered: every write this position covers. While attached and caught up, the
    /// position of the last event taken from the inbox is `last` instead (parsed only if
    /// the watcher falls behind).
    position: Position,
    last: Option<EventCursor>,
    /// Attached to the tail: its events after `position`'s `to` (or `from`, when whole).
    inbox: Option<Arc<Inbox>>,
    /// Its own last read found the end of what it could see.
    caught_up: bool,
    pending: VecDeque<TaskEvent>,
    /// The pause before the next attempt while the server cannot be reached.
    backoff: Option<Duration>,
    /// Joined at a position that does not cover its own: the events of transactions this
    /// snapshot saw are skipped until one comes from above it (see [`Watcher::join`]), from
    /// the tail and from its own reads after a fall-back alike.
    skip: Option<position::Snapshot>,
    ended: bool,
    _place: Admitted,
}

/// Starts a watch of `user`'s tasks (only `task` when given) after `after`, or now.
pub(crate) async fn start(
    tail: &Tail,
    operation: &'static str,
    user: &str,
    task: Option<&str>,
    after: Option<EventCursor>,
) -> Result<TaskEventStream, StoreError> {
    let resume = after.as_ref().map(Position::of).transpose()?;
    let shared = Arc::clone(&tail.shared);
    shared.backend.exec().ensure_open()?;
    let place = tail.admit(operation)?;
    // The listener runs before any watch starts: a wake-up of any later write reaches
    // the tail.
    shared.backend.wakes().await?;
    // A close that came meanwhile stopped the listener: nothing starts.
    shared.backend.exec().ensure_open()?;
    tail.ensure_running();
    let (position, inbox) = match resume {
        Some(position) => (position, None),
        None => {
            // Attached after a read that started after this call: every write committed
            // before it is behind the position, every later one comes.
            let inbox = Inbox::new(task);
            let at = shared.join(user, None, &inbox).await?;
            (Position::at(at), Some(inbox))
        }
    };
    let watcher = Watcher {
        shared,
        user: user.to_owned(),
        task: task.map(str::to_owned),
        position,
        last: None,
        inbox,
        caught_up: false,
        pending: VecDeque::new(),
        backoff: None,
        skip: None,
        ended: false,
        _place: place,
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
            let step = match &self.inbox {
                // Attached and caught up to where it joined: the tail's events.
                Some(inbox) if self.position.is_whole() => match inbox.next().await {
                    Ok(event) => {
                        if delivered(&mut self.skip, &event) {
                            continue;
                        }
                        self.last = Some(event.cursor.clone());
                        let event = Arc::unwrap_or_clone(event);
                        return Some((Ok(event), self));
                    }
                    Err(End::Overflowed) => {
                        self.fall_back();
                        continue;
                    }
                    Err(End::Closed) => return None,
                    Err(End::Failed(e)) => Err(e),
                },
                // Whole and at the end of what it could read: join the tail.
                None if self.position.is_whole() && self.caught_up => self.join().await,
                // Reading by itself.
                _ => self.read().await,
            };
            match step {
                Ok(()) => self.backoff = None,
                Err(StoreError::Closed) => return None,
                // The store's business, not the caller's: try again once the server is
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

    /// Detached for falling behind: reads by itself from its last event.
    fn fall_back(&mut self) {
        self.shared
            .counters
            .fallbacks
            .fetch_add(1, Ordering::Relaxed);
        if let Some(last) = self.last.take() {
            match Position::of(&last) {
                Ok(at) => self.position = at,
                // Its own cursors always parse; were one not to, the watcher would stay
                // at its older position and deliver again, never lose.
                Err(e) => {
                    tracing::error!(error = %e, "taskhistory: a watcher's own cursor did not parse")
                }
            }
        }
        self.inbox = None;
        self.caught_up = false;
    }

    /// Joins the tail at a position whose read saw all its own position saw; reads up to
    /// it next. The tail's position can stop below its own: short of transactions with no
    /// write of the user's, by design (`position::Snapshot::below`); or, after a crash
    /// that gave out again an id both saw end, short of a write this watcher delivered and
    /// the tail has not yet read (its last read was before the crash). The tail's events
    /// of transactions its own position saw are then skipped: in the first case there
    /// are none.
    async fn join(&mut self) -> Result<(), StoreError> {
        let inbox = Inbox::new(self.task.as_deref());
        let at = self
            .shared
            .join(&self.user, Some(&self.position.from), &inbox)
            .await?;
        // (A skip still running from an earlier join stays unless this position is past it.)
        let own = &self.position.from;
        if !at.covers(own) && self.skip.as_ref().is_none_or(|old| own.covers(old)) {
            self.skip = Some(own.clone());
        }
        if at != self.position.from {
            self.position = Position::between(self.position.from.clone(), at);
        }
        self.inbox = Some(inbox);
        Ok(())
    }

    /// Reads the next page of its own events into `pending`.
    async fn read(&mut self) -> Result<(), StoreError> {
        let call = Call {
            task_id: self.task.as_deref(),
            ..Call::user(OP, &self.user)
        };
        let want = Want {
            user: &self.user,
            task: self.task.as_deref(),
            position: &self.position,
        };
        if self.shared.is_closed() {
            return Err(StoreError::Closed);
        }
        let mut found = log::read(&self.shared.backend, call, &[want], PAGE).await?;
        self.shared
            .counters
            .own_reads
            .fetch_add(1, Ordering::Relaxed);
        if let Some(settled) = found.settle(0, &self.position) {
            // Cut below the position it was reading up to: whatever the tail hands out is
            // after that, so it joins again from where it stands.
            self.position = settled;
            self.inbox = None;
        }
        // A position this server has not reached (a cursor of another server, one restored
        // from before a failover, or a forged one) would never be joined: refused. (A
        // mid-page cursor of another server whose `from` this one has reached is read as one
        // from before a crash, above.)
        let at = &self.position;
        if !found.snapshot.covers(&at.from)
            || at.to.as_ref().is_some_and(|to| !found.snapshot.covers(to))
        {
            return Err(StoreError::invalid(
                "cursor",
                "names a position this database has not reached (a cursor of another server?)",
            ));
        }
        for k in 0..found.rows[0].len() {
            let at = found.position_of(0, k, &self.position);
            let event = found.rows[0][k].event(&self.user, &at)?;
            if !delivered(&mut self.skip, &event) {
                self.pending.push_back(event);
            }
        }
        self.caught_up = (found.rows[0].len() as i64) < PAGE;
        self.position = found.next_position(0, &self.position, PAGE);
        Ok(())
    }
}

/// Whether `event` is of a transaction that `skip`, a watcher's position before it joined,
/// saw (see `Watcher::join`): skipped, as delivered already. `skip` ends at the first
/// event from above it.
fn delivered(skip: &mut Option<position::Snapshot>, event: &TaskEvent) -> bool {
    let Some(seen) = skip else {
        return false;
    };
    let Some((xid, _)) = Position::of(&event.cursor).ok().and_then(|p| p.after) else {
        return false;
    };
    if seen.sees(xid) {
        return true;
    }
    if xid >= seen.xmax() {
        *skip = None;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::position::Snapshot;
    use super::*;
    use taskhistory_core::TaskStatus;

    /// An event of transaction `xid`, with the cursor a read past `from` gives it.
    fn event_of(xid: u64) -> TaskEvent {
        let from = Snapshot::parse("90:90:").unwrap();
        let to = Snapshot::parse("90:200:").unwrap();
        let at = Position {
            from,
            to: Some(to),
            after: Some((xid, 1)),
        };
        TaskEvent::of_step(
            "u",
            "t",
            0,
            TaskStatus::Running,
            chrono::Utc::now(),
            at.cursor().unwrap(),
        )
    }

    #[test]
    fn a_skip_drops_what_its_snapshot_saw_until_an_event_from_above_it() {
        let mut skip = Some(Snapshot::parse("100:105:101").unwrap());
        // Seen by the snapshot: dropped; 101 was in flight at it: kept, the skip goes on.
        assert!(delivered(&mut skip, &event_of(99)));
        assert!(!delivered(&mut skip, &event_of(101)));
        assert!(delivered(&mut skip, &event_of(104)));
        assert!(skip.is_some());
        // From above it: kept, and the skip ends.
        assert!(!delivered(&mut skip, &event_of(105)));
        assert!(skip.is_none());
        assert!(!delivered(&mut skip, &event_of(99)));
    }
}
