-- Account snapshots: the folded state of a stream at some of its versions, written by
-- the command service in the transaction that appends the event at that version, so
-- that loading an account reads the newest snapshot and only the events after it.
-- Every snapshot is kept (for reading an account "as of" an earlier version).
-- Expiring idempotency records needs no new index: idempotency_keys_created_at (002)
-- already serves the sweep's "oldest first, a thousand at a time".

CREATE TABLE account_snapshots (
	stream  text    NOT NULL CHECK (stream ~ '^[a-z]+-[A-Za-z0-9._:-]{1,64}$'),
	version integer NOT NULL CHECK (version > 0),
	-- ledger_account_to_json: {"account_id","currency","balance","overdraft_limit",
	-- "version","closed"}; readers check it before use.
	state   jsonb   NOT NULL CHECK (jsonb_typeof(state) = 'object'),
	-- No foreign key to events: it would make TRUNCATE events fail on the key before
	-- the append-only trigger gives its own answer. Readers check instead that the
	-- event at the snapshot's version is in the log.
	PRIMARY KEY (stream, version)
);

REVOKE ALL ON account_snapshots FROM PUBLIC;
-- command: write snapshots with its events and read them back when loading. No role
-- but the owner may change or remove one.
GRANT SELECT, INSERT ON account_snapshots TO daybook_command;
-- projector and query: read them (reading an account as of a past version).
GRANT SELECT ON account_snapshots TO daybook_projector, daybook_query;
