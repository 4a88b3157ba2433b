/* daybook-query's event feed: GET /events (paged, filtered, long-poll) and
 * GET /events/stream (Server-Sent Events), both in reader order, gap-safe like the
 * projector, served by one PostgreSQL connection and one shared live reader per worker. */
#ifndef DAYBOOK_QUERY_FEED_H
#define DAYBOOK_QUERY_FEED_H

#include <stdbool.h>
#include <stddef.h>

struct query_ctx;
struct http_request;
struct feed;

#define FEED_MAX_STREAMS_DEFAULT 1000
#define FEED_STREAM_BUFFER_DEFAULT (1024 * 1024)
#define FEED_KEEPALIVE_MS_DEFAULT 10000

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
