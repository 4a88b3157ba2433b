/* daybook-command: the HTTP write API. Validates commands, decides events, appends them.
 * Any number of instances may run against one database: the holder of the write lease
 * (shared/lease.c, sql/012) leads and appends; the others stand by, not ready. */
#include <errno.h>
#include <event2/event.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"
#include "evmem.h"
#include "service.h"

#define WRITE_TIMEOUT_MS 10000    /* default: a batch's deadline on this side */
#define STATEMENT_TIMEOUT_MS 5000 /* default: PostgreSQL's own deadline, below it */

static const char usage[] =
	"usage: daybook-command [--help] [--version]\n"
	"\n"
	"The Daybook write API: POST /accounts, /accounts/{id}/deposits, /withdrawals,\n"
	"/close and /transfers, with group commit into the PostgreSQL event store.\n"
	"Any number of instances may run: one leads (a lease in PostgreSQL) and writes; the\n"
	"others stand by (/readyz 503 \"standby\", writes 503 not_leader) and take over\n"
	"within seconds when it dies or hangs.\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG           libpq connection string or URI (required)\n"
	"  DAYBOOK_TOKENS_FILE  API tokens: '<id> <sha256 hex> <scopes>' lines (required)\n"
	"  DAYBOOK_LISTEN       host:port to listen on (default 127.0.0.1:8081)\n"
	"  DAYBOOK_LOG_LEVEL    debug|info|warn|error (default info)\n"
	"  DAYBOOK_WRITE_TIMEOUT_MS\n"
	"                       a batch's deadline: past it the batch is cancelled and its\n"
	"                       requests get 503 outcome_unknown (default 10000)\n"
	"  DAYBOOK_STATEMENT_TIMEOUT_MS\n"
	"                       PostgreSQL's deadline for a batch, below the write timeout\n"
	"                       (default 5000; 0 leaves the server's setting)\n"
	"  DAYBOOK_IDEMPOTENCY_RETENTION_S\n"
	"                       seconds an idempotency record is kept (default 90000,\n"
	"                       at least 86400)\n"
	"  DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S\n"
	"                       seconds between expiry sweeps (default 60)\n";

/* A millisecond setting from the environment (def when unset) within [min, max]; false
 * after printing one line naming the variable when it is malformed. */
static bool env_ms(const char *name, long def, long min, long max, long *out)
{
	const char *v = getenv(name);
	char *end;

	*out = def;
	if (!v || !*v)
		return true;
	errno = 0;
	*out = strtol(v, &end, 10);
	if (errno || *end || end == v || *out < min || *out > max) {
		fprintf(stderr,
			"daybook-command: %s must be a whole number of milliseconds from "
			"%ld to %ld (got '%s')\n",
			name, min, max, v);
		return false;
	}
	return true;
}

/* The write path's deadlines: PostgreSQL's (statement_timeout) stays below ours, so
 * that the database gives up, and says so, before this service stops waiting. */
static bool load_timeouts(struct command_ctx *ctx)
{
	long write_ms, statement_ms;

	if (!env_ms("DAYBOOK_WRITE_TIMEOUT_MS", WRITE_TIMEOUT_MS, 100, 600000, &write_ms) ||
	    !env_ms("DAYBOOK_STATEMENT_TIMEOUT_MS", STATEMENT_TIMEOUT_MS, 0, 600000, &statement_ms))
		return false;
	if (statement_ms >= write_ms) {
		fprintf(stderr,
			"daybook-command: DAYBOOK_STATEMENT_TIMEOUT_MS (%ld) must be below "
			"DAYBOOK_WRITE_TIMEOUT_MS (%ld), or 0\n",
			statement_ms, write_ms);
		return false;
	}
	ctx->write_timeout = (double)write_ms / 1000.0;
	ctx->statement_timeout_ms = (int)statement_ms;
	return true;
}

/* The settings of this service alone: the sweep's, then the deadlines. */
static int configure(struct service_ctx *svc)
{
	struct command_ctx *ctx = SERVICE_CTX_OF(struct command_ctx, svc);
	char err[256];

	if (!sweep_settings_load(&ctx->sweep, err, sizeof(err))) {
		fprintf(stderr, "daybook-command: %s\n", err);
		return 2;
	}
	if (!load_timeouts(ctx))
		return 2;
	return -1;
}

static void ready(void *arg, struct http_ready *r)
{
	struct command_ctx *ctx = arg;

	http_ready_check(r, "accepting", !ctx->stopping, "shutting down");
	http_ready_check(r, "postgresql", pg_connected(ctx->pg), "%s", pg_last_error(ctx->pg));
	/* Fixed words: a load balancer needs only the status. */
	if (lease_epoch(ctx->lease) == 0)
		http_ready_state(r, ctx->standing_by ? "standby" : "electing");
}

void command_leadership(struct command_ctx *ctx, long long epoch, const char *why)
{
	if (epoch == 0) {
		if (ctx->epoch)
			log_warn(&ctx->log, "deposed: %s; standing by", why);
		else if (!ctx->standing_by)
			log_info(&ctx->log, "%s; standing by", why);
		ctx->epoch = 0;
		ctx->standing_by = true;
		metric_set(ctx->m_leader, 0);
		metric_set(ctx->m_epoch, 0);
		batcher_leadership(ctx->batcher, false);
		return;
	}
	/* Whatever this process knew of the accounts may be stale (another leader may have
	 * written since): the new term starts from the log. */
	log_info(&ctx->log, "leading the write side (epoch %lld)", epoch);
	ctx->epoch = epoch;
	ctx->standing_by = false;
	metric_set(ctx->m_leader, 1);
	metric_set(ctx->m_epoch, (double)epoch);
	batcher_leadership(ctx->batcher, true);
	batcher_kick(ctx->batcher);
}

static void on_lease_change(void *arg, long long epoch, const char *why)
{
	command_leadership(arg, epoch, why);
}

/* A batch of the current term was fenced: the lease is lost, stand by at once. */
static void on_fenced(void *arg, const char *why)
{
	struct command_ctx *ctx = arg;

	lease_lost(ctx->lease);
	command_leadership(ctx, 0, why);
}

static int writer_pid(void *arg)
{
	struct command_ctx *ctx = arg;

	return pg_backend_pid(ctx->pg);
}

static void on_pg_connect(void *arg)
{
	struct command_ctx *ctx = arg;

	batcher_reconnected(ctx->batcher);
}

/* Exit once every accepted request is answered and nothing is left to commit. */
static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
	struct command_ctx *ctx = arg;
	struct timeval later = { 0, 50000 };

	(void)fd;
	(void)what;
	if (batcher_idle(ctx->batcher) && http_server_inflight(ctx->http) == 0) {
		log_info(&ctx->log, "drained; exiting");
		event_base_loopexit(ctx->base, &later); /* let the last replies flush */
		return;
	}
	evtimer_add(ctx->drain_timer, &later);
}

/* The first signal: answer what was accepted, then exit. */
static void on_stop(struct service_ctx *svc)
{
	on_drain_tick(-1, 0, SERVICE_CTX_OF(struct command_ctx, svc));
}

static int start(struct service_ctx *svc)
{
	struct command_ctx *ctx = SERVICE_CTX_OF(struct command_ctx, svc);
	char err[512];
	size_t nstatements;
	const struct pg_statement *statements = command_statements(&nstatements);
	struct pg_config pgc = {
		.conninfo = ctx->cfg.pg,
		.application_name = "daybook-command",
		.base = ctx->base,
		.log = &ctx->log,
		.statements = statements,
		.nstatements = nstatements,
		.on_connect = on_pg_connect,
		.arg = ctx,
		.run_timeout = ctx->write_timeout,
		.statement_timeout_ms = ctx->statement_timeout_ms,
	};
	struct lease_config lc = {
		.conninfo = ctx->cfg.pg,
		.name = COMMAND_LEASE_NAME,
		.claim_sql = "SELECT command_lease_claim($1, $2, $3::bigint, $4::float8, $5::int)",
		.application_name = "daybook-command lease",
		.who = "command instance",
		.base = ctx->base,
		.log = &ctx->log,
		.writer_pid = writer_pid,
		.on_change = on_lease_change,
		.arg = ctx,
	};
	struct batcher_hooks bh = {
		.settle = cmd_settle,
		.drop = cmd_drop,
		.fenced = on_fenced,
		.arg = ctx,
	};
	struct http_server_config hc = {
		.log = &ctx->log,
		.base = ctx->base,
		.metrics = ctx->metrics,
		.tokens = ctx->tokens,
		.routes = command_routes,
		.nroutes = command_nroutes,
		.ready = ready,
		.arg = ctx,
		.limits = ctx->cfg.http,
	};

	ctx->m_leader = metrics_get(ctx->metrics, METRIC_GAUGE, "daybook_command_leader",
				    "1 while this instance leads the write side, else 0.", "", NULL,
				    0);
	ctx->m_epoch =
		metrics_get(ctx->metrics, METRIC_GAUGE, "daybook_command_epoch",
			    "The write lease's epoch this instance leads with; 0 on standby.", "",
			    NULL, 0);
	if (batcher_open(&ctx->batcher, ctx, &bh) || pg_open(&ctx->pg, &pgc) ||
	    sweeper_open(&ctx->sweeper, ctx) || lease_open(&ctx->lease, &lc)) {
		fprintf(stderr, "daybook-command: out of memory\n");
		return 1;
	}
	if (http_server_open(&ctx->http, &hc, ctx->cfg.listen_host, ctx->cfg.listen_port, err,
			     sizeof(err))) {
		fprintf(stderr, "daybook-command: %s\n", err);
		return 1;
	}
	ctx->drain_timer = evtimer_new(ctx->base, on_drain_tick, ctx);
	if (!ctx->drain_timer) {
		fprintf(stderr, "daybook-command: out of memory\n");
		return 1;
	}
	log_info(&ctx->log, "listening on %s:%u", ctx->cfg.listen_host, ctx->cfg.listen_port);
	return 0;
}

static void stop(struct service_ctx *svc)
{
	struct command_ctx *ctx = SERVICE_CTX_OF(struct command_ctx, svc);

	if (ctx->drain_timer)
		event_free(ctx->drain_timer);
	http_server_close(&ctx->http);
	sweeper_close(&ctx->sweeper);
	lease_close(&ctx->lease);
	batcher_close(&ctx->batcher);
	cmd_spares_free(ctx);
	pg_close(&ctx->pg);
}

static const struct service_def service = {
	.name = "daybook-command",
	.log_name = "command",
	.usage = usage,
	.need = CONFIG_NEED_PG | CONFIG_NEED_TOKENS,
	.default_listen = "127.0.0.1:8081",
	.check_event_store = true,
	.stopping = "no longer accepting; finishing requests in flight",
	.configure = configure,
	.start = start,
	.on_stop = on_stop,
	.stop = stop,
};

int main(int argc, char **argv)
{
	struct command_ctx ctx = { 0 };

#ifdef M_MXFAST
	/* glibc without fastbins: every request allocates blocks of 1 KiB and more
	 * (libevent's buffer chains, JSON texts), and each such allocation made glibc
	 * consolidate its fastbins first, 10-15 % of this process's CPU under load
	 * (docs/performance.md, "Write path budget"). Small blocks still come from the
	 * per-thread cache. */
	mallopt(M_MXFAST, 0);
#endif
	/* Before any libevent call (shared/evmem.h). */
	evmem_install();

	return service_run(argc, argv, &service, &ctx.svc);
}
