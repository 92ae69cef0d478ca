-- Drops what version 1 added. The history itself, with its upgraded column types, stays.
DROP TABLE IF EXISTS task_summary;
DROP TABLE IF EXISTS task_history_duplicates;
ALTER TABLE task_history
    DROP CONSTRAINT IF EXISTS task_history_user_task_step_key,
    DROP CONSTRAINT IF EXISTS task_history_status_check;
