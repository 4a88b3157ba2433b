/* Integration-test harness: a TCP proxy in front of a test Redis that can lose the reply
 * to one command (the command runs, its client never hears so), or hold a client's
 * commands back from a given point until the test lets them go. */
#include "harness.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"

#define PROXY_LINKS 16
#define PROXY_NEEDLE_MAX 1024

/* Bytes read from one socket and not yet written to the other. */
struct relay {
	char buf[16384];
	size_t len, off;
};

/* One client connection and the proxy's own connection to Redis for it. */
struct link {
	int client, server;          /* -1: the slot is free */
	struct relay up, down;       /* client to server, server to client */
	char tail[PROXY_NEEDLE_MAX]; /* the end of what went up, for a needle split across reads */
	size_t tail_len;
	bool losing; /* the armed command went up: its reply is dropped, the link closed */
	bool held;   /* up's bytes from hold_at on wait for harness_proxy_release */
	size_t hold_at;
};

struct redis_proxy {
	int port, target_port;
	int listener, wake[2];
	pthread_t thread;
	struct link links[PROXY_LINKS];
	pthread_mutex_t lock; /* the fields below, which the test sets and reads */
	char needle[PROXY_NEEDLE_MAX];
	size_t needle_len; /* 0: not armed */
	bool fired;
	char hold[PROXY_NEEDLE_MAX];
	size_t hold_len; /* 0: not armed */
	bool holding, released;
};

static bool set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

static void link_close(struct link *l)
{
	close(l->client);
	close(l->server);
	l->client = l->server = -1;
}

/* A new client: its own connection to Redis, or it is closed at once. */
static void link_accept(struct redis_proxy *p)
{
	struct sockaddr_in to = { .sin_family = AF_INET,
				  .sin_port = htons((uint16_t)p->target_port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int client = accept(p->listener, NULL, NULL), server;
	struct link *l = NULL;

	if (client < 0)
		return;
	for (size_t i = 0; i < PROXY_LINKS && !l; i++)
		if (p->links[i].client < 0)
			l = &p->links[i];
	server = l ? socket(AF_INET, SOCK_STREAM, 0) : -1;
	if (server < 0 || connect(server, (struct sockaddr *)&to, sizeof(to)) != 0 ||
	    !set_nonblocking(client) || !set_nonblocking(server)) {
		if (server >= 0)
			close(server);
		close(client);
		return;
	}
	*l = (struct link){ .client = client, .server = server };
}

/* Whether the armed needle is in chunk or begins in the tail (the last needle_len - 1
 * bytes that went up before it); when it is, the proxy disarms (one shot). */
static bool armed_needle_in(struct redis_proxy *p, struct link *l, const char *chunk, size_t n)
{
	char window[2 * PROXY_NEEDLE_MAX];
	bool found = false;

	pthread_mutex_lock(&p->lock);
	if (p->needle_len) {
		size_t k = p->needle_len - 1, head = n < k ? n : k, w = l->tail_len + head;
		memcpy(window, l->tail, l->tail_len);
		memcpy(window + l->tail_len, chunk, head);
		found = memmem(chunk, n, p->needle, p->needle_len) ||
			memmem(window, w, p->needle, p->needle_len);
		/* The next tail: the last k bytes of tail and chunk (head is all of a short
		 * chunk, so the window ends with them). */
		l->tail_len = n >= k ? k : w < k ? w : k;
		memcpy(l->tail, n >= k ? chunk + n - k : window + w - l->tail_len, l->tail_len);
		if (found)
			p->needle_len = 0;
	}
	pthread_mutex_unlock(&p->lock);
	return found;
}

/* Where the armed hold's needle begins in chunk, if it is there (one shot: the proxy
 * disarms and holds). */
static bool hold_needle_in(struct redis_proxy *p, const char *chunk, size_t n, size_t *at)
{
	const char *found = NULL;

	pthread_mutex_lock(&p->lock);
	if (p->hold_len && (found = memmem(chunk, n, p->hold, p->hold_len))) {
		*at = (size_t)(found - chunk);
		p->hold_len = 0;
		p->holding = true;
	}
	pthread_mutex_unlock(&p->lock);
	return found != NULL;
}

/* Read what from has into an empty relay; false when the link is to be closed. */
static bool relay_read(int from, struct relay *r)
{
	ssize_t n = recv(from, r->buf, sizeof(r->buf), 0);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return true;
	if (n <= 0)
		return false;
	r->len = (size_t)n;
	r->off = 0;
	return true;
}

/* Write what the relay holds, up to end, to to, as much as it takes; false on an
 * error. */
static bool relay_write(int to, struct relay *r, size_t end)
{
	ssize_t n = r->off < end ? send(to, r->buf + r->off, end - r->off, MSG_NOSIGNAL) : 0;

	if (n < 0)
		return errno == EAGAIN || errno == EINTR;
	r->off += (size_t)n;
	if (r->off == r->len)
		r->len = r->off = 0;
	return true;
}

/* One link's turn after poll: up, then down. false when it is to be closed. */
static bool link_serve(struct redis_proxy *p, struct link *l, short client_ev, short server_ev)
{
	if ((client_ev & (POLLIN | POLLHUP | POLLERR)) && !l->up.len) {
		if (!relay_read(l->client, &l->up))
			return false;
		if (l->up.len && hold_needle_in(p, l->up.buf, l->up.len, &l->hold_at))
			l->held = true;
		if (l->up.len && armed_needle_in(p, l, l->up.buf, l->up.len))
			l->losing = true;
	}
	if ((server_ev & POLLOUT) && l->up.len &&
	    !relay_write(l->server, &l->up, l->held ? l->hold_at : l->up.len))
		return false;
	if ((server_ev & (POLLIN | POLLHUP | POLLERR)) && !l->down.len) {
		if (!relay_read(l->server, &l->down))
			return false;
		/* Redis has run the command and answered: the answer is dropped. */
		if (l->down.len && l->losing) {
			pthread_mutex_lock(&p->lock);
			p->fired = true;
			pthread_mutex_unlock(&p->lock);
			return false;
		}
	}
	if ((client_ev & POLLOUT) && l->down.len && !relay_write(l->client, &l->down, l->down.len))
		return false;
	return true;
}

/* The proxy's thread: every link served from one poll() until the wake pipe says stop. A
 * relay that holds bytes waits to write them before its side is read again. No Criterion
 * assertion runs here (it would end the test from a thread that is not the test's): a
 * failure closes the link, and the test sees the effect. */
static void *proxy_run(void *arg)
{
	struct redis_proxy *p = arg;
	struct pollfd fds[2 + 2 * PROXY_LINKS];

	for (;;) {
		nfds_t n = 2;
		char wake = 0;
		pthread_mutex_lock(&p->lock);
		for (size_t i = 0; i < PROXY_LINKS && p->released; i++)
			p->links[i].held = false;
		p->released = false;
		pthread_mutex_unlock(&p->lock);
		fds[0] = (struct pollfd){ .fd = p->wake[0], .events = POLLIN };
		fds[1] = (struct pollfd){ .fd = p->listener, .events = POLLIN };
		for (size_t i = 0; i < PROXY_LINKS; i++) {
			struct link *l = &p->links[i];
			bool live = l->client >= 0;
			/* a held link has nothing to write up until it is released */
			bool up = l->up.len && !(l->held && l->up.off >= l->hold_at);
			fds[n++] =
				(struct pollfd){ .fd = live ? l->client : -1,
						 .events = (short)((l->up.len ? 0 : POLLIN) |
								   (l->down.len ? POLLOUT : 0)) };
			fds[n++] = (struct pollfd){ .fd = live ? l->server : -1,
						    .events = (short)((l->down.len ? 0 : POLLIN) |
								      (up ? POLLOUT : 0)) };
		}
		if (poll(fds, n, -1) < 0 && errno != EINTR) {
			fprintf(stderr, "redis proxy: poll: %s\n", strerror(errno));
			break;
		}
		if (fds[0].revents && (read(p->wake[0], &wake, 1) != 1 || wake == 'x'))
			break;
		if (fds[1].revents & POLLIN)
			link_accept(p);
		for (size_t i = 0; i < PROXY_LINKS; i++) {
			struct link *l = &p->links[i];
			if (l->client >= 0 &&
			    !link_serve(p, l, fds[2 + 2 * i].revents, fds[3 + 2 * i].revents))
				link_close(l);
		}
	}
	return NULL;
}

void harness_proxy_open(struct redis_proxy **out, int target_port)
{
	struct redis_proxy *p = calloc(1, sizeof(*p));
	struct sockaddr_in addr = { .sin_family = AF_INET,
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);

	cr_assert_not_null(p);
	p->target_port = target_port;
	for (size_t i = 0; i < PROXY_LINKS; i++)
		p->links[i].client = p->links[i].server = -1;
	pthread_mutex_init(&p->lock, NULL);
	p->listener = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_geq(p->listener, 0, "proxy socket: %s", strerror(errno));
	cr_assert_eq(bind(p->listener, (struct sockaddr *)&addr, sizeof(addr)), 0, "proxy bind: %s",
		     strerror(errno));
	cr_assert_eq(listen(p->listener, 16), 0, "proxy listen: %s", strerror(errno));
	cr_assert_eq(getsockname(p->listener, (struct sockaddr *)&addr, &len), 0);
	p->port = ntohs(addr.sin_port);
	cr_assert(set_nonblocking(p->listener));
	cr_assert_eq(pipe(p->wake), 0);
	cr_assert_eq(pthread_create(&p->thread, NULL, proxy_run, p), 0);
	*out = p;
}

void harness_proxy_url(const struct redis_proxy *p, const char *url, char *out, size_t len)
{
	struct config_redis addr;

	cr_assert(config_parse_redis(url, &addr) && !addr.master[0] && !addr.path[0],
		  "not a redis://host:port URL: %s", url);
	if (addr.password[0])
		cr_assert_lt((size_t)snprintf(out, len, "redis://%s:%s@127.0.0.1:%d/%d", addr.user,
					      addr.password, p->port, addr.db),
			     len);
	else
		cr_assert_lt((size_t)snprintf(out, len, "redis://127.0.0.1:%d/%d", p->port,
					      addr.db),
			     len);
}

/* Copy needle into an arming's slot and its length, under the lock; *flag is reset. */
static void arm(struct redis_proxy *p, char *slot, size_t *len, bool *flag, const char *needle)
{
	size_t n = strlen(needle);

	cr_assert(n > 0 && n <= PROXY_NEEDLE_MAX, "a needle of %zu bytes", n);
	pthread_mutex_lock(&p->lock);
	memcpy(slot, needle, n);
	*len = n;
	*flag = false;
	pthread_mutex_unlock(&p->lock);
}

void harness_proxy_lose_reply_to(struct redis_proxy *p, const char *needle)
{
	arm(p, p->needle, &p->needle_len, &p->fired, needle);
}

bool harness_proxy_lost_reply(struct redis_proxy *p)
{
	bool fired;

	pthread_mutex_lock(&p->lock);
	fired = p->fired;
	pthread_mutex_unlock(&p->lock);
	return fired;
}

void harness_proxy_hold_at(struct redis_proxy *p, const char *needle)
{
	arm(p, p->hold, &p->hold_len, &p->holding, needle);
}

bool harness_proxy_wait_held(struct redis_proxy *p, double deadline)
{
	bool holding = false;

	while (!holding && harness_now() < deadline) {
		pthread_mutex_lock(&p->lock);
		holding = p->holding;
		pthread_mutex_unlock(&p->lock);
		if (!holding)
			usleep(10 * 1000);
	}
	return holding;
}

void harness_proxy_release(struct redis_proxy *p)
{
	pthread_mutex_lock(&p->lock);
	p->holding = false;
	p->released = true;
	pthread_mutex_unlock(&p->lock);
	cr_assert_eq(write(p->wake[1], "r", 1), 1);
}

void harness_proxy_close(struct redis_proxy **pp)
{
	struct redis_proxy *p = *pp;

	if (!p)
		return;
	cr_assert_eq(write(p->wake[1], "x", 1), 1);
	pthread_join(p->thread, NULL);
	for (size_t i = 0; i < PROXY_LINKS; i++)
		if (p->links[i].client >= 0)
			link_close(&p->links[i]);
	close(p->listener);
	close(p->wake[0]);
	close(p->wake[1]);
	pthread_mutex_destroy(&p->lock);
	free(p);
	*pp = NULL;
}
