-- meowmx upgrade 0007: workers that keep going. Claimed rows carry the server's
-- attempt count; meowmx.renew_lease() renews a lease without acking (the heartbeat of
-- a transactional batch); subscription_status shows the lease owner's open transaction.
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

ALTER TYPE meowmx.claimed_event ADD ATTRIBUTE attempts integer;

CREATE OR REPLACE FUNCTION meowmx.claim_batch(
    subscription text,
    worker text,
    max_count integer DEFAULT 100,
    lease interval DEFAULT '30 seconds'
) RETURNS SETOF meowmx.claimed_event
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    at timestamptz := clock_timestamp();
    candidate record;
    part meowmx.subscription_partitions;
    ev meowmx.recorded_event;
    -- The last event scanned, of any partition: where the batch ends.
    last_xid xid8;
    last_position bigint;
    scanned integer;
    returned integer;
    last_returned bigint;
    scan_size integer;
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    PERFORM meowmx._check_max_count(max_count);
    -- Scan enough to find about max_count events of one partition.
    scan_size := least(10000, max_count * sub.partitions);
    IF lease IS NULL OR lease <= '0' OR lease > '1 day' THEN
        PERFORM meowmx._fail('MX041', 'lease out of range',
            format('lease is %s', coalesce(lease::text, 'NULL')),
            'Pass a lease longer than 0 and at most 1 day.');
    END IF;

    -- The worker's own partitions first, then free or expired ones in random
    -- order, so workers spread out instead of queueing on one partition.
    FOR candidate IN
        SELECT p.partition, p.checkpoint_xid, p.checkpoint_position
        FROM meowmx.subscription_partitions AS p
        WHERE p.subscription = sub.name
            AND (p.lease_owner IS NULL OR p.lease_owner = worker OR p.lease_expires_at < at)
            AND (p.retry_at IS NULL OR p.retry_at <= at)
        ORDER BY p.lease_owner IS NOT DISTINCT FROM worker DESC, random()
    LOOP
        -- Skip a partition that another claimer is looking at right now.
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtextextended('meowmx/partition/' || sub.name || '/' || candidate.partition, 0));
        -- Nothing after the checkpoint: move on without locking the row, so an
        -- idle claim writes nothing (no transaction id, no WAL flush).
        CONTINUE WHEN NOT EXISTS (
            SELECT FROM meowmx.read_events(
                after => meowmx._cursor(candidate.checkpoint_xid, candidate.checkpoint_position),
                max_count => 1, categories => sub.categories, event_types => sub.event_types));
        -- Read it again under the lock: a claim may have committed since.
        SELECT * INTO part FROM meowmx.subscription_partitions AS p
        WHERE p.subscription = sub.name AND p.partition = candidate.partition
            AND (p.lease_owner IS NULL OR p.lease_owner = worker OR p.lease_expires_at < at)
            AND (p.retry_at IS NULL OR p.retry_at <= at)
        FOR UPDATE;
        CONTINUE WHEN NOT FOUND;

        LOOP
            scanned := 0;
            returned := 0;
            FOR ev IN
                SELECT * FROM meowmx.read_events(
                    after => meowmx._cursor(part.checkpoint_xid, part.checkpoint_position),
                    max_count => scan_size,
                    categories => sub.categories,
                    event_types => sub.event_types)
            LOOP
                scanned := scanned + 1;
                last_xid := ev.transaction_id;
                last_position := ev.position;
                IF sub.partitions = 1
                    OR meowmx._partition_of(ev.category, ev.stream_id, sub.partitions)
                    = part.partition THEN
                    RETURN NEXT ROW(part.partition, ev.*, CASE
                        WHEN ev.position = part.failing_position THEN part.attempts ELSE 0
                    END)::meowmx.claimed_event;
                    returned := returned + 1;
                    last_returned := ev.position;
                    EXIT WHEN returned = max_count;
                END IF;
            END LOOP;
            EXIT WHEN scanned = 0;

            IF returned > 0 THEN
                UPDATE meowmx.subscription_partitions AS p SET
                    batch_end_xid = last_xid,
                    batch_end_position = last_position,
                    batch_last_position = last_returned,
                    lease_owner = worker,
                    lease_expires_at = at + lease,
                    lease_duration = lease
                WHERE p.subscription = sub.name AND p.partition = part.partition;
                RETURN;
            END IF;

            -- The scan held none of this partition's events: move past them for
            -- good, so an idle partition does not scan them again.
            part.checkpoint_xid := last_xid;
            part.checkpoint_position := last_position;
            PERFORM meowmx._move_checkpoint(
                sub.name, part.partition, last_xid, last_position, NULL);
            EXIT WHEN scanned < scan_size;
        END LOOP;
    END LOOP;
END;
$$;

-- Extends the leases the worker holds, without acknowledging anything: the
-- heartbeat of a batch whose acks come only at its end (a transactional worker,
-- which calls this on a connection of its own while its batch runs). A lease
-- another worker took over stays with it. Returns how many leases were renewed.
CREATE FUNCTION meowmx.renew_lease(subscription text, worker text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    renewed integer;
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    UPDATE meowmx.subscription_partitions AS p SET
        lease_expires_at = greatest(p.lease_expires_at, clock_timestamp() + p.lease_duration)
    WHERE p.subscription = sub.name AND p.lease_owner = worker;
    GET DIAGNOSTICS renewed = ROW_COUNT;
    RETURN renewed;
END;
$$;
CALL meowmx._grant_execute('meowmx.renew_lease(text, text)', 'worker', 'admin');

-- New output columns: the function is dropped and created again, with its grant.
DROP FUNCTION meowmx.subscription_status(text);

-- One row per partition. events_behind counts matching events of the partition
-- after its checkpoint, committed or not yet visible below the horizon.
-- worker_pid and worker_transaction_age show the lease owner's open transaction
-- (a transactional worker's batch, which holds the read horizon back): the worker
-- names it in application_name; its age shows only where this function's owner
-- may see that session in pg_stat_activity.
CREATE FUNCTION meowmx.subscription_status(name text DEFAULT NULL)
RETURNS TABLE (
    subscription text,
    partition integer,
    checkpoint text,
    events_behind bigint,
    lease_owner text,
    lease_expires_at timestamptz,
    attempts integer,
    last_error text,
    retry_at timestamptz,
    parked bigint,
    worker_pid integer,
    worker_transaction_age interval
)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NOT NULL THEN
        PERFORM meowmx._subscription(name);
    END IF;
    RETURN QUERY
    SELECT
        s.name, p.partition,
        meowmx._cursor(p.checkpoint_xid, p.checkpoint_position),
        (
            SELECT count(*) FROM meowmx.events AS e
            WHERE (e.transaction_id, e.position) > (p.checkpoint_xid, p.checkpoint_position)
                AND coalesce(e.category = ANY(s.categories), true)
                AND coalesce(e.event_type = ANY(s.event_types), true)
                AND (s.partitions = 1
                    OR meowmx._partition_of(e.category, e.stream_id, s.partitions) = p.partition)
        ),
        p.lease_owner, p.lease_expires_at, p.attempts, p.last_error, p.retry_at,
        (
            SELECT count(*) FROM meowmx.parked_events AS d
            WHERE d.subscription = s.name AND d.partition = p.partition
        ),
        w.pid, now() - w.xact_start
    FROM meowmx.subscriptions AS s
    INNER JOIN meowmx.subscription_partitions AS p ON p.subscription = s.name
    LEFT JOIN LATERAL (
        SELECT a.pid, a.xact_start FROM pg_stat_activity AS a
        WHERE a.application_name = left('meowmx worker ' || p.lease_owner, 63)
            AND a.backend_xid IS NOT NULL
        ORDER BY a.xact_start
        LIMIT 1
    ) AS w ON true
    WHERE subscription_status.name IS NULL OR s.name = subscription_status.name
    ORDER BY s.name, p.partition;
END;
$$;
CALL meowmx._grant_execute('meowmx.subscription_status(text)', 'worker', 'admin');

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (7, 'workers');
