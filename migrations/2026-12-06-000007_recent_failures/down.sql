DROP INDEX IF EXISTS task_summary_recent_failures;
