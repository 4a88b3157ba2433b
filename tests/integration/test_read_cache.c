/* The query service's read cache (query/cache.c) with the real projector writing: a
 * cached account is replaced when it changes, min_position is never answered from an
 * older entry, X-Daybook-Position tells the truth, the cache stays within its cap, and
 * a lost invalidation channel (Redis stopped or restarted, FLUSHALL, a rebuild's
 * switch, a frozen Redis) drops it or stops it being served. */
#include <criterion/criterion.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"

#define FROM_CACHE "daybook_query_reads_total{model=\"cache\"}"
/* Long enough that only the mechanism under test can stop an entry being served. */
#define LEASE_FOREVER "600000"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis_command_projector(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(read_cache, .init = setup, .fini = teardown, .timeout = 120);

/* One worker, so that one cache sees every read; lease and cap as given (NULL: the
 * default lease, a 16 MiB cap). */
static void start_query(const char *lease_ms, const char *bytes)
{
	const char *env[8] = { "DAYBOOK_QUERY_WORKERS", "1" };
	size_t n = 2;

	if (!bytes)
		bytes = "16777216"; /* the default, said here so that the tests keep it */

	if (lease_ms) {
		env[n++] = "DAYBOOK_QUERY_CACHE_LEASE_MS";
		env[n++] = lease_ms;
	}
	if (bytes) {
		env[n++] = "DAYBOOK_QUERY_CACHE_BYTES";
		env[n++] = bytes;
	}
	harness_start_query_env(&stack.query, stack.db, stack.redis_url, env);
}

/* POST that must succeed; its position token into pos (may be NULL). */
static void must(const char *path, const char *body, char *pos, size_t len)
{
	harness_post_created_at(&stack.command, path, body, pos, len);
}

static void open_account(const char *id, long long deposit)
{
	char path[128], body[128];

	snprintf(body, sizeof(body), "{\"id\":\"%s\",\"name\":\"N\",\"currency\":\"EUR\"}", id);
	must("/accounts", body, NULL, 0);
	snprintf(path, sizeof(path), "/accounts/%s/deposits", id);
	snprintf(body, sizeof(body), "{\"amount\":%lld}", deposit);
	must(path, body, NULL, 0);
}

static void deposit(const char *id, long long amount, char *pos, size_t len)
{
	char path[128], body[64];

	snprintf(path, sizeof(path), "/accounts/%s/deposits", id);
	snprintf(body, sizeof(body), "{\"amount\":%lld}", amount);
	must(path, body, pos, len);
}

/* GET path (with the read token); the test fails unless it answers `status`. */
static struct response get(const char *path, int status)
{
	const char *hdr[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct response r = http_request(stack.query.port, "GET", path, hdr, NULL, 10);

	cr_assert_eq(r.status, status, "GET %s: %d %s", path, r.status, r.body ? r.body : "");
	return r;
}

static long long balance_of(const struct response *r)
{
	return json_integer_value(json_object_get(r->json, "balance"));
}

static int cmp_tokens(const char *a, const char *b)
{
	struct readmodel_position pa, pb;

	cr_assert(readmodel_position_parse(a, &pa) && readmodel_position_parse(b, &pb),
		  "bad tokens %s, %s", a, b);
	return readmodel_position_cmp(&pa, &pb);
}

/* Read the account until an answer comes from the cache (the first reads fill it),
 * which must show `balance`. */
static void warm(const char *id, long long balance)
{
	char path[128];
	double end = harness_now() + 20;

	snprintf(path, sizeof(path), "/accounts/%s", id);
	for (;;) {
		double before = harness_metric(&stack.query, FROM_CACHE);
		struct response r = get(path, 200);
		cr_assert_eq(balance_of(&r), balance, "%s", r.body);
		response_free(&r);
		if (harness_metric(&stack.query, FROM_CACHE) > before)
			return;
		cr_assert(harness_now() < end, "no read of %s came from the cache", id);
		usleep(2000);
	}
}

/* Read the account (no min_position) until it shows `balance`; every answer whose
 * X-Daybook-Position is at or past `pos` must show it already. */
static void wait_balance(const char *id, long long balance, const char *pos, double timeout)
{
	char path[128], at[64];
	double end = harness_now() + timeout;

	snprintf(path, sizeof(path), "/accounts/%s", id);
	for (;;) {
		struct response r = get(path, 200);
		long long got = balance_of(&r);
		cr_assert(response_header(&r, "X-Daybook-Position", at, sizeof(at)));
		if (pos)
			cr_assert(cmp_tokens(at, pos) < 0 || got == balance,
				  "position %s is at or past %s, yet the balance is %lld, not %lld",
				  at, pos, got, balance);
		response_free(&r);
		if (got == balance)
			return;
		cr_assert(harness_now() < end, "%s still shows %lld, not %lld, after %.0f s", id,
			  got, balance, timeout);
		usleep(5000);
	}
}

static void redis_ops(const char *cmd)
{
	redisContext *c = harness_redis(stack.redis_url);
	redisReply *r = redisCommand(c, cmd);

	cr_assert(r && r->type != REDIS_REPLY_ERROR, "%s: %s", cmd, r ? r->str : c->errstr);
	freeReplyObject(r);
	redisFree(c);
}

Test(read_cache, a_cached_account_is_replaced_as_soon_as_the_projector_changes_it)
{
	char pos[64];

	start_query(LEASE_FOREVER, NULL);
	open_account("c1", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c1", 100);
	for (int i = 1; i <= 5; i++) {
		deposit("c1", 1, pos, sizeof(pos));
		wait_balance("c1", 100 + i, pos, 10);
		/* And the cache serves the new state, not only Redis: whether a read came
		 * from the cache before the change reached it is timing (the projector may
		 * be faster than the next read), so the entry's replacement is read back. */
		warm("c1", 100 + i);
	}
	cr_assert_geq(harness_metric(&stack.query, FROM_CACHE), 6);
}

Test(read_cache, min_position_is_never_answered_from_an_older_entry)
{
	char pos[64], path[256];
	struct response r;

	start_query(LEASE_FOREVER, NULL);
	open_account("c2", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c2", 100);
	/* No projector: the deposit is in the log only, and the entry stays. */
	harness_stop(&stack.projector);
	deposit("c2", 7, pos, sizeof(pos));
	snprintf(path, sizeof(path), "/accounts/c2?min_position=%s&wait_ms=300", pos);
	r = get(path, 503);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")), "projection_behind");
	response_free(&r);
	/* Without min_position the entry is still what the models hold. */
	warm("c2", 100);
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	snprintf(path, sizeof(path), "/accounts/c2?min_position=%s&wait_ms=10000", pos);
	r = get(path, 200);
	cr_assert_eq(balance_of(&r), 107, "%s", r.body);
	response_free(&r);
}

Test(read_cache, the_position_of_a_cached_answer_covers_what_it_shows)
{
	char pos[64], at[64];
	struct response r;

	start_query(LEASE_FOREVER, NULL);
	open_account("c3", 100);
	open_account("c4", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c3", 100);
	/* Other accounts move the models on; c3's entry stays and its position follows
	 * them (a heartbeat's checkpoint), never past what Redis has applied. */
	for (int i = 0; i < 20; i++)
		deposit("c4", 1, pos, sizeof(pos));
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c3", 100);
	r = get("/accounts/c3", 200);
	cr_assert(response_header(&r, "X-Daybook-Position", at, sizeof(at)));
	response_free(&r);
	{
		redisContext *c = harness_redis(stack.redis_url);
		long long gen;
		char cp[64];
		cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
		cr_assert_leq(cmp_tokens(at, cp), 0, "answered at %s, past Redis's %s", at, cp);
		redisFree(c);
	}
	/* And a change of c3 after all of that is seen by every answer that claims it. */
	deposit("c3", 1, pos, sizeof(pos));
	wait_balance("c3", 101, pos, 10);
}

Test(read_cache, the_cache_stays_within_its_cap_and_evicts)
{
	char id[32], path[64];
	const int n = 120;

	start_query(LEASE_FOREVER, "16384");
	for (int i = 0; i < n; i++) {
		snprintf(id, sizeof(id), "cap-%d", i);
		open_account(id, 1000 + i);
	}
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	for (int round = 0; round < 2; round++)
		for (int i = 0; i < n; i++) {
			struct response r;
			snprintf(path, sizeof(path), "/accounts/cap-%d", i);
			r = get(path, 200);
			cr_assert_eq(balance_of(&r), 1000 + i, "%s", r.body);
			response_free(&r);
			cr_assert_leq(harness_metric(&stack.query, "daybook_query_cache_bytes"),
				      16384);
		}
	cr_assert_gt(harness_metric(&stack.query, "daybook_query_cache_evictions_total"), 0);
	cr_assert_gt(harness_metric(&stack.query, "daybook_query_cache_bytes"), 0);
}

Test(read_cache, a_stopped_then_restarted_redis_drops_the_cache)
{
	char pos[64];

	start_query(LEASE_FOREVER, NULL);
	open_account("c5", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c5", 100);
	/* Redis gone: the change reaches SQL only, and the reads must show it. */
	harness_kill(&stack.redis);
	deposit("c5", 3, pos, sizeof(pos));
	wait_balance("c5", 103, pos, 10);
	/* Back, empty: the projector fills it again, the cache starts over. */
	harness_start_redis(&stack.redis, true, stack.redis_url, sizeof(stack.redis_url));
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	warm("c5", 103);
	deposit("c5", 4, pos, sizeof(pos));
	wait_balance("c5", 107, pos, 10);
	cr_assert_geq(harness_metric(&stack.query,
				     "daybook_query_cache_drops_total{reason=\"connection\"}"),
		      1);
}

Test(read_cache, flushall_drops_the_cache)
{
	char pos[64];

	start_query(LEASE_FOREVER, NULL);
	open_account("c6", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c6", 100);
	redis_ops("FLUSHALL");
	deposit("c6", 5, pos, sizeof(pos));
	wait_balance("c6", 105, pos, 10);
	cr_assert_geq(harness_metric(&stack.query,
				     "daybook_query_cache_drops_total{reason=\"flush\"}"),
		      1);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	warm("c6", 105);
}

/* Run daybook-admin rebuild redis to the end. */
static void rebuild_redis(void)
{
	char pg[512];
	int ws;
	pid_t pid;

	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	fflush(NULL);
	pid = fork();
	cr_assert(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		dup2(2, 1);
		setenv("DAYBOOK_PG", pg, 1);
		setenv("DAYBOOK_REDIS", stack.redis_url, 1);
		execl(getenv("DAYBOOK_ADMIN_BIN"), "daybook-admin", "rebuild", "redis",
		      (char *)NULL);
		_exit(127);
	}
	cr_assert_eq(waitpid(pid, &ws, 0), pid);
	cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "rebuild redis failed: %d", ws);
}

Test(read_cache, a_rebuild_switching_generations_drops_the_cache)
{
	char pos[64];

	start_query(LEASE_FOREVER, NULL);
	open_account("c7", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c7", 100);
	rebuild_redis();
	deposit("c7", 6, pos, sizeof(pos));
	wait_balance("c7", 106, pos, 10);
	cr_assert_geq(harness_metric(&stack.query,
				     "daybook_query_cache_drops_total{reason=\"generation\"}"),
		      1);
	warm("c7", 106);
}

Test(read_cache, a_frozen_redis_stops_the_cache_within_its_lease)
{
	char pos[64];

	start_query("200", NULL);
	open_account("c8", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c8", 100);
	/* Frozen, connections open: no invalidation can come, SQL moves on. */
	cr_assert_eq(kill(stack.redis.pid, SIGSTOP), 0);
	deposit("c8", 9, pos, sizeof(pos));
	wait_balance("c8", 109, pos, 10);
	cr_assert_eq(kill(stack.redis.pid, SIGCONT), 0);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	deposit("c8", 1, pos, sizeof(pos));
	wait_balance("c8", 110, pos, 10);
}

/* The live pointer moved to another generation by hand, the old one left in place
 * (nothing of it changes): the entry of the old one must go. */
Test(read_cache, a_switch_of_the_live_generation_drops_the_cache)
{
	redisContext *c;
	redisReply *r;
	long long gen;
	char cp[64], body[512], *at;

	start_query(LEASE_FOREVER, NULL);
	open_account("c9", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	harness_stop(&stack.projector); /* nothing else writes Redis from here on */
	warm("c9", 100);
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
	const char *keys[] = { "identity", "layout", "checkpoint", "acct:c9" };
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		r = redisCommand(c, "COPY dbk:g:%lld:%s dbk:g:%lld:%s", gen, keys[i], gen + 100,
				 keys[i]);
		cr_assert(r && r->type == REDIS_REPLY_INTEGER && r->integer == 1, "COPY %s",
			  keys[i]);
		freeReplyObject(r);
	}
	r = redisCommand(c, "HGET dbk:g:%lld:acct:c9 j", gen);
	cr_assert(r && r->type == REDIS_REPLY_STRING && r->len < sizeof(body) - 8);
	snprintf(body, sizeof(body), "%s", r->str);
	freeReplyObject(r);
	at = strstr(body, "\"balance\":100,");
	cr_assert_not_null(at, "%s", body);
	memcpy(at, "\"balance\":777,", 14);
	r = redisCommand(c, "HSET dbk:g:%lld:acct:c9 j %s", gen + 100, body);
	cr_assert(r && r->type != REDIS_REPLY_ERROR);
	freeReplyObject(r);
	r = redisCommand(c, "SET dbk:live:2 %lld", gen + 100);
	cr_assert(r && r->type != REDIS_REPLY_ERROR);
	freeReplyObject(r);
	redisFree(c);
	wait_balance("c9", 777, NULL, 10);
	cr_assert_geq(harness_metric(&stack.query,
				     "daybook_query_cache_drops_total{reason=\"generation\"}"),
		      1);
}

/* Quiet for longer than the lease: the next read, though its entry is held, goes to
 * Redis (and is counted so), and the one after it is a hit again. */
Test(read_cache, a_read_after_the_lease_ran_out_goes_to_redis_and_is_counted)
{
	double expired, hits;

	start_query("300", NULL);
	open_account("c10", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c10", 100);
	expired = harness_metric(&stack.query, "daybook_query_cache_lease_expired_total");
	usleep(600000);
	hits = harness_metric(&stack.query, FROM_CACHE);
	{
		struct response r = get("/accounts/c10", 200);
		cr_assert_eq(balance_of(&r), 100, "%s", r.body);
		response_free(&r);
	}
	cr_assert_eq(harness_metric(&stack.query, "daybook_query_cache_lease_expired_total") -
			     expired,
		     1);
	cr_assert_eq(harness_metric(&stack.query, FROM_CACHE), hits);
	warm("c10", 100);
}

/* Neither the cap nor the lease given: the cache is on (16 MiB, 5 ms). */
Test(read_cache, the_cache_is_on_by_default)
{
	const char *env[] = { "DAYBOOK_QUERY_WORKERS", "1", NULL };

	harness_start_query_env(&stack.query, stack.db, stack.redis_url, env);
	open_account("c11", 100);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	warm("c11", 100);
	cr_assert_gt(harness_metric(&stack.query, "daybook_query_cache_bytes"), 0);
}
