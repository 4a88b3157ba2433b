-- Zero-downtime rebuilds: shadow read-model tables, an atomic swap, and a generation
-- on the checkpoint so a live projector notices the swap.

ALTER TABLE projection_checkpoints ADD COLUMN generation bigint NOT NULL DEFAULT 0;

-- Fresh, empty shadow tables shaped like the live ones. Their keys are added by
-- rm_shadow_index() after the bulk load, which is much faster than maintaining them.
CREATE FUNCTION rm_shadow_reset() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_transfers', 'rm_totals'] LOOP
		EXECUTE format('DROP TABLE IF EXISTS %I', t || '_shadow');
		EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
			t || '_shadow', t);
	END LOOP;
END $$;

CREATE FUNCTION rm_shadow_drop() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_transfers', 'rm_totals'] LOOP
		EXECUTE format('DROP TABLE IF EXISTS %I', t || '_shadow');
	END LOOP;
END $$;

CREATE FUNCTION rm_shadow_index() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	ALTER TABLE rm_accounts_shadow ADD PRIMARY KEY (account_id);
	ALTER TABLE rm_entries_shadow ADD PRIMARY KEY (account_id, version);
	ALTER TABLE rm_transfers_shadow ADD PRIMARY KEY (transfer_id);
	ALTER TABLE rm_totals_shadow ADD PRIMARY KEY (currency);
END $$;

-- Swap the shadow tables in for the live ones and move the checkpoint, with a new
-- generation, in the caller's transaction: readers see the old models or the new.
CREATE FUNCTION rm_shadow_swap(new_txid xid8, new_position bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_transfers', 'rm_totals'] LOOP
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
