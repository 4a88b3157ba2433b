-- One statement trigger per append instead of two (docs/performance.md, "Less PostgreSQL
-- work per transfer"). Every INSERT into events ran two AFTER ... FOR EACH STATEMENT
-- triggers: events_notify (sql/001: the wake-up NOTIFY daybook_events) and
-- events_version_gap_free_per_statement (sql/013: gap-free versions). Each run is a
-- PL/pgSQL call with its pinned search_path set and reset (sql/011), its own SPI
-- statement and plan. The version check now sends the wake-up itself, after the check
-- passes: same channel, same empty payload, still once per statement (including one
-- that inserts no row), and still delivered only if the transaction commits. A failed
-- check raises before the NOTIFY, as the transaction's rollback discarded it before.
--
-- On a live database: both statements change only the catalog (no scan, no rewrite),
-- in this migration's one transaction, so no append runs with neither NOTIFY or both.
-- DROP TRIGGER takes events' ACCESS EXCLUSIVE lock, as sql/013's did: it waits for the
-- transactions then using events (appends, reads) to end and holds new ones off for
-- that moment; run it when no long read of the log (an export, a rebuild) is going.

CREATE OR REPLACE FUNCTION events_check_versions() RETURNS trigger
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
	-- The followers' wake-up hint, delivered at commit (was events_notify).
	PERFORM pg_notify('daybook_events', '');
	RETURN NULL;
END $$;

DROP TRIGGER events_notify ON events;
DROP FUNCTION events_notify();
