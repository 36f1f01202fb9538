-- meowmx from psql alone: psql -X -v ON_ERROR_STOP=1 -f examples/psql_walkthrough.sql "$DSN"
-- (after installing meowmx: meowmx install, or meowmx sql | psql -v ON_ERROR_STOP=1 -1 -f - "$DSN").

\set SHOW_CONTEXT never

\echo '1. append to stream cart/alice: a new stream (expected_version 0), then two more at once'
SELECT version, position FROM meowmx.append_event(
    category => 'cart', stream_id => 'alice', event_type => 'ItemAdded',
    data => '{"sku": "yarn", "qty": 2}', expected_version => 0);
SELECT version, position FROM meowmx.append_events(
    category => 'cart', stream_id => 'alice', expected_version => 1,
    events => '[{"type": "ItemAdded", "data": {"sku": "laser", "qty": 1}},
                {"type": "CheckedOut", "data": {}, "metadata": {"via": "psql"}}]');

\echo '2. a conflict: the stream is at version 3, this writer expected 1; nothing is written'
\set ON_ERROR_STOP off
SELECT * FROM meowmx.append_event(
    category => 'cart', stream_id => 'alice', event_type => 'ItemRemoved',
    data => '{"sku": "yarn"}', expected_version => 1);
\set ON_ERROR_STOP on
SELECT meowmx.stream_version(category => 'cart', stream_id => 'alice') AS version_after_conflict;

\echo '3. reads: the stream, then the category in commit order, in pages of 2 with the cursor'
SELECT version, event_type, data FROM meowmx.read_stream(category => 'cart', stream_id => 'alice');
SELECT meowmx.append_event(category => 'cart', stream_id => 'bob', event_type => 'ItemAdded',
                           data => '{"sku": "box", "qty": 1}') IS NOT NULL AS appended;
SELECT stream_id, version, event_type FROM meowmx.read_events(categories => '{cart}', max_count => 2);
SELECT cursor AS page_1_cursor
FROM meowmx.read_events(categories => '{cart}', max_count => 2) OFFSET 1 \gset
SELECT stream_id, version, event_type
FROM meowmx.read_events(categories => '{cart}', max_count => 2, after => :'page_1_cursor');

\echo '4. a subscription driven by hand: claim, handle, ack; claim again continues after the ack'
SELECT meowmx.create_subscription(name => 'cart-emails', categories => '{cart}',
                                  event_types => '{CheckedOut}');
SELECT partition, position, stream_id, event_type
FROM meowmx.claim_batch(subscription => 'cart-emails', worker => 'psql-user') \gset
SELECT meowmx.ack(subscription => 'cart-emails', worker => 'psql-user',
                  partition => :partition, event_position => :position);
SELECT count(*) AS events_left
FROM meowmx.claim_batch(subscription => 'cart-emails', worker => 'psql-user');
SELECT partition, events_behind, lease_owner FROM meowmx.subscription_status(name => 'cart-emails');
SELECT meowmx.release(subscription => 'cart-emails', worker => 'psql-user') AS released;
