/* The query service's waiting room (query/wait.c) on its own: release order, the
 * sources each model listens to, the cap, lost wake-ups, deadlines, probes. */
#include <criterion/criterion.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wait.h"

struct sleeper {
	struct waiter w;
	int woken, expired;
	double woken_at;
	struct sleeper **log; /* where to record the order of wake-ups */
	size_t *nlog;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_wake(struct waiter *w, bool expired)
{
	struct sleeper *s = (struct sleeper *)w;

	s->woken++;
	s->expired += expired;
	s->woken_at = now();
	if (s->log)
		s->log[(*s->nlog)++] = s;
}

static int sql_probes, redis_probes;

static bool probe_sql(void *arg)
{
	(void)arg;
	sql_probes++;
	return true;
}

static bool probe_redis(void *arg)
{
	(void)arg;
	redis_probes++;
	return true;
}

static struct event_base *base;
static atomic_size_t total;

static struct waitset *open_set(size_t max)
{
	struct waitset *ws;
	struct waitset_config cfg = {
		.base = base,
		.max = max,
		.total = &total,
		.probe_interval = 600,
		.probe_sql = probe_sql,
		.probe_redis = probe_redis,
	};

	cr_assert_eq(waitset_open(&ws, &cfg), 0);
	return ws;
}

static void setup(void)
{
	base = event_base_new();
	cr_assert(base);
	atomic_init(&total, 0);
	sql_probes = redis_probes = 0;
}

static void teardown(void)
{
	event_base_free(base);
}

TestSuite(query_wait, .init = setup, .fini = teardown);

static void prepare(struct sleeper *s, unsigned long long txid, unsigned long long pos,
		    enum wait_model model, double in)
{
	*s = (struct sleeper){ .w = { .min = { txid, pos },
				      .deadline = now() + in,
				      .model = model,
				      .wake = on_wake } };
}

static void add(struct waitset *ws, struct sleeper *s)
{
	cr_assert_eq(waitset_add(ws, &s->w, waitset_seq(ws)), WAIT_ADDED);
}

Test(query_wait, waiters_are_woken_in_position_order_and_only_once_reached)
{
	enum { N = 2000 };
	struct waitset *ws = open_set(N);
	struct sleeper *s = calloc(N, sizeof(*s)), **log = calloc(N, sizeof(*log));
	size_t nlog = 0, below = 0;
	struct readmodel_position at = { 50, 5 }, end = { 1000, 0 };

	srand(7);
	for (size_t i = 0; i < N; i++) {
		prepare(&s[i], (unsigned long long)(rand() % 100),
			(unsigned long long)(rand() % 10), WAIT_ANY, 600);
		s[i].log = log;
		s[i].nlog = &nlog;
		below += readmodel_position_cmp(&s[i].w.min, &at) <= 0;
		add(ws, &s[i]);
	}
	waitset_reached(ws, WAIT_FROM_SQL, &at);
	cr_assert_eq(nlog, below);
	cr_assert_eq(waitset_count(ws, WAIT_ANY), N - below);
	waitset_reached(ws, WAIT_FROM_REDIS, &end);
	cr_assert_eq(nlog, N);
	for (size_t i = 0; i < N; i++) {
		cr_assert_eq(s[i].woken, 1, "waiter %zu woken %d times", i, s[i].woken);
		cr_assert_eq(s[i].expired, 0);
		if (i && i != below)
			cr_assert_leq(readmodel_position_cmp(&log[i - 1]->w.min, &log[i]->w.min), 0,
				      "woken out of position order at %zu", i);
		if (i < below)
			cr_assert_leq(readmodel_position_cmp(&log[i]->w.min, &at), 0);
		waitset_done(ws, &s[i].w);
	}
	cr_assert_eq(atomic_load(&total), 0);
	waitset_close(&ws);
	free(s);
	free(log);
}

Test(query_wait, each_source_wakes_only_the_waiters_it_can_answer)
{
	struct waitset *ws = open_set(10);
	struct sleeper any, sql, logw;
	struct readmodel_position at = { 9, 9 };

	prepare(&any, 5, 0, WAIT_ANY, 600);
	prepare(&sql, 5, 0, WAIT_SQL, 600);
	prepare(&logw, 5, 0, WAIT_LOG, 600);
	add(ws, &any);
	add(ws, &sql);
	add(ws, &logw);
	waitset_reached(ws, WAIT_FROM_REDIS, &at);
	cr_assert(any.woken == 1 && sql.woken == 0 && logw.woken == 0);
	waitset_reached(ws, WAIT_FROM_LOG, &at);
	cr_assert(sql.woken == 0 && logw.woken == 1);
	add(ws, &any);
	add(ws, &logw);
	/* The SQL model trails the log: its checkpoint answers every kind. */
	waitset_reached(ws, WAIT_FROM_SQL, &at);
	cr_assert(any.woken == 2 && sql.woken == 1 && logw.woken == 2);
	waitset_close(&ws);
}

Test(query_wait, the_cap_counts_every_worker_and_a_finished_read_gives_its_place_back)
{
	struct waitset *a = open_set(3), *b = open_set(3);
	struct sleeper s[5];

	for (int i = 0; i < 5; i++)
		prepare(&s[i], 5, 0, WAIT_ANY, 600);
	add(a, &s[0]);
	add(a, &s[1]);
	add(b, &s[2]);
	cr_assert_eq(waitset_add(b, &s[3].w, waitset_seq(b)), WAIT_FULL);
	cr_assert_eq(waitset_add(a, &s[3].w, waitset_seq(a)), WAIT_FULL);
	waitset_reached(a, WAIT_FROM_SQL, &(struct readmodel_position){ 5, 0 });
	/* Woken and reading again, they keep their places... */
	cr_assert_eq(waitset_add(b, &s[3].w, waitset_seq(b)), WAIT_FULL);
	/* ...which a released read may take again, until it is answered. */
	add(a, &s[0]);
	waitset_done(a, &s[1].w);
	add(b, &s[3]);
	cr_assert_eq(waitset_add(b, &s[4].w, waitset_seq(b)), WAIT_FULL);
	waitset_close(&a);
	waitset_close(&b);
}

Test(query_wait, a_position_that_arrived_during_a_look_sends_the_reader_to_look_again)
{
	struct waitset *ws = open_set(10);
	struct sleeper s;
	uint64_t seen = waitset_seq(ws);

	prepare(&s, 5, 0, WAIT_SQL, 600);
	waitset_reached(ws, WAIT_FROM_REDIS, &(struct readmodel_position){ 6, 0 });
	/* Redis cannot answer a WAIT_SQL read: it waits. */
	cr_assert_eq(waitset_add(ws, &s.w, seen), WAIT_ADDED);
	waitset_reached(ws, WAIT_FROM_SQL, &(struct readmodel_position){ 4, 0 });
	cr_assert_eq(s.woken, 0);
	seen = waitset_seq(ws);
	waitset_reached(ws, WAIT_FROM_SQL, &(struct readmodel_position){ 5, 0 });
	cr_assert_eq(s.woken, 1);
	/* Its look started before that message: it must look again, not wait. */
	cr_assert_eq(waitset_add(ws, &s.w, seen), WAIT_AGAIN);
	cr_assert_eq(waitset_add(ws, &s.w, waitset_seq(ws)), WAIT_ADDED);
	waitset_close(&ws);
	cr_assert_eq(s.expired, 1, "closing wakes those left as expired");
}

Test(query_wait, deadlines_expire_in_their_order_and_never_early)
{
	struct waitset *ws = open_set(10);
	struct sleeper s[4], *log[4];
	size_t nlog = 0;
	double in[4] = { 0.08, 0.02, 0.05, 30 };

	for (int i = 0; i < 4; i++) {
		prepare(&s[i], 5, 0, i == 2 ? WAIT_LOG : WAIT_ANY, in[i]);
		s[i].log = log;
		s[i].nlog = &nlog;
		add(ws, &s[i]);
	}
	while (nlog < 3)
		event_base_loop(base, EVLOOP_ONCE);
	cr_assert(log[0] == &s[1] && log[1] == &s[2] && log[2] == &s[0]);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(s[i].expired, 1);
		cr_assert_geq(s[i].woken_at, s[i].w.deadline, "waiter %d woken before its deadline",
			      i);
	}
	cr_assert_eq(s[3].woken, 0);
	cr_assert_eq(waitset_count(ws, WAIT_ANY), 1);
	cr_assert_eq(waitset_count(ws, WAIT_LOG), 0);
	waitset_close(&ws);
}

Test(query_wait, one_probe_at_a_time_with_one_more_after_it_and_none_without_waiters)
{
	struct waitset *ws = open_set(10);
	struct sleeper s, l;

	waitset_poke(ws, WAIT_FROM_SQL);
	waitset_poke(ws, WAIT_FROM_REDIS);
	cr_assert(sql_probes == 0 && redis_probes == 0, "nobody waits: no probe");
	prepare(&l, 5, 0, WAIT_LOG, 600);
	add(ws, &l);
	waitset_poke(ws, WAIT_FROM_REDIS);
	cr_assert_eq(redis_probes, 0, "Redis cannot answer an event-store read");
	waitset_poke(ws, WAIT_FROM_LOG);
	waitset_poke(ws, WAIT_FROM_SQL);
	waitset_poke(ws, WAIT_FROM_SQL);
	cr_assert_eq(sql_probes, 1, "one probe in flight at a time");
	waitset_probed(ws, true);
	cr_assert_eq(sql_probes, 2, "notifications during a probe get one more");
	waitset_probed(ws, true);
	cr_assert_eq(sql_probes, 2);
	prepare(&s, 5, 0, WAIT_ANY, 600);
	add(ws, &s);
	waitset_poke(ws, WAIT_FROM_REDIS);
	cr_assert_eq(redis_probes, 1);
	waitset_close(&ws);
}

static int interest_calls;
static bool interested[WAIT_SOURCES];

static void on_interest(void *arg, enum wait_source from, bool on)
{
	(void)arg;
	cr_assert_neq(interested[from], on, "told twice that source %d is %d", from, on);
	interested[from] = on;
	interest_calls++;
}

static void wait_for_expiry(struct sleeper *s)
{
	while (!s->woken)
		event_base_loop(base, EVLOOP_ONCE);
}

Test(query_wait, the_watcher_hears_when_a_source_could_wake_someone_and_when_no_longer)
{
	struct waitset *ws = open_set(10);
	struct sleeper any, logw, brief;
	struct readmodel_position at = { 9, 9 };

	interest_calls = 0;
	memset(interested, 0, sizeof(interested));
	for (int from = 0; from < WAIT_SOURCES; from++)
		waitset_watch(ws, (enum wait_source)from, on_interest, NULL);
	cr_assert_eq(interest_calls, 0, "nobody waits: nothing to listen for");
	prepare(&any, 5, 0, WAIT_ANY, 600);
	add(ws, &any);
	cr_assert(interested[WAIT_FROM_SQL] && interested[WAIT_FROM_REDIS]);
	cr_assert_not(interested[WAIT_FROM_LOG], "no WAIT_LOG waiter");
	prepare(&logw, 5, 0, WAIT_LOG, 600);
	add(ws, &logw);
	cr_assert(interested[WAIT_FROM_LOG]);
	cr_assert_eq(interest_calls, 3);
	/* Redis answers the WAIT_ANY waiter: Redis's messages can wake nobody now. */
	waitset_reached(ws, WAIT_FROM_REDIS, &at);
	cr_assert_not(interested[WAIT_FROM_REDIS]);
	cr_assert(interested[WAIT_FROM_SQL] && interested[WAIT_FROM_LOG]);
	waitset_reached(ws, WAIT_FROM_LOG, &at);
	cr_assert_not(interested[WAIT_FROM_SQL] || interested[WAIT_FROM_LOG]);
	cr_assert_eq(interest_calls, 6);
	/* A waiter that leaves at its deadline ends the interest too. */
	prepare(&brief, 5, 0, WAIT_SQL, 0.01);
	add(ws, &brief);
	cr_assert(interested[WAIT_FROM_SQL] && !interested[WAIT_FROM_REDIS]);
	wait_for_expiry(&brief);
	cr_assert_eq(brief.expired, 1);
	cr_assert_not(interested[WAIT_FROM_SQL]);
	/* Watching anew tells at once what is wanted now. */
	add(ws, &logw);
	memset(interested, 0, sizeof(interested));
	for (int from = 0; from < WAIT_SOURCES; from++)
		waitset_watch(ws, (enum wait_source)from, on_interest, NULL);
	cr_assert(interested[WAIT_FROM_LOG] && interested[WAIT_FROM_SQL]);
	waitset_close(&ws);
}
