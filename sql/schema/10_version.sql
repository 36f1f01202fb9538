-- The upgrades this definition includes: an upgraded database records the same rows.
INSERT INTO meowmx.migrations (version, name) VALUES
(1, 'core'),
(2, 'subscriptions'),
(3, 'roles_and_streams'),
(4, 'end_cursor_and_error_codes'),
(5, 'cluster_moves'),
(6, 'roles_optional'),
(7, 'workers'),
(8, 'session_move_check'),
(9, 'session_shift'),
(10, 'standby_batches'),
(11, 'metrics'),
(12, 'faster_batches');
