/* Integration-test harness: daybook-admin run to its end against a test database. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

/* The whole of f (caller frees), which is closed. */
static char *slurp(FILE *f)
{
	long n;
	char *text;

	fseek(f, 0, SEEK_END);
	n = ftell(f);
	cr_assert_geq(n, 0, "reading daybook-admin's output: %s", strerror(errno));
	text = calloc(1, (size_t)n + 1);
	cr_assert_not_null(text);
	rewind(f);
	cr_assert_eq(fread(text, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	return text;
}

int harness_admin(const char *db, const char *redis_url, const char *const *args, char **out)
{
	const char *bin = harness_env("DAYBOOK_ADMIN_BIN");
	char conninfo[512];
	const char **argv;
	FILE *f = NULL;
	size_t n = 0;
	int ws;
	pid_t pid;

	while (args[n])
		n++;
	argv = calloc(n + 2, sizeof(*argv));
	cr_assert_not_null(argv);
	argv[0] = bin;
	memcpy(argv + 1, args, n * sizeof(*argv));
	if (out) {
		f = tmpfile();
		cr_assert_not_null(f, "tmpfile: %s", strerror(errno));
	}
	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	fflush(NULL);
	pid = fork();
	cr_assert(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(f ? fileno(f) : 2, 1);
		if (f)
			dup2(fileno(f), 2);
		setenv("DAYBOOK_PG", conninfo, 1);
		if (redis_url)
			setenv("DAYBOOK_REDIS", redis_url, 1);
		else
			unsetenv("DAYBOOK_REDIS");
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	free(argv);
	cr_assert_eq(waitpid(pid, &ws, 0), pid);
	if (out)
		*out = slurp(f);
	return WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
}
