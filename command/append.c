/* The write pipeline of a batch: its events and its idempotency records (one
 * set-based INSERT for the whole batch), the snapshots due, and the fence, queued as
 * one transaction on the service's connection. See batch.h. */
#include <event2/buffer.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

/* Every event of the batch in one statement: one executor start, one check of the
 * constraints' expressions, one statement-level trigger run (sql/013) instead of one
 * of each per event. Arrays in the batch's event order; rows: stream, version,
 * "txid.position". Only the columns the role may set (sql/011). With idempotency
 * records, sql_append_idem (idem.c) inserts them in the same statement. */
const char sql_append[] = APPEND_EVENTS;
/* A snapshot commits with the event at its version. An existing one (which only
 * someone other than this service could have put there) is left alone: the load
 * checks snapshots before using them. */
const char sql_snapshot_put[] =
	"INSERT INTO account_snapshots (stream, version, state) VALUES ($1, $2::integer, $3::jsonb) "
	"ON CONFLICT DO NOTHING";
/* Last in every write pipeline: fails with DBF01 unless $1 is the lease's epoch.
 * command_fence's lock in plain SQL (the lease row FOR KEY SHARE, held to COMMIT):
 * no PL/pgSQL call, search_path switch or SPI statement per batch. Only when it
 * locked nothing is the function called, to raise DBF01 (or to take the lock itself,
 * should the epoch be the lease's by the time it looks). */
const char sql_fence[] =
	"WITH l AS MATERIALIZED (SELECT FROM command_leases WHERE name = 'command' "
	"AND epoch = $1::bigint AND $1::bigint > 0 FOR KEY SHARE) "
	"SELECT CASE WHEN EXISTS (SELECT FROM l) THEN NULL ELSE command_fence($1::bigint) END";

/* One INSERT of every event, and of every record when `records`; result 0 has the
 * events' positions (append_position). */
static bool queue_events(struct batcher *b, bool records)
{
	struct column cols[5 + IDEM_COLUMNS];

	if (records && !idem_record_columns(b, &cols[5]))
		return false;
	for (int c = 0; c < 5; c++)
		column_open(&cols[c]);
	for (size_t i = 0; i < b->nevents; i++) {
		const struct pending_event *pe = &b->events[i];
		column_add(&cols[0], pe->stream);
		column_add(&cols[1], pe->version);
		column_add(&cols[2], pe->type);
		column_add(&cols[3], b->text.p + pe->data);
		column_add(&cols[4], b->text.p + pe->metadata);
	}
	if (records)
		return queue_columns(b->ctx->pg, "append_idem", 5 + IDEM_COLUMNS, cols);
	return queue_columns(b->ctx->pg, "append", 5, cols);
}

/* The records alone, for a batch without events. */
static bool queue_records(struct batcher *b)
{
	struct column cols[IDEM_COLUMNS];

	return idem_record_columns(b, cols) &&
	       queue_columns(b->ctx->pg, "idem_put", IDEM_COLUMNS, cols);
}

static bool queue_snapshot(struct batcher *b, const char *stream, const char *version,
			   const char *state)
{
	const char *v[3] = { stream, version, state };
	return pg_queue(b->ctx->pg, "snapshot_put", 3, v);
}

struct catchup_queue {
	struct batcher *b;
	bool ok;
};

/* The committed state of an account that lacked a recent snapshot. */
static void queue_catchup(void *arg, const char *id, void *value)
{
	struct catchup_queue *q = arg;
	const struct ledger_account *acc = value;
	char stream[LEDGER_ID_MAX + 16], version[12], *state;

	if (!q->ok)
		return;
	snprintf(stream, sizeof(stream), "account-%s", id);
	snprintf(version, sizeof(version), "%" PRId32, acc->version);
	state = account_state_text(acc);
	q->ok = state && queue_snapshot(q->b, stream, version, state);
	free(state);
}

/* Snapshots (rare: one per SNAPSHOT_EVERY versions of an account) go after the events
 * and records: those the batch's events are due, then those its loads found missing. */
static bool queue_snapshots(struct batcher *b)
{
	struct catchup_queue q = { b, true };

	for (size_t i = 0; i < b->nevents; i++) {
		const struct pending_event *pe = &b->events[i];
		if (pe->snapshot && !queue_snapshot(b, pe->stream, pe->version, pe->snapshot))
			return false;
	}
	strmap_foreach(b->catchup, queue_catchup, &q);
	return q.ok;
}

/* Last: the fence (see batch.h and sql/012). Its row lock lasts only from
 * here to COMMIT, so a batch waiting on a lock (another writer's row, say) does not
 * hold up the lease's renewal. */
static bool queue_fence(struct batcher *b)
{
	char epoch[24];
	const char *v[1] = { epoch };

	snprintf(epoch, sizeof(epoch), "%lld", b->epoch);
	return pg_queue(b->ctx->pg, "fence", 1, v);
}

bool append_queue(struct batcher *b, size_t *nrecords)
{
	*nrecords = idem_count_records(b);
	if (b->nevents && !queue_events(b, *nrecords > 0))
		return false;
	if (!b->nevents && *nrecords && !queue_records(b))
		return false;
	if (b->nevents || *nrecords)
		return queue_snapshots(b) && queue_fence(b);
	return true;
}

bool append_queue_barrier(struct batcher *b)
{
	return queue_fence(b);
}

const char *append_position(struct batcher *b, PGresult *const *results, int i)
{
	PGresult *r = results[0];
	const struct pending_event *pe = &b->events[i];

	/* Rows come back in the order of the arrays; should they not, look the event up. */
	if (i < PQntuples(r) && strcmp(PQgetvalue(r, i, 0), pe->stream) == 0 &&
	    strcmp(PQgetvalue(r, i, 1), pe->version) == 0)
		return PQgetvalue(r, i, 2);
	for (int row = 0; row < PQntuples(r); row++)
		if (strcmp(PQgetvalue(r, row, 0), pe->stream) == 0 &&
		    strcmp(PQgetvalue(r, row, 1), pe->version) == 0)
			return PQgetvalue(r, row, 2);
	return "";
}
