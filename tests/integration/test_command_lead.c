/* Leadership of the write side (SPEC §5, sql/012): several daybook-command instances on
 * one database; one leads and writes, the others stand by, not ready, and take over
 * when it dies or hangs; a deposed leader's batch is fenced and commits nothing. Every
 * acknowledged write is in the log exactly once. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static char db[64];

static void setup(void)
{
	harness_db_create(db, sizeof(db));
}

TestSuite(command_lead, .init = setup, .timeout = 180);

/* POST with a request id (tagging the instance it went to) and an optional key. */
static struct response send_write(const struct service *svc, const char *path, const char *body,
				  const char *request_id, const char *key, double timeout)
{
	char rid[160], k[160];
	const char *headers[5] = { "Authorization: Bearer " TOKEN_WRITE,
				   "Content-Type: application/json", rid, NULL, NULL };

	snprintf(rid, sizeof(rid), "X-Request-Id: %s", request_id);
	if (key) {
		snprintf(k, sizeof(k), "Idempotency-Key: %s", key);
		headers[3] = k;
	}
	return http_request(svc->port, "POST", path, headers, body, timeout);
}

static const char *code_of(const struct response *r)
{
	json_t *c = r->json ? json_object_get(r->json, "code") : NULL;
	return json_is_string(c) ? json_string_value(c) : "";
}

static int readyz(const struct service *svc, char *body, size_t len)
{
	struct response r = http_request(svc->port, "GET", "/readyz", NULL, NULL, 2);
	int status = r.status;

	if (body)
		snprintf(body, len, "%s", r.body ? r.body : "");
	response_free(&r);
	return status;
}

static void must(const struct service *svc, const char *path, const char *body)
{
	struct response r = send_write(svc, path, body, "setup", NULL, 30);
	cr_assert_eq(r.status, 201, "%s %s: %d %s", path, body, r.status, r.body);
	response_free(&r);
}

/* Wait until svc says ready; the time it took from `since`. */
static double wait_leading(const struct service *svc, double since, double deadline,
			   const char *what)
{
	while (readyz(svc, NULL, 0) != 200) {
		cr_assert(harness_now() < deadline, "%s", what);
		usleep(20000);
	}
	return harness_now() - since;
}

/* --- a client that keeps writing to whichever instance takes its writes ----------- */

struct client {
	const struct service *svc[2];
	const char tag[2][4]; /* the request id's prefix per instance */
	atomic_bool stop;
	atomic_bool pause, paused; /* hold between writes (none in flight) while pause is set */
	pthread_t thread;
	char **acked; /* the keys answered 201 */
	size_t nacked, cap;
	int retries;
	char unexpected[512]; /* an answer that should not have come, "" if none */
};

/* Deposits of 1 to account "load", each with its own Idempotency-Key, retried with the
 * same key on the other instance after any answer but 201 (a 503 not_leader, a 409 in
 * progress, a timeout, an outcome unknown) until acknowledged. */
static void *client_loop(void *arg)
{
	struct client *c = arg;
	int cur = 0;

	for (int i = 0; !atomic_load(&c->stop); i++) {
		char key[32], rid[64];
		while (atomic_load(&c->pause) && !atomic_load(&c->stop)) {
			atomic_store(&c->paused, true);
			usleep(5000);
		}
		atomic_store(&c->paused, false);
		snprintf(key, sizeof(key), "load-%d", i);
		for (int attempt = 0; !atomic_load(&c->stop); attempt++) {
			struct response r;
			snprintf(rid, sizeof(rid), "%s-%d-%d", c->tag[cur], i, attempt);
			r = send_write(c->svc[cur], "/accounts/load/deposits", "{\"amount\":1}",
				       rid, key, 2);
			if (r.status == 201) {
				if (c->nacked == c->cap) {
					c->cap = c->cap ? 2 * c->cap : 256;
					c->acked = realloc(c->acked, c->cap * sizeof(*c->acked));
				}
				c->acked[c->nacked] = strdup(key);
				__atomic_store_n(&c->nacked, c->nacked + 1, __ATOMIC_RELEASE);
				response_free(&r);
				break;
			}
			if (r.status != 0 && r.status != 503 && r.status != 409) {
				/* Criterion's asserts belong to the test's thread: report at the end. */
				snprintf(c->unexpected, sizeof(c->unexpected), "%d %s", r.status,
					 r.body ? r.body : "");
				atomic_store(&c->stop, true);
			}
			response_free(&r);
			c->retries++;
			cur = 1 - cur;
			usleep(20000);
		}
	}
	return NULL;
}

/* Wait until the client has n writes acknowledged. */
static void client_wait(struct client *c, size_t n)
{
	double deadline = harness_now() + 60;

	while (__atomic_load_n(&c->nacked, __ATOMIC_ACQUIRE) < n) {
		cr_assert(!atomic_load(&c->stop), "the client stopped: %s", c->unexpected);
		cr_assert(harness_now() < deadline,
			  "the client got %zu writes acknowledged in 60 s",
			  __atomic_load_n(&c->nacked, __ATOMIC_ACQUIRE));
		usleep(10000);
	}
}

/* Hold the client between writes, or let it go on. */
static void client_pause(struct client *c, bool pause)
{
	double deadline = harness_now() + 30;

	atomic_store(&c->pause, pause);
	while (pause && !atomic_load(&c->paused)) {
		cr_assert(harness_now() < deadline, "the client did not pause");
		usleep(5000);
	}
}

static void client_start(struct client *c)
{
	cr_assert_eq(pthread_create(&c->thread, NULL, client_loop, c), 0);
}

/* Stop the client; every key it saw acknowledged is in the log exactly once, and no
 * key twice. */
static void client_stop_and_check(struct client *c)
{
	char *lit;
	size_t len = 16;
	PGresult *r;
	char *q;

	atomic_store(&c->stop, true);
	pthread_join(c->thread, NULL);
	cr_assert_eq(c->unexpected[0], '\0', "a write got %s", c->unexpected);
	cr_assert_gt(c->nacked, 0, "the client got no write acknowledged");
	for (size_t i = 0; i < c->nacked; i++)
		len += strlen(c->acked[i]) + 1;
	lit = calloc(1, len);
	strcat(lit, "{");
	for (size_t i = 0; i < c->nacked; i++) {
		if (i)
			strcat(lit, ",");
		strcat(lit, c->acked[i]);
		free(c->acked[i]);
	}
	strcat(lit, "}");
	q = malloc(len + 512);
	snprintf(q, len + 512,
		 "SELECT count(*) FROM unnest('%s'::text[]) k WHERE (SELECT count(*) FROM events e "
		 "WHERE e.stream = 'account-load' AND e.metadata->>'idempotency_key' = k) <> 1",
		 lit);
	cr_assert_eq(sql_int(db, q), 0, "an acknowledged write is not in the log exactly once");
	r = sql(db, "SELECT metadata->>'idempotency_key' FROM events WHERE stream = 'account-load' "
		    "AND metadata ? 'idempotency_key' GROUP BY 1 HAVING count(*) > 1");
	cr_assert_eq(PQntuples(r), 0, "a write was applied twice (key %s)",
		     PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
	fprintf(stderr, "client: %zu writes acknowledged, %d retries\n", c->nacked, c->retries);
	free(q);
	free(lit);
	free(c->acked);
}

/* --- tests ------------------------------------------------------------------------ */

Test(command_lead, of_two_instances_exactly_one_is_ready_and_the_standby_refuses_writes)
{
	struct service a, b;
	struct response r;
	char body[512], retry[16];

	harness_start_command(&a, db);
	harness_start_command_standby(&b, db, NULL);
	cr_assert_eq(readyz(&a, NULL, 0), 200);
	/* The standby may still be connecting to PostgreSQL (its writes are then 503
	 * unavailable, not not_leader): wait until its /readyz says PostgreSQL is there. */
	for (double end = harness_now() + 20;; usleep(20000)) {
		cr_assert_eq(readyz(&b, body, sizeof(body)), 503, "two instances are ready");
		if (strstr(body, "\"postgresql\":\"ok\""))
			break;
		cr_assert(harness_now() < end, "the standby never reached PostgreSQL: %s", body);
	}
	cr_assert(strstr(body, "\"standby\""), "the standby's /readyz says: %s", body);
	must(&a, "/accounts", "{\"id\":\"one\",\"name\":\"One\",\"currency\":\"EUR\"}");
	r = send_write(&b, "/accounts/one/deposits", "{\"amount\":5}", "to-standby", NULL, 10);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "not_leader", "%s", r.body);
	cr_assert(response_header(&r, "Retry-After", retry, sizeof(retry)), "no Retry-After");
	response_free(&r);
	cr_assert_eq(
		sql_int(db,
			"SELECT count(*) FROM events WHERE metadata->>'request_id' = 'to-standby'"),
		0);
	cr_assert_eq(harness_metric(&a, "daybook_command_leader"), 1);
	cr_assert_eq(harness_metric(&b, "daybook_command_leader"), 0);
	cr_assert_eq(harness_stop(&b), 0);
	cr_assert_eq(harness_stop(&a), 0);
}

Test(command_lead, a_standby_takes_writes_within_3_s_of_the_leader_being_killed)
{
	struct service a, b;
	struct client c = { .tag = { "A", "B" } };
	struct response r;
	double t0, took;

	harness_start_command(&a, db);
	harness_start_command_standby(&b, db, NULL);
	must(&a, "/accounts", "{\"id\":\"load\",\"name\":\"Load\",\"currency\":\"EUR\"}");
	c.svc[0] = &a;
	c.svc[1] = &b;
	client_start(&c);
	client_wait(&c, 20);
	kill(a.pid, SIGKILL);
	t0 = harness_now();
	/* A write to the standby with one key, retried until it is taken. */
	for (int attempt = 0;; attempt++) {
		char rid[32];
		snprintf(rid, sizeof(rid), "probe-%d", attempt);
		r = send_write(&b, "/accounts/load/deposits", "{\"amount\":1}", rid, "probe", 2);
		if (r.status == 201)
			break;
		cr_assert(r.status == 503 || r.status == 409, "%d %s", r.status, r.body);
		response_free(&r);
		cr_assert(harness_now() < t0 + 3,
			  "the standby took no write within 3 s of the kill");
		usleep(20000);
	}
	took = harness_now() - t0;
	response_free(&r);
	fprintf(stderr, "kill -9 of the leader: the standby took writes after %.2f s\n", took);
	harness_kill(&a);
	cr_assert_eq(readyz(&b, NULL, 0), 200);
	client_wait(&c, 40);
	client_stop_and_check(&c);
	cr_assert_eq(
		sql_int(db,
			"SELECT count(*) FROM events WHERE metadata->>'idempotency_key' = 'probe'"),
		1);
	cr_assert_eq(harness_stop(&b), 0);
}

/* One write, sent from a thread of its own (it blocks while its batch waits). */
struct held {
	const struct service *svc;
	struct response r;
	pthread_t thread;
};

static void *send_held(void *arg)
{
	struct held *h = arg;

	h->r = send_write(h->svc, "/accounts/held/deposits", "{\"amount\":1}", "A-held", NULL, 90);
	return NULL;
}

/* The backend pid's state in pg_stat_activity ("" when gone), into out. */
static void backend_state(long long pid, char *out, size_t len)
{
	char q[160];
	PGresult *r;

	snprintf(q, sizeof(q),
		 "SELECT coalesce(state, '') || '/' || coalesce(wait_event_type, '') "
		 "FROM pg_stat_activity WHERE pid = %lld",
		 pid);
	r = sql(db, q);
	snprintf(out, len, "%s", PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
}

Test(command_lead, a_frozen_leader_is_replaced_within_10_s_and_its_batch_in_flight_is_fenced)
{
	/* A may wait on a lock for as long as it takes: only the fence ends its batch. */
	const char *const patient[] = { "DAYBOOK_STATEMENT_TIMEOUT_MS", "0",
					"DAYBOOK_WRITE_TIMEOUT_MS", "60000", NULL };
	struct service a, b;
	struct client c = { .tag = { "A", "B" } };
	struct held held = { 0 };
	PGconn *blocker = harness_connect_as(db, NULL);
	struct response r;
	double t0, took, deadline;
	long long writer, e1;
	char state[64], code[6], body[256];

	harness_start_command_env(&a, db, patient);
	harness_start_command_standby(&b, db, NULL);
	must(&a, "/accounts", "{\"id\":\"load\",\"name\":\"Load\",\"currency\":\"EUR\"}");
	must(&a, "/accounts", "{\"id\":\"held\",\"name\":\"Held\",\"currency\":\"EUR\"}");
	e1 = sql_int(db, "SELECT epoch FROM command_leases");
	/* The lease learns A's writing session with a renewal once A has connected. */
	deadline = harness_now() + 10;
	while ((writer = sql_int(db, "SELECT writer_pid FROM command_leases")) <= 0) {
		cr_assert(harness_now() < deadline, "the lease never named A's writing session");
		usleep(50000);
	}
	c.svc[0] = &a;
	c.svc[1] = &b;
	client_start(&c);
	client_wait(&c, 20);
	/* Nothing else of the client's in A's batch: it is the held deposit alone. */
	client_pause(&c, true);
	/* A batch of A's in flight while A is frozen: its insert waits for the blocker's
	 * table lock (which, unlike a row written, holds no transaction id, so the readers'
	 * horizon of the cluster, which other tests share, is not held back). Reads of the
	 * log go on; B's writes wait until it is released. */
	cr_assert_str_eq(harness_sqlstate(blocker, "BEGIN; LOCK TABLE events IN SHARE MODE", code),
			 "", "%s", PQerrorMessage(blocker));
	held.svc = &a;
	cr_assert_eq(pthread_create(&held.thread, NULL, send_held, &held), 0);
	deadline = harness_now() + 20;
	for (backend_state(writer, state, sizeof(state)); strcmp(state, "active/Lock") != 0;
	     backend_state(writer, state, sizeof(state))) {
		cr_assert(harness_now() < deadline, "A's batch did not wait for the lock (%s)",
			  state);
		usleep(10000);
	}
	kill(a.pid, SIGSTOP);
	t0 = harness_now();
	/* The successor does not know A's writing session (as when A reconnected just
	 * before it froze): it cannot end it, and only the fence stands between A's batch
	 * and a commit. */
	sql_int(db, "WITH u AS (UPDATE command_leases SET writer_pid = NULL RETURNING 1) "
		    "SELECT count(*) FROM u");
	client_pause(&c, false);
	took = wait_leading(&b, t0, t0 + 10, "no standby led within 10 s of the leader freezing");
	fprintf(stderr, "SIGSTOP of the leader: the standby led after %.2f s\n", took);
	cr_assert_gt(sql_int(db, "SELECT epoch FROM command_leases"), e1);
	/* Let A's batch go on: it reaches its fence, which fails, while A is still frozen. */
	cr_assert_str_eq(harness_sqlstate(blocker, "ROLLBACK", code), "");
	deadline = harness_now() + 20;
	for (backend_state(writer, state, sizeof(state)); strncmp(state, "active", 6) == 0;
	     backend_state(writer, state, sizeof(state))) {
		cr_assert(harness_now() < deadline,
			  "A's batch did not end after the lock was released");
		usleep(10000);
	}
	cr_assert_neq(state[0], '\0',
		      "A's writing session was ended: the fence was not what "
		      "stopped its batch");
	/* A deliberate hold, not a wait: A stays frozen 12 s, well past its lease. */
	while (harness_now() < t0 + 12)
		usleep(50000);
	kill(a.pid, SIGCONT);
	/* Awake, A writes nothing: neither its batch in flight nor a new write. */
	r = send_write(&a, "/accounts/held/deposits", "{\"amount\":1}", "A-woken", NULL, 30);
	cr_assert_eq(r.status, 503, "a deposed leader answered %d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "not_leader", "%s", r.body);
	response_free(&r);
	pthread_join(held.thread, NULL);
	cr_assert_eq(held.r.status, 503, "the frozen leader's batch was answered %d %s",
		     held.r.status, held.r.body);
	response_free(&held.r);
	cr_assert_geq(harness_metric(&a, "daybook_append_fenced_total"), 1,
		      "A's batch was not refused by the fence");
	deadline = harness_now() + 10;
	while (readyz(&a, body, sizeof(body)) != 503 || !strstr(body, "standby")) {
		cr_assert(harness_now() < deadline, "the woken leader does not stand by: %s", body);
		usleep(20000);
	}
	cr_assert_eq(readyz(&b, NULL, 0), 200);
	client_stop_and_check(&c);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-held'"), 1,
		     "a write of the deposed leader committed");
	/* Nothing sent to A committed after the first commit of the new leader B. */
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM events a WHERE a.metadata->>'request_id' LIKE 'A-%' "
			     "AND a.position > (SELECT min(position) FROM events "
			     "WHERE metadata->>'request_id' LIKE 'B-%')"),
		     0, "the old leader committed after the new leader's first commit");
	PQfinish(blocker);
	cr_assert_eq(harness_stop(&a), 0);
	cr_assert_eq(harness_stop(&b), 0);
}

Test(command_lead,
     a_leader_whose_lease_is_taken_stands_by_and_starts_from_the_log_when_it_leads_again)
{
	struct service a;
	PGconn *thief = harness_connect_as(db, NULL);
	PGresult *res;
	struct response r;
	long long e1, stolen;
	double deadline;

	harness_start_command(&a, db);
	must(&a, "/accounts", "{\"id\":\"x\",\"name\":\"X\",\"currency\":\"EUR\"}");
	must(&a, "/accounts/x/deposits", "{\"amount\":10}");
	e1 = sql_int(db, "SELECT epoch FROM command_leases");
	/* Another holder takes the lease (it expired, say, while A was cut off); its session
	 * stays open, so the lease stays taken, and A's writing session lives on. */
	res = PQexec(thief, "UPDATE command_leases SET expires_at = '-infinity'; "
			    "SELECT command_lease_claim('command', 'thief', 0, 3600, 0)");
	cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(thief));
	stolen = atoll(PQgetvalue(res, 0, 0));
	PQclear(res);
	cr_assert_gt(stolen, e1);
	/* A's next write is fenced (or its next renewal tells it first): 503, nothing written. */
	r = send_write(&a, "/accounts/x/deposits", "{\"amount\":1}", "after-theft", NULL, 30);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(code_of(&r), "not_leader", "%s", r.body);
	response_free(&r);
	cr_assert_eq(
		sql_int(db,
			"SELECT count(*) FROM events WHERE metadata->>'request_id' = 'after-theft'"),
		0);
	cr_assert(harness_wait_status(&a, "/readyz", 503, 5), "a deposed leader says ready");
	/* The other leader writes; then it goes away. */
	sql_int(db, "WITH i AS (INSERT INTO events (stream, version, type, data, metadata) VALUES "
		    "('account-x', 3, 'FundsDeposited', '{\"amount\":100}', '{}') "
		    "RETURNING 1) SELECT count(*) FROM i");
	PQfinish(thief);
	deadline = harness_now() + 10;
	wait_leading(&a, harness_now(), deadline,
		     "the lease of a closed session was not taken back");
	cr_assert_gt(sql_int(db, "SELECT epoch FROM command_leases"), stolen);
	/* The new term decides on the log, not on what A cached before: no conflict. */
	r = send_write(&a, "/accounts/x/deposits", "{\"amount\":1}", "again", NULL, 30);
	cr_assert_eq(r.status, 201, "%d %s", r.status, r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 111, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 4, "%s", r.body);
	response_free(&r);
	cr_assert_eq(harness_metric(&a, "daybook_append_conflicts_total"), 0,
		     "the new term decided on a stale cache");
	cr_assert_eq(harness_stop(&a), 0);
}

Test(command_lead, a_batch_with_a_stale_epoch_fails_with_dbf01_and_writes_nothing)
{
	PGconn *cmd = harness_connect_as(db, "daybook_command");
	PGconn *su = harness_connect_as(db, NULL);
	PGresult *res;
	long long e1, e2;
	char q[512], code[6];
	const char *roles[] = { "daybook_projector", "daybook_query" };

	res = PQexec(cmd, "SELECT command_lease_claim('command', 'x', 0, 30, pg_backend_pid())");
	cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(cmd));
	e1 = atoll(PQgetvalue(res, 0, 0));
	PQclear(res);
	cr_assert_gt(e1, 0);
	snprintf(q, sizeof(q),
		 "BEGIN; INSERT INTO events (stream, version, type, data, metadata) VALUES "
		 "('account-f', 1, 'AccountOpened', '{\"account_id\":\"f\",\"name\":\"F\","
		 "\"currency\":\"EUR\",\"overdraft_limit\":0}', '{}'); "
		 "SELECT command_fence(%lld); COMMIT",
		 e1);
	cr_assert_str_eq(harness_sqlstate(cmd, q, code), "", "%s", PQerrorMessage(cmd));
	/* Another instance takes over (the lease expired). */
	res = PQexec(su, "UPDATE command_leases SET expires_at = '-infinity'; "
			 "SELECT command_lease_claim('command', 'y', 0, 30, 0)");
	cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(su));
	e2 = atoll(PQgetvalue(res, 0, 0));
	PQclear(res);
	cr_assert_gt(e2, e1);
	/* The deposed holder's next batch rolls back at its fence. */
	snprintf(q, sizeof(q),
		 "BEGIN; INSERT INTO events (stream, version, type, data, metadata) VALUES "
		 "('account-f', 2, 'FundsDeposited', '{\"amount\":5}', '{}'); "
		 "SELECT command_fence(%lld)",
		 e1);
	cr_assert_str_eq(harness_sqlstate(cmd, q, code), "DBF01", "%s", PQerrorMessage(cmd));
	cr_assert(strstr(PQerrorMessage(cmd), "command_fenced"), "%s", PQerrorMessage(cmd));
	cr_assert_str_eq(harness_sqlstate(cmd, "COMMIT", code), "");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-f'"), 1);
	/* No epoch at all is no lease either; the lease's own epoch passes. */
	cr_assert_str_eq(harness_sqlstate(cmd, "SELECT command_fence(0)", code), "DBF01");
	snprintf(q, sizeof(q), "SELECT command_fence(%lld)", e2);
	cr_assert_str_eq(harness_sqlstate(cmd, q, code), "", "%s", PQerrorMessage(cmd));
	/* The other service roles may neither read nor claim the write lease. */
	for (size_t i = 0; i < 2; i++) {
		PGconn *c = harness_connect_as(db, roles[i]);
		cr_assert_str_eq(harness_sqlstate(c, "SELECT epoch FROM command_leases", code),
				 "42501", "%s read the lease", roles[i]);
		cr_assert_str_eq(harness_sqlstate(c,
						  "SELECT command_lease_claim('command', 'i', 0, 30, 0)",
						  code),
				 "42501", "%s claimed the lease", roles[i]);
		cr_assert_str_eq(harness_sqlstate(c, "SELECT command_fence(1)", code), "42501");
		PQfinish(c);
	}
	PQfinish(su);
	PQfinish(cmd);
}
