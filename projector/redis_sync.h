/* Inside the projector's Redis side: what its files share. Calls go one way, down:
 *   redis_dispatch.c  which Redis step runs next (the identity read and what it leads
 *                     to, whether a batch goes now); calls the three below
 *   redis_batch.c     each batch's write     } call redis_sync.c and redis_scripts.c
 *   redis_resync.c    copying SQL into a     } only, never each other nor
 *                     new generation         } redis_dispatch.c
 *   redis_sync.c      the state of Redis: generation, identity, status check, fence,
 *                     keys, sweep, failure reporting, the connection; calls none of
 *                     the above
 *   redis_scripts.c   the Lua; calls nothing
 * Only redis_batch.c's batch_reply calls back up, through the function pointer
 * redis_dispatch.c hands redis_batch_send. Every room reports to the step machine
 * (step.c) through ctx->redis_report only. The step machine uses projector.h only. */
#ifndef DAYBOOK_PROJECTOR_REDIS_SYNC_H
#define DAYBOOK_PROJECTOR_REDIS_SYNC_H

#include "projector.h"

/* The scripts, by index (redis_scripts.c). */
enum redis_script {
	PUT_ACCOUNT,
	PUT_ITEMS,
	PUT_CHECKPOINT,
	PUT_TOTALS,
	LIVE_STATUS,
	PUT_FENCED,
	RAISE_FENCE,
	SWITCH_LIVE,
	CLEAN_OLD,
	PUT_BATCH
};

/* The sources, indexed by enum redis_script; static storage. */
const char *const *projector_redis_scripts(size_t *n);

/* "<txid>.<position>" of the SQL checkpoint. */
void redis_sync_cp_token(const struct projector_ctx *ctx, char out[48]);
/* The fence argument of the write scripts: our term's epoch, for our event store. */
void redis_sync_fence_arg(const struct projector_ctx *ctx, char *out, size_t len);
/* Redis is to be copied from SQL; `reason` (static) labels the resync it leads to. */
void redis_sync_unsynced(struct projector_ctx *ctx, const char *reason);
/* The live generation has reached `pos`: what the Redis lag metrics measure from. */
void redis_sync_reached(struct projector_ctx *ctx, long long pos);
/* A Redis step failed: count it and leave Redis to a resync after a pause. */
void redis_sync_report_failure(struct projector_ctx *ctx, const char *what);
/* Sweep the keys of generations older than ours (in the background). */
void redis_sync_start_cleanup(struct projector_ctx *ctx);
/* GET /totals's body for rows (sorted here); caller frees. NULL when out of memory. */
char *redis_sync_totals_json(struct readmodel_total *rows, size_t n);
/* "dbk:g:<gen>:<kind>[:<id>]" into out. */
void redis_sync_key(char *out, size_t len, long long gen, const char *kind, const char *id);
/* The live generation has reached the position token `token`. */
void redis_sync_reached_token(struct projector_ctx *ctx, const char *token);
/* No resync before a pause that grows with the failures in a row. */
void redis_sync_pause_resync(struct projector_ctx *ctx);
/* Look up in the log the event that generation gen, ahead of SQL, names as its
 * checkpoint `token`; with `adopt` (the status check) adopt it when found, else (a batch
 * followed it) only confirm it. Missing: Redis is copied from SQL (ahead_of_log). It
 * ends the step; false when not sent. */
bool redis_sync_check_ahead(struct projector_ctx *ctx, long long gen, const char *token,
			    bool adopt);
/* Send LIVE_STATUS's check of the live generation (the identity read): it adopts the
 * generation or marks Redis unsynced, then ends the step; false when not sent. */
bool redis_sync_check_status(struct projector_ctx *ctx);
/* Copy the SQL read models into a new generation (step STEP_SYNCING); it ends the step
 * itself, also when it fails (redis_resync.c). */
void redis_resync_start(struct projector_ctx *ctx);
/* Send the committed batch to the live generation (redis_batch.c); false when not sent
 * (the failure reported). When a rebuild moved the live generation under it, the reply
 * calls `moved` (kept in ctx->batch_moved): true when that sent the batch again,
 * otherwise the step ends. */
bool redis_batch_send(struct projector_ctx *ctx, bool (*moved)(struct projector_ctx *ctx));

#endif
