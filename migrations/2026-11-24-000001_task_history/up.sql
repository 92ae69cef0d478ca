-- taskhistory schema, version 1.
--
-- One path for a new database and for adopting the Python service's database: create the
-- table exactly as the Python DatabaseManager did (if it is not there yet), then upgrade it in
-- place. Nothing is lost: duplicate steps (the seed had no unique key) keep the newest row in
-- task_history and move the others, unchanged, to task_history_duplicates.

CREATE TABLE IF NOT EXISTS task_history (
    id SERIAL PRIMARY KEY,
    user_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    result JSONB NOT NULL,
    timestamp TIMESTAMP NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
);

-- The seed's indexes: no query of the store uses them, and each costs every write. The
-- unique key below serves every history lookup.
DROP INDEX IF EXISTS idx_task_history_user_id;
DROP INDEX IF EXISTS idx_task_history_task_id;
DROP INDEX IF EXISTS idx_task_history_status;
DROP INDEX IF EXISTS idx_task_history_timestamp;
DROP INDEX IF EXISTS idx_task_history_user_task;
DROP INDEX IF EXISTS idx_task_history_user_timestamp;

-- Timestamps the seed wrote without a zone are read as UTC. Ids compare byte-wise (the same
-- order in every store, and cheaper than a linguistic collation).
ALTER TABLE task_history
    ALTER COLUMN id TYPE BIGINT,
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN task_id TYPE TEXT COLLATE "C",
    ALTER COLUMN timestamp TYPE TIMESTAMPTZ USING timestamp AT TIME ZONE 'UTC';

DO $$
DECLARE seq TEXT := pg_get_serial_sequence('task_history', 'id');
BEGIN
    IF seq IS NOT NULL THEN
        EXECUTE format('ALTER SEQUENCE %s AS BIGINT', seq);
    END IF;
END $$;

-- Duplicate steps: the newest row (latest timestamp, then highest id) stays; the others are
-- moved here as they were.
CREATE TABLE task_history_duplicates (
    id BIGINT PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    task_id TEXT COLLATE "C" NOT NULL,
    step INTEGER NOT NULL,
    result JSONB NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL,
    moved_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

WITH ranked AS (
    SELECT id, row_number() OVER (
        PARTITION BY user_id, task_id, step ORDER BY timestamp DESC, id DESC
    ) AS rn
    FROM task_history
), moved AS (
    DELETE FROM task_history h USING ranked r
    WHERE h.id = r.id AND r.rn > 1
    RETURNING h.id, h.user_id, h.task_id, h.step, h.result, h.timestamp, h.status
)
INSERT INTO task_history_duplicates (id, user_id, task_id, step, result, timestamp, status)
SELECT id, user_id, task_id, step, result, timestamp, status FROM moved;

ALTER TABLE task_history
    ADD CONSTRAINT task_history_user_task_step_key UNIQUE (user_id, task_id, step),
    ADD CONSTRAINT task_history_status_check CHECK (
        status IN ('pending', 'running', 'completed', 'cancelled', 'timed_out', 'failed')
    );

-- One row per task, kept in the same statement as every write: status and listings cost
-- O(1) and O(limit) however long a history grows.
CREATE TABLE task_summary (
    user_id TEXT COLLATE "C" NOT NULL,
    task_id TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    last_step INTEGER NOT NULL,
    step_count BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    -- INCLUDE: check_task_status is an index-only scan of the primary key.
    PRIMARY KEY (user_id, task_id) INCLUDE (status),
    CONSTRAINT task_summary_status_check CHECK (
        status IN ('pending', 'running', 'completed', 'cancelled', 'timed_out', 'failed')
    )
);

-- get_user_tasks, newest activity first, with and without a status filter.
CREATE INDEX task_summary_user_activity
    ON task_summary (user_id, updated_at DESC, task_id DESC);
CREATE INDEX task_summary_user_status_activity
    ON task_summary (user_id, status, updated_at DESC, task_id DESC);
-- cleanup_old_tasks.
CREATE INDEX task_summary_updated_at ON task_summary (updated_at);

INSERT INTO task_summary (user_id, task_id, status, last_step, step_count, created_at, updated_at)
SELECT DISTINCT ON (user_id, task_id)
    user_id, task_id, status, step,
    count(*) OVER w, min(timestamp) OVER w, max(timestamp) OVER w
FROM task_history
WINDOW w AS (PARTITION BY user_id, task_id)
ORDER BY user_id, task_id, step DESC;
