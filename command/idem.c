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
/* A record's body, its position placeholder replaced by `pos` (a text expression:
 * "txid.position", or NULL when the record has no event), and the records' arrays. */
#define IDEM_BODY(pos)                                                                             \
	"replace(r.body, '\"position\":\"" POSITION_PLACEHOLDER "\"', "                            \
	"coalesce('\"position\":\"' || " pos " || '\"', ''))"
#define IDEM_INSERT                                                                                \
	"INSERT INTO idempotency_keys (token_id, key, request_hash, status, headers, body) "
#define IDEM_VALUES "r.token_id, r.key, decode(r.hash, 'hex'), r.status, r.headers::jsonb, "
#define IDEM_ROWS(a, b, c, d, e, f, g, h)                                                          \
	"unnest($" a "::text[], $" b "::text[], $" c "::text[], $" d "::smallint[], $" e           \
	"::text[], $" f "::text[], $" g "::text[], $" h "::integer[]) "                            \
	"AS r(token_id, key, hash, status, headers, body, stream, version)"

/* Every record of the batch in one statement, for a batch without events (a record
 * that names an event takes its position from the log). */
const char sql_idem_put[] = IDEM_INSERT "SELECT " IDEM_VALUES IDEM_BODY(
	"(SELECT e.txid::text || '.' || e.position::text FROM events e "
	"WHERE e.stream = r.stream AND e.version = r.version)") " FROM " IDEM_ROWS("1", "2", "3",
										   "4", "5", "6",
										   "7", "8");
/* The batch's events and records in one statement: a record commits with its events,
 * before their positions are known to us, so each stored body takes its position from
 * the rows the INSERT of the events returns (its last event's stream and version).
 * Rows as sql_append's. */
const char sql_append_idem[] =
	"WITH e AS (" APPEND_EVENTS " AS position), k AS (" IDEM_INSERT
	"SELECT " IDEM_VALUES IDEM_BODY("e.position") " FROM " IDEM_ROWS(
		"6", "7", "8", "9", "10", "11", "12",
		"13") " LEFT JOIN e ON e.stream = r.stream AND e.version = r.version) "
		      "SELECT stream, version, position FROM e";

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
			s->body = http_problem_json(
				422, "idempotency_key_reused", "Idempotency key reused",
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

/* Add slot s's record to the columns of the batch's record INSERT. */
static bool add_record(struct batcher *b, struct slot *s, struct column cols[IDEM_COLUMNS])
{
	const struct cmd *cmd = s->cmd;
	const struct pending_event *last = s->last_event >= 0 ? &b->events[s->last_event] : NULL;
	char status[8], *headers, *body;
	bool ok = false;

	/* A refusal names the request it answered; its replays return the same body, so
	 * they name that first request too. */
	if (s->status >= 400 && json_is_object(s->body) && !json_object_get(s->body, "instance"))
		json_object_set_new(s->body, "instance", json_string(cmd->request_id));
	headers = json_dumps(s->headers, JSON_COMPACT);
	body = json_dumps(s->body, JSON_COMPACT);
	if (!headers || !body)
		goto done;
	snprintf(status, sizeof(status), "%d", s->status);
	column_add(&cols[0], cmd->token_id);
	column_add(&cols[1], cmd->idem_key);
	column_add(&cols[2], cmd->idem_hash);
	column_add(&cols[3], status);
	column_add(&cols[4], headers);
	column_add(&cols[5], body);
	column_add(&cols[6], last ? last->stream : NULL);
	column_add(&cols[7], last ? last->version : NULL);
	ok = true;
done:
	free(headers);
	free(body);
	return ok;
}

size_t idem_count_records(const struct batcher *b)
{
	size_t n = 0;

	for (size_t i = 0; i < b->nslots; i++)
		n += idem_keeps_record(&b->slots[i]);
	return n;
}

bool idem_record_columns(struct batcher *b, struct column cols[IDEM_COLUMNS])
{
	for (int c = 0; c < IDEM_COLUMNS; c++)
		column_open(&cols[c]);
	for (size_t i = 0; i < b->nslots; i++)
		if (idem_keeps_record(&b->slots[i]) && !add_record(b, &b->slots[i], cols))
			goto fail;
	return true;
fail:
	for (int c = 0; c < IDEM_COLUMNS; c++)
		free(column_take(&cols[c]));
	return false;
}
