/* daybook-admin rebuild: the Redis connection and its pipeline of commands. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "rebuild.h"

/* Read the replies of the n oldest commands. */
bool rb_redis_drain_n(struct rebuild *rb, size_t n)
{
	bool ok = true;

	for (; n > 0; n--, rb->redis_queued--) {
		redisReply *reply = NULL;
		if (redisGetReply(rb->redis, (void **)&reply) != REDIS_OK) {
			rb_error(rb, "redis: %s\n", rb->redis->errstr);
			return false;
		}
		if (reply->type == REDIS_REPLY_ERROR) {
			rb_error(rb, "redis: %s\n", reply->str);
			ok = false;
		}
		freeReplyObject(reply);
	}
	return ok;
}

bool rb_redis_drain(struct rebuild *rb)
{
	rb->redis_prev = 0;
	return rb_redis_write_out(rb) && rb_redis_drain_n(rb, rb->redis_queued);
}

/* Write the buffered commands out without waiting for their replies: Redis works on
 * them while the next chunk is read from PostgreSQL. A failed write leaves hiredis's
 * context in error (part of a command may have gone), so nothing else is sent on it. */
bool rb_redis_write_out(struct rebuild *rb)
{
	int done = 0;

	if (rb->redis->err) /* said when it happened */
		return false;
	while (!done)
		if (redisBufferWrite(rb->redis, &done) != REDIS_OK)
			goto fail;
	rb->redis_unwritten = 0;
	return true;
fail:
	rb_error(rb, "redis: %s\n", rb->redis->errstr);
	return false;
}

/* Commands go into hiredis's output buffer and are written out once it holds
 * RESP_WRITE bytes; replies are read every 4 * REDIS_FLUSH commands at the latest. */
bool rb_redis_send(struct rebuild *rb, int argc, const char **argv)
{
	size_t len[2 + READMODEL_ITEMS_KEPT]; /* the lengths of an LPUSH's and smaller */
	bool fits = argc <= (int)(sizeof(len) / sizeof(len[0]));

	for (int i = 0; i < argc; i++) {
		size_t n = strlen(argv[i]);
		if (fits)
			len[i] = n;
		rb->redis_unwritten += n + 16;
	}
	if (redisAppendCommandArgv(rb->redis, argc, argv, fits ? len : NULL) != REDIS_OK) {
		rb_error(rb, "redis: %s\n", rb->redis->errstr);
		return false;
	}
	rb->redis_queued++;
	if (rb->redis_unwritten >= RESP_WRITE && !rb_redis_write_out(rb))
		return false;
	return rb->redis_queued < 4 * REDIS_FLUSH || rb_redis_drain(rb);
}

/* A key of our generation (readmodel_key), truncated to len - 1 bytes. */
void rb_key(const struct rebuild *rb, char *out, size_t len, const char *kind, const char *id)
{
	readmodel_key(out, len, rb->gen, kind, id);
}

/* The server's run_id (INFO server), which changes with every start. */
static bool redis_run_id(struct rebuild *rb, redisContext *c, char out[RUN_ID_LEN])
{
	redisReply *r = redisCommand(c, "INFO server");
	const char *at = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, "run_id:") : NULL;
	size_t n = at ? strcspn(at + 7, "\r\n") : 0;
	bool ok = n > 0 && n < RUN_ID_LEN;

	if (ok)
		snprintf(out, RUN_ID_LEN, "%.*s", (int)n, at + 7);
	else
		rb_error(rb, "redis INFO server failed\n");
	freeReplyObject(r);
	return ok;
}

/* After a failure on the Redis connection, a new one (false if none can be had). It
 * must reach the same server, still running: a restarted Redis has a new run_id (and,
 * without persistence, nothing of ours), and a server that took the port of one that
 * died is someone else's. */
bool rb_redis_usable(struct rebuild *rb)
{
	char err[256], run_id[RUN_ID_LEN];

	if (!rb->redis->err)
		return true;
	redisFree(rb->redis);
	rb->redis_unwritten = 0;
	rb->redis_queued = rb->redis_prev = 0;
	rb->redis = admin_redis_connect(&rb->ctx->cfg.redis, err, sizeof(err));
	if (!rb->redis) {
		rb_error(rb, "cannot reconnect to redis: %s\n", err);
		return false;
	}
	if (!redis_run_id(rb, rb->redis, run_id) || strcmp(run_id, rb->redis_run_id) != 0) {
		rb_error(rb, "redis is not the server the rebuild began with "
			     "(restarted?): leaving it alone\n");
		redisFree(rb->redis);
		rb->redis = NULL;
		return false;
	}
	return true;
}

bool rb_connect_redis(struct rebuild *rb)
{
	char err[256], k[64];
	redisReply *r;
	PGresult *r0;

	if (!rb->ctx->cfg.redis_url) {
		rb->failure = CLI_EXIT_USAGE;
		rb_error(rb, "DAYBOOK_REDIS is not set: rebuilding redis needs it\n");
		return false;
	}
	r0 = PQexec(rb->wr, READMODEL_IDENTITY_SQL);
	if (PQresultStatus(r0) != PGRES_TUPLES_OK || PQntuples(r0) != 1 || PQgetisnull(r0, 0, 0) ||
	    PQgetlength(r0, 0, 0) == 0 || PQgetlength(r0, 0, 0) >= (int)sizeof(rb->identity)) {
		rb_error(rb,
			 "reading the event store's identity (is the database "
			 "migrated?): %s",
			 PQresultErrorMessage(r0));
		PQclear(r0);
		return false;
	}
	snprintf(rb->identity, sizeof(rb->identity), "%s", PQgetvalue(r0, 0, 0));
	PQclear(r0);
	rb->redis = admin_redis_connect(&rb->ctx->cfg.redis, err, sizeof(err));
	if (!rb->redis) {
		rb->failure = CLI_EXIT_UNAVAILABLE;
		rb_error(rb, "cannot connect to redis: %s\n", err);
		return false;
	}
	r = redisCommand(rb->redis, "INCR " READMODEL_GENERATION_KEY);
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		rb_error(rb, "redis INCR " READMODEL_GENERATION_KEY " failed\n");
		freeReplyObject(r);
		return false;
	}
	rb->gen = r->integer;
	rb_key(rb, k, sizeof(k), READMODEL_KIND_IDENTITY, NULL);
	freeReplyObject(r);
	/* Which store the generation is built from, before anything else goes in it: no
	 * projector's sweep then takes its keys for garbage of no store. */
	r = redisCommand(rb->redis, "SET %s %s", k, rb->identity);
	if (!r || r->type == REDIS_REPLY_ERROR) {
		rb_error(rb, "redis SET %s failed\n", k);
		freeReplyObject(r);
		return false;
	}
	freeReplyObject(r);
	return redis_run_id(rb, rb->redis, rb->redis_run_id);
}
