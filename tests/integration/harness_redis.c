/* Integration-test harness: private redis-server and redis-sentinel processes with
 * the deploy ACL users, their URLs, and blocking connections for checks. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "config.h"
#include "digest.h"

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
	for (const char *p = line; *p;) {
		const char *end = *p == '@' ? strchr(p + 1, '@') : NULL;
		bool known = false;
		if (end) {
			for (size_t i = 0; i < sizeof(redis_users) / sizeof(redis_users[0]); i++) {
				const char *u = redis_users[i][0];
				if (strlen(u) != (size_t)(end - p - 1) ||
				    strncmp(u, p + 1, strlen(u)))
					continue;
				unsigned char d[DIGEST_SHA256_LEN];
				char hex[DIGEST_SHA256_HEX_LEN + 1];
				cr_assert(digest_sha256(redis_users[i][1],
							strlen(redis_users[i][1]), d));
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
	snprintf(path, sizeof(path), "%s/daybook-test-redis-%d.acl", harness_tmpdir(),
		 (int)getpid());
	/* The ACL template (comments dropped) and the test ACL file it becomes. */
	in = fopen(harness_env("DAYBOOK_TEST_REDIS_ACL"), "r");
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
	cr_assert_lt((size_t)snprintf(out, len, "redis://%s:%s@%s:%u/%d", user,
				      redis_password(user), addr.host, (unsigned)addr.port,
				      addr.db),
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
		snprintf(path, sizeof(path), "%s/%s", harness_tmpdir(), rdb);
		unlink(path);
	}
	cr_assert_lt((size_t)snprintf(url, len, "redis://daybook-admin:%s@127.0.0.1:%d",
				      redis_password("daybook-admin"), p),
		     len);
	{
		char *const argv[] = { "redis-server",
				       "--port",
				       port,
				       "--bind",
				       "127.0.0.1",
				       "--save",
				       "",
				       "--appendonly",
				       "no",
				       "--protected-mode",
				       "no",
				       "--aclfile",
				       (char *)acl,
				       "--dir",
				       (char *)harness_tmpdir(),
				       "--dbfilename",
				       rdb,
				       NULL };
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
	snprintf(conf, sizeof(conf), "%s/daybook-test-sentinel-%d-%d.conf", harness_tmpdir(),
		 (int)getpid(), p);
	f = fopen(conf, "w");
	cr_assert(f, "cannot write %s", conf);
	fprintf(f,
		"bind 127.0.0.1\nport %d\nsentinel resolve-hostnames no\n"
		"sentinel monitor daybook 127.0.0.1 %d 1\n"
		"sentinel auth-user daybook daybook-ops\nsentinel auth-pass daybook %s\n"
		"sentinel down-after-milliseconds daybook 1000\n",
		p, redis_port, redis_password("daybook-ops"));
	fclose(f);
	cr_assert_lt((size_t)snprintf(url, len,
				      "redis-sentinel://daybook-admin:%s@127.0.0.1:%d/daybook",
				      redis_password("daybook-admin"), p),
		     len);
	{
		char *const argv[] = { "redis-server", conf, "--sentinel", NULL };
		svc->pid = spawn_redis_server(argv);
	}
	for (int i = 0; i < 500; i++) {
		redisContext *c = redisConnect("127.0.0.1", p);
		redisReply *r = c && !c->err
					? redisCommand(c,
						       "SENTINEL get-master-addr-by-name daybook")
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
