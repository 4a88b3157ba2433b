/* daybook-admin rebuild: the switch from the live read models to the rebuilt ones. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pg.h"
#include "rebuild.h"
#include "rebuild_scripts.h"

/* One attempt at the switch's locks: false with *busy set when one was not granted
 * within SWITCH_LOCK_WAIT. */
static bool try_lock(struct rebuild *rb, const char *sql, bool *busy)
{
	PGresult *r = PQexec(rb->wr, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	*busy = !ok && strcmp(pg_sqlstate(r), "55P03") == 0; /* lock_not_available */
	if (!ok && !*busy)
		rb_error(rb, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* One attempt: BEGIN and take the locks, each waiting SWITCH_LOCK_WAIT at most. */
static bool lock_once(struct rebuild *rb, bool *busy)
{
	if (!rb_exec(rb, rb->wr, "BEGIN") ||
	    !rb_exec(rb, rb->wr, "SET LOCAL synchronous_commit = on") ||
	    !rb_exec(rb, rb->wr, "SET LOCAL lock_timeout = '" SWITCH_LOCK_WAIT "'"))
		return false;
	if (!try_lock(rb, "SELECT pg_advisory_xact_lock(" READMODEL_SWITCH_LOCK ")", busy))
		return false;
	if (rb->sql &&
	    !try_lock(rb, "LOCK TABLE rm_accounts, rm_entries, rm_totals IN ACCESS EXCLUSIVE MODE",
		      busy))
		return false;
	return rb_exec(rb, rb->wr, "SET LOCAL lock_timeout = 0");
}

/* Begin the switch transaction holding the switch lock and, for SQL, the live tables
 * (the swap drops them). A reader of those tables, a long `verify` say, holds the
 * swap up: waiting in the lock queue would hold up every reader after it, so each
 * attempt waits SWITCH_LOCK_WAIT at most, then everything is let go for a while. */
static bool lock_for_switch(struct rebuild *rb)
{
	while (!rb_interrupted) {
		bool busy = false;
		if (lock_once(rb, &busy))
			return true;
		rb_exec(rb, rb->wr, "ROLLBACK");
		if (!busy)
			return false;
		if (strcmp(rb->phase, "wait") != 0) {
			rb->phase = "wait";
			rb_report(rb, true);
			rb_note(rb, "waiting for the read-model tables: a "
				    "transaction is reading them (a verify?)\n");
		}
		rb_report(rb, false);
		usleep(SWITCH_RETRY_US);
	}
	return false;
}

/* After a switch that did not commit. When the switch's reply was lost, what it replaced
 * is unknown: a pointer still naming our generation is removed, and the projector
 * copies the read models from SQL into a new one (docs/read-models.md). */
static void put_back_live(struct rebuild *rb, const struct live_before *old)
{
	char gen[24];
	const char *back = old->state == LIVE_SWITCHED && old->present ? old->gen : "";
	const char *argv[6] = { "EVAL", PUT_BACK_LIVE_LUA, "1", READMODEL_LIVE_KEY, gen, back };
	redisReply *r = NULL;

	if (!rb->redis || old->state == LIVE_UNTOUCHED)
		return;
	snprintf(gen, sizeof(gen), "%lld", rb->gen);
	(void)!rb_redis_drain(rb);
	if (rb_redis_usable(rb))
		r = redisCommandArgv(rb->redis, 6, argv, NULL);
	/* Not as found: unknown (no answer), or removed after a lost reply. */
	rb->live_touched = !r || r->type != REDIS_REPLY_INTEGER ||
			   (r->integer == 1 && old->state == LIVE_UNKNOWN);
	if (!r || r->type != REDIS_REPLY_INTEGER)
		rb_error(rb, "could not put " READMODEL_LIVE_KEY " back to %s: set it by hand\n",
			 back[0] ? back : "(none)");
	else if (r->integer == 0 && old->state == LIVE_SWITCHED)
		rb_error(rb, READMODEL_LIVE_KEY " left as it is: another generation went live "
						"since the switch\n");
	else if (r->integer == 1 && old->state == LIVE_UNKNOWN)
		rb_error(rb, "the switch's reply was lost: " READMODEL_LIVE_KEY " removed, the "
			     "projector copies the read models from SQL\n");
	freeReplyObject(r);
}

/* COMMIT failed or its outcome is unknown (the connection broke): did the swap land? */
static bool committed_anyway(struct rebuild *rb, long long expected_gen)
{
	PGresult *r = PQexec(rb->pg, "SELECT generation FROM projection_checkpoints "
				     "WHERE projection = 'sql'");
	bool landed = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
		      atoll(PQgetvalue(r, 0, 0)) == expected_gen;

	PQclear(r);
	if (landed)
		rb_error(rb, "the switch committed although COMMIT failed\n");
	return landed;
}

/* The SQL generation before the swap, in the switch transaction. */
static bool sql_generation(struct rebuild *rb, long long *gen)
{
	PGresult *r = PQexec(rb->wr, "SELECT generation FROM projection_checkpoints "
				     "WHERE projection = 'sql'");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	*gen = ok ? atoll(PQgetvalue(r, 0, 0)) : 0;
	if (!ok)
		rb_error(rb, "reading the checkpoint: %s", PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* The tables swapped in SQL, with the checkpoint the fold reached. */
static bool swap_tables(struct rebuild *rb)
{
	char txid[24], pos[24];
	const char *params[2] = { txid, pos };
	PGresult *r;

	snprintf(txid, sizeof(txid), "%llu", (unsigned long long)rb->cp_txid);
	snprintf(pos, sizeof(pos), "%lld", rb->position);
	r = PQexecParams(rb->wr, "SELECT rm_shadow_swap($1::xid8, $2::bigint)", 2, NULL, params,
			 NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		rb_error(rb, "swapping the tables: %s", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	PQclear(r);
	return true;
}

/* Our generation made live in Redis (what it replaced kept in old), and announced. */
static bool switch_redis(struct rebuild *rb, struct live_before *old, const char *token)
{
	char k[64], lk[64], ik[64], msg[96], gen[24];
	const char *cp[3] = { "SET", k, token },
		   *pub[3] = { "PUBLISH", READMODEL_POSITION_TOPIC, msg };
	const char *layout[3] = { "SET", lk, READMODEL_REDIS_LAYOUT };
	const char *id = rb->identity; /* the sentinel's value, checked by the script */
	const char *live[7] = { "EVAL", SWITCH_LIVE_LUA, "2", READMODEL_LIVE_KEY, ik, gen, id };
	redisReply *r;
	long long switched;

	rb_key(rb, k, sizeof(k), READMODEL_KIND_CHECKPOINT, NULL);
	rb_key(rb, lk, sizeof(lk), READMODEL_KIND_LAYOUT, NULL);
	rb_key(rb, ik, sizeof(ik), READMODEL_KIND_IDENTITY, NULL);
	snprintf(gen, sizeof(gen), "%lld", rb->gen);
	snprintf(msg, sizeof(msg), "%lld %s", rb->gen, token);
	/* Not the identity: written when the number was taken (rb_connect_redis), it is
	 * the generation's sentinel, which the switch's script checks. Written again, it
	 * would hide a FLUSHALL that took the keys written before it. */
	if (!rb_redis_send(rb, 3, layout) || !rb_redis_send(rb, 3, cp) || !rb_redis_drain(rb))
		return false;
	/* Sent: whatever happens to the reply, a failure from here puts the pointer back. */
	old->state = LIVE_UNKNOWN;
	r = redisCommandArgv(rb->redis, 7, live, NULL);
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    r->element[0]->type != REDIS_REPLY_INTEGER) {
		rb_error(rb, "redis: switching " READMODEL_LIVE_KEY " failed: %s\n",
			 !r                             ? rb->redis->errstr
			 : r->type == REDIS_REPLY_ERROR ? r->str
							: "bad reply");
		freeReplyObject(r);
		return false;
	}
	switched = r->element[0]->integer;
	old->present = r->element[1]->type == REDIS_REPLY_STRING;
	snprintf(old->gen, sizeof(old->gen), "%s", old->present ? r->element[1]->str : "");
	old->state = switched == 1 ? LIVE_SWITCHED : LIVE_UNTOUCHED;
	freeReplyObject(r);
	/* Our identity key is gone: Redis lost the generation's keys while we built (the
	 * connection survived a FLUSHALL; a restart breaks it, and a new one is refused by
	 * rb_redis_usable), so it has holes that nothing would ever fill. */
	if (switched == -1) {
		rb_error(rb,
			 "redis lost generation %lld's keys during the rebuild (a FLUSHALL or "
			 "restart?): nothing switched; run the rebuild again\n",
			 rb->gen);
		return false;
	}
	/* A live generation newer than ours was made while we built: a projector copied
	 * Redis from SQL (it had lost its data, or failed over), and its sweep takes every
	 * generation below its own, ours included, keys we had already written among them.
	 * Ours may have holes: it must not go live (and the newer one is complete). */
	if (switched != 1) {
		rb_error(rb,
			 "redis generation %s went live while this rebuild built generation %lld "
			 "(a projector copied redis from SQL): nothing was switched; run the rebuild "
			 "again\n",
			 old->gen, rb->gen);
		return false;
	}
	return rb_redis_send(rb, 3, pub) && rb_redis_drain(rb);
}

/* Under the switch lock no projector commits: fold the rest, write the end state and
 * swap, all in one transaction. */
bool rb_switch_over(struct rebuild *rb)
{
	char token[48];
	struct live_before *old = &rb->live_before;
	long long sql_gen = 0;
	int n = 1;

	if (!lock_for_switch(rb))
		return false;
	if (rb->sql && !sql_generation(rb, &sql_gen)) {
		rb_exec(rb, rb->wr, "ROLLBACK");
		return false;
	}
	rb->phase = "switch";
	while (n > 0)
		if (!rb_fold_chunk(rb, &n))
			goto fail;
	if (rb->stashed) {
		rb_error(rb,
			 "%lld events wait for earlier versions that the log "
			 "does not have\n",
			 rb->stashed);
		goto fail;
	}
	snprintf(token, sizeof(token), "%llu.%lld", (unsigned long long)rb->cp_txid, rb->position);
	if (!rb_write_end_state(rb, token))
		goto fail;
	if (rb->sql && !swap_tables(rb))
		goto fail;
	if (rb->redis && !switch_redis(rb, old, token))
		goto fail;
	if (rb_exec(rb, rb->wr, "COMMIT") || !rb->sql || committed_anyway(rb, sql_gen + 1))
		return true;
	put_back_live(rb, old);
	return false;
fail:
	put_back_live(rb, old);
	rb_exec(rb, rb->wr, "ROLLBACK");
	return false;
}
