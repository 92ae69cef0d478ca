-- taskhistory schema, version 11: the counts of an update of summaries are made without
-- joining its old rows to its new ones.
--
-- Version 6 joined the transition tables (`new_summaries JOIN old_summaries USING (user_id,
-- task_id)`). PL/pgSQL keeps a statement's plan for the session, made for the first update
-- it counted: on a pooled connection that is a single save's one row, and the plan a
-- nested loop. A later statement updating many summaries on that connection (a batch of
-- steps of known tasks) then compared every new row with every old one: 16,000 summaries
-- took 63 s instead of 1 s. Now:
-- - the counts by status need no pairs at all: each new row adds one to its status, each
--   old row takes one from its own, and the statuses that did not change cancel out;
-- - whether any status changed is `EXCEPT ALL` of the two sets;
-- - the activity pairs each task's old and new row by grouping both sets by task.
-- None of these plans has a join, so no cached plan can compare rows pairwise. An update
-- that changed a task's key (the store never does) is now counted as a move of the task,
-- where version 6 dropped it from the counts.
DO $do$
DECLARE
    schema text := format('%I.', current_schema());
BEGIN
    EXECUTE replace($def$CREATE OR REPLACE FUNCTION taskhistory_count_updated() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_summaries) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT user_id, task_id, status FROM new_summaries
               EXCEPT ALL
               SELECT user_id, task_id, status FROM old_summaries) THEN
        INSERT INTO @.task_counts AS c (user_id, status, slot, tasks)
        SELECT user_id, status, slot, sum(delta)
        FROM (SELECT user_id, status, (hashtext(task_id) & 15)::int2 AS slot, 1 AS delta
              FROM new_summaries
              UNION ALL
              SELECT user_id, status, (hashtext(task_id) & 15)::int2, -1
              FROM old_summaries) d
        GROUP BY 1, 2, 3 HAVING sum(delta) <> 0 ORDER BY 1, 2, 3
        ON CONFLICT (user_id, status, slot) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
        INSERT INTO @.task_totals AS t (status, slot, tasks)
        SELECT status, slot, sum(delta)
        FROM (SELECT status, (hashtext(task_id) & 63)::int2 AS slot, 1 AS delta
              FROM new_summaries
              UNION ALL
              SELECT status, (hashtext(task_id) & 63)::int2, -1
              FROM old_summaries) d
        GROUP BY 1, 2 HAVING sum(delta) <> 0 ORDER BY 1, 2
        ON CONFLICT (status, slot) DO UPDATE SET tasks = t.tasks + EXCLUDED.tasks;
    END IF;
    INSERT INTO @.task_activity AS a
        (user_id, hour, slot, steps, completed, failed, cancelled, timed_out)
    SELECT p.user_id, date_trunc('hour', p.updated_at, 'UTC'), (hashtext(p.task_id) & 15)::int2,
           sum(p.steps),
           count(*) FILTER (WHERE p.status = 'completed' AND p.old_status <> 'completed'),
           count(*) FILTER (WHERE p.status = 'failed' AND p.old_status <> 'failed'),
           count(*) FILTER (WHERE p.status = 'cancelled' AND p.old_status <> 'cancelled'),
           count(*) FILTER (WHERE p.status = 'timed_out' AND p.old_status <> 'timed_out')
    FROM (SELECT user_id, task_id,
                 max(updated_at) FILTER (WHERE side = 1) AS updated_at,
                 sum(side * step_count) AS steps,
                 max(status) FILTER (WHERE side = 1) AS status,
                 max(status) FILTER (WHERE side = -1) AS old_status
          FROM (SELECT 1 AS side, user_id, task_id, updated_at, step_count, status
                FROM new_summaries
                UNION ALL
                SELECT -1, user_id, task_id, updated_at, step_count, status
                FROM old_summaries) r
          GROUP BY user_id, task_id) p
    WHERE p.steps > 0
       OR (p.status <> p.old_status AND p.status IN ('completed', 'failed', 'cancelled', 'timed_out'))
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
END
$do$;
