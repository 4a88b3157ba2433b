/* Idempotency-Key: replay, reuse with another body, in flight, restart, retention. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static char db[64];
static struct service svc;

static void setup(void)
{
	harness_db_create(db, sizeof(db));
	harness_start_command(&svc, db);
	struct response r = post(&svc, "/accounts",
				 "{\"id\":\"idem\",\"name\":\"I\",\"currency\":\"EUR\"}", NULL);
	cr_assert_eq(r.status, 201);
	response_free(&r);
}

static void teardown(void)
{
	harness_stop(&svc);
}

TestSuite(idempotency, .init = setup, .fini = teardown, .timeout = 60);

static long long deposits(void)
{
	return sql_int(db, "SELECT count(*) FROM events WHERE type = 'FundsDeposited'");
}

static void assert_replay_of(const struct response *first, const struct response *again)
{
	char replayed[16] = "";

	cr_assert_eq(again->status, first->status);
	cr_assert_str_eq(again->body, first->body, "a replay returns the first body byte for byte");
	cr_assert(response_header(again, "Idempotent-Replayed", replayed, sizeof(replayed)));
	cr_assert_str_eq(replayed, "true");
}

Test(idempotency, a_repeat_returns_the_first_response_and_writes_nothing)
{
	const char *key[] = { "Idempotency-Key: pay-1", NULL };
	struct response first = post(&svc, "/accounts/idem/deposits", "{\"amount\":70}", key);
	/* Same body with other whitespace and key order is the same request. */
	struct response again = post(&svc, "/accounts/idem/deposits", " { \"amount\" : 70 } ", key);
	char etag1[16], etag2[16];

	cr_assert_eq(first.status, 201, "%s", first.body);
	assert_replay_of(&first, &again);
	cr_assert(response_header(&first, "ETag", etag1, sizeof(etag1)));
	cr_assert(response_header(&again, "ETag", etag2, sizeof(etag2)));
	cr_assert_str_eq(etag1, etag2);
	cr_assert_eq(deposits(), 1);
	response_free(&first);
	response_free(&again);
}

Test(idempotency, a_refusal_is_replayed_too)
{
	const char *key[] = { "Idempotency-Key: too-much", NULL };
	struct response first = post(&svc, "/accounts/idem/withdrawals", "{\"amount\":5}", key);
	struct response dep = post(&svc, "/accounts/idem/deposits", "{\"amount\":50}", NULL);
	struct response again = post(&svc, "/accounts/idem/withdrawals", "{\"amount\":5}", key);

	cr_assert_eq(first.status, 422);
	cr_assert_eq(dep.status, 201);
	/* Funds arrived in between, yet the key's answer stays the first one. */
	assert_replay_of(&first, &again);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE type = 'FundsWithdrawn'"), 0);
	response_free(&first);
	response_free(&dep);
	response_free(&again);
}

Test(idempotency, the_same_key_with_another_body_is_422)
{
	const char *key[] = { "Idempotency-Key: k-reuse", NULL };
	struct response first = post(&svc, "/accounts/idem/deposits", "{\"amount\":10}", key);
	struct response other = post(&svc, "/accounts/idem/deposits", "{\"amount\":11}", key);
	struct response path = post(&svc, "/accounts/idem/withdrawals", "{\"amount\":10}", key);

	cr_assert_eq(first.status, 201);
	cr_assert_eq(other.status, 422, "%d %s", other.status, other.body);
	cr_assert_str_eq(json_string_value(json_object_get(other.json, "code")),
			 "idempotency_key_reused");
	cr_assert_eq(path.status, 422);
	cr_assert_str_eq(json_string_value(json_object_get(path.json, "code")),
			 "idempotency_key_reused");
	cr_assert_eq(deposits(), 1);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE type = 'FundsWithdrawn'"), 0);
	response_free(&first);
	response_free(&other);
	response_free(&path);
}

Test(idempotency, keys_belong_to_their_token)
{
	const char *writer[] = { "Idempotency-Key: shared", NULL };
	const char *admin[] = { "Authorization: Bearer " TOKEN_ADMIN,
				"Content-Type: application/json", "Idempotency-Key: shared", NULL };
	struct response a = post(&svc, "/accounts/idem/deposits", "{\"amount\":10}", writer);
	struct response b = http_request(svc.port, "POST", "/accounts/idem/deposits", admin,
					 "{\"amount\":10}", 10);

	cr_assert_eq(a.status, 201);
	cr_assert_eq(b.status, 201);
	cr_assert_eq(json_integer_value(json_object_get(b.json, "version")), 3);
	cr_assert_eq(deposits(), 2);
	response_free(&a);
	response_free(&b);
}

Test(idempotency, keys_must_be_printable_ascii_up_to_255)
{
	char longkey[300] = "Idempotency-Key: ";
	const char *too_long[] = { longkey, NULL };
	struct response r;

	memset(longkey + strlen(longkey), 'k', 256);
	r = post(&svc, "/accounts/idem/deposits", "{\"amount\":10}", too_long);
	cr_assert_eq(r.status, 400);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")), "invalid_request");
	response_free(&r);
	cr_assert_eq(deposits(), 0);
}

struct slow_call {
	int port;
	struct response r;
};

static void *deposit_with_key(void *arg)
{
	struct slow_call *c = arg;
	const char *h[] = { "Authorization: Bearer " TOKEN_WRITE, "Content-Type: application/json",
			    "Idempotency-Key: slow", NULL };
	c->r = http_request(c->port, "POST", "/accounts/idem/deposits", h, "{\"amount\":5}", 30);
	return NULL;
}

Test(idempotency, a_repeat_while_the_first_is_in_flight_is_409)
{
	char conninfo[512];
	const char *key[] = { "Idempotency-Key: slow", NULL };
	struct slow_call first = { .port = svc.port };
	struct response during, after;
	pthread_t t;
	PGconn *blocker;

	/* Hold the event store so the first request stays in flight. */
	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	blocker = PQconnectdb(conninfo);
	cr_assert(PQstatus(blocker) == CONNECTION_OK);
	PQclear(PQexec(blocker, "BEGIN"));
	PQclear(PQexec(blocker, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE"));
	pthread_create(&t, NULL, deposit_with_key, &first);
	/* Only once the first is in flight (blocked on the lock) may the repeat go; the
	 * gauge counts the /metrics request that reads it too. */
	for (int i = 0; harness_metric(&svc, "daybook_http_requests_in_flight") < 2; i++) {
		cr_assert_lt(i, 1000, "the first request never arrived");
		usleep(10000);
	}
	during = post(&svc, "/accounts/idem/deposits", "{\"amount\":5}", key);
	PQclear(PQexec(blocker, "COMMIT"));
	PQfinish(blocker);
	pthread_join(t, NULL);
	after = post(&svc, "/accounts/idem/deposits", "{\"amount\":5}", key);

	cr_assert_eq(during.status, 409, "%s", during.body);
	cr_assert_str_eq(json_string_value(json_object_get(during.json, "code")),
			 "request_in_progress");
	char retry[16] = "";
	cr_assert(response_header(&during, "Retry-After", retry, sizeof(retry)), "%s",
		  during.headers);
	cr_assert_str_eq(retry, "1");
	cr_assert_eq(first.r.status, 201, "%s", first.r.body);
	assert_replay_of(&first.r, &after);
	cr_assert_eq(deposits(), 1);
	response_free(&first.r);
	response_free(&during);
	response_free(&after);
}

Test(idempotency, a_replay_survives_a_restart)
{
	const char *key[] = { "Idempotency-Key: restart-1", NULL };
	struct response first = post(&svc, "/accounts/idem/deposits", "{\"amount\":30}", key),
			again;

	cr_assert_eq(first.status, 201);
	cr_assert_eq(harness_stop(&svc), 0);
	harness_start_command(&svc, db);
	again = post(&svc, "/accounts/idem/deposits", "{\"amount\":30}", key);
	assert_replay_of(&first, &again);
	cr_assert_eq(deposits(), 1);
	response_free(&first);
	response_free(&again);
}

Test(idempotency, keys_are_kept_24_hours_and_expire_after)
{
	const char *young[] = { "Idempotency-Key: young", NULL };
	const char *old[] = { "Idempotency-Key: old", NULL };
	struct response y1 = post(&svc, "/accounts/idem/deposits", "{\"amount\":1}", young);
	struct response o1 = post(&svc, "/accounts/idem/deposits", "{\"amount\":2}", old), y2, o2;

	cr_assert_eq(y1.status, 201);
	cr_assert_eq(o1.status, 201);
	PQclear(sql(db,
		    "UPDATE idempotency_keys SET created_at = now() - interval '23 hours 59 minutes' "
		    "WHERE key = 'young'"));
	PQclear(sql(db, "UPDATE idempotency_keys SET created_at = now() - interval '26 hours' "
			"WHERE key = 'old'"));
	/* The service sweeps expired records when it (re)connects, on a connection of
	 * its own: wait for that. */
	cr_assert_eq(harness_stop(&svc), 0);
	harness_start_command(&svc, db);
	for (double end = harness_now() + 30;
	     sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key = 'old'") > 0;
	     usleep(20000))
		cr_assert_lt(harness_now(), end, "the expired key was never swept");
	y2 = post(&svc, "/accounts/idem/deposits", "{\"amount\":1}", young);
	assert_replay_of(&y1, &y2);
	o2 = post(&svc, "/accounts/idem/deposits", "{\"amount\":2}", old);
	cr_assert_eq(o2.status, 201);
	cr_assert_str_neq(o2.body, o1.body, "an expired key runs the command again");
	cr_assert_eq(deposits(), 3);
	response_free(&y1);
	response_free(&y2);
	response_free(&o1);
	response_free(&o2);
}

struct writer {
	int port, id;
	volatile bool *stop;
	int ok, failed;
};

/* Deposits, each with a key of its own, until told to stop. */
static void *write_continuously(void *arg)
{
	struct writer *w = arg;
	char key[64];
	const char *h[] = { "Authorization: Bearer " TOKEN_WRITE, "Content-Type: application/json",
			    key, NULL };

	for (int i = 0; !*w->stop; i++) {
		snprintf(key, sizeof(key), "Idempotency-Key: load-%d-%d", w->id, i);
		struct response r = http_request(w->port, "POST", "/accounts/idem/deposits", h,
						 "{\"amount\":1}", 30);
		if (r.status == 201)
			__atomic_add_fetch(&w->ok, 1, __ATOMIC_SEQ_CST);
		else
			__atomic_add_fetch(&w->failed, 1, __ATOMIC_SEQ_CST);
		response_free(&r);
	}
	return NULL;
}

static int writes_ok(const struct writer *w, size_t n)
{
	int ok = 0;

	for (size_t i = 0; i < n; i++)
		ok += __atomic_load_n(&w[i].ok, __ATOMIC_SEQ_CST);
	return ok;
}

Test(idempotency, expired_keys_are_swept_in_small_batches_under_continuous_writes)
{
	const char *env[] = { "DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S", "1", NULL };
	volatile bool stop = false;
	struct writer w[2];
	pthread_t t[2];
	int before, during;

	cr_assert_eq(harness_stop(&svc), 0);
	harness_start_command_env(&svc, db, env);
	for (int i = 0; i < 2; i++) {
		w[i] = (struct writer){ .port = svc.port, .id = i, .stop = &stop };
		pthread_create(&t[i], NULL, write_continuously, &w[i]);
	}
	for (double end = harness_now() + 15; writes_ok(w, 2) < 20; usleep(10000))
		cr_assert_lt(harness_now(), end, "the writers made no progress");
	/* Expired records (more than one batch's worth), and some just young enough. */
	PQclear(sql(db,
		    "INSERT INTO idempotency_keys (token_id, key, request_hash, status, headers, "
		    "body, created_at) SELECT 'old-token', 'expired-' || i, '\\x00', 201, '{}', '{}', "
		    "now() - interval '26 hours' - i * interval '1 second' "
		    "FROM generate_series(1, 5500) i"));
	PQclear(sql(db,
		    "INSERT INTO idempotency_keys (token_id, key, request_hash, status, headers, "
		    "body, created_at) SELECT 'old-token', 'young-' || i, '\\x00', 201, '{}', '{}', "
		    "now() - interval '23 hours 59 minutes' FROM generate_series(1, 300) i"));
	before = writes_ok(w, 2);
	for (double end = harness_now() + 25;
	     sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'expired-%'") > 0;
	     usleep(20000))
		cr_assert_lt(
			harness_now(), end,
			"expired records are still there under load (%lld left)",
			sql_int(db,
				"SELECT count(*) FROM idempotency_keys WHERE key LIKE 'expired-%'"));
	/* The writes went on meanwhile and still do. */
	during = writes_ok(w, 2);
	for (double end = harness_now() + 15; writes_ok(w, 2) < during + 20; usleep(10000))
		cr_assert_lt(harness_now(), end, "writes stalled after the sweep");
	stop = true;
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	cr_assert_eq(w[0].failed + w[1].failed, 0, "writes failed while the sweep ran");
	cr_assert_gt(writes_ok(w, 2), before);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'young-%'"),
		     300, "records younger than the retention were swept");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'load-%'"),
		     writes_ok(w, 2), "the writers' own records must stay");
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM pg_stat_activity WHERE datname = "
			     "current_database() AND application_name = 'daybook-command-sweep'"),
		     1, "the sweep has a connection of its own");
	cr_assert_geq(harness_metric(&svc, "daybook_idempotency_swept_total"), 5500);
	/* At most a thousand rows per transaction: for 5,500, at least six that deleted. */
	cr_assert_geq(harness_metric(&svc, "daybook_idempotency_sweep_batches_total"), 6);
}
