//! Reading the log of events: one statement ([`EVENTS_AFTER`](crate::sql::EVENTS_AFTER))
//! for any number of users, each from its own position. The tail reads every watched user
//! with it; a watcher catching up reads its own user.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnectionCore, AsyncPgConnection};
use futures::future::BoxFuture;
use taskhistory_core::{StoreError, TaskEvent, TaskStatus};

use super::position::{past, Position, Snapshot};
use crate::backend::Backend;
use crate::error::from_diesel;
use crate::exec::Call;
use crate::ops::rows::Status;
use crate::sql::{self, Statement};

/// One user's part of a read: whose events (of one task, when given), after where.
pub(super) struct Want<'a> {
    pub(super) user: &'a str,
    pub(super) task: Option<&'a str>,
    pub(super) position: &'a Position,
}

/// One event read: the step row's values and its place in the log.
pub(super) struct Row {
    pub(super) task_id: String,
    pub(super) step: i32,
    pub(super) status: TaskStatus,
    pub(super) timestamp: DateTime<Utc>,
    pub(super) xid: u64,
    pub(super) id: i64,
}

impl Row {
    /// The event of user `user` at this row, with the cursor of position `at`.
    pub(super) fn event(&self, user: &str, at: &Position) -> Result<TaskEvent, StoreError> {
        Ok(TaskEvent::of_step(
            user,
            &self.task_id,
            self.step,
            self.status,
            self.timestamp,
            at.cursor()?,
        ))
    }
}

/// What a read found: the statement's snapshot, and each user's rows in position order
/// (at most `page` each: a user with `page` rows may have more).
pub(super) struct Found {
    pub(super) snapshot: Snapshot,
    pub(super) rows: Vec<Vec<Row>>,
}

impl Found {
    /// Where user `i` stands after its rows: past the last row when it got a whole page
    /// (more may wait), else at the end of what the read could see.
    /// A whole position is the read's snapshot below just past the newest write it
    /// delivered, or where `was` stood (`super`, "After a crash"): the read saw no write
    /// of the user's (of the task's) above that.
    pub(super) fn next_position(&self, i: usize, was: &Position, page: i64) -> Position {
        let to = was.to.clone().unwrap_or_else(|| self.snapshot.clone());
        match self.rows[i].last() {
            Some(last) if self.rows[i].len() as i64 >= page => Position {
                from: was.from.clone(),
                to: Some(to),
                after: Some((last.xid, last.id)),
            },
            last => {
                let newest = last.map(|r| r.xid).max(was.after.map(|(xid, _)| xid));
                Position::at(to.below(past(newest).max(was.from.xmax())))
            }
        }
    }

    /// `was` as this read may go on from it, for user `i`. Mid-page, `was.to` is a snapshot
    /// of an earlier run of the server when this read's does not cover it: the server
    /// crashed in between and may have given out again ids `to` saw end (`super`, "After
    /// a crash"). `to` is then kept only below just past the last row delivered or `from`'s
    /// horizon, whichever is higher (no id below either is given out again), and this
    /// read's rows above that are dropped: the position's next read takes them as unseen.
    /// `None`: `was` stands as it is.
    pub(super) fn settle(&mut self, i: usize, was: &Position) -> Option<Position> {
        let (Some(to), Some((xid, _))) = (&was.to, was.after) else {
            return None;
        };
        if self.snapshot.covers(to) {
            return None;
        }
        let to = to.below(past(Some(xid)).max(was.from.xmax()));
        if let Some(rows) = self.rows.get_mut(i) {
            rows.retain(|r| to.sees(r.xid));
        }
        Some(Position {
            from: was.from.clone(),
            to: Some(to),
            after: was.after,
        })
    }

    /// The position of row `k` of user `i` (its event's cursor).
    pub(super) fn position_of(&self, i: usize, k: usize, was: &Position) -> Position {
        let row = &self.rows[i][k];
        Position {
            from: was.from.clone(),
            to: Some(was.to.clone().unwrap_or_else(|| self.snapshot.clone())),
            after: Some((row.xid, row.id)),
        }
    }
}

#[derive(QueryableByName)]
struct EventRow {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
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

/// The statement's parameters, one array element per user.
struct Params {
    users: Vec<String>,
    tasks: Vec<Option<String>>,
    seen: Vec<String>,
    upto: Vec<Option<String>>,
    xids: Vec<String>,
    ids: Vec<i64>,
    page: i64,
}

fn events_after<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    p: &'c Params,
) -> BoxFuture<'c, Result<Vec<EventRow>, StoreError>> {
    events_after_on(conn, p)
}

/// [`events_after`] for any connection type (the executor's reads hand a shared one).
fn events_after_on<'c, C>(
    conn: &'c mut C,
    p: &'c Params,
) -> BoxFuture<'c, Result<Vec<EventRow>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, EventRow>,
{
    Box::pin(async move {
        let rows: Vec<EventRow> = Statement::new(sql::EVENTS_AFTER)
            .bind::<Array<Text>, _>(p.users.clone())
            .bind::<Array<Nullable<Text>>, _>(p.tasks.clone())
            .bind::<Array<Text>, _>(p.seen.clone())
            .bind::<Array<Nullable<Text>>, _>(p.upto.clone())
            .bind::<Array<Text>, _>(p.xids.clone())
            .bind::<Array<BigInt>, _>(p.ids.clone())
            .bind::<BigInt, _>(p.page)
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(super::OP, e))?;
        tracing::Span::current().record("rows", rows.len());
        Ok(rows)
    })
}

#[derive(QueryableByName)]
struct NewestRow {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = Nullable<Text>)]
    xid: Option<String>,
}

/// The users whose first positions a read finds.
struct NewUsers {
    users: Vec<String>,
}

fn newest_seen<'c>(
    conn: &'c mut &'c AsyncPgConnection,
    p: &'c NewUsers,
) -> BoxFuture<'c, Result<Vec<NewestRow>, StoreError>> {
    newest_seen_on(conn, &p.users)
}

/// [`newest_seen`] for any connection type (as [`events_after_on`]).
fn newest_seen_on<'c, C>(
    conn: &'c mut C,
    users: &'c [String],
) -> BoxFuture<'c, Result<Vec<NewestRow>, StoreError>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
    Statement: LoadQuery<'static, C, NewestRow>,
{
    Box::pin(async move {
        Statement::new(sql::NEWEST_SEEN)
            .bind::<Array<Text>, _>(users.to_vec())
            .fetch(conn)
            .await
            .map_err(|e| from_diesel(super::OP, e))
    })
}

/// The first positions of `users`, in their order, and the snapshot of the statement that
/// found them: that snapshot below just past the newest write of each that it sees
/// (`super`, "After a crash").
pub(super) async fn first_positions(
    backend: &Backend,
    call: Call<'_>,
    users: &[&str],
) -> Result<(Snapshot, Vec<Position>), StoreError> {
    let p = NewUsers {
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    };
    let rows = backend.exec().read(call, &p, newest_seen).await?;
    let bad = |what: &str| StoreError::database(super::OP, format!("unreadable {what}"));
    let snapshot = match rows.first() {
        Some(row) => Snapshot::parse(&row.snapshot).ok_or_else(|| bad("snapshot"))?,
        None => return Err(bad("newest writes (no row)")),
    };
    let mut horizons = vec![None; users.len()];
    for row in rows {
        let slot = usize::try_from(row.n - 1)
            .ok()
            .and_then(|i| horizons.get_mut(i))
            .ok_or_else(|| bad("newest write (user out of range)"))?;
        let newest = row
            .xid
            .map(|xid| xid.parse::<u64>().map_err(|_| bad("transaction id")))
            .transpose()?;
        *slot = Some(past(newest));
    }
    let positions = horizons
        .into_iter()
        .map(|h| {
            let h = h.ok_or_else(|| bad("newest write (user missing)"))?;
            Ok(Position::at(snapshot.below(h)))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok((snapshot, positions))
}

/// Reads the events of `wants` (at most `page` per user) in one statement.
pub(super) async fn read(
    backend: &Backend,
    call: Call<'_>,
    wants: &[Want<'_>],
    page: i64,
) -> Result<Found, StoreError> {
    let mut p = Params {
        users: Vec::with_capacity(wants.len()),
        tasks: Vec::with_capacity(wants.len()),
        seen: Vec::with_capacity(wants.len()),
        upto: Vec::with_capacity(wants.len()),
        xids: Vec::with_capacity(wants.len()),
        ids: Vec::with_capacity(wants.len()),
        page,
    };
    for w in wants {
        let at = w.position;
        // From the oldest transaction `from` did not see, or past the last row delivered.
        let floor = (at.from.xmin(), i64::MIN);
        let (xid, id) = at.after.map_or(floor, |after| after.max(floor));
        p.users.push(w.user.to_owned());
        p.tasks.push(w.task.map(str::to_owned));
        p.seen.push(at.from.as_str().to_owned());
        p.upto.push(at.to.as_ref().map(|s| s.as_str().to_owned()));
        p.xids.push(xid.to_string());
        p.ids.push(id);
    }
    let rows = backend.exec().read(call, &p, events_after).await?;
    let bad = |what: &str| StoreError::database(super::OP, format!("unreadable {what}"));
    let snapshot = match rows.first() {
        Some(row) => Snapshot::parse(&row.snapshot).ok_or_else(|| bad("snapshot"))?,
        None => return Err(bad("event page (no row)")),
    };
    let mut found = Found {
        snapshot,
        rows: (0..wants.len()).map(|_| Vec::new()).collect(),
    };
    for row in rows {
        let (
            Some(n),
            Some(task_id),
            Some(step),
            Some(status),
            Some(timestamp),
            Some(xid),
            Some(id),
        ) = (
            row.n,
            row.task_id,
            row.step,
            row.status,
            row.timestamp,
            row.xid,
            row.id,
        )
        else {
            continue;
        };
        let user = usize::try_from(n - 1)
            .ok()
            .and_then(|i| found.rows.get_mut(i))
            .ok_or_else(|| bad("event row (user out of range)"))?;
        user.push(Row {
            task_id,
            step,
            status: status.0,
            timestamp,
            xid: xid.parse().map_err(|_| bad("transaction id"))?,
            id,
        });
    }
    // In position order: the statement's order is the plan's, not promised.
    for rows in &mut found.rows {
        rows.sort_unstable_by_key(|r| (r.xid, r.id));
    }
    Ok(found)
}
