/* Redis on the event loop: one hiredis async connection that reconnects by itself,
 * with per-command deadlines, Lua scripts by EVALSHA, and a subscriber mode. */
#ifndef DAYBOOK_REDIS_H
#define DAYBOOK_REDIS_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "log.h"

struct event_base;
struct redis;

/* A reply callback. `reply` is valid only during the callback (do not keep pointers
 * into it). It is NULL when the connection was lost, timed out or was closed before
 * the reply arrived: the command may or may not have run. Error replies
 * (REDIS_REPLY_ERROR) arrive as replies. The callback may send new commands; it must
 * not call redis_close. */
typedef void (*redis_reply_cb)(void *arg, const redisReply *reply);

/* A message published on the subscribed channel; `msg` (not NUL-terminated) is valid
 * only during the callback. */
typedef void (*redis_message_cb)(void *arg, const char *msg, size_t len);

struct redis_config {
	/* TCP host:port or unix socket, the db, and the ACL user and password: when there
	 * is a password, every (re)connection starts with AUTH. */
	const struct config_redis *server;
	const char *name; /* CLIENT SETNAME, e.g. "daybook-query"; may be NULL */
	struct event_base *base;
	const struct log *log;
	/* Lua sources, loaded (SCRIPT LOAD) on every (re)connection and run by index
	 * with redis_eval. The strings must outlive the connection. */
	const char *const *scripts;
	size_t nscripts;
	/* Run the scripts with EVALSHA_RO (EVAL_RO after NOSCRIPT), Redis 7: for a client
	 * whose ACL user may only read, such as the query service's. A script that writes
	 * then fails instead of running. */
	bool read_only;
	/* Subscriber mode: when set, the connection SUBSCRIBEs to this channel after
	 * every (re)connection and delivers its messages to on_message; it then runs no
	 * other commands (redis_command and redis_eval refuse). Having no replies to
	 * time, it notices a lost server by TCP keepalive or a closed socket only. */
	const char *subscribe;
	redis_message_cb on_message;
	/* Subscriber mode: every message's payload as hiredis parsed it, whatever its
	 * type (a tracking invalidation's is an array of keys, or nil after a flush);
	 * may be NULL. Runs before on_message (which sees string payloads only). */
	redis_reply_cb on_payload;
	/* Subscriber mode: called for each answer to redis_barrier, in order. */
	void (*on_barrier)(void *arg);
	/* Ask CLIENT ID on every (re)connection, before the setup's other commands
	 * (redis_client_id), e.g. for a CLIENT TRACKING REDIRECT to this connection. */
	bool client_id;
	/* Seconds the oldest outstanding reply may take before the connection counts as
	 * hung: it is dropped (every pending callback gets NULL) and re-established.
	 * 0: 1 s. */
	double command_timeout;
	/* Seconds to connect and run the setup (SELECT, SCRIPT LOAD, SUBSCRIBE). 0: 2 s. */
	double connect_timeout;
	/* Called after each successful (re)connection and setup; may be NULL. */
	void (*on_ready)(void *arg);
	void *arg; /* passed to on_message and on_ready */
};

/* Sentinel discovery, for a server given as redis-sentinel:// (server->master set): ask
 * the Sentinels in turn (SENTINEL get-master-addr-by-name; blocking, at most `timeout`
 * seconds per Sentinel) and write the primary's address into server->host and port.
 * The Sentinels are asked without AUTH. False, with the reason in err, when none
 * answers with an address. */
bool redis_sentinel_resolve(struct config_redis *server, double timeout, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/* Start connecting in the background; reconnects with backoff (50 ms doubling to
 * 2 s) whenever the connection is lost. The config's pointers must outlive the
 * connection. Note: a host name is resolved with a blocking getaddrinfo on each
 * (re)connection; use an address or a unix socket where that matters.
 * With Sentinel discovery (server->master set), each (re)connection first asks the
 * Sentinels for the primary, in turn, on the event loop (300 ms at most per Sentinel;
 * the loop is never blocked waiting for one), then checks with
 * ROLE that the server it reached is a primary; a READONLY error reply (the primary
 * was demoted under us) drops the connection, and the next one asks again.
 * Caller closes with redis_close. */
int redis_open(struct redis **out, const struct redis_config *cfg)
	__attribute__((warn_unused_result));
/* Close the connection: every pending callback runs with a NULL reply first. Sets *r
 * to NULL. Must not be called from a reply or message callback. */
void redis_close(struct redis **r);

/* Connected and set up: commands may be sent. */
bool redis_connected(const struct redis *r);
/* Why the connection is down, for /readyz and logs ("" when connected). */
const char *redis_last_error(const struct redis *r);
/* Commands sent whose replies have not arrived yet. */
size_t redis_pending(const struct redis *r);
/* The server of the current connection (with Sentinel discovery, the primary it found:
 * host and port filled in), while connected; NULL while down. Borrowed, valid until the
 * connection changes. */
const struct config_redis *redis_server(const struct redis *r);
/* With cfg.client_id: the connection's CLIENT ID once connected, 0 while down. A new
 * connection has a new id. */
long long redis_client_id(const struct redis *r);
/* Subscriber mode: subscribe once more to the channel it is subscribed to. Redis answers
 * after every message it had queued for this connection when the command ran, so the
 * answer (cfg.on_barrier) is a barrier: each message published, or invalidation sent,
 * before then has been delivered. False when not connected. No deadline: a connection
 * that hangs is noticed as any subscriber's is. */
bool redis_barrier(struct redis *r) __attribute__((warn_unused_result));

/* Send one command in argv form (binary-safe; argvlen NULL means strlen of each).
 * Commands are pipelined: they are written together at the next loop turn and their
 * replies arrive in order. `cb` (may be NULL) runs exactly once, with the reply or
 * NULL. False when not connected (or out of memory): then `cb` never runs. */
bool redis_command(struct redis *r, int argc, const char *const *argv, const size_t *argvlen,
		   redis_reply_cb cb, void *arg) __attribute__((warn_unused_result));

/* EVALSHA (EVALSHA_RO when the config says read_only) of scripts[script] with `nkeys` keys followed by the other arguments
 * (argc in all). If Redis answers NOSCRIPT (its script cache was flushed), the
 * command is sent once more as EVAL with the source, transparently; note that it
 * then runs after whatever was sent meanwhile. Same contract as redis_command. */
bool redis_eval(struct redis *r, size_t script, int nkeys, int argc, const char *const *argv,
		const size_t *argvlen, redis_reply_cb cb, void *arg)
	__attribute__((warn_unused_result));

#endif
