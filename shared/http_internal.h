/* Internals of the HTTP server shared by http.c (requests) and http_conn.c (connections). */
#ifndef DAYBOOK_HTTP_INTERNAL_H
#define DAYBOOK_HTTP_INTERNAL_H

#include "http.h"

struct evhttp;
struct evhttp_bound_socket;
struct evhttp_request;
struct conns;

struct http_server {
	struct http_server_config cfg;
	struct evhttp *evhttp;
	struct evhttp_bound_socket *bound;
	struct conns *conns;
	size_t inflight;
	uint64_t rng; /* request id generator state (xorshift64*) */
	struct metric *inflight_gauge;
};

/* Track srv's connections from now on (installs evhttp's bufferevent callback and the
 * listener's error callback, so call it after the listener is bound). Caller closes
 * with conns_close after evhttp_free. */
int conns_open(struct conns **out, struct http_server *srv) __attribute__((warn_unused_result));
void conns_close(struct conns **cs);
/* The request's connection is now serving it: no deadline runs, it is never evicted. */
void conns_request_began(struct conns *cs, struct evhttp_request *ev);
/* Send ev's reply (evhttp_send_reply); its connection then idles until the next request. */
void conns_send_reply(struct conns *cs, struct evhttp_request *ev, int status, const char *reason,
		      struct evbuffer *body);
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

/* A problem-details page as one raw HTTP/1.1 response with Connection: close, for the
 * answers evhttp gives itself (a malformed request, headers or body too large). */
void http_problem_page(struct evbuffer *out, int status, size_t received, const char *request_id);
/* A new request id (16 hex digits) for a request that brought none, or for an answer
 * the edge gives before there is a request (http_conn.c). */
#define HTTP_REQUEST_ID_NEW_LEN 17
void http_new_request_id(struct http_server *srv, char out[HTTP_REQUEST_ID_NEW_LEN]);
const char *http_status_reason(int status);

#endif
