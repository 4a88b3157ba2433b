/* daybook-query: the process context, one read request's state, and the modules. */
#ifndef DAYBOOK_QUERY_H
#define DAYBOOK_QUERY_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "config.h"
#include "feed.h"
#include "http.h"
#include "ledger.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "readmodel.h"
#include "redis.h"
#include "service.h"
#include "tokens.h"
#include "wait.h"

#define QUERY_POSITION_MAX 48 /* "<txid>.<position>" of two uint64, plus NUL */

/* An SQL fragment the statements share (sql.c, timetravel.c): the event store's
 * readable head (the last event below the snapshot's xmin: everything up to it is
 * committed and visible). Times are READMODEL_SQL_TIME (readmodel.h). */
#define QUERY_SQL_LOG_HEAD                                                                         \
	"SELECT txid, position FROM events WHERE txid < pg_snapshot_xmin(pg_current_snapshot())"   \
	" ORDER BY txid DESC, position DESC LIMIT 1"

/* A position token of `len` bytes (not NUL-terminated), as readmodel_position_parse
 * reads a string; false when malformed. */
bool query_position_parse_n(const char *text, size_t len, struct readmodel_position *out)
	__attribute__((warn_unused_result));

/* Why a Redis-capable read was answered from SQL (the label of the fallback counter). */
enum fallback {
	FALLBACK_UNAVAILABLE, /* not connected, timed out, or an error reply */
	FALLBACK_NO_LIVE,     /* no live generation (or it has no checkpoint) */
	FALLBACK_MISS,        /* the key is not in the live generation */
	FALLBACK_BEHIND,      /* Redis has not reached min_position */
	FALLBACK_NOT_CACHED,  /* a statement page beyond Redis's newest entries */
	FALLBACK_COUNT,
};

struct sqlpool;
struct read;

/* A time-travel read's point and progress (timetravel.c). */
struct timetravel {
	bool statement;                  /* the statement (transactions), not the account */
	struct readmodel_position as_of; /* READ_TT_AS_OF */
	char at[READMODEL_TIME_LEN];     /* READ_TT_AT: the time, as the read models write it */
	/* READ_TT_AT: the newest transaction that may still hold an event recorded at or
	 * before `at` ("0" until known). */
	char inflight[24];
	int32_t snapshots_below; /* use snapshots up to this version (a newer one was refused) */
	int poll_ms;             /* READ_TT_AT: the next look while it is not yet stable */
};

struct query_ctx {
	/* cfg, log, base, metrics, tokens, http, stopping (shared/service.h): every worker
	 * has its own loop; the tokens and metrics are worker 0's, shared. */
	SERVICE_CTX_HEAD;
	struct redis *redis;      /* the read connection */
	struct redis *subscriber; /* dbk:position, to wake waiting reads; open while wanted */
	bool subscriber_wanted;   /* a waiter could be woken by its messages */
	struct event *subscriber_linger; /* closes it a moment after it is no longer wanted */
	struct cache *cache;             /* rendered bodies of Redis reads (cache.c) */
	struct sqlpool *sql;
	struct waitset *waits;  /* reads waiting for a projection to reach min_position */
	size_t max_waiters;     /* DAYBOOK_MAX_WAITERS, for all workers together */
	atomic_size_t *waiters; /* how many wait now, in all workers (main's) */
	double probe_interval;  /* DAYBOOK_WAIT_PROBE_MS, in seconds */
	struct metric *fallbacks[FALLBACK_COUNT];
	struct metric *served_redis, *served_sql;
	struct event *drain_timer;
	/* Workers: each thread runs its own ctx and loop on the shared port. */
	struct event *stop_event;  /* made active by the signal-handling worker */
	struct event *ready_timer; /* refreshes `up` for the others' /readyz */
	atomic_bool up;            /* SQL reachable and not stopping */
	struct query_ctx *workers; /* all of them (ctx of worker i at workers + i) */
	int nworkers;
	pthread_t thread; /* worker i > 0: its thread, when `threaded` */
	bool threaded;
	/* The event feed (feed.c): this worker's reader and streams. */
	struct feed *feed;
	size_t max_streams;       /* DAYBOOK_MAX_STREAMS, for all workers together */
	atomic_size_t *streams;   /* how many are open now, in all workers (main's) */
	size_t stream_buffer_max; /* DAYBOOK_STREAM_BUFFER_MAX: unsent bytes before a cut */
	double stream_keepalive;  /* DAYBOOK_STREAM_KEEPALIVE_MS, in seconds */
	size_t cache_bytes;       /* this worker's share of DAYBOOK_QUERY_CACHE_BYTES */
	double cache_lease;       /* DAYBOOK_QUERY_CACHE_LEASE_MS, in seconds */
};

enum read_kind {
	READ_ACCOUNT,
	READ_TRANSACTIONS,
	READ_TRANSFER,
	READ_TOTALS,
	READ_EVENTS,
	READ_PROBE,    /* internal: the SQL checkpoint and the log head, for waiting reads */
	READ_TT_AS_OF, /* an account or its statement as of a position token (timetravel.c) */
	READ_TT_AT,    /* the same at a time */
};
#define READ_KINDS (READ_TT_AT + 1)

/* One read request, from its parsed parameters to its reply. */
struct read {
	struct read *next; /* in the SQL queue or an SQL batch */
	struct query_ctx *ctx;
	struct http_request *req; /* NULL for the internal checkpoint probe */
	enum read_kind kind;
	char id[LEDGER_ID_MAX + 1];
	int limit;
	int before;        /* transactions: 0 when absent */
	int after_version; /* events */
	bool has_min;
	struct readmodel_position min;
	double deadline; /* monotonic seconds: stop waiting for min_position */
	int sql_attempts;
	struct waiter wait;    /* while waiting for min_position */
	uint64_t wait_seq;     /* waitset_seq when the read last started */
	bool redis_cannot;     /* Redis reached min_position but cannot answer this read */
	bool redis_behind;     /* Redis can answer once it reaches min_position */
	bool hinted;           /* woken by a position message's unchecked claim */
	uint64_t cache_ticket; /* cache_ticket before the Redis read, 0: not to be kept */
	struct timetravel tt;  /* READ_TT_*: the point, folded from the event store */
};

/* The SQL side: a small pool of pipelined connections (sql.c). A queued read's
 * outcome comes back through one of two callbacks, each of which takes the read over:
 * its result (valid only during the call), or why it failed, with retry set when the
 * statement did not run to an error of its own (the connection failed, the pipeline
 * was aborted) so that it may be sent again. */
typedef void (*sqlpool_done_cb)(struct read *rd, const PGresult *res);
typedef void (*sqlpool_failed_cb)(struct read *rd, const char *why, bool retry);
/* A kind of read whose statement the pool does not know itself (time travel's): its
 * statement, its parameters (at most SQLPOOL_PARAMS_MAX, as text in buf) and who
 * takes its rows instead of `done`. The pool keeps the pointer: static storage. */
#define SQLPOOL_PARAMS_MAX 6
struct sqlpool_kind {
	enum read_kind kind;
	struct pg_statement statement;
	int (*params)(const struct read *rd, char buf[][80], const char **values);
	sqlpool_done_cb done;
};
/* Fails when memory runs out, a connection cannot be set up, or a kind has no
 * statement (neither the pool's own nor among `kinds`). */
int sqlpool_open(struct sqlpool **out, struct query_ctx *ctx, sqlpool_done_cb done,
		 sqlpool_failed_cb failed, const struct sqlpool_kind *kinds, size_t nkinds)
	__attribute__((warn_unused_result));
void sqlpool_close(struct sqlpool **pool);
/* Some connection is up. */
bool sqlpool_connected(const struct sqlpool *pool);
const char *sqlpool_last_error(const struct sqlpool *pool);
/* Queue the read's statement; its outcome comes back through the pool's callbacks.
 * False when no connection is up (nothing queued). */
bool sqlpool_submit(struct sqlpool *pool, struct read *rd) __attribute__((warn_unused_result));
/* Nothing queued or running. */
bool sqlpool_idle(const struct sqlpool *pool);
/* The event store's identity as read on a connection that is up; with no connection
 * up, the last one read (PostgreSQL unreachable: Redis hits are still served); ""
 * when a connection is up but has not read it yet, or none ever did: then no Redis
 * generation is ours. Borrowed, valid until the next event-loop turn. */
const char *sqlpool_identity(const struct sqlpool *pool);

/* A rendered answer: status, body and the model's position. */
struct answer {
	int status;       /* 200, or 404 with `code` */
	const char *code; /* account_not_found, transfer_not_found */
	char *body;       /* malloc'd JSON, for 200 */
	size_t len;
	char etag[16]; /* the account version, "" when none */
	char position[QUERY_POSITION_MAX];
	struct readmodel_position at;
};

/* render.c: SQL rows and Redis statement items into response bodies. */
/* {"items":[<items>],"next_before":<next>|null}, malloc'd (caller frees), or NULL when
 * out of memory. Both models' statement pages go through it, so they match. */
char *transactions_body(const char *const *items, const size_t *lens, size_t n,
			const char *next_before, size_t *len);
/* Turn the read's SQL result into an answer; false when the result is malformed.
 * The caller frees ans->body. */
bool sql_render(const struct read *rd, const PGresult *res, struct answer *ans)
	__attribute__((warn_unused_result));

/* The log head in a READ_PROBE result (its columns 2 and 3); false when malformed. */
bool sql_probe_head(const PGresult *res, struct readmodel_position *head)
	__attribute__((warn_unused_result));

/* read.c: the read flow. */
/* Start (or restart) a read: Redis first where it can answer, then SQL. Takes
 * ownership of rd: it is answered and freed in the end. */
void read_start(struct read *rd);
/* The SQL pool's callbacks (sqlpool_done_cb, sqlpool_failed_cb), which main wires. */
void read_sql_done(struct read *rd, const PGresult *res);
void read_sql_failed(struct read *rd, const char *why, bool retry);
/* The Lua scripts the read connection loads, and which of them answers {checkpoint}
 * (the cache's heartbeat). */
const char *const *read_scripts(size_t *n);
size_t read_checkpoint_script(void);
/* Set up the waiting room (ctx->waits) and the fallback counters. */
int read_init(struct query_ctx *ctx) __attribute__((warn_unused_result));
void read_fini(struct query_ctx *ctx);

/* read.c's endings of a read, for the reads of timetravel.c; each takes the read. */
/* Free it (after the caller replied). */
void read_finish(struct read *rd);
/* 200 with body (copied), X-Daybook-Position `at`, and ETag when etag is not NULL. */
void read_reply_body(struct read *rd, const struct readmodel_position *at, const char *body,
		     size_t len, const char *etag);
/* 404 account_not_found, X-Daybook-Position `at`. */
void read_reply_not_found(struct read *rd, const struct readmodel_position *at);
/* Wait for rd->min (the event store's readable head, for READ_TT_AS_OF), then start
 * the read again; 503 projection_behind at its deadline. */
void read_wait(struct read *rd);

/* timetravel.c: as_of and at on account reads (SPEC §4.2). */
/* Read `as_of` and `at` into a READ_ACCOUNT or READ_TRANSACTIONS read, making it a
 * READ_TT_* read: 1 when it now is one, 0 when neither is given, -1 after replying 400. */
int timetravel_params(struct http_request *req, struct read *rd)
	__attribute__((warn_unused_result));
/* The SQL pool's kinds READ_TT_AS_OF and READ_TT_AT: their statements, parameters,
 * and the fold of their rows (answer, wait or look again). main.c opens the pool with
 * them, so the pool and read.c never call into timetravel.c. */
#define TIMETRAVEL_PARAMS 6
#define TIMETRAVEL_NKINDS 2
extern const struct sqlpool_kind timetravel_kinds[TIMETRAVEL_NKINDS];

/* The HTTP routes of the read API (routes.c). */
extern const struct http_route query_routes[];
extern const size_t query_nroutes;

#endif
