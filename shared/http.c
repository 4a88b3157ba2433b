/* HTTP server plumbing on libevent's evhttp: routing, auth, request ids, problem
 * details, body limits, query strings, metrics, and the /healthz /readyz /metrics
 * routes. The connections themselves (cap, deadlines) are http_conn.c's. */
#include "http_internal.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PARAM_MAX 256
#define REQUEST_ID_MAX 128
#define HTTP_REQUESTS_KEPT 64

/* The request headers the services read, found in one pass over the request's headers
 * when it arrives (see scan_headers): each look-up by name walked the whole list with a
 * case-insensitive compare, five or six walks per write request. */
enum {
	H_AUTHORIZATION,
	H_REQUEST_ID,
	H_CONTENT_TYPE,
	H_IDEMPOTENCY_KEY,
	H_IF_MATCH,
	H_IF_NONE_MATCH,
	H_ORIGIN,
	H_LAST_EVENT_ID,
	H_MIN_POSITION,
	H_AC_REQUEST_METHOD,
	NKNOWN
};
static const struct {
	const char *name;
	size_t len;
} known_headers[NKNOWN] = {
#define KNOWN(name)                                                                                \
	{                                                                                          \
		name, sizeof(name) - 1                                                             \
	}
	[H_AUTHORIZATION] = KNOWN("Authorization"),
	[H_REQUEST_ID] = KNOWN("X-Request-Id"),
	[H_CONTENT_TYPE] = KNOWN("Content-Type"),
	[H_IDEMPOTENCY_KEY] = KNOWN("Idempotency-Key"),
	[H_IF_MATCH] = KNOWN("If-Match"),
	[H_IF_NONE_MATCH] = KNOWN("If-None-Match"),
	[H_ORIGIN] = KNOWN("Origin"),
	[H_LAST_EVENT_ID] = KNOWN("Last-Event-ID"),
	[H_MIN_POSITION] = KNOWN("X-Daybook-Min-Position"),
	[H_AC_REQUEST_METHOD] = KNOWN("Access-Control-Request-Method"),
#undef KNOWN
};

struct http_request {
	struct evhttp_request *ev;
	struct http_server *srv;
	const char *route_name;
	const char *method;
	const struct token *token;
	struct timespec start;
	char path[1024];
	char params[HTTP_MAX_PARAMS][PARAM_MAX + 1];
	char request_id[REQUEST_ID_MAX + 1];
	struct http_query_param *query; /* see http_query_parse; NULL: none */
	size_t nquery;
	/* The first value of each of known_headers, or NULL: evhttp's strings, valid as
	 * long as the request. */
	const char *headers[NKNOWN];
	struct http_request *next_spare;
};

/* A request's state, reused from an answered one when the server has one; its fields
 * are set by on_request (params and the texts as they are filled). */
static struct http_request *request_new(struct http_server *srv)
{
	struct http_request *req = srv->spare;

	if (!req)
		return malloc(sizeof(*req));
	srv->spare = req->next_spare;
	srv->nspare--;
	return req;
}

/* The request is answered: keep it for the next one, or free it. */
static void request_done(struct http_server *srv, struct http_request *req)
{
	free(req->query);
	if (srv->nspare >= HTTP_REQUESTS_KEPT) {
		free(req);
		return;
	}
	req->next_spare = srv->spare;
	srv->spare = req;
	srv->nspare++;
}

static const char *method_name(enum evhttp_cmd_type cmd)
{
	switch (cmd) {
	case EVHTTP_REQ_GET:
		return "GET";
	case EVHTTP_REQ_POST:
		return "POST";
	case EVHTTP_REQ_HEAD:
		return "HEAD";
	case EVHTTP_REQ_PUT:
		return "PUT";
	case EVHTTP_REQ_DELETE:
		return "DELETE";
	case EVHTTP_REQ_OPTIONS:
		return "OPTIONS";
	case EVHTTP_REQ_TRACE:
		return "TRACE";
	case EVHTTP_REQ_CONNECT:
		return "CONNECT";
	case EVHTTP_REQ_PATCH:
		return "PATCH";
	default:
		return "UNKNOWN";
	}
}

static double elapsed(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

/* The access lines of one loop iteration leave in one write, once the callbacks that
 * answered them have run (activated last, this runs after them in the same
 * iteration). */
static void flush_access_lines(evutil_socket_t fd, short what, void *arg)
{
	struct http_server *srv = arg;

	(void)fd;
	(void)what;
	log_buf_flush(&srv->access_lines);
}

/* The access line: one per request, at info (warn for 5xx; debug for a successful
 * read with quiet_reads), built only when it is written, by hand into the server's
 * buffer (log_line_*: escaped and made one line as log_text does, so the line is
 * valid JSON whatever bytes the path or the request id held). */
static void access_log(struct http_request *req, int status, size_t bytes, double secs)
{
	struct http_server *srv = req->srv;
	const struct log *log = srv->cfg.log;
	enum log_level level = status >= 500 ? LOG_WARN : LOG_INFO;
	bool read = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
	const char *token = req->token ? req->token->id : NULL;
	struct log_line ln;
	bool first = srv->access_lines.len == 0;

	if (srv->cfg.quiet_reads && read && ((status >= 200 && status < 300) || status == 304))
		level = LOG_DEBUG;

	if (!log_enabled(log, level) ||
	    !log_line_begin(&ln, log, &srv->access_lines, level, req->request_id, "request",
			    160 + log_text_room(strlen(req->method)) +
				    log_text_room(strlen(req->route_name)) +
				    log_text_room(strlen(req->path)) +
				    (token ? log_text_room(strlen(token)) : 0)))
		return;
	log_line_key(&ln, "method");
	log_line_text(&ln, req->method);
	log_line_key(&ln, "route");
	log_line_text(&ln, req->route_name);
	log_line_key(&ln, "path");
	log_line_text(&ln, req->path);
	log_line_key(&ln, "status");
	log_line_int(&ln, status);
	log_line_key(&ln, "duration_ms");
	log_line_millis(&ln, secs);
	log_line_key(&ln, "token_id");
	log_line_text(&ln, token);
	log_line_key(&ln, "bytes");
	log_line_int(&ln, (long long)bytes);
	log_line_end(&ln);
	if (first && srv->access_lines.len > 0)
		event_active(srv->flush_lines, EV_TIMEOUT, 0);
}

/* The series of (method, route, status): remembered for the server's last few
 * combinations (method and route names are static strings), else looked up. */
static const struct http_series *series_of(struct http_request *req, int status)
{
	struct http_server *srv = req->srv;
	struct metrics *m = srv->cfg.metrics;
	struct http_series *s;
	char labels[300];

	for (size_t i = 0; i < srv->nseries; i++) {
		s = &srv->series[i];
		if (s->status == status && s->route == req->route_name && s->method == req->method)
			return s;
	}
	if (srv->nseries < HTTP_SERIES_MEMO)
		s = &srv->series[srv->nseries++];
	else
		s = &srv->series[srv->next_series++ % HTTP_SERIES_MEMO];
	snprintf(labels, sizeof(labels), "method=\"%s\",route=\"%s\",status=\"%d\"", req->method,
		 req->route_name, status);
	*s = (struct http_series){
		.method = req->method,
		.route = req->route_name,
		.status = status,
		.count = metrics_get(m, METRIC_COUNTER, "daybook_http_requests_total",
				     "HTTP requests answered, by route and status.", labels, NULL,
				     0),
		.duration =
			metrics_get(m, METRIC_HISTOGRAM, "daybook_http_request_duration_seconds",
				    "Time from request to response, by route and status.", labels,
				    metrics_latency_buckets, metrics_latency_buckets_len),
	};
	if (!s->count || !s->duration)
		s->status = -1; /* out of memory: not remembered, looked up again next time */
	return s;
}

static void record(struct http_request *req, int status, size_t bytes)
{
	const struct http_series *s = series_of(req, status);
	double secs = elapsed(&req->start);

	metric_add(s->count, 1);
	metric_observe(s->duration, secs);
	access_log(req, status, bytes, secs);
}

size_t http_format_u64(char *out, unsigned long long v)
{
	char tmp[20];
	size_t n = 0;

	do
		tmp[n++] = (char)('0' + v % 10);
	while ((v /= 10) != 0);
	for (size_t i = 0; i < n; i++)
		out[i] = tmp[n - 1 - i];
	out[n] = '\0';
	return n;
}

/* Date (RFC 9110 IMF-fixdate, English names whatever the locale), formatted once a
 * second rather than by evhttp for every response; and Content-Length, which evhttp
 * would otherwise print itself, but not for a response without a body (1xx, 204, 304),
 * as evhttp. */
static void date_and_length(struct http_request *req, int status, size_t len)
{
	static const char days[] = "SunMonTueWedThuFriSat", months[] = "JanFebMarAprMayJun"
								       "JulAugSepOctNovDec";
	struct http_server *srv = req->srv;
	time_t t = time(NULL);
	char text[24];

	if ((long long)t != srv->date_at) {
		struct tm tm;
		srv->date[0] = '\0';
		if (gmtime_r(&t, &tm) && tm.tm_year + 1900 <= 9999)
			snprintf(srv->date, sizeof(srv->date),
				 "%.3s, %02d %.3s %04d %02d:%02d:%02d GMT", days + 3 * tm.tm_wday,
				 tm.tm_mday, months + 3 * tm.tm_mon, tm.tm_year + 1900, tm.tm_hour,
				 tm.tm_min, tm.tm_sec);
		srv->date_at = (long long)t;
	}
	if (srv->date[0])
		evhttp_add_header(evhttp_request_get_output_headers(req->ev), "Date", srv->date);
	if (status < 200 || status == 204 || status == 304)
		return;
	http_format_u64(text, len);
	http_set_header(req, "Content-Length", text);
}

/* Is the entity tag `etag` ("5" or W/"5") one of If-None-Match's list (or is it "*")?
 * Weak comparison (RFC 9110, 13.1.2). */
static bool none_match(const char *list, const char *etag)
{
	size_t n;

	if (strncmp(etag, "W/", 2) == 0)
		etag += 2;
	n = strlen(etag);
	for (const char *p = list; *p;) {
		size_t len;
		p += strspn(p, " \t,");
		if (*p == '*')
			return true;
		if (strncmp(p, "W/", 2) == 0)
			p += 2;
		len = strcspn(p, " \t,");
		if (len == n && strncmp(p, etag, n) == 0)
			return true;
		p += len;
	}
	return false;
}

/* Is `origin` one of the configured CORS origins (or is "*" one of them)? */
static bool cors_allowed(const struct http_server *srv, const char *origin)
{
	const char *list = srv->cfg.limits.cors_origins;
	size_t n;

	if (!list || !origin)
		return false;
	n = strlen(origin);
	for (const char *p = list; *p;) {
		size_t len;
		p += strspn(p, ", ");
		len = strcspn(p, ", ");
		if ((len == 1 && *p == '*') ||
		    (len == n && len > 0 && strncasecmp(p, origin, n) == 0))
			return true;
		p += len;
	}
	return false;
}

/* The CORS headers of an actual response to an allowed origin. */
static void cors_headers(struct http_request *req)
{
	const char *origin;

	if (!req->srv->cfg.limits.cors_origins)
		return;
	origin = req->headers[H_ORIGIN];
	http_set_header(req, "Vary", "Origin");
	if (!cors_allowed(req->srv, origin))
		return;
	http_set_header(req, "Access-Control-Allow-Origin", origin);
	http_set_header(req, "Access-Control-Expose-Headers",
			"ETag, Location, Retry-After, X-Request-Id, X-Daybook-Position, "
			"Idempotent-Replayed");
}

static void finish(struct http_request *req, int status, struct evbuffer *body)
{
	struct http_server *srv = req->srv;
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req->ev);
	struct evkeyvalq *out = evhttp_request_get_output_headers(req->ev);

	/* A conditional read whose representation has not changed: 304, no body. */
	if (status == 200 && (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD)) {
		const char *etag = evhttp_find_header(out, "ETag");
		const char *inm = req->headers[H_IF_NONE_MATCH];
		if (etag && inm && none_match(inm, etag)) {
			status = 304;
			body = NULL;
			evhttp_remove_header(out, "Content-Type");
		}
	}
	record(req, status, body ? evbuffer_get_length(body) : 0);
	http_set_header(req, "X-Request-Id", req->request_id);
	cors_headers(req);
	/* For HEAD, GET's headers, with the length of the body it would have had. */
	date_and_length(req, status, body ? evbuffer_get_length(body) : 0);
	if (cmd == EVHTTP_REQ_HEAD)
		body = NULL;
	conns_send_reply(srv->conns, req->ev, status, http_status_reason(status), body);
	request_done(srv, req);
	srv->inflight--;
	metric_add(srv->inflight_gauge, -1); /* shared by a process's workers: add, never set */
}

void http_set_header(struct http_request *req, const char *name, const char *value)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req->ev);

	evhttp_remove_header(h, name);
	evhttp_add_header(h, name, value);
}

/* A problem-details body with "instance" (the request id) added when it has none; NULL
 * when body is not a JSON object (it is then sent as it is). Caller frees. */
static char *with_instance(const struct http_request *req, const char *body, size_t len)
{
	json_t *obj = json_loadb(body, len, 0, NULL);
	char *text = NULL;

	if (json_is_object(obj) && !json_object_get(obj, "instance") &&
	    json_object_set_new(obj, "instance", log_text(req->request_id)) == 0)
		text = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(obj);
	return text;
}

/* An empty buffer for a response body: the server's spare one (evhttp moves the body's
 * chains out of it when it sends the reply), else a new one. Given back with
 * body_buffer_put. */
static struct evbuffer *body_buffer_get(struct http_server *srv)
{
	struct evbuffer *buf = srv->spare_body;

	srv->spare_body = NULL;
	return buf ? buf : evbuffer_new();
}

static void body_buffer_put(struct http_server *srv, struct evbuffer *buf)
{
	if (!buf)
		return;
	/* Not sent when the connection was already gone: nothing of it is kept. */
	evbuffer_drain(buf, evbuffer_get_length(buf));
	if (srv->spare_body)
		evbuffer_free(buf);
	else
		srv->spare_body = buf;
}

void http_reply_raw(struct http_request *req, int status, const char *content_type,
		    const char *body, size_t len)
{
	struct http_server *srv = req->srv;
	struct evbuffer *buf = body_buffer_get(srv);
	/* Every problem answered to a request names it (RFC 9457 "instance"), whoever built
	 * the body (this file, a handler, an idempotent replay). */
	char *problem = strcmp(content_type, "application/problem+json") == 0
				? with_instance(req, body, len)
				: NULL;

	if (problem) {
		body = problem;
		len = strlen(problem);
	}
	if (buf)
		evbuffer_add(buf, body, len);
	free(problem);
	http_set_header(req, "Content-Type", content_type);
	finish(req, status, buf);
	body_buffer_put(srv, buf);
}

struct evhttp_request *http_reply_stream(struct http_request *req, int status,
					 const char *content_type)
{
	struct http_server *srv = req->srv;
	struct evhttp_request *ev = req->ev;

	record(req, status, 0); /* the access line when the stream starts: bytes 0 */
	http_set_header(req, "X-Request-Id", req->request_id);
	cors_headers(req);
	http_set_header(req, "Content-Type", content_type);
	conns_stream_began(srv->conns, ev);
	evhttp_send_reply_start(ev, status, http_status_reason(status));
	request_done(srv, req);
	srv->inflight--;
	metric_add(srv->inflight_gauge, -1);
	return ev;
}

void http_reply_json(struct http_request *req, int status, json_t *body)
{
	char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;

	json_decref(body);
	if (!text) {
		static const char oom[] =
			"{\"type\":\"about:blank\",\"title\":\"Internal error\","
			"\"status\":500,\"detail\":\"out of memory\",\"code\":\"internal\"}";
		http_reply_raw(req, 500, "application/problem+json", oom, sizeof(oom) - 1);
		return;
	}
	http_reply_raw(req, status, "application/json", text, strlen(text));
	free(text);
}

/* Send a problem-details object (stolen). */
static void reply_problem_json(struct http_request *req, int status, json_t *body)
{
	char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;

	json_decref(body);
	if (text) {
		http_reply_raw(req, status, "application/problem+json", text, strlen(text));
		free(text);
	} else {
		http_reply_raw(req, status, "application/problem+json", "{}", 2);
	}
}

void http_reply_problem(struct http_request *req, int status, const char *code, const char *title,
			const char *detail_fmt, ...)
{
	char detail[1024];
	va_list ap;
	json_t *body;
	int n;

	va_start(ap, detail_fmt);
	n = vsnprintf(detail, sizeof(detail), detail_fmt, ap);
	va_end(ap);
	/* A long detail (a client's long path) is cut between characters, not inside one. */
	if (n >= (int)sizeof(detail))
		detail[log_text_cut(detail, sizeof(detail) - 1)] = '\0';
	body = http_problem_json(status, code, title, detail);
	if (status == 503)
		http_set_header(req, "Retry-After", "1");
	reply_problem_json(req, status, body);
}

void http_reply_invalid(struct http_request *req, const char *detail)
{
	http_reply_problem(req, 400, "invalid_request", "Invalid request", "%s", detail);
}

const char *http_param(const struct http_request *req, size_t i)
{
	return i < HTTP_MAX_PARAMS ? req->params[i] : "";
}

const char *http_method(const struct http_request *req)
{
	return req->method;
}

const char *http_path(const struct http_request *req)
{
	return req->path;
}

/* a and b, both len bytes, equal but for the case of ASCII letters (header names are
 * compared so: evutil_ascii_strcasecmp's rule, without its call per character). */
static bool same_name(const char *a, const char *b, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
		if (x >= 'A' && x <= 'Z')
			x = (unsigned char)(x + ('a' - 'A'));
		if (y >= 'A' && y <= 'Z')
			y = (unsigned char)(y + ('a' - 'A'));
		if (x != y)
			return false;
	}
	return true;
}

/* The index of name in known_headers (any case), or -1. */
static int known_header(const char *name, size_t len)
{
	for (size_t i = 0; i < NKNOWN; i++)
		if (known_headers[i].len == len && same_name(known_headers[i].name, name, len))
			return (int)i;
	return -1;
}

/* Note the first value of each known header, as evhttp_find_header would find it. */
static void scan_headers(struct http_request *req)
{
	const struct evkeyval *h;

	memset(req->headers, 0, sizeof(req->headers));
	for (h = evhttp_request_get_input_headers(req->ev)->tqh_first; h; h = h->next.tqe_next) {
		int i = known_header(h->key, strlen(h->key));
		if (i >= 0 && !req->headers[i])
			req->headers[i] = h->value;
	}
}

const char *http_header(const struct http_request *req, const char *name)
{
	int i = -1;

	/* Callers name headers as known_headers spells them: found without folding case. */
	for (size_t k = 0; k < NKNOWN && i < 0; k++)
		if (strcmp(known_headers[k].name, name) == 0)
			i = (int)k;
	if (i < 0)
		i = known_header(name, strlen(name));
	if (i >= 0)
		return req->headers[i];
	return evhttp_find_header(evhttp_request_get_input_headers(req->ev), name);
}

static const struct http_query_param *find_param(const struct http_query_param *p, size_t n,
						 const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(p[i].name, name) == 0)
			return &p[i];
	return NULL;
}

const char *http_query(struct http_request *req, const char *name)
{
	const struct http_query_param *p = find_param(req->query, req->nquery, name);

	return p ? p->value : NULL;
}

const struct token *http_token(const struct http_request *req)
{
	return req->token;
}

const char *http_request_id(const struct http_request *req)
{
	return req->request_id;
}

const char *http_body(struct http_request *req, size_t *len)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req->ev);
	const char *p;

	*len = evbuffer_get_length(in);
	if (*len == 0)
		return "";
	p = (const char *)evbuffer_pullup(in, -1);
	return p ? p : "";
}

static bool is_json_type(const char *ct)
{
	size_t n = strlen("application/json");

	return ct && strncasecmp(ct, "application/json", n) == 0 &&
	       (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ');
}

bool http_body_checked(struct http_request *req, bool allow_empty, const char **text, size_t *len)
{
	*text = http_body(req, len);
	if (*len > HTTP_BODY_MAX) {
		http_reply_problem(req, 413, "payload_too_large", "Request body too large",
				   "the body is %zu bytes; the limit is %d", *len, HTTP_BODY_MAX);
		return false;
	}
	if (*len == 0) {
		if (allow_empty)
			return true;
		http_reply_invalid(req, "a JSON object body is required");
		return false;
	}
	if (!is_json_type(req->headers[H_CONTENT_TYPE])) {
		http_reply_problem(req, 415, "unsupported_media_type", "Unsupported media type",
				   "the body must be sent as Content-Type: application/json");
		return false;
	}
	return true;
}

bool http_body_parse(struct http_request *req, const char *text, size_t len, json_t **out)
{
	json_error_t error;

	*out = len ? json_loadb(text, len, JSON_REJECT_DUPLICATES, &error) : NULL;
	if (len && !*out) {
		char detail[300];
		snprintf(detail, sizeof(detail), "malformed JSON at line %d, column %d: %s",
			 error.line, error.column, error.text);
		http_reply_invalid(req, detail);
		return false;
	}
	return true;
}

bool http_body_json(struct http_request *req, bool allow_empty, json_t **out)
{
	const char *text;
	size_t len;

	*out = NULL;
	return http_body_checked(req, allow_empty, &text, &len) &&
	       http_body_parse(req, text, len, out);
}

/* Percent-decode s in place ('+' is a space); false on a malformed escape or an
 * escaped NUL. */
static bool decode_component(char *s)
{
	char *w = s;

	for (const char *r = s; *r; r++) {
		int hi, lo;

		if (*r == '+') {
			*w++ = ' ';
			continue;
		}
		if (*r != '%') {
			*w++ = *r;
			continue;
		}
		hi = digest_hex_digit(r[1]);
		lo = hi < 0 ? -1 : digest_hex_digit(r[2]);
		if (lo < 0 || (hi == 0 && lo == 0))
			return false;
		*w++ = (char)(hi * 16 + lo);
		r += 2;
	}
	*w = '\0';
	return true;
}

/* Is `name` a word of the space-separated list? */
static bool listed(const char *list, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = list; *p;) {
		size_t len = strcspn(p, " ");
		if (len == n && strncmp(p, name, n) == 0)
			return true;
		p += len;
		p += strspn(p, " ");
	}
	return false;
}

/* `name` for a message: at most 64 characters, each not printable ASCII as '?'. */
static const char *printable(const char *name, char out[65])
{
	size_t i = 0;

	for (; name[i] && i < 64; i++)
		out[i] = name[i] >= 0x20 && name[i] < 0x7f ? name[i] : '?';
	out[i] = '\0';
	return out;
}

int http_query_parse(const char *q, const char *allowed, struct http_query_param **out,
		     size_t *nout, char *err, size_t errlen)
{
	struct http_query_param *params;
	size_t n = 1, len, np = 0;
	char *text, *p, shown[65];

	*out = NULL;
	*nout = 0;
	if (!q || !*q)
		return 0;
	for (const char *c = q; *c; c++)
		n += *c == '&';
	if (n > HTTP_QUERY_PARAMS_MAX) {
		snprintf(err, errlen, "the query string has more than %d parameters",
			 HTTP_QUERY_PARAMS_MAX);
		return -EINVAL;
	}
	len = strlen(q);
	params = malloc(n * sizeof(*params) + len + 1);
	if (!params)
		return -ENOMEM;
	text = memcpy((char *)(params + n), q, len + 1);
	for (p = text; p;) {
		char *pair = strsep(&p, "&"), *value;

		if (!*pair)
			continue;
		value = strchr(pair, '=');
		if (!value) {
			snprintf(err, errlen, "the query string is malformed: '%s' has no '=value'",
				 printable(pair, shown));
			goto fail;
		}
		*value++ = '\0';
		if (!decode_component(pair) || !decode_component(value)) {
			snprintf(err, errlen,
				 "the query string is malformed: a '%%' must be followed "
				 "by two hexadecimal digits (and not encode NUL)");
			goto fail;
		}
		if (find_param(params, np, pair)) {
			snprintf(err, errlen, "query parameter '%s' is given more than once",
				 printable(pair, shown));
			goto fail;
		}
		if (allowed && !listed(allowed, pair)) {
			snprintf(err, errlen, "unknown query parameter '%s'; this route accepts %s",
				 printable(pair, shown), *allowed ? allowed : "none");
			goto fail;
		}
		params[np].name = pair;
		params[np++].value = value;
	}
	if (np == 0) { /* only empty pairs: "&&" */
		free(params);
		params = NULL;
	}
	*out = params;
	*nout = np;
	return 0;
fail:
	free(params);
	return -EINVAL;
}

/* Parse the request's query string into req->query (see http_query_parse); false after
 * replying 400 (or 503). */
static bool parse_query(struct http_request *req, const char *allowed)
{
	const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req->ev));
	char err[256];
	int rc = http_query_parse(q, allowed, &req->query, &req->nquery, err, sizeof(err));

	if (rc == -ENOMEM)
		http_reply_problem(req, 503, "unavailable", "Service unavailable", "out of memory");
	else if (rc != 0)
		http_reply_invalid(req, err);
	return rc == 0;
}

/* Match `path` against a pattern; '*' segments are captured into params. */
static bool match(const char *pattern, const char *path, char params[][PARAM_MAX + 1])
{
	size_t np = 0;

	while (*pattern && *path) {
		if (*pattern == '*') {
			size_t n = strcspn(path, "/");
			if (n == 0 || np == HTTP_MAX_PARAMS)
				return false;
			/* An over-long segment is captured empty, which no id validates. */
			if (n <= PARAM_MAX)
				memcpy(params[np], path, n);
			params[np][n <= PARAM_MAX ? n : 0] = '\0';
			np++;
			path += n;
			pattern++;
		} else if (*pattern++ != *path++) {
			return false;
		}
	}
	return *pattern == '\0' && *path == '\0';
}

static bool valid_request_id(const char *id)
{
	size_t n = 0;

	for (; id[n]; n++)
		if (id[n] < 0x21 || id[n] > 0x7e || n >= REQUEST_ID_MAX)
			return false;
	return n > 0;
}

static void set_request_id(struct http_request *req)
{
	const char *given = req->headers[H_REQUEST_ID];

	if (given && valid_request_id(given)) {
		strcpy(req->request_id, given);
		return;
	}
	http_new_request_id(&req->srv->ids, req->request_id);
}

/* Authenticate; false after replying 401/403. */
static bool authorize(struct http_request *req, unsigned scope)
{
	const char *auth = req->headers[H_AUTHORIZATION];
	const char *secret;

	if (!auth || strncasecmp(auth, "Bearer ", 7) != 0 || !req->srv->cfg.tokens) {
		http_set_header(req, "WWW-Authenticate", "Bearer");
		http_reply_problem(req, 401, "unauthorized", "Authentication required",
				   "send Authorization: Bearer <token>");
		return false;
	}
	secret = auth + 7;
	while (*secret == ' ')
		secret++;
	req->token = tokens_find_memo(req->srv->cfg.tokens, &req->srv->token_memo, secret,
				      strlen(secret));
	if (!req->token) {
		http_set_header(req, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
		http_reply_problem(req, 401, "unauthorized", "Authentication required",
				   "the bearer token is not known");
		return false;
	}
	if ((req->token->scopes & scope) != scope) {
		http_reply_problem(req, 403, "forbidden", "Forbidden",
				   "token '%s' lacks the scope this route needs", req->token->id);
		return false;
	}
	return true;
}

static void serve_healthz(struct http_request *req)
{
	http_reply_raw(req, 200, "application/json", "{\"status\":\"ok\"}", 15);
}

struct http_ready {
	struct http_request *req;
	json_t *checks;    /* name -> "ok" | "unavailable" */
	const char *state; /* see http_ready_state; NULL: none */
	bool ok;
};

void http_ready_check(struct http_ready *r, const char *name, bool ok, const char *why_fmt, ...)
{
	char why[512];
	va_list ap;

	json_object_set_new(r->checks, name, json_string(ok ? "ok" : "unavailable"));
	if (ok)
		return;
	r->ok = false;
	va_start(ap, why_fmt);
	vsnprintf(why, sizeof(why), why_fmt, ap);
	va_end(ap);
	log_msg(r->req->srv->cfg.log, LOG_INFO, r->req->request_id, "not ready: %s: %s", name, why);
}

void http_ready_state(struct http_ready *r, const char *state)
{
	r->state = state;
	r->ok = false;
}

/* /readyz is public: it names each dependency and says "ok" or "unavailable", never why
 * (host names, roles and error texts go to the log). */
static void serve_readyz(struct http_request *req)
{
	struct http_server *srv = req->srv;
	struct http_ready r = { .req = req, .checks = json_object(), .ok = true };
	json_t *body;

	if (!r.checks) {
		http_reply_problem(req, 503, "unavailable", "Not ready", "out of memory");
		return;
	}
	if (srv->cfg.ready)
		srv->cfg.ready(srv->cfg.arg, &r);
	if (r.ok) {
		http_reply_json(req, 200,
				json_pack("{s:s, s:o}", "status", "ready", "checks", r.checks));
		return;
	}
	body = http_problem_json(503, "unavailable", "Not ready",
				 r.state ? r.state : "a dependency is unavailable; see checks");
	json_object_set_new(body, "checks", r.checks);
	if (r.state)
		json_object_set_new(body, "state", json_string(r.state));
	http_set_header(req, "Retry-After", "1");
	reply_problem_json(req, 503, body);
}

static void serve_metrics(struct http_request *req)
{
	struct evbuffer *buf = evbuffer_new();

	if (buf) {
		metrics_render(req->srv->cfg.metrics, buf);
		metrics_render_process(buf);
	}
	http_set_header(req, "Content-Type", "text/plain; version=0.0.4");
	finish(req, 200, buf);
	if (buf)
		evbuffer_free(buf);
}

static const struct {
	const char *path;
	void (*serve)(struct http_request *req);
} builtins[] = {
	{ "/healthz", serve_healthz },
	{ "/readyz", serve_readyz },
	{ "/metrics", serve_metrics },
};

static bool dispatch_builtin(struct http_request *req)
{
	for (size_t i = 0; i < sizeof(builtins) / sizeof(builtins[0]); i++) {
		if (strcmp(req->path, builtins[i].path) != 0)
			continue;
		req->route_name = builtins[i].path;
		if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
			http_set_header(req, "Allow", "GET, HEAD");
			http_reply_problem(req, 405, "method_not_allowed", "Method not allowed",
					   "%s supports GET, HEAD", req->path);
		} else if (parse_query(req, "")) { /* they take no parameters, as SPEC §7 asks */
			builtins[i].serve(req);
		}
		return true;
	}
	return false;
}

/* A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) from an
 * allowed origin, for a path some route serves: 204 with what may be sent. False
 * (nothing answered) otherwise: the router then answers OPTIONS as any other method. */
static bool cors_preflight(struct http_request *req)
{
	const struct http_server_config *cfg = &req->srv->cfg;
	char params[HTTP_MAX_PARAMS][PARAM_MAX + 1];
	char methods[64] = "";

	if (!cors_allowed(req->srv, req->headers[H_ORIGIN]) || !req->headers[H_AC_REQUEST_METHOD])
		return false;
	for (size_t i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (!match(r->pattern, req->path, params) || strstr(methods, r->method))
			continue;
		snprintf(methods + strlen(methods), sizeof(methods) - strlen(methods), "%s%s%s",
			 methods[0] ? ", " : "", r->method,
			 strcmp(r->method, "GET") == 0 ? ", HEAD" : "");
		req->route_name = r->name;
	}
	if (!methods[0])
		return false;
	http_set_header(req, "Access-Control-Allow-Methods", methods);
	http_set_header(req, "Access-Control-Allow-Headers",
			"Authorization, Content-Type, Idempotency-Key, If-Match, If-None-Match, "
			"X-Request-Id, X-Daybook-Min-Position");
	http_set_header(req, "Access-Control-Max-Age", "600");
	finish(req, 204, NULL);
	return true;
}

static void dispatch(struct http_request *req)
{
	const struct http_server_config *cfg = &req->srv->cfg;
	/* HEAD is served by the GET route; finish() leaves the body out. */
	const char *method = strcmp(req->method, "HEAD") == 0 ? "GET" : req->method;
	char allow[64] = "";

	if (dispatch_builtin(req))
		return;
	if (strcmp(req->method, "OPTIONS") == 0 && cors_preflight(req))
		return;
	for (size_t i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (!match(r->pattern, req->path, req->params))
			continue;
		if (strcmp(r->method, method) != 0) {
			snprintf(allow + strlen(allow), sizeof(allow) - strlen(allow), "%s%s%s",
				 allow[0] ? ", " : "", r->method,
				 strcmp(r->method, "GET") == 0 ? ", HEAD" : "");
			req->route_name = r->name;
			continue;
		}
		req->route_name = r->name;
		if (r->scope && !authorize(req, r->scope))
			return;
		if (!parse_query(req, r->query))
			return;
		r->handler(req, cfg->arg);
		return;
	}
	if (allow[0]) {
		http_set_header(req, "Allow", allow);
		http_reply_problem(req, 405, "method_not_allowed", "Method not allowed",
				   "%s supports %s", req->path, allow);
		return;
	}
	req->route_name = "unmatched";
	http_reply_problem(req, 404, "not_found", "Not found", "no route for %s %s", req->method,
			   req->path);
}

static void on_request(struct evhttp_request *ev, void *arg)
{
	struct http_server *srv = arg;
	struct http_request *req = request_new(srv);
	const char *path;
	size_t n;

	if (!req) {
		/* Rewritten into problem details by http_conn.c, as evhttp's own errors are. */
		evhttp_send_error(ev, 503, "Service Unavailable");
		return;
	}
	conns_request_began(srv->conns, ev);
	clock_gettime(CLOCK_MONOTONIC, &req->start);
	req->ev = ev;
	req->srv = srv;
	req->token = NULL;
	req->query = NULL;
	req->nquery = 0;
	req->request_id[0] = '\0';
	for (size_t i = 0; i < HTTP_MAX_PARAMS; i++)
		req->params[i][0] = '\0';
	req->route_name = "unmatched";
	req->method = method_name(evhttp_request_get_command(ev));
	path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(ev));
	if (!path || !*path)
		path = "/";
	n = strnlen(path, sizeof(req->path) - 1);
	if (path[n]) /* longer: cut between characters (the log and problems show it) */
		n = log_text_cut(path, n);
	memcpy(req->path, path, n);
	req->path[n] = '\0';
	srv->inflight++;
	metric_add(srv->inflight_gauge, 1);
	scan_headers(req);
	set_request_id(req);
	dispatch(req);
}

/* A listening socket; with reuse_port several workers may listen on the same port and
 * the kernel spreads the connections among them. -1 with err set on failure. */
static int listen_socket(const char *host, uint16_t port, bool reuse_port, char *err, size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC,
				  .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE },
			*ai = NULL;
	char service[8];
	int fd = -1, one = 1, rc;

	snprintf(service, sizeof(service), "%u", port);
	rc = getaddrinfo(host, service, &hints, &ai);
	if (rc != 0) {
		snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
		return -1;
	}
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
	    (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) ||
	    bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
		snprintf(err, errlen, "cannot listen on %s:%u: %s", host, port, strerror(errno));
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	return fd;
}

int http_server_open(struct http_server **out, const struct http_server_config *cfg,
		     const char *host, uint16_t port, char *err, size_t errlen)
{
	struct http_server *srv = calloc(1, sizeof(*srv));

	*out = NULL;
	if (!srv) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	srv->cfg = *cfg;
	http_request_ids_init(&srv->ids);
	tokens_memo_init(&srv->token_memo);
	srv->inflight_gauge = metrics_get(cfg->metrics, METRIC_GAUGE,
					  "daybook_http_requests_in_flight",
					  "Requests received and not yet answered.", "", NULL, 0);
	srv->evhttp = evhttp_new(cfg->base);
	srv->flush_lines = event_new(cfg->base, -1, 0, flush_access_lines, srv);
	if (!srv->evhttp || !srv->flush_lines) {
		if (srv->evhttp)
			evhttp_free(srv->evhttp);
		if (srv->flush_lines)
			event_free(srv->flush_lines);
		snprintf(err, errlen, "evhttp_new failed");
		free(srv);
		return -ENOMEM;
	}
	/* Over these evhttp answers by itself (400, 413), closing the connection; http_conn.c
	 * rewrites those answers into problem details (431 for the headers). Lingering close
	 * reads a refused body's declared length first, so the client sees the answer. */
	evhttp_set_max_headers_size(srv->evhttp, HTTP_HEADERS_MAX);
	evhttp_set_max_body_size(srv->evhttp, HTTP_BODY_MAX);
	evhttp_set_flags(srv->evhttp, EVHTTP_SERVER_LINGERING_CLOSE);
	/* Backstop for a response that cannot be written; http_conn.c keeps the deadlines
	 * for receiving requests and idling. */
	evhttp_set_timeout(srv->evhttp,
			   (int)((cfg->limits.idle_timeout_ms ? cfg->limits.idle_timeout_ms
							      : CONFIG_IDLE_TIMEOUT_MS_DEFAULT) +
				 999) /
				   1000);
	/* Every method reaches the router, so unknown ones get our 405 with Allow. */
	evhttp_set_allowed_methods(srv->evhttp, 0x1ff);
	evhttp_set_gencb(srv->evhttp, on_request, srv);
	int fd = listen_socket(host, port, cfg->reuse_port, err, errlen);
	srv->bound = fd >= 0 ? evhttp_accept_socket_with_handle(srv->evhttp, fd) : NULL;
	if (!srv->bound) {
		if (fd >= 0) {
			snprintf(err, errlen, "cannot accept on %s:%u", host, port);
			close(fd);
		}
		evhttp_free(srv->evhttp);
		event_free(srv->flush_lines);
		free(srv);
		return -EADDRINUSE;
	}
	struct conns_config ccfg = {
		.log = cfg->log,
		.base = cfg->base,
		.metrics = cfg->metrics,
		.evhttp = srv->evhttp,
		.bound = srv->bound,
		.limits = cfg->limits,
		.workers = cfg->workers,
		.ids = &srv->ids,
	};
	if (conns_open(&srv->conns, &ccfg) != 0) {
		snprintf(err, errlen, "out of memory");
		evhttp_free(srv->evhttp);
		event_free(srv->flush_lines);
		free(srv);
		return -ENOMEM;
	}
	*out = srv;
	return 0;
}

void http_server_stop_accepting(struct http_server *srv)
{
	if (srv->bound) {
		evhttp_del_accept_socket(srv->evhttp, srv->bound);
		srv->bound = NULL;
		conns_stop_accepting(srv->conns);
	}
}

size_t http_server_inflight(const struct http_server *srv)
{
	return srv->inflight;
}

void http_server_close(struct http_server **srv)
{
	if (!*srv)
		return;
	evhttp_free((*srv)->evhttp); /* closes the connections first */
	conns_close(&(*srv)->conns);
	log_buf_flush(&(*srv)->access_lines);
	event_free((*srv)->flush_lines);
	if ((*srv)->spare_body)
		evbuffer_free((*srv)->spare_body);
	while ((*srv)->spare) {
		struct http_request *req = (*srv)->spare;
		(*srv)->spare = req->next_spare;
		free(req);
	}
	free(*srv);
	*srv = NULL;
}
