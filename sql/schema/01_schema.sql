-- meowmx schema: the current definition, read top to bottom (files in name order).
--
-- Plain SQL with no psql meta-commands, so any migration tool can apply it. A fresh
-- database runs these files; an existing one runs ../upgrades/ after its version.
-- A change here goes with a new upgrade file, and a test checks that both agree.

CREATE SCHEMA meowmx;
REVOKE ALL ON SCHEMA meowmx FROM PUBLIC;
-- A no-op kept from the first release (see 09_revoke_public.sql).
ALTER DEFAULT PRIVILEGES IN SCHEMA meowmx REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- The group roles, optional where the installer may not create roles: 04_roles.sql.
