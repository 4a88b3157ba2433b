/* `daybook-admin verify` and `status` against read models built by the real projector:
 * clean after a workload, and every deliberate corruption named by model, entity and
 * field. */
#include <criterion/criterion.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
	harness_start_redis(&stack.redis, false, stack.redis_url, sizeof(stack.redis_url));
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(admin_verify, .init = setup, .fini = teardown, .timeout = 120);

/* --- the workload ---------------------------------------------------------------------- */

static void must(const char *path, const char *body)
{
	harness_post_created(&stack.command, path, body);
}

/* Two currencies, every event type, a closed account, and one account with more
 * statement items than Redis keeps (50). */
static void workload(void)
{
	must("/accounts", "{\"id\":\"v-alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}");
	must("/accounts",
	     "{\"id\":\"v-bob\",\"name\":\"Bob\",\"currency\":\"EUR\",\"overdraft_limit\":500}");
	must("/accounts", "{\"id\":\"v-carol\",\"name\":\"Carol\",\"currency\":\"USD\"}");
	must("/accounts", "{\"id\":\"v-dave\",\"name\":\"Dave\",\"currency\":\"USD\"}");
	must("/accounts", "{\"id\":\"v-erin\",\"name\":\"Erin\",\"currency\":\"EUR\"}");
	must("/accounts/v-alice/deposits", "{\"amount\":10000,\"reference\":\"salary\"}");
	must("/accounts/v-bob/withdrawals", "{\"amount\":300,\"reference\":\"rent\"}");
	must("/transfers", "{\"id\":\"t1\",\"from\":\"v-alice\",\"to\":\"v-bob\",\"amount\":1200,"
			   "\"reference\":\"lunch\"}");
	must("/transfers", "{\"id\":\"t2\",\"from\":\"v-bob\",\"to\":\"v-alice\",\"amount\":200}");
	must("/accounts/v-carol/deposits", "{\"amount\":7000}");
	must("/transfers",
	     "{\"id\":\"t3\",\"from\":\"v-carol\",\"to\":\"v-dave\",\"amount\":2500}");
	must("/accounts/v-dave/withdrawals", "{\"amount\":100}");
	must("/accounts/v-erin/deposits", "{\"amount\":50}");
	must("/accounts/v-erin/withdrawals", "{\"amount\":50}");
	must("/accounts/v-erin/close", "{}");
	for (int i = 0; i < 60; i++)
		must("/accounts/v-alice/deposits",
		     i % 2 ? "{\"amount\":1}" : "{\"amount\":2,\"reference\":\"r\"}");
}

static void token_of(const char *query, char *out, size_t len)
{
	PGresult *r = sql(stack.db, query);

	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

/* The reply to a Redis command as a string ("" for nil). */
static void redis_get(char *out, size_t len, const char *fmt, ...)
{
	redisContext *c = harness_redis(stack.redis_url);
	va_list ap;
	redisReply *r;

	va_start(ap, fmt);
	r = redisvCommand(c, fmt, ap);
	va_end(ap);
	cr_assert(r && r->type != REDIS_REPLY_ERROR, "redis: %s", r ? r->str : c->errstr);
	snprintf(out, len, "%s", r->type == REDIS_REPLY_STRING ? r->str : "");
	freeReplyObject(r);
	redisFree(c);
}

/* The workload, projected; then the projector stops so that it repairs nothing. */
static void projected_workload(void)
{
	workload();
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_stop(&stack.projector);
}

/* --- running daybook-admin ------------------------------------------------------------- */

struct run {
	int status;
	char *out, *err;
};

static char *slurp(FILE *f)
{
	long n;
	char *text;

	fseek(f, 0, SEEK_END);
	n = ftell(f);
	text = calloc(1, (size_t)n + 1);
	cr_assert_not_null(text);
	rewind(f);
	cr_assert_eq(fread(text, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	return text;
}

/* A daybook-admin on its way, and where its output goes. */
struct child {
	pid_t pid;
	FILE *out, *err;
};

/* Start daybook-admin with args (NULL-terminated) as superuser on the test database;
 * redis is the DAYBOOK_REDIS value, or NULL to leave it unset. pg overrides the
 * conninfo. */
static struct child admin_start(const char *pg, const char *redis, const char *const *args)
{
	const char *bin = getenv("DAYBOOK_ADMIN_BIN");
	FILE *out = tmpfile(), *err = tmpfile();
	char conninfo[512];
	const char *argv[16] = { bin };
	pid_t pid;

	cr_assert(bin && *bin, "DAYBOOK_ADMIN_BIN is not set: run through meson test");
	cr_assert(out && err);
	for (size_t i = 0; args[i] && i < 14; i++)
		argv[i + 1] = args[i];
	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	fflush(NULL);
	pid = fork();
	cr_assert(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fileno(out), 1);
		dup2(fileno(err), 2);
		setenv("DAYBOOK_PG", pg ? pg : conninfo, 1);
		if (redis)
			setenv("DAYBOOK_REDIS", redis, 1);
		else
			unsetenv("DAYBOOK_REDIS");
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	return (struct child){ .pid = pid, .out = out, .err = err };
}

/* Wait for the child to end: its exit status and output. */
static struct run admin_finish(struct child c)
{
	struct run r = { 0 };
	int ws;

	cr_assert_eq(waitpid(c.pid, &ws, 0), c.pid);
	r.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
	r.out = slurp(c.out);
	r.err = slurp(c.err);
	return r;
}

static struct run admin_pg(const char *pg, const char *redis, const char *const *args)
{
	return admin_finish(admin_start(pg, redis, args));
}

static struct run admin(const char *redis, const char *const *args)
{
	return admin_pg(NULL, redis, args);
}

static void run_free(struct run *r)
{
	free(r->out);
	free(r->err);
}

static int count_lines(const char *text, const char *prefix)
{
	int n = 0;

	for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
		n += strncmp(p, prefix, strlen(prefix)) == 0;
	return n;
}

static const char *const verify_args[] = { "verify", NULL };

/* verify must exit 1 and print exactly the expected DIFF lines (prefix match each). */
static void expect_diffs(const char *const *lines, int n)
{
	struct run r = admin(stack.redis_url, verify_args);

	cr_assert_eq(r.status, 1, "verify exited %d\n%s%s", r.status, r.out, r.err);
	for (int i = 0; i < n; i++)
		cr_assert(strstr(r.out, lines[i]), "missing \"%s\" in:\n%s", lines[i], r.out);
	cr_assert_eq(count_lines(r.out, "DIFF "), n, "expected %d differences:\n%s", n, r.out);
	run_free(&r);
}

/* --- verify ------------------------------------------------------------------------------ */

Test(admin_verify, clean_after_a_projected_workload)
{
	char summary[128];
	struct run r;

	projected_workload();
	r = admin(stack.redis_url, verify_args);
	cr_assert_eq(r.status, 0, "verify exited %d\n%s%s", r.status, r.out, r.err);
	cr_assert_eq(count_lines(r.out, "DIFF "), 0, "%s", r.out);
	snprintf(summary, sizeof(summary), "verify: %lld events folded",
		 sql_int(stack.db, "SELECT count(*) FROM events"));
	cr_assert(strstr(r.out, summary), "no \"%s\" in:\n%s", summary, r.out);
	cr_assert(strstr(r.out, " 5 accounts, "), "%s", r.out);
	cr_assert(strstr(r.out, " 3 transfers, 2 currencies; redis generation "), "%s", r.out);
	cr_assert(strstr(r.out, "; 0 differences in "), "%s", r.out);
	run_free(&r);
}

/* Writers keep depositing and transferring while verify runs. */
struct writer {
	atomic_bool stop;
	atomic_int writes; /* requests answered */
};

static void *keep_writing(void *arg)
{
	struct writer *w = arg;
	char body[128];

	for (int i = 0; !atomic_load(&w->stop); i++) {
		struct response r;
		if (i % 2)
			snprintf(body, sizeof(body), "{\"amount\":%d}", 1 + i % 7);
		else
			snprintf(body, sizeof(body),
				 "{\"id\":\"live-%d\",\"from\":\"v-alice\",\"to\":\"v-bob\",\"amount\":1}",
				 i);
		r = i % 2 ? post(&stack.command,
				 i % 4 == 1 ? "/accounts/v-bob/deposits"
					    : "/accounts/v-erin/deposits",
				 body, NULL)
			  : post(&stack.command, "/transfers", body, NULL);
		response_free(&r);
		atomic_fetch_add(&w->writes, 1);
	}
	return NULL;
}

Test(admin_verify, clean_while_the_projector_keeps_applying)
{
	static struct writer w;
	pthread_t writer;
	struct run r;

	workload();
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	pthread_create(&writer, NULL, keep_writing, &w);
	cr_assert(harness_wait_count(&w.writes, 10, harness_now() + 20),
		  "the writer made no headway");
	for (int i = 0; i < 3; i++) {
		r = admin(stack.redis_url, verify_args);
		cr_assert_eq(r.status, 0, "verify under load exited %d\n%s%s", r.status, r.out,
			     r.err);
		run_free(&r);
	}
	atomic_store(&w.stop, true);
	pthread_join(writer, NULL);
}

Test(admin_verify, without_redis_checks_sql_only)
{
	static const char *const args[] = { "verify", "--no-redis", NULL };
	char ignored[16];
	struct run r;

	projected_workload();
	/* A broken Redis model is not looked at when Redis is skipped. */
	redis_get(ignored, sizeof(ignored), "DEL " READMODEL_LIVE_KEY);
	r = admin(stack.redis_url, args);
	cr_assert_eq(r.status, 0, "verify --no-redis exited %d\n%s%s", r.status, r.out, r.err);
	cr_assert(strstr(r.out, "redis not checked"), "%s", r.out);
	cr_assert(strstr(r.err, "--no-redis"), "no note on stderr: %s", r.err);
	run_free(&r);
	r = admin(NULL, verify_args);
	cr_assert_eq(r.status, 0, "verify without DAYBOOK_REDIS exited %d\n%s%s", r.status, r.out,
		     r.err);
	cr_assert(strstr(r.err, "DAYBOOK_REDIS is not set"), "no note on stderr: %s", r.err);
	run_free(&r);
}

Test(admin_verify, names_corrupted_sql_rows)
{
	char balance[32], line[128];

	projected_workload();
	token_of("SELECT balance FROM rm_accounts WHERE account_id = 'v-alice'", balance,
		 sizeof(balance));
	PQclear(sql(stack.db,
		    "UPDATE rm_accounts SET balance = balance + 1 WHERE account_id = 'v-alice'"));
	PQclear(sql(stack.db, "DELETE FROM rm_entries WHERE account_id = 'v-bob' AND version = 3"));
	PQclear(sql(
		stack.db,
		"UPDATE rm_entries SET reference = 'x' WHERE account_id = 'v-carol' AND version = 2"));
	/* The SQL model of transfers is a view of the log (sql/017): a view gone wrong (a
	 * bad migration, say) is what can corrupt it, and verify compares it all the same. */
	PQclear(sql(stack.db, "ALTER VIEW rm_transfers RENAME TO rm_transfers_of_the_log"));
	PQclear(sql(stack.db,
		    "CREATE VIEW rm_transfers AS SELECT transfer_id, from_account, to_account, "
		    "CASE WHEN transfer_id = 't3' THEN 1 ELSE amount END AS amount, currency, "
		    "reference, at FROM rm_transfers_of_the_log UNION ALL SELECT 'ghost', "
		    "'v-alice', 'v-bob', 5, 'EUR', NULL, now()"));
	PQclear(sql(stack.db,
		    "UPDATE rm_totals SET open_accounts = open_accounts + 1 WHERE currency = 'USD'"));
	PQclear(sql(stack.db, "DELETE FROM rm_accounts WHERE account_id = 'v-dave'"));
	snprintf(line, sizeof(line), "DIFF sql account:v-alice balance: expected %s, found %lld\n",
		 balance, atoll(balance) + 1);
	const char *const lines[] = {
		line,
		"DIFF sql entry:v-bob/3 row: expected present, found absent\n",
		"DIFF sql entry:v-carol/2 reference: expected null, found x\n",
		"DIFF sql transfer:t3 amount: expected 2500, found 1\n",
		"DIFF sql transfer:ghost row: expected absent, found present\n",
		"DIFF sql totals:USD open_accounts: expected 2, found 3\n",
		"DIFF sql account:v-dave row: expected present, found absent\n",
	};
	expect_diffs(lines, sizeof(lines) / sizeof(lines[0]));
}

Test(admin_verify, names_corrupted_redis_keys)
{
	char gen[32], body[1024], xfer[1024], line[1200], xfer_line[1200];

	projected_workload();
	redis_get(gen, sizeof(gen), "GET " READMODEL_LIVE_KEY);
	redis_get(body, sizeof(body), "HGET dbk:g:%s:acct:v-bob j", gen);
	redis_get(line, sizeof(line), "HSET dbk:g:%s:acct:v-bob j {\"corrupt\":true}", gen);
	redis_get(line, sizeof(line), "DEL dbk:g:%s:xfer:t2", gen);
	redis_get(xfer, sizeof(xfer), "GET dbk:g:%s:xfer:t1", gen);
	redis_get(line, sizeof(line), "SET dbk:g:%s:xfer:t1 {\"corrupt\":1}", gen);
	/* The oldest of alice's newest 50 items goes missing. */
	redis_get(line, sizeof(line), "RPOP dbk:g:%s:stmt:v-alice", gen); /* newest first */
	redis_get(line, sizeof(line), "SET dbk:g:%s:layout 1", gen);
	snprintf(line, sizeof(line),
		 "DIFF redis account:v-bob body: expected %s, found {\"corrupt\":true}\n", body);
	snprintf(xfer_line, sizeof(xfer_line),
		 "DIFF redis transfer:t1 body: expected %s, found {\"corrupt\":1}\n", xfer);
	const char *const lines[] = {
		"DIFF redis live layout: expected 2, found 1\n",
		line,
		"DIFF redis transfer:t2 key: expected present, found absent\n",
		xfer_line,
		"DIFF redis entry:v-alice/", /* its version depends on the workload's order */
	};
	expect_diffs(lines, sizeof(lines) / sizeof(lines[0]));
}

Test(admin_verify, names_redis_keys_that_nothing_in_the_log_accounts_for)
{
	char gen[32], line[256];

	projected_workload();
	redis_get(gen, sizeof(gen), "GET " READMODEL_LIVE_KEY);
	redis_get(line, sizeof(line), "HSET dbk:g:%s:acct:ghost v 1 n 0 j {}", gen);
	redis_get(line, sizeof(line), "LPUSH dbk:g:%s:stmt:ghost-2 {}", gen);
	redis_get(line, sizeof(line), "SET dbk:g:%s:xfer:t-ghost {}", gen);
	redis_get(line, sizeof(line), "SET dbk:g:%s:stray 1", gen);
	redis_get(line, sizeof(line), "SET dbk:g:%s:acct:\xff\xfe 1",
		  gen); /* no event has such an id */
	/* Another generation's keys are not the live models' business. */
	redis_get(line, sizeof(line), "SET dbk:g:999999:acct:elsewhere 1");
	const char *const lines[] = {
		"DIFF redis account:ghost key: expected absent, found present\n",
		"DIFF redis stmt:ghost-2 key: expected absent, found present\n",
		"DIFF redis transfer:t-ghost key: expected absent, found present\n",
		"DIFF redis key:dbk:g:", /* the stray key, named in full */
		":acct:\xff\xfe key: expected absent, found present\n",
	};
	expect_diffs(lines, sizeof(lines) / sizeof(lines[0]));
}

/* One difference: Redis's `what` (entity and field) is at 99999999.99999999, an event
 * the log does not have; the snapshot is at head. */
static void expect_past_the_log(const char *what, const char *head)
{
	char line[256];
	const char *const lines[] = { line };

	snprintf(line, sizeof(line),
		 "DIFF redis %s: expected %s or a later event in the log, found 99999999.99999999\n",
		 what, head);
	expect_diffs(lines, 1);
}

/* After a physical restore without `migrate --new-identity` (docs/operations.md), Redis
 * may hold versions and positions past the SQL checkpoint that the log does not have:
 * each is a difference, not "newer than the snapshot". */
Test(admin_verify, redis_ahead_of_the_log_is_a_difference)
{
	char gen[32], ignored[16], body[1024], head[64], p[64];

	projected_workload();
	harness_log_head(stack.db, head, sizeof(head));
	redis_get(gen, sizeof(gen), "GET " READMODEL_LIVE_KEY);
	redis_get(body, sizeof(body), "HGET dbk:g:%s:acct:v-carol j", gen);
	redis_get(ignored, sizeof(ignored), "HSET dbk:g:%s:acct:v-carol v 99 j {}", gen);
	const char *const account[] = {
		"DIFF redis account:v-carol version: expected 3 or a later version in the log, "
		"found 99\n"
	};
	expect_diffs(account, 1);
	/* Behind is a difference too. */
	redis_get(ignored, sizeof(ignored), "HSET dbk:g:%s:acct:v-carol v 1", gen);
	const char *const behind[] = { "DIFF redis account:v-carol version: expected 3, found 1\n" };
	expect_diffs(behind, 1);
	redis_get(ignored, sizeof(ignored), "HSET dbk:g:%s:acct:v-carol v 3 j %s", gen, body);
	/* The totals' position, then the live checkpoint, past the log's head. */
	redis_get(p, sizeof(p), "HGET dbk:g:%s:totals p", gen);
	redis_get(ignored, sizeof(ignored), "HSET dbk:g:%s:totals p 99999999.99999999", gen);
	expect_past_the_log("totals position", head);
	redis_get(ignored, sizeof(ignored), "HSET dbk:g:%s:totals p %s", gen, p);
	redis_get(ignored, sizeof(ignored), "SET dbk:g:%s:checkpoint 99999999.99999999", gen);
	expect_past_the_log("live checkpoint", head);
}

/* verify with Redis through a proxy that holds its commands from `needle` on; meanwhile
 * the live projector applies a deposit to v-carol (after verify's snapshot, which
 * folds v-carol at version 3). */
static struct run verify_while_carol_moves_on(const char *needle)
{
	struct redis_proxy *proxy;
	char url[HARNESS_REDIS_URL_MAX];
	struct child c;
	struct run r;

	workload();
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_proxy_open(&proxy, stack.redis.port);
	harness_proxy_url(proxy, stack.redis_url, url, sizeof(url));
	harness_proxy_hold_at(proxy, needle);
	c = admin_start(NULL, url, verify_args);
	cr_assert(harness_proxy_wait_held(proxy, harness_now() + 30), "verify never sent %s",
		  needle);
	must("/accounts/v-carol/deposits", "{\"amount\":5}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_proxy_release(proxy);
	r = admin_finish(c);
	harness_proxy_close(&proxy);
	return r;
}

/* The projector moves on after verify's snapshot and before verify reads Redis: the
 * live checkpoint, v-carol's version and the totals' position are past the snapshot,
 * and events of the log as it is now, so newer, not different. */
Test(admin_verify, redis_moved_on_after_the_snapshot_is_not_a_difference)
{
	/* held at verify's first look at Redis: the live generation */
	struct run r = verify_while_carol_moves_on(READMODEL_LIVE_KEY "\r\n");

	cr_assert_eq(r.status, 0, "verify exited %d\n%s%s", r.status, r.out, r.err);
	cr_assert(strstr(r.out, ": 2 newer than the snapshot;"), "%s", r.out);
	run_free(&r);
}

/* The projector writes an account's hash and statement in one script; verify reads
 * them in one step too. Here the deposit lands between verify's read of v-carol's hash
 * and of its statement (held at the statement's key): read apart, the hash says version
 * 3 and the statement has an item of version 4, a false difference. */
Test(admin_verify, an_accounts_hash_and_statement_are_read_in_one_step)
{
	struct run r = verify_while_carol_moves_on(":" READMODEL_KIND_STATEMENT ":v-carol\r\n");

	cr_assert_eq(r.status, 0, "verify exited %d\n%s%s", r.status, r.out, r.err);
	cr_assert(strstr(r.out, ": 2 newer than the snapshot;"), "%s", r.out);
	run_free(&r);
}

Test(admin_verify, no_live_generation_is_one_difference)
{
	char ignored[16];

	projected_workload();
	redis_get(ignored, sizeof(ignored), "DEL " READMODEL_LIVE_KEY);
	const char *const lines[] = {
		"DIFF redis live generation: expected present, found absent\n"
	};
	expect_diffs(lines, 1);
}

/* A live generation built from another event store (here: its identity rewritten) is
 * one difference, and its content is not compared. */
Test(admin_verify, a_live_generation_of_another_event_store_is_one_difference)
{
	char gen[32], ignored[16], ours[READMODEL_IDENTITY_MAX], line[2 * READMODEL_IDENTITY_MAX];
	PGresult *r;

	projected_workload();
	r = sql(stack.db, READMODEL_IDENTITY_SQL);
	snprintf(ours, sizeof(ours), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	redis_get(gen, sizeof(gen), "GET " READMODEL_LIVE_KEY);
	redis_get(ignored, sizeof(ignored), "SET dbk:g:%s:identity another-store", gen);
	snprintf(line, sizeof(line), "DIFF redis live identity: expected %s, found another-store\n",
		 ours);
	const char *const lines[] = { line };
	expect_diffs(lines, 1);
}

Test(admin_verify, usage_and_connection_errors)
{
	static const char *const bad_verify[] = { "verify", "--bogus", NULL };
	static const char *const bad_status[] = { "status", "--bogus", NULL };
	static const char *const status[] = { "status", NULL };
	static const char *const dead_pg = "host=127.0.0.1 port=1 dbname=x connect_timeout=2";
	struct run r;

	r = admin(stack.redis_url, bad_verify);
	cr_assert_eq(r.status, 2, "%s", r.err);
	run_free(&r);
	r = admin(stack.redis_url, bad_status);
	cr_assert_eq(r.status, 2, "%s", r.err);
	run_free(&r);
	/* A dependency unavailable: 3 (docs/cli.md). */
	r = admin_pg(dead_pg, stack.redis_url, verify_args);
	cr_assert_eq(r.status, 3, "%s", r.err);
	cr_assert(strstr(r.err, "cannot connect to PostgreSQL"), "%s", r.err);
	run_free(&r);
	r = admin(NULL, (const char *const[]){ "verify", NULL });
	cr_assert_eq(r.status, 0, "empty log: %s%s", r.out, r.err);
	run_free(&r);
	r = admin("redis://127.0.0.1:1", verify_args);
	cr_assert_eq(r.status, 3, "%s", r.err);
	cr_assert(strstr(r.err, "cannot connect to Redis"), "%s", r.err);
	run_free(&r);
	r = admin_pg(dead_pg, stack.redis_url, status);
	cr_assert_eq(r.status, 3, "%s", r.err);
	run_free(&r);
}

/* --- status ------------------------------------------------------------------------------ */

Test(admin_verify, status_table_shows_head_and_checkpoints)
{
	static const char *const args[] = { "status", NULL };
	char head[64], row[128];
	struct run r;

	projected_workload();
	harness_log_head(stack.db, head, sizeof(head));
	r = admin(stack.redis_url, args);
	cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
	cr_assert(strstr(r.out, "LAG EVENTS"), "%s", r.out);
	snprintf(row, sizeof(row), "log head          %s", head);
	cr_assert(strstr(r.out, row), "no \"%s\" in:\n%s", row, r.out);
	snprintf(row, sizeof(row), "sql               %s", head);
	cr_assert(strstr(r.out, row), "no \"%s\" in:\n%s", row, r.out);
	cr_assert(strstr(r.out, "redis (gen "), "%s", r.out);
	run_free(&r);
}

static json_t *status_json(void)
{
	static const char *const args[] = { "status", "--json", NULL };
	struct run r = admin(stack.redis_url, args);
	json_error_t e;
	json_t *o;

	cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
	o = json_loads(r.out, 0, &e);
	cr_assert(o, "status --json is not JSON (%s): %s", e.text, r.out);
	run_free(&r);
	return o;
}

Test(admin_verify, status_json_reports_lag)
{
	char head[64], gen[32];
	json_t *o, *sql_row;

	projected_workload();
	harness_log_head(stack.db, head, sizeof(head));
	redis_get(gen, sizeof(gen), "GET " READMODEL_LIVE_KEY);
	/* The projector is stopped: two more events are not applied. */
	must("/accounts/v-alice/deposits", "{\"amount\":5}");
	must("/accounts/v-bob/deposits", "{\"amount\":5}");
	o = status_json();
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(o, "log"), "events")),
		     sql_int(stack.db, "SELECT count(*) FROM events"));
	cr_assert(json_is_true(json_object_get(json_object_get(o, "log"), "events_exact")));
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(o, "log"), "max_position")),
		     sql_int(stack.db, "SELECT max(position) FROM events"));
	sql_row = json_array_get(json_object_get(o, "projections"), 0);
	cr_assert_str_eq(json_string_value(json_object_get(sql_row, "name")), "sql");
	cr_assert_str_eq(json_string_value(json_object_get(sql_row, "checkpoint")), head);
	cr_assert_eq(json_integer_value(json_object_get(sql_row, "lag_events")), 2);
	cr_assert_gt(json_real_value(json_object_get(sql_row, "lag_seconds")), 0);
	cr_assert_eq(json_integer_value(
			     json_object_get(json_object_get(o, "redis"), "live_generation")),
		     atoll(gen));
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_object_get(o, "redis"), "checkpoint")),
			 head);
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(o, "redis"), "lag_events")),
		     2);
	cr_assert_str_neq(json_string_value(json_object_get(json_object_get(o, "log"), "head")),
			  head);
	json_decref(o);
}
