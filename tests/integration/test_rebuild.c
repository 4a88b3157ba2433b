/* daybook-admin rebuild: a switch under load that readers never notice (the old Redis
 * generation left to the projector's sweep), a switch that waits for a long reader
 * without holding up the others, an interrupted rebuild (then two that run to the end
 * with no projector, cleaning up themselves) and one whose switch fails to commit, both
 * leaving the live models as they were; one whose switch's reply is lost, which leaves
 * no live pointer on its own generation; a projector taking the lead sweeps what older
 * generations still hold; a rebuild across a FLUSHALL switches nothing; the rebuild's
 * clean-up spares a newer generation. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"
#include "rebuild_scripts.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis_command_projector(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(rebuild, .init = setup, .fini = teardown, .timeout = 240);

/* Run `daybook-admin rebuild <target>`; its stdout (JSON progress lines) is read from
 * *out_fd. Returns the pid. */
static pid_t start_rebuild(const char *target, int *out_fd)
{
	int pipefd[2];
	char pg[512];
	pid_t pid;

	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	cr_assert_eq(pipe(pipefd), 0);
	pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		dup2(pipefd[1], 1);
		close(pipefd[0]);
		setenv("DAYBOOK_PG", pg, 1);
		setenv("DAYBOOK_REDIS", stack.redis_url, 1);
		execl(getenv("DAYBOOK_ADMIN_BIN"), "daybook-admin", "rebuild", target,
		      (char *)NULL);
		_exit(127);
	}
	close(pipefd[1]);
	*out_fd = pipefd[0];
	return pid;
}

/* A shared hold of the switch lock: a rebuild's switch waits for it (the projector's
 * batches, which take it shared too, go on). */
static PGconn *hold_switch_lock(void)
{
	char pg[512];
	PGconn *hold;

	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	hold = PQconnectdb(pg);
	cr_assert_eq(PQstatus(hold), CONNECTION_OK);
	PQclear(PQexec(hold, "SELECT pg_advisory_lock_shared(" READMODEL_SWITCH_LOCK ")"));
	return hold;
}

static void release_switch_lock(PGconn *hold)
{
	PQclear(PQexec(hold, "SELECT pg_advisory_unlock_shared(" READMODEL_SWITCH_LOCK ")"));
	PQfinish(hold);
}

/* Until some session waits for an advisory lock (a rebuild at its switch). */
static void wait_for_the_switch(void)
{
	static const char waiting[] = "SELECT count(*) FROM pg_locks WHERE locktype = "
				      "'advisory' AND NOT granted";

	for (double end = harness_now() + 30; sql_int(stack.db, waiting) == 0; usleep(20000))
		cr_assert(harness_now() < end, "the rebuild never waited for its switch");
}

/* Read a started rebuild's output to its end and wait for it: its wait status. */
static int finish_rebuild(pid_t pid, int fd)
{
	char line[512];
	FILE *f = fdopen(fd, "r");
	int status;

	while (fgets(line, sizeof(line), f))
		;
	fclose(f);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	return status;
}

/* Run `daybook-admin verify`; its exit status. */
static int run_verify(void)
{
	return harness_admin(stack.db, stack.redis_url, (const char *const[]){ "verify", NULL },
			     NULL);
}

/* Who deleted the old Redis generation, as the last summary read_progress or
 * cleanup_of read said: "rebuild", "projector" or "none". */
static char cleanup_by[16];

/* Read the child's stdout to the end; every line must be a JSON object, the last one
 * the summary ("phase":"done" with the checkpoint). */
static int read_progress(int fd, int *json_lines)
{
	FILE *f = fdopen(fd, "r");
	char line[1024];
	int lines = 0;
	bool summary = false;

	*json_lines = 0;
	while (fgets(line, sizeof(line), f)) {
		json_t *j;
		lines++;
		cr_assert_not(summary, "a line after the summary: %s", line);
		j = json_loads(line, 0, NULL);
		cr_assert(json_is_object(j), "output line is not JSON: %s", line);
		cr_assert(json_is_string(json_object_get(j, "phase")), "%s", line);
		/* A note (e.g. waiting for a verify's transaction) is a line of its own. */
		if (strcmp(json_string_value(json_object_get(j, "phase")), "note") == 0) {
			cr_assert(json_is_string(json_object_get(j, "note")), "%s", line);
			json_decref(j);
			continue;
		}
		if (strcmp(json_string_value(json_object_get(j, "phase")), "done") == 0) {
			summary = true;
			cr_assert(json_is_string(json_object_get(j, "checkpoint")), "%s", line);
			cr_assert(json_is_string(json_object_get(j, "rebuilt")), "%s", line);
			cr_assert(json_is_string(json_object_get(j, "cleanup_by")), "%s", line);
			snprintf(cleanup_by, sizeof(cleanup_by), "%s",
				 json_string_value(json_object_get(j, "cleanup_by")));
		}
		cr_assert(json_is_object(j), "progress line is not JSON: %s", line);
		cr_assert(json_is_string(json_object_get(j, "phase")));
		cr_assert(json_is_integer(json_object_get(j, "done")));
		cr_assert(json_is_integer(json_object_get(j, "total")));
		cr_assert(json_is_number(json_object_get(j, "events_per_s")));
		cr_assert(json_is_number(json_object_get(j, "eta_s")));
		json_decref(j);
		(*json_lines)++;
	}
	fclose(f);
	cr_assert(summary, "no final summary line");
	return lines;
}

static void must(const char *path, const char *body)
{
	harness_post_created(&stack.command, path, body);
}

struct traffic {
	atomic_bool stop;
	atomic_int writes;
};

/* Wait until the writers have made n more writes, so that what follows happens under
 * load (the test fails if they stall for 20 s). */
static void await_writes(struct traffic *t, int n)
{
	cr_assert(harness_wait_count(&t->writes, atomic_load(&t->writes) + n, harness_now() + 20),
		  "the writers stalled at %d writes", atomic_load(&t->writes));
}

static void *writer(void *arg)
{
	struct traffic *t = arg;
	unsigned seed = (unsigned)(uintptr_t)pthread_self();
	char path[64], body[64];

	for (int n = 0; !atomic_load(&t->stop); n++) {
		int a = rand_r(&seed) % 8, b = (a + 1 + rand_r(&seed) % 7) % 8;
		if (n % 3 == 2) { /* a transfer now and then; some fail for want of funds */
			snprintf(path, sizeof(path), "/transfers");
			snprintf(body, sizeof(body),
				 "{\"id\":\"w%x-%d\",\"from\":\"r-%d\",\"to\":\"r-%d\",\"amount\":7}",
				 seed, n, a, b);
		} else {
			snprintf(path, sizeof(path), "/accounts/r-%d/deposits", a);
			snprintf(body, sizeof(body), "{\"amount\":%d}", 1 + rand_r(&seed) % 100);
		}
		struct response r = post(&stack.command, path, body, NULL);
		if (r.status == 201)
			atomic_fetch_add(&t->writes, 1);
		response_free(&r);
	}
	return NULL;
}

#define PROJECTOR_ERRORS "daybook_projection_errors_total{projection=\"sql\"}"

/* 150,000 events for 1,000 new accounts, written straight into the log (the live
 * models do not see them while the projector is stopped): a log long enough for a
 * rebuild to be caught in the middle. */
static void add_long_log(void)
{
	/* As generated the rows are valid; the per-row gap check would only make this
	 * transaction (which holds back the cluster's xmin, and other tests' projectors
	 * with it) longer. */
	PQclear(sql(stack.db,
		    "SET session_replication_role = replica; "
		    "INSERT INTO events (stream, version, type, data, metadata) SELECT 'account-h' "
		    "|| (i % 1000), i / 1000 + 1, CASE WHEN i < 1000 THEN 'AccountOpened' ELSE "
		    "'FundsDeposited' END, CASE WHEN i < 1000 THEN jsonb_build_object('account_id', "
		    "'h' || (i % 1000), 'name', 'H', 'currency', 'USD', 'overdraft_limit', 0) ELSE "
		    "'{\"amount\": 3}' END, '{}' FROM generate_series(0, 149999) i ORDER BY i"));
}

/* A digest of the live SQL accounts. */
static void live_fingerprint(char out[64])
{
	PGresult *r = sql(stack.db,
			  "SELECT md5(string_agg(account_id || ':' || balance || ':' || version, "
			  "',' ORDER BY account_id)) FROM rm_accounts");

	snprintf(out, 64, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

/* What a rebuild that ended without switching leaves: the SQL models' generation is
 * still gen_before, and no shadow table. */
static void assert_not_switched(long long gen_before)
{
	cr_assert_eq(sql_int(stack.db, "SELECT generation FROM projection_checkpoints"),
		     gen_before);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%_shadow'"),
		     0, "the shadow tables are removed");
}

/* Once the live models have caught up, stop the projector, so that they stay as they
 * are while the rebuild has a long log to fold (time enough to catch it in the
 * middle): their fingerprint goes in before; returns their generation. */
static long long long_log_behind_live(char before[64])
{
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert_eq(harness_stop(&stack.projector), 0);
	add_long_log();
	live_fingerprint(before);
	return sql_int(stack.db, "SELECT generation FROM projection_checkpoints");
}

static const char *const ids[] = { "r-0", "r-1", "r-2", "r-3", "r-4", "r-5", "r-6", "r-7" };

Test(rebuild, a_rebuild_under_load_switches_without_read_errors)
{
	static struct traffic t;
	pthread_t w[2];
	struct readers *rd;
	struct read_sample *samples;
	size_t nsamples;
	char body[128];
	int fd, json_lines, status, reads, read_errors;
	long long gen_before = sql_int(stack.db, "SELECT generation FROM projection_checkpoints");

	for (int i = 0; i < 8; i++) {
		snprintf(body, sizeof(body),
			 "{\"id\":\"r-%d\",\"name\":\"R\",\"currency\":\"EUR\"}", i);
		must("/accounts", body);
	}
	/* Every kind of event and of optional field, with text that needs escaping. */
	must("/accounts/r-0/deposits",
	     "{\"amount\":500,\"reference\":\"q\\\"uote \\\\ caf\xc3\xa9 \xe2\x82\xac\"}");
	must("/transfers", "{\"id\":\"t-1\",\"from\":\"r-0\",\"to\":\"r-1\",\"amount\":120,"
			   "\"reference\":\"rent \\\"May\\\"\"}");
	must("/transfers", "{\"id\":\"t-2\",\"from\":\"r-1\",\"to\":\"r-2\",\"amount\":20}");
	must("/accounts/r-1/withdrawals", "{\"amount\":50,\"reference\":\"atm\"}");
	must("/accounts", "{\"id\":\"r-gone\",\"name\":\"Zo\xc3\xab \\\"Q\\\" \\\\\","
			  "\"currency\":\"GBP\",\"overdraft_limit\":10}");
	must("/accounts/r-gone/close", "{}");
	/* Some history, so the rebuild has work to do. */
	PQclear(sql(stack.db,
		    "INSERT INTO events (stream, version, type, data, metadata) SELECT 'account-h' "
		    "|| (i % 500), i / 500 + 1, CASE WHEN i < 500 THEN 'AccountOpened' ELSE "
		    "'FundsDeposited' END, CASE WHEN i < 500 THEN jsonb_build_object('account_id', "
		    "'h' || (i % 500), 'name', 'H', 'currency', 'USD', 'overdraft_limit', 0) ELSE "
		    "'{\"amount\": 3}' END, '{}' FROM generate_series(0, 49999) i ORDER BY i"));
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	/* The rebuild takes each account's statement size from the live models and checks
	 * it: one too high (whose newest items it would not all send) and one too low. */
	PQclear(sql(stack.db,
		    "UPDATE rm_accounts SET entries = entries + 30 WHERE account_id = 'h7'; "
		    "UPDATE rm_accounts SET entries = entries - 30 WHERE account_id = 'h8'"));
	/* The heap need not hold a stream's events in version order (free space is reused):
	 * move two accounts' first events behind the rest of their streams. */
	PQclear(sql(stack.db,
		    "SET session_replication_role = replica; UPDATE events SET data = data "
		    "WHERE stream IN ('account-h1', 'account-h2') AND version <= 2"));
	cr_assert_gt(sql_int(stack.db,
			     "SELECT count(*) FROM (SELECT version, lag(version) OVER (ORDER BY "
			     "ctid) prev FROM events WHERE stream = 'account-h1') s "
			     "WHERE version < prev"),
		     0, "the heap keeps account-h1 in order");
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	harness_start_query(&stack.query, stack.db, stack.redis_url);
	rd = harness_readers_start(&stack.query, ids, 8, 2);
	for (int i = 0; i < 2; i++)
		pthread_create(&w[i], NULL, writer, &t);
	await_writes(&t, 20);
	double errors_before = harness_metric(&stack.projector, PROJECTOR_ERRORS);
	cr_assert_geq(errors_before, 0, "no %s in the projector's metrics", PROJECTOR_ERRORS);
	/* The history's 500 accounts are interleaved: a small bound makes the rebuild send
	 * what it holds for Redis many times before the accounts' last items. */
	setenv("DAYBOOK_REBUILD_HELD_MAX", "1000", 1);
	pid_t pid = start_rebuild("all", &fd);
	unsetenv("DAYBOOK_REBUILD_HELD_MAX");
	read_progress(fd, &json_lines);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	struct redisContext *rc = harness_redis(stack.redis_url);
	redisReply *rebuilt_gen = redisCommand(rc, "GET dbk:generation");
	cr_assert(rebuilt_gen && rebuilt_gen->type == REDIS_REPLY_STRING);
	await_writes(&t, 30);
	atomic_store(&t.stop, true);
	for (int i = 0; i < 2; i++)
		pthread_join(w[i], NULL);
	harness_readers_stop(rd, &reads, &read_errors, &samples, &nsamples);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d", status);
	cr_assert_gt(json_lines, 0, "non-terminal progress must be JSON lines");
	/* A projector leads: the rebuild returns after its switch, the old generation left
	 * to the projector's sweep (checked below). */
	cr_assert_str_eq(cleanup_by, "projector");
	cr_assert_eq(sql_int(stack.db, "SELECT generation FROM projection_checkpoints"),
		     gen_before + 1, "the tables were swapped");
	/* The rebuilt tables keep the live ones' storage parameters (sql/015: room on
	 * rm_accounts' pages for in-place updates). */
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM pg_class WHERE oid = 'rm_accounts'::regclass "
			     "AND 'fillfactor=70' = ANY(reloptions)"),
		     1, "the rebuilt rm_accounts lost its fillfactor");
	cr_assert_eq(read_errors, 0, "%d of %d reads failed", read_errors, reads);
	cr_assert_gt(atomic_load(&t.writes), 0);
	harness_assert_samples_true(stack.db, samples, nsamples);
	free(samples);
	/* The live projector carries on from the rebuilt models, taking the switch as
	 * expected (its next batch finds the checkpoint moved), not as a fault. */
	must("/accounts/r-0/deposits", "{\"amount\":1}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert_eq(harness_metric(&stack.projector, PROJECTOR_ERRORS), errors_before,
		     "the projector counted the rebuild's switch as an error");
	harness_assert_models_match_log(stack.db);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	/* The projector followed the rebuild's generation rather than copying SQL into a
	 * new one, so verify below checks what the rebuild wrote to Redis. */
	long long live_gen;
	char cp[64];
	cr_assert(harness_redis_live(rc, &live_gen, cp, sizeof(cp)));
	cr_assert_eq(live_gen, atoll(rebuilt_gen->str),
		     "the projector resynced Redis after the rebuild");
	/* The generation live before the switch goes: the projector sweeps it once it has
	 * seen the switch. */
	for (double end = harness_now() + 10;; usleep(50000)) {
		redisReply *keys = redisCommand(rc, "KEYS dbk:g:*");
		char prefix[64];
		size_t stray = 0;
		snprintf(prefix, sizeof(prefix), "dbk:g:%s:", rebuilt_gen->str);
		for (size_t i = 0; i < keys->elements; i++)
			stray += strncmp(keys->element[i]->str, prefix, strlen(prefix)) != 0;
		freeReplyObject(keys);
		if (stray == 0)
			break;
		cr_assert(harness_now() < end, "%zu keys of another generation left behind", stray);
	}
	freeReplyObject(rebuilt_gen);
	redisFree(rc);
	cr_assert_eq(run_verify(), 0, "verify found differences after the rebuild");
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%_shadow'"),
		     0);
}

Test(rebuild, an_interrupted_rebuild_leaves_the_live_models_untouched)
{
	redisContext *c;
	redisReply *keys;
	char before[64], now[64], live_before[64], cp[64], line[512];
	long long gen_before, live_gen;
	int fd, status;
	FILE *f;

	must("/accounts", "{\"id\":\"keep-1\",\"name\":\"K\",\"currency\":\"EUR\"}");
	must("/accounts", "{\"id\":\"keep-2\",\"name\":\"K\",\"currency\":\"EUR\"}");
	must("/accounts/keep-1/deposits", "{\"amount\":12345}");
	gen_before = long_log_behind_live(before);
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	snprintf(live_before, sizeof(live_before), "%lld", live_gen);

	pid_t pid = start_rebuild("all", &fd);
	f = fdopen(fd, "r");
	cr_assert(fgets(line, sizeof(line), f), "no progress before the interrupt");
	kill(pid, SIGINT);
	while (fgets(line, sizeof(line), f))
		;
	fclose(f);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 130, "exit status %d", status);

	live_fingerprint(now);
	cr_assert_str_eq(now, before, "the live SQL models changed");
	assert_not_switched(gen_before);
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	snprintf(line, sizeof(line), "%lld", live_gen);
	cr_assert_str_eq(line, live_before, "the live Redis generation changed");
	keys = redisCommand(c, "KEYS dbk:g:*");
	for (size_t i = 0; i < keys->elements; i++) {
		char prefix[96];
		snprintf(prefix, sizeof(prefix), "dbk:g:%s:", live_before);
		cr_assert(strncmp(keys->element[i]->str, prefix, strlen(prefix)) == 0,
			  "shadow key %s left behind", keys->element[i]->str);
	}
	freeReplyObject(keys);

	/* Run to the end, twice, with no projector to sweep after it: the rebuild itself
	 * deletes the generation that was live (the first time past the interrupted one's
	 * number, by SCAN; the second, right after its own, by name, that generation
	 * made to look like one of layout 1, whose statements were `entries:` keys). */
	for (int run = 0; run < 2; run++) {
		if (run == 1) {
			cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
			freeReplyObject(redisCommand(c, "DEL dbk:g:%lld:layout", live_gen));
			keys = redisCommand(c,
					    "RENAME dbk:g:%lld:stmt:keep-1 dbk:g:%lld:entries:keep-1",
					    live_gen, live_gen);
			cr_assert(keys && keys->type == REDIS_REPLY_STATUS,
				  "no statement to rename");
			freeReplyObject(keys);
			/* And a stale statement item where this rebuild will write: generation
			 * numbers start again after Redis loses its data. verify, below, finds
			 * it if it survives. */
			keys = redisCommand(c, "GET dbk:generation");
			cr_assert(keys && keys->type == REDIS_REPLY_STRING);
			freeReplyObject(
				redisCommand(c,
					     "LPUSH dbk:g:%lld:stmt:keep-1 {\"version\":1,\"stale\":1}",
					     atoll(keys->str) + 1));
			freeReplyObject(keys);
		}
		pid = start_rebuild("all", &fd);
		f = fdopen(fd, "r");
		while (fgets(line, sizeof(line), f))
			;
		fclose(f);
		cr_assert_eq(waitpid(pid, &status, 0), pid);
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d",
			  status);
		cr_assert(strstr(line, "\"cleanup_by\":\"rebuild\""),
			  "with no projector the rebuild must clean up itself: %s", line);
		cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
		snprintf(line, sizeof(line), "dbk:g:%lld:", live_gen);
		keys = redisCommand(c, "KEYS dbk:g:*");
		cr_assert_gt(keys->elements, 0);
		for (size_t i = 0; i < keys->elements; i++)
			cr_assert(strncmp(keys->element[i]->str, line, strlen(line)) == 0,
				  "key %s of the old generation left behind",
				  keys->element[i]->str);
		freeReplyObject(keys);
	}
	redisFree(c);
	cr_assert_eq(run_verify(), 0, "verify found differences after the rebuild");
}

/* Ctrl-C while PostgreSQL builds the shadow tables' keys cancels the build rather
 * than waiting for it (minutes, on a large log). An event trigger holds every ALTER
 * TABLE on an advisory lock that the test holds, so the build is sure to be waiting. */
Test(rebuild, an_interrupt_during_the_key_build_cancels_it)
{
	const char waiting[] = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
			       "'%rm_shadow_key%' AND state = 'active' AND pid <> pg_backend_pid()";
	char pg[512], line[512];
	long long gen_before;
	PGconn *hold;
	int fd, status;
	FILE *f;
	pid_t pid;

	must("/accounts", "{\"id\":\"c-1\",\"name\":\"C\",\"currency\":\"EUR\"}");
	must("/accounts/c-1/deposits", "{\"amount\":5}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	gen_before = sql_int(stack.db, "SELECT generation FROM projection_checkpoints");
	PQclear(sql(stack.db,
		    "CREATE FUNCTION hold_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ "
		    "BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); END $$"));
	PQclear(sql(stack.db, "CREATE EVENT TRIGGER hold_keys ON ddl_command_start WHEN TAG IN "
			      "('ALTER TABLE') EXECUTE FUNCTION hold_ddl()"));
	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	hold = PQconnectdb(pg);
	cr_assert_eq(PQstatus(hold), CONNECTION_OK);
	PQclear(PQexec(hold, "SELECT pg_advisory_lock(4242)"));

	pid = start_rebuild("all", &fd);
	f = fdopen(fd, "r");
	do
		cr_assert(fgets(line, sizeof(line), f), "the rebuild ended before its key build");
	while (!strstr(line, "\"phase\":\"index\""));
	for (double end = harness_now() + 20; sql_int(stack.db, waiting) == 0; usleep(20000))
		cr_assert(harness_now() < end, "the key build never started");
	kill(pid, SIGINT);
	for (double end = harness_now() + 20; sql_int(stack.db, waiting) > 0; usleep(50000))
		cr_assert(harness_now() < end, "the key build was not cancelled");
	PQclear(PQexec(hold, "SELECT pg_advisory_unlock(4242)"));
	PQfinish(hold);
	while (fgets(line, sizeof(line), f))
		;
	fclose(f);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 130, "exit status %d", status);
	assert_not_switched(gen_before);
	PQclear(sql(stack.db, "DROP EVENT TRIGGER hold_keys"));
}

/* Redis dies in the middle of a rebuild: the rebuild fails (no SIGPIPE kills it
 * before it cleans up), and the live SQL models and the shadow tables are as an
 * interrupted rebuild leaves them. */
Test(rebuild, redis_lost_mid_rebuild_fails_cleanly)
{
	char before[64], now[64], line[512];
	long long gen_before;
	int fd, status;
	FILE *f;
	pid_t pid;

	must("/accounts", "{\"id\":\"d-1\",\"name\":\"D\",\"currency\":\"EUR\"}");
	must("/accounts/d-1/deposits", "{\"amount\":7}");
	gen_before = long_log_behind_live(before);

	pid = start_rebuild("all", &fd);
	f = fdopen(fd, "r");
	cr_assert(fgets(line, sizeof(line), f), "no progress before Redis goes");
	harness_kill(&stack.redis);
	while (fgets(line, sizeof(line), f))
		;
	fclose(f);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status %d (signal %d)", status,
		  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
	live_fingerprint(now);
	cr_assert_str_eq(now, before, "the live SQL models changed");
	assert_not_switched(gen_before);
}

/* Progress lines read as they come, with a deadline (stdio would buffer past it). */
struct lines {
	int fd;
	char buf[4096];
	size_t len;
};

/* The next line (without its newline) within timeout_s; false at the end or past it. */
static bool next_line(struct lines *in, char *line, size_t len, int timeout_s)
{
	for (;;) {
		char *nl = memchr(in->buf, '\n', in->len);
		struct pollfd p = { .fd = in->fd, .events = POLLIN };
		ssize_t got;

		if (nl) {
			size_t n = (size_t)(nl - in->buf);
			snprintf(line, len, "%.*s", (int)n, in->buf);
			memmove(in->buf, nl + 1, in->len - n - 1);
			in->len -= n + 1;
			return true;
		}
		if (in->len == sizeof(in->buf) || poll(&p, 1, timeout_s * 1000) != 1)
			return false;
		got = read(in->fd, in->buf + in->len, sizeof(in->buf) - in->len);
		if (got <= 0)
			return false;
		in->len += (size_t)got;
	}
}

Test(rebuild, a_long_reader_delays_the_switch_without_holding_up_other_readers)
{
	char pg[512], line[512];
	PGconn *holder, *reader;
	PGresult *r;
	int status;
	bool waited = false;
	struct lines progress = { 0 };

	must("/accounts", "{\"id\":\"w-1\",\"name\":\"W\",\"currency\":\"EUR\"}");
	must("/accounts/w-1/deposits", "{\"amount\":7}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	/* A long reader of the live tables, as a verify is: the swap must wait for it. */
	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	holder = PQconnectdb(pg);
	reader = PQconnectdb(pg);
	cr_assert(PQstatus(holder) == CONNECTION_OK && PQstatus(reader) == CONNECTION_OK);
	PQclear(PQexec(holder, "BEGIN ISOLATION LEVEL REPEATABLE READ"));
	r = PQexec(holder, "SELECT count(*) FROM rm_accounts");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK);
	PQclear(r);

	pid_t pid = start_rebuild("all", &progress.fd);
	while (!waited && next_line(&progress, line, sizeof(line), 60))
		waited = strstr(line, "\"phase\":\"wait\"") != NULL;
	cr_assert(waited, "the rebuild did not report waiting for the tables");
	/* Meanwhile other readers and the projector go on: a deliberate hold, in which the
	 * rebuild must keep waiting without holding them up. */
	usleep(700000);
	r = PQexec(reader, "SET statement_timeout = '20s'");
	PQclear(r);
	r = PQexec(reader, "SELECT balance FROM rm_accounts WHERE account_id = 'w-1'");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "a reader was held up: %s",
		     PQresultErrorMessage(r));
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "7");
	PQclear(r);
	must("/accounts/w-1/deposits", "{\"amount\":1}");
	cr_assert_eq(waitpid(pid, &status, WNOHANG), 0,
		     "the rebuild ended while the tables were held");

	/* Once the long reader is done, the switch goes through. */
	PQclear(PQexec(holder, "COMMIT"));
	while (next_line(&progress, line, sizeof(line), 120))
		;
	close(progress.fd);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d", status);
	PQfinish(holder);
	PQfinish(reader);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert_eq(sql_int(stack.db, "SELECT balance FROM rm_accounts WHERE account_id = 'w-1'"),
		     8);
	cr_assert_eq(run_verify(), 0, "verify found differences after the rebuild");
}

/* The switch's COMMIT fails (a deferred trigger stands in for a lost server): Redis's
 * live generation goes back to what it was, and a second rebuild goes through. */
Test(rebuild, a_switch_whose_commit_fails_puts_redis_back)
{
	redisContext *c;
	long long gen_before, live_before, live_after;
	char cp[64], line[512];
	struct lines progress = { 0 };
	int status;

	must("/accounts", "{\"id\":\"f-1\",\"name\":\"F\",\"currency\":\"EUR\"}");
	must("/accounts/f-1/deposits", "{\"amount\":5}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &live_before, cp, sizeof(cp)));
	gen_before = sql_int(stack.db, "SELECT generation FROM projection_checkpoints");
	PQclear(sql(
		stack.db,
		"CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
		"RAISE EXCEPTION 'injected at commit'; END $$; CREATE CONSTRAINT TRIGGER "
		"fail_switch AFTER UPDATE ON projection_checkpoints DEFERRABLE INITIALLY DEFERRED "
		"FOR EACH ROW WHEN (OLD.generation <> NEW.generation) EXECUTE FUNCTION fail_commit()"));

	pid_t pid = start_rebuild("all", &progress.fd);
	while (next_line(&progress, line, sizeof(line), 120))
		;
	close(progress.fd);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "exit status %d", status);
	cr_assert(harness_redis_live(c, &live_after, cp, sizeof(cp)));
	cr_assert_eq(live_after, live_before, "the live pointer was not put back");
	cr_assert_eq(sql_int(stack.db, "SELECT generation FROM projection_checkpoints"),
		     gen_before);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%_shadow'"),
		     0);
	must("/accounts/f-1/deposits", "{\"amount\":1}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);

	PQclear(sql(stack.db, "DROP TRIGGER fail_switch ON projection_checkpoints"));
	pid = start_rebuild("all", &progress.fd);
	while (next_line(&progress, line, sizeof(line), 120))
		;
	close(progress.fd);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d", status);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert_eq(run_verify(), 0, "verify found differences after the rebuild");
	redisFree(c);
}

/* The switch's COMMIT fails after Redis switched, and meanwhile another generation
 * went live (made by hand here, its layout, identity and checkpoint copied from the
 * rebuild's, standing in for a projector's copy from SQL): putting the old pointer
 * back would hide the newer generation behind an older one, so the pointer stays. The
 * COMMIT waits in a deferred trigger for a lock the test holds, then fails. */
Test(rebuild, a_failed_switch_leaves_a_newer_live_generation_alone)
{
	static const char *const kinds[] = { READMODEL_KIND_LAYOUT, READMODEL_KIND_IDENTITY,
					     READMODEL_KIND_CHECKPOINT };
	redisContext *c;
	redisReply *g;
	long long live_before, ours = 0, newer, live_now;
	char cp[64], line[512];
	struct lines progress = { 0 };
	int status;
	PGconn *hold;

	must("/accounts", "{\"id\":\"n-1\",\"name\":\"N\",\"currency\":\"EUR\"}");
	must("/accounts/n-1/deposits", "{\"amount\":5}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &live_before, cp, sizeof(cp)));
	PQclear(sql(stack.db,
		    "CREATE FUNCTION held_fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
		    "BEGIN PERFORM pg_advisory_lock(4243); RAISE EXCEPTION 'injected at commit'; "
		    "END $$; CREATE CONSTRAINT TRIGGER fail_switch AFTER UPDATE ON "
		    "projection_checkpoints DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN "
		    "(OLD.generation <> NEW.generation) EXECUTE FUNCTION held_fail_commit()"));
	hold = harness_connect_as(stack.db, NULL);
	PQclear(PQexec(hold, "SELECT pg_advisory_lock(4243)"));

	pid_t pid = start_rebuild("all", &progress.fd);
	/* The rebuild's generation goes live; its COMMIT then waits for the lock. */
	for (double end = harness_now() + 60; ours <= live_before; usleep(20000)) {
		cr_assert(harness_now() < end, "the rebuild never switched redis");
		cr_assert(harness_redis_live(c, &ours, cp, sizeof(cp)));
	}
	newer = ours + 1000;
	for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
		g = redisCommand(c, "GET dbk:g:%lld:%s", ours, kinds[k]);
		cr_assert(g && g->type == REDIS_REPLY_STRING, "%s", kinds[k]);
		freeReplyObject(redisCommand(c, "SET dbk:g:%lld:%s %s", newer, kinds[k], g->str));
		freeReplyObject(g);
	}
	freeReplyObject(redisCommand(c, "SET " READMODEL_LIVE_KEY " %lld", newer));
	PQclear(PQexec(hold, "SELECT pg_advisory_unlock(4243)"));
	PQfinish(hold);

	while (next_line(&progress, line, sizeof(line), 120))
		;
	close(progress.fd);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "exit status %d", status);
	cr_assert(harness_redis_live(c, &live_now, cp, sizeof(cp)));
	cr_assert_eq(live_now, newer,
		     "the live pointer is %lld, not the newer %lld (before the rebuild: %lld, the "
		     "rebuild's: %lld)",
		     live_now, newer, live_before, ours);

	/* The hand-made generation holds nothing: without a live pointer the projector
	 * copies SQL into a new one. */
	PQclear(sql(stack.db, "DROP TRIGGER fail_switch ON projection_checkpoints"));
	freeReplyObject(redisCommand(c, "DEL " READMODEL_LIVE_KEY));
	must("/accounts/n-1/deposits", "{\"amount\":1}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	redisFree(c);
}

/* `rebuild sql` under load. The switch folds the events the live projector
 * had not applied yet into the new tables; the projector then resumes from the new
 * checkpoint, so those events never reach Redis by way of a batch. */
Test(rebuild, a_sql_rebuild_under_load_leaves_redis_whole)
{
	static struct traffic t;
	pthread_t w[2];
	char body[128];
	int fd, json_lines, status;

	for (int i = 0; i < 8; i++) {
		snprintf(body, sizeof(body),
			 "{\"id\":\"r-%d\",\"name\":\"R\",\"currency\":\"EUR\"}", i);
		must("/accounts", body);
		snprintf(body, sizeof(body), "/accounts/r-%d/deposits", i);
		must(body, "{\"amount\":1000}");
	}
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	for (int i = 0; i < 2; i++)
		pthread_create(&w[i], NULL, writer, &t);
	await_writes(&t, 20);
	pid_t pid = start_rebuild("sql", &fd);
	read_progress(fd, &json_lines);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	atomic_store(&t.stop, true);
	for (int i = 0; i < 2; i++)
		pthread_join(w[i], NULL);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d", status);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_models_match_log(stack.db);
	cr_expect_eq(run_verify(), 0, "verify found differences between Redis and the log");
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
}

/* Accounts <p>-1 and <p>-2, a deposit into the first and transfer <p>t-1 between them,
 * all applied by the projector. */
static void two_accounts_and_a_transfer(const char *p)
{
	char body[160];

	for (int i = 1; i <= 2; i++) {
		snprintf(body, sizeof(body),
			 "{\"id\":\"%s-%d\",\"name\":\"%s\",\"currency\":\"EUR\"}", p, i, p);
		must("/accounts", body);
	}
	snprintf(body, sizeof(body), "/accounts/%s-1/deposits", p);
	must(body, "{\"amount\":10}");
	snprintf(body, sizeof(body),
		 "{\"id\":\"%st-1\",\"from\":\"%s-1\",\"to\":\"%s-2\",\"amount\":4}", p, p, p);
	must("/transfers", body);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
}

/* rebuild all to its end, with exit status 0; cleanup_by says who took the old
 * generation. */
static void rebuild_all(void)
{
	int fd, json_lines, status;
	pid_t pid = start_rebuild("all", &fd);

	read_progress(fd, &json_lines);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rebuild failed: %d", status);
}

/* two_accounts_and_a_transfer(p), then the projector stopped: a connection to Redis,
 * the live generation in *gen and its identity (IDENTITY_MAX bytes at most). */
#define IDENTITY_MAX 256
static redisContext *stopped_after_a_transfer(const char *p, long long *gen, char *identity)
{
	redisContext *c;
	redisReply *r;
	char cp[64];

	two_accounts_and_a_transfer(p);
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, gen, cp, sizeof(cp)));
	r = redisCommand(c, "GET dbk:g:%lld:identity", *gen);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	snprintf(identity, IDENTITY_MAX, "%s", r->str);
	freeReplyObject(r);
	cr_assert_eq(harness_stop(&stack.projector), 0);
	return c;
}

/* A projector that takes the lead sweeps what older generations still hold: the leader
 * the rebuild left the old generation to may have died before its sweep ended (keys of
 * that generation, ours, left behind here), or Redis failed over to a replica that had
 * not seen the deletions. Without it, nothing would ever reclaim them. */
Test(rebuild, a_projector_taking_the_lead_sweeps_older_generations)
{
	redisContext *c;
	redisReply *r;
	long long old_gen, live_gen;
	char cp[64], identity[IDENTITY_MAX];

	c = stopped_after_a_transfer("s", &old_gen, identity);

	/* No projector leads: the rebuild deletes the old generation itself. */
	rebuild_all();
	cr_assert_str_eq(cleanup_by, "rebuild");
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	cr_assert_gt(live_gen, old_gen);
	r = redisCommand(c, "KEYS dbk:g:%lld:*", old_gen);
	cr_assert_eq(r->elements, 0, "the rebuild left %zu keys of the old generation",
		     r->elements);
	freeReplyObject(r);

	/* What a sweep cut short leaves: some of the old generation's keys. */
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:identity %s", old_gen, identity));
	freeReplyObject(redisCommand(c, "HSET dbk:g:%lld:acct:s-1 v 1 n 0 j {}", old_gen));
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:xfer:st-1 {}", old_gen));
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	for (double end = harness_now() + 10;; usleep(50000)) {
		r = redisCommand(c, "KEYS dbk:g:%lld:*", old_gen);
		size_t left = r->elements;
		freeReplyObject(r);
		if (left == 0)
			break;
		cr_assert(harness_now() < end,
			  "%zu keys of generation %lld left behind by the new leader", left,
			  old_gen);
	}
	/* The live generation is untouched. */
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	must("/accounts/s-1/deposits", "{\"amount\":3}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	redisFree(c);
}

/* Keys of generation gen left in Redis. */
static size_t gen_keys(redisContext *c, long long gen)
{
	redisReply *r = redisCommand(c, "KEYS dbk:g:%lld:*", gen);
	size_t n;

	cr_assert(r && r->type == REDIS_REPLY_ARRAY);
	n = r->elements;
	freeReplyObject(r);
	return n;
}

/* A sweep whose deletions Redis refuses (an ACL, MISCONF, READONLY, OOM) is not done:
 * the projector tries it again until the old generation is gone. Since the rebuild
 * leaves the old generation to a leading projector, the sweep is the only thing that
 * reclaims it. */
Test(rebuild, a_sweep_that_redis_refuses_is_tried_again)
{
	redisContext *c;
	long long old_gen, live_gen;
	char cp[64];

	two_accounts_and_a_transfer("r");
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &old_gen, cp, sizeof(cp)));
	cr_assert_gt(gen_keys(c, old_gen), 0);
	freeReplyObject(redisCommand(c, "ACL SETUSER daybook-projector -unlink"));

	rebuild_all();
	cr_assert_str_eq(cleanup_by, "projector");
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	cr_assert_gt(live_gen, old_gen);
	/* Refused: the old generation stays while UNLINK is not allowed. */
	sleep(2);
	cr_assert_gt(gen_keys(c, old_gen), 0, "the sweep deleted keys it may not delete");

	freeReplyObject(redisCommand(c, "ACL SETUSER daybook-projector +unlink"));
	for (double end = harness_now() + 10; gen_keys(c, old_gen) > 0; usleep(50000))
		cr_assert(harness_now() < end,
			  "%zu keys of generation %lld left behind after a refused sweep",
			  gen_keys(c, old_gen), old_gen);
	must("/accounts/r-1/deposits", "{\"amount\":3}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	redisFree(c);
}

/* A projector that copies Redis from SQL while a rebuild builds (Redis lost its data,
 * or failed over) makes a generation newer than the rebuild's live, and its sweep takes
 * every older one, keys the rebuild had already written among them: the rebuild must not
 * switch to its own, which may have holes. It fails with nothing switched; the live
 * models stay the projector's, equal to the log. */
Test(rebuild, a_rebuild_overtaken_by_a_resync_switches_nothing)
{
	char cp[64];
	long long old_gen, live_gen, gen_before;
	redisContext *c;
	PGconn *hold;
	int fd, status;
	pid_t pid;

	two_accounts_and_a_transfer("o");
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &old_gen, cp, sizeof(cp)));
	gen_before = sql_int(stack.db, "SELECT generation FROM projection_checkpoints");
	/* The switch takes the switch lock exclusively and waits for this; the projector's
	 * batches take it shared and go on. */
	hold = hold_switch_lock();
	pid = start_rebuild("all", &fd);
	wait_for_the_switch();
	/* Redis loses its live generation: the projector copies SQL into a new one. */
	freeReplyObject(redisCommand(c, "DEL " READMODEL_LIVE_KEY));
	for (double end = harness_now() + 30;; usleep(50000)) {
		if (harness_redis_live(c, &live_gen, cp, sizeof(cp)) && live_gen > old_gen)
			break;
		cr_assert(harness_now() < end, "the projector did not copy redis from SQL");
	}
	release_switch_lock(hold);
	status = finish_rebuild(pid, fd);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1,
		  "the rebuild must refuse to switch (exit status %d)", status);
	{
		long long now_gen;
		cr_assert(harness_redis_live(c, &now_gen, cp, sizeof(cp)));
		cr_assert_eq(now_gen, live_gen, "the projector's generation stays live");
	}
	cr_assert_eq(sql_int(stack.db, "SELECT generation FROM projection_checkpoints"), gen_before,
		     "the SQL tables were not swapped");
	must("/accounts/o-1/deposits", "{\"amount\":3}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	cr_expect_eq(run_verify(), 0, "verify found differences between Redis and the log");
	redisFree(c);
}

/* One rebuild of a database at a time: a second one refuses before it touches anything,
 * and the first goes on to a clean switch. Two shared the shadow tables (each reset and
 * dropped the other's; one could swap in a mix of both) and deleted each other's Redis
 * generations. */
Test(rebuild, a_second_rebuild_refuses_while_one_runs)
{
	char said[2048];
	int fd_a, fd_b, status;
	PGconn *hold;
	pid_t a, b;

	two_accounts_and_a_transfer("w");
	/* The first rebuild waits at its switch. */
	hold = hold_switch_lock();
	a = start_rebuild("all", &fd_a);
	wait_for_the_switch();

	b = start_rebuild("all", &fd_b);
	for (double end = harness_now() + 20; waitpid(b, &status, WNOHANG) != b; usleep(20000)) {
		if (harness_now() > end) {
			kill(b, SIGKILL);
			waitpid(b, &status, 0);
			cr_assert_fail(
				"the second rebuild did not refuse: it ran beside the first");
		}
	}
	/* Exited: its output is all in the pipe. */
	{
		FILE *f = fdopen(fd_b, "r");
		size_t n = fread(said, 1, sizeof(said) - 1, f);
		said[n] = '\0';
		fclose(f);
	}
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "exit status %d: %s", status,
		  said);
	cr_assert(strstr(said, "another daybook-admin rebuild of this database is running"), "%s",
		  said);

	release_switch_lock(hold);
	status = finish_rebuild(a, fd_a);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "the first rebuild failed (exit status %d)", status);
	must("/accounts/w-1/deposits", "{\"amount\":3}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	cr_expect_eq(run_verify(), 0, "verify found differences between the models and the log");
}

/* A generation after `after` is live and has its layout key: the projector's copy. */
struct copied {
	redisContext *c;
	long long after, live;
};

static bool copied_live(void *arg)
{
	struct copied *w = arg;
	redisReply *g = redisCommand(w->c, "GET " READMODEL_LIVE_KEY), *l = NULL;

	w->live = g && g->type == REDIS_REPLY_STRING ? atoll(g->str) : 0;
	if (w->live > w->after)
		l = redisCommand(w->c, "EXISTS dbk:g:%lld:" READMODEL_KIND_LAYOUT, w->live);
	freeReplyObject(g);
	bool whole = l && l->type == REDIS_REPLY_INTEGER && l->integer == 1;
	freeReplyObject(l);
	return whole;
}

/* Account id's balance as the live Redis generation has it. */
static long long redis_balance(redisContext *c, const char *id)
{
	char cp[64];
	long long live, balance;
	redisReply *r;
	json_t *j;

	cr_assert(harness_redis_live(c, &live, cp, sizeof(cp)), "no live generation");
	r = redisCommand(c, "HGET dbk:g:%lld:" READMODEL_KIND_ACCOUNT ":%s j", live, id);
	cr_assert(r && r->type == REDIS_REPLY_STRING, "account %s is not in generation %lld", id,
		  live);
	j = json_loads(r->str, 0, NULL);
	cr_assert(json_is_integer(json_object_get(j, "balance")), "%s", r->str);
	balance = json_integer_value(json_object_get(j, "balance"));
	json_decref(j);
	freeReplyObject(r);
	return balance;
}

/* The reply to the switch's script is lost: a proxy between the rebuild and Redis lets
 * the script run, then drops its answer and the connection. The pointer may name the
 * rebuild's generation, and what it replaced is unknown, so the rebuild removes it
 * (through a new connection), rolls the SQL swap back and deletes its generation. Left
 * on that generation, the pointer would name deleted keys: live reads would find
 * nothing. The projector is stopped meanwhile, so that what the rebuild leaves is seen
 * before a projector copies SQL into a new generation, which it does once started. */
Test(rebuild, a_lost_switch_reply_leaves_no_live_pointer_on_the_rebuilds_generation)
{
	struct redis_proxy *proxy;
	struct copied copy;
	char url[HARNESS_REDIS_URL_MAX], cp[64], *out;
	long long gen_before, old_gen, ours;
	redisContext *c;
	redisReply *r;
	int status;

	two_accounts_and_a_transfer("l");
	c = harness_redis(stack.redis_url);
	cr_assert(harness_redis_live(c, &old_gen, cp, sizeof(cp)));
	gen_before = sql_int(stack.db, "SELECT generation FROM projection_checkpoints");
	cr_assert_eq(harness_stop(&stack.projector), 0);

	harness_proxy_open(&proxy, stack.redis.port);
	harness_proxy_url(proxy, stack.redis_url, url, sizeof(url));
	harness_proxy_lose_reply_to(proxy, SWITCH_LIVE_LUA);
	status = harness_admin(stack.db, url, (const char *const[]){ "rebuild", "all", NULL },
			       &out);
	cr_assert(harness_proxy_lost_reply(proxy),
		  "the switch's reply was not dropped (exit status %d):\n%s", status, out);
	harness_proxy_close(&proxy);
	cr_assert_neq(status, 0, "the rebuild reported success:\n%s", out);
	assert_not_switched(gen_before);
	r = redisCommand(c, "GET " READMODEL_GENERATION_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	ours = atoll(r->str);
	freeReplyObject(r);
	cr_assert_gt(ours, old_gen);
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && r->type == REDIS_REPLY_NIL,
		  "the live pointer names generation %s (the failed rebuild's was %lld and has "
		  "%zu keys left; the one before it, %lld); the rebuild said:\n%s",
		  r && r->type == REDIS_REPLY_STRING ? r->str : "?", ours, gen_keys(c, ours),
		  old_gen, out);
	freeReplyObject(r);
	cr_assert_eq(gen_keys(c, ours), 0, "the failed rebuild left its generation's keys");
	cr_assert(strstr(out, "the switch's reply was lost"), "exit status %d:\n%s", status, out);
	/* Its last line does not claim it left the live models alone. */
	cr_assert(strstr(out, "\"live_untouched\":false"), "%s", out);
	free(out);

	/* No live pointer: the projector copies SQL into a new generation and makes it live. */
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	copy = (struct copied){ .c = c, .after = ours };
	cr_assert(harness_wait_until(copied_live, &copy, harness_now() + 30),
		  "no whole generation after %lld went live (live: %lld)", ours, copy.live);
	cr_assert_gt(gen_keys(c, copy.live), 0);
	must("/accounts/l-1/deposits", "{\"amount\":3}");
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	cr_assert_eq(redis_balance(c, "l-1"), 10 - 4 + 3);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	cr_assert_eq(run_verify(), 0, "verify found differences after the lost reply");
	redisFree(c);
}

/* A FLUSHALL in the middle of the load: the rebuild's connection survives it and goes
 * on writing its generation, whose keys written before are gone for good. The switch's
 * script finds the generation's identity key (written when its number was taken, never
 * again) gone and refuses: nothing is switched, the SQL swap is rolled back, and the
 * projector copies SQL into a new generation, which verify finds whole. The switch lock
 * held shared keeps the rebuild from its switch until after the FLUSHALL. */
Test(rebuild, a_flushall_mid_rebuild_switches_nothing)
{
	char before[64], now[64], pg[512], line[1024], cp[64], out[8192] = "";
	long long gen_before, ours;
	struct lines progress = { 0 };
	struct copied copy;
	redisContext *c;
	redisReply *r;
	PGconn *hold;
	int status;
	bool loading = false;

	two_accounts_and_a_transfer("x");
	gen_before = long_log_behind_live(before);
	c = harness_redis(stack.redis_url);
	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	hold = PQconnectdb(pg);
	cr_assert_eq(PQstatus(hold), CONNECTION_OK);
	PQclear(PQexec(hold, "SELECT pg_advisory_lock_shared(" READMODEL_SWITCH_LOCK ")"));

	pid_t pid = start_rebuild("all", &progress.fd);
	while (!loading && next_line(&progress, line, sizeof(line), 60))
		loading = strstr(line, "\"phase\":\"load\"") != NULL;
	cr_assert(loading, "the rebuild reported no load phase (%s)", line);
	r = redisCommand(c, "GET " READMODEL_GENERATION_KEY);
	cr_assert(r && r->type == REDIS_REPLY_STRING);
	ours = atoll(r->str);
	freeReplyObject(r);
	freeReplyObject(redisCommand(c, "FLUSHALL"));
	PQclear(PQexec(hold, "SELECT pg_advisory_unlock_shared(" READMODEL_SWITCH_LOCK ")"));
	PQfinish(hold);

	while (next_line(&progress, line, sizeof(line), 120))
		snprintf(out + strlen(out), sizeof(out) - strlen(out), "%s\n", line);
	close(progress.fd);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1,
		  "the rebuild must fail (exit status %d):\n%s", status, out);
	cr_assert(strstr(out, "lost generation"), "%s", out);
	live_fingerprint(now);
	cr_assert_str_eq(now, before, "the live SQL models changed");
	assert_not_switched(gen_before);
	r = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	cr_assert(r && (r->type == REDIS_REPLY_NIL ||
			(r->type == REDIS_REPLY_STRING && atoll(r->str) != ours)),
		  "the live pointer names the rebuild's generation %lld", ours);
	freeReplyObject(r);
	cr_assert_eq(gen_keys(c, ours), 0, "the failed rebuild left its generation's keys");

	/* The projector copies SQL into a new generation and folds the log on. */
	harness_start_projector(&stack.projector, stack.db, stack.redis_url);
	copy = (struct copied){ .c = c, .after = 0 };
	cr_assert(harness_wait_until(copied_live, &copy, harness_now() + 30),
		  "no whole generation went live (live: %lld)", copy.live);
	harness_wait_caught_up(stack.db, stack.redis_url, 180);
	cr_assert(harness_redis_live(c, &copy.live, cp, sizeof(cp)));
	cr_assert_neq(copy.live, ours);
	cr_assert_eq(redis_balance(c, "x-1"), 10 - 4);
	cr_assert_eq(run_verify(), 0, "verify found differences after the FLUSHALL");
	redisFree(c);
}

/* The rebuild's clean-up of every other generation (here: more than 8 between the one
 * it replaced and its own) takes only those below its own: a newer one (standing in
 * for another rebuild filling it) is left alone, as the projector's sweep leaves it. */
Test(rebuild, the_rebuilds_cleanup_spares_a_newer_generation)
{
	redisContext *c;
	redisReply *r;
	long long old_gen, live_gen, newer;
	char cp[64], identity[IDENTITY_MAX];

	c = stopped_after_a_transfer("g", &old_gen, identity);
	/* Numbers taken by failed attempts: the rebuild's is more than 8 past the live one. */
	r = redisCommand(c, "INCRBY " READMODEL_GENERATION_KEY " 10");
	cr_assert(r && r->type == REDIS_REPLY_INTEGER);
	newer = r->integer + 1000;
	freeReplyObject(r);
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:identity %s", newer, identity));
	freeReplyObject(redisCommand(c, "SET dbk:g:%lld:xfer:gt-1 {}", newer));

	rebuild_all();
	cr_assert_str_eq(cleanup_by, "rebuild");
	cr_assert(harness_redis_live(c, &live_gen, cp, sizeof(cp)));
	cr_assert(live_gen > old_gen && live_gen < newer, "live %lld", live_gen);
	cr_assert_eq(gen_keys(c, old_gen), 0, "the old generation was not deleted");
	cr_assert_eq(gen_keys(c, newer), 2, "the rebuild deleted a newer generation's keys");
	redisFree(c);
}
