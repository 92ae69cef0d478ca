DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['task_history', 'task_summary', 'task_counts', 'task_activity',
                             'task_history_duplicates'] LOOP
        EXECUTE format('ALTER TABLE %I NO FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I DISABLE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS taskhistory_user ON %I', t);
        EXECUTE format('DROP POLICY IF EXISTS taskhistory_maintenance ON %I', t);
    END LOOP;
END $$;
DROP FUNCTION IF EXISTS taskhistory_isolate(regclass);
DROP FUNCTION IF EXISTS taskhistory_maintenance_declared();
DROP FUNCTION IF EXISTS taskhistory_declared_users();
