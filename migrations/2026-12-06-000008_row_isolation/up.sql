-- taskhistory schema, version 8: row-level isolation by user, made but not switched on.
--
-- A transaction declares, in the one setting `taskhistory.declared`, either users (a text
-- array, `{"a","b"}`, made by the store from each operation's own arguments) or the
-- cross-user work (`maintenance`). Each table holding a user's rows gets two policies.
-- `taskhistory_user` lets a statement see and write only the rows of the declared users; a
-- session that declared nothing sees nothing and writes nothing. `taskhistory_maintenance`
-- lets the cross-user work (retention, partitions, statistics, migrations) through, only
-- for the tables' owner (and roles that are members of it): a service's role, which the
-- least-privilege setup keeps apart from the owner, can never reach it. One setting for
-- both, so that every declaration replaces the one before it whole.
--
-- The policies hold only once row-level security is enabled and forced on the tables
-- (`taskhistory isolation on`, `PgTaskHistoryStore::set_isolation`): until then they cost
-- nothing. Superusers and roles with BYPASSRLS are never held: the store's roles must be
-- neither (least_privilege_grants gives none).
--
-- The declared users are read once per statement (the policy's `(SELECT ...)` is an
-- InitPlan), not once per row.

-- Both are one expression with no FROM, so that PostgreSQL inlines them into the policies
-- (a SQL function it must call is planned again at every statement: about 30 us each).
CREATE FUNCTION taskhistory_declared_users() RETURNS text[]
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN current_setting('taskhistory.declared', true) LIKE '{%'
                      THEN current_setting('taskhistory.declared', true)::text[]
                      ELSE '{}'::text[] END $$;

CREATE FUNCTION taskhistory_maintenance_declared() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('taskhistory.declared', true), '') = 'maintenance' $$;

-- Gives `tbl` the two policies (again after a table is remade: the conversion to the
-- partitioned layout calls it for the new task_history).
CREATE FUNCTION taskhistory_isolate(tbl regclass) RETURNS void
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
