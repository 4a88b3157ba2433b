/* feed-follower: an example consumer of Daybook's event feed.
 *
 *   DAYBOOK_TOKEN=<read token> feed-follower http://127.0.0.1:8082/events/stream pos.txt
 *
 * Follows GET /events/stream (Server-Sent Events) and prints one line per event,
 * "<position> <type> <event JSON>". After each printed event it saves the event's
 * position in the position file (written to a temporary file, flushed, then renamed
 * over it, so the file always holds a whole token). On start, and after a lost
 * connection (reconnecting with backoff, 0.1 s doubling up to 5 s), it resumes with
 * Last-Event-ID from the saved position.
 *
 * Delivery is at least once: killed between printing an event and saving its
 * position, it prints that one event again when it restarts. A consumer whose
 * effect and position can be committed together (one database transaction) gets
 * exactly once by saving the position in the same transaction.
 *
 * The URL may carry the feed's filters (?type=FundsDeposited&stream=account-alice).
 * Exit: 0 on SIGINT/SIGTERM, 1 when the service refuses the request (400, 401, 403),
 * 2 on bad usage. */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 5.0
#define IDLE_TIMEOUT 45 /* seconds without a byte (the service sends keepalives) */
#define POSITION_MAX 64

struct follower {
	struct event_base *base;
	struct evhttp_uri *uri;
	const char *host;
	int port;
	char target[2048]; /* path and query */
	const char *token;
	const char *posfile;
	char tmpfile[4096];
	char position[POSITION_MAX]; /* the last saved position, "" before any */
	struct evhttp_connection *conn;
	struct evbuffer *pending; /* received, not yet a whole event */
	struct event *reconnect, *sigint, *sigterm;
	double backoff;
	int exit_code;
};

static void connect_feed(struct follower *f);

static void load_position(struct follower *f)
{
	FILE *in = fopen(f->posfile, "r"); /* the saved position, if any */
	size_t n;

	f->position[0] = '\0';
	if (!in)
		return;
	n = fread(f->position, 1, sizeof(f->position) - 1, in);
	f->position[n] = '\0';
	f->position[strcspn(f->position, "\r\n")] = '\0';
	fclose(in);
}

/* Write the position to a temporary file and rename it over the position file. */
static int save_position(struct follower *f, const char *id)
{
	FILE *out = fopen(f->tmpfile, "w"); /* the next position file, renamed into place */

	if (!out)
		goto fail;
	if (fprintf(out, "%s\n", id) < 0 || fflush(out) != 0 || fsync(fileno(out)) != 0) {
		fclose(out);
		goto fail;
	}
	if (fclose(out) != 0 || rename(f->tmpfile, f->posfile) != 0)
		goto fail;
	snprintf(f->position, sizeof(f->position), "%s", id);
	return 0;
fail:
	fprintf(stderr, "feed-follower: cannot save the position in %s: %s\n", f->posfile,
		strerror(errno));
	return -1;
}

/* One event block (the text between blank lines): print it, then save its id. */
static void handle_block(struct follower *f, char *block)
{
	const char *id = NULL, *type = "message", *data = NULL;

	for (char *line = block, *next; line; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		if (strncmp(line, "id: ", 4) == 0)
			id = line + 4;
		else if (strncmp(line, "event: ", 7) == 0)
			type = line + 7;
		else if (strncmp(line, "data: ", 6) == 0)
			data = line + 6;
		/* ":" lines are comments (keepalives); "retry:" is ignored. */
	}
	if (!id || !data)
		return;
	printf("%s %s %s\n", id, type, data);
	fflush(stdout);
	if (strlen(id) < POSITION_MAX && save_position(f, id) != 0)
		event_base_loopexit(f->base, NULL);
}

static void on_chunk(struct evhttp_request *req, void *arg)
{
	struct follower *f = arg;
	struct evbuffer_ptr end;

	if (evhttp_request_get_response_code(req) != 200)
		return; /* the error body is not an event stream */
	f->backoff = BACKOFF_MIN;
	evbuffer_add_buffer(f->pending, evhttp_request_get_input_buffer(req));
	while ((end = evbuffer_search(f->pending, "\n\n", 2, NULL)).pos >= 0) {
		size_t len = (size_t)end.pos;
		char *block = malloc(len + 1);
		if (!block) {
			event_base_loopexit(f->base, NULL);
			return;
		}
		evbuffer_remove(f->pending, block, len);
		block[len] = '\0';
		evbuffer_drain(f->pending, 2);
		handle_block(f, block);
		free(block);
	}
}

static void schedule_reconnect(struct follower *f)
{
	struct timeval tv = { (time_t)f->backoff,
			      (suseconds_t)((f->backoff - (double)(time_t)f->backoff) * 1e6) };

	evtimer_add(f->reconnect, &tv);
	f->backoff = f->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : f->backoff * 2;
}

/* The response ended: the connection was lost or the service answered an error. */
static void on_done(struct evhttp_request *req, void *arg)
{
	struct follower *f = arg;
	int code = req ? evhttp_request_get_response_code(req) : 0;

	if (code == 400 || code == 401 || code == 403) {
		fprintf(stderr, "feed-follower: the service refused the request (%d)\n", code);
		f->exit_code = 1;
		event_base_loopexit(f->base, NULL);
		return;
	}
	fprintf(stderr, "feed-follower: %s; reconnecting in %.1f s\n",
		code == 200 ? "the stream ended"
		: code      ? "the service is unavailable"
			    : "the connection was lost",
		f->backoff);
	evbuffer_drain(f->pending, evbuffer_get_length(f->pending));
	schedule_reconnect(f);
}

static void on_reconnect(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	connect_feed(arg);
}

static void connect_feed(struct follower *f)
{
	struct evhttp_request *req;
	struct evkeyvalq *h;
	char auth[1024];

	if (f->conn) /* not from inside its own callbacks: from the timer */
		evhttp_connection_free(f->conn);
	f->conn = evhttp_connection_base_new(f->base, NULL, f->host, (unsigned short)f->port);
	req = f->conn ? evhttp_request_new(on_done, f) : NULL;
	if (!req) {
		schedule_reconnect(f);
		return;
	}
	evhttp_connection_set_timeout(f->conn, IDLE_TIMEOUT);
	evhttp_request_set_chunked_cb(req, on_chunk);
	h = evhttp_request_get_output_headers(req);
	snprintf(auth, sizeof(auth), "Bearer %s", f->token);
	evhttp_add_header(h, "Host", f->host);
	evhttp_add_header(h, "Authorization", auth);
	evhttp_add_header(h, "Accept", "text/event-stream");
	if (f->position[0])
		evhttp_add_header(h, "Last-Event-ID", f->position);
	if (evhttp_make_request(f->conn, req, EVHTTP_REQ_GET, f->target) != 0)
		schedule_reconnect(f);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct follower *f = arg;

	(void)sig;
	(void)what;
	event_base_loopexit(f->base, NULL);
}

int main(int argc, char **argv)
{
	struct follower f = { .backoff = BACKOFF_MIN };
	const char *path, *query;

	if (argc != 3 || !getenv("DAYBOOK_TOKEN")) {
		fprintf(stderr, "usage: DAYBOOK_TOKEN=<read token> feed-follower "
				"http://host:port/events/stream[?type=...] <position file>\n");
		return 2;
	}
	f.token = getenv("DAYBOOK_TOKEN");
	f.posfile = argv[2];
	snprintf(f.tmpfile, sizeof(f.tmpfile), "%s.tmp", f.posfile);
	f.uri = evhttp_uri_parse(argv[1]);
	if (!f.uri || !evhttp_uri_get_host(f.uri)) {
		fprintf(stderr, "feed-follower: cannot parse the URL %s\n", argv[1]);
		return 2;
	}
	f.host = evhttp_uri_get_host(f.uri);
	f.port = evhttp_uri_get_port(f.uri) > 0 ? evhttp_uri_get_port(f.uri) : 80;
	path = evhttp_uri_get_path(f.uri);
	query = evhttp_uri_get_query(f.uri);
	snprintf(f.target, sizeof(f.target), "%s%s%s", path && *path ? path : "/", query ? "?" : "",
		 query ? query : "");
	load_position(&f);
	signal(SIGPIPE, SIG_IGN);
	f.base = event_base_new();
	f.pending = evbuffer_new();
	if (!f.base || !f.pending) {
		fprintf(stderr, "feed-follower: out of memory\n");
		return 1;
	}
	f.reconnect = evtimer_new(f.base, on_reconnect, &f);
	f.sigint = evsignal_new(f.base, SIGINT, on_signal, &f);
	f.sigterm = evsignal_new(f.base, SIGTERM, on_signal, &f);
	evsignal_add(f.sigint, NULL);
	evsignal_add(f.sigterm, NULL);
	fprintf(stderr, "feed-follower: following %s from %s\n", argv[1],
		f.position[0] ? f.position : "the beginning");
	connect_feed(&f);
	event_base_dispatch(f.base);
	if (f.conn)
		evhttp_connection_free(f.conn);
	event_free(f.reconnect);
	event_free(f.sigint);
	event_free(f.sigterm);
	evbuffer_free(f.pending);
	evhttp_uri_free(f.uri);
	event_base_free(f.base);
	return f.exit_code;
}
