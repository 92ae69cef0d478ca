-- Back to version 8's user policy: `user_id = ANY (the declared users)`.
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
    user_check := format('user_id = ANY ((SELECT %s())::text[])',
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

SELECT taskhistory_isolate(t::regclass)
FROM unnest(ARRAY['task_history', 'task_summary', 'task_counts', 'task_activity',
                  'task_history_duplicates']) AS t;
