-- The record of applied migrations: daybook-admin migrate applies each file once.

CREATE TABLE schema_migrations (
	version    integer     PRIMARY KEY,
	name       text        NOT NULL,
	checksum   text        NOT NULL, -- SHA-256 hex of the file as applied
	applied_at timestamptz NOT NULL DEFAULT now()
);
