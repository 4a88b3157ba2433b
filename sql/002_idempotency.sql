-- Idempotency records: the first response to a keyed request, committed with its events.

CREATE TABLE idempotency_keys (
	token_id     text        NOT NULL,
	key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
	request_hash bytea       NOT NULL, -- SHA-256 of method, path and canonical body
	status       smallint    NOT NULL,
	headers      jsonb       NOT NULL, -- response headers to replay (ETag, Location)
	body         text        NOT NULL,
	created_at   timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (token_id, key)
);

-- Expiry sweeps by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
