/* Integration-test harness: a fresh migrated database per test, the real service
 * binaries on free loopback ports, a blocking HTTP client, and SQL helpers. */
#include "harness.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "config.h"
#include "readmodel.h"
#include "digest.h"

static const char *env_or_skip(const char *name)
{
	const char *v = getenv(name);

	if (!v || !*v)
		cr_assert_fail("%s is not set: run the suite through `scripts/dev test` (or meson test with "
			 "the DAYBOOK_TEST_* variables)",
			 name);
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double harness_now(void)
{
	return now();
}

void harness_conninfo(const char *db, const char *role, char *out, size_t len)
{
	PQconninfoOption *opts = PQconninfoParse(env_or_skip("DAYBOOK_TEST_PG"), NULL);
	const char *host = "127.0.0.1", *port = "5432", *user = "postgres";

	cr_assert(opts, "DAYBOOK_TEST_PG does not parse");
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		if (!o->val)
			continue;
		if (strcmp(o->keyword, "host") == 0)
			host = o->val;
		else if (strcmp(o->keyword, "port") == 0)
			port = o->val;
		else if (strcmp(o->keyword, "user") == 0)
			user = o->val;
	}
	snprintf(out, len, "host=%s port=%s dbname=%s user=%s connect_timeout=5", host, port, db,
		 role ? role : user);
	PQconninfoFree(opts);
}

static PGconn *connect_db(const char *db)
{
	char conninfo[512];
	PGconn *conn;

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting to %s: %s", db, PQerrorMessage(conn));
	return conn;
}

PGresult *sql(const char *db, const char *query)
{
	PGconn *conn = connect_db(db);
	PGresult *r = PQexec(conn, query);
	ExecStatusType st = PQresultStatus(r);

	cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "SQL failed: %s\n%s", query,
		  PQresultErrorMessage(r));
	PQfinish(conn);
	return r;
}

PGconn *harness_connect_as(const char *db, const char *role)
{
	char conninfo[512];
	PGconn *conn;

	harness_conninfo(db, role, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting as %s: %s", role ? role : "superuser",
		  PQerrorMessage(conn));
	return conn;
}

const char *harness_sqlstate(PGconn *conn, const char *query, char code[6])
{
	PGresult *r = PQexec(conn, query);
	ExecStatusType st = PQresultStatus(r);
	const char *c = PQresultErrorField(r, PG_DIAG_SQLSTATE);

	snprintf(code, 6, "%s", st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK ? "" : c ? c : "?????");
	PQclear(r);
	return code;
}

long long sql_int(const char *db, const char *query)
{
	PGresult *r = sql(db, query);
	long long v;

	cr_assert(PQntuples(r) == 1, "expected one row from: %s", query);
	v = PQgetisnull(r, 0, 0) ? 0 : atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

void harness_db_create(char *db, size_t len)
{
	static int counter;
	char cmd[1024], conninfo[512];
	PGconn *conn;
	PGresult *r;

	snprintf(db, len, "t_%d_%d_%ld", (int)getpid(), counter++, (long)(now() * 1000) % 100000);
	conn = PQconnectdb(env_or_skip("DAYBOOK_TEST_PG"));
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting to DAYBOOK_TEST_PG: %s",
		  PQerrorMessage(conn));
	snprintf(cmd, sizeof(cmd), "CREATE DATABASE %s", db);
	r = PQexec(conn, cmd);
	cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK, "%s: %s", cmd, PQresultErrorMessage(r));
	PQclear(r);
	PQfinish(conn);
	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	snprintf(cmd, sizeof(cmd), "DAYBOOK_PG='%s' '%s' migrate >/dev/null", conninfo,
		 env_or_skip("DAYBOOK_ADMIN_BIN"));
	cr_assert(system(cmd) == 0, "migrating %s failed", db);
}

/* Test files go under $TMPDIR, which `scripts/dev test` removes afterwards. */
static const char *tmpdir(void)
{
	const char *t = getenv("TMPDIR");
	return t && *t ? t : "/tmp";
}

static const char *tokens_file(void)
{
	static char path[256];
	const char *const toks[][3] = { { "test-write", TOKEN_WRITE, "write" },
					{ "test-read", TOKEN_READ, "read" },
					{ "test-admin", TOKEN_ADMIN, "write,read,admin" } };
	FILE *f;

	if (path[0])
		return path;
	snprintf(path, sizeof(path), "%s/daybook-test-tokens-%d.txt", tmpdir(), (int)getpid());
	f = fopen(path, "w");
	cr_assert(f, "cannot write %s", path);
	fprintf(f, "# test tokens\n");
	for (size_t i = 0; i < 3; i++) {
		unsigned char d[DIGEST_SHA256_LEN];
		char hex[65];
		cr_assert(digest_sha256(toks[i][1], strlen(toks[i][1]), d));
		digest_hex(d, DIGEST_SHA256_LEN, hex);
		fprintf(f, "%s %s %s\n", toks[i][0], hex, toks[i][2]);
	}
	fclose(f);
	return path;
}

int harness_free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	cr_assert(fd >= 0);
	cr_assert(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	cr_assert(getsockname(fd, (struct sockaddr *)&a, &alen) == 0);
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

void harness_print_xid_holders(void)
{
	PGconn *conn = PQconnectdb(env_or_skip("DAYBOOK_TEST_PG"));
	PGresult *r = PQexec(conn, "SELECT pid, datname, backend_xid, now() - xact_start, state, "
				   "left(query, 100) FROM pg_stat_activity WHERE backend_xid IS NOT "
				   "NULL ORDER BY xact_start");

	fprintf(stderr, "---- transactions holding an xid (xmin %s) ----\n",
		PQresultStatus(r) == PGRES_TUPLES_OK ? "below" : PQresultErrorMessage(r));
	for (int i = 0; PQresultStatus(r) == PGRES_TUPLES_OK && i < PQntuples(r); i++)
		fprintf(stderr, "%s %s xid %s for %s, %s: %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
			PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4), PQgetvalue(r, i, 5));
	PQclear(r);
	PQfinish(conn);
}

void harness_print_log(const struct service *svc)
{
	char line[2048];
	FILE *f = fopen(svc->log_path, "r");

	if (!f)
		return;
	fprintf(stderr, "---- %s log (%s) ----\n", svc->name, svc->log_path);
	while (fgets(line, sizeof(line), f))
		fputs(line, stderr);
	fclose(f);
}

/* /readyz says ready, or (a projector) that the instance stands by for another. */
static bool wait_ready(const struct service *svc, double timeout)
{
	double end = now() + timeout;

	while (now() < end) {
		struct response r = http_request(svc->port, "GET", "/readyz", NULL, NULL, 2);
		bool ok = r.status == 200 || (r.status == 503 && r.body && strstr(r.body, "standby"));
		response_free(&r);
		if (ok)
			return true;
		if (svc->pid > 0 && waitpid(svc->pid, NULL, WNOHANG) == svc->pid)
			return false;
		usleep(20000);
	}
	return false;
}

static void start_service(struct service *svc, const char *name, const char *binvar,
			  const char *pg, const char *const *extra_env)
{
	const char *bin = env_or_skip(binvar);
	char listen[64];

	memset(svc, 0, sizeof(*svc));
	snprintf(svc->name, sizeof(svc->name), "%s", name);
	svc->port = harness_free_port();
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", svc->port);
	snprintf(svc->log_path, sizeof(svc->log_path), "%s/daybook-test-%d-%s-%d.log", tmpdir(),
		 (int)getpid(), name, svc->port);
	svc->pid = fork();
	cr_assert(svc->pid >= 0);
	if (svc->pid == 0) {
		int fd = open(svc->log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd >= 0)
			dup2(fd, 2);
		setenv("DAYBOOK_PG", pg, 1);
		setenv("DAYBOOK_LISTEN", listen, 1);
		setenv("DAYBOOK_TOKENS_FILE", tokens_file(), 1);
		setenv("DAYBOOK_LOG_LEVEL", "debug", 1);
		for (size_t i = 0; extra_env && extra_env[i]; i += 2)
			setenv(extra_env[i], extra_env[i + 1], 1);
		execl(bin, bin, (char *)NULL);
		_exit(127);
	}
	if (!wait_ready(svc, 20)) {
		harness_print_log(svc);
		harness_kill(svc);
		cr_assert_fail("%s did not become ready", name);
	}
}

/* Started and leading: a command restarted at once after a kill may first see its
 * predecessor's lease session still alive, and stand by for a moment. */
static void wait_leading(struct service *svc)
{
	if (!harness_wait_status(svc, "/readyz", 200, 20)) {
		harness_print_log(svc);
		harness_kill(svc);
		cr_assert_fail("%s did not lead (ready) within 20 s", svc->name);
	}
}

void harness_start_command(struct service *svc, const char *db)
{
	char pg[512];

	harness_conninfo(db, "daybook_command", pg, sizeof(pg));
	start_service(svc, "command", "DAYBOOK_COMMAND_BIN", pg, NULL);
	wait_leading(svc);
}

void harness_start_command_env(struct service *svc, const char *db, const char *const *env)
{
	char pg[512];

	harness_conninfo(db, "daybook_command", pg, sizeof(pg));
	start_service(svc, "command", "DAYBOOK_COMMAND_BIN", pg, env);
	wait_leading(svc);
}

void harness_start_command_standby(struct service *svc, const char *db, const char *const *env)
{
	char pg[512];

	harness_conninfo(db, "daybook_command", pg, sizeof(pg));
	start_service(svc, "command", "DAYBOOK_COMMAND_BIN", pg, env);
}

void harness_start_query(struct service *svc, const char *db, const char *redis_url)
{
	char pg[512], url[HARNESS_REDIS_URL_MAX];
	const char *env[] = { "DAYBOOK_REDIS", url, NULL };

	harness_redis_url_as(redis_url, "daybook-query", url, sizeof(url));
	harness_conninfo(db, "daybook_query", pg, sizeof(pg));
	start_service(svc, "query", "DAYBOOK_QUERY_BIN", pg, env);
}

void harness_start_query_env(struct service *svc, const char *db, const char *redis_url,
			     const char *const *env)
{
	char pg[512], url[HARNESS_REDIS_URL_MAX];
	const char *all[32] = { "DAYBOOK_REDIS", url };
	size_t n = 2;

	for (size_t i = 0; env && env[i] && n + 2 < sizeof(all) / sizeof(all[0]); i += 2) {
		all[n++] = env[i];
		all[n++] = env[i + 1];
	}
	harness_redis_url_as(redis_url, "daybook-query", url, sizeof(url));
	harness_conninfo(db, "daybook_query", pg, sizeof(pg));
	start_service(svc, "query", "DAYBOOK_QUERY_BIN", pg, all);
}

void harness_start_projector(struct service *svc, const char *db, const char *redis_url)
{
	char pg[512], url[HARNESS_REDIS_URL_MAX];
	const char *env[] = { "DAYBOOK_REDIS", url, NULL };

	harness_redis_url_as(redis_url, "daybook-projector", url, sizeof(url));
	harness_conninfo(db, "daybook_projector", pg, sizeof(pg));
	start_service(svc, "projector", "DAYBOOK_PROJECTOR_BIN", pg, env);
}

/* The test Redis servers' ACL users and their passwords (fixed: the servers are
 * private to the test run). The rules come from deploy/redis-users.acl. */
static const char *const redis_users[][2] = {
	{ "daybook-projector", "test-projector-password" },
	{ "daybook-query", "test-query-password" },
	{ "daybook-admin", "test-admin-password" },
	{ "daybook-ops", "test-ops-password" },
};

static const char *redis_password(const char *user)
{
	for (size_t i = 0; i < sizeof(redis_users) / sizeof(redis_users[0]); i++)
		if (strcmp(redis_users[i][0], user) == 0)
			return redis_users[i][1];
	cr_assert_fail("no test Redis user %s", user);
	return NULL;
}

/* One line of the ACL template with each @user@ replaced by the hash of its password. */
static void render_acl_line(FILE *out, const char *line)
{
	for (const char *p = line; *p; ) {
		const char *end = *p == '@' ? strchr(p + 1, '@') : NULL;
		bool known = false;
		if (end) {
			for (size_t i = 0; i < sizeof(redis_users) / sizeof(redis_users[0]); i++) {
				const char *u = redis_users[i][0];
				if (strlen(u) != (size_t)(end - p - 1) || strncmp(u, p + 1, strlen(u)))
					continue;
				unsigned char d[DIGEST_SHA256_LEN];
				char hex[DIGEST_SHA256_HEX_LEN + 1];
				cr_assert(digest_sha256(redis_users[i][1], strlen(redis_users[i][1]), d));
				digest_hex(d, DIGEST_SHA256_LEN, hex);
				fputs(hex, out);
				known = true;
			}
		}
		if (known) {
			p = end + 1;
		} else {
			fputc(*p, out);
			p++;
		}
	}
}

/* The rendered ACL file for test Redis servers (written once per test process). */
static const char *redis_acl_file(void)
{
	static char path[256];
	char line[4096];
	FILE *in, *out;

	if (path[0])
		return path;
	snprintf(path, sizeof(path), "%s/daybook-test-redis-%d.acl", tmpdir(), (int)getpid());
	/* The ACL template (comments dropped) and the test ACL file it becomes. */
	in = fopen(env_or_skip("DAYBOOK_TEST_REDIS_ACL"), "r");
	out = fopen(path, "w");
	cr_assert(in && out, "cannot render %s into %s", getenv("DAYBOOK_TEST_REDIS_ACL"), path);
	while (fgets(line, sizeof(line), in))
		if (line[0] != '#' && line[0] != '\n')
			render_acl_line(out, line);
	fclose(in);
	fclose(out);
	return path;
}

void harness_redis_url_as(const char *url, const char *user, char *out, size_t len)
{
	struct config_redis addr;

	cr_assert(config_parse_redis(url, &addr), "bad redis url %s", url);
	if (addr.master[0]) { /* harness_start_sentinel's URL */
		cr_assert_lt((size_t)snprintf(out, len, "redis-sentinel://%s:%s@%s/%s/%d", user,
					      redis_password(user), addr.sentinels, addr.master,
					      addr.db),
			     len);
		return;
	}
	if (!addr.password[0] || addr.path[0]) {
		snprintf(out, len, "%s", url); /* a server without users: as it is */
		return;
	}
	cr_assert_lt((size_t)snprintf(out, len, "redis://%s:%s@%s:%u/%d", user, redis_password(user),
				      addr.host, (unsigned)addr.port, addr.db),
		     len);
}

/* Start redis-server with argv (argv[0] "redis-server"), its stdout discarded; it dies
 * with the test process. */
static pid_t spawn_redis_server(char *const argv[])
{
	pid_t pid = fork();

	cr_assert(pid >= 0);
	if (pid == 0) {
		int fd = open("/dev/null", O_WRONLY);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd >= 0)
			dup2(fd, 1);
		execvp("redis-server", argv);
		_exit(127);
	}
	return pid;
}

void harness_start_redis(struct service *svc, bool reuse_port, char *url, size_t len)
{
	char port[16], rdb[64];
	int p = reuse_port ? svc->port : harness_free_port();
	const char *acl = redis_acl_file();

	memset(svc, 0, sizeof(*svc));
	svc->port = p;
	snprintf(svc->name, sizeof(svc->name), "redis");
	snprintf(port, sizeof(port), "%d", p);
	/* Its RDB file, in the run's TMPDIR: a test server saves nothing by itself, but one
	 * that becomes a replica (test_sentinel) writes what it receives, and a file in the
	 * shared working directory would be loaded by every later test server. Removed
	 * first, so that each start is empty. */
	snprintf(rdb, sizeof(rdb), "daybook-test-redis-%d.rdb", p);
	{
		char path[512];
		snprintf(path, sizeof(path), "%s/%s", tmpdir(), rdb);
		unlink(path);
	}
	cr_assert_lt((size_t)snprintf(url, len, "redis://daybook-admin:%s@127.0.0.1:%d",
				      redis_password("daybook-admin"), p),
		     len);
	{
		char *const argv[] = { "redis-server", "--port", port, "--bind", "127.0.0.1",
				       "--save", "", "--appendonly", "no", "--protected-mode", "no",
				       "--aclfile", (char *)acl, "--dir", (char *)tmpdir(),
				       "--dbfilename", rdb, NULL };
		svc->pid = spawn_redis_server(argv);
	}
	for (int i = 0; i < 200; i++) {
		redisContext *c = redisConnect("127.0.0.1", p);
		bool up = c && !c->err;
		if (c)
			redisFree(c);
		if (up)
			return;
		usleep(10000);
	}
	cr_assert_fail("redis-server on port %d did not start", p);
}

void harness_start_sentinel(struct service *svc, int redis_port, char *url, size_t len)
{
	char conf[512], port[16];
	int p = harness_free_port();
	FILE *f;

	memset(svc, 0, sizeof(*svc));
	svc->port = p;
	snprintf(svc->name, sizeof(svc->name), "sentinel");
	snprintf(port, sizeof(port), "%d", p);
	/* The Sentinel's configuration, which it rewrites as it learns. */
	snprintf(conf, sizeof(conf), "%s/daybook-test-sentinel-%d-%d.conf", tmpdir(), (int)getpid(), p);
	f = fopen(conf, "w");
	cr_assert(f, "cannot write %s", conf);
	fprintf(f, "bind 127.0.0.1\nport %d\nsentinel resolve-hostnames no\n"
		   "sentinel monitor daybook 127.0.0.1 %d 1\n"
		   "sentinel auth-user daybook daybook-ops\nsentinel auth-pass daybook %s\n"
		   "sentinel down-after-milliseconds daybook 1000\n",
		p, redis_port, redis_password("daybook-ops"));
	fclose(f);
	cr_assert_lt((size_t)snprintf(url, len, "redis-sentinel://daybook-admin:%s@127.0.0.1:%d/daybook",
				      redis_password("daybook-admin"), p),
		     len);
	{
		char *const argv[] = { "redis-server", conf, "--sentinel", NULL };
		svc->pid = spawn_redis_server(argv);
	}
	for (int i = 0; i < 500; i++) {
		redisContext *c = redisConnect("127.0.0.1", p);
		redisReply *r = c && !c->err ? redisCommand(c, "SENTINEL get-master-addr-by-name daybook")
					     : NULL;
		bool up = r && r->type == REDIS_REPLY_ARRAY && r->elements == 2;
		if (r)
			freeReplyObject(r);
		if (c)
			redisFree(c);
		if (up)
			return;
		usleep(10000);
	}
	cr_assert_fail("redis-sentinel on port %d did not start", p);
}

struct redisContext *harness_redis_as(const char *url, const char *user)
{
	struct config_redis addr;
	char as[HARNESS_REDIS_URL_MAX];
	redisContext *c;

	harness_redis_url_as(url, user, as, sizeof(as));
	cr_assert(config_parse_redis(as, &addr), "bad redis url %s", url);
	c = addr.path[0] ? redisConnectUnix(addr.path) : redisConnect(addr.host, addr.port);
	cr_assert(c && !c->err, "connecting to %s: %s", url, c ? c->errstr : "out of memory");
	if (addr.password[0]) {
		redisReply *r = redisCommand(c, "AUTH %s %s", addr.user, addr.password);
		cr_assert(r && r->type == REDIS_REPLY_STATUS, "AUTH as %s: %s", addr.user,
			  r && r->type == REDIS_REPLY_ERROR ? r->str : c->errstr);
		freeReplyObject(r);
	}
	if (addr.db) {
		redisReply *r = redisCommand(c, "SELECT %d", addr.db);
		freeReplyObject(r);
	}
	return c;
}

struct redisContext *harness_redis(const char *url)
{
	return harness_redis_as(url, "daybook-ops");
}

double harness_metric(const struct service *svc, const char *name)
{
	struct response r = http_request(svc->port, "GET", "/metrics", NULL, NULL, 5);
	size_t n = strlen(name);
	double v = -1;

	for (const char *p = r.body; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
		if (strncmp(p, name, n) == 0 && p[n] == ' ') {
			v = strtod(p + n + 1, NULL);
			break;
		}
	}
	response_free(&r);
	return v;
}

bool harness_wait_status(const struct service *svc, const char *path, int status, double timeout)
{
	double end = now() + timeout;

	while (now() < end) {
		struct response r = http_request(svc->port, "GET", path, NULL, NULL, 2);
		bool ok = r.status == status;
		response_free(&r);
		if (ok)
			return true;
		if (svc->pid > 0 && waitpid(svc->pid, NULL, WNOHANG) == svc->pid)
			return false;
		usleep(20000);
	}
	return false;
}

int harness_stop(struct service *svc)
{
	int status = 0;
	double end = now() + 15;

	if (svc->pid <= 0)
		return -1;
	kill(svc->pid, SIGTERM);
	while (now() < end) {
		if (waitpid(svc->pid, &status, WNOHANG) == svc->pid) {
			svc->pid = 0;
			return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
		}
		usleep(10000);
	}
	harness_kill(svc);
	return -1;
}

void harness_kill(struct service *svc)
{
	if (svc->pid <= 0)
		return;
	kill(svc->pid, SIGKILL);
	waitpid(svc->pid, NULL, 0);
	svc->pid = 0;
}

void harness_run_env_command(const char *var)
{
	char cmd[2048];

	snprintf(cmd, sizeof(cmd), "%s >/dev/null 2>&1", env_or_skip(var));
	cr_assert(system(cmd) == 0, "%s failed", var);
}

/* --- HTTP client ------------------------------------------------------------------ */

static bool send_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return false;
		p += w;
		n -= (size_t)w;
	}
	return true;
}

/* Read until EOF or timeout; the buffer is NUL-terminated. */
static char *recv_all(int fd, double deadline, size_t *len)
{
	size_t cap = 8192, n = 0;
	char *buf = malloc(cap);

	while (buf) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left = (int)((deadline - now()) * 1000);
		ssize_t r;
		if (left <= 0 || poll(&p, 1, left) <= 0)
			break;
		if (n + 4096 > cap) {
			char *grown = realloc(buf, cap *= 2);
			if (!grown)
				break;
			buf = grown;
		}
		r = recv(fd, buf + n, cap - n - 1, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			buf[n] = '\0';
			*len = n;
			return buf;
		}
		n += (size_t)r;
	}
	free(buf);
	return NULL; /* timed out or failed: no complete response */
}

static void parse_response(struct response *resp, char *raw)
{
	char *sep = strstr(raw, "\r\n\r\n");

	if (!sep || sscanf(raw, "HTTP/1.%*d %d", &resp->status) != 1) {
		resp->status = 0;
		return;
	}
	*sep = '\0';
	resp->headers = strdup(raw);
	resp->body = strdup(sep + 4);
	resp->json = json_loads(resp->body, 0, NULL);
}

struct response http_request(int port, const char *method, const char *path,
			     const char *const *headers, const char *body, double timeout_s)
{
	struct response resp = { 0 };
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	size_t blen = body ? strlen(body) : 0, rlen, n;
	char head[16384], *raw;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	double deadline = now() + timeout_s;

	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
		goto done;
	n = (size_t)snprintf(head, sizeof(head),
			     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", method, path);
	for (size_t i = 0; headers && headers[i] && n < sizeof(head); i++)
		n += (size_t)snprintf(head + n, sizeof(head) - n, "%s\r\n", headers[i]);
	if (body && n < sizeof(head))
		n += (size_t)snprintf(head + n, sizeof(head) - n, "Content-Length: %zu\r\n", blen);
	if (n < sizeof(head))
		n += (size_t)snprintf(head + n, sizeof(head) - n, "\r\n");
	cr_assert(n < sizeof(head), "request head too long");
	if (!send_all(fd, head, n) || (body && !send_all(fd, body, blen)))
		goto done;
	raw = recv_all(fd, deadline, &rlen);
	if (raw) {
		parse_response(&resp, raw);
		free(raw);
	}
done:
	if (fd >= 0)
		close(fd);
	return resp;
}

void response_free(struct response *r)
{
	free(r->headers);
	free(r->body);
	json_decref(r->json);
	memset(r, 0, sizeof(*r));
}

bool response_header(const struct response *r, const char *name, char *out, size_t len)
{
	size_t n = strlen(name);

	for (const char *p = r->headers; p && (p = strstr(p, "\r\n")); ) {
		p += 2;
		if (strncasecmp(p, name, n) == 0 && p[n] == ':') {
			const char *v = p + n + 1, *end;
			while (*v == ' ')
				v++;
			end = strstr(v, "\r\n");
			snprintf(out, len, "%.*s", (int)(end ? (size_t)(end - v) : strlen(v)), v);
			return true;
		}
	}
	return false;
}

struct response post(const struct service *svc, const char *path, const char *body,
		     const char *const *extra)
{
	const char *headers[16] = { "Authorization: Bearer " TOKEN_WRITE,
				    "Content-Type: application/json" };
	size_t n = 2;

	for (size_t i = 0; extra && extra[i] && n < 15; i++)
		headers[n++] = extra[i];
	headers[n] = NULL;
	return http_request(svc->port, "POST", path, headers, body, 30);
}

/* --- read-model checks ------------------------------------------------------------- */

static const char head_sql[] =
	"SELECT coalesce((SELECT txid::text || '.' || position FROM events "
	"ORDER BY txid DESC, position DESC LIMIT 1), '0.0')";

void harness_sql_checkpoint(const char *db, char *out, size_t len)
{
	PGresult *r = sql(db, "SELECT txid::text || '.' || position FROM projection_checkpoints "
			      "WHERE projection = 'sql'");
	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

void harness_log_head(const char *db, char *out, size_t len)
{
	PGresult *r = sql(db, head_sql);
	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

bool harness_redis_live(struct redisContext *c, long long *gen, char *cp, size_t len)
{
	redisReply *g = redisCommand(c, "GET " READMODEL_LIVE_KEY), *p;
	bool ok = g && g->type == REDIS_REPLY_STRING;

	if (ok) {
		*gen = atoll(g->str);
		p = redisCommand(c, "GET dbk:g:%lld:checkpoint", *gen);
		ok = p && p->type == REDIS_REPLY_STRING;
		if (ok)
			snprintf(cp, len, "%s", p->str);
		freeReplyObject(p);
	}
	freeReplyObject(g);
	return ok;
}

void harness_wait_caught_up(const char *db, const char *redis_url, double timeout)
{
	char head[64], cp[64], rcp[64] = "";
	long long gen;
	redisContext *c = harness_redis(redis_url);
	double end = now() + timeout;

	for (;;) {
		harness_log_head(db, head, sizeof(head));
		harness_sql_checkpoint(db, cp, sizeof(cp));
		bool live = harness_redis_live(c, &gen, rcp, sizeof(rcp));
		if (strcmp(head, cp) == 0 && live && strcmp(rcp, cp) == 0)
			break;
		cr_assert(now() < end, "not caught up: log %s, sql %s, redis %s", head, cp,
			  live ? rcp : "(none)");
		usleep(20000);
	}
	redisFree(c);
}

void harness_assert_models_match_log(const char *db)
{
	static const char delta[] =
		"CASE type WHEN 'FundsDeposited' THEN (data->>'amount')::bigint "
		"WHEN 'TransferReceived' THEN (data->>'amount')::bigint "
		"WHEN 'FundsWithdrawn' THEN -(data->>'amount')::bigint "
		"WHEN 'TransferSent' THEN -(data->>'amount')::bigint ELSE 0 END";
	static const char money[] =
		"type IN ('FundsDeposited', 'FundsWithdrawn', 'TransferSent', 'TransferReceived')";
	char q[2048];

	snprintf(q, sizeof(q),
		 "WITH acc AS (SELECT substr(stream, 9) id, max(version) v, sum(%s) bal, "
		 "count(*) FILTER (WHERE %s) n, bool_or(type = 'AccountClosed') closed FROM events "
		 "GROUP BY stream) SELECT count(*) FROM acc FULL JOIN rm_accounts r ON r.account_id = "
		 "acc.id WHERE r.account_id IS NULL OR acc.id IS NULL OR r.balance <> acc.bal OR "
		 "r.version <> acc.v OR r.entries <> acc.n OR (r.status = 'closed') <> acc.closed",
		 delta, money);
	cr_assert_eq(sql_int(db, q), 0, "rm_accounts differs from the log");
	snprintf(q, sizeof(q),
		 "WITH m AS (SELECT substr(stream, 9) id, version, sum(%s) OVER (PARTITION BY stream "
		 "ORDER BY version) bal FROM events WHERE %s) SELECT count(*) FROM m FULL JOIN "
		 "rm_entries e ON e.account_id = m.id AND e.version = m.version WHERE e.account_id IS "
		 "NULL OR m.id IS NULL OR e.balance_after <> m.bal",
		 delta, money);
	cr_assert_eq(sql_int(db, q), 0, "rm_entries differs from the log");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events e FULL JOIN rm_transfers t ON "
				 "t.transfer_id = e.data->>'transfer_id' WHERE (e.type = 'TransferSent' "
				 "OR e.type IS NULL) AND (t.transfer_id IS NULL OR e.position IS NULL OR "
				 "t.amount <> (e.data->>'amount')::bigint)"),
		     0, "rm_transfers differs from the log");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM (SELECT currency, count(*) a, count(*) FILTER "
				 "(WHERE status = 'open') o, sum(balance) s FROM rm_accounts GROUP BY "
				 "currency) x FULL JOIN rm_totals t USING (currency) WHERE t.accounts IS "
				 "DISTINCT FROM x.a OR t.open_accounts IS DISTINCT FROM x.o OR "
				 "t.balance_sum IS DISTINCT FROM x.s"),
		     0, "rm_totals differs from the accounts");
}

void harness_assert_redis_matches_sql(const char *db, const char *redis_url)
{
	redisContext *c = harness_redis(redis_url);
	PGresult *r = sql(db, "SELECT account_id, name, currency, balance, overdraft_limit, status, "
			      "version, entries, "
			      "to_char(opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
			      "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
			      "FROM rm_accounts");
	char cp[64];
	long long gen;

	cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
	for (int i = 0; i < PQntuples(r); i++) {
		struct readmodel_account a = {
			.account_id = PQgetvalue(r, i, 0), .name = PQgetvalue(r, i, 1),
			.currency = PQgetvalue(r, i, 2), .balance = atoll(PQgetvalue(r, i, 3)),
			.overdraft_limit = atoll(PQgetvalue(r, i, 4)), .status = PQgetvalue(r, i, 5),
			.version = atoi(PQgetvalue(r, i, 6)), .opened_at = PQgetvalue(r, i, 8),
			.updated_at = PQgetvalue(r, i, 9),
		};
		char *want = readmodel_account_json(&a);
		redisReply *j = redisCommand(c, "HGET dbk:g:%lld:acct:%s j", gen, a.account_id);
		redisReply *n = redisCommand(c, "LLEN dbk:g:%lld:stmt:%s", gen, a.account_id);
		long long entries = atoll(PQgetvalue(r, i, 7));

		cr_assert(j && j->type == REDIS_REPLY_STRING, "account %s missing in redis", a.account_id);
		cr_assert_str_eq(j->str, want);
		cr_assert_eq(n->integer, entries < 50 ? entries : 50, "statement of %s", a.account_id);
		free(want);
		freeReplyObject(j);
		freeReplyObject(n);
	}
	PQclear(r);
	redisFree(c);
}


/* --- readers ------------------------------------------------------------------------ */

#define MAX_SAMPLES 5000

struct readers {
	const struct service *query;
	const char *const *accounts;
	size_t naccounts;
	int threads;
	pthread_t tid[8];
	atomic_bool stop;
	atomic_int reads, errors;
	pthread_mutex_t lock;
	struct read_sample *samples;
	size_t n;
};

static void *read_loop(void *arg)
{
	struct readers *r = arg;
	unsigned seed = (unsigned)(uintptr_t)pthread_self();
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	char path[128];

	while (!atomic_load(&r->stop)) {
		const char *id = r->accounts[(size_t)rand_r(&seed) % r->naccounts];
		snprintf(path, sizeof(path), "/accounts/%s", id);
		struct response resp = http_request(r->query->port, "GET", path, h, NULL, 10);
		atomic_fetch_add(&r->reads, 1);
		if (resp.status != 200 || !resp.json) {
			atomic_fetch_add(&r->errors, 1);
		} else {
			pthread_mutex_lock(&r->lock);
			if (r->n < MAX_SAMPLES) {
				struct read_sample *s = &r->samples[r->n++];
				snprintf(s->account, sizeof(s->account), "%s", id);
				s->version = (int)json_integer_value(json_object_get(resp.json, "version"));
				s->balance = json_integer_value(json_object_get(resp.json, "balance"));
			}
			pthread_mutex_unlock(&r->lock);
		}
		response_free(&resp);
	}
	return NULL;
}

struct readers *harness_readers_start(const struct service *query, const char *const *accounts,
				      size_t naccounts, int threads)
{
	struct readers *r = calloc(1, sizeof(*r));

	cr_assert(r && threads <= 8);
	r->query = query;
	r->accounts = accounts;
	r->naccounts = naccounts;
	r->threads = threads;
	r->samples = calloc(MAX_SAMPLES, sizeof(*r->samples));
	cr_assert(r->samples);
	pthread_mutex_init(&r->lock, NULL);
	for (int i = 0; i < threads; i++)
		pthread_create(&r->tid[i], NULL, read_loop, r);
	return r;
}

void harness_readers_stop(struct readers *r, int *reads, int *errors, struct read_sample **samples,
			  size_t *nsamples)
{
	atomic_store(&r->stop, true);
	for (int i = 0; i < r->threads; i++)
		pthread_join(r->tid[i], NULL);
	*reads = atomic_load(&r->reads);
	*errors = atomic_load(&r->errors);
	*samples = r->samples;
	*nsamples = r->n;
	pthread_mutex_destroy(&r->lock);
	free(r);
}

void harness_assert_samples_true(const char *db, const struct read_sample *s, size_t n)
{
	char q[8192];
	size_t len = (size_t)snprintf(q, sizeof(q),
				      "SELECT substr(stream, 9), version, sum(CASE type "
				      "WHEN 'FundsDeposited' THEN (data->>'amount')::bigint "
				      "WHEN 'TransferReceived' THEN (data->>'amount')::bigint "
				      "WHEN 'FundsWithdrawn' THEN -(data->>'amount')::bigint "
				      "WHEN 'TransferSent' THEN -(data->>'amount')::bigint ELSE 0 END) "
				      "OVER (PARTITION BY stream ORDER BY version) FROM events "
				      "WHERE stream IN ('-'");
	PGresult *r;

	/* Only the sampled accounts (ids are of a quote-free alphabet). */
	for (size_t i = 0; i < n && len < sizeof(q) - 100; i++) {
		bool seen = false;
		for (size_t j = 0; j < i && !seen; j++)
			seen = strcmp(s[j].account, s[i].account) == 0;
		if (!seen)
			len += (size_t)snprintf(q + len, sizeof(q) - len, ",'account-%s'", s[i].account);
	}
	snprintf(q + len, sizeof(q) - len, ")");
	r = sql(db, q);

	for (size_t i = 0; i < n; i++) {
		bool found = false;
		for (int row = 0; row < PQntuples(r) && !found; row++) {
			if (atoi(PQgetvalue(r, row, 1)) != s[i].version ||
			    strcmp(PQgetvalue(r, row, 0), s[i].account) != 0)
				continue;
			found = true;
			cr_assert_eq(atoll(PQgetvalue(r, row, 2)), s[i].balance,
				     "%s at version %d was shown with balance %lld", s[i].account,
				     s[i].version, s[i].balance);
		}
		cr_assert(found, "%s version %d is not in the log", s[i].account, s[i].version);
	}
	PQclear(r);
}
