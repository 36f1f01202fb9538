-- Private helpers: errors, argument checks, cursors, lock keys, partitions.
-- Names starting with an underscore are private and may change at any time.

-- Errors --------------------------------------------------------------------------------

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

-- The largest bigint: what a NULL upper bound on versions and positions means.
CREATE FUNCTION meowmx._bigint_max() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 9223372036854775807;

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

-- Cursors -------------------------------------------------------------------------------


-- A cursor names a place in commit order: '<transaction_id>:<position>'.
-- A SQL-standard body binds its names when created, so it needs no pinned
-- search_path; without one the planner inlines it into every read.
CREATE FUNCTION meowmx._cursor(xid xid8, pos bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN xid::text || ':' || pos::text;

-- The parts of a cursor; NULLs when it is not one.
CREATE FUNCTION meowmx._parse_cursor(cursor text, OUT xid xid8, OUT pos bigint)
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
CREATE FUNCTION meowmx._start_checkpoint(start_at text, OUT xid xid8, OUT pos bigint)
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

-- Order ids -------------------------------------------------------------------------------

-- An order id is the appending transaction's id plus the shift in force (0 in the
-- cluster that wrote the log). SQL-standard body: bound when created, inlined.
CREATE FUNCTION meowmx._shifted(xid xid8, shift numeric) RETURNS xid8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN shift = 0 THEN xid ELSE (xid::text::numeric + shift)::text::xid8 END;

-- The shift to add to this cluster's transaction ids, once the log is known to be this
-- cluster's: where it holds an id at or past what this cluster has handed out, it came
-- from another cluster, and until adopt_cluster() has shifted new ids past it, reads and
-- appends would misplace events: they are refused.
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
CREATE FUNCTION meowmx._horizon() RETURNS xid8
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

-- Locks and partitions ------------------------------------------------------------------

-- The advisory lock key of a stream: appenders (and deletes) of one stream take
-- it until they commit. SQL-standard body: bound when created, inlined.
CREATE FUNCTION meowmx._stream_lock_key(category text, stream_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended('meowmx/stream/' || category || '/' || stream_id, 0);

-- The partition of a stream: md5 is the same on every PostgreSQL version and
-- platform (hashtext is not promised to be). SQL-standard body, so it inlines.
CREATE FUNCTION meowmx._partition_of(category text, stream_id text, partitions integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (('x' || left(md5(category || '/' || stream_id), 8))::bit(32)::bigint % partitions)::integer;
