-- Reads: by stream, and everything (or some categories or types) in commit order.

CREATE FUNCTION meowmx.stream_version(category text, stream_id text) RETURNS bigint
LANGUAGE plpgsql STABLE
SECURITY DEFINER
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
CALL meowmx._grant_execute(
    'meowmx.stream_version(text, text)', 'reader', 'writer', 'worker', 'admin'
);

CREATE FUNCTION meowmx.read_stream(
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
CALL meowmx._grant_execute(
    'meowmx.read_stream(text, text, bigint, integer, boolean)',
    'reader', 'writer', 'worker', 'admin'
);

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
CALL meowmx._grant_execute(
    'meowmx.read_events(text, integer, text[], text[])', 'reader', 'writer', 'worker', 'admin'
);

-- A cursor after every event readable now: reading after it returns only events
-- that commit later. It is where start_at => 'end' starts, and where `meowmx tail
-- --from-end` follows. It names the newest readable event ('0:0' in an empty log),
-- not the horizon itself: a cursor never runs ahead of the stored order ids, so
-- adopt_cluster() can put every new id after every cursor handed out.
CREATE FUNCTION meowmx.end_cursor() RETURNS text
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
CALL meowmx._grant_execute('meowmx.end_cursor()', 'reader', 'writer', 'worker', 'admin');

CREATE FUNCTION meowmx.version() RETURNS integer
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN (SELECT max(m.version) FROM meowmx.migrations AS m);
CALL meowmx._grant_execute('meowmx.version()', 'reader', 'writer', 'worker', 'admin');
