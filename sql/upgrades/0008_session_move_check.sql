-- meowmx upgrade 0008: the check for a log from another cluster runs once per session.
-- A session that found no order id beyond this cluster's stops probing the commit
-- order index: reads and new streams' first appends no longer pay an index descent each.
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

-- Whether the log holds order ids this cluster has not handed out: it was restored or
-- copied from another cluster (see _order_shift). One descent of the commit order
-- index past its end (ORDER BY ... LIMIT, not EXISTS: the planner must take the index,
-- not a scan), about 55 us of CPU per call at 8 busy clients; so a session that found
-- none does not look again. A log gains such ids only while it is being loaded, by
-- pg_restore or a replication copy, and no session appends to or reads a log then.
CREATE FUNCTION meowmx._foreign_log() RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('meowmx.own_log', true) = 'checked' THEN
        RETURN false;
    END IF;
    IF (
        SELECT e.transaction_id FROM meowmx.events AS e
        WHERE e.transaction_id >= meowmx._next_xid() ORDER BY e.transaction_id LIMIT 1
    ) IS NOT NULL THEN
        RETURN true;
    END IF;
    PERFORM set_config('meowmx.own_log', 'checked', false);  -- for the session
    RETURN false;
END;
$$;

-- What reads deliver up to, as an order id: the oldest transaction still running
-- anywhere in the cluster (shifted). An event that commits late is never skipped.
CREATE OR REPLACE FUNCTION meowmx._horizon() RETURNS xid8
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF meowmx._foreign_log() THEN
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
CREATE OR REPLACE FUNCTION meowmx._lock_stream(
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
        -- (The session's answer, read here: a call costs more than the check.)
        moved := current_setting('meowmx.own_log', true) IS DISTINCT FROM 'checked'
            AND meowmx._foreign_log();
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

-- PUBLIC gets nothing, new functions included (see schema/09_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (8, 'session_move_check');
