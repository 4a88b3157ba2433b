/* The Redis read models: each committed batch is written to the live generation with
 * writes guarded so a replay is a no-op; when Redis is new, lost its data or missed
 * batches, the SQL read models are copied into a fresh generation which then goes
 * live in one SET (docs/read-models.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "projector.h"

#define SYNC_ACCOUNTS_PAGE "200"
#define SYNC_TRANSFERS_PAGE "1000"
#define CHECK_EVERY_POLLS 10 /* the poll timer ticks every 100 ms */
#define RETRY_POLLS_MAX 100  /* the longest pause before a resync after failures: 10 s */
/* Resyncs wait this long once another deployment is seen taking the live pointer
 * again and again (one Redis database shared by two: unsupported, see docs). */
#define SHARED_REDIS_BACKOFF_POLLS 600

#define STR_(x) #x
#define STR(x) STR_(x)

enum script {
	PUT_ACCOUNT, PUT_ITEMS, PUT_CHECKPOINT, PUT_TOTALS, LIVE_STATUS, PUT_FENCED, RAISE_FENCE,
	SWITCH_LIVE, CLEAN_OLD
};

/* What reading the store's identity leads to. */
enum identity_next { ID_THEN_STATUS, ID_THEN_SYNC, ID_THEN_BATCH };

/* newer(a, b): is position token a after b? Lua numbers are doubles: exact to 2^53. */
#define LUA_NEWER                                                                          \
	"local function newer(a, b) "                                                      \
	"local at, ap = string.match(a, '^(%d+)%.(%d+)$') "                                \
	"local bt, bp = string.match(b, '^(%d+)%.(%d+)$') "                                \
	"if not bt then return true end "                                                  \
	"at, ap, bt, bp = tonumber(at), tonumber(ap), tonumber(bt), tonumber(bp) "         \
	"return at > bt or (at == bt and ap > bp) end "

/* The write scripts take the writer's leader epoch first (READMODEL_LUA_FENCE). */
static const char *const scripts[] = {
	[PUT_ACCOUNT] = READMODEL_LUA_FENCE "local v = redis.call('HGET', KEYS[1], 'v') "
			"if v and tonumber(v) >= tonumber(ARGV[1]) then return 0 end "
			"redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', ARGV[2], 'j', ARGV[3]) "
			"return 1",
	/* ARGV: the items' versions and JSON, oldest first. The statement (newest first)
	 * is a set of items by version, as a sorted set would be: items newer than its
	 * newest go in front; any other (a replay, or a resync over a generation that a
	 * stale batch wrote to) is merged in by version, each version once. Then the
	 * newest READMODEL_ITEMS_KEPT stay. */
	[PUT_ITEMS] = READMODEL_LUA_FENCE READMODEL_LUA_ITEM_VERSION
		      "local top = redis.call('LINDEX', KEYS[1], 0) "
		      "if not top or tonumber(ARGV[1]) > item_version(top) then "
		      "for i = 1, #ARGV, 2 do redis.call('LPUSH', KEYS[1], ARGV[i + 1]) end "
		      "else "
		      "local by, vs = {}, {} "
		      "for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do "
		      "local v = item_version(item) "
		      "if not by[v] then by[v] = item; vs[#vs + 1] = v end end "
		      "for i = 1, #ARGV, 2 do "
		      "local v = tonumber(ARGV[i]) "
		      "if not by[v] then by[v] = ARGV[i + 1]; vs[#vs + 1] = v end end "
		      "table.sort(vs, function(x, y) return x > y end) "
		      "redis.call('DEL', KEYS[1]) "
		      "for i = 1, math.min(#vs, " STR(READMODEL_ITEMS_KEPT) ") do "
		      "redis.call('RPUSH', KEYS[1], by[vs[i]]) end "
		      "end "
		      "redis.call('LTRIM', KEYS[1], 0, " STR(READMODEL_ITEMS_KEPT) " - 1) return 1",
	/* ARGV[2], when given, is where the batch started: the generation must already
	 * hold everything up to there, or the checkpoint would cover batches it never got
	 * (another leader's, or one of ours whose SQL outcome was unknown). */
	[PUT_CHECKPOINT] = READMODEL_LUA_FENCE LUA_NEWER "local cur = redis.call('GET', KEYS[1]) "
				     "if ARGV[2] and (not cur or newer(ARGV[2], cur)) then "
				     "return redis.error_reply('GAP the generation is at ' .. tostring(cur) .. "
				     "', the batch starts at ' .. ARGV[2]) end "
				     "if cur and not newer(ARGV[1], cur) then return 0 end "
				     "redis.call('SET', KEYS[1], ARGV[1]) return 1",
	[PUT_TOTALS] = READMODEL_LUA_FENCE LUA_NEWER "local cur = redis.call('HGET', KEYS[1], 'p') "
				 "if cur and not newer(ARGV[1], cur) then return 0 end "
				 "redis.call('HSET', KEYS[1], 'p', ARGV[1], 'j', ARGV[2]) return 1",
	/* A live generation of another layout, or built from another event store (its
	 * identity is not ARGV[1]), counts as none: it is replaced. */
	[LIVE_STATUS] = "local g = redis.call('GET', '" READMODEL_LIVE_KEY "') "
			"if not g then return false end "
			"if redis.call('GET', 'dbk:g:' .. g .. ':layout') ~= '" READMODEL_REDIS_LAYOUT "' "
			"then return false end "
			"if redis.call('GET', 'dbk:g:' .. g .. ':identity') ~= ARGV[1] then return false end "
			"return {g, redis.call('GET', 'dbk:g:' .. g .. ':checkpoint') or ''}",
	/* SET KEYS[1] ARGV[1]: transfers, a generation's layout and identity marks. */
	[PUT_FENCED] = READMODEL_LUA_FENCE "redis.call('SET', KEYS[1], ARGV[1]) return 1",
	[RAISE_FENCE] = READMODEL_LUA_FENCE "return 1",
	/* Make generation ARGV[1] live; the identity of the one it replaces when that is
	 * not ARGV[2] (another store's), else "". */
	[SWITCH_LIVE] = READMODEL_LUA_FENCE "local old = redis.call('GET', '" READMODEL_LIVE_KEY "') "
			"local theirs = old and redis.call('GET', 'dbk:g:' .. old .. ':identity') "
			"redis.call('SET', '" READMODEL_LIVE_KEY "', ARGV[1]) "
			"if theirs and theirs ~= ARGV[2] then return theirs end return ''",
	/* Unlink the keys ARGV[3..] of generations older than ARGV[2] that are ours
	 * (identity ARGV[1]) or of no store (written before identities): another store's
	 * generations may be another deployment's live models, and are left alone. */
	[CLEAN_OLD] = "local ours = {} "
		      "for i = 3, #ARGV do "
		      "local g = string.match(ARGV[i], '^dbk:g:(%d+):') "
		      "if g and tonumber(g) < tonumber(ARGV[2]) then "
		      "if ours[g] == nil then "
		      "local id = redis.call('GET', 'dbk:g:' .. g .. ':identity') "
		      "ours[g] = not id or id == ARGV[1] end "
		      "if ours[g] then redis.call('UNLINK', ARGV[i]) end end end "
		      "return 0",
};

enum sync_phase { SY_CHECK, SY_GENERATION, SY_ACCOUNTS, SY_TRANSFERS, SY_TOTALS, SY_SWITCH, SY_LIVE };

struct sync_state {
	enum sync_phase phase;
	long long gen;
	char cp[48];
	char after[LEDGER_ID_MAX + 1]; /* keyset cursor of the current phase */
	bool last_page;
};

static void sync_next(struct projector_ctx *ctx);

static void key(char *out, size_t len, long long gen, const char *kind, const char *id)
{
	snprintf(out, len, "dbk:g:%lld:%s%s%s", gen, kind, id ? ":" : "", id ? id : "");
}

static void cp_token(const struct projector_ctx *ctx, char out[48])
{
	snprintf(out, 48, "%s.%lld", ctx->cp_txid, ctx->cp_pos);
}

/* Redis is to be copied from SQL; `reason` labels the resync it leads to
 * (daybook_projection_redis_resyncs_total). Static string. */
static void unsynced(struct projector_ctx *ctx, const char *reason)
{
	ctx->rsync = RS_UNSYNCED;
	ctx->resync_reason = reason;
}

/* The live generation has reached `pos`: what the Redis lag metrics measure from. */
static void redis_reached(struct projector_ctx *ctx, long long pos)
{
	ctx->redis_pos = pos;
	metric_set(ctx->m_redis_position, (double)pos);
}

static void redis_reached_token(struct projector_ctx *ctx, const char *token)
{
	struct readmodel_position p;

	if (readmodel_position_parse(token, &p))
		redis_reached(ctx, (long long)p.position);
}

/* --- replies ------------------------------------------------------------------------ */

static void start_cleanup(struct projector_ctx *ctx);

/* No resync before a pause: a second after one failure, doubling with each failure in
 * a row up to RETRY_POLLS_MAX, so that a persistent fault costs little. */
static void pause_resync(struct projector_ctx *ctx)
{
	unsigned polls = CHECK_EVERY_POLLS;

	for (unsigned i = 0; i < ctx->rfail_streak && polls < RETRY_POLLS_MAX; i++)
		polls *= 2;
	ctx->next_sync = ctx->polls + (polls < RETRY_POLLS_MAX ? polls : RETRY_POLLS_MAX);
	ctx->rfail_streak++;
}

/* A Redis step failed: say so, count it, and leave Redis to a resync from SQL after
 * a pause (a persistent error, Redis out of memory say, does not spin). */
static void report_failure(struct projector_ctx *ctx, const char *what)
{
	metric_add(ctx->m_redis_failures, 1);
	log_warn(&ctx->log, "%s: %zu redis write(s) failed; the generation's checkpoint stays at "
			    "its last complete batch, and redis is copied from SQL after a pause",
		 what, ctx->rerrors);
	unsynced(ctx, "write_failed");
	pause_resync(ctx);
}

static void put_checkpoint(struct projector_ctx *ctx, long long gen, const char *token,
			   const char *from);

static void step_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	char token[48];

	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		if (!ctx->rfailed)
			log_warn(&ctx->log, "redis write failed: %s",
				 reply ? reply->str : redis_last_error(ctx->redis));
		ctx->rfailed = true;
		ctx->rerrors++;
	}
	if (--ctx->rpending > 0)
		return;
	if (ctx->step == STEP_SYNCING) {
		sync_next(ctx);
		return;
	}
	if (ctx->rfailed) {
		report_failure(ctx, "a batch's redis writes failed");
	} else if (ctx->gen_lost) {
		unsynced(ctx, "generation_lost"); /* a later resync repairs what this batch missed */
	} else if (!ctx->gen_moved && !ctx->rcheckpoint) {
		/* Every reply of the batch was checked: only now may the generation's
		 * checkpoint move past its events (a refused write, an OOM or a WRONGTYPE
		 * say, must not be covered by a later checkpoint). */
		ctx->rcheckpoint = true;
		ctx->rpending = 1; /* held until sent */
		cp_token(ctx, token);
		put_checkpoint(ctx, ctx->gen, token, ctx->batch_from);
		step_reply(ctx, &(redisReply){ .type = REDIS_REPLY_STATUS });
		return;
	} else if (ctx->gen_moved) {
		/* A rebuild switched generations under us; its generation reached at least
		 * where this batch started, and every write is guarded: send it again. What
		 * this batch wrote to the old generation may outlive the rebuild's deletion
		 * of it, so the old generations are swept once more. */
		log_info(&ctx->log, "following redis generation %lld", ctx->gen_moved);
		ctx->gen = ctx->gen_moved;
		start_cleanup(ctx);
		if (projector_redis_batch(ctx))
			return;
	} else {
		ctx->rfail_streak = 0; /* the batch and its checkpoint landed */
		redis_reached(ctx, ctx->cp_pos);
	}
	ctx->redis_report(ctx, REDIS_STEP_DONE);
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

static void eval(struct projector_ctx *ctx, enum script s, int nkeys, int argc,
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
static void fence_arg(const struct projector_ctx *ctx, char *out, size_t len)
{
	snprintf(out, len, "%lld:%s", ctx->epoch, ctx->identity);
}

/* --- the pieces of a generation ------------------------------------------------------- */

static void put_account(struct projector_ctx *ctx, long long gen, const char *id, int32_t version,
			int32_t entries, const char *json)
{
	char k[LEDGER_ID_MAX + 48], e[READMODEL_FENCE_ARG_MAX], v[16], n[16];
	const char *argv[5] = { k, e, v, n, json };

	key(k, sizeof(k), gen, "acct", id);
	fence_arg(ctx, e, sizeof(e));
	snprintf(v, sizeof(v), "%d", version);
	snprintf(n, sizeof(n), "%d", entries);
	eval(ctx, PUT_ACCOUNT, 1, 5, argv);
}

static void put_transfer(struct projector_ctx *ctx, long long gen, const char *id, const char *json)
{
	char k[LEDGER_ID_MAX + 48], e[READMODEL_FENCE_ARG_MAX];
	const char *argv[3] = { k, e, json };

	key(k, sizeof(k), gen, "xfer", id);
	fence_arg(ctx, e, sizeof(e));
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
	key(k, sizeof(k), gen, "stmt", id);
	fence_arg(ctx, e, sizeof(e));
	argv[0] = k;
	argv[1] = e;
	for (size_t i = 0; i < n; i++) {
		argv[2 + 2 * i] = versions[i];
		argv[3 + 2 * i] = jsons[i];
	}
	eval(ctx, PUT_ITEMS, 1, (int)(2 + 2 * n), argv);
	free(argv);
}

static int by_currency(const void *a, const void *b)
{
	return strcmp(((const struct readmodel_total *)a)->currency,
		      ((const struct readmodel_total *)b)->currency);
}

/* GET /totals's body; rows sorted here. Caller frees. */
static char *totals_json(struct readmodel_total *rows, size_t n)
{
	qsort(rows, n, sizeof(*rows), by_currency);
	return readmodel_totals_json(rows, n);
}

static void put_totals(struct projector_ctx *ctx, long long gen, const char *token, char *json)
{
	char k[64], e[READMODEL_FENCE_ARG_MAX];
	const char *argv[4] = { k, e, token, json };

	if (!json) {
		ctx->rfailed = true;
		return;
	}
	key(k, sizeof(k), gen, "totals", NULL);
	fence_arg(ctx, e, sizeof(e));
	eval(ctx, PUT_TOTALS, 1, 4, argv);
	free(json);
}

static void put_checkpoint(struct projector_ctx *ctx, long long gen, const char *token,
			   const char *from)
{
	char k[64], e[READMODEL_FENCE_ARG_MAX], msg[96];
	const char *argv[4] = { k, e, token, from };
	const char *pub[3] = { "PUBLISH", "dbk:position", msg };

	key(k, sizeof(k), gen, "checkpoint", NULL);
	fence_arg(ctx, e, sizeof(e));
	eval(ctx, PUT_CHECKPOINT, 1, from ? 4 : 3, argv);
	snprintf(msg, sizeof(msg), "%lld %s", gen, token);
	send(ctx, 3, pub);
}

/* --- each batch ------------------------------------------------------------------------- */

/* The cached totals as text: int64 counts and an int128 sum, bounded by their types. */
struct totals_text {
	char accounts[24], open[24], sum[48];
};

struct totals_collect {
	struct readmodel_total *rows;
	struct totals_text *text;
	size_t n, cap;
};

static void collect_total(void *arg, const char *currency, void *value)
{
	struct totals_collect *c = arg;
	const struct rm_total *t = value;
	struct totals_text *x;

	(void)currency;
	if (c->n == c->cap)
		return;
	x = &c->text[c->n];
	snprintf(x->accounts, sizeof(x->accounts), "%lld", (long long)t->accounts);
	snprintf(x->open, sizeof(x->open), "%lld", (long long)t->open_accounts);
	readmodel_int128_text(t->balance_sum, x->sum);
	c->rows[c->n++] = (struct readmodel_total){ .currency = t->currency, .accounts = x->accounts,
						    .open_accounts = x->open, .balance_sum = x->sum };
}

static char *cached_totals_json(struct projector_ctx *ctx)
{
	struct totals_collect c = { .cap = strmap_count(ctx->totals) };
	char *json = NULL;

	c.rows = calloc(c.cap ? c.cap : 1, sizeof(*c.rows));
	c.text = calloc(c.cap ? c.cap : 1, sizeof(*c.text));
	if (c.rows && c.text) {
		strmap_foreach(ctx->totals, collect_total, &c);
		json = totals_json(c.rows, c.n);
	}
	free(c.rows);
	free(c.text);
	return json;
}

/* Group the batch's statement items by account, in order, and send them. */
static void send_items(struct projector_ctx *ctx, const struct projector_item *items, size_t n)
{
	const char **versions = malloc((n + 1) * sizeof(*versions));
	const char **jsons = malloc((n + 1) * sizeof(*jsons));
	char (*vtext)[16] = malloc((n + 1) * sizeof(*vtext));
	size_t i = 0;

	if (!versions || !jsons || !vtext) {
		ctx->rfailed = true;
		goto done;
	}
	while (i < n) {
		size_t start = i, m = 0;
		if (items[i].version == 0) {
			put_transfer(ctx, ctx->gen, items[i].id, items[i].json);
			i++;
			continue;
		}
		/* A run of one account's items goes in one script call. */
		for (; i < n && items[i].version > 0 && strcmp(items[i].id, items[start].id) == 0; i++) {
			snprintf(vtext[m], sizeof(vtext[m]), "%d", items[i].version);
			versions[m] = vtext[m];
			jsons[m++] = items[i].json;
		}
		/* Only the newest READMODEL_ITEMS_KEPT can stay in the statement: a stream
		 * with thousands of events in one batch sends no more than those. */
		if (m > READMODEL_ITEMS_KEPT)
			put_entries(ctx, ctx->gen, items[start].id, versions + (m - READMODEL_ITEMS_KEPT),
				    jsons + (m - READMODEL_ITEMS_KEPT), READMODEL_ITEMS_KEPT);
		else
			put_entries(ctx, ctx->gen, items[start].id, versions, jsons, m);
	}
done:
	free(versions);
	free(jsons);
	free(vtext);
}

/* The batch's first reply: is our generation still the live one? */
static void batch_live_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	struct readmodel_position live, from;

	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
	    strtoll(reply->element[0]->str, NULL, 10) != ctx->gen) {
		if (readmodel_position_parse(reply->element[1]->str, &live) &&
		    readmodel_position_parse(ctx->batch_from, &from) &&
		    readmodel_position_cmp(&live, &from) >= 0)
			ctx->gen_moved = strtoll(reply->element[0]->str, NULL, 10);
		else
			ctx->gen_lost = true;
	} else if (reply && reply->type == REDIS_REPLY_NIL) {
		ctx->gen_lost = true; /* Redis lost its data */
	}
	step_reply(arg, reply);
}

static bool read_identity(struct projector_ctx *ctx, enum identity_next next);

bool projector_redis_batch(struct projector_ctx *ctx)
{
	struct rm_account *const *accounts;
	const struct projector_item *items;
	size_t na = projector_rows_accounts(ctx->rows, &accounts);
	size_t ni = projector_rows_items(ctx->rows, &items);
	const char *identity[1] = { ctx->identity };
	char token[48];

	if (ctx->rsync != RS_LIVE)
		return false;
	if (!redis_connected(ctx->redis)) {
		unsynced(ctx, "disconnected");
		return false;
	}
	if (ctx->identity_stale) /* a new session: is the store still the one we wrote for? */
		return read_identity(ctx, ID_THEN_BATCH);
	ctx->rpending = 1; /* held until everything is sent */
	ctx->rfailed = ctx->gen_lost = ctx->rcheckpoint = false;
	ctx->rerrors = 0;
	ctx->gen_moved = 0;
	cp_token(ctx, token);
	if (redis_eval(ctx->redis, LIVE_STATUS, 0, 1, identity, NULL, batch_live_reply, ctx))
		ctx->rpending++;
	else
		ctx->rfailed = true;
	for (size_t i = 0; i < na; i++) {
		char *json = projector_account_json(accounts[i]);
		if (!json) {
			ctx->rfailed = true;
			continue;
		}
		put_account(ctx, ctx->gen, accounts[i]->acc.id, accounts[i]->acc.version,
			    accounts[i]->entries, json);
		free(json);
	}
	send_items(ctx, items, ni);
	put_totals(ctx, ctx->gen, token, cached_totals_json(ctx));
	/* The checkpoint follows once every reply is in (step_reply). */
	step_reply(ctx, &(redisReply){ .type = REDIS_REPLY_STATUS }); /* release the hold */
	return true;
}

/* --- copying SQL into a new generation --------------------------------------------- */

static void sync_abort(struct projector_ctx *ctx, const char *why)
{
	log_warn(&ctx->log, "redis resync abandoned: %s", why);
	metric_add(ctx->m_redis_failures, 1);
	free(ctx->sync);
	ctx->sync = NULL;
	unsynced(ctx, "resync_failed");
	pause_resync(ctx);
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

static bool sql_ok(PGresult *const *results, size_t n, const char *error)
{
	return !error && n == 1 && PQresultStatus(results[0]) == PGRES_TUPLES_OK;
}

static void accounts_page_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct sync_state *s = ctx->sync;
	PGresult *r = results && n ? results[0] : NULL;
	int rows = sql_ok(results, n, error) ? PQntuples(r) : -1;
	int accounts = 0;

	if (rows < 0) {
		sync_abort(ctx, error ? error : PQresultErrorMessage(r));
		return;
	}
	begin_sends(ctx);
	for (int row = 0; row < rows;) {
		const char *id = PQgetvalue(r, row, 0);
		struct readmodel_account a = {
			.account_id = id, .name = PQgetvalue(r, row, 1),
			.currency = PQgetvalue(r, row, 2), .balance = strtoll(PQgetvalue(r, row, 3), NULL, 10),
			.overdraft_limit = strtoll(PQgetvalue(r, row, 4), NULL, 10),
			.status = PQgetvalue(r, row, 5), .version = atoi(PQgetvalue(r, row, 6)),
			.opened_at = PQgetvalue(r, row, 8), .updated_at = PQgetvalue(r, row, 9),
		};
		char *json = readmodel_account_json(&a), *items[READMODEL_ITEMS_KEPT];
		const char *versions[READMODEL_ITEMS_KEPT];
		size_t m = 0;

		if (json)
			put_account(ctx, s->gen, id, a.version, atoi(PQgetvalue(r, row, 7)), json);
		else
			ctx->rfailed = true;
		free(json);
		/* This account's items follow on its rows (none: one row with NULLs). */
		for (int first = row; row < rows && strcmp(PQgetvalue(r, row, 0), id) == 0; row++) {
			struct readmodel_entry e;
			(void)first;
			if (PQgetisnull(r, row, 10) || m == READMODEL_ITEMS_KEPT)
				continue;
			e = (struct readmodel_entry){
				.version = atoi(PQgetvalue(r, row, 10)), .type = PQgetvalue(r, row, 11),
				.amount = strtoll(PQgetvalue(r, row, 12), NULL, 10),
				.balance_after = strtoll(PQgetvalue(r, row, 13), NULL, 10),
				.transfer_id = PQgetisnull(r, row, 14) ? NULL : PQgetvalue(r, row, 14),
				.counterparty = PQgetisnull(r, row, 15) ? NULL : PQgetvalue(r, row, 15),
				.reference = PQgetisnull(r, row, 16) ? NULL : PQgetvalue(r, row, 16),
				.at = PQgetvalue(r, row, 17),
			};
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
	s->last_page = accounts < atoi(SYNC_ACCOUNTS_PAGE);
	end_sends(ctx);
}

static void transfers_page_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct sync_state *s = ctx->sync;
	PGresult *r = results && n ? results[0] : NULL;
	int rows = sql_ok(results, n, error) ? PQntuples(r) : -1;

	if (rows < 0) {
		sync_abort(ctx, error ? error : PQresultErrorMessage(r));
		return;
	}
	begin_sends(ctx);
	for (int row = 0; row < rows; row++) {
		struct readmodel_transfer t = {
			.transfer_id = PQgetvalue(r, row, 0), .from = PQgetvalue(r, row, 1),
			.to = PQgetvalue(r, row, 2), .amount = strtoll(PQgetvalue(r, row, 3), NULL, 10),
			.currency = PQgetvalue(r, row, 4),
			.reference = PQgetisnull(r, row, 5) ? NULL : PQgetvalue(r, row, 5),
			.at = PQgetvalue(r, row, 6),
		};
		char *json = readmodel_transfer_json(&t);
		if (json)
			put_transfer(ctx, s->gen, t.transfer_id, json);
		else
			ctx->rfailed = true;
		free(json);
		snprintf(s->after, sizeof(s->after), "%s", t.transfer_id);
	}
	s->last_page = rows < atoi(SYNC_TRANSFERS_PAGE);
	end_sends(ctx);
}

static void totals_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct sync_state *s = ctx->sync;
	PGresult *r = results && n ? results[0] : NULL;
	int rows = sql_ok(results, n, error) ? PQntuples(r) : -1;
	struct readmodel_total *t;

	if (rows < 0) {
		sync_abort(ctx, error ? error : PQresultErrorMessage(r));
		return;
	}
	/* The texts stay in the result: no copy into buffers of a guessed size. */
	t = calloc((size_t)rows + 1, sizeof(*t));
	for (int row = 0; t && row < rows; row++)
		t[row] = (struct readmodel_total){ .currency = PQgetvalue(r, row, 0),
						   .accounts = PQgetvalue(r, row, 1),
						   .open_accounts = PQgetvalue(r, row, 2),
						   .balance_sum = PQgetvalue(r, row, 3) };
	begin_sends(ctx);
	s->phase = SY_SWITCH;
	put_totals(ctx, s->gen, s->cp, t ? totals_json(t, (size_t)rows) : NULL);
	free(t);
	end_sends(ctx);
}

static void query(struct projector_ctx *ctx, const char *statement, const char *page,
		  pg_done_cb done)
{
	const char *params[2] = { ctx->sync->after, page };
	int nparams = page ? 2 : 0;

	if (!pg_queue(ctx->pg, statement, nparams, params) || !pg_run(ctx->pg, done, ctx))
		sync_abort(ctx, "postgresql connection lost");
}

static void generation_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	char identity_key[48];
	const char *set_identity[3] = { "SET", identity_key, ctx->identity };

	if (!reply || reply->type != REDIS_REPLY_INTEGER) {
		sync_abort(ctx, reply && reply->str ? reply->str : "INCR dbk:generation failed");
		return;
	}
	ctx->sync->gen = reply->integer;
	ctx->sync->phase = SY_ACCOUNTS;
	/* Which store the generation is built from comes first, so that no sweep of
	 * another deployment's projector takes the keys that follow for its own garbage;
	 * the switch writes it again, checked. */
	key(identity_key, sizeof(identity_key), ctx->sync->gen, "identity", NULL);
	(void)!redis_command(ctx->redis, 3, set_identity, NULL, NULL, NULL);
	log_info(&ctx->log, "copying the read models into redis generation %lld", ctx->sync->gen);
	query(ctx, "sync_accounts", SYNC_ACCOUNTS_PAGE, accounts_page_done);
}

/* Remove the keys of every generation older than the live one, a SCAN page at a time.
 * Newer ones are left alone: a rebuild may be filling one. */
static void cleanup_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	const char *scan[6] = { "SCAN", NULL, "MATCH", "dbk:g:*", "COUNT", "1000" };
	const char **argv;
	char below[24];
	size_t n;

	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2)
		return;
	n = reply->element[1]->elements;
	if (n && ctx->identity[0]) {
		if (!(argv = malloc((n + 2) * sizeof(*argv))))
			return;
		snprintf(below, sizeof(below), "%lld", ctx->gen);
		argv[0] = ctx->identity;
		argv[1] = below;
		for (size_t i = 0; i < n; i++)
			argv[2 + i] = reply->element[1]->element[i]->str;
		if (!redis_eval(ctx->redis, CLEAN_OLD, 0, (int)(n + 2), argv, NULL, NULL, NULL)) {
			free(argv);
			return;
		}
		free(argv);
	}
	if (strcmp(reply->element[0]->str, "0") == 0)
		return;
	scan[1] = reply->element[0]->str;
	if (!redis_command(ctx->redis, 6, scan, NULL, cleanup_reply, ctx))
		return;
}

static void start_cleanup(struct projector_ctx *ctx)
{
	const char *scan[6] = { "SCAN", "0", "MATCH", "dbk:g:*", "COUNT", "1000" };

	if (!redis_command(ctx->redis, 6, scan, NULL, cleanup_reply, ctx))
		log_warn(&ctx->log, "cannot clean old redis generations now");
}

/* The switch's reply: did our generation replace another store's? */
static void switch_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (reply && reply->type == REDIS_REPLY_STRING && reply->len == 0) {
		ctx->foreign_fight = false;
	} else if (reply && reply->type == REDIS_REPLY_STRING) {
		/* The first time, an earlier life of the database, say; the same store again
		 * means it is alive and writing to this Redis database too. */
		ctx->foreign_fight = strcmp(reply->str, ctx->foreign_last) == 0;
		if (ctx->foreign_fight)
			log_error(&ctx->log, "another event store (identity %s) keeps making its "
					     "generation live in this redis database: two deployments "
					     "share it, which is unsupported (give each its own redis "
					     "database); resyncs now wait %d s",
				  reply->str, SHARED_REDIS_BACKOFF_POLLS / 10);
		else
			log_warn(&ctx->log, "the live redis generation was built from another event "
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
	switch (s->phase) {
	case SY_ACCOUNTS:
		if (!s->last_page) {
			query(ctx, "sync_accounts", SYNC_ACCOUNTS_PAGE, accounts_page_done);
			return;
		}
		s->phase = SY_TRANSFERS;
		s->after[0] = '\0';
		s->last_page = false;
		query(ctx, "sync_transfers", SYNC_TRANSFERS_PAGE, transfers_page_done);
		return;
	case SY_TRANSFERS:
		if (!s->last_page) {
			query(ctx, "sync_transfers", SYNC_TRANSFERS_PAGE, transfers_page_done);
			return;
		}
		s->phase = SY_TOTALS;
		query(ctx, "load_totals", NULL, totals_done);
		return;
	case SY_SWITCH:
		/* Everything up to s->cp is in the new generation (every reply so far was
		 * checked): mark it complete... */
		begin_sends(ctx);
		fence_arg(ctx, epoch, sizeof(epoch));
		key(layout_key, sizeof(layout_key), s->gen, "layout", NULL);
		key(identity_key, sizeof(identity_key), s->gen, "identity", NULL);
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
		fence_arg(ctx, epoch, sizeof(epoch));
		if (redis_eval(ctx->redis, SWITCH_LIVE, 0, 3, live, NULL, switch_reply, ctx))
			ctx->rpending++;
		else
			ctx->rfailed = true;
		s->phase = SY_CHECK; /* reused as "switched" */
		end_sends(ctx);
		return;
	case SY_CHECK:
		log_info(&ctx->log, "redis generation %lld is live at %s", s->gen, s->cp);
		redis_reached_token(ctx, s->cp);
		ctx->rfail_streak = 0;
		ctx->gen = s->gen;
		ctx->rsync = RS_LIVE;
		free(ctx->sync);
		ctx->sync = NULL;
		start_cleanup(ctx);
		if (ctx->foreign_fight) /* two deployments fight over the pointer */
			ctx->next_sync = ctx->polls + SHARED_REDIS_BACKOFF_POLLS;
		ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	default:
		sync_abort(ctx, "unexpected sync phase");
		return;
	}
}

static void start_sync(struct projector_ctx *ctx)
{
	const char *incr[2] = { "INCR", "dbk:generation" };
	char labels[96];

	ctx->sync = calloc(1, sizeof(*ctx->sync));
	if (!ctx->sync) {
		sync_abort(ctx, "out of memory");
		return;
	}
	ctx->sync->phase = SY_GENERATION;
	snprintf(labels, sizeof(labels), "projection=\"redis\",reason=\"%s\"",
		 ctx->resync_reason ? ctx->resync_reason : "unknown");
	metric_add(metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_projection_redis_resyncs_total",
			       "Copies of the SQL read models into a new Redis generation, started, "
			       "by the reason Redis needed one.",
			       labels, NULL, 0),
		   1);
	cp_token(ctx, ctx->sync->cp);
	ctx->rfailed = false;
	ctx->rerrors = 0;
	ctx->step = STEP_SYNCING;
	if (!redis_command(ctx->redis, 2, incr, NULL, generation_reply, ctx))
		sync_abort(ctx, "redis is not connected");
}

/* --- is the live generation ours and current? ------------------------------------------- */

static void status_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;
	char token[48];

	struct readmodel_position ours, live;

	cp_token(ctx, token);
	/* A generation at or beyond our checkpoint is safe to adopt: replaying batches it
	 * already has is a no-op, every write being guarded. */
	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
	    readmodel_position_parse(token, &ours) &&
	    readmodel_position_parse(reply->element[1]->str, &live) &&
	    readmodel_position_cmp(&live, &ours) >= 0) {
		long long gen = strtoll(reply->element[0]->str, NULL, 10);
		if (ctx->gen && gen > ctx->gen)
			start_cleanup(ctx); /* a rebuild's switch: sweep what is older, as above */
		ctx->gen = gen;
		ctx->rsync = RS_LIVE;
		redis_reached_token(ctx, reply->element[1]->str);
		log_info(&ctx->log, "redis generation %lld is current (at %s)", ctx->gen,
			 reply->element[1]->str);
	} else {
		if (reply && reply->type != REDIS_REPLY_ARRAY)
			log_info(&ctx->log, "redis holds no live generation of this event store "
					    "(identity %s)", ctx->identity);
		if (reply)
			unsynced(ctx, "no_live_generation");
		else
			ctx->rsync = RS_UNKNOWN;
	}
	ctx->redis_report(ctx, REDIS_STEP_DONE);
}

/* The identity read: go on with what it was read for. */
static void identity_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	const char *got = !error && n == 1 && PQresultStatus(results[0]) == PGRES_TUPLES_OK &&
				  PQntuples(results[0]) == 1 && !PQgetisnull(results[0], 0, 0)
			  ? PQgetvalue(results[0], 0, 0)
			  : NULL;
	const char *argv[1] = { ctx->identity };
	bool changed;

	if (!got || !*got || strlen(got) >= sizeof(ctx->identity)) {
		if (!error)
			log_error(&ctx->log, "cannot read the event store's identity (is the database "
					     "migrated?): %s",
				  n ? PQresultErrorMessage(results[0]) : "no result");
		/* Nothing is written to Redis without it; tried again after a pause. */
		unsynced(ctx, "identity_unreadable");
		pause_resync(ctx);
		ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	}
	changed = ctx->identity[0] && strcmp(ctx->identity, got) != 0;
	if (changed)
		log_warn(&ctx->log, "the event store's identity changed from %s to %s (the database "
				    "was re-created or restored): its redis generation is not ours",
			 ctx->identity, got);
	snprintf(ctx->identity, sizeof(ctx->identity), "%s", got);
	ctx->identity_stale = false;
	projector_redis_fence(ctx); /* a leader's fence is per store: raise ours */
	switch ((enum identity_next)ctx->identity_next) {
	case ID_THEN_BATCH:
		if (changed)
			unsynced(ctx, "identity_changed"); /* a resync builds this store's generation */
		if (changed || !projector_redis_batch(ctx))
			ctx->redis_report(ctx, REDIS_STEP_DONE);
		return;
	case ID_THEN_SYNC:
		start_sync(ctx); /* it ends the step itself, also when it fails */
		return;
	case ID_THEN_STATUS:
		if (redis_eval(ctx->redis, LIVE_STATUS, 0, 1, argv, NULL, status_reply, ctx))
			return;
		unsynced(ctx, "redis_error");
		pause_resync(ctx);
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

void projector_redis_session(struct projector_ctx *ctx)
{
	ctx->identity_stale = true;
}

bool projector_redis_maintain(struct projector_ctx *ctx)
{
	if (ctx->role != ROLE_LEADER || !redis_connected(ctx->redis))
		return false;
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

static void live_reply(void *arg, const redisReply *reply)
{
	struct projector_ctx *ctx = arg;

	if (!reply || ctx->rsync != RS_LIVE)
		return;
	if (reply->type != REDIS_REPLY_STRING || strtoll(reply->str, NULL, 10) != ctx->gen) {
		log_warn(&ctx->log, "redis no longer holds generation %lld as live: checking", ctx->gen);
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
	if (ctx->rsync == RS_LIVE && redis_connected(ctx->redis))
		(void)!redis_command(ctx->redis, 2, get, NULL, live_reply, ctx);
	else if (ctx->rsync != RS_LIVE)
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
	fence_arg(ctx, e, sizeof(e));
	if (ctx->role == ROLE_LEADER && redis_connected(ctx->redis))
		(void)!redis_eval(ctx->redis, RAISE_FENCE, 0, 1, argv, NULL, fence_reply, ctx);
}

static void on_redis_ready(void *arg)
{
	struct projector_ctx *ctx = arg;

	/* Whatever happened while we were apart, find out before writing again. */
	ctx->rsync = RS_UNKNOWN;
	projector_redis_fence(ctx);
	ctx->redis_report(ctx, REDIS_WANTS_STEP);
}

int projector_redis_open(struct projector_ctx *ctx,
			 void (*report)(struct projector_ctx *ctx, enum redis_report what))
{
	struct redis_config rc = {
		.server = &ctx->cfg.redis, .name = "daybook-projector", .base = ctx->base,
		.log = &ctx->log, .scripts = scripts, .nscripts = sizeof(scripts) / sizeof(scripts[0]),
		.command_timeout = 5, .on_ready = on_redis_ready, .arg = ctx,
	};

	ctx->redis_report = report;
	ctx->m_redis_failures = metrics_get(
		ctx->metrics, METRIC_COUNTER, "daybook_projection_redis_failures_total",
		"Redis batches and resyncs abandoned on a failed write; Redis is then copied from "
		"SQL after a pause.",
		"projection=\"redis\"", NULL, 0);
	ctx->m_redis_position = metrics_get(ctx->metrics, METRIC_GAUGE, "daybook_projection_position",
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
