/* HTTP server plumbing on libevent's evhttp: routing, auth, request ids, problem
 * details, body limits, metrics, and the /healthz /readyz /metrics routes. */
#include "http.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netdb.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>
#include <time.h>

/* evhttp's own limit only guards memory; bodies between HTTP_BODY_MAX and this get
 * our problem-details 413, larger ones evhttp's plain 413. */
#define EVHTTP_BODY_LIMIT (1024 * 1024)
#define PARAM_MAX 256
#define REQUEST_ID_MAX 128

struct http_server {
	struct http_server_config cfg;
	struct evhttp *evhttp;
	struct evhttp_bound_socket *bound;
	size_t inflight;
	uint64_t rng; /* request id generator state (xorshift64*) */
	struct metric *inflight_gauge;
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
	struct evkeyvalq query;
	bool query_parsed;
};

static const char *status_reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 201: return "Created";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 409: return "Conflict";
	case 412: return "Precondition Failed";
	case 413: return "Content Too Large";
	case 415: return "Unsupported Media Type";
	case 422: return "Unprocessable Content";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	default: return "Status";
	}
}

static const char *method_name(enum evhttp_cmd_type cmd)
{
	switch (cmd) {
	case EVHTTP_REQ_GET: return "GET";
	case EVHTTP_REQ_POST: return "POST";
	case EVHTTP_REQ_HEAD: return "HEAD";
	case EVHTTP_REQ_PUT: return "PUT";
	case EVHTTP_REQ_DELETE: return "DELETE";
	case EVHTTP_REQ_OPTIONS: return "OPTIONS";
	case EVHTTP_REQ_TRACE: return "TRACE";
	case EVHTTP_REQ_CONNECT: return "CONNECT";
	case EVHTTP_REQ_PATCH: return "PATCH";
	default: return "UNKNOWN";
	}
}

static double elapsed(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

static void record(struct http_request *req, int status)
{
	struct metrics *m = req->srv->cfg.metrics;
	char labels[300];
	double secs = elapsed(&req->start);

	snprintf(labels, sizeof(labels), "method=\"%s\",route=\"%s\",status=\"%d\"", req->method,
		 req->route_name, status);
	metric_add(metrics_get(m, METRIC_COUNTER, "daybook_http_requests_total",
			       "HTTP requests answered, by route and status.", labels, NULL, 0),
		   1);
	metric_observe(metrics_get(m, METRIC_HISTOGRAM, "daybook_http_request_duration_seconds",
				   "Time from request to response, by route and status.", labels,
				   metrics_latency_buckets, metrics_latency_buckets_len),
		       secs);
	if (status >= 500)
		log_msg(req->srv->cfg.log, LOG_WARN, req->request_id, "%s %s -> %d (%.3f ms)",
			req->method, req->path, status, secs * 1e3);
	else
		log_msg(req->srv->cfg.log, LOG_DEBUG, req->request_id, "%s %s -> %d (%.3f ms)",
			req->method, req->path, status, secs * 1e3);
}

static void finish(struct http_request *req, int status, struct evbuffer *body)
{
	struct http_server *srv = req->srv;

	record(req, status);
	http_set_header(req, "X-Request-Id", req->request_id);
	evhttp_send_reply(req->ev, status, status_reason(status), body);
	if (req->query_parsed)
		evhttp_clear_headers(&req->query);
	free(req);
	srv->inflight--;
	metric_add(srv->inflight_gauge, -1); /* shared by a process's workers: add, never set */
}

void http_set_header(struct http_request *req, const char *name, const char *value)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req->ev);

	evhttp_remove_header(h, name);
	evhttp_add_header(h, name, value);
}

void http_reply_raw(struct http_request *req, int status, const char *content_type,
		    const char *body, size_t len)
{
	struct evbuffer *buf = evbuffer_new();

	if (buf)
		evbuffer_add(buf, body, len);
	http_set_header(req, "Content-Type", content_type);
	finish(req, status, buf);
	if (buf)
		evbuffer_free(buf);
}

void http_reply_json(struct http_request *req, int status, json_t *body)
{
	char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;

	json_decref(body);
	if (!text) {
		static const char oom[] = "{\"type\":\"about:blank\",\"title\":\"Internal error\","
					  "\"status\":500,\"detail\":\"out of memory\",\"code\":\"internal\"}";
		http_reply_raw(req, 500, "application/problem+json", oom, sizeof(oom) - 1);
		return;
	}
	http_reply_raw(req, status, "application/json", text, strlen(text));
	free(text);
}

json_t *http_problem_json(int status, const char *code, const char *title, const char *detail)
{
	char type[128];

	snprintf(type, sizeof(type), "https://daybook.dev/problems/%s", code);
	return json_pack("{s:s, s:s, s:i, s:s, s:s}", "type", type, "title", title, "status", status,
			 "detail", detail, "code", code);
}

void http_reply_problem(struct http_request *req, int status, const char *code, const char *title,
			const char *detail_fmt, ...)
{
	char detail[1024];
	va_list ap;
	json_t *body;
	char *text;

	va_start(ap, detail_fmt);
	vsnprintf(detail, sizeof(detail), detail_fmt, ap);
	va_end(ap);
	body = http_problem_json(status, code, title, detail);
	text = body ? json_dumps(body, JSON_COMPACT) : NULL;
	json_decref(body);
	if (status == 503)
		http_set_header(req, "Retry-After", "1");
	if (text) {
		http_reply_raw(req, status, "application/problem+json", text, strlen(text));
		free(text);
	} else {
		http_reply_raw(req, status, "application/problem+json", "{}", 2);
	}
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

const char *http_header(const struct http_request *req, const char *name)
{
	return evhttp_find_header(evhttp_request_get_input_headers(req->ev), name);
}

const char *http_query(struct http_request *req, const char *name)
{
	if (!req->query_parsed) {
		const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req->ev));
		req->query.tqh_first = NULL;
		req->query.tqh_last = &req->query.tqh_first;
		if (q && evhttp_parse_query_str(q, &req->query) != 0)
			evhttp_clear_headers(&req->query);
		req->query_parsed = true;
	}
	return evhttp_find_header(&req->query, name);
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

bool http_body_json(struct http_request *req, bool allow_empty, json_t **out)
{
	json_error_t error;
	size_t len;
	const char *body = http_body(req, &len);

	*out = NULL;
	if (len > HTTP_BODY_MAX) {
		http_reply_problem(req, 413, "payload_too_large", "Request body too large",
				   "the body is %zu bytes; the limit is %d", len, HTTP_BODY_MAX);
		return false;
	}
	if (len == 0) {
		if (allow_empty)
			return true;
		http_reply_invalid(req, "a JSON object body is required");
		return false;
	}
	if (!is_json_type(http_header(req, "Content-Type"))) {
		http_reply_problem(req, 415, "unsupported_media_type", "Unsupported media type",
				   "the body must be sent as Content-Type: application/json");
		return false;
	}
	*out = json_loadb(body, len, JSON_REJECT_DUPLICATES, &error);
	if (!*out) {
		char detail[300];
		snprintf(detail, sizeof(detail), "malformed JSON at line %d, column %d: %s", error.line,
			 error.column, error.text);
		http_reply_invalid(req, detail);
		return false;
	}
	return true;
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
	const char *given = http_header(req, "X-Request-Id");
	uint64_t x;

	if (given && valid_request_id(given)) {
		strcpy(req->request_id, given);
		return;
	}
	x = req->srv->rng;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	req->srv->rng = x;
	snprintf(req->request_id, sizeof(req->request_id), "%016llx",
		 (unsigned long long)(x * 0x2545F4914F6CDD1DULL));
}

/* Authenticate; false after replying 401/403. */
static bool authorize(struct http_request *req, unsigned scope)
{
	const char *auth = http_header(req, "Authorization");
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
	req->token = tokens_find(req->srv->cfg.tokens, secret, strlen(secret));
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

static void serve_readyz(struct http_request *req)
{
	char why[256] = "";
	struct http_server *srv = req->srv;

	if (!srv->cfg.ready || srv->cfg.ready(srv->cfg.arg, why, sizeof(why)))
		http_reply_raw(req, 200, "application/json", "{\"status\":\"ready\"}", 18);
	else
		http_reply_problem(req, 503, "unavailable", "Not ready", "%s", why);
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
		if (strcmp(req->method, "GET") != 0) {
			http_set_header(req, "Allow", "GET");
			http_reply_problem(req, 405, "method_not_allowed", "Method not allowed",
					   "%s supports GET", req->path);
		} else {
			builtins[i].serve(req);
		}
		return true;
	}
	return false;
}

static void dispatch(struct http_request *req)
{
	const struct http_server_config *cfg = &req->srv->cfg;
	char allow[64] = "";

	if (dispatch_builtin(req))
		return;
	for (size_t i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (!match(r->pattern, req->path, req->params))
			continue;
		if (strcmp(r->method, req->method) != 0) {
			snprintf(allow + strlen(allow), sizeof(allow) - strlen(allow), "%s%s",
				 allow[0] ? ", " : "", r->method);
			req->route_name = r->name;
			continue;
		}
		req->route_name = r->name;
		if (r->scope && !authorize(req, r->scope))
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
	struct http_request *req = calloc(1, sizeof(*req));
	const char *path;

	if (!req) {
		evhttp_send_error(ev, 503, "Service Unavailable");
		return;
	}
	clock_gettime(CLOCK_MONOTONIC, &req->start);
	req->ev = ev;
	req->srv = srv;
	req->route_name = "unmatched";
	req->method = method_name(evhttp_request_get_command(ev));
	path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(ev));
	snprintf(req->path, sizeof(req->path), "%s", path && *path ? path : "/");
	srv->inflight++;
	metric_add(srv->inflight_gauge, 1);
	set_request_id(req);
	dispatch(req);
}

/* A listening socket; with reuse_port several workers may listen on the same port and
 * the kernel spreads the connections among them. -1 with err set on failure. */
static int listen_socket(const char *host, uint16_t port, bool reuse_port, char *err,
			 size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE }, *ai = NULL;
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
	if (getrandom(&srv->rng, sizeof(srv->rng), 0) != sizeof(srv->rng) || srv->rng == 0)
		srv->rng = (uint64_t)time(NULL) | 1;
	srv->inflight_gauge = metrics_get(cfg->metrics, METRIC_GAUGE, "daybook_http_requests_in_flight",
					  "Requests received and not yet answered.", "", NULL, 0);
	srv->evhttp = evhttp_new(cfg->base);
	if (!srv->evhttp) {
		snprintf(err, errlen, "evhttp_new failed");
		free(srv);
		return -ENOMEM;
	}
	evhttp_set_max_body_size(srv->evhttp, EVHTTP_BODY_LIMIT);
	evhttp_set_timeout(srv->evhttp, 60);
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
		free(srv);
		return -EADDRINUSE;
	}
	*out = srv;
	return 0;
}

void http_server_stop_accepting(struct http_server *srv)
{
	if (srv->bound) {
		evhttp_del_accept_socket(srv->evhttp, srv->bound);
		srv->bound = NULL;
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
	evhttp_free((*srv)->evhttp);
	free(*srv);
	*srv = NULL;
}
