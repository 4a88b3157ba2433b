/* HTTP server plumbing on libevent's evhttp: routing, auth, request ids, problem
 * details, the edge's limits (header and body sizes, deadlines, a connection cap),
 * metrics, and the /healthz /readyz /metrics routes. */
#ifndef DAYBOOK_HTTP_H
#define DAYBOOK_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "log.h"
#include "metrics.h"
#include "tokens.h"

#define HTTP_BODY_MAX (64 * 1024)
/* Request line plus header lines, in all. */
#define HTTP_HEADERS_MAX (16 * 1024)
/* Query parameters in one request. */
#define HTTP_QUERY_PARAMS_MAX 32
#define HTTP_MAX_PARAMS 2

struct event_base;
struct http_server;
struct http_request;

/* A handler must end the request with exactly one http_reply_* call, now or later
 * (from another callback): the request stays valid until then, even if the client
 * went away. */
typedef void (*http_handler)(struct http_request *req, void *arg);

struct http_route {
	const char *method;  /* "GET" (which also serves HEAD), "POST" */
	const char *pattern; /* a "*" segment matches one path segment, as in /accounts/{id} */
	const char *name;    /* metrics label, e.g. "/accounts/{id}/deposits" */
	unsigned scope;      /* SCOPE_* the token needs; 0: public */
	http_handler handler;
	/* The query parameters the route accepts, space-separated ("" for none); any other,
	 * a repeated one or a malformed query string is 400 before the handler runs.
	 * NULL: any parameter (still well-formed and not repeated). */
	const char *query;
};

/* What /readyz reports; valid only during the ready callback. */
struct http_ready;
/* Record dependency `name` (a fixed word such as "postgresql") as usable or not. /readyz
 * answers only "ok" or "unavailable" per name: `why_fmt`, the details, goes to the log. */
void http_ready_check(struct http_ready *r, const char *name, bool ok, const char *why_fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* A fixed word (e.g. "standby") for why a healthy service is not ready; /readyz answers
 * it as "state". Makes the service not ready. */
void http_ready_state(struct http_ready *r, const char *state);

struct http_server_config {
	const struct log *log;
	struct event_base *base;
	struct metrics *metrics;
	const struct tokens *tokens; /* may be NULL only when no route needs a scope */
	const struct http_route *routes;
	size_t nroutes;
	/* /readyz: one http_ready_check per dependency; ready when all are ok. */
	void (*ready)(void *arg, struct http_ready *r);
	void *arg;       /* passed to handlers and to ready */
	bool reuse_port; /* SO_REUSEPORT: several workers serve one port */
	/* The process's connection cap and deadlines; zero fields take the defaults
	 * (CONFIG_*_DEFAULT). */
	struct config_http limits;
	/* Servers (workers) of the process sharing the cap: each keeps its share (0: 1). */
	unsigned workers;
	/* Access lines of successful reads (GET or HEAD answered 2xx or 304) at debug
	 * instead of info: for a read API whose requests cost a few microseconds, of which
	 * the line would be a third. Errors and every other answer stay at info (warn for
	 * a 5xx). */
	bool quiet_reads;
};

/* Bind host:port and serve. The config's pointers must outlive the server.
 * On failure writes the reason into err. Caller closes with http_server_close. */
int http_server_open(struct http_server **out, const struct http_server_config *cfg,
		     const char *host, uint16_t port, char *err, size_t errlen)
	__attribute__((warn_unused_result));
/* Stop accepting new connections (SIGTERM); requests in flight continue. */
void http_server_stop_accepting(struct http_server *srv);
/* Requests received and not yet answered. */
size_t http_server_inflight(const struct http_server *srv);
void http_server_close(struct http_server **srv);
/* The decimal digits of v into out (at least 21 bytes), NUL-terminated, without printf
 * (for headers built on every response); their count. */
size_t http_format_u64(char *out, unsigned long long v);

/* Accessors: strings are valid until the request is answered. */
const char *http_param(const struct http_request *req, size_t i); /* i-th '*' segment */
const char *http_method(const struct http_request *req);
const char *http_path(const struct http_request *req);
const char *http_header(const struct http_request *req, const char *name);
/* Query parameter by name, percent-decoded; NULL when absent. The router has already
 * refused a malformed query string, unknown or repeated parameters (400). */
const char *http_query(struct http_request *req, const char *name);
const struct token *http_token(const struct http_request *req); /* NULL on public routes */
const char *http_request_id(const struct http_request *req);
/* The request body, contiguous; *len set. Empty body: "" with *len 0. */
const char *http_body(struct http_request *req, size_t *len);

/* Add a response header before replying. */
void http_set_header(struct http_request *req, const char *name, const char *value);

/* Answer the request; each frees it. http_reply_json steals `body`. */
void http_reply_json(struct http_request *req, int status, json_t *body);
void http_reply_raw(struct http_request *req, int status, const char *content_type,
		    const char *body, size_t len);
/* RFC 9457 problem details: {"type","title","status","detail","code"} (built by
 * http_problem_json); the detail is formatted into at most 1023 bytes, cut between
 * characters. */
void http_reply_problem(struct http_request *req, int status, const char *code, const char *title,
			const char *detail_fmt, ...) __attribute__((format(printf, 5, 6)));
/* The problem-details object, for callers that keep a response to replay it. title and
 * detail may hold any bytes: they are made valid UTF-8 as log_text does (each invalid
 * byte U+FFFD, line breaks one space). New reference (NULL when out of memory): caller
 * must json_decref. */
json_t *http_problem_json(int status, const char *code, const char *title, const char *detail);
/* 400 invalid_request with `detail`. */
void http_reply_invalid(struct http_request *req, const char *detail);

/* Start a streamed (chunked) reply and take the connection over, for a long-lived
 * response such as Server-Sent Events: the status line and headers are sent, the
 * request counts as answered for the server (metrics, in flight, draining), and the
 * caller owns the returned evhttp request: it sends with evhttp_send_reply_chunk and
 * ends with evhttp_send_reply_end, or frees the connection, and learns of the peer
 * closing through evhttp_connection_set_closecb. req is freed. */
struct evhttp_request *http_reply_stream(struct http_request *req, int status,
					 const char *content_type);

/* Parse the JSON body of a POST: false after replying 400/413/415 itself. An empty
 * body gives *out NULL when allow_empty, else 400. Caller must json_decref *out. */
bool http_body_json(struct http_request *req, bool allow_empty, json_t **out)
	__attribute__((warn_unused_result));
/* The same in two steps, for a caller that may read the text itself: the checks
 * (false after replying 400/413/415; *text and *len the body, len 0 for an empty one
 * when allow_empty), then jansson's parse of it (false after replying 400; *out NULL
 * for an empty body). */
bool http_body_checked(struct http_request *req, bool allow_empty, const char **text, size_t *len)
	__attribute__((warn_unused_result));
bool http_body_parse(struct http_request *req, const char *text, size_t len, json_t **out)
	__attribute__((warn_unused_result));

#endif
