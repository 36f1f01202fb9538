-- meowmx upgrade 0010: batches read on a hot standby. claim_partition leases a
-- partition with work on the primary and says where its batch starts and may end;
-- read_partition reads the batch on a standby; ack_through moves the checkpoint to a
-- cursor the standby gave. The acks share their lease check with it
-- (_leased_partition).
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

-- For a worker that reads its batches on a hot standby: claims a partition that has
-- events waiting, as claim_batch does, but returns where its batch starts (`after`)
-- and how far it may go (`until`, this server's horizon now) instead of the events,
-- which read_partition reads on the standby. The worker then acks with ack_through
-- (or ack) and nacks as usual. No row: no free partition has work.
CREATE FUNCTION meowmx.claim_partition(
    subscription text, worker text, lease interval DEFAULT '30 seconds'
) RETURNS TABLE (
    partition integer, after text, until text, failing_position bigint, attempts integer
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    at timestamptz := clock_timestamp();
    candidate record;
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    IF lease IS NULL OR lease <= '0' OR lease > '1 day' THEN
        PERFORM meowmx._fail('MX041', 'lease out of range',
            format('lease is %s', coalesce(lease::text, 'NULL')),
            'Pass a lease longer than 0 and at most 1 day.');
    END IF;

    -- claim_batch's choice, written out in both: shared helpers cost 5 % of an idle
    -- claim (benchmarks/instructions.py).
    FOR candidate IN
        SELECT p.partition, p.checkpoint_xid, p.checkpoint_position
        FROM meowmx.subscription_partitions AS p
        WHERE p.subscription = sub.name
            AND (p.lease_owner IS NULL OR p.lease_owner = worker OR p.lease_expires_at < at)
            AND (p.retry_at IS NULL OR p.retry_at <= at)
        ORDER BY p.lease_owner IS NOT DISTINCT FROM worker DESC, random()
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtextextended('meowmx/partition/' || sub.name || '/' || candidate.partition, 0));
        CONTINUE WHEN NOT EXISTS (
            SELECT FROM meowmx.read_events(
                after => meowmx._cursor(candidate.checkpoint_xid, candidate.checkpoint_position),
                max_count => 1, categories => sub.categories, event_types => sub.event_types));
        -- Under the lock, and only if no claim committed since.
        UPDATE meowmx.subscription_partitions AS p SET
            batch_end_xid = meowmx._horizon(), batch_end_position = 0,
            batch_last_position = NULL,
            lease_owner = worker, lease_expires_at = at + lease, lease_duration = lease
        WHERE p.subscription = sub.name AND p.partition = candidate.partition
            AND (p.lease_owner IS NULL OR p.lease_owner = worker OR p.lease_expires_at < at)
            AND (p.retry_at IS NULL OR p.retry_at <= at)
        RETURNING p.partition, meowmx._cursor(p.checkpoint_xid, p.checkpoint_position),
            meowmx._cursor(p.batch_end_xid, p.batch_end_position), p.failing_position,
            p.attempts
        INTO partition, after, until, failing_position, attempts;
        CONTINUE WHEN NOT FOUND;
        RETURN NEXT;
        RETURN;
    END LOOP;
END;
$$;
CALL meowmx._grant_execute('meowmx.claim_partition(text, text, interval)', 'worker', 'admin');

-- The batch of a partition that claim_partition gave, read where the worker reads (a
-- hot standby: it only reads, behind that server's horizon like every read): the
-- partition's events after `after` and before `until`, at most max_count, from a scan
-- of at most max_count times the partitions' number of the subscription's events. When
-- the scan ends on other partitions' events, the last of them comes last, with its own
-- partition, so that ack_through its cursor moves past the whole scan; a worker handles
-- only the rows of its partition. attempts is 0: claim_partition tells the failures.
CREATE FUNCTION meowmx.read_partition(
    subscription text, partition integer, after text, until text, max_count integer DEFAULT 100
) RETURNS SETOF meowmx.claimed_event
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    bound record := meowmx._parse_cursor(until);
    ev meowmx.recorded_event;
    other meowmx.recorded_event;  -- the last event of another partition, since the last returned
    returned integer := 0;
BEGIN
    PERFORM meowmx._check_max_count(max_count);
    PERFORM meowmx._check_partition(sub, partition);
    IF bound.xid IS NULL THEN
        PERFORM meowmx._fail('MX015', 'malformed cursor',
            format('until is %s', coalesce(quote_literal(left(until, 60)), 'NULL')),
            'Pass the until column of the row that claim_partition returned.');
    END IF;
    FOR ev IN
        SELECT * FROM meowmx.read_events(after, least(10000, max_count * sub.partitions),
            sub.categories, sub.event_types)
    LOOP
        EXIT WHEN (ev.transaction_id, ev.position) >= (bound.xid, bound.pos);
        IF sub.partitions = 1
            OR meowmx._partition_of(ev.category, ev.stream_id, sub.partitions)
            = read_partition.partition THEN
            RETURN NEXT ROW(read_partition.partition, ev.*, 0)::meowmx.claimed_event;
            returned := returned + 1;
            other := NULL;
            EXIT WHEN returned = max_count;
        ELSE
            other := ev;
        END IF;
    END LOOP;
    IF other.position IS NOT NULL THEN
        RETURN NEXT ROW(meowmx._partition_of(other.category, other.stream_id, sub.partitions),
            other.*, 0)::meowmx.claimed_event;
    END IF;
END;
$$;
CALL meowmx._grant_execute(
    'meowmx.read_partition(text, integer, text, text, integer)', 'worker', 'admin'
);

-- A partition number of the subscription, or MX042.
CREATE FUNCTION meowmx._check_partition(sub meowmx.subscriptions, partition integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF partition IS NULL OR partition < 0 OR partition >= sub.partitions THEN
        PERFORM meowmx._fail('MX042', 'no such partition',
            format('subscription %s has partitions 0 to %s; got %s',
                sub.name, sub.partitions - 1, coalesce(partition::text, 'NULL')),
            'Pass the partition column of the claimed row.');
    END IF;
END;
$$;

-- The partition row, locked, after checking that the worker still holds its lease
-- (fencing: an ack of a worker whose lease was taken over changes nothing).
CREATE FUNCTION meowmx._leased_partition(
    sub meowmx.subscriptions, worker text, partition integer
) RETURNS meowmx.subscription_partitions
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    part meowmx.subscription_partitions;
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    PERFORM meowmx._check_partition(sub, partition);
    SELECT * INTO part FROM meowmx.subscription_partitions AS p
    WHERE p.subscription = sub.name AND p.partition = _leased_partition.partition
    FOR UPDATE;
    IF part.lease_owner IS DISTINCT FROM worker THEN
        PERFORM meowmx._fail('MX022', 'lease lost',
            format('partition %s of %s is leased by %s, not %s', partition, sub.name,
                coalesce(quote_literal(part.lease_owner), 'nobody'), quote_literal(worker)),
            'Another worker took the partition over after the lease expired, or it was '
            'released or reset; drop the batch and claim again.',
            jsonb_build_object('lease_owner', part.lease_owner));
    END IF;
    RETURN part;
END;
$$;

-- The partition row (locked) and the event that an ack or nack names, after
-- checking the lease and that the event is in the batch the worker was given.
CREATE OR REPLACE FUNCTION meowmx._batch_event(
    sub meowmx.subscriptions, worker text, partition integer, event_position bigint,
    OUT part meowmx.subscription_partitions, OUT event meowmx.events
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    part := meowmx._leased_partition(sub, worker, partition);
    SELECT * INTO event FROM meowmx.events AS e WHERE e.position = event_position;
    IF part.batch_end_xid IS NULL
        OR NOT FOUND
        OR (event.transaction_id, event.position)
        <= (part.checkpoint_xid, part.checkpoint_position)
        OR (event.transaction_id, event.position)
        > (part.batch_end_xid, part.batch_end_position)
        OR meowmx._partition_of(event.category, event.stream_id, sub.partitions)
        <> part.partition
        OR NOT coalesce(event.category = ANY(sub.categories), true)
        OR NOT coalesce(event.event_type = ANY(sub.event_types), true) THEN
        PERFORM meowmx._fail('MX023', 'event is not in the current batch',
            format('event %s is not among the unacknowledged events of partition %s of %s',
                coalesce(event_position::text, 'NULL'), partition, sub.name),
            'Ack or nack only positions from your latest claim_batch, each once, in order.',
            jsonb_build_object('event_position', event_position));
    END IF;
END;
$$;

-- Moves the partition's checkpoint to `cursor` and ends the batch: a worker that read
-- its batch with read_partition marks the partition handled up to there (the cursor
-- may be another partition's event, where the scan ended). Rejected if the worker no
-- longer holds the lease (MX022), or unless the cursor lies after the checkpoint and
-- within the batch that claim_partition (or claim_batch) gave (MX023).
CREATE FUNCTION meowmx.ack_through(
    subscription text, worker text, partition integer, cursor text
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    target record := meowmx._parse_cursor(cursor);
    part meowmx.subscription_partitions;
BEGIN
    IF target.xid IS NULL THEN
        PERFORM meowmx._fail('MX015', 'malformed cursor',
            format('cursor is %s', coalesce(quote_literal(left(cursor, 60)), 'NULL')),
            'Pass the cursor column of a row that read_partition returned.');
    END IF;
    part := meowmx._leased_partition(sub, worker, partition);
    IF part.batch_end_xid IS NULL
        OR (target.xid, target.pos) <= (part.checkpoint_xid, part.checkpoint_position)
        OR (target.xid, target.pos) > (part.batch_end_xid, part.batch_end_position) THEN
        PERFORM meowmx._fail('MX023', 'cursor is not in the current batch',
            format('cursor %s is not after the checkpoint of partition %s of %s within '
                'its batch', cursor, partition, sub.name),
            'Ack through cursors of your latest claim, each once, in order.',
            jsonb_build_object('cursor', cursor));
    END IF;
    PERFORM meowmx._move_checkpoint(sub.name, ack_through.partition, target.xid, target.pos,
        clock_timestamp() + part.lease_duration);
END;
$$;
CALL meowmx._grant_execute('meowmx.ack_through(text, text, integer, text)', 'worker', 'admin');

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (10, 'standby_batches');
