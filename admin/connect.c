/* daybook-admin: connections shared by the subcommands. */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"
#include "config.h"
#include "eventstore.h"
#include "redis.h"

bool admin_event_store_usable(PGconn *conn, const struct log *log)
{
	char msg[1024];

	if (eventstore_check_txids(conn, msg, sizeof(msg)) != EVENTSTORE_TXIDS_AHEAD)
		return true; /* an unmigrated database is the subcommand's to report */
	log_error(log, "%s", msg);
	return false;
}

/* A blocking hiredis connection, authenticated, with the db SELECTed (see admin.h). */
redisContext *admin_redis_connect(const struct config_redis *given, char *err, size_t errlen)
{
	struct timeval connect_tv = { 2, 0 }, command_tv = { 30, 0 };
	struct config_redis resolved = *given;
	const struct config_redis *server = &resolved;
	redisContext *c = NULL;
	redisReply *r = NULL;

	/* redis-sentinel://: the primary the Sentinels name now. */
	if (resolved.master[0] && !redis_sentinel_resolve(&resolved, 1.0, err, errlen))
		goto fail;
	c = server->path[0] ? redisConnectUnixWithTimeout(server->path, connect_tv)
			    : redisConnectWithTimeout(server->host, server->port, connect_tv);
	if (!c || c->err) {
		snprintf(err, errlen, "%s", c ? c->errstr : "out of memory");
		goto fail;
	}
	redisSetTimeout(c, command_tv);
	if (server->password[0]) {
		r = server->user[0] ? redisCommand(c, "AUTH %s %s", server->user, server->password)
				    : redisCommand(c, "AUTH %s", server->password);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			snprintf(err, errlen, "AUTH%s%s: %s", server->user[0] ? " as " : "",
				 server->user, r ? r->str : c->errstr);
			goto fail;
		}
		freeReplyObject(r);
		r = NULL;
	}
	if (server->db) {
		r = redisCommand(c, "SELECT %d", server->db);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			snprintf(err, errlen, "SELECT %d: %s", server->db, r ? r->str : c->errstr);
			goto fail;
		}
		freeReplyObject(r);
		r = NULL;
	}
	explicit_bzero(resolved.password, sizeof(resolved.password));
	return c;
fail:
	explicit_bzero(resolved.password, sizeof(resolved.password));
	if (r)
		freeReplyObject(r);
	if (c)
		redisFree(c);
	return NULL;
}
