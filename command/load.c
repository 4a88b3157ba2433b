/* What a batch needs from the log: the streams its cache lacks (newest snapshot, then
 * the events after it), folded into the cache; stored idempotency records; used
 * transfer ids. See batch.h for the batch's two pipelines. */
#include <event2/buffer.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

/* Per stream: its newest snapshot (type NULL; `logged`: the event at its version is
 * in the log), then the events after it; a stream without one from its first event.
 * Rows: stream, version, type, data, logged. The events come through a LATERAL
 * subquery (kept apart by its ORDER BY) so that even the prepared statement's generic
 * plan reads each stream through events_stream_version: a plain join let it hash-join
 * a sequential scan of the whole log, on every batch that loads an account. */
const char sql_load_streams[] =
	"WITH s AS (SELECT w.stream, n.version, n.state FROM unnest($1::text[]) AS w(stream) "
	"LEFT JOIN LATERAL (SELECT a.version, a.state FROM account_snapshots a "
	"WHERE a.stream = w.stream ORDER BY a.version DESC LIMIT 1) n ON true) "
	"SELECT s.stream, s.version, NULL::text, s.state::text, EXISTS (SELECT 1 FROM events e "
	"WHERE e.stream = s.stream AND e.version = s.version) FROM s WHERE s.version IS NOT NULL "
	"UNION ALL "
	"SELECT e.stream, e.version, e.type, e.data::text, true FROM s CROSS JOIN LATERAL "
	"(SELECT f.stream, f.version, f.type, f.data FROM events f WHERE f.stream = s.stream "
	"AND f.version > coalesce(s.version, 0) ORDER BY f.version) e "
	"ORDER BY 1, 2";
/* The same rows without snapshots: for streams whose snapshot was refused. */
const char sql_load_streams_full[] = "SELECT stream, version, type, data::text, true FROM events "
				     "WHERE stream = ANY($1::text[]) ORDER BY stream, version";
const char sql_load_transfers[] =
	"SELECT data->>'transfer_id' FROM events "
	"WHERE type = 'TransferSent' AND data->>'transfer_id' = ANY($1::text[])";
/* Build a text[] literal of ids with a prefix ("account-"), or of plain strings. */
static char *array_literal(const char *const *items, size_t n, const char *prefix)
{
	struct evbuffer *buf = evbuffer_new();
	char *out = NULL, tmp[LEDGER_ID_MAX + 32];
	size_t len;

	if (!buf)
		return NULL;
	evbuffer_add(buf, "{", 1);
	for (size_t i = 0; i < n; i++) {
		const char *item = items[i];
		if (prefix[0]) {
			size_t np = strlen(prefix), ni = strnlen(item, sizeof(tmp) - np - 1);
			memcpy(tmp, prefix, np);
			memcpy(tmp + np, item, ni);
			tmp[np + ni] = '\0';
			item = tmp;
		}
		pg_array_append(buf, item, i == 0);
	}
	evbuffer_add(buf, "}", 2); /* with the NUL */
	len = evbuffer_get_length(buf);
	out = malloc(len);
	if (out)
		evbuffer_remove(buf, out, len);
	evbuffer_free(buf);
	return out;
}

/* Start acc from a loaded snapshot row, after checking it: its event is in the log,
 * its state decodes into a plausible account of this stream at this version. False
 * (with the reason in why) when it cannot be used. */
static bool restore_snapshot(PGresult *r, int row, struct ledger_account *acc, char *why,
			     size_t whylen)
{
	if (strcmp(PQgetvalue(r, row, 4), "t") != 0) {
		snprintf(why, whylen, "the log has no event at its version");
		return false;
	}
	return ledger_snapshot_from_text(PQgetvalue(r, row, 3), acc->id,
					 (int32_t)atoi(PQgetvalue(r, row, 1)), acc, why, whylen);
}

/* Fold one event row into acc; its version must be the next one. */
static bool fold_event(PGresult *r, int row, struct ledger_account *acc)
{
	enum ledger_event_type type = ledger_event_type_from_name(PQgetvalue(r, row, 2));
	json_t *data = json_loads(PQgetvalue(r, row, 3), 0, NULL);
	struct ledger_event ev;
	bool ok = false;

	if (!data || !type || atol(PQgetvalue(r, row, 1)) != (long)acc->version + 1 ||
	    !ledger_event_from_json(type, data, &ev))
		goto done;
	if (type == LEDGER_ACCOUNT_OPENED)
		ev.account_id = acc->id;
	ok = ledger_evolve(acc, &ev);
done:
	json_decref(data);
	return ok;
}

/* An account folded from more events than snapshots should leave (none was written:
 * an older binary wrote them, or its snapshot was refused) gets one with the batch's
 * write, so that its next load is short again. */
static bool note_catchup(struct batcher *b, const struct ledger_account *acc, int folded)
{
	struct ledger_account *copy;

	if (!acc || folded < SNAPSHOT_EVERY)
		return true;
	copy = malloc(sizeof(*copy));
	if (!copy)
		return false;
	*copy = *acc;
	if (!strmap_put(b->catchup, acc->id, copy)) {
		free(copy);
		return false;
	}
	return true;
}

/* Fold the loaded rows into the cache: per stream, its snapshot if any, then its events
 * in version order. A refused snapshot only costs time: its stream is noted in
 * b->refold, to be folded from its first event, and its rows here are skipped. */
static bool fold_streams(struct batcher *b, PGresult *r)
{
	struct ledger_account *acc = NULL;
	const char *skip = NULL; /* the stream whose snapshot was refused */
	int folded = 0;          /* events folded into acc */
	char why[256];

	for (int row = 0; row < PQntuples(r); row++) {
		const char *stream = PQgetvalue(r, row, 0), *id = stream + strlen("account-");

		if (skip && strcmp(skip, stream) == 0)
			continue;
		if (!acc || strcmp(acc->id, id) != 0) {
			if (!note_catchup(b, acc, folded))
				return false;
			folded = 0;
			acc = account_new(id);
			if (!acc || !strmap_put(b->cache, id, acc)) {
				free(acc);
				return false;
			}
		}
		if (PQgetisnull(r, row, 2)) {
			if (restore_snapshot(r, row, acc, why, sizeof(why)))
				continue;
			log_warn(&b->ctx->log,
				 "ignoring the snapshot of %s at version %s (%s); folding "
				 "the stream from its first event",
				 stream, PQgetvalue(r, row, 1), why);
			strmap_remove(b->cache, id);
			acc = NULL;
			skip = stream;
			if (!strmap_put(b->refold, id, b))
				return false;
			continue;
		}
		if (!fold_event(r, row, acc)) {
			log_error(&b->ctx->log, "cannot fold stream %s at row %d", stream, row);
			strmap_remove(b->cache, id);
			return false;
		}
		folded++;
	}
	return note_catchup(b, acc, folded);
}

/* Collect what the batch needs from the log; false when out of memory. */
struct needs {
	const char *accounts[2 * BATCH_MAX], *tokens[BATCH_MAX], *keys[BATCH_MAX],
		*transfers[BATCH_MAX];
	size_t naccounts, nkeys, ntransfers;
};

static void collect_needs(struct batcher *b, struct needs *nd)
{
	cache_prefetch(b);
	for (size_t i = 0; i < b->nslots; i++) {
		const struct cmd *cmd = b->slots[i].cmd;
		const char *ids[2];
		size_t n = cmd_accounts(cmd, ids);
		for (size_t j = 0; j < n; j++) {
			bool seen = strmap_get(b->cache, ids[j]) != NULL;
			for (size_t k = 0; !seen && k < nd->naccounts; k++)
				seen = strcmp(nd->accounts[k], ids[j]) == 0;
			if (!seen)
				nd->accounts[nd->naccounts++] = ids[j];
		}
		if (cmd->idem_key[0]) {
			nd->tokens[nd->nkeys] = cmd->token_id;
			nd->keys[nd->nkeys++] = cmd->idem_key;
		}
		if (cmd->kind == CMD_TRANSFER)
			nd->transfers[nd->ntransfers++] = cmd->u.transfer.id;
	}
}

/* Queue a lookup whose parameters were just built (and free them). */
static bool queue_lookup(struct batcher *b, const char *stmt, int nparams, char **params)
{
	bool ok = false;

	for (int i = 0; i < nparams; i++)
		if (!params[i])
			goto done;
	ok = pg_queue(b->ctx->pg, stmt, nparams, (const char *const *)params);
done:
	for (int i = 0; i < nparams; i++)
		free(params[i]);
	return ok;
}

static void add_refold(void *arg, const char *id, void *value)
{
	char stream[LEDGER_ID_MAX + 16];

	(void)value;
	snprintf(stream, sizeof(stream), "account-%s", id);
	pg_array_append(arg, stream, evbuffer_get_length(arg) == 1);
}

/* The streams whose snapshot was refused, folded from their first event: one more
 * load round, whose rows load_apply folds like the first. */
bool load_queue_refold(struct batcher *b)
{
	struct evbuffer *buf;
	char *p[1] = { NULL };
	size_t len;

	buf = evbuffer_new();
	if (buf && evbuffer_add(buf, "{", 1) == 0) {
		strmap_foreach(b->refold, add_refold, buf);
		evbuffer_add(buf, "}", 2); /* with the NUL */
		len = evbuffer_get_length(buf);
		p[0] = malloc(len);
		if (p[0])
			evbuffer_remove(buf, p[0], len);
	}
	if (buf)
		evbuffer_free(buf);
	strmap_clear(b->refold);
	b->q_streams = 0;
	b->q_idem = b->q_transfers = -1;
	return queue_lookup(b, "load_streams_full", 1, p);
}

bool load_queue(struct batcher *b, int *nqueued)
{
	struct needs *nd = calloc(1, sizeof(*nd));
	int queued = 0;
	bool ok = false;

	*nqueued = 0;
	b->q_streams = b->q_idem = b->q_transfers = -1;
	if (!nd)
		return false;
	collect_needs(b, nd);
	if (nd->naccounts) {
		char *p[1] = { array_literal(nd->accounts, nd->naccounts, "account-") };
		if (!queue_lookup(b, "load_streams", 1, p))
			goto done;
		b->q_streams = queued++;
	}
	if (nd->nkeys) {
		char *p[2] = { array_literal(nd->tokens, nd->nkeys, ""),
			       array_literal(nd->keys, nd->nkeys, "") };
		if (!queue_lookup(b, "load_idem", 2, p))
			goto done;
		b->q_idem = queued++;
	}
	if (nd->ntransfers) {
		char *p[1] = { array_literal(nd->transfers, nd->ntransfers, "") };
		if (!queue_lookup(b, "load_transfers", 1, p))
			goto done;
		b->q_transfers = queued++;
	}
	*nqueued = queued;
	ok = true;
done:
	free(nd);
	return ok;
}

bool load_apply(struct batcher *b, PGresult *const *results)
{
	if (b->q_streams >= 0 && !fold_streams(b, results[b->q_streams]))
		return false;
	if (b->q_idem >= 0)
		idem_apply(b, results[b->q_idem]);
	if (b->q_transfers >= 0)
		for (int row = 0; row < PQntuples(results[b->q_transfers]); row++)
			if (!strmap_put(b->transfers, PQgetvalue(results[b->q_transfers], row, 0),
					b))
				log_warn(&b->ctx->log, "out of memory noting transfer ids");
	return true;
}
