-- Appends: one event, or a batch of one stream, with optimistic concurrency.

-- Takes the stream's lock, then returns its version after checking the
-- expected version and the transaction order, and the shift of order ids (see
-- _session_shift). Appenders of one stream are serialized by an advisory lock
-- taken before the append assigns a transaction id, so transaction ids grow
-- with stream versions.
CREATE FUNCTION meowmx._lock_stream(
    category text, stream_id text, expected_version bigint,
    OUT current_version bigint, OUT shift numeric
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last_transaction_id xid8;
BEGIN
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));
    -- The session's shift, read here once known: a call costs more than the read.
    shift := coalesce(
        nullif(current_setting('meowmx.shift', true), '')::numeric, meowmx._session_shift());

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
    IF meowmx._shifted(pg_current_xact_id_if_assigned(), shift) < last_transaction_id THEN
        PERFORM meowmx._fail('MX004', 'transaction is older than the stream''s last append',
            format('stream %s/%s was appended to by transaction %s, which started after '
                'this one took its transaction id %s', category, stream_id,
                last_transaction_id, pg_current_xact_id_if_assigned()),
            'Retry the whole transaction, or append before writing anything else in it.',
            jsonb_build_object('category', category, 'stream_id', stream_id));
    END IF;
END;
$$;

-- Wakes listeners. Only one open appending transaction at a time notifies
-- (NOTIFY serializes commits cluster-wide); a woken listener reads until the
-- horizon passes every transaction that was open when it woke, which covers
-- the appenders that skipped their NOTIFY.
CREATE FUNCTION meowmx._notify() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(current_setting('meowmx.notify', true), '') <> 'off'
        AND pg_try_advisory_xact_lock(hashtextextended('meowmx/notify', 0)) THEN
        PERFORM pg_notify('meowmx', '');
    END IF;
END;
$$;

-- Appends a batch with event ids to one stream: a retry of an append that succeeded
-- returns what it returned. The public append functions validate their input and
-- call this for events with ids; the rest they insert themselves.
CREATE FUNCTION meowmx._append(
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

CREATE FUNCTION meowmx.append_event(
    category text,
    stream_id text,
    event_type text,
    data jsonb,
    expected_version bigint DEFAULT NULL,
    metadata jsonb DEFAULT NULL,
    event_id uuid DEFAULT NULL
) RETURNS meowmx.appended
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result meowmx.appended;
    last_transaction_id xid8;
    head record;
BEGIN
    -- One inlined test on the hot path; the checks name the problem when it fails.
    IF NOT coalesce(
        meowmx._valid_name(category) AND meowmx._valid_name(stream_id)
        AND meowmx._valid_name(event_type) AND jsonb_typeof(data) = 'object'
        AND coalesce(jsonb_typeof(metadata) IN ('object', 'null'), true)
        AND coalesce(expected_version >= -1, true), false) THEN
        PERFORM meowmx._check_stream(category, stream_id);
        PERFORM meowmx._check_event(event_type, data, metadata);
        PERFORM meowmx._check_expected_version(expected_version);
    END IF;
    IF event_id IS NOT NULL THEN
        SELECT * INTO result FROM meowmx._append(
            category, stream_id, expected_version,
            ARRAY[event_type], ARRAY[data], ARRAY[nullif(metadata, 'null')], ARRAY[event_id]);
        RETURN result;
    END IF;

    -- The common case without arrays or a set-returning call (a third of the cost of
    -- an append). The lock comes first, in its own statement: the INSERT assigns the
    -- transaction id. In a session that found the log its own (no shift), it is
    -- _lock_stream inline, where it would pass: 9 % fewer instructions per append.
    IF current_setting('meowmx.shift', true) = '0' THEN
        PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));
        SELECT e.version, e.transaction_id INTO result.version, last_transaction_id
        FROM meowmx.events AS e
        WHERE e.category = append_event.category AND e.stream_id = append_event.stream_id
        ORDER BY e.version DESC
        LIMIT 1;
        IF (CASE WHEN last_transaction_id IS NULL THEN coalesce(expected_version, 0) = 0
                ELSE expected_version IS NULL OR expected_version IN (-1, result.version) END)
            AND (pg_current_xact_id_if_assigned() >= last_transaction_id) IS NOT false THEN
            result.version := coalesce(result.version, 0) + 1;
            INSERT INTO meowmx.events AS e (
                transaction_id, category, stream_id, version, event_type, data, metadata
            )
            VALUES (
                pg_current_xact_id(),
                append_event.category, append_event.stream_id, result.version,
                append_event.event_type, append_event.data, nullif(append_event.metadata, 'null')
            )
            RETURNING e.position INTO result.position;
            PERFORM meowmx._notify();
            RETURN result;
        END IF;
    END IF;

    -- Otherwise _lock_stream checks the log (once per session) and names the problem,
    -- or gives the shift.
    head := meowmx._lock_stream(category, stream_id, expected_version);
    result.version := head.current_version + 1;
    INSERT INTO meowmx.events AS e (
        transaction_id, category, stream_id, version, event_type, data, metadata
    )
    VALUES (
        meowmx._shifted(pg_current_xact_id(), head.shift),
        append_event.category, append_event.stream_id, result.version,
        append_event.event_type, append_event.data, nullif(append_event.metadata, 'null')
    )
    RETURNING e.position INTO result.position;
    PERFORM meowmx._notify();
    RETURN result;
END;
$$;
CALL meowmx._grant_execute(
    'meowmx.append_event(text, text, text, jsonb, bigint, jsonb, uuid)', 'writer', 'admin'
);

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

CREATE FUNCTION meowmx.append_events(
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
CALL meowmx._grant_execute('meowmx.append_events(text, text, jsonb, bigint)', 'writer', 'admin');
