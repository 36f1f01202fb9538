-- Roles: four NOLOGIN group roles per database, <prefix>_reader, _writer, _worker and
-- _admin; grant them to login roles. The functions run as their owner (SECURITY
-- DEFINER, search_path pinned, every name qualified), so these roles need no rights on
-- the tables, and nobody but the owner can change or delete an event except through
-- meowmx.delete_stream.
--
-- The roles are optional. Roles are cluster-wide and creating one needs CREATEROLE, which
-- a managed host's application role lacks: such an installer installs everything else,
-- a WARNING names the roles an administrator creates, and meowmx.create_roles() then
-- gives them their grants. So every grant is kept as data, and a public function's
-- EXECUTE is granted by meowmx._grant_execute right after its definition.

CREATE TYPE meowmx.role_kind AS ENUM ('reader', 'writer', 'worker', 'admin');

-- What the first install chose (the role prefix), so that later upgrades grant to the
-- same roles.
CREATE TABLE meowmx.settings (
    name text PRIMARY KEY,
    value text NOT NULL
);

-- Which kind of role may execute which public function, by its signature as regprocedure
-- prints it: text, since pg_upgrade refuses tables with regprocedure columns.
CREATE TABLE meowmx.function_grants (
    signature text NOT NULL,
    kind meowmx.role_kind NOT NULL,
    PRIMARY KEY (signature, kind)
);

-- This database's role of a kind.
CREATE FUNCTION meowmx._role_name(kind meowmx.role_kind) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT s.value FROM meowmx.settings AS s WHERE s.name = 'role_prefix')
        || '_' || kind::text;
END;
$$;

-- Reads the setting meowmx.role_prefix (unset: the stored prefix, or 'meowmx' on a
-- fresh install), checks it and stores it. A database keeps its prefix: a different one
-- is refused, since the grants went to the roles of the first.
CREATE PROCEDURE meowmx._choose_role_prefix()
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text := nullif(current_setting('meowmx.role_prefix', true), '');
    stored text := (SELECT s.value FROM meowmx.settings AS s WHERE s.name = 'role_prefix');
BEGIN
    -- 56 characters leave room for '_writer' in a 63-byte name; pg_ names are reserved.
    IF wanted !~ '^[a-z][a-z0-9_]{0,55}$' OR wanted ~ '^pg(_|$)' THEN
        PERFORM meowmx._fail('MX060', 'invalid role prefix',
            format('meowmx.role_prefix is %s', quote_literal(left(wanted, 80))),
            'Set meowmx.role_prefix to 1 to 56 lower-case letters, digits or underscores, '
            'starting with a letter but not with pg_ (the roles are <prefix>_reader, '
            '<prefix>_writer, <prefix>_worker and <prefix>_admin), or leave it unset for '
            'meowmx.',
            jsonb_build_object('role_prefix', wanted));
    END IF;
    IF stored IS NULL THEN
        INSERT INTO meowmx.settings (name, value)
        VALUES ('role_prefix', coalesce(wanted, 'meowmx'));
    ELSIF wanted <> stored THEN
        PERFORM meowmx._fail('MX061', 'role prefix differs from this database''s',
            format('this database grants to the %s_* roles; meowmx.role_prefix is %s',
                stored, wanted),
            format('Leave meowmx.role_prefix unset here, or set it to %s: it is read when '
                'meowmx is first installed in a database.', stored),
            jsonb_build_object('role_prefix', wanted, 'installed_role_prefix', stored));
    END IF;
END;
$$;

REVOKE ALL ON PROCEDURE meowmx._choose_role_prefix() FROM PUBLIC;

-- Grants each recorded EXECUTE (of one function, or of all) to this database's roles
-- that exist. A function dropped since is skipped.
CREATE PROCEDURE meowmx._apply_grants(signature text DEFAULT NULL)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    grant_to record;
BEGIN
    FOR grant_to IN
        SELECT to_regprocedure(g.signature) AS routine, meowmx._role_name(g.kind) AS role_name
        FROM meowmx.function_grants AS g
        WHERE _apply_grants.signature IS NULL OR g.signature = _apply_grants.signature
        ORDER BY g.signature, g.kind
    LOOP
        IF grant_to.routine IS NOT NULL AND EXISTS (
            SELECT FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_to.role_name
        ) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I',
                grant_to.routine, grant_to.role_name);
        END IF;
    END LOOP;
END;
$$;

REVOKE ALL ON PROCEDURE meowmx._apply_grants(text) FROM PUBLIC;

-- Records that roles of these kinds may execute the function, and grants it to those
-- that exist: what follows each public function instead of a GRANT.
CREATE PROCEDURE meowmx._grant_execute(routine regprocedure, VARIADIC kinds meowmx.role_kind[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Under the pinned search_path regprocedure prints one schema-qualified spelling.
    canonical text := routine::text;
BEGIN
    INSERT INTO meowmx.function_grants AS g (signature, kind)
    SELECT canonical, k.kind FROM unnest(kinds) AS k (kind)
    ON CONFLICT ON CONSTRAINT function_grants_pkey DO NOTHING;
    CALL meowmx._apply_grants(canonical);
END;
$$;

REVOKE ALL ON PROCEDURE meowmx._grant_execute(regprocedure, meowmx.role_kind[]) FROM PUBLIC;

-- Creates this database's missing roles where the caller may, and gives every role that
-- exists its grants; one row per role. The installer runs it; the owner (or a superuser)
-- runs it again after an administrator created the roles. It runs as its caller, whose
-- right to create roles is what counts.
CREATE FUNCTION meowmx.create_roles()
RETURNS TABLE (kind meowmx.role_kind, role_name text, status text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    missing text[] := '{}';
    owner_name text := (
        SELECT n.nspowner::regrole::text FROM pg_catalog.pg_namespace AS n
        WHERE n.nspname = 'meowmx'
    );
BEGIN
    FOREACH kind IN ARRAY enum_range(NULL::meowmx.role_kind) LOOP
        role_name := meowmx._role_name(kind);
        status := 'existed';
        IF NOT EXISTS (
            SELECT FROM pg_catalog.pg_roles AS r WHERE r.rolname = create_roles.role_name
        ) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
                status := 'created';
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- created meanwhile by an install in another database
                WHEN insufficient_privilege THEN
                    status := 'missing';
                    missing := missing || role_name;
            END;
        END IF;
        IF status <> 'missing' THEN
            EXECUTE format('GRANT USAGE ON SCHEMA meowmx TO %I', role_name);
        END IF;
        RETURN NEXT;
    END LOOP;
    CALL meowmx._apply_grants();
    IF cardinality(missing) > 0 THEN
        RAISE WARNING USING
            MESSAGE = format('group roles not created: %s', array_to_string(missing, ', ')),
            DETAIL = format('Role %s may not create roles. meowmx works for the owner %s; '
                'members of these roles get their rights once the roles exist.',
                quote_ident(current_user), owner_name),
            HINT = format('An administrator (a role with CREATEROLE) runs: %s Then %s runs: '
                'SELECT * FROM meowmx.create_roles();',
                (SELECT string_agg(format('CREATE ROLE %I NOLOGIN;', m), ' ')
                    FROM unnest(missing) AS m), owner_name);
    END IF;
END;
$$;

-- Not granted: it creates roles and grants rights as its caller, which only the owner
-- and superusers may do.

-- The install's own run.
CALL meowmx._choose_role_prefix();
DO $$
BEGIN
    PERFORM FROM meowmx.create_roles();
END;
$$;
