-- taskhistory schema, version 5: the state of the Python compatibility mode.
--
-- While the Python service still writes beside the Rust one (a rolling migration), the
-- mode's triggers (made by `taskhistory compat on`, or by `taskhistory migrate` when it
-- adopts a table the Python service made; see crates/postgres/src/compat.rs) turn the
-- Python service's unchanged INSERTs and UPDATEs into the store's own writes. These tables
-- only record the mode: when it was switched on, and the legacy writes seen since.

-- One row while the mode is on.
CREATE TABLE taskhistory_python_compat (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    enabled_at timestamptz NOT NULL
);

-- Legacy writes, one row per server process that made them (so that Python writers never
-- wait on each other here). Unlogged: a count for operators, not data; a crash empties it.
CREATE UNLOGGED TABLE taskhistory_python_writes (
    backend_pid integer PRIMARY KEY,
    last_write timestamptz NOT NULL,
    writes bigint NOT NULL
);

-- Roles that read the store's tables (least_privilege_grants) may read the mode's state
-- (`health` reports it).
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT DISTINCT grantee FROM information_schema.role_table_grants
             WHERE table_schema = current_schema() AND table_name = 'task_summary'
               AND privilege_type = 'SELECT' AND grantee NOT IN ('PUBLIC', current_user)
    LOOP
        EXECUTE format('GRANT SELECT ON taskhistory_python_compat, taskhistory_python_writes TO %I',
                       r.grantee);
    END LOOP;
END $$;
