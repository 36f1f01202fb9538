-- meowmx upgrade 0004: meowmx.end_cursor(); one SQLSTATE per condition, with the
-- values an error names as facts; one helper moves a partition's checkpoint.
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

DROP FUNCTION meowmx._fail(text, text, text, text);

DROP FUNCTION meowmx._lock_stream(text, text, bigint);

DROP FUNCTION meowmx._append(text, text, bigint, text[], jsonb[], jsonb[], uuid[]);

-- The largest bigint: what a NULL upper bound on versions and positions means.
CREATE FUNCTION meowmx._bigint_max() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 9223372036854775807;

-- Raises a meowmx error. Every expected failure goes through here so that each
-- condition has its own SQLSTATE (class MX) with a DETAIL and a HINT. `facts`, a
-- JSON object of the values the DETAIL names (versions, positions), travels in the
-- error's CONSTRAINT field, so that clients read them without parsing text.
CREATE FUNCTION meowmx._fail(
    errcode text, message text, detail text, hint text, facts jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = _fail.errcode,
        MESSAGE = _fail.message,
        DETAIL = coalesce(_fail.detail, ''),
        HINT = coalesce(_fail.hint, ''),
        CONSTRAINT = coalesce(_fail.facts::text, '');
END;
$$;

-- A cursor after every event readable now: reading after it returns only events
-- that commit later (every transaction still running, or newer, comes after it).
-- It is where start_at => 'end' starts, and where `meowmx tail --from-end` follows.
CREATE FUNCTION meowmx.end_cursor() RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN meowmx._cursor(pg_snapshot_xmin(pg_current_snapshot()), 0);
GRANT EXECUTE ON FUNCTION meowmx.end_cursor()
TO meowmx_reader, meowmx_writer, meowmx_worker, meowmx_admin;

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

-- The parts of a cursor; NULLs when it is not one.
CREATE OR REPLACE FUNCTION meowmx._parse_cursor(cursor text, OUT xid xid8, OUT pos bigint)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parts text[] := regexp_match(cursor, '^([0-9]{1,20}):([0-9]{1,19})$');
BEGIN
    IF parts[1]::numeric <= 18446744073709551615
        AND parts[2]::numeric <= meowmx._bigint_max() THEN
        xid := parts[1]::xid8;
        pos := parts[2]::bigint;
    END IF;
END;
$$;

-- A start place ('beginning', 'end' or a cursor) as a checkpoint.
CREATE OR REPLACE FUNCTION meowmx._start_checkpoint(start_at text, OUT xid xid8, OUT pos bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT c.xid, c.pos INTO xid, pos FROM meowmx._parse_cursor(CASE start_at
        WHEN 'beginning' THEN '0:0'
        WHEN 'end' THEN meowmx.end_cursor()
        ELSE start_at
    END) AS c;
    IF xid IS NULL THEN
        PERFORM meowmx._fail('MX028', 'invalid start_at',
            format('start_at is %s', coalesce(quote_literal(left(start_at, 60)), 'NULL')),
            'Pass ''beginning'', ''end'', or the cursor column of a row that meowmx returned.');
    END IF;
END;
$$;

-- Takes the stream's lock, then returns its version after checking the
-- expected version and the transaction order. Appenders of one stream are
-- serialized by an advisory lock taken before the append assigns a
-- transaction id, so transaction ids grow with stream versions.
CREATE OR REPLACE FUNCTION meowmx._lock_stream(
    category text, stream_id text, expected_version bigint
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint;
    last_transaction_id xid8;
BEGIN
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));

    SELECT e.version, e.transaction_id INTO current_version, last_transaction_id
    FROM meowmx.events AS e
    WHERE e.category = _lock_stream.category AND e.stream_id = _lock_stream.stream_id
    ORDER BY e.version DESC
    LIMIT 1;
    current_version := coalesce(current_version, 0);

    IF expected_version IS NOT NULL AND NOT (
        (expected_version = -1 AND current_version > 0)
        OR expected_version = current_version
    ) THEN
        PERFORM meowmx._fail('MX001', 'wrong expected version',
            format('stream %s/%s: expected version %s, actual version %s',
                category, stream_id, expected_version, current_version),
            'Read the stream again, decide again, and retry with its current version.',
            jsonb_build_object('category', category, 'stream_id', stream_id,
                'expected_version', expected_version, 'actual_version', current_version));
    END IF;

    -- Only a transaction that wrote before this call can hold an id older than
    -- the stream's last append; its events would sort before that append.
    IF pg_current_xact_id_if_assigned() < last_transaction_id THEN
        PERFORM meowmx._fail('MX004', 'transaction is older than the stream''s last append',
            format('stream %s/%s was appended to by transaction %s, which started after '
                'this one took its transaction id %s', category, stream_id,
                last_transaction_id, pg_current_xact_id_if_assigned()),
            'Retry the whole transaction, or append before writing anything else in it.',
            jsonb_build_object('category', category, 'stream_id', stream_id));
    END IF;
    RETURN current_version;
END;
$$;

-- Appends a batch to one stream. The public append functions validate their
-- input and call this (append_event only for the less common cases).
CREATE OR REPLACE FUNCTION meowmx._append(
    category text,
    stream_id text,
    expected_version bigint,
    types text[],
    data jsonb[],
    metadata jsonb[],
    ids uuid[]
) RETURNS SETOF meowmx.appended
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint;
    given_ids integer := cardinality(array_remove(ids, NULL));
    retry record;
BEGIN
    IF given_ids > 0 THEN
        -- Under the stream's lock, so that concurrent retries see each other.
        PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));
        SELECT
            count(*) AS found,
            min(e.category || '/' || e.stream_id) FILTER (
                WHERE e.category <> _append.category OR e.stream_id <> _append.stream_id
            ) AS other_stream,
            -- where the batch would start if this is a retry
            min(e.version - i.ord) AS base
        INTO retry
        FROM unnest(ids) WITH ORDINALITY AS i (id, ord)
        INNER JOIN meowmx.events AS e ON e.event_id = i.id;

        IF retry.other_stream IS NOT NULL THEN
            PERFORM meowmx._fail('MX002', 'event id already used in another stream',
                format('an event id of this append is stored in stream %s', retry.other_stream),
                'Event ids are unique in the store; give each new event a new id.',
                jsonb_build_object('other_stream', retry.other_stream));
        ELSIF retry.found > 0 THEN
            -- A retry of an append that succeeded holds the whole batch at
            -- consecutive versions, each event with the id it was sent with
            -- (or none): return what the append returned.
            IF (
                SELECT count(*) FROM unnest(ids) WITH ORDINALITY AS i (id, ord)
                INNER JOIN meowmx.events AS e
                    ON e.category = _append.category AND e.stream_id = _append.stream_id
                    AND e.version = retry.base + i.ord
                WHERE e.event_id IS NOT DISTINCT FROM i.id
            ) = cardinality(ids) THEN
                RETURN QUERY
                SELECT e.version, e.position
                FROM meowmx.events AS e
                WHERE e.category = _append.category AND e.stream_id = _append.stream_id
                    AND e.version BETWEEN retry.base + 1 AND retry.base + cardinality(ids)
                ORDER BY e.version;
                RETURN;
            END IF;
            PERFORM meowmx._fail('MX003', 'append partly matches events already stored',
                format('%s of the %s events are already in stream %s/%s',
                    retry.found, cardinality(ids), category, stream_id),
                'Resend exactly the events of the earlier append, in the same order, '
                'or give new events new ids.',
                jsonb_build_object('stored', retry.found, 'sent', cardinality(ids)));
        END IF;
    END IF;

    current_version := meowmx._lock_stream(category, stream_id, expected_version);

    IF given_ids = 0 THEN
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO meowmx.events (
                category, stream_id, version, event_type, data, metadata
            )
            SELECT _append.category, _append.stream_id, current_version + i.ord,
                i.type, i.data, i.metadata
            FROM unnest(types, _append.data, _append.metadata)
                WITH ORDINALITY AS i (type, data, metadata, ord)
            RETURNING events.version, events.position
        )
        SELECT inserted.version, inserted.position FROM inserted ORDER BY inserted.version;
    ELSE
        -- A concurrent append to another stream may take one of these ids first:
        -- the row is then skipped and counted below, instead of a unique_violation.
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO meowmx.events (
                category, stream_id, version, event_type, data, metadata, event_id
            )
            SELECT
                _append.category, _append.stream_id, current_version + i.ord,
                i.type, i.data, i.metadata, i.id
            FROM unnest(types, _append.data, _append.metadata, ids)
                WITH ORDINALITY AS i (type, data, metadata, id, ord)
            ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
            RETURNING events.version, events.position
        )
        SELECT inserted.version, inserted.position FROM inserted ORDER BY inserted.version;
        GET DIAGNOSTICS given_ids = ROW_COUNT;
        IF given_ids <> cardinality(types) THEN
            PERFORM meowmx._fail('MX002', 'event id already used in another stream',
                'another transaction stored one of these event ids at the same time',
                'Event ids are unique in the store; give each new event a new id.');
        END IF;
    END IF;

    PERFORM meowmx._notify();
END;
$$;

CREATE OR REPLACE FUNCTION meowmx.read_stream(
    category text,
    stream_id text,
    from_version bigint DEFAULT NULL,
    max_count integer DEFAULT 1000,
    backwards boolean DEFAULT FALSE
) RETURNS SETOF meowmx.recorded_event
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    PERFORM meowmx._check_max_count(max_count);
    IF from_version < 1 OR backwards IS NULL THEN
        PERFORM meowmx._fail('MX017', 'invalid stream read',
            format('from_version is %s, backwards is %s',
                coalesce(from_version::text, 'NULL'), coalesce(backwards::text, 'NULL')),
            'Versions start at 1; pass NULL to start at the first (or, backwards, the last).');
    END IF;

    IF backwards THEN
        RETURN QUERY
        SELECT e.*, meowmx._cursor(e.transaction_id, e.position)
        FROM meowmx.events AS e
        WHERE e.category = read_stream.category AND e.stream_id = read_stream.stream_id
            AND e.version <= coalesce(from_version, meowmx._bigint_max())
        ORDER BY e.version DESC
        LIMIT max_count;
    ELSE
        RETURN QUERY
        SELECT e.*, meowmx._cursor(e.transaction_id, e.position)
        FROM meowmx.events AS e
        WHERE e.category = read_stream.category AND e.stream_id = read_stream.stream_id
            AND e.version >= coalesce(from_version, 1)
        ORDER BY e.version
        LIMIT max_count;
    END IF;
END;
$$;

-- Events in commit order. Only transactions below the horizon (the oldest
-- transaction id still running anywhere in the cluster) are returned, so a
-- transaction that commits late is returned after the cursor, never skipped.
CREATE OR REPLACE FUNCTION meowmx.read_events(
    after text DEFAULT NULL,
    max_count integer DEFAULT 1000,
    categories text[] DEFAULT NULL,
    event_types text[] DEFAULT NULL
) RETURNS SETOF meowmx.recorded_event
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    from_xid xid8 := '0';
    from_position bigint := 0;
    ranges text;
BEGIN
    PERFORM meowmx._check_max_count(max_count);
    PERFORM meowmx._check_filter('categories', categories);
    PERFORM meowmx._check_filter('event_types', event_types);
    IF after IS NOT NULL THEN
        SELECT c.xid, c.pos INTO from_xid, from_position FROM meowmx._parse_cursor(after) AS c;
        IF from_xid IS NULL THEN
            PERFORM meowmx._fail('MX015', 'malformed cursor',
                format('cursor is %s', quote_literal(left(after, 60))),
                'Pass NULL to start at the beginning, or the cursor column of a row '
                'that meowmx returned.');
        END IF;
    END IF;

    IF categories IS NULL AND event_types IS NULL THEN
        RETURN QUERY
        SELECT e.*, meowmx._cursor(e.transaction_id, e.position)
        FROM meowmx.events AS e
        WHERE (e.transaction_id, e.position) > (from_xid, from_position)
            AND e.transaction_id < horizon
        ORDER BY e.transaction_id, e.position
        LIMIT max_count;
        RETURN;
    END IF;

    -- One ordered index range per category (or, without categories, per type),
    -- merged. The names go in as literals so the planner sees how rare each one
    -- is: behind a parameter it may guess that a rare category matches most rows
    -- and walk the commit order index instead, filtering the whole table.
    SELECT string_agg(format(
        '(SELECT ev.* FROM meowmx.events AS ev WHERE ev.%I = %L%s'
        ' AND (ev.transaction_id, ev.position) > ($1, $2) AND ev.transaction_id < $3'
        ' ORDER BY ev.transaction_id, ev.position LIMIT $4)',
        CASE WHEN categories IS NULL THEN 'event_type' ELSE 'category' END,
        f.name,
        CASE WHEN categories IS NOT NULL AND event_types IS NOT NULL
            THEN ' AND ev.event_type = ANY($5)' ELSE '' END
    ), ' UNION ALL ')
    INTO ranges
    FROM (SELECT DISTINCT unnest(coalesce(categories, event_types))) AS f (name);

    RETURN QUERY EXECUTE
        'SELECT e.*, meowmx._cursor(e.transaction_id, e.position) FROM (' || ranges || ') AS e'
        ' ORDER BY e.transaction_id, e.position LIMIT $4'
    USING from_xid, from_position, horizon, max_count, event_types;
END;
$$;

CREATE OR REPLACE FUNCTION meowmx.create_subscription(
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

-- Moves every partition to 'beginning', 'end' or a cursor. Leases and batches
-- are dropped, so in-flight acks are rejected and workers claim again.
CREATE OR REPLACE FUNCTION meowmx.reset_subscription(name text, start_at text DEFAULT 'beginning')
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
                    RETURN NEXT ROW(part.partition, ev.*)::meowmx.claimed_event;
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

-- The partition row (locked) and the event that an ack or nack names, after
-- checking that the worker still holds the lease (fencing) and that the event
-- is in the batch it was given.
CREATE OR REPLACE FUNCTION meowmx._batch_event(
    sub meowmx.subscriptions, worker text, partition integer, event_position bigint,
    OUT part meowmx.subscription_partitions, OUT event meowmx.events
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_name('worker', worker, 'MX040');
    SELECT * INTO part FROM meowmx.subscription_partitions AS p
    WHERE p.subscription = sub.name AND p.partition = _batch_event.partition
    FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM meowmx._fail('MX042', 'no such partition',
            format('subscription %s has partitions 0 to %s; got %s',
                sub.name, sub.partitions - 1, coalesce(partition::text, 'NULL')),
            'Pass the partition column of the claimed row.');
    END IF;
    IF part.lease_owner IS DISTINCT FROM worker THEN
        PERFORM meowmx._fail('MX022', 'lease lost',
            format('partition %s of %s is leased by %s, not %s', partition, sub.name,
                coalesce(quote_literal(part.lease_owner), 'nobody'), quote_literal(worker)),
            'Another worker took the partition over after the lease expired, or it was '
            'released or reset; drop the batch and claim again.',
            jsonb_build_object('lease_owner', part.lease_owner));
    END IF;

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
CREATE OR REPLACE FUNCTION meowmx.ack(
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

-- Records a failure of the event at event_position; the events before it in
-- the batch count as handled. The event comes back after retry_after, and the
-- partition waits for it (order is kept) with the worker keeping the lease.
-- After max_attempts the event is parked and the partition moves past it.
-- Returns true when the event was parked.
CREATE OR REPLACE FUNCTION meowmx.nack(
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

-- Gives up the worker's leases (clean shutdown). Unacknowledged events of its
-- batches go to the next claimer. Returns how many partitions were released.
CREATE OR REPLACE FUNCTION meowmx.release(subscription text, worker text) RETURNS integer
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

-- Delivers a parked event again by moving its partition back to just before
-- it: the partition's later events are delivered again too (at-least-once,
-- order kept), and their parked rows are removed, since they come back.
CREATE OR REPLACE FUNCTION meowmx.requeue_parked(subscription text, event_position bigint)
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

CREATE OR REPLACE FUNCTION meowmx.save_snapshot(
    category text, stream_id text, version bigint, state jsonb
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint := meowmx.stream_version(category, stream_id);
BEGIN
    IF version IS NULL OR version < 1 OR version > current_version THEN
        PERFORM meowmx._fail('MX030', 'snapshot version out of range',
            format('stream %s/%s is at version %s; snapshot version is %s',
                category, stream_id, current_version, coalesce(version::text, 'NULL')),
            'Snapshot a version the stream has reached: from 1 to its current version.',
            jsonb_build_object('version', version, 'stream_version', current_version));
    END IF;
    IF state IS NULL OR jsonb_typeof(state) <> 'object' THEN
        PERFORM meowmx._fail('MX032', 'snapshot state must be a JSON object',
            format('state is %s', coalesce(jsonb_typeof(state), 'NULL')),
            'Wrap the state in an object, for example {"value": ...}.');
    END IF;
    INSERT INTO meowmx.snapshots AS s (category, stream_id, version, state)
    VALUES (save_snapshot.category, save_snapshot.stream_id, save_snapshot.version, state)
    ON CONFLICT ON CONSTRAINT snapshots_pkey
    DO UPDATE SET state = excluded.state, created_at = excluded.created_at;
END;
$$;

-- The newest snapshot at or below max_version (NULL: the newest); no row if none.
CREATE OR REPLACE FUNCTION meowmx.load_snapshot(
    category text, stream_id text, max_version bigint DEFAULT NULL
) RETURNS SETOF meowmx.snapshot
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF max_version < 1 THEN
        PERFORM meowmx._fail('MX031', 'invalid snapshot max_version',
            format('max_version is %s', max_version),
            'Versions start at 1; pass NULL for the newest snapshot.');
    END IF;
    RETURN QUERY
    SELECT s.version, s.state, s.created_at
    FROM meowmx.snapshots AS s
    WHERE s.category = load_snapshot.category AND s.stream_id = load_snapshot.stream_id
        AND s.version <= coalesce(max_version, meowmx._bigint_max())
    ORDER BY s.version DESC
    LIMIT 1;
END;
$$;

-- Deletes a stream's events (and snapshots) before `before_version`, or all of
-- them when it is NULL. Subscriptions lose nothing else: a checkpoint is a place
-- in commit order, not an event, so the remaining events keep their places.
-- Returns how many events were deleted.
CREATE OR REPLACE FUNCTION meowmx.delete_stream(
    category text, stream_id text, before_version bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF before_version < 1 THEN
        PERFORM meowmx._fail('MX019', 'invalid before_version',
            format('before_version is %s', before_version),
            'Versions start at 1; pass NULL to delete the whole stream.');
    END IF;
    -- Appenders of the stream wait, so versions stay consistent with what is left.
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));

    DELETE FROM meowmx.parked_events AS d
    USING meowmx.events AS e
    WHERE e.position = d.position
        AND e.category = delete_stream.category AND e.stream_id = delete_stream.stream_id
        AND e.version < coalesce(before_version, meowmx._bigint_max());
    DELETE FROM meowmx.snapshots AS s
    WHERE s.category = delete_stream.category AND s.stream_id = delete_stream.stream_id
        AND s.version < coalesce(before_version, meowmx._bigint_max());
    DELETE FROM meowmx.events AS e
    WHERE e.category = delete_stream.category AND e.stream_id = delete_stream.stream_id
        AND e.version < coalesce(before_version, meowmx._bigint_max());
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END;
$$;

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (4, 'end_cursor_and_error_codes');
