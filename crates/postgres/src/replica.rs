//! Reads from streaming replicas ([`PgConfig::read_urls`]), with read-your-writes
//! (invariant 16 of `docs/architecture.md`).
//!
//! One background task per store (the refresher) runs rounds: each round reads the write
//! counter, then samples the primary's WAL insert position and, at the same time, each
//! replica's replayed position and whether it still replays: `1 + replicas` statements per
//! round, whatever the number of reads. Rounds run every 250 ms (a quarter of the lag
//! allowed when that is under a second), or sooner (at most one per `spacing`, 1 to 10 ms)
//! when a waiting read asks for one.
//!
//! Read-your-writes: a write for user `u` whose commit has returned bumps the counter and
//! records its value `s` for `u` (pending). A sample `(c, L)` (`c` read before the sample
//! was sent) covers every write with `s <= c`: that write's commit returned before the
//! sample was sent, so its commit record ends at or before `L`. The first sample that covers
//! `u`'s pending write gives `u` its position `L`. A read for `u` goes to a replica in the
//! rotation whose replayed position is at least `max(position of u, floor)`; while `u`'s
//! write is pending, or no replica has replayed that far, the read asks for a round and
//! waits at most [`PgConfig::replica_wait`], then reads the primary. `floor` is the largest
//! position of the entries pruned (once every replica in the rotation replayed them, or
//! when no replica is in the rotation) and of writes of no one user (cleanup): a replica that
//! lags or comes back never serves a pruned user older data than that user's writes.
//!
//! A replica leaves the rotation when a round cannot reach it, when it is no longer in
//! recovery (promoted), when it lags by more than [`PgConfig::max_replica_lag`], or when a
//! read on it fails with a connection error or a timeout (the read is then served by the
//! primary: callers never see a replica's failure). A read whose replica connection was
//! opened after the round that vouched for the replica began is not trusted either (the
//! replica may have restarted since, and a replica that restarts after a crash can come
//! back showing an older state than the position it reported): the primary serves it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diesel::sql_types::{Bool, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use taskhistory_core::StoreError;
use tokio::sync::{watch, Notify};

use crate::config::PgConfig;
use crate::connection::Connector;
use crate::error::from_diesel;
use crate::exec::{Call, Executor, Kept, Read, Scope, Tx};
use crate::session::{build_pool, Health, LastError, Pool, PoolSettings};
use crate::sql::{self, Statement};

/// The operation's name of a sample of the primary's position.
pub(crate) const SAMPLE: &str = "wal_insert_position";
/// The operation's name of a check of a replica.
const CHECK: &str = "replica_position";

/// Rounds run at least this often (health, lag), without being asked; more often when the
/// lag allowed is under a second (a quarter of it: lag is measured against the samples).
const HEARTBEAT: Duration = Duration::from_millis(250);

/// A replica's state, from [`PgTaskHistoryStore::replicas`](crate::PgTaskHistoryStore::replicas).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ReplicaState {
    /// `host:port/database` (never the password).
    pub server: String,
    /// Whether reads may go to it now (reachable, replaying, within the lag allowed).
    pub in_rotation: bool,
    /// Reads it served.
    pub reads: u64,
    /// How far it was behind the primary at the latest check, in milliseconds.
    pub lag_ms: u64,
    /// The WAL position it had replayed at the latest check (`None`: never checked).
    pub replayed: Option<String>,
}

/// A WAL position from PostgreSQL's text form (`16/B374D848`): `None` if it is not one.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let part = |p: &str| {
        (!p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(p, 16).ok())
            .flatten()
    };
    Some((u64::from(part(hi)?) << 32) | u64::from(part(lo)?))
}

/// A WAL position in PostgreSQL's text form.
pub(crate) fn show_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[derive(QueryableByName)]
struct LsnRow {
    #[diesel(sql_type = Nullable<Text>)]
    lsn: Option<String>,
}

#[derive(QueryableByName)]
struct CheckRow {
    #[diesel(sql_type = Bool)]
    in_recovery: bool,
    #[diesel(sql_type = Nullable<Text>)]
    replayed: Option<String>,
}

/// The primary's WAL insert position ([`sql::WAL_INSERT_POSITION`]).
pub(crate) fn wal_insert_position<'c>(
    conn: &'c mut AsyncPgConnection,
    _: &'c (),
) -> BoxFuture<'c, Result<u64, StoreError>> {
    Box::pin(async move {
        let rows: Vec<LsnRow> = Statement::new(sql::WAL_INSERT_POSITION)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(SAMPLE, e))?;
        rows.into_iter()
            .next()
            .and_then(|r| r.lsn)
            .as_deref()
            .and_then(parse_lsn)
            .ok_or_else(|| StoreError::database(SAMPLE, "no WAL position read back"))
    })
}

/// One replica: its pool, its connections shared by concurrent reads, and what the latest
/// round found.
struct Server {
    /// `host:port/database`.
    name: String,
    connector: Connector,
    pool: Pool<AsyncPgConnection>,
    /// Connections shared by concurrent reads ([`PgConfig::pipelined_reads`]; none behind
    /// a transaction pooler: reads then take the pool), opened on first use.
    shared: Vec<tokio::sync::Mutex<Option<Arc<AsyncPgConnection>>>>,
    next_shared: AtomicUsize,
    /// Shared connections opened since start.
    opened_shared: AtomicU64,
    /// Whether reads may go to it.
    in_rotation: AtomicBool,
    /// What the latest round that found it well vouches for.
    vouched: Mutex<Vouched>,
    checked: AtomicBool,
    lag_ms: AtomicU64,
    reads: AtomicU64,
}

impl Server {
    /// Connections opened since start (pooled and shared): a read whose connection was
    /// opened after a round began changes it.
    fn opened(&self) -> u64 {
        self.pool.state().statistics.connections_created + self.opened_shared.load(Ordering::SeqCst)
    }

    /// A read on this replica: on a shared connection (opened if its slot is empty; left
    /// after a connection error or a timeout), else on a pooled one.
    async fn read<P: Sync, T>(
        &self,
        exec: &Executor,
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        let n = self.shared.len();
        if n == 0 || !exec.may_share(call)? {
            return exec
                .read_on(
                    (&self.pool, &self.connector, &self.name),
                    call,
                    params,
                    work,
                )
                .await;
        }
        let Some(slot) = self
            .shared
            .get(self.next_shared.fetch_add(1, Ordering::Relaxed) % n)
        else {
            return Err(StoreError::Closed);
        };
        let conn = {
            let mut held = slot.lock().await;
            match &*held {
                Some(conn) => Arc::clone(conn),
                None => {
                    self.opened_shared.fetch_add(1, Ordering::SeqCst);
                    let conn = Arc::new(self.connector.connect_shared().await?);
                    *held = Some(Arc::clone(&conn));
                    conn
                }
            }
        };
        let result = exec
            .read_with((&conn, &self.name), call, params, work)
            .await;
        if let Err(StoreError::Unavailable { .. } | StoreError::Timeout { .. }) = &result {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                *held = None;
            }
        }
        result
    }

    fn vouched(&self) -> Vouched {
        *self.vouched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes it out of the rotation until a round finds it well.
    fn out(&self, why: &dyn std::fmt::Display) {
        if self.in_rotation.swap(false, Ordering::SeqCst) {
            tracing::warn!(server = %self.name, reason = %why, "taskhistory: a replica left the rotation");
        }
    }

    /// Its replayed position, `None` when it is not in recovery (promoted); on the round's
    /// own connection to it (opened when missing, dropped after a failure).
    async fn check(
        &self,
        conn: &mut Option<AsyncPgConnection>,
        timeout: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let work = async {
            if conn.is_none() {
                *conn = Some(self.connector.connect().await?);
            }
            let Some(c) = conn.as_mut() else {
                return Err(StoreError::Closed);
            };
            let rows: Vec<CheckRow> = Statement::new(sql::REPLICA_POSITION)
                .fetch(c)
                .await
                .map_err(|e| from_diesel(CHECK, e))?;
            let row = rows
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::database(CHECK, "no row"))?;
            if !row.in_recovery {
                return Ok(None);
            }
            row.replayed
                .as_deref()
                .and_then(parse_lsn)
                .map(Some)
                .ok_or_else(|| StoreError::database(CHECK, "no replayed position read back"))
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout {
                operation: CHECK,
                source: format!("no answer within {timeout:?}").into(),
            }),
        };
        if result.is_err() {
            *conn = None;
        }
        result
    }
}

/// What a round vouches for: the replica had replayed `replayed`, and every connection its
/// pool had opened when the round began (`opened`) is to that server as it was then.
#[derive(Debug, Clone, Copy, Default)]
struct Vouched {
    replayed: u64,
    opened: u64,
}

/// What a user's reads must see.
#[derive(Debug, Clone, Copy, Default)]
struct Need {
    /// The counter value of its latest write not covered by a sample yet (0: none).
    pending: u64,
    /// A WAL position its reads must see (0: none).
    lsn: u64,
}

/// The requirements of reads (see the module's doc).
#[derive(Debug, Default)]
struct Needs {
    users: HashMap<String, Need>,
    /// Writes not covered by a sample yet, in counter order.
    pending: VecDeque<(u64, String)>,
    /// The counter value of the latest write of no one user not covered yet (0: none).
    all_pending: u64,
    /// A position every read must see.
    floor: u64,
    /// Recent samples of the primary (when, position), oldest first: for lag.
    samples: VecDeque<(Instant, u64)>,
}

impl Needs {
    /// The position a read for `users` must see (every one's writes; a combined read has
    /// several); `None` while a write it must see waits for a sample.
    fn need(&self, users: &[&str]) -> Option<u64> {
        if self.all_pending != 0 {
            return None;
        }
        users
            .iter()
            .try_fold(self.floor, |need, u| match self.users.get(*u) {
                Some(n) if n.pending != 0 => None,
                Some(n) => Some(need.max(n.lsn)),
                None => Some(need),
            })
    }

    /// A sample `(counter, position)` taken at `at`: it covers every write counted up to
    /// `counter`.
    fn sampled(&mut self, counter: u64, lsn: u64, at: Instant, keep: Duration) {
        while self.pending.front().is_some_and(|(s, _)| *s <= counter) {
            let Some((_, user)) = self.pending.pop_front() else {
                break;
            };
            if let Some(n) = self.users.get_mut(&user) {
                if n.pending != 0 && n.pending <= counter {
                    n.pending = 0;
                    n.lsn = n.lsn.max(lsn);
                }
            }
        }
        if self.all_pending != 0 && self.all_pending <= counter {
            self.all_pending = 0;
            self.floor = self.floor.max(lsn);
        }
        self.samples.push_back((at, lsn));
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// How long ago the primary was first seen past `replayed` (0 if it never was).
    fn lag(&self, replayed: u64, now: Instant) -> Duration {
        self.samples
            .iter()
            .find(|(_, lsn)| *lsn > replayed)
            .map(|(t, _)| now.saturating_duration_since(*t))
            .unwrap_or_default()
    }

    /// Drops the users' positions every replica in the rotation replayed (all of them when
    /// none is in it), raising the floor to them.
    fn prune(&mut self, replayed_by_all: Option<u64>) {
        let bound = replayed_by_all.unwrap_or(u64::MAX);
        let Needs { users, floor, .. } = self;
        users.retain(|_, n| {
            if n.pending == 0 && n.lsn <= bound {
                *floor = (*floor).max(n.lsn);
                false
            } else {
                true
            }
        });
    }
}

/// The state shared with the refresher.
struct Inner {
    servers: Vec<Server>,
    /// Bumped by every write after its commit returned.
    counter: AtomicU64,
    needs: Mutex<Needs>,
    /// Asks the refresher for a round.
    wanted: Notify,
    /// Counts finished rounds (readers wait on it).
    rounds: watch::Sender<u64>,
    wait: Duration,
    max_lag: Duration,
    /// The least time between two rounds.
    spacing: Duration,
    /// How long a check of a replica may take.
    check_timeout: Duration,
    /// The most time between two rounds.
    heartbeat: Duration,
    next: AtomicUsize,
    reads_primary: AtomicU64,
    fallbacks: AtomicU64,
}

/// Replicas of the primary that serve reads (see the module's doc).
pub(crate) struct Replicas {
    inner: Arc<Inner>,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Marks a write of no one user (cleanup) when dropped: every read then needs a position
/// past it.
pub(crate) struct AllWritten<'a>(Option<&'a Replicas>);

impl Drop for AllWritten<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.0 {
            let s = r.inner.counter.fetch_add(1, Ordering::SeqCst) + 1;
            let mut needs = r.inner.lock();
            // Two such writes may reach the lock out of counter order: keep the later.
            needs.all_pending = needs.all_pending.max(s);
            drop(needs);
            r.inner.wanted.notify_one();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Needs> {
        self.needs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A replica that may serve a read needing `lsn` now, taken in turn, and the count of
    /// connections its pool had opened that the pick relied on.
    fn pick(&self, lsn: u64) -> Option<(usize, u64)> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|k| (start + k) % n).find_map(|i| {
            let s = self.servers.get(i)?;
            if !s.in_rotation.load(Ordering::SeqCst) {
                return None;
            }
            let v = s.vouched();
            (v.replayed >= lsn && s.opened() == v.opened).then_some((i, v.opened))
        })
    }

    /// A replica for a read of `users`, waiting at most the replica wait for one that has
    /// replayed what the read must see; `None`: read the primary (at once when no replica
    /// is in the rotation).
    async fn choose(&self, users: &[&str]) -> Option<(usize, u64)> {
        let deadline = Instant::now() + self.wait;
        let mut rounds = self.rounds.subscribe();
        loop {
            rounds.borrow_and_update();
            let need = self.lock().need(users);
            if let Some(picked) = need.and_then(|lsn| self.pick(lsn)) {
                return Some(picked);
            }
            if !self
                .servers
                .iter()
                .any(|s| s.in_rotation.load(Ordering::SeqCst))
            {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.wanted.notify_one();
            match tokio::time::timeout(left, rounds.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// One round (see the module's doc).
    async fn round(
        &self,
        exec: &Executor,
        primary: &Kept,
        checks: &mut [Option<AsyncPgConnection>],
    ) {
        let counter = self.counter.load(Ordering::SeqCst);
        let opened: Vec<u64> = self.servers.iter().map(Server::opened).collect();
        let sample = exec.kept(
            Call::new(SAMPLE),
            primary,
            Tx::Statement,
            &(),
            wal_insert_position,
        );
        let found = futures::future::join_all(
            self.servers
                .iter()
                .zip(checks.iter_mut())
                .map(|(s, conn)| s.check(conn, self.check_timeout)),
        );
        let (sample, found) = futures::join!(sample, found);
        let now = Instant::now();
        let mut needs = self.lock();
        match sample {
            Ok(lsn) => needs.sampled(counter, lsn, now, self.max_lag * 2),
            Err(e) => {
                tracing::warn!(error = %e, "taskhistory: sampling the primary's WAL position failed")
            }
        }
        let mut replayed_by_all: Option<u64> = None;
        for ((server, found), opened) in self.servers.iter().zip(found).zip(opened) {
            server.checked.store(true, Ordering::SeqCst);
            match found {
                Ok(Some(replayed)) => {
                    let lag = needs.lag(replayed, now);
                    server.lag_ms.store(
                        u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                    if lag > self.max_lag {
                        server.out(&format_args!("lags by {lag:?}"));
                    } else {
                        *server.vouched.lock().unwrap_or_else(|p| p.into_inner()) =
                            Vouched { replayed, opened };
                        if !server.in_rotation.swap(true, Ordering::SeqCst) {
                            tracing::info!(server = %server.name, "taskhistory: a replica joined the rotation");
                        }
                        replayed_by_all =
                            Some(replayed_by_all.map_or(replayed, |m| m.min(replayed)));
                    }
                }
                Ok(None) => server.out(&"it is not in recovery (promoted)"),
                Err(e) => server.out(&e),
            }
        }
        needs.prune(replayed_by_all);
        drop(needs);
        self.rounds.send_modify(|r| *r = r.wrapping_add(1));
    }
}

/// The refresher: rounds until the store closes.
async fn refresh(inner: Arc<Inner>, exec: Arc<Executor>) {
    let primary = Kept::new("");
    let mut checks: Vec<Option<AsyncPgConnection>> = inner.servers.iter().map(|_| None).collect();
    while exec.ensure_open().is_ok() {
        inner.round(&exec, &primary, &mut checks).await;
        tokio::time::sleep(inner.spacing).await;
        tokio::select! {
            _ = inner.wanted.notified() => {}
            _ = tokio::time::sleep(inner.heartbeat) => {}
        }
    }
}

impl Replicas {
    /// The replicas of `config` with their pools (none opened yet: a replica down at
    /// start-up is only out of the rotation), and their refresher started; `None` without
    /// replicas.
    pub(crate) fn start(
        config: &PgConfig,
        exec: &Arc<Executor>,
    ) -> Result<Option<Self>, StoreError> {
        let mut servers = Vec::new();
        for (i, name) in config.get_read_urls().into_iter().enumerate() {
            let Some(c) = config.for_replica(i) else {
                break;
            };
            let connector = Connector::new(&c)?;
            let pool = build_pool(
                PoolSettings {
                    max_size: c.max_size,
                    min_idle: 0,
                    idle_timeout: Some(Duration::from_secs(600)),
                    // A replica that gives no connection soon is passed over for the primary.
                    connection_timeout: c.pool_timeout.min(Duration::from_secs(1)),
                },
                &connector,
                &Arc::new(Health::default()),
                &LastError::default(),
            );
            let shared = if c.pgbouncer { 0 } else { c.pipelined_reads };
            servers.push(Server {
                name,
                connector,
                pool,
                shared: (0..shared).map(|_| tokio::sync::Mutex::new(None)).collect(),
                next_shared: AtomicUsize::new(0),
                opened_shared: AtomicU64::new(0),
                in_rotation: AtomicBool::new(false),
                vouched: Mutex::new(Vouched::default()),
                checked: AtomicBool::new(false),
                lag_ms: AtomicU64::new(0),
                reads: AtomicU64::new(0),
            });
        }
        if servers.is_empty() {
            return Ok(None);
        }
        let wait = config.replica_wait;
        let spacing = (wait / 5).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let inner = Arc::new(Inner {
            servers,
            counter: AtomicU64::new(0),
            needs: Mutex::new(Needs::default()),
            wanted: Notify::new(),
            rounds: watch::Sender::new(0),
            wait,
            max_lag: config.max_replica_lag,
            spacing,
            check_timeout: config.command_timeout.min(Duration::from_secs(1)),
            heartbeat: (config.max_replica_lag / 4).clamp(spacing, HEARTBEAT),
            next: AtomicUsize::new(0),
            reads_primary: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        let refresher = tokio::spawn(refresh(Arc::clone(&inner), Arc::clone(exec)));
        Ok(Some(Replicas {
            inner,
            refresher: Mutex::new(Some(refresher)),
        }))
    }

    /// Notes writes for `users` whose commit has returned (or whose outcome is unknown):
    /// their next reads see them.
    pub(crate) fn wrote<'u>(&self, users: impl IntoIterator<Item = &'u str>) {
        let inner = &self.inner;
        let s = inner.counter.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut needs = inner.lock();
            for user in users {
                let n = needs.users.entry(user.to_owned()).or_default();
                // Writes of one user may reach the lock out of counter order: the user's
                // reads wait for a sample covering the later one.
                if n.pending < s {
                    n.pending = s;
                    needs.pending.push_back((s, user.to_owned()));
                }
            }
        }
        // No round is asked for here: the user's next read asks for one if it comes
        // before the next heartbeat (writes alone cost no statement).
    }

    /// A read that a replica may serve (see the module's doc); the primary's read when none
    /// may, or when the replica's attempt fails.
    pub(crate) async fn read<P: Sync, T>(
        &self,
        exec: &Executor,
        call: Call<'_>,
        params: &P,
        work: Read<P, T>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        let users = match call.scope {
            Scope::Users(users) => users,
            _ => call.user_id.as_slice(),
        };
        let chosen = inner.choose(users).await;
        if let Some((server, opened)) = chosen.and_then(|(i, o)| Some((inner.servers.get(i)?, o))) {
            let result = server.read(exec, call, params, work).await;
            // A connection opened since the round that vouched for the replica may be to a
            // restarted server that shows an older state than it reported.
            let vouched = server.opened() == opened;
            match result {
                Ok(value) if vouched => {
                    server.reads.fetch_add(1, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(_) => inner.wanted.notify_one(),
                Err(StoreError::Closed) => return Err(StoreError::Closed),
                Err(e @ (StoreError::Unavailable { .. } | StoreError::Timeout { .. })) => {
                    server.out(&e);
                    inner.wanted.notify_one();
                }
                Err(e) => {
                    tracing::debug!(server = %server.name, error = %e, "taskhistory: a read on a replica failed; the primary serves it");
                }
            }
            inner.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        inner.reads_primary.fetch_add(1, Ordering::Relaxed);
        exec.read(call, params, work).await
    }

    /// Whether a read of `user` waits now for a write of the user's to be sampled (a
    /// combined read keeps such users apart from the others, which need not wait with them).
    pub(crate) fn waits(&self, user: &str) -> bool {
        self.inner.lock().need(&[user]).is_none()
    }

    /// A position at or after every write for `user` this store noted (and every position
    /// required for it), waiting for the sample that covers its latest write (at most
    /// `timeout`); `None` when reads of `user` need nothing.
    pub(crate) async fn position(
        &self,
        user: &str,
        timeout: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        let mut rounds = inner.rounds.subscribe();
        loop {
            rounds.borrow_and_update();
            if let Some(lsn) = inner.lock().need(&[user]) {
                return Ok((lsn > 0).then_some(lsn));
            }
            inner.wanted.notify_one();
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rounds.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(StoreError::Timeout {
                        operation: "position",
                        source: format!(
                            "the primary's WAL position could not be sampled within {timeout:?}"
                        )
                        .into(),
                    })
                }
            }
        }
    }

    /// Reads of `user` must see `lsn` (a position another store gave). A position past
    /// this store's latest sample of the primary is taken as the next sample's instead
    /// (at or past any true token, which the primary had passed when it was given): a
    /// made-up position far ahead never holds reads off the replicas for long.
    pub(crate) fn require(&self, user: &str, lsn: u64) {
        let inner = &self.inner;
        let mut needs = inner.lock();
        let sampled = needs.samples.back().map_or(0, |(_, l)| *l);
        if lsn <= sampled {
            let n = needs.users.entry(user.to_owned()).or_default();
            n.lsn = n.lsn.max(lsn);
            return;
        }
        drop(needs);
        self.wrote([user]);
    }

    /// A guard that notes a write of no one user when dropped (see [`AllWritten`]).
    pub(crate) fn all_written(replicas: Option<&Replicas>) -> AllWritten<'_> {
        AllWritten(replicas)
    }

    /// `(reads by the primary, by replicas, fall-backs, largest lag in ms, in rotation)`.
    pub(crate) fn counts(&self) -> (u64, u64, u64, u64, u64) {
        let inner = &self.inner;
        let mut replicas = 0;
        let mut lag = 0;
        let mut rotation = 0;
        for s in &inner.servers {
            replicas += s.reads.load(Ordering::Relaxed);
            lag = lag.max(s.lag_ms.load(Ordering::Relaxed));
            rotation += u64::from(s.in_rotation.load(Ordering::SeqCst));
        }
        (
            inner.reads_primary.load(Ordering::Relaxed),
            replicas,
            inner.fallbacks.load(Ordering::Relaxed),
            lag,
            rotation,
        )
    }

    /// Each replica's state.
    pub(crate) fn states(&self) -> Vec<ReplicaState> {
        self.inner
            .servers
            .iter()
            .map(|s| ReplicaState {
                server: s.name.clone(),
                in_rotation: s.in_rotation.load(Ordering::SeqCst),
                reads: s.reads.load(Ordering::Relaxed),
                lag_ms: s.lag_ms.load(Ordering::Relaxed),
                replayed: s
                    .checked
                    .load(Ordering::SeqCst)
                    .then(|| show_lsn(s.vouched().replayed)),
            })
            .collect()
    }

    /// Stops the refresher and closes the shared connections (the pools close when the
    /// store is dropped; reads after `close` fail with `Closed` before using them).
    pub(crate) async fn close(&self) {
        self.stop();
        for server in &self.inner.servers {
            for slot in &server.shared {
                slot.lock().await.take();
            }
        }
    }

    /// Stops the refresher.
    pub(crate) fn stop(&self) {
        if let Some(task) = self
            .refresher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips_and_refuses_what_is_not_one() {
        for text in ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(parse_lsn(text).map(show_lsn).as_deref(), Some(text));
        }
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        for bad in [
            "",
            "0",
            "/1",
            "1/",
            "+1/0",
            "g/0",
            "123456789/0",
            "0/0/0",
            " 0/0",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_write_is_pending_until_a_sample_that_began_after_it() {
        let mut needs = Needs::default();
        let t = Instant::now();
        let keep = Duration::from_secs(10);
        needs.users.insert("u".into(), Need { pending: 3, lsn: 0 });
        needs.pending.push_back((3, "u".into()));
        assert_eq!(needs.need(&["u"]), None);
        assert_eq!(needs.need(&["v"]), Some(0));
        // A combined read waits while any of its users' writes does.
        assert_eq!(needs.need(&["v", "u"]), None);
        // A sample whose counter was read before the write was counted does not cover it.
        needs.sampled(2, 100, t, keep);
        assert_eq!(needs.need(&["u"]), None);
        needs.sampled(3, 200, t, keep);
        assert_eq!(needs.need(&["u"]), Some(200));
        assert_eq!(needs.need(&["v", "u"]), Some(200));
        // Pruned once every replica in the rotation replayed it: the floor keeps it.
        needs.prune(Some(150));
        assert_eq!(needs.need(&["u"]), Some(200));
        needs.prune(Some(200));
        assert!(needs.users.is_empty());
        assert_eq!(needs.need(&["u"]), Some(200));
        assert_eq!(needs.need(&["v"]), Some(200));
        // A write of no one user holds every read until it is covered.
        needs.all_pending = 4;
        assert_eq!(needs.need(&["v"]), None);
        needs.sampled(4, 300, t, keep);
        assert_eq!(needs.need(&["v"]), Some(300));
    }

    #[test]
    fn lag_is_the_age_of_the_first_sample_past_the_replayed_position() {
        let mut needs = Needs::default();
        let t0 = Instant::now();
        let keep = Duration::from_secs(10);
        needs.sampled(0, 100, t0, keep);
        needs.sampled(0, 200, t0 + Duration::from_secs(1), keep);
        let now = t0 + Duration::from_secs(3);
        assert_eq!(needs.lag(200, now), Duration::ZERO);
        assert_eq!(needs.lag(150, now), Duration::from_secs(2));
        assert_eq!(needs.lag(50, now), Duration::from_secs(3));
    }
}
