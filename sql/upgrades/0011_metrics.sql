-- meowmx upgrade 0011: meowmx.metrics(), every figure a monitoring scrape reads, in one
-- call (meowmx metrics serves them in the Prometheus text format); subscription_status
-- runs without JIT, as metrics() does.
--
-- Frozen once released. The function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

-- What a monitoring scrape reads, in one call: one row per sample, with its family's
-- kind ('gauge' or 'counter') and help, so any stack can serve them (meowmx metrics
-- serves the Prometheus text format). Nothing here counts the whole log: the totals
-- come from the table's statistics, and a partition's lag scans only its pending
-- events, through the commit order index. No JIT: the planner's estimate of those
-- scans (a third of the log each) is far above jit_above_cost, and compiling took a
-- second on PostgreSQL 15 with LLVM, for a query that runs in milliseconds.
CREATE FUNCTION meowmx.metrics()
RETURNS TABLE (metric text, kind text, help text, labels jsonb, value double precision)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
    WITH parts AS (
        SELECT s.name AS subscription, p.partition, p.lease_owner, p.lease_expires_at,
            p.attempts, w.behind, w.oldest,
            (
                SELECT count(*) FROM meowmx.parked_events AS d
                WHERE d.subscription = s.name AND d.partition = p.partition
            ) AS parked,
            jsonb_build_object('subscription', s.name, 'partition', p.partition::text)
                AS labels
        FROM meowmx.subscriptions AS s
        INNER JOIN meowmx.subscription_partitions AS p ON p.subscription = s.name
        CROSS JOIN LATERAL (
            SELECT count(*) AS behind, min(e.recorded_at) AS oldest
            FROM meowmx.events AS e
            WHERE (e.transaction_id, e.position) > (p.checkpoint_xid, p.checkpoint_position)
                AND coalesce(e.category = ANY(s.categories), true)
                AND coalesce(e.event_type = ANY(s.event_types), true)
                AND (s.partitions = 1
                    OR meowmx._partition_of(e.category, e.stream_id, s.partitions)
                    = p.partition)
        ) AS w
    ),

    -- Read once (pg_stat_activity), for the count and the oldest.
    blockers AS MATERIALIZED (
        SELECT b.pid, extract(EPOCH FROM b.transaction_age) AS age
        FROM meowmx.horizon_blockers() AS b
    ),

    oldest_blocker AS (
        SELECT b.pid, b.age FROM blockers AS b
        ORDER BY b.age DESC NULLS LAST
        LIMIT 1
    ),

    live AS (
        SELECT pg_stat_get_live_tuples('meowmx.events'::regclass) AS events
    ),

    category_stats AS (
        SELECT c.category, c.freq * l.events AS events
        FROM pg_stats AS st
        CROSS JOIN LATERAL unnest(st.most_common_vals::text::text [], st.most_common_freqs)
            AS c (category, freq)
        CROSS JOIN live AS l
        WHERE st.schemaname = 'meowmx' AND st.tablename = 'events' AND st.attname = 'category'
    )

    SELECT 'meowmx_schema_version', 'gauge', 'The installed meowmx schema version.',
        '{}'::jsonb, max(m.version)::float8
    FROM meowmx.migrations AS m
    UNION ALL
    SELECT 'meowmx_events_inserted_total', 'counter',
        'Events inserted into the log since the statistics were last reset (rolled back'
        || ' appends included).',
        '{}', pg_stat_get_tuples_inserted('meowmx.events'::regclass)::float8
    UNION ALL
    SELECT 'meowmx_events', 'gauge',
        'Events in the log, from the table''s statistics (they lag by a second or so).',
        '{}', l.events::float8
    FROM live AS l
    UNION ALL
    SELECT 'meowmx_category_events_estimated', 'gauge',
        'Events of the most common categories, estimated from the last ANALYZE''s shares.',
        jsonb_build_object('category', c.category), c.events::float8
    FROM category_stats AS c
    UNION ALL
    SELECT 'meowmx_subscription_events_behind', 'gauge',
        'Events past the partition''s checkpoint, not yet acknowledged.',
        p.labels, p.behind::float8
    FROM parts AS p
    UNION ALL
    SELECT 'meowmx_subscription_checkpoint_age_seconds', 'gauge',
        'How long the oldest event past the checkpoint has waited (0: caught up).',
        p.labels, coalesce(extract(EPOCH FROM now() - p.oldest), 0)::float8
    FROM parts AS p
    UNION ALL
    SELECT 'meowmx_subscription_lease_expiry_timestamp_seconds', 'gauge',
        'When the partition''s lease ends (Unix time), by its owner.',
        p.labels || jsonb_build_object('owner', p.lease_owner),
        extract(EPOCH FROM p.lease_expires_at)::float8
    FROM parts AS p WHERE p.lease_owner IS NOT NULL
    UNION ALL
    SELECT 'meowmx_subscription_attempts', 'gauge',
        'Failures recorded for the partition''s first pending event.',
        p.labels, p.attempts::float8
    FROM parts AS p
    UNION ALL
    SELECT 'meowmx_subscription_parked', 'gauge',
        'Events of the partition parked as dead letters.', p.labels, p.parked::float8
    FROM parts AS p
    UNION ALL
    SELECT 'meowmx_horizon_blockers', 'gauge',
        'Transactions holding the read horizon back.', '{}', count(*)::float8
    FROM blockers
    UNION ALL
    SELECT 'meowmx_horizon_oldest_transaction_age_seconds', 'gauge',
        'Age of the oldest transaction holding the read horizon back (0: none), by pid.',
        jsonb_build_object('pid', coalesce(b.pid::text, '')), coalesce(b.age, 0)::float8
    FROM (SELECT) AS one LEFT JOIN oldest_blocker AS b ON true
$$;
CALL meowmx._grant_execute('meowmx.metrics()', 'reader', 'writer', 'worker', 'admin');

-- subscription_status pays the same JIT compile for its per-partition counts
-- (110 ms of its 180 ms with 50 partitions on PostgreSQL 15 with LLVM).
ALTER FUNCTION meowmx.subscription_status(text) SET jit = off;

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (11, 'metrics');
