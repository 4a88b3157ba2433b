/* daybook-query: the HTTP read API over the read models (Redis first, SQL fallback). */
#include <event2/event.h>
#include <event2/thread.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "query.h"
#include "service.h"

/* A Redis read slower than this is abandoned for SQL (and the connection renewed). */
#define REDIS_COMMAND_TIMEOUT 0.25
#define REDIS_CONNECT_TIMEOUT 1.0
#define MAX_WORKERS 8
#define MAX_WAITERS_DEFAULT 10000
#define WAIT_PROBE_MS_DEFAULT 200
#define CACHE_BYTES_DEFAULT 16777216L /* 16 MiB: docs/performance.md, "Read path budget" */
#define CACHE_LEASE_MS_DEFAULT 5

static const char usage[] =
	"usage: daybook-query [--help] [--version]\n"
	"\n"
	"The Daybook read API: GET /accounts/{id}, /accounts/{id}/transactions,\n"
	"/accounts/{id}/events, /transfers/{id} and /totals, served from the Redis read\n"
	"model, falling back to the SQL read model, with read-your-writes (min_position);\n"
	"and the event feed of the whole log: GET /events and GET /events/stream (SSE).\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG           libpq connection string or URI, role daybook_query (required)\n"
	"  DAYBOOK_REDIS        redis://[user[:password]@]host:port[/db] or unix:///path[?db=N]\n"
	"                       (required; ACL user daybook-query: read-only scripts and reads)\n"
	"  DAYBOOK_REDIS_PASSWORD_FILE  the Redis password, instead of in DAYBOOK_REDIS\n"
	"  DAYBOOK_TOKENS_FILE  API tokens: '<id> <sha256 hex> <scopes>' lines (required)\n"
	"  DAYBOOK_LISTEN       host:port to listen on (default 127.0.0.1:8082)\n"
	"  DAYBOOK_QUERY_WORKERS  event-loop threads sharing the port (default: CPUs, up to 4)\n"
	"  DAYBOOK_MAX_WAITERS  reads that may wait for min_position at once (default 10000)\n"
	"  DAYBOOK_WAIT_PROBE_MS  safety probe of the checkpoints while reads wait (default 200)\n"
	"  DAYBOOK_QUERY_CACHE_BYTES  the read cache's cap for all workers together, in bytes\n"
	"                       (default 16777216, about 25000 accounts; 0: no read cache)\n"
	"  DAYBOOK_QUERY_CACHE_LEASE_MS  how long a cached body may be served after Redis\n"
	"                       last proved the invalidations current (default 5)\n"
	"  DAYBOOK_MAX_STREAMS  open event streams (GET /events/stream) at once (default 1000)\n"
	"  DAYBOOK_STREAM_BUFFER_MAX  unsent bytes after which a slow stream is cut off\n"
	"                       (default 1048576)\n"
	"  DAYBOOK_STREAM_KEEPALIVE_MS  keepalive comment interval on streams (default 10000)\n"
	"  DAYBOOK_LOG_LEVEL    debug|info|warn|error (default info)\n";

/* Ready when SQL can answer, in every worker (any of them may get the next request);
 * Redis down only degrades (reads fall back to SQL). */
static void ready(void *arg, struct http_ready *r)
{
	struct query_ctx *ctx = arg;
	int down = -1;

	http_ready_check(r, "accepting", !ctx->stopping, "shutting down");
	for (int i = 0; i < ctx->nworkers && down < 0; i++)
		if (!atomic_load(&ctx->workers[i].up))
			down = i;
	if (!sqlpool_connected(ctx->sql))
		http_ready_check(r, "postgresql", false, "%s", sqlpool_last_error(ctx->sql));
	else if (!feed_connected(ctx->feed))
		http_ready_check(r, "postgresql", false, "event feed: %s",
				 feed_last_error(ctx->feed));
	else
		http_ready_check(r, "postgresql", down < 0,
				 "worker %d is not connected to postgresql yet", down);
}

static void on_ready_timer(evutil_socket_t fd, short what, void *arg)
{
	struct query_ctx *ctx = arg;

	(void)fd;
	(void)what;
	atomic_store(&ctx->up,
		     !ctx->stopping && sqlpool_connected(ctx->sql) && feed_connected(ctx->feed));
}

/* "<generation> <token>" on READMODEL_POSITION_TOPIC: a projection moved, or so says someone who
 * may use the channel: Pub/Sub is not per Redis database, so another deployment on
 * the same server (its own database) publishes here too, as does a generation that
 * is not live yet. So the token is only a claim: it wakes at once the few waiting
 * reads it would satisfy (at most WAIT_HINT_MAX), each of which reads the live
 * generation of this store itself and goes back to waiting if it is behind; and it
 * starts the one shared probe, which reads that checkpoint for everyone else. */
static void on_position(void *arg, const char *msg, size_t len)
{
	struct query_ctx *ctx = arg;
	const char *token = msg && len ? memchr(msg, ' ', len) : NULL;
	struct readmodel_position claimed;

	if (token && query_position_parse_n(token + 1, len - (size_t)(token + 1 - msg), &claimed))
		waitset_hint(ctx->waits, WAIT_FROM_REDIS, &claimed);
	else
		waitset_poke(ctx->waits, WAIT_FROM_REDIS);
}

/* After a (re)subscription messages may have been missed: look again, once. */
static void on_subscribed(void *arg)
{
	struct query_ctx *ctx = arg;

	waitset_poke(ctx->waits, WAIT_FROM_REDIS);
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

/* Stop serving: reads in flight finish, then the loop exits (on_drain_tick). */
static void drain(struct query_ctx *ctx)
{
	atomic_store(&ctx->up, false);
	feed_stop(ctx->feed);
	on_drain_tick(-1, 0, ctx);
}

/* Another worker caught the signal. */
static void on_stop_event(evutil_socket_t fd, short what, void *arg)
{
	struct query_ctx *ctx = arg;

	(void)fd;
	(void)what;
	if (ctx->stopping)
		return;
	ctx->stopping = true;
	http_server_stop_accepting(ctx->http);
	drain(ctx);
}

/* The first signal, in worker 0: every worker drains. */
static void on_stop(struct service_ctx *svc)
{
	struct query_ctx *ctx = SERVICE_CTX_OF(struct query_ctx, svc);

	for (int i = 1; i < ctx->nworkers; i++)
		event_active(ctx->workers[i].stop_event, EV_READ, 0);
	drain(ctx);
}

/* The read connection is new: what the cache read on the old one is no longer
 * tracked. */
static void on_reads_ready(void *arg)
{
	struct query_ctx *ctx = arg;

	cache_reads_ready(ctx->cache);
}

/* The position subscriber is open only while a waiter could be woken by its messages
 * (waitset_watch), and SUBSCRIBE_LINGER seconds after: every message wakes the worker
 * and costs Redis a write, one per projector batch, with nobody waiting. */
#define SUBSCRIBE_LINGER 2

static int open_subscriber(struct query_ctx *ctx)
{
	struct redis_config sc = {
		.server = &ctx->cfg.redis,
		.name = "daybook-query-position",
		.base = ctx->base,
		.log = &ctx->log,
		.subscribe = READMODEL_POSITION_TOPIC,
		.on_message = on_position,
		.connect_timeout = REDIS_CONNECT_TIMEOUT,
		.on_ready = on_subscribed,
		.arg = ctx,
	};

	return ctx->subscriber ? 0 : redis_open(&ctx->subscriber, &sc);
}

static void on_subscriber_linger(evutil_socket_t fd, short what, void *arg)
{
	struct query_ctx *ctx = arg;

	(void)fd;
	(void)what;
	if (!ctx->subscriber_wanted)
		redis_close(&ctx->subscriber);
}

static void on_redis_interest(void *arg, enum wait_source from, bool on)
{
	struct query_ctx *ctx = arg;
	struct timeval linger = { SUBSCRIBE_LINGER, 0 };

	(void)from;
	ctx->subscriber_wanted = on;
	if (!on)
		evtimer_add(ctx->subscriber_linger, &linger);
	else if (open_subscriber(ctx)) /* the safety probe stands in */
		log_error(&ctx->log, "cannot open the position subscriber: out of memory");
}

static int open_redis(struct query_ctx *ctx)
{
	size_t nscripts;
	const char *const *scripts = read_scripts(&nscripts);
	struct redis_config rc = {
		.server = &ctx->cfg.redis,
		.name = "daybook-query",
		.base = ctx->base,
		.log = &ctx->log,
		.scripts = scripts,
		.nscripts = nscripts,
		.read_only = true,
		.command_timeout = REDIS_COMMAND_TIMEOUT,
		.connect_timeout = REDIS_CONNECT_TIMEOUT,
		.on_ready = on_reads_ready,
		.arg = ctx,
	};
	struct cache_config cc = {
		.max_bytes = ctx->cache_bytes,
		.lease = ctx->cache_lease,
		.checkpoint_script = read_checkpoint_script(),
		.server = &ctx->cfg.redis,
		.base = ctx->base,
		.connect_timeout = REDIS_CONNECT_TIMEOUT,
		.metrics = ctx->metrics,
		.log = &ctx->log,
	};

	if (redis_open(&ctx->redis, &rc))
		return -1;
	ctx->subscriber_linger = evtimer_new(ctx->base, on_subscriber_linger, ctx);
	if (!ctx->subscriber_linger)
		return -1;
	waitset_watch(ctx->waits, WAIT_FROM_REDIS, on_redis_interest, ctx);
	cc.reads = ctx->redis;
	if (cache_open(&ctx->cache, &cc))
		return -1;
	return 0;
}

/* Set up one worker on its loop: its connections and listener. The config, log,
 * tokens and metrics are shared (read-only or locked). */
static int start_worker(struct query_ctx *ctx)
{
	char err[512];
	struct http_server_config hc = {
		.log = &ctx->log,
		.base = ctx->base,
		.metrics = ctx->metrics,
		.tokens = ctx->tokens,
		.routes = query_routes,
		.nroutes = query_nroutes,
		.ready = ready,
		.arg = ctx,
		.reuse_port = true,
		.limits = ctx->cfg.http,
		.workers = (unsigned)ctx->nworkers,
		.quiet_reads = true,
	};
	struct timeval tick = { 0, 100000 };

	if (read_init(ctx) ||
	    sqlpool_open(&ctx->sql, ctx, read_sql_done, read_sql_failed, timetravel_kinds,
			 TIMETRAVEL_NKINDS) ||
	    open_redis(ctx) || feed_open(&ctx->feed, ctx)) {
		fprintf(stderr, "daybook-query: out of memory\n");
		return 1;
	}
	if (http_server_open(&ctx->http, &hc, ctx->cfg.listen_host, ctx->cfg.listen_port, err,
			     sizeof(err))) {
		fprintf(stderr, "daybook-query: %s\n", err);
		return 1;
	}
	ctx->drain_timer = evtimer_new(ctx->base, on_drain_tick, ctx);
	ctx->stop_event = event_new(ctx->base, -1, 0, on_stop_event, ctx);
	ctx->ready_timer = event_new(ctx->base, -1, EV_PERSIST, on_ready_timer, ctx);
	if (!ctx->drain_timer || !ctx->stop_event || !ctx->ready_timer) {
		fprintf(stderr, "daybook-query: out of memory\n");
		return 1;
	}
	evtimer_add(ctx->ready_timer, &tick);
	return 0;
}

/* Close what start_worker opened (not the loop). */
static void stop_worker(struct query_ctx *ctx)
{
	struct event *evs[] = { ctx->drain_timer, ctx->stop_event, ctx->ready_timer };

	for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
		if (evs[i])
			event_free(evs[i]);
	read_fini(ctx); /* wakes the feed's waiters: before feed_close */
	feed_close(&ctx->feed);
	http_server_close(&ctx->http);
	redis_close(&ctx->subscriber);
	if (ctx->subscriber_linger)
		event_free(ctx->subscriber_linger);
	redis_close(&ctx->redis);
	cache_close(&ctx->cache); /* after the reads, whose pending heartbeat it is */
	sqlpool_close(&ctx->sql);
}

static void *run_worker(void *arg)
{
	struct query_ctx *ctx = arg;

	event_base_dispatch(ctx->base);
	return NULL;
}

/* An optional integer setting in [min, max]; false after saying what is wrong. */
static bool env_int(const char *name, long min, long max, long *out)
{
	const char *v = getenv(name);
	char *end = NULL;
	long n;

	if (!v || !*v)
		return true;
	n = strtol(v, &end, 10);
	if (*end || n < min || n > max) {
		fprintf(stderr, "daybook-query: %s must be a number from %ld to %ld\n", name, min,
			max);
		return false;
	}
	*out = n;
	return true;
}

static int worker_count(void)
{
	const char *v = getenv("DAYBOOK_QUERY_WORKERS");
	long n = v && *v ? strtol(v, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);

	return n < 1 ? 1 : n > 4 && !(v && *v) ? 4 : n > MAX_WORKERS ? MAX_WORKERS : (int)n;
}

/* Event streams leave the HTTP edge's connection cap when they start (they have their
 * own, DAYBOOK_MAX_STREAMS) but each still holds a descriptor: the streams and the
 * connections together must fit in the descriptor limit, or a reader opening streams
 * could leave PostgreSQL and Redis no descriptor to reconnect with. */
static size_t streams_within_descriptors(struct query_ctx *ctx, size_t want)
{
	size_t conns = ctx->cfg.http.max_connections ? ctx->cfg.http.max_connections
						     : CONFIG_MAX_CONNECTIONS_DEFAULT;
	size_t room;
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
		return want;
	room = (size_t)rl.rlim_cur > 2 * CONFIG_FD_HEADROOM + conns
		       ? (size_t)rl.rlim_cur - 2 * CONFIG_FD_HEADROOM - conns
		       : 0;
	if (want <= room)
		return want;
	log_warn(&ctx->log,
		 "at most %zu event streams: the descriptor limit (ulimit -n) is %llu and %zu "
		 "connections may be open",
		 room, (unsigned long long)rl.rlim_cur, conns);
	return room;
}

/* The settings of this service alone, into worker 0 (the others copy it). */
static int configure(struct service_ctx *svc)
{
	struct query_ctx *ctx = SERVICE_CTX_OF(struct query_ctx, svc);
	long max_waiters = MAX_WAITERS_DEFAULT, probe_ms = WAIT_PROBE_MS_DEFAULT;
	long max_streams = FEED_MAX_STREAMS_DEFAULT, stream_buffer = FEED_STREAM_BUFFER_DEFAULT;
	long keepalive_ms = FEED_KEEPALIVE_MS_DEFAULT;
	long cache_bytes = CACHE_BYTES_DEFAULT, cache_lease_ms = CACHE_LEASE_MS_DEFAULT;

	if (!env_int("DAYBOOK_MAX_WAITERS", 1, 10000000, &max_waiters) ||
	    !env_int("DAYBOOK_WAIT_PROBE_MS", 10, 600000, &probe_ms) ||
	    !env_int("DAYBOOK_MAX_STREAMS", 0, 1000000, &max_streams) ||
	    !env_int("DAYBOOK_STREAM_BUFFER_MAX", 4096, 1073741824, &stream_buffer) ||
	    !env_int("DAYBOOK_STREAM_KEEPALIVE_MS", 100, 15000, &keepalive_ms) ||
	    !env_int("DAYBOOK_QUERY_CACHE_BYTES", 0, 1L << 40, &cache_bytes) ||
	    !env_int("DAYBOOK_QUERY_CACHE_LEASE_MS", 1, 3600000, &cache_lease_ms))
		return 2;
	ctx->max_waiters = (size_t)max_waiters;
	ctx->probe_interval = (double)probe_ms / 1e3;
	ctx->max_streams = streams_within_descriptors(ctx, (size_t)max_streams);
	ctx->stream_buffer_max = (size_t)stream_buffer;
	ctx->stream_keepalive = (double)keepalive_ms / 1e3;
	ctx->nworkers = worker_count();
	ctx->cache_bytes = (size_t)cache_bytes / (size_t)ctx->nworkers; /* each its share */
	ctx->cache_lease = (double)cache_lease_ms / 1e3;
	/* Before the first event base: bases made afterwards lock for other threads. */
	if (evthread_use_pthreads() != 0) {
		fprintf(stderr, "daybook-query: cannot set up the event loop\n");
		return 1;
	}
	return -1;
}

/* Start every worker; worker 0 (svc) runs on the calling thread afterwards. */
static int start(struct service_ctx *svc)
{
	struct query_ctx *w = SERVICE_CTX_OF(struct query_ctx, svc)->workers;
	int n = w[0].nworkers, started = 1;
	sigset_t block, old;
	int rc = 0;

	/* Each further worker starts as a copy of worker 0's settings, on its own loop. */
	for (int i = 1; i < n; i++) {
		w[i] = w[0];
		w[i].base = service_event_base_new();
	}
	for (int i = 0; i < n && rc == 0; i++)
		rc = w[i].base ? start_worker(&w[i]) : 1;
	if (rc)
		return rc;
	/* Signals belong to worker 0's loop: the other threads never see them. */
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	for (; started < n; started++) {
		if (pthread_create(&w[started].thread, NULL, run_worker, &w[started]) != 0)
			break;
		w[started].threaded = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	log_info(&w[0].log, "listening on %s:%u with %d worker(s)", w[0].cfg.listen_host,
		 w[0].cfg.listen_port, started);
	return started == n ? 0 : 1;
}

/* After worker 0's loop: the other workers end theirs (told to, unless the signal
 * already did), then every worker closes. */
static void stop(struct service_ctx *svc)
{
	struct query_ctx *w = SERVICE_CTX_OF(struct query_ctx, svc)->workers;

	for (int i = 1; i < w[0].nworkers; i++) {
		if (!w[i].threaded)
			continue;
		if (!w[0].stopping)
			event_active(w[i].stop_event, EV_READ, 0);
		pthread_join(w[i].thread, NULL);
	}
	for (int i = 0; i < w[0].nworkers; i++) {
		stop_worker(&w[i]);
		if (i > 0 && w[i].base)
			event_base_free(w[i].base);
	}
}

static const struct service_def service = {
	.name = "daybook-query",
	.log_name = "query",
	.usage = usage,
	.need = CONFIG_NEED_PG | CONFIG_NEED_REDIS | CONFIG_NEED_TOKENS,
	.default_listen = "127.0.0.1:8082",
	.stopping = "no longer accepting; finishing requests in flight",
	.configure = configure,
	.start = start,
	.on_stop = on_stop,
	.stop = stop,
};

int main(int argc, char **argv)
{
	static struct query_ctx w[MAX_WORKERS];
	atomic_size_t waiters = 0, streams = 0;

	w[0] = (struct query_ctx){ .workers = w, .waiters = &waiters, .streams = &streams };
	return service_run(argc, argv, &service, &w[0].svc);
}
