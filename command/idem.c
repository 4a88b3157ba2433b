/* Idempotency within the batcher: the in-flight marker of each keyed request, stored
 * records deciding their commands (replay, or refuse a key reused), and new records
 * written with the events they answer for. See batch.h and sql/002. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

const char sql_load_idem[] =
	"SELECT token_id, key, encode(request_hash, 'hex'), status, headers::text, body "
	"FROM idempotency_keys WHERE (token_id, key) IN "
	"(SELECT * FROM unnest($1::text[], $2::text[]))";
/* The record commits with the events, before their positions are known to us,
 * so the stored body gets its position from the log in the same statement. */
const char sql_idem_put[] =
	"INSERT INTO idempotency_keys (token_id, key, request_hash, status, headers, body) "
	"VALUES ($1, $2, decode($3, 'hex'), $4, $5, replace($6, '\"position\":\"" POSITION_PLACEHOLDER
	"\"', coalesce((SELECT '\"position\":\"' || txid::text || '.' || position::text || '\"' "
	"FROM events WHERE stream = $7 AND version = $8::integer), '')))";

static void inflight_key(const struct cmd *cmd, char *out, size_t len)
{
	snprintf(out, len, "%s\x1f%s", cmd->token_id, cmd->idem_key);
}

bool idem_mark(struct batcher *b, struct cmd *cmd, bool *busy)
{
	char key[400];

	*busy = false;
	inflight_key(cmd, key, sizeof(key));
	if (strmap_get(b->inflight, key)) {
		*busy = true;
		return false;
	}
	/* The marker's value is its owner: see idem_release. */
	return strmap_put(b->inflight, key, cmd);
}

void idem_release(struct batcher *b, const struct cmd *cmd)
{
	char key[400];

	if (!cmd->idem_key[0])
		return;
	inflight_key(cmd, key, sizeof(key));
	/* Only the command that holds the marker releases it: a repeat answered 409
	 * must leave the first request's marker in place. */
	if (strmap_get(b->inflight, key) == cmd)
		strmap_remove(b->inflight, key);
}

static struct slot *slot_of(struct batcher *b, const char *token_id, const char *key)
{
	for (size_t i = 0; i < b->nslots; i++)
		if (strcmp(b->slots[i].cmd->token_id, token_id) == 0 &&
		    strcmp(b->slots[i].cmd->idem_key, key) == 0)
			return &b->slots[i];
	return NULL;
}

void idem_apply(struct batcher *b, PGresult *r)
{
	for (int row = 0; row < PQntuples(r); row++) {
		struct slot *s = slot_of(b, PQgetvalue(r, row, 0), PQgetvalue(r, row, 1));
		if (!s)
			continue;
		if (strcmp(PQgetvalue(r, row, 2), s->cmd->idem_hash) != 0) {
			s->status = 422;
			s->body = http_problem_json(422, "idempotency_key_reused", "Idempotency key reused",
						    "this Idempotency-Key was used with a different request");
			s->headers = json_object();
			s->unrecorded = true;
			continue;
		}
		s->status = atoi(PQgetvalue(r, row, 3));
		s->headers = json_loads(PQgetvalue(r, row, 4), 0, NULL);
		s->body = json_loads(PQgetvalue(r, row, 5), 0, NULL);
		s->replay = true;
		s->last_event = -1;
	}
}

bool idem_keeps_record(const struct slot *s)
{
	return s->cmd->idem_key[0] && !s->replay && !s->unrecorded && s->status != 0 &&
	       s->status < 500;
}

bool idem_queue_record(struct batcher *b, struct slot *s)
{
	const struct cmd *cmd = s->cmd;
	const struct pending_event *last = s->last_event >= 0 ? &b->events[s->last_event] : NULL;
	char status[8], *headers, *body;

	/* A refusal names the request it answered; its replays return the same body, so
	 * they name that first request too. */
	if (s->status >= 400 && json_is_object(s->body) && !json_object_get(s->body, "instance"))
		json_object_set_new(s->body, "instance", json_string(cmd->request_id));
	headers = json_dumps(s->headers, JSON_COMPACT);
	body = json_dumps(s->body, JSON_COMPACT);
	const char *v[8] = { cmd->token_id, cmd->idem_key, cmd->idem_hash, status, headers, body,
			     last ? last->stream : NULL, last ? last->version : NULL };
	bool ok = headers && body;

	snprintf(status, sizeof(status), "%d", s->status);
	ok = ok && pg_queue(b->ctx->pg, "idem_put", 8, v);
	free(headers);
	free(body);
	return ok;
}
