/* The Redis leg of each committed batch: one script call (PUT_BATCH) writes the
 * batch's accounts, transfers, statement items and totals to the live generation and
 * then moves its checkpoint; a replay is a no-op. The keys and bodies are made here,
 * each account's items gathered into one run, so that the script does little more
 * than one command per key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis_sync.h"

struct totals_collect {
	struct readmodel_totals *rows;
	const struct readmodel_totals **ptr;
	size_t n, cap;
};

/* A currency's totals as of the batch's end: the committed ones plus the batch's change
 * (0 once committed, projector_rows_committed), since the batch may go to Redis before
 * its SQL transaction commits. */
static void collect_total(void *arg, const char *currency, void *value)
{
	struct totals_collect *c = arg;
	const struct rm_total *t = value;

	(void)currency;
	if (c->n < c->cap) {
		c->rows[c->n] = t->tot;
		readmodel_count_add(&c->rows[c->n].count, &t->delta);
		c->ptr[c->n] = &c->rows[c->n];
		c->n++;
	}
}

/* GET /totals's body from the cached totals and the batch's change. Caller frees. */
static char *cached_totals_json(struct projector_ctx *ctx)
{
	struct totals_collect c = { .cap = strmap_count(ctx->totals) };
	char *json = NULL;

	c.rows = calloc(c.cap ? c.cap : 1, sizeof(*c.rows));
	c.ptr = calloc(c.cap ? c.cap : 1, sizeof(*c.ptr));
	if (c.rows && c.ptr) {
		strmap_foreach(ctx->totals, collect_total, &c);
		json = readmodel_totals_json_of(c.ptr, c.n);
	}
	free(c.rows);
	free(c.ptr);
	return json;
}

/* The arguments of one PUT_BATCH call and their lengths; the texts they point to are
 * owned here (the numbers, keys and the accounts' bodies) or by the batch's rows
 * (items' bodies). */
struct batch_args {
	const char **argv;
	size_t *lens;
	size_t argc;
	char (*num)[24]; /* number texts */
	size_t nnum;
	char (*key)[READMODEL_KEY_MAX]; /* the generation's keys */
	size_t nkey;
	char *totals;
	struct readmodel_text bodies;       /* the accounts' bodies, one after the other */
	size_t *body_at;                    /* where each account's body starts in bodies */
	const struct projector_item **stmt; /* the statement items, by account */
};

static void args_free(struct batch_args *a)
{
	free(a->totals);
	readmodel_text_free(&a->bodies);
	free(a->body_at);
	free(a->num);
	free(a->key);
	free(a->stmt);
	free(a->argv);
	free(a->lens);
}

static void arg(struct batch_args *a, const char *s, size_t len)
{
	a->argv[a->argc] = s;
	a->lens[a->argc++] = len;
}

static void arg_text(struct batch_args *a, const char *s)
{
	arg(a, s, strlen(s));
}

/* Decimal text of v, without printf (a few per account of every batch). */
static void arg_num(struct batch_args *a, long long v)
{
	char tmp[24], *out = a->num[a->nnum++];
	size_t n = 0, i = 0;
	unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

	do
		tmp[n++] = (char)('0' + (int)(u % 10));
	while (u /= 10);
	if (v < 0)
		out[i++] = '-';
	while (n)
		out[i++] = tmp[--n];
	out[i] = '\0';
	arg(a, out, i);
}

static void arg_key(struct batch_args *a, long long gen, const char *kind, const char *id)
{
	char *out = a->key[a->nkey++];
	size_t n = readmodel_key(out, sizeof(a->key[0]), gen, kind, id);

	arg(a, out, n < sizeof(a->key[0]) ? n : sizeof(a->key[0]) - 1);
}

/* By account, then version: one account's items are one run, oldest first. */
static int by_account(const void *x, const void *y)
{
	const struct projector_item *a = *(const struct projector_item *const *)x;
	const struct projector_item *b = *(const struct projector_item *const *)y;
	int c = strcmp(a->id, b->id);

	return c ? c : (a->version > b->version) - (a->version < b->version);
}

/* Lay out the arguments (redis_scripts.c, PUT_BATCH) for the batch's rows. */
static bool args_build(struct projector_ctx *ctx, struct batch_args *a, char fence[],
		       size_t fencelen, char gen[24], char token[48])
{
	struct rm_account *const *accounts;
	const struct projector_item *items;
	size_t na = projector_rows_accounts(ctx->rows, &accounts);
	size_t ni = projector_rows_items(ctx->rows, &items);
	size_t nx = 0, ns = 0, i = 0;
	/* At most: 9 heads, 4 per account, 2 per transfer and 3 per item (a run of its
	 * own); a key per account and per item. */
	size_t maxargs = 9 + 4 * na + 3 * ni;

	a->argv = malloc(maxargs * sizeof(*a->argv));
	a->lens = malloc(maxargs * sizeof(*a->lens));
	a->num = malloc((4 + 2 * na + ni) * sizeof(*a->num));
	a->key = malloc((na + ni + 1) * sizeof(*a->key));
	a->stmt = malloc((ni + 1) * sizeof(*a->stmt));
	a->body_at = malloc((na + 1) * sizeof(*a->body_at));
	if (!a->argv || !a->lens || !a->num || !a->key || !a->stmt || !a->body_at)
		return false;
	/* The accounts' bodies first, into one buffer (it moves while it grows). */
	for (size_t k = 0; k < na; k++)
		if ((a->body_at[k] = projector_account_json_append(&a->bodies, accounts[k])) ==
		    (size_t)-1)
			return false;
	a->body_at[na] = a->bodies.len;
	for (size_t k = 0; k < ni; k++) {
		if (items[k].version == 0)
			nx++;
		else
			a->stmt[ns++] = &items[k];
	}
	/* The items come in the batch's order; an account's are gathered into one run, so
	 * that its statement takes one push however its events interleave with others'
	 * (a hot account has many in a batch). */
	qsort(a->stmt, ns, sizeof(*a->stmt), by_account);
	redis_sync_fence_arg(ctx, fence, fencelen);
	snprintf(gen, 24, "%lld", ctx->gen);
	/* The batch's end, not the SQL checkpoint: the batch may go before its commit. */
	snprintf(token, 48, "%s", ctx->batch_to);
	if (!(a->totals = cached_totals_json(ctx)))
		return false;
	arg_text(a, fence);
	arg_text(a, gen);
	arg_text(a, ctx->identity);
	arg_text(a, token);
	arg_text(a, ctx->batch_from);
	arg_text(a, a->totals);
	arg_num(a, (long long)na);
	arg_num(a, (long long)nx);
	/* Unguarded writes only where this projector itself wrote the generation up to the
	 * batch's start (its previous batch landed there): a generation it followed,
	 * adopted or found at that checkpoint was written by someone else, who may have
	 * left more than the checkpoint says (a deposed leader's resync). */
	arg(a, ctx->put_gen == ctx->gen && strcmp(ctx->put_to, ctx->batch_from) == 0 ? "1" : "0",
	    1);
	snprintf(ctx->put_sent, sizeof(ctx->put_sent), "%s", token);
	for (size_t k = 0; k < na; k++) {
		arg_key(a, ctx->gen, READMODEL_KIND_ACCOUNT, accounts[k]->row.acc.id);
		arg_num(a, accounts[k]->row.acc.version);
		arg_num(a, accounts[k]->row.entries);
		arg(a, a->bodies.p + a->body_at[k], a->body_at[k + 1] - a->body_at[k] - 1);
	}
	for (size_t k = 0; k < ni; k++) {
		if (items[k].version != 0)
			continue;
		arg_key(a, ctx->gen, READMODEL_KIND_TRANSFER, items[k].id);
		arg(a, items[k].json, items[k].json_len);
	}
	while (i < ns) {
		size_t start = i, m;
		while (i < ns && strcmp(a->stmt[i]->id, a->stmt[start]->id) == 0)
			i++;
		/* Only the newest READMODEL_ITEMS_KEPT can stay in the statement, so a stream
		 * with thousands of events in one batch sends no more than those. */
		m = i - start;
		if (m > READMODEL_ITEMS_KEPT) {
			start += m - READMODEL_ITEMS_KEPT;
			m = READMODEL_ITEMS_KEPT;
		}
		arg_key(a, ctx->gen, READMODEL_KIND_STATEMENT, a->stmt[start]->id);
		arg_num(a, (long long)m);
		for (size_t k = start; k < start + m; k++)
			arg(a, a->stmt[k]->json, a->stmt[k]->json_len);
	}
	return true;
}

static bool is_gap(const redisReply *reply)
{
	return reply && reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "GAP", 3) == 0;
}

static void batch_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	struct readmodel_position live, from;
	/* Sent while Redis was unknown (just connected, say): this reply is the check. */
	bool unknown = ctx->rsync == RS_UNKNOWN;
	const redisReply *r0 = reply && reply->type == REDIS_REPLY_ARRAY && reply->elements >= 1
				       ? reply->element[0]
				       : NULL;

	if (unknown && is_gap(reply)) {
		/* The live generation is behind where this batch starts: copy SQL. */
		log_info(&ctx->log, "redis generation %lld is behind the batch: %s", ctx->gen,
			 reply->str);
		redis_sync_unsynced(ctx, "no_live_generation");
	} else if (!reply || reply->type == REDIS_REPLY_ERROR) {
		log_warn(&ctx->log, "redis write failed: %s",
			 reply ? reply->str : redis_last_error(ctx->redis));
		ctx->rerrors = 1;
		redis_sync_report_failure(ctx, "a batch's redis writes failed");
	} else if (r0 && r0->type == REDIS_REPLY_STRING && strcmp(r0->str, "MOVED") == 0 &&
		   reply->elements == 3 &&
		   readmodel_position_parse(reply->element[2]->str, &live) &&
		   readmodel_position_parse(ctx->batch_from, &from) &&
		   readmodel_position_cmp(&live, &from) >= 0) {
		/* A rebuild switched generations under us (or we did not know the live one
		 * yet); its generation reached at least where this batch starts, and a batch
		 * to a generation this projector did not write up to its start is guarded
		 * (args_build): send it there. What earlier batches wrote to the old
		 * generation may outlive the rebuild's deletion of it, so the old generations
		 * are swept once more. */
		long long gen = strtoll(reply->element[1]->str, NULL, 10);
		bool sweep = ctx->gen != 0;
		ctx->gen = gen;
		log_info(&ctx->log, "following redis generation %lld", ctx->gen);
		/* Past where we are, its checkpoint must be an event of this log: looked up
		 * before the next batch (redis_dispatch.c; a physical restore, see
		 * redis_sync.c's status_reply). */
		if (readmodel_position_cmp(&live, &from) > 0) {
			ctx->ahead_unverified = true;
			ctx->ahead_gen = gen;
			snprintf(ctx->ahead_token, sizeof(ctx->ahead_token), "%s",
				 reply->element[2]->str);
		}
		if (sweep)
			redis_sync_start_cleanup(ctx);
		if (ctx->batch_moved(ctx)) /* the dispatcher's: send it again, or not */
			return;
	} else if (r0) {
		/* No usable live generation (Redis lost its data, say), or one behind the
		 * batch: a later resync repairs what this batch missed. */
		redis_sync_unsynced(ctx, unknown ? "no_live_generation" : "generation_lost");
	} else {
		if (unknown)
			log_info(&ctx->log, "redis generation %lld is current", ctx->gen);
		ctx->rsync = RS_LIVE;
		ctx->rfail_streak = 0; /* the batch and its checkpoint landed */
		ctx->put_gen = ctx->gen;
		memcpy(ctx->put_to, ctx->put_sent, sizeof(ctx->put_to));
		redis_sync_reached(ctx, ctx->batch_to_pos);
	}
	ctx->redis_report(ctx, REDIS_STEP_DONE);
}

bool redis_batch_send(struct projector_ctx *ctx, bool (*moved)(struct projector_ctx *ctx))
{
	struct batch_args a = { 0 };
	char fence[READMODEL_FENCE_ARG_MAX], gen[24], token[48];
	bool sent = false;

	ctx->batch_moved = moved;
	ctx->rerrors = 0;
	if (!args_build(ctx, &a, fence, sizeof(fence), gen, token))
		goto done;
	sent = redis_eval(ctx->redis, PUT_BATCH, 0, (int)a.argc, a.argv, a.lens, batch_reply, ctx);
done:
	args_free(&a);
	if (!sent) {
		ctx->rerrors = 1;
		redis_sync_report_failure(ctx, "a batch's redis writes could not be sent");
	}
	return sent;
}
