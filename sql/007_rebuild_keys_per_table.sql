-- A rebuild builds the shadow tables' keys one table at a time, so that the large one
-- (rm_entries) builds on one connection while the accounts are loaded and the small
-- keys are built on another. rm_shadow_index() built all four in a row.
CREATE FUNCTION rm_shadow_key(t text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	CASE t
	WHEN 'rm_accounts' THEN ALTER TABLE rm_accounts_shadow ADD PRIMARY KEY (account_id);
	WHEN 'rm_entries' THEN ALTER TABLE rm_entries_shadow ADD PRIMARY KEY (account_id, version);
	WHEN 'rm_transfers' THEN ALTER TABLE rm_transfers_shadow ADD PRIMARY KEY (transfer_id);
	WHEN 'rm_totals' THEN ALTER TABLE rm_totals_shadow ADD PRIMARY KEY (currency);
	END CASE;
END $$;

DROP FUNCTION rm_shadow_index();
