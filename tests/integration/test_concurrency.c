/* Concurrent commands through group commit: rules hold across a batch, versions stay
 * gap-free, money is conserved. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(concurrency, .init = setup, .fini = teardown, .timeout = 120);

struct job {
	char path[128];
	char body[256];
	struct response r;
};

static void *run_job(void *arg)
{
	struct job *j = arg;
	j->r = post(&stack.command, j->path, j->body, NULL);
	return NULL;
}

/* Run every job at once, each on its own connection. */
static void run_all(struct job *jobs, size_t n)
{
	pthread_t *t = calloc(n, sizeof(*t));

	for (size_t i = 0; i < n; i++)
		cr_assert_eq(pthread_create(&t[i], NULL, run_job, &jobs[i]), 0);
	for (size_t i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	free(t);
}

static void must(const char *path, const char *body)
{
	harness_post_created(&stack.command, path, body);
}

Test(concurrency, fifty_withdrawals_of_100_from_1000_give_exactly_ten)
{
	struct job jobs[50];
	int ok = 0, refused = 0;

	must("/accounts", "{\"id\":\"pot\",\"name\":\"Pot\",\"currency\":\"EUR\"}");
	must("/accounts/pot/deposits", "{\"amount\":1000}");
	for (int i = 0; i < 50; i++) {
		snprintf(jobs[i].path, sizeof(jobs[i].path), "/accounts/pot/withdrawals");
		snprintf(jobs[i].body, sizeof(jobs[i].body), "{\"amount\":100}");
	}
	run_all(jobs, 50);
	for (int i = 0; i < 50; i++) {
		if (jobs[i].r.status == 201)
			ok++;
		else if (jobs[i].r.status == 422 &&
			 strcmp(json_string_value(json_object_get(jobs[i].r.json, "code")),
				"insufficient_funds") == 0)
			refused++;
		response_free(&jobs[i].r);
	}
	cr_assert_eq(ok, 10);
	cr_assert_eq(refused, 40);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT sum(CASE type WHEN 'FundsDeposited' THEN 1 ELSE -1 END * "
			     "(data->>'amount')::bigint) FROM events WHERE stream = 'account-pot' "
			     "AND type <> 'AccountOpened'"),
		     0);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events WHERE stream = 'account-pot'"),
		     12);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT max(version) FROM events WHERE stream = 'account-pot'"),
		     12);
}

/* Each account's running balance, from the log: the lowest it ever was, relative to
 * its limit, and the sum of all balances. */
static const char balances_sql[] =
	"WITH moves AS ("
	"  SELECT stream, version, CASE type"
	"    WHEN 'FundsDeposited' THEN (data->>'amount')::bigint"
	"    WHEN 'TransferReceived' THEN (data->>'amount')::bigint"
	"    WHEN 'FundsWithdrawn' THEN -(data->>'amount')::bigint"
	"    WHEN 'TransferSent' THEN -(data->>'amount')::bigint ELSE 0 END AS delta"
	"  FROM events),"
	" running AS (SELECT stream, sum(delta) OVER (PARTITION BY stream ORDER BY version) AS bal"
	"  FROM moves),"
	" limits AS (SELECT stream, (data->>'overdraft_limit')::bigint AS lim FROM events"
	"  WHERE type = 'AccountOpened')";

Test(concurrency, five_hundred_random_transfers_conserve_money_and_limits)
{
	enum { ACCOUNTS = 10, TRANSFERS = 500, WAVE = 100 };
	struct job *jobs = calloc(TRANSFERS, sizeof(*jobs));
	char q[2048];
	int ok = 0;
	unsigned seed = 42;

	for (int i = 0; i < ACCOUNTS; i++) {
		snprintf(q, sizeof(q),
			 "{\"id\":\"acc-%d\",\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":%d}",
			 i, (i % 3) * 100);
		must("/accounts", q);
		snprintf(q, sizeof(q), "/accounts/acc-%d/deposits", i);
		must(q, "{\"amount\":500}");
	}
	for (int i = 0; i < TRANSFERS; i++) {
		int from = rand_r(&seed) % ACCOUNTS, to = rand_r(&seed) % ACCOUNTS;
		if (to == from)
			to = (to + 1) % ACCOUNTS;
		snprintf(jobs[i].path, sizeof(jobs[i].path), "/transfers");
		snprintf(jobs[i].body, sizeof(jobs[i].body),
			 "{\"id\":\"t-%d\",\"from\":\"acc-%d\",\"to\":\"acc-%d\",\"amount\":%d}", i,
			 from, to, 1 + rand_r(&seed) % 400);
	}
	for (int w = 0; w < TRANSFERS; w += WAVE)
		run_all(jobs + w, WAVE);
	for (int i = 0; i < TRANSFERS; i++) {
		cr_assert(jobs[i].r.status == 201 || jobs[i].r.status == 422, "transfer %d: %d %s",
			  i, jobs[i].r.status, jobs[i].r.body);
		ok += jobs[i].r.status == 201;
		response_free(&jobs[i].r);
	}
	free(jobs);
	cr_assert_gt(ok, 100, "most transfers should succeed, %d did", ok);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events WHERE type = 'TransferSent'"),
		     ok);
	/* Conservation: transfers only move money; the total is what was deposited. */
	cr_assert_eq(
		sql_int(stack.db,
			"SELECT sum((data->>'amount')::bigint) FROM events WHERE type = 'TransferSent'") -
			sql_int(stack.db,
				"SELECT sum((data->>'amount')::bigint) FROM events WHERE type = 'TransferReceived'"),
		0);
	snprintf(q, sizeof(q), "%s SELECT sum(delta) FROM moves", balances_sql);
	cr_assert_eq(sql_int(stack.db, q), ACCOUNTS * 500);
	snprintf(q, sizeof(q),
		 "%s SELECT count(*) FROM running JOIN limits USING (stream) WHERE bal < -lim",
		 balances_sql);
	cr_assert_eq(sql_int(stack.db, q), 0, "no balance ever went below its overdraft limit");
	/* Every stream's versions are 1..n without gaps. */
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM (SELECT stream, max(version) m, count(*) c "
			     "FROM events GROUP BY stream) s WHERE m <> c"),
		     0);
	/* Both sides of every transfer share a transaction. */
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events s JOIN events r ON "
			     "r.data->>'transfer_id' = s.data->>'transfer_id' AND r.type = "
			     "'TransferReceived' WHERE s.type = 'TransferSent' AND s.txid <> r.txid"),
		     0);
}
