/* daybook-query's read cache: rendered bodies of this worker's Redis reads, kept
 * coherent by Redis's client-side caching (CLIENT TRACKING, invalidations redirected to
 * a subscriber connection), bounded in bytes, and served only under a short lease
 * (docs/query-api.md, "Read cache"). */
#ifndef DAYBOOK_QUERY_CACHE_H
#define DAYBOOK_QUERY_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"
#include "metrics.h"
#include "readmodel.h"
#include "redis.h"

#define CACHE_POSITION_MAX 48 /* "<txid>.<position>" of two uint64, plus NUL */

struct cache;

struct cache_config {
	size_t max_bytes; /* this worker's share of the cap; 0: the cache is off */
	double lease;     /* seconds an entry may be served after the channel was last proven */
	/* The connection whose reads are tracked (the caller's; it must outlive the cache
	 * and call cache_reads_ready from its on_ready), and the script on it that answers
	 * {checkpoint} of the live generation given the store's identity. */
	struct redis *reads;
	size_t checkpoint_script;
	/* For the cache's own connection, subscribed to __redis__:invalidate. */
	const struct config_redis *server;
	struct event_base *base;
	double connect_timeout;
	struct metrics *metrics;
	const struct log *log;
};

/* A cached answer; valid until the next call into the cache. */
struct cache_hit {
	const char *body;
	size_t len;
	const char *etag;     /* quoted, or NULL */
	const char *position; /* X-Daybook-Position: the body reflects every event up to it */
};

/* Opens the invalidation subscriber. Caller closes, after closing cfg->reads (whose
 * pending heartbeat reads call back into the cache). */
int cache_open(struct cache **out, const struct cache_config *cfg)
	__attribute__((warn_unused_result));
void cache_close(struct cache **c);

/* The answer for `key` (the key's name after "dbk:g:<g>:", e.g. "acct:alice"), if it
 * may be served: the channel is up and was proven within the lease, the entry was read
 * for this event store (identity) and reflects at least *min (when min is not NULL).
 * False otherwise: read Redis (see cache_ticket). */
bool cache_get(struct cache *c, const char *key, const char *identity,
	       const struct readmodel_position *min, struct cache_hit *out);

/* Before sending a Redis read of `key` for this event store: its ticket, for cache_fill
 * with the answer, and in *gen the generation whose keys the read must declare (the
 * live pointer, "dbk:g:<gen>:identity", "dbk:g:<gen>:<key>": Redis tracks declared
 * keys only); valid until the next call into the cache. 0 when the answer may not be
 * cached (the cache is off, not coherent now, or does not know the generation yet). */
uint64_t cache_ticket(struct cache *c, const char *key, const char *identity, const char **gen);
/* The answer of a read that took `ticket`, read at checkpoint `at`: kept unless the key
 * was invalidated (or the cache dropped) since the ticket was taken. etag unquoted, may
 * be NULL. */
void cache_fill(struct cache *c, uint64_t ticket, const char *key, const char *body, size_t len,
		const char *etag, const struct readmodel_position *at);

/* "<txid>.<position>" of `at` into out, without printf. */
void cache_position_text(char out[CACHE_POSITION_MAX], const struct readmodel_position *at);

/* The tracked connection (re)connected: drop every entry and turn tracking on again. */
void cache_reads_ready(struct cache *c);

#endif
