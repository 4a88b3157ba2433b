/* daybook-query's SQL side: a small pool of pipelined PostgreSQL connections that
 * batch queued reads, and the statements; each read's outcome goes back through the
 * callbacks the pool was opened with (render.c turns the rows into bodies). */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "query.h"

#define POOL_SIZE 2 /* at least 2: each of the first two LISTENs on a channel */
#define BATCH_MAX 128
#define QUEUE_MAX 20000 /* beyond this, new reads get 503 rather than memory */
#define RUN_TIMEOUT 5.0

/* Every statement reads its data and the checkpoint in one statement, hence one
 * snapshot: the position reported is exactly the state served. */
#define CHECKPOINT "projection_checkpoints c"
#define CHECKPOINT_WHERE " WHERE c.projection = 'sql'"
#define LOG_HEAD QUERY_SQL_LOG_HEAD
/* The channels the pool's connections LISTEN on (slot 0, slot 1): the projector's
 * NOTIFY in the transaction that moves the SQL checkpoint, and the event store's on
 * append. Each wakes the waiting room's one shared probe. A slot listens only while
 * its channel could wake a waiter (waitset_watch), and LISTEN_LINGER seconds after:
 * a listening backend is woken by every NOTIFY of the database, on any channel, and
 * so is this process by those of its channel, which under a write load is most of
 * the query service's work and its backends' when nobody waits. */
#define EVENTS_CHANNEL "daybook_events"
#define LISTEN_LINGER 2.0

static const struct pg_statement statements[READ_KINDS] = {
	[READ_ACCOUNT] = { "account",
			   "SELECT c.txid::text, c.position, " READMODEL_SQL_ACCOUNT_COLUMNS(
				   "a") " FROM " CHECKPOINT
					" LEFT JOIN rm_accounts a ON a.account_id = $1" CHECKPOINT_WHERE },
	[READ_TRANSACTIONS] = { "transactions",
				"SELECT c.txid::text, c.position, a.account_id IS NOT NULL, " READMODEL_SQL_ENTRY_COLUMNS(
					"e") " FROM " CHECKPOINT
					     " LEFT JOIN rm_accounts a ON a.account_id = $1"
					     " LEFT JOIN LATERAL (SELECT * FROM rm_entries WHERE account_id = a.account_id"
					     " AND version < coalesce($3::integer, 2147483647) ORDER BY version DESC"
					     " LIMIT $2::integer) e ON true" CHECKPOINT_WHERE
					     " ORDER BY e.version DESC NULLS LAST" },
	[READ_TRANSFER] = { "transfer",
			    "SELECT c.txid::text, c.position, " READMODEL_SQL_TRANSFER_COLUMNS(
				    "t") " FROM " CHECKPOINT
					 " LEFT JOIN rm_transfers t ON t.transfer_id = $1" CHECKPOINT_WHERE },
	[READ_TOTALS] = { "totals",
			  "SELECT c.txid::text, c.position, t.currency, t.accounts, t.open_accounts, "
			  "t.balance_sum::text FROM " CHECKPOINT
			  " LEFT JOIN rm_totals t ON true" CHECKPOINT_WHERE
			  " ORDER BY t.currency COLLATE \"C\"" },
	/* The event store is its own model: its position is the last event below the
	 * snapshot's xmin, since everything up to there is committed and visible. */
	[READ_EVENTS] = { "events",
			  "WITH head AS (" LOG_HEAD ")"
			  " SELECT coalesce((SELECT txid::text FROM head), '0'),"
			  " coalesce((SELECT position FROM head), 0),"
			  " EXISTS (SELECT 1 FROM events WHERE stream = $1 AND version = 1),"
			  " e.version, e.type, e.data::text, e.metadata::text, " READMODEL_SQL_TIME(
				  "e.recorded_at") " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT version, type, data, metadata, recorded_at"
						   " FROM events WHERE stream = $1 AND version > $2::integer ORDER BY version"
						   " LIMIT $3::integer) e ON true ORDER BY e.version" },
	/* Both positions a waiter may need, in one statement however many wait. */
	[READ_PROBE] = { "checkpoint",
			 "SELECT c.txid::text, c.position, coalesce(h.txid::text, '0'), coalesce(h.position, 0)"
			 " FROM " CHECKPOINT " LEFT JOIN LATERAL (" LOG_HEAD
			 ") h ON true" CHECKPOINT_WHERE },
	/* The other kinds (time travel's) come with sqlpool_open's `kinds`. */
};

struct slot {
	struct sqlpool *pool;
	struct pg *pg;
	struct read *batch; /* the reads of the run in flight, in statement order */
	/* The identity of the store this connection reaches, read on each connection
	 * (the database may have been re-created or restored since the last). */
	char identity[READMODEL_IDENTITY_MAX];
	bool identified;
	time_t identify_after; /* a failed read (not migrated yet?) is retried from then */
	const char *channel;   /* the one it LISTENs on while wanted */
	enum wait_source from; /* what its notifications tell the waiting room */
	bool interest;         /* the waiting room has a waiter they could wake */
	bool listen;           /* it should listen (interest, or lingering after it) */
	bool listening;        /* a LISTEN is in effect on this session */
	bool listen_run;       /* a LISTEN or UNLISTEN is in flight */
	time_t listen_after;   /* a failed LISTEN or UNLISTEN is retried from then */
	struct event *linger;  /* ends `listen` LISTEN_LINGER after the interest */
};

struct sqlpool {
	struct query_ctx *ctx;
	sqlpool_done_cb done;
	sqlpool_failed_cb failed;
	/* Every kind's statement: the pool's own and the ones it was opened with, whose
	 * parameters and result go through their own functions (`other`). */
	struct pg_statement statements[READ_KINDS];
	const struct sqlpool_kind *other[READ_KINDS];
	struct slot slots[POOL_SIZE];
	struct read *head, *tail; /* queued, not yet sent */
	size_t queued;
	char last_identity[READMODEL_IDENTITY_MAX]; /* the last one read, "" before any */
};

static void kick(struct sqlpool *pool);

/* Put reads back at the front of the queue (they were never sent). */
static void requeue_front(struct sqlpool *pool, struct read *list)
{
	struct read *last = list;

	if (!list)
		return;
	while (last->next)
		last = last->next;
	for (struct read *rd = list; rd; rd = rd->next)
		pool->queued++;
	last->next = pool->head;
	pool->head = list;
	if (!pool->tail)
		pool->tail = last;
}

static bool identify(struct slot *slot);

static void on_run_done(void *arg, const struct pg_outcome *out)
{
	struct slot *slot = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct read *rd = slot->batch, *next;
	struct sqlpool *pool = slot->pool;
	size_t i = 0;

	slot->batch = NULL;
	for (; rd; rd = next, i++) {
		next = rd->next;
		rd->next = NULL;
		if (error || i >= n)
			pool->failed(rd, error ? error : "no result", true);
		else if (PQresultStatus(results[i]) == PGRES_TUPLES_OK)
			(pool->other[rd->kind] ? pool->other[rd->kind]->done
					       : pool->done)(rd, results[i]);
		else if (PQresultStatus(results[i]) == PGRES_PIPELINE_ABORTED)
			pool->failed(rd, "pipeline aborted", true);
		else
			pool->failed(rd, PQresultErrorMessage(results[i]), false);
	}
	if (!slot->identified && time(NULL) >= slot->identify_after && identify(slot))
		return; /* kicks when done */
	kick(pool);
}

/* The statement parameters of a read, as text. */
static int params(const struct sqlpool *pool, const struct read *rd, char buf[][80],
		  const char **values)
{
	if (pool->other[rd->kind])
		return pool->other[rd->kind]->params(rd, buf, values);
	switch (rd->kind) {
	case READ_ACCOUNT:
	case READ_TRANSFER:
		values[0] = rd->id;
		return 1;
	case READ_TRANSACTIONS:
		values[0] = rd->id;
		snprintf(buf[1], sizeof(buf[1]), "%d",
			 rd->limit + 1); /* one more: is there a next page? */
		values[1] = buf[1];
		snprintf(buf[2], sizeof(buf[2]), "%d", rd->before);
		values[2] = rd->before > 0 ? buf[2] : NULL;
		return 3;
	case READ_EVENTS:
		snprintf(buf[0], sizeof(buf[0]), "account-%s", rd->id);
		snprintf(buf[1], sizeof(buf[1]), "%d", rd->after_version);
		snprintf(buf[2], sizeof(buf[2]), "%d", rd->limit);
		values[0] = buf[0];
		values[1] = buf[1];
		values[2] = buf[2];
		return 3;
	case READ_TOTALS:
	case READ_PROBE:
	case READ_TT_AS_OF:
	case READ_TT_AT:
		return 0;
	}
	return 0;
}

/* Send up to BATCH_MAX queued reads on one idle connection, with one sync. */
static void run_batch(struct slot *slot)
{
	struct sqlpool *pool = slot->pool;
	struct read *first = pool->head, *last = NULL, *rd;
	size_t n = 0;

	for (rd = first; rd && n < BATCH_MAX; last = rd, rd = rd->next, n++) {
		char buf[SQLPOOL_PARAMS_MAX][80];
		const char *values[SQLPOOL_PARAMS_MAX];
		int np = params(pool, rd, buf, values);
		if (!pg_queue(slot->pg, pool->statements[rd->kind].name, np, values))
			return; /* the connection is being reset; the reads stay queued */
	}
	if (!last)
		return;
	last->next = NULL;
	pool->queued -= n;
	pool->head = rd;
	if (!rd)
		pool->tail = NULL;
	slot->batch = first;
	if (!pg_run(slot->pg, on_run_done, slot) && slot->batch) {
		/* Nothing was sent (the callback did not run): try again elsewhere. */
		slot->batch = NULL;
		requeue_front(pool, first);
	}
}

static void listen_done(void *arg, const struct pg_outcome *out)
{
	struct slot *slot = arg;
	bool ok = out->status == PG_RUN_DONE && out->n == 1 &&
		  PQresultStatus(out->results[0]) == PGRES_COMMAND_OK;

	slot->listen_run = false;
	if (ok) {
		slot->listening = !slot->listening;
	} else {
		/* Refused (a server still in recovery refuses LISTEN, say) or lost: not again
		 * at once, and reads keep this slot meanwhile; waiters still have the safety
		 * probe. */
		log_warn(&slot->pool->ctx->log, "%s %s failed: %s",
			 slot->listen ? "LISTEN" : "UNLISTEN", slot->channel,
			 out->n && out->results[0] ? PQresultErrorMessage(out->results[0])
						   : pg_last_error(slot->pg));
		slot->listen_after = time(NULL) + 1;
	}
	kick(slot->pool);
	/* Messages sent before the LISTEN took effect were missed: look once. */
	if (ok && slot->listening)
		waitset_poke(slot->pool->ctx->waits, slot->from);
}

/* Bring an idle slot's LISTEN in line with slot->listen; true when a run went out. */
static bool sync_listen(struct slot *slot)
{
	char sql[64];

	if (slot->listen == slot->listening || time(NULL) < slot->listen_after)
		return false;
	snprintf(sql, sizeof(sql), "%s %s", slot->listen ? "LISTEN" : "UNLISTEN", slot->channel);
	if (!pg_queue_sql(slot->pg, sql, 0, NULL) || !pg_run(slot->pg, listen_done, slot))
		return false;
	slot->listen_run = true;
	return true;
}

static void kick(struct sqlpool *pool)
{
	for (size_t i = 0; i < POOL_SIZE; i++) {
		struct slot *slot = &pool->slots[i];
		if (slot->batch || slot->listen_run || !pg_ready(slot->pg) || sync_listen(slot))
			continue;
		if (pool->head)
			run_batch(slot);
	}
}

static void on_linger(evutil_socket_t fd, short what, void *arg)
{
	struct slot *slot = arg;

	(void)fd;
	(void)what;
	if (slot->interest)
		return;
	slot->listen = false;
	kick(slot->pool);
}

/* The waiting room gained (on) or lost its last waiter that `from`'s notifications
 * could wake. */
static void on_interest(void *arg, enum wait_source from, bool on)
{
	struct sqlpool *pool = arg;
	struct timeval linger = { (time_t)LISTEN_LINGER,
				  (suseconds_t)((LISTEN_LINGER - (double)(time_t)LISTEN_LINGER) *
						1e6) };

	for (size_t i = 0; i < POOL_SIZE; i++) {
		struct slot *slot = &pool->slots[i];
		if (slot->from != from)
			continue;
		slot->interest = on;
		if (on) {
			slot->listen = true;
			kick(pool);
		} else {
			evtimer_add(slot->linger, &linger);
		}
	}
}

static void identity_done(void *arg, const struct pg_outcome *out)
{
	struct slot *slot = arg;
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	const char *got = pg_outcome_value(out);

	if (got && *got && strlen(got) < sizeof(slot->identity)) {
		snprintf(slot->identity, sizeof(slot->identity), "%s", got);
		slot->identified = true;
		if (strcmp(slot->pool->last_identity, got) != 0) {
			if (slot->pool->last_identity[0])
				log_warn(&slot->pool->ctx->log,
					 "the event store's identity changed from "
					 "%s to %s (re-created or restored): Redis "
					 "generations of the old one are not served",
					 slot->pool->last_identity, got);
			snprintf(slot->pool->last_identity, sizeof(slot->pool->last_identity), "%s",
				 got);
		}
	} else if (!error) {
		log_error(&slot->pool->ctx->log,
			  "cannot read the event store's identity (is the "
			  "database migrated?): Redis is not used: %s",
			  out->n ? PQresultErrorMessage(out->results[0]) : "no result");
		slot->identify_after = time(NULL) + 1;
	}
	kick(slot->pool);
	/* Notifications may have been missed while it was down: look once. */
	waitset_poke(slot->pool->ctx->waits, WAIT_FROM_SQL);
}

/* Read the store's identity on the slot's connection; false when it cannot be sent. */
static bool identify(struct slot *slot)
{
	return pg_queue_sql(slot->pg, READMODEL_IDENTITY_SQL, 0, NULL) &&
	       pg_run(slot->pg, identity_done, slot);
}

static void on_connect(void *arg)
{
	struct slot *slot = arg;

	/* Reads may use Redis only once the store's identity is known (sqlpool_identity). */
	slot->identified = false;
	slot->listening = false; /* a new session: kick LISTENs again if wanted */
	if (identify(slot))
		return;
	kick(slot->pool);
	/* Notifications may have been missed while it was down: look once. */
	waitset_poke(slot->pool->ctx->waits, WAIT_FROM_SQL);
}

static void on_notify(void *arg)
{
	struct slot *slot = arg;

	waitset_poke(slot->pool->ctx->waits, slot->from);
}

const char *sqlpool_identity(const struct sqlpool *pool)
{
	bool connected = false;

	for (size_t i = 0; i < POOL_SIZE; i++) {
		if (!pg_connected(pool->slots[i].pg))
			continue;
		if (pool->slots[i].identified)
			return pool->slots[i].identity;
		connected = true;
	}
	/* A connection that is up but has not told the identity yet (just made, or the
	 * database is not migrated): no generation is ours until it does. With none up
	 * (PostgreSQL unreachable), the store last seen: its Redis hits are still served. */
	return connected ? "" : pool->last_identity;
}

bool sqlpool_submit(struct sqlpool *pool, struct read *rd)
{
	if (!sqlpool_connected(pool) || pool->queued >= QUEUE_MAX)
		return false;
	rd->next = NULL;
	pool->queued++;
	if (pool->tail)
		pool->tail->next = rd;
	else
		pool->head = rd;
	pool->tail = rd;
	kick(pool);
	return true;
}

bool sqlpool_connected(const struct sqlpool *pool)
{
	for (size_t i = 0; i < POOL_SIZE; i++)
		if (pg_connected(pool->slots[i].pg))
			return true;
	return false;
}

const char *sqlpool_last_error(const struct sqlpool *pool)
{
	return pg_last_error(pool->slots[0].pg);
}

bool sqlpool_idle(const struct sqlpool *pool)
{
	for (size_t i = 0; i < POOL_SIZE; i++)
		if (pool->slots[i].batch)
			return false;
	return pool->head == NULL;
}

int sqlpool_open(struct sqlpool **out, struct query_ctx *ctx, sqlpool_done_cb done,
		 sqlpool_failed_cb failed, const struct sqlpool_kind *kinds, size_t nkinds)
{
	struct sqlpool *pool = calloc(1, sizeof(*pool));

	*out = NULL;
	if (!pool)
		return -1;
	pool->ctx = ctx;
	pool->done = done;
	pool->failed = failed;
	memcpy(pool->statements, statements, sizeof(statements));
	for (size_t k = 0; k < nkinds; k++) {
		pool->statements[kinds[k].kind] = kinds[k].statement;
		pool->other[kinds[k].kind] = &kinds[k];
	}
	for (size_t k = 0; k < READ_KINDS; k++)
		if (!pool->statements[k].name) { /* a kind nobody gave a statement */
			free(pool);
			return -1;
		}
	for (size_t i = 0; i < POOL_SIZE; i++) {
		struct pg_config pc = {
			.conninfo = ctx->cfg.pg,
			.application_name = "daybook-query",
			.base = ctx->base,
			.log = &ctx->log,
			.statements = pool->statements,
			.nstatements = READ_KINDS,
			.run_timeout = RUN_TIMEOUT,
			.on_connect = on_connect,
			.on_notify = on_notify,
			.arg = &pool->slots[i],
		};
		struct slot *slot = &pool->slots[i];
		slot->pool = pool;
		slot->channel = i == 0 ? READMODEL_POSITION_CHANNEL : EVENTS_CHANNEL;
		slot->from = i == 0 ? WAIT_FROM_SQL : WAIT_FROM_LOG;
		slot->linger = evtimer_new(ctx->base, on_linger, slot);
		if (!slot->linger || pg_open(&slot->pg, &pc)) {
			sqlpool_close(&pool);
			return -1;
		}
	}
	waitset_watch(ctx->waits, WAIT_FROM_SQL, on_interest, pool);
	waitset_watch(ctx->waits, WAIT_FROM_LOG, on_interest, pool);
	*out = pool;
	return 0;
}

void sqlpool_close(struct sqlpool **poolp)
{
	struct sqlpool *pool = *poolp;

	if (!pool)
		return;
	waitset_watch(pool->ctx->waits, WAIT_FROM_SQL, NULL, NULL);
	waitset_watch(pool->ctx->waits, WAIT_FROM_LOG, NULL, NULL);
	for (size_t i = 0; i < POOL_SIZE; i++) {
		pg_close(&pool->slots[i].pg);
		if (pool->slots[i].linger)
			event_free(pool->slots[i].linger);
	}
	free(pool);
	*poolp = NULL;
}
