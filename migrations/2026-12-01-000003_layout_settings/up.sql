-- The layout's settings, kept by the schema itself: one row, whose partition_interval is
-- the partitioned layout's period (NULL on the plain layout). Conversion to the partitioned
-- layout sets it in the transaction that converts; the store reads it, never guesses it.
CREATE TABLE IF NOT EXISTS taskhistory_layout (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partition_interval text CHECK (partition_interval IN ('day', 'week', 'month'))
);

-- A table converted before this migration carried its period in a comment
-- ('taskhistory: partitioned by month'): it moves here.
INSERT INTO taskhistory_layout (singleton, partition_interval)
SELECT true,
       CASE WHEN EXISTS (SELECT 1 FROM pg_partitioned_table
                         WHERE partrelid = to_regclass('task_history'))
            THEN substring(obj_description(to_regclass('task_history'), 'pg_class')
                           FROM 'partitioned by (day|week|month)$')
       END
ON CONFLICT (singleton) DO NOTHING;

-- Roles that read the store's tables (least_privilege_grants, given before this migration)
-- may read the layout too: the store reads it at start-up.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT DISTINCT grantee FROM information_schema.role_table_grants
             WHERE table_schema = current_schema() AND table_name = 'task_summary'
               AND privilege_type = 'SELECT' AND grantee NOT IN ('PUBLIC', current_user)
    LOOP
        EXECUTE format('GRANT SELECT ON taskhistory_layout TO %I', r.grantee);
    END LOOP;
END $$;
