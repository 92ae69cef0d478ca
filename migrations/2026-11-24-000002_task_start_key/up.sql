-- taskhistory schema, version 2: every task gets a fixed start time, carried on each of its
-- step rows. It is the partition key of the partitioned layout (`taskhistory partitions
-- convert`): all of a task's steps share it, so they always live in one partition, and a
-- partition is dropped only with whole tasks.
--
-- The summary, one row per task, is filled from created_at; every existing step row then
-- takes its task's value. On a large adopted table this rewrites the history once (about
-- as long as version 1's column changes); a new database has nothing to fill. Reads of one
-- task join the summary on (user_id, task_id, started_at), which lets the partitioned
-- layout touch only the task's partition.

ALTER TABLE task_summary ADD COLUMN started_at TIMESTAMPTZ;
UPDATE task_summary SET started_at = created_at;
ALTER TABLE task_summary ALTER COLUMN started_at SET NOT NULL;

ALTER TABLE task_history ADD COLUMN started_at TIMESTAMPTZ;
UPDATE task_history h SET started_at = s.started_at
FROM task_summary s
WHERE s.user_id = h.user_id AND s.task_id = h.task_id;
-- Rows of no task (none are made by the store) keep their own time.
UPDATE task_history SET started_at = timestamp WHERE started_at IS NULL;
ALTER TABLE task_history ALTER COLUMN started_at SET NOT NULL;

-- Two saves that both create the same task pick their start times independently; the one
-- that commits second finds the other's summary and calls this: a serialization failure,
-- which the store retries, and the retry reads the first one's start time.
CREATE FUNCTION taskhistory_start_conflict() RETURNS TIMESTAMPTZ
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RAISE EXCEPTION 'a concurrent save created this task first'
        USING ERRCODE = 'serialization_failure';
END
$fn$;

-- Cleanup's index orders by an expression of updated_at, not updated_at itself: with a plain
-- (updated_at) index, the generic plan of a user's task list could walk every user's recent
-- activity backwards, filtering on user_id (cheap-looking because updated_at follows the
-- heap's order), a cost that grows with the whole table. Now only the per-user activity
-- indexes can give the list its order.
DROP INDEX IF EXISTS task_summary_updated_at;
CREATE INDEX task_summary_inactive_since ON task_summary ((updated_at AT TIME ZONE 'UTC'));
