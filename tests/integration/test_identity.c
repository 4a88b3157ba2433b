/* Redis read models are bound to the identity of the event store they were built from:
 * a database dropped and re-created, or restored from an older dump, under a Redis that
 * still holds the old models never serves them, and the projector builds its own. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis_command_projector(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(identity, .init = setup, .fini = teardown, .timeout = 180);

/* POST until 201: the command service may still be reconnecting to a new database. */
static void must(const char *path, const char *body)
{
	double end = harness_now() + 30;
	struct response r;

	for (;;) {
		r = post(&stack.command, path, body, NULL);
		if (r.status == 201 || harness_now() > end)
			break;
		response_free(&r);
		harness_wait_status(&stack.command, "/readyz", 200, 1);
	}
	cr_assert_eq(r.status, 201, "%s %s: %d %s", path, body, r.status, r.body);
	response_free(&r);
}

/* A statement on a database that is not the test's own (the cluster's default one). */
static void admin_sql(const char *statement)
{
	PGconn *c = PQconnectdb(getenv("DAYBOOK_TEST_PG"));
	PGresult *r = PQexec(c, statement);

	cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK, "%s: %s", statement, PQerrorMessage(c));
	PQclear(r);
	PQfinish(c);
}

static void identity_of(const char *name, char *out, size_t len)
{
	PGresult *r = sql(name, READMODEL_IDENTITY_SQL);

	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

/* The live generation is the store's (its identity) and holds the account's body. */
static bool redis_serves(const char *identity, const char *account, const char *needle)
{
	redisContext *c = harness_redis(stack.redis_url);
	redisReply *g = redisCommand(c, "GET " READMODEL_LIVE_KEY), *i = NULL, *j = NULL;
	bool ok = g && g->type == REDIS_REPLY_STRING;

	if (ok) {
		i = redisCommand(c, "GET dbk:g:%s:identity", g->str);
		j = redisCommand(c, "HGET dbk:g:%s:acct:%s j", g->str, account);
		ok = i && i->type == REDIS_REPLY_STRING && strcmp(i->str, identity) == 0 && j &&
		     j->type == REDIS_REPLY_STRING && strstr(j->str, needle);
	}
	freeReplyObject(g);
	freeReplyObject(i);
	freeReplyObject(j);
	redisFree(c);
	return ok;
}

/* Read the account until Redis serves the store's own generation with `fresh` in the
 * account: no answer may ever carry `stale` (the other store's data). */
static void reads_never_stale(const char *name, const char *account, const char *stale,
			      const char *fresh)
{
	const char *headers[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	char path[128], identity[READMODEL_IDENTITY_MAX];
	double end = harness_now() + 90;
	int fresh_reads = 0, reads = 0;

	identity_of(name, identity, sizeof(identity));
	snprintf(path, sizeof(path), "/accounts/%s", account);
	for (;;) {
		bool caught_up = redis_serves(identity, account, fresh);
		struct response r = http_request(stack.query.port, "GET", path, headers, NULL, 20);
		reads++;
		cr_assert(!(r.body && strstr(r.body, stale)), "read %d served the old data: %d %s",
			  reads, r.status, r.body);
		/* 500: read while the re-created database is not migrated yet. */
		cr_assert(r.status == 200 || r.status == 404 || r.status == 503 || r.status == 500,
			  "unexpected answer %d %s", r.status, r.body);
		if (r.status == 200 && strstr(r.body, fresh))
			fresh_reads++;
		response_free(&r);
		if (caught_up && fresh_reads > 0)
			break;
		usleep(10000); /* between polls */
		if (harness_now() > end) {
			harness_print_log(&stack.projector);
			cr_assert_fail("the projector did not build a generation of %s in time "
				       "(%d reads, %d fresh)",
				       identity, reads, fresh_reads);
		}
	}
	/* Now from Redis, and still the new data. */
	for (int k = 0; k < 20; k++) {
		struct response r = http_request(stack.query.port, "GET", path, headers, NULL, 20);
		cr_assert(r.status == 200 && strstr(r.body, fresh) && !strstr(r.body, stale),
			  "%d %s", r.status, r.body);
		response_free(&r);
	}
}

Test(identity, a_recreated_database_never_serves_the_old_databases_redis_models)
{
	char drop[128], create[128];

	harness_start_query(&stack.query, stack.db, stack.redis_url);
	must("/accounts", "{\"id\":\"alice\",\"name\":\"Old Alice\",\"currency\":\"EUR\"}");
	for (int i = 0; i < 8; i++)
		must("/accounts/alice/deposits", "{\"amount\":1000}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);

	/* Same name, new life; the projector and the query service keep running and
	 * reconnect. (The command service is restarted: its account cache is not what is
	 * tested here.) */
	harness_stop(&stack.command);
	snprintf(drop, sizeof(drop), "DROP DATABASE %s WITH (FORCE)", stack.db);
	snprintf(create, sizeof(create), "CREATE DATABASE %s", stack.db);
	admin_sql(drop);
	admin_sql(create);
	harness_migrate(stack.db);
	harness_start_command(&stack.command, stack.db);
	/* While it cannot reach PostgreSQL at all, the query service serves the Redis hits
	 * of the store it saw last (docs/query-api.md): from its first connection to the
	 * new database on, never again. */
	cr_assert(harness_wait_status(&stack.query, "/readyz", 200, 30));
	must("/accounts", "{\"id\":\"alice\",\"name\":\"New Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":300}");
	reads_never_stale(stack.db, "alice", "Old Alice", "\"balance\":300,");
	harness_assert_models_match_log(stack.db);
}

/* The command service's account cache is state of one database: a new session may be
 * another one (re-created here), whose log alone decides. */
Test(identity, the_command_service_forgets_its_accounts_when_the_database_is_recreated_under_it)
{
	char drop[128], create[128];
	struct response r;

	must("/accounts", "{\"id\":\"alice\",\"name\":\"Old Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":8000}");
	snprintf(drop, sizeof(drop), "DROP DATABASE %s WITH (FORCE)", stack.db);
	snprintf(create, sizeof(create), "CREATE DATABASE %s", stack.db);
	admin_sql(drop);
	admin_sql(create);
	harness_migrate(stack.db);
	/* Kept running: it reconnects to the new database, where alice does not exist. */
	must("/accounts", "{\"id\":\"alice\",\"name\":\"New Alice\",\"currency\":\"EUR\"}");
	r = post(&stack.command, "/accounts/alice/deposits", "{\"amount\":300}", NULL);
	cr_assert_eq(r.status, 201, "%d %s", r.status, r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 300,
		     "the old database's balance leaked into the new one: %s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 2, "%s", r.body);
	response_free(&r);
}

Test(identity, a_database_restored_from_an_older_dump_never_serves_the_newer_redis_models)
{
	const char *bin = getenv("DAYBOOK_PG_BIN");
	char restored[80], create[128], conninfo[512], dump[256], cmd[2048];

	must("/accounts", "{\"id\":\"alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":100}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);

	/* The backup, then life goes on: Redis holds the later state. */
	snprintf(dump, sizeof(dump), "%s/%s.sql", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
		 stack.db);
	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	snprintf(cmd, sizeof(cmd), "'%s/pg_dump' -d '%s' -f '%s'",
		 bin && *bin ? bin : "/usr/lib/postgresql/15/bin", conninfo, dump);
	cr_assert(system(cmd) == 0, "%s failed", cmd);
	must("/accounts/alice/deposits", "{\"amount\":5000}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_stop(&stack.projector);
	harness_stop(&stack.command);

	/* Restored beside it (same cluster, so the log's txids stay in order), on the
	 * same Redis. */
	snprintf(restored, sizeof(restored), "%s_r", stack.db);
	snprintf(create, sizeof(create), "CREATE DATABASE %s", restored);
	admin_sql(create);
	harness_conninfo(restored, NULL, conninfo, sizeof(conninfo));
	snprintf(cmd, sizeof(cmd), "'%s/psql' -X -q -v ON_ERROR_STOP=1 -d '%s' -f '%s' >/dev/null",
		 bin && *bin ? bin : "/usr/lib/postgresql/15/bin", conninfo, dump);
	cr_assert(system(cmd) == 0, "%s failed", cmd);
	harness_start_query(&stack.query, restored, stack.redis_url);
	harness_start_projector(&stack.projector, restored, stack.redis_url);
	reads_never_stale(restored, "alice", "\"balance\":5100,", "\"balance\":100,");
}

/* daybook-admin args (NULL-terminated) on the test database and its Redis; its stdout
 * and stderr together into out (caller frees); returns the exit status. */
static int admin(const char *const *args, char **out)
{
	return harness_admin(stack.db, stack.redis_url, args, out);
}

/* A physical restore (a base backup, a point-in-time recovery) keeps the cluster, the
 * database and the deployment id, so Redis may hold models from after the restored
 * point: `migrate --new-identity` retires them. Here Redis is made to hold a "future"
 * balance while the services are down. */
Test(identity, a_new_identity_after_a_physical_restore_retires_the_generations_built_before)
{
	char before[READMODEL_IDENTITY_MAX], after[READMODEL_IDENTITY_MAX], gen[32], note[128];
	redisContext *c;
	redisReply *r;
	char *out;

	must("/accounts", "{\"id\":\"alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":100}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_stop(&stack.projector);
	identity_of(stack.db, before, sizeof(before));
	c = harness_redis(stack.redis_url);
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	snprintf(gen, sizeof(gen), "%s", r->str);
	freeReplyObject(r);
	freeReplyObject(
		redisCommand(c, "HSET dbk:g:%s:acct:alice v 99 j {\"balance\":777777}", gen));
	redisFree(c);

	cr_assert_eq(admin((const char *const[]){ "migrate", "--new-identity", NULL }, &out), 0,
		     "%s", out);
	identity_of(stack.db, after, sizeof(after));
	cr_assert_str_neq(before, after);
	cr_assert(strstr(out, after), "%s", out);
	free(out);
	/* For status as for readers, Redis now holds no live model of this store. */
	cr_assert_eq(admin((const char *const[]){ "status", "--json", NULL }, &out), 0, "%s", out);
	cr_assert(strstr(out, "\"redis\":{\"live_generation\":null"), "%s", out);
	free(out);

	harness_start_query(&stack.query, stack.db, stack.redis_url);
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	reads_never_stale(stack.db, "alice", "777777", "\"balance\":100,");
	/* The retired generation is left in place, and verify names it. */
	cr_assert_eq(admin((const char *const[]){ "verify", NULL }, &out), 0, "%s", out);
	snprintf(note, sizeof(note), "note: redis generation %s was built from another event store",
		 gen);
	cr_assert(strstr(out, note), "%s", out);
	free(out);
}

/* The same restore without the new identity: the live generation's checkpoint names an
 * event the restored log does not have. The projector does not adopt it (new events
 * would take those positions again and be skipped as replays): it copies SQL into a
 * new generation, which then follows the log. With `backlog`, events wait when the
 * projector starts: its first batch meets the generation (MOVED) before any status
 * check. */
static void restored_behind_redis(bool backlog)
{
	static const char *resyncs = "daybook_projection_redis_resyncs_total{projection=\"redis\","
				     "reason=\"ahead_of_log\"}";
	char gen[32], future[64], identity[READMODEL_IDENTITY_MAX], now[32], later[32];
	redisContext *c;
	redisReply *r;
	PGresult *head;
	double end;
	char *out;

	must("/accounts", "{\"id\":\"alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":100}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_stop(&stack.projector);
	/* Redis as it was before the restore: later events (a future balance, a checkpoint
	 * past the restored log's end). */
	head = sql(stack.db, "SELECT max(txid)::text, max(position) FROM events");
	snprintf(future, sizeof(future), "%lld.%lld", atoll(PQgetvalue(head, 0, 0)) + 40,
		 atoll(PQgetvalue(head, 0, 1)) + 60);
	PQclear(head);
	c = harness_redis(stack.redis_url);
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	snprintf(gen, sizeof(gen), "%s", r->str);
	freeReplyObject(r);
	freeReplyObject(
		redisCommand(c, "HSET dbk:g:%s:acct:alice v 99 j {\"balance\":777777}", gen));
	freeReplyObject(redisCommand(c, "SET dbk:g:%s:checkpoint %s", gen, future));
	if (backlog)
		must("/accounts/alice/deposits", "{\"amount\":1}");

	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	identity_of(stack.db, identity, sizeof(identity));
	snprintf(now, sizeof(now), "\"balance\":%d,", backlog ? 101 : 100);
	snprintf(later, sizeof(later), "\"balance\":%d,", backlog ? 106 : 105);
	for (end = harness_now() + 30; !redis_serves(identity, "alice", now); usleep(50000)) {
		if (harness_now() > end) {
			harness_print_log(&stack.projector);
			cr_assert_fail("the generation ahead of the log (%s at %s) is still live",
				       gen, future);
		}
	}
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING && strcmp(r->str, gen) != 0);
	freeReplyObject(r);
	cr_assert_geq(harness_metric(&stack.projector, resyncs), 1);
	/* The new generation follows the log: a later deposit is not taken for a replay. */
	must("/accounts/alice/deposits", "{\"amount\":5}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert(redis_serves(identity, "alice", later));
	redisFree(c);
	cr_assert_eq(admin((const char *const[]){ "verify", NULL }, &out), 0, "%s", out);
	free(out);
}

Test(identity, a_generation_ahead_of_a_restored_log_is_replaced_not_adopted)
{
	restored_behind_redis(false);
}

Test(identity, a_generation_ahead_of_a_restored_log_is_not_followed_by_a_backlog)
{
	restored_behind_redis(true);
}

static long long key_count(redisContext *c, const char *pattern)
{
	long long n = 0;
	char cursor[32] = "0";

	do {
		redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
		cr_assert(r && r->type == REDIS_REPLY_ARRAY && r->elements == 2);
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		n += (long long)r->element[1]->elements;
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	return n;
}

/* Another deployment's generation made live in our Redis (by mistake) is neither
 * served nor adopted, and neither the projector's sweep nor a rebuild deletes it. */
Test(identity, another_stores_generation_is_never_served_nor_deleted)
{
	redisContext *c;
	redisReply *r;
	long long ours, theirs;
	char *out;

	harness_start_query(&stack.query, stack.db, stack.redis_url);
	must("/accounts", "{\"id\":\"alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}");
	must("/accounts/alice/deposits", "{\"amount\":100}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	c = harness_redis(stack.redis_url);
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	ours = atoll(r->str);
	freeReplyObject(r);
	r = redisCommand(c, "INCR dbk:generation");
	theirs = r->integer;
	freeReplyObject(r);
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:identity other-deployment", theirs));
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:layout " READMODEL_REDIS_LAYOUT, theirs));
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:checkpoint 999999999.999999", theirs));
	r = redisCommand(c, "HSET dbk:g:%lld:acct:alice v 99 n 0 j %s", theirs,
			 "{\"name\":\"Foreign Alice\",\"balance\":424242}");
	cr_assert(r && r->type == REDIS_REPLY_INTEGER);
	freeReplyObject(r);
	freeReplyObject(redisCommand(c, "SET " READMODEL_LIVE_KEY " %lld", theirs));

	reads_never_stale(stack.db, "alice", "Foreign Alice", "\"balance\":100,");
	/* Our older generation is swept (its keys go soon after the switch); theirs stays. */
	for (double end = harness_now() + 30; harness_now() < end;) {
		char pattern[64];
		snprintf(pattern, sizeof(pattern), "dbk:g:%lld:*", ours);
		if (key_count(c, pattern) == 0)
			break;
		usleep(50000); /* between polls */
	}
	r = redisCommand(c, "HGET dbk:g:%lld:acct:alice j", theirs);
	cr_assert(r && r->type == REDIS_REPLY_STRING && strstr(r->str, "Foreign Alice"));
	freeReplyObject(r);

	cr_assert_eq(admin((const char *const[]){ "rebuild", "redis", NULL }, &out), 0, "%s", out);
	free(out);
	must("/accounts/alice/deposits", "{\"amount\":1}");
	reads_never_stale(stack.db, "alice", "Foreign Alice", "\"balance\":101,");
	/* The rebuild's and theirs: the generation it replaced may be left to the
	 * projector's sweep, which follows within seconds. */
	for (int i = 0; i < 200 && key_count(c, "dbk:g:*:identity") > 2; i++)
		usleep(50000); /* between polls */
	cr_assert_eq(key_count(c, "dbk:g:*:identity"), 2);
	r = redisCommand(c, "HGET dbk:g:%lld:acct:alice j", theirs);
	cr_assert(r && r->type == REDIS_REPLY_STRING && strstr(r->str, "Foreign Alice"));
	freeReplyObject(r);
	cr_assert_eq(admin((const char *const[]){ "verify", NULL }, &out), 0, "%s", out);
	free(out);
	redisFree(c);
}

/* Wait until the SQL read models have applied the whole log. */
static void sql_caught_up(const char *name)
{
	char head[64], cp[64];

	if (harness_wait_sql_caught_up(name, harness_now() + 30))
		return;
	harness_log_head(name, head, sizeof(head));
	harness_sql_checkpoint(name, cp, sizeof(cp));
	cr_assert_fail("the SQL models of %s did not catch up (%s, log %s)", name, cp, head);
}

/* Unsupported, but detected and harmless to the data: two deployments on one Redis
 * database keep replacing each other's live generation; neither ever serves the
 * other's models, and their projectors say what is wrong. */
Test(identity, two_deployments_sharing_one_redis_database_never_serve_each_others_models)
{
	const char *headers[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct service command2, projector2, query2;
	char db2[64];
	double end;
	int reads = 0;

	harness_db_create(db2, sizeof(db2));
	harness_start_command(&command2, db2);
	harness_start_query(&stack.query, stack.db, stack.redis_url);
	harness_start_query(&query2, db2, stack.redis_url);
	must("/accounts", "{\"id\":\"alice\",\"name\":\"Alice One\",\"currency\":\"EUR\"}");
	{
		struct response r =
			post(&command2, "/accounts",
			     "{\"id\":\"alice\",\"name\":\"Alice Two\",\"currency\":\"EUR\"}",
			     NULL);
		cr_assert_eq(r.status, 201, "%d %s", r.status, r.body);
		response_free(&r);
	}
	harness_start_projector(&projector2, db2, stack.redis_url);
	sql_caught_up(stack.db);
	sql_caught_up(db2);
	end = harness_now() + 60;
	while (!(harness_log_says(&stack.projector, "two deployments share it") ||
		 harness_log_says(&projector2, "two deployments share it"))) {
		struct response a = http_request(stack.query.port, "GET", "/accounts/alice",
						 headers, NULL, 20);
		struct response b = http_request(query2.port, "GET", "/accounts/alice", headers,
						 NULL, 20);
		reads++;
		cr_assert(a.status == 200 && strstr(a.body, "Alice One"), "%d %s", a.status,
			  a.body);
		cr_assert(b.status == 200 && strstr(b.body, "Alice Two"), "%d %s", b.status,
			  b.body);
		response_free(&a);
		response_free(&b);
		if (harness_now() > end) {
			harness_print_log(&stack.projector);
			harness_print_log(&projector2);
			cr_assert_fail("the shared Redis database was not detected (%d reads)",
				       reads);
		}
	}
	harness_stop(&projector2);
	harness_stop(&query2);
	harness_stop(&command2);
}
