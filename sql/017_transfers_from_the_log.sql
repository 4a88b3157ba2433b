-- The SQL model of transfers reads the log (docs/read-models.md, docs/performance.md
-- "The SQL model of transfers from the log"). rm_transfers was a table the projector
-- wrote a row into for every transfer (a heap row and a key entry in the WAL, and the
-- projector backend's CPU), and that a rebuild loaded into a shadow table; everything
-- in it is in the TransferSent event already: the log's own unique index
-- events_transfer_id (sql/001) finds it by id, its stream names the sender, its data
-- has to, amount and reference, recorded_at is the time, and the currency is the
-- sender's, from its AccountOpened event (version 1 of the same stream, found by
-- events_stream_version; a currency never changes).
--
-- The view has the table's name and columns, and its rows: a transfer is in it only
-- once the SQL projection's checkpoint covers its event in reader order
-- ((txid, position) <= the checkpoint's), exactly when the projector wrote its row
-- before (every event up to the checkpoint was committed when the projector read
-- past it). So a read that reports the SQL checkpoint as its position never shows a
-- transfer beyond it, and the Redis resync's copy, verify and time travel read the
-- same rows as before. transfer_id is the index's expression as it stands (the
-- database's collation, not "C": a COLLATE here would keep the index from being used);
-- readers that need bytewise order say COLLATE "C" themselves, as verify does.
--
-- The view reads only events and projection_checkpoints, never the rm_* tables that a
-- rebuild's switch drops and renames: the switch needs no change of it, and moves the
-- checkpoint that the view follows in the same transaction.
--
-- On a live database: DROP TABLE takes rm_transfers' exclusive lock for a moment (the
-- projector's batch in flight and reads of it finish first; migrate gives way after
-- its lock timeout and tries again). Nothing else is locked exclusively: events is
-- only read, to define the view. Projectors of the version before go on running until
-- replaced: their batches still insert transfer rows, which the trigger below drops
-- (the view has them from the log), so migrate first, then roll the new binaries out
-- (docs/operations.md, "Migration 017"). A rebuild of the version before fails
-- before its switch (no rm_transfers_shadow to load or key) and leaves the live
-- models untouched.

DROP TABLE rm_transfers;
DROP TABLE IF EXISTS rm_transfers_shadow; -- an interrupted rebuild's, if any

CREATE VIEW rm_transfers AS
SELECT e.data ->> 'transfer_id' AS transfer_id,
       substr(e.stream, length('account-') + 1) AS from_account,
       e.data ->> 'to' AS to_account,
       (e.data ->> 'amount')::bigint AS amount,
       o.data ->> 'currency' AS currency,
       e.data ->> 'reference' AS reference,
       e.recorded_at AS at
FROM projection_checkpoints c
JOIN events e ON e.type = 'TransferSent' AND (e.txid, e.position) <= (c.txid, c.position)
JOIN events o ON o.stream = e.stream AND o.version = 1
WHERE c.projection = 'sql';

REVOKE ALL ON rm_transfers FROM PUBLIC;
GRANT SELECT ON rm_transfers TO daybook_projector, daybook_query;

-- The previous version's projector inserts its batch's transfer rows (in write_rows,
-- with the other rows): they are the log's already, so the insert is let through and
-- drops them. Only that projector needs it; a later migration may drop it once no
-- projector of the version before can run.
CREATE FUNCTION rm_transfers_from_the_log() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
	RETURN NULL;
END $$;

CREATE TRIGGER rm_transfers_insert_of_an_old_projector INSTEAD OF INSERT ON rm_transfers
	FOR EACH ROW EXECUTE FUNCTION rm_transfers_from_the_log();
GRANT INSERT ON rm_transfers TO daybook_projector;

-- The rebuild's shadow tables without rm_transfers (sql/005, sql/007, sql/015).
CREATE OR REPLACE FUNCTION rm_shadow_reset() RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	t text;
	opts text[];
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_totals'] LOOP
		SELECT c.reloptions INTO opts FROM pg_class c WHERE c.oid = t::regclass;
		EXECUTE format('DROP TABLE IF EXISTS %I', t || '_shadow');
		-- In CREATE TABLE, not a later ALTER TABLE: storage parameters are part of the
		-- table's shape, and only the keys are added after the bulk load.
		EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)%s',
			t || '_shadow', t,
			CASE WHEN opts IS NULL THEN ''
			     ELSE ' WITH (' || array_to_string(opts, ', ') || ')' END);
	END LOOP;
END $$;

CREATE OR REPLACE FUNCTION rm_shadow_drop() RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_totals'] LOOP
		EXECUTE format('DROP TABLE IF EXISTS %I', t || '_shadow');
	END LOOP;
END $$;

CREATE OR REPLACE FUNCTION rm_shadow_key(t text) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
	CASE t
	WHEN 'rm_accounts' THEN ALTER TABLE rm_accounts_shadow ADD PRIMARY KEY (account_id);
	WHEN 'rm_entries' THEN ALTER TABLE rm_entries_shadow ADD PRIMARY KEY (account_id, version);
	WHEN 'rm_totals' THEN ALTER TABLE rm_totals_shadow ADD PRIMARY KEY (currency);
	END CASE;
END $$;

CREATE OR REPLACE FUNCTION rm_shadow_swap(new_txid xid8, new_position bigint) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_totals'] LOOP
		EXECUTE format('DROP TABLE %I', t);
		EXECUTE format('ALTER TABLE %I RENAME TO %I', t || '_shadow', t);
		EXECUTE format('ALTER INDEX %I RENAME TO %I', t || '_shadow_pkey', t || '_pkey');
		EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', t);
		EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO daybook_projector', t);
		EXECUTE format('GRANT SELECT ON %I TO daybook_query', t);
	END LOOP;
	UPDATE projection_checkpoints
		SET txid = new_txid, position = new_position, generation = generation + 1,
		    updated_at = now()
		WHERE projection = 'sql';
END $$;
