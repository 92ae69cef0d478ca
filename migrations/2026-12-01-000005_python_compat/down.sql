-- The mode's triggers and functions go first (`taskhistory compat off` does the same, and
-- also drops its placeholders for the Python service's indexes).
DROP TRIGGER IF EXISTS taskhistory_python_update ON task_history;
DO $$
BEGIN
    IF to_regclass('task_history_default') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS taskhistory_python_insert ON task_history_default;
    END IF;
END $$;
DROP TRIGGER IF EXISTS taskhistory_python_insert ON task_history;
DROP FUNCTION IF EXISTS taskhistory_python_insert();
DROP FUNCTION IF EXISTS taskhistory_python_update();
DROP FUNCTION IF EXISTS taskhistory_python_wrote(text);
DROP FUNCTION IF EXISTS taskhistory_python_save(text, text, int4, jsonb, timestamptz, text);
-- The views holding the Python service's index names (its start-up makes them again).
DO $$
DECLARE n text;
BEGIN
    FOR n IN SELECT c.relname FROM pg_class c
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'v'
               AND c.relname LIKE 'idx\_task\_history\_%'
    LOOP
        EXECUTE format('DROP VIEW %I', n);
    END LOOP;
END $$;
DROP TABLE IF EXISTS taskhistory_python_writes;
DROP TABLE IF EXISTS taskhistory_python_compat;
