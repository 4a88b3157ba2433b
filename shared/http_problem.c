/* Problem details and request ids below the HTTP server: the status reasons, the
 * problem-details object, the raw page the edge answers with in place of evhttp's own,
 * and the request id generator. http.c and http_conn.c call this; it calls neither. */
#include "http_problem.h"
#include "http.h"
#include "log.h"

#include <event2/buffer.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

const char *http_status_reason(int status)
{
	switch (status) {
	case 200:
		return "OK";
	case 201:
		return "Created";
	case 204:
		return "No Content";
	case 304:
		return "Not Modified";
	case 400:
		return "Bad Request";
	case 401:
		return "Unauthorized";
	case 403:
		return "Forbidden";
	case 404:
		return "Not Found";
	case 405:
		return "Method Not Allowed";
	case 409:
		return "Conflict";
	case 412:
		return "Precondition Failed";
	case 413:
		return "Content Too Large";
	case 415:
		return "Unsupported Media Type";
	case 431:
		return "Request Header Fields Too Large";
	case 422:
		return "Unprocessable Content";
	case 500:
		return "Internal Server Error";
	case 503:
		return "Service Unavailable";
	default:
		return "Status";
	}
}

json_t *http_problem_json(int status, const char *code, const char *title, const char *detail)
{
	/* Every problem body is built here, and its texts may hold a client's bytes (a
	 * path, a field name): made valid UTF-8 here (each invalid byte U+FFFD), which
	 * jansson requires; a refused string would leave the body without its members. */
	json_t *title_text = log_text(title), *detail_text = log_text(detail);
	char type[128];

	if (!title_text || !detail_text) {
		json_decref(title_text);
		json_decref(detail_text);
		return NULL;
	}
	snprintf(type, sizeof(type), "https://daybook.dev/problems/%s", code);
	return json_pack("{s:s, s:o, s:i, s:o, s:s}", "type", type, "title", title_text, "status",
			 status, "detail", detail_text, "code", code);
}

void http_problem_page(struct evbuffer *out, int status, size_t received, const char *request_id)
{
	const char *code = "invalid_request", *title = "Invalid request";
	char detail[160];
	json_t *body;
	char *text;

	snprintf(detail, sizeof(detail), "the request is malformed");
	if (status == 400 && received > HTTP_HEADERS_MAX) {
		status = 431;
		code = "headers_too_large";
		title = "Request header fields too large";
		snprintf(detail, sizeof(detail), "the request line and headers exceed %d bytes",
			 HTTP_HEADERS_MAX);
	} else if (status == 413) {
		code = "payload_too_large";
		title = "Request body too large";
		snprintf(detail, sizeof(detail),
			 "the body exceeds %d bytes (or its chunked encoding is malformed)",
			 HTTP_BODY_MAX);
	} else if (status != 400) {
		code = status >= 500 ? "unavailable" : "invalid_request";
		title = http_status_reason(status);
		snprintf(detail, sizeof(detail), "the request could not be served");
	}
	body = http_problem_json(status, code, title, detail);
	if (body)
		json_object_set_new(body, "instance", json_string(request_id));
	text = body ? json_dumps(body, JSON_COMPACT) : NULL;
	json_decref(body);
	evbuffer_add_printf(out,
			    "HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
			    "Content-Length: %zu\r\nX-Request-Id: %s\r\n%sConnection: close\r\n\r\n%s",
			    status, http_status_reason(status), text ? strlen(text) : 2, request_id,
			    status == 503 ? "Retry-After: 1\r\n" : "", text ? text : "{}");
	free(text);
}

void http_request_ids_init(struct http_request_ids *ids)
{
	if (getrandom(&ids->rng, sizeof(ids->rng), 0) != sizeof(ids->rng) || ids->rng == 0)
		ids->rng = (uint64_t)time(NULL) | 1;
}

void http_new_request_id(struct http_request_ids *ids, char out[HTTP_REQUEST_ID_NEW_LEN])
{
	static const char hex[] = "0123456789abcdef";
	uint64_t x = ids->rng;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	ids->rng = x;
	x *= 0x2545F4914F6CDD1DULL;
	for (int i = 15; i >= 0; i--, x >>= 4) /* "%016llx", without printf (every request) */
		out[i] = hex[x & 15];
	out[16] = '\0';
}
