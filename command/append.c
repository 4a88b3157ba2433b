/* The write pipeline of a batch: its events, its idempotency records, the snapshots
 * due, and the fence, queued as one transaction on the service's connection. See
 * batch.h. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "batch.h"

const char sql_append[] =
	"INSERT INTO events (stream, version, type, data, metadata) "
	"VALUES ($1, $2, $3, $4, $5) RETURNING txid::text || '.' || position::text";
/* A snapshot commits with the event at its version. An existing one (which only
 * someone other than this service could have put there) is left alone: the load
 * checks snapshots before using them. */
const char sql_snapshot_put[] =
	"INSERT INTO account_snapshots (stream, version, state) VALUES ($1, $2::integer, $3::jsonb) "
	"ON CONFLICT DO NOTHING";
/* Last in every write pipeline: fails with DBF01 unless $1 is the lease's epoch. */
const char sql_fence[] = "SELECT command_fence($1::bigint)";

static bool queue_event(struct batcher *b, const struct pending_event *pe)
{
	const char *v[5] = { pe->stream, pe->version, pe->type, pe->data, pe->metadata };
	return pg_queue(b->ctx->pg, "append", 5, v);
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

/* Snapshots go after every event and record, so that result i stays event i's: those
 * the batch's events are due, then those its loads found missing. */
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

/* Last: the fence (see the top of this file and sql/012). Its row lock lasts only from
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
	*nrecords = 0;
	for (size_t i = 0; i < b->nevents; i++)
		if (!queue_event(b, &b->events[i]))
			return false;
	for (size_t i = 0; i < b->nslots; i++) {
		if (idem_keeps_record(&b->slots[i])) {
			if (!idem_queue_record(b, &b->slots[i]))
				return false;
			++*nrecords;
		}
	}
	if (b->nevents || *nrecords)
		return queue_snapshots(b) && queue_fence(b);
	return true;
}

const char *append_position(struct batcher *b, PGresult *const *results, int i)
{
	(void)b;
	return PQgetvalue(results[i], 0, 0);
}
