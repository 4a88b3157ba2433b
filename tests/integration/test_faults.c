/* Faults: PostgreSQL stops under load. The service answers 503 (never hangs or
 * crashes), recovers by itself, and every acknowledged write is in the log exactly once.
 * A read behind on Redis waits for its min_position while PostgreSQL is away.
 * Runs alone (is_parallel: false): it stops the shared test cluster. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define WORKERS 8
#define MAX_ACKS 20000

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(faults, .init = setup, .fini = teardown, .timeout = 180);

struct ack {
	int account;
	long long version;
	long long amount;
};

struct load {
	atomic_bool stop;
	atomic_int statuses[600];
	atomic_int other; /* anything but 201/503, or a socket failure */
	pthread_mutex_t lock;
	struct ack acks[MAX_ACKS];
	size_t nacks;
};

struct worker {
	struct load *load;
	int id;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	struct load *l = w->load;
	char path[64], body[64];
	unsigned seed = (unsigned)w->id;

	snprintf(path, sizeof(path), "/accounts/f-%d/deposits", w->id);
	while (!atomic_load(&l->stop)) {
		long long amount = 1 + rand_r(&seed) % 1000;
		snprintf(body, sizeof(body), "{\"amount\":%lld}", amount);
		struct response r = post(&stack.command, path, body, NULL);
		if (r.status == 201) {
			pthread_mutex_lock(&l->lock);
			if (l->nacks < MAX_ACKS)
				l->acks[l->nacks++] = (struct ack){
					w->id,
					json_integer_value(json_object_get(r.json, "version")),
					amount
				};
			pthread_mutex_unlock(&l->lock);
		}
		if (r.status == 201 || r.status == 503)
			atomic_fetch_add(&l->statuses[r.status], 1);
		else
			atomic_fetch_add(&l->other, 1);
		if (r.status == 503)
			usleep(20000);
		response_free(&r);
	}
	return NULL;
}

Test(faults, postgresql_stopping_mid_load_gives_503_then_recovery_without_loss)
{
	static struct load l;
	struct worker w[WORKERS];
	pthread_t t[WORKERS];
	char q[256];
	struct response r;

	pthread_mutex_init(&l.lock, NULL);
	for (int i = 0; i < WORKERS; i++) {
		snprintf(q, sizeof(q), "{\"id\":\"f-%d\",\"name\":\"F\",\"currency\":\"EUR\"}", i);
		r = post(&stack.command, "/accounts", q, NULL);
		cr_assert_eq(r.status, 201);
		response_free(&r);
		w[i] = (struct worker){ &l, i };
		pthread_create(&t[i], NULL, work, &w[i]);
	}
	cr_assert(harness_wait_count(&l.statuses[201], 20, harness_now() + 20),
		  "the writers made no headway before the outage");
	harness_run_env_command("DAYBOOK_TEST_PG_STOP");
	cr_assert(harness_wait_count(&l.statuses[503], 1, harness_now() + 20),
		  "the writers saw no 503 after PostgreSQL stopped");
	/* Down: writes and readiness say 503, promptly. */
	r = post(&stack.command, "/accounts/f-0/deposits", "{\"amount\":1}", NULL);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")), "unavailable");
	char retry[16];
	cr_assert(response_header(&r, "Retry-After", retry, sizeof(retry)));
	response_free(&r);
	r = http_request(stack.command.port, "GET", "/readyz", NULL, NULL, 5);
	cr_assert_eq(r.status, 503);
	response_free(&r);
	harness_run_env_command("DAYBOOK_TEST_PG_START");
	/* Back: the service reconnects by itself. */
	cr_assert(harness_wait_status(&stack.command, "/readyz", 200, 20),
		  "the service did not reconnect");
	cr_assert(harness_wait_count(&l.statuses[201], atomic_load(&l.statuses[201]) + 20,
				     harness_now() + 20),
		  "the writers made no headway after the recovery");
	atomic_store(&l.stop, true);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(t[i], NULL);

	cr_assert_eq(atomic_load(&l.other), 0, "only 201 and 503 are acceptable answers");
	cr_assert_gt(atomic_load(&l.statuses[503]), 0, "the outage should have been seen");
	cr_assert_gt(l.nacks, 0);
	/* Every acknowledged deposit is in the log, exactly once, as acknowledged. */
	PGresult *log = sql(stack.db,
			    "SELECT substr(stream, 11)::int, version, (data->>'amount')::bigint "
			    "FROM events WHERE type = 'FundsDeposited'");
	for (size_t i = 0; i < l.nacks; i++) {
		int found = 0;
		for (int row = 0; row < PQntuples(log); row++)
			found += atoi(PQgetvalue(log, row, 0)) == l.acks[i].account &&
				 atoll(PQgetvalue(log, row, 1)) == l.acks[i].version &&
				 atoll(PQgetvalue(log, row, 2)) == l.acks[i].amount;
		cr_assert_eq(found, 1, "acknowledged deposit f-%d v%lld of %lld found %d times",
			     l.acks[i].account, l.acks[i].version, l.acks[i].amount, found);
	}
	PQclear(log);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM (SELECT stream, max(version) m, count(*) c "
			     "FROM events GROUP BY stream) s WHERE m <> c"),
		     0);
	r = post(&stack.command, "/accounts/f-1/deposits", "{\"amount\":1}", NULL);
	cr_assert_eq(r.status, 201, "%s", r.body);
	response_free(&r);
}

/* A read of GET path on the query service, in a thread of its own. */
struct read_call {
	int port;
	char path[256];
	struct response r;
};

static void *read_call(void *arg)
{
	struct read_call *c = arg;
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };

	c->r = http_request(c->port, "GET", c->path, h, NULL, 30);
	return NULL;
}

static bool lock_waited(void *arg)
{
	return sql_int(arg, "SELECT count(*) FROM pg_locks WHERE NOT granted "
			    "AND relation = 'rm_accounts'::regclass") > 0;
}

/* PostgreSQL away (a failover), Redis up but behind the caller's min_position: the
 * read waits for the projection like any read behind (then projection_behind), and is
 * answered once PostgreSQL and the projector are back within its wait_ms; so is one
 * whose SQL statement was in flight when PostgreSQL went. Never a 503 unavailable at
 * once (seen as every min_position read failing in the HA suite's PostgreSQL
 * failover). */
Test(faults, a_read_behind_on_redis_waits_while_postgresql_is_down)
{
	static struct service redis_svc, projector, query;
	char redis_url[128], pos[64], conninfo[512];
	struct read_call early, inflight;
	pthread_t t;
	struct response r;
	PGconn *locker;

	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_projector(&projector, stack.db, redis_url);
	harness_start_query(&query, stack.db, redis_url);
	harness_post_created(&stack.command, "/accounts",
			     "{\"id\":\"w-1\",\"name\":\"W\",\"currency\":\"EUR\"}");
	harness_wait_caught_up(stack.db, redis_url, 60);
	/* The projector stops: the next write stays ahead of the live Redis generation. */
	harness_stop(&projector);
	r = post(&stack.command, "/accounts/w-1/deposits", "{\"amount\":5}", NULL);
	cr_assert_eq(r.status, 201, "%d %s", r.status, r.body);
	snprintf(pos, sizeof(pos), "%s", json_string_value(json_object_get(r.json, "position")));
	response_free(&r);

	/* One read goes to SQL (Redis is behind) and waits there on a lock... */
	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	locker = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(locker), CONNECTION_OK, "%s", PQerrorMessage(locker));
	PQclear(PQexec(locker, "BEGIN"));
	PGresult *lock = PQexec(locker, "LOCK TABLE rm_accounts IN ACCESS EXCLUSIVE MODE");
	cr_assert_eq(PQresultStatus(lock), PGRES_COMMAND_OK, "%s", PQerrorMessage(locker));
	PQclear(lock);
	early.port = inflight.port = query.port;
	snprintf(inflight.path, sizeof(inflight.path),
		 "/accounts/w-1?min_position=%s&wait_ms=10000", pos);
	pthread_create(&t, NULL, read_call, &inflight);
	cr_assert(harness_wait_until(lock_waited, stack.db, harness_now() + 30),
		  "the read did not reach SQL");
	/* ...when PostgreSQL stops under it. */
	harness_run_env_command("DAYBOOK_TEST_PG_STOP");
	PQfinish(locker);
	cr_assert(harness_wait_status(&query, "/readyz", 503, 30), "the query service kept ready");
	snprintf(early.path, sizeof(early.path), "/accounts/w-1?min_position=%s&wait_ms=200", pos);
	read_call(&early);
	/* PostgreSQL back before any assertion: the other tests share the cluster. */
	harness_run_env_command("DAYBOOK_TEST_PG_START");
	harness_start_projector(&projector, stack.db, redis_url);
	pthread_join(t, NULL);
	harness_stop(&projector);
	harness_stop(&query);
	harness_kill(&redis_svc);
	cr_assert_eq(early.r.status, 503, "%d %s", early.r.status, early.r.body);
	cr_assert_str_eq(json_string_value(json_object_get(early.r.json, "code")),
			 "projection_behind", "%s", early.r.body);
	response_free(&early.r);
	cr_assert_eq(inflight.r.status, 200, "%d %s", inflight.r.status, inflight.r.body);
	cr_assert_eq(json_integer_value(json_object_get(inflight.r.json, "balance")), 5, "%s",
		     inflight.r.body);
	response_free(&inflight.r);
}

struct burst {
	int port;
	struct response r;
};

static void *slow_write(void *arg)
{
	struct burst *b = arg;
	const char *h[] = { "Authorization: Bearer " TOKEN_WRITE, "Content-Type: application/json",
			    NULL };
	b->r = http_request(b->port, "POST", "/accounts/drain/deposits", h, "{\"amount\":1}", 30);
	return NULL;
}

Test(faults, sigterm_finishes_requests_in_flight_then_exits_zero)
{
	char conninfo[512];
	struct burst b[10];
	pthread_t t[10];
	PGconn *blocker;
	struct response r = post(&stack.command, "/accounts",
				 "{\"id\":\"drain\",\"name\":\"D\",\"currency\":\"EUR\"}", NULL);

	cr_assert_eq(r.status, 201);
	response_free(&r);
	/* Hold the log so that the writes are in flight when SIGTERM arrives. */
	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	blocker = PQconnectdb(conninfo);
	PQclear(PQexec(blocker, "BEGIN"));
	PQclear(PQexec(blocker, "LOCK TABLE events IN EXCLUSIVE MODE"));
	for (int i = 0; i < 10; i++) {
		b[i].port = stack.command.port;
		pthread_create(&t[i], NULL, slow_write, &b[i]);
	}
	/* All ten in flight (the gauge also counts the /metrics request reading it). */
	for (int i = 0; harness_metric(&stack.command, "daybook_http_requests_in_flight") < 11;
	     i++) {
		cr_assert_lt(i, 1000, "the writes never all arrived");
		usleep(10000);
	}
	kill(stack.command.pid, SIGTERM);
	cr_assert(harness_wait_log(&stack.command, "no longer accepting", harness_now() + 10),
		  "the service did not take the SIGTERM");
	PQclear(PQexec(blocker, "COMMIT"));
	PQfinish(blocker);
	for (int i = 0; i < 10; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(b[i].r.status, 201, "in-flight write %d: %d %s", i, b[i].r.status,
			     b[i].r.body);
		response_free(&b[i].r);
	}
	cr_assert_eq(harness_stop(&stack.command), 0);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events WHERE stream = 'account-drain'"),
		     11);
}
