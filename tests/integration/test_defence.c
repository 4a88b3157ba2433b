/* Defence in depth (SPEC §7): Redis ACL users (the query service only reads),
 * credentials that never reach the logs, password authentication, and an event store
 * whose txids the cluster has not reached (a logical restore) refused at start. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(defence, .init = setup, .fini = teardown, .timeout = 120);

/* The reply to one command (argv form), for inspection; caller frees. */
static redisReply *run(redisContext *c, int argc, const char **argv)
{
	redisReply *r = redisCommandArgv(c, argc, argv, NULL);

	cr_assert(r, "no reply: %s", c->errstr);
	return r;
}

static void assert_noperm(redisContext *c, int argc, const char **argv)
{
	redisReply *r = run(c, argc, argv);

	cr_assert(r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOPERM", 6) == 0,
		  "%s was not refused with NOPERM (reply type %d: %s)", argv[0], r->type,
		  r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STATUS ? r->str : "");
	freeReplyObject(r);
}

static void assert_ok(redisContext *c, int argc, const char **argv)
{
	redisReply *r = run(c, argc, argv);

	cr_assert(r->type != REDIS_REPLY_ERROR, "%s failed: %s", argv[0], r->str);
	freeReplyObject(r);
}

Test(defence, the_query_service_s_redis_user_cannot_write)
{
	redisContext *q = harness_redis_as(stack.redis_url, "daybook-query");
	const char *set[] = { "SET", "dbk:live", "666" };
	const char *hset[] = { "HSET", "dbk:g:1:acct:a1", "j", "{\"balance\":1000000}" };
	const char *del[] = { "DEL", "dbk:live" };
	const char *flush[] = { "FLUSHALL" };
	const char *eval[] = { "EVAL", "return redis.call('SET', 'dbk:live', '666')", "0" };
	const char *eval_ro_write[] = { "EVAL_RO", "return redis.call('SET', 'dbk:live', '666')",
					"0" };
	const char *load[] = { "SCRIPT", "LOAD", "return redis.call('SET', 'dbk:live', '666')" };
	const char *get[] = { "GET", "dbk:live" };
	const char *eval_ro_read[] = { "EVAL_RO", "return redis.call('GET', 'dbk:live')", "0" };
	const char *publish[] = { "PUBLISH", "dbk:position", "999.999" };
	const char *acl_set[] = { "ACL", "SETUSER", "daybook-query", "+@all" };
	redisContext *admin = harness_redis(stack.redis_url);
	redisReply *r;

	assert_ok(admin, 3, (const char *[]){ "SET", "dbk:live", "1" });
	redisFree(admin);

	assert_noperm(q, 3, set);
	assert_noperm(q, 4, hset);
	assert_noperm(q, 2, del);
	assert_noperm(q, 1, flush);
	assert_noperm(q, 3, eval);
	assert_noperm(q, 3, publish);
	assert_noperm(q, 4, acl_set);
	/* A read-only script may not write, whatever it asks for. */
	r = run(q, 3, eval_ro_write);
	cr_assert_eq(r->type, REDIS_REPLY_ERROR, "EVAL_RO wrote");
	freeReplyObject(r);
	/* Loading a script runs nothing; running it needs EVALSHA (refused) or
	 * EVALSHA_RO (where the write fails). */
	r = run(q, 3, load);
	cr_assert_eq(r->type, REDIS_REPLY_STRING, "SCRIPT LOAD: %s", r->str);
	assert_noperm(q, 3, (const char *[]){ "EVALSHA", r->str, "0" });
	{
		redisReply *e = run(q, 3, (const char *[]){ "EVALSHA_RO", r->str, "0" });
		cr_assert_eq(e->type, REDIS_REPLY_ERROR, "EVALSHA_RO ran a write");
		freeReplyObject(e);
	}
	freeReplyObject(r);

	/* Reads work, and the value is untouched. */
	r = run(q, 2, get);
	cr_assert(r->type == REDIS_REPLY_STRING && strcmp(r->str, "1") == 0, "dbk:live changed");
	freeReplyObject(r);
	r = run(q, 3, eval_ro_read);
	cr_assert(r->type == REDIS_REPLY_STRING && strcmp(r->str, "1") == 0);
	freeReplyObject(r);
	redisFree(q);
}

Test(defence, redis_refuses_clients_without_a_user_and_the_projector_cannot_flush)
{
	struct service p = { .port = stack.redis.port };
	redisContext *anon = redisConnect("127.0.0.1", p.port), *proj;
	redisReply *r = redisCommand(anon, "GET dbk:live");

	cr_assert(r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOAUTH", 6) == 0,
		  "an unauthenticated client was served");
	freeReplyObject(r);
	r = redisCommand(anon, "AUTH default nothing");
	cr_assert(r && r->type == REDIS_REPLY_ERROR, "the default user is enabled");
	freeReplyObject(r);
	redisFree(anon);

	proj = harness_redis_as(stack.redis_url, "daybook-projector");
	assert_ok(proj, 3, (const char *[]){ "SET", "dbk:live", "2" });
	assert_noperm(proj, 1, (const char *[]){ "FLUSHALL" });
	assert_noperm(proj, 3, (const char *[]){ "CONFIG", "GET", "requirepass" });
	assert_noperm(proj, 3, (const char *[]){ "SET", "not-daybook", "x" });
	redisFree(proj);
}

/* True when the file holds `needle`. */
/* CLIENT LIST shows a connection named `name` authenticated as `user`, and none named
 * `name` as another user. */
static bool client_is(const char *list, const char *name, const char *user)
{
	char want_name[128], want_user[128];
	bool seen = false;

	snprintf(want_name, sizeof(want_name), " name=%s ", name);
	snprintf(want_user, sizeof(want_user), " user=%s ", user);
	for (const char *line = list; line && *line; line = strchr(line, '\n')) {
		const char *end;
		if (*line == '\n')
			line++;
		end = strchr(line, '\n');
		const char *n = strstr(line, want_name), *u = strstr(line, want_user);
		if (!n || (end && n > end))
			continue;
		if (!u || (end && u > end))
			return false;
		seen = true;
	}
	return seen;
}

Test(defence, services_use_their_own_redis_users_and_never_log_passwords)
{
	struct service projector, query;
	redisContext *ops = harness_redis(stack.redis_url);
	redisReply *r;
	const char *const secrets[] = { "test-projector-password", "test-query-password",
					"test-admin-password", "test-ops-password" };

	harness_start_projector(&projector, stack.db, stack.redis_url);
	harness_start_query(&query, stack.db, stack.redis_url);
	harness_wait_caught_up(stack.db, stack.redis_url, 30);
	/* The query service is ready on SQL alone: its Redis connections may come later. */
	for (double end = harness_now() + 20;; usleep(50000)) {
		r = redisCommand(ops, "CLIENT LIST");
		cr_assert(r && r->type == REDIS_REPLY_STRING);
		if (client_is(r->str, "daybook-query", "daybook-query") &&
		    client_is(r->str, "daybook-projector", "daybook-projector"))
			break;
		cr_assert(harness_now() < end,
			  "not every service is connected as its own user:\n%s", r->str);
		freeReplyObject(r);
	}
	freeReplyObject(r);
	redisFree(ops);
	harness_stop(&query);
	harness_stop(&projector);

	for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++) {
		cr_assert_not(harness_log_says(&projector, secrets[i]), "the projector logged %s",
			      secrets[i]);
		cr_assert_not(harness_log_says(&query, secrets[i]), "the query service logged %s",
			      secrets[i]);
	}
}

Test(defence, a_refused_redis_password_is_reported_without_the_password)
{
	char pg[512], cmd[2048], out[8192] = "";
	const char *at = strchr(stack.redis_url, '@');
	size_t n = 0;
	FILE *p;
	int status;

	harness_conninfo(stack.db, NULL, pg, sizeof(pg));
	snprintf(cmd, sizeof(cmd),
		 "DAYBOOK_PG='%s' DAYBOOK_REDIS='redis://daybook-admin:not-the-password-4711%s' "
		 "'%s' verify 2>&1",
		 pg, at, getenv("DAYBOOK_ADMIN_BIN"));
	p = popen(cmd, "r");
	cr_assert(p);
	while (n < sizeof(out) - 1 && fgets(out + n, (int)(sizeof(out) - n), p))
		n = strlen(out);
	status = pclose(p);
	cr_assert_neq(status, 0, "verify succeeded with a wrong password: %s", out);
	cr_assert_not_null(strstr(out, "WRONGPASS"), "the refusal is not named: %s", out);
	cr_assert_null(strstr(out, "not-the-password-4711"), "the password was printed: %s", out);
}

Test(defence, postgresql_asks_every_connection_for_a_password)
{
	static const char *const roles[] = { NULL, "daybook_command", "daybook_projector",
					     "daybook_query" };

	for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
		char conninfo[600];
		size_t n;
		PGconn *conn;

		harness_conninfo(stack.db, roles[i], conninfo, sizeof(conninfo));
		n = strlen(conninfo);
		/* With its password (from PGPASSFILE) the role gets in ... */
		conn = PQconnectdb(conninfo);
		cr_assert(PQstatus(conn) == CONNECTION_OK, "%s: %s", conninfo,
			  PQerrorMessage(conn));
		PQfinish(conn);
		/* ... without one it does not: no `trust` anywhere. */
		snprintf(conninfo + n, sizeof(conninfo) - n, " passfile=/dev/null password=''");
		conn = PQconnectdb(conninfo);
		cr_assert(PQstatus(conn) != CONNECTION_OK, "%s got in without a password",
			  conninfo);
		PQfinish(conn);
	}
}

/* Run `cmd` (a shell command line) with stderr into out; its exit status, or -1. */
static int run_capture(const char *cmd, char *out, size_t len)
{
	char line[2048];
	FILE *p = popen(cmd, "r");
	size_t n = 0;
	int status;

	cr_assert(p, "popen %s", cmd);
	out[0] = '\0';
	while (fgets(line, sizeof(line), p))
		if (n + strlen(line) < len) {
			memcpy(out + n, line, strlen(line) + 1);
			n += strlen(line);
		}
	status = pclose(p);
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The binary in environment variable `binvar`, as `role`, with `args`: its exit status
 * within 30 s (124 when it was still running) and its stderr. */
static int run_service(const char *binvar, const char *role, const char *args, char *out,
		       size_t len)
{
	char pg[512], cmd[4096], url[HARNESS_REDIS_URL_MAX], tokens[512];
	FILE *f;

	/* A valid tokens file: the services read it before they check the store. */
	snprintf(tokens, sizeof(tokens), "%s/daybook-test-defence-tokens-%d.txt",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
	f = fopen(tokens, "w");
	cr_assert(f, "cannot write %s", tokens);
	fprintf(f, "t %064d write\n", 0);
	fclose(f);
	harness_conninfo(stack.db, role, pg, sizeof(pg));
	harness_redis_url_as(stack.redis_url, "daybook-projector", url, sizeof(url));
	snprintf(cmd, sizeof(cmd),
		 "DAYBOOK_PG='%s' DAYBOOK_REDIS='%s' DAYBOOK_LISTEN=127.0.0.1:%d "
		 "DAYBOOK_TOKENS_FILE='%s' timeout 30 '%s' %s 2>&1 >/dev/null",
		 pg, role && strcmp(role, "daybook_projector") == 0 ? url : stack.redis_url,
		 harness_free_port(), tokens, getenv(binvar), args);
	return run_capture(cmd, out, len);
}

Test(defence, a_log_with_txids_ahead_of_the_cluster_is_refused_at_start)
{
	char out[8192];
	int status;

	/* As a logical restore into a younger cluster leaves it: an event whose txid this
	 * cluster has not reached (the superuser may set it; the command role may not). */
	PQclear(sql(stack.db,
		    "INSERT INTO events (txid, stream, version, type, data, metadata) VALUES "
		    "((pg_current_xact_id()::text::bigint + 1000000)::text::xid8, 'account-r', 1, "
		    "'AccountOpened', '{\"account_id\":\"r\",\"name\":\"R\",\"currency\":\"EUR\","
		    "\"overdraft_limit\":0}', '{}')"));

	status = run_service("DAYBOOK_PROJECTOR_BIN", "daybook_projector", "", out, sizeof(out));
	cr_assert_eq(status, 3, "the projector: exit %d, %s", status, out);
	cr_assert_not_null(strstr(out, "docs/operations.md"), "%s", out);
	cr_assert_not_null(strstr(out, "daybook-projector: the event store holds txid"), "%s", out);

	status = run_service("DAYBOOK_COMMAND_BIN", "daybook_command", "", out, sizeof(out));
	cr_assert_eq(status, 3, "the command service: exit %d, %s", status, out);
	cr_assert_not_null(strstr(out, "docs/operations.md"), "%s", out);

	status = run_service("DAYBOOK_ADMIN_BIN", NULL, "status", out, sizeof(out));
	cr_assert_eq(status, 3, "admin status: exit %d, %s", status, out);
	cr_assert_not_null(strstr(out, "docs/operations.md"), "%s", out);

	status = run_service("DAYBOOK_ADMIN_BIN", NULL, "verify", out, sizeof(out));
	cr_assert_eq(status, 3, "admin verify: exit %d, %s", status, out);
	cr_assert_not_null(strstr(out, "docs/operations.md"), "%s", out);
}

Test(defence, a_service_started_before_postgresql_answers_checks_once_it_does)
{
	char pg[512], url[HARNESS_REDIS_URL_MAX], listen[32], log_path[512], q[512];
	struct service proj = { .name = "projector" };
	FILE *logf;
	int status = -1;
	double end;
	pid_t pid;

	PQclear(sql(stack.db,
		    "INSERT INTO events (txid, stream, version, type, data, metadata) VALUES "
		    "((pg_current_xact_id()::text::bigint + 1000000)::text::xid8, 'account-r', 1, "
		    "'AccountOpened', '{\"account_id\":\"r\",\"name\":\"R\",\"currency\":\"EUR\","
		    "\"overdraft_limit\":0}', '{}')"));
	/* PostgreSQL turns the projector away at its start ... */
	snprintf(q, sizeof(q), "REVOKE CONNECT ON DATABASE %s FROM PUBLIC, daybook_projector",
		 stack.db);
	PQclear(sql(stack.db, q));
	harness_conninfo(stack.db, "daybook_projector", pg, sizeof(pg));
	harness_redis_url_as(stack.redis_url, "daybook-projector", url, sizeof(url));
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", harness_free_port());
	snprintf(log_path, sizeof(log_path), "%s/daybook-test-%d-deferred-check.log",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
	snprintf(proj.log_path, sizeof(proj.log_path), "%s", log_path);
	/* The projector's log: there before the child writes to it. */
	logf = fopen(log_path, "w");
	cr_assert(logf, "cannot write %s", log_path);
	fclose(logf);
	pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		/* The projector's log, read back by the test. */
		FILE *f = freopen(log_path, "a", stderr);
		(void)f;
		setenv("DAYBOOK_PG", pg, 1);
		setenv("DAYBOOK_REDIS", url, 1);
		setenv("DAYBOOK_LISTEN", listen, 1);
		execl(getenv("DAYBOOK_PROJECTOR_BIN"), "daybook-projector", (char *)NULL);
		_exit(127);
	}
	proj.pid = pid;
	if (!harness_wait_log(&proj, "checking again", harness_now() + 30)) {
		harness_print_log(&proj);
		harness_kill(&proj);
		cr_assert_fail("the projector did not say it would check again");
	}
	/* ... and answers a moment later: the check runs then, and refuses. */
	snprintf(q, sizeof(q), "GRANT CONNECT ON DATABASE %s TO PUBLIC, daybook_projector",
		 stack.db);
	PQclear(sql(stack.db, q));
	for (end = harness_now() + 30; harness_now() < end; usleep(50000))
		if (waitpid(pid, &status, WNOHANG) == pid)
			break;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 3) {
		harness_print_log(&proj);
		harness_kill(&proj);
		cr_assert_fail("the projector did not stop with status 3");
	}
	cr_assert(harness_log_says(&proj, "daybook-projector: the event store holds txid"));
}
