DROP FUNCTION IF EXISTS taskhistory_order_conflict();
ALTER TABLE task_summary DROP COLUMN IF EXISTS last_xid;
DROP INDEX IF EXISTS task_history_user_position;
ALTER TABLE task_history DROP COLUMN IF EXISTS xid;
