/* Internals of the HTTP server (http.c), for its tests: the server itself and the query
 * string parser. The connections are http_conn.h's; ids and raw problem pages are
 * http_problem.h's. */
#ifndef DAYBOOK_HTTP_INTERNAL_H
#define DAYBOOK_HTTP_INTERNAL_H

#include "http.h"
#include "http_conn.h"
#include "http_problem.h"

struct evhttp;
struct evhttp_bound_socket;
struct conns;

#define HTTP_SERIES_MEMO 16

/* The two series a (method, route, status) counts into, looked up once. */
struct http_series {
	const char *method, *route; /* static strings: compared by address */
	int status;
	struct metric *count, *duration;
};

struct http_server {
	struct http_server_config cfg;
	/* Per-response work done once: the series of the last answers, the Date header of
	 * this second, and the last bearer secret that matched a token, by its fingerprint
	 * (tokens are loaded once for the process's life, so a match stays one). */
	struct http_series series[HTTP_SERIES_MEMO];
	size_t nseries, next_series;
	long long date_at;
	char date[40];
	struct tokens_memo token_memo;
	/* Answered requests kept for the next ones (up to HTTP_REQUESTS_KEPT). */
	struct http_request *spare;
	size_t nspare;
	struct evbuffer *spare_body; /* an empty response body buffer, or NULL */
	struct evhttp *evhttp;
	struct evhttp_bound_socket *bound;
	struct conns *conns;
	size_t inflight;
	struct http_request_ids ids;
	struct metric *inflight_gauge;
	struct log_buf access_lines; /* this loop's access lines not yet written */
	struct event *flush_lines;   /* writes them, after the callbacks that answered */
};

struct http_query_param {
	const char *name, *value; /* percent-decoded */
};

/* Split and decode the query string q (NULL or "": none), checking it against `allowed`
 * (see struct http_route). Empty pairs ("a=1&&b=2") are skipped; a pair without '=', a
 * bad escape, %00, a repeated or unlisted name, or more than HTTP_QUERY_PARAMS_MAX pairs
 * is -EINVAL with the problem (naming it, printable) in err; -ENOMEM. On success *out
 * is one allocation holding the *n pairs and their text (caller frees; NULL if none). */
int http_query_parse(const char *q, const char *allowed, struct http_query_param **out, size_t *n,
		     char *err, size_t errlen) __attribute__((warn_unused_result));

#endif
