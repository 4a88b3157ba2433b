/* daybook-query's event feed: pages of the whole log in reader order (GET /events,
 * with long-poll) and Server-Sent Events (GET /events/stream) fed by one live reader
 * per worker, on a PostgreSQL connection of the feed's own.
 *
 * Reader order is the projector's: (txid, position), reading only below
 * pg_snapshot_xmin(pg_current_snapshot()), so that a transaction that commits late is
 * never skipped and nothing is read twice. Each page's statement also reads the
 * readable horizon (the last event below that xmin) in the same snapshot: a page
 * shorter than its limit has read everything up to the horizon, so next_after may
 * move there even when the filters dropped every event on the way.
 *
 * Streams: a new stream first catches up by itself, a page at a time, each page sent
 * only once the previous one has left the process. Once it has reached the live
 * reader's position it is live: one read per wake-up serves every live stream, each
 * getting the events past its own position that pass its filters. The read walks every
 * event but has PostgreSQL build the JSON only of those that pass the union of the
 * streams' filters; each frame is rendered once, and a stream's frames of one read
 * leave in one writev on that turn when none of its output waits. A live stream whose
 * unsent output passes the bound is cut off; it resumes by Last-Event-ID.
 *
 * The live reader's wake-up is NOTIFY daybook_events on the feed's own connection,
 * which LISTENs while any stream of the worker is live: the read starts on the
 * connection that runs it, with no checkpoint probe in between, and a notification
 * that arrives while a read is in flight asks for one more read right after it (a
 * commit during a read is never left for the next one). The read jumps the queue
 * into a short run (LIVE_BATCH), so it never waits behind a long run of other
 * consumers' pages, and those still move with every run. A timer
 * (DAYBOOK_WAIT_PROBE_MS) reads anyway when nothing woke it: events appended without
 * NOTIFY, or made readable when a transaction without events ended. */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include "clock.h"
#include "feed.h"
#include "query.h"

#define PAGE_MAX 1000
#define RUN_BATCH 64    /* pages in one pipelined run */
#define LIVE_BATCH 4    /* at most, in a run that carries the live read */
#define QUEUE_MAX 20000 /* queued long-polls beyond this get 503 */
#define RUN_TIMEOUT 10.0
#define RETRY_SECONDS 0.5 /* a failed live or catch-up read is tried again after this */
#define WAIT_MS_MAX 30000
#define EVENTS_CHANNEL "daybook_events" /* the event store's NOTIFY on append */
#define LIVE_NAMES_MAX 64 /* distinct stream names the live read filters on, at most */

static const struct pg_statement statements[] = {
	{ "feed_page", FEED_SQL_PAGE },
	{ "feed_live", FEED_SQL_LIVE },
};

static const char *const type_names[] = {
	"AccountOpened", "FundsDeposited",   "FundsWithdrawn",
	"TransferSent",  "TransferReceived", "AccountClosed",
};
#define NTYPES (sizeof(type_names) / sizeof(type_names[0]))
#define STREAM_NAME_MAX 80

struct filter {
	unsigned types;               /* bit i: type_names[i]; 0: every type */
	char stream[STREAM_NAME_MAX]; /* "" for every stream */
};

enum page_kind {
	PAGE_POLL,    /* GET /events */
	PAGE_LIVE,    /* the live reader */
	PAGE_CATCHUP, /* a stream behind the live reader */
	PAGE_LISTEN,  /* not a page: LISTEN or UNLISTEN for the live reader */
};

struct stream;

struct page {
	struct page *next; /* in the queue or the run in flight */
	struct feed *feed;
	enum page_kind kind;
	struct readmodel_position after;
	int limit;
	struct filter filter;
	uint64_t wait_seq;        /* waitset_seq when the page was queued */
	struct waiter wait;       /* POLL */
	struct http_request *req; /* POLL */
	double deadline;          /* POLL */
	int attempts;             /* POLL */
	struct stream *stream;    /* CATCHUP */
	bool listen;              /* LISTEN: LISTEN (true) or UNLISTEN */
};

struct stream {
	struct stream *prev, *next; /* in feed->streams */
	struct feed *feed;
	struct evhttp_request *ev; /* NULL once the connection is gone */
	struct evbuffer *out;      /* frames of the batch being delivered */
	struct filter filter;
	struct readmodel_position pos; /* everything up to here is sent (or filtered out) */
	bool live;
	bool busy;     /* its catch-up page is queued or in flight */
	bool draining; /* waits for its output to leave before the next catch-up page */
	bool chunked;  /* HTTP/1.1: every write is a chunk */
	uint64_t seq;  /* the feed's stream_seq when it opened */
	struct page catchup;
};

struct feed {
	struct query_ctx *ctx;
	struct pg *pg;
	struct page *head, *tail; /* queued, not yet sent */
	size_t queued;
	struct page *batch; /* the run in flight */
	struct stream *streams;
	size_t nstreams;
	size_t nlive;
	struct readmodel_position at; /* the live reader has read up to here */
	struct page live;
	bool live_busy;  /* its read is queued or in flight */
	bool live_again; /* notified during that read: read once more right after it */
	/* The live read renders the events of the union of the streams' filters: types (0:
	 * every type) and a text[] of stream names (NULL: every stream), rebuilt when a
	 * stream opens or goes. A read covers the streams opened up to live_covers. */
	uint64_t stream_seq;
	uint64_t live_covers;
	unsigned live_types;
	char *live_names;
	bool live_filter_stale;
	char *frames; /* the live read's frames, each rendered once */
	size_t frames_cap;
	size_t *frame_at; /* frame i: frames[frame_at[i] .. frame_at[i + 1]] */
	size_t frame_at_cap;
	struct iovec *iov; /* one stream's frames as one write */
	size_t iov_cap;
	struct page listen;
	bool listening;   /* this connection LISTENs (the last LISTEN or UNLISTEN) */
	bool listen_busy; /* a LISTEN or UNLISTEN is queued or in flight */
	struct event *keepalive, *retry, *live_timer;
	bool stopping;
	struct metric *m_streams, *m_slow, *m_live_reads, *m_notified, *m_pages, *m_catchup;
	struct metric *m_rendered, *m_written, *m_queued;
};

static void kick(struct feed *feed);
static void live_start(struct feed *feed);
static void listen_sync(struct feed *feed);
static void stream_catchup(struct stream *s);
static void stream_gone(struct stream *s);
static void page_failed(struct page *page, const char *why, bool retry);

/* --- parameters ----------------------------------------------------------------- */

/* A token that the statement can take: the position is a bigint. */
static bool parse_token(const char *text, struct readmodel_position *out)
{
	return readmodel_position_parse(text, out) && out->position <= (uint64_t)INT64_MAX;
}

static bool parse_types(const char *text, unsigned *out)
{
	const char *p = text;

	*out = 0;
	for (;;) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);
		size_t i;
		for (i = 0; i < NTYPES; i++)
			if (strlen(type_names[i]) == len && memcmp(type_names[i], p, len) == 0)
				break;
		if (i == NTYPES)
			return false;
		*out |= 1u << i;
		if (!comma)
			return true;
		p = comma + 1;
	}
}

/* A stream name as the event store allows it: ^[a-z]+-[A-Za-z0-9._:-]{1,64}$. */
static bool valid_stream(const char *s)
{
	size_t i = 0, n;

	if (strlen(s) >= STREAM_NAME_MAX)
		return false;
	while (s[i] >= 'a' && s[i] <= 'z')
		i++;
	if (i == 0 || s[i] != '-')
		return false;
	n = strlen(s + i + 1);
	return n >= 1 && n <= 64 && ledger_valid_id(s + i + 1);
}

static bool int_param(struct http_request *req, const char *name, long min, long max, int *out)
{
	const char *v = http_query(req, name);
	long n = 0;
	size_t i = 0;

	if (!v)
		return true;
	for (; v[i] >= '0' && v[i] <= '9' && i < 10; i++)
		n = n * 10 + (v[i] - '0');
	if (i > 0 && v[i] == '\0' && n >= min && n <= max) {
		*out = (int)n;
		return true;
	}
	http_reply_problem(req, 400, "invalid_request", "Invalid request",
			   "query parameter '%s' must be an integer from %ld to %ld", name, min,
			   max);
	return false;
}

/* after (or, for streams, Last-Event-ID, which wins), type and stream; false after
 * replying 400. */
static bool feed_params(struct http_request *req, bool sse, struct readmodel_position *after,
			struct filter *f)
{
	const char *last = sse ? http_header(req, "Last-Event-ID") : NULL;
	const char *a = last && *last ? last : http_query(req, "after");
	const char *types = http_query(req, "type");
	const char *stream = http_query(req, "stream");

	*after = (struct readmodel_position){ 0, 0 };
	memset(f, 0, sizeof(*f));
	if (a && !parse_token(a, after)) {
		http_reply_problem(req, 400, "invalid_request", "Invalid request",
				   "%s must be a position token \"<txid>.<position>\" as returned by a "
				   "write or the feed",
				   a == last ? "header 'Last-Event-ID'"
					     : "query parameter 'after'");
		return false;
	}
	if (types && !parse_types(types, &f->types)) {
		http_reply_problem(req, 400, "invalid_request", "Invalid request",
				   "query parameter 'type' must be a comma list of event types "
				   "(AccountOpened, FundsDeposited, FundsWithdrawn, TransferSent, "
				   "TransferReceived, AccountClosed)");
		return false;
	}
	if (stream && !valid_stream(stream)) {
		http_reply_problem(req, 400, "invalid_request", "Invalid request",
				   "query parameter 'stream' must be a stream name such as "
				   "account-<id>");
		return false;
	}
	if (stream)
		snprintf(f->stream, sizeof(f->stream), "%s", stream);
	return true;
}

static bool matches(const struct filter *f, const char *type, const char *stream)
{
	if (f->types) {
		size_t i;
		for (i = 0; i < NTYPES; i++)
			if ((f->types & (1u << i)) && strcmp(type_names[i], type) == 0)
				break;
		if (i == NTYPES)
			return false;
	}
	return !f->stream[0] || strcmp(f->stream, stream) == 0;
}

/* --- the connection and its queue ---------------------------------------------- */

static void submit(struct feed *feed, struct page *page)
{
	page->next = NULL;
	page->wait_seq = waitset_seq(feed->ctx->waits);
	if (page->kind == PAGE_LIVE) {
		/* First in line: the streams' latency is this read's. */
		page->next = feed->head;
		feed->head = page;
		if (!feed->tail)
			feed->tail = page;
	} else if (feed->tail) {
		feed->tail->next = page;
		feed->tail = page;
	} else {
		feed->head = feed->tail = page;
	}
	feed->queued++;
	kick(feed);
}

static void types_literal(unsigned types, char *buf, size_t len)
{
	size_t at = 0;

	buf[at++] = '{';
	for (size_t i = 0; i < NTYPES; i++)
		if (types & (1u << i))
			at += (size_t)snprintf(buf + at, len - at, "%s%s", at > 1 ? "," : "",
					       type_names[i]);
	snprintf(buf + at, len - at, "}");
}

static int name_cmp(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The union of the filters of the worker's streams (live or catching up: one that goes
 * live while the read is in flight is covered), for the live read. Every type or every
 * stream when any stream takes them all, when there are more than LIVE_NAMES_MAX names,
 * or when memory runs out: the read is then as wide as it was before filters. */
static void live_filter_update(struct feed *feed)
{
	const char **names = NULL;
	size_t n = 0, distinct = 0, len = 3;
	bool every_type = false, every_stream = false;
	char *lit, *at;

	if (!feed->live_filter_stale)
		return;
	feed->live_filter_stale = false;
	free(feed->live_names);
	feed->live_names = NULL;
	feed->live_types = 0;
	if (feed->nstreams == 0)
		return;
	names = malloc(feed->nstreams * sizeof(*names));
	if (!names)
		every_stream = true;
	for (struct stream *s = feed->streams; s; s = s->next) {
		every_type |= s->filter.types == 0;
		feed->live_types |= s->filter.types;
		if (!s->filter.stream[0])
			every_stream = true;
		else if (names)
			names[n++] = s->filter.stream;
	}
	if (every_type)
		feed->live_types = 0;
	if (every_stream) {
		free(names);
		return;
	}
	qsort(names, n, sizeof(*names), name_cmp);
	for (size_t i = 0; i < n; i++)
		if (i == 0 || strcmp(names[i], names[i - 1]) != 0) {
			distinct++;
			len += strlen(names[i]) + 3;
		}
	if (distinct <= LIVE_NAMES_MAX && (lit = malloc(len))) {
		/* {"a","b"}: names have no quote, comma or brace (valid_stream). */
		at = lit;
		*at++ = '{';
		for (size_t i = 0; i < n; i++)
			if (i == 0 || strcmp(names[i], names[i - 1]) != 0)
				at += sprintf(at, "%s\"%s\"", at > lit + 1 ? "," : "", names[i]);
		strcpy(at, "}");
		feed->live_names = lit;
	}
	free(names);
}

static bool queue_page(struct feed *feed, const struct page *page)
{
	char txid[24], pos[24], limit[16], types[128];
	const char *values[5] = { txid, pos, limit, NULL, NULL };

	if (page->kind == PAGE_LISTEN)
		return pg_queue_sql(feed->pg,
				    page->listen ? "LISTEN " EVENTS_CHANNEL
						 : "UNLISTEN " EVENTS_CHANNEL,
				    0, NULL);
	snprintf(txid, sizeof(txid), "%llu", (unsigned long long)page->after.txid);
	snprintf(pos, sizeof(pos), "%llu", (unsigned long long)page->after.position);
	snprintf(limit, sizeof(limit), "%d", page->limit);
	if (page->kind == PAGE_LIVE) {
		/* Filtered at the time it is sent: every stream open by now is covered. */
		live_filter_update(feed);
		feed->live_covers = feed->stream_seq;
		if (feed->live_types) {
			types_literal(feed->live_types, types, sizeof(types));
			values[3] = types;
		}
		values[4] = feed->live_names;
		return pg_queue(feed->pg, "feed_live", 5, values);
	}
	if (page->filter.types) {
		types_literal(page->filter.types, types, sizeof(types));
		values[3] = types;
	}
	if (page->filter.stream[0])
		values[4] = page->filter.stream;
	return pg_queue(feed->pg, "feed_page", 5, values);
}

static void on_run_done(void *arg, const struct pg_outcome *out);

static void kick(struct feed *feed)
{
	struct page *first = feed->head, *last = NULL, *p;
	size_t n = 0, max;

	if (feed->batch || !first || !pg_ready(feed->pg))
		return;
	/* A run's results all arrive at its end: the live read goes first in a short
	 * one. Not alone: the pages behind it move with every run, however often
	 * notifications come. */
	max = first->kind == PAGE_LIVE ? LIVE_BATCH : RUN_BATCH;
	for (p = first; p && n < max; last = p, p = p->next, n++)
		if (!queue_page(feed, p))
			return; /* the connection is being reset; the pages stay queued */
	last->next = NULL;
	feed->head = p;
	if (!p)
		feed->tail = NULL;
	feed->queued -= n;
	feed->batch = first;
	if (!pg_run(feed->pg, on_run_done, feed) && feed->batch) {
		/* Nothing was sent: put them back in front. */
		last->next = feed->head;
		feed->head = first;
		if (!feed->tail)
			feed->tail = last;
		feed->queued += n;
		feed->batch = NULL;
	}
}

/* --- results ---------------------------------------------------------------------- */

struct rows {
	const PGresult *res;
	int n;                             /* events */
	struct readmodel_position horizon; /* the last readable event */
};

static uint64_t u64(const PGresult *res, int row, int col)
{
	return strtoull(PQgetvalue(res, row, col), NULL, 10);
}

static struct readmodel_position row_position(const PGresult *res, int row)
{
	return (struct readmodel_position){ u64(res, row, 2), u64(res, row, 3) };
}

static bool read_rows(const PGresult *res, struct rows *r)
{
	if (PQntuples(res) < 1 || PQnfields(res) != 7)
		return false;
	r->res = res;
	r->horizon = (struct readmodel_position){ u64(res, 0, 0), u64(res, 0, 1) };
	r->n = PQgetisnull(res, 0, 2) ? 0 : PQntuples(res);
	return true;
}

/* Where the next page starts: after the last event of a full page; otherwise
 * everything up to the horizon has been read (and never before `after`). */
static struct readmodel_position next_after(const struct page *page, const struct rows *r)
{
	if (r->n > 0 && r->n >= page->limit)
		return row_position(r->res, r->n - 1);
	return readmodel_position_cmp(&r->horizon, &page->after) > 0 ? r->horizon : page->after;
}

static void token(const struct readmodel_position *p, char *buf, size_t len)
{
	snprintf(buf, len, "%llu.%llu", (unsigned long long)p->txid,
		 (unsigned long long)p->position);
}

/* --- GET /events ---------------------------------------------------------------- */

static void poll_free(struct page *page)
{
	waitset_done(page->feed->ctx->waits, &page->wait);
	free(page);
}

static void poll_reply(struct page *page, const struct rows *r,
		       const struct readmodel_position *next)
{
	static const char head[] = "{\"events\":[", mid[] = "],\"next_after\":\"", tail[] = "\"}";
	char after[QUERY_POSITION_MAX];
	size_t len = sizeof(head) + sizeof(mid) + sizeof(tail) + sizeof(after), at = 0;
	char *body;

	token(next, after, sizeof(after));
	for (int i = 0; r && i < r->n; i++)
		len += (size_t)PQgetlength(r->res, i, 6) + 1;
	if (!(body = malloc(len))) {
		http_reply_problem(page->req, 503, "unavailable", "Service unavailable",
				   "out of memory");
		poll_free(page);
		return;
	}
	memcpy(body, head, sizeof(head) - 1);
	at = sizeof(head) - 1;
	for (int i = 0; r && i < r->n; i++) {
		size_t n = (size_t)PQgetlength(r->res, i, 6);
		if (i)
			body[at++] = ',';
		memcpy(body + at, PQgetvalue(r->res, i, 6), n);
		at += n;
	}
	at += (size_t)snprintf(body + at, len - at, "%s%s%s", mid, after, tail);
	http_set_header(page->req, "X-Daybook-Position", after);
	http_reply_raw(page->req, 200, "application/json", body, at);
	free(body);
	poll_free(page);
}

static void poll_wake(struct waiter *w, bool expired)
{
	struct page *page = (struct page *)(void *)((char *)w - offsetof(struct page, wait));

	if (expired || page->feed->stopping)
		poll_reply(page, NULL, &page->after);
	else
		submit(page->feed, page);
}

static void poll_done(struct page *page, const struct rows *r)
{
	struct feed *feed = page->feed;
	struct readmodel_position next = next_after(page, r);

	if (r->n > 0 || mono_now() >= page->deadline || feed->stopping) {
		poll_reply(page, r, &next);
		return;
	}
	/* Nothing yet: wait for the log to pass what was read. */
	page->after = next;
	page->wait.min = (struct readmodel_position){ next.txid, next.position + 1 };
	page->wait.deadline = page->deadline;
	page->wait.model = WAIT_LOG;
	page->wait.wake = poll_wake;
	switch (waitset_add(feed->ctx->waits, &page->wait, page->wait_seq)) {
	case WAIT_ADDED:
		break;
	case WAIT_AGAIN:
		submit(feed, page);
		break;
	case WAIT_FULL:
		http_set_header(page->req, "Retry-After", "1");
		http_reply_problem(page->req, 503, "too_many_waiters", "Too many waiting reads",
				   "%zu reads already wait; retry later", feed->ctx->max_waiters);
		poll_free(page);
		break;
	}
}

static void poll_failed(struct page *page, const char *why, bool retry)
{
	struct feed *feed = page->feed;

	if (retry && ++page->attempts < 3 && pg_connected(feed->pg)) {
		submit(feed, page);
		return;
	}
	log_warn(&feed->ctx->log, "feed read failed: %s", why);
	http_reply_problem(page->req, retry ? 503 : 500, retry ? "unavailable" : "internal",
			   retry ? "Service unavailable" : "Internal error",
			   "the event store cannot be read: %s", retry ? why : "the read failed");
	poll_free(page);
}

void feed_get_events(struct http_request *req, void *arg)
{
	struct query_ctx *ctx = arg;
	struct feed *feed = ctx->feed;
	struct page *page;
	int limit = 100, wait_ms = 0;
	struct readmodel_position after;
	struct filter f;

	if (!feed_params(req, false, &after, &f) || !int_param(req, "limit", 1, PAGE_MAX, &limit) ||
	    !int_param(req, "wait_ms", 0, WAIT_MS_MAX, &wait_ms))
		return;
	if (!pg_connected(feed->pg) || feed->queued >= QUEUE_MAX) {
		http_reply_problem(req, 503, "unavailable", "Service unavailable",
				   "the event store cannot be reached: %s",
				   pg_last_error(feed->pg));
		return;
	}
	if (!(page = calloc(1, sizeof(*page)))) {
		http_reply_problem(req, 503, "unavailable", "Service unavailable", "out of memory");
		return;
	}
	*page = (struct page){ .feed = feed,
			       .kind = PAGE_POLL,
			       .after = after,
			       .limit = limit,
			       .filter = f,
			       .req = req,
			       .deadline = mono_now() + wait_ms / 1e3 };
	metric_add(feed->m_pages, 1);
	submit(feed, page);
}

/* --- streams -------------------------------------------------------------------- */

static struct bufferevent *stream_bev(const struct stream *s)
{
	return evhttp_connection_get_bufferevent(evhttp_request_get_connection(s->ev));
}

static size_t unsent(const struct stream *s)
{
	return evbuffer_get_length(bufferevent_get_output(stream_bev(s)));
}

static void stream_free(struct stream *s)
{
	if (s->out)
		evbuffer_free(s->out);
	free(s);
}

/* The connection is gone (closed by the peer, cut off, or shut down): leave the
 * feed; the memory goes once no page of its own is in flight. */
static void stream_gone(struct stream *s)
{
	struct feed *feed = s->feed;

	if (!s->ev)
		return;
	s->ev = NULL;
	if (s->live)
		feed->nlive--;
	s->live = false;
	if (s->prev)
		s->prev->next = s->next;
	else
		feed->streams = s->next;
	if (s->next)
		s->next->prev = s->prev;
	feed->nstreams--;
	feed->live_filter_stale = true;
	atomic_fetch_sub(feed->ctx->streams, 1);
	metric_add(feed->m_streams, -1);
	if (!s->busy)
		stream_free(s);
	listen_sync(feed);
}

static void on_stream_close(struct evhttp_connection *evcon, void *arg)
{
	(void)evcon;
	stream_gone(arg);
}

/* Drop the connection now (too slow, or shutting down); s may be freed. */
static void stream_cut(struct stream *s)
{
	struct evhttp_connection *evcon = evhttp_request_get_connection(s->ev);

	evhttp_connection_set_closecb(evcon, NULL, NULL);
	stream_gone(s);
	evhttp_connection_free(evcon);
}

/* Send the batch's frames (s->out); false when the stream was cut off for being
 * too slow (s may be freed then): when what it was sent before is still unsent
 * beyond the bound. (Not counting this batch: one large batch after a pause is not
 * the consumer's fault; failing to take the last one in time is.) */
static bool stream_flush(struct stream *s, void (*drained)(struct evhttp_connection *, void *))
{
	struct feed *feed = s->feed;
	size_t backlog = unsent(s);

	if (backlog > feed->ctx->stream_buffer_max) {
		log_info(&feed->ctx->log,
			 "a stream is too slow (%zu bytes unsent): disconnected at "
			 "%llu.%llu",
			 backlog, (unsigned long long)s->pos.txid,
			 (unsigned long long)s->pos.position);
		metric_add(feed->m_slow, 1);
		stream_cut(s);
		return false;
	}
	if (evbuffer_get_length(s->out) == 0 && !drained)
		return true;
	evhttp_send_reply_chunk_with_cb(s->ev, s->out, drained, drained ? s : NULL);
	return true;
}

static void add_frame(struct evbuffer *out, const PGresult *res, int row)
{
	evbuffer_add_printf(out, "id: %s.%s\nevent: %s\ndata: ", PQgetvalue(res, row, 2),
			    PQgetvalue(res, row, 3), PQgetvalue(res, row, 4));
	evbuffer_add(out, PQgetvalue(res, row, 6), (size_t)PQgetlength(res, row, 6));
	evbuffer_add(out, "\n\n", 2);
}

static void stream_live(struct stream *s)
{
	struct feed *feed = s->feed;

	s->live = true;
	feed->nlive++;
	listen_sync(feed);
	live_start(feed);
}

static void on_drained(struct evhttp_connection *evcon, void *arg)
{
	struct stream *s = arg;

	(void)evcon;
	if (!s->draining)
		return;
	s->draining = false;
	stream_catchup(s);
}

static void catchup_done(struct stream *s, const struct rows *r)
{
	struct feed *feed = s->feed;
	bool full = r->n >= s->catchup.limit;

	s->busy = false;
	if (!s->ev) {
		stream_free(s);
		return;
	}
	for (int i = 0; i < r->n; i++)
		add_frame(s->out, r->res, i);
	s->pos = next_after(&s->catchup, r);
	if (full) {
		/* The next page once this one has left the process. */
		s->draining = true;
		stream_flush(s, on_drained);
		return;
	}
	if (!stream_flush(s, NULL))
		return;
	/* Caught up: live if the live reader is not ahead of it. When no stream is live
	 * and no live read is in flight, the reader starts from this page's horizon: a
	 * position the log has reached, never the client's own, which may lie beyond the
	 * log (a Last-Event-ID from before a restore, say). From there every later stream
	 * would catch up short of the reader and page again, forever. A stream ahead of
	 * the horizon goes live and waits at its position: stream_deliver passes over
	 * what is not after it. */
	if (feed->nlive == 0 && !feed->live_busy)
		feed->at = r->horizon;
	if (readmodel_position_cmp(&s->pos, &feed->at) >= 0)
		stream_live(s);
	else
		stream_catchup(s);
}

static void stream_catchup(struct stream *s)
{
	struct page *page = &s->catchup;

	*page = (struct page){ .feed = s->feed,
			       .kind = PAGE_CATCHUP,
			       .after = s->pos,
			       .limit = PAGE_MAX,
			       .filter = s->filter,
			       .stream = s };
	s->busy = true;
	metric_add(s->feed->m_catchup, 1);
	submit(s->feed, page);
}

void feed_get_stream(struct http_request *req, void *arg)
{
	struct query_ctx *ctx = arg;
	struct feed *feed = ctx->feed;
	struct stream *s;
	struct readmodel_position after;
	struct filter f;

	if (!feed_params(req, true, &after, &f))
		return;
	if (strcmp(http_method(req), "HEAD") == 0) {
		/* evhttp sends no body for HEAD: a stream would never send, drain or end,
		 * and would hold its place under the cap. The headers a stream starts with. */
		http_set_header(req, "Cache-Control", "no-cache");
		http_reply_raw(req, 200, "text/event-stream", "", 0);
		return;
	}
	if (feed->stopping || !pg_connected(feed->pg)) {
		http_set_header(req, "Retry-After", "1");
		http_reply_problem(req, 503, "unavailable", "Service unavailable",
				   "the event store cannot be reached: %s",
				   feed->stopping ? "shutting down" : pg_last_error(feed->pg));
		return;
	}
	if (atomic_fetch_add(ctx->streams, 1) >= ctx->max_streams) {
		atomic_fetch_sub(ctx->streams, 1);
		http_set_header(req, "Retry-After", "5");
		http_reply_problem(req, 503, "too_many_streams", "Too many streams",
				   "%zu event streams are open, the most this service keeps "
				   "(DAYBOOK_MAX_STREAMS); retry later",
				   ctx->max_streams);
		return;
	}
	s = calloc(1, sizeof(*s));
	if (!s || !(s->out = evbuffer_new())) {
		free(s);
		atomic_fetch_sub(ctx->streams, 1);
		http_reply_problem(req, 503, "unavailable", "Service unavailable", "out of memory");
		return;
	}
	s->feed = feed;
	s->filter = f;
	s->pos = after;
	http_set_header(req, "Cache-Control", "no-cache");
	s->ev = http_reply_stream(req, 200, "text/event-stream");
	{
		const char *te = evhttp_find_header(evhttp_request_get_output_headers(s->ev),
						    "Transfer-Encoding");
		s->chunked = te && evutil_ascii_strcasecmp(te, "chunked") == 0;
	}
	/* A stream outlives the server's idle timeout: the keepalive comments write. */
	evhttp_connection_set_timeout(evhttp_request_get_connection(s->ev), 24 * 3600);
	evhttp_connection_set_closecb(evhttp_request_get_connection(s->ev), on_stream_close, s);
	s->next = feed->streams;
	if (s->next)
		s->next->prev = s;
	feed->streams = s;
	feed->nstreams++;
	s->seq = ++feed->stream_seq;
	feed->live_filter_stale = true;
	metric_add(feed->m_streams, 1);
	evbuffer_add_printf(s->out, ": daybook feed\nretry: 1000\n\n");
	if (!stream_flush(s, NULL))
		return;
	stream_catchup(s);
}

/* --- the live reader --------------------------------------------------------------- */

static void live_start(struct feed *feed)
{
	struct page *page = &feed->live;

	if (feed->live_busy || feed->nlive == 0 || feed->stopping)
		return;
	evtimer_del(feed->live_timer);
	feed->live_again = false;
	page->feed = feed;
	page->kind = PAGE_LIVE;
	page->after = feed->at;
	page->limit = PAGE_MAX;
	feed->live_busy = true;
	metric_add(feed->m_live_reads, 1);
	submit(feed, page);
}

/* Something was appended (a NOTIFY), or may have been (LISTEN took effect, the
 * connection came back): read now, or right after the read in flight. */
static void live_notified(struct feed *feed)
{
	if (feed->nlive == 0 || feed->stopping)
		return;
	if (feed->live_busy)
		feed->live_again = true;
	else
		live_start(feed);
}

/* Nothing more to read: until a NOTIFY, read again after the probe interval. */
static void live_wait(struct feed *feed)
{
	double d = feed->ctx->probe_interval;
	struct timeval tv = { (time_t)d, (suseconds_t)((d - (double)(time_t)d) * 1e6) };

	if (feed->nlive == 0 || feed->stopping)
		return;
	evtimer_add(feed->live_timer, &tv);
}

static void on_live_timer(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	live_start(arg);
}

/* LISTEN while any stream is live, UNLISTEN once none is: one request at a time, each
 * answer checked against what is wanted by then. */
static void listen_sync(struct feed *feed)
{
	bool want = feed->nlive > 0;

	if (feed->stopping || feed->listen_busy || want == feed->listening)
		return;
	feed->listen = (struct page){ .feed = feed, .kind = PAGE_LISTEN, .listen = want };
	feed->listen_busy = true;
	submit(feed, &feed->listen);
}

static void listen_done(struct feed *feed, bool listening)
{
	feed->listen_busy = false;
	feed->listening = listening;
	/* What committed before LISTEN took effect sent no notification here. */
	if (listening)
		live_notified(feed);
	listen_sync(feed);
}

static void on_notify(void *arg)
{
	struct feed *feed = arg;

	if (feed->nlive > 0)
		metric_add(feed->m_notified, 1);
	live_notified(feed);
}

/* p (of *cap items of size each) with room for n items: p itself when it has it, else
 * grown (*cap updated); NULL when out of memory, p left as it was. */
static void *reserve(void *p, size_t *cap, size_t n, size_t size)
{
	size_t want = *cap ? *cap : 16;
	void *grown;

	if (n <= *cap)
		return p;
	while (want < n)
		want *= 2;
	if (!(grown = realloc(p, want * size)))
		return NULL;
	*cap = want;
	return grown;
}

/* Every rendered event of the read as its frame, once for all streams, into
 * feed->frames (frame i: frame_at[i] .. frame_at[i + 1], empty for an event no stream
 * follows); false when out of memory. */
static bool render_frames(struct feed *feed, const struct rows *r)
{
	static const char id[] = "id: ", ev[] = "\nevent: ", data[] = "\ndata: ";
	size_t len = 0, at = 0;

	size_t *frame_at = reserve(feed->frame_at, &feed->frame_at_cap, (size_t)r->n + 1,
				   sizeof(*frame_at));
	char *frames;

	if (!frame_at)
		return false;
	feed->frame_at = frame_at;
	for (int i = 0; i < r->n; i++)
		if (!PQgetisnull(r->res, i, 6))
			len += sizeof(id) + sizeof(ev) + sizeof(data) + 1 +
			       (size_t)PQgetlength(r->res, i, 2) +
			       (size_t)PQgetlength(r->res, i, 3) +
			       (size_t)PQgetlength(r->res, i, 4) +
			       (size_t)PQgetlength(r->res, i, 6);
	if (!(frames = reserve(feed->frames, &feed->frames_cap, len + 1, 1)))
		return false;
	feed->frames = frames;
	for (int i = 0; i < r->n; i++) {
		feed->frame_at[i] = at;
		if (PQgetisnull(r->res, i, 6))
			continue;
		at += (size_t)sprintf(feed->frames + at, "%s%s.%s%s%s%s", id,
				      PQgetvalue(r->res, i, 2), PQgetvalue(r->res, i, 3), ev,
				      PQgetvalue(r->res, i, 4), data);
		memcpy(feed->frames + at, PQgetvalue(r->res, i, 6),
		       (size_t)PQgetlength(r->res, i, 6));
		at += (size_t)PQgetlength(r->res, i, 6);
		memcpy(feed->frames + at, "\n\n", 2);
		at += 2;
	}
	feed->frame_at[r->n] = at;
	return true;
}

/* Send a live stream its frames (iov[1 .. n], total bytes; iov[0] and iov[n + 1] are
 * free for the chunk's framing). When nothing of its is waiting to leave, one writev()
 * now, on this turn, with no copy (the socket is non-blocking); what the socket does not
 * take, or everything when output is waiting, goes to its bufferevent as before, which
 * then writes it, or meets the connection's error, in its own time. */
static void stream_send_live(struct stream *s, struct iovec *iov, int n, size_t total)
{
	struct feed *feed = s->feed;
	struct bufferevent *bev = stream_bev(s);
	char head[24];
	int first = 1, last = n;
	ssize_t wrote = -1;

	if (s->chunked) {
		iov[0].iov_base = head;
		iov[0].iov_len = (size_t)snprintf(head, sizeof(head), "%zx\r\n", total);
		iov[n + 1].iov_base = (void *)"\r\n";
		iov[n + 1].iov_len = 2;
		first = 0;
		last = n + 1;
	}
	if (unsent(s) == 0 && evbuffer_get_length(s->out) == 0 && last - first + 1 <= IOV_MAX) {
		do
			wrote = writev(bufferevent_getfd(bev), iov + first, last - first + 1);
		while (wrote < 0 && errno == EINTR);
	}
	if (wrote < 0)
		wrote = 0;
	for (int i = first; i <= last; i++) {
		size_t skip = (size_t)wrote < iov[i].iov_len ? (size_t)wrote : iov[i].iov_len;
		wrote -= (ssize_t)skip;
		if (skip < iov[i].iov_len)
			bufferevent_write(bev, (char *)iov[i].iov_base + skip,
					  iov[i].iov_len - skip);
	}
	metric_add(unsent(s) ? feed->m_queued : feed->m_written, 1);
}

/* The frames of the events past the stream's position that pass its filter. */
static void stream_deliver(struct stream *s, const struct rows *r)
{
	struct feed *feed = s->feed;
	int n = 0;
	size_t total = 0;

	for (int i = 0; i < r->n; i++) {
		struct readmodel_position p = row_position(r->res, i);
		size_t at = feed->frame_at[i], len = feed->frame_at[i + 1] - at;
		if (len == 0 || readmodel_position_cmp(&p, &s->pos) <= 0 ||
		    !matches(&s->filter, PQgetvalue(r->res, i, 4), PQgetvalue(r->res, i, 5)))
			continue;
		total += len;
		if (n > 0 &&
		    (char *)feed->iov[n].iov_base + feed->iov[n].iov_len == feed->frames + at)
			feed->iov[n].iov_len += len; /* follows the last one: one piece */
		else
			feed->iov[++n] = (struct iovec){ feed->frames + at, len };
	}
	if (n > 0)
		stream_send_live(s, feed->iov, n, total);
}

static void live_done(struct feed *feed, const struct rows *r)
{
	struct readmodel_position next = next_after(&feed->live, r);
	bool full = r->n >= feed->live.limit;
	struct iovec *iov = render_frames(feed, r) ? reserve(feed->iov, &feed->iov_cap,
							     (size_t)r->n + 2, sizeof(*iov))
						   : NULL;
	struct stream *s, *following;
	int shown = 0;

	if (!iov) {
		page_failed(&feed->live, "out of memory", true);
		return;
	}
	feed->iov = iov;
	feed->live_busy = false;
	for (int i = 0; i < r->n; i++)
		shown += !PQgetisnull(r->res, i, 6);
	metric_add(feed->m_rendered, shown);
	for (s = feed->streams; s; s = following) {
		following = s->next;
		if (!s->live)
			continue;
		if (s->seq > feed->live_covers) {
			/* Opened after the read was sent (cannot be: its catch-up page comes
			 * after it); its events may not be rendered: it catches up again. */
			s->live = false;
			feed->nlive--;
			stream_catchup(s);
			continue;
		}
		/* The bound, checked on every read: a stream cut off gets nothing more. */
		if (!stream_flush(s, NULL))
			continue;
		stream_deliver(s, r);
		if (readmodel_position_cmp(&next, &s->pos) > 0)
			s->pos = next;
	}
	feed->at = next;
	if (full || feed->live_again)
		live_start(feed);
	else
		live_wait(feed);
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
	struct feed *feed = arg;

	(void)fd;
	(void)what;
	listen_sync(feed);
	live_start(feed);
	for (struct stream *s = feed->streams; s; s = s->next)
		if (!s->live && !s->busy && !s->draining)
			stream_catchup(s);
}

static void page_failed(struct page *page, const char *why, bool retry)
{
	struct feed *feed = page->feed;
	struct timeval later = { 0, (suseconds_t)(RETRY_SECONDS * 1e6) };

	switch (page->kind) {
	case PAGE_POLL:
		poll_failed(page, why, retry);
		return;
	case PAGE_LIVE:
		feed->live_busy = false;
		break;
	case PAGE_LISTEN:
		feed->listen_busy = false;
		break;
	case PAGE_CATCHUP:
		page->stream->busy = false;
		if (!page->stream->ev) {
			stream_free(page->stream);
			return;
		}
		break;
	}
	log_warn(&feed->ctx->log, "feed read failed (tried again): %s", why);
	evtimer_add(feed->retry, &later);
}

static void on_run_done(void *arg, const struct pg_outcome *out)
{
	struct feed *feed = arg;
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct page *page = feed->batch, *next;
	size_t i = 0;

	feed->batch = NULL;
	for (; page; page = next, i++) {
		struct rows r;
		next = page->next;
		page->next = NULL;
		if (error || i >= out->n) {
			page_failed(page, error ? error : "no result", true);
			continue;
		}
		if (page->kind == PAGE_LISTEN) {
			if (PQresultStatus(out->results[i]) == PGRES_COMMAND_OK)
				listen_done(feed, page->listen);
			else
				page_failed(page, PQresultErrorMessage(out->results[i]), true);
			continue;
		}
		if (PQresultStatus(out->results[i]) != PGRES_TUPLES_OK) {
			bool aborted = PQresultStatus(out->results[i]) == PGRES_PIPELINE_ABORTED;
			page_failed(page,
				    aborted ? "pipeline aborted"
					    : PQresultErrorMessage(out->results[i]),
				    aborted);
			continue;
		}
		if (!read_rows(out->results[i], &r)) {
			page_failed(page, "malformed result", false);
			continue;
		}
		switch (page->kind) {
		case PAGE_POLL:
			poll_done(page, &r);
			break;
		case PAGE_LIVE:
			live_done(feed, &r);
			break;
		case PAGE_CATCHUP:
			catchup_done(page->stream, &r);
			break;
		case PAGE_LISTEN:
			break;
		}
	}
	kick(feed);
}

/* --- keepalive, life cycle ------------------------------------------------------- */

static void on_keepalive(evutil_socket_t fd, short what, void *arg)
{
	struct feed *feed = arg;
	struct stream *s, *following;

	(void)fd;
	(void)what;
	for (s = feed->streams; s; s = following) {
		following = s->next;
		if (s->draining)
			continue; /* its catch-up is on the way (and the callback is its own) */
		evbuffer_add(s->out, ": keepalive\n\n", 13);
		stream_flush(s, NULL);
	}
}

static void on_connect(void *arg)
{
	struct feed *feed = arg;

	/* A new session: it listens to nothing, and notifications may have been lost. */
	feed->listening = false;
	listen_sync(feed);
	live_notified(feed);
	kick(feed);
}

bool feed_connected(const struct feed *feed)
{
	return feed && pg_connected(feed->pg);
}

const char *feed_last_error(const struct feed *feed)
{
	return feed ? pg_last_error(feed->pg) : "not started";
}

size_t feed_streams(const struct feed *feed)
{
	return feed ? feed->nstreams : 0;
}

int feed_open(struct feed **out, struct query_ctx *ctx)
{
	struct feed *feed = calloc(1, sizeof(*feed));
	double ka = ctx->stream_keepalive;
	struct timeval tv = { (time_t)ka, (suseconds_t)((ka - (double)(time_t)ka) * 1e6) };
	struct pg_config pc = {
		.conninfo = ctx->cfg.pg,
		.application_name = "daybook-query-feed",
		.base = ctx->base,
		.log = &ctx->log,
		.statements = statements,
		.nstatements = sizeof(statements) / sizeof(statements[0]),
		.run_timeout = RUN_TIMEOUT,
		.on_connect = on_connect,
		.on_notify = on_notify,
		.arg = feed,
	};

	*out = NULL;
	if (!feed)
		return -1;
	feed->ctx = ctx;
	feed->keepalive = event_new(ctx->base, -1, EV_PERSIST, on_keepalive, feed);
	feed->retry = evtimer_new(ctx->base, on_retry, feed);
	feed->live_timer = evtimer_new(ctx->base, on_live_timer, feed);
	if (!feed->keepalive || !feed->retry || !feed->live_timer || pg_open(&feed->pg, &pc)) {
		feed_close(&feed);
		return -1;
	}
	evtimer_add(feed->keepalive, &tv);
	feed->m_streams = metrics_get(ctx->metrics, METRIC_GAUGE, "daybook_query_feed_streams",
				      "Open event streams (GET /events/stream).", "", NULL, 0);
	feed->m_slow =
		metrics_get(ctx->metrics, METRIC_COUNTER,
			    "daybook_query_feed_slow_disconnects_total",
			    "Event streams cut off because their unsent output passed the bound.",
			    "", NULL, 0);
	feed->m_live_reads =
		metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_query_feed_live_reads_total",
			    "Reads of the shared live reader that serves every live stream.", "",
			    NULL, 0);
	feed->m_notified = metrics_get(
		ctx->metrics, METRIC_COUNTER, "daybook_query_feed_live_notifications_total",
		"NOTIFYs of the event store that woke the live reader (or asked it for one more read).",
		"", NULL, 0);
	feed->m_rendered = metrics_get(
		ctx->metrics, METRIC_COUNTER, "daybook_query_feed_live_events_rendered_total",
		"Events the live reader had PostgreSQL build as JSON: those that pass the filter of "
		"some stream of the worker (the others it reads only to move past them).",
		"", NULL, 0);
	feed->m_written =
		metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_query_feed_live_writes_total",
			    "Live frames sent to a stream, by how they left: written to its socket at once, "
			    "or queued (partly or wholly) behind output still waiting.",
			    "how=\"direct\"", NULL, 0);
	feed->m_queued = metrics_get(ctx->metrics, METRIC_COUNTER,
				     "daybook_query_feed_live_writes_total",
				     "Live frames sent to a stream, by how they left: written to "
				     "its socket at once, or queued (partly or wholly) behind "
				     "output still waiting.",
				     "how=\"queued\"", NULL, 0);
	feed->m_pages = metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_query_feed_pages_total",
				    "GET /events requests.", "", NULL, 0);
	feed->m_catchup = metrics_get(ctx->metrics, METRIC_COUNTER,
				      "daybook_query_feed_catchup_pages_total",
				      "Pages of the log read for event streams catching up.", "",
				      NULL, 0);
	*out = feed;
	return 0;
}

void feed_stop(struct feed *feed)
{
	if (!feed || feed->stopping)
		return;
	feed->stopping = true;
	if (feed->live_timer)
		evtimer_del(feed->live_timer);
	while (feed->streams) {
		struct stream *s = feed->streams;
		struct evhttp_request *ev = s->ev;
		evhttp_connection_set_closecb(evhttp_request_get_connection(ev), NULL, NULL);
		stream_gone(s);
		evhttp_send_reply_end(ev);
	}
}

void feed_close(struct feed **feedp)
{
	struct feed *feed = *feedp;

	if (!feed)
		return;
	feed_stop(feed);
	if (feed->keepalive)
		event_free(feed->keepalive);
	if (feed->retry)
		event_free(feed->retry);
	if (feed->live_timer)
		event_free(feed->live_timer);
	pg_close(&feed->pg);
	free(feed->live_names);
	free(feed->frames);
	free(feed->frame_at);
	free(feed->iov);
	free(feed);
	*feedp = NULL;
}
