/* A write's answer is PostgreSQL's verdict on its transaction: refusals at COMMIT,
 * deadlines, cancelled batches, keyed repeats in flight, and a stream that cannot be
 * folded each get the answer their outcome deserves, and never a false 201. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static char db[64];
static struct service svc;

static void setup(void)
{
	harness_db_create(db, sizeof(db));
}

static void teardown(void)
{
	if (svc.pid > 0)
		harness_stop(&svc);
}

TestSuite(outcomes, .init = setup, .fini = teardown, .timeout = 120);

/* Start the command service with the given write and statement deadlines (ms). */
static void start_command(const char *write_ms, const char *statement_ms)
{
	/* The child inherits them; each test runs in a process of its own. */
	setenv("DAYBOOK_WRITE_TIMEOUT_MS", write_ms, 1);
	setenv("DAYBOOK_STATEMENT_TIMEOUT_MS", statement_ms, 1);
	harness_start_command(&svc, db);
}

static void post_ok(const char *path, const char *body)
{
	struct response r = post(&svc, path, body, NULL);

	cr_assert_eq(r.status, 201, "POST %s %s: %d %s", path, body, r.status, r.body);
	response_free(&r);
}

static void open_account(const char *id)
{
	char body[128];

	snprintf(body, sizeof(body), "{\"id\":\"%s\",\"name\":\"N\",\"currency\":\"EUR\"}", id);
	post_ok("/accounts", body);
}

static const char *code_of(const struct response *r)
{
	const char *c = json_string_value(json_object_get(r->json, "code"));
	return c ? c : "";
}

/* --- a lock on the events table, held by the test ------------------------------------ */

static PGconn *lock_events(const char *mode)
{
	char conninfo[512], q[128];
	PGconn *c;
	PGresult *r;

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	c = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
	snprintf(q, sizeof(q), "BEGIN; LOCK TABLE events IN %s MODE", mode);
	r = PQexec(c, q);
	cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(r));
	PQclear(r);
	return c;
}

static void unlock_events(PGconn *c)
{
	PQclear(PQexec(c, "COMMIT"));
	PQfinish(c);
}

static long long command_backends(const char *condition)
{
	char q[512];

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
		 "AND application_name = 'daybook-command' AND %s", condition);
	return sql_int(db, q);
}

/* Wait until `condition` holds for n of the command's backends; fails after 30 s. */
static void wait_backends(const char *condition, long long n)
{
	double deadline = harness_now() + 30;

	while (command_backends(condition) != n) {
		cr_assert(harness_now() < deadline, "no %lld command backend(s) with %s", n, condition);
		usleep(20000);
	}
}

/* --- requests sent from threads --------------------------------------------------------- */

struct call {
	char path[96], body[160], key[80];
	struct response r;
	pthread_t thread;
};

static void *send_call(void *arg)
{
	struct call *c = arg;
	char header[128];
	const char *extra[] = { header, NULL };

	snprintf(header, sizeof(header), "Idempotency-Key: %s", c->key);
	c->r = post(&svc, c->path, c->body, c->key[0] ? extra : NULL);
	return NULL;
}

static void start_call(struct call *c)
{
	cr_assert_eq(pthread_create(&c->thread, NULL, send_call, c), 0);
}

static void join_call(struct call *c)
{
	pthread_join(c->thread, NULL);
}

static void keyed_deposit(const char *key, int amount, struct response *out)
{
	char header[128], body[64];
	const char *extra[] = { header, NULL };

	snprintf(header, sizeof(header), "Idempotency-Key: %s", key);
	snprintf(body, sizeof(body), "{\"amount\":%d}", amount);
	*out = post(&svc, "/accounts/u/deposits", body, extra);
}

static long long events_with_key(const char *key)
{
	char q[256];

	snprintf(q, sizeof(q), "SELECT count(*) FROM events WHERE metadata->>'idempotency_key' = '%s'",
		 key);
	return sql_int(db, q);
}

/* --- 3. keyed repeats in flight ------------------------------------------------------------- */

Test(outcomes, every_repeat_during_the_first_requests_flight_gets_409_with_retry_after)
{
	struct call first = { .path = "/accounts/u/deposits", .body = "{\"amount\":7}", .key = "fly-1" };
	PGconn *lock;

	start_command("30000", "20000");
	open_account("u");
	post_ok("/accounts/u/deposits", "{\"amount\":5}");
	lock = lock_events("EXCLUSIVE");
	start_call(&first);
	wait_backends("wait_event_type = 'Lock'", 1);
	for (int i = 0; i < 2; i++) {
		struct response again;
		char retry_after[16] = "";
		keyed_deposit("fly-1", 7, &again);
		cr_expect_eq(again.status, 409, "repeat %d: %d %s", i + 1, again.status, again.body);
		cr_expect_str_eq(code_of(&again), "request_in_progress", "%s", again.body);
		cr_expect(response_header(&again, "Retry-After", retry_after, sizeof(retry_after)),
			  "repeat %d has no Retry-After", i + 1);
		response_free(&again);
	}
	unlock_events(lock);
	join_call(&first);
	cr_assert_eq(first.r.status, 201, "%s", first.r.body);
	cr_assert_eq(events_with_key("fly-1"), 1);
	response_free(&first.r);
}
