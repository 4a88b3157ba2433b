/* Integration-test harness: the Daybook services (command, query, projector) started
 * on free loopback ports with the test tokens, and waited for until ready. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "digest.h"

static const char *tokens_file(void)
{
	static char path[256];
	const char *const toks[][3] = { { "test-write", TOKEN_WRITE, "write" },
					{ "test-read", TOKEN_READ, "read" },
					{ "test-admin", TOKEN_ADMIN, "write,read,admin" } };
	FILE *f;

	if (path[0])
		return path;
	snprintf(path, sizeof(path), "%s/daybook-test-tokens-%d.txt", harness_tmpdir(),
		 (int)getpid());
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

/* /readyz says ready, or (a projector) that the instance stands by for another. */
static bool wait_ready(const struct service *svc, double timeout)
{
	double end = harness_now() + timeout;

	while (harness_now() < end) {
		struct response r = http_request(svc->port, "GET", "/readyz", NULL, NULL, 2);
		bool ok = r.status == 200 ||
			  (r.status == 503 && r.body && strstr(r.body, "standby"));
		response_free(&r);
		if (ok)
			return true;
		if (svc->pid > 0 && waitpid(svc->pid, NULL, WNOHANG) == svc->pid)
			return false;
		usleep(20000);
	}
	return false;
}

static void start_service(struct service *svc, const char *name, const char *binvar, const char *pg,
			  const char *const *extra_env)
{
	const char *bin = harness_env(binvar);
	char listen[64];

	memset(svc, 0, sizeof(*svc));
	snprintf(svc->name, sizeof(svc->name), "%s", name);
	svc->port = harness_free_port();
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", svc->port);
	snprintf(svc->log_path, sizeof(svc->log_path), "%s/daybook-test-%d-%s-%d.log",
		 harness_tmpdir(), (int)getpid(), name, svc->port);
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
	harness_start_command_pg(svc, pg, env);
}

void harness_start_command_pg(struct service *svc, const char *conninfo, const char *const *env)
{
	start_service(svc, "command", "DAYBOOK_COMMAND_BIN", conninfo, env);
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
	char pg[512];

	harness_conninfo(db, "daybook_query", pg, sizeof(pg));
	harness_start_query_pg(svc, pg, redis_url);
}

void harness_start_query_pg(struct service *svc, const char *conninfo, const char *redis_url)
{
	char url[HARNESS_REDIS_URL_MAX];
	const char *env[] = { "DAYBOOK_REDIS", url, NULL };

	harness_redis_url_as(redis_url, "daybook-query", url, sizeof(url));
	start_service(svc, "query", "DAYBOOK_QUERY_BIN", conninfo, env);
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
	char pg[512];

	harness_conninfo(db, "daybook_projector", pg, sizeof(pg));
	harness_start_projector_pg(svc, pg, redis_url);
}

void harness_start_projector_pg(struct service *svc, const char *conninfo, const char *redis_url)
{
	char url[HARNESS_REDIS_URL_MAX];
	const char *env[] = { "DAYBOOK_REDIS", url, NULL };

	harness_redis_url_as(redis_url, "daybook-projector", url, sizeof(url));
	start_service(svc, "projector", "DAYBOOK_PROJECTOR_BIN", conninfo, env);
}
