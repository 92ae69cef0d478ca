//! The log's one tail: a single reader of the event log per store, for every watched user,
//! handing each event to the watchers it concerns, in memory.
//!
//! For each watched user the tail keeps a position (as a watcher does) and the watchers
//! attached to it, each with a bounded inbox. It reads when woken (a write of this store,
//! a notification, the listener's return: the users named, or all), every
//! [`watch_poll`](crate::PgConfig::watch_poll) for all, and at once again for a user whose
//! read filled a page; reads are at least [`MIN_READ_GAP`] apart otherwise, and each reads
//! every user due in one statement (up to [`USERS_PER_READ`] users each; users watched anew
//! take their first positions from one of their own, `log::first_positions`). The database's
//! work follows the writes and the number of watched users, never the number of watchers.
//!
//! A watcher joins a user's entry at a position `J` of the tail's and from then on receives
//! every event the tail reads for that user after `J`; the watcher reads what lies between
//! its own position and `J` by itself (see [`super`] for why this gives each write once).
//! A fresh watch (no cursor) is attached at the end of the first read of its user that
//! started after it asked: `J` then sees every write committed before the call.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use taskhistory_core::{StoreError, TaskEvent};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::log::{self, Want};
use super::position::{Position, Snapshot};
use crate::backend::Backend;
use crate::exec::Call;

/// The shortest time between two reads of the tail: after a quiet spell the tail reads at
/// once; under a stream of writes at most every 20 ms (50 reads a second for the whole
/// store, however many watch), each read taking all the writes since the last (delivery
/// waits at most that long; what is delivered does not depend on it).
pub(super) const MIN_READ_GAP: Duration = Duration::from_millis(20);
/// Events one statement of the tail reads per user; a user with more is read again at once.
const TAIL_PAGE: i64 = 500;
/// Users one statement of the tail reads.
pub(super) const USERS_PER_READ: usize = 1000;
/// Events an attached watcher may have waiting: a watcher further behind is detached and
/// reads by itself from its last event, then joins again.
pub(super) const INBOX: usize = 256;
/// The longest pause between attempts while the server cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const OP: &str = "watch_tail";

/// Why an inbox gets no more events.
#[derive(Debug, Clone)]
pub(super) enum End {
    /// The watcher fell [`INBOX`] events behind: it reads by itself from its last event.
    Overflowed,
    /// The store closed.
    Closed,
    /// The tail could not read the log (an error no retry cures).
    Failed(StoreError),
}

/// What the tail has handed to one watcher and it has not taken yet.
pub(super) struct Inbox {
    /// Only this task's events (a `watch_task`).
    task: Option<String>,
    queue: Mutex<(VecDeque<Arc<TaskEvent>>, Option<End>)>,
    ready: Notify,
}

impl Inbox {
    pub(super) fn new(task: Option<&str>) -> Arc<Self> {
        Arc::new(Inbox {
            task: task.map(str::to_owned),
            queue: Mutex::new((VecDeque::new(), None)),
            ready: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (VecDeque<Arc<TaskEvent>>, Option<End>)> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `event` over; `false` once the inbox has ended (full now, or before).
    fn push(&self, event: &Arc<TaskEvent>) -> bool {
        if self.task.as_ref().is_some_and(|t| *t != event.task_id) {
            return true;
        }
        let mut q = self.lock();
        if q.1.is_some() {
            return false;
        }
        if q.0.len() >= INBOX {
            q.1 = Some(End::Overflowed);
            drop(q);
            self.ready.notify_one();
            return false;
        }
        q.0.push_back(Arc::clone(event));
        drop(q);
        self.ready.notify_one();
        true
    }

    fn end(&self, end: End) {
        self.lock().1.get_or_insert(end);
        self.ready.notify_one();
    }

    /// The next event, or why there are no more (after the events before it).
    pub(super) async fn next(&self) -> Result<Arc<TaskEvent>, End> {
        loop {
            {
                let mut q = self.lock();
                if let Some(event) = q.0.pop_front() {
                    return Ok(event);
                }
                if let Some(end) = &q.1 {
                    return Err(end.clone());
                }
            }
            self.ready.notified().await;
        }
    }

    /// The watcher dropped its stream.
    fn abandoned(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1
    }
}

/// A watcher waiting to be attached.
struct Joiner {
    /// Where the watcher stands (`None`: a fresh watch, attached after a read that started
    /// after it asked).
    base: Option<Snapshot>,
    /// Reads started when it asked.
    asked_at: u64,
    inbox: Arc<Inbox>,
    reply: oneshot::Sender<Result<Snapshot, StoreError>>,
}

/// One watched user.
#[derive(Default)]
struct Entry {
    /// Where the tail stands for this user; `None` before its first read.
    position: Option<Position>,
    /// The snapshot of the read that made `position` whole. It sees no write of the
    /// user's that `position` does not (a position stops short only of transactions
    /// without any: `super`, "After a crash"), so a watcher whose position it covers may
    /// join at `position`. (Unless the server crashed since and gave such an id out again:
    /// the watcher then skips what its own position saw, `Watcher::join`.)
    seen: Option<Snapshot>,
    attached: Vec<Arc<Inbox>>,
    joining: Vec<Joiner>,
    /// Read at the next turn (a joiner waits, or a page was full).
    due: bool,
}

impl Entry {
    fn idle(&self) -> bool {
        self.attached.is_empty() && self.joining.is_empty()
    }

    /// Attaches the joiners that may join at the entry's (whole) position after read
    /// number `read`.
    fn attach(&mut self, read: u64) {
        if self.joining.is_empty() {
            return;
        }
        let Some((at, seen)) = joinable(&self.position, &self.seen) else {
            return;
        };
        let mut waiting = Vec::new();
        for joiner in std::mem::take(&mut self.joining) {
            let later = joiner.asked_at < read;
            let ready = match &joiner.base {
                None => later,
                Some(base) => seen.covers(base),
            };
            if ready {
                if joiner.reply.send(Ok(at.clone())).is_ok() {
                    self.attached.push(joiner.inbox);
                }
            } else if later {
                // A read that started after it asked sees every transaction that had
                // finished then: a base it does not cover is no position of this server.
                let _ = joiner.reply.send(Err(StoreError::invalid(
                    "cursor",
                    "names a position this database has not reached",
                )));
            } else {
                waiting.push(joiner);
            }
        }
        self.joining = waiting;
    }

    /// Stands at `position`, made whole by a read that saw `seen`.
    fn stand(&mut self, position: Position, seen: &Snapshot) {
        if position.is_whole() {
            self.seen = Some(seen.clone());
        }
        self.position = Some(position);
    }

    fn fail(&mut self, error: &StoreError) {
        for inbox in self.attached.drain(..) {
            inbox.end(End::Failed(error.clone()));
        }
        for joiner in self.joining.drain(..) {
            let _ = joiner.reply.send(Err(error.clone()));
        }
    }
}

#[derive(Default)]
struct State {
    users: HashMap<String, Entry>,
    /// Reads started so far.
    reads: u64,
    closed: bool,
}

/// Counters of watching, for [`crate::StoreMetrics`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) watchers: AtomicUsize,
    pub(super) tail_reads: AtomicU64,
    pub(super) own_reads: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) lag_ms: AtomicU64,
    pub(super) lag_events: AtomicU64,
}

pub(super) struct Shared {
    pub(super) backend: Arc<Backend>,
    state: Mutex<State>,
    /// A joiner came.
    kick: Notify,
    pub(super) counters: Counters,
    max_watchers: usize,
}

/// The tail of one store (see the module's doc), started with its first watcher.
pub(crate) struct Tail {
    pub(super) shared: Arc<Shared>,
    runner: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(task) = self.runner.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// A place among the store's open watches, freed when dropped.
pub(super) struct Admitted(Arc<Shared>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.counters.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tail {
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        let max_watchers = backend.config().get_max_watchers() as usize;
        Tail {
            shared: Arc::new(Shared {
                backend,
                state: Mutex::default(),
                kick: Notify::new(),
                counters: Counters::default(),
                max_watchers,
            }),
            runner: Mutex::new(None),
        }
    }

    /// Takes a place for a new watch, or refuses it past `max_watchers`.
    pub(super) fn admit(&self, operation: &'static str) -> Result<Admitted, StoreError> {
        let c = &self.shared.counters;
        let max = self.shared.max_watchers;
        c.watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| StoreError::LimitReached {
                operation,
                limit: "watchers",
                max,
            })?;
        Ok(Admitted(Arc::clone(&self.shared)))
    }

    /// Starts the reader if it is not running (the first watch; again after a panic).
    pub(super) fn ensure_running(&self) {
        let mut runner = self.runner.lock().unwrap_or_else(|p| p.into_inner());
        if runner.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        *runner = Some(tokio::spawn(run(Arc::clone(&self.shared))));
    }

    /// Ends every watch (the store is closing) and stops the reader.
    pub(crate) fn stop(&self) {
        self.shared.close();
        if let Some(task) = self.runner.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the store closed (or was dropped): watchers stop reading.
    pub(super) fn is_closed(&self) -> bool {
        self.state().closed
    }

    fn close(&self) {
        let users = {
            let mut state = self.state();
            state.closed = true;
            std::mem::take(&mut state.users)
        };
        for (user, mut entry) in users {
            self.backend.hub().watched(&user, false);
            for inbox in entry.attached.drain(..) {
                inbox.end(End::Closed);
            }
            for joiner in entry.joining.drain(..) {
                let _ = joiner.reply.send(Err(StoreError::Closed));
            }
        }
    }

    /// Attaches `inbox` to `user`'s entry at a position that sees everything `base` sees
    /// (any position after the call, for `None`), and returns that position's snapshot:
    /// the inbox then receives every event of the user after it.
    pub(super) async fn join(
        &self,
        user: &str,
        base: Option<&Snapshot>,
        inbox: &Arc<Inbox>,
    ) -> Result<Snapshot, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.state();
            if state.closed {
                return Err(StoreError::Closed);
            }
            let asked_at = state.reads;
            let entry = match state.users.get_mut(user) {
                Some(entry) => entry,
                None => {
                    self.backend.hub().watched(user, true);
                    state.users.entry(user.to_owned()).or_default()
                }
            };
            if let (Some((at, seen)), Some(base)) = (joinable(&entry.position, &entry.seen), base) {
                if seen.covers(base) {
                    let at = at.clone();
                    entry.attached.push(Arc::clone(inbox));
                    return Ok(at);
                }
            }
            entry.joining.push(Joiner {
                base: base.cloned(),
                asked_at,
                inbox: Arc::clone(inbox),
                reply,
            });
            entry.due = true;
        }
        self.kick.notify_one();
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Where a watcher may join an entry (its whole position's snapshot), and what the read
/// that made it saw (`Entry::seen`). Borrowed field by field, so the entry's other fields
/// stay free to change.
fn joinable<'e>(
    position: &'e Option<Position>,
    seen: &'e Option<Snapshot>,
) -> Option<(&'e Snapshot, &'e Snapshot)> {
    let at = position.as_ref().filter(|p| p.is_whole())?;
    Some((&at.from, seen.as_ref()?))
}

/// Whom the next read is for, and what it reads for each.
struct Turn {
    /// Its number.
    read: u64,
    /// Users with a position, and that position.
    known: Vec<(String, Position)>,
    /// Users read for the first time: they take the read's snapshot.
    new: Vec<String>,
}

/// The reader: waits for something to read, reads, hands out; until the store closes.
async fn run(shared: Arc<Shared>) {
    let backend = Arc::clone(&shared.backend);
    let hub = backend.hub();
    let poll = backend.config().get_watch_poll();
    let mut last_poll = Instant::now();
    let mut last_read: Option<Instant> = None;
    let mut backoff: Option<Duration> = None;
    loop {
        let due = {
            let state = shared.state();
            if state.closed {
                return;
            }
            state.users.values().any(|e| e.due)
        };
        if !due && !hub.any_woken() && Instant::now() < last_poll + poll {
            // Nothing to read: wait for a joiner, a wake-up or the poll, then look again (a
            // wake-up may also be one whose read is done).
            tokio::select! {
                () = shared.kick.notified() => {}
                () = hub.woken() => {}
                () = tokio::time::sleep_until(last_poll + poll) => {}
            }
            continue;
        }
        // A backlog (a full page) is read again at once, and so is a user a watch waits
        // to join (a watch starts in the time of one read); otherwise reads gather the
        // writes of a few milliseconds.
        let urgent = {
            let state = shared.state();
            state.users.values().any(|e| {
                !e.joining.is_empty() || e.position.as_ref().is_some_and(|p| !p.is_whole())
            })
        };
        if let (Some(last), false) = (last_read, urgent) {
            tokio::time::sleep_until(last + MIN_READ_GAP).await;
        }
        let woken = hub.take();
        let now = Instant::now();
        let polling = now >= last_poll + poll;
        if polling {
            last_poll = now;
        }
        let Some(turn) = collect(&shared, &woken, polling) else {
            return;
        };
        if turn.known.is_empty() && turn.new.is_empty() {
            continue;
        }
        last_read = Some(now);
        match read(&shared, &turn).await {
            Ok(()) => {
                backoff = None;
                if let Some(since) = woken.since {
                    let lag = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
                    shared.counters.lag_ms.store(lag, Ordering::Relaxed);
                }
            }
            Err(StoreError::Closed) => {
                shared.close();
                return;
            }
            Err(e) if e.is_transient() => {
                // Read again from the same positions once the server is back; fresh
                // watches waiting for their start are answered (their call fails, as a
                // read of theirs would).
                let pause = backoff.map_or(Duration::from_millis(50), |b| (b * 2).min(MAX_BACKOFF));
                backoff = Some(pause);
                tracing::warn!(error = %e, "taskhistory: the log's tail could not read; reading again");
                again(&shared, &turn, &e);
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "taskhistory: the log's tail failed; its watches end with the error");
                let mut state = shared.state();
                for user in turn.known.iter().map(|k| &k.0).chain(&turn.new) {
                    if let Some(mut entry) = state.users.remove(user) {
                        backend.hub().watched(user, false);
                        entry.fail(&e);
                    }
                }
            }
        }
    }
}

/// Picks the users to read (dropping those nobody watches any more); `None` once closed.
fn collect(shared: &Shared, woken: &crate::listen::Woken, polling: bool) -> Option<Turn> {
    let mut state = shared.state();
    if state.closed {
        return None;
    }
    state.reads += 1;
    let read = state.reads;
    let mut turn = Turn {
        read,
        known: Vec::new(),
        new: Vec::new(),
    };
    let hub = shared.backend.hub();
    state.users.retain(|user, entry| {
        entry.attached.retain(|inbox| !inbox.abandoned());
        entry.joining.retain(|j| !j.reply.is_closed());
        if entry.idle() {
            hub.watched(user, false);
            return false;
        }
        let wanted = entry.due || polling || woken.all || woken.users.contains(user);
        if wanted {
            entry.due = false;
            match &entry.position {
                Some(at) => turn.known.push((user.clone(), at.clone())),
                None => turn.new.push(user.clone()),
            }
        }
        true
    });
    Some(turn)
}

/// Reads the turn's users, hands the events to their watchers, attaches joiners.
async fn read(shared: &Shared, turn: &Turn) -> Result<(), StoreError> {
    let backend = &shared.backend;
    let mut events = 0u64;
    // New users first (a failure after leaves them placed): each stands where a read's
    // snapshot saw its newest write.
    for users in turn.new.chunks(USERS_PER_READ) {
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let call = Call::users(OP, &users);
        let (snapshot, positions) = log::first_positions(backend, call, &users).await?;
        shared.counters.tail_reads.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state();
        if state.closed {
            return Err(StoreError::Closed);
        }
        for (user, position) in users.iter().zip(positions) {
            if let Some(entry) = state.users.get_mut(*user) {
                entry.stand(position, &snapshot);
                entry.attach(turn.read);
            }
        }
    }
    for chunk in turn.known.chunks(USERS_PER_READ) {
        let wants: Vec<Want<'_>> = chunk
            .iter()
            .map(|(user, position)| Want {
                user,
                task: None,
                position,
            })
            .collect();
        let users: Vec<&str> = wants.iter().map(|w| w.user).collect();
        let mut found = log::read(backend, Call::users(OP, &users), &wants, TAIL_PAGE).await?;
        shared.counters.tail_reads.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state();
        if state.closed {
            return Err(StoreError::Closed);
        }
        for (i, (user, was)) in chunk.iter().enumerate() {
            let Some(entry) = state.users.get_mut(user) else {
                continue;
            };
            // A mid-page snapshot from before a crash, cut (`Found::settle`): the rows
            // dropped are read at once, and joiners wait for that read.
            let settled = found.settle(i, was);
            let was = settled.as_ref().unwrap_or(was);
            let mut unreadable = None;
            for k in 0..found.rows[i].len() {
                match found.rows[i][k].event(user, &found.position_of(i, k, was)) {
                    Ok(event) => {
                        let event = Arc::new(event);
                        entry.attached.retain(|inbox| inbox.push(&event));
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = unreadable {
                // An event this store cannot give a cursor (an extreme snapshot): that
                // user's watches end with the error; the others go on.
                tracing::error!(error = %e, user_id = %user, "taskhistory: an event could not be handed out");
                entry.fail(&e);
                entry.position = None;
                entry.seen = None;
                continue;
            }
            events += found.rows[i].len() as u64;
            let next = found.next_position(i, was, TAIL_PAGE);
            entry.due |= !next.is_whole() || settled.is_some();
            let seen = was.to.as_ref().unwrap_or(&found.snapshot);
            entry.stand(next, seen);
            if settled.is_none() {
                entry.attach(turn.read);
            }
        }
    }
    shared.counters.lag_events.store(events, Ordering::Relaxed);
    Ok(())
}

/// After a failed read: its users are read again; fresh watches waiting on them fail.
fn again(shared: &Shared, turn: &Turn, error: &StoreError) {
    let mut state = shared.state();
    for user in turn.known.iter().map(|k| &k.0).chain(&turn.new) {
        if let Some(entry) = state.users.get_mut(user) {
            entry.due = true;
            let (fresh, rest): (Vec<_>, Vec<_>) =
                entry.joining.drain(..).partition(|j| j.base.is_none());
            entry.joining = rest;
            for joiner in fresh {
                let _ = joiner.reply.send(Err(error.clone()));
            }
        }
    }
}
