-- Leadership of a projection by a lease with fencing (SPEC §5, docs/architecture.md):
-- one row per projection, taken and renewed by a compare-and-set on the server's
-- clock; each takeover raises the epoch, and the checkpoint's compare-and-set, which
-- commits with the read models, refuses any epoch but the lease's. A session advisory
-- lock, which a frozen leader keeps for as long as its TCP connection lives, no longer
-- decides anything.

CREATE TABLE projector_leases (
	projection   text        PRIMARY KEY,
	holder       text        NOT NULL DEFAULT '',       -- the holding process's identity
	epoch        bigint      NOT NULL DEFAULT 0,        -- raised by each takeover
	holder_pid   integer,                               -- the holder's lease session
	holder_start timestamptz,                           -- that session's start (pids are reused)
	writer_pid   integer,                               -- the holder's writing session
	expires_at   timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO projector_leases (projection) VALUES ('sql');

-- The epoch of the leader that moved the checkpoint last (0: none yet, or a rebuild).
ALTER TABLE projection_checkpoints ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- Is the backend (pid, started) still there? Unknown (no pid, or a start time this
-- role may not see) counts as alive: only a proven end shortens the wait.
CREATE FUNCTION projector_session_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, public AS $$
	SELECT p_pid IS NULL OR EXISTS (
		SELECT 1 FROM pg_stat_activity a
		WHERE a.pid = p_pid
		  AND (a.backend_start IS NULL OR p_start IS NULL OR a.backend_start = p_start))
$$;

-- Take or renew the lease of p_projection for p_holder, for p_seconds from now on the
-- server's clock. p_epoch is the epoch the caller believes it holds (0: none);
-- p_writer_pid the backend pid of its writing session (0: not connected).
-- Returns the epoch the caller now holds, or 0 when another process holds the lease.
--  * renewal: the caller is the holder with the lease's epoch: the epoch stays;
--  * takeover: the lease expired, or its holder's lease session has ended (a dead
--    process: no need to wait for the expiry), or the row names the caller under
--    another epoch (a reply it never saw): the epoch rises to at least the server's
--    clock in milliseconds, so that a database re-created or restored from a dump
--    never issues an epoch below one that a Redis has already seen.
-- On takeover the previous holder's writing session is ended: a frozen leader may
-- have stopped in the middle of sending a batch, its transaction holding row locks
-- that would otherwise block the new leader for as long as the TCP connection lives.
CREATE FUNCTION projector_lease_claim(p_projection text, p_holder text, p_epoch bigint,
		p_seconds double precision, p_writer_pid integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
	l projector_leases;
	now_ timestamptz := clock_timestamp();
	me_start timestamptz;
	writer integer := nullif(p_writer_pid, 0);
	held bigint;
BEGIN
	IF p_holder IS NULL OR p_holder = '' OR p_seconds IS NULL OR p_seconds <= 0 THEN
		RAISE EXCEPTION 'projector_lease_claim: a holder and a positive duration are required'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	SELECT backend_start INTO me_start FROM pg_stat_activity WHERE pid = pg_backend_pid();
	-- Read without a lock first: a frozen leader's open transaction may hold the row.
	SELECT * INTO l FROM projector_leases WHERE projection = p_projection;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'projector_lease_claim: no lease row for projection %', p_projection
			USING ERRCODE = 'no_data_found';
	END IF;
	IF l.holder = p_holder AND l.epoch = p_epoch AND p_epoch > 0 THEN
		UPDATE projector_leases
			SET expires_at = clock_timestamp() + make_interval(secs => p_seconds),
			    holder_pid = pg_backend_pid(), holder_start = me_start,
			    writer_pid = coalesce(writer, writer_pid)
			WHERE projection = p_projection AND holder = p_holder AND epoch = p_epoch;
		RETURN CASE WHEN FOUND THEN p_epoch ELSE 0 END;
	END IF;
	IF l.holder <> p_holder AND l.expires_at > now_
	   AND projector_session_alive(l.holder_pid, l.holder_start) THEN
		RETURN 0;
	END IF;
	IF l.holder <> p_holder AND l.writer_pid IS NOT NULL THEN
		-- Only a session of this role can be ended, and only one still running as a
		-- projector; wait up to 1 s for it to go, releasing its locks.
		PERFORM pg_terminate_backend(a.pid, 1000) FROM pg_stat_activity a
			WHERE a.pid = l.writer_pid AND a.usename = current_user
			  AND a.pid <> pg_backend_pid() AND a.pid <> coalesce(writer, 0);
	END IF;
	-- The conditions again, under the row lock: the holder may have renewed since,
	-- or another standby won the race (then no row is updated: 0).
	UPDATE projector_leases
		SET holder = p_holder,
		    epoch = greatest(epoch + 1, (extract(epoch FROM now_) * 1000)::bigint),
		    holder_pid = pg_backend_pid(), holder_start = me_start, writer_pid = writer,
		    expires_at = clock_timestamp() + make_interval(secs => p_seconds)
		WHERE projection = p_projection AND epoch = l.epoch
		  AND (holder = p_holder OR expires_at <= clock_timestamp()
		       OR NOT projector_session_alive(holder_pid, holder_start))
		RETURNING epoch INTO held;
	RETURN coalesce(held, 0);
END $$;

-- The checkpoint's compare-and-set, first statement of each batch's transaction: it
-- fails, with a named condition, unless the caller holds the lease's epoch and the
-- checkpoint is where its batch started.
--  * SQLSTATE DBF01 projector_fenced: another process took the lease (the row lock
--    taken here also makes a takeover wait until this transaction has ended);
--  * SQLSTATE DBC01 checkpoint_moved: a rebuild's switch or another writer moved it.
CREATE FUNCTION projector_checkpoint_move(p_projection text, p_epoch bigint,
		p_from_txid xid8, p_from_position bigint, p_generation bigint,
		p_to_txid xid8, p_to_position bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
	held bigint;
BEGIN
	SELECT epoch INTO held FROM projector_leases WHERE projection = p_projection FOR SHARE;
	IF held IS DISTINCT FROM p_epoch OR p_epoch <= 0 THEN
		RAISE EXCEPTION 'projector_fenced: epoch % is not the lease''s (%): another projector leads',
			p_epoch, held USING ERRCODE = 'DBF01';
	END IF;
	UPDATE projection_checkpoints
		SET txid = p_to_txid, position = p_to_position, epoch = p_epoch, updated_at = now()
		WHERE projection = p_projection AND txid = p_from_txid
		  AND position = p_from_position AND generation = p_generation;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'checkpoint_moved: the % checkpoint is no longer %.% (generation %)',
			p_projection, p_from_txid, p_from_position, p_generation USING ERRCODE = 'DBC01';
	END IF;
END $$;

REVOKE ALL ON projector_leases FROM PUBLIC;
REVOKE ALL ON FUNCTION projector_session_alive(integer, timestamptz),
	projector_lease_claim(text, text, bigint, double precision, integer),
	projector_checkpoint_move(text, bigint, xid8, bigint, bigint, xid8, bigint) FROM PUBLIC;
GRANT SELECT, UPDATE ON projector_leases TO daybook_projector;
GRANT EXECUTE ON FUNCTION projector_session_alive(integer, timestamptz),
	projector_lease_claim(text, text, bigint, double precision, integer),
	projector_checkpoint_move(text, bigint, xid8, bigint, bigint, xid8, bigint)
	TO daybook_projector;
-- The admin tool's status may show who leads (it connects as the owner); the query
-- service needs nothing here.
