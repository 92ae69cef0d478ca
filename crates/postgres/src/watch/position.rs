//! Positions in the log of events: database snapshots, and the cursors that carry them.
//!
//! A position says which writes a watcher has delivered: those of every transaction its
//! snapshot `from` sees; mid-page (a read of more rows than one statement returns), also
//! the rows of the transactions `to` sees and `from` does not, up to `after`.

use taskhistory_core::{EventCursor, StoreError};

/// PostgreSQL's first id of an ordinary transaction: the ids below it are never given out
/// (a row at 0 predates the log: history, seen by every snapshot), and no snapshot is lower.
const FIRST_NORMAL_XID: u64 = 3;

/// The horizon just past transaction `newest` (none: the lowest there is), for
/// [`Snapshot::below`].
pub(super) fn past(newest: Option<u64>) -> u64 {
    newest.map_or(0, |x| x.saturating_add(1))
}

/// A snapshot in PostgreSQL's text form, `xmin:xmax:xip,...`, checked (it is bound into
/// statements) and read (a watcher compares snapshots without a round trip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    text: String,
    xmin: u64,
    xmax: u64,
    /// The transactions in progress, ascending (each in `xmin..xmax`).
    xip: Vec<u64>,
}

impl Snapshot {
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (xmin, xmax, xip) = (parts.next()?, parts.next()?, parts.next()?);
        let number = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        if parts.next().is_some() {
            return None;
        }
        let (xmin, xmax) = (number(xmin)?, number(xmax)?);
        let mut ids = Vec::new();
        if !xip.is_empty() {
            for x in xip.split(',') {
                ids.push(number(x)?);
            }
        }
        ids.sort_unstable();
        let in_range = ids.iter().all(|x| (xmin..xmax).contains(x));
        (xmin <= xmax && in_range).then(|| Snapshot {
            text: text.to_owned(),
            xmin,
            xmax,
            xip: ids,
        })
    }

    /// The text form, as bound into statements.
    pub(super) fn as_str(&self) -> &str {
        &self.text
    }

    /// The oldest transaction it did not see.
    pub(super) fn xmin(&self) -> u64 {
        self.xmin
    }

    /// The first transaction id not yet given out when it was taken.
    pub(super) fn xmax(&self) -> u64 {
        self.xmax
    }

    /// This snapshot with every transaction from `horizon` on taken as unseen: it sees
    /// what this one sees below `horizon`, nothing at or above it. A position's snapshot is
    /// restricted to just past the newest write it delivered (see [`super`], "After a
    /// crash"): a transaction this one saw finish with no write durable (a `NOTIFY`, a
    /// rollback) may have its id given again after a crash, and must not count as seen.
    pub(super) fn below(&self, horizon: u64) -> Snapshot {
        let xmax = self.xmax.min(horizon.max(FIRST_NORMAL_XID));
        let xmin = self.xmin.min(xmax);
        let xip: Vec<u64> = self.xip.iter().copied().filter(|&x| x < xmax).collect();
        let list: Vec<String> = xip.iter().map(u64::to_string).collect();
        Snapshot {
            text: format!("{xmin}:{xmax}:{}", list.join(",")),
            xmin,
            xmax,
            xip,
        }
    }

    /// Whether transaction `xid` had finished when this snapshot was taken: PostgreSQL's
    /// `pg_visible_in_snapshot`.
    pub(super) fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether this snapshot sees every transaction `other` sees. Exact when it is at
    /// least as new (`xmax` not below `other`'s); `false` otherwise, even where the answer
    /// would be yes: a caller waiting for a newer snapshot then waits for the next one,
    /// which sees it all.
    pub(super) fn covers(&self, other: &Snapshot) -> bool {
        self.xmax >= other.xmax
            && self
                .xip
                .iter()
                .take_while(|&&x| x < other.xmax)
                .all(|&x| !other.sees(x))
    }
}

/// Where a watcher stands: every write `from` saw is delivered; when a read is in progress
/// in pages (`to` set), so are the rows `to` sees, `from` does not, up to `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) from: Snapshot,
    pub(super) to: Option<Snapshot>,
    pub(super) after: Option<(u64, i64)>,
}

/// Cursor tokens: `pg~FROM~TO~XID~ID`, `-` for what is absent.
const PREFIX: &str = "pg";
const SEP: char = '~';

impl Position {
    /// All the writes `snapshot` saw, nothing else.
    pub(super) fn at(snapshot: Snapshot) -> Self {
        Position {
            from: snapshot,
            to: None,
            after: None,
        }
    }

    /// Reading from `from` up to `to` exactly (a watcher catching up to the tail).
    pub(super) fn between(from: Snapshot, to: Snapshot) -> Self {
        Position {
            from,
            to: Some(to),
            after: None,
        }
    }

    /// Not in the middle of a read: all of `from`, nothing more.
    pub(super) fn is_whole(&self) -> bool {
        self.to.is_none()
    }

    pub(super) fn cursor(&self) -> Result<EventCursor, StoreError> {
        let to = self.to.as_ref().map_or("-", Snapshot::as_str);
        let (xid, id) = match self.after {
            Some((xid, id)) => (xid.to_string(), id.to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let token = format!(
            "{PREFIX}{SEP}{}{SEP}{to}{SEP}{xid}{SEP}{id}",
            self.from.text
        );
        EventCursor::parse(&token)
    }

    pub(super) fn of(cursor: &EventCursor) -> Result<Self, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    #[test]
    fn positions_round_trip_through_cursors() {
        let from = snap("100:105:101,103");
        let to = snap("104:110:");
        for p in [
            Position::at(from.clone()),
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
            "pg~5:2:~-~-~-",
            "pg~1:5:7~-~-~-",
        ] {
            let cursor = EventCursor::parse(token).unwrap();
            assert!(
                matches!(Position::of(&cursor), Err(StoreError::InvalidInput { ref field, .. }) if field == "cursor"),
                "{token}"
            );
        }
    }

    #[test]
    fn visibility_is_postgresqls() {
        let s = snap("100:105:101,103");
        let seen: Vec<u64> = (98..107).filter(|&x| s.sees(x)).collect();
        assert_eq!(seen, [98, 99, 100, 102, 104]);
    }

    #[test]
    fn a_snapshot_below_a_horizon_sees_only_what_lies_below_it() {
        let s = snap("100:110:101,103,107");
        for (horizon, text) in [
            (110, "100:110:101,103,107"),
            (200, "100:110:101,103,107"),
            (104, "100:104:101,103"),
            (101, "100:101:"),
            (100, "100:100:"),
            (90, "90:90:"),
            (0, "3:3:"),
        ] {
            let below = s.below(horizon);
            assert_eq!(below.as_str(), text, "horizon {horizon}");
            // It parses as PostgreSQL's text form, and sees exactly `s`'s view below it.
            assert_eq!(Snapshot::parse(below.as_str()).as_ref(), Some(&below));
            for x in 85..115 {
                let horizon = horizon.max(FIRST_NORMAL_XID);
                assert_eq!(
                    below.sees(x),
                    x < horizon && s.sees(x),
                    "{x} below {horizon}"
                );
            }
            assert!(s.covers(&below), "horizon {horizon}");
        }
    }

    #[test]
    fn a_newer_snapshot_covers_an_older_one() {
        let old = snap("100:105:101,103");
        // 101 still running, 103 finished, more started and finished since.
        let newer = snap("101:110:101,107");
        assert!(newer.covers(&old));
        assert!(newer.covers(&newer));
        assert!(!old.covers(&newer));
        // 102 was seen by `old` and is in progress for this one: not newer.
        assert!(!snap("100:110:102").covers(&old));
        // An older xmax: not covered, even where every id would be (conservative).
        assert!(!snap("100:104:101,103").covers(&old));
    }
}
