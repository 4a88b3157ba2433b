/* daybook-query's waiting room: waiters in binary heaps by position (one per model)
 * and by deadline, one timer at the earliest deadline, and one slow safety probe. */
#include <event2/event.h>
#include <stdlib.h>
#include <time.h>

#include "clock.h"
#include "metrics.h"
#include "wait.h"

/* A min-heap of waiters; each waiter knows its slot, so it can leave from anywhere. */
struct heap {
	struct waiter **v;
	size_t n, cap;
	bool by_deadline;
};

struct waitset {
	struct waitset_config cfg;
	struct heap pos[WAIT_MODELS]; /* by min */
	struct heap deadlines;        /* every waiter, by deadline */
	struct event *expiry;         /* at the earliest deadline */
	struct event *safety;         /* the slow probe, while anyone waits */
	double expiry_at;             /* the deadline the expiry timer is set for */
	bool probing[2], again[2];    /* [sql]: a probe in flight, and one more wanted */
	struct readmodel_position known[WAIT_SOURCES];
	bool has_known[WAIT_SOURCES];
	uint64_t seq;
	struct metric *waiting, *probes[2], *hinted;
	/* Who listens for each source's messages only while they could wake someone
	 * (waitset_watch), and what it was last told. */
	waitset_interest_cb interest[WAIT_SOURCES];
	void *interest_arg[WAIT_SOURCES];
	bool interested[WAIT_SOURCES];
};

/* --- the heap ------------------------------------------------------------------------ */

static size_t *slot(const struct heap *h, struct waiter *w)
{
	return h->by_deadline ? &w->at_deadline : &w->at_pos;
}

static bool before(const struct heap *h, const struct waiter *a, const struct waiter *b)
{
	if (h->by_deadline)
		return a->deadline < b->deadline;
	return readmodel_position_cmp(&a->min, &b->min) < 0;
}

static void place(struct heap *h, size_t i, struct waiter *w)
{
	h->v[i] = w;
	*slot(h, w) = i;
}

static void sift_up(struct heap *h, size_t i)
{
	struct waiter *w = h->v[i];

	while (i > 0 && before(h, w, h->v[(i - 1) / 2])) {
		place(h, i, h->v[(i - 1) / 2]);
		i = (i - 1) / 2;
	}
	place(h, i, w);
}

static void sift_down(struct heap *h, size_t i)
{
	struct waiter *w = h->v[i];

	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= h->n)
			break;
		if (c + 1 < h->n && before(h, h->v[c + 1], h->v[c]))
			c++;
		if (!before(h, h->v[c], w))
			break;
		place(h, i, h->v[c]);
		i = c;
	}
	place(h, i, w);
}

/* Room for one more, so that the pushes after it cannot fail. */
static bool reserve(struct heap *h)
{
	size_t cap = h->cap ? h->cap * 2 : 64;
	struct waiter **v;

	if (h->n < h->cap)
		return true;
	if (!(v = realloc(h->v, cap * sizeof(*v))))
		return false;
	h->v = v;
	h->cap = cap;
	return true;
}

static void push(struct heap *h, struct waiter *w)
{
	place(h, h->n++, w);
	sift_up(h, h->n - 1);
}

static void heap_remove(struct heap *h, struct waiter *w)
{
	size_t i = *slot(h, w);
	struct waiter *last = h->v[--h->n];

	if (i == h->n)
		return;
	place(h, i, last);
	sift_up(h, i);
	sift_down(h, *slot(h, last));
}

/* --- the set ------------------------------------------------------------------------- */

static size_t waiting(const struct waitset *ws)
{
	return ws->deadlines.n;
}

/* Positions from `from` satisfy waiters for `model`: the SQL model trails the log,
 * so its checkpoint also proves the log readable up to there. */
static bool serves(enum wait_source from, enum wait_model model)
{
	switch (from) {
	case WAIT_FROM_REDIS:
		return model == WAIT_ANY;
	case WAIT_FROM_SQL:
		return true;
	case WAIT_FROM_LOG:
		return model == WAIT_LOG;
	case WAIT_SOURCES:
		break;
	}
	return false;
}

static bool satisfied(const struct waitset *ws, const struct waiter *w)
{
	for (int s = 0; s < WAIT_SOURCES; s++)
		if (ws->has_known[s] && serves((enum wait_source)s, w->model) &&
		    readmodel_position_cmp(&w->min, &ws->known[s]) <= 0)
			return true;
	return false;
}

static void leave(struct waitset *ws, struct waiter *w, struct waiter ***tail)
{
	heap_remove(&ws->pos[w->model], w);
	heap_remove(&ws->deadlines, w);
	metric_add(ws->waiting, -1);
	w->hinted = false;
	w->next = NULL;
	**tail = w;
	*tail = &w->next;
}

/* Wake a list taken out of the set; the wake callbacks may add waiters again. */
static void wake_all(struct waiter *list, bool expired)
{
	struct waiter *w;

	while ((w = list)) {
		list = w->next;
		w->next = NULL;
		w->wake(w, expired);
	}
}

static void arm_expiry(struct waitset *ws)
{
	double first, d;
	struct timeval tv;

	if (!waiting(ws))
		return; /* a pending timer finds nothing to do */
	first = ws->deadlines.v[0]->deadline;
	if (first == ws->expiry_at && evtimer_pending(ws->expiry, NULL))
		return;
	d = first - mono_now();
	d = d < 0 ? 0 : d;
	d += 1e-6; /* never early */
	tv.tv_sec = (time_t)d;
	tv.tv_usec = (suseconds_t)((d - (double)tv.tv_sec) * 1e6);
	ws->expiry_at = first;
	evtimer_add(ws->expiry, &tv);
}

/* Could a message from `from` wake anyone now? */
static bool wakes_someone(const struct waitset *ws, enum wait_source from)
{
	switch (from) {
	case WAIT_FROM_REDIS:
		return ws->pos[WAIT_ANY].n > 0;
	case WAIT_FROM_SQL:
		return waiting(ws) > 0;
	case WAIT_FROM_LOG:
		return ws->pos[WAIT_LOG].n > 0;
	case WAIT_SOURCES:
		break;
	}
	return false;
}

/* Tell the watchers whose messages became able, or unable, to wake someone. */
static void notice_interest(struct waitset *ws)
{
	for (int s = 0; s < WAIT_SOURCES; s++) {
		bool on = wakes_someone(ws, (enum wait_source)s);
		if (ws->interest[s] && on != ws->interested[s]) {
			ws->interested[s] = on;
			ws->interest[s](ws->interest_arg[s], (enum wait_source)s, on);
		}
	}
}

static void on_expiry(evutil_socket_t fd, short what, void *arg)
{
	struct waitset *ws = arg;
	struct waiter *expired = NULL, **tail = &expired;
	double t = mono_now();

	(void)fd;
	(void)what;
	ws->expiry_at = 0;
	while (waiting(ws) && ws->deadlines.v[0]->deadline <= t)
		leave(ws, ws->deadlines.v[0], &tail);
	wake_all(expired, true);
	arm_expiry(ws);
	notice_interest(ws);
}

static bool wanted(const struct waitset *ws, bool sql)
{
	return wakes_someone(ws, sql ? WAIT_FROM_SQL : WAIT_FROM_REDIS);
}

static void probe(struct waitset *ws, bool sql)
{
	if (ws->probing[sql]) {
		ws->again[sql] = true;
		return;
	}
	ws->probing[sql] = true;
	if (!(sql ? ws->cfg.probe_sql : ws->cfg.probe_redis)(ws->cfg.arg)) {
		ws->probing[sql] = false; /* not connected: the safety timer tries again */
		return;
	}
	metric_add(ws->probes[sql], 1);
}

static void arm_safety(struct waitset *ws)
{
	double d = ws->cfg.probe_interval;
	struct timeval tv = { (time_t)d, (suseconds_t)((d - (double)(time_t)d) * 1e6) };

	if (waiting(ws) && !evtimer_pending(ws->safety, NULL))
		evtimer_add(ws->safety, &tv);
}

/* The guarantee behind the messages: one probe of each kind, however many wait. */
static void on_safety(evutil_socket_t fd, short what, void *arg)
{
	struct waitset *ws = arg;

	(void)fd;
	(void)what;
	waitset_poke(ws, WAIT_FROM_SQL);
	waitset_poke(ws, WAIT_FROM_REDIS);
	arm_safety(ws);
}

uint64_t waitset_seq(const struct waitset *ws)
{
	return ws ? ws->seq : 0;
}

enum wait_add waitset_add(struct waitset *ws, struct waiter *w, uint64_t seen)
{
	if (!ws)
		return WAIT_FULL;
	if (seen != ws->seq && satisfied(ws, w))
		return WAIT_AGAIN;
	if (!w->counted) {
		if (atomic_fetch_add(ws->cfg.total, 1) >= ws->cfg.max) {
			atomic_fetch_sub(ws->cfg.total, 1);
			return WAIT_FULL;
		}
		w->counted = true;
	}
	if (!reserve(&ws->pos[w->model]) || !reserve(&ws->deadlines))
		return WAIT_FULL;
	push(&ws->pos[w->model], w);
	push(&ws->deadlines, w);
	metric_add(ws->waiting, 1);
	arm_expiry(ws);
	arm_safety(ws);
	notice_interest(ws);
	return WAIT_ADDED;
}

void waitset_done(struct waitset *ws, struct waiter *w)
{
	if (!ws)
		return;
	if (w->counted)
		atomic_fetch_sub(ws->cfg.total, 1);
	w->counted = false;
}

void waitset_reached(struct waitset *ws, enum wait_source from, const struct readmodel_position *at)
{
	struct waiter *woken = NULL, **tail = &woken;

	if (!ws)
		return;
	ws->known[from] = *at;
	ws->has_known[from] = true;
	ws->seq++;
	for (int m = 0; m < WAIT_MODELS; m++) {
		struct heap *h = &ws->pos[m];
		if (!serves(from, (enum wait_model)m))
			continue;
		while (h->n && readmodel_position_cmp(&h->v[0]->min, at) <= 0)
			leave(ws, h->v[0], &tail);
	}
	wake_all(woken, false);
	notice_interest(ws);
}

/* Waiters of heap h at or below `at`, counted up to `max` + 1 (the heap's nodes below
 * a larger one are all larger: O(max) nodes visited). */
static size_t count_upto(const struct heap *h, size_t i, const struct readmodel_position *at,
			 size_t max)
{
	size_t n;

	if (i >= h->n || readmodel_position_cmp(&h->v[i]->min, at) > 0)
		return 0;
	n = 1 + count_upto(h, 2 * i + 1, at, max);
	return n > max ? n : n + count_upto(h, 2 * i + 2, at, max - n + 1);
}

void waitset_hint(struct waitset *ws, enum wait_source from,
		  const struct readmodel_position *claimed)
{
	struct heap *h;
	struct waiter *woken = NULL, **tail = &woken, *w;
	size_t n;

	if (!ws)
		return;
	h = &ws->pos[WAIT_ANY];
	n = from == WAIT_FROM_REDIS ? count_upto(h, 0, claimed, WAIT_HINT_MAX) : 0;
	if (n == 0 || n > WAIT_HINT_MAX) {
		waitset_poke(ws, from);
		return;
	}
	while (h->n && readmodel_position_cmp(&h->v[0]->min, claimed) <= 0)
		leave(ws, h->v[0], &tail);
	for (w = woken; w; w = w->next)
		w->hinted = true;
	metric_add(ws->hinted, (double)n);
	wake_all(woken, false);
	/* A read whose look was in flight when the message came is not in the set: the
	 * probe's answer (a position seen, hence a new waitset_seq) makes it look again. */
	probe(ws, false);
	notice_interest(ws);
}

void waitset_probed(struct waitset *ws, bool sql)
{
	if (!ws)
		return;
	ws->probing[sql] = false;
	if (ws->again[sql]) {
		ws->again[sql] = false;
		if (wanted(ws, sql))
			probe(ws, sql);
	}
}

void waitset_poke(struct waitset *ws, enum wait_source what)
{
	if (!ws)
		return;
	switch (what) {
	case WAIT_FROM_SQL:
		if (wanted(ws, true))
			probe(ws, true);
		break;
	case WAIT_FROM_LOG:
		if (ws->pos[WAIT_LOG].n)
			probe(ws, true);
		break;
	case WAIT_FROM_REDIS:
		if (wanted(ws, false))
			probe(ws, false);
		break;
	case WAIT_SOURCES:
		break;
	}
}

void waitset_watch(struct waitset *ws, enum wait_source from, waitset_interest_cb interest,
		   void *arg)
{
	if (!ws)
		return;
	ws->interest[from] = interest;
	ws->interest_arg[from] = arg;
	ws->interested[from] = false;
	notice_interest(ws);
}

size_t waitset_count(const struct waitset *ws, enum wait_model model)
{
	return ws->pos[model].n;
}

int waitset_open(struct waitset **out, const struct waitset_config *cfg)
{
	struct waitset *ws = calloc(1, sizeof(*ws));

	*out = NULL;
	if (!ws)
		return -1;
	ws->cfg = *cfg;
	ws->deadlines.by_deadline = true;
	ws->expiry = evtimer_new(cfg->base, on_expiry, ws);
	ws->safety = evtimer_new(cfg->base, on_safety, ws);
	if (!ws->expiry || !ws->safety) {
		waitset_close(&ws);
		return -1;
	}
	if (cfg->metrics) {
		ws->waiting =
			metrics_get(cfg->metrics, METRIC_GAUGE, "daybook_query_waiting_reads",
				    "Reads waiting for a read model to reach their min_position.",
				    "", NULL, 0);
		ws->probes[1] = metrics_get(cfg->metrics, METRIC_COUNTER,
					    "daybook_query_position_probes_total",
					    "Checkpoint probes made for waiting reads, by model.",
					    "model=\"sql\"", NULL, 0);
		ws->hinted = metrics_get(cfg->metrics, METRIC_COUNTER,
					 "daybook_query_hinted_wakes_total",
					 "Waiting reads woken by a position message's claim, "
					 "before any probe.",
					 "", NULL, 0);
		ws->probes[0] = metrics_get(cfg->metrics, METRIC_COUNTER,
					    "daybook_query_position_probes_total",
					    "Checkpoint probes made for waiting reads, by model.",
					    "model=\"redis\"", NULL, 0);
	}
	*out = ws;
	return 0;
}

void waitset_close(struct waitset **wsp)
{
	struct waitset *ws = *wsp;
	struct waiter *left = NULL, **tail = &left;

	if (!ws)
		return;
	while (waiting(ws))
		leave(ws, ws->deadlines.v[0], &tail);
	wake_all(left, true);
	if (ws->expiry)
		event_free(ws->expiry);
	if (ws->safety)
		event_free(ws->safety);
	for (int m = 0; m < WAIT_MODELS; m++)
		free(ws->pos[m].v);
	free(ws->deadlines.v);
	free(ws);
	*wsp = NULL;
}
