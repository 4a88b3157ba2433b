/* A write's answer is PostgreSQL's verdict on its transaction: refusals at COMMIT,
 * deadlines, cancelled batches, keyed repeats in flight, and a stream that cannot be
 * folded each get the answer their outcome deserves, and never a false 201. */
#include <criterion/criterion.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "pg.h"

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

/* A session of the superuser that ran `sql` (which begins a transaction and takes a
 * lock), its last result `want`; release() ends it. */
static PGconn *hold(const char *sql, ExecStatusType want)
{
	char conninfo[512];
	PGconn *c;
	PGresult *r;

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	c = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
	r = PQexec(c, sql);
	cr_assert_eq(PQresultStatus(r), want, "%s", PQresultErrorMessage(r));
	PQclear(r);
	return c;
}

static PGconn *lock_events(const char *mode)
{
	char q[128];

	snprintf(q, sizeof(q), "BEGIN; LOCK TABLE events IN %s MODE", mode);
	return hold(q, PGRES_COMMAND_OK);
}

static void release(PGconn *c)
{
	PQclear(PQexec(c, "COMMIT"));
	PQfinish(c);
}

static long long command_backends(const char *condition)
{
	char q[512];

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
		 "AND application_name = 'daybook-command' AND %s",
		 condition);
	return sql_int(db, q);
}

/* Wait until `condition` holds for n of the command's backends; fails after 30 s. */
static void wait_backends(const char *condition, long long n)
{
	double deadline = harness_now() + 30;

	while (command_backends(condition) != n) {
		cr_assert(harness_now() < deadline, "no %lld command backend(s) with %s", n,
			  condition);
		usleep(20000);
	}
}

static void wait_in_flight(double n)
{
	double deadline = harness_now() + 30;

	while (harness_metric(&svc, "daybook_http_requests_in_flight") < n) {
		cr_assert(harness_now() < deadline, "fewer than %.0f requests in flight", n);
		usleep(20000);
	}
}

/* --- requests sent from threads --------------------------------------------------------- */

struct call {
	char path[96], body[160], key[80];
	struct response r;
	pthread_t thread;
	atomic_bool answered;
};

static void *send_call(void *arg)
{
	struct call *c = arg;
	char header[128];
	const char *extra[] = { header, NULL };

	snprintf(header, sizeof(header), "Idempotency-Key: %s", c->key);
	c->r = post(&svc, c->path, c->body, c->key[0] ? extra : NULL);
	atomic_store(&c->answered, true);
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

/* Hold INSERTs into events while a first request blocks on the lock, send `calls`,
 * wait until the service holds all of them, then release: they form one batch. */
static void send_as_one_batch(struct call *calls, size_t n)
{
	PGconn *lock = lock_events("EXCLUSIVE");
	struct call starter = { .path = "/accounts/starter/deposits", .body = "{\"amount\":1}" };

	start_call(&starter);
	wait_backends("wait_event_type = 'Lock'", 1);
	for (size_t i = 0; i < n; i++)
		start_call(&calls[i]);
	wait_in_flight((double)n + 1);
	release(lock);
	join_call(&starter);
	cr_assert_eq(starter.r.status, 201, "%s", starter.r.body);
	response_free(&starter.r);
	for (size_t i = 0; i < n; i++)
		join_call(&calls[i]);
}

/* --- 1. refusals at COMMIT ---------------------------------------------------------------- */

#define POISON 3
#define CLEAN 6

Test(outcomes, a_write_refused_at_commit_is_never_201_and_the_rest_of_its_batch_commits_once)
{
	struct call calls[POISON + CLEAN];
	char q[256];
	struct response after;

	/* Checked only at COMMIT: every statement of the batch succeeds first. */
	PQclear(sql(db, "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
			"BEGIN IF NEW.data->>'reference' = 'poison' THEN "
			"RAISE EXCEPTION 'poison refused at commit'; END IF; RETURN NULL; END $$"));
	PQclear(sql(db,
		    "CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON events "
		    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison()"));
	start_command("30000", "20000");
	open_account("starter");
	open_account("p");
	post_ok("/accounts/p/deposits", "{\"amount\":5}"); /* p is now in the command's cache */
	memset(calls, 0, sizeof(calls));
	for (int i = 0; i < POISON + CLEAN; i++) {
		bool poison = i < POISON;
		snprintf(calls[i].path, sizeof(calls[i].path), "/accounts/p/deposits");
		snprintf(calls[i].body, sizeof(calls[i].body),
			 "{\"amount\":%d,\"reference\":\"%s%d\"}", poison ? 1000 : 10,
			 poison ? "poison" : "clean-", i);
		if (poison) /* exactly "poison" */
			snprintf(calls[i].body, sizeof(calls[i].body),
				 "{\"amount\":1000,\"reference\":\"poison\"}");
	}
	send_as_one_batch(calls, POISON + CLEAN);

	for (int i = 0; i < POISON + CLEAN; i++) {
		if (i < POISON) {
			cr_expect_neq(calls[i].r.status, 201,
				      "a refused write was acknowledged: %s", calls[i].r.body);
			cr_expect_eq(calls[i].r.status, 500, "%d %s", calls[i].r.status,
				     calls[i].r.body);
		} else {
			cr_expect_eq(calls[i].r.status, 201, "%d %s", calls[i].r.status,
				     calls[i].r.body);
			snprintf(q, sizeof(q),
				 "SELECT count(*) FROM events WHERE stream = 'account-p' "
				 "AND data->>'reference' = 'clean-%d'",
				 i);
			cr_expect_eq(sql_int(db, q), 1, "clean-%d is in the log exactly once", i);
		}
		response_free(&calls[i].r);
	}
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE data->>'reference' = 'poison'"),
		     0);
	/* The command's cache kept nothing of the refused writes. */
	after = post(&svc, "/accounts/p/deposits", "{\"amount\":1}", NULL);
	cr_assert_eq(after.status, 201, "%s", after.body);
	cr_assert_eq(json_integer_value(json_object_get(after.json, "balance")), 5 + CLEAN * 10 + 1,
		     "%s", after.body);
	response_free(&after);
}

/* --- 1b. one set-based write per batch ---------------------------------------------------- */

/* The log position of stream's event at version v, as "txid.position". */
static void log_position(const char *stream, long long v, char *out, size_t len)
{
	char q[256];
	PGresult *r;

	snprintf(q, sizeof(q),
		 "SELECT txid::text || '.' || position::text FROM events "
		 "WHERE stream = '%s' AND version = %lld",
		 stream, v);
	r = sql(db, q);
	cr_assert_eq(PQntuples(r), 1, "no event %s@%lld", stream, v);
	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

#define CHAINED 5
#define XFERS 4
#define KEYED 3

/* The batch's events and its records go into the log in one INSERT: each
 * command still gets the position of its own last event (several versions of one
 * account in one statement, transfers, keyed requests whose stored body has the
 * position too), and a replay answers the same. */
Test(outcomes, one_batch_answers_each_command_with_its_own_events_position)
{
	struct call calls[CHAINED + XFERS + KEYED];
	size_t n = 0;
	char want[64], stream[64];

	start_command("30000", "20000");
	open_account("starter");
	open_account("c");
	open_account("x");
	open_account("y");
	/* Both sides funded: the threads' requests reach the batch in any order, and a
	 * transfer out of an empty account would be refused (422), not answered 201. */
	post_ok("/accounts/x/deposits", "{\"amount\":1000}");
	post_ok("/accounts/y/deposits", "{\"amount\":1000}");
	memset(calls, 0, sizeof(calls));
	for (int i = 0; i < CHAINED; i++, n++) {
		snprintf(calls[n].path, sizeof(calls[n].path), "/accounts/c/deposits");
		snprintf(calls[n].body, sizeof(calls[n].body), "{\"amount\":%d}", i + 1);
	}
	for (int i = 0; i < XFERS; i++, n++) {
		snprintf(calls[n].path, sizeof(calls[n].path), "/transfers");
		snprintf(calls[n].body, sizeof(calls[n].body),
			 "{\"id\":\"sb-%d\",\"from\":\"%s\",\"to\":\"%s\",\"amount\":1}", i,
			 i % 2 ? "y" : "x", i % 2 ? "x" : "y");
	}
	for (int i = 0; i < KEYED; i++, n++) {
		snprintf(calls[n].path, sizeof(calls[n].path), "/accounts/y/deposits");
		snprintf(calls[n].body, sizeof(calls[n].body), "{\"amount\":%d}", 10 + i);
		snprintf(calls[n].key, sizeof(calls[n].key), "sb-key-%d", i);
	}
	send_as_one_batch(calls, n);

	for (size_t i = 0; i < n; i++) {
		struct response *r = &calls[i].r;
		const char *got = json_string_value(json_object_get(r->json, "position"));
		bool xfer = json_object_get(r->json, "transfer_id") != NULL;

		cr_assert_eq(r->status, 201, "%s %s: %d %s", calls[i].path, calls[i].body,
			     r->status, r->body);
		if (xfer) /* its last event: TransferReceived, on the receiving account */
			snprintf(stream, sizeof(stream), "account-%s",
				 strstr(calls[i].body, "\"to\":\"x\"") ? "x" : "y");
		else
			snprintf(stream, sizeof(stream), "account-%s",
				 json_string_value(json_object_get(r->json, "account_id")));
		log_position(stream,
			     json_integer_value(
				     json_object_get(r->json, xfer ? "to_version" : "version")),
			     want, sizeof(want));
		cr_expect_str_eq(got ? got : "", want, "%s %s: %s", calls[i].path, calls[i].body,
				 r->body);
	}
	/* A keyed replay answers from the stored record, whose body has the same position. */
	for (size_t i = CHAINED + XFERS; i < n; i++) {
		char header[128];
		const char *extra[] = { header, NULL };
		struct response again;

		snprintf(header, sizeof(header), "Idempotency-Key: %s", calls[i].key);
		again = post(&svc, calls[i].path, calls[i].body, extra);
		cr_assert_eq(again.status, 201, "%s", again.body);
		cr_expect_str_eq(json_string_value(json_object_get(again.json, "position")),
				 json_string_value(json_object_get(calls[i].r.json, "position")),
				 "%s", again.body);
		response_free(&again);
	}
	for (size_t i = 0; i < n; i++)
		response_free(&calls[i].r);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'sb-key-%'"),
		     KEYED);
}

/* Keyed refusals and keyed successes of one batch: their records go into the log's
 * statement together (sql_append_idem); a refusal's record has no event, and stores
 * no position. Each replays its own first answer. */
Test(outcomes, one_batch_stores_keyed_refusals_beside_keyed_events)
{
	struct call calls[4];
	static const char *const bodies[] = { "{\"amount\":5}", "{\"amount\":100000}",
					      "{\"amount\":6}", "{\"amount\":200000}" };

	start_command("30000", "20000");
	open_account("starter");
	open_account("m");
	memset(calls, 0, sizeof(calls));
	for (int i = 0; i < 4; i++) {
		snprintf(calls[i].path, sizeof(calls[i].path),
			 i % 2 ? "/accounts/m/withdrawals" : "/accounts/m/deposits");
		snprintf(calls[i].body, sizeof(calls[i].body), "%s", bodies[i]);
		snprintf(calls[i].key, sizeof(calls[i].key), "mixed-key-%d", i);
	}
	send_as_one_batch(calls, 4);

	for (int i = 0; i < 4; i++) {
		char header[128];
		const char *extra[] = { header, NULL };
		struct response again;

		cr_assert_eq(calls[i].r.status, i % 2 ? 422 : 201, "%s %s: %d %s", calls[i].path,
			     calls[i].body, calls[i].r.status, calls[i].r.body);
		cr_assert_eq(json_object_get(calls[i].r.json, "position") != NULL, i % 2 == 0, "%s",
			     calls[i].r.body);
		snprintf(header, sizeof(header), "Idempotency-Key: %s", calls[i].key);
		again = post(&svc, calls[i].path, calls[i].body, extra);
		cr_expect_eq(again.status, calls[i].r.status, "%s", again.body);
		cr_expect(json_equal(again.json, calls[i].r.json), "replay %s, first %s",
			  again.body, calls[i].r.body);
		response_free(&again);
	}
	for (int i = 0; i < 4; i++)
		response_free(&calls[i].r);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE "
				 "'mixed-key-%' AND body NOT LIKE '%\"position\":\"?\"%'"),
		     4);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-m'"), 3);
}

/* --- 2. deadlines -------------------------------------------------------------------------- */

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

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM events WHERE metadata->>'idempotency_key' = '%s'", key);
	return sql_int(db, q);
}

/* After the lock is gone and the service has reconnected: the write did not commit,
 * and a retry with its key applies it once. */
static void assert_not_committed_then_retry_applies_once(const char *key)
{
	struct response retry;
	char replayed[16] = "";

	cr_assert(harness_wait_status(&svc, "/readyz", 200, 30));
	/* Whatever the old session was doing is over: only the new connection is left. */
	wait_backends("true", 1);
	wait_backends("state = 'active'", 0);
	cr_assert_eq(events_with_key(key), 0, "the abandoned write committed after all");
	keyed_deposit(key, 7, &retry);
	cr_assert_eq(retry.status, 201, "%s", retry.body);
	cr_assert_not(response_header(&retry, "Idempotent-Replayed", replayed, sizeof(replayed)),
		      "the retry was a replay: the first attempt had committed");
	cr_assert_eq(json_integer_value(json_object_get(retry.json, "balance")), 5 + 7);
	cr_assert_eq(events_with_key(key), 1);
	response_free(&retry);
}

Test(outcomes, a_batch_past_the_service_deadline_is_cancelled_and_answered_outcome_unknown)
{
	struct response r;
	char retry_after[16] = "";
	PGconn *lock;

	/* No server-side deadline here: the service's own deadline and cancel must act. */
	start_command("1500", "0");
	open_account("u");
	post_ok("/accounts/u/deposits", "{\"amount\":5}");
	lock = lock_events("ACCESS EXCLUSIVE");
	keyed_deposit("late-1", 7, &r);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "outcome_unknown", "%s", r.body);
	cr_assert(response_header(&r, "Retry-After", retry_after, sizeof(retry_after)));
	response_free(&r);
	release(lock);
	assert_not_committed_then_retry_applies_once("late-1");
}

Test(outcomes, postgresql_ends_a_slow_batch_itself_before_the_service_deadline_and_nothing_commits)
{
	struct response r;
	char retry_after[16] = "";
	PGconn *lock;

	start_command("20000", "500");
	open_account("u");
	post_ok("/accounts/u/deposits", "{\"amount\":5}");
	lock = lock_events("ACCESS EXCLUSIVE");
	keyed_deposit("slow-1", 7, &r);
	/* PostgreSQL cancelled the statement and said so: a definite, transient failure. */
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "unavailable", "%s", r.body);
	cr_assert(response_header(&r, "Retry-After", retry_after, sizeof(retry_after)));
	response_free(&r);
	release(lock);
	assert_not_committed_then_retry_applies_once("slow-1");
}

/* --- a replay waits for a commit of its own --------------------------------------------- */

/* Hold the write lease's row FOR UPDATE, which a fence (FOR KEY SHARE) waits for. Only
 * briefly: the lease's renewal waits for it too. */
static PGconn *lock_lease_row(void)
{
	return hold("BEGIN; SELECT FROM command_leases WHERE name = 'command' FOR UPDATE",
		    PGRES_TUPLES_OK);
}

/* A stored record may be a write whose COMMIT's wait for the synchronous standby was cut
 * short (the deadline's cancel): a replay answered from it at once would acknowledge a
 * write the standby may lack. So a batch of replays alone commits a transaction that
 * waits for the standby like a write (its fence, a WAL-logged row lock under an xid)
 * before it answers. Shown without a standby: with the lease's row locked, the replay's
 * batch waits on that lock, and its 201 comes only once the lock is gone. */
/* Send c while the lease's row is locked: its batch must wait on that lock (its fence)
 * and be answered only once the lock is gone. */
static void answered_after_a_fence(struct call *c)
{
	double deadline = harness_now() + 30;
	PGconn *lock = lock_lease_row();

	start_call(c);
	while (!atomic_load(&c->answered) &&
	       command_backends("wait_event_type = 'Lock' AND query LIKE '%command_leases%'") ==
		       0) {
		cr_assert(harness_now() < deadline, "the request neither waited nor was answered");
		usleep(20000);
	}
	cr_assert_not(atomic_load(&c->answered), "answered without a commit of its own: %d %s",
		      c->r.status, c->r.body);
	release(lock);
	join_call(c);
}

Test(outcomes, a_batch_of_replays_alone_commits_its_fence_before_it_answers)
{
	struct call again = { .path = "/accounts/u/deposits",
			      .body = "{\"amount\":7}",
			      .key = "replay-1" };
	struct response first;
	char replayed[16] = "";

	start_command("20000", "10000");
	open_account("u");
	post_ok("/accounts/u/deposits", "{\"amount\":5}");
	keyed_deposit("replay-1", 7, &first);
	cr_assert_eq(first.status, 201, "%s", first.body);
	answered_after_a_fence(&again);
	cr_assert_eq(again.r.status, 201, "%s", again.r.body);
	cr_assert_str_eq(again.r.body, first.body);
	cr_assert(response_header(&again.r, "Idempotent-Replayed", replayed, sizeof(replayed)));
	cr_assert_eq(events_with_key("replay-1"), 1);
	cr_assert_eq(harness_metric(&svc, "daybook_append_barriers_total"), 1);
	response_free(&first);
	response_free(&again.r);
}

/* A refusal may name a write the standby lacks just as a replay may: a transfer resent
 * without a key after an outcome_unknown gets 409 transfer_exists, its client's only
 * word that it was applied. So a batch of refusals alone commits its fence too. */
Test(outcomes, a_batch_of_refusals_alone_commits_its_fence_before_it_answers)
{
#define FENCED_TRANSFER "{\"id\":\"t-fence\",\"from\":\"u\",\"to\":\"v\",\"amount\":1}"
	struct call again = { .path = "/transfers", .body = FENCED_TRANSFER };

	start_command("20000", "10000");
	open_account("u");
	open_account("v");
	post_ok("/accounts/u/deposits", "{\"amount\":5}");
	post_ok("/transfers", FENCED_TRANSFER);
	answered_after_a_fence(&again);
	cr_assert_eq(again.r.status, 409, "%s", again.r.body);
	cr_assert(strstr(again.r.body, "transfer_exists"), "%s", again.r.body);
	cr_assert_eq(harness_metric(&svc, "daybook_append_barriers_total"), 1);
	response_free(&again.r);
#undef FENCED_TRANSFER
}

/* --- 3. keyed repeats in flight ------------------------------------------------------------- */

Test(outcomes, every_repeat_during_the_first_requests_flight_gets_409_with_retry_after)
{
	struct call first = { .path = "/accounts/u/deposits",
			      .body = "{\"amount\":7}",
			      .key = "fly-1" };
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
		cr_expect_eq(again.status, 409, "repeat %d: %d %s", i + 1, again.status,
			     again.body);
		cr_expect_str_eq(code_of(&again), "request_in_progress", "%s", again.body);
		cr_expect(response_header(&again, "Retry-After", retry_after, sizeof(retry_after)),
			  "repeat %d has no Retry-After", i + 1);
		response_free(&again);
	}
	release(lock);
	join_call(&first);
	cr_assert_eq(first.r.status, 201, "%s", first.r.body);
	cr_assert_eq(events_with_key("fly-1"), 1);
	response_free(&first.r);
}

/* --- 4. a stream that cannot be folded ------------------------------------------------------ */

#define HEALTHY 6
#define BROKEN 3

Test(outcomes, an_account_whose_stream_cannot_be_folded_fails_only_its_own_commands)
{
	struct call calls[HEALTHY + BROKEN];
	char q[256];

	start_command("30000", "20000");
	open_account("starter");
	for (int i = 0; i < HEALTHY; i++) {
		char id[16];
		snprintf(id, sizeof(id), "h-%d", i);
		open_account(id);
	}
	/* An event the domain cannot read (written behind the service's back). */
	PQclear(sql(db, "INSERT INTO events (stream, version, type, data, metadata) VALUES "
			"('account-broken', 1, 'AccountOpened', '{\"unreadable\":true}', '{}')"));
	memset(calls, 0, sizeof(calls));
	for (int i = 0; i < HEALTHY + BROKEN; i++) {
		if (i < HEALTHY)
			snprintf(calls[i].path, sizeof(calls[i].path), "/accounts/h-%d/deposits",
				 i);
		else
			snprintf(calls[i].path, sizeof(calls[i].path), "/accounts/broken/deposits");
		snprintf(calls[i].body, sizeof(calls[i].body), "{\"amount\":%d}", 10 + i);
	}
	send_as_one_batch(calls, HEALTHY + BROKEN);

	for (int i = 0; i < HEALTHY + BROKEN; i++) {
		if (i < HEALTHY) {
			cr_expect_eq(calls[i].r.status, 201, "%d %s", calls[i].r.status,
				     calls[i].r.body);
			snprintf(q, sizeof(q),
				 "SELECT count(*) FROM events WHERE stream = 'account-h-%d' "
				 "AND type = 'FundsDeposited'",
				 i);
			cr_expect_eq(sql_int(db, q), 1);
		} else {
			cr_expect_eq(calls[i].r.status, 500, "%d %s", calls[i].r.status,
				     calls[i].r.body);
			cr_expect_null(
				strstr(calls[i].r.body ? calls[i].r.body : "", "unreadable"));
		}
		response_free(&calls[i].r);
	}
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-broken'"), 1);
}

/* --- transient failures are 503, never 500 ---------------------------------------------------- */

Test(outcomes, a_write_that_keeps_losing_races_is_503_with_retry_after_and_the_others_commit)
{
	struct call calls[4];
	char retry_after[16] = "";

	/* Every attempt at a 'race' deposit fails as a serialization failure would. */
	PQclear(sql(db,
		    "CREATE FUNCTION lose_race() RETURNS trigger LANGUAGE plpgsql AS $$ "
		    "BEGIN IF NEW.data->>'reference' = 'race' THEN RAISE EXCEPTION 'lost a race' "
		    "USING ERRCODE = 'serialization_failure'; END IF; RETURN NEW; END $$"));
	PQclear(sql(db, "CREATE TRIGGER lose_race BEFORE INSERT ON events "
			"FOR EACH ROW EXECUTE FUNCTION lose_race()"));
	start_command("30000", "20000");
	open_account("starter");
	open_account("r");
	memset(calls, 0, sizeof(calls));
	for (int i = 0; i < 4; i++) {
		snprintf(calls[i].path, sizeof(calls[i].path), "/accounts/r/deposits");
		snprintf(calls[i].body, sizeof(calls[i].body),
			 "{\"amount\":10,\"reference\":\"%s\"}", i == 0 ? "race" : "calm");
	}
	send_as_one_batch(calls, 4);

	cr_expect_eq(calls[0].r.status, 503, "%d %s", calls[0].r.status, calls[0].r.body);
	cr_expect_str_eq(code_of(&calls[0].r), "unavailable", "%s", calls[0].r.body);
	cr_expect(response_header(&calls[0].r, "Retry-After", retry_after, sizeof(retry_after)));
	for (int i = 1; i < 4; i++)
		cr_expect_eq(calls[i].r.status, 201, "%d %s", calls[i].r.status, calls[i].r.body);
	for (int i = 0; i < 4; i++)
		response_free(&calls[i].r);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE data->>'reference' = 'race'"),
		     0);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE data->>'reference' = 'calm'"),
		     3);
}

Test(outcomes, a_load_that_postgresql_ends_at_its_deadline_is_503_with_retry_after)
{
	struct response r;
	char retry_after[16] = "";
	PGconn *lock;

	start_command("20000", "500");
	open_account("cold");
	/* A new process: "cold" is not in its cache, so the deposit must load it. */
	harness_stop(&svc);
	harness_start_command(&svc, db);
	lock = lock_events("ACCESS EXCLUSIVE");
	r = post(&svc, "/accounts/cold/deposits", "{\"amount\":3}", NULL);
	release(lock);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "unavailable", "%s", r.body);
	cr_assert(response_header(&r, "Retry-After", retry_after, sizeof(retry_after)));
	response_free(&r);
	r = post(&svc, "/accounts/cold/deposits", "{\"amount\":3}", NULL);
	cr_assert_eq(r.status, 201, "%d %s", r.status, r.body);
	response_free(&r);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-cold'"), 2);
}

/* --- the PostgreSQL client itself ------------------------------------------------------------ */

struct pg_probe {
	struct event_base *base;
	bool connected, finished;
	enum pg_run_status status;
	size_t n, ok;
	char sqlstate[8];
	char first[64]; /* the first result's first value, if any */
};

static void probe_connected(void *arg)
{
	struct pg_probe *p = arg;

	p->connected = true;
	event_base_loopbreak(p->base);
}

static void probe_done(void *arg, const struct pg_outcome *out)
{
	struct pg_probe *p = arg;

	p->finished = true;
	p->status = out->status;
	p->n = out->n;
	for (size_t i = 0; i < out->n; i++)
		p->ok += PQresultStatus(out->results[i]) == PGRES_TUPLES_OK ||
			 PQresultStatus(out->results[i]) == PGRES_COMMAND_OK;
	snprintf(p->sqlstate, sizeof(p->sqlstate), "%s", pg_sqlstate(out->commit_error));
	if (out->n > 0 && PQresultStatus(out->results[0]) == PGRES_TUPLES_OK &&
	    PQntuples(out->results[0]) > 0)
		snprintf(p->first, sizeof(p->first), "%s", PQgetvalue(out->results[0], 0, 0));
	event_base_loopbreak(p->base);
}

/* Run until `flag` is set, for at most 30 s. */
static void probe_wait(struct pg_probe *p, const bool *flag)
{
	struct timeval tick = { 0, 100000 };
	double deadline = harness_now() + 30;

	while (!*flag) {
		cr_assert(harness_now() < deadline, "the PostgreSQL client did not finish in time");
		event_base_loopexit(p->base, &tick);
		event_base_dispatch(p->base);
	}
}

static struct pg *probe_open(struct pg_probe *p, const struct log *lg)
{
	char conninfo[512];
	struct pg *pg;
	struct pg_config cfg = {
		.application_name = "probe", .log = lg, .on_connect = probe_connected, .arg = p
	};

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	cfg.conninfo = conninfo;
	p->base = event_base_new();
	cfg.base = p->base;
	cr_assert_eq(pg_open(&pg, &cfg), 0);
	probe_wait(p, &p->connected);
	return pg;
}

Test(outcomes, a_run_may_queue_more_statements_than_any_fixed_array_would_hold)
{
	struct log lg = { .service = "test", .level = LOG_ERROR };
	struct pg_probe p = { 0 };
	struct pg *pg = probe_open(&p, &lg);
	size_t n = 10000;

	for (size_t i = 0; i < n; i++)
		cr_assert(pg_queue_sql(pg, "SELECT 1", 0, NULL), "statement %zu refused", i);
	cr_assert(pg_run(pg, probe_done, &p));
	probe_wait(&p, &p.finished);
	cr_assert_eq(p.status, PG_RUN_DONE);
	cr_assert_eq(p.n, n);
	cr_assert_eq(p.ok, n);
	pg_close(&pg);
	event_base_free(p.base);
}

/* Every service session has JIT compilation off, whatever the server's setting: a
 * time-travel read over a long stream went over jit_above_cost and took 0.5 s. */
Test(outcomes, service_sessions_never_compile_statements_just_in_time)
{
	struct log lg = { .service = "test", .level = LOG_ERROR };
	struct pg_probe p = { 0 };
	struct pg *pg;
	char alter[160];

	/* This test's own database, so that the setting does not reach other tests. */
	snprintf(alter, sizeof(alter), "ALTER DATABASE \"%s\" SET jit = on", db);
	PQclear(sql(db, alter));
	pg = probe_open(&p, &lg);
	cr_assert(pg_queue_sql(pg, "SELECT current_setting('jit')", 0, NULL));
	cr_assert(pg_run(pg, probe_done, &p));
	probe_wait(&p, &p.finished);
	cr_assert_eq(p.status, PG_RUN_DONE);
	cr_assert_str_eq(p.first, "off");
	pg_close(&pg);
	event_base_free(p.base);
}

Test(outcomes, a_failure_at_commit_reaches_the_caller_as_commit_failed)
{
	struct log lg = { .service = "test", .level = LOG_ERROR };
	struct pg_probe p = { 0 };
	struct pg *pg;

	PQclear(sql(db, "CREATE TABLE probe (a int)"));
	PQclear(sql(db,
		    "CREATE FUNCTION probe_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
		    "BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'check_violation'; "
		    "END $$"));
	PQclear(sql(db,
		    "CREATE CONSTRAINT TRIGGER probe_refuse AFTER INSERT ON probe "
		    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_refuse()"));
	pg = probe_open(&p, &lg);
	cr_assert(pg_queue_sql(pg, "INSERT INTO probe VALUES (1)", 0, NULL));
	cr_assert(pg_queue_sql(pg, "INSERT INTO probe VALUES (2)", 0, NULL));
	cr_assert(pg_run(pg, probe_done, &p));
	probe_wait(&p, &p.finished);
	cr_assert_eq(p.status, PG_RUN_COMMIT_FAILED);
	cr_assert_eq(p.ok, 2, "every statement succeeded before the COMMIT");
	cr_assert_str_eq(p.sqlstate, "23514");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM probe"), 0);
	/* The connection stays usable. */
	p.finished = false;
	p.ok = 0;
	cr_assert(pg_ready(pg));
	cr_assert(pg_queue_sql(pg, "SELECT 1", 0, NULL));
	cr_assert(pg_run(pg, probe_done, &p));
	probe_wait(&p, &p.finished);
	cr_assert_eq(p.status, PG_RUN_DONE);
	cr_assert_eq(p.ok, 1);
	pg_close(&pg);
	event_base_free(p.base);
}
