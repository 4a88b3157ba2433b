/* Integration-test harness: the environment, the clock, and the processes it starts
 * (free ports, logs, stop and kill). */
#include "harness.h"
#include "harness_internal.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *harness_env(const char *name)
{
	const char *v = getenv(name);

	if (!v || !*v)
		cr_assert_fail("%s is not set: run the suite through `scripts/dev test` (or meson test with "
			       "the DAYBOOK_TEST_* variables)",
			       name);
	return v;
}

double harness_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

bool harness_wait_until(bool (*cond)(void *arg), void *arg, double deadline)
{
	for (;;) {
		if (cond(arg))
			return true;
		if (harness_now() >= deadline)
			return false;
		usleep(HARNESS_POLL_US);
	}
}

struct count_wanted {
	atomic_int *counter;
	int at_least;
};

static bool count_reached(void *arg)
{
	struct count_wanted *w = arg;
	return atomic_load(w->counter) >= w->at_least;
}

bool harness_wait_count(atomic_int *counter, int at_least, double deadline)
{
	struct count_wanted w = { counter, at_least };

	return harness_wait_until(count_reached, &w, deadline);
}

/* Test files go under $TMPDIR, which `scripts/dev test` removes afterwards. */
const char *harness_tmpdir(void)
{
	const char *t = getenv("TMPDIR");
	return t && *t ? t : "/tmp";
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

bool harness_log_says(const struct service *svc, const char *text)
{
	FILE *f = fopen(svc->log_path, "r");
	char *line = NULL;
	size_t cap = 0;
	bool found = false;

	cr_assert(f, "cannot read %s's log %s", svc->name, svc->log_path);
	while (!found && getline(&line, &cap, f) > 0)
		found = strstr(line, text) != NULL;
	free(line);
	fclose(f);
	return found;
}

struct log_wanted {
	const struct service *svc;
	const char *text;
};

static bool log_wanted_says(void *arg)
{
	struct log_wanted *w = arg;
	return harness_log_says(w->svc, w->text);
}

bool harness_wait_log(const struct service *svc, const char *text, double deadline)
{
	struct log_wanted w = { svc, text };

	return harness_wait_until(log_wanted_says, &w, deadline);
}

bool harness_wait_status(const struct service *svc, const char *path, int status, double timeout)
{
	double end = harness_now() + timeout;

	while (harness_now() < end) {
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
	double end = harness_now() + 15;

	if (svc->pid <= 0)
		return -1;
	kill(svc->pid, SIGTERM);
	while (harness_now() < end) {
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

	snprintf(cmd, sizeof(cmd), "%s >/dev/null 2>&1", harness_env(var));
	cr_assert(system(cmd) == 0, "%s failed", var);
}
