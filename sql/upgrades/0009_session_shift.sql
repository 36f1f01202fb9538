-- meowmx upgrade 0009: each session reads and checks the shift of order ids once,
-- then keeps it (meowmx.shift), and appends and reads apply it everywhere. Before, an
-- append looked at its stream's last event to decide whether the log had moved: once
-- this cluster's own ids passed a moved log's, a stream written before the move got
-- unshifted ids, which ordered before events appended since, and readers past those
-- skipped them. In a session whose log never moved, append_event's common case runs
-- inline: as many server instructions per append as schema 3, 8 % fewer than schema 8
-- (benchmarks/instructions.py).
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

DROP FUNCTION meowmx._foreign_log();
DROP FUNCTION meowmx._next_xid();

-- The shift, checked by _order_shift once per session and then kept in the setting
-- meowmx.shift: the check reads the log's last order id, about 15 % of an append. The
-- log gains foreign ids only while pg_restore or a replication copy loads it, when no
-- session uses it, and the shift changes only in adopt_cluster(), which clears its own
-- session's setting: sessions opened before a load must reconnect (README). (A session
-- that sets meowmx.shift itself misplaces only the events it appends.)
CREATE FUNCTION meowmx._session_shift() RETURNS numeric
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shift numeric := nullif(current_setting('meowmx.shift', true), '');
BEGIN
    IF shift IS NULL THEN
        shift := meowmx._order_shift();
        PERFORM set_config('meowmx.shift', shift::text, false);  -- for the session
    END IF;
    RETURN shift;
END;
$$;

-- What reads deliver up to, as an order id: the oldest transaction still running
-- anywhere in the cluster (shifted). An event that commits late is never skipped.
CREATE OR REPLACE FUNCTION meowmx._horizon() RETURNS xid8
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('meowmx.shift', true) = '0' THEN  -- no call where nothing moved
        RETURN pg_snapshot_xmin(pg_current_snapshot());
    END IF;
    RETURN meowmx._shifted(pg_snapshot_xmin(pg_current_snapshot()), meowmx._session_shift());
END;
$$;

-- Takes the stream's lock, then returns its version after checking the
-- expected version and the transaction order, and the shift of order ids (see
-- _session_shift). Appenders of one stream are serialized by an advisory lock
-- taken before the append assigns a transaction id, so transaction ids grow
-- with stream versions.
CREATE OR REPLACE FUNCTION meowmx._lock_stream(
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

-- After a restore or a logical-replication copy into another cluster, makes new
-- events order after every one stored, so that cursors, checkpoints and
-- subscriptions keep their meaning: new order ids follow every stored one (events,
-- and checkpoints that may name deleted events), and positions every stored
-- position (a replication copy leaves the identity sequence behind). A no-op in
-- the cluster that wrote the log; meowmx install runs it every time. Returns the
-- shift now added to this cluster's transaction ids.
CREATE OR REPLACE FUNCTION meowmx.adopt_cluster() RETURNS numeric
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
    PERFORM set_config('meowmx.shift', '', false);  -- this session checks again
    RETURN shift;
END;
$$;

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (9, 'session_shift');
