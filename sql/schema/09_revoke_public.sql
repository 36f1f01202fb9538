-- PUBLIC gets nothing. Functions need this explicitly: per-schema default privileges
-- cannot take back the EXECUTE that PUBLIC holds on every new function by default.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meowmx FROM PUBLIC;
