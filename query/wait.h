/* daybook-query's waiting room: requests waiting for a model to reach a position,
 * woken in position order by the projector's position messages and one shared probe. */
#ifndef DAYBOOK_QUERY_WAIT_H
#define DAYBOOK_QUERY_WAIT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "readmodel.h"

struct event_base;
struct metrics;
struct waitset;

/* What a waiter waits for. */
enum wait_model {
	WAIT_ANY, /* either read model (Redis or SQL) reaching the position */
	WAIT_SQL, /* the SQL read model (Redis reached it but cannot answer) */
	WAIT_LOG, /* the event store's readable head (or the SQL model, which trails it) */
	WAIT_MODELS,
};

/* Where a position comes from. */
enum wait_source {
	WAIT_FROM_REDIS, /* the live Redis generation's checkpoint */
	WAIT_FROM_SQL,   /* projection_checkpoints 'sql' */
	WAIT_FROM_LOG,   /* the last event below pg_snapshot_xmin */
	WAIT_SOURCES,
};

/* One waiter, embedded in the caller's own request state. The caller fills min,
 * deadline, model and wake; the rest is the set's. */
struct waiter {
	struct readmodel_position min;
	double deadline; /* monotonic seconds */
	enum wait_model model;
	/* Called once the waiter has left the set: `expired` at its deadline, otherwise
	 * because its model has reached `min` (look again: a Redis message may come from
	 * a generation that is not live). The waiter may be added again from here. */
	void (*wake)(struct waiter *w, bool expired);
	/* Set while wake runs: woken by a position message's claim (waitset_hint), which
	 * nobody has checked, rather than by a position a model was seen at. */
	bool hinted;
	/* Private to wait.c. */
	struct waiter *next;
	size_t at_pos, at_deadline; /* heap slots */
	bool counted;               /* holds one of the process's places */
};

struct waitset_config {
	struct event_base *base;
	struct metrics *metrics; /* may be NULL */
	size_t max;              /* waiters in all workers together (DAYBOOK_MAX_WAITERS) */
	atomic_size_t *total;    /* the count they share; outlives the set */
	double probe_interval;   /* seconds between safety probes while anyone waits */
	/* Start one checkpoint probe (SQL: the SQL checkpoint and the log head; Redis:
	 * the live checkpoint) and report it with waitset_probed; false when it could not
	 * start. At most one of each is asked for at a time. */
	bool (*probe_sql)(void *arg);
	bool (*probe_redis)(void *arg);
	void *arg;
};

enum wait_add {
	WAIT_ADDED, /* woken later through w->wake */
	WAIT_FULL,  /* the cap is reached (or out of memory, or closed): answer 503 */
	WAIT_AGAIN, /* a position that satisfies it arrived since `seen`: look again now */
};

/* The config's pointers must outlive the set. Close with waitset_close, which wakes
 * every waiter left as expired. The calls below accept a closed (NULL) set: then
 * nothing waits (waitset_add says WAIT_FULL). */
int waitset_open(struct waitset **out, const struct waitset_config *cfg)
	__attribute__((warn_unused_result));
void waitset_close(struct waitset **ws);

/* A counter that moves whenever a position arrives: take it before looking at a
 * model, and pass it to waitset_add, so a message that arrived while the look was in
 * flight is not lost. */
uint64_t waitset_seq(const struct waitset *ws);
/* Put w in the set (not already in it). */
enum wait_add waitset_add(struct waitset *ws, struct waiter *w, uint64_t seen)
	__attribute__((warn_unused_result));
/* The request behind w is finished (answered or gone): give back its place. Call it
 * for every request that may have waited; w must not be in the set. */
void waitset_done(struct waitset *ws, struct waiter *w);

/* A model is at `at` (a message or a probe): wake, in position order, every waiter
 * it satisfies. Cost: O(woken · log n). */
void waitset_reached(struct waitset *ws, enum wait_source from,
		     const struct readmodel_position *at);
/* A position message claims that `from` (WAIT_FROM_REDIS) is at `claimed`; anyone may
 * publish one, so it is not taken as known. When at most WAIT_HINT_MAX waiters would
 * be satisfied by it, they are woken at once (hinted), each to look at the model
 * itself, which saves them the probe's round trip; the probe is made all the same, for
 * reads whose look was in flight. Otherwise it only pokes, as waitset_poke. */
#define WAIT_HINT_MAX 8
void waitset_hint(struct waitset *ws, enum wait_source from,
		  const struct readmodel_position *claimed);
/* A probe asked for by the config ended (report its positions with waitset_reached
 * first, if it got any). */
void waitset_probed(struct waitset *ws, bool sql);
/* A position may have moved without a message saying where to (a NOTIFY), or
 * messages may have been lost (a reconnection): probe once — the SQL probe for
 * WAIT_FROM_SQL and WAIT_FROM_LOG, the Redis one for WAIT_FROM_REDIS — if anyone
 * waits for what it tells. A probe in flight is followed by one more. */
void waitset_poke(struct waitset *ws, enum wait_source what);
/* Call interest(arg, from, on) whenever messages from `from` become able (on) or
 * unable to wake a waiter: WAIT_FROM_SQL, any waiter; WAIT_FROM_LOG, a WAIT_LOG one;
 * WAIT_FROM_REDIS, a WAIT_ANY one. So whoever delivers them (a LISTEN, a subscriber)
 * needs to listen only then; once listening it must poke (waitset_poke) for what it
 * may have missed before. Called at once if they can wake someone now. One watcher
 * per source; NULL stops watching. */
typedef void (*waitset_interest_cb)(void *arg, enum wait_source from, bool on);
void waitset_watch(struct waitset *ws, enum wait_source from, waitset_interest_cb interest,
		   void *arg);
/* Waiters in the set for `model`. */
size_t waitset_count(const struct waitset *ws, enum wait_model model);

#endif
