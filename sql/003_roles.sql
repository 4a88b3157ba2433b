-- Service roles with least privilege. Roles are cluster-wide, so create them only once.

DO $$
DECLARE
	r text;
BEGIN
	FOREACH r IN ARRAY ARRAY['daybook_command', 'daybook_projector', 'daybook_query'] LOOP
		-- Another database of the cluster may be migrating at the same moment.
		BEGIN
			EXECUTE format('CREATE ROLE %I LOGIN', r);
		EXCEPTION WHEN duplicate_object OR unique_violation THEN
			NULL;
		END;
	END LOOP;
END $$;

REVOKE ALL ON events, idempotency_keys FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC; -- the default since PostgreSQL 15

DO $$
BEGIN
	EXECUTE format('GRANT CONNECT ON DATABASE %I TO daybook_command, daybook_projector, daybook_query',
		current_database());
END $$;
GRANT USAGE ON SCHEMA public TO daybook_command, daybook_projector, daybook_query;

-- command: append and read the log, keep idempotency records (and expire them).
GRANT SELECT, INSERT ON events TO daybook_command;
GRANT SELECT, INSERT, DELETE ON idempotency_keys TO daybook_command;

-- projector and query: read the log.
GRANT SELECT ON events TO daybook_projector, daybook_query;
