/* The bottom of the HTTP server: status reasons, the raw problem-details page the edge
 * sends for evhttp's own answers, and request ids. Used by http.c and http_conn.c; calls
 * neither. */
#ifndef DAYBOOK_HTTP_PROBLEM_H
#define DAYBOOK_HTTP_PROBLEM_H

#include <stddef.h>
#include <stdint.h>

struct evbuffer;

const char *http_status_reason(int status);

/* A problem-details page as one raw HTTP/1.1 response with Connection: close, for the
 * answers evhttp gives itself (a malformed request, headers or body too large). */
void http_problem_page(struct evbuffer *out, int status, size_t received, const char *request_id);

/* A server's request id generator (xorshift64*), shared by its requests and its
 * connections; not thread-safe (one per server, on its loop). */
struct http_request_ids {
	uint64_t rng;
};
/* Seed from getrandom (the clock if that fails). */
void http_request_ids_init(struct http_request_ids *ids);
/* A new request id (16 hex digits) for a request that brought none, or for an answer
 * the edge gives before there is a request (http_conn.c). */
#define HTTP_REQUEST_ID_NEW_LEN 17
void http_new_request_id(struct http_request_ids *ids, char out[HTTP_REQUEST_ID_NEW_LEN]);

#endif
