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

-- Accounts that already have a long history get a snapshot now, at their last
-- thousandth version (SNAPSHOT_EVERY in command/batch.c), so that their first load
-- after the upgrade is short too. It is folded here by the rules of ledger_evolve
-- (shared/ledger.c): AccountOpened sets the currency and the limit, money events move
-- the balance, AccountClosed closes. The service checks it like any other snapshot,
-- and one that a service wrote meanwhile wins.
INSERT INTO account_snapshots (stream, version, state)
SELECT h.stream, h.version, jsonb_build_object(
	'account_id', substr(h.stream, length('account-') + 1),
	'currency', o.data ->> 'currency',
	'balance', f.balance,
	'overdraft_limit', (o.data ->> 'overdraft_limit')::bigint,
	'version', h.version,
	'closed', f.closed)
FROM (SELECT stream, max(version) / 1000 * 1000 AS version FROM events
      WHERE stream LIKE 'account-%' GROUP BY stream HAVING max(version) >= 1000) h
JOIN events o ON o.stream = h.stream AND o.version = 1 AND o.type = 'AccountOpened'
CROSS JOIN LATERAL (
	SELECT coalesce(sum(CASE
			WHEN e.type IN ('FundsDeposited', 'TransferReceived') THEN (e.data ->> 'amount')::numeric
			WHEN e.type IN ('FundsWithdrawn', 'TransferSent') THEN -(e.data ->> 'amount')::numeric
			ELSE 0 END), 0)::bigint AS balance,
	       bool_or(e.type = 'AccountClosed') AS closed
	FROM events e WHERE e.stream = h.stream AND e.version <= h.version) f
ON CONFLICT DO NOTHING;
