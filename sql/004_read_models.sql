-- SQL read models (the "ledgers") and projection checkpoints, maintained by the projector.

CREATE TABLE rm_accounts (
	account_id      text        PRIMARY KEY,
	name            text        NOT NULL,
	currency        text        NOT NULL,
	balance         bigint      NOT NULL,
	overdraft_limit bigint      NOT NULL,
	status          text        NOT NULL CHECK (status IN ('open', 'closed')),
	version         integer     NOT NULL,
	entries         integer     NOT NULL DEFAULT 0, -- statement entries so far
	opened_at       timestamptz NOT NULL,
	updated_at      timestamptz NOT NULL
);

-- One row per money movement of an account: its statement.
CREATE TABLE rm_entries (
	account_id    text        NOT NULL,
	version       integer     NOT NULL,
	type          text        NOT NULL CHECK (type IN ('deposit', 'withdrawal', 'transfer_in', 'transfer_out')),
	amount        bigint      NOT NULL,
	balance_after bigint      NOT NULL,
	transfer_id   text,
	counterparty  text,
	reference     text,
	at            timestamptz NOT NULL,
	PRIMARY KEY (account_id, version)
);

CREATE TABLE rm_transfers (
	transfer_id  text        PRIMARY KEY,
	from_account text        NOT NULL,
	to_account   text        NOT NULL,
	amount       bigint      NOT NULL,
	currency     text        NOT NULL,
	reference    text,
	at           timestamptz NOT NULL
);

CREATE TABLE rm_totals (
	currency      text    PRIMARY KEY,
	accounts      bigint  NOT NULL,
	open_accounts bigint  NOT NULL,
	balance_sum   numeric NOT NULL -- a sum of int64 balances can exceed int64
);

-- How far each projection has applied the log, in reader order (txid, position).
CREATE TABLE projection_checkpoints (
	projection text        PRIMARY KEY,
	txid       xid8        NOT NULL DEFAULT '0',
	position   bigint      NOT NULL DEFAULT 0,
	updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO projection_checkpoints (projection) VALUES ('sql');

REVOKE ALL ON rm_accounts, rm_entries, rm_transfers, rm_totals, projection_checkpoints FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON rm_accounts, rm_entries, rm_transfers, rm_totals,
	projection_checkpoints TO daybook_projector;
GRANT SELECT ON rm_accounts, rm_entries, rm_transfers, rm_totals, projection_checkpoints
	TO daybook_query;
