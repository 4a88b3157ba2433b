/* daybook-query: the HTTP read API over the read models (Redis first, SQL fallback). */
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

/* A Redis read slower than this is abandoned for SQL (and the connection renewed). */
#define REDIS_COMMAND_TIMEOUT 0.25
#define REDIS_CONNECT_TIMEOUT 1.0

static const char usage[] =
	"usage: daybook-query [--help]\n"
	"\n"
	"The Daybook read API: GET /accounts/{id}, /accounts/{id}/transactions,\n"
	"/accounts/{id}/events, /transfers/{id} and /totals, served from the Redis read\n"
	"model, falling back to the SQL read model, with read-your-writes (min_position).\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG           libpq connection string or URI, role daybook_query (required)\n"
	"  DAYBOOK_REDIS        redis://host:port[/db] or unix:///path[?db=N] (required)\n"
	"  DAYBOOK_TOKENS_FILE  API tokens: '<id> <sha256 hex> <scopes>' lines (required)\n"
	"  DAYBOOK_LISTEN       host:port to listen on (default 127.0.0.1:8082)\n"
	"  DAYBOOK_LOG_LEVEL    debug|info|warn|error (default info)\n";

/* Ready when SQL can answer; Redis down only degrades (reads fall back to SQL). */
static bool ready(void *arg, char *why, size_t whylen)
{
	struct query_ctx *ctx = arg;

	if (ctx->stopping) {
		snprintf(why, whylen, "shutting down");
		return false;
	}
	if (!sqlpool_connected(ctx->sql)) {
		snprintf(why, whylen, "postgresql: %s", sqlpool_last_error(ctx->sql));
		return false;
	}
	return true;
}

/* "<generation> <token>" on dbk:position: a projection moved. */
static void on_position(void *arg, const char *msg, size_t len)
{
	struct query_ctx *ctx = arg;
	const char *space = memchr(msg, ' ', len);
	struct readmodel_position at;

	if (space && query_position_parse_n(space + 1, len - (size_t)(space + 1 - msg), &at))
		read_wake(ctx, &at);
}

/* After a (re)subscription messages may have been missed: look again. */
static void on_subscribed(void *arg)
{
	read_wake(arg, NULL);
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
	struct query_ctx *ctx = arg;
	struct timeval later = { 0, 50000 };

	(void)fd;
	(void)what;
	if (http_server_inflight(ctx->http) == 0 && sqlpool_idle(ctx->sql)) {
		log_info(&ctx->log, "drained; exiting");
		event_base_loopexit(ctx->base, &later); /* let the last replies flush */
		return;
	}
	evtimer_add(ctx->drain_timer, &later);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct query_ctx *ctx = arg;

	(void)what;
	if (ctx->stopping)
		return;
	log_info(&ctx->log, "signal %d: no longer accepting; finishing requests in flight", (int)sig);
	ctx->stopping = true;
	http_server_stop_accepting(ctx->http);
	on_drain_tick(-1, 0, ctx);
}

static int open_redis(struct query_ctx *ctx)
{
	size_t nscripts;
	const char *const *scripts = read_scripts(&nscripts);
	struct redis_config rc = {
		.server = &ctx->cfg.redis, .name = "daybook-query", .base = ctx->base,
		.log = &ctx->log, .scripts = scripts, .nscripts = nscripts,
		.command_timeout = REDIS_COMMAND_TIMEOUT, .connect_timeout = REDIS_CONNECT_TIMEOUT,
		.arg = ctx,
	};
	struct redis_config sc = {
		.server = &ctx->cfg.redis, .name = "daybook-query-position", .base = ctx->base,
		.log = &ctx->log, .subscribe = "dbk:position", .on_message = on_position,
		.connect_timeout = REDIS_CONNECT_TIMEOUT, .on_ready = on_subscribed, .arg = ctx,
	};

	if (redis_open(&ctx->redis, &rc) || redis_open(&ctx->subscriber, &sc))
		return -1;
	return 0;
}

static int start(struct query_ctx *ctx)
{
	char err[512];
	struct http_server_config hc = {
		.log = &ctx->log, .base = ctx->base, .metrics = ctx->metrics,
		.routes = query_routes, .nroutes = query_nroutes, .ready = ready, .arg = ctx,
	};

	if (tokens_open(&ctx->tokens, ctx->cfg.tokens_file, err, sizeof(err))) {
		fprintf(stderr, "daybook-query: DAYBOOK_TOKENS_FILE: %s\n", err);
		return 2;
	}
	hc.tokens = ctx->tokens;
	if (read_init(ctx) || sqlpool_open(&ctx->sql, ctx) || open_redis(ctx)) {
		fprintf(stderr, "daybook-query: out of memory\n");
		return 1;
	}
	if (http_server_open(&ctx->http, &hc, ctx->cfg.listen_host, ctx->cfg.listen_port, err,
			     sizeof(err))) {
		fprintf(stderr, "daybook-query: %s\n", err);
		return 1;
	}
	ctx->sigterm = evsignal_new(ctx->base, SIGTERM, on_signal, ctx);
	ctx->sigint = evsignal_new(ctx->base, SIGINT, on_signal, ctx);
	ctx->drain_timer = evtimer_new(ctx->base, on_drain_tick, ctx);
	if (!ctx->sigterm || !ctx->sigint || !ctx->drain_timer) {
		fprintf(stderr, "daybook-query: out of memory\n");
		return 1;
	}
	evsignal_add(ctx->sigterm, NULL);
	evsignal_add(ctx->sigint, NULL);
	log_info(&ctx->log, "listening on %s:%u", ctx->cfg.listen_host, ctx->cfg.listen_port);
	return 0;
}

static void stop(struct query_ctx *ctx)
{
	if (ctx->sigterm)
		event_free(ctx->sigterm);
	if (ctx->sigint)
		event_free(ctx->sigint);
	if (ctx->drain_timer)
		event_free(ctx->drain_timer);
	read_fini(ctx);
	http_server_close(&ctx->http);
	redis_close(&ctx->subscriber);
	redis_close(&ctx->redis);
	sqlpool_close(&ctx->sql);
	tokens_close(&ctx->tokens);
	metrics_close(&ctx->metrics);
	if (ctx->base)
		event_base_free(ctx->base);
}

int main(int argc, char **argv)
{
	struct query_ctx ctx = { .log = { .service = "query", .level = LOG_INFO } };
	char err[512];
	int rc;

	if (argc > 1) {
		bool help = strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0;
		fputs(usage, help ? stdout : stderr);
		return help ? 0 : 2;
	}
	if (!config_load(&ctx.cfg, CONFIG_NEED_PG | CONFIG_NEED_REDIS | CONFIG_NEED_TOKENS,
			 "127.0.0.1:8082", err, sizeof(err))) {
		fprintf(stderr, "daybook-query: %s\n", err);
		return 2;
	}
	ctx.log.level = ctx.cfg.log_level;
	signal(SIGPIPE, SIG_IGN);
	ctx.base = event_base_new();
	if (!ctx.base || metrics_open(&ctx.metrics)) {
		fprintf(stderr, "daybook-query: cannot set up the event loop\n");
		return 1;
	}
	rc = start(&ctx);
	if (rc == 0)
		rc = event_base_dispatch(ctx.base) < 0 ? 1 : 0;
	stop(&ctx);
	return rc;
}
