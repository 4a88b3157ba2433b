/* Redis refusing some of a batch's writes: the generation's checkpoint never moves
 * past a write that failed, reads stay correct through SQL, the failure is reported,
 * and once Redis accepts writes again the projector completes and verify is clean. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"

#define FAILURES "daybook_projection_redis_failures_total{projection=\"redis\"}"
#define PLANTED 40 /* generations a resync may draw while the fault lasts */

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
	/* A private Redis: the test makes it refuse writes. */
	harness_start_redis(&stack.redis, false, stack.redis_url, sizeof(stack.redis_url));
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(redis_faults, .init = setup, .fini = teardown, .timeout = 120);

/* POST that must succeed; its position token into pos (may be NULL). */
static void must(const char *path, const char *body, char *pos, size_t len)
{
	harness_post_created_at(&stack.command, path, body, pos, len);
}

static void command_ok(redisContext *c, const char *fmt, const char *arg)
{
	redisReply *r = redisCommand(c, fmt, arg);

	cr_assert(r && r->type != REDIS_REPLY_ERROR, "%s: %s", fmt, r ? r->str : c->errstr);
	freeReplyObject(r);
}

/* daybook-admin verify against the test database and Redis: its exit status; its
 * output goes to stderr (stdout is the test protocol's). */
static int verify(void)
{
	return harness_admin(stack.db, stack.redis_url, (const char *const[]){ "verify", NULL },
			     NULL);
}

static int cmp_tokens(const char *a, const char *b)
{
	struct readmodel_position pa, pb;

	cr_assert(readmodel_position_parse(a, &pa) && readmodel_position_parse(b, &pb),
		  "bad tokens %s, %s", a, b);
	return readmodel_position_cmp(&pa, &pb);
}

/* While Redis refuses: the live generation stays `gen` and its checkpoint stays below
 * `failed` (the first event whose write is refused), until the projector has reported
 * `failures` failed steps (the batch, then resyncs retried after a pause) and the SQL
 * models have moved past `failed` anyway. */
static void assert_checkpoint_holds(redisContext *c, long long gen, const char *failed,
				    double failures)
{
	double end = harness_now() + 30;
	char cp[64], sql_cp[64];
	long long live;

	for (;;) {
		bool has = harness_redis_live(c, &live, cp, sizeof(cp));
		cr_assert(has && live == gen, "generation %lld is no longer live", gen);
		cr_assert_lt(cmp_tokens(cp, failed), 0,
			     "generation %lld's checkpoint moved to %s, past the refused write at %s",
			     gen, cp, failed);
		harness_sql_checkpoint(stack.db, sql_cp, sizeof(sql_cp));
		if (harness_metric(&stack.projector, FAILURES) >= failures &&
		    cmp_tokens(sql_cp, failed) >= 0)
			break;
		cr_assert(harness_now() < end,
			  "the projector reported %g failed redis steps (want %g)",
			  harness_metric(&stack.projector, FAILURES), failures);
		usleep(20000);
	}
}

/* A key of the wrong type where the projector writes one account's statement (in the
 * live generation and in those a resync would draw next): that account's write gets
 * WRONGTYPE while the rest of the batch, its totals included, is accepted. */
Test(redis_faults, a_wrongtype_reply_keeps_the_checkpoint_before_the_refused_write)
{
	redisContext *c = harness_redis(stack.redis_url);
	char cp[64], key[128], failed[64], path[128];
	long long gen, next;
	struct service query;

	must("/accounts", "{\"id\":\"w-1\",\"name\":\"W\",\"currency\":\"EUR\"}", NULL, 0);
	must("/accounts", "{\"id\":\"w-2\",\"name\":\"W\",\"currency\":\"EUR\"}", NULL, 0);
	must("/accounts/w-1/deposits", "{\"amount\":100}", NULL, 0);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
	redisReply *r = redisCommand(c, "GET dbk:generation");
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	next = atoll(r->str);
	freeReplyObject(r);
	snprintf(key, sizeof(key), "dbk:g:%lld:stmt:w-1", gen);
	command_ok(c, "SET %s planted", key);
	for (long long g = next + 1; g <= next + PLANTED; g++) {
		snprintf(key, sizeof(key), "dbk:g:%lld:stmt:w-1", g);
		command_ok(c, "SET %s planted", key);
	}
	/* One batch or two: the deposit to w-1 is refused, the other writes are not. */
	must("/accounts/w-1/deposits", "{\"amount\":5}", failed, sizeof(failed));
	must("/accounts/w-2/deposits", "{\"amount\":7}", NULL, 0);
	assert_checkpoint_holds(c, gen, failed, 3);
	/* Reads that ask for the refused write get it from SQL. */
	harness_start_query(&query, stack.db, stack.redis_url);
	snprintf(path, sizeof(path), "/accounts/w-1?min_position=%s", failed);
	{
		const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
		struct response a = http_request(query.port, "GET", path, h, NULL, 10);
		cr_assert_eq(a.status, 200, "%d %s", a.status, a.body);
		cr_assert_eq(json_integer_value(json_object_get(a.json, "balance")), 105);
		response_free(&a);
	}
	harness_stop(&query);
	/* Redis accepts the writes again: the projector completes by itself. */
	snprintf(key, sizeof(key), "dbk:g:%lld:stmt:w-1", gen);
	command_ok(c, "DEL %s", key);
	for (long long g = next + 1; g <= next + PLANTED; g++) {
		snprintf(key, sizeof(key), "dbk:g:%lld:stmt:w-1", g);
		command_ok(c, "DEL %s", key);
	}
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	cr_assert_eq(verify(), 0, "verify found differences after the fault");
	redisFree(c);
}

/* Redis out of memory (maxmemory, noeviction) refuses every write for a while. */
Test(redis_faults, out_of_memory_refusals_hold_the_checkpoint_until_redis_recovers)
{
	redisContext *c = harness_redis(stack.redis_url);
	char cp[64], failed[64];
	long long gen;

	must("/accounts", "{\"id\":\"o-1\",\"name\":\"O\",\"currency\":\"EUR\"}", NULL, 0);
	must("/accounts/o-1/deposits", "{\"amount\":100}", NULL, 0);
	harness_wait_caught_up(stack.db, stack.redis_url, 20);
	cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
	command_ok(c, "CONFIG SET maxmemory-policy %s", "noeviction");
	command_ok(c, "CONFIG SET maxmemory %s", "1");
	must("/accounts/o-1/deposits", "{\"amount\":5}", failed, sizeof(failed));
	must("/accounts", "{\"id\":\"o-2\",\"name\":\"O\",\"currency\":\"USD\"}", NULL, 0);
	assert_checkpoint_holds(c, gen, failed, 3);
	command_ok(c, "CONFIG SET maxmemory %s", "0");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	cr_assert_eq(verify(), 0, "verify found differences after the fault");
	redisFree(c);
}
