-- Defence in depth (SPEC §7): functions with a pinned search_path, the command role
-- limited to the event columns it decides, and no service role able to create
-- objects or temporary tables.

-- Every function of the schema resolves names in pg_catalog (implicitly first), then
-- public, then (explicitly last) pg_temp, whatever the caller's search_path: a
-- temporary table or a look-alike in another schema cannot stand in for `events`
-- inside a trigger, and the tables the rebuild functions create land in public.
-- Functions added later must say `SET search_path = public, pg_temp` themselves
-- (tests/integration/test_roles.c checks every function of the schema).
DO $$
DECLARE
	f regprocedure;
BEGIN
	FOR f IN
		SELECT p.oid::regprocedure
		FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = 'public' AND p.prokind = 'f'
		  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
				  AND d.objid = p.oid AND d.deptype = 'e')
	LOOP
		EXECUTE format('ALTER FUNCTION %s SET search_path = public, pg_temp', f);
	END LOOP;
END $$;

-- The command role names only the columns it decides: txid, position and
-- recorded_at always come from their defaults (the appending transaction, the
-- identity, the clock), so it cannot place an event anywhere in the readers' order.
REVOKE INSERT ON events FROM daybook_command;
GRANT INSERT (stream, version, type, data, metadata) ON events TO daybook_command;

-- No temporary tables (they could shadow tables on a search_path that lists
-- pg_temp first) and no new objects, for any service role.
DO $$
BEGIN
	EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
	EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I '
		'FROM daybook_command, daybook_projector, daybook_query', current_database());
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC, daybook_command, daybook_projector, daybook_query;
