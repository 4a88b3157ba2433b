/* daybook-projector: follows the event store and maintains the read models. One
 * instance leads (a lease with fencing, shared/lease.c); others wait as hot standbys. */
#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "projector.h"
#include "service.h"

#define POLL_INTERVAL_US 100000 /* polling is the guarantee; NOTIFY only a hint */
#define RETRY_INTERVAL_S 1      /* a blocked step is retried this often */
#define READY_LAG_SECONDS 10.0

static const char usage[] =
	"usage: daybook-projector [--help] [--version]\n"
	"\n"
	"Follows the Daybook event store and maintains the SQL and Redis read models.\n"
	"One instance leads, by a lease in PostgreSQL; others wait as hot standbys and take\n"
	"over within about a second when it dies, about 6 s when it hangs.\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG         libpq connection string or URI (required; role daybook_projector)\n"
	"  DAYBOOK_REDIS      redis://[user[:password]@]host:port[/db] or unix:///path\n"
	"                     (required; ACL user daybook-projector)\n"
	"  DAYBOOK_REDIS_PASSWORD_FILE  the Redis password, instead of in DAYBOOK_REDIS\n"
	"  DAYBOOK_LISTEN     host:port for /metrics, /healthz, /readyz (default 127.0.0.1:8083)\n"
	"  DAYBOOK_LOG_LEVEL  debug|info|warn|error (default info)\n";

static int writer_pid(void *arg)
{
	struct projector_ctx *ctx = arg;

	return pg_backend_pid(ctx->pg);
}

static void on_retry_timer(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	projector_retry(arg);
}

static void on_notify(void *arg)
{
	projector_wake(arg);
}

static void on_poll(evutil_socket_t fd, short what, void *arg)
{
	struct projector_ctx *ctx = arg;

	(void)fd;
	(void)what;
	projector_redis_tick(ctx);
	projector_look_beyond(ctx);
	if (ctx->role == ROLE_LEADER && ctx->step == STEP_BLOCKED)
		return;
	projector_wake(ctx);
}

static void ready(void *arg, struct http_ready *r)
{
	struct projector_ctx *ctx = arg;

	http_ready_check(r, "postgresql", pg_connected(ctx->pg), "%s", pg_last_error(ctx->pg));
	http_ready_check(r, "leadership", ctx->role == ROLE_LEADER, "%s",
			 ctx->role == ROLE_STANDBY ? "another projector leads"
						   : "waiting for the lease");
	/* A healthy standby says so: monitoring counts "exactly one projector ready". */
	if (pg_connected(ctx->pg) && ctx->role != ROLE_LEADER)
		http_ready_state(r, ctx->role == ROLE_STANDBY ? "standby" : "electing");
	http_ready_check(r, "projection",
			 ctx->role != ROLE_LEADER || ctx->lag_seconds <= READY_LAG_SECONDS,
			 "the projection lags %.0f s behind the log", ctx->lag_seconds);
}

/* The first signal: exit now, or when the batch in progress is done (go_idle). */
static void on_stop(struct service_ctx *svc)
{
	struct projector_ctx *ctx = SERVICE_CTX_OF(struct projector_ctx, svc);

	if (ctx->step == STEP_IDLE || ctx->step == STEP_BLOCKED || ctx->role != ROLE_LEADER)
		event_base_loopexit(ctx->base, NULL);
}

static void make_metrics(struct projector_ctx *ctx)
{
	struct metrics *m = ctx->metrics;
	const char *sql = "projection=\"sql\"";

	ctx->m_position = metrics_get(m, METRIC_GAUGE, "daybook_projection_position",
				      "Log position of the last applied event.", sql, NULL, 0);
	ctx->m_lag_events = metrics_get(m, METRIC_GAUGE, "daybook_projection_lag_events",
					"Events in the log beyond the checkpoint (estimate).", sql,
					NULL, 0);
	ctx->m_lag_seconds = metrics_get(m, METRIC_GAUGE, "daybook_projection_lag_seconds",
					 "Age of the oldest event not yet applied.", sql, NULL, 0);
	ctx->m_batch = metrics_get(m, METRIC_HISTOGRAM, "daybook_projection_batch_events",
				   "Events per applied batch.", sql, metrics_size_buckets,
				   metrics_size_buckets_len);
	ctx->m_applied = metrics_get(m, METRIC_COUNTER, "daybook_projection_events_total",
				     "Events applied.", sql, NULL, 0);
	ctx->m_commit_seconds =
		metrics_get(m, METRIC_HISTOGRAM, "daybook_projection_commit_seconds",
			    "Time from sending a batch's SQL transaction to its commit "
			    "(or failure).",
			    sql, metrics_latency_buckets, metrics_latency_buckets_len);
	ctx->m_errors = metrics_get(m, METRIC_COUNTER, "daybook_projection_errors_total",
				    "Batches abandoned and retried.", sql, NULL, 0);
	ctx->m_read_ahead =
		metrics_get(m, METRIC_COUNTER, "daybook_projection_read_ahead_total",
			    "Batches read while the last batch's Redis write was in flight.", sql,
			    NULL, 0);
	ctx->m_leader = metrics_get(m, METRIC_GAUGE, "daybook_projector_leader",
				    "1 while this instance leads.", "", NULL, 0);
	ctx->m_epoch = metrics_get(m, METRIC_GAUGE, "daybook_projector_epoch",
				   "The lease epoch this instance leads with; 0 on standby.", "",
				   NULL, 0);
}

static int start(struct service_ctx *svc)
{
	struct projector_ctx *ctx = SERVICE_CTX_OF(struct projector_ctx, svc);
	char err[512];
	size_t nstatements;
	const struct pg_statement *st = projector_statements(&nstatements);
	struct pg_config pgc = {
		.conninfo = ctx->cfg.pg,
		.application_name = "daybook-projector",
		.base = ctx->base,
		.log = &ctx->log,
		.statements = st,
		.nstatements = nstatements,
		.listen_channel = "daybook_events",
		.on_connect = projector_on_pg_connect,
		/* Read models and their checkpoint commit together, so a crash that loses
		 * the last commits rolls back to an earlier consistent point, replayed from
		 * the log: the projector need not wait for each WAL flush. */
		.async_commit = true,
		/* read_events was planned anew for every batch (a custom plan: 8 % of the
		 * backend's CPU), to the same index scan as its generic plan. */
		.generic_plans = true,
		.on_notify = on_notify,
		.arg = ctx,
	};
	/* The position NOTIFY's own session (step.c, notify): a batch never waits for the
	 * database's notify lock. It announces derived data only: no WAL flush awaited. */
	size_t nnotify;
	const struct pg_statement *notify = projector_notify_statements(&nnotify);
	struct pg_config nc = {
		.conninfo = ctx->cfg.pg,
		.application_name = "daybook-projector notify",
		.base = ctx->base,
		.log = &ctx->log,
		.statements = notify,
		.nstatements = nnotify,
		.on_connect = projector_on_notify_connect,
		.async_commit = true,
		.arg = ctx,
	};
	struct lease_config lc = {
		.conninfo = ctx->cfg.pg,
		.name = PROJECTOR_PROJECTION,
		.claim_sql = "SELECT projector_lease_claim($1, $2, $3::bigint, $4::float8, $5::int)",
		.application_name = "daybook-projector lease",
		.who = "projector",
		.base = ctx->base,
		.log = &ctx->log,
		.writer_pid = writer_pid,
		.on_change = projector_on_lease_change,
		.arg = ctx,
	};
	struct http_server_config hc = {
		.log = &ctx->log,
		.base = ctx->base,
		.metrics = ctx->metrics,
		.ready = ready,
		.arg = ctx,
		.limits = ctx->cfg.http,
	};
	struct timeval poll = { 0, POLL_INTERVAL_US }, retry = { RETRY_INTERVAL_S, 0 };

	make_metrics(ctx);
	ctx->events = calloc(PROJECTOR_BATCH_MAX, sizeof(*ctx->events));
	if (!ctx->events || strmap_open(&ctx->accounts, free) || strmap_open(&ctx->totals, free) ||
	    pg_open(&ctx->pg, &pgc) || pg_open(&ctx->notify_pg, &nc) ||
	    projector_redis_open(ctx, projector_redis_reported) || lease_open(&ctx->lease, &lc)) {
		fprintf(stderr, "daybook-projector: out of memory\n");
		return 1;
	}
	if (http_server_open(&ctx->http, &hc, ctx->cfg.listen_host, ctx->cfg.listen_port, err,
			     sizeof(err))) {
		fprintf(stderr, "daybook-projector: %s\n", err);
		return 1;
	}
	ctx->poll_timer = event_new(ctx->base, -1, EV_PERSIST, on_poll, ctx);
	ctx->retry_timer = event_new(ctx->base, -1, EV_PERSIST, on_retry_timer, ctx);
	if (!ctx->poll_timer || !ctx->retry_timer) {
		fprintf(stderr, "daybook-projector: out of memory\n");
		return 1;
	}
	evtimer_add(ctx->poll_timer, &poll);
	evtimer_add(ctx->retry_timer, &retry);
	log_info(&ctx->log, "metrics on %s:%u", ctx->cfg.listen_host, ctx->cfg.listen_port);
	return 0;
}

static void stop(struct service_ctx *svc)
{
	struct projector_ctx *ctx = SERVICE_CTX_OF(struct projector_ctx, svc);
	struct event *evs[] = { ctx->poll_timer, ctx->retry_timer };

	for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
		if (evs[i])
			event_free(evs[i]);
	projector_free_events(ctx);
	free(ctx->events);
	if (ctx->ahead)
		projector_drop_ahead(ctx);
	free(ctx->ahead);
	http_server_close(&ctx->http);
	lease_close(&ctx->lease);
	redis_close(&ctx->redis);
	pg_close(&ctx->pg);
	pg_close(&ctx->notify_pg);
	strmap_close(&ctx->accounts);
	strmap_close(&ctx->totals);
}

static const struct service_def service = {
	.name = "daybook-projector",
	.log_name = "projector",
	.usage = usage,
	.need = CONFIG_NEED_PG | CONFIG_NEED_REDIS,
	.default_listen = "127.0.0.1:8083",
	.check_event_store = true,
	.stopping = "finishing the current batch",
	.start = start,
	.on_stop = on_stop,
	.stop = stop,
};

int main(int argc, char **argv)
{
	struct projector_ctx ctx = { 0 };

	return service_run(argc, argv, &service, &ctx.svc);
}
