/* The connections of an HTTP server: a cap on how many are open (idle ones are closed
 * first to make room), a deadline for receiving a request and another for idling
 * between requests, problem details in place of evhttp's own error pages, and a
 * listener that pauses instead of spinning when the process runs out of descriptors.
 *
 * evhttp (libevent 2.1) has no hook for an accepted connection but the bufferevent
 * callback: that is where a connection is counted. Its evhttp_connection is learnt at
 * the end of the same loop turn ("adoption"), from the bufferevent's callback argument,
 * which evhttp sets to the connection (checked against evhttp_connection_get_bufferevent);
 * from then on evhttp tells us of its end through the close callback. Every connection is
 * in exactly one list: fresh (not adopted yet), idle, receiving or busy.
 *
 * Answers leave at the end of the loop turn that made them (on_flush), not a turn later
 * when epoll reports the socket writable, and each adopted connection keeps a second
 * read interest on its descriptor (the guard) while evhttp pauses reading during a
 * request: the descriptor's epoll registration then stays as it is from one request to
 * the next, where evhttp alone would remove it at each request and add it back at each
 * answer (two or three epoll_ctl calls a request).
 *
 * The read path's shortcuts (our own read, take_over_reads, and the guard) reach into
 * libevent's struct bufferevent (event2/bufferevent_struct.h) and rely on its evmap
 * running a descriptor's events in the order last added first: both as libevent 2.1
 * has them (struct event and struct bufferevent have not changed since 2.1.3-alpha).
 * They are built only against 2.1 (from 2.1.8-stable, its first stable release), and
 * used only when the library loaded at run time is one too and a socket bufferevent's
 * read event is found where the header says, with the callback, argument and flags
 * libevent gives it (shortcuts_check), and each connection's read event still has
 * that callback when it is taken over; otherwise, or with DAYBOOK_HTTP_LIBEVENT_READS=1,
 * connections are read by libevent's own read path as evhttp alone would (one line in
 * the log says so, once a process). */
#include "http_conn.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>

/* The libevent versions (event_get_version_number's form) whose internals the read
 * path's shortcuts were written for: 2.1, from 2.1.8-stable. */
#define SHORTCUTS_FROM 0x02010800
#define SHORTCUTS_UNTIL 0x02020000
#if LIBEVENT_VERSION_NUMBER >= SHORTCUTS_FROM && LIBEVENT_VERSION_NUMBER < SHORTCUTS_UNTIL
#define SHORTCUTS_BUILT 1
#include <event2/bufferevent_struct.h>
#else
#define SHORTCUTS_BUILT 0
#endif

/* A listener paused by EMFILE is re-armed this often. */
#define RESUME_MS 250
/* A connection is closed to make room only once it has been idle (or sending its
 * request) this long: a keep-alive client between two requests is not idle in any
 * useful sense, and closing it only makes it reconnect and close another in turn. */
#define EVICT_AFTER_MS 1000
/* What read_in asks of the socket at most: evbuffer_read's own limit. */
#define READ_MAX 4096
/* The first read of a request: room for a usual one in a chunk that, with evbuffer's
 * header, stays under 1 KiB (malloc serves those from its per-thread cache). */
#define READ_FIRST 896

enum conn_state {
	CONN_FRESH,     /* accepted this turn, not adopted yet */
	CONN_IDLE,      /* no request in progress */
	CONN_RECEIVING, /* a request is arriving: the header deadline runs */
	CONN_BUSY,      /* a handler has the request: no deadline, never evicted */
};

struct conn;

struct conn_list {
	struct conn *head, *tail; /* oldest first */
};

struct conn {
	struct conns *owner;
	struct bufferevent *bev;
	struct evhttp_connection *evcon; /* NULL until adopted */
	struct event *timer;             /* the deadline; also runs the error-page rewrite */
	/* Read interest kept on fd; see on_guard. NULL: none (the shortcuts are off, or it
	 * could not be added) */
	struct event *guard;
	struct evbuffer_cb_entry *in_cb, *out_cb;
	enum conn_state state;
	long long since_ms; /* when it entered its state (monotonic) */
	evutil_socket_t fd;
	size_t received;         /* bytes of the request in progress */
	size_t error_at;         /* where evhttp's own error page starts in the output */
	bool error_page;         /* evhttp wrote one: rewrite it before it is sent */
	bool receiving_deadline; /* the timer runs the header deadline (else the idle one) */
	bool rewriting;
	bool flush_pending; /* an answer waits for the end of the turn (on_flush) */
	struct conn *prev, *next;
};

struct conns {
	const struct log *log;
	struct event_base *base;
	struct evhttp_bound_socket *bound; /* NULL once the server stops accepting */
	struct http_request_ids *ids;
	struct event *adopt;        /* end of an accepting turn */
	struct event *resume;       /* re-arms a listener that EMFILE paused */
	struct event *flush;        /* end of a turn that answered: writes the answers */
	evutil_socket_t *flush_fds; /* the connections it writes, by descriptor */
	size_t nflush, flush_cap;
	struct conn_list lists[4]; /* by enum conn_state */
	size_t count;
	size_t max;
	struct timeval header_timeout, idle_timeout;
	long long evict_after_ms; /* EVICT_AFTER_MS, or less with shorter deadlines */
	struct conn **by_fd;      /* adopted connections by descriptor */
	size_t nby_fd;
	bool replying; /* our own reply is being written: not an error page */
	/* New connections take the read path's shortcuts (see the top of this file), whose
	 * read events have libevent's socket read callback, libevent_readcb. */
	bool shortcuts;
	event_callback_fn libevent_readcb;
	struct metric *m_open, *m_evicted, *m_timed_out, *m_refused;
	struct metric *m_written_in_parts, *m_read_paused;
};

static void list_push(struct conn_list *l, struct conn *c)
{
	c->next = NULL;
	c->prev = l->tail;
	if (l->tail)
		l->tail->next = c;
	else
		l->head = c;
	l->tail = c;
}

static void list_remove(struct conn_list *l, struct conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		l->head = c->next;
	if (c->next)
		c->next->prev = c->prev;
	else
		l->tail = c->prev;
	c->prev = c->next = NULL;
}

/* A cheap monotonic clock (the coarse one is a vDSO read): milliseconds. */
static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_state(struct conn *c, enum conn_state state)
{
	list_remove(&c->owner->lists[c->state], c);
	c->state = state;
	list_push(&c->owner->lists[state], c);
	c->since_ms = now_ms();
}

static struct timeval ms_to_tv(unsigned ms)
{
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };
	return tv;
}

/* Forget c: it is closed, or will be served untracked. */
static void conn_free(struct conn *c)
{
	struct conns *cs = c->owner;

	list_remove(&cs->lists[c->state], c);
	if (c->fd >= 0 && (size_t)c->fd < cs->nby_fd && cs->by_fd[c->fd] == c)
		cs->by_fd[c->fd] = NULL;
	if (c->in_cb)
		evbuffer_remove_cb_entry(bufferevent_get_input(c->bev), c->in_cb);
	if (c->out_cb)
		evbuffer_remove_cb_entry(bufferevent_get_output(c->bev), c->out_cb);
	if (c->timer)
		event_free(c->timer);
	if (c->guard)
		event_free(c->guard);
	cs->count--;
	metric_add(cs->m_open, -1);
	free(c);
}

static void become_idle(struct conn *c)
{
	c->received = 0;
	set_state(c, CONN_IDLE);
	evtimer_add(c->timer, &c->owner->idle_timeout);
	c->receiving_deadline = false;
}

/* The request must have arrived whole by the header deadline. */
static void start_header_deadline(struct conn *c)
{
	evtimer_add(c->timer, &c->owner->header_timeout);
	c->receiving_deadline = true;
}

static void on_close(struct evhttp_connection *evcon, void *arg)
{
	(void)evcon;
	conn_free(arg);
}

/* Bytes arrived: the first of a request starts its deadline. */
static void on_input(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct conn *c = arg;

	(void)buf;
	if (info->n_added == 0)
		return;
	c->received += info->n_added;
	if (c->state != CONN_IDLE)
		return;
	set_state(c, CONN_RECEIVING);
	/* A new connection's deadline already runs, since its accept. */
	if (!c->receiving_deadline)
		start_header_deadline(c);
}

/* Output we did not write: evhttp answering by itself (or a 100 Continue). It is
 * rewritten before the loop turns to writing sockets. */
static void on_output(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct conn *c = arg;

	(void)buf;
	if (info->n_added == 0 || c->state == CONN_BUSY || c->state == CONN_FRESH ||
	    c->owner->replying || c->rewriting || c->error_page)
		return;
	c->error_page = true;
	c->error_at = info->orig_size;
	event_active(c->timer, EV_TIMEOUT, 0);
}

/* The status of the response that starts at `at` in out; 0 if unreadable. */
static int status_at(struct evbuffer *out, size_t at)
{
	char line[13];
	struct evbuffer_ptr pos;

	if (evbuffer_ptr_set(out, &pos, at, EVBUFFER_PTR_SET) != 0 ||
	    evbuffer_copyout_from(out, &pos, line, sizeof(line) - 1) !=
		    (ev_ssize_t)sizeof(line) - 1)
		return 0;
	line[sizeof(line) - 1] = '\0';
	if (strncmp(line, "HTTP/1.", 7) != 0 || line[8] != ' ')
		return 0;
	return atoi(line + 9);
}

static void rewrite_error_page(struct conn *c)
{
	struct evbuffer *out = bufferevent_get_output(c->bev), *keep = NULL;
	char request_id[HTTP_REQUEST_ID_NEW_LEN];
	int status;

	c->error_page = false;
	/* The socket bufferevent keeps its output's front frozen after its first write (it
	 * thaws it only while it writes): on a keep-alive connection that has answered,
	 * reading the status, removing and draining would all fail, and evhttp's own page
	 * would go out. Thawed for the rewrite, frozen again after, as libevent leaves it. */
	evbuffer_unfreeze(out, 1);
	status = status_at(out, c->error_at);
	if (status < 400) {
		evbuffer_freeze(out, 1);
		start_header_deadline(c); /* a 100 Continue: the body is still to come */
		return;
	}
	c->rewriting = true;
	keep = c->error_at > 0 ? evbuffer_new() : NULL;
	if (c->error_at > 0 &&
	    (!keep || evbuffer_remove_buffer(out, keep, c->error_at) != (int)c->error_at)) {
		/* What came before the page cannot be kept apart: cut the connection rather
		 * than send evhttp's page. */
		evbuffer_freeze(out, 1);
		c->rewriting = false;
		if (keep)
			evbuffer_free(keep);
		evhttp_connection_free(c->evcon); /* on_close frees c */
		return;
	}
	evbuffer_drain(out, evbuffer_get_length(out));
	if (keep)
		evbuffer_add_buffer(out, keep);
	http_new_request_id(c->owner->ids, request_id);
	http_problem_page(out, status, c->received, request_id);
	evbuffer_freeze(out, 1);
	c->rewriting = false;
	if (keep)
		evbuffer_free(keep);
	/* evhttp closes the connection once this is written; the deadline is a backstop. */
	evtimer_add(c->timer, &c->owner->idle_timeout);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;
	struct conns *cs = c->owner;

	(void)fd;
	(void)what;
	if (c->error_page) {
		rewrite_error_page(c);
		return;
	}
	if (c->state == CONN_BUSY || c->state == CONN_FRESH)
		return;
	if (c->state == CONN_IDLE && evbuffer_get_length(bufferevent_get_output(c->bev)) > 0) {
		/* Still writing a response: evhttp's write timeout guards that. */
		evtimer_add(c->timer, &cs->idle_timeout);
		return;
	}
	log_msg(cs->log, LOG_DEBUG, NULL, "closing a connection %s",
		c->state == CONN_RECEIVING ? "that did not send its request in time"
					   : "idle too long");
	metric_add(cs->m_timed_out, 1);
	evhttp_connection_free(c->evcon); /* on_close frees c */
}

/* Whether c has been in its state for at least the eviction floor. */
static bool evictable(const struct conns *cs, const struct conn *c, long long now)
{
	return now - c->since_ms >= cs->evict_after_ms;
}

/* The connection to close to make room: the oldest idle one other than `except` idle for
 * at least the floor, else the oldest still receiving its request for that long, else
 * `except` itself (the newcomer is refused). Never a busy one, nor a keep-alive client
 * between requests: a flood of newcomers is refused rather than served by closing
 * active clients one after another. */
static struct conn *victim(struct conns *cs, struct conn *except)
{
	long long now = now_ms();

	/* Oldest first: once one is too young, so is every one after it. */
	for (struct conn *c = cs->lists[CONN_IDLE].head; c && evictable(cs, c, now); c = c->next)
		if (c != except && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
			return c;
	if (cs->lists[CONN_RECEIVING].head && evictable(cs, cs->lists[CONN_RECEIVING].head, now))
		return cs->lists[CONN_RECEIVING].head;
	return except;
}

/* Put the guard back, behind nothing: libevent runs a descriptor's events in the order
 * last added first, and the guard must see the bufferevent still reading (and so do
 * nothing) before the bufferevent's own callback takes the request in. With the
 * bufferevent's read interest on, this changes nothing in epoll. */
static void rearm_guard(struct conn *c)
{
	if (!c->guard)
		return;
	event_del(c->guard);
	if (event_add(c->guard, NULL) != 0) {
		event_free(c->guard);
		c->guard = NULL;
	}
}

/* The process's connections are read by libevent's own read path from now on (those
 * already taken over keep theirs): the first time, the log says why. */
static void shortcuts_off(struct conns *cs, enum log_level level, const char *why)
{
	static atomic_bool said;

	cs->shortcuts = false;
	if (!atomic_exchange(&said, true))
		log_msg(cs->log, level, NULL,
			"HTTP connections are read by libevent's own read path (%s): one ioctl and "
			"up to two epoll_ctl more a request",
			why);
}

#if SHORTCUTS_BUILT
/* The guard: a second read interest on an adopted connection's descriptor, so that its
 * epoll registration does not change when evhttp stops reading during a request and
 * starts again after the answer. Its callback does nothing while the bufferevent reads
 * (the bytes are the bufferevent's); when it does not (a request is being served) and
 * the descriptor is readable, more bytes or the peer's close came early: level-triggered
 * epoll would report them at every turn, so the guard steps back until the answer is
 * queued (conns_send_reply puts it back). */
static void on_guard(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	(void)fd;
	(void)what;
	if (!(c->bev->enabled & EV_READ)) { /* bufferevent_get_enabled, without its lock */
		event_del(c->guard);
		metric_add(c->owner->m_read_paused, 1);
	}
}

/* One readv of at most `size` bytes into in (its end unfrozen); the bytes read, or -1
 * with errno. */
static ssize_t read_some(evutil_socket_t fd, struct evbuffer *in, size_t size)
{
	struct evbuffer_iovec room[2];
	struct iovec iov[2];
	int nroom = evbuffer_reserve_space(in, (ev_ssize_t)size, room, 2);
	size_t left;
	ssize_t n;
	int used = 0;

	if (nroom <= 0) {
		errno = ENOMEM;
		return -1;
	}
	for (int i = 0; i < nroom; i++)
		iov[i] = (struct iovec){ room[i].iov_base, room[i].iov_len };
	n = readv(fd, iov, nroom);
	if (n <= 0)
		return n;
	for (left = (size_t)n; used < nroom && left > 0; used++) {
		room[used].iov_len = room[used].iov_len < left ? room[used].iov_len : left;
		left -= room[used].iov_len;
	}
	if (evbuffer_commit_space(in, room, used) != 0) {
		errno = ENOMEM; /* the bytes are gone from the socket: the connection ends */
		return -1;
	}
	return n;
}

/* The read of a server connection's bufferevent without evbuffer_read's ioctl(FIONREAD),
 * a system call before every read that only sizes it: a readv into the room reserved
 * (and one more when that filled it), then what the bufferevent's own read callback does
 * for a connection without watermarks or rate limits (evhttp sets neither): the data
 * callback, or the event callback with EOF, error or timeout after reading stops. arg
 * is the bufferevent. */
static void read_in(evutil_socket_t fd, short what, void *arg)
{
	struct bufferevent *bev = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	size_t size = evbuffer_get_length(in) ? READ_MAX : READ_FIRST;
	short error = BEV_EVENT_READING;
	ssize_t n;

	bufferevent_incref(bev);
	if (what == EV_TIMEOUT) {
		error |= BEV_EVENT_TIMEOUT;
		goto fail;
	}
	/* The socket bufferevent keeps its input's end frozen but while it reads. */
	evbuffer_unfreeze(in, 0);
	n = read_some(fd, in, size);
	/* A request larger than the first room: its rest now, not a turn later (an end of
	 * file or error here shows at the next read, after these bytes). */
	if (n == (ssize_t)size && size == READ_FIRST)
		(void)read_some(fd, in, READ_MAX);
	evbuffer_freeze(in, 0);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		goto done;
	if (n <= 0) {
		error |= n == 0 ? BEV_EVENT_EOF : BEV_EVENT_ERROR;
		goto fail;
	}
	bufferevent_trigger(bev, EV_READ, 0);
	goto done;
fail:
	bufferevent_disable(bev, EV_READ);
	bufferevent_trigger_event(bev, error, 0);
done:
	bufferevent_decref(bev);
}

/* Point the bufferevent's read event at read_in and give c its guard; false, with
 * nothing changed, when the shortcuts are off or the event is not one libevent's socket
 * read callback would serve c with (the shortcuts are then turned off). libevent 2.1
 * has no call for it, but the event is in struct bufferevent
 * (event2/bufferevent_struct.h); bufferevent_setfd would point it back at libevent's
 * own callback, which reads as before. */
static bool take_over_reads(struct conn *c)
{
	struct conns *cs = c->owner;
	struct bufferevent *bev = c->bev;
	struct event *ev = &bev->ev_read;
	bool pending;

	if (!cs->shortcuts)
		return false;
	if (event_get_callback(ev) != cs->libevent_readcb || event_get_callback_arg(ev) != bev ||
	    event_get_fd(ev) != c->fd) {
		shortcuts_off(cs, LOG_WARN,
			      "a connection's read event is not libevent's socket read event");
		return false;
	}
	pending = event_pending(ev, EV_READ, NULL);
	event_del(ev);
	event_assign(ev, cs->base, c->fd, EV_READ | EV_PERSIST | EV_FINALIZE, read_in, bev);
	if (pending)
		event_add(ev, evutil_timerisset(&bev->timeout_read) ? &bev->timeout_read : NULL);
	/* Without a guard the connection works as evhttp alone would. */
	c->guard = event_new(cs->base, c->fd, EV_READ | EV_PERSIST, on_guard, c);
	rearm_guard(c);
	return true;
}

/* Whether the fields of struct bufferevent the shortcuts use (ev_read, ev_write,
 * enabled, timeout_read) are where event2/bufferevent_struct.h says, holding what
 * libevent puts there, on a socket bufferevent made for the purpose. If so, its read
 * event's callback, libevent's socket read callback (a static function), goes into
 * cs->libevent_readcb for take_over_reads to compare with. */
static bool layout_as_built(struct conns *cs)
{
	struct bufferevent *probe = bufferevent_socket_new(cs->base, -1, 0);
	struct event *rd, *wr;
	struct timeval tv = { 7, 0 };
	bool ok;

	if (!probe)
		return false;
	rd = &probe->ev_read;
	wr = &probe->ev_write;
	ok = event_get_base(rd) == cs->base && event_get_base(wr) == cs->base &&
	     event_get_fd(rd) == -1 && event_get_fd(wr) == -1 &&
	     event_get_callback_arg(rd) == probe && event_get_callback_arg(wr) == probe &&
	     event_get_events(rd) == (EV_READ | EV_PERSIST | EV_FINALIZE) &&
	     event_get_events(wr) == (EV_WRITE | EV_PERSIST | EV_FINALIZE) &&
	     event_get_callback(rd) && event_get_callback(rd) != event_get_callback(wr) &&
	     probe->enabled == bufferevent_get_enabled(probe) &&
	     bufferevent_set_timeouts(probe, &tv, NULL) == 0 &&
	     probe->timeout_read.tv_sec == tv.tv_sec && probe->timeout_read.tv_usec == 0;
	if (ok)
		cs->libevent_readcb = event_get_callback(rd);
	bufferevent_free(probe);
	return ok;
}

/* Whether the process may take the shortcuts: set cs->shortcuts (see the top). */
static void shortcuts_check(struct conns *cs, bool refused)
{
	ev_uint32_t loaded = event_get_version_number();
	char why[160];

	cs->shortcuts = true;
	if (refused) {
		shortcuts_off(cs, LOG_INFO, "DAYBOOK_HTTP_LIBEVENT_READS=1");
	} else if (!conns_libevent_fits(loaded)) {
		snprintf(why, sizeof(why), "libevent %s is loaded; built for 2.1, against %s",
			 event_get_version(), LIBEVENT_VERSION);
		shortcuts_off(cs, LOG_WARN, why);
	} else if (!layout_as_built(cs)) {
		shortcuts_off(cs, LOG_WARN,
			      "a socket bufferevent is not as event2/bufferevent_struct.h says");
	}
}

/* The descriptor of c's bufferevent: bufferevent_getfd's answer for a socket
 * bufferevent, without its lock and call. */
static evutil_socket_t bev_fd(const struct conns *cs, struct bufferevent *bev)
{
	return cs->shortcuts ? event_get_fd(&bev->ev_read) : bufferevent_getfd(bev);
}
#else
static bool take_over_reads(struct conn *c)
{
	(void)c;
	return false;
}

static void shortcuts_check(struct conns *cs, bool refused)
{
	shortcuts_off(cs, refused ? LOG_INFO : LOG_WARN,
		      refused ? "DAYBOOK_HTTP_LIBEVENT_READS=1"
			      : "built against libevent " LIBEVENT_VERSION ", not 2.1");
}

static evutil_socket_t bev_fd(const struct conns *cs, struct bufferevent *bev)
{
	(void)cs;
	return bufferevent_getfd(bev);
}
#endif

bool conns_libevent_fits(unsigned long version)
{
	return SHORTCUTS_BUILT && version >= SHORTCUTS_FROM && version < SHORTCUTS_UNTIL;
}

static int index_fd(struct conns *cs, struct conn *c)
{
	if ((size_t)c->fd >= cs->nby_fd) {
		size_t n = cs->nby_fd ? cs->nby_fd : 64;
		struct conn **grown;

		while (n <= (size_t)c->fd)
			n *= 2;
		grown = realloc(cs->by_fd, n * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		memset(grown + cs->nby_fd, 0, (n - cs->nby_fd) * sizeof(*grown));
		cs->by_fd = grown;
		cs->nby_fd = n;
	}
	cs->by_fd[c->fd] = c;
	return 0;
}

/* Learn c's evhttp_connection; false when c is gone or cannot be tracked (then freed). */
static bool adopt(struct conn *c)
{
	bufferevent_data_cb readcb = NULL;
	void *cbarg = NULL;
	struct evhttp_connection *evcon;
	struct bufferevent *bev = c->bev;

	bufferevent_getcb(bev, &readcb, NULL, NULL, &cbarg);
	evcon = cbarg;
	if (!readcb || !evcon || evhttp_connection_get_bufferevent(evcon) != bev)
		goto fail;
	c->evcon = evcon;
	c->fd = bufferevent_getfd(bev);
	if (c->fd < 0 || index_fd(c->owner, c) != 0)
		goto fail;
	evhttp_connection_set_closecb(evcon, on_close, c);
	(void)take_over_reads(c); /* else read as evhttp alone would */
	become_idle(c);
	/* A new connection has the header deadline to send its first request whole. */
	start_header_deadline(c);
	bufferevent_decref(bev);
	return true;
fail:
	c->fd = -1;
	conn_free(c);
	bufferevent_decref(bev); /* frees it if evhttp already let go */
	return false;
}

static void make_room(struct conns *cs, struct conn *c)
{
	while (cs->count > cs->max) {
		struct conn *v = victim(cs, c);
		bool itself = v == c;

		metric_add(itself ? cs->m_refused : cs->m_evicted, 1);
		evhttp_connection_free(v->evcon); /* on_close frees v */
		if (itself)
			return;
	}
}

static void on_adopt(evutil_socket_t fd, short what, void *arg)
{
	struct conns *cs = arg;
	struct conn *c;

	(void)fd;
	(void)what;
	while ((c = cs->lists[CONN_FRESH].head))
		if (adopt(c))
			make_room(cs, c);
}

/* evhttp's bufferevent callback: a connection was just accepted. */
static struct bufferevent *new_connection(struct event_base *base, void *arg)
{
	struct conns *cs = arg;
	struct conn *c = calloc(1, sizeof(*c));
	struct bufferevent *bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);

	if (!c || !bev)
		goto fail;
	c->timer = evtimer_new(base, on_timer, c);
	c->in_cb = evbuffer_add_cb(bufferevent_get_input(bev), on_input, c);
	c->out_cb = evbuffer_add_cb(bufferevent_get_output(bev), on_output, c);
	if (!c->timer || !c->in_cb || !c->out_cb)
		goto fail;
	c->owner = cs;
	c->bev = bev;
	c->fd = -1;
	c->state = CONN_FRESH;
	list_push(&cs->lists[CONN_FRESH], c);
	cs->count++;
	metric_add(cs->m_open, 1);
	bufferevent_incref(bev); /* until adopted, in case evhttp gives up on it first */
	event_active(cs->adopt, EV_TIMEOUT, 0);
	return bev;
fail:
	/* Served, but not counted; evhttp makes its own bufferevent. */
	if (c && c->timer)
		event_free(c->timer);
	free(c);
	if (bev)
		bufferevent_free(bev);
	return NULL;
}

/* The connection on fd, if it is still evcon's. */
static struct conn *at_fd(struct conns *cs, evutil_socket_t fd, struct evhttp_connection *evcon)
{
	struct conn *c = fd >= 0 && (size_t)fd < cs->nby_fd ? cs->by_fd[fd] : NULL;

	return c && c->evcon == evcon ? c : NULL;
}

/* Write c's answer now. Written whole, evhttp learns it as from the bufferevent's own
 * write callback (the request ends; the connection reads again, or closes); otherwise
 * the bufferevent, whose write interest is still on, writes the rest or meets the
 * error when epoll reports the socket. */
static void flush_one(struct conns *cs, struct conn *c)
{
	struct evbuffer *out = bufferevent_get_output(c->bev);
	int n;

	/* The socket bufferevent keeps its output's front frozen but while it writes. */
	evbuffer_unfreeze(out, 1);
	n = evbuffer_write(out, c->fd);
	evbuffer_freeze(out, 1);
	if (n <= 0 || evbuffer_get_length(out) > 0) {
		metric_add(cs->m_written_in_parts, 1);
		return;
	}
	bufferevent_trigger(c->bev, EV_WRITE, 0); /* may end the connection, and c */
}

/* The end of a turn that answered: write each answer (see flush_one). */
static void on_flush(evutil_socket_t fd, short what, void *arg)
{
	struct conns *cs = arg;

	(void)fd;
	(void)what;
	for (size_t i = 0; i < cs->nflush; i++) {
		struct conn *c = (size_t)cs->flush_fds[i] < cs->nby_fd ? cs->by_fd[cs->flush_fds[i]]
								       : NULL;
		if (!c || !c->flush_pending)
			continue;
		c->flush_pending = false;
		flush_one(cs, c);
	}
	cs->nflush = 0;
}

/* Have c's answer written at the end of this turn; false if it cannot be (no memory):
 * the bufferevent then writes it as usual. */
static bool schedule_flush(struct conns *cs, struct conn *c)
{
	if (c->flush_pending)
		return true;
	if (cs->nflush == cs->flush_cap) {
		size_t cap = cs->flush_cap ? 2 * cs->flush_cap : 64;
		evutil_socket_t *grown = realloc(cs->flush_fds, cap * sizeof(*grown));
		if (!grown)
			return false;
		cs->flush_fds = grown;
		cs->flush_cap = cap;
	}
	if (cs->nflush == 0)
		event_active(cs->flush, EV_TIMEOUT, 0);
	cs->flush_fds[cs->nflush++] = c->fd;
	c->flush_pending = true;
	return true;
}

/* accept() failed for a reason other than a transient one: most likely EMFILE or
 * ENFILE. The listening socket stays readable, so pause it instead of spinning; the
 * resume timer re-arms it. */
static void on_accept_error(struct evconnlistener *lev, void *arg)
{
	(void)arg;
	evconnlistener_disable(lev);
}

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
	struct conns *cs = arg;

	(void)fd;
	(void)what;
	if (cs->bound)
		evconnlistener_enable(evhttp_bound_socket_get_listener(cs->bound));
}

/* The limits of cfg, with the default for each zero field. */
static struct config_http limits_of(const struct conns_config *cfg)
{
	struct config_http l = cfg->limits;

	if (!l.max_connections)
		l.max_connections = CONFIG_MAX_CONNECTIONS_DEFAULT;
	if (!l.header_timeout_ms)
		l.header_timeout_ms = CONFIG_HEADER_TIMEOUT_MS_DEFAULT;
	if (!l.idle_timeout_ms)
		l.idle_timeout_ms = CONFIG_IDLE_TIMEOUT_MS_DEFAULT;
	return l;
}

/* This server's share of the process's cap (limits_of's), within what the descriptor
 * limit allows. */
static size_t cap(const struct conns_config *cfg, const struct config_http *limits)
{
	size_t max = limits->max_connections;
	size_t workers = cfg->workers ? cfg->workers : 1;
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
		size_t room = rl.rlim_cur > 2 * CONFIG_FD_HEADROOM
				      ? (size_t)rl.rlim_cur - CONFIG_FD_HEADROOM
				      : (size_t)rl.rlim_cur / 2;
		if (max > room) {
			log_msg(cfg->log, LOG_WARN, NULL,
				"at most %zu connections: the descriptor limit (ulimit -n) is %llu",
				room, (unsigned long long)rl.rlim_cur);
			max = room;
		}
	}
	return (max + workers - 1) / workers;
}

/* The eviction floor: EVICT_AFTER_MS, or half the shorter deadline (of limits_of's)
 * when that is less. */
static long long evict_after_ms(const struct config_http *limits)
{
	long long header = limits->header_timeout_ms, idle = limits->idle_timeout_ms;
	long long shorter = header < idle ? header : idle;

	return shorter / 2 < EVICT_AFTER_MS ? shorter / 2 : EVICT_AFTER_MS;
}

/* Every connection's deadline is one of two durations: libevent keeps such "common"
 * timeouts in a queue, O(1) to re-arm, instead of its heap. */
static int common_timeout(struct conns *cs, unsigned ms, struct timeval *out)
{
	struct timeval tv = ms_to_tv(ms);
	const struct timeval *common = event_base_init_common_timeout(cs->base, &tv);

	if (!common)
		return -ENOMEM;
	*out = *common;
	return 0;
}

static void make_metrics(struct conns *cs, struct metrics *m)
{
	const char *help = "Client connections closed by the server, by reason.";

	cs->m_open = metrics_get(m, METRIC_GAUGE, "daybook_http_connections_open",
				 "Client connections open.", "", NULL, 0);
	cs->m_evicted = metrics_get(m, METRIC_COUNTER, "daybook_http_connections_closed_total",
				    help, "reason=\"evicted\"", NULL, 0);
	cs->m_refused = metrics_get(m, METRIC_COUNTER, "daybook_http_connections_closed_total",
				    help, "reason=\"refused\"", NULL, 0);
	cs->m_timed_out = metrics_get(m, METRIC_COUNTER, "daybook_http_connections_closed_total",
				      help, "reason=\"deadline\"", NULL, 0);
	cs->m_written_in_parts = metrics_get(
		m, METRIC_COUNTER, "daybook_http_answers_written_in_parts_total",
		"Answers not written whole at the end of the turn that made them (a full socket, or "
		"more pieces than one writev takes): the rest went as the socket drained.",
		"", NULL, 0);
	cs->m_read_paused =
		metrics_get(m, METRIC_COUNTER, "daybook_http_read_interest_paused_total",
			    "Requests during which a connection's socket left epoll: bytes or the client's "
			    "close came before the answer.",
			    "", NULL, 0);
}

int conns_open(struct conns **out, const struct conns_config *cfg)
{
	struct conns *cs = calloc(1, sizeof(*cs));
	struct config_http limits = limits_of(cfg);
	struct timeval every = ms_to_tv(RESUME_MS);

	*out = NULL;
	if (!cs)
		return -ENOMEM;
	cs->log = cfg->log;
	cs->base = cfg->base;
	cs->bound = cfg->bound;
	cs->ids = cfg->ids;
	cs->max = cap(cfg, &limits);
	if (common_timeout(cs, limits.header_timeout_ms, &cs->header_timeout) != 0 ||
	    common_timeout(cs, limits.idle_timeout_ms, &cs->idle_timeout) != 0)
		goto fail;
	cs->evict_after_ms = evict_after_ms(&limits);
	make_metrics(cs, cfg->metrics);
	shortcuts_check(cs, limits.libevent_reads);
	cs->adopt = event_new(cfg->base, -1, 0, on_adopt, cs);
	cs->resume = event_new(cfg->base, -1, EV_PERSIST, on_resume, cs);
	cs->flush = event_new(cfg->base, -1, 0, on_flush, cs);
	if (!cs->adopt || !cs->resume || !cs->flush)
		goto fail;
	evtimer_add(cs->resume, &every);
	evhttp_set_bevcb(cfg->evhttp, new_connection, cs);
	evconnlistener_set_error_cb(evhttp_bound_socket_get_listener(cfg->bound), on_accept_error);
	*out = cs;
	return 0;
fail:
	conns_close(&cs);
	return -ENOMEM;
}

void conns_close(struct conns **csp)
{
	struct conns *cs = *csp;
	struct conn *c;

	if (!cs)
		return;
	/* evhttp_free closed the adopted ones; the fresh ones hold a reference. */
	while ((c = cs->lists[CONN_FRESH].head)) {
		struct bufferevent *bev = c->bev;
		conn_free(c);
		bufferevent_decref(bev);
	}
	/* None is left (evhttp_free reported every close), but if one were, its bufferevent
	 * would be gone: forget it without touching that. */
	for (int s = CONN_IDLE; s <= CONN_BUSY; s++)
		while ((c = cs->lists[s].head)) {
			c->in_cb = c->out_cb = NULL;
			conn_free(c);
		}
	if (cs->adopt)
		event_free(cs->adopt);
	if (cs->resume)
		event_free(cs->resume);
	if (cs->flush)
		event_free(cs->flush);
	free(cs->flush_fds);
	free(cs->by_fd);
	free(cs);
	*csp = NULL;
}

void conns_stop_accepting(struct conns *cs)
{
	cs->bound = NULL;
}

static struct conn *find(struct conns *cs, struct evhttp_request *ev)
{
	struct evhttp_connection *evcon = evhttp_request_get_connection(ev);
	struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
	evutil_socket_t fd = bev ? bev_fd(cs, bev) : -1;
	struct conn *c;

	if (fd < 0 || (size_t)fd >= cs->nby_fd)
		return NULL;
	c = cs->by_fd[fd];
	return c && c->evcon == evcon ? c : NULL;
}

void conns_request_began(struct conns *cs, struct evhttp_request *ev)
{
	struct conn *c = find(cs, ev);

	if (!c)
		return;
	evtimer_del(c->timer);
	set_state(c, CONN_BUSY);
}

void conns_stream_began(struct conns *cs, struct evhttp_request *ev)
{
	struct conn *c = find(cs, ev);

	/* A stream is long-lived, has its own cap (the feed's DAYBOOK_MAX_STREAMS) and its
	 * new owner takes the close callback over: the edge lets the connection go now (no
	 * deadline, no guard, no longer counted), or its slot would never be given back. */
	if (!c)
		return;
	evhttp_connection_set_closecb(c->evcon, NULL, NULL);
	conn_free(c);
}

void conns_send_reply(struct conns *cs, struct evhttp_request *ev, int status, const char *reason,
		      struct evbuffer *body)
{
	struct conn *c = find(cs, ev);
	struct evhttp_connection *evcon = c ? c->evcon : NULL;
	evutil_socket_t fd = c ? c->fd : -1;

	cs->replying = true;
	evhttp_send_reply(ev, status, reason, body);
	cs->replying = false;
	/* Looked up again: sending may have ended the connection. */
	c = at_fd(cs, fd, evcon);
	if (!c || c->state != CONN_BUSY)
		return;
	/* evhttp has turned reading on to hear of a close while it writes: its read event is
	 * back on, added last, in front of the guard. The guard goes back in front here,
	 * however the answer is then written (whole by on_flush, or in parts by the
	 * bufferevent), and if it stepped back during the request. */
	rearm_guard(c);
	become_idle(c);
	(void)schedule_flush(cs, c);
}
