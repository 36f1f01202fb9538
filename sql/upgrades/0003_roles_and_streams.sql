-- meowmx migration 0003: least-privilege roles, stream management, snapshots.

-- Snapshots -------------------------------------------------------------------------

-- A stream's folded state at a version, so readers need not replay from 1.
CREATE TABLE meowmx.snapshots (
    category text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    state jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (category, stream_id, version)
);

CREATE TYPE meowmx.snapshot AS (
    version bigint,
    state jsonb,
    created_at timestamptz
);

CREATE TYPE meowmx.stream_summary AS (
    stream_id text,
    version bigint
);

CREATE FUNCTION meowmx.save_snapshot(
    category text, stream_id text, version bigint, state jsonb
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version bigint := meowmx.stream_version(category, stream_id);
BEGIN
    IF version IS NULL OR version < 1 OR version > current_version THEN
        PERFORM meowmx._fail('MX030', 'snapshot version out of range',
            format('stream %s/%s is at version %s; snapshot version is %s',
                category, stream_id, current_version, coalesce(version::text, 'NULL')),
            'Snapshot a version the stream has reached: from 1 to its current version.');
    END IF;
    IF state IS NULL OR jsonb_typeof(state) <> 'object' THEN
        PERFORM meowmx._fail('MX012', 'snapshot state must be a JSON object',
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
CREATE FUNCTION meowmx.load_snapshot(
    category text, stream_id text, max_version bigint DEFAULT NULL
) RETURNS SETOF meowmx.snapshot
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF max_version < 1 THEN
        PERFORM meowmx._fail('MX017', 'invalid stream read',
            format('max_version is %s', max_version),
            'Versions start at 1; pass NULL for the newest snapshot.');
    END IF;
    RETURN QUERY
    SELECT s.version, s.state, s.created_at
    FROM meowmx.snapshots AS s
    WHERE s.category = load_snapshot.category AND s.stream_id = load_snapshot.stream_id
        AND s.version <= coalesce(max_version, 9223372036854775807)
    ORDER BY s.version DESC
    LIMIT 1;
END;
$$;

-- Streams ---------------------------------------------------------------------------

-- The streams of a category in stream id order, after `after` (exclusive).
CREATE FUNCTION meowmx.list_streams(
    category text, after text DEFAULT NULL, max_count integer DEFAULT 1000
) RETURNS SETOF meowmx.stream_summary
LANGUAGE plpgsql STABLE
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

-- Deletes a stream's events (and snapshots) before `before_version`, or all of
-- them when it is NULL. Subscriptions lose nothing else: a checkpoint is a place
-- in commit order, not an event, so the remaining events keep their places.
-- Returns how many events were deleted.
CREATE FUNCTION meowmx.delete_stream(
    category text, stream_id text, before_version bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM meowmx._check_stream(category, stream_id);
    IF before_version < 1 THEN
        PERFORM meowmx._fail('MX017', 'invalid stream read',
            format('before_version is %s', before_version),
            'Versions start at 1; pass NULL to delete the whole stream.');
    END IF;
    -- Appenders of the stream wait, so versions stay consistent with what is left.
    PERFORM pg_advisory_xact_lock(meowmx._stream_lock_key(category, stream_id));

    DELETE FROM meowmx.parked_events AS d
    USING meowmx.events AS e
    WHERE e.position = d.position
        AND e.category = delete_stream.category AND e.stream_id = delete_stream.stream_id
        AND e.version < coalesce(before_version, 9223372036854775807);
    DELETE FROM meowmx.snapshots AS s
    WHERE s.category = delete_stream.category AND s.stream_id = delete_stream.stream_id
        AND s.version < coalesce(before_version, 9223372036854775807);
    DELETE FROM meowmx.events AS e
    WHERE e.category = delete_stream.category AND e.stream_id = delete_stream.stream_id
        AND e.version < coalesce(before_version, 9223372036854775807);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END;
$$;

-- Roles -----------------------------------------------------------------------------

-- Group roles (NOLOGIN): grant them to login roles. The functions run as their
-- owner (SECURITY DEFINER, search_path pinned, every name qualified), so these
-- roles need no rights on the tables, and nobody but the owner can change or
-- delete an event except through meowmx.delete_stream.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY[
        'meowmx_reader', 'meowmx_writer', 'meowmx_worker', 'meowmx_admin'
    ] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles AS r WHERE r.rolname = role_name) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by an install in another database
            END;
        END IF;
    END LOOP;
END;
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA meowmx FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA meowmx FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;
GRANT USAGE ON SCHEMA meowmx TO meowmx_reader, meowmx_writer, meowmx_worker, meowmx_admin;

ALTER FUNCTION meowmx.append_event(text, text, text, jsonb, bigint, jsonb, uuid) SECURITY DEFINER;
ALTER FUNCTION meowmx.append_events(text, text, jsonb, bigint) SECURITY DEFINER;
ALTER FUNCTION meowmx.read_stream(text, text, bigint, integer, boolean) SECURITY DEFINER;
ALTER FUNCTION meowmx.read_events(text, integer, text[], text[]) SECURITY DEFINER;
ALTER FUNCTION meowmx.stream_version(text, text) SECURITY DEFINER;
ALTER FUNCTION meowmx.version() SECURITY DEFINER;
ALTER FUNCTION meowmx.list_streams(text, text, integer) SECURITY DEFINER;
ALTER FUNCTION meowmx.save_snapshot(text, text, bigint, jsonb) SECURITY DEFINER;
ALTER FUNCTION meowmx.load_snapshot(text, text, bigint) SECURITY DEFINER;
ALTER FUNCTION meowmx.delete_stream(text, text, bigint) SECURITY DEFINER;
ALTER FUNCTION meowmx.create_subscription(text, text[], text[], integer, text, integer)
SECURITY DEFINER;
ALTER FUNCTION meowmx.drop_subscription(text) SECURITY DEFINER;
ALTER FUNCTION meowmx.reset_subscription(text, text) SECURITY DEFINER;
ALTER FUNCTION meowmx.claim_batch(text, text, integer, interval) SECURITY DEFINER;
ALTER FUNCTION meowmx.ack(text, text, integer, bigint) SECURITY DEFINER;
ALTER FUNCTION meowmx.nack(text, text, integer, bigint, text, interval) SECURITY DEFINER;
ALTER FUNCTION meowmx.release(text, text) SECURITY DEFINER;
ALTER FUNCTION meowmx.subscription_status(text) SECURITY DEFINER;
ALTER FUNCTION meowmx.list_parked(text, integer) SECURITY DEFINER;
ALTER FUNCTION meowmx.requeue_parked(text, bigint) SECURITY DEFINER;
-- horizon_blockers stays SECURITY INVOKER: run as the owner it would show other
-- users' query texts to every caller.

GRANT EXECUTE ON FUNCTION
meowmx.read_stream(text, text, bigint, integer, boolean),
meowmx.read_events(text, integer, text[], text[]),
meowmx.stream_version(text, text),
meowmx.version(),
meowmx.list_streams(text, text, integer),
meowmx.load_snapshot(text, text, bigint),
meowmx.horizon_blockers()
TO meowmx_reader, meowmx_writer, meowmx_worker, meowmx_admin;

GRANT EXECUTE ON FUNCTION
meowmx.append_event(text, text, text, jsonb, bigint, jsonb, uuid),
meowmx.append_events(text, text, jsonb, bigint),
meowmx.save_snapshot(text, text, bigint, jsonb)
TO meowmx_writer, meowmx_admin;

GRANT EXECUTE ON FUNCTION
meowmx.create_subscription(text, text[], text[], integer, text, integer),
meowmx.claim_batch(text, text, integer, interval),
meowmx.ack(text, text, integer, bigint),
meowmx.nack(text, text, integer, bigint, text, interval),
meowmx.release(text, text),
meowmx.subscription_status(text),
meowmx.list_parked(text, integer)
TO meowmx_worker, meowmx_admin;

GRANT EXECUTE ON FUNCTION
meowmx.delete_stream(text, text, bigint),
meowmx.drop_subscription(text),
meowmx.reset_subscription(text, text),
meowmx.requeue_parked(text, bigint)
TO meowmx_admin;

INSERT INTO meowmx.migrations (version, name) VALUES (3, 'roles_and_streams');
