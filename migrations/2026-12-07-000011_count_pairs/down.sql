-- Back to version 6's taskhistory_count_updated: old and new rows joined by task.
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
END
$do$;
