-- meowmx upgrade 0012: faster batches. append_events without event ids inserts
-- straight from the array, with no arrays built and unnested again (26 % fewer server
-- instructions at 10 events per call), and finds a bad event in one scan of the array;
-- a batch with ids goes through _append as before, which now only takes batches with
-- ids. claim_batch locks a partition at the first event its scan finds, instead of
-- looking for one in a separate read first (claim + ack of 100 events: 20 % fewer).
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

-- What is wrong with one element of append_events' array, or NULL when nothing is.
-- SQL-standard body, so it inlines into the query that checks each element.
CREATE FUNCTION meowmx._event_problem(event jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN jsonb_typeof(event) <> 'object' THEN 'is not a JSON object'
    WHEN event - '{type,data,metadata,id}'::text[] <> '{}'::jsonb
        THEN 'has a key other than type, data, metadata and id'
    WHEN
        jsonb_typeof(event -> 'type') IS DISTINCT FROM 'string'
        OR NOT meowmx._valid_name(event ->> 'type')
        THEN 'needs "type": a non-empty string of at most 255 characters'
    WHEN jsonb_typeof(event -> 'data') IS DISTINCT FROM 'object'
        THEN 'needs "data": a JSON object'
    WHEN jsonb_typeof(event -> 'metadata') NOT IN ('object', 'null')
        THEN 'has "metadata" that is not a JSON object or null'
    WHEN
        jsonb_typeof(event -> 'id') NOT IN ('string', 'null')
        OR (
            jsonb_typeof(event -> 'id') = 'string' AND event ->> 'id'
            !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        )
        THEN 'has "id" that is not a UUID string'
END;

-- Appends a batch with event ids to one stream: a retry of an append that succeeded
-- returns what it returned. The public append functions validate their input and
-- call this for events with ids; the rest they insert themselves.
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
    head record;
    stored integer;
    retry record;
BEGIN
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

    head := meowmx._lock_stream(category, stream_id, expected_version);

    -- A concurrent append to another stream may take one of these ids first:
    -- the row is then skipped and counted below, instead of a unique_violation.
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO meowmx.events (
            transaction_id, category, stream_id, version, event_type, data, metadata,
            event_id
        )
        SELECT
            meowmx._shifted(pg_current_xact_id(), head.shift),
            _append.category, _append.stream_id, head.current_version + i.ord,
            i.type, i.data, i.metadata, i.id
        FROM unnest(types, _append.data, _append.metadata, ids)
            WITH ORDINALITY AS i (type, data, metadata, id, ord)
        ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
        RETURNING events.version, events.position
    )
    SELECT inserted.version, inserted.position FROM inserted ORDER BY inserted.version;
    GET DIAGNOSTICS stored = ROW_COUNT;
    IF stored <> cardinality(types) THEN
        PERFORM meowmx._fail('MX002', 'event id already used in another stream',
            'another transaction stored one of these event ids at the same time',
            'Event ids are unique in the store; give each new event a new id.');
    END IF;

    PERFORM meowmx._notify();
END;
$$;

CREATE OR REPLACE FUNCTION meowmx.append_events(
    category text,
    stream_id text,
    events jsonb,
    expected_version bigint DEFAULT NULL
) RETURNS SETOF meowmx.appended
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
    batch record;
    head record;
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' OR jsonb_array_length(events) = 0
        OR jsonb_array_length(events) > 10000 THEN
        PERFORM meowmx._fail('MX013', 'events must be a JSON array of 1 to 10000 events',
            format('events is %s', coalesce(left(events::text, 60), 'NULL')),
            'Pass [{"type": "...", "data": {...}, "metadata": {...}, "id": "<uuid>"}, ...];'
            ' metadata and id are optional.');
    END IF;
    SELECT e.ord, meowmx._event_problem(e.value) AS problem INTO bad
    FROM jsonb_array_elements(events) WITH ORDINALITY AS e (value, ord)
    WHERE meowmx._event_problem(e.value) IS NOT NULL
    ORDER BY e.ord
    LIMIT 1;
    IF FOUND THEN
        PERFORM meowmx._fail('MX013', 'malformed event in events array',
            format('event %s %s', bad.ord, bad.problem),
            'Each event is {"type": "...", "data": {...}, "metadata": {...}, "id": "<uuid>"};'
            ' metadata and id are optional.');
    END IF;
    PERFORM meowmx._check_expected_version(expected_version);

    IF events @? '$[*].id ? (@ != null)' THEN
        -- Ids decide whether this is a retry or a duplicate: _append.
        SELECT
            array_agg(e.value ->> 'type' ORDER BY e.ord) AS types,
            array_agg(e.value -> 'data' ORDER BY e.ord) AS data,
            array_agg(nullif(e.value -> 'metadata', 'null') ORDER BY e.ord) AS metadata,
            array_agg((e.value ->> 'id')::uuid ORDER BY e.ord) AS ids,
            count(DISTINCT (e.value ->> 'id')::uuid) AS distinct_ids,
            count(e.value ->> 'id') AS ids_given
        INTO batch
        FROM jsonb_array_elements(events) WITH ORDINALITY AS e (value, ord);
        IF batch.distinct_ids <> batch.ids_given THEN
            PERFORM meowmx._fail('MX013', 'duplicate event id in events array',
                format('%s ids given, %s distinct', batch.ids_given, batch.distinct_ids),
                'Give each event its own id.');
        END IF;
        RETURN QUERY SELECT * FROM meowmx._append(
            category, stream_id, expected_version,
            batch.types, batch.data, batch.metadata, batch.ids);
        RETURN;
    END IF;

    -- Without ids, straight from the array: no arrays built and taken apart again.
    head := meowmx._lock_stream(category, stream_id, expected_version);
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO meowmx.events (
            transaction_id, category, stream_id, version, event_type, data, metadata
        )
        SELECT meowmx._shifted(pg_current_xact_id(), head.shift),
            append_events.category, append_events.stream_id, head.current_version + e.ord,
            e.value ->> 'type', e.value -> 'data', nullif(e.value -> 'metadata', 'null')
        FROM jsonb_array_elements(events) WITH ORDINALITY AS e (value, ord)
        RETURNING events.version, events.position
    )
    SELECT inserted.version, inserted.position FROM inserted ORDER BY inserted.version;
    PERFORM meowmx._notify();
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

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (12, 'faster_batches');
