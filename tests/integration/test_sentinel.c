/* Redis through Sentinel (DAYBOOK_REDIS=redis-sentinel://...): the projector and the
 * query service find the primary the Sentinel names, and find the new one after a
 * failover. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static char db[64], primary_url[HARNESS_REDIS_URL_MAX], replica_url[HARNESS_REDIS_URL_MAX],
	sentinel_url[HARNESS_REDIS_URL_MAX];
static struct service command, projector, query, primary, replica, sentinel;

static void setup(void)
{
	harness_db_create(db, sizeof(db));
	harness_start_command(&command, db);
	harness_start_redis(&primary, false, primary_url, sizeof(primary_url));
	harness_start_sentinel(&sentinel, primary.port, sentinel_url, sizeof(sentinel_url));
}

static void teardown(void)
{
	harness_stop(&query);
	harness_stop(&projector);
	harness_stop(&command);
	harness_kill(&sentinel);
	harness_kill(&replica);
	harness_kill(&primary);
}

TestSuite(sentinel, .init = setup, .fini = teardown, .timeout = 120);

static void must(const char *path, const char *body)
{
	harness_post_created(&command, path, body);
}

static redisReply *cmd(redisContext *c, const char *fmt, ...)
{
	va_list ap;
	redisReply *r;

	va_start(ap, fmt);
	r = redisvCommand(c, fmt, ap);
	va_end(ap);
	cr_assert(r, "%s: %s", fmt, c->errstr);
	return r;
}

/* True when CLIENT LIST of the Redis at url shows a client named `name`. */
static bool has_client(const char *url, const char *name)
{
	redisContext *c = harness_redis(url);
	redisReply *r = cmd(c, "CLIENT LIST");
	char want[96];
	bool found;

	snprintf(want, sizeof(want), "name=%s ", name);
	found = r->type == REDIS_REPLY_STRING && strstr(r->str, want);
	freeReplyObject(r);
	redisFree(c);
	return found;
}

Test(sentinel, the_projector_and_the_query_service_find_the_primary_through_sentinel)
{
	const char *auth[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct response r;

	harness_start_projector(&projector, db, sentinel_url);
	harness_start_query(&query, db, sentinel_url);
	must("/accounts", "{\"id\":\"s-1\",\"name\":\"S\",\"currency\":\"EUR\"}");
	must("/accounts/s-1/deposits", "{\"amount\":700}");
	harness_wait_caught_up(db, primary_url, 30);
	harness_assert_redis_matches_sql(db, primary_url);
	cr_assert(has_client(primary_url, "daybook-query"),
		  "the query service is not connected to the primary");
	r = http_request(query.port, "GET", "/accounts/s-1", auth, NULL, 10);
	cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 700);
	response_free(&r);
}

/* A replica of the primary, both able to replicate as daybook-ops. */
static void start_replica(void)
{
	redisContext *p, *rc;
	redisReply *rep;

	harness_start_redis(&replica, false, replica_url, sizeof(replica_url));
	p = harness_redis(primary_url);
	rc = harness_redis(replica_url);
	freeReplyObject(cmd(p, "CONFIG SET masteruser daybook-ops"));
	freeReplyObject(cmd(p, "CONFIG SET masterauth test-ops-password"));
	freeReplyObject(cmd(rc, "CONFIG SET masteruser daybook-ops"));
	freeReplyObject(cmd(rc, "CONFIG SET masterauth test-ops-password"));
	rep = cmd(rc, "REPLICAOF 127.0.0.1 %d", primary.port);
	cr_assert_neq(rep->type, REDIS_REPLY_ERROR, "%s", rep->str);
	freeReplyObject(rep);
	redisFree(p);
	redisFree(rc);
}

/* Fail over by hand once the Sentinel knows the replica (it learns of it from the
 * primary's INFO, every few seconds), and wait until the replica is the primary. */
static void fail_over(void)
{
	redisContext *rc, *s = redisConnect("127.0.0.1", sentinel.port);
	redisReply *rep;
	double end;
	bool done = false;

	cr_assert(s && !s->err);
	end = harness_now() + 60;
	while (!done && harness_now() < end) {
		rep = cmd(s, "SENTINEL FAILOVER daybook");
		done = rep->type != REDIS_REPLY_ERROR;
		freeReplyObject(rep);
		if (!done)
			usleep(200000);
	}
	cr_assert(done, "the Sentinel did not fail over");
	redisFree(s);
	/* The Sentinel closes the clients' connections as it reconfigures the servers:
	 * a new one for each look. */
	end = harness_now() + 30;
	for (;;) {
		rc = harness_redis(replica_url);
		rep = redisCommand(rc, "ROLE");
		done = rep && rep->type == REDIS_REPLY_ARRAY &&
		       strcmp(rep->element[0]->str, "master") == 0;
		if (rep)
			freeReplyObject(rep);
		redisFree(rc);
		if (done)
			break;
		cr_assert_lt(harness_now(), end, "the replica was not promoted");
		usleep(100000);
	}
}

Test(sentinel, after_a_failover_the_projector_writes_to_the_promoted_replica)
{
	start_replica();
	harness_start_projector(&projector, db, sentinel_url);
	must("/accounts", "{\"id\":\"s-2\",\"name\":\"S\",\"currency\":\"EUR\"}");
	harness_wait_caught_up(db, primary_url, 30);
	fail_over();

	/* New events reach the promoted replica: the projector asked the Sentinel again. */
	must("/accounts/s-2/deposits", "{\"amount\":300}");
	harness_wait_caught_up(db, replica_url, 60);
	harness_assert_redis_matches_sql(db, replica_url);
	cr_assert(has_client(replica_url, "daybook-projector"),
		  "the projector is not connected to the new primary");
}

/* The query service's read cache after a failover: its connections follow the new
 * primary, the cache starts over there, and a change made after it is seen. */
Test(sentinel, after_a_failover_the_query_cache_shows_changes_made_on_the_new_primary)
{
	const char *auth[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	const char *env[] = { "DAYBOOK_QUERY_WORKERS",
			      "1",
			      "DAYBOOK_QUERY_CACHE_LEASE_MS",
			      "600000",
			      "DAYBOOK_QUERY_CACHE_BYTES",
			      "16777216",
			      NULL };
	double end;
	long long balance = 0;

	start_replica();
	harness_start_projector(&projector, db, sentinel_url);
	harness_start_query_env(&query, db, sentinel_url, env);
	must("/accounts", "{\"id\":\"s-3\",\"name\":\"S\",\"currency\":\"EUR\"}");
	must("/accounts/s-3/deposits", "{\"amount\":100}");
	harness_wait_caught_up(db, primary_url, 30);
	/* Read until an answer comes from the cache. */
	for (end = harness_now() + 20;; usleep(2000)) {
		double before = harness_metric(&query,
					       "daybook_query_reads_total{model=\"cache\"}");
		struct response r = http_request(query.port, "GET", "/accounts/s-3", auth, NULL,
						 10);
		cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
		response_free(&r);
		if (harness_metric(&query, "daybook_query_reads_total{model=\"cache\"}") > before)
			break;
		cr_assert_lt(harness_now(), end, "no read came from the cache");
	}
	fail_over();
	must("/accounts/s-3/deposits", "{\"amount\":50}");
	for (end = harness_now() + 30; balance != 150; usleep(5000)) {
		struct response r = http_request(query.port, "GET", "/accounts/s-3", auth, NULL,
						 10);
		cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
		balance = json_integer_value(json_object_get(r.json, "balance"));
		response_free(&r);
		cr_assert_lt(harness_now(), end, "the account still shows %lld, not 150", balance);
	}
	harness_wait_caught_up(db, replica_url, 60);
	cr_assert(has_client(replica_url, "daybook-query-invalidations"),
		  "the read cache's connection did not follow the new primary");
}
