-- meowmx migration 0001: event storage, appends and reads.
--
-- Plain SQL with no psql meta-commands, so any migration tool can apply it.
-- Names starting with an underscore are private and may change at any time.

CREATE SCHEMA meowmx;
REVOKE ALL ON SCHEMA meowmx FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA meowmx REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Which migrations ran; each migration records itself in its last statement.
CREATE TABLE meowmx.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The event log. `transaction_id` is the appending transaction's id: readers
-- order by (transaction_id, position) and stop below the oldest running
-- transaction, so an event that commits late is never skipped.
CREATE TABLE meowmx.events (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    category text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    event_type text NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb,
    event_id uuid,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (category, stream_id, version)
);

CREATE INDEX events_commit_order_idx ON meowmx.events (transaction_id, position);
CREATE INDEX events_category_idx ON meowmx.events (category, transaction_id, position);
CREATE INDEX events_type_idx ON meowmx.events (event_type, transaction_id, position);
-- Partial, so appends without ids pay nothing for it.
CREATE UNIQUE INDEX events_event_id_key ON meowmx.events (event_id)
WHERE event_id IS NOT NULL;

CREATE TYPE meowmx.appended AS (
    version bigint,
    position bigint
);

CREATE TYPE meowmx.recorded_event AS (
    position bigint,
    transaction_id xid8,
    category text,
    stream_id text,
    version bigint,
    event_type text,
    data jsonb,
    metadata jsonb,
    event_id uuid,
    recorded_at timestamptz,
    cursor text
);

-- Errors ----------------------------------------------------------------------

-- Raises a meowmx error. Every expected failure goes through here so that each
-- condition has its own SQLSTATE (class MX) with a DETAIL and a HINT.
CREATE FUNCTION meowmx._fail(
    errcode text, message text, detail text, hint text
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = _fail.errcode,
        MESSAGE = _fail.message,
        DETAIL = coalesce(_fail.detail, ''),
        HINT = coalesce(_fail.hint, '');
END;
$$;

-- Names (categories, stream ids, event types, ...) are non-empty and short
-- enough to index. _valid_name is the fast test for hot paths (a SQL-standard
-- body is bound when created, so it is inlined and needs no search_path);
-- _check_name raises the precise error.
CREATE FUNCTION meowmx._valid_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN name <> '' AND length(name) <= 255;

CREATE FUNCTION meowmx._check_name(kind text, name text, errcode text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL OR name = '' OR length(name) > 255 THEN
        PERFORM meowmx._fail(errcode, format('invalid %s', kind),
            format('%s is %s', kind, coalesce(quote_literal(left(name, 40)), 'NULL')),
            format('Pass a non-empty %s of at most 255 characters.', kind));
    END IF;
END;
$$;

CREATE FUNCTION meowmx._check_stream(category text, stream_id text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_name('category', category, 'MX010');
    PERFORM meowmx._check_name('stream_id', stream_id, 'MX010');
END;
$$;

CREATE FUNCTION meowmx._check_max_count(max_count integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_count IS NULL OR max_count < 1 OR max_count > 10000 THEN
        PERFORM meowmx._fail('MX014', 'max_count out of range',
            format('max_count is %s', coalesce(max_count::text, 'NULL')),
            'Pass a max_count from 1 to 10000 and page with the cursor or version.');
    END IF;
END;
$$;

-- A filter is NULL (no filter) or a non-empty array of non-empty names.
CREATE FUNCTION meowmx._check_filter(name text, names text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF names IS NOT NULL AND (
        coalesce(array_ndims(names), 0) <> 1
        OR EXISTS (
            SELECT FROM unnest(names) AS n (name)
            WHERE NOT coalesce(meowmx._valid_name(n.name), false)
        )
    ) THEN
        PERFORM meowmx._fail('MX018', format('invalid %s filter', name),
            format('%s is %s', name, names::text),
            format('Pass NULL for all %s, or a one-dimensional array of names '
                'of 1 to 255 characters.', name));
    END IF;
END;
$$;

-- Cursors ---------------------------------------------------------------------

-- A cursor names a place in commit order: '<transaction_id>:<position>'.
-- A SQL-standard body binds its names when created, so it needs no pinned
-- search_path; without one the planner inlines it into every read.
CREATE FUNCTION meowmx._cursor(xid xid8, pos bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN xid::text || ':' || pos::text;

CREATE FUNCTION meowmx._parse_cursor(cursor text, OUT xid xid8, OUT pos bigint)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parts text[] := regexp_match(cursor, '^([0-9]{1,20}):([0-9]{1,19})$');
BEGIN
    IF parts IS NULL
        OR parts[1]::numeric > 18446744073709551615
        OR parts[2]::numeric > 9223372036854775807 THEN
        PERFORM meowmx._fail('MX015', 'malformed cursor',
            format('cursor is %s', coalesce(quote_literal(left(cursor, 60)), 'NULL')),
            'Pass NULL to start at the beginning, or the cursor column of a row '
            'that meowmx returned.');
    END IF;
    xid := parts[1]::xid8;
    pos := parts[2]::bigint;
END;
$$;

-- Appends ---------------------------------------------------------------------

CREATE FUNCTION meowmx._check_expected_version(expected_version bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF expected_version < -1 THEN
        PERFORM meowmx._fail('MX016', 'invalid expected_version',
            format('expected_version is %s', expected_version),
            'Pass NULL (any), 0 (stream must not exist), -1 (stream must exist) '
            'or the exact current version.');
    END IF;
END;
$$;

-- The advisory lock key of a stream: appenders (and deletes) of one stream take
-- it until they commit. SQL-standard body: bound when created, inlined.
CREATE FUNCTION meowmx._stream_lock_key(category text, stream_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended('meowmx/stream/' || category || '/' || stream_id, 0);

-- Takes the stream's lock, then returns its version after checking the
-- expected version and the transaction order. Appenders of one stream are
-- serialized by an advisory lock taken before the append assigns a
-- transaction id, so transaction ids grow with stream versions.
CREATE FUNCTION meowmx._lock_stream(
    p_category text, p_stream_id text, p_expected_version bigint
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint;
    last_transaction_id xid8;
BEGIN
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(p_category, p_stream_id));

    SELECT e.version, e.transaction_id INTO current_version, last_transaction_id
    FROM meowmx.events AS e
    WHERE e.category = p_category AND e.stream_id = p_stream_id
    ORDER BY e.version DESC
    LIMIT 1;
    current_version := coalesce(current_version, 0);

    IF p_expected_version IS NOT NULL AND NOT (
        (p_expected_version = -1 AND current_version > 0)
        OR p_expected_version = current_version
    ) THEN
        PERFORM meowmx._fail('MX001', 'wrong expected version',
            format('stream %s/%s: expected version %s, actual version %s',
                p_category, p_stream_id, p_expected_version, current_version),
            'Read the stream again, decide again, and retry with its current version.');
    END IF;

    -- Only a transaction that wrote before this call can hold an id older than
    -- the stream's last append; its events would sort before that append.
    IF pg_current_xact_id_if_assigned() < last_transaction_id THEN
        PERFORM meowmx._fail('MX004', 'transaction is older than the stream''s last append',
            format('stream %s/%s was appended to by transaction %s, which started after '
                'this one took its transaction id %s', p_category, p_stream_id,
                last_transaction_id, pg_current_xact_id_if_assigned()),
            'Retry the whole transaction, or append before writing anything else in it.');
    END IF;
    RETURN current_version;
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

-- Appends a batch to one stream. The public append functions validate their
-- input and call this (append_event only for the less common cases).
CREATE FUNCTION meowmx._append(
    p_category text,
    p_stream_id text,
    p_expected_version bigint,
    p_types text[],
    p_data jsonb[],
    p_metadata jsonb[],
    p_ids uuid[]
) RETURNS SETOF meowmx.appended
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint;
    given_ids integer := cardinality(array_remove(p_ids, NULL));
    retry record;
BEGIN
    IF given_ids > 0 THEN
        -- Under the stream's lock, so that concurrent retries see each other.
        PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(p_category, p_stream_id));
        SELECT
            count(*) AS found,
            min(e.category || '/' || e.stream_id) FILTER (
                WHERE e.category <> p_category OR e.stream_id <> p_stream_id
            ) AS other_stream,
            -- where the batch would start if this is a retry
            min(e.version - i.ord) AS base
        INTO retry
        FROM unnest(p_ids) WITH ORDINALITY AS i (id, ord)
        INNER JOIN meowmx.events AS e ON e.event_id = i.id;

        IF retry.other_stream IS NOT NULL THEN
            PERFORM meowmx._fail('MX002', 'event id already used in another stream',
                format('an event id of this append is stored in stream %s', retry.other_stream),
                'Event ids are unique in the store; give each new event a new id.');
        ELSIF retry.found > 0 THEN
            -- A retry of an append that succeeded holds the whole batch at
            -- consecutive versions, each event with the id it was sent with
            -- (or none): return what the append returned.
            IF (
                SELECT count(*) FROM unnest(p_ids) WITH ORDINALITY AS i (id, ord)
                INNER JOIN meowmx.events AS e
                    ON e.category = p_category AND e.stream_id = p_stream_id
                    AND e.version = retry.base + i.ord
                WHERE e.event_id IS NOT DISTINCT FROM i.id
            ) = cardinality(p_ids) THEN
                RETURN QUERY
                SELECT e.version, e.position
                FROM meowmx.events AS e
                WHERE e.category = p_category AND e.stream_id = p_stream_id
                    AND e.version BETWEEN retry.base + 1 AND retry.base + cardinality(p_ids)
                ORDER BY e.version;
                RETURN;
            END IF;
            PERFORM meowmx._fail('MX003', 'append partly matches events already stored',
                format('%s of the %s events are already in stream %s/%s',
                    retry.found, cardinality(p_ids), p_category, p_stream_id),
                'Resend exactly the events of the earlier append, in the same order, '
                'or give new events new ids.');
        END IF;
    END IF;

    current_version := meowmx._lock_stream(p_category, p_stream_id, p_expected_version);

    IF given_ids = 0 THEN
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO meowmx.events (
                category, stream_id, version, event_type, data, metadata
            )
            SELECT p_category, p_stream_id, current_version + i.ord, i.type, i.data, i.metadata
            FROM unnest(p_types, p_data, p_metadata) WITH ORDINALITY AS i (type, data, metadata, ord)
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
                p_category, p_stream_id, current_version + i.ord,
                i.type, i.data, i.metadata, i.id
            FROM unnest(p_types, p_data, p_metadata, p_ids)
                WITH ORDINALITY AS i (type, data, metadata, id, ord)
            ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
            RETURNING events.version, events.position
        )
        SELECT inserted.version, inserted.position FROM inserted ORDER BY inserted.version;
        GET DIAGNOSTICS given_ids = ROW_COUNT;
        IF given_ids <> cardinality(p_types) THEN
            PERFORM meowmx._fail('MX002', 'event id already used in another stream',
                'another transaction stored one of these event ids at the same time',
                'Event ids are unique in the store; give each new event a new id.');
        END IF;
    END IF;

    PERFORM meowmx._notify();
END;
$$;

CREATE FUNCTION meowmx._check_event(event_type text, data jsonb, metadata jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_name('event_type', event_type, 'MX011');
    IF data IS NULL OR jsonb_typeof(data) <> 'object' THEN
        PERFORM meowmx._fail('MX012', 'event data must be a JSON object',
            format('data is %s', coalesce(jsonb_typeof(data), 'NULL')),
            'Wrap the value in an object, for example {"value": ...}.');
    END IF;
    IF jsonb_typeof(metadata) NOT IN ('object', 'null') THEN
        PERFORM meowmx._fail('MX012', 'event metadata must be a JSON object or NULL',
            format('metadata is %s', jsonb_typeof(metadata)),
            'Pass NULL or a JSON object.');
    END IF;
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result meowmx.appended;
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

    -- The common case, without arrays or a set-returning call (a third of the
    -- cost of an append). The lock comes first, in its own statement: the
    -- INSERT assigns the transaction id.
    result.version := meowmx._lock_stream(category, stream_id, expected_version) + 1;
    INSERT INTO meowmx.events AS e (category, stream_id, version, event_type, data, metadata)
    VALUES (
        append_event.category, append_event.stream_id, result.version,
        append_event.event_type, append_event.data, nullif(append_event.metadata, 'null')
    )
    RETURNING e.position INTO result.position;
    PERFORM meowmx._notify();
    RETURN result;
END;
$$;

CREATE FUNCTION meowmx.append_events(
    category text,
    stream_id text,
    events jsonb,
    expected_version bigint DEFAULT NULL
) RETURNS SETOF meowmx.appended
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch record;
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' OR jsonb_array_length(events) = 0
        OR jsonb_array_length(events) > 10000 THEN
        PERFORM meowmx._fail('MX013', 'events must be a JSON array of 1 to 10000 events',
            format('events is %s', coalesce(left(events::text, 60), 'NULL')),
            'Pass [{"type": "...", "data": {...}, "metadata": {...}, "id": "<uuid>"}, ...];'
            ' metadata and id are optional.');
    END IF;

    -- One pass: the arrays to insert, and what is wrong with the first bad element.
    SELECT
        min(x.ord) FILTER (WHERE x.problem IS NOT NULL) AS bad_ord,
        (array_agg(x.problem ORDER BY x.ord) FILTER (WHERE x.problem IS NOT NULL))[1] AS bad,
        array_agg(x.value ->> 'type' ORDER BY x.ord) AS types,
        array_agg(x.value -> 'data' ORDER BY x.ord) AS data,
        array_agg(nullif(x.value -> 'metadata', 'null') ORDER BY x.ord) AS metadata,
        array_agg(CASE WHEN x.problem IS NULL THEN (x.value ->> 'id')::uuid END
            ORDER BY x.ord) AS ids,
        count(DISTINCT CASE WHEN x.problem IS NULL THEN (x.value ->> 'id')::uuid END)
            AS distinct_ids,
        count(x.value ->> 'id') AS ids_given
    INTO batch
    FROM (
        SELECT e.value, e.ord, CASE
            WHEN jsonb_typeof(e.value) <> 'object' THEN 'is not a JSON object'
            WHEN e.value - '{type,data,metadata,id}'::text[] <> '{}'::jsonb
                THEN 'has a key other than type, data, metadata and id'
            WHEN jsonb_typeof(e.value -> 'type') IS DISTINCT FROM 'string'
                OR NOT meowmx._valid_name(e.value ->> 'type')
                THEN 'needs "type": a non-empty string of at most 255 characters'
            WHEN jsonb_typeof(e.value -> 'data') IS DISTINCT FROM 'object'
                THEN 'needs "data": a JSON object'
            WHEN jsonb_typeof(e.value -> 'metadata') NOT IN ('object', 'null')
                THEN 'has "metadata" that is not a JSON object or null'
            WHEN jsonb_typeof(e.value -> 'id') NOT IN ('string', 'null')
                OR (jsonb_typeof(e.value -> 'id') = 'string' AND e.value ->> 'id' !~*
                    '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
                THEN 'has "id" that is not a UUID string'
        END AS problem
        FROM jsonb_array_elements(events) WITH ORDINALITY AS e (value, ord)
    ) AS x;

    IF batch.bad_ord IS NOT NULL THEN
        PERFORM meowmx._fail('MX013', 'malformed event in events array',
            format('event %s %s', batch.bad_ord, batch.bad),
            'Each event is {"type": "...", "data": {...}, "metadata": {...}, "id": "<uuid>"};'
            ' metadata and id are optional.');
    END IF;
    IF batch.distinct_ids <> batch.ids_given THEN
        PERFORM meowmx._fail('MX013', 'duplicate event id in events array',
            format('%s ids given, %s distinct', batch.ids_given, batch.distinct_ids),
            'Give each event its own id.');
    END IF;

    PERFORM meowmx._check_expected_version(expected_version);
    RETURN QUERY SELECT * FROM meowmx._append(
        category, stream_id, expected_version,
        batch.types, batch.data, batch.metadata, batch.ids);
END;
$$;

-- Reads -----------------------------------------------------------------------

CREATE FUNCTION meowmx.stream_version(category text, stream_id text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    RETURN coalesce((
        SELECT max(e.version) FROM meowmx.events AS e
        WHERE e.category = stream_version.category AND e.stream_id = stream_version.stream_id
    ), 0);
END;
$$;

CREATE FUNCTION meowmx.read_stream(
    category text,
    stream_id text,
    from_version bigint DEFAULT NULL,
    max_count integer DEFAULT 1000,
    backwards boolean DEFAULT FALSE
) RETURNS SETOF meowmx.recorded_event
LANGUAGE plpgsql STABLE
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
            AND e.version <= coalesce(from_version, 9223372036854775807)
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
CREATE FUNCTION meowmx.read_events(
    after text DEFAULT NULL,
    max_count integer DEFAULT 1000,
    categories text[] DEFAULT NULL,
    event_types text[] DEFAULT NULL
) RETURNS SETOF meowmx.recorded_event
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    from_xid xid8 := '0';
    from_position bigint := 0;
BEGIN
    PERFORM meowmx._check_max_count(max_count);
    PERFORM meowmx._check_filter('categories', categories);
    PERFORM meowmx._check_filter('event_types', event_types);
    IF after IS NOT NULL THEN
        SELECT c.xid, c.pos INTO from_xid, from_position
        FROM meowmx._parse_cursor(after) AS c;
    END IF;

    IF categories IS NULL AND event_types IS NULL THEN
        RETURN QUERY
        SELECT e.*, meowmx._cursor(e.transaction_id, e.position)
        FROM meowmx.events AS e
        WHERE (e.transaction_id, e.position) > (from_xid, from_position)
            AND e.transaction_id < horizon
        ORDER BY e.transaction_id, e.position
        LIMIT max_count;
    ELSE
        -- One ordered index range per category (or type), merged. The names go
        -- in as literals so the planner sees how rare each one is: behind a
        -- parameter it may guess that a rare category matches most rows and
        -- walk the commit order index instead, filtering the whole table.
        RETURN QUERY EXECUTE format(
            'SELECT e.*, meowmx._cursor(e.transaction_id, e.position) FROM (%s) AS e'
            ' ORDER BY e.transaction_id, e.position LIMIT $4',
            (
                SELECT string_agg(format(
                    '(SELECT ev.* FROM meowmx.events AS ev WHERE ev.%I = %L'
                    ' AND (ev.transaction_id, ev.position) > ($1, $2)'
                    ' AND ev.transaction_id < $3 %s'
                    ' ORDER BY ev.transaction_id, ev.position LIMIT $4)',
                    filter.column_name, filter.value,
                    CASE WHEN filter.column_name = 'category' AND event_types IS NOT NULL
                        THEN 'AND ev.event_type = ANY($5)' ELSE '' END
                ), ' UNION ALL ')
                FROM (
                    SELECT DISTINCT
                        CASE WHEN categories IS NULL THEN 'event_type' ELSE 'category' END,
                        unnest(coalesce(categories, event_types))
                ) AS filter (column_name, value)
            ))
        USING from_xid, from_position, horizon, max_count, event_types;
    END IF;
END;
$$;

CREATE FUNCTION meowmx.version() RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT max(m.version) FROM meowmx.migrations AS m);

INSERT INTO meowmx.migrations (version, name) VALUES (1, 'core');
