//! Every SQL statement the store sends, and the small query type that sends them as cached
//! prepared statements.
//!
//! Each `$n` placeholder appears once, in increasing order (a unit test checks it): the
//! statement splits its text at the placeholders and diesel numbers the bound values in
//! order. Every statement filters on `user_id`, except cleanup, migrations and the
//! operator's statements (health, schema version, statistics), which no service path sends.

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::QueryResult;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnectionCore, RunQueryDsl};

/// How a write merges into its task's summary: the status of the highest step, counts,
/// first and last activity, the start time (a conflict when two writers created the task
/// apart) and the order guard. One place for both save statements.
macro_rules! summary_merge {
    () => {
        r#"    ON CONFLICT (user_id, task_id) DO UPDATE SET
        status = CASE WHEN EXCLUDED.last_step >= s.last_step THEN EXCLUDED.status ELSE s.status END,
        last_step = GREATEST(s.last_step, EXCLUDED.last_step),
        step_count = s.step_count + EXCLUDED.step_count,
        created_at = LEAST(s.created_at, EXCLUDED.created_at),
        updated_at = GREATEST(s.updated_at, EXCLUDED.updated_at),
        started_at = CASE WHEN s.started_at = EXCLUDED.started_at THEN s.started_at
                          ELSE taskhistory_start_conflict() END,
        -- Per task, positions follow commits: a transaction numbered before the task's
        -- last writer, committing after it, is retried with a new number.
        last_xid = CASE WHEN s.last_xid > EXCLUDED.last_xid THEN taskhistory_order_conflict()
                        ELSE EXCLUDED.last_xid END
"#
    };
}

/// The part of the save statements after their input: locks, upserts, summary, outcome.
/// `whole`: a cancelled task refuses the whole statement (batches are all-or-nothing);
/// `each`: it refuses only its own rows (combined single saves, each its caller's).
macro_rules! save_body {
    (whole) => {
        concat!(
            save_body!(@locks),
            r#"), refused AS (
    SELECT user_id, task_id FROM locked WHERE status = 'cancelled' LIMIT 1
"#,
            save_body!(@keyed),
            "    WHERE NOT EXISTS (SELECT 1 FROM refused)\n",
            save_body!(@upserts),
            r#"SELECT r.user_id AS refused_user, r.task_id AS refused_task,
       (SELECT count(*) FROM written) AS rows_written
FROM (SELECT 1) AS one LEFT JOIN refused r ON true
"#
        )
    };
    (each) => {
        concat!(
            save_body!(@locks),
            r#"), refused AS (
    SELECT user_id, task_id FROM locked WHERE status = 'cancelled'
"#,
            save_body!(@keyed),
            r#"    WHERE NOT EXISTS (
        SELECT 1 FROM refused r WHERE r.user_id = keyed.user_id AND r.task_id = keyed.task_id
    )
"#,
            save_body!(@upserts),
            r#"SELECT ARRAY(SELECT user_id FROM refused) AS refused_users,
       ARRAY(SELECT task_id FROM refused) AS refused_tasks,
       (SELECT count(*) FROM written) AS rows_written
"#
        )
    };
    (@locks) => {
        r#"), keys AS MATERIALIZED (
    SELECT DISTINCT user_id, task_id FROM input
), queued AS MATERIALIZED (
    -- Writers of a few tasks first queue for each of them, in key order, on a lock that
    -- gives the transaction no id; the id comes with the first row lock below, once every
    -- queue is passed, so the writers of one task are numbered in the order they commit
    -- (the guard on last_xid then does not fire for them). Large batches skip the queue (a
    -- lock per task could fill the server's lock table) and rely on the guard alone.
    SELECT count(pg_advisory_xact_lock(hashtextextended(o.task_id, hashtext(o.user_id))))
               FILTER (WHERE o.tasks <= 64) AS passed
    FROM (SELECT k.*, count(*) OVER () AS tasks FROM keys k ORDER BY user_id, task_id) o
), locked AS MATERIALIZED (
    -- One primary-key probe per task, in key order (the lock order of every writer). Written
    -- as a lateral lookup so that the cached generic plan, which cannot know how many rows
    -- the arrays hold, never turns it into a scan of the whole summary table. It reads
    -- q.passed: the row locks come after the queues.
    SELECT s.user_id, s.task_id, s.status, s.started_at
    FROM queued q
    CROSS JOIN (SELECT user_id, task_id FROM keys ORDER BY user_id, task_id) k
    CROSS JOIN LATERAL (
        SELECT t.user_id, t.task_id, t.status, t.started_at, q.passed
        FROM task_summary t
        WHERE t.user_id = k.user_id AND t.task_id = k.task_id
        FOR UPDATE OF t
    ) s
"#
    };
    (@keyed) => {
        r#"), keyed AS MATERIALIZED (
    -- The id is drawn here so that the rows returned tell an insert (this id) from an
    -- update (the row's older id): what step_count adds.
    SELECT i.*, nextval('task_history_id_seq') AS id,
           COALESCE(l.started_at, min(i.ts) OVER (PARTITION BY i.user_id, i.task_id))
               AS started_at
    FROM input i LEFT JOIN locked l ON l.user_id = i.user_id AND l.task_id = i.task_id
), written AS (
    INSERT INTO task_history AS h
        (id, user_id, task_id, step, result, timestamp, status, started_at)
    SELECT id, user_id, task_id, step, result, ts, status, started_at FROM keyed
"#
    };
    (@upserts) => {
        concat!(
            r#"    ON CONFLICT ON CONSTRAINT task_history_user_task_step_key DO UPDATE
        SET result = EXCLUDED.result, timestamp = EXCLUDED.timestamp, status = EXCLUDED.status,
            started_at = EXCLUDED.started_at,
            -- A step saved again moves to the end of the log (its id stays: it tells an
            -- insert from an update below).
            xid = EXCLUDED.xid
    RETURNING h.id, h.user_id, h.task_id, h.step, h.status, h.timestamp, h.started_at
), per_task AS (
    SELECT DISTINCT ON (w.user_id, w.task_id)
        w.user_id, w.task_id, w.status, w.step AS last_step, w.started_at,
        count(*) FILTER (WHERE w.id = k.id) OVER t AS added,
        min(w.timestamp) OVER t AS first_ts,
        max(w.timestamp) OVER t AS last_ts
    FROM written w
    JOIN keyed k ON k.user_id = w.user_id AND k.task_id = w.task_id AND k.step = w.step
    WINDOW t AS (PARTITION BY w.user_id, w.task_id)
    ORDER BY w.user_id, w.task_id, w.step DESC
), summary AS (
    INSERT INTO task_summary AS s
        (user_id, task_id, status, last_step, step_count, created_at, updated_at, started_at)
    SELECT user_id, task_id, status, last_step, added, first_ts, last_ts, started_at
    FROM per_task
"#,
            summary_merge!(),
            r#"    RETURNING 1
)
"#
        )
    };
}

/// Saves one or many steps: one statement, one round trip. Inputs are parallel arrays
/// (user_id, task_id, step, result, timestamp or NULL for now(), status), already
/// de-duplicated and sorted by key. Returns the refused task if any, and the rows written.
/// Each row written takes the transaction's position in the log of events (`xid`; see
/// migration 4). The task summaries touched are locked first, in key order; if any is cancelled nothing
/// is written and the refused task is returned. Each row carries its task's start time
/// (the partition key of the partitioned layout): the summary's for a known task, else the
/// earliest timestamp saved; a concurrent save that created the task first makes this one
/// fail with a serialization failure, which is retried.
pub const SAVE_STEPS: &str = concat!(
    r#"
WITH input AS (
    SELECT i.user_id, i.task_id, i.step, i.result, COALESCE(i.ts, now()) AS ts, i.status
    FROM unnest($1::text[], $2::text[], $3::int4[], $4::jsonb[], $5::timestamptz[], $6::text[])
        AS i(user_id, task_id, step, result, ts, status)
"#,
    save_body!(whole)
);

/// One step, with scalar parameters in [`SAVE_STEPS`]'s order and its outcome columns: the
/// same writes and rules, written for one row (no window functions, no grouping: a
/// quarter faster than the array statement with one element, measured with pgbench in
/// `docs/performance.md`). The planner knows it writes one row, so PostgreSQL settles on
/// the cached generic plan instead of planning the statement again at every call.
pub const SAVE_STEP: &str = concat!(
    r#"
WITH input AS (
    SELECT $1::text AS user_id, $2::text AS task_id, $3::int4 AS step, $4::jsonb AS result,
           COALESCE($5::timestamptz, now()) AS ts, $6::text AS status
), queued AS MATERIALIZED (
    -- The task's queue, before any row lock (see SAVE_STEPS).
    SELECT count(pg_advisory_xact_lock(hashtextextended(task_id, hashtext(user_id)))) AS passed
    FROM input
), locked AS MATERIALIZED (
    SELECT t.status, t.started_at, q.passed
    FROM queued q CROSS JOIN input i
    JOIN task_summary t ON t.user_id = i.user_id AND t.task_id = i.task_id
    FOR UPDATE OF t
), keyed AS MATERIALIZED (
    -- The id drawn here tells an insert (this id) from an update (the row's older id).
    SELECT i.*, nextval('task_history_id_seq') AS id,
           COALESCE((SELECT started_at FROM locked), i.ts) AS started_at
    FROM input i
), written AS (
    INSERT INTO task_history AS h
        (id, user_id, task_id, step, result, timestamp, status, started_at)
    SELECT id, user_id, task_id, step, result, ts, status, started_at FROM keyed
    WHERE NOT EXISTS (SELECT 1 FROM locked WHERE status = 'cancelled')
    ON CONFLICT ON CONSTRAINT task_history_user_task_step_key DO UPDATE
        SET result = EXCLUDED.result, timestamp = EXCLUDED.timestamp, status = EXCLUDED.status,
            started_at = EXCLUDED.started_at, xid = EXCLUDED.xid
    RETURNING h.id, h.step, h.status, h.timestamp, h.started_at
), summary AS (
    INSERT INTO task_summary AS s
        (user_id, task_id, status, last_step, step_count, created_at, updated_at, started_at)
    SELECT k.user_id, k.task_id, w.status, w.step, (w.id = k.id)::int::int8, w.timestamp,
           w.timestamp, w.started_at
    FROM written w CROSS JOIN keyed k
"#,
    summary_merge!(),
    r#"    RETURNING 1
)
SELECT CASE WHEN l.status = 'cancelled' THEN i.user_id END AS refused_user,
       CASE WHEN l.status = 'cancelled' THEN i.task_id END AS refused_task,
       (SELECT count(*) FROM written) AS rows_written
FROM input i LEFT JOIN locked l ON true
"#
);

/// Combined single saves (callers queued for a connection, `combine/save.rs`): [`SAVE_STEPS`]'s
/// input, but a cancelled task refuses only its own rows; returns every refused task
/// (parallel arrays of user_id and task_id) and the rows written. The inputs are
/// de-duplicated by key (one caller's save per step).
pub const SAVE_COMBINED: &str = concat!(
    r#"
WITH input AS (
    SELECT i.user_id, i.task_id, i.step, i.result, COALESCE(i.ts, now()) AS ts, i.status
    FROM unnest($1::text[], $2::text[], $3::int4[], $4::jsonb[], $5::timestamptz[], $6::text[])
        AS i(user_id, task_id, step, result, ts, status)
"#,
    save_body!(each)
);

/// Creates the summaries of a `COPY` batch's tasks (inputs: per task, parallel arrays of
/// user_id, task_id, status of its highest step, highest step, step count, earliest and
/// latest step time, the times computed by the caller with the transaction's `now()` for
/// steps without one), but only when none of them exists: if one does, it inserts nothing.
/// A task created meanwhile by another writer is skipped (`claimed` then falls short and
/// the caller rolls back). The inserted rows are this transaction's until it commits, so
/// the tasks' steps can then be appended by `COPY` without conflict checks. Returns how
/// many were created.
pub const CLAIM_NEW_TASKS: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[],
                $6::timestamptz[], $7::timestamptz[])
        AS i(user_id, task_id, status, last_step, step_count, first_ts, last_ts)
), known AS (
    SELECT 1 FROM input i
    WHERE EXISTS (
        SELECT 1 FROM task_summary s WHERE s.user_id = i.user_id AND s.task_id = i.task_id
    )
    LIMIT 1
), claimed AS (
    INSERT INTO task_summary
        (user_id, task_id, status, last_step, step_count, created_at, updated_at, started_at)
    SELECT user_id, task_id, status, last_step, step_count, first_ts, last_ts, first_ts
    FROM input
    WHERE NOT EXISTS (SELECT 1 FROM known)
    ON CONFLICT (user_id, task_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM claimed) AS claimed, nextval('task_history_id_seq') AS seq
"#;

/// The transaction's time (`now()`): the time of a `COPY` batch's steps saved without one.
pub const TRANSACTION_TIME: &str = "SELECT now()";

/// The steps of tasks [`CLAIM_NEW_TASKS`] created, in binary `COPY` format. Each row
/// carries its user (a distributed table routes `COPY` rows by it).
pub const COPY_STEPS: &str = "COPY task_history (user_id, task_id, step, result, timestamp, status, started_at) FROM STDIN (FORMAT binary)";

/// The same rows as [`COPY_STEPS`], as one `INSERT` of parallel arrays (user_id, task_id,
/// step, result, timestamp, status, started_at): the bulk path of a store that declares its
/// users to row-level isolation, since PostgreSQL refuses `COPY FROM` into a table with
/// row-level security. Like `COPY`, no conflict check beyond the unique key's: the tasks are
/// the transaction's own, [`CLAIM_NEW_TASKS`] having just created them.
pub const INSERT_NEW_STEPS: &str = r#"
INSERT INTO task_history (user_id, task_id, step, result, timestamp, status, started_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::jsonb[], $5::timestamptz[],
                     $6::text[], $7::timestamptz[])
"#;

/// A task's steps in ascending order. Reached through the task's summary: the join on its
/// start time lets the partitioned layout read only the task's partition (run-time
/// pruning); on the plain layout it is one more primary-key probe.
pub const LOAD_HISTORY: &str = r#"
SELECT h.step, h.result, h.timestamp, h.status
FROM task_summary s
JOIN task_history h
    ON h.user_id = s.user_id AND h.task_id = s.task_id AND h.started_at = s.started_at
WHERE s.user_id = $1 AND s.task_id = $2
ORDER BY h.step
"#;

/// A task's current status.
pub const TASK_STATUS: &str = r#"
SELECT status FROM task_summary WHERE user_id = $1 AND task_id = $2
"#;

/// Several tasks' statuses at once (status checks of concurrent callers combined,
/// `combine/status.rs`): one row per task asked, `n` its place in the arrays, the status
/// `NULL` for a task with no step. Each is a primary-key probe (a subplan per task, which
/// no plan turns into a scan of the table).
pub const TASK_STATUSES: &str = r#"
SELECT k.n, (
    SELECT s.status FROM task_summary s
    WHERE s.user_id = k.user_id AND s.task_id = k.task_id
) AS status
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(user_id, task_id, n)
"#;

/// Cancels a task that exists and is not terminal: appends the cancellation entry after the
/// highest step and marks the summary, under the summary's row lock. Returns one row when
/// it cancelled, with the entry's step.
pub const CANCEL_TASK: &str = r#"
WITH k AS MATERIALIZED (
    SELECT $1::text AS user_id, $2::text AS task_id
), queued AS MATERIALIZED (
    -- The task's queue, as for saves (SAVE_STEPS).
    SELECT 1 AS queued
    FROM k, LATERAL (SELECT pg_advisory_xact_lock(hashtextextended(k.task_id, hashtext(k.user_id)))) l
), target AS MATERIALIZED (
    SELECT s.user_id, s.task_id, s.last_step, s.started_at
    FROM k
    CROSS JOIN queued
    JOIN task_summary s ON s.user_id = k.user_id AND s.task_id = k.task_id
    WHERE s.status NOT IN ('completed', 'cancelled', 'timed_out', 'failed')
      AND s.last_step < 2147483647
    FOR UPDATE OF s
), entry AS (
    INSERT INTO task_history (user_id, task_id, step, result, timestamp, status, started_at)
    SELECT user_id, task_id, last_step + 1, $3::jsonb, now(), 'cancelled', started_at
    FROM target
    RETURNING user_id, task_id, step, timestamp
), updated AS (
    UPDATE task_summary s
    SET status = 'cancelled', last_step = e.step, step_count = s.step_count + 1,
        updated_at = GREATEST(s.updated_at, e.timestamp),
        last_xid = CASE WHEN s.last_xid > pg_current_xact_id() THEN taskhistory_order_conflict()
                        ELSE pg_current_xact_id() END
    FROM entry e
    WHERE s.user_id = e.user_id AND s.task_id = e.task_id
    RETURNING e.step
)
SELECT step FROM updated
"#;

/// The first page of a user's tasks. Like every listing, its `LIMIT` is bound, never
/// written into the text: a cached generic plan made from a literal `LIMIT` sorts the
/// whole of a big user's tasks once most users are small (`docs/performance.md`, "Lists:
/// the literal `LIMIT` taken back").
pub const LIST_TASKS: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1
ORDER BY updated_at DESC, task_id DESC
LIMIT $2
"#;

/// A later page of a user's tasks.
pub const LIST_TASKS_AFTER: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1 AND (updated_at, task_id) < ($2, $3)
ORDER BY updated_at DESC, task_id DESC
LIMIT $4
"#;

/// The first page of a user's tasks in one status.
pub const LIST_TASKS_WITH_STATUS: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1 AND status = $2
ORDER BY updated_at DESC, task_id DESC
LIMIT $3
"#;

/// A later page of a user's tasks in one status.
pub const LIST_TASKS_WITH_STATUS_AFTER: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1 AND status = $2 AND (updated_at, task_id) < ($3, $4)
ORDER BY updated_at DESC, task_id DESC
LIMIT $5
"#;

/// A page of a user's tasks updated in `[$2, $3)` (a missing bound is NULL: unbounded), after
/// the cursor `($4, $5)` (NULLs for the first page). Every bound is an index condition on
/// `task_summary_user_activity`, in generic plans too, so a page reads at most as many
/// entries as its `LIMIT` (`limit` + 1). Each bound is a scalar subquery, computed once per
/// execution: under row-level isolation PostgreSQL takes a condition into the index search
/// only when it is leakproof, and `COALESCE` is not, while a comparison with a subquery's
/// value is.
pub const LIST_TASKS_IN_RANGE: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1
    AND updated_at >= (SELECT COALESCE($2::timestamptz, '-infinity'))
    AND updated_at < (SELECT COALESCE($3::timestamptz, 'infinity'))
    AND (updated_at, task_id) < ((SELECT COALESCE($4::timestamptz, 'infinity')),
                                 (SELECT COALESCE($5::text, '')))
ORDER BY updated_at DESC, task_id DESC
LIMIT $6
"#;

/// [`LIST_TASKS_IN_RANGE`] in one status: the same bounds, the same way, on
/// `task_summary_user_status_activity`.
pub const LIST_TASKS_WITH_STATUS_IN_RANGE: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE user_id = $1 AND status = $2
    AND updated_at >= (SELECT COALESCE($3::timestamptz, '-infinity'))
    AND updated_at < (SELECT COALESCE($4::timestamptz, 'infinity'))
    AND (updated_at, task_id) < ((SELECT COALESCE($5::timestamptz, 'infinity')),
                                 (SELECT COALESCE($6::text, '')))
ORDER BY updated_at DESC, task_id DESC
LIMIT $7
"#;

/// A page of a user's tasks whose id starts with a prefix: the ids in `[$2, $3)` (the prefix
/// and its successor, made by the store), read by a range of the primary key, then the
/// optional status ($4), activity range (`[$5, $6)`) and cursor (`($7, $8)`) as filters and a
/// top-N sort. The `OFFSET 0` keeps the planner from walking the activity index with the
/// prefix as a filter, which reads every task of the user when few match; this reads the
/// matching tasks only.
pub const LIST_TASKS_WITH_PREFIX: &str = r#"
SELECT task_id, status, last_step, step_count, created_at, updated_at
FROM (
    SELECT task_id, status, last_step, step_count, created_at, updated_at
    FROM task_summary
    WHERE user_id = $1 AND task_id >= $2 AND task_id < $3
    OFFSET 0
) matching
WHERE status = COALESCE($4::text, status)
    AND updated_at >= COALESCE($5::timestamptz, '-infinity')
    AND updated_at < COALESCE($6::timestamptz, 'infinity')
    AND (updated_at, task_id) < (COALESCE($7::timestamptz, 'infinity'), COALESCE($8::text, ''))
ORDER BY updated_at DESC, task_id DESC
LIMIT $9
"#;

/// A page of a user's steps in `(task_id, step)` order after a key (`''`, -1 for the
/// start): export scans. Walks the `(user_id, task_id, step)` unique index.
pub const SCAN_HISTORY: &str = r#"
SELECT task_id, step, result, timestamp
FROM task_history
WHERE user_id = $1 AND (task_id, step) > ($2, $3)
ORDER BY task_id, step
LIMIT $4
"#;

/// A page of one task's steps after a step number (-1 for the start); through the summary
/// like [`LOAD_HISTORY`].
pub const SCAN_TASK_HISTORY: &str = r#"
SELECT h.task_id, h.step, h.result, h.timestamp
FROM task_summary s
JOIN task_history h
    ON h.user_id = s.user_id AND h.task_id = s.task_id AND h.started_at = s.started_at
WHERE s.user_id = $1 AND s.task_id = $2 AND h.step > $3
ORDER BY h.step
LIMIT $4
"#;

/// Operator statistics: the oldest and newest `last_updated` of any task, each the end of
/// the retention index (no scan).
pub const STATS_ACTIVITY_RANGE: &str = r#"
SELECT (SELECT min(updated_at AT TIME ZONE 'UTC') FROM task_summary) AT TIME ZONE 'UTC'
           AS oldest_activity,
       (SELECT max(updated_at AT TIME ZONE 'UTC') FROM task_summary) AT TIME ZONE 'UTC'
           AS newest_activity
"#;

/// `task_counts`: a user's tasks per status, the sum of its slots (rule 10; kept by the
/// triggers of migration 6).
pub const TASK_COUNTS: &str = r#"
SELECT status, sum(tasks)::int8 AS tasks
FROM task_counts
WHERE user_id = $1
GROUP BY status
"#;

/// `task_activity`: a user's activity per hour from `$2` (inclusive) to `$3` (exclusive),
/// the hours with any, oldest first.
pub const TASK_ACTIVITY: &str = r#"
SELECT hour, sum(steps)::int8 AS steps, sum(completed)::int8 AS completed,
       sum(failed)::int8 AS failed, sum(cancelled)::int8 AS cancelled,
       sum(timed_out)::int8 AS timed_out
FROM task_activity
WHERE user_id = $1 AND hour >= $2 AND hour < $3
GROUP BY hour
HAVING sum(steps) + sum(completed) + sum(failed) + sum(cancelled) + sum(timed_out) > 0
ORDER BY hour
"#;

/// Operator: every user's tasks per status, kept like `task_counts` (no scan).
pub const TASK_TOTALS: &str = r#"
SELECT status, sum(tasks)::int8 AS tasks
FROM task_totals
GROUP BY status
"#;

/// Operator: the `$1` most recently updated failed or timed-out tasks of any user, newest
/// first; served by the partial index `task_summary_recent_failures` (migration 7), which
/// holds only those tasks in this order: the statement reads `$1` index entries.
pub const RECENT_FAILURES: &str = r#"
SELECT user_id, task_id, status, last_step, step_count, created_at, updated_at
FROM task_summary
WHERE status IN ('failed', 'timed_out')
ORDER BY updated_at DESC
LIMIT $1
"#;

/// Retention: removes up to `$2` rows of activity of the hours before the cleanup's cutoff
/// (`$1` days ago, cut to the hour); returns how many.
pub const ACTIVITY_TRIM: &str = r#"
WITH gone AS (
    DELETE FROM task_activity
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM task_activity
        WHERE hour < date_trunc('hour', now() - make_interval(days => $1), 'UTC')
        LIMIT $2
    ))
    RETURNING 1
)
SELECT count(*)::int8 AS trimmed FROM gone
"#;

/// Operator statistics: the size on disk of the store's tables (with TOAST) and indexes, in
/// the current schema (partitions of the partitioned layout included), and the planner's
/// row estimate.
pub const STATS_RELATIONS: &str = r#"
SELECT c.relname::text AS name,
       CASE WHEN c.relkind = 'i' THEN 'index' ELSE 'table' END AS kind,
       t.relname::text AS table_name,
       CASE WHEN c.relkind = 'i' THEN pg_relation_size(c.oid) ELSE pg_table_size(c.oid) END
           AS bytes,
       GREATEST(c.reltuples, 0)::int8 AS estimated_rows
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
JOIN pg_class t ON t.oid = COALESCE(i.indrelid, c.oid)
WHERE n.nspname = current_schema()
  AND c.relkind IN ('r', 'p', 'i')
  AND (t.relname IN ('task_history', 'task_summary', 'task_history_duplicates')
       OR (t.relispartition AND t.relname LIKE 'task\_history\_%'))
ORDER BY t.relname, c.relkind DESC, c.relname
"#;

/// Watchers: the notifier's session (a direct connection of its own). A notification is not
/// data: its commit need not wait for the disk, so PostgreSQL's notification lock is held
/// only for a moment.
pub const NOTIFY_SESSION: &str = "SET synchronous_commit TO off";

/// Reads: the session of a connection concurrent reads share (a direct connection). Every
/// read statement runs with its generic plan, planned once per connection (with isolation
/// off, the plan `taskhistory explain` shows): PostgreSQL would otherwise plan a listing at
/// every call (a bound `LIMIT`'s generic plan assumes a tenth of the user's rows and rarely
/// looks cheaper than a custom one, though it reads the same index).
pub const SHARED_READS_SESSION: &str = "SET plan_cache_mode TO force_generic_plan";

/// Watchers: what the notifier's transaction sets behind a transaction pooler (where a
/// session setting would not stay).
pub const NOTIFY_LOCAL: &str = "SET LOCAL synchronous_commit TO off";

/// Watchers: wake-ups of recent writes (payloads naming their users), sent by the store's
/// notifier in its own transaction (never a writer's), one notification per payload of at
/// most 7,900 bytes.
pub const NOTIFY_USERS: &str = r#"
SELECT count(pg_notify($1, p))::int8 AS sent FROM unnest($2::text[]) AS p
"#;

/// Watchers: the next events of several users at once (one per element of the arrays; the
/// log's one tail reads every watched user in one statement, a catching-up watcher its own).
/// For user `$1[i]` (only task `$2[i]` when not NULL): the step rows written by transactions
/// that snapshot `$3[i]` did not see and snapshot `$4[i]` (or, when NULL, this statement's
/// own) does, after position (`$5[i]`, `$6[i]`), in position order, at most `$7` per user;
/// `n` is `i`. Returns this statement's snapshot too (on a row of NULLs when there is no
/// event). Walks task_history_user_position from (`$5[i]`, `$6[i]`), which the caller puts
/// at or past the oldest transaction `$3[i]` did not see. The positions are cast to `xid8`
/// with the arrays, not in the condition: under row-level isolation a condition holding a
/// cast (not leakproof) would be a filter, not a bound of the index search.
pub const EVENTS_AFTER: &str = r#"
SELECT now.snapshot, e.n, e.task_id, e.step, e.status, e.timestamp, e.xid, e.id
FROM (SELECT pg_current_snapshot()::text AS snapshot) now
LEFT JOIN LATERAL (
    SELECT w.n, h.task_id, h.step, h.status, h.timestamp, h.xid::text AS xid, h.id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]::xid8[], $6::int8[])
         WITH ORDINALITY AS w(user_id, task_id, seen, upto, xid, id, n)
    CROSS JOIN LATERAL (
        SELECT h.task_id, h.step, h.status, h.timestamp, h.xid, h.id
        FROM task_history h
        WHERE h.user_id = w.user_id AND h.task_id = COALESCE(w.task_id, h.task_id)
          AND (h.xid, h.id) > (w.xid, w.id)
          AND NOT pg_visible_in_snapshot(h.xid, w.seen::pg_snapshot)
          AND pg_visible_in_snapshot(h.xid, COALESCE(w.upto::pg_snapshot, now.snapshot::pg_snapshot))
        ORDER BY h.xid, h.id
        LIMIT $7
    ) h
) e ON true
"#;

/// Watchers: the first positions of users. This statement's snapshot, and for each user
/// of `$1` (`n` is its place in the array) the transaction id of its newest step row that
/// the snapshot sees (NULL: none); a user's first position is that snapshot below just
/// past it (`watch/mod.rs`, "After a crash"). Walks task_history_user_position backwards
/// from the user's newest row.
pub const NEWEST_SEEN: &str = r#"
SELECT pg_current_snapshot()::text AS snapshot, w.n, (
    SELECT h.xid FROM task_history h
    WHERE h.user_id = w.user_id
    ORDER BY h.xid DESC
    LIMIT 1
)::text AS xid
FROM unnest($1::text[]) WITH ORDINALITY AS w(user_id, n)
"#;

/// Test schemas (feature `test-schema`): those made by `on_fresh_schema` (named
/// `th_test_<unix seconds>_...`) more than `$1` seconds ago, which a test that panicked
/// before `drop_schema` left behind; only the current role's (or a role it is a member
/// of), and only in the one transaction that gets the sweep's lock (parallel test
/// processes do not sweep at once).
pub const TEST_SCHEMAS_ABANDONED: &str = r#"
SELECT nspname AS name FROM pg_namespace
WHERE nspname ~ '^th_test_[0-9]+_[0-9]+_[0-9]+$'
  AND split_part(nspname, '_', 3)::int8 < extract(epoch FROM now())::int8 - $1
  AND pg_has_role(nspowner, 'USAGE')
  AND (SELECT pg_try_advisory_xact_lock(7261839))
"#;

/// Operator: whether `pg_stat_statements` is installed in this database.
pub const PG_STAT_STATEMENTS_PRESENT: &str = r#"
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')
   AND EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pg_stat_statements.max')
   AS present
"#;

/// Operator: the store's statements from `pg_stat_statements`, most total time first.
pub const PG_STAT_STATEMENTS_TOP: &str = r#"
SELECT query, calls, total_exec_time AS total_ms, mean_exec_time AS mean_ms, rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (query LIKE '%task_history%' OR query LIKE '%task_summary%')
ORDER BY total_exec_time DESC
LIMIT $1
"#;

/// One bounded batch of retention: up to `$3` whole tasks last active before now minus `$1`
/// days (only those in status `$2`, unless NULL), oldest first, skipping tasks a writer
/// holds. Written against the `task_summary_inactive_since` expression index (UTC
/// wall-clock time orders like the instant itself). Deletes their steps and summaries in one short transaction.
pub const CLEANUP_BATCH: &str = r#"
WITH doomed AS MATERIALIZED (
    SELECT user_id, task_id
    FROM task_summary
    WHERE (updated_at AT TIME ZONE 'UTC') < (now() - make_interval(days => $1)) AT TIME ZONE 'UTC'
      AND status = COALESCE($2::text, status)
    ORDER BY (updated_at AT TIME ZONE 'UTC')
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), steps AS (
    DELETE FROM task_history h USING doomed d
    WHERE h.user_id = d.user_id AND h.task_id = d.task_id
    RETURNING 1
), tasks AS (
    DELETE FROM task_summary s USING doomed d
    WHERE s.user_id = d.user_id AND s.task_id = d.task_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM tasks) AS tasks_removed, (SELECT count(*) FROM steps) AS steps_removed
"#;

/// Counts what a cleanup would remove (dry runs), with the same filters.
pub const CLEANUP_PREVIEW: &str = r#"
SELECT count(*) AS tasks_removed, COALESCE(sum(step_count), 0)::int8 AS steps_removed
FROM task_summary
WHERE (updated_at AT TIME ZONE 'UTC') < (now() - make_interval(days => $1)) AT TIME ZONE 'UTC'
  AND status = COALESCE($2::text, status)
"#;

/// Server version and whether the migrations table exists.
pub const HEALTH: &str = r#"
SELECT current_setting('server_version') AS server_version,
       to_regclass('__diesel_schema_migrations') IS NOT NULL AS migrated,
       to_regclass('task_history') IS NOT NULL AS history_table
"#;

/// Operator: the Python compatibility mode (`compat.rs`): when it was switched on, whether
/// its triggers are in place, the legacy writes seen, and the Python service's indexes
/// present (a Python start-up made them again while the mode was off).
pub const PYTHON_COMPAT_STATE: &str = r#"
SELECT (SELECT enabled_at FROM taskhistory_python_compat) AS enabled_at,
       EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = 'task_history'::regclass
                 AND tgname = 'taskhistory_python_update') AS triggers,
       (SELECT max(last_write) FROM taskhistory_python_writes) AS last_write,
       (SELECT COALESCE(sum(writes), 0)::int8 FROM taskhistory_python_writes) AS writes,
       ARRAY(SELECT c.relname::text FROM pg_class c
             WHERE c.relnamespace = (SELECT relnamespace FROM pg_class
                                     WHERE oid = 'task_history'::regclass)
               AND c.relkind IN ('i', 'I') AND c.relname LIKE 'idx\_task\_history\_%'
             ORDER BY 1) AS python_indexes
"#;

/// Every applied migration's version (to skip the locked migration path when nothing is
/// pending, so a role without DDL rights can start).
pub const APPLIED_MIGRATIONS: &str = r#"
SELECT version FROM __diesel_schema_migrations
"#;

/// The newest applied migration.
pub const SCHEMA_VERSION: &str = r#"
SELECT max(version) AS version FROM __diesel_schema_migrations
"#;

/// Partitioned layout: whether `task_history` is partitioned, and the table's comment
/// (which records the interval, `taskhistory: partitioned by month`).
pub const PARTITION_LAYOUT: &str = r#"
SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('task_history'))
           AS partitioned,
       (SELECT partition_interval FROM taskhistory_layout) AS interval
"#;

/// Partitioned layout: every partition of `task_history` with its range (NULL for the
/// default partition), size on disk and the planner's row estimate, oldest first. The
/// bounds are printed and read back in the same session, so time zone settings cancel out.
pub const PARTITION_LIST: &str = r#"
SELECT c.relname::text AS name,
       m.b[1]::timestamptz AS range_from,
       m.b[2]::timestamptz AS range_to,
       pg_table_size(c.oid) AS bytes,
       GREATEST(c.reltuples, 0)::int8 AS estimated_rows
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        'FROM \(''([^'']*)''\) TO \(''([^'']*)''\)') AS b
) m
WHERE i.inhparent = to_regclass('task_history')
ORDER BY range_from NULLS FIRST, name
"#;

/// Partitioned layout: the oldest task start (from which a conversion makes partitions).
pub const PARTITION_START_RANGE: &str = r#"
SELECT min(started_at) AS oldest FROM task_summary
"#;

/// Partition-drop retention, before any lock: whether a task started in [`$1`, `$2`) must
/// stay (active within `$3` days, or, with a status `$4`, in another status).
pub const PARTITION_KEEPS_TASKS: &str = r#"
SELECT EXISTS (
    SELECT 1 FROM task_summary
    WHERE started_at >= $1 AND started_at < $2
      AND NOT (updated_at < now() - make_interval(days => $3)
               AND status = COALESCE($4::text, status))
) AS kept
"#;

/// Partition-drop retention, with the partition locked against writes: removes the
/// summaries of its expired tasks (same filters), counting them and their steps.
pub const PARTITION_RETIRE_TASKS: &str = r#"
WITH gone AS (
    DELETE FROM task_summary
    WHERE started_at >= $1 AND started_at < $2
      AND updated_at < now() - make_interval(days => $3)
      AND status = COALESCE($4::text, status)
    RETURNING step_count
)
SELECT count(*) AS tasks_removed, COALESCE(sum(step_count), 0)::int8 AS steps_removed FROM gone
"#;

/// Partition-drop retention, first in the drop's transaction (after the partitions'
/// advisory lock, which every process's drop takes): whether the partition `$1` still
/// exists. Another process's cleanup, or this one's attempt whose `COMMIT` answer was lost,
/// may have dropped it since the candidates were listed. Read from `pg_class` with the
/// statement's snapshot, taken after the lock: a name lookup (`to_regclass`) could answer
/// from a reused backend's catalog cache, which has not yet taken in the drop.
pub const PARTITION_PRESENT: &str = r#"
SELECT EXISTS (
    SELECT 1 FROM pg_class
    WHERE relname = $1 AND relnamespace = current_schema()::regnamespace
) AS kept
"#;

/// Partition-drop retention: whether any task started in [`$1`, `$2`) is left (then the
/// partition stays and the transaction is rolled back).
pub const PARTITION_HAS_TASKS: &str = r#"
SELECT EXISTS (SELECT 1 FROM task_summary WHERE started_at >= $1 AND started_at < $2) AS kept
"#;

/// The tables that hold a user's rows: row-level isolation's policies are on each
/// (migration 8).
pub const ISOLATED_TABLES: [&str; 5] = [
    "task_history",
    "task_summary",
    "task_counts",
    "task_activity",
    "task_history_duplicates",
];

/// Row-level isolation's state, per table of [`ISOLATED_TABLES`] that exists: enabled,
/// forced, the store's policies there, and whether this role may do the cross-user work
/// (it is the owner or a member of it).
pub const ISOLATION_STATE: &str = r#"
SELECT c.relname::text AS table_name, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
       (SELECT count(*) FROM pg_policy p
        WHERE p.polrelid = c.oid AND p.polname IN ('taskhistory_user', 'taskhistory_maintenance'))::int4 AS policies,
       pg_has_role(c.relowner, 'USAGE') AS maintainer,
       (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.oid = c.relowner) AS owner_bypasses,
       (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user) AS role_bypasses
FROM unnest(ARRAY['task_history', 'task_summary', 'task_counts', 'task_activity',
                  'task_history_duplicates']) AS t(name)
JOIN pg_class c ON c.oid = to_regclass(t.name)
ORDER BY 1
"#;

/// What a transaction or a session declares to row-level isolation (migration 8's
/// policies read it): the users an operation may see and write, or the cross-user work.
pub mod declare {
    /// The one setting of a declaration: the declared users (a text array's literal), or
    /// `maintenance` (the cross-user work, which only the tables' owner's policy lets
    /// through). One setting, so that each declaration replaces the one before it whole.
    pub const DECLARED: &str = "taskhistory.declared";

    /// Declares `users` for the transaction (`local`) or the session: a `SET` whose text
    /// holds the users as a quoted array literal (a utility statement: nothing to plan; no
    /// parameters, so it can go in the same round trip as `BEGIN`, or ahead of the
    /// operation's own statement unanswered).
    pub fn users(array: &str, local: bool) -> String {
        format!("SET {}{DECLARED} = {}", scope(local), literal(array))
    }

    /// `users` as a text array's literal (what [`users`] declares, and what a read that
    /// declares inside its own statement binds).
    pub fn array<'u>(users: impl IntoIterator<Item = &'u str>) -> String {
        let mut array = String::from("{");
        for (i, user) in users.into_iter().enumerate() {
            if i > 0 {
                array.push(',');
            }
            array.push('"');
            for ch in user.chars() {
                if ch == '"' || ch == '\\' {
                    array.push('\\');
                }
                array.push(ch);
            }
            array.push('"');
        }
        array.push('}');
        array
    }

    /// Declares the cross-user work for the transaction (`local`) or the session.
    pub fn maintenance(local: bool) -> String {
        format!("SET {}{DECLARED} = maintenance", scope(local))
    }

    fn scope(local: bool) -> &'static str {
        if local {
            "LOCAL "
        } else {
            ""
        }
    }

    /// `text` as an escape string literal (`E'...'`): read the same whatever
    /// `standard_conforming_strings` says.
    fn literal(text: &str) -> String {
        let mut out = String::from("E'");
        for ch in text.chars() {
            match ch {
                '\'' => out.push_str("''"),
                '\\' => out.push_str("\\\\"),
                _ => out.push(ch),
            }
        }
        out.push('\'');
        out
    }
}

/// Partitioned layout DDL. Names and bounds are made by the store (`task_history_p`
/// followed by digits; UTC instants), never taken from input, so they are written into
/// the text; DDL cannot take bound values.
pub mod ddl {
    /// The partition that takes rows no ranged partition covers.
    pub const DEFAULT_PARTITION: &str = "task_history_default";

    /// Row-level isolation switched on (enabled and forced, so the tables' owner is held
    /// too) or off, on every table of [`ISOLATED_TABLES`](super::ISOLATED_TABLES), in the
    /// transaction the caller opens.
    pub fn isolation(on: bool) -> String {
        let (enable, force) = if on {
            ("ENABLE", "FORCE")
        } else {
            ("DISABLE", "NO FORCE")
        };
        super::ISOLATED_TABLES
            .iter()
            .map(|t| {
                format!(
                    "ALTER TABLE {t} {enable} ROW LEVEL SECURITY;\nALTER TABLE {t} {force} ROW LEVEL SECURITY;\n"
                )
            })
            .collect()
    }

    /// Serializes partition work across processes, inside its transaction.
    pub fn lock(schema: &str) -> String {
        format!(
            "SELECT pg_advisory_xact_lock(hashtextextended('taskhistory:partitions:{schema}', 0))"
        )
    }

    /// Sets the lock wait limit for the rest of the transaction.
    pub fn lock_timeout(millis: u128) -> String {
        format!("SET LOCAL lock_timeout = {millis}")
    }

    /// Stops writes into a partition (reads go on) until the transaction ends.
    pub fn lock_partition(name: &str) -> String {
        format!("LOCK TABLE {name} IN EXCLUSIVE MODE")
    }

    /// Drops a partition.
    pub fn drop_partition(name: &str) -> String {
        format!("DROP TABLE {name}")
    }

    /// A new partition for [`from`, `to`), made beside the table, filled with the rows of
    /// that range the default partition holds, then attached (which takes only a SHARE
    /// UPDATE EXCLUSIVE lock on the table: reads and writes go on).
    pub fn add_partition(name: &str, from: &str, to: &str) -> String {
        format!(
            "CREATE TABLE {name} (LIKE task_history INCLUDING DEFAULTS INCLUDING CONSTRAINTS);\n\
             WITH moved AS (\n\
                 DELETE FROM {DEFAULT_PARTITION} WHERE started_at >= '{from}' AND started_at < '{to}'\n\
                 RETURNING *\n\
             ) INSERT INTO {name} SELECT * FROM moved;\n\
             ALTER TABLE task_history ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}');"
        )
    }

    /// The indexes the Python service's `_create_tables` makes. Migration 1 drops them (no
    /// statement of the store uses them; each costs every write); while the Python
    /// compatibility mode is on, a view holds each name, so that a restarted Python service's
    /// `CREATE INDEX IF NOT EXISTS` skips it.
    pub const PYTHON_INDEXES: [&str; 6] = [
        "idx_task_history_user_id",
        "idx_task_history_task_id",
        "idx_task_history_status",
        "idx_task_history_timestamp",
        "idx_task_history_user_task",
        "idx_task_history_user_timestamp",
    ];

    /// Drops the Python service's indexes where they are, then (when `placeholders`) holds
    /// their names with views.
    fn python_index_names(placeholders: bool) -> String {
        let names = PYTHON_INDEXES
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "DO $names$\n\
             DECLARE n text; k \"char\";\n\
             BEGIN\n\
                 FOREACH n IN ARRAY ARRAY[{names}] LOOP\n\
                     SELECT c.relkind INTO k FROM pg_class c\n\
                     WHERE c.relname = n AND c.relnamespace = current_schema()::regnamespace;\n\
                     IF k IN ('i', 'I') THEN EXECUTE format('DROP INDEX %I', n); k := NULL; END IF;\n\
                     IF k = 'v' AND NOT {placeholders} THEN EXECUTE format('DROP VIEW %I', n); END IF;\n\
                     IF k IS NULL AND {placeholders} THEN\n\
                         EXECUTE format('CREATE VIEW %I AS SELECT %L::text AS placeholder', n,\n\
                             'holds this name while the Python compatibility mode is on, so that '\n\
                             'the Python start-up does not make this index again (taskhistory compat off '\n\
                             'removes it)');\n\
                     END IF;\n\
                 END LOOP;\n\
             END $names$;\n"
        )
    }

    /// Switches the Python compatibility mode on (`compat.rs` says what each part does), or
    /// makes it again: `insert_on` is where the insert trigger goes (the plain table, or the
    /// default partition, where every row of a Python INSERT lands), `save_step` the store's
    /// single-save statement (the legacy INSERT runs it, so both sides write by one rule),
    /// `channel` the watchers' notification channel (a plain identifier made by the store).
    pub fn python_compat_on(save_step: &str, channel: &str, insert_on: &str) -> String {
        let wrote = format!(
            "INSERT INTO taskhistory_python_writes AS w (backend_pid, last_write, writes)\n\
             VALUES (pg_backend_pid(), clock_timestamp(), 1)\n\
             ON CONFLICT (backend_pid) DO UPDATE\n\
                 SET last_write = EXCLUDED.last_write, writes = w.writes + 1;\n\
             SELECT pg_notify('{channel}', json_build_array($1)::text);"
        );
        let mut sql = format!(
            r#"DO $compat$
DECLARE
    -- SECURITY DEFINER functions read their objects from the store's schema only.
    path text := format('%I, pg_temp', current_schema());
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION taskhistory_python_save(text, text, int4, jsonb, timestamptz, text)
        RETURNS TABLE (refused_user text, refused_task text, rows_written int8)
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = %s AS %L', path,
        $save${save_step}$save$);
    EXECUTE format('CREATE OR REPLACE FUNCTION taskhistory_python_wrote(text) RETURNS void
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = %s AS %L', path,
        $wrote${wrote}$wrote$);
    EXECUTE format('CREATE OR REPLACE FUNCTION taskhistory_python_insert() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %s AS %L', path, $insert$
DECLARE
    r record;
BEGIN
    -- A legacy INSERT is the store's save of that step: it replaces a step saved before
    -- (the Python service inserts a retried step again), takes the task's start, keeps the
    -- summary and is refused by a cancelled task.
    SELECT * INTO r FROM taskhistory_python_save(NEW.user_id, NEW.task_id, NEW.step,
                                                 NEW.result, NEW.timestamp, NEW.status);
    IF r.refused_user IS NOT NULL THEN
        RAISE EXCEPTION 'task % of user % is cancelled: taskhistory refuses later writes to it',
            quote_literal(NEW.task_id), quote_literal(NEW.user_id)
            USING ERRCODE = 'check_violation',
                  HINT = 'cancellation is sticky; start a new task instead';
    END IF;
    PERFORM taskhistory_python_wrote(NEW.user_id);
    -- The row was written by the save above: this one is dropped.
    RETURN NULL;
END
$insert$);
    EXECUTE format('CREATE OR REPLACE FUNCTION taskhistory_python_update() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %s AS %L', path, $update$
DECLARE
    s record;
BEGIN
    IF OLD.xid = pg_current_xact_id() THEN
        -- Written by this transaction already (a store statement writing a step twice).
        RETURN NEW;
    END IF;
    IF (NEW.user_id, NEW.task_id, NEW.step, NEW.started_at)
       IS DISTINCT FROM (OLD.user_id, OLD.task_id, OLD.step, OLD.started_at) THEN
        RAISE EXCEPTION 'a step''s user_id, task_id, step and started_at cannot be changed'
            USING ERRCODE = 'check_violation';
    END IF;
    -- The task's queue and summary lock, as for the store's writes.
    PERFORM pg_advisory_xact_lock(hashtextextended(NEW.task_id, hashtext(NEW.user_id)));
    SELECT t.status, t.last_step INTO s FROM task_summary t
    WHERE t.user_id = NEW.user_id AND t.task_id = NEW.task_id
    FOR UPDATE;
    IF FOUND THEN
        IF s.status = 'cancelled' AND NEW.status <> 'cancelled' THEN
            RAISE EXCEPTION 'task % of user % is cancelled: taskhistory refuses later writes to it',
                quote_literal(NEW.task_id), quote_literal(NEW.user_id)
                USING ERRCODE = 'check_violation',
                      HINT = 'cancellation is sticky; start a new task instead';
        END IF;
        -- A row set to cancelled (the Python mark_task_as_cancelled) cancels the task, as
        -- the store's cancellation does; any other change is a save of that step.
        UPDATE task_summary t SET
            status = CASE WHEN NEW.status = 'cancelled' THEN 'cancelled'
                          WHEN NEW.step >= t.last_step THEN NEW.status
                          ELSE t.status END,
            updated_at = GREATEST(t.updated_at, NEW.timestamp,
                                  CASE WHEN NEW.status = 'cancelled' AND t.status <> 'cancelled'
                                       THEN now() END),
            -- The row lock came before the queue here: a legacy update may be numbered
            -- before a writer that committed first. It is not refused for that (the
            -- Python service would not retry): watchers still get it once.
            last_xid = GREATEST(t.last_xid, pg_current_xact_id())
        WHERE t.user_id = NEW.user_id AND t.task_id = NEW.task_id;
    END IF;
    -- The changed step moves to the end of the log: watchers see it. A cancel changes
    -- every row of the task: only the highest moves (one cancellation event, as the
    -- store's own cancellation gives).
    IF NEW.status <> 'cancelled' OR s IS NULL OR NEW.step >= s.last_step THEN
        NEW.xid := pg_current_xact_id();
    END IF;
    PERFORM taskhistory_python_wrote(NEW.user_id);
    RETURN NEW;
END
$update$);
END $compat$;
DROP TRIGGER IF EXISTS taskhistory_python_insert ON {insert_on};
-- Only rows that name no start: the store's statements always give one.
CREATE TRIGGER taskhistory_python_insert BEFORE INSERT ON {insert_on}
    FOR EACH ROW WHEN (NEW.started_at IS NULL) EXECUTE FUNCTION taskhistory_python_insert();
DROP TRIGGER IF EXISTS taskhistory_python_update ON task_history;
-- Only updates that leave the log position as it was: the store's own re-saves move it.
CREATE TRIGGER taskhistory_python_update BEFORE UPDATE ON task_history
    FOR EACH ROW WHEN (OLD.xid = NEW.xid) EXECUTE FUNCTION taskhistory_python_update();
-- SECURITY DEFINER functions run with the owner's rights: only the triggers call them.
REVOKE EXECUTE ON FUNCTION taskhistory_python_save(text, text, int4, jsonb, timestamptz, text),
    taskhistory_python_wrote(text), taskhistory_python_insert(), taskhistory_python_update()
    FROM PUBLIC;
INSERT INTO taskhistory_python_compat (singleton, enabled_at) VALUES (true, now())
    ON CONFLICT (singleton) DO NOTHING;
"#
        );
        sql.push_str(&python_index_names(true));
        sql
    }

    /// Switches the Python compatibility mode off: its triggers, functions and placeholders
    /// go, and so do the Python service's indexes if a Python start-up made them again.
    pub fn python_compat_off() -> String {
        let mut sql = format!(
            "DROP TRIGGER IF EXISTS taskhistory_python_update ON task_history;\n\
             DROP TRIGGER IF EXISTS taskhistory_python_insert ON task_history;\n\
             DO $off$ BEGIN\n\
                 IF to_regclass('{DEFAULT_PARTITION}') IS NOT NULL THEN\n\
                     DROP TRIGGER IF EXISTS taskhistory_python_insert ON {DEFAULT_PARTITION};\n\
                 END IF;\n\
             END $off$;\n\
             DROP FUNCTION IF EXISTS taskhistory_python_insert();\n\
             DROP FUNCTION IF EXISTS taskhistory_python_update();\n\
             DROP FUNCTION IF EXISTS taskhistory_python_wrote(text);\n\
             DROP FUNCTION IF EXISTS taskhistory_python_save(text, text, int4, jsonb, timestamptz, text);\n\
             DELETE FROM taskhistory_python_compat;\n\
             TRUNCATE taskhistory_python_writes;\n"
        );
        sql.push_str(&python_index_names(false));
        sql
    }

    /// The conversion of the plain table into the partitioned layout, in one transaction
    /// the caller opens: writes wait while rows are copied (reads go on); `partitions` are
    /// (name, from, to) of the ranged partitions to create.
    pub fn convert(interval: &str, partitions: &[(String, String, String)]) -> String {
        let mut sql = String::from(
            "LOCK TABLE task_history IN EXCLUSIVE MODE;\n\
             ALTER TABLE task_history RENAME TO task_history_plain;\n\
             ALTER TABLE task_history_plain RENAME CONSTRAINT task_history_user_task_step_key\n\
                 TO task_history_plain_key;\n\
             -- The columns, their collations, defaults, NOT NULLs and checks are the migrated\n\
             -- table's own (the migrations are their one source); only the key gains the\n\
             -- partition column.\n\
             CREATE TABLE task_history (\n\
                 LIKE task_history_plain INCLUDING DEFAULTS INCLUDING CONSTRAINTS,\n\
                 CONSTRAINT task_history_user_task_step_key UNIQUE (user_id, task_id, step, started_at)\n\
             ) PARTITION BY RANGE (started_at);\n",
        );
        sql.push_str(&format!(
            "CREATE TABLE {DEFAULT_PARTITION} PARTITION OF task_history DEFAULT;\n"
        ));
        for (name, from, to) in partitions {
            sql.push_str(&format!(
                "CREATE TABLE {name} PARTITION OF task_history FOR VALUES FROM ('{from}') TO ('{to}');\n"
            ));
        }
        sql.push_str(&format!(
            "INSERT INTO task_history (id, user_id, task_id, step, result, timestamp, status, started_at, xid)\n\
             SELECT h.id, h.user_id, h.task_id, h.step, h.result, h.timestamp, h.status,\n\
                    COALESCE(s.started_at, h.started_at, h.timestamp), h.xid\n\
             FROM task_history_plain h\n\
             LEFT JOIN task_summary s ON s.user_id = h.user_id AND s.task_id = h.task_id;\n\
             ALTER SEQUENCE task_history_id_seq OWNED BY task_history.id;\n\
             -- Row-level isolation's policies (migration 8), and its state, carried over.\n\
             SELECT taskhistory_isolate('task_history'::regclass);\n\
             DO $iso$ BEGIN\n\
                 IF (SELECT relrowsecurity FROM pg_class WHERE oid = 'task_history_plain'::regclass) THEN\n\
                     ALTER TABLE task_history ENABLE ROW LEVEL SECURITY;\n\
                     ALTER TABLE task_history FORCE ROW LEVEL SECURITY;\n\
                 END IF;\n\
             END $iso$;\n\
             DROP TABLE task_history_plain;\n\
             CREATE INDEX task_history_user_position ON task_history (user_id, xid, id);\n\
             CREATE INDEX IF NOT EXISTS task_summary_started_at ON task_summary (started_at);\n\
             INSERT INTO taskhistory_layout (singleton, partition_interval) VALUES (true, '{interval}')\n\
                 ON CONFLICT (singleton) DO UPDATE SET partition_interval = EXCLUDED.partition_interval;\n\
             ANALYZE task_history;\n"
        ));
        sql
    }
}

/// A statement with its bound values, sent as a named prepared statement that diesel-async
/// caches per connection (keyed by the SQL text).
pub(crate) struct Statement {
    sql: &'static str,
    binds: Vec<Box<dyn QueryFragment<Pg> + Send + Sync>>,
    /// The users this read declares inside its own text (see [`declaring_in_statement`]).
    declared: Option<std::sync::Arc<str>>,
}

tokio::task_local! {
    /// The users (a text array's literal) that the reads run in this scope declare inside
    /// their own statements: set by the executor for reads on the connections concurrent
    /// reads share, under row-level isolation.
    static DECLARED_IN_STATEMENT: Option<std::sync::Arc<str>>;
}

/// Runs `work` with its reads declaring `users` inside their own statements: each read is
///
/// ```sql
/// SELECT q.* FROM (SELECT set_config('taskhistory.declared', $1, true) AS taskhistory_declared) d
/// CROSS JOIN LATERAL (SELECT s.* FROM (<the read>) s
///                     WHERE d.taskhistory_declared IS NOT NULL OFFSET 0) q
/// ```
///
/// The lateral subquery (kept apart by `OFFSET 0`) depends on `d`, so it runs after `d`'s
/// one row, whose `set_config` declares the users for this statement's own implicit
/// transaction only; the policies read the declaration at their first use, inside `q`.
/// One statement, one message: callers sharing a pipelined connection cannot interleave
/// between a declaration and its statement.
pub(crate) fn declaring_in_statement<F: std::future::Future>(
    users: Option<std::sync::Arc<str>>,
    work: F,
) -> impl std::future::Future<Output = F::Output> {
    // Not an `async fn`, which would hold `work` twice (see `session::declaring`).
    DECLARED_IN_STATEMENT.scope(users, work)
}

/// What the in-statement declaration wraps a read in (see [`declaring_in_statement`]).
const DECLARED_BEFORE: &str = "SELECT q.* FROM (SELECT set_config('taskhistory.declared', ";
const DECLARED_MIDDLE: &str =
    ", true) AS taskhistory_declared) d CROSS JOIN LATERAL (SELECT s.* FROM (\n";
const DECLARED_AFTER: &str = "\n) s WHERE d.taskhistory_declared IS NOT NULL OFFSET 0) q";

impl Statement {
    pub(crate) fn new(sql: &'static str) -> Self {
        Statement {
            sql,
            binds: Vec::new(),
            declared: None,
        }
    }

    /// Binds the next placeholder to `value` as SQL type `ST`.
    pub(crate) fn bind<ST, V>(mut self, value: V) -> Self
    where
        ST: Send + Sync + 'static,
        Pg: HasSqlType<ST>,
        V: ToSql<ST, Pg> + Send + Sync + 'static,
    {
        self.binds.push(Box::new(Bind::<ST, V> {
            value,
            _st: PhantomData,
        }));
        self
    }

    /// Runs the statement and reads its rows, on a connection of its own or on one shared
    /// by concurrent reads (`&AsyncPgConnection`: pipelined).
    pub(crate) async fn fetch<T, C>(mut self, conn: &mut C) -> QueryResult<Vec<T>>
    where
        C: AsyncConnectionCore<Backend = Pg> + Send,
        T: Send + 'static,
        Self: LoadQuery<'static, C, T>,
    {
        self.declared = DECLARED_IN_STATEMENT.try_with(Clone::clone).ok().flatten();
        RunQueryDsl::load(self, conn).await
    }
}

struct Bind<ST, V> {
    value: V,
    _st: PhantomData<ST>,
}

impl<ST, V> QueryFragment<Pg> for Bind<ST, V>
where
    Pg: HasSqlType<ST>,
    V: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, V>(&self.value)
    }
}

/// Splits SQL at `$n` placeholders. Runs on every call (diesel walks a query several times),
/// so it jumps from `$` to `$` (a word-at-a-time search) instead of looking at every byte.
fn segments(sql: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut from = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while let Some(offset) = sql[from..].find('$') {
            let dollar = from + offset;
            let digits = sql[dollar + 1..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            from = dollar + 1 + digits;
            if digits > 0 {
                let seg = &sql[start..dollar];
                start = from;
                return Some(seg);
            }
        }
        done = true;
        Some(&sql[start..])
    })
}

impl QueryFragment<Pg> for Statement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        if let Some(users) = &self.declared {
            out.push_sql(DECLARED_BEFORE);
            out.push_bind_param::<diesel::sql_types::Text, str>(users)?;
            out.push_sql(DECLARED_MIDDLE);
        }
        let mut binds = self.binds.iter();
        for (i, seg) in segments(self.sql).enumerate() {
            if i > 0 {
                match binds.next() {
                    Some(b) => b.walk_ast(out.reborrow())?,
                    None => {
                        return Err(diesel::result::Error::QueryBuilderError(
                            format!(
                                "statement has more placeholders than the {} values bound",
                                self.binds.len()
                            )
                            .into(),
                        ))
                    }
                }
            }
            out.push_sql(seg);
        }
        if binds.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                "more values bound than placeholders".into(),
            ));
        }
        if self.declared.is_some() {
            out.push_sql(DECLARED_AFTER);
        }
        Ok(())
    }
}

impl QueryId for Statement {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Statement {
    type SqlType = Untyped;
}

/// The primary's WAL insert position (`replica.rs`): every commit that returned before this
/// statement was sent has its commit record below it. Text, as PostgreSQL writes an LSN.
pub const WAL_INSERT_POSITION: &str = "SELECT pg_current_wal_insert_lsn()::text AS lsn";

/// A replica's state (`replica.rs`): whether it still replays (a promoted server does not),
/// and the end of the last WAL record it replayed (`NULL` on a server never in recovery).
pub const REPLICA_POSITION: &str =
    "SELECT pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn()::text AS replayed";

/// The statements of [`ALL_STATEMENTS`] that do not filter on `user_id` (they may go to
/// every shard): retention, migrations, watchers' position, notifications and operator tools.
pub const NOT_PER_USER: &[&str] = &[
    "cleanup_batch",
    "cleanup_preview",
    "health",
    "schema_version",
    "applied_migrations",
    "stats_activity_range",
    "task_totals",
    "recent_failures",
    "activity_trim",
    "stats_relations",
    "partition_layout",
    "partition_list",
    "partition_start_range",
    "partition_keeps_tasks",
    "partition_retire_tasks",
    "partition_has_tasks",
    "partition_present",
    "notify_users",
    "transaction_time",
    "python_compat_state",
    "test_schemas_abandoned",
    "isolation_state",
    "wal_insert_position",
    "replica_position",
];

/// Every statement, for tests and tools (`taskhistory explain`, the benches' baseline).
pub const ALL_STATEMENTS: &[(&str, &str)] = &[
    ("test_schemas_abandoned", TEST_SCHEMAS_ABANDONED),
    ("save_steps", SAVE_STEPS),
    ("save_step", SAVE_STEP),
    ("save_combined", SAVE_COMBINED),
    ("claim_new_tasks", CLAIM_NEW_TASKS),
    ("copy_steps", COPY_STEPS),
    ("insert_new_steps", INSERT_NEW_STEPS),
    ("transaction_time", TRANSACTION_TIME),
    ("load_history", LOAD_HISTORY),
    ("task_status", TASK_STATUS),
    ("task_statuses", TASK_STATUSES),
    ("cancel_task", CANCEL_TASK),
    ("list_tasks", LIST_TASKS),
    ("list_tasks_after", LIST_TASKS_AFTER),
    ("list_tasks_with_status", LIST_TASKS_WITH_STATUS),
    ("list_tasks_with_status_after", LIST_TASKS_WITH_STATUS_AFTER),
    ("list_tasks_in_range", LIST_TASKS_IN_RANGE),
    (
        "list_tasks_with_status_in_range",
        LIST_TASKS_WITH_STATUS_IN_RANGE,
    ),
    ("list_tasks_with_prefix", LIST_TASKS_WITH_PREFIX),
    ("scan_history", SCAN_HISTORY),
    ("scan_task_history", SCAN_TASK_HISTORY),
    ("stats_activity_range", STATS_ACTIVITY_RANGE),
    ("task_counts", TASK_COUNTS),
    ("task_activity", TASK_ACTIVITY),
    ("task_totals", TASK_TOTALS),
    ("recent_failures", RECENT_FAILURES),
    ("activity_trim", ACTIVITY_TRIM),
    ("stats_relations", STATS_RELATIONS),
    ("cleanup_batch", CLEANUP_BATCH),
    ("cleanup_preview", CLEANUP_PREVIEW),
    ("health", HEALTH),
    ("schema_version", SCHEMA_VERSION),
    ("applied_migrations", APPLIED_MIGRATIONS),
    ("events_after", EVENTS_AFTER),
    ("newest_seen", NEWEST_SEEN),
    ("notify_users", NOTIFY_USERS),
    ("python_compat_state", PYTHON_COMPAT_STATE),
    ("partition_layout", PARTITION_LAYOUT),
    ("partition_list", PARTITION_LIST),
    ("partition_start_range", PARTITION_START_RANGE),
    ("partition_keeps_tasks", PARTITION_KEEPS_TASKS),
    ("partition_retire_tasks", PARTITION_RETIRE_TASKS),
    ("partition_has_tasks", PARTITION_HAS_TASKS),
    ("partition_present", PARTITION_PRESENT),
    ("isolation_state", ISOLATION_STATE),
    ("wal_insert_position", WAL_INSERT_POSITION),
    ("replica_position", REPLICA_POSITION),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_used_once_in_order() {
        for (name, sql) in ALL_STATEMENTS {
            let mut expected = 1;
            let mut rest = *sql;
            while let Some(pos) = rest.find('$') {
                let digits: String = rest[pos + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if !digits.is_empty() {
                    assert_eq!(digits.parse::<usize>().unwrap(), expected, "{name}");
                    expected += 1;
                }
                rest = &rest[pos + 1..];
            }
            assert_eq!(segments(sql).count(), expected, "{name}");
        }
    }

    #[test]
    fn every_statement_but_the_listed_few_filters_on_user_id() {
        for (name, sql) in ALL_STATEMENTS {
            if NOT_PER_USER.contains(name) {
                continue;
            }
            assert!(sql.contains("user_id"), "{name}");
        }
        for name in NOT_PER_USER {
            assert!(
                ALL_STATEMENTS.iter().any(|(n, _)| n == name),
                "{name} is listed but is no statement"
            );
        }
    }
}
