-- The event store: the append-only log of every account event (the daybook).

CREATE TABLE events (
	position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	-- The appending transaction; readers order by (txid, position) and only read
	-- below pg_snapshot_xmin(pg_current_snapshot()), so a late commit is never skipped.
	txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
	stream      text        NOT NULL CHECK (stream ~ '^[a-z]+-[A-Za-z0-9._:-]{1,64}$'),
	version     integer     NOT NULL CHECK (version > 0),
	type        text        NOT NULL CHECK (type IN ('AccountOpened', 'FundsDeposited',
	                          'FundsWithdrawn', 'TransferSent', 'TransferReceived',
	                          'AccountClosed')),
	data        jsonb       NOT NULL,
	metadata    jsonb       NOT NULL,
	recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
	CONSTRAINT events_stream_version UNIQUE (stream, version)
);

-- The position-ordered reader's index: WHERE (txid, position) > checkpoint AND txid < xmin.
CREATE INDEX events_txid_position ON events (txid, position);

-- A transfer id is used once: the log itself enforces it.
CREATE UNIQUE INDEX events_transfer_id ON events ((data ->> 'transfer_id'))
	WHERE type = 'TransferSent';

-- Versions are gap-free per stream: version n needs version n-1 of the same stream.
CREATE FUNCTION events_check_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.version > 1 AND NOT EXISTS (
		SELECT 1 FROM events WHERE stream = NEW.stream AND version = NEW.version - 1)
	THEN
		RAISE EXCEPTION 'stream % has no version % before version %',
			NEW.stream, NEW.version - 1, NEW.version
			USING ERRCODE = 'integrity_constraint_violation';
	END IF;
	RETURN NEW;
END $$;

CREATE TRIGGER events_version_gap_free BEFORE INSERT ON events
	FOR EACH ROW EXECUTE FUNCTION events_check_version();

-- Append-only for everyone, owners and superusers included (grants cover the roles).
CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'the event store is append-only: % refused', TG_OP
		USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
	FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
	FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- A wake-up hint for followers; delivered at commit, once per transaction.
CREATE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_notify('daybook_events', '');
	RETURN NULL;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON events
	FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
