/* daybook-admin rebuild: reading the log in chunks, and handing each chunk's rows on. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rebuild.h"

/* Write what a chunk produced: COPY the rows (from the copier thread during the load)
 * and let Redis work on its commands while the next chunk is read. */
static bool flush_chunk(struct rebuild *rb)
{
	size_t due = rb->redis_prev;

	if (rb->sql && rb->copier.running &&
	    !copier_submit(&rb->copier, &rb->entries, &rb->transfers))
		return false;
	if (rb->sql && !rb->copier.running &&
	    (!copy_in(rb->wr, "rm_entries_shadow", &rb->entries, &rb->ctx->log) ||
	     !copy_in(rb->wr, "rm_transfers_shadow", &rb->transfers, &rb->ctx->log)))
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

/* Where a read starts: the bulk's blocks from `block` on (bulk), or, in reader order,
 * what follows (txid, position). */
struct read_from {
	bool bulk;
	long long block;
	uint64_t txid;
	long long position;
};

/* Send a read: the bulk's next blocks while any are left (a TID range scan, which
 * costs a third less than reading in reader order through the index), then what
 * follows the checkpoint in reader order. Results come in binary: no text
 * conversions on the server. */
static bool send_read_from(PGconn *pg, const char *xmin, const struct read_from *at)
{
	char a[48], b[48], limit[16];
	const char *params[3] = { a, b, limit };

	if (at->bulk) {
		snprintf(a, sizeof(a), "(%lld,0)", at->block);
		snprintf(b, sizeof(b), "(%lld,0)", at->block + BULK_BLOCKS);
		params[2] = xmin;
		return PQsendQueryParams(
			pg,
			READ_COLUMNS
			"FROM events WHERE ctid >= $1::tid AND ctid < $2::tid AND txid < $3::xid8",
			3, NULL, params, NULL, NULL, 1);
	}
	snprintf(a, sizeof(a), "%llu", (unsigned long long)at->txid);
	snprintf(b, sizeof(b), "%lld", at->position);
	snprintf(limit, sizeof(limit), "%d", CHUNK);
	return PQsendQueryParams(pg,
				 READ_COLUMNS
				 "FROM events WHERE (txid, position) > ($1::xid8, $2::bigint) "
				 "AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
				 "ORDER BY events.txid, events.position LIMIT $3",
				 3, NULL, params, NULL, NULL, 1);
}

static bool send_read(struct rebuild *rb)
{
	struct read_from at = { rb->bulk_next < rb->bulk_blocks, rb->bulk_next, rb->cp_txid,
				rb->position };

	rb->bulk_read = at.bulk;
	if (at.bulk)
		rb->bulk_next += BULK_BLOCKS;
	rb->read_pending = send_read_from(rb->pg, rb->bulk_xmin, &at);
	if (!rb->read_pending)
		rb_error(rb, "reading the log: %s", PQerrorMessage(rb->pg));
	return rb->read_pending;
}

/* The rows of the read sent on pg, or NULL on failure (the error in err). Caller
 * PQclear()s. */
static PGresult *take_rows(PGconn *pg, char *err, size_t errlen)
{
	PGresult *r, *rows = NULL;

	while ((r = PQgetResult(pg))) {
		if (!rows && PQresultStatus(r) == PGRES_TUPLES_OK) {
			rows = r;
			continue;
		}
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			snprintf(err, errlen, "%s", PQresultErrorMessage(r));
		PQclear(r);
	}
	if (!rows && !err[0])
		snprintf(err, errlen, "%s", PQerrorMessage(pg));
	return rows;
}

static PGresult *take_read(struct rebuild *rb)
{
	char err[1024] = "";
	PGresult *rows = take_rows(rb->pg, err, sizeof(err));

	if (err[0])
		rb_error(rb, "reading the log: %s", err);
	rb->read_pending = false;
	if (err[0]) {
		PQclear(rows);
		return NULL;
	}
	return rows;
}

/* Fold a read's rows (a chunk) and write what they produced. */
static bool fold_rows(struct rebuild *rb, PGresult *r, bool bulk, int n)
{
	rb->done += n;
	if (!bulk && n > 0) {
		rb->cp_txid = rb_be(PQgetvalue(r, n - 1, 1), 8);
		rb->position = (long long)rb_be(PQgetvalue(r, n - 1, 0), 8);
	}
	for (int row = 0; row < n; row++)
		if (!rb_fold_row(rb, r, row))
			return false;
	return flush_chunk(rb);
}

/* Fold the next chunk of the log; *n gets its size. The read of the chunk after is
 * sent before folding, so PostgreSQL reads while we fold and write: any bulk read
 * left, or, in reader order, the next after a full chunk (its start, the last row
 * here, is known before folding). */
bool rb_fold_chunk(struct rebuild *rb, int *n)
{
	PGresult *r = NULL;
	bool bulk, ok;

	if (!rb->read_pending && !send_read(rb))
		return false;
	bulk = rb->bulk_read;
	if (!(r = take_read(rb)))
		return false;
	*n = PQntuples(r);
	if (!bulk && *n > 0) {
		rb->cp_txid = rb_be(PQgetvalue(r, *n - 1, 1), 8);
		rb->position = (long long)rb_be(PQgetvalue(r, *n - 1, 0), 8);
	}
	if ((bulk ? rb->bulk_next < rb->bulk_blocks : *n == CHUNK) && !send_read(rb)) {
		PQclear(r);
		return false;
	}
	ok = fold_rows(rb, r, bulk, *n);
	PQclear(r);
	return ok;
}

/* During the load, a thread takes the reads' results off the reader's connection
 * while the main thread folds: PostgreSQL sends a chunk as it reads it, and a read
 * sent ahead stalls as soon as the socket's buffers are full unless someone takes
 * its rows. It reads the bulk, then in reader order until a read comes back short,
 * keeping up to READ_AHEAD chunks; where each read starts it knows from the rows it
 * took (the bulk's greatest (txid, position), then each chunk's last row), as the
 * fold does. */
#define READ_AHEAD 2

struct reader {
	struct rebuild *rb;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	PGresult *queue[READ_AHEAD];
	bool bulk[READ_AHEAD];
	int head, len;
	bool done, stop;
	char error[1024]; /* a failed read's, set with done */
};

/* The greatest (txid, position) of a bulk read's rows. */
static void bulk_max(PGresult *r, struct read_from *at)
{
	for (int i = 0; i < PQntuples(r); i++) {
		uint64_t txid = rb_be(PQgetvalue(r, i, 1), 8);
		long long pos = (long long)rb_be(PQgetvalue(r, i, 0), 8);
		if (txid > at->txid || (txid == at->txid && pos > at->position)) {
			at->txid = txid;
			at->position = pos;
		}
	}
}

static void *reader_main(void *arg)
{
	struct reader *rd = arg;
	struct rebuild *rb = rd->rb;
	struct read_from at = { true, 0, rb->cp_txid, rb->position };
	char error[sizeof(rd->error)] = "";
	bool last = false;

	while (!last) {
		PGresult *r = NULL;
		bool stop;
		pthread_mutex_lock(&rd->mu);
		stop = rd->stop;
		pthread_mutex_unlock(&rd->mu);
		if (stop)
			break;
		at.bulk = at.block < rb->bulk_blocks;
		if (!send_read_from(rb->pg, rb->bulk_xmin, &at))
			snprintf(error, sizeof(error), "%s", PQerrorMessage(rb->pg));
		else
			r = take_rows(rb->pg, error, sizeof(error));
		if (error[0] || !r) {
			if (!error[0])
				snprintf(error, sizeof(error), "no rows came back");
			PQclear(r);
			break;
		}
		if (at.bulk) {
			bulk_max(r, &at);
			at.block += BULK_BLOCKS;
		} else {
			int n = PQntuples(r);
			last = n < CHUNK;
			if (n > 0) {
				at.txid = rb_be(PQgetvalue(r, n - 1, 1), 8);
				at.position = (long long)rb_be(PQgetvalue(r, n - 1, 0), 8);
			}
		}
		pthread_mutex_lock(&rd->mu);
		while (rd->len == READ_AHEAD && !rd->stop)
			pthread_cond_wait(&rd->cv, &rd->mu);
		if (rd->stop) {
			pthread_mutex_unlock(&rd->mu);
			PQclear(r);
			break;
		}
		rd->queue[(rd->head + rd->len) % READ_AHEAD] = r;
		rd->bulk[(rd->head + rd->len) % READ_AHEAD] = at.bulk;
		rd->len++;
		pthread_cond_broadcast(&rd->cv);
		pthread_mutex_unlock(&rd->mu);
	}
	pthread_mutex_lock(&rd->mu);
	snprintf(rd->error, sizeof(rd->error), "%s", error);
	rd->done = true;
	pthread_cond_broadcast(&rd->cv);
	pthread_mutex_unlock(&rd->mu);
	return NULL;
}

/* The next chunk the thread read, or NULL at the end (*failed said if it failed). */
static PGresult *reader_next(struct reader *rd, bool *bulk, bool *failed)
{
	PGresult *r = NULL;

	pthread_mutex_lock(&rd->mu);
	while (rd->len == 0 && !rd->done)
		pthread_cond_wait(&rd->cv, &rd->mu);
	if (rd->len > 0) {
		r = rd->queue[rd->head];
		*bulk = rd->bulk[rd->head];
		rd->head = (rd->head + 1) % READ_AHEAD;
		rd->len--;
		pthread_cond_broadcast(&rd->cv);
	}
	*failed = !r && rd->error[0];
	pthread_mutex_unlock(&rd->mu);
	return r;
}

/* Stop the thread (it finishes the read it is taking: the connection is left idle)
 * and drop what it read ahead. */
static void reader_stop(struct reader *rd)
{
	pthread_mutex_lock(&rd->mu);
	rd->stop = true;
	pthread_cond_broadcast(&rd->cv);
	pthread_mutex_unlock(&rd->mu);
	pthread_join(rd->thread, NULL);
	for (; rd->len > 0; rd->len--, rd->head = (rd->head + 1) % READ_AHEAD)
		PQclear(rd->queue[rd->head]);
	pthread_mutex_destroy(&rd->mu);
	pthread_cond_destroy(&rd->cv);
}

/* Start the reader's thread with signals blocked: they are the main thread's. */
static bool reader_start(struct rebuild *rb, struct reader *rd)
{
	int err;

	*rd = (struct reader){ .rb = rb };
	pthread_mutex_init(&rd->mu, NULL);
	pthread_cond_init(&rd->cv, NULL);
	err = copy_spawn(&rd->thread, reader_main, rd);
	if (!err)
		return true;
	rb_error(rb, "cannot start the reading thread: %s", strerror(err));
	pthread_mutex_destroy(&rd->mu);
	pthread_cond_destroy(&rd->cv);
	return false;
}

/* Fold until the log is (nearly) exhausted; false on error or interruption. */
bool rb_load(struct rebuild *rb)
{
	struct reader rd;
	PGresult *r;
	bool bulk, failed = false, reading = false;

	rb->copier.log = &rb->ctx->log;
	if (rb->sql && !copier_start(&rb->copier, rb->wr))
		goto fail;
	if (!(reading = reader_start(rb, &rd)))
		goto fail;
	while (!rb_interrupted && (r = reader_next(&rd, &bulk, &failed))) {
		bool ok = fold_rows(rb, r, bulk, PQntuples(r));
		PQclear(r);
		if (!ok)
			goto fail;
		rb_report(rb, false);
	}
	reader_stop(&rd);
	reading = false;
	if (failed) {
		rb_error(rb, "reading the log: %s", rd.error);
		goto fail;
	}
	rb->bulk_next = rb->bulk_blocks;
	return copier_stop(&rb->copier) && !rb_interrupted;
fail:
	if (reading)
		reader_stop(&rd);
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
