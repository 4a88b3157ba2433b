/* Redis on the event loop: one hiredis async connection that reconnects by itself,
 * with per-command deadlines, Lua scripts by EVALSHA, and a subscriber mode. */
#include "redis.h"
#include "clock.h"

#include <errno.h>
#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BACKOFF_MIN 0.05
#define BACKOFF_MAX 2.0
#define SHA1_HEX 40
#define EVAL_ARGV_STACK 16
#define SENTINEL_TIMEOUT 0.3

enum redis_state {
	REDIS_DOWN,        /* waiting to reconnect */
	REDIS_DISCOVERING, /* asking a Sentinel for the primary (r->sac) */
	REDIS_CONNECTING,  /* connecting and running the setup commands */
	REDIS_READY,
	REDIS_CLOSING,
};

struct script {
	struct redis *r;
	char sha[SHA1_HEX + 1];
};

/* A command awaiting its reply, in send order: the head is the oldest. */
struct pending {
	struct pending *prev, *next;
	struct redis *r;
	redis_reply_cb cb;
	void *arg;
	double sent;
	char *cmd; /* redis_eval: the formatted EVALSHA, kept for a NOSCRIPT retry */
	size_t cmdlen;
	size_t script;
	bool retried;
};

struct redis {
	struct redis_config cfg;
	struct config_redis server;
	redisAsyncContext *ac;  /* NULL while down */
	redisAsyncContext *sac; /* the Sentinel being asked, while REDIS_DISCOVERING */
	size_t sentinel_at;     /* offset in server.sentinels of the next one to ask */
	enum redis_state state;
	struct event *timer;    /* reconnect backoff; connect timeout */
	struct event *deadline; /* the oldest pending reply's deadline */
	double backoff;
	int setup_left;      /* setup replies still expected */
	long long client_id; /* CLIENT ID of this connection (cfg.client_id), 0 until known */
	struct script *scripts;
	struct pending *head, *tail;
	size_t npending;
	char error[256];
};

static void start_connect(struct redis *r);
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Which connection a log line is about. */
static const char *label(const struct redis *r)
{
	return r->cfg.name ? r->cfg.name : r->cfg.subscribe ? "subscriber" : "client";
}

static void arm(struct event *ev, double secs)
{
	struct timeval tv = { (time_t)secs, (suseconds_t)((secs - (double)(time_t)secs) * 1e6) };

	evtimer_add(ev, &tv);
}

/* The connection is gone (or must go). free_ac: we drop it ourselves, which runs every
 * pending callback with NULL; otherwise hiredis is already tearing it down. */
static void lose(struct redis *r, const char *why, bool free_ac)
{
	redisAsyncContext *ac = r->ac;
	bool was_ready = r->state == REDIS_READY;

	if (!ac)
		return;
	snprintf(r->error, sizeof(r->error), "%s", why && *why ? why : "connection lost");
	if (was_ready || r->backoff >= BACKOFF_MAX)
		log_warn(r->cfg.log, "redis (%s): connection lost: %s", label(r), r->error);
	r->ac = NULL;
	r->state = REDIS_DOWN;
	r->client_id = 0;
	evtimer_del(r->deadline);
	arm(r->timer, r->backoff);
	r->backoff = r->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : r->backoff * 2;
	if (free_ac)
		redisAsyncFree(ac);
}

static const char *ac_error(const redisAsyncContext *ac)
{
	return ac->errstr && *ac->errstr ? ac->errstr : "connection closed";
}

static void unlink_pending(struct redis *r, struct pending *p)
{
	if (p->prev)
		p->prev->next = p->next;
	else
		r->head = p->next;
	if (p->next)
		p->next->prev = p->prev;
	else
		r->tail = p->prev;
	p->prev = p->next = NULL;
	r->npending--;
}

static void link_pending(struct redis *r, struct pending *p)
{
	p->sent = mono_now();
	p->prev = r->tail;
	p->next = NULL;
	if (r->tail)
		r->tail->next = p;
	else
		r->head = p;
	r->tail = p;
	r->npending++;
	if (!evtimer_pending(r->deadline, NULL))
		arm(r->deadline, r->cfg.command_timeout);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct redis *r = arg;
	double age;

	(void)fd;
	(void)what;
	if (!r->head || r->state != REDIS_READY)
		return;
	age = mono_now() - r->head->sent;
	if (age >= r->cfg.command_timeout) {
		char why[96];
		snprintf(why, sizeof(why), "no reply within %.0f ms", r->cfg.command_timeout * 1e3);
		lose(r, why, true);
		return;
	}
	arm(r->deadline, r->cfg.command_timeout - age);
}

/* The command that runs a script by its SHA1 (sha) or by its source: the _RO forms
 * for a read-only client, whose ACL user may run nothing else. */
static const char *eval_name(const struct redis *r, bool sha)
{
	if (r->cfg.read_only)
		return sha ? "EVALSHA_RO" : "EVAL_RO";
	return sha ? "EVALSHA" : "EVAL";
}

/* Past one bulk string ("$<len>\r\n<bytes>\r\n") of a formatted command. */
static const char *skip_bulk(const char *p)
{
	size_t len = (size_t)strtoul(p + 1, NULL, 10);

	return strstr(p, "\r\n") + 2 + len + 2;
}

/* Resend an EVALSHA (EVALSHA_RO) that met NOSCRIPT as EVAL (EVAL_RO) with the script's
 * source, for the same pending entry. */
static bool retry_as_eval(struct redis *r, struct pending *p)
{
	const char *src = r->cfg.scripts[p->script], *name = eval_name(r, false);
	size_t srclen = strlen(src), head, n, len;
	const char *rest;
	char *cmd;
	int rc;

	/* "*N\r\n" "$7\r\nEVALSHA\r\n" "$40\r\n<sha>\r\n" <keys and arguments>: the
	 * same head, the name and the source instead of the first two bulk strings. */
	head = (size_t)(strstr(p->cmd, "\r\n") - p->cmd) + 2;
	rest = skip_bulk(skip_bulk(p->cmd + head));
	n = p->cmdlen - (size_t)(rest - p->cmd);
	cmd = malloc(head + 48 + srclen + n);
	if (!cmd)
		return false;
	memcpy(cmd, p->cmd, head);
	len = head +
	      (size_t)sprintf(cmd + head, "$%zu\r\n%s\r\n$%zu\r\n", strlen(name), name, srclen);
	memcpy(cmd + len, src, srclen);
	memcpy(cmd + len + srclen, "\r\n", 2);
	memcpy(cmd + len + srclen + 2, rest, n);
	p->retried = true;
	rc = redisAsyncFormattedCommand(r->ac, on_reply, p, cmd, len + srclen + 2 + n);
	free(cmd);
	if (rc != REDIS_OK)
		return false;
	link_pending(r, p);
	return true;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct pending *p = privdata;
	struct redis *r = p->r;
	const redisReply *rep = reply;

	unlink_pending(r, p);
	/* A NULL reply means hiredis is tearing the connection down. */
	if (!rep && ac == r->ac)
		lose(r, ac_error(ac), false);
	if (rep && rep->type == REDIS_REPLY_ERROR && p->cmd && !p->retried && ac == r->ac &&
	    strncmp(rep->str, "NOSCRIPT", 8) == 0) {
		log_info(r->cfg.log, "redis (%s): script cache lost; running the script with EVAL",
			 label(r));
		if (retry_as_eval(r, p))
			return; /* the EVAL's reply comes back here */
	}
	if (p->cb)
		p->cb(p->arg, rep);
	redisFreeCommand(p->cmd);
	free(p);
	/* Sentinel demoted this server to a replica while we were connected: find the
	 * new primary. */
	if (rep && rep->type == REDIS_REPLY_ERROR && r->server.master[0] && ac == r->ac &&
	    strncmp(rep->str, "READONLY", 8) == 0)
		lose(r, "the server is no longer the primary (READONLY)", true);
}

static void setup_step_done(struct redis *r)
{
	if (--r->setup_left > 0)
		return;
	r->state = REDIS_READY;
	r->backoff = BACKOFF_MIN;
	r->error[0] = '\0';
	evtimer_del(r->timer);
	log_info(r->cfg.log, "redis (%s): connected", label(r));
	if (r->cfg.on_ready)
		r->cfg.on_ready(r->cfg.arg);
}

/* A setup reply: true when it is the current connection's and all is well. */
static bool setup_reply_ok(struct redis *r, redisAsyncContext *ac, const redisReply *rep)
{
	if (ac != r->ac)
		return false;
	if (!rep) {
		lose(r, ac_error(ac), false);
		return false;
	}
	if (rep->type == REDIS_REPLY_ERROR) {
		log_error(r->cfg.log, "redis (%s): setup failed: %s", label(r), rep->str);
		lose(r, rep->str, true);
		return false;
	}
	return true;
}

static bool is_str(const redisReply *rep, const char *s)
{
	return (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS) &&
	       rep->len == strlen(s) && memcmp(rep->str, s, rep->len) == 0;
}

/* ROLE's answer, with Sentinel discovery: the server must be the primary. */
static void on_role(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct redis *r = privdata;
	const redisReply *rep = reply;

	if (!setup_reply_ok(r, ac, rep))
		return;
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
	    !is_str(rep->element[0], "master")) {
		log_warn(r->cfg.log,
			 "redis (%s): %s:%u is not the primary; asking the Sentinels again",
			 label(r), r->server.host, (unsigned)r->server.port);
		lose(r, "the server the Sentinels named is not a primary", true);
		return;
	}
	setup_step_done(r);
}

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct redis *r = privdata;

	if (setup_reply_ok(r, ac, reply))
		setup_step_done(r);
}

static void on_script_loaded(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct script *s = privdata;
	struct redis *r = s->r;
	const redisReply *rep = reply;

	if (!setup_reply_ok(r, ac, rep))
		return;
	if (rep->type != REDIS_REPLY_STRING || rep->len != SHA1_HEX) {
		lose(r, "SCRIPT LOAD gave no SHA1", true);
		return;
	}
	memcpy(s->sha, rep->str, SHA1_HEX);
	s->sha[SHA1_HEX] = '\0';
	setup_step_done(r);
}

static void on_subscription(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct redis *r = privdata;
	const redisReply *rep = reply;

	if (!setup_reply_ok(r, ac, rep))
		return;
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3)
		return;
	if (is_str(rep->element[0], "subscribe") && r->state == REDIS_CONNECTING) {
		setup_step_done(r);
		return;
	}
	if (is_str(rep->element[0], "subscribe")) { /* redis_barrier's */
		if (r->cfg.on_barrier)
			r->cfg.on_barrier(r->cfg.arg);
		return;
	}
	if (!is_str(rep->element[0], "message"))
		return;
	if (r->cfg.on_payload)
		r->cfg.on_payload(r->cfg.arg, rep->element[2]);
	if (rep->element[2]->type == REDIS_REPLY_STRING && r->cfg.on_message)
		r->cfg.on_message(r->cfg.arg, rep->element[2]->str, rep->element[2]->len);
}

static void on_client_id(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct redis *r = privdata;
	const redisReply *rep = reply;

	if (!setup_reply_ok(r, ac, rep))
		return;
	if (rep->type != REDIS_REPLY_INTEGER || rep->integer <= 0) {
		lose(r, "CLIENT ID gave no id", true);
		return;
	}
	r->client_id = rep->integer;
	setup_step_done(r);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
	struct redis *r = ac->data;

	/* On failure hiredis frees the context after this returns. */
	if (status != REDIS_OK && ac == r->ac)
		lose(r, ac_error(ac), false);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
	struct redis *r = ac->data;

	(void)status;
	if (ac == r->ac)
		lose(r, ac_error(ac), false);
}

/* Queue the setup commands; they are written as soon as the socket connects. */
static bool send_setup(struct redis *r)
{
	redisAsyncContext *ac = r->ac;
	char db[16];
	int ok = REDIS_OK;

	r->setup_left = 0;
	/* First of all, so that the other commands run as the ACL user. */
	if (r->server.password[0]) {
		const char *argv[3] = { "AUTH", r->server.user, r->server.password };
		int argc = 3;
		if (!r->server.user[0]) { /* the `default` user */
			argv[1] = r->server.password;
			argc = 2;
		}
		ok |= redisAsyncCommandArgv(ac, on_setup_reply, r, argc, argv, NULL);
		r->setup_left++;
	}
	if (r->server.master[0]) {
		const char *argv[] = { "ROLE" };
		ok |= redisAsyncCommandArgv(ac, on_role, r, 1, argv, NULL);
		r->setup_left++;
	}
	if (r->cfg.name) {
		const char *argv[] = { "CLIENT", "SETNAME", r->cfg.name };
		ok |= redisAsyncCommandArgv(ac, on_setup_reply, r, 3, argv, NULL);
		r->setup_left++;
	}
	if (r->cfg.client_id) {
		const char *argv[] = { "CLIENT", "ID" };
		ok |= redisAsyncCommandArgv(ac, on_client_id, r, 2, argv, NULL);
		r->setup_left++;
	}
	if (r->cfg.subscribe) {
		const char *argv[] = { "SUBSCRIBE", r->cfg.subscribe };
		ok |= redisAsyncCommandArgv(ac, on_subscription, r, 2, argv, NULL);
		r->setup_left++;
		return ok == REDIS_OK;
	}
	if (r->server.db != 0) {
		const char *argv[] = { "SELECT", db };
		snprintf(db, sizeof(db), "%d", r->server.db);
		ok |= redisAsyncCommandArgv(ac, on_setup_reply, r, 2, argv, NULL);
		r->setup_left++;
	}
	for (size_t i = 0; i < r->cfg.nscripts; i++) {
		const char *argv[] = { "SCRIPT", "LOAD", r->cfg.scripts[i] };
		ok |= redisAsyncCommandArgv(ac, on_script_loaded, &r->scripts[i], 3, argv, NULL);
		r->setup_left++;
	}
	if (r->setup_left == 0) {
		/* Nothing to set up: PING proves the connection instead. */
		ok |= redisAsyncCommand(ac, on_setup_reply, r, "PING");
		r->setup_left++;
	}
	return ok == REDIS_OK;
}

/* Ask one Sentinel ("host:port") for the primary's address. */
static bool ask_sentinel(const char *hostport, const char *master, double timeout, char *host,
			 size_t hostlen, uint16_t *port, char *err, size_t errlen)
{
	struct timeval tv = { (time_t)timeout,
			      (suseconds_t)((timeout - (double)(time_t)timeout) * 1e6) };
	char shost[256];
	uint16_t sport;
	redisContext *c = NULL;
	redisReply *rep = NULL;
	long p;
	bool ok = false;

	if (!config_parse_hostport(hostport, shost, sizeof(shost), &sport)) {
		snprintf(err, errlen, "bad Sentinel address %s", hostport);
		goto done;
	}
	c = redisConnectWithTimeout(shost, sport, tv);
	if (!c || c->err) {
		snprintf(err, errlen, "Sentinel %s: %s", hostport, c ? c->errstr : "out of memory");
		goto done;
	}
	redisSetTimeout(c, tv);
	rep = redisCommand(c, "SENTINEL get-master-addr-by-name %s", master);
	if (!rep) {
		snprintf(err, errlen, "Sentinel %s: %s", hostport, c->errstr);
		goto done;
	}
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
	    rep->element[0]->type != REDIS_REPLY_STRING ||
	    rep->element[1]->type != REDIS_REPLY_STRING || rep->element[0]->len >= hostlen) {
		snprintf(err, errlen, "Sentinel %s knows no primary named %s", hostport, master);
		goto done;
	}
	p = strtol(rep->element[1]->str, NULL, 10);
	if (p < 1 || p > 65535) {
		snprintf(err, errlen, "Sentinel %s gave a bad port", hostport);
		goto done;
	}
	memcpy(host, rep->element[0]->str, rep->element[0]->len);
	host[rep->element[0]->len] = '\0';
	*port = (uint16_t)p;
	ok = true;
done:
	if (rep)
		freeReplyObject(rep);
	if (c)
		redisFree(c);
	return ok;
}

bool redis_sentinel_resolve(struct config_redis *server, double timeout, char *err, size_t errlen)
{
	const char *p = server->sentinels;
	char one[300];
	size_t n;

	snprintf(err, errlen, "no Sentinel given");
	while (*p) {
		n = strcspn(p, ",");
		if (n < sizeof(one)) {
			memcpy(one, p, n);
			one[n] = '\0';
			if (ask_sentinel(one, server->master, timeout, server->host,
					 sizeof(server->host), &server->port, err, errlen))
				return true;
		}
		p += n;
		if (*p == ',')
			p++;
	}
	return false;
}

static void connect_primary(struct redis *r)
{
	redisAsyncContext *ac;

	if (r->server.path[0])
		ac = redisAsyncConnectUnix(r->server.path);
	else
		ac = redisAsyncConnect(r->server.host, r->server.port);
	r->state = REDIS_CONNECTING;
	if (!ac || ac->err) {
		snprintf(r->error, sizeof(r->error), "%s", ac ? ac->errstr : "out of memory");
		if (r->backoff >= BACKOFF_MAX)
			log_warn(r->cfg.log, "redis (%s): cannot connect: %s", label(r), r->error);
		if (ac)
			redisAsyncFree(ac);
		r->state = REDIS_DOWN;
		arm(r->timer, r->backoff);
		r->backoff = r->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : r->backoff * 2;
		return;
	}
	ac->data = r;
	r->ac = ac;
	/* Notice a vanished host on idle connections (the subscriber's above all). */
	if (!r->server.path[0])
		redisEnableKeepAlive(&ac->c); /* 15 s probes */
	if (redisLibeventAttach(ac, r->cfg.base) != REDIS_OK ||
	    redisAsyncSetConnectCallback(ac, on_connect) != REDIS_OK ||
	    redisAsyncSetDisconnectCallback(ac, on_disconnect) != REDIS_OK || !send_setup(r)) {
		lose(r, "cannot set up the connection", true);
		return;
	}
	arm(r->timer, r->cfg.connect_timeout);
}

/* --- Sentinel discovery on the event loop ----------------------------------------
 * Each (re)connection asks the Sentinels in turn, without blocking the loop: one
 * async connection at a time (r->sac), SENTINEL_TIMEOUT for it to connect and answer,
 * then the next one; the primary it names is then connected to as a fixed server. */

static void ask_next_sentinel(struct redis *r);

/* Forget the Sentinel connection (freed here unless hiredis is freeing it). */
static void sentinel_drop(struct redis *r, bool free_sac)
{
	redisAsyncContext *sac = r->sac;

	r->sac = NULL;
	evtimer_del(r->timer);
	if (sac && free_sac)
		redisAsyncFree(sac); /* its callbacks see sac != r->sac and do nothing */
}

static void sentinel_failed(struct redis *r, const char *hostport, const char *why, bool free_sac)
{
	snprintf(r->error, sizeof(r->error), "Sentinel %.120s: %.120s", hostport, why);
	sentinel_drop(r, free_sac);
	ask_next_sentinel(r);
}

static void on_sentinel_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct redis *r = privdata;
	const redisReply *rep = reply;
	char hostport[300];
	long port;

	if (ac != r->sac)
		return; /* dropped (timed out, closed): nothing to do */
	snprintf(hostport, sizeof(hostport), "%s:%d", ac->c.tcp.host ? ac->c.tcp.host : "?",
		 ac->c.tcp.port);
	if (!rep) {
		sentinel_failed(r, hostport, ac_error(ac), false);
		return;
	}
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
	    rep->element[0]->type != REDIS_REPLY_STRING ||
	    rep->element[1]->type != REDIS_REPLY_STRING || rep->element[0]->len == 0 ||
	    rep->element[0]->len >= sizeof(r->server.host) ||
	    (port = strtol(rep->element[1]->str, NULL, 10)) < 1 || port > 65535) {
		sentinel_failed(r, hostport,
				rep->type == REDIS_REPLY_ERROR ? rep->str
							       : "knows no primary by that name",
				true);
		return;
	}
	memcpy(r->server.host, rep->element[0]->str, rep->element[0]->len);
	r->server.host[rep->element[0]->len] = '\0';
	r->server.port = (uint16_t)port;
	sentinel_drop(r, true); /* inside its callback: hiredis frees it on return */
	connect_primary(r);
}

static void on_sentinel_connect(const redisAsyncContext *ac, int status)
{
	struct redis *r = ac->data;

	/* On failure hiredis frees the context after this returns. */
	if (status != REDIS_OK && ac == r->sac)
		sentinel_failed(r, ac->c.tcp.host ? ac->c.tcp.host : "?", ac_error(ac), false);
}

static void on_sentinel_disconnect(const redisAsyncContext *ac, int status)
{
	struct redis *r = ac->data;

	(void)status;
	if (ac == r->sac)
		sentinel_failed(r, ac->c.tcp.host ? ac->c.tcp.host : "?", ac_error(ac), false);
}

/* Ask the next Sentinel of the list; after the last one, wait and start again. */
static void ask_next_sentinel(struct redis *r)
{
	const char *list = r->server.sentinels;
	char one[300], host[256];
	uint16_t port;
	redisAsyncContext *sac;

	while (list[r->sentinel_at]) {
		size_t n = strcspn(list + r->sentinel_at, ",");
		const char *p = list + r->sentinel_at;

		r->sentinel_at += n + (list[r->sentinel_at + n] == ',');
		if (n >= sizeof(one))
			continue;
		memcpy(one, p, n);
		one[n] = '\0';
		if (!config_parse_hostport(one, host, sizeof(host), &port)) {
			snprintf(r->error, sizeof(r->error), "bad Sentinel address %.200s", one);
			continue;
		}
		sac = redisAsyncConnect(host, port);
		if (!sac || sac->err) {
			snprintf(r->error, sizeof(r->error), "Sentinel %.200s: %.40s", one,
				 sac ? sac->errstr : "out of memory");
			if (sac)
				redisAsyncFree(sac);
			continue;
		}
		sac->data = r;
		if (redisLibeventAttach(sac, r->cfg.base) != REDIS_OK ||
		    redisAsyncSetConnectCallback(sac, on_sentinel_connect) != REDIS_OK ||
		    redisAsyncSetDisconnectCallback(sac, on_sentinel_disconnect) != REDIS_OK ||
		    redisAsyncCommand(sac, on_sentinel_reply, r,
				      "SENTINEL get-master-addr-by-name %s",
				      r->server.master) != REDIS_OK) {
			snprintf(r->error, sizeof(r->error),
				 "Sentinel %.200s: cannot set up the connection", one);
			redisAsyncFree(sac);
			continue;
		}
		r->sac = sac;
		r->state = REDIS_DISCOVERING;
		arm(r->timer, SENTINEL_TIMEOUT);
		return;
	}
	if (r->backoff >= BACKOFF_MAX)
		log_warn(r->cfg.log, "redis (%s): no primary from the Sentinels: %s", label(r),
			 r->error);
	r->state = REDIS_DOWN;
	arm(r->timer, r->backoff);
	r->backoff = r->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : r->backoff * 2;
}

static void start_connect(struct redis *r)
{
	if (r->server.master[0]) {
		r->sentinel_at = 0;
		ask_next_sentinel(r);
		return;
	}
	connect_primary(r);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct redis *r = arg;

	(void)fd;
	(void)what;
	if (r->state == REDIS_DOWN)
		start_connect(r);
	else if (r->state == REDIS_DISCOVERING)
		sentinel_failed(r, r->sac && r->sac->c.tcp.host ? r->sac->c.tcp.host : "?",
				"no answer in time", true);
	else if (r->state == REDIS_CONNECTING)
		lose(r, "timed out connecting", true);
}

int redis_open(struct redis **out, const struct redis_config *cfg)
{
	struct redis *r = calloc(1, sizeof(*r));

	*out = NULL;
	if (!r)
		return -ENOMEM;
	r->cfg = *cfg;
	r->server = *cfg->server;
	r->cfg.server = &r->server;
	if (r->cfg.command_timeout <= 0)
		r->cfg.command_timeout = 1.0;
	if (r->cfg.connect_timeout <= 0)
		r->cfg.connect_timeout = 2.0;
	if (r->cfg.subscribe)
		r->cfg.nscripts = 0;
	r->backoff = BACKOFF_MIN;
	r->scripts = calloc(r->cfg.nscripts ? r->cfg.nscripts : 1, sizeof(*r->scripts));
	r->timer = evtimer_new(cfg->base, on_timer, r);
	r->deadline = evtimer_new(cfg->base, on_deadline, r);
	if (!r->scripts || !r->timer || !r->deadline) {
		r->state = REDIS_CLOSING;
		redis_close(&r);
		return -ENOMEM;
	}
	for (size_t i = 0; i < r->cfg.nscripts; i++)
		r->scripts[i].r = r;
	snprintf(r->error, sizeof(r->error), "connecting");
	start_connect(r);
	*out = r;
	return 0;
}

void redis_close(struct redis **rp)
{
	struct redis *r = *rp;
	redisAsyncContext *ac;

	if (!r)
		return;
	r->state = REDIS_CLOSING;
	ac = r->ac;
	r->ac = NULL;
	if (ac)
		redisAsyncFree(ac); /* pending callbacks run with NULL */
	ac = r->sac;
	r->sac = NULL;
	if (ac)
		redisAsyncFree(ac); /* a Sentinel being asked */
	if (r->timer)
		event_free(r->timer);
	if (r->deadline)
		event_free(r->deadline);
	free(r->scripts);
	explicit_bzero(r->server.password, sizeof(r->server.password));
	free(r);
	*rp = NULL;
}

bool redis_connected(const struct redis *r)
{
	return r->state == REDIS_READY;
}

const char *redis_last_error(const struct redis *r)
{
	return r->state == REDIS_READY ? "" : r->error;
}

size_t redis_pending(const struct redis *r)
{
	return r->npending;
}

const struct config_redis *redis_server(const struct redis *r)
{
	return r->state == REDIS_READY ? &r->server : NULL;
}

long long redis_client_id(const struct redis *r)
{
	return r->state == REDIS_READY ? r->client_id : 0;
}

bool redis_barrier(struct redis *r)
{
	const char *argv[] = { "SUBSCRIBE", r->cfg.subscribe };

	return r->state == REDIS_READY && r->cfg.subscribe &&
	       redisAsyncCommandArgv(r->ac, on_subscription, r, 2, argv, NULL) == REDIS_OK;
}

static struct pending *pending_new(struct redis *r, redis_reply_cb cb, void *arg)
{
	struct pending *p = calloc(1, sizeof(*p));

	if (p) {
		p->r = r;
		p->cb = cb;
		p->arg = arg;
	}
	return p;
}

bool redis_command(struct redis *r, int argc, const char *const *argv, const size_t *argvlen,
		   redis_reply_cb cb, void *arg)
{
	struct pending *p;

	if (r->state != REDIS_READY || r->cfg.subscribe || !(p = pending_new(r, cb, arg)))
		return false;
	if (redisAsyncCommandArgv(r->ac, on_reply, p, argc, (const char **)argv, argvlen) !=
	    REDIS_OK) {
		free(p);
		return false;
	}
	link_pending(r, p);
	return true;
}

bool redis_eval(struct redis *r, size_t script, int nkeys, int argc, const char *const *argv,
		const size_t *argvlen, redis_reply_cb cb, void *arg)
{
	const char *stack_argv[EVAL_ARGV_STACK + 3], **all = stack_argv;
	size_t stack_len[EVAL_ARGV_STACK + 3], *lens = stack_len;
	char nk[16];
	char *cmd = NULL;
	struct pending *p = NULL;
	long long n;
	bool ok = false;

	if (r->state != REDIS_READY || r->cfg.subscribe || script >= r->cfg.nscripts || argc < 0 ||
	    nkeys < 0 || nkeys > argc)
		return false;
	if (argc > EVAL_ARGV_STACK) {
		all = malloc((size_t)(argc + 3) * sizeof(*all));
		lens = malloc((size_t)(argc + 3) * sizeof(*lens));
		if (!all || !lens)
			goto done;
	}
	snprintf(nk, sizeof(nk), "%d", nkeys);
	all[0] = eval_name(r, true);
	all[1] = r->scripts[script].sha;
	all[2] = nk;
	for (int i = 0; i < 3; i++)
		lens[i] = strlen(all[i]);
	for (int i = 0; i < argc; i++) {
		all[i + 3] = argv[i];
		lens[i + 3] = argvlen ? argvlen[i] : strlen(argv[i]);
	}
	n = redisFormatCommandArgv(&cmd, argc + 3, all, lens);
	if (n < 0 || !(p = pending_new(r, cb, arg)))
		goto done;
	p->cmd = cmd;
	p->cmdlen = (size_t)n;
	p->script = script;
	if (redisAsyncFormattedCommand(r->ac, on_reply, p, cmd, (size_t)n) != REDIS_OK)
		goto done;
	link_pending(r, p);
	ok = true;
done:
	if (!ok) {
		free(p);
		if (cmd)
			redisFreeCommand(cmd);
	}
	if (all != stack_argv)
		free(all);
	if (lens != stack_len)
		free(lens);
	return ok;
}
