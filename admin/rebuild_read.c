/* daybook-admin rebuild: reading the log in chunks, and handing each chunk's rows on. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rebuild.h"

/* Write what a chunk produced: COPY the rows (from the copier thread during the load)
 * and let Redis work on its commands while the next chunk is read. */
static bool flush_chunk(struct rebuild *rb)
{
	size_t due = rb->redis_prev;

	if (rb->sql && rb->copier.running && !copier_submit(&rb->copier, &rb->entries))
		return false;
	if (rb->sql && !rb->copier.running &&
	    !copy_in(rb->wr, "rm_entries_shadow", &rb->entries, &rb->ctx->log))
		return false;
	if (!rb->redis)
		return true;
	/* The previous chunk's replies are due; this chunk's go out unanswered. */
	rb->redis_prev = 0;
	if (!rb_redis_drain_n(rb, due) || !rb_redis_write_out(rb))
		return false;
	rb->redis_prev = rb->redis_queued;
	return true;
}

#define READ_COLUMNS "SELECT position, txid, substr(stream, 9), version, type, data, recorded_at "

/* The next read: the bulk's next blocks while any are left (a TID range scan, which
 * costs a third less than reading in reader order through the index), then what
 * follows the checkpoint in reader order. Results come in binary: no text
 * conversions on the server. */
static bool send_read(struct rebuild *rb)
{
	char a[48], b[48], limit[16];
	const char *params[3] = { a, b, limit };

	rb->bulk_read = rb->bulk_next < rb->bulk_blocks;
	if (rb->bulk_read) {
		snprintf(a, sizeof(a), "(%lld,0)", rb->bulk_next);
		rb->bulk_next += BULK_BLOCKS;
		snprintf(b, sizeof(b), "(%lld,0)", rb->bulk_next);
		params[2] = rb->bulk_xmin;
		rb->read_pending = PQsendQueryParams(
			rb->pg,
			READ_COLUMNS
			"FROM events WHERE ctid >= $1::tid AND ctid < $2::tid AND txid < $3::xid8",
			3, NULL, params, NULL, NULL, 1);
	} else {
		snprintf(a, sizeof(a), "%llu", (unsigned long long)rb->cp_txid);
		snprintf(b, sizeof(b), "%lld", rb->position);
		snprintf(limit, sizeof(limit), "%d", CHUNK);
		rb->read_pending =
			PQsendQueryParams(rb->pg,
					  READ_COLUMNS
					  "FROM events WHERE (txid, position) > ($1::xid8, $2::bigint) "
					  "AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
					  "ORDER BY events.txid, events.position LIMIT $3",
					  3, NULL, params, NULL, NULL, 1);
	}
	if (!rb->read_pending)
		rb_error(rb, "reading the log: %s", PQerrorMessage(rb->pg));
	return rb->read_pending;
}

/* The pending read's rows, or NULL on failure. Caller PQclear()s. */
static PGresult *take_read(struct rebuild *rb)
{
	PGresult *r, *rows = NULL;

	while ((r = PQgetResult(rb->pg))) {
		if (!rows && PQresultStatus(r) == PGRES_TUPLES_OK) {
			rows = r;
			continue;
		}
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			rb_error(rb, "reading the log: %s", PQresultErrorMessage(r));
		PQclear(r);
	}
	rb->read_pending = false;
	return rows;
}

/* Fold the next chunk of the log; *n gets its size. The read of the chunk after is
 * sent before folding, so PostgreSQL reads while we fold and write: any bulk read
 * left, or, in reader order, the next after a full chunk (its start, the last row
 * here, is known before folding). */
bool rb_fold_chunk(struct rebuild *rb, int *n)
{
	PGresult *r = NULL;
	bool bulk;

	if (!rb->read_pending && !send_read(rb))
		goto fail;
	bulk = rb->bulk_read;
	if (!(r = take_read(rb)))
		goto fail;
	*n = PQntuples(r);
	rb->done += *n;
	if (!bulk && *n > 0) {
		rb->cp_txid = pg_bin_uint(PQgetvalue(r, *n - 1, 1), 8);
		rb->position = (long long)pg_bin_uint(PQgetvalue(r, *n - 1, 0), 8);
	}
	if ((bulk ? rb->bulk_next < rb->bulk_blocks : *n == CHUNK) && !send_read(rb))
		goto fail;
	for (int row = 0; row < *n; row++)
		if (!rb_fold_row(rb, r, row))
			goto fail;
	PQclear(r);
	return flush_chunk(rb);
fail:
	PQclear(r);
	return false;
}

/* Fold until the log is (nearly) exhausted; false on error or interruption. */
bool rb_load(struct rebuild *rb)
{
	int n = CHUNK;

	rb->copier.log = &rb->ctx->log;
	if (rb->sql && !copier_start(&rb->copier, rb->wr))
		goto fail;
	while (rb->bulk_next < rb->bulk_blocks && !rb_interrupted) {
		if (!rb_fold_chunk(rb, &n))
			goto fail;
		rb_report(rb, false);
	}
	n = CHUNK; /* then what was appended meanwhile, in reader order */
	while (n == CHUNK && !rb_interrupted) {
		if (!rb_fold_chunk(rb, &n))
			goto fail;
		rb_report(rb, false);
	}
	return copier_stop(&rb->copier) && !rb_interrupted;
fail:
	(void)copier_stop(&rb->copier);
	return false;
}

#define COUNT_FROM_LOG                                                                             \
	"SELECT substr(stream, 9), count(*) FILTER (WHERE type IN ('FundsDeposited', "             \
	"'FundsWithdrawn', 'TransferSent', 'TransferReceived')), count(*) FROM events "            \
	"WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) GROUP BY stream"
#define COUNT_FROM_LIVE                                                                            \
	"SELECT a.account_id, a.entries, (SELECT greatest(reltuples, 0)::bigint FROM pg_class "    \
	"WHERE oid = 'events'::regclass), c.txid::text, c.position FROM rm_accounts a, "           \
	"projection_checkpoints c WHERE c.projection = 'sql'"

/* What Redis needs before the load, sent while the rest is set up: each account's
 * statement items, so that Redis is sent only the items that will be among its
 * newest. A count too high would leave the newest items short; too low only sends a
 * few more, which the end trims.
 * - Both models rebuilt: the live models' counts (rm_accounts.entries at their
 *   checkpoint; one small table rather than a pass over the log), each checked by the
 *   fold (at_cp): an account whose count was too high gets its items again from the
 *   shadow table once that is indexed (repair_items).
 * - Redis alone: the log counted below the snapshot xmin, which the fold will have
 *   applied at least.
 * - SQL alone: nothing.
 * The progress total is the planner's estimate of the log's size, or the count. */
/* The live models are worth taking counts from only if they are nearly current: if
 * more than a tenth of the log is past their checkpoint, the log is counted instead
 * (otherwise Redis would be sent every item of that tenth). */
void rb_choose_count(struct rebuild *rb)
{
	PGresult *r;

	if (!rb->hinted)
		return;
	r = PQexec(rb->pg, "SELECT (SELECT position FROM projection_checkpoints WHERE projection = "
			   "'sql'), (SELECT coalesce(max(position), 0) FROM events)");
	rb->hinted = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
		     !PQgetisnull(r, 0, 0) &&
		     (atoll(PQgetvalue(r, 0, 1)) - atoll(PQgetvalue(r, 0, 0))) * 10 <=
			     atoll(PQgetvalue(r, 0, 1));
	PQclear(r);
}

bool rb_send_count(struct rebuild *rb)
{
	const char *sql = rb->hinted       ? COUNT_FROM_LIVE
			  : rb->want_redis ? COUNT_FROM_LOG
					   : "SELECT NULL, 0, greatest(reltuples, 0)::bigint "
					     "FROM pg_class WHERE oid = 'events'::regclass";

	if (PQsendQuery(rb->pg, sql))
		return true;
	rb_error(rb, "counting the log: %s", PQerrorMessage(rb->pg));
	return false;
}

/* Its answer; for Redis, the accounts are created here, unopened. */
bool rb_take_count(struct rebuild *rb)
{
	PGresult *r, *extra;
	struct acct *a = NULL;

	rb_await_answer(rb, rb->pg, false);
	r = PQgetResult(rb->pg);
	while ((extra = PQgetResult(rb->pg)))
		PQclear(extra);
	if (PQresultStatus(r) != PGRES_TUPLES_OK)
		goto fail;
	if (rb->hinted) { /* a row per live account, each with the checkpoint */
		rb->hint_txid = PQntuples(r) ? strtoull(PQgetvalue(r, 0, 3), NULL, 10) : 0;
		rb->hint_pos = PQntuples(r) ? atoll(PQgetvalue(r, 0, 4)) : 0;
		rb->total = PQntuples(r) ? atoll(PQgetvalue(r, 0, 2)) : 0;
	}
	for (int row = 0; row < PQntuples(r); row++) {
		if (!rb->hinted)
			rb->total += atoll(PQgetvalue(r, row, 2));
		if (!rb->want_redis)
			continue;
		if (!(a = calloc(1, sizeof(*a))) ||
		    !strmap_put(rb->accounts, PQgetvalue(r, row, 0), a))
			goto fail;
		a->expected = atoi(PQgetvalue(r, row, 1));
		a = NULL;
	}
	PQclear(r);
	return true;
fail:
	free(a);
	rb_error(rb, "counting the log: %s", PQresultErrorMessage(r));
	PQclear(r);
	return false;
}

/* The bulk: every event of a transaction older than the snapshot xmin now, all
 * finished and so all in the heap's blocks as they are now. */
bool rb_bulk_bounds(struct rebuild *rb)
{
	PGresult *r = PQexec(rb->wr,
			     "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, "
			     "pg_relation_size('events') / current_setting('block_size')::bigint");

	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
		rb_error(rb, "sizing the log: %s", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	snprintf(rb->bulk_xmin, sizeof(rb->bulk_xmin), "%s", PQgetvalue(r, 0, 0));
	rb->bulk_blocks = atoll(PQgetvalue(r, 0, 1));
	PQclear(r);
	return true;
}
