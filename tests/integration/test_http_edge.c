/* The HTTP edge's limits on every service (SPEC §7): header and body sizes answered
 * with problem details, deadlines for slow and idle clients, a connection cap that
 * idle sockets cannot turn into a lock-out, no busy loop when descriptors run out,
 * HEAD, strict query strings, and a /readyz that reveals nothing. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

#define AUTH_READ "Authorization: Bearer " TOKEN_READ
#define AUTH_WRITE "Authorization: Bearer " TOKEN_WRITE

static char db[64];
static struct service svc;
/* A query service and its Redis, for the tests that ask both client-facing edges. */
static struct service edge_query, edge_redis;

static void teardown(void)
{
	if (svc.pid > 0)
		harness_kill(&svc);
	if (edge_query.pid > 0)
		harness_kill(&edge_query);
	if (edge_redis.pid > 0)
		harness_kill(&edge_redis);
	unsetenv("DAYBOOK_MAX_CONNECTIONS");
	unsetenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS");
	unsetenv("DAYBOOK_HTTP_IDLE_TIMEOUT_MS");
}

/* What the edge logs, once, when it reads connections by libevent's own read path. */
#define LIBEVENT_READS_LINE "HTTP connections are read by libevent's own read path"

static void start_command(void)
{
	harness_db_create(db, sizeof(db));
	harness_start_command(&svc, db);
}

static int connect_to(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET,
				 .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		close(fd);
		fd = -1;
	}
	return fd;
}

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

/* What a connection has received so far, NUL-terminated. */
struct received {
	char *buf;
	size_t n, cap;
};

static struct received received_new(void)
{
	struct received in = { malloc(65536), 0, 65536 };

	cr_assert(in.buf);
	in.buf[0] = '\0';
	return in;
}

/* Receive once more into in: the bytes received; 0 at the server's close (or a reset
 * after some bytes), -1 on an error, -2 when nothing came by `deadline` (a harness_now()
 * value). */
static ssize_t receive_some(int fd, double deadline, struct received *in)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left = (int)((deadline - harness_now()) * 1000);
		ssize_t r;

		if (left <= 0 || poll(&p, 1, left) <= 0)
			return -2;
		if (in->n + 1 >= in->cap)
			cr_assert(in->buf = realloc(in->buf, in->cap *= 2));
		r = recv(fd, in->buf + in->n, in->cap - in->n - 1, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == ECONNRESET && in->n > 0)
			r = 0;
		if (r > 0)
			in->n += (size_t)r;
		in->buf[in->n] = '\0';
		return r;
	}
}

/* Everything the server sends until it closes (or `timeout` passes: then NULL). */
static char *read_until_close(int fd, double timeout)
{
	double deadline = harness_now() + timeout;
	struct received in = received_new();
	ssize_t r;

	while ((r = receive_some(fd, deadline, &in)) > 0)
		;
	if (r == -2) {
		free(in.buf);
		return NULL;
	}
	return in.buf;
}

/* Send raw bytes on a new connection and read the answer up to the server's close. */
static char *exchange(int port, const char *req, size_t len)
{
	int fd = connect_to(port);
	char *answer;

	cr_assert(fd >= 0, "cannot connect: %s", strerror(errno));
	cr_assert(send_all(fd, req, len), "send: %s", strerror(errno));
	answer = read_until_close(fd, 20);
	close(fd);
	cr_assert(answer, "no answer, or the connection stayed open");
	return answer;
}

static int status_of(const char *answer)
{
	int status = 0;

	return sscanf(answer, "HTTP/1.%*d %d", &status) == 1 ? status : 0;
}

/* A problem-details answer with `status` and `code`. */
static void assert_problem(const char *answer, int status, const char *code)
{
	const char *body = strstr(answer, "\r\n\r\n");
	json_t *j;

	cr_assert_eq(status_of(answer), status, "expected %d, got: %.300s", status, answer);
	cr_assert(strcasestr(answer, "\r\nContent-Type: application/problem+json"),
		  "not problem+json: %.300s", answer);
	cr_assert(body);
	j = json_loads(body + 4, 0, NULL);
	cr_assert(j, "the body is not JSON: %.300s", body + 4);
	cr_assert_str_eq(json_string_value(json_object_get(j, "code")), code);
	cr_assert_eq(json_integer_value(json_object_get(j, "status")), status);
	json_decref(j);
}

/* "GET /healthz" with `header_bytes` of extra header lines. */
static char *request_with_headers(size_t header_bytes, size_t *len)
{
	size_t cap = header_bytes + 256, n;
	char *req = malloc(cap);

	cr_assert(req);
	n = (size_t)snprintf(req, cap, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
	for (int i = 0; n + 100 < header_bytes + 60; i++)
		n += (size_t)snprintf(req + n, cap - n, "X-Filler-%05d: %070d\r\n", i, 0);
	n += (size_t)snprintf(req + n, cap - n, "\r\n");
	*len = n;
	return req;
}

TestSuite(http_edge, .fini = teardown, .timeout = 120);

Test(http_edge, request_headers_over_16_kib_in_all_are_refused_with_431_problem_details)
{
	size_t len;
	char *req, *answer;

	start_command();
	req = request_with_headers(15 * 1024, &len);
	answer = exchange(svc.port, req, len);
	cr_assert_eq(status_of(answer), 200, "15 KiB of headers must pass: %.200s", answer);
	free(answer);
	free(req);

	req = request_with_headers(17 * 1024, &len);
	answer = exchange(svc.port, req, len);
	assert_problem(answer, 431, "headers_too_large");
	free(answer);
	free(req);

	/* A request line alone over the limit. */
	req = malloc(20 * 1024);
	cr_assert(req);
	len = (size_t)snprintf(req, 20 * 1024, "GET /healthz?%0*d HTTP/1.1\r\nHost: x\r\n\r\n",
			       17 * 1024, 0);
	answer = exchange(svc.port, req, len);
	assert_problem(answer, 431, "headers_too_large");
	free(answer);
	free(req);
}

Test(http_edge, bodies_over_64_kib_get_413_problem_details_even_when_huge_or_chunked)
{
	size_t big = 2 * 1024 * 1024, n;
	char *req = malloc(big + 512), *answer;

	cr_assert(req);
	start_command();
	/* Declared length far over the limit. */
	n = (size_t)snprintf(req, 512,
			     "POST /accounts HTTP/1.1\r\nHost: x\r\n%s\r\n"
			     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
			     AUTH_WRITE, big);
	memset(req + n, ' ', big);
	answer = exchange(svc.port, req, n + big);
	assert_problem(answer, 413, "payload_too_large");
	free(answer);

	/* Chunked: 70 KiB in 1 KiB chunks, then the client waits for the answer. */
	n = (size_t)snprintf(req, 512,
			     "POST /accounts HTTP/1.1\r\nHost: x\r\n%s\r\n"
			     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
			     AUTH_WRITE);
	for (int i = 0; i < 70; i++) {
		n += (size_t)snprintf(req + n, 16, "400\r\n");
		memset(req + n, ' ', 1024);
		n += 1024;
		memcpy(req + n, "\r\n", 2);
		n += 2;
	}
	answer = exchange(svc.port, req, n);
	assert_problem(answer, 413, "payload_too_large");
	free(answer);
	free(req);
}

Test(http_edge, a_client_sending_its_headers_a_byte_at_a_time_is_cut_off)
{
	const char *start = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
	double t0;
	int fd;
	bool closed = false;

	setenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS", "1000", 1);
	start_command();
	fd = connect_to(svc.port);
	cr_assert(fd >= 0);
	t0 = harness_now();
	cr_assert(send_all(fd, start, strlen(start)));
	/* One byte every 100 ms: each resets a plain read timeout, never the deadline. */
	while (harness_now() - t0 < 15) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		char c;

		if (poll(&p, 1, 100) > 0 && recv(fd, &c, 1, 0) <= 0) {
			closed = true;
			break;
		}
		if (!send_all(fd, "a", 1)) {
			closed = true;
			break;
		}
	}
	close(fd);
	cr_assert(closed, "a slow client held its connection for 15 s with a 1 s header deadline");
}

Test(http_edge, an_idle_keep_alive_connection_is_closed_after_the_idle_timeout)
{
	const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
	char buf[4096] = "", *rest;
	ssize_t r;
	size_t n = 0;
	int fd;
	double t0;

	setenv("DAYBOOK_HTTP_IDLE_TIMEOUT_MS", "1000", 1);
	start_command();
	fd = connect_to(svc.port);
	cr_assert(fd >= 0);
	cr_assert(send_all(fd, get, strlen(get)));
	/* The answer, then the connection stays open (keep-alive) until the idle timeout. */
	while (!strstr(buf, "{\"status\":\"ok\"}")) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert(poll(&p, 1, 10000) > 0, "no answer");
		r = recv(fd, buf + n, sizeof(buf) - n - 1, 0);
		cr_assert(r > 0, "closed before answering");
		n += (size_t)r;
		buf[n] = '\0';
	}
	t0 = harness_now();
	rest = read_until_close(fd, 15);
	cr_assert(rest, "the idle connection was never closed");
	free(rest);
	cr_assert(harness_now() - t0 > 0.5, "closed too early for a 1 s idle timeout");
	close(fd);
}

/* Seconds a process's main thread has been runnable (on a CPU or waiting for one): a
 * loop that spins is runnable all the time, however busy the machine is. */
static double runnable_seconds(pid_t pid)
{
	char path[64];
	unsigned long long on_cpu = 0, waiting = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
	f = fopen(path, "r"); /* the service's scheduler counters */
	cr_assert(f);
	cr_assert(fscanf(f, "%llu %llu", &on_cpu, &waiting) == 2);
	fclose(f);
	return (double)(on_cpu + waiting) / 1e9;
}

/* Open up to n idle connections (a client that never sends); returns how many. */
static int hoard(int port, int *fds, int n)
{
	int opened = 0;

	for (int i = 0; i < n; i++) {
		fds[i] = connect_to(port);
		opened += fds[i] >= 0;
	}
	return opened;
}

static void release(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

static void raise_nofile(rlim_t want)
{
	struct rlimit rl;

	cr_assert(getrlimit(RLIMIT_NOFILE, &rl) == 0);
	rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
	cr_assert(setrlimit(RLIMIT_NOFILE, &rl) == 0);
}

/* The service answers /healthz 200 within `timeout`, on a new connection. */
static bool answers(double timeout)
{
	double deadline = harness_now() + timeout;

	while (harness_now() < deadline) {
		struct response r = http_request(svc.port, "GET", "/healthz", NULL, NULL, 2);
		int status = r.status;

		response_free(&r);
		if (status == 200)
			return true;
	}
	return false;
}

Test(http_edge, thousands_of_idle_connections_do_not_lock_out_a_real_client)
{
	enum { IDLE = 2000 };
	int fds[IDLE], opened;
	double busy0;

	/* The service gets a modest descriptor limit, the test as many as it may have. */
	raise_nofile(512);
	setenv("DAYBOOK_MAX_CONNECTIONS", "100", 1);
	start_command();
	raise_nofile(IDLE + 256);
	opened = hoard(svc.port, fds, IDLE);
	cr_assert_gt(opened, 1000, "could open only %d sockets", opened);
	cr_assert(answers(10), "a real client got no 200 while %d idle sockets were held", opened);
	busy0 = runnable_seconds(svc.pid);
	usleep(1000000); /* the window in which its CPU time is measured */
	cr_assert_lt(runnable_seconds(svc.pid) - busy0, 0.5, "the service is spinning");
	cr_assert(answers(10));
	release(fds, IDLE);
}

Test(http_edge, the_query_services_workers_share_the_cap_and_still_serve)
{
	enum { IDLE = 500 };
	int fds[IDLE];
	char redis_url[128];
	struct service redis_svc;

	raise_nofile(256);
	setenv("DAYBOOK_MAX_CONNECTIONS", "20", 1);
	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_query(&svc, db, redis_url);
	raise_nofile(IDLE + 256);
	cr_assert_gt(hoard(svc.port, fds, IDLE), 400);
	cr_assert(answers(10), "a real client got no 200 from the query service");
	release(fds, IDLE);
	harness_kill(&redis_svc);
}

/* One GET /healthz on an open keep-alive connection: true when it is answered 200 there. */
static bool get_on(int fd)
{
	const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
	char buf[4096] = "";
	size_t n = 0;

	if (!send_all(fd, get, strlen(get)))
		return false;
	while (!strstr(buf, "{\"status\":\"ok\"}")) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t r;

		if (n + 1 >= sizeof(buf) || poll(&p, 1, 10000) <= 0)
			return false;
		r = recv(fd, buf + n, sizeof(buf) - n - 1, 0);
		if (r <= 0)
			return false;
		n += (size_t)r;
		buf[n] = '\0';
	}
	return strncmp(buf, "HTTP/1.1 200", 12) == 0;
}

/* evhttp's own error pages are replaced by problem details on a keep-alive connection
 * too, after it has answered: not its HTML page followed by ours. */
Test(http_edge, an_error_page_after_an_answer_on_the_same_connection_is_problem_details)
{
	const char *bad = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Broken header line\r\n\r\n";
	char *req, *answer;
	size_t len;
	int fd;

	start_command();
	/* A malformed header line (400), then headers over the limit (431). */
	for (int round = 0; round < 2; round++) {
		fd = connect_to(svc.port);
		cr_assert(fd >= 0);
		cr_assert(get_on(fd), "the first request was not answered");
		if (round == 0) {
			cr_assert(send_all(fd, bad, strlen(bad)));
		} else {
			req = request_with_headers(17 * 1024, &len);
			cr_assert(send_all(fd, req, len));
			free(req);
		}
		answer = read_until_close(fd, 20);
		close(fd);
		cr_assert(answer, "no answer, or the connection stayed open");
		cr_assert_null(strcasestr(answer, "<html"), "evhttp's own page was sent: %.400s",
			       answer);
		assert_problem(answer, round == 0 ? 400 : 431,
			       round == 0 ? "invalid_request" : "headers_too_large");
		cr_assert_null(strstr(answer + 1, "HTTP/1.1 "), "two answers: %.600s", answer);
		free(answer);
	}
}

#define CLOSED_BY(reason) "daybook_http_connections_closed_total{reason=\"" reason "\"}"

Test(http_edge, a_flood_of_newcomers_at_the_cap_never_closes_active_keep_alive_clients)
{
	enum { KEEP = 16, ROUNDS = 25, BURST = 16 };
	int keep[KEEP], burst[BURST];
	struct response r;

	setenv("DAYBOOK_MAX_CONNECTIONS", "16", 1);
	start_command();
	raise_nofile(KEEP + BURST + 256);
	/* The harness's own readiness and metrics requests hold a slot until the service
	 * has seen them close: a client refused for that waits a moment and comes again. */
	for (int i = 0; i < KEEP; i++) {
		for (double end = harness_now() + 5;; usleep(20000)) {
			keep[i] = connect_to(svc.port);
			cr_assert(keep[i] >= 0);
			if (get_on(keep[i]))
				break;
			close(keep[i]);
			cr_assert(harness_now() < end, "keep-alive client %d was not served", i);
		}
	}
	/* Each round: a burst of newcomers sending requests, then every keep-alive client
	 * asks again on its own connection. They are never idle long enough to be closed. */
	for (int round = 0; round < ROUNDS; round++) {
		for (int j = 0; j < BURST; j++) {
			burst[j] = connect_to(svc.port);
			if (burst[j] >= 0)
				send_all(burst[j], "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 35);
		}
		for (int i = 0; i < KEEP; i++)
			cr_assert(get_on(keep[i]),
				  "round %d: keep-alive client %d lost its connection to a newcomer",
				  round, i);
		release(burst, BURST);
	}
	close(keep[0]); /* room for the metrics request, which is counted too */
	cr_assert(harness_wait_metric(&svc, "daybook_http_connections_open", KEEP,
				      harness_now() + 10));
	cr_assert_eq(harness_metric(&svc, CLOSED_BY("evicted")), 0);
	cr_assert_gt(harness_metric(&svc, CLOSED_BY("refused")), 0,
		     "the newcomers were not refused");

	/* Clients quiet for longer than the floor do make room: a newcomer is served at once. */
	keep[0] = connect_to(svc.port);
	cr_assert(keep[0] >= 0 && get_on(keep[0]));
	usleep(1500000);
	r = http_request(svc.port, "GET", "/healthz", NULL, NULL, 5);
	cr_assert_eq(r.status, 200, "a newcomer was refused though every connection was quiet");
	response_free(&r);
	cr_assert_geq(harness_metric(&svc, CLOSED_BY("evicted")), 1);
	release(keep, KEEP);
}

/* A read that waits (a min_position far ahead): its connection is busy throughout. */
static void *waiting_read(void *arg)
{
	const char *auth[] = { AUTH_READ, NULL };
	struct response r = http_request(svc.port, "GET",
					 "/totals?min_position=999999.1&wait_ms=3000", auth, NULL,
					 20);

	*(int *)arg = r.status;
	response_free(&r);
	return NULL;
}

Test(http_edge, connections_serving_a_request_are_never_closed_to_make_room)
{
	enum { WAITING = 4, IDLE = 300 };
	pthread_t t[WAITING];
	int status[WAITING], fds[IDLE];
	char redis_url[128];
	struct service redis_svc;

	setenv("DAYBOOK_MAX_CONNECTIONS", "12", 1);
	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_query(&svc, db, redis_url);
	for (int i = 0; i < WAITING; i++)
		cr_assert(pthread_create(&t[i], NULL, waiting_read, &status[i]) == 0);
	cr_assert(harness_wait_metric(&svc, "daybook_query_waiting_reads", WAITING,
				      harness_now() + 20),
		  "the reads are not waiting");
	raise_nofile(IDLE + 256);
	hoard(svc.port, fds, IDLE);
	for (int i = 0; i < WAITING; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(status[i], 503, "a waiting read lost its connection (status %d)",
			     status[i]);
	}
	release(fds, IDLE);
	harness_kill(&redis_svc);
}

Test(http_edge, running_out_of_descriptors_pauses_accepting_instead_of_spinning)
{
	enum { IDLE = 400 };
	int fds[IDLE];
	struct rlimit low = { 128, 128 };
	double busy0;

	setenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS", "2000", 1);
	start_command();
	raise_nofile(IDLE + 256);
	/* Below the connection cap, so that accept() itself fails with EMFILE. */
	cr_assert(prlimit(svc.pid, RLIMIT_NOFILE, &low, NULL) == 0, "prlimit: %s", strerror(errno));
	hoard(svc.port, fds, IDLE);
	/* The service meets EMFILE in its next accepting turns (nothing observable: /metrics
	 * cannot be reached then); then the window in which its CPU time is measured. */
	usleep(300000);
	busy0 = runnable_seconds(svc.pid);
	usleep(1000000);
	cr_assert_lt(runnable_seconds(svc.pid) - busy0, 0.5, "the accept loop spins on EMFILE");
	/* The idle sockets meet their deadline; then the service accepts again. */
	cr_assert(answers(20), "the service never accepted again");
	release(fds, IDLE);
}

/* A POST /accounts opening `id`, as raw bytes of HTTP/1.1 (keep-alive). */
static int open_request(char *out, size_t len, const char *id)
{
	char body[128];
	int n = snprintf(body, sizeof(body), "{\"id\":\"%s\",\"name\":\"E\",\"currency\":\"EUR\"}",
			 id);

	return snprintf(out, len,
			"POST /accounts HTTP/1.1\r\nHost: x\r\n" AUTH_WRITE "\r\n"
			"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			n, body);
}

/* The statuses of the answers in text, in order (at most max); how many. */
static int statuses(const char *text, int *out, int max)
{
	int n = 0;

	for (const char *p = text; n < max && (p = strstr(p, "HTTP/1.1 ")); p += 9)
		out[n++] = atoi(p + 9);
	return n;
}

/* Answers leave at the end of the loop turn that made them, and the server keeps a
 * connection's read interest registered while a request is served: neither may change
 * what a client sees, nor make the loop spin when bytes (the next request, or the
 * client's close) arrive while the answer is not ready yet. */
Test(http_edge, bytes_or_a_close_arriving_during_a_request_are_handled_after_its_answer)
{
	char conninfo[512], req[512], next[256];
	int early, closing, st[4];
	char *a, *b;
	double busy0;
	PGconn *blocker;

	start_command();
	/* Hold the log: the writes stay in flight until the blocker commits. */
	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	blocker = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(blocker), CONNECTION_OK);
	PQclear(PQexec(blocker, "BEGIN"));
	PQclear(PQexec(blocker, "LOCK TABLE events IN EXCLUSIVE MODE"));
	early = connect_to(svc.port);
	closing = connect_to(svc.port);
	cr_assert(early >= 0 && closing >= 0);
	open_request(req, sizeof(req), "early");
	cr_assert(send_all(early, req, strlen(req)));
	open_request(req, sizeof(req), "closing");
	cr_assert(send_all(closing, req, strlen(req)));
	/* Both writes in flight (the gauge also counts the /metrics request reading it). */
	for (int i = 0; harness_metric(&svc, "daybook_http_requests_in_flight") < 3; i++) {
		cr_assert_lt(i, 1000, "the writes never both arrived");
		usleep(10000);
	}
	/* Then one client sends its next request before the first is answered, and the
	 * other closes its side. */
	snprintf(next, sizeof(next),
		 "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
	cr_assert(send_all(early, next, strlen(next)));
	cr_assert(shutdown(closing, SHUT_WR) == 0);
	usleep(100000);
	busy0 = runnable_seconds(svc.pid);
	usleep(1000000); /* the window in which its CPU time is measured */
	cr_assert_lt(runnable_seconds(svc.pid) - busy0, 0.5,
		     "the loop spins on bytes that arrived during a request");
	PQclear(PQexec(blocker, "COMMIT"));
	PQfinish(blocker);
	a = read_until_close(early, 20);
	b = read_until_close(closing, 20);
	cr_assert(a && b, "an answer is missing, or a connection stayed open");
	cr_assert_eq(statuses(a, st, 4), 2, "expected two answers: %.600s", a);
	cr_assert_eq(st[0], 201, "%.300s", a);
	cr_assert_eq(st[1], 200, "%.600s", a);
	cr_assert_eq(statuses(b, st, 4), 1, "expected one answer: %.600s", b);
	cr_assert_eq(st[0], 201, "%.300s", b);
	close(early);
	close(closing);
	free(a);
	free(b);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream IN "
				 "('account-early', 'account-closing')"),
		     2);
}

/* Several requests in one send to svc: each answered whole, in order, on the one
 * connection. `id` names the account the second one opens. */
static void assert_pipelined_requests_answered_in_order(const char *id)
{
	char reqs[2048], opening[512], ids[3][32], *answer;
	const char *p;
	int st[8];

	open_request(opening, sizeof(opening), id);
	snprintf(reqs, sizeof(reqs),
		 "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\n\r\n"
		 "%s"
		 "GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\n\r\n"
		 "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: last\r\nConnection: close\r\n\r\n",
		 opening);
	answer = exchange(svc.port, reqs, strlen(reqs));
	cr_assert_eq(statuses(answer, st, 8), 4, "expected four answers: %.2000s", answer);
	cr_assert_eq(st[0], 200);
	cr_assert_eq(st[1], 201);
	cr_assert_eq(st[2], 404);
	cr_assert_eq(st[3], 200);
	snprintf(ids[0], sizeof(ids[0]), "X-Request-Id: first\r\n");
	snprintf(ids[1], sizeof(ids[1]), "X-Request-Id: third\r\n");
	snprintf(ids[2], sizeof(ids[2]), "X-Request-Id: last\r\n");
	p = answer;
	for (int i = 0; i < 3; i++) {
		p = strstr(p, ids[i]);
		cr_assert(p, "'%s' missing or out of order: %.2000s", ids[i], answer);
	}
	free(answer);
}

Test(http_edge, pipelined_requests_are_answered_in_order)
{
	start_command();
	assert_pipelined_requests_answered_in_order("piped");
	/* And with the read path's shortcuts (this libevent is the one they were written
	 * for), not libevent's own. */
	cr_assert_not(harness_log_says(&svc, LIBEVENT_READS_LINE));
}

/* One answer on a keep-alive connection, whole: its headers and Content-Length bytes of
 * body (NUL-terminated; *len is its length), or NULL if the connection closed before
 * or `timeout` passed. */
static char *read_answer(int fd, double timeout, size_t *len)
{
	double deadline = harness_now() + timeout;
	struct received in = received_new();
	size_t whole = 0;

	while (whole == 0 || in.n < whole) {
		const char *end;

		if (receive_some(fd, deadline, &in) <= 0) {
			free(in.buf);
			return NULL;
		}
		end = strstr(in.buf, "\r\n\r\n");
		if (whole == 0 && end) {
			const char *cl = strcasestr(in.buf, "\r\nContent-Length:");
			cr_assert(cl, "an answer without Content-Length: %.300s", in.buf);
			whole = (size_t)(end + 4 - in.buf) +
				strtoul(cl + strlen("\r\nContent-Length:"), NULL, 10);
		}
	}
	cr_assert_eq(in.n, whole, "more than one answer: %.600s", in.buf);
	*len = in.n;
	return in.buf;
}

/* Send req on fd and read its answer, whose status must be `status`. */
static void assert_answers(int fd, const char *req, int status)
{
	size_t len;
	char *answer;

	cr_assert(send_all(fd, req, strlen(req)), "send: %s", strerror(errno));
	answer = read_answer(fd, 20, &len);
	cr_assert(answer, "no answer to %.60s", req);
	cr_assert_eq(status_of(answer), status, "%.60s: %.300s", req, answer);
	free(answer);
}

/* A last request on fd, with Connection: close: answered 200, then the server closes;
 * fd is closed. */
static void assert_last_answer_closes(int fd)
{
	const char *last = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	char *rest;
	int st[4];

	cr_assert(send_all(fd, last, strlen(last)));
	rest = read_until_close(fd, 20);
	cr_assert(rest, "no last answer, or the connection stayed open");
	cr_assert_eq(statuses(rest, st, 4), 1, "%.600s", rest);
	cr_assert_eq(st[0], 200);
	free(rest);
	close(fd);
}

/* The read path's shortcuts into libevent's internals can be turned off (the edge turns
 * them off by itself on a libevent it was not written for): connections are then read
 * by libevent's own read path, and serve keep-alive and pipelined requests the same. */
Test(http_edge, libevents_own_read_path_serves_keep_alive_and_pipelined_requests)
{
	const char *env[] = { "DAYBOOK_HTTP_LIBEVENT_READS", "1", NULL };
	const char *healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
	char req[512];
	int fd;

	harness_db_create(db, sizeof(db));
	harness_start_command_env(&svc, db, env);
	cr_assert(harness_log_says(&svc, LIBEVENT_READS_LINE " (DAYBOOK_HTTP_LIBEVENT_READS=1)"),
		  "the edge did not say it reads by libevent's own read path");
	/* Keep-alive: answers made in the turn their request arrived in (/healthz) and
	 * later (a write goes to PostgreSQL), one after another on one connection. */
	fd = connect_to(svc.port);
	cr_assert(fd >= 0);
	open_request(req, sizeof(req), "kept-1");
	assert_answers(fd, req, 201);
	assert_answers(fd, healthz, 200);
	open_request(req, sizeof(req), "kept-2");
	assert_answers(fd, req, 201);
	assert_answers(fd, healthz, 200);
	assert_last_answer_closes(fd);
	assert_pipelined_requests_answered_in_order("piped");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE stream IN "
				 "('account-kept-1', 'account-kept-2', 'account-piped')"),
		     3);
}

/* A connection to port whose client reads slowly: a small receive window, in small
 * segments (which also keeps the server's send buffer small), so that the server
 * cannot write a large answer at once. */
static int connect_slow_reader(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET,
				 .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), small = 4096, mss = 536;

	cr_assert(fd >= 0);
	cr_assert(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0);
	cr_assert(setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) == 0);
	cr_assert(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "connect: %s",
		  strerror(errno));
	return fd;
}

static bool feed_shows_events(void *arg)
{
	const char *auth[] = { AUTH_READ, NULL };
	struct response r = http_request(svc.port, "GET", "/events?limit=1", auth, NULL, 10);
	bool shown = r.status == 200 && r.body && strstr(r.body, "account-big");

	(void)arg;
	response_free(&r);
	return shown;
}

/* An answer the socket does not take whole goes out in parts, as the client reads: the
 * connection then serves its next requests, and keeps its read interest registered in
 * epoll while they are served as after any other answer (the guard, http_conn.c, goes
 * back in front of evhttp's read event however the answer was written: it used to stay
 * behind it, and step back at the next request). */
Test(http_edge, an_answer_written_in_parts_leaves_the_connection_serving_as_before)
{
	const char *feed = "GET /events?limit=1000 HTTP/1.1\r\nHost: x\r\n" AUTH_READ "\r\n\r\n";
	const char *one = "GET /events?limit=1 HTTP/1.1\r\nHost: x\r\n" AUTH_READ "\r\n\r\n";
	char redis_url[128], *answer;
	struct service redis_svc;
	double paused;
	size_t len;
	int fd;

	harness_db_create(db, sizeof(db));
	/* A page of the feed of about 1.6 MB. */
	PQclear(sql(db,
		    "INSERT INTO events (stream, version, type, data, metadata) "
		    "SELECT 'account-big', v, 'FundsDeposited', jsonb_build_object('amount', v, "
		    "'pad', repeat('x', 1500)), '{}' FROM generate_series(1, 1000) v ORDER BY 2"));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_query(&svc, db, redis_url);
	cr_assert_not(harness_log_says(&svc, LIBEVENT_READS_LINE));
	/* The feed shows them once no older transaction is open in the cluster (another
	 * test's may be). */
	cr_assert(harness_wait_until(feed_shows_events, NULL, harness_now() + 60),
		  "the feed never showed the events");
	fd = connect_slow_reader(svc.port);
	cr_assert(send_all(fd, feed, strlen(feed)));
	/* The client reads nothing until the server has met the full socket. */
	cr_assert(harness_wait_metric(&svc, "daybook_http_answers_written_in_parts_total", 1,
				      harness_now() + 20),
		  "the answer was written whole: the test needs it written in parts");
	answer = read_answer(fd, 60, &len);
	cr_assert(answer, "the answer never came whole");
	cr_assert_eq(status_of(answer), 200, "%.300s", answer);
	cr_assert_gt(len, 1000000);
	free(answer);
	/* Requests answered a turn later (by PostgreSQL), as the feed's are, are the ones a
	 * guard left behind evhttp's read event stepped back at. */
	paused = harness_metric(&svc, "daybook_http_read_interest_paused_total");
	cr_assert_geq(paused, 0, "no daybook_http_read_interest_paused_total");
	assert_answers(fd, one, 200);
	assert_answers(fd, one, 200);
	cr_assert_eq(harness_metric(&svc, "daybook_http_read_interest_paused_total"), paused,
		     "the connection's socket left epoll during a request: its guard did not go "
		     "back in front after the answer written in parts");
	assert_last_answer_closes(fd);
	harness_kill(&redis_svc);
}

Test(http_edge, head_is_served_wherever_get_is_with_the_same_headers_and_no_body)
{
	const char *auth[] = { AUTH_READ, NULL };
	struct response get, head;
	char glen[32], hlen[32];

	start_command();
	const char *paths[] = { "/healthz", "/readyz", "/metrics" };
	for (size_t i = 0; i < 3; i++) {
		get = http_request(svc.port, "GET", paths[i], auth, NULL, 10);
		head = http_request(svc.port, "HEAD", paths[i], auth, NULL, 10);
		cr_assert_eq(head.status, get.status, "HEAD %s: %d", paths[i], head.status);
		cr_assert(response_header(&head, "Content-Length", hlen, sizeof(hlen)));
		if (strcmp(paths[i], "/metrics") != 0) {
			cr_assert(response_header(&get, "Content-Length", glen, sizeof(glen)));
			cr_assert_str_eq(hlen, glen);
		}
		cr_assert_str_eq(head.body, "", "HEAD %s has a body", paths[i]);
		response_free(&get);
		response_free(&head);
	}
	/* A POST-only route lists its methods; a GET route would list HEAD too. */
	head = http_request(svc.port, "HEAD", "/accounts", auth, NULL, 10);
	cr_assert_eq(head.status, 405);
	cr_assert(response_header(&head, "Allow", hlen, sizeof(hlen)));
	cr_assert_str_eq(hlen, "POST");
	response_free(&head);
	get = http_request(svc.port, "DELETE", "/healthz", auth, NULL, 10);
	cr_assert_eq(get.status, 405);
	cr_assert(response_header(&get, "Allow", glen, sizeof(glen)));
	cr_assert_str_eq(glen, "GET, HEAD");
	cr_assert_str_eq(json_string_value(json_object_get(get.json, "code")),
			 "method_not_allowed");
	response_free(&get);
}

Test(http_edge, query_head_matches_get_on_a_read_route)
{
	const char *auth[] = { AUTH_READ, NULL };
	char redis_url[128], glen[32], hlen[32];
	struct service redis_svc;
	struct response get, head;

	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_query(&svc, db, redis_url);
	get = http_request(svc.port, "GET", "/totals", auth, NULL, 10);
	head = http_request(svc.port, "HEAD", "/totals", auth, NULL, 10);
	cr_assert_eq(get.status, 200, "%d %s", get.status, get.body);
	cr_assert_eq(head.status, 200, "HEAD /totals: %d", head.status);
	cr_assert(response_header(&get, "Content-Length", glen, sizeof(glen)));
	cr_assert(response_header(&head, "Content-Length", hlen, sizeof(hlen)));
	cr_assert_str_eq(hlen, glen);
	cr_assert(response_header(&head, "X-Daybook-Position", hlen, sizeof(hlen)));
	cr_assert_str_eq(head.body, "");
	response_free(&get);
	response_free(&head);
	harness_kill(&redis_svc);
}

Test(http_edge, a_malformed_query_string_is_400_and_never_ignored)
{
	const char *auth[] = { AUTH_READ, NULL };
	const char *bad[] = {
		/* evhttp used to drop every parameter here, serving a stale read with 200 */
		"/totals?min_position=999999.1&stale",
		"/totals?min_position=%zz",                  /* bad percent-encoding */
		"/totals?min_position=1.1%",                 /* truncated escape */
		"/totals?min_position=%00",                  /* an escaped NUL */
		"/totals?min_position=1.1&min_position=2.2", /* repeated */
		"/totals?min_positon=1.1",                   /* unknown (a typo) */
		"/accounts/a1/transactions?limit=5&limit=6",
	};
	char redis_url[128];
	struct service redis_svc;
	struct response r;

	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_query(&svc, db, redis_url);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		r = http_request(svc.port, "GET", bad[i], auth, NULL, 10);
		cr_assert_eq(r.status, 400, "GET %s: %d %s", bad[i], r.status, r.body);
		cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")),
				 "invalid_request");
		cr_assert(strstr(json_string_value(json_object_get(r.json, "detail")), "query"),
			  "the detail should name the problem: %s", r.body);
		response_free(&r);
	}
	/* Well-formed ones still work, encoded or not. */
	r = http_request(svc.port, "GET", "/totals?wait_ms=%31%30", auth, NULL, 10);
	cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
	response_free(&r);
	harness_kill(&redis_svc);
}

/* The command service (svc) and a query service (edge_query) on one database: their
 * ports into ports. */
static void start_command_and_query(int ports[2])
{
	char redis_url[128];

	start_command();
	harness_start_redis(&edge_redis, false, redis_url, sizeof(redis_url));
	harness_start_query(&edge_query, db, redis_url);
	ports[0] = svc.port;
	ports[1] = edge_query.port;
}

/* A problem with every member (SPEC §3, and instance) for `status` and `code`, valid
 * UTF-8 (jansson reads nothing else), whose detail starts with `starts` and holds
 * U+FFFD only when `replaced` (bytes of the request that are not UTF-8). */
static void assert_whole_problem(const struct response *r, int status, const char *code,
				 const char *starts, bool replaced)
{
	const char *type, *title, *detail, *instance;
	char want_type[128];

	cr_assert_eq(r->status, status, "expected %d, got %d: %s", status, r->status, r->body);
	cr_assert(strcasestr(r->headers, "Content-Type: application/problem+json"), "%s",
		  r->headers);
	cr_assert_not_null(r->json, "the body is not JSON in UTF-8: %s", r->body);
	type = json_string_value(json_object_get(r->json, "type"));
	title = json_string_value(json_object_get(r->json, "title"));
	detail = json_string_value(json_object_get(r->json, "detail"));
	instance = json_string_value(json_object_get(r->json, "instance"));
	cr_assert(type && title && detail && instance, "the problem lost members: %s", r->body);
	snprintf(want_type, sizeof(want_type), "https://daybook.dev/problems/%s", code);
	cr_assert_str_eq(type, want_type);
	cr_assert_str_eq(json_string_value(json_object_get(r->json, "code")), code);
	cr_assert_eq(json_integer_value(json_object_get(r->json, "status")), status, "%s", r->body);
	cr_assert(title[0] && instance[0], "%s", r->body);
	cr_assert_eq(strncmp(detail, starts, strlen(starts)), 0, "detail '%s' should start '%s'",
		     detail, starts);
	if (replaced)
		cr_assert(strstr(detail, "\xef\xbf\xbd"), "no U+FFFD for bytes not UTF-8: %s",
			  detail);
	else
		cr_assert_null(strstr(detail, "\xef\xbf\xbd"), "a character was split: %s", detail);
}

Test(http_edge, a_path_that_is_not_utf8_gets_a_whole_problem_with_u_fffd_for_its_bytes)
{
	int ports[2];
	struct response r;

	start_command_and_query(ports);
	for (int i = 0; i < 2; i++) {
		r = http_request(ports[i], "GET", "/\xff\xfe", NULL, NULL, 10);
		assert_whole_problem(&r, 404, "not_found",
				     "no route for GET /\xef\xbf\xbd\xef\xbf\xbd", true);
		response_free(&r);
	}
	/* A route's path, by a method it does not take. */
	r = http_request(svc.port, "GET", "/accounts/\xc3(\xff/deposits", NULL, NULL, 10);
	assert_whole_problem(&r, 405, "method_not_allowed",
			     "/accounts/\xef\xbf\xbd(\xef\xbf\xbd/deposits supports POST", true);
	response_free(&r);
	r = http_request(edge_query.port, "DELETE", "/transfers/\xe2\x82", NULL, NULL, 10);
	assert_whole_problem(&r, 405, "method_not_allowed",
			     "/transfers/\xef\xbf\xbd\xef\xbf\xbd supports GET, HEAD", true);
	response_free(&r);
}

Test(http_edge, a_long_path_of_multibyte_characters_is_cut_between_characters)
{
	char path[2][1200];
	int ports[2];
	struct response r;

	start_command_and_query(ports);
	/* 1,101 and 1,102 bytes: the edge keeps 1,023 of a path, the detail 1,023 bytes,
	 * and one or the other falls inside an e-acute (2 bytes). */
	strcpy(path[0], "/");
	strcpy(path[1], "/a");
	for (int i = 0; i < 550; i++) {
		strcat(path[0], "\xc3\xa9");
		strcat(path[1], "\xc3\xa9");
	}
	for (int i = 0; i < 2; i++) {
		for (int p = 0; p < 2; p++) {
			r = http_request(ports[i], "GET", path[p], NULL, NULL, 10);
			assert_whole_problem(&r, 404, "not_found",
					     p == 0 ? "no route for GET /\xc3\xa9\xc3\xa9"
						    : "no route for GET /a\xc3\xa9\xc3\xa9",
					     false);
			response_free(&r);
		}
	}
	/* The path the access line shows is cut between characters too. */
	for (int i = 0; i < 2; i++) {
		const struct service *s = i == 0 ? &svc : &edge_query;
		cr_assert(harness_wait_log(s, "\"path\":\"/a\xc3\xa9\xc3\xa9", harness_now() + 10),
			  "no access line for the long path");
		cr_assert_not(harness_log_says(s, "\xef\xbf\xbd"),
			      "the access line's path ends in a split character");
	}
}

Test(http_edge, an_unknown_field_with_a_long_multibyte_name_gets_a_whole_problem)
{
	char body[256] = "{\"", detail[128] = "unknown field '";
	struct response r;

	start_command();
	/* 30 euro signs (3 bytes each); the detail names the first 64 bytes' whole ones. */
	for (int i = 0; i < 30; i++) {
		strcat(body, "\xe2\x82\xac");
		if (i < 21)
			strcat(detail, "\xe2\x82\xac");
	}
	strcat(body, "\":1,\"id\":\"u1\",\"name\":\"U\",\"currency\":\"EUR\"}");
	strcat(detail, "'");
	r = post(&svc, "/accounts", body, NULL);
	assert_whole_problem(&r, 400, "invalid_request", detail, false);
	response_free(&r);
}

Test(http_edge, healthz_readyz_and_metrics_refuse_a_malformed_or_unknown_query_string)
{
	static const char *const builtin[] = { "/healthz", "/readyz", "/metrics" };
	char path[64];
	int ports[2];
	struct response r;

	start_command_and_query(ports);
	for (int i = 0; i < 2; i++) {
		for (size_t b = 0; b < sizeof(builtin) / sizeof(builtin[0]); b++) {
			snprintf(path, sizeof(path), "%s?%%zz", builtin[b]);
			r = http_request(ports[i], "GET", path, NULL, NULL, 10);
			assert_whole_problem(&r, 400, "invalid_request",
					     "the query string is malformed", false);
			response_free(&r);
			r = http_request(ports[i], "HEAD", path, NULL, NULL, 10);
			cr_assert_eq(r.status, 400, "HEAD %s: %d", path, r.status);
			response_free(&r);
			/* Well-formed, but they take no parameters (as the routes refuse theirs). */
			snprintf(path, sizeof(path), "%s?verbose=1", builtin[b]);
			r = http_request(ports[i], "GET", path, NULL, NULL, 10);
			assert_whole_problem(&r, 400, "invalid_request",
					     "unknown query parameter 'verbose'", false);
			response_free(&r);
			r = http_request(ports[i], "GET", builtin[b], NULL, NULL, 10);
			cr_assert_eq(r.status, 200, "GET %s: %d %s", builtin[b], r.status, r.body);
			response_free(&r);
		}
	}
}

Test(http_edge, the_write_api_refuses_query_parameters_it_does_not_take)
{
	struct response r;

	start_command();
	r = post(&svc, "/accounts?dry_run=1", "{\"id\":\"q1\",\"name\":\"Q\",\"currency\":\"EUR\"}",
		 NULL);
	cr_assert_eq(r.status, 400, "%d %s", r.status, r.body);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")), "invalid_request");
	response_free(&r);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events"), 0, "nothing may be written");
}

Test(http_edge, readyz_names_dependencies_but_reveals_no_error_text)
{
	struct response r;
	char drop[160];

	start_command();
	r = http_request(svc.port, "GET", "/readyz", NULL, NULL, 10);
	cr_assert_eq(r.status, 200);
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_object_get(r.json, "checks"), "postgresql")),
			 "ok", "%s", r.body);
	response_free(&r);
	/* The database goes away: the reconnection fails with a text naming it. */
	snprintf(drop, sizeof(drop), "DROP DATABASE %s WITH (FORCE)", db);
	PQclear(sql("postgres", drop));
	cr_assert(harness_wait_status(&svc, "/readyz", 503, 20));
	r = http_request(svc.port, "GET", "/readyz", NULL, NULL, 10);
	cr_assert_eq(r.status, 503);
	cr_assert(strcasestr(r.headers, "Content-Type: application/problem+json"));
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")), "unavailable");
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_object_get(r.json, "checks"), "postgresql")),
			 "unavailable", "%s", r.body);
	cr_assert_null(strstr(r.body, db), "the database name leaked: %s", r.body);
	cr_assert_null(strcasestr(r.body, "daybook_command"), "the role leaked: %s", r.body);
	cr_assert_null(strcasestr(r.body, "FATAL"), "an error text leaked: %s", r.body);
	cr_assert_null(strcasestr(r.body, "127.0.0.1"), "a host leaked: %s", r.body);
	response_free(&r);
}

Test(http_edge, the_projector_and_query_edges_have_the_same_limits_and_a_quiet_readyz)
{
	char redis_url[128], *req, *answer;
	struct service redis_svc, query;
	struct response r;
	size_t n, body = 100 * 1024;

	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_projector(&svc, db, redis_url);
	harness_start_query(&query, db, redis_url);
	r = http_request(svc.port, "GET", "/readyz", NULL, NULL, 10);
	cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
	json_t *checks = json_object_get(r.json, "checks");
	cr_assert_str_eq(json_string_value(json_object_get(checks, "postgresql")), "ok", "%s",
			 r.body);
	cr_assert_str_eq(json_string_value(json_object_get(checks, "projection")), "ok", "%s",
			 r.body);
	response_free(&r);

	req = malloc(body + 512);
	cr_assert(req);
	for (int i = 0; i < 2; i++) {
		int port = i == 0 ? svc.port : query.port;

		n = (size_t)
			snprintf(req, 512,
				 "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n",
				 body);
		memset(req + n, 'x', body);
		answer = exchange(port, req, n + body);
		assert_problem(answer, 413, "payload_too_large");
		free(answer);
		free(req);
		req = request_with_headers(17 * 1024, &n);
		answer = exchange(port, req, n);
		assert_problem(answer, 431, "headers_too_large");
		free(answer);
		free(req);
		req = malloc(body + 512);
		cr_assert(req);
		r = http_request(port, "HEAD", "/healthz", NULL, NULL, 10);
		cr_assert_eq(r.status, 200);
		cr_assert_str_eq(r.body, "");
		response_free(&r);
	}
	free(req);
	harness_kill(&query);
	harness_kill(&redis_svc);
}

/* The command service (svc) holds at least arg connections, that of this check aside. */
static bool holds_connections(void *arg)
{
	return harness_metric(&svc, "daybook_http_connections_open") - 1 >= (double)(intptr_t)arg;
}

Test(http_edge, sigterm_with_idle_connections_open_exits_cleanly)
{
	enum { IDLE = 50 };
	const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
	int fds[IDLE], keep;
	char buf[512];

	start_command();
	hoard(svc.port, fds, IDLE);
	keep = connect_to(svc.port);
	cr_assert(keep >= 0 && send_all(keep, get, strlen(get)));
	cr_assert(recv(keep, buf, sizeof(buf), 0) > 0, "no answer");
	cr_assert(harness_wait_until(holds_connections, (void *)(intptr_t)(IDLE + 1),
				     harness_now() + 20),
		  "the service did not take the idle connections");
	cr_assert_eq(harness_stop(&svc), 0, "the service did not exit 0 on SIGTERM");
	close(keep);
	release(fds, IDLE);
}
