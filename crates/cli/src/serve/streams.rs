//! Caps on live event streams: `--max-streams` in all (SSE and WebSocket together) and
//! `--max-streams-per-user` for the user in the stream's path. A stream holds a [`Slot`]
//! from before its store watch opens until it ends for whatever reason (the client goes
//! away, the server stops, an error): the slot's drop gives it back, so no path can forget
//! to. Past a cap, or past the store's own cap on watchers (`StoreError::LimitReached`),
//! an SSE request is answered 429 with `Retry-After` ([`RETRY_AFTER_SECS`]) and a WebSocket
//! is accepted, then closed with 1013 (`events.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::metrics::{Metrics, WatcherGuard};

/// Seconds a client refused at a cap is asked to wait (`Retry-After`): a slot comes free
/// when another stream ends, which the server cannot foresee; 10 s lets a user who closed
/// a tab in again soon, and keeps a client that retries at once from spinning.
pub(crate) const RETRY_AFTER_SECS: u64 = 10;

/// Which cap refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cap {
    /// `--max-streams`: the server's streams in all.
    Streams,
    /// `--max-streams-per-user`: the streams of the stream's user.
    PerUser,
    /// The store's own cap on live watchers (`StoreError::LimitReached`).
    StoreWatchers,
}

impl Cap {
    /// The label of `taskhistory_streams_refused_total{cap}` (the operator's view: which
    /// setting to raise).
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Cap::Streams => "max_streams",
            Cap::PerUser => "max_streams_per_user",
            Cap::StoreWatchers => "store_watchers",
        }
    }

    /// The cap as a client is told (`limit` in the error body): this user's streams, or the
    /// server's in all (its own cap or the store's, alike to a client); never its size.
    pub(crate) const fn client_name(self) -> &'static str {
        match self {
            Cap::PerUser => "max_streams_per_user",
            Cap::Streams | Cap::StoreWatchers => "max_streams",
        }
    }

    /// The error's message (fixed text).
    pub(crate) const fn message(self) -> &'static str {
        match self {
            Cap::PerUser => {
                "this user has as many event streams open as the server allows; close one or \
                 try again later"
            }
            Cap::Streams | Cap::StoreWatchers => {
                "the server has as many event streams open as it allows; try again later"
            }
        }
    }

    /// The reason of a WebSocket's close frame (1013; at most 123 bytes).
    pub(crate) const fn close_reason(self) -> &'static str {
        match self {
            Cap::PerUser => "too many streams of this user; try again later",
            Cap::Streams | Cap::StoreWatchers => "too many streams; try again later",
        }
    }
}

/// The streams open now: in all and by user (a user with none has no entry, so the map
/// holds at most `--max-streams` entries).
#[derive(Debug, Default)]
struct Open {
    total: usize,
    users: HashMap<String, usize>,
}

/// The caps and the streams they count.
#[derive(Debug)]
pub(crate) struct Streams {
    max: usize,
    per_user: usize,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
}

impl Streams {
    /// At most `max` streams in all and `per_user` of one user; refusals and open streams
    /// are counted in `metrics`.
    pub(crate) fn new(max: usize, per_user: usize, metrics: Arc<Metrics>) -> Arc<Streams> {
        Arc::new(Streams {
            max,
            per_user,
            open: Mutex::new(Open::default()),
            metrics,
        })
    }

    /// The counts (a panic elsewhere while they were held leaves them consistent: every
    /// change is made whole under the lock).
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a stream of `user`, or the cap that refuses it (the refusal counted in
    /// the metrics). The user's own cap is named first: closing one of theirs helps.
    pub(crate) fn open(self: &Arc<Self>, user: &str) -> Result<Slot, Cap> {
        let mut open = self.lock();
        let mine = open.users.get(user).copied().unwrap_or(0);
        let refused = if mine >= self.per_user {
            Some(Cap::PerUser)
        } else if open.total >= self.max {
            Some(Cap::Streams)
        } else {
            None
        };
        if let Some(cap) = refused {
            drop(open);
            self.metrics.stream_refused(cap);
            return Err(cap);
        }
        open.total += 1;
        *open.users.entry(user.to_owned()).or_insert(0) += 1;
        drop(open);
        Ok(Slot {
            streams: self.clone(),
            user: user.to_owned(),
            _counted: self.metrics.watcher(),
        })
    }

    /// The caps, for the log (`(--max-streams, --max-streams-per-user)`).
    pub(crate) fn caps(&self) -> (usize, usize) {
        (self.max, self.per_user)
    }
}

/// One open stream's place under the caps (and in `taskhistory_watchers`), given back when
/// it drops.
#[derive(Debug)]
pub(crate) struct Slot {
    streams: Arc<Streams>,
    user: String,
    _counted: WatcherGuard,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.users.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_user_and_in_all_and_given_back_on_drop() {
        let metrics = Metrics::new(None);
        let streams = Streams::new(3, 2, metrics.clone());
        let a1 = streams.open("a").ok();
        let a2 = streams.open("a").ok();
        assert!(a1.is_some() && a2.is_some());
        assert_eq!(streams.open("a").err(), Some(Cap::PerUser));
        let b1 = streams.open("b").ok();
        assert!(b1.is_some());
        assert_eq!(streams.open("c").err(), Some(Cap::Streams));
        // Both caps reached: the user's own is named.
        assert_eq!(streams.open("a").err(), Some(Cap::PerUser));
        assert_eq!(metrics.watchers_now(), 3);
        drop(a1);
        assert_eq!(metrics.watchers_now(), 2);
        let a3 = streams.open("a").ok();
        assert!(a3.is_some());
        drop((a2, a3, b1));
        assert_eq!(metrics.watchers_now(), 0);
        let open = streams.lock();
        assert_eq!(open.total, 0);
        assert!(open.users.is_empty(), "{:?}", open.users);
    }
}
