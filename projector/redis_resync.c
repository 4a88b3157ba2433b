/* Copying the SQL read models into a new Redis generation (a resync): a page of
 * accounts with their statements at a time, then the transfers and the totals, then
 * the generation's layout, identity and checkpoint, and only once those are in, the
 * live pointer (docs/read-models.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis_sync.h"

/* Resyncs wait this long once another deployment is seen taking the live pointer
 * again and again (one Redis database shared by two: unsupported, see docs). */
#define SHARED_REDIS_BACKOFF_POLLS 600

enum sync_phase {
	SY_CHECK,
	SY_GENERATION,
	SY_ACCOUNTS,
	SY_TRANSFERS,
	SY_TOTALS,
	SY_SWITCH,
	SY_LIVE
};

struct sync_state {
	enum sync_phase phase;
	long long gen;
	char cp[48];
	char after[LEDGER_ID_MAX + 1]; /* keyset cursor of the current phase */
	bool last_page;
};

static void sync_next(struct projector_ctx *ctx);

/* A reply of the resync's current phase: once all are in, the next phase. */
static void step_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		if (!ctx->rfailed)
			log_warn(&ctx->log, "redis write failed: %s",
				 reply ? reply->str : redis_last_error(ctx->redis));
		ctx->rfailed = true;
		ctx->rerrors++;
	}
	if (--ctx->rpending > 0)
		return;
	sync_next(ctx);
}

static void send(struct projector_ctx *ctx, int argc, const char *const *argv)
{
	if (redis_command(ctx->redis, argc, argv, NULL, step_reply, ctx)) {
		ctx->rpending++;
	} else {
		ctx->rfailed = true;
		ctx->rerrors++;
	}
}

static void eval(struct projector_ctx *ctx, enum redis_script s, int nkeys, int argc,
		 const char *const *argv)
{
	if (redis_eval(ctx->redis, s, nkeys, argc, argv, NULL, step_reply, ctx)) {
		ctx->rpending++;
	} else {
		ctx->rfailed = true;
		ctx->rerrors++;
	}
}

/* The fence argument of the write scripts: our term's epoch, for our event store. */
/* --- the pieces of a generation ------------------------------------------------------- */

static void put_account(struct projector_ctx *ctx, long long gen, const char *id, int32_t version,
			int32_t entries, const char *json)
{
	char k[LEDGER_ID_MAX + 48], e[READMODEL_FENCE_ARG_MAX], v[16], n[16];
	const char *argv[5] = { k, e, v, n, json };

	redis_sync_key(k, sizeof(k), gen, READMODEL_KIND_ACCOUNT, id);
	redis_sync_fence_arg(ctx, e, sizeof(e));
	snprintf(v, sizeof(v), "%d", version);
	snprintf(n, sizeof(n), "%d", entries);
	eval(ctx, PUT_ACCOUNT, 1, 5, argv);
}

static void put_transfer(struct projector_ctx *ctx, long long gen, const char *id, const char *json)
{
	char k[LEDGER_ID_MAX + 48], e[READMODEL_FENCE_ARG_MAX];
	const char *argv[3] = { k, e, json };

	redis_sync_key(k, sizeof(k), gen, READMODEL_KIND_TRANSFER, id);
	redis_sync_fence_arg(ctx, e, sizeof(e));
	eval(ctx, PUT_FENCED, 1, 3, argv);
}

/* The account's items, oldest first, into its statement (newest first), by version
 * so that a replay adds nothing. */
static void put_entries(struct projector_ctx *ctx, long long gen, const char *id,
			const char *const *versions, const char *const *jsons, size_t n)
{
	char k[LEDGER_ID_MAX + 48], e[READMODEL_FENCE_ARG_MAX];
	const char **argv = malloc((2 + 2 * n) * sizeof(*argv));

	if (!argv) {
		ctx->rfailed = true;
		return;
	}
	redis_sync_key(k, sizeof(k), gen, READMODEL_KIND_STATEMENT, id);
	redis_sync_fence_arg(ctx, e, sizeof(e));
	argv[0] = k;
	argv[1] = e;
	for (size_t i = 0; i < n; i++) {
		argv[2 + 2 * i] = versions[i];
		argv[3 + 2 * i] = jsons[i];
	}
	eval(ctx, PUT_ITEMS, 1, (int)(2 + 2 * n), argv);
	free(argv);
}

static void put_totals(struct projector_ctx *ctx, long long gen, const char *token, char *json)
{
	char k[64], e[READMODEL_FENCE_ARG_MAX];
	const char *argv[4] = { k, e, token, json };

	if (!json) {
		ctx->rfailed = true;
		return;
	}
	redis_sync_key(k, sizeof(k), gen, READMODEL_KIND_TOTALS, NULL);
	redis_sync_fence_arg(ctx, e, sizeof(e));
	eval(ctx, PUT_TOTALS, 1, 4, argv);
	free(json);
}

static void put_checkpoint(struct projector_ctx *ctx, long long gen, const char *token,
			   const char *from)
{
	char k[64], e[READMODEL_FENCE_ARG_MAX], msg[96];
	const char *argv[4] = { k, e, token, from };
	const char *pub[3] = { "PUBLISH", READMODEL_POSITION_TOPIC, msg };

	redis_sync_key(k, sizeof(k), gen, READMODEL_KIND_CHECKPOINT, NULL);
	redis_sync_fence_arg(ctx, e, sizeof(e));
	eval(ctx, PUT_CHECKPOINT, 1, from ? 4 : 3, argv);
	snprintf(msg, sizeof(msg), "%lld %s", gen, token);
	send(ctx, 3, pub);
}

/* --- copying SQL into a new generation --------------------------------------------- */

static void sync_abort(struct projector_ctx *ctx, const char *why)
{
	log_warn(&ctx->log, "redis resync abandoned: %s", why);
	metric_add(ctx->m_redis_failures, 1);
	free(ctx->sync);
	ctx->sync = NULL;
	redis_sync_unsynced(ctx, "resync_failed");
	redis_sync_pause_resync(ctx);
	ctx->redis_report(ctx, REDIS_STEP_DONE);
}

/* Hold the step open while a phase sends its commands. */
static void begin_sends(struct projector_ctx *ctx)
{
	ctx->rpending = 1;
}

static void end_sends(struct projector_ctx *ctx)
{
	step_reply(ctx, &(redisReply){ .type = REDIS_REPLY_STATUS });
}

/* Redis reconnected since the copy began (on_redis_ready marks Redis unknown): the
 * server may be a restarted or promoted one that lost what was copied so far, so
 * the copy is given up before anything more is written, and starts again. */
#define RECONNECTED "redis reconnected during the copy (the server may have lost its keys)"

/* The one result of a resync page's run, or NULL after abandoning the resync (the
 * run failed, a commit-time failure included, or did not give one result set; or
 * Redis reconnected meanwhile). */
static PGresult *page_result(struct projector_ctx *ctx, const struct pg_outcome *out)
{
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	PGresult *r = out->results && out->n ? out->results[0] : NULL;

	if (!error && out->n == 1 && PQresultStatus(r) == PGRES_TUPLES_OK) {
		if (ctx->rsync == RS_SYNCING)
			return r;
		error = RECONNECTED;
	}
	sync_abort(ctx, error ? error : r ? PQresultErrorMessage(r) : "no result");
	return NULL;
}

static void accounts_page_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	struct sync_state *s = ctx->sync;
	PGresult *r = page_result(ctx, out);
	int rows = r ? PQntuples(r) : -1;
	int accounts = 0;

	if (rows < 0)
		return;
	begin_sends(ctx);
	for (int row = 0; row < rows;) {
		const char *id = PQgetvalue(r, row, 0);
		/* READMODEL_SQL_ACCOUNT_COLUMNS, the entries (9), READMODEL_SQL_ENTRY_COLUMNS */
		struct readmodel_account a = readmodel_account_from_pg(r, row, 0);
		char *json = readmodel_account_json(&a), *items[READMODEL_ITEMS_KEPT];
		const char *versions[READMODEL_ITEMS_KEPT];
		size_t m = 0;

		if (json)
			put_account(ctx, s->gen, id, a.version, atoi(PQgetvalue(r, row, 9)), json);
		else
			ctx->rfailed = true;
		free(json);
		/* This account's items follow on its rows (none: one row with NULLs). */
		for (int first = row; row < rows && strcmp(PQgetvalue(r, row, 0), id) == 0; row++) {
			struct readmodel_entry e;
			(void)first;
			if (PQgetisnull(r, row, 10) || m == READMODEL_ITEMS_KEPT)
				continue;
			e = readmodel_entry_from_pg(r, row, 10);
			versions[m] = PQgetvalue(r, row, 10);
			items[m] = readmodel_entry_json(&e);
			if (items[m])
				m++;
		}
		if (m)
			put_entries(ctx, s->gen, id, versions, (const char *const *)items, m);
		for (size_t i = 0; i < m; i++)
			free(items[i]);
		snprintf(s->after, sizeof(s->after), "%s", id);
		accounts++;
	}
	s->last_page = accounts < PROJECTOR_SYNC_ACCOUNTS_PAGE;
	end_sends(ctx);
}

static void transfers_page_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	struct sync_state *s = ctx->sync;
	PGresult *r = page_result(ctx, out);
	int rows = r ? PQntuples(r) : -1;

	if (rows < 0)
		return;
	begin_sends(ctx);
	for (int row = 0; row < rows; row++) {
		/* READMODEL_SQL_TRANSFER_COLUMNS */
		struct readmodel_transfer t = readmodel_transfer_from_pg(r, row, 0);
		char *json = readmodel_transfer_json(&t);
		if (json)
			put_transfer(ctx, s->gen, t.transfer_id, json);
		else
			ctx->rfailed = true;
		free(json);
		snprintf(s->after, sizeof(s->after), "%s", t.transfer_id);
	}
	s->last_page = rows < PROJECTOR_SYNC_TRANSFERS_PAGE;
	end_sends(ctx);
}

static void totals_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	struct sync_state *s = ctx->sync;
	PGresult *r = page_result(ctx, out);
	int rows = r ? PQntuples(r) : -1;
	struct readmodel_total *t;

	if (rows < 0)
		return;
	/* The texts stay in the result: no copy into buffers of a guessed size. */
	t = calloc((size_t)rows + 1, sizeof(*t));
	for (int row = 0; t && row < rows; row++)
		t[row] = (struct readmodel_total){ .currency = PQgetvalue(r, row, 0),
						   .accounts = PQgetvalue(r, row, 1),
						   .open_accounts = PQgetvalue(r, row, 2),
						   .balance_sum = PQgetvalue(r, row, 3) };
	begin_sends(ctx);
	s->phase = SY_SWITCH;
	put_totals(ctx, s->gen, s->cp, t ? redis_sync_totals_json(t, (size_t)rows) : NULL);
	free(t);
	end_sends(ctx);
}

/* A page after the phase's cursor (the page size is the statement's), or with paged
 * false a statement without parameters. */
static void query(struct projector_ctx *ctx, const char *statement, bool paged, pg_done_cb done)
{
	const char *params[1] = { ctx->sync->after };

	if (!pg_queue(ctx->pg, statement, paged ? 1 : 0, params) || !pg_run(ctx->pg, done, ctx))
		sync_abort(ctx, "postgresql connection lost");
}

static void generation_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	char identity_key[48];
	const char *set_identity[3] = { "SET", identity_key, ctx->identity };

	if (!reply || reply->type != REDIS_REPLY_INTEGER) {
		sync_abort(ctx, reply && reply->str ? reply->str
						    : "INCR " READMODEL_GENERATION_KEY " failed");
		return;
	}
	ctx->sync->gen = reply->integer;
	ctx->sync->phase = SY_ACCOUNTS;
	/* Which store the generation is built from comes first, so that no sweep of
	 * another deployment's projector takes the keys that follow for its own garbage;
	 * the switch writes it again, checked. */
	redis_sync_key(identity_key, sizeof(identity_key), ctx->sync->gen, READMODEL_KIND_IDENTITY,
		       NULL);
	(void)!redis_command(ctx->redis, 3, set_identity, NULL, NULL, NULL);
	log_info(&ctx->log, "copying the read models into redis generation %lld", ctx->sync->gen);
	query(ctx, "sync_accounts", true, accounts_page_done);
}

/* The switch's reply: did our generation replace another store's? */
static void switch_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (reply && reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "NEWER", 5) == 0) {
		/* A rebuild switched to a generation numbered after ours: the copy is given
		 * up (and the rebuild's clean-up takes it), the status check follows the
		 * rebuild's. */
		log_info(&ctx->log, "redis generation %lld not made live: %s", ctx->sync->gen,
			 reply->str);
		ctx->rfailed = true; /* abandoned without the warning of a failed write */
	} else if (reply && reply->type == REDIS_REPLY_STRING && reply->len == 0) {
		ctx->foreign_fight = false;
	} else if (reply && reply->type == REDIS_REPLY_STRING) {
		/* The first time, an earlier life of the database, say; the same store again
		 * means it is alive and writing to this Redis database too. */
		ctx->foreign_fight = strcmp(reply->str, ctx->foreign_last) == 0;
		if (ctx->foreign_fight)
			log_error(&ctx->log,
				  "another event store (identity %s) keeps making its "
				  "generation live in this redis database: two deployments "
				  "share it, which is unsupported (give each its own redis "
				  "database); resyncs now wait %d s",
				  reply->str, SHARED_REDIS_BACKOFF_POLLS / 10);
		else
			log_warn(&ctx->log,
				 "the live redis generation was built from another event "
				 "store (identity %s), not this one (%s): replaced by ours and "
				 "left in place",
				 reply->str, ctx->identity);
		snprintf(ctx->foreign_last, sizeof(ctx->foreign_last), "%.*s",
			 (int)(sizeof(ctx->foreign_last) - 1), reply->str);
	}
	step_reply(arg, reply);
}

static void sync_next(struct projector_ctx *ctx)
{
	struct sync_state *s = ctx->sync;
	char gen[24], epoch[READMODEL_FENCE_ARG_MAX];
	char layout_key[48], identity_key[48];
	const char *live[3] = { epoch, gen, ctx->identity };
	const char *layout[3] = { layout_key, epoch, READMODEL_REDIS_LAYOUT };
	const char *identity[3] = { identity_key, epoch, ctx->identity };

	if (ctx->rfailed) {
		sync_abort(ctx, "a redis write failed");
		return;
	}
	if (ctx->rsync != RS_SYNCING) {
		sync_abort(ctx, RECONNECTED);
		return;
	}
	switch (s->phase) {
	case SY_ACCOUNTS:
		if (!s->last_page) {
			query(ctx, "sync_accounts", true, accounts_page_done);
			return;
		}
		s->phase = SY_TRANSFERS;
		s->after[0] = '\0';
		s->last_page = false;
		query(ctx, "sync_transfers", true, transfers_page_done);
		return;
	case SY_TRANSFERS:
		if (!s->last_page) {
			query(ctx, "sync_transfers", true, transfers_page_done);
			return;
		}
		s->phase = SY_TOTALS;
		query(ctx, "load_totals", false, totals_done);
		return;
	case SY_SWITCH:
		/* Everything up to s->cp is in the new generation (every reply so far was
		 * checked): mark it complete... */
		begin_sends(ctx);
		redis_sync_fence_arg(ctx, epoch, sizeof(epoch));
		redis_sync_key(layout_key, sizeof(layout_key), s->gen, READMODEL_KIND_LAYOUT, NULL);
		redis_sync_key(identity_key, sizeof(identity_key), s->gen, READMODEL_KIND_IDENTITY,
			       NULL);
		eval(ctx, PUT_FENCED, 1, 3, identity);
		eval(ctx, PUT_FENCED, 1, 3, layout);
		put_checkpoint(ctx, s->gen, s->cp, NULL);
		s->phase = SY_LIVE;
		end_sends(ctx);
		return;
	case SY_LIVE:
		/* ...and once that is in too, let readers have it. */
		begin_sends(ctx);
		snprintf(gen, sizeof(gen), "%lld", s->gen);
		redis_sync_fence_arg(ctx, epoch, sizeof(epoch));
		if (redis_eval(ctx->redis, SWITCH_LIVE, 0, 3, live, NULL, switch_reply, ctx))
			ctx->rpending++;
		else
			ctx->rfailed = true;
		s->phase = SY_CHECK; /* reused as "switched" */
		end_sends(ctx);
		return;
	case SY_CHECK:
		log_info(&ctx->log, "redis generation %lld is live at %s", s->gen, s->cp);
		redis_sync_reached_token(ctx, s->cp);
		ctx->rfail_streak = 0;
		ctx->gen = s->gen;
		ctx->rsync = RS_LIVE;
		free(ctx->sync);
		ctx->sync = NULL;
		redis_sync_start_cleanup(ctx);
		if (ctx->foreign_fight) /* two deployments fight over the pointer */
			ctx->next_sync = ctx->polls + SHARED_REDIS_BACKOFF_POLLS;
		ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	default:
		sync_abort(ctx, "unexpected sync phase");
		return;
	}
}

void redis_resync_start(struct projector_ctx *ctx)
{
	const char *incr[2] = { "INCR", READMODEL_GENERATION_KEY };
	char labels[96];

	ctx->sync = calloc(1, sizeof(*ctx->sync));
	if (!ctx->sync) {
		sync_abort(ctx, "out of memory");
		return;
	}
	ctx->sync->phase = SY_GENERATION;
	snprintf(labels, sizeof(labels), "projection=\"redis\",reason=\"%s\"",
		 ctx->resync_reason ? ctx->resync_reason : "unknown");
	metric_add(metrics_get(ctx->metrics, METRIC_COUNTER,
			       "daybook_projection_redis_resyncs_total",
			       "Copies of the SQL read models into a new Redis generation, started, "
			       "by the reason Redis needed one.",
			       labels, NULL, 0),
		   1);
	redis_sync_cp_token(ctx, ctx->sync->cp);
	ctx->rsync = RS_SYNCING;
	ctx->rfailed = false;
	ctx->rerrors = 0;
	ctx->step = STEP_SYNCING;
	if (!redis_command(ctx->redis, 2, incr, NULL, generation_reply, ctx))
		sync_abort(ctx, "redis is not connected");
}
