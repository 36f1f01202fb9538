-- meowmx upgrade 0004: meowmx.end_cursor(), and one SQLSTATE per condition.
--
-- Frozen once released. Each function below is copied from sql/schema/, where it is
-- defined; a test checks that the two agree.

-- A cursor after every event readable now: reading after it returns only events
-- that commit later (every transaction still running, or newer, comes after it).
-- It is where start_at => 'end' starts, and where `meowmx tail --from-end` follows.
CREATE FUNCTION meowmx.end_cursor() RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN meowmx._cursor(pg_snapshot_xmin(pg_current_snapshot()), 0);
GRANT EXECUTE ON FUNCTION meowmx.end_cursor()
TO meowmx_reader, meowmx_writer, meowmx_worker, meowmx_admin;

-- A start place ('beginning', 'end' or a cursor) as a checkpoint.
CREATE OR REPLACE FUNCTION meowmx._start_checkpoint(start_at text, OUT xid xid8, OUT pos bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT c.xid, c.pos INTO xid, pos FROM meowmx._parse_cursor(CASE start_at
        WHEN 'beginning' THEN '0:0'
        WHEN 'end' THEN meowmx.end_cursor()
        ELSE start_at
    END) AS c;
END;
$$;

-- PUBLIC gets nothing, new functions included (see schema/08_revoke_public.sql).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;

INSERT INTO meowmx.migrations (version, name) VALUES (4, 'end_cursor_and_error_codes');
