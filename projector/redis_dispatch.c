/* Which Redis step runs next: the store's identity read and what it leads to (the
 * status check, a batch or a resync), and whether a batch goes to Redis now. The room
 * above redis_batch.c, redis_resync.c and redis_sync.c; none of them calls back here
 * (redis_batch.c re-sends a batch a rebuild moved through the function this room
 * hands it). */
#include <stdio.h>
#include <string.h>

#include "redis_sync.h"

/* What reading the store's identity leads to. */
enum identity_next { ID_THEN_STATUS, ID_THEN_SYNC, ID_THEN_BATCH };

/* The identity read: go on with what it was read for. */
static void identity_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	const char *got = pg_outcome_value(out);
	bool changed;

	if (!got || !*got || strlen(got) >= sizeof(ctx->identity)) {
		if (!error)
			log_error(&ctx->log,
				  "cannot read the event store's identity (is the database "
				  "migrated?): %s",
				  out->n ? PQresultErrorMessage(out->results[0]) : "no result");
		/* Nothing is written to Redis without it; tried again after a pause. */
		redis_sync_unsynced(ctx, "identity_unreadable");
		redis_sync_pause_resync(ctx);
		ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	}
	changed = ctx->identity[0] && strcmp(ctx->identity, got) != 0;
	if (changed)
		log_warn(&ctx->log,
			 "the event store's identity changed from %s to %s (the database "
			 "was re-created or restored): its redis generation is not ours",
			 ctx->identity, got);
	snprintf(ctx->identity, sizeof(ctx->identity), "%s", got);
	ctx->identity_stale = false;
	projector_redis_fence(ctx); /* a leader's fence is per store: raise ours */
	switch ((enum identity_next)ctx->identity_next) {
	case ID_THEN_BATCH:
		if (changed)
			redis_sync_unsynced(ctx,
					    "identity_changed"); /* a resync builds this store's generation */
		if (changed || !projector_redis_batch(ctx))
			ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	case ID_THEN_SYNC:
		redis_resync_start(ctx); /* it ends the step itself, also when it fails */
		return;
	case ID_THEN_STATUS:
		if (redis_sync_check_status(ctx))
			return;
		redis_sync_unsynced(ctx, "redis_error");
		redis_sync_pause_resync(ctx);
		ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	}
}

/* Read the store's identity, then go on as `next` says; false when it cannot be read
 * now (nothing started). */
static bool read_identity(struct projector_ctx *ctx, enum identity_next next)
{
	if (!pg_ready(ctx->pg) || !pg_queue_sql(ctx->pg, READMODEL_IDENTITY_SQL, 0, NULL) ||
	    !pg_run(ctx->pg, identity_done, ctx)) {
		if (next == ID_THEN_BATCH)
			ctx->rsync = RS_UNKNOWN; /* checked (and resynced if behind) later */
		return false;
	}
	ctx->identity_next = next;
	return true;
}

bool projector_redis_maintain(struct projector_ctx *ctx)
{
	if (ctx->role != ROLE_LEADER || !redis_connected(ctx->redis))
		return false;
	if (ctx->ahead_unverified && ctx->rsync == RS_LIVE) {
		enum projector_step was = ctx->step;
		ctx->step = STEP_SYNCING; /* first: the check may end the step at once */
		if (redis_sync_check_ahead(ctx, ctx->ahead_gen, ctx->ahead_token, false))
			return true;
		ctx->step = was;
		return false;
	}
	if (ctx->live_suspect) {
		ctx->live_suspect = false;
		if (ctx->rsync == RS_LIVE)
			ctx->rsync = RS_UNKNOWN; /* adopted below if at or past our checkpoint */
	}
	/* The identity is read afresh each time: what Redis holds is compared with the
	 * store as it is now. */
	if (ctx->rsync == RS_UNKNOWN) {
		if (!read_identity(ctx, ID_THEN_STATUS))
			return false;
		ctx->step = STEP_SYNCING;
		return true;
	}
	if (ctx->rsync == RS_UNSYNCED && ctx->polls >= ctx->next_sync) {
		if (!read_identity(ctx, ID_THEN_SYNC))
			return false;
		ctx->step = STEP_SYNCING;
		return true;
	}
	return false;
}

bool projector_redis_batch(struct projector_ctx *ctx)
{
	/* Unknown (just connected, or the live generation looked changed): the script's
	 * own checks decide, together with the writes, whether the live generation goes
	 * on where this batch starts; no status check (and no resync) first. */
	if (ctx->rsync != RS_LIVE && ctx->rsync != RS_UNKNOWN)
		return false;
	if (!redis_connected(ctx->redis)) {
		if (ctx->rsync == RS_LIVE)
			redis_sync_unsynced(ctx, "disconnected");
		return false;
	}
	if (ctx->identity_stale) /* a new session: is the store still the one we wrote for? */
		return read_identity(ctx, ID_THEN_BATCH);
	return redis_batch_send(ctx, projector_redis_batch);
}

bool projector_redis_batch_early(struct projector_ctx *ctx)
{
	if (ctx->rsync != RS_LIVE || ctx->identity_stale || !redis_connected(ctx->redis))
		return false;
	/* A send that fails is reported (Redis is then unsynced, a resync repairs it) and
	 * ends the leg: the batch is not sent again after the commit. */
	ctx->redis_leg = redis_batch_send(ctx, projector_redis_batch) ? REDIS_LEG_SENT
								      : REDIS_LEG_OVER;
	return ctx->redis_leg == REDIS_LEG_SENT;
}
