-- Gap-free versions checked once per statement instead of once per row (SPEC §5;
-- docs/performance.md "Write path budget"). The command service appends a whole batch
-- in one INSERT; the row trigger of sql/001 ran a PL/pgSQL call and an index probe
-- per event, a third of the write backend's CPU. This trigger runs once per INSERT
-- (or COPY) and checks every new row at once, after the statement: each new version
-- n > 1 needs version n-1 of its stream in the log at an earlier position, inserted
-- before or by the same statement (earlier in it). The log is append-only and
-- (stream, version) unique, so that is the rule the row trigger enforced, with the
-- same SQLSTATE (23000): versions gap-free, and in the log in version order.

CREATE FUNCTION events_check_versions() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	gap record;
BEGIN
	SELECT n.stream, n.version INTO gap FROM events_new n
		WHERE n.version > 1 AND NOT EXISTS (
			SELECT 1 FROM events e WHERE e.stream = n.stream AND e.version = n.version - 1
				AND e.position < n.position)
		LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'stream % has no version % before version %',
			gap.stream, gap.version - 1, gap.version
			USING ERRCODE = 'integrity_constraint_violation';
	END IF;
	RETURN NULL;
END $$;

CREATE TRIGGER events_version_gap_free_per_statement AFTER INSERT ON events
	REFERENCING NEW TABLE AS events_new
	FOR EACH STATEMENT EXECUTE FUNCTION events_check_versions();

DROP TRIGGER events_version_gap_free ON events;
DROP FUNCTION events_check_version();
