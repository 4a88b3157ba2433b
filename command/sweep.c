/* Expiry of idempotency records, in small batches on a connection of its own.
 *
 * Each batch is its own short transaction, so that neither the write path nor the
 * cluster's xmin horizon (which the projectors read below) ever waits on a long DELETE. */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

#define SWEEP_BATCH 1000        /* rows per transaction */
#define RETENTION_DEFAULT 90000 /* 25 hours */
#define RETENTION_MIN 86400     /* SPEC §3: keys are kept at least 24 hours */
#define RETENTION_MAX 31536000  /* a year */
#define INTERVAL_DEFAULT 60
#define INTERVAL_MAX 86400

/* The oldest expired records first (index idempotency_keys_created_at). No FOR UPDATE
 * SKIP LOCKED, which would need UPDATE on the table: two command processes sweeping at
 * once only wait for each other's short transaction. */
static const struct pg_statement statements[] = {
	{ "sweep_batch",
	  "DELETE FROM idempotency_keys WHERE (token_id, key) IN (SELECT token_id, key "
	  "FROM idempotency_keys WHERE created_at < now() - $1::bigint * interval '1 second' "
	  "ORDER BY created_at LIMIT $2::integer)" },
	/* The table's size for daybook_idempotency_records: the planner's estimate (kept
	 * by autovacuum's ANALYZE), counted only while the table was never analysed. */
	{ "records_estimate",
	  "SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint "
	  "ELSE (SELECT count(*) FROM idempotency_keys) END "
	  "FROM pg_catalog.pg_class c WHERE c.oid = 'idempotency_keys'::regclass" },
};

struct sweeper {
	struct command_ctx *ctx;
	struct pg *pg;
	struct event *timer;
	bool running; /* a batch is in flight */
	char retention[24], batch[16];
	struct metric *swept, *batches, *failures, *records;
};

/* A whole number in [min, max] from the environment, or def when unset or empty. */
static bool env_long(const char *name, long def, long min, long max, long *out, char *err,
		     size_t errlen)
{
	const char *v = getenv(name);
	char *end = NULL;
	long n;

	if (!v || !*v) {
		*out = def;
		return true;
	}
	errno = 0;
	n = strtol(v, &end, 10);
	if (errno || *end || n < min || n > max) {
		snprintf(err, errlen,
			 "%s must be a whole number of seconds from %ld to %ld (got '%.32s')", name,
			 min, max, v);
		return false;
	}
	*out = n;
	return true;
}

bool sweep_settings_load(struct sweep_settings *out, char *err, size_t errlen)
{
	return env_long("DAYBOOK_IDEMPOTENCY_RETENTION_S", RETENTION_DEFAULT, RETENTION_MIN,
			RETENTION_MAX, &out->retention_s, err, errlen) &&
	       env_long("DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S", INTERVAL_DEFAULT, 1, INTERVAL_MAX,
			&out->interval_s, err, errlen);
}

static void sweep(struct sweeper *s);

static void estimate_done(void *arg, const struct pg_outcome *out)
{
	struct sweeper *s = arg;
	char why[256];

	s->running = false;
	if (!pg_outcome_ok(out, why, sizeof(why)) || out->n != 1 ||
	    PQresultStatus(out->results[0]) != PGRES_TUPLES_OK || PQntuples(out->results[0]) != 1) {
		log_debug(&s->ctx->log, "idempotency records estimate failed: %s", why);
		return;
	}
	metric_set(s->records, strtod(PQgetvalue(out->results[0], 0, 0), NULL));
}

/* After a sweep, how many records the table holds (an estimate: cheap at any size). */
static void estimate(struct sweeper *s)
{
	if (s->running || !pg_ready(s->pg) || s->ctx->stopping)
		return;
	if (pg_queue(s->pg, "records_estimate", 0, NULL) && pg_run(s->pg, estimate_done, s))
		s->running = true;
}

static void batch_done(void *arg, const struct pg_outcome *out)
{
	struct sweeper *s = arg;
	char why[256];
	long deleted;

	s->running = false;
	if (!pg_outcome_ok(out, why, sizeof(why)) || out->n != 1) {
		metric_add(s->failures, 1);
		log_warn(&s->ctx->log, "idempotency sweep failed (next try in %ld s): %s",
			 s->ctx->sweep.interval_s, why);
		return;
	}
	deleted = strtol(PQcmdTuples(out->results[0]), NULL, 10);
	metric_add(s->swept, (double)deleted);
	if (deleted > 0)
		metric_add(s->batches, 1);
	if (deleted >= SWEEP_BATCH) {
		sweep(s); /* more may be left: the next batch, in a new transaction */
		return;
	}
	log_debug(&s->ctx->log, "idempotency sweep done (%ld in its last batch)", deleted);
	estimate(s);
}

/* Start a batch, unless one is in flight or the connection is down (then the next
 * connection or tick starts one). */
static void sweep(struct sweeper *s)
{
	const char *v[2] = { s->retention, s->batch };

	if (s->running || !pg_ready(s->pg) || s->ctx->stopping)
		return;
	if (pg_queue(s->pg, "sweep_batch", 2, v) && pg_run(s->pg, batch_done, s))
		s->running = true;
}

static void on_connect(void *arg)
{
	sweep(arg);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	sweep(arg);
}

int sweeper_open(struct sweeper **out, struct command_ctx *ctx)
{
	struct sweeper *s = calloc(1, sizeof(*s));
	struct pg_config pgc = {
		.conninfo = ctx->cfg.pg,
		.application_name = "daybook-command-sweep",
		.base = ctx->base,
		.log = &ctx->log,
		.statements = statements,
		.nstatements = sizeof(statements) / sizeof(statements[0]),
		.on_connect = on_connect,
	};
	struct timeval tick = { ctx->sweep.interval_s, 0 };

	*out = NULL;
	if (!s)
		return -ENOMEM;
	s->ctx = ctx;
	snprintf(s->retention, sizeof(s->retention), "%ld", ctx->sweep.retention_s);
	snprintf(s->batch, sizeof(s->batch), "%d", SWEEP_BATCH);
	s->swept = metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_idempotency_swept_total",
			       "Expired idempotency records deleted.", "", NULL, 0);
	s->batches =
		metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_idempotency_sweep_batches_total",
			    "Idempotency expiry transactions that deleted records (at most 1000 each).",
			    "", NULL, 0);
	s->failures =
		metrics_get(ctx->metrics, METRIC_COUNTER,
			    "daybook_idempotency_sweep_failures_total",
			    "Idempotency expiry transactions that failed (retried at the next tick).",
			    "", NULL, 0);
	s->records =
		metrics_get(ctx->metrics, METRIC_GAUGE, "daybook_idempotency_records",
			    "Idempotency records kept (the planner's estimate, read after each sweep).",
			    "", NULL, 0);
	s->timer = event_new(ctx->base, -1, EV_PERSIST, on_tick, s);
	pgc.arg = s;
	if (!s->timer || event_add(s->timer, &tick) || pg_open(&s->pg, &pgc)) {
		sweeper_close(&s);
		return -ENOMEM;
	}
	*out = s;
	return 0;
}

void sweeper_close(struct sweeper **sp)
{
	struct sweeper *s = *sp;

	if (!s)
		return;
	if (s->timer)
		event_free(s->timer);
	pg_close(&s->pg);
	free(s);
	*sp = NULL;
}
