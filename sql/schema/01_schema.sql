-- meowmx schema: the current definition, read top to bottom (files in name order).
--
-- Plain SQL with no psql meta-commands, so any migration tool can apply it. A fresh
-- database runs these files; an existing one runs ../upgrades/ after its version.
-- A change here goes with a new upgrade file, and a test checks that both agree.

CREATE SCHEMA meowmx;
REVOKE ALL ON SCHEMA meowmx FROM PUBLIC;
-- A no-op kept from the first release (see 08_revoke_public.sql).
ALTER DEFAULT PRIVILEGES IN SCHEMA meowmx REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Group roles (NOLOGIN): grant them to login roles. The functions run as their
-- owner (SECURITY DEFINER, search_path pinned, every name qualified), so these
-- roles need no rights on the tables, and nobody but the owner can change or
-- delete an event except through meowmx.delete_stream. Each public function
-- grants EXECUTE right after its definition.
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

GRANT USAGE ON SCHEMA meowmx TO meowmx_reader, meowmx_writer, meowmx_worker, meowmx_admin;
