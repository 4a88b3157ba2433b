-- The stream name's CHECK without a counted repetition (docs/performance.md "Write path
-- budget"). PostgreSQL's regex engine unrolls `{1,64}` into 64 states, and matching
-- the pattern of sql/001 and sql/008 was about 7 % of the command's write backend's
-- CPU (some 2 µs per event). The same names pass and fail: the prefix `[a-z]+` holds
-- no hyphen, so the id is everything after the first one, one or more characters of
-- [A-Za-z0-9._:-] by the pattern and at most 64 of them by the length (the pattern
-- admits only ASCII, so bytes are characters). tests/integration/test_roles.c checks
-- the edges. Same SQLSTATE (23514), same constraint names.
--
-- The new constraints are added NOT VALID: every stored row already passed the old
-- constraint, which accepts exactly the same names, so a second scan of the log under
-- this migration's lock (some seconds per million events, holding off reads and
-- writes) would prove nothing new. NOT VALID constraints are enforced on every new
-- row and update like any other.

ALTER TABLE events DROP CONSTRAINT events_stream_check,
	ADD CONSTRAINT events_stream_check
	CHECK (stream ~ '^[a-z]+-[A-Za-z0-9._:-]+$' AND octet_length(stream) - strpos(stream, '-') <= 64) NOT VALID;

ALTER TABLE account_snapshots DROP CONSTRAINT account_snapshots_stream_check,
	ADD CONSTRAINT account_snapshots_stream_check
	CHECK (stream ~ '^[a-z]+-[A-Za-z0-9._:-]+$' AND octet_length(stream) - strpos(stream, '-') <= 64) NOT VALID;
