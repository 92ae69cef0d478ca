-- taskhistory schema, version 4: every write is an event with a position.
--
-- A step row carries the position of its last write: the writing transaction's id (`xid`,
-- 64-bit, never wraps) and the row's `id`, a new one at every write (a step saved again
-- moves to the end of the log). Watchers read a user's rows by position
-- (task_history_user_position) after a cursor: the rows a snapshot of the database did not
-- see and a newer one does, in (xid, id) order. Rows written before this migration take
-- position 0: they are history, never events.
--
-- The summary remembers the transaction of its task's last write (`last_xid`). A write
-- whose transaction id is lower than that (it was given its id before the one that
-- committed first, then waited for the task's lock) fails with a serialization failure and
-- is retried by the store with a new id: per task, the order of positions is the order of
-- commits.

ALTER TABLE task_history ADD COLUMN xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE task_history ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX task_history_user_position ON task_history (user_id, xid, id);

ALTER TABLE task_summary ADD COLUMN last_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE task_summary ALTER COLUMN last_xid SET DEFAULT pg_current_xact_id();

-- The statements' guard: called when a write would put a task's positions out of commit
-- order (see above).
CREATE FUNCTION taskhistory_order_conflict() RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RAISE EXCEPTION 'a concurrent write to this task committed first'
        USING ERRCODE = 'serialization_failure';
END
$fn$;
