-- taskhistory schema, version 10: the user policy of row-level isolation checks each row
-- after the statement's own key has found it, instead of joining the index search.
--
-- Version 8 wrote the policy as `user_id = ANY ((SELECT taskhistory_declared_users()))`.
-- PostgreSQL then adds that `= ANY` to the index conditions of every scan, and the btree
-- cost model, which treats a search with an array as one search per element of an array of
-- unknown length, stops telling a primary-key probe from a scan of all the user's rows:
-- every index leading with `user_id` costs the same, and the planner took
-- `task_summary_user_status_activity` for a status check, a load or a save's lock. Those
-- read every index entry of the user (27 ms for a status check of a user with 200,000
-- tasks, where the primary key takes 0.05 ms).
--
-- `array_position(...) IS NOT NULL` is no index condition: each statement's own conditions
-- (every one names its users) choose the index, and the policy filters the rows found.
-- It is estimated to keep nearly every row. Rows found for a user not declared are read
-- and dropped, never returned or written. PostgreSQL takes a statement's own condition into
-- the index search under row-level security only when it is leakproof: a condition holding
-- `COALESCE` or a cast is applied after the policy, as a filter. The store's statements keep
-- their bounds leakproof (a scalar subquery, a cast made on the arrays), so their plans
-- search as without isolation. The check is linear in the number of users declared, per
-- row: a statement declaring thousands of users pays for it.
-- `COLLATE "C"` settles the comparison's collation (the array's is the database's).
CREATE OR REPLACE FUNCTION taskhistory_isolate(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    AS $fn$
DECLARE
    owner_name name;
    user_check text;
    maintenance_check text;
BEGIN
    SELECT r.rolname INTO owner_name
    FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = tbl;
    user_check := format('array_position((SELECT %s()), user_id COLLATE "C") IS NOT NULL',
                         'taskhistory_declared_users'::regproc);
    maintenance_check := format('(SELECT %s())', 'taskhistory_maintenance_declared'::regproc);
    EXECUTE format('DROP POLICY IF EXISTS taskhistory_user ON %s', tbl);
    EXECUTE format('DROP POLICY IF EXISTS taskhistory_maintenance ON %s', tbl);
    EXECUTE format('CREATE POLICY taskhistory_user ON %s FOR ALL TO PUBLIC USING (%s) WITH CHECK (%s)',
                   tbl, user_check, user_check);
    EXECUTE format('CREATE POLICY taskhistory_maintenance ON %s FOR ALL TO %I USING (%s) WITH CHECK (%s)',
                   tbl, owner_name, maintenance_check, maintenance_check);
END
$fn$;

-- Dropping and creating a policy leaves row-level security switched as it was.
SELECT taskhistory_isolate(t::regclass)
FROM unnest(ARRAY['task_history', 'task_summary', 'task_counts', 'task_activity',
                  'task_history_duplicates']) AS t;
