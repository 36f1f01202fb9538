-- Subscriptions with multiple executors.
--
-- A subscription is split into partitions by a hash of the stream. Each
-- partition has a checkpoint (a cursor: everything at or before it is done)
-- and at most one lease. Workers claim a partition with claim_batch, then ack
-- or nack what they were given; each call is one short statement, so workers
-- run behind transaction-mode poolers. Only a transactional worker holds a
-- transaction open, for its batch (renew_lease keeps its lease meanwhile).

CREATE FUNCTION meowmx._subscription(name text) RETURNS meowmx.subscriptions
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result meowmx.subscriptions;
BEGIN
    SELECT * INTO result FROM meowmx.subscriptions AS s WHERE s.name = _subscription.name;
    IF NOT FOUND THEN
        PERFORM meowmx._fail('MX020', 'subscription not found',
            format('no subscription is named %s', coalesce(quote_literal(name), 'NULL')),
            'Create it with meowmx.create_subscription(name => ...).');
    END IF;
    RETURN result;
END;
$$;

-- Management ----------------------------------------------------------------------------


CREATE FUNCTION meowmx.create_subscription(
    name text,
    categories text[] DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    partitions integer DEFAULT 1,
    start_at text DEFAULT 'beginning',
    max_attempts integer DEFAULT 10
) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted meowmx.subscriptions;
    existing meowmx.subscriptions;
    start record;
BEGIN
    PERFORM meowmx._check_name('name', name, 'MX024');
    PERFORM meowmx._check_filter('categories', categories);
    PERFORM meowmx._check_filter('event_types', event_types);
    IF partitions IS NULL OR partitions < 1 OR partitions > 1024 THEN
        PERFORM meowmx._fail('MX026', 'partitions out of range',
            format('partitions is %s', coalesce(partitions::text, 'NULL')),
            'Pass from 1 to 1024 partitions: about as many as the workers you will run.');
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 OR max_attempts > 1000 THEN
        PERFORM meowmx._fail('MX027', 'max_attempts out of range',
            format('max_attempts is %s', coalesce(max_attempts::text, 'NULL')),
            'Pass from 1 to 1000 attempts before an event is parked.');
    END IF;
    start := meowmx._start_checkpoint(start_at);

    -- Filters are sets: store them sorted and without duplicates.
    wanted := ROW(
        name,
        (SELECT array_agg(DISTINCT c ORDER BY c) FROM unnest(categories) AS c),
        (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(event_types) AS t),
        partitions, start_at, max_attempts, now()
    );

    PERFORM pg_advisory_xact_lock(hashtextextended('meowmx/subscription/' || name, 0));
    SELECT * INTO existing FROM meowmx.subscriptions AS s WHERE s.name = wanted.name;
    IF FOUND THEN
        IF (existing.categories, existing.event_types, existing.partitions,
            existing.start_at, existing.max_attempts)
            IS DISTINCT FROM (wanted.categories, wanted.event_types, wanted.partitions,
                wanted.start_at, wanted.max_attempts) THEN
            PERFORM meowmx._fail('MX021', 'subscription exists with another definition',
                format('%s is defined as categories %s, event_types %s, partitions %s, '
                    'start_at %s, max_attempts %s', name,
                    coalesce(existing.categories::text, 'NULL'),
                    coalesce(existing.event_types::text, 'NULL'), existing.partitions,
                    existing.start_at, existing.max_attempts),
                'Use another name, or drop the subscription first.');
        END IF;
        RETURN false;
    END IF;

    INSERT INTO meowmx.subscriptions SELECT wanted.*;
    INSERT INTO meowmx.subscription_partitions (
        subscription, partition, checkpoint_xid, checkpoint_position
    )
    SELECT wanted.name, p, start.xid, start.pos
    FROM generate_series(0, wanted.partitions - 1) AS p;
    RETURN true;
END;
$$;
CALL meowmx._grant_execute(
    'meowmx.create_subscription(text, text[], text[], integer, text, integer)', 'worker', 'admin'
);

CREATE FUNCTION meowmx.drop_subscription(name text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM meowmx.subscriptions AS s WHERE s.name = drop_subscription.name;
    RETURN FOUND;
END;
$$;
CALL meowmx._grant_execute('meowmx.drop_subscription(text)', 'admin');

-- Moves every partition to 'beginning', 'end' or a cursor. Leases and batches
-- are dropped, so in-flight acks are rejected and workers claim again.
CREATE FUNCTION meowmx.reset_subscription(name text, start_at text DEFAULT 'beginning')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(name);
    start record := meowmx._start_checkpoint(start_at);
BEGIN
    PERFORM meowmx._move_checkpoint(sub.name, n, start.xid, start.pos, NULL)
    FROM generate_series(0, sub.partitions - 1) AS n;
    UPDATE meowmx.subscription_partitions AS p SET
        lease_owner = NULL, lease_expires_at = NULL, lease_duration = NULL
    WHERE p.subscription = sub.name;
END;
$$;
CALL meowmx._grant_execute('meowmx.reset_subscription(text, text)', 'admin');

-- Work ----------------------------------------------------------------------------------

-- Moves a partition's checkpoint to (xid, pos): the batch handed out is over and
-- the failure record cleared. lease_until renews the lease (NULL: as it was).
CREATE FUNCTION meowmx._move_checkpoint(
    subscription text, partition integer, xid xid8, pos bigint, lease_until timestamptz
) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE meowmx.subscription_partitions AS p SET
        checkpoint_xid = xid, checkpoint_position = pos,
        batch_end_xid = NULL, batch_end_position = NULL, batch_last_position = NULL,
        failing_position = NULL, attempts = 0, last_error = NULL, retry_at = NULL,
        lease_expires_at = coalesce(lease_until, p.lease_expires_at)
    WHERE p.subscription = _move_checkpoint.subscription
        AND p.partition = _move_checkpoint.partition
$$;


CREATE FUNCTION meowmx.claim_batch(
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
    rescan boolean := false;
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
        -- The row is locked at the first event scanned: a partition with nothing
        -- after its checkpoint is passed over writing nothing (no transaction id, no
        -- WAL flush), and one with work costs no separate look first.
        part := NULL;
        part.checkpoint_xid := candidate.checkpoint_xid;
        part.checkpoint_position := candidate.checkpoint_position;
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
                IF part.partition IS NULL THEN
                    -- Read it again under the lock: a claim may have committed since
                    -- (then, with scanned = 0, on to the next candidate), or an ack
                    -- (then scan again from its checkpoint).
                    SELECT * INTO part FROM meowmx.subscription_partitions AS p
                    WHERE p.subscription = sub.name AND p.partition = candidate.partition
                        AND (p.lease_owner IS NULL OR p.lease_owner = worker
                            OR p.lease_expires_at < at)
                        AND (p.retry_at IS NULL OR p.retry_at <= at)
                    FOR UPDATE;
                    EXIT WHEN NOT FOUND;
                    rescan := (part.checkpoint_xid, part.checkpoint_position)
                        <> (candidate.checkpoint_xid, candidate.checkpoint_position);
                    EXIT WHEN rescan;
                END IF;
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
            IF rescan THEN
                rescan := false;
                CONTINUE;
            END IF;
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
CALL meowmx._grant_execute('meowmx.claim_batch(text, text, integer, interval)', 'worker', 'admin');

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
CREATE FUNCTION meowmx._batch_event(
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

-- Marks the event at event_position, and everything before it in the batch,
-- as handled. Acks also renew the lease, so they double as heartbeats.
CREATE FUNCTION meowmx.ack(
    subscription text, worker text, partition integer, event_position bigint
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    target record := meowmx._batch_event(sub, worker, partition, event_position);
    part meowmx.subscription_partitions := target.part;
    lease_until timestamptz := clock_timestamp() + part.lease_duration;
BEGIN
    IF event_position = part.batch_last_position THEN
        -- The batch is done: move to its end, past the other partitions' events
        -- that its scan went over.
        PERFORM meowmx._move_checkpoint(
            sub.name, ack.partition, part.batch_end_xid, part.batch_end_position, lease_until);
    ELSE
        -- A heartbeat: the events after this one stay handed out.
        UPDATE meowmx.subscription_partitions AS p SET
            checkpoint_xid = (target.event).transaction_id, checkpoint_position = event_position,
            failing_position = NULL, attempts = 0, last_error = NULL, retry_at = NULL,
            lease_expires_at = lease_until
        WHERE p.subscription = sub.name AND p.partition = ack.partition;
    END IF;
END;
$$;
CALL meowmx._grant_execute('meowmx.ack(text, text, integer, bigint)', 'worker', 'admin');

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

-- Records a failure of the event at event_position; the events before it in
-- the batch count as handled. The event comes back after retry_after, and the
-- partition waits for it (order is kept) with the worker keeping the lease.
-- After max_attempts the event is parked and the partition moves past it.
-- Returns true when the event was parked.
CREATE FUNCTION meowmx.nack(
    subscription text,
    worker text,
    partition integer,
    event_position bigint,
    error text,
    retry_after interval DEFAULT '0'
) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    target record := meowmx._batch_event(sub, worker, partition, event_position);
    failed meowmx.events := target.event;
    attempt integer := CASE WHEN (target.part).failing_position = event_position
        THEN (target.part).attempts + 1 ELSE 1 END;
    at timestamptz := clock_timestamp();
BEGIN
    IF retry_after IS NULL OR retry_after < '0' OR retry_after > '1 day' THEN
        PERFORM meowmx._fail('MX043', 'retry_after out of range',
            format('retry_after is %s', coalesce(retry_after::text, 'NULL')),
            'Pass an interval from 0 to 1 day.');
    END IF;

    IF attempt >= sub.max_attempts THEN
        -- An event parked before a reset or requeue may be parked again.
        INSERT INTO meowmx.parked_events AS d (subscription, partition, position, attempts, error)
        VALUES (sub.name, nack.partition, failed.position, attempt, left(error, 10000))
        ON CONFLICT ON CONSTRAINT parked_events_pkey DO UPDATE
        SET attempts = excluded.attempts, error = excluded.error, parked_at = now();
        PERFORM meowmx._move_checkpoint(sub.name, nack.partition,
            failed.transaction_id, failed.position, at + (target.part).lease_duration);
        RETURN true;
    END IF;

    -- The checkpoint stops just before the failed event, so it comes back first.
    UPDATE meowmx.subscription_partitions AS p SET
        checkpoint_xid = failed.transaction_id, checkpoint_position = failed.position - 1,
        batch_end_xid = NULL, batch_end_position = NULL, batch_last_position = NULL,
        failing_position = failed.position, attempts = attempt, last_error = left(error, 10000),
        retry_at = at + retry_after,
        lease_expires_at = at + retry_after + p.lease_duration
    WHERE p.subscription = sub.name AND p.partition = nack.partition;
    RETURN false;
END;
$$;
CALL meowmx._grant_execute(
    'meowmx.nack(text, text, integer, bigint, text, interval)', 'worker', 'admin'
);

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

-- Gives up the worker's leases (clean shutdown). Unacknowledged events of its
-- batches go to the next claimer. Returns how many partitions were released.
CREATE FUNCTION meowmx.release(subscription text, worker text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    released integer;
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    UPDATE meowmx.subscription_partitions AS p SET
        lease_owner = NULL, lease_expires_at = NULL, lease_duration = NULL,
        batch_end_xid = NULL, batch_end_position = NULL, batch_last_position = NULL
    WHERE p.subscription = sub.name AND p.lease_owner = worker;
    GET DIAGNOSTICS released = ROW_COUNT;
    RETURN released;
END;
$$;
CALL meowmx._grant_execute('meowmx.release(text, text)', 'worker', 'admin');

-- Observation ---------------------------------------------------------------------------


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
SET jit = off  -- as metrics(): its per-partition counts are costed far above their work
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

CREATE FUNCTION meowmx.list_parked(subscription text, max_count integer DEFAULT 100)
RETURNS SETOF meowmx.parked_event
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
BEGIN
    PERFORM meowmx._check_max_count(max_count);
    RETURN QUERY
    SELECT d.partition, d.position, e.category, e.stream_id, e.version, e.event_type,
        d.attempts, d.error, d.parked_at
    FROM meowmx.parked_events AS d
    INNER JOIN meowmx.events AS e ON e.position = d.position
    WHERE d.subscription = sub.name
    ORDER BY d.position
    LIMIT max_count;
END;
$$;
CALL meowmx._grant_execute('meowmx.list_parked(text, integer)', 'worker', 'admin');

-- Delivers a parked event again by moving its partition back to just before
-- it: the partition's later events are delivered again too (at-least-once,
-- order kept), and their parked rows are removed, since they come back.
CREATE FUNCTION meowmx.requeue_parked(subscription text, event_position bigint)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub meowmx.subscriptions := meowmx._subscription(subscription);
    parked meowmx.parked_events;
    event meowmx.events;
    removed integer;
BEGIN
    SELECT * INTO parked FROM meowmx.parked_events AS d
    WHERE d.subscription = sub.name AND d.position = event_position;
    IF NOT FOUND THEN
        PERFORM meowmx._fail('MX025', 'event is not parked',
            format('subscription %s has no parked event at position %s',
                sub.name, coalesce(event_position::text, 'NULL')),
            'List parked events with meowmx.list_parked(subscription => ...).');
    END IF;
    SELECT * INTO event FROM meowmx.events AS e WHERE e.position = event_position;

    PERFORM meowmx._move_checkpoint(
        sub.name, parked.partition, event.transaction_id, event.position - 1, NULL)
    FROM meowmx.subscription_partitions AS p
    WHERE p.subscription = sub.name AND p.partition = parked.partition
        AND (p.checkpoint_xid, p.checkpoint_position) >= (event.transaction_id, event.position);

    DELETE FROM meowmx.parked_events AS d
    USING meowmx.events AS e
    WHERE d.subscription = sub.name AND d.partition = parked.partition
        AND e.position = d.position
        AND (e.transaction_id, e.position) >= (event.transaction_id, event.position);
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END;
$$;
CALL meowmx._grant_execute('meowmx.requeue_parked(text, bigint)', 'admin');

-- The transactions that hold the read horizon back, oldest first: readers and
-- subscriptions deliver nothing at or after the oldest one's transaction id
-- until it ends. Query text needs pg_read_all_stats (or the same role) to show.
CREATE FUNCTION meowmx.horizon_blockers()
RETURNS TABLE (
    pid integer,
    database text,
    username text,
    application_name text,
    state text,
    transaction_id xid8,
    transaction_age interval,
    query text
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- pg_stat_activity and pg_prepared_xacts show 32-bit ids: widen them to
    -- xid8 by their signed distance from the snapshot's xmax (running ids are
    -- less than 2^31 from it, on either side).
    WITH running AS (
        SELECT a.pid, a.datname::text AS database, a.usename::text AS username,
            a.application_name, a.state, a.backend_xid AS xid, a.xact_start AS since,
            a.query
        FROM pg_stat_activity AS a
        WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
        UNION ALL
        SELECT NULL, x.database::text, x.owner::text, NULL, 'prepared', x.transaction,
            x.prepared, 'PREPARE TRANSACTION ' || quote_literal(x.gid)
        FROM pg_prepared_xacts AS x
    ),
    snapshot AS (
        SELECT pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS xmax
    )
    SELECT r.pid, r.database, r.username, r.application_name, r.state,
        (s.xmax + mod(r.xid::text::numeric - mod(s.xmax, 4294967296) + 6442450944,
            4294967296) - 2147483648)::text::xid8,
        now() - r.since, r.query
    FROM running AS r CROSS JOIN snapshot AS s
    ORDER BY 6
$$;
CALL meowmx._grant_execute('meowmx.horizon_blockers()', 'reader', 'writer', 'worker', 'admin');

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
