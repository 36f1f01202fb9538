-- meowmx upgrade 0005: a store that outlives its server.
--
-- Order ids: a log restored or replicated from another cluster keeps its order,
-- cursors and checkpoints (meowmx.adopt_cluster(), meowmx.order_shift); reads and
-- appends refuse with MX050 until it has run. end_cursor() names the newest
-- readable event. In an extension, pg_dump now dumps the tables' rows.
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

CREATE TABLE meowmx.order_shift (
    one_row boolean PRIMARY KEY DEFAULT TRUE CHECK (one_row),
    shift numeric NOT NULL CHECK (shift > 0),
    adopted_at timestamptz NOT NULL DEFAULT now()
);

-- Inside CREATE EXTENSION (the tables belong to the extension), pg_dump dumps only
-- the definitions, and the rows of the tables marked here; CREATE EXTENSION writes
-- meowmx.migrations itself. A plain install needs nothing: pg_dump dumps it all.
DO $$
BEGIN
    IF EXISTS (
        SELECT FROM pg_catalog.pg_depend AS d
        WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.objid = 'meowmx.events'::pg_catalog.regclass
            AND d.deptype = 'e'
    ) THEN
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.events', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.events_position_seq', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.subscriptions', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.subscription_partitions', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.parked_events', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.snapshots', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.order_shift', '');
    END IF;
END;
$$;

DROP FUNCTION meowmx._lock_stream(text, text, bigint);

-- An order id is the appending transaction's id plus the shift in force (0 in the
-- cluster that wrote the log). SQL-standard body: bound when created, inlined.
CREATE FUNCTION meowmx._shifted(xid xid8, shift numeric) RETURNS xid8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN shift = 0 THEN xid ELSE (xid::text::numeric + shift)::text::xid8 END;

-- The shift to add to this cluster's transaction ids. Callers ask only when the log
-- holds an id at or past what this cluster has handed out, which never happens where
-- the log was written: it came from another cluster. Until adopt_cluster() has
-- shifted new ids past it, reads and appends would misplace events: they are refused.
CREATE FUNCTION meowmx._order_shift() RETURNS numeric
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shift numeric := coalesce((SELECT s.shift FROM meowmx.order_shift AS s), 0);
    newest xid8 := (SELECT max(e.transaction_id) FROM meowmx.events AS e);
BEGIN
    -- This transaction's own appends may be newer than its snapshot's xmax.
    IF newest >= meowmx._shifted(pg_snapshot_xmax(pg_current_snapshot()), shift)
        AND newest IS DISTINCT FROM meowmx._shifted(pg_current_xact_id_if_assigned(), shift)
        THEN
        PERFORM meowmx._fail('MX050', 'the event log comes from another cluster',
            format('the newest stored order id is %s; this cluster''s transaction ids are '
                'below %s', newest, pg_snapshot_xmax(pg_current_snapshot())),
            'After a restore or a logical-replication copy, run meowmx install, or '
            'SELECT meowmx.adopt_cluster() as the schema owner.',
            jsonb_build_object('newest', newest::text, 'shift', shift));
    END IF;
    RETURN shift;
END;
$$;

-- Above every transaction id this cluster has handed out: age() of an xid counts up
-- to the next id to hand out, for a transaction that holds none (one that holds an
-- id gets its own). Not the snapshot's xmax, one past the newest *ended* transaction:
-- running appenders hold ids at or past it, and a probe of the log above xmax visits
-- their rows (12 % more CPU per append at 8 clients); above this bound this
-- cluster's log has no rows. (At an epoch wrap age() of a special xid is 2^31 - 1:
-- the probe then finds nothing, for that instant.)
CREATE FUNCTION meowmx._next_xid() RETURNS xid8
LANGUAGE sql STABLE PARALLEL SAFE
RETURN (
    pg_snapshot_xmax(pg_current_snapshot())::text::numeric
    + age((pg_snapshot_xmax(pg_current_snapshot())::text::numeric % 4294967296)::text::xid)
)::text::xid8;

-- What reads deliver up to, as an order id: the oldest transaction still running
-- anywhere in the cluster (shifted). An event that commits late is never skipped.
CREATE FUNCTION meowmx._horizon() RETURNS xid8
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- An order id this cluster has not handed out: the log came from another one.
    -- (ORDER BY ... LIMIT, not EXISTS: the planner must take the index, not a scan.)
    IF (
        SELECT e.transaction_id FROM meowmx.events AS e
        WHERE e.transaction_id >= meowmx._next_xid() ORDER BY e.transaction_id LIMIT 1
    ) IS NOT NULL THEN
        RETURN meowmx._shifted(pg_snapshot_xmin(pg_current_snapshot()), meowmx._order_shift());
    END IF;
    RETURN pg_snapshot_xmin(pg_current_snapshot());
END;
$$;

-- Takes the stream's lock, then returns its version after checking the
-- expected version and the transaction order, and the shift of order ids (see
-- _order_shift). Appenders of one stream are serialized by an advisory lock
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
    moved boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));

    SELECT e.version, e.transaction_id INTO current_version, last_transaction_id
    FROM meowmx.events AS e
    WHERE e.category = _lock_stream.category AND e.stream_id = _lock_stream.stream_id
    ORDER BY e.version DESC
    LIMIT 1;
    current_version := coalesce(current_version, 0);

    -- Whether the log holds ids this cluster has not reached (see _order_shift).
    -- The stream's last event tells, at no cost; a new stream's first append looks
    -- at the whole log. A log moved into a cluster whose ids overlap its own can pass
    -- the first test at a stream written long ago: adopt it before the first append.
    -- This transaction's own earlier appends may be at or past its snapshot's xmax:
    -- that is no sign of a move.
    IF last_transaction_id IS NULL THEN
        moved := (
            SELECT x.transaction_id FROM meowmx.events AS x
            WHERE x.transaction_id >= meowmx._next_xid() ORDER BY x.transaction_id LIMIT 1
        ) IS NOT NULL;
    ELSE
        moved := last_transaction_id >= pg_snapshot_xmax(pg_current_snapshot())
            AND last_transaction_id IS DISTINCT FROM pg_current_xact_id_if_assigned();
    END IF;
    shift := CASE WHEN moved THEN meowmx._order_shift() ELSE 0 END;

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

-- After a restore or a logical-replication copy into another cluster, makes new
-- events order after every one stored, so that cursors, checkpoints and
-- subscriptions keep their meaning: new order ids follow every stored one (events,
-- and checkpoints that may name deleted events), and positions every stored
-- position (a replication copy leaves the identity sequence behind). A no-op in
-- the cluster that wrote the log; meowmx install runs it every time. Returns the
-- shift now added to this cluster's transaction ids.
CREATE FUNCTION meowmx.adopt_cluster() RETURNS numeric
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    newest numeric := (
        SELECT max(x.id)::text::numeric FROM (
            SELECT max(e.transaction_id) FROM meowmx.events AS e
            UNION ALL
            SELECT greatest(max(p.checkpoint_xid), max(p.batch_end_xid))
            FROM meowmx.subscription_partitions AS p
        ) AS x (id)
    );
    shift numeric := coalesce((SELECT s.shift FROM meowmx.order_shift AS s), 0);
    -- Transactions running now may still append, with ids from the horizon on.
    needed numeric := newest + 1 - pg_snapshot_xmin(pg_current_snapshot())::text::numeric;
    positions regclass := pg_get_serial_sequence('meowmx.events', 'position')::regclass;
    last_position bigint := (SELECT max(e.position) FROM meowmx.events AS e);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('meowmx/adopt', 0));
    IF needed > shift THEN
        INSERT INTO meowmx.order_shift AS s (shift) VALUES (needed)
        ON CONFLICT ON CONSTRAINT order_shift_pkey
        DO UPDATE SET shift = excluded.shift, adopted_at = excluded.adopted_at;
        -- The log came from another cluster: say so, it explains the shifted ids.
        RAISE NOTICE 'meowmx: adopted the event log; transaction ids shifted by %', needed;
        shift := needed;
    END IF;
    IF last_position > coalesce(pg_sequence_last_value(positions), 0) THEN
        PERFORM setval(positions, last_position);
    END IF;
    RETURN shift;
END;
$$;
GRANT EXECUTE ON FUNCTION meowmx.adopt_cluster()
TO meowmx_admin;

-- A cursor after every event readable now: reading after it returns only events
-- that commit later. It is where start_at => 'end' starts, and where `meowmx tail
-- --from-end` follows. It names the newest readable event ('0:0' in an empty log),
-- not the horizon itself: a cursor never runs ahead of the stored order ids, so
-- adopt_cluster() can put every new id after every cursor handed out.
CREATE OR REPLACE FUNCTION meowmx.end_cursor() RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    horizon xid8 := meowmx._horizon();
BEGIN
    RETURN coalesce((
        SELECT meowmx._cursor(e.transaction_id, e.position)
        FROM meowmx.events AS e
        WHERE e.transaction_id < horizon
        ORDER BY e.transaction_id DESC, e.position DESC
        LIMIT 1
    ), '0:0');
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
    horizon xid8 := meowmx._horizon();
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
    head record;
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

    head := meowmx._lock_stream(category, stream_id, expected_version);

    IF given_ids = 0 THEN
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO meowmx.events (
                transaction_id, category, stream_id, version, event_type, data, metadata
            )
            SELECT meowmx._shifted(pg_current_xact_id(), head.shift),
                _append.category, _append.stream_id, head.current_version + i.ord,
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

CREATE OR REPLACE FUNCTION meowmx.append_event(
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

    -- The common case, without arrays or a set-returning call (a third of the
    -- cost of an append). The lock comes first, in its own statement: the
    -- INSERT assigns the transaction id.
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

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (5, 'cluster_moves');
