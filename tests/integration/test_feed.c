/* The event feed: GET /events and GET /events/stream against the real services, with
 * concurrent writers, transactions that commit out of position order, forced
 * disconnects, slow consumers, filters, the stream cap, and the example consumer. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../query/feed.h"
#include "harness.h"

static char db[64];
static char redis_url[HARNESS_REDIS_URL_MAX];
static struct service command, query, redis_svc, projector;

static void setup_with(const char *const *env)
{
	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	harness_start_command(&command, db);
	harness_start_query_env(&query, db, redis_url, env);
}

static void setup(void)
{
	setup_with(NULL);
}

static void teardown(void)
{
	harness_stop(&query);
	harness_stop(&command);
	if (projector.pid > 0)
		harness_stop(&projector);
	harness_kill(&redis_svc);
}

TestSuite(feed, .init = setup, .fini = teardown, .timeout = 240);

/* --- helpers ----------------------------------------------------------------------- */

static void must_post(const char *path, const char *body, char *position, size_t len)
{
	struct response r = post(&command, path, body, NULL);

	cr_assert_eq(r.status, 201, "%s %s: %d %s", path, body, r.status, r.body);
	if (position) {
		json_t *p = json_object_get(r.json, "position");
		cr_assert(json_is_string(p));
		snprintf(position, len, "%s", json_string_value(p));
	}
	response_free(&r);
}

static void open_account(const char *id)
{
	char body[160];

	snprintf(body, sizeof(body), "{\"id\":\"%s\",\"name\":\"%s\",\"currency\":\"EUR\"}", id,
		 id);
	must_post("/accounts", body, NULL, 0);
}

static void deposit(const char *id, int amount)
{
	char path[128], body[64];

	snprintf(path, sizeof(path), "/accounts/%s/deposits", id);
	snprintf(body, sizeof(body), "{\"amount\":%d}", amount);
	must_post(path, body, NULL, 0);
}

static struct response get(const char *path)
{
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };

	return http_request(query.port, "GET", path, h, NULL, 40);
}

/* Every event's token in reader order, from the event store itself. */
static size_t log_tokens(char ***out)
{
	PGresult *r =
		sql(db, "SELECT txid::text || '.' || position FROM events ORDER BY txid, position");
	size_t n = (size_t)PQntuples(r);
	char **v = calloc(n + 1, sizeof(*v));

	for (size_t i = 0; i < n; i++)
		v[i] = strdup(PQgetvalue(r, (int)i, 0));
	PQclear(r);
	*out = v;
	return n;
}

static void free_tokens(char **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i]);
	free(v);
}

/* A growing list of tokens a consumer saw. */
struct seen {
	char **v;
	size_t n, cap;
};

static void seen_add(struct seen *s, const char *token)
{
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 256;
		s->v = realloc(s->v, s->cap * sizeof(*s->v));
	}
	s->v[s->n++] = strdup(token);
}

/* What the consumer saw is the log, each event once, in reader order. */
static void assert_saw_log(const struct seen *s)
{
	char **log;
	size_t n = log_tokens(&log);

	cr_assert_eq(s->n, n, "the consumer saw %zu events, the log holds %zu", s->n, n);
	for (size_t i = 0; i < n; i++)
		cr_assert_str_eq(s->v[i], log[i], "event %zu: saw %s, the log has %s", i, s->v[i],
				 log[i]);
	free_tokens(log, n);
}

static void seen_free(struct seen *s)
{
	free_tokens(s->v, s->n);
	memset(s, 0, sizeof(*s));
}

/* One page of GET /events: appends the positions to `s`, returns next_after. */
static void page(const char *query_string, struct seen *s, char *next, size_t len)
{
	char path[512];
	struct response r;
	json_t *events;
	size_t i;
	json_t *e;

	snprintf(path, sizeof(path), "/events?%s", query_string);
	r = get(path);
	cr_assert_eq(r.status, 200, "%s: %d %s", path, r.status, r.body);
	events = json_object_get(r.json, "events");
	cr_assert(json_is_array(events), "%s", r.body);
	json_array_foreach (events, i, e)
		seen_add(s, json_string_value(json_object_get(e, "position")));
	cr_assert(json_is_string(json_object_get(r.json, "next_after")), "%s", r.body);
	snprintf(next, len, "%s", json_string_value(json_object_get(r.json, "next_after")));
	response_free(&r);
}

/* Writers: threads that deposit into their own account. */
struct writer {
	pthread_t t;
	char account[32];
	int n;
};

static void *write_loop(void *arg)
{
	struct writer *w = arg;

	for (int i = 0; i < w->n; i++)
		deposit(w->account, i + 1);
	return NULL;
}

static void writers_start(struct writer *w, int n, int each, int base)
{
	for (int i = 0; i < n; i++) {
		snprintf(w[i].account, sizeof(w[i].account), "w%d", base + i);
		open_account(w[i].account);
		w[i].n = each;
		cr_assert_eq(pthread_create(&w[i].t, NULL, write_loop, &w[i]), 0);
	}
}

static void writers_join(struct writer *w, int n)
{
	for (int i = 0; i < n; i++)
		pthread_join(w[i].t, NULL);
}

/* A transaction of the superuser that takes its txid now and appends later: it
 * commits after many others, out of position order. */
static PGconn *late_begin(void)
{
	char ci[512];
	PGconn *c;
	PGresult *r;

	harness_conninfo(db, NULL, ci, sizeof(ci));
	c = PQconnectdb(ci);
	cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
	r = PQexec(c, "BEGIN; SELECT pg_current_xact_id()");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
	PQclear(r);
	return c;
}

static void late_append_and_commit(PGconn *c)
{
	PGresult *r =
		PQexec(c, "INSERT INTO events (stream, version, type, data, metadata) VALUES "
			  "('account-late', 1, 'AccountOpened', '{\"account_id\":\"late\","
			  "\"name\":\"Late\",\"currency\":\"EUR\",\"overdraft_limit\":0}', '{}')");

	cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(c));
	PQclear(r);
	r = PQexec(c, "COMMIT");
	cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(c));
	PQclear(r);
	PQfinish(c);
}

static long long log_count(void)
{
	return sql_int(db, "SELECT count(*) FROM events");
}

/* --- SSE client ------------------------------------------------------------------ */

struct sse {
	int fd;
	int status;
	bool headers_done, need_crlf, eof;
	size_t chunk_left;
	char *raw; /* bytes received, not yet de-chunked */
	size_t rlen;
	char *body; /* the event stream, not yet parsed */
	size_t blen;
};

struct sse_event {
	char id[48];
	char type[32];
	char *data; /* caller frees */
};

static void grow_append(char **buf, size_t *len, const char *p, size_t n)
{
	*buf = realloc(*buf, *len + n + 1);
	memcpy(*buf + *len, p, n);
	*len += n;
	(*buf)[*len] = '\0';
}

static void consume(char **buf, size_t *len, size_t n)
{
	memmove(*buf, *buf + n, *len - n);
	*len -= n;
	(*buf)[*len] = '\0';
}

/* De-chunk what has arrived into body. */
static void sse_dechunk(struct sse *s)
{
	for (;;) {
		if (!s->headers_done) {
			char *end = s->rlen ? strstr(s->raw, "\r\n\r\n") : NULL;
			if (!end)
				return;
			sscanf(s->raw, "HTTP/1.%*d %d", &s->status);
			s->headers_done = true;
			consume(&s->raw, &s->rlen, (size_t)(end + 4 - s->raw));
			continue;
		}
		if (s->status != 200)
			return;
		if (s->chunk_left) {
			size_t n = s->rlen < s->chunk_left ? s->rlen : s->chunk_left;
			if (!n)
				return;
			grow_append(&s->body, &s->blen, s->raw, n);
			consume(&s->raw, &s->rlen, n);
			s->chunk_left -= n;
			s->need_crlf = s->chunk_left == 0;
			continue;
		}
		if (s->need_crlf) {
			if (s->rlen < 2)
				return;
			consume(&s->raw, &s->rlen, 2);
			s->need_crlf = false;
			continue;
		}
		char *nl = s->rlen ? strstr(s->raw, "\r\n") : NULL;
		if (!nl)
			return;
		s->chunk_left = strtoul(s->raw, NULL, 16);
		consume(&s->raw, &s->rlen, (size_t)(nl + 2 - s->raw));
		if (!s->chunk_left) {
			s->eof = true;
			return;
		}
	}
}

/* Read what is there without blocking; false on EOF or error. */
static bool sse_pump(struct sse *s)
{
	char buf[65536];

	for (;;) {
		ssize_t n = recv(s->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
			s->eof = true;
			return false;
		}
		if (n < 0)
			return true;
		grow_append(&s->raw, &s->rlen, buf, (size_t)n);
		sse_dechunk(s);
	}
}

/* The next complete event in the buffer (comments skipped); false when none yet. */
static bool sse_take(struct sse *s, struct sse_event *ev)
{
	for (;;) {
		char *end = s->blen ? strstr(s->body, "\n\n") : NULL;
		bool any = false;
		if (!end)
			return false;
		*end = '\0';
		memset(ev, 0, sizeof(*ev));
		for (char *line = s->body, *next; line; line = next) {
			next = strchr(line, '\n');
			if (next)
				*next++ = '\0';
			if (strncmp(line, "id: ", 4) == 0) {
				snprintf(ev->id, sizeof(ev->id), "%s", line + 4);
				any = true;
			} else if (strncmp(line, "event: ", 7) == 0) {
				snprintf(ev->type, sizeof(ev->type), "%s", line + 7);
			} else if (strncmp(line, "data: ", 6) == 0) {
				ev->data = strdup(line + 6);
			}
		}
		consume(&s->body, &s->blen, (size_t)(end + 2 - s->body));
		if (any)
			return true;
		free(ev->data);
	}
}

static int connect_to(int port, int rcvbuf)
{
	struct sockaddr_in a = { .sin_family = AF_INET,
				 .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	cr_assert(fd >= 0);
	if (rcvbuf)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0, "connect: %s",
		     strerror(errno));
	return fd;
}

/* Open a stream; waits for the status line (timeout in seconds). */
static void sse_open(struct sse *s, const char *qs, const char *last_id, int rcvbuf)
{
	char req[1024];
	double end = harness_now() + 20;

	memset(s, 0, sizeof(*s));
	s->fd = connect_to(query.port, rcvbuf);
	snprintf(req, sizeof(req),
		 "GET /events/stream%s%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
		 "Accept: text/event-stream\r\n%s%s%s\r\n",
		 qs && *qs ? "?" : "", qs ? qs : "", TOKEN_READ, last_id ? "Last-Event-ID: " : "",
		 last_id ? last_id : "", last_id ? "\r\n" : "");
	cr_assert_eq(send(s->fd, req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
	while (!s->headers_done && harness_now() < end) {
		struct pollfd p = { s->fd, POLLIN, 0 };
		poll(&p, 1, 100);
		if (!sse_pump(s))
			break;
	}
	cr_assert(s->headers_done, "no answer to the stream request");
}

/* The next event within `timeout` seconds; false on timeout or EOF. */
static bool sse_next(struct sse *s, struct sse_event *ev, double timeout)
{
	double end = harness_now() + timeout;

	for (;;) {
		struct pollfd p = { s->fd, POLLIN, 0 };
		if (sse_take(s, ev))
			return true;
		if (s->eof || harness_now() >= end)
			return false;
		poll(&p, 1, 50);
		sse_pump(s);
	}
}

static void sse_close(struct sse *s)
{
	if (s->fd >= 0)
		close(s->fd);
	free(s->raw);
	free(s->body);
	s->fd = -1;
	s->raw = s->body = NULL;
}

/* --- paging -------------------------------------------------------------------- */

Test(feed, a_paging_consumer_sees_every_event_once_in_order_despite_late_commits)
{
	struct writer w[4];
	struct seen s = { 0 };
	char after[64] = "0.0", qs[128];
	PGconn *late = late_begin();
	double end;
	long long total;

	writers_start(w, 4, 30, 0);
	/* While writers run and the late transaction holds its txid, page on. */
	for (int i = 0; i < 20; i++) {
		snprintf(qs, sizeof(qs), "after=%s&limit=7&wait_ms=50", after);
		page(qs, &s, after, sizeof(after));
	}
	writers_join(w, 4);
	late_append_and_commit(late);
	total = log_count();
	end = harness_now() + 60;
	while ((long long)s.n < total && harness_now() < end) {
		snprintf(qs, sizeof(qs), "after=%s&limit=7&wait_ms=200", after);
		page(qs, &s, after, sizeof(after));
	}
	/* Nothing more comes after the end. */
	snprintf(qs, sizeof(qs), "after=%s&limit=7", after);
	page(qs, &s, after, sizeof(after));
	assert_saw_log(&s);
	seen_free(&s);
}

/* --- SSE with forced disconnects --------------------------------------------------- */

/* In the background: a late transaction takes its txid, more writers commit after
 * it, the consumer reads on for a while (it must not get past the late one), then
 * the late one appends and commits. */
struct late_run {
	pthread_t t;
	struct writer w[4];
	volatile size_t *seen;
	long long total; /* the log's size once everything committed */
};

static void *late_thread(void *arg)
{
	struct late_run *l = arg;
	PGconn *late = late_begin();
	size_t before;
	double end;

	writers_start(l->w, 4, 20, 4);
	writers_join(l->w, 4);
	before = *l->seen;
	end = harness_now() + 2;
	while (*l->seen < before + 40 && harness_now() < end)
		usleep(10000);
	late_append_and_commit(late);
	l->total = log_count();
	return NULL;
}

Test(feed, a_stream_consumer_resumes_by_last_event_id_and_sees_every_event_once)
{
	struct writer w[4];
	struct seen s = { 0 };
	struct sse st;
	struct sse_event ev;
	struct late_run late = { .seen = &s.n, .total = -1 };
	double end;
	long long total = -1;
	int since = 0;
	bool started = false;

	sse_open(&st, NULL, NULL, 0);
	cr_assert_eq(st.status, 200);
	writers_start(w, 4, 30, 0);
	end = harness_now() + 90;
	while (harness_now() < end && (total < 0 || (long long)s.n < total)) {
		if (sse_next(&st, &ev, 0.2)) {
			json_t *j = json_loads(ev.data, 0, NULL);
			cr_assert(j, "data is one line of JSON: %s", ev.data);
			cr_assert_str_eq(json_string_value(json_object_get(j, "position")), ev.id);
			cr_assert_str_eq(json_string_value(json_object_get(j, "type")), ev.type);
			json_decref(j);
			free(ev.data);
			seen_add(&s, ev.id);
			if (++since == 11) { /* a forced disconnect: resume from the last id */
				sse_close(&st);
				sse_open(&st, "after=0.0", s.v[s.n - 1], 0);
				cr_assert_eq(st.status, 200);
				since = 0;
			}
		}
		if (!started && s.n >= 40) {
			writers_join(w, 4);
			cr_assert_eq(pthread_create(&late.t, NULL, late_thread, &late), 0);
			started = true;
		}
		if (started && total < 0 && __atomic_load_n(&late.total, __ATOMIC_SEQ_CST) >= 0)
			total = late.total;
	}
	cr_assert(started, "the first writers' events never arrived");
	pthread_join(late.t, NULL);
	sse_close(&st);
	assert_saw_log(&s);
	seen_free(&s);
}

/* The log head into head, once readers may read it: the feed serves only events below
 * the cluster-wide pg_snapshot_xmin, which other tests' transactions in the same cluster
 * can hold back for a moment. */
static void readable_head(char *head, size_t len)
{
	char q[160];
	double end = harness_now() + 30;

	harness_log_head(db, head, len);
	snprintf(q, sizeof(q),
		 "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::numeric > %lld)::int",
		 atoll(head));
	while (sql_int(db, q) != 1) {
		cr_assert(harness_now() < end, "the readable horizon did not pass %s in 30 s",
			  head);
		usleep(20000);
	}
}

/* --- the live reader's wake-up ------------------------------------------------------- */

/* Open a stream (query string qs) at the readable head and make it live: it is once a
 * deposit into account, which it must follow, arrives (its catch-up found nothing past
 * the head). */
static void sse_open_live(struct sse *st, const char *qs, const char *account)
{
	struct sse_event ev;
	char head[64], want[64], path[128];

	readable_head(head, sizeof(head));
	sse_open(st, qs, head, 0);
	snprintf(path, sizeof(path), "/accounts/%s/deposits", account);
	must_post(path, "{\"amount\":1}", want, sizeof(want));
	cr_assert(sse_next(st, &ev, 20), "the first deposit never arrived");
	cr_assert_str_eq(ev.id, want);
	free(ev.data);
}

Test(feed, live_streams_are_woken_by_the_feeds_own_listen_without_checkpoint_probes)
{
	static const char probes[] = "daybook_query_position_probes_total{model=\"sql\"}";
	struct sse st;
	struct sse_event ev;
	char want[64];
	double p0, r0, n0;

	open_account("live");
	sse_open_live(&st, "stream=account-live", "live");
	p0 = harness_metric(&query, probes);
	r0 = harness_metric(&query, "daybook_query_feed_live_reads_total");
	n0 = harness_metric(&query, "daybook_query_feed_live_notifications_total");
	for (int i = 2; i <= 21; i++) {
		char body[64];
		snprintf(body, sizeof(body), "{\"amount\":%d}", i);
		must_post("/accounts/live/deposits", body, want, sizeof(want));
		cr_assert(sse_next(&st, &ev, 20), "deposit %d never arrived", i);
		cr_assert_str_eq(ev.id, want);
		free(ev.data);
	}
	/* They came by reads of the live reader, woken by the NOTIFYs on the feed's own
	 * connection (a commit may reach it only with a later one, or with the safety read,
	 * while another test's transaction holds the cluster's xmin back), and by no probe
	 * of the waiting room. */
	cr_assert_eq(harness_metric(&query, probes), p0, "probes: %.0f before, %.0f after", p0,
		     harness_metric(&query, probes));
	cr_assert_geq(harness_metric(&query, "daybook_query_feed_live_reads_total"), r0 + 1);
	cr_assert_geq(harness_metric(&query, "daybook_query_feed_live_notifications_total"),
		      n0 + 1);
	sse_close(&st);
}

/* The live reader has PostgreSQL build the event objects of what its streams follow
 * only (the JSON is most of a read's cost), and each stream's frames leave on the turn
 * its read is answered, in one write to its socket. */
Test(feed, the_live_reader_renders_only_what_its_streams_follow_and_writes_at_once)
{
	static const char rendered[] = "daybook_query_feed_live_events_rendered_total";
	static const char direct[] = "daybook_query_feed_live_writes_total{how=\"direct\"}";
	struct sse st;
	struct sse_event ev;
	char want[64];
	double r0, d0;

	open_account("fa");
	open_account("fc");
	deposit("fa", 50);
	sse_open_live(&st, "stream=account-fa&type=FundsDeposited", "fa");
	r0 = harness_metric(&query, rendered);
	d0 = harness_metric(&query, direct);
	for (int i = 0; i < 5; i++)
		deposit("fc", 1);
	must_post("/accounts/fa/withdrawals", "{\"amount\":1}", NULL, 0);
	must_post("/accounts/fa/deposits", "{\"amount\":2}", want, sizeof(want));
	cr_assert(sse_next(&st, &ev, 20), "the second deposit never arrived");
	cr_assert_str_eq(ev.id, want, "the stream got %s (%s), not the deposit %s", ev.id, ev.type,
			 want);
	cr_assert_str_eq(ev.type, "FundsDeposited");
	free(ev.data);
	/* Read: fc's deposits, fa's withdrawal and fa's deposit; built: the deposit alone. */
	cr_assert_eq(harness_metric(&query, rendered), r0 + 1, "rendered %.0f, then %.0f", r0,
		     harness_metric(&query, rendered));
	cr_assert_geq(harness_metric(&query, direct), d0 + 1);
	cr_assert_not(sse_next(&st, &ev, 0.3), "an event the stream does not follow: %s", ev.id);
	sse_close(&st);
}

static void setup_one_worker(void)
{
	const char *env[] = { "DAYBOOK_QUERY_WORKERS", "1", NULL };

	setup_with(env);
}

/* A stream's position is its client's own: one beyond the log (a Last-Event-ID from
 * before a restore, a typo) waits there, live, and a stream opened after it in the same
 * worker still goes live where the log is. The live reader once took the first stream's
 * position as its own; every later stream then caught up short of it and read the log
 * again, page after page, for as long as the first stayed open. */
Test(feed, a_stream_resumed_beyond_the_log_leaves_the_live_reader_where_the_log_is,
     .init = setup_one_worker)
{
	static const char pages[] = "daybook_query_feed_catchup_pages_total";
	static const char reads[] = "daybook_query_feed_live_reads_total";
	struct sse ahead, st;
	struct sse_event ev;
	char want[64];
	double end, p0, p1, r0;

	open_account("far");
	open_account("near");
	sse_open(&ahead, "stream=account-far", "999999999999999.0", 0);
	cr_assert_eq(ahead.status, 200);
	/* Live once its catch-up page is answered: the live reader's first read. */
	end = harness_now() + 20;
	while (harness_metric(&query, reads) < 1) {
		cr_assert(harness_now() < end, "the stream from beyond the log never went live");
		usleep(20000);
	}
	sse_open_live(&st, "stream=account-near", "near");
	/* Idle: neither stream pages the log (with the reader beyond the log, the second
	 * read a page every round trip). */
	p0 = harness_metric(&query, pages);
	usleep(1000000);
	p1 = harness_metric(&query, pages);
	cr_assert_leq(p1 - p0, 2, "%.0f catch-up pages in an idle second", p1 - p0);
	/* The next deposit comes by the live reader. */
	r0 = harness_metric(&query, reads);
	must_post("/accounts/near/deposits", "{\"amount\":2}", want, sizeof(want));
	cr_assert(sse_next(&st, &ev, 20), "the deposit never arrived");
	cr_assert_str_eq(ev.id, want);
	free(ev.data);
	cr_assert_geq(harness_metric(&query, reads), r0 + 1);
	cr_assert_leq(harness_metric(&query, pages) - p1, 2);
	/* The stream beyond the log gets nothing before its position. */
	deposit("far", 1);
	cr_assert_not(sse_next(&ahead, &ev, 0.3), "an event before the stream's position: %s",
		      ev.id);
	sse_close(&st);
	sse_close(&ahead);
}

/* Each stream's events in reader order, from the event store (type NULL: every type). */
static size_t stream_tokens(const char *stream, const char *type, char ***out)
{
	char q[256];
	PGresult *r;
	size_t n;
	char **v;

	snprintf(q, sizeof(q),
		 "SELECT txid::text || '.' || position FROM events WHERE stream = '%s'%s%s%s"
		 " ORDER BY txid, position",
		 stream, type ? " AND type = '" : "", type ? type : "", type ? "'" : "");
	r = sql(db, q);
	n = (size_t)PQntuples(r);
	v = calloc(n + 1, sizeof(*v));
	for (size_t i = 0; i < n; i++)
		v[i] = strdup(PQgetvalue(r, (int)i, 0));
	PQclear(r);
	*out = v;
	return n;
}

/* The live read builds only the union of the streams' filters, which changes as streams
 * open and go: streams of different accounts and types, opened while writers run (so
 * while the live reader reads), each get all their events, once, in reader order. */
Test(feed, streams_opened_while_the_live_reader_reads_get_every_event_of_their_filter)
{
	static const char *const filters[3][2] = { { "w0", NULL },
						   { "w1", NULL },
						   { "w2", "FundsDeposited" } };
	struct writer w[3];
	struct sse st[3];
	struct seen s[3] = { { 0 } };
	struct sse_event ev;
	char head[64], qs[128], name[32];
	double end;
	int opened = 1;

	readable_head(head, sizeof(head));
	snprintf(qs, sizeof(qs), "stream=account-w0");
	sse_open(&st[0], qs, head, 0);
	writers_start(w, 3, 40, 0);
	end = harness_now() + 60;
	while (harness_now() < end) {
		bool more = false;
		for (int i = 0; i < opened; i++)
			while (sse_next(&st[i], &ev, 0.02)) {
				seen_add(&s[i], ev.id);
				free(ev.data);
				more = true;
			}
		/* The next stream once the first has seen some more of the flow. */
		if (opened < 3 && s[0].n >= (size_t)(8 * opened)) {
			snprintf(qs, sizeof(qs), "stream=account-%s%s%s", filters[opened][0],
				 filters[opened][1] ? "&type=" : "",
				 filters[opened][1] ? filters[opened][1] : "");
			sse_open(&st[opened], qs, head, 0);
			opened++;
		}
		if (!more && opened == 3 && s[0].n >= 41 && s[1].n >= 41 && s[2].n >= 40)
			break;
	}
	writers_join(w, 3);
	for (int i = 0; i < 3; i++)
		while (sse_next(&st[i], &ev, 0.3)) {
			seen_add(&s[i], ev.id);
			free(ev.data);
		}
	cr_assert_eq(opened, 3);
	for (int i = 0; i < 3; i++) {
		char **want;
		size_t n;
		snprintf(name, sizeof(name), "account-%s", filters[i][0]);
		n = stream_tokens(name, filters[i][1], &want);
		cr_assert_eq(s[i].n, n, "%s: saw %zu events, the log holds %zu", qs, s[i].n, n);
		for (size_t k = 0; k < n; k++)
			cr_assert_str_eq(s[i].v[k], want[k],
					 "%s, event %zu: saw %s, the log has %s", name, k,
					 s[i].v[k], want[k]);
		free_tokens(want, n);
		seen_free(&s[i]);
		sse_close(&st[i]);
	}
}

/* --- filters, paging, next_after ---------------------------------------------------- */

Test(feed, filters_page_and_next_after_moves_past_filtered_out_events)
{
	struct seen s = { 0 };
	char after[64], head[64], qs[256];
	struct response r;

	open_account("a");
	open_account("b");
	for (int i = 0; i < 5; i++) {
		deposit("a", 10 + i);
		deposit("b", 20 + i);
	}
	must_post("/accounts/a/withdrawals", "{\"amount\":1}", NULL, 0);
	must_post("/accounts/b/withdrawals", "{\"amount\":1}", NULL, 0);
	readable_head(head, sizeof(head));

	/* Deposits of a, two at a time. */
	snprintf(after, sizeof(after), "0.0");
	for (int i = 0; i < 3; i++) {
		snprintf(qs, sizeof(qs), "after=%s&limit=2&type=FundsDeposited&stream=account-a",
			 after);
		page(qs, &s, after, sizeof(after));
	}
	cr_assert_eq(s.n, 5);
	/* The last page was short: next_after is the head, past b's events and the withdrawals. */
	cr_assert_str_eq(after, head);
	seen_free(&s);

	/* A type list. */
	page("type=FundsWithdrawn,AccountOpened&limit=1000", &s, after, sizeof(after));
	cr_assert_eq(s.n, 4);
	cr_assert_str_eq(after, head);
	seen_free(&s);
	r = get("/events?type=FundsWithdrawn&limit=10");
	cr_assert_eq(json_array_size(json_object_get(r.json, "events")), 2);
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_array_get(json_object_get(r.json, "events"),
								0),
						 "stream")),
			 "account-a");
	response_free(&r);

	/* A full page ends at its last event, even when more would match. */
	page("limit=3", &s, after, sizeof(after));
	cr_assert_eq(s.n, 3);
	cr_assert_str_eq(after, s.v[2]);
	seen_free(&s);

	/* Past the end: empty, and next_after stays. */
	snprintf(qs, sizeof(qs), "after=%s", head);
	page(qs, &s, after, sizeof(after));
	cr_assert_eq(s.n, 0);
	cr_assert_str_eq(after, head);

	/* The event object. */
	r = get("/events?limit=1");
	{
		json_t *e = json_array_get(json_object_get(r.json, "events"), 0);
		cr_assert_str_eq(json_string_value(json_object_get(e, "stream")), "account-a");
		cr_assert_eq(json_integer_value(json_object_get(e, "version")), 1);
		cr_assert_str_eq(json_string_value(json_object_get(e, "type")), "AccountOpened");
		cr_assert_str_eq(json_string_value(
					 json_object_get(json_object_get(e, "data"), "account_id")),
				 "a");
		cr_assert(json_is_object(json_object_get(e, "metadata")));
		cr_assert(json_is_string(json_object_get(e, "recorded_at")));
	}
	response_free(&r);
}

/* --- the page's plan under the statistics that once made it read the rest of the log -- */

static void exec_ok(PGconn *c, const char *q)
{
	PGresult *r = PQexec(c, q);

	cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK,
		  "%s: %s", q, PQresultErrorMessage(r));
	PQclear(r);
}

/* Rows a plan read from events: every scan node on it (InitPlans and CTEs included),
 * its rows times its loops. */
static double rows_from_events(json_t *node)
{
	json_t *rel = json_object_get(node, "Relation Name"), *child;
	double n = 0;
	size_t i;

	if (json_is_string(rel) && strcmp(json_string_value(rel), "events") == 0)
		n += json_number_value(json_object_get(node, "Actual Rows")) *
		     json_number_value(json_object_get(node, "Actual Loops"));
	json_array_foreach (json_object_get(node, "Plans"), i, child)
		n += rows_from_events(child);
	return n;
}

Test(feed, a_page_inside_a_large_transaction_past_the_statistics_reads_only_its_limit)
{
	PGconn *c = harness_connect_as(db, NULL);
	char head[64], q[512], big[32];
	long long from;
	PGresult *r;
	static const char *const modes[] = { "force_custom_plan", "force_generic_plan" };

	/* What the benchmark's full run left: many small transactions, then one of 20,000
	 * events (an import, or its SQL seeding) that ANALYZE saw as the newest, then a
	 * few more. Under 30,000 rows ANALYZE reads them all, so the statistics are fixed. */
	exec_ok(c,
		"DO $$ BEGIN FOR i IN 1..300 LOOP"
		" INSERT INTO events (stream, version, type, data, metadata) VALUES"
		" ('account-s' || i, 1, 'AccountOpened', '{}', '{}'),"
		" ('account-s' || i, 2, 'FundsDeposited', '{}', '{}'); COMMIT; END LOOP; END $$");
	exec_ok(c, "INSERT INTO events (stream, version, type, data, metadata)"
		   " SELECT 'account-big' || s, v, CASE WHEN v = 1 THEN 'AccountOpened'"
		   " ELSE 'FundsDeposited' END, '{}', '{}'"
		   " FROM generate_series(0, 199) s, generate_series(1, 100) v ORDER BY s, v");
	exec_ok(c, "ANALYZE events");
	exec_ok(c, "DO $$ BEGIN FOR i IN 1..20 LOOP"
		   " INSERT INTO events (stream, version, type, data, metadata) VALUES"
		   " ('account-t' || i, 1, 'AccountOpened', '{}', '{}'); COMMIT; END LOOP; END $$");
	readable_head(head, sizeof(head));
	r = sql(db, "SELECT txid::text, min(position) + 1000 FROM events GROUP BY txid"
		    " ORDER BY count(*) DESC LIMIT 1");
	snprintf(big, sizeof(big), "%s", PQgetvalue(r, 0, 0));
	from = atoll(PQgetvalue(r, 0, 1));
	PQclear(r);

	/* The service's own statement. */
	exec_ok(c, "PREPARE page AS " FEED_SQL_PAGE);

	/* Whichever plan PostgreSQL takes for it, a page of 100 from the 1000th event of
	 * the large transaction reads 100 events (and the horizon's one), not the 19,000
	 * after it; with a type filter, the few more it skips (one AccountOpened in 100). */
	for (size_t k = 0; k < 2 * sizeof(modes) / sizeof(modes[0]); k++) {
		const char *mode = modes[k / 2];
		bool typed = k % 2;
		json_t *root, *plan;
		double read;
		snprintf(q, sizeof(q), "SET plan_cache_mode = %s", mode);
		exec_ok(c, q);
		snprintf(q, sizeof(q),
			 "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page('%s', %lld, 100, %s, NULL)",
			 big, from, typed ? "'{FundsDeposited}'" : "NULL");
		r = PQexec(c, q);
		cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
		root = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
		plan = json_object_get(json_array_get(root, 0), "Plan");
		cr_assert(plan, "EXPLAIN's JSON: %s", PQgetvalue(r, 0, 0));
		cr_assert_eq(json_number_value(json_object_get(plan, "Actual Rows")), 100,
			     "%s%s: the page has 100 events", mode, typed ? ", typed" : "");
		read = rows_from_events(plan);
		cr_assert(read <= (typed ? 111 : 101),
			  "%s%s: a page of 100 read %.0f rows of events:\n%s", mode,
			  typed ? ", typed" : "", read, PQgetvalue(r, 0, 0));
		json_decref(root);
		PQclear(r);
	}
	PQfinish(c);

	/* And through the API: the 100 events after that one, in order. */
	{
		struct seen s = { 0 };
		char after[64];
		snprintf(q, sizeof(q), "after=%s.%lld&limit=100", big, from);
		page(q, &s, after, sizeof(after));
		cr_assert_eq(s.n, 100);
		snprintf(q, sizeof(q), "%s.%lld", big, from + 1);
		cr_assert_str_eq(s.v[0], q);
		seen_free(&s);
	}
}

struct bg {
	pthread_t t;
	char path[256];
	struct response r;
	double took;
};

static void *bg_get(void *arg)
{
	struct bg *b = arg;
	double t0 = harness_now();

	b->r = get(b->path);
	b->took = harness_now() - t0;
	return NULL;
}

static void wait_for_waiting(double n)
{
	double end = harness_now() + 20;

	while (harness_metric(&query, "daybook_query_waiting_reads") < n && harness_now() < end)
		usleep(10000);
	cr_assert(harness_metric(&query, "daybook_query_waiting_reads") >= n,
		  "the long-poll never waited");
}

Test(feed, a_long_poll_answers_on_a_matching_commit_and_times_out_empty_otherwise)
{
	char head[64];
	struct bg b;
	json_t *events;

	open_account("a");
	readable_head(head, sizeof(head));
	/* A matching commit ends the wait (long before its 25 s). */
	snprintf(b.path, sizeof(b.path), "/events?after=%s&wait_ms=25000&type=FundsDeposited",
		 head);
	cr_assert_eq(pthread_create(&b.t, NULL, bg_get, &b), 0);
	wait_for_waiting(1);
	open_account("b"); /* filtered out */
	deposit("a", 5);
	pthread_join(b.t, NULL);
	cr_assert_eq(b.r.status, 200, "%s", b.r.body);
	events = json_object_get(b.r.json, "events");
	cr_assert_eq(json_array_size(events), 1, "%s", b.r.body);
	cr_assert_str_eq(json_string_value(json_object_get(json_array_get(events, 0), "type")),
			 "FundsDeposited");
	cr_assert(b.took < 25.0, "it answered at the commit, not at wait_ms");
	response_free(&b.r);

	/* Nothing that matches: empty after wait_ms, next_after past what was there. */
	readable_head(head, sizeof(head));
	snprintf(b.path, sizeof(b.path), "/events?after=0.0&wait_ms=300&type=AccountClosed");
	cr_assert_eq(pthread_create(&b.t, NULL, bg_get, &b), 0);
	pthread_join(b.t, NULL);
	cr_assert_eq(b.r.status, 200, "%s", b.r.body);
	cr_assert_eq(json_array_size(json_object_get(b.r.json, "events")), 0);
	cr_assert(b.took >= 0.3, "it waited");
	cr_assert_str_eq(json_string_value(json_object_get(b.r.json, "next_after")), head);
	response_free(&b.r);
}

/* --- many consumers and a slow one --------------------------------------------------- */

#define CONSUMERS 200

static void setup_small_buffer(void)
{
	const char *env[] = { "DAYBOOK_STREAM_BUFFER_MAX", "65536", "DAYBOOK_QUERY_WORKERS", "2",
			      NULL };

	setup_with(env);
}

Test(feed, a_slow_consumer_is_cut_off_and_two_hundred_others_get_every_event,
     .init = setup_small_buffer)
{
	struct sse *c = calloc(CONSUMERS, sizeof(*c)), slow;
	size_t *got = calloc(CONSUMERS, sizeof(*got));
	char big[200], body[300];
	struct sse_event ev;
	int rounds = 0, written = 0;
	double end;
	struct pollfd *pf = calloc(CONSUMERS, sizeof(*pf));

	open_account("a");
	open_account("b");
	/* The many follow a's deposits; the slow one everything, b's large deposits too. */
	for (int i = 0; i < CONSUMERS; i++) {
		sse_open(&c[i], "type=FundsDeposited&stream=account-a", NULL, 0);
		cr_assert_eq(c[i].status, 200);
	}
	sse_open(&slow, NULL, NULL, 4096);
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	snprintf(body, sizeof(body), "{\"amount\":1,\"reference\":\"%s\"}", big);
	/* Write until the slow one (which reads nothing) is cut off; the others read. */
	end = harness_now() + 120;
	while (harness_metric(&query, "daybook_query_feed_slow_disconnects_total") < 1 &&
	       harness_now() < end) {
		for (int i = 0; i < 50; i++)
			must_post("/accounts/b/deposits", body, NULL, 0);
		deposit("a", 1);
		written++;
		rounds++;
		for (int i = 0; i < CONSUMERS; i++) {
			sse_pump(&c[i]);
			while (sse_take(&c[i], &ev)) {
				free(ev.data);
				got[i]++;
			}
		}
	}
	cr_assert(harness_metric(&query, "daybook_query_feed_slow_disconnects_total") >= 1,
		  "the slow consumer was never cut off (%d events written)", written);
	/* Every other consumer gets every deposit. */
	end = harness_now() + 60;
	for (;;) {
		size_t done = 0;
		for (int i = 0; i < CONSUMERS; i++) {
			pf[i] = (struct pollfd){ c[i].fd, POLLIN, 0 };
			done += got[i] == (size_t)written;
		}
		if (done == CONSUMERS || harness_now() >= end)
			break;
		poll(pf, CONSUMERS, 100);
		for (int i = 0; i < CONSUMERS; i++) {
			if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			if (!sse_pump(&c[i])) {
				harness_print_log(&query);
				cr_assert_fail("consumer %d was disconnected", i);
			}
			while (sse_take(&c[i], &ev)) {
				free(ev.data);
				got[i]++;
			}
		}
	}
	for (int i = 0; i < CONSUMERS; i++)
		cr_assert_eq(got[i], (size_t)written, "consumer %d got %zu of %d", i, got[i],
			     written);
	/* One shared reader per worker: its reads do not multiply with the consumers. */
	cr_assert(harness_metric(&query, "daybook_query_feed_live_reads_total") <=
			  2 * (51 * rounds + 100),
		  "%g live reads for %d commits and %d consumers",
		  harness_metric(&query, "daybook_query_feed_live_reads_total"), 51 * rounds,
		  CONSUMERS);
	for (int i = 0; i < CONSUMERS; i++)
		sse_close(&c[i]);
	sse_close(&slow);
	free(c);
	free(got);
	free(pf);
}

/* --- the cap, bad input, write tokens ------------------------------------------------ */

static void setup_cap(void)
{
	const char *env[] = { "DAYBOOK_MAX_STREAMS", "2", NULL };

	setup_with(env);
}

Test(feed, streams_beyond_the_cap_get_503_with_retry_after, .init = setup_cap)
{
	struct sse a, b, c;
	char v[32];
	double end;

	sse_open(&a, NULL, NULL, 0);
	sse_open(&b, NULL, NULL, 0);
	cr_assert_eq(a.status, 200);
	cr_assert_eq(b.status, 200);
	sse_open(&c, NULL, NULL, 0);
	cr_assert_eq(c.status, 503);
	cr_assert(strstr(c.raw, "too_many_streams"), "%s", c.raw);
	sse_close(&c);
	{
		const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
		struct response r = http_request(query.port, "GET", "/events/stream", h, NULL, 10);
		cr_assert_eq(r.status, 503);
		cr_assert(response_header(&r, "Retry-After", v, sizeof(v)));
		response_free(&r);
	}
	/* A closed stream frees its place. */
	sse_close(&a);
	end = harness_now() + 20;
	for (;;) {
		sse_open(&c, NULL, NULL, 0);
		if (c.status == 200 || harness_now() > end)
			break;
		sse_close(&c);
		usleep(20000);
	}
	cr_assert_eq(c.status, 200);
	sse_close(&c);
	sse_close(&b);
}

static void setup_small_connection_cap(void)
{
	const char *env[] = { "DAYBOOK_MAX_CONNECTIONS", "8", NULL };

	setup_with(env);
}

/* A stream's connection gives its place under the connection cap back: streams that
 * came and went, many times the cap, never lock the service out. (They used to stay
 * counted after they closed: past DAYBOOK_MAX_CONNECTIONS streams in the service's
 * life, every new connection was refused.) */
Test(feed, streams_that_ended_never_use_up_the_connection_cap, .init = setup_small_connection_cap)
{
	struct sse s;
	struct response r;

	for (int i = 0; i < 40; i++) {
		sse_open(&s, NULL, NULL, 0);
		cr_assert_eq(s.status, 200, "stream %d: %s", i, s.raw);
		sse_close(&s);
	}
	r = http_request(query.port, "GET", "/healthz", NULL, NULL, 5);
	cr_assert_eq(r.status, 200, "the service refuses connections after 40 streams");
	response_free(&r);
	cr_assert(harness_wait_metric(&query, "daybook_http_connections_open", 1,
				      harness_now() + 10),
		  "%g connections counted open, only the metrics request is",
		  harness_metric(&query, "daybook_http_connections_open"));
}

/* The service runs with 256 descriptors and a cap of 100 connections: 256 - 2 * 64
 * (headroom) - 100 leaves room for 28 streams, not DAYBOOK_MAX_STREAMS' 1000. */
static void setup_few_descriptors(void)
{
	const char *env[] = { "DAYBOOK_MAX_CONNECTIONS", "100", NULL };
	struct rlimit rl, low;

	cr_assert(getrlimit(RLIMIT_NOFILE, &rl) == 0);
	low = (struct rlimit){ 256, rl.rlim_max };
	cr_assert(setrlimit(RLIMIT_NOFILE, &low) == 0);
	setup_with(env);
	cr_assert(setrlimit(RLIMIT_NOFILE, &rl) == 0);
}

/* Streams leave the connection cap when they start, but each holds a descriptor: the
 * stream cap shrinks to what the descriptor limit leaves after the connections, so a
 * reader opening streams cannot take the descriptors PostgreSQL and Redis need. */
Test(feed, the_stream_cap_fits_in_the_descriptor_limit, .init = setup_few_descriptors)
{
	enum { TRY = 40 };
	struct sse s[TRY];
	int open = 0, refused = 0;

	for (int i = 0; i < TRY; i++) {
		sse_open(&s[i], NULL, NULL, 0);
		if (s[i].status == 200)
			open++;
		else if (s[i].status == 503 && strstr(s[i].raw, "too_many_streams"))
			refused++;
	}
	cr_assert_eq(open, 28, "%d streams opened with room for 28", open);
	cr_assert_eq(refused, TRY - 28);
	cr_assert(harness_log_says(&query, "at most 28 event streams"));
	for (int i = 0; i < TRY; i++)
		sse_close(&s[i]);
	{
		struct response r = http_request(query.port, "GET", "/healthz", NULL, NULL, 5);
		cr_assert_eq(r.status, 200);
		response_free(&r);
	}
}

/* HEAD is served by the GET route, but evhttp sends no body for HEAD: a stream opened
 * for it would never send, drain or end, and would keep its place under the cap (and
 * a page of events in memory) for as long as the client stays. HEAD gets the stream's
 * headers and an empty body, and takes no place. */
Test(feed, a_head_request_for_the_stream_is_answered_and_takes_no_place, .init = setup_cap)
{
	char req[512], buf[2048];
	struct sse a, b;
	ssize_t n = 0, got;
	double end = harness_now() + 10;
	int fds[2];

	for (int i = 0; i < 2; i++) {
		fds[i] = connect_to(query.port, 0);
		snprintf(req, sizeof(req),
			 "HEAD /events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
			 "%s\r\nAccept: text/event-stream\r\n\r\n",
			 TOKEN_READ);
		cr_assert_eq(send(fds[i], req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
		n = 0;
		while (harness_now() < end && !(n > 0 && memmem(buf, (size_t)n, "\r\n\r\n", 4))) {
			struct pollfd p = { fds[i], POLLIN, 0 };
			if (poll(&p, 1, 100) > 0) {
				got = recv(fds[i], buf + n, sizeof(buf) - 1 - (size_t)n, 0);
				if (got <= 0)
					break;
				n += got;
			}
		}
		buf[n > 0 ? n : 0] = '\0';
		cr_assert(strncmp(buf, "HTTP/1.1 200", 12) == 0, "HEAD: %s", buf);
	}
	/* Both HEAD connections are still open: the cap of 2 must still have room. */
	sse_open(&a, NULL, NULL, 0);
	sse_open(&b, NULL, NULL, 0);
	cr_expect_eq(a.status, 200, "%s", a.raw);
	cr_expect_eq(b.status, 200, "%s", b.raw);
	sse_close(&a);
	sse_close(&b);
	close(fds[0]);
	close(fds[1]);
}

Test(feed, malformed_parameters_are_400_naming_them)
{
	static const char *const cases[][2] = {
		{ "/events?after=abc", "'after'" },
		{ "/events?after=1.", "'after'" },
		{ "/events?after=1.99999999999999999999", "'after'" },
		{ "/events?after=1.9223372036854775808", "'after'" },
		{ "/events?limit=0", "'limit'" },
		{ "/events?limit=1001", "'limit'" },
		{ "/events?limit=ten", "'limit'" },
		{ "/events?wait_ms=30001", "'wait_ms'" },
		{ "/events?wait_ms=-1", "'wait_ms'" },
		{ "/events?type=Nope", "'type'" },
		{ "/events?type=", "'type'" },
		{ "/events?type=FundsDeposited,", "'type'" },
		{ "/events?stream=nodash", "'stream'" },
		{ "/events?stream=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
		  "'stream'" },
		{ "/events/stream?after=x", "'after'" },
		{ "/events/stream?type=fundsdeposited", "'type'" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct response r = get(cases[i][0]);
		cr_assert_eq(r.status, 400, "%s: %d", cases[i][0], r.status);
		cr_assert_str_eq(json_string_value(json_object_get(r.json, "code")),
				 "invalid_request");
		cr_assert(strstr(json_string_value(json_object_get(r.json, "detail")), cases[i][1]),
			  "%s: %s", cases[i][0], r.body);
		response_free(&r);
	}
	{
		const char *h[] = { "Authorization: Bearer " TOKEN_READ, "Last-Event-ID: 12",
				    NULL };
		struct response r = http_request(query.port, "GET", "/events/stream", h, NULL, 10);
		cr_assert_eq(r.status, 400);
		cr_assert(strstr(r.body, "Last-Event-ID"), "%s", r.body);
		response_free(&r);
	}
	{
		struct response r = http_request(query.port, "GET", "/events", NULL, NULL, 10);
		cr_assert_eq(r.status, 401);
		response_free(&r);
	}
}

Test(feed, tokens_from_the_write_api_are_accepted_as_after_and_min_position)
{
	char first[64], second[64], path[256], qs[128], next[64];
	struct seen s = { 0 };
	struct response r;

	harness_start_projector(&projector, db, redis_url);
	open_account("a");
	deposit("a", 1);
	must_post("/accounts/a/deposits", "{\"amount\":2}", first, sizeof(first));
	must_post("/accounts/a/withdrawals", "{\"amount\":3}", second, sizeof(second));
	/* after=<the deposit's token>: exactly the withdrawal (long-polled: other tests'
	 * transactions in the shared cluster may hold the readable horizon back a moment). */
	snprintf(qs, sizeof(qs), "after=%s&wait_ms=10000", first);
	page(qs, &s, next, sizeof(next));
	cr_assert_eq(s.n, 1);
	cr_assert_str_eq(s.v[0], second);
	cr_assert_str_eq(next, second);
	seen_free(&s);
	/* The feed's positions are the write API's tokens: min_position takes them. */
	snprintf(path, sizeof(path), "/accounts/a?min_position=%s&wait_ms=10000", second);
	r = get(path);
	cr_assert_eq(r.status, 200, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 0);
	response_free(&r);
	/* And so does Last-Event-ID. */
	{
		struct sse st;
		struct sse_event ev;
		sse_open(&st, NULL, first, 0);
		cr_assert_eq(st.status, 200);
		cr_assert(sse_next(&st, &ev, 20));
		cr_assert_str_eq(ev.id, second);
		cr_assert_str_eq(ev.type, "FundsWithdrawn");
		free(ev.data);
		sse_close(&st);
	}
}

/* --- the example consumer ------------------------------------------------------------- */

static pid_t follower_start(const char *posfile, const char *out)
{
	const char *bin = getenv("DAYBOOK_FEED_FOLLOWER_BIN");
	char url[128];
	pid_t pid;

	cr_assert(bin, "DAYBOOK_FEED_FOLLOWER_BIN is not set");
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/events/stream", query.port);
	pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		int fd = open(out, O_WRONLY | O_CREAT | O_APPEND, 0644);
		dup2(fd, 1);
		setenv("DAYBOOK_TOKEN", TOKEN_READ, 1);
		execl(bin, bin, url, posfile, (char *)NULL);
		_exit(127);
	}
	return pid;
}

/* The ids the follower printed, in order (the first word of each line). */
static size_t printed(const char *out, struct seen *s)
{
	FILE *f = fopen(out, "r"); /* the follower's standard output */
	char line[4096];

	for (size_t i = 0; i < s->n; i++)
		free(s->v[i]);
	s->n = 0;
	while (f && fgets(line, sizeof(line), f)) {
		char *sp = strchr(line, ' ');
		if (!sp || !strchr(line, '\n'))
			continue;
		*sp = '\0';
		seen_add(s, line);
	}
	if (f)
		fclose(f);
	return s->n;
}

static void wait_printed(const char *out, struct seen *s, size_t n)
{
	double end = harness_now() + 60;

	while (printed(out, s) < n && harness_now() < end)
		usleep(20000);
	cr_assert_geq(s->n, n, "the follower printed %zu of %zu", s->n, n);
}

/* Until the last line printed is the event `last`. */
static void wait_printed_through(const char *out, struct seen *s, const char *last)
{
	double end = harness_now() + 60;

	while (harness_now() < end && (printed(out, s) == 0 || strcmp(s->v[s->n - 1], last) != 0))
		usleep(20000);
	cr_assert(s->n > 0 && strcmp(s->v[s->n - 1], last) == 0,
		  "the follower did not print through %s", last);
}

Test(feed, the_example_follower_resumes_after_sigkill_with_no_gap_and_in_order)
{
	char dir[] = "/tmp/daybook-follower-XXXXXX", posfile[128], out[128];
	struct seen s = { 0 };
	char **log;
	size_t n, j = 0, repeats = 0;
	struct writer w[1];
	pid_t pid;
	int status;

	cr_assert(mkdtemp(dir));
	snprintf(posfile, sizeof(posfile), "%s/position", dir);
	snprintf(out, sizeof(out), "%s/out", dir);
	open_account("a");
	for (int i = 0; i < 30; i++)
		deposit("a", i + 1);
	pid = follower_start(posfile, out);
	writers_start(w, 1, 100, 0); /* events keep coming while it is killed */
	wait_printed(out, &s, 40);
	kill(pid, SIGKILL); /* mid-stream */
	waitpid(pid, &status, 0);
	pid = follower_start(posfile, out);
	writers_join(w, 1);
	n = log_tokens(&log);
	wait_printed_through(out, &s, log[n - 1]);
	/* And it follows live, too. */
	deposit("a", 1000);
	free_tokens(log, n);
	n = log_tokens(&log);
	wait_printed_through(out, &s, log[n - 1]);
	kill(pid, SIGTERM);
	waitpid(pid, &status, 0);
	/* Every event, in order; a repeat only where it restarted (printed, not saved). */
	for (size_t i = 0; i < s.n; i++) {
		if (j > 0 && strcmp(s.v[i], log[j - 1]) == 0) {
			repeats++;
			continue;
		}
		cr_assert(j < n, "printed more than the log holds");
		cr_assert_str_eq(s.v[i], log[j], "line %zu: %s, expected %s", i, s.v[i], log[j]);
		j++;
	}
	cr_assert_eq(j, n, "printed %zu distinct events of %zu", j, n);
	cr_assert_leq(repeats, 1, "at most the one event in flight at the kill repeats");
	free_tokens(log, n);
	seen_free(&s);
	unlink(posfile);
	unlink(out);
	rmdir(dir);
}
