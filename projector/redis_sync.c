/* The state of the Redis read models, the base the other Redis rooms use: the live
 * generation's status check and periodic check, the leader's fence, keys and tokens,
 * the sweep of old generations, failure reporting, and the connection. It calls no
 * other Redis room: which step runs next is redis_dispatch.c; each batch's write,
 * redis_batch.c; a resync, redis_resync.c (docs/read-models.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis_sync.h"

#define CHECK_EVERY_POLLS 10 /* the poll timer ticks every 100 ms */
#define RETRY_POLLS_MAX 100  /* the longest pause before a resync after failures: 10 s */

void redis_sync_key(char *out, size_t len, long long gen, const char *kind, const char *id)
{
	readmodel_key(out, len, gen, kind, id);
}

void redis_sync_cp_token(const struct projector_ctx *ctx, char out[48])
{
	snprintf(out, 48, "%s.%lld", ctx->cp_txid, ctx->cp_pos);
}

/* Redis is to be copied from SQL; `reason` labels the resync it leads to
 * (daybook_projection_redis_resyncs_total). Static string. */
void redis_sync_unsynced(struct projector_ctx *ctx, const char *reason)
{
	ctx->rsync = RS_UNSYNCED;
	ctx->ahead_unverified = false; /* the copy replaces it */
	ctx->resync_reason = reason;
}

/* The live generation has reached `pos`: what the Redis lag metrics measure from. */
void redis_sync_reached(struct projector_ctx *ctx, long long pos)
{
	ctx->redis_pos = pos;
	metric_set(ctx->m_redis_position, (double)pos);
}

void redis_sync_reached_token(struct projector_ctx *ctx, const char *token)
{
	struct readmodel_position p;

	if (readmodel_position_parse(token, &p))
		redis_sync_reached(ctx, (long long)p.position);
}

/* --- failures, fence and totals -------------------------------------------------------- */

/* No resync before a pause: a second after one failure, doubling with each failure in
 * a row up to RETRY_POLLS_MAX, so that a persistent fault costs little. */
void redis_sync_pause_resync(struct projector_ctx *ctx)
{
	unsigned polls = CHECK_EVERY_POLLS;

	for (unsigned i = 0; i < ctx->rfail_streak && polls < RETRY_POLLS_MAX; i++)
		polls *= 2;
	ctx->next_sync = ctx->polls + (polls < RETRY_POLLS_MAX ? polls : RETRY_POLLS_MAX);
	ctx->rfail_streak++;
}

/* A Redis step failed: say so, count it, and leave Redis to a resync from SQL after
 * a pause (a persistent error, Redis out of memory say, does not spin). */
void redis_sync_report_failure(struct projector_ctx *ctx, const char *what)
{
	metric_add(ctx->m_redis_failures, 1);
	log_warn(&ctx->log,
		 "%s: %zu redis write(s) failed; the generation's checkpoint stays at "
		 "its last complete batch, and redis is copied from SQL after a pause",
		 what, ctx->rerrors);
	redis_sync_unsynced(ctx, "write_failed");
	redis_sync_pause_resync(ctx);
}

void redis_sync_fence_arg(const struct projector_ctx *ctx, char *out, size_t len)
{
	snprintf(out, len, "%lld:%s", ctx->epoch, ctx->identity);
}

static int by_currency(const void *a, const void *b)
{
	return strcmp(((const struct readmodel_total *)a)->currency,
		      ((const struct readmodel_total *)b)->currency);
}

/* GET /totals's body; rows sorted here. Caller frees. */
char *redis_sync_totals_json(struct readmodel_total *rows, size_t n)
{
	qsort(rows, n, sizeof(*rows), by_currency);
	return readmodel_totals_json(rows, n);
}

static void cleanup_reply(void *arg, const redisReply *reply);

/* The SCAN of a sweep's next page: of every generation's keys, or of the one
 * generation it looks for. */
static bool sweep_scan(struct projector_ctx *ctx, const char *cursor)
{
	char match[48];
	const char *scan[6] = { "SCAN", cursor, "MATCH", READMODEL_GEN_MATCH, "COUNT", "1000" };

	if (ctx->sweep_only) {
		readmodel_key_match(match, sizeof(match), ctx->sweep_only);
		scan[3] = match;
	}
	return redis_command(ctx->redis, 6, scan, NULL, cleanup_reply, ctx);
}

/* A sweep has reached its end: done, unless a deletion of it failed (then owed). */
static void sweep_end(struct projector_ctx *ctx)
{
	if (ctx->sweep_failed) {
		ctx->sweep_gen = 0; /* owed: the periodic check starts it again */
		return;
	}
	ctx->swept_gen = ctx->sweep_gen;
	ctx->sweep_gen = 0;
}

/* A page's deletion (CLEAN_OLD or UNLINK) answered: an error (a refused write:
 * MISCONF, READONLY, OOM, an ACL) or a lost connection leaves the sweep owed, so that
 * it is not counted as done with keys of an old generation left behind. */
static void clean_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		if (!ctx->sweep_failed)
			log_warn(&ctx->log,
				 "sweeping old redis generations failed (%s); trying again",
				 reply ? reply->str : "connection lost");
		ctx->sweep_failed = true;
	}
	if (ctx->sweep_closing) {
		ctx->sweep_closing = false;
		sweep_end(ctx);
	}
}

/* Remove the keys of every generation older than the live one, a SCAN page at a time
 * (SCAN walks the whole keyspace, so after a switch from the generation last swept
 * for to the very next one, only that one generation's keys are asked for: every
 * older one is gone, and no other was drawn in between). The page's keys of older
 * generations go to CLEAN_OLD, which checks their identity and unlinks them in one
 * command (or, for the one generation known to be ours, straight to UNLINK). Newer ones are left alone: a rebuild may be filling one. One sweep at a time: one
 * asked for while another runs is owed, and the periodic check starts it when that
 * ends (swept_gen is not the live generation). A sweep that does not reach its end (a
 * lost connection, an error) is owed too; so is one after every (re)connection (Redis
 * may be another server now, a replica that missed deletions) and on taking the lead
 * (the last leader may have died mid-sweep): garbage is reclaimed by whoever leads. */
static void cleanup_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	const char **argv;
	char below[24];
	size_t n, old = 0;

	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2)
		goto abandoned;
	/* The sweep is for the generation live when it began (sweep_gen). Once that is not
	 * the live one we write to, it deletes nothing more: after a FLUSHALL or a restart
	 * Redis is copied from SQL into a new generation whose number starts again from 1,
	 * below sweep_gen, and this SCAN would find the copy's keys as they are written.
	 * What is sent on this connection before the copy's writes goes before them, so
	 * deletions already sent cannot reach the copy. The periodic check starts a sweep
	 * for the new generation. */
	if (ctx->rsync != RS_LIVE || ctx->gen != ctx->sweep_gen)
		goto abandoned;
	n = reply->element[1]->elements;
	if (n && ctx->identity[0]) {
		bool sent;
		if (!(argv = malloc((n + 2) * sizeof(*argv))))
			goto abandoned;
		snprintf(below, sizeof(below), "%lld", ctx->sweep_gen);
		argv[0] = ctx->identity;
		argv[1] = below;
		for (size_t i = 0; i < n; i++) {
			const char *k = reply->element[1]->element[i]->str;
			long long g = readmodel_key_generation(k);
			if (g > 0 && g < ctx->sweep_gen) /* the live one's and newer stay here */
				argv[2 + old++] = k;
		}
		if (ctx->sweep_direct) { /* one generation, known to be ours */
			argv[1] = "UNLINK";
			sent = !old || redis_command(ctx->redis, (int)(old + 1), argv + 1, NULL,
						     clean_reply, ctx);
		} else {
			sent = !old || redis_eval(ctx->redis, CLEAN_OLD, 0, (int)(old + 2), argv,
						  NULL, clean_reply, ctx);
		}
		free(argv);
		if (!sent)
			goto abandoned;
	}
	if (strcmp(reply->element[0]->str, "0") == 0) {
		if (old)
			ctx->sweep_closing = true; /* clean_reply ends it */
		else
			sweep_end(ctx);
		return;
	}
	if (sweep_scan(ctx, reply->element[0]->str))
		return;
abandoned:
	ctx->sweep_gen = 0; /* owed: the periodic check starts it again */
}

/* Whose the one generation a sweep looks for is: ours (or no identity left, a sweep
 * cut short took it) lets its pages go straight to UNLINK, with no script that checks
 * each key's generation and identity (most of a sweep's Redis CPU, docs/performance.md);
 * another store's sends the sweep through CLEAN_OLD, over every generation. */
static void sweep_identity_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		ctx->sweep_gen = 0; /* owed: the periodic check starts it again */
		return;
	}
	ctx->sweep_direct = reply->type == REDIS_REPLY_NIL ||
			    (reply->type == REDIS_REPLY_STRING &&
			     strcmp(reply->str, ctx->identity) == 0);
	if (!ctx->sweep_direct)
		ctx->sweep_only = 0;
	if (!sweep_scan(ctx, "0"))
		ctx->sweep_gen = 0;
}

void redis_sync_start_cleanup(struct projector_ctx *ctx)
{
	char key[READMODEL_KEY_MAX];
	const char *get[2] = { "GET", key };
	bool sent;

	if (ctx->sweep_gen || !ctx->gen)
		return; /* the one in flight ends first; this one is owed */
	ctx->sweep_only = ctx->swept_gen && ctx->gen == ctx->swept_gen + 1 ? ctx->swept_gen : 0;
	ctx->sweep_failed = false;
	ctx->sweep_closing = false;
	ctx->sweep_direct = false;
	if (ctx->sweep_only) {
		readmodel_key(key, sizeof(key), ctx->sweep_only, READMODEL_KIND_IDENTITY, NULL);
		sent = redis_command(ctx->redis, 2, get, NULL, sweep_identity_reply, ctx);
	} else {
		sent = sweep_scan(ctx, "0");
	}
	if (!sent) {
		log_warn(&ctx->log, "cannot clean old redis generations now");
		return;
	}
	ctx->sweep_gen = ctx->gen;
}

/* Start the sweep owed, if any: the live generation is ours and no sweep since it went
 * live has reached its end. */
static void sweep_if_owed(struct projector_ctx *ctx)
{
	if (ctx->rsync == RS_LIVE && ctx->gen && ctx->identity[0] && !ctx->sweep_gen &&
	    ctx->swept_gen != ctx->gen)
		redis_sync_start_cleanup(ctx);
}

/* --- is the live generation ours and current? ------------------------------------------- */

/* The live generation `gen` is adopted: Redis goes on from its checkpoint `token`. */
static void adopt(struct projector_ctx *ctx, long long gen, const char *token)
{
	ctx->gen = gen;
	ctx->rsync = RS_LIVE;
	sweep_if_owed(ctx); /* a rebuild's switch, a takeover: sweep what is older */
	redis_sync_reached_token(ctx, token);
	log_info(&ctx->log, "redis generation %lld is current (at %s)", ctx->gen, token);
}

/* Whether the event a generation ahead of SQL names as its checkpoint is in the log. */
static void ahead_checked(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	char why[256];

	ctx->ahead_checking = false;
	if (ctx->redis_sessions != ctx->ahead_session || ctx->role != ROLE_LEADER) {
		/* Redis reconnected (another server, perhaps) or the lease went while the log
		 * was asked: what was checked is not what is there now. */
		ctx->ahead_unverified = false;
		ctx->rsync = RS_UNKNOWN;
	} else if (!pg_outcome_ok(out, why, sizeof(why)) || out->n != 1) {
		log_warn(&ctx->log,
			 "cannot look up redis generation %lld's checkpoint %s in the "
			 "log: %s",
			 ctx->ahead_gen, ctx->ahead_token, why);
		if (ctx->ahead_adopt)
			ctx->rsync = RS_UNKNOWN; /* checked again at the next idle step */
	} else if (PQntuples(out->results[0]) == 1) {
		ctx->ahead_unverified = false;
		if (ctx->ahead_adopt)
			adopt(ctx, ctx->ahead_gen, ctx->ahead_token);
	} else {
		log_warn(&ctx->log,
			 "redis generation %lld is at %s, an event this log does not have (the "
			 "database restored to an earlier point?): not %s; copying the read "
			 "models from SQL",
			 ctx->ahead_gen, ctx->ahead_token,
			 ctx->ahead_adopt ? "adopted" : "followed any further");
		redis_sync_unsynced(ctx, "ahead_of_log");
	}
	ctx->redis_report(ctx, REDIS_STEP_DONE);
}

bool redis_sync_check_ahead(struct projector_ctx *ctx, long long gen, const char *token, bool adopt)
{
	struct readmodel_position at;
	char txid[24], pos[24];
	const char *params[2] = { txid, pos };

	if (!readmodel_position_parse(token, &at))
		return false;
	ctx->ahead_gen = gen;
	ctx->ahead_adopt = adopt;
	ctx->ahead_session = ctx->redis_sessions;
	if (token != ctx->ahead_token) /* the batch path passes the one it noted */
		snprintf(ctx->ahead_token, sizeof(ctx->ahead_token), "%s", token);
	snprintf(txid, sizeof(txid), "%llu", (unsigned long long)at.txid);
	snprintf(pos, sizeof(pos), "%llu", (unsigned long long)at.position);
	ctx->ahead_checking = true;
	if (pg_queue(ctx->pg, "event_at", 2, params) && pg_run(ctx->pg, ahead_checked, ctx))
		return true;
	/* pg_run can fail after its callback ran (the connection broke as it sent): the
	 * step has then ended already. */
	if (!ctx->ahead_checking)
		return true;
	ctx->ahead_checking = false;
	return false;
}

static void status_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	char token[48];
	struct readmodel_position ours, live;

	redis_sync_cp_token(ctx, token);
	/* A generation at or beyond our checkpoint is safe to adopt: replaying batches it
	 * already has is a no-op, since a batch to a generation this projector did not
	 * write up to the batch's start goes through the guards (redis_batch.c). One beyond
	 * it must name an event of this log, though: a database restored from a physical
	 * backup keeps its identity, and Redis may hold models of events the restored log
	 * no longer has, whose positions new events would take again (their writes would
	 * then be skipped as replays). A batch that follows such a generation (MOVED) has
	 * it checked the same way before the next (redis_batch.c). */
	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
	    readmodel_position_parse(token, &ours) &&
	    readmodel_position_parse(reply->element[1]->str, &live) &&
	    readmodel_position_cmp(&live, &ours) >= 0) {
		long long gen = strtoll(reply->element[0]->str, NULL, 10);
		if (readmodel_position_cmp(&live, &ours) == 0)
			adopt(ctx, gen, reply->element[1]->str);
		else if (redis_sync_check_ahead(ctx, gen, reply->element[1]->str, true))
			return; /* ahead_checked ends the step */
		else
			ctx->rsync = RS_UNKNOWN; /* the connection is being reset */
	} else {
		if (reply && reply->type != REDIS_REPLY_ARRAY)
			log_info(&ctx->log,
				 "redis holds no live generation of this event store "
				 "(identity %s)",
				 ctx->identity);
		if (reply)
			redis_sync_unsynced(ctx, "no_live_generation");
		else
			ctx->rsync = RS_UNKNOWN;
	}
	ctx->redis_report(ctx, REDIS_STEP_DONE);
}

bool redis_sync_check_status(struct projector_ctx *ctx)
{
	const char *argv[1] = { ctx->identity };

	return redis_eval(ctx->redis, LIVE_STATUS, 0, 1, argv, NULL, status_reply, ctx);
}

void projector_redis_session(struct projector_ctx *ctx)
{
	ctx->identity_stale = true;
}

static void live_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (!reply || ctx->rsync != RS_LIVE)
		return;
	if (reply->type != REDIS_REPLY_STRING || strtoll(reply->str, NULL, 10) != ctx->gen) {
		log_warn(&ctx->log, "redis no longer holds generation %lld as live: checking",
			 ctx->gen);
		/* A batch on its way checks the generation itself and follows a rebuild's
		 * switch; marking Redis unknown under it would make it skip Redis, leave the
		 * new generation behind our checkpoint and cost a full resync. So the check
		 * waits for the step machine to be idle. */
		ctx->live_suspect = true;
		ctx->redis_report(ctx, REDIS_WANTS_STEP);
	}
}

void projector_redis_tick(struct projector_ctx *ctx)
{
	const char *get[2] = { "GET", READMODEL_LIVE_KEY };

	if (++ctx->polls % CHECK_EVERY_POLLS != 0 || ctx->role != ROLE_LEADER)
		return;
	if (ctx->rsync == RS_LIVE && redis_connected(ctx->redis)) {
		(void)!redis_command(ctx->redis, 2, get, NULL, live_reply, ctx);
		sweep_if_owed(ctx);
	} else if (ctx->rsync != RS_LIVE)
		ctx->redis_report(ctx, REDIS_WANTS_STEP);
}

static void fence_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (reply && reply->type == REDIS_REPLY_ERROR)
		log_warn(&ctx->log, "redis refused leader epoch %lld: %s", ctx->epoch, reply->str);
}

void projector_redis_fence(struct projector_ctx *ctx)
{
	char e[READMODEL_FENCE_ARG_MAX];
	const char *argv[1] = { e };

	/* The fence is per event store: until its identity is read, the first write after
	 * reading it raises the fence (identity_done calls this again). */
	if (!ctx->identity[0])
		return;
	redis_sync_fence_arg(ctx, e, sizeof(e));
	if (ctx->role == ROLE_LEADER && redis_connected(ctx->redis))
		(void)!redis_eval(ctx->redis, RAISE_FENCE, 0, 1, argv, NULL, fence_reply, ctx);
}

static void on_redis_ready(void *arg)
{
	struct projector_ctx *ctx = arg;

	/* Whatever happened while we were apart, find out before writing again; and sweep
	 * again (another server may have taken over without the last sweep's deletions). */
	ctx->rsync = RS_UNKNOWN;
	ctx->sweep_gen = 0;
	ctx->swept_gen = 0;
	ctx->redis_sessions++; /* a check of the last server's generation is void */
	projector_redis_fence(ctx);
	ctx->redis_report(ctx, REDIS_WANTS_STEP);
}

int projector_redis_open(struct projector_ctx *ctx,
			 void (*report)(struct projector_ctx *ctx, enum redis_report what))
{
	size_t nscripts;
	const char *const *scripts = projector_redis_scripts(&nscripts);
	struct redis_config rc = {
		.server = &ctx->cfg.redis,
		.name = "daybook-projector",
		.base = ctx->base,
		.log = &ctx->log,
		.scripts = scripts,
		.nscripts = nscripts,
		.command_timeout = 5,
		.on_ready = on_redis_ready,
		.arg = ctx,
	};

	ctx->redis_report = report;
	ctx->m_redis_failures = metrics_get(
		ctx->metrics, METRIC_COUNTER, "daybook_projection_redis_failures_total",
		"Redis batches and resyncs abandoned on a failed write; Redis is then copied from "
		"SQL after a pause.",
		"projection=\"redis\"", NULL, 0);
	ctx->m_redis_position = metrics_get(ctx->metrics, METRIC_GAUGE,
					    "daybook_projection_position",
					    "Log position of the last applied event.",
					    "projection=\"redis\"", NULL, 0);
	ctx->m_redis_lag_events = metrics_get(ctx->metrics, METRIC_GAUGE,
					      "daybook_projection_lag_events",
					      "Events in the log beyond the checkpoint (estimate).",
					      "projection=\"redis\"", NULL, 0);
	ctx->m_redis_lag_seconds = metrics_get(ctx->metrics, METRIC_GAUGE,
					       "daybook_projection_lag_seconds",
					       "Age of the oldest event not yet applied.",
					       "projection=\"redis\"", NULL, 0);
	return redis_open(&ctx->redis, &rc);
}
