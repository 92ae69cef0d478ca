-- taskhistory schema, version 9: removals counted in fewer rows.
--
-- Tasks removed (cleanup batches, partition drops) are now taken off each (user, status)
-- in one counter row, slot 0, instead of the slot of each removed task (up to 16 per user
-- and status; 64 for the totals). Sums do not care which slot a change went to (migration
-- 6); a removal is maintenance, not one of a user's concurrent writers, so spreading it
-- bought nothing and cost one upserted row per (user, status, slot) in every batch: a
-- batch of 1,000 tasks of 100 users, one status each, wrote about 760 counter rows, now
-- 100 (the totals: about 116, now one per status). Slot 0 stays within the UPDATE and
-- DELETE triggers' slots (0-15), so the global order of counter rows (migration 6) holds.
--
-- The rows of a user's status that sum to zero are still removed, but only those rows are
-- locked to do it: the statuses that sum to zero are found first without a lock. Before,
-- every counter row of every user of the batch was locked (and its lock written) to find
-- them.
DO $do$
DECLARE
    schema text := format('%I.', current_schema());
BEGIN
    EXECUTE replace($def$CREATE OR REPLACE FUNCTION taskhistory_count_deleted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_summaries) THEN
        RETURN NULL;
    END IF;
    INSERT INTO @.task_counts AS c (user_id, status, slot, tasks)
    SELECT user_id, status, 0::int2, -count(*)
    FROM old_summaries GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (user_id, status, slot) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    INSERT INTO @.task_totals AS t (status, slot, tasks)
    SELECT status, 0::int2, -count(*)
    FROM old_summaries GROUP BY 1 ORDER BY 1
    ON CONFLICT (status, slot) DO UPDATE SET tasks = t.tasks + EXCLUDED.tasks;
    -- A user whose tasks of a status are gone leaves no rows of it behind: rows that sum
    -- to zero go (any such set can go: the sums stay). The statuses that sum to zero are
    -- found without locks; their rows are then locked and summed again, and rows a writer
    -- holds are left for a later cleanup: this never waits, so it never closes a cycle of
    -- waits.
    WITH emptied AS (
        -- Every status of the removed tasks' users, not only the removed tasks' statuses:
        -- a task that went from running to completed left rows of `running` that sum to
        -- zero.
        SELECT z.user_id, z.status FROM @.task_counts z
        WHERE z.user_id IN (SELECT DISTINCT user_id FROM old_summaries)
        GROUP BY 1, 2 HAVING sum(z.tasks) = 0
    ), held AS (
        SELECT z.ctid, z.user_id, z.status, z.tasks FROM @.task_counts z
        WHERE (z.user_id, z.status) IN (SELECT user_id, status FROM emptied)
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
