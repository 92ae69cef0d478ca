-- taskhistory schema, version 6: counts and activity kept by the writes.
--
-- Every change of a task's summary (a new task, a status changed, steps added, a task
-- removed) is counted in the same transaction by statement-level triggers on
-- task_summary, whatever made it: the store's saves, batches (upsert and COPY), cancels,
-- cleanup, partition drops, the Python compatibility mode's writes. A batch is counted
-- by one grouped statement, not row by row. Reads sum a bounded number of rows: no count
-- is ever a scan of the history.
--
-- Each counter is spread over slots chosen by the task's id, so concurrent writers of one
-- user's different tasks rarely update the same row; a reader sums a user's slots. A task
-- is counted by one trigger run per statement and kind of change, each writing its rows
-- in key order. A statement that both updates and creates tasks (an upsert: a combined
-- save, a batch) runs the UPDATE trigger, then the INSERT trigger; so that two such
-- statements always take their counter rows in one global order (and never deadlock),
-- the UPDATE and DELETE triggers count in slots 0-15 (totals 0-63) and the INSERT
-- trigger in slots 16-31 (totals 64-127): a statement's rows come in the order (group,
-- table, key). Sums do not care which slot a change went to. (A batch of more than
-- 10,000 rows is several statements in one transaction; those can still meet another
-- writer in a cycle, which PostgreSQL detects and the store retries.)
--
-- Creating the triggers locks task_summary against writes until the counts of what exists
-- are made (three grouped reads of the summaries): on a large adopted table, writes wait
-- that long, once.

-- Tasks per status, per user: task_counts(user_id), O(1).
CREATE TABLE task_counts (
    user_id TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    slot SMALLINT NOT NULL,
    tasks BIGINT NOT NULL,
    PRIMARY KEY (user_id, status, slot)
);

-- Tasks per status, of every user: the operators' totals (`taskhistory stats`).
CREATE TABLE task_totals (
    status TEXT NOT NULL,
    slot SMALLINT NOT NULL,
    tasks BIGINT NOT NULL,
    PRIMARY KEY (status, slot)
);

-- Per user and hour (of the task's updated_at after the write, UTC): steps added, tasks
-- that reached each terminal status. Retention trims it by hour.
CREATE TABLE task_activity (
    user_id TEXT COLLATE "C" NOT NULL,
    hour TIMESTAMPTZ NOT NULL,
    slot SMALLINT NOT NULL,
    steps BIGINT NOT NULL,
    completed BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    cancelled BIGINT NOT NULL,
    timed_out BIGINT NOT NULL,
    PRIMARY KEY (user_id, hour, slot)
);
CREATE INDEX task_activity_hour ON task_activity (hour);

-- New tasks count in their status, their steps and (when terminal) their status in the
-- hour's activity. Tasks written again: a status that changed moves the task's count;
-- steps added and a terminal status reached are the hour's activity. Tasks removed
-- (cleanup, partition drops): their counts go; activity stays until retention trims its
-- hours.
--
-- The functions name the store's tables with its schema: a trigger fires in the session of
-- whoever writes, whatever that session's search_path (an operator's psql, a Python service).
DO $do$
DECLARE
    schema text := format('%I.', current_schema());
BEGIN
    EXECUTE replace($def$CREATE FUNCTION taskhistory_count_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_summaries) THEN
        RETURN NULL;
    END IF;
    INSERT INTO @.task_counts AS c (user_id, status, slot, tasks)
    SELECT user_id, status, (16 + (hashtext(task_id) & 15))::int2, count(*)
    FROM new_summaries GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, status, slot) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    INSERT INTO @.task_totals AS t (status, slot, tasks)
    SELECT status, (64 + (hashtext(task_id) & 63))::int2, count(*)
    FROM new_summaries GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (status, slot) DO UPDATE SET tasks = t.tasks + EXCLUDED.tasks;
    INSERT INTO @.task_activity AS a
        (user_id, hour, slot, steps, completed, failed, cancelled, timed_out)
    SELECT user_id, date_trunc('hour', updated_at, 'UTC'), (16 + (hashtext(task_id) & 15))::int2,
           sum(step_count),
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled'),
           count(*) FILTER (WHERE status = 'timed_out')
    FROM new_summaries GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, hour, slot) DO UPDATE SET
        steps = a.steps + EXCLUDED.steps,
        completed = a.completed + EXCLUDED.completed,
        failed = a.failed + EXCLUDED.failed,
        cancelled = a.cancelled + EXCLUDED.cancelled,
        timed_out = a.timed_out + EXCLUDED.timed_out;
    RETURN NULL;
END
$fn$$def$, '@.', schema);
    EXECUTE replace($def$CREATE FUNCTION taskhistory_count_updated() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_summaries) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
               WHERE n.status <> o.status) THEN
        INSERT INTO @.task_counts AS c (user_id, status, slot, tasks)
        SELECT user_id, status, slot, sum(delta)
        FROM (SELECT n.user_id, n.status, (hashtext(n.task_id) & 15)::int2 AS slot, 1 AS delta
              FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
              WHERE n.status <> o.status
              UNION ALL
              SELECT o.user_id, o.status, (hashtext(o.task_id) & 15)::int2, -1
              FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
              WHERE n.status <> o.status) d
        GROUP BY 1, 2, 3 HAVING sum(delta) <> 0 ORDER BY 1, 2, 3
        ON CONFLICT (user_id, status, slot) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
        INSERT INTO @.task_totals AS t (status, slot, tasks)
        SELECT status, slot, sum(delta)
        FROM (SELECT n.status, (hashtext(n.task_id) & 63)::int2 AS slot, 1 AS delta
              FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
              WHERE n.status <> o.status
              UNION ALL
              SELECT o.status, (hashtext(o.task_id) & 63)::int2, -1
              FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
              WHERE n.status <> o.status) d
        GROUP BY 1, 2 HAVING sum(delta) <> 0 ORDER BY 1, 2
        ON CONFLICT (status, slot) DO UPDATE SET tasks = t.tasks + EXCLUDED.tasks;
    END IF;
    INSERT INTO @.task_activity AS a
        (user_id, hour, slot, steps, completed, failed, cancelled, timed_out)
    SELECT n.user_id, date_trunc('hour', n.updated_at, 'UTC'), (hashtext(n.task_id) & 15)::int2,
           sum(n.step_count - o.step_count),
           count(*) FILTER (WHERE n.status = 'completed' AND o.status <> 'completed'),
           count(*) FILTER (WHERE n.status = 'failed' AND o.status <> 'failed'),
           count(*) FILTER (WHERE n.status = 'cancelled' AND o.status <> 'cancelled'),
           count(*) FILTER (WHERE n.status = 'timed_out' AND o.status <> 'timed_out')
    FROM new_summaries n JOIN old_summaries o USING (user_id, task_id)
    WHERE n.step_count > o.step_count
       OR (n.status <> o.status AND n.status IN ('completed', 'failed', 'cancelled', 'timed_out'))
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, hour, slot) DO UPDATE SET
        steps = a.steps + EXCLUDED.steps,
        completed = a.completed + EXCLUDED.completed,
        failed = a.failed + EXCLUDED.failed,
        cancelled = a.cancelled + EXCLUDED.cancelled,
        timed_out = a.timed_out + EXCLUDED.timed_out;
    RETURN NULL;
END
$fn$$def$, '@.', schema);
    EXECUTE replace($def$CREATE FUNCTION taskhistory_count_deleted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_summaries) THEN
        RETURN NULL;
    END IF;
    INSERT INTO @.task_counts AS c (user_id, status, slot, tasks)
    SELECT user_id, status, (hashtext(task_id) & 15)::int2, -count(*)
    FROM old_summaries GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, status, slot) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    INSERT INTO @.task_totals AS t (status, slot, tasks)
    SELECT status, (hashtext(task_id) & 63)::int2, -count(*)
    FROM old_summaries GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (status, slot) DO UPDATE SET tasks = t.tasks + EXCLUDED.tasks;
    -- A user whose tasks of a status are gone leaves no rows of it behind: rows that sum
    -- to zero go (any such set can go: the sums stay). Rows a writer holds are left for a
    -- later cleanup: this never waits, so it never closes a cycle of waits.
    WITH held AS (
        SELECT z.ctid, z.user_id, z.status, z.tasks FROM @.task_counts z
        WHERE z.user_id IN (SELECT DISTINCT user_id FROM old_summaries)
        FOR UPDATE SKIP LOCKED
    ), spent AS (
        SELECT user_id, status FROM held GROUP BY 1, 2 HAVING sum(tasks) = 0
    )
    DELETE FROM @.task_counts c USING held h, spent s
    WHERE c.ctid = h.ctid AND h.user_id = s.user_id AND h.status = s.status;
    RETURN NULL;
END
$fn$$def$, '@.', schema);
END
$do$;



-- Locks task_summary until this migration commits: no write falls between the triggers
-- and the counts of what exists.
CREATE TRIGGER taskhistory_count_inserted AFTER INSERT ON task_summary
    REFERENCING NEW TABLE AS new_summaries
    FOR EACH STATEMENT EXECUTE FUNCTION taskhistory_count_inserted();
CREATE TRIGGER taskhistory_count_updated AFTER UPDATE ON task_summary
    REFERENCING OLD TABLE AS old_summaries NEW TABLE AS new_summaries
    FOR EACH STATEMENT EXECUTE FUNCTION taskhistory_count_updated();
CREATE TRIGGER taskhistory_count_deleted AFTER DELETE ON task_summary
    REFERENCING OLD TABLE AS old_summaries
    FOR EACH STATEMENT EXECUTE FUNCTION taskhistory_count_deleted();

-- An adopted or existing table is counted once, as if each task had been written by one
-- write at its last activity.
INSERT INTO task_counts (user_id, status, slot, tasks)
SELECT user_id, status, (hashtext(task_id) & 15)::int2, count(*)
FROM task_summary GROUP BY 1, 2, 3;
INSERT INTO task_totals (status, slot, tasks)
SELECT status, (hashtext(task_id) & 63)::int2, count(*)
FROM task_summary GROUP BY 1, 2;
INSERT INTO task_activity (user_id, hour, slot, steps, completed, failed, cancelled, timed_out)
SELECT user_id, date_trunc('hour', updated_at, 'UTC'), (hashtext(task_id) & 15)::int2,
       sum(step_count),
       count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'cancelled'),
       count(*) FILTER (WHERE status = 'timed_out')
FROM task_summary GROUP BY 1, 2, 3;

-- Roles that write the store's tables (least_privilege_grants) write the counts too (the
-- triggers run with the writer's rights); roles that only read them read the counts.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT grantee, bool_or(privilege_type = 'INSERT') AS writes
             FROM information_schema.role_table_grants
             WHERE table_schema = current_schema() AND table_name = 'task_summary'
               AND privilege_type IN ('SELECT', 'INSERT')
               AND grantee NOT IN ('PUBLIC', current_user)
             GROUP BY grantee
    LOOP
        EXECUTE format('GRANT %s ON task_counts, task_totals, task_activity TO %I',
                       CASE WHEN r.writes THEN 'SELECT, INSERT, UPDATE, DELETE' ELSE 'SELECT' END,
                       r.grantee);
    END LOOP;
END $$;
