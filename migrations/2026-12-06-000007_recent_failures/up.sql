-- The most recent failures of any user (`PgTaskHistoryStore::recent_failures`, the
-- dashboard's operator overview): a partial index holding only failed and timed-out tasks,
-- in order of their last update, so the statement reads its few rows from the index's start
-- whatever the number of tasks. Writers pay for it only when a task enters, leaves or moves
-- within those statuses.
CREATE INDEX IF NOT EXISTS task_summary_recent_failures
    ON task_summary (updated_at DESC)
    WHERE status IN ('failed', 'timed_out');
