-- Accounts are updated on every event they take part in: room on each page of
-- rm_accounts (fillfactor 70) lets PostgreSQL update a row in place (a heap-only tuple,
-- HOT: only account_id is indexed and it never changes), without a new entry in its
-- key's index per update and with old versions pruned page by page. A rebuild's shadow
-- tables take the live tables' storage parameters, so a switch keeps them.
ALTER TABLE rm_accounts SET (fillfactor = 70);

CREATE OR REPLACE FUNCTION rm_shadow_reset() RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	t text;
	opts text[];
BEGIN
	FOREACH t IN ARRAY ARRAY['rm_accounts', 'rm_entries', 'rm_transfers', 'rm_totals'] LOOP
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
