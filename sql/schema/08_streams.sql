-- Stream management, snapshots, and moving the store to another cluster.

-- Snapshots -----------------------------------------------------------------------------


CREATE FUNCTION meowmx.save_snapshot(
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
CALL meowmx._grant_execute('meowmx.save_snapshot(text, text, bigint, jsonb)', 'writer', 'admin');

-- The newest snapshot at or below max_version (NULL: the newest); no row if none.
CREATE FUNCTION meowmx.load_snapshot(
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
CALL meowmx._grant_execute(
    'meowmx.load_snapshot(text, text, bigint)', 'reader', 'writer', 'worker', 'admin'
);

-- Streams -------------------------------------------------------------------------------


-- The streams of a category in stream id order, after `after` (exclusive).
CREATE FUNCTION meowmx.list_streams(
    category text, after text DEFAULT NULL, max_count integer DEFAULT 1000
) RETURNS SETOF meowmx.stream_summary
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_name('category', category, 'MX010');
    PERFORM meowmx._check_max_count(max_count);
    RETURN QUERY
    SELECT e.stream_id, max(e.version)
    FROM meowmx.events AS e
    WHERE e.category = list_streams.category AND e.stream_id > coalesce(after, '')
    GROUP BY e.stream_id
    ORDER BY e.stream_id
    LIMIT max_count;
END;
$$;
CALL meowmx._grant_execute(
    'meowmx.list_streams(text, text, integer)', 'reader', 'writer', 'worker', 'admin'
);

-- Deletes a stream's events (and snapshots) before `before_version`, or all of
-- them when it is NULL. Subscriptions lose nothing else: a checkpoint is a place
-- in commit order, not an event, so the remaining events keep their places.
-- Returns how many events were deleted.
CREATE FUNCTION meowmx.delete_stream(
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
CALL meowmx._grant_execute('meowmx.delete_stream(text, text, bigint)', 'admin');

-- Moving the store ---------------------------------------------------------------------

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
    PERFORM set_config('meowmx.shift', '', false);  -- this session checks again
    RETURN shift;
END;
$$;
CALL meowmx._grant_execute('meowmx.adopt_cluster()', 'admin');
