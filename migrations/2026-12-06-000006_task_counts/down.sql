DROP TRIGGER IF EXISTS taskhistory_count_inserted ON task_summary;
DROP TRIGGER IF EXISTS taskhistory_count_updated ON task_summary;
DROP TRIGGER IF EXISTS taskhistory_count_deleted ON task_summary;
DROP FUNCTION IF EXISTS taskhistory_count_inserted();
DROP FUNCTION IF EXISTS taskhistory_count_updated();
DROP FUNCTION IF EXISTS taskhistory_count_deleted();
DROP TABLE IF EXISTS task_counts;
DROP TABLE IF EXISTS task_totals;
DROP TABLE IF EXISTS task_activity;
