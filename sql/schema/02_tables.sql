-- Tables and the row types that functions return. Every table is private: the
-- public functions are the API.

-- Which upgrades the database has: each records itself in its last statement,
-- and a fresh install records every one it includes (10_version.sql).
CREATE TABLE meowmx.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The event log. `transaction_id` is the appending transaction's id: readers
-- order by (transaction_id, position) and stop below the oldest running
-- transaction, so an event that commits late is never skipped.
CREATE TABLE meowmx.events (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    category text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    event_type text NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb,
    event_id uuid,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (category, stream_id, version)
);

CREATE INDEX events_commit_order_idx ON meowmx.events (transaction_id, position);
CREATE INDEX events_category_idx ON meowmx.events (category, transaction_id, position);
CREATE INDEX events_type_idx ON meowmx.events (event_type, transaction_id, position);
-- Partial, so appends without ids pay nothing for it.
CREATE UNIQUE INDEX events_event_id_key ON meowmx.events (event_id)
WHERE event_id IS NOT NULL;

CREATE TABLE meowmx.subscriptions (
    name text PRIMARY KEY,
    categories text[],
    event_types text[],
    partitions integer NOT NULL,
    start_at text NOT NULL,
    max_attempts integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE meowmx.subscription_partitions (
    subscription text NOT NULL REFERENCES meowmx.subscriptions (name) ON DELETE CASCADE,
    partition integer NOT NULL,
    -- Every matching event at or before this place in commit order is done.
    checkpoint_xid xid8 NOT NULL,
    checkpoint_position bigint NOT NULL,
    -- The batch handed out: it ends at batch_end (the last event scanned, which
    -- may belong to another partition); batch_last_position is its last event.
    batch_end_xid xid8,
    batch_end_position bigint,
    batch_last_position bigint,
    lease_owner text,
    lease_expires_at timestamptz,
    lease_duration interval,
    -- The event that failed last (only the first pending event can fail).
    failing_position bigint,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    retry_at timestamptz,
    PRIMARY KEY (subscription, partition)
);

-- Dead letters: events that failed max_attempts times; their partition moved on.
CREATE TABLE meowmx.parked_events (
    subscription text NOT NULL REFERENCES meowmx.subscriptions (name) ON DELETE CASCADE,
    partition integer NOT NULL,
    position bigint NOT NULL,
    attempts integer NOT NULL,
    error text,
    parked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, position)
);

-- A stream's folded state at a version, so readers need not replay from 1.
CREATE TABLE meowmx.snapshots (
    category text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    state jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (category, stream_id, version)
);

-- Where this cluster's transaction ids stand against the order ids in the log. A
-- log restored or replicated from another cluster holds ids this cluster may not
-- have reached; meowmx.adopt_cluster() records the shift that puts new ids past
-- them (see _order_shift). No row: no shift.
CREATE TABLE meowmx.order_shift (
    one_row boolean PRIMARY KEY DEFAULT TRUE CHECK (one_row),
    shift numeric NOT NULL CHECK (shift > 0),
    adopted_at timestamptz NOT NULL DEFAULT now()
);

-- Inside CREATE EXTENSION (the tables belong to the extension), pg_dump dumps only
-- the definitions, and the rows of the tables marked here; CREATE EXTENSION writes
-- meowmx.migrations itself. A plain install needs nothing: pg_dump dumps it all.
DO $$
BEGIN
    IF EXISTS (
        SELECT FROM pg_catalog.pg_depend AS d
        WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.objid = 'meowmx.events'::pg_catalog.regclass
            AND d.deptype = 'e'
    ) THEN
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.events', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.events_position_seq', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.subscriptions', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.subscription_partitions', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.parked_events', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.snapshots', '');
        PERFORM pg_catalog.pg_extension_config_dump('meowmx.order_shift', '');
    END IF;
END;
$$;

-- Row types ----------------------------------------------------------------------------

CREATE TYPE meowmx.appended AS (
    version bigint,
    position bigint
);

CREATE TYPE meowmx.recorded_event AS (
    position bigint,
    transaction_id xid8,
    category text,
    stream_id text,
    version bigint,
    event_type text,
    data jsonb,
    metadata jsonb,
    event_id uuid,
    recorded_at timestamptz,
    cursor text
);

CREATE TYPE meowmx.claimed_event AS (
    partition integer,
    position bigint,
    transaction_id xid8,
    category text,
    stream_id text,
    version bigint,
    event_type text,
    data jsonb,
    metadata jsonb,
    event_id uuid,
    recorded_at timestamptz,
    cursor text,
    -- Failed attempts the server recorded for this event so far (0: first delivery).
    attempts integer
);

CREATE TYPE meowmx.parked_event AS (
    partition integer,
    position bigint,
    category text,
    stream_id text,
    version bigint,
    event_type text,
    attempts integer,
    error text,
    parked_at timestamptz
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
