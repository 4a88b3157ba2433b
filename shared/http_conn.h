/* The connections of an HTTP server (http_conn.c): the cap, the deadlines, problem
 * details in place of evhttp's own error pages. Used by http.c; calls only down, into
 * http_problem.c. */
#ifndef DAYBOOK_HTTP_CONN_H
#define DAYBOOK_HTTP_CONN_H

#include "config.h"
#include "http_problem.h"
#include "log.h"
#include "metrics.h"

struct event_base;
struct evbuffer;
struct evhttp;
struct evhttp_bound_socket;
struct evhttp_request;
struct conns;

/* What the connections need of their server. The pointers must outlive the conns. */
struct conns_config {
	const struct log *log;
	struct event_base *base;
	struct metrics *metrics;
	struct evhttp *evhttp;
	struct evhttp_bound_socket *bound; /* the listener, already bound */
	/* The cap and deadlines (max_connections, header_timeout_ms, idle_timeout_ms); zero
	 * fields take the defaults (CONFIG_*_DEFAULT). libevent_reads: no read shortcuts. */
	struct config_http limits;
	unsigned workers;             /* servers sharing the cap (0: 1) */
	struct http_request_ids *ids; /* the server's, for the ids of the edge's own answers */
};

/* Track cfg->evhttp's connections from now on (installs evhttp's bufferevent callback and
 * the listener's error callback, so call it after the listener is bound). Caller closes
 * with conns_close after evhttp_free. */
int conns_open(struct conns **out, const struct conns_config *cfg)
	__attribute__((warn_unused_result));
void conns_close(struct conns **cs);
/* The listener is gone (evhttp_del_accept_socket): never re-arm it. */
void conns_stop_accepting(struct conns *cs);
/* The request's connection is now serving it: no deadline runs, it is never evicted. */
void conns_request_began(struct conns *cs, struct evhttp_request *ev);
/* The request's connection now carries a stream (evhttp_send_reply_start) whose owner
 * takes the connection's close callback over: it leaves the cap (and the open gauge)
 * here, streams having their own cap. */
void conns_stream_began(struct conns *cs, struct evhttp_request *ev);
/* Send ev's reply (evhttp_send_reply); its connection then idles until the next request.
 * The reply is written at the end of this loop turn. */
void conns_send_reply(struct conns *cs, struct evhttp_request *ev, int status, const char *reason,
		      struct evbuffer *body);
/* Whether the libevent of `version` (in event_get_version_number's form) is one whose
 * internals the read path's shortcuts were written for, and they were built in. */
bool conns_libevent_fits(unsigned long version);

#endif
