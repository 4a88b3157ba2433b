/* daybook-query's read cache (cache.h): bodies read from Redis, kept until Redis says
 * their key changed.
 *
 * Coherence. The read connection runs CLIENT TRACKING with REDIRECT to the cache's own
 * connection, subscribed to __redis__:invalidate: Redis remembers the keys a read
 * declared and sends an invalidation there at the first change of each after the read
 * (a FLUSHALL or FLUSHDB sends one for every key). Redis 7.0 tracks only the keys a
 * script call declares, not those the script reaches by itself, so the reads that fill
 * the cache, and the heartbeat, declare the live pointer and the generation's keys they
 * read (the generation as the last heartbeat found it live; a read for another
 * generation is not kept). The live pointer and the identity changing, a flush, an
 * unknown key or either connection reconnecting drop everything, generation included.
 *
 * Races. Replies and invalidations travel on two connections, so their order is lost:
 *  - A fill: the read takes a ticket (the stamp of the key's slot, made if need be)
 *    before it is sent; an invalidation of the key removes the slot; the answer is kept
 *    only if the slot is still the ticket's. An invalidation for a change after the read
 *    arrives after the ticket was taken, so it either removes the slot before the answer
 *    (not kept) or the entry after it.
 *  - The lease and the position: a heartbeat reads the live checkpoint C on the read
 *    connection (sent at S), then, once answered, sends a barrier on the invalidation
 *    connection (redis_barrier). When the barrier is answered, every invalidation for a
 *    change made before the checkpoint read has arrived, and the read connection was
 *    still tracked then: each entry still here reflects at least C, and nothing it
 *    missed is older than S. Entries are served until S + lease, with the position
 *    max(C, the checkpoint they were read at).
 * Entries are served only while both connections are up, tracking is on for the current
 * pair of connections, and the lease runs; a heartbeat starts when a lookup finds a
 * quarter of the lease gone. */
#include "cache.h"
#include "clock.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http.h"
#include "strmap.h"

#define INVALIDATE_CHANNEL "__redis__:invalidate"
#define BEATS_MAX 4 /* heartbeats in flight at once */

/* Is key name `name` ("<kind>:<id>") one of `kind`'s? */
static bool is_kind(const char *name, const char *kind)
{
	size_t n = strlen(kind);

	return strncmp(name, kind, n) == 0 && name[n] == ':';
}

/* One key's slot: an entry, or a read on its way (body NULL). */
struct entry {
	struct entry *prev, *next; /* most recently used first */
	uint64_t stamp;
	size_t bytes;
	char *body;
	size_t len;
	char etag[24];
	struct readmodel_position at;
	char position[CACHE_POSITION_MAX];
	char key[];
};

/* A heartbeat whose checkpoint has been read, waiting for its barrier. */
struct beat {
	double sent;    /* when its checkpoint read was sent */
	uint64_t drops; /* c->drops then: a drop since voids it */
	bool have;      /* `at` was read (else only the lease moves) */
	struct readmodel_position at;
};

struct cache {
	struct cache_config cfg;
	/* The invalidation subscriber, on the server the read connection reached last: a
	 * redirect names a client id of that server (ids are per server). */
	struct redis *inval;
	struct config_redis inval_server;
	struct strmap *map;
	struct entry *head, *tail;
	size_t bytes;
	uint64_t next_stamp;
	uint64_t drops; /* every drop of everything */
	char identity[READMODEL_IDENTITY_MAX];
	char gen[24]; /* the live generation the entries are of, "" unknown */
	/* Tracking: on for the current read connection, redirected to this client id,
	 * once every CLIENT TRACKING asked has answered. */
	bool tracking;
	long long tracking_to;
	int tracking_asked;
	/* The lease and the position every entry reflects at least. */
	double lease_from;
	bool have_floor;
	struct readmodel_position floor;
	char floor_text[CACHE_POSITION_MAX];
	/* Heartbeats: one checkpoint read at a time, then barriers in flight, in order. */
	bool reading;
	double reading_sent;
	uint64_t reading_drops;
	struct beat beats[BEATS_MAX];
	size_t nbeats;
	struct metric *m_hit, *m_miss, *m_lease_out, *m_bytes, *m_evicted, *m_drops[5];
};

enum drop_reason { DROP_CONNECTION, DROP_FLUSH, DROP_GENERATION, DROP_IDENTITY, DROP_COUNT };
static const char *const drop_names[] = { "connection", "flush", "generation", "identity" };

static void unlink_entry(struct cache *c, struct entry *e)
{
	if (e->prev)
		e->prev->next = e->next;
	else
		c->head = e->next;
	if (e->next)
		e->next->prev = e->prev;
	else
		c->tail = e->prev;
	e->prev = e->next = NULL;
}

static void push_front(struct cache *c, struct entry *e)
{
	e->prev = NULL;
	e->next = c->head;
	if (c->head)
		c->head->prev = e;
	c->head = e;
	if (!c->tail)
		c->tail = e;
}

static void free_entry(void *v)
{
	struct entry *e = v;

	free(e->body);
	free(e);
}

static void account(struct cache *c, struct entry *e, size_t bytes)
{
	c->bytes = c->bytes - e->bytes + bytes;
	metric_add(c->m_bytes, (double)bytes - (double)e->bytes);
	e->bytes = bytes;
}

static void remove_entry(struct cache *c, struct entry *e)
{
	unlink_entry(c, e);
	account(c, e, 0);
	strmap_remove(c->map, e->key); /* frees e */
}

/* Forget everything: entries, slots of reads on their way, the lease, the position. */
static void drop_all(struct cache *c, enum drop_reason why)
{
	if (c->head || c->have_floor)
		metric_add(c->m_drops[why], 1);
	strmap_clear(c->map);
	metric_add(c->m_bytes, -(double)c->bytes);
	c->head = c->tail = NULL;
	c->bytes = 0;
	c->drops++;
	c->lease_from = 0;
	c->have_floor = false;
	c->gen[0] = '\0'; /* no fills until a heartbeat has read the live generation */
	/* Heartbeats in flight stay queued (their answers come in order) but are void. */
}

static void evict(struct cache *c)
{
	while (c->bytes > c->cfg.max_bytes && c->tail) {
		metric_add(c->m_evicted, 1);
		remove_entry(c, c->tail);
	}
}

static bool same_server(const struct config_redis *a, const struct config_redis *b)
{
	return a && b && a->port == b->port && strcmp(a->host, b->host) == 0 &&
	       strcmp(a->path, b->path) == 0;
}

static bool coherent(const struct cache *c)
{
	return c->map && c->tracking && c->inval && redis_connected(c->inval) &&
	       redis_client_id(c->inval) == c->tracking_to &&
	       same_server(redis_server(c->cfg.reads), redis_server(c->inval));
}

/* A lookup or ticket for another event store than the entries': they go. */
static void check_identity(struct cache *c, const char *identity)
{
	if (strcmp(c->identity, identity) == 0)
		return;
	drop_all(c, DROP_IDENTITY);
	snprintf(c->identity, sizeof(c->identity), "%s", identity);
}

void cache_position_text(char out[CACHE_POSITION_MAX], const struct readmodel_position *at)
{
	size_t n = http_format_u64(out, (unsigned long long)at->txid);

	out[n++] = '.';
	http_format_u64(out + n, (unsigned long long)at->position);
}

/* --- heartbeats ------------------------------------------------------------------- */

/* The heartbeat's answer {checkpoint, generation} ({} without a usable model): a new
 * live generation drops the entries of the old one; then the barrier. */
static void on_heartbeat_read(void *arg, const redisReply *rep)
{
	struct cache *c = arg;
	struct beat b = { .sent = c->reading_sent, .drops = c->reading_drops };
	const redisReply *cp, *g;
	char token[CACHE_POSITION_MAX];

	c->reading = false;
	if (!rep || rep->type != REDIS_REPLY_ARRAY || c->drops != b.drops)
		return;
	if (rep->elements < 2 || (cp = rep->element[0])->type != REDIS_REPLY_STRING ||
	    (g = rep->element[1])->type != REDIS_REPLY_STRING || g->len >= sizeof(c->gen) ||
	    cp->len >= sizeof(token)) {
		drop_all(c, DROP_GENERATION); /* no usable model */
		return;
	}
	if (c->gen[0] && (strlen(c->gen) != g->len || memcmp(c->gen, g->str, g->len) != 0))
		drop_all(c, DROP_GENERATION);
	memcpy(c->gen, g->str, g->len);
	c->gen[g->len] = '\0';
	memcpy(token, cp->str, cp->len);
	token[cp->len] = '\0';
	b.have = readmodel_position_parse(token, &b.at);
	b.drops = c->drops;
	if (c->nbeats >= BEATS_MAX || !redis_barrier(c->inval))
		return;
	c->beats[c->nbeats++] = b;
}

static void heartbeat(struct cache *c)
{
	char identity_key[48], checkpoint_key[48];
	const char *argv[4] = { READMODEL_LIVE_KEY, identity_key, checkpoint_key, c->identity };
	int nkeys = 3;

	if (c->reading || c->nbeats >= BEATS_MAX || !coherent(c))
		return;
	if (c->gen[0]) {
		readmodel_key_text(identity_key, sizeof(identity_key), c->gen,
				   READMODEL_KIND_IDENTITY, NULL);
		readmodel_key_text(checkpoint_key, sizeof(checkpoint_key), c->gen,
				   READMODEL_KIND_CHECKPOINT, NULL);
	} else {
		argv[1] = c->identity; /* the live pointer alone until the generation is known */
		nkeys = 1;
	}
	c->reading_sent = mono_now();
	c->reading_drops = c->drops;
	c->reading = redis_eval(c->cfg.reads, c->cfg.checkpoint_script, nkeys, nkeys + 1, argv,
				NULL, on_heartbeat_read, c);
}

static void on_barrier(void *arg)
{
	struct cache *c = arg;
	struct beat b;

	if (c->nbeats == 0)
		return;
	b = c->beats[0];
	memmove(c->beats, c->beats + 1, (c->nbeats - 1) * sizeof(c->beats[0]));
	c->nbeats--;
	if (b.drops != c->drops)
		return;
	if (b.sent > c->lease_from)
		c->lease_from = b.sent;
	if (b.have && (!c->have_floor || readmodel_position_cmp(&b.at, &c->floor) > 0)) {
		c->floor = b.at;
		c->have_floor = true;
		cache_position_text(c->floor_text, &b.at);
	}
}

/* --- invalidations and tracking ---------------------------------------------------- */

/* One invalidated key: its entry goes; the live pointer, an identity or anything
 * unknown takes everything with it. A generation's checkpoint moves with every batch
 * and is only a lower bound here; its statements are not cached. */
static void invalidate(struct cache *c, const char *key, size_t len)
{
	char name[256];
	size_t at = sizeof(READMODEL_GEN_PREFIX) - 1;
	struct entry *e;

	if (len < at || memcmp(key, READMODEL_GEN_PREFIX, at) != 0) {
		drop_all(c, DROP_GENERATION); /* dbk:live:2, or a key we never read */
		return;
	}
	while (at < len && key[at] >= '0' && key[at] <= '9')
		at++;
	if (at >= len || key[at] != ':' || len - at - 1 >= sizeof(name)) {
		drop_all(c, DROP_GENERATION);
		return;
	}
	memcpy(name, key + at + 1, len - at - 1);
	name[len - at - 1] = '\0';
	if (strcmp(name, READMODEL_KIND_CHECKPOINT) == 0 || is_kind(name, READMODEL_KIND_STATEMENT))
		return;
	if (!is_kind(name, READMODEL_KIND_ACCOUNT) && !is_kind(name, READMODEL_KIND_TRANSFER) &&
	    strcmp(name, READMODEL_KIND_TOTALS) != 0) {
		drop_all(c, DROP_GENERATION); /* identity, layout, ... */
		return;
	}
	if ((e = strmap_get(c->map, name)))
		remove_entry(c, e);
}

static void on_invalidate(void *arg, const redisReply *payload)
{
	struct cache *c = arg;

	if (payload->type != REDIS_REPLY_ARRAY) { /* nil: FLUSHALL, FLUSHDB */
		drop_all(c, DROP_FLUSH);
		return;
	}
	for (size_t i = 0; i < payload->elements; i++) {
		const redisReply *k = payload->element[i];
		if (k->type == REDIS_REPLY_STRING)
			invalidate(c, k->str, k->len);
		else
			drop_all(c, DROP_GENERATION);
	}
}

static void on_tracking(void *arg, const redisReply *rep)
{
	struct cache *c = arg;

	c->tracking_asked--;
	if (!rep)
		return; /* the connection was lost: its on_ready asks again */
	if (rep->type == REDIS_REPLY_ERROR) {
		log_warn(c->cfg.log, "redis: CLIENT TRACKING refused (%s): reads are not cached",
			 rep->str);
		return;
	}
	if (c->tracking_asked > 0)
		return; /* a later request (another redirect) is still on its way */
	c->tracking = true;
	heartbeat(c);
}

/* Either connection is new: nothing read before may be served; ask for tracking again. */
static void restart(struct cache *c)
{
	char id[24];
	const char *argv[] = { "CLIENT", "TRACKING", "on", "REDIRECT", id };

	drop_all(c, DROP_CONNECTION);
	c->tracking = false;
	c->tracking_to = c->inval ? redis_client_id(c->inval) : 0;
	if (!c->tracking_to || !redis_connected(c->cfg.reads))
		return;
	snprintf(id, sizeof(id), "%lld", c->tracking_to);
	if (redis_command(c->cfg.reads, 5, argv, NULL, on_tracking, c))
		c->tracking_asked++;
	else
		c->tracking_to = 0;
}

static void on_inval_ready(void *arg)
{
	struct cache *c = arg;

	c->nbeats = 0; /* the barriers of the lost connection never answer */
	restart(c);
}

/* (Re)open the invalidation subscriber on the server the read connection is on now. */
static int open_inval(struct cache *c, const struct config_redis *server)
{
	struct redis_config rc = {
		.server = &c->inval_server,
		.name = "daybook-query-invalidations",
		.base = c->cfg.base,
		.log = c->cfg.log,
		.subscribe = INVALIDATE_CHANNEL,
		.on_payload = on_invalidate,
		.on_barrier = on_barrier,
		.client_id = true,
		.connect_timeout = c->cfg.connect_timeout,
		.on_ready = on_inval_ready,
		.arg = c,
	};

	redis_close(&c->inval);
	c->nbeats = 0;
	c->inval_server = *server;
	c->inval_server.sentinels[0] = '\0'; /* that server itself, found already */
	c->inval_server.master[0] = '\0';
	return redis_open(&c->inval, &rc);
}

void cache_reads_ready(struct cache *c)
{
	const struct config_redis *server;

	if (!c || !c->map)
		return;
	server = redis_server(c->cfg.reads);
	if (server && !same_server(server, &c->inval_server) && open_inval(c, server))
		log_error(c->cfg.log, "redis: cannot open the read cache's connection: reads are "
				      "not cached");
	restart(c);
}

/* --- lookups and fills -------------------------------------------------------------- */

bool cache_get(struct cache *c, const char *key, const char *identity,
	       const struct readmodel_position *min, struct cache_hit *out)
{
	struct entry *e;
	double t;

	if (!c->map)
		return false;
	check_identity(c, identity);
	if (!coherent(c)) {
		metric_add(c->m_miss, 1);
		return false;
	}
	t = mono_now();
	if (t - c->lease_from > c->cfg.lease / 4)
		heartbeat(c);
	e = strmap_get(c->map, key);
	if (e && e->body && t - c->lease_from > c->cfg.lease)
		metric_add(c->m_lease_out, 1); /* held, but the channel not proven lately */
	if (!e || !e->body || t - c->lease_from > c->cfg.lease ||
	    (min && readmodel_position_cmp(&e->at, min) < 0 &&
	     (!c->have_floor || readmodel_position_cmp(&c->floor, min) < 0))) {
		metric_add(c->m_miss, 1);
		return false;
	}
	if (e != c->head) {
		unlink_entry(c, e);
		push_front(c, e);
	}
	out->body = e->body;
	out->len = e->len;
	out->etag = e->etag[0] ? e->etag : NULL;
	out->position = c->have_floor && readmodel_position_cmp(&c->floor, &e->at) > 0
				? c->floor_text
				: e->position;
	metric_add(c->m_hit, 1);
	return true;
}

uint64_t cache_ticket(struct cache *c, const char *key, const char *identity, const char **gen)
{
	size_t klen = strlen(key);
	struct entry *e;

	if (!c->map)
		return 0;
	check_identity(c, identity);
	if (!coherent(c))
		return 0;
	if (!c->gen[0]) {
		heartbeat(c);
		return 0;
	}
	*gen = c->gen;
	if ((e = strmap_get(c->map, key)))
		return e->stamp;
	if (!(e = calloc(1, sizeof(*e) + klen + 1)))
		return 0;
	memcpy(e->key, key, klen + 1);
	e->stamp = ++c->next_stamp;
	if (!strmap_put(c->map, key, e)) {
		free(e);
		return 0;
	}
	push_front(c, e);
	account(c, e, sizeof(*e) + 2 * (klen + 1) + 32); /* the map's copy and node too */
	evict(c);
	return strmap_get(c->map, key) ? e->stamp : 0;
}

void cache_fill(struct cache *c, uint64_t ticket, const char *key, const char *body, size_t len,
		const char *etag, const struct readmodel_position *at)
{
	struct entry *e;
	char *copy;

	if (!ticket || !c->map || !(e = strmap_get(c->map, key)) || e->stamp != ticket)
		return;
	if (e->body && readmodel_position_cmp(&e->at, at) > 0)
		return;
	if (!(copy = malloc(len ? len : 1)))
		return;
	memcpy(copy, body, len);
	free(e->body);
	e->body = copy;
	e->len = len;
	e->at = *at;
	cache_position_text(e->position, at);
	if (etag)
		snprintf(e->etag, sizeof(e->etag), "\"%.20s\"", etag);
	else
		e->etag[0] = '\0';
	account(c, e, sizeof(*e) + 2 * (strlen(key) + 1) + 32 + len);
	evict(c);
}

/* --- opening and closing ------------------------------------------------------------ */

int cache_open(struct cache **out, const struct cache_config *cfg)
{
	struct cache *c = calloc(1, sizeof(*c));
	char labels[48];

	*out = NULL;
	if (!c)
		return -1;
	c->cfg = *cfg;
	c->m_hit = metrics_get(cfg->metrics, METRIC_COUNTER, "daybook_query_reads_total",
			       "Reads answered, by the model that answered.", "model=\"cache\"",
			       NULL, 0);
	c->m_miss = metrics_get(cfg->metrics, METRIC_COUNTER, "daybook_query_cache_misses_total",
				"Cacheable reads the read cache could not answer.", "", NULL, 0);
	c->m_lease_out = metrics_get(cfg->metrics, METRIC_COUNTER,
				     "daybook_query_cache_lease_expired_total",
				     "Cache misses of entries held whose lease had run out.", "",
				     NULL, 0);
	c->m_bytes = metrics_get(cfg->metrics, METRIC_GAUGE, "daybook_query_cache_bytes",
				 "Bytes held by the read caches of all workers.", "", NULL, 0);
	c->m_evicted = metrics_get(cfg->metrics, METRIC_COUNTER,
				   "daybook_query_cache_evictions_total",
				   "Read cache entries evicted to stay within the cap.", "", NULL,
				   0);
	for (size_t i = 0; i < DROP_COUNT; i++) {
		snprintf(labels, sizeof(labels), "reason=\"%s\"", drop_names[i]);
		c->m_drops[i] = metrics_get(cfg->metrics, METRIC_COUNTER,
					    "daybook_query_cache_drops_total",
					    "Times the read cache dropped every entry, by reason.",
					    labels, NULL, 0);
	}
	if (cfg->max_bytes == 0) {
		*out = c; /* off: every lookup misses, nothing is connected */
		return 0;
	}
	/* With Sentinel discovery it follows the read connection (cache_reads_ready). */
	if (strmap_open(&c->map, free_entry) ||
	    (!cfg->server->master[0] && open_inval(c, cfg->server))) {
		cache_close(&c);
		return -1;
	}
	*out = c;
	return 0;
}

void cache_close(struct cache **cp)
{
	struct cache *c = *cp;

	if (!c)
		return;
	redis_close(&c->inval);
	if (c->map) {
		metric_add(c->m_bytes, -(double)c->bytes);
		strmap_close(&c->map);
	}
	free(c);
	*cp = NULL;
}
