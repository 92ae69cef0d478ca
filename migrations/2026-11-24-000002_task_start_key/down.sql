-- Drops what version 2 added (on the plain layout; convert back first if partitioned).
DROP INDEX IF EXISTS task_summary_inactive_since;
CREATE INDEX IF NOT EXISTS task_summary_updated_at ON task_summary (updated_at);
DROP FUNCTION IF EXISTS taskhistory_start_conflict();
ALTER TABLE task_summary DROP COLUMN IF EXISTS started_at;
ALTER TABLE task_history DROP COLUMN IF EXISTS started_at;
