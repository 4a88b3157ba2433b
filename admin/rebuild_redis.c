/* daybook-admin rebuild: the Redis connection and its pipeline of commands. */
#include <errno.h>
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "cli.h"
#include "copy.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "strmap.h"
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
 * them while the next chunk is read from PostgreSQL. */
bool rb_redis_write_out(struct rebuild *rb)
{
	struct copy_buf *b = &rb->resp;

	if (rb->redis->err)
		return false;
	for (size_t at = 0; at < b->len;) {
		ssize_t n = send(rb->redis->fd, b->p + at, b->len - at, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) { /* EAGAIN: the command timeout passed */
			/* Part of a command may have gone: the connection is unusable, and
			 * hiredis is told so, so that nothing else is sent on it. */
			rb->redis->err = REDIS_ERR_IO;
			snprintf(rb->redis->errstr, sizeof(rb->redis->errstr), "writing: %s",
				 n < 0 ? strerror(errno) : "nothing written");
			rb_error(rb, "redis: %s\n", rb->redis->errstr);
			b->len = 0;
			return false;
		}
		at += (size_t)n;
	}
	b->len = 0;
	return true;
}

static char *put_len(char *p, char kind, size_t n)
{
	char digits[24];
	int d = 0;

	*p++ = kind;
	do
		digits[d++] = (char)('0' + n % 10);
	while ((n /= 10) > 0);
	while (d > 0)
		*p++ = digits[--d];
	*p++ = '\r';
	*p++ = '\n';
	return p;
}

/* Commands are put in RESP into one buffer that is kept and reused, and written out
 * once it holds RESP_WRITE bytes; hiredis's own output buffer would be freed each
 * time it empties and grown again, page by fresh page. Replies are read by hiredis. */
bool rb_redis_send(struct rebuild *rb, int argc, const char **argv)
{
	struct copy_buf *b = &rb->resp;
	size_t need = 24;
	char *p;

	for (int i = 0; i < argc; i++)
		need += strlen(argv[i]) + 24;
	if (!copy_reserve(b, need))
		return false;
	p = put_len(b->p + b->len, '*', (size_t)argc);
	for (int i = 0; i < argc; i++) {
		size_t n = strlen(argv[i]);
		p = put_len(p, '$', n);
		memcpy(p, argv[i], n);
		p += n;
		*p++ = '\r';
		*p++ = '\n';
	}
	b->len = (size_t)(p - b->p);
	rb->redis_queued++;
	if (b->len >= RESP_WRITE && !rb_redis_write_out(rb))
		return false;
	return rb->redis_queued < 4 * REDIS_FLUSH || rb_redis_drain(rb);
}

/* A key of our generation: "dbk:g:<gen>:<kind>[:<id>]", truncated to len - 1 bytes.
 * Made for every item sent, so without printf. */
void rb_key(const struct rebuild *rb, char *out, size_t len, const char *kind, const char *id)
{
	const char *parts[4] = { rb->key_prefix, kind, id ? ":" : "", id ? id : "" };
	size_t at = 0;

	for (int i = 0; i < 4 && len > 0; i++) {
		size_t n = strlen(parts[i]);
		if (n > len - 1 - at)
			n = len - 1 - at;
		memcpy(out + at, parts[i], n);
		at += n;
	}
	if (len > 0)
		out[at] = '\0';
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
	rb->resp.len = 0;
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
	char err[256];
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
		rb_error(rb, "reading the event store's identity (is the database "
				"migrated?): %s", PQresultErrorMessage(r0));
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
	r = redisCommand(rb->redis, "INCR dbk:generation");
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		rb_error(rb, "redis INCR dbk:generation failed\n");
		freeReplyObject(r);
		return false;
	}
	rb->gen = r->integer;
	snprintf(rb->key_prefix, sizeof(rb->key_prefix), "dbk:g:%lld:", rb->gen);
	freeReplyObject(r);
	/* Which store the generation is built from, before anything else goes in it: no
	 * projector's sweep then takes its keys for garbage of no store. */
	r = redisCommand(rb->redis, "SET %sidentity %s", rb->key_prefix, rb->identity);
	if (!r || r->type == REDIS_REPLY_ERROR) {
		rb_error(rb, "redis SET %sidentity failed\n", rb->key_prefix);
		freeReplyObject(r);
		return false;
	}
	freeReplyObject(r);
	return redis_run_id(rb, rb->redis, rb->redis_run_id);
}
