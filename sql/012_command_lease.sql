-- Leadership of the write side (SPEC §5, docs/architecture.md "Command leadership"):
-- any number of daybook-command instances run against one database; the one holding
-- this lease appends, the others stand by. The lease works like the projector's
-- (sql/010): a compare-and-set on the server's clock, an epoch raised by each
-- takeover, and the deposed holder's writing session ended on takeover. Every write
-- batch of the leader ends with command_fence(epoch), so a deposed leader's batch
-- rolls back instead of committing.

CREATE TABLE command_leases (
	name         text        PRIMARY KEY,
	holder       text        NOT NULL DEFAULT '',       -- the holding process's identity
	epoch        bigint      NOT NULL DEFAULT 0,        -- raised by each takeover
	holder_pid   integer,                               -- the holder's lease session
	holder_start timestamptz,                           -- that session's start (pids are reused)
	writer_pid   integer,                               -- the holder's writing session
	expires_at   timestamptz NOT NULL DEFAULT '-infinity',
	-- Makes the epoch a key column for row locks: a takeover (which changes the epoch)
	-- takes the row FOR UPDATE and so waits for every batch holding it FOR KEY SHARE
	-- (the fence, below), while a renewal (which does not) neither waits for a batch
	-- nor makes one wait.
	UNIQUE (name, epoch)
);
INSERT INTO command_leases (name) VALUES ('command');

-- Is the backend (pid, started) still there? Unknown (no pid, or a start time this
-- role may not see) counts as alive: only a proven end shortens the wait.
CREATE FUNCTION command_session_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
	SELECT p_pid IS NULL OR EXISTS (
		SELECT 1 FROM pg_stat_activity a
		WHERE a.pid = p_pid
		  AND (a.backend_start IS NULL OR p_start IS NULL OR a.backend_start = p_start))
$$;

-- Take or renew the lease p_name for p_holder, for p_seconds from now on the server's
-- clock; the same rules as projector_lease_claim (sql/010):
--  * renewal: the caller is the holder with the lease's epoch: the epoch stays;
--  * takeover: the lease expired, or its holder's lease session has ended (a killed
--    process: no need to wait for the expiry), or the row names the caller under
--    another epoch: the epoch rises to at least the server's clock in milliseconds.
-- Returns the epoch the caller now holds, or 0 when another process holds the lease.
-- On takeover the previous holder's writing session is ended (waiting up to 1 s): a
-- frozen leader may have stopped in the middle of a batch whose transaction holds row
-- locks, and its batch then rolls back rather than committing later.
CREATE FUNCTION command_lease_claim(p_name text, p_holder text, p_epoch bigint,
		p_seconds double precision, p_writer_pid integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
	l command_leases;
	now_ timestamptz := clock_timestamp();
	me_start timestamptz;
	writer integer := nullif(p_writer_pid, 0);
	held bigint;
BEGIN
	IF p_holder IS NULL OR p_holder = '' OR p_seconds IS NULL OR p_seconds <= 0 THEN
		RAISE EXCEPTION 'command_lease_claim: a holder and a positive duration are required'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	SELECT backend_start INTO me_start FROM pg_stat_activity WHERE pid = pg_backend_pid();
	-- Read without a lock first: a frozen leader's open transaction may hold the row.
	SELECT * INTO l FROM command_leases WHERE name = p_name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'command_lease_claim: no lease row named %', p_name
			USING ERRCODE = 'no_data_found';
	END IF;
	IF l.holder = p_holder AND l.epoch = p_epoch AND p_epoch > 0 THEN
		UPDATE command_leases
			SET expires_at = clock_timestamp() + make_interval(secs => p_seconds),
			    holder_pid = pg_backend_pid(), holder_start = me_start,
			    writer_pid = coalesce(writer, writer_pid)
			WHERE name = p_name AND holder = p_holder AND epoch = p_epoch;
		RETURN CASE WHEN FOUND THEN p_epoch ELSE 0 END;
	END IF;
	IF l.holder <> p_holder AND l.expires_at > now_
	   AND command_session_alive(l.holder_pid, l.holder_start) THEN
		RETURN 0;
	END IF;
	IF l.holder <> p_holder AND l.writer_pid IS NOT NULL THEN
		-- Only a session of this role can be ended, and only one still running as a
		-- command instance; wait up to 1 s for it to go, releasing its locks.
		PERFORM pg_terminate_backend(a.pid, 1000) FROM pg_stat_activity a
			WHERE a.pid = l.writer_pid AND a.usename = current_user
			  AND a.pid <> pg_backend_pid() AND a.pid <> coalesce(writer, 0);
	END IF;
	-- The conditions again, under the row lock (which waits for a batch whose fence has
	-- passed to commit or roll back): the holder may have renewed since, or another
	-- standby won the race (then no row is updated: 0).
	UPDATE command_leases
		SET holder = p_holder,
		    epoch = greatest(epoch + 1, (extract(epoch FROM now_) * 1000)::bigint),
		    holder_pid = pg_backend_pid(), holder_start = me_start, writer_pid = writer,
		    expires_at = clock_timestamp() + make_interval(secs => p_seconds)
		WHERE name = p_name AND epoch = l.epoch
		  AND (holder = p_holder OR expires_at <= clock_timestamp()
		       OR NOT command_session_alive(holder_pid, holder_start))
		RETURNING epoch INTO held;
	RETURN coalesce(held, 0);
END $$;

-- The fence: the last statement of every write batch's transaction. It fails with
-- SQLSTATE DBF01 (command_fenced) unless p_epoch is the write lease's epoch, so the
-- whole batch rolls back. The FOR KEY SHARE row lock it takes lasts until the batch's
-- COMMIT: a takeover's UPDATE, which changes the epoch (a key column, see the UNIQUE
-- above) and so locks the row FOR UPDATE, waits for it, and no batch of the deposed
-- leader can commit after the takeover; a fence that comes after a takeover waits for
-- it and then sees the new epoch. Renewals, which leave the epoch alone, do not
-- conflict with it. Run once per batch, not per event.
CREATE FUNCTION command_fence(p_epoch bigint) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
	PERFORM 1 FROM command_leases WHERE name = 'command' AND epoch = p_epoch AND p_epoch > 0
		FOR KEY SHARE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'command_fenced: epoch % is not the write lease''s: another command instance leads',
			p_epoch USING ERRCODE = 'DBF01';
	END IF;
END $$;

REVOKE ALL ON command_leases FROM PUBLIC;
REVOKE ALL ON FUNCTION command_session_alive(integer, timestamptz),
	command_lease_claim(text, text, bigint, double precision, integer),
	command_fence(bigint) FROM PUBLIC;
-- UPDATE for the claim, SELECT for it and for the fence's row lock (FOR KEY SHARE needs
-- UPDATE too, which the role has).
GRANT SELECT, UPDATE ON command_leases TO daybook_command;
GRANT EXECUTE ON FUNCTION command_session_alive(integer, timestamptz),
	command_lease_claim(text, text, bigint, double precision, integer),
	command_fence(bigint) TO daybook_command;
