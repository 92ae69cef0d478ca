-- Back to version 6's taskhistory_count_deleted: removals counted in each removed task's slot.
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
