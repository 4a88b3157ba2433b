/* daybook-command: the HTTP write API. Validates commands, decides events, appends them. */
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"
#include "service.h"

#define SWEEP_INTERVAL 600 /* seconds between idempotency expiry sweeps */

static const char usage[] =
	"usage: daybook-command [--help]\n"
	"\n"
	"The Daybook write API: POST /accounts, /accounts/{id}/deposits, /withdrawals,\n"
	"/close and /transfers, with group commit into the PostgreSQL event store.\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG           libpq connection string or URI (required)\n"
	"  DAYBOOK_TOKENS_FILE  API tokens: '<id> <sha256 hex> <scopes>' lines (required)\n"
	"  DAYBOOK_LISTEN       host:port to listen on (default 127.0.0.1:8081)\n"
	"  DAYBOOK_LOG_LEVEL    debug|info|warn|error (default info)\n";

static bool ready(void *arg, char *why, size_t whylen)
{
	struct command_ctx *ctx = arg;

	if (ctx->stopping) {
		snprintf(why, whylen, "shutting down");
		return false;
	}
	if (!pg_connected(ctx->pg)) {
		snprintf(why, whylen, "postgresql: %s", pg_last_error(ctx->pg));
		return false;
	}
	return true;
}

static void on_pg_connect(void *arg)
{
	struct command_ctx *ctx = arg;

	/* Expire old idempotency records first (and on a timer afterwards). */
	batcher_sweep(ctx->batcher);
	batcher_kick(ctx->batcher);
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

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct command_ctx *ctx = arg;

	(void)what;
	if (ctx->stopping)
		return;
	log_info(&ctx->log, "signal %d: no longer accepting; finishing requests in flight", (int)sig);
	ctx->stopping = true;
	http_server_stop_accepting(ctx->http);
	on_drain_tick(-1, 0, ctx);
}

static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
	struct command_ctx *ctx = arg;

	(void)fd;
	(void)what;
	batcher_sweep(ctx->batcher);
}

static int start(struct command_ctx *ctx)
{
	char err[512];
	size_t nstatements;
	const struct pg_statement *statements = command_statements(&nstatements);
	struct pg_config pgc = {
		.conninfo = ctx->cfg.pg, .application_name = "daybook-command", .base = ctx->base,
		.log = &ctx->log, .statements = statements, .nstatements = nstatements,
		.on_connect = on_pg_connect, .arg = ctx,
	};
	struct http_server_config hc = {
		.log = &ctx->log, .base = ctx->base, .metrics = ctx->metrics, .tokens = ctx->tokens,
		.routes = command_routes, .nroutes = command_nroutes, .ready = ready, .arg = ctx,
	};
	struct timeval sweep = { SWEEP_INTERVAL, 0 };

	if (tokens_open(&ctx->tokens, ctx->cfg.tokens_file, err, sizeof(err))) {
		fprintf(stderr, "daybook-command: DAYBOOK_TOKENS_FILE: %s\n", err);
		return 2;
	}
	hc.tokens = ctx->tokens;
	if (batcher_open(&ctx->batcher, ctx) || pg_open(&ctx->pg, &pgc)) {
		fprintf(stderr, "daybook-command: out of memory\n");
		return 1;
	}
	if (http_server_open(&ctx->http, &hc, ctx->cfg.listen_host, ctx->cfg.listen_port, err,
			     sizeof(err))) {
		fprintf(stderr, "daybook-command: %s\n", err);
		return 1;
	}
	ctx->sigterm = evsignal_new(ctx->base, SIGTERM, on_signal, ctx);
	ctx->sigint = evsignal_new(ctx->base, SIGINT, on_signal, ctx);
	ctx->drain_timer = evtimer_new(ctx->base, on_drain_tick, ctx);
	ctx->sweep_timer = event_new(ctx->base, -1, EV_PERSIST, on_sweep, ctx);
	if (!ctx->sigterm || !ctx->sigint || !ctx->drain_timer || !ctx->sweep_timer) {
		fprintf(stderr, "daybook-command: out of memory\n");
		return 1;
	}
	evsignal_add(ctx->sigterm, NULL);
	evsignal_add(ctx->sigint, NULL);
	evtimer_add(ctx->sweep_timer, &sweep);
	log_info(&ctx->log, "listening on %s:%u", ctx->cfg.listen_host, ctx->cfg.listen_port);
	return 0;
}

static void stop(struct command_ctx *ctx)
{
	if (ctx->sigterm)
		event_free(ctx->sigterm);
	if (ctx->sigint)
		event_free(ctx->sigint);
	if (ctx->drain_timer)
		event_free(ctx->drain_timer);
	if (ctx->sweep_timer)
		event_free(ctx->sweep_timer);
	http_server_close(&ctx->http);
	batcher_close(&ctx->batcher);
	pg_close(&ctx->pg);
	tokens_close(&ctx->tokens);
	metrics_close(&ctx->metrics);
	if (ctx->base)
		event_base_free(ctx->base);
}

int main(int argc, char **argv)
{
	struct command_ctx ctx = { .log = { .service = "command", .level = LOG_INFO } };
	int rc = service_init(argc, argv, "daybook-command", usage,
			      CONFIG_NEED_PG | CONFIG_NEED_TOKENS, "127.0.0.1:8081", &ctx.cfg);

	if (rc >= 0)
		return rc;
	ctx.log.level = ctx.cfg.log_level;
	ctx.base = event_base_new();
	if (!ctx.base || metrics_open(&ctx.metrics)) {
		fprintf(stderr, "daybook-command: cannot set up the event loop\n");
		return 1;
	}
	rc = start(&ctx);
	/* After every setting is checked (a bad one is the single line on stderr). */
	if (rc == 0)
		rc = service_check_event_store("daybook-command", &ctx.cfg, &ctx.log);
	if (rc < 0)
		rc = event_base_dispatch(ctx.base) < 0 ? 1 : 0;
	stop(&ctx);
	return rc;
}
