/* daybook-query's event feed: GET /events (paged, filtered, long-poll) and
 * GET /events/stream (Server-Sent Events), both in reader order, gap-safe like the
 * projector, served by one PostgreSQL connection and one shared live reader per worker. */
#ifndef DAYBOOK_QUERY_FEED_H
#define DAYBOOK_QUERY_FEED_H

#include <stdbool.h>
#include <stddef.h>

#include "readmodel.h"

struct query_ctx;
struct http_request;
struct feed;

#define FEED_MAX_STREAMS_DEFAULT 1000
#define FEED_STREAM_BUFFER_DEFAULT (1024 * 1024)
#define FEED_KEEPALIVE_MS_DEFAULT 10000

/* One page (prepared as feed_page; here for the plan test): the horizon in every row
 * (columns 0, 1), then per event its txid, position, type, stream and the event object
 * as JSON text, built by PostgreSQL (one row with NULL events when none). $1.$2 is the
 * position after which to read, $3 the limit; $4 (text[]) and $5 filter when not NULL.
 * Stream names and types need no escaping: the event store's CHECKs allow no quote.
 *
 * The xmin is read once (x) and used as a scalar subquery, never joined: then both
 * bounds, (txid, position) > after and txid < xmin, are index conditions of one scan
 * of events_txid_position in reader order, and a page reads at most $3 events
 * whatever the statistics say. Joined to x (as it once was), the bound could reach
 * the index only through a nested loop with x outside, which loses the order: with
 * the cursor in a large transaction that ANALYZE saw as the newest, the planner
 * expected a handful of rows after it, chose that loop and a sort, and every page
 * read the whole rest of the log (docs/performance.md, "The feed's page plan").
 * FEED_SQL_EVENT_JSON is the event (alias e) as the feed's JSON object. */
#define FEED_SQL_EVENT_JSON                                                                        \
	"'{\"position\":\"' || e.txid::text || '.' || e.position"                                  \
	" || '\",\"stream\":\"' || e.stream || '\",\"version\":' || e.version"                     \
	" || ',\"type\":\"' || e.type || '\",\"data\":' || e.data::text"                           \
	" || ',\"metadata\":' || e.metadata::text"                                                 \
	" || ',\"recorded_at\":\"' || " READMODEL_SQL_TIME("e.recorded_at") " || '\"}'"
#define FEED_SQL_PAGE_HEAD_                                                                        \
	"WITH x AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),"         \
	" head AS (SELECT e.txid, e.position FROM events e WHERE e.txid < (SELECT xmin FROM x)"    \
	" ORDER BY e.txid DESC, e.position DESC LIMIT 1)"                                          \
	" SELECT coalesce((SELECT txid::text FROM head), '0'),"                                    \
	" coalesce((SELECT position FROM head), 0),"                                               \
	" p.txid::text, p.position, p.type, p.stream, p.j"                                         \
	" FROM (SELECT 1) one LEFT JOIN LATERAL ("                                                 \
	"SELECT e.txid, e.position, e.type, e.stream, "
#define FEED_SQL_PAGE_FROM_                                                                        \
	" FROM events e WHERE (e.txid, e.position) > ($1::xid8, $2::bigint)"                       \
	" AND e.txid < (SELECT xmin FROM x)"
#define FEED_SQL_PAGE_TAIL_                                                                        \
	" ORDER BY e.txid, e.position LIMIT $3::integer) p ON true ORDER BY p.txid, p.position"
#define FEED_SQL_PAGE                                                                              \
	FEED_SQL_PAGE_HEAD_ FEED_SQL_EVENT_JSON                                                    \
		" AS j" FEED_SQL_PAGE_FROM_                                                        \
		" AND ($4::text[] IS NULL OR e.type = ANY ($4::text[]))"                           \
		" AND ($5::text IS NULL OR e.stream = $5::text)" FEED_SQL_PAGE_TAIL_

/* The live reader's read (prepared as feed_live): FEED_SQL_PAGE's rows with no filter
 * in the scan (the same plan, the same next_after), but PostgreSQL builds the event
 * object only for events that pass $4 (types) and $5 (a text[] of stream names): the
 * union of the filters of the worker's streams. The others come back with a NULL
 * object, which no stream of the worker follows; the JSON, to_char of recorded_at most
 * of all, is most of a read's cost. */
#define FEED_SQL_LIVE                                                                              \
	FEED_SQL_PAGE_HEAD_                                                                        \
	"CASE WHEN ($4::text[] IS NULL OR e.type = ANY ($4::text[]))"                              \
	" AND ($5::text[] IS NULL OR e.stream = ANY ($5::text[])) THEN " FEED_SQL_EVENT_JSON       \
	" END AS j" FEED_SQL_PAGE_FROM_ FEED_SQL_PAGE_TAIL_

/* One worker's feed, on ctx's loop and waiting room (ctx->waits must outlive it).
 * Close with feed_close. */
int feed_open(struct feed **out, struct query_ctx *ctx) __attribute__((warn_unused_result));
/* Shutting down: answer every waiting long-poll now and end every stream. */
void feed_stop(struct feed *feed);
void feed_close(struct feed **feed);
/* The feed's PostgreSQL connection is up (for /readyz), and its last error. */
bool feed_connected(const struct feed *feed);
const char *feed_last_error(const struct feed *feed);
/* Open streams in this worker. */
size_t feed_streams(const struct feed *feed);

/* The routes (arg: the worker's query_ctx). */
void feed_get_events(struct http_request *req, void *arg);
void feed_get_stream(struct http_request *req, void *arg);

#endif
