/* daybook-query's read flow: Redis first (one EVALSHA), SQL on a miss or outage,
 * and waiting for a projection to reach the caller's min_position. */
#include <event2/event.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "query.h"

enum script {
	SCRIPT_ACCOUNT,
	SCRIPT_TRANSACTIONS,
	SCRIPT_TRANSFER,
	SCRIPT_TOTALS,
	SCRIPT_CHECKPOINT,
};

/* Every script first finds the live generation and its checkpoint. It answers {} when
 * Redis holds no usable model, {checkpoint} on a miss, {checkpoint, ...} on a hit. The
 * keys are derived inside the script from the live pointer, so the read is one round trip and
 * sees one consistent state (scripts run atomically). The last argument is the event
 * store's identity: a generation built from another store is no usable model. */
#define LIVE_PREFIX                                                                                \
	"local g = redis.call('GET', '" READMODEL_LIVE_KEY "')\n"                                  \
	"if not g then return {} end\n"                                                            \
	"local p = '" READMODEL_GEN_PREFIX "' .. g .. ':'\n"                                       \
	"if redis.call('GET', p .. '" READMODEL_KIND_IDENTITY                                      \
	"') ~= ARGV[#ARGV] then return {} end\n"                                                   \
	"local cp = redis.call('GET', p .. '" READMODEL_KIND_CHECKPOINT "')\n"                     \
	"if not cp then return {} end\n"

static const char *const scripts[] = {
	[SCRIPT_ACCOUNT] = LIVE_PREFIX "local a = redis.call('HMGET', p .. '" READMODEL_KIND_ACCOUNT
				       ":' .. ARGV[1], 'j', 'v')\n"
				       "if not a[1] or not a[2] then return {cp} end\n"
				       "return {cp, a[1], a[2]}\n",
	/* {cp, 'h', next_before or '', items...}; 'n' when Redis cannot answer this page,
	 * 'm' when its entries disagree with the account's count. */
	[SCRIPT_TRANSACTIONS] = LIVE_PREFIX
	"local n = redis.call('HGET', p .. '" READMODEL_KIND_ACCOUNT ":' .. ARGV[1], 'n')\n"
	"if not n then return {cp} end\n"
	"n = tonumber(n)\n"
	"local limit, before = tonumber(ARGV[2]), tonumber(ARGV[3])\n"
	"local kept = " READMODEL_ITEMS_KEPT_TEXT "\n"
	"if n > kept and (before > 0 or limit > kept) then return {cp, 'n'} end\n"
	"local key = p .. '" READMODEL_KIND_STATEMENT ":' .. ARGV[1]\n"
	"if redis.call('LLEN', key) ~= math.min(n, kept) then return {cp, 'm'} end\n" READMODEL_LUA_ITEM_VERSION
	"local r, more\n"
	"if before > 0 then\n" /* the whole statement is here (n <= kept), newest first */
	"  local all, s = redis.call('LRANGE', key, 0, -1), 1\n"
	"  while s <= #all and item_version(all[s]) >= before do s = s + 1 end\n"
	"  r = {}\n"
	"  for i = s, math.min(#all, s + limit - 1) do r[#r + 1] = all[i] end\n"
	"  more = #all >= s + limit\n"
	"else\n"
	"  r = redis.call('LRANGE', key, 0, limit - 1)\n"
	"  more = n > limit\n"
	"end\n"
	"local out = {cp, 'h', more and #r > 0 and tostring(item_version(r[#r])) or ''}\n"
	"for i = 1, #r do out[#out + 1] = r[i] end\n"
	"return out\n",
	[SCRIPT_TRANSFER] = LIVE_PREFIX "local x = redis.call('GET', p .. '" READMODEL_KIND_TRANSFER
					":' .. ARGV[1])\n"
					"if not x then return {cp} end\n"
					"return {cp, x}\n",
	[SCRIPT_TOTALS] = LIVE_PREFIX "local t = redis.call('HGET', p .. '" READMODEL_KIND_TOTALS
				      "', 'j')\n"
				      "if not t then return {cp} end\n"
				      "return {cp, t}\n",
	[SCRIPT_CHECKPOINT] = LIVE_PREFIX "return {cp, g}\n",
};

static const char *const fallback_names[FALLBACK_COUNT] = {
	[FALLBACK_UNAVAILABLE] = "unavailable",
	[FALLBACK_NO_LIVE] = "no_live",
	[FALLBACK_MISS] = "miss",
	[FALLBACK_BEHIND] = "behind",
	[FALLBACK_NOT_CACHED] = "not_cached",
};

const char *const *read_scripts(size_t *n)
{
	*n = sizeof(scripts) / sizeof(scripts[0]);
	return scripts;
}

size_t read_checkpoint_script(void)
{
	return SCRIPT_CHECKPOINT;
}

bool query_position_parse_n(const char *text, size_t len, struct readmodel_position *out)
{
	char buf[QUERY_POSITION_MAX];

	if (len >= sizeof(buf) || memchr(text, '\0', len))
		return false;
	memcpy(buf, text, len);
	buf[len] = '\0';
	return readmodel_position_parse(buf, out);
}

/* --- replies ---------------------------------------------------------------------- */

/* A read is finished: give back its place among the waiters too. */
static void read_free(struct read *rd)
{
	waitset_done(rd->ctx->waits, &rd->wait);
	free(rd);
}

static void set_position(struct read *rd, const struct readmodel_position *at)
{
	char text[CACHE_POSITION_MAX];

	cache_position_text(text, at);
	http_set_header(rd->req, "X-Daybook-Position", text);
}

static void reply_body(struct read *rd, const struct readmodel_position *at, const char *body,
		       size_t len, const char *etag)
{
	set_position(rd, at);
	if (etag) {
		char quoted[24];
		size_t n = strnlen(etag, sizeof(quoted) - 3);
		quoted[0] = '"';
		memcpy(quoted + 1, etag, n);
		quoted[n + 1] = '"';
		quoted[n + 2] = '\0';
		http_set_header(rd->req, "ETag", quoted);
	}
	http_reply_raw(rd->req, 200, "application/json", body, len);
	read_free(rd);
}

/* The cache's name of the read's Redis key ("acct:<id>", "xfer:<id>", "totals"), or
 * false for a read the cache does not keep. */
static bool cache_key(const struct read *rd, char *key, size_t len)
{
	const char *kind;
	size_t k, n = strlen(rd->id);

	switch (rd->kind) {
	case READ_ACCOUNT:
		kind = READMODEL_KIND_ACCOUNT ":";
		break;
	case READ_TRANSFER:
		kind = READMODEL_KIND_TRANSFER ":";
		break;
	case READ_TOTALS:
		kind = READMODEL_KIND_TOTALS;
		n = 0;
		break;
	default:
		return false;
	}
	k = strlen(kind); /* no printf: every cacheable read comes here */
	if (k + n >= len)
		return false;
	memcpy(key, kind, k);
	memcpy(key + k, rd->id, n);
	key[k + n] = '\0';
	return true;
}

/* Answer from the cache when it may (cache.h); false when the read must go on. */
static bool reply_cached(struct read *rd, const char *key)
{
	struct query_ctx *ctx = rd->ctx;
	struct cache_hit hit;

	if (!cache_get(ctx->cache, key, sqlpool_identity(ctx->sql), rd->has_min ? &rd->min : NULL,
		       &hit))
		return false;
	http_set_header(rd->req, "X-Daybook-Position", hit.position);
	if (hit.etag)
		http_set_header(rd->req, "ETag", hit.etag);
	http_reply_raw(rd->req, 200, "application/json", hit.body, hit.len);
	read_free(rd);
	return true;
}

static void reply_not_found(struct read *rd, const struct readmodel_position *at, const char *code)
{
	bool account = strcmp(code, "account_not_found") == 0;

	set_position(rd, at);
	http_reply_problem(rd->req, 404, code, account ? "Account not found" : "Transfer not found",
			   "no %s '%s'", account ? "account" : "transfer", rd->id);
	read_free(rd);
}

static void reply_unavailable(struct read *rd, const char *why)
{
	http_reply_problem(rd->req, 503, "unavailable", "Service unavailable",
			   "the read models cannot be reached: %s", why);
	read_free(rd);
}

/* --- waiting for min_position ------------------------------------------------------ */

static void reply_behind(struct read *rd)
{
	http_reply_problem(rd->req, 503, "projection_behind", "Projection behind",
			   "the read models did not reach position %llu.%llu in time",
			   (unsigned long long)rd->min.txid, (unsigned long long)rd->min.position);
	read_free(rd);
}

static void reply_too_many(struct read *rd)
{
	http_reply_problem(rd->req, 503, "too_many_waiters", "Too many waiting reads",
			   "%zu reads already wait for the read models to reach their "
			   "min_position; retry later",
			   rd->ctx->max_waiters);
	read_free(rd);
}

static void on_wake(struct waiter *w, bool expired)
{
	struct read *rd = (struct read *)(void *)((char *)w - offsetof(struct read, wait));

	rd->hinted = w->hinted;
	if (expired)
		reply_behind(rd);
	else
		read_start(rd);
}

/* Neither model has reached min_position yet: wait for the one that can answer (woken
 * by the waiting room in position order), or give up at the deadline. */
static void wait_for(struct read *rd)
{
	struct query_ctx *ctx = rd->ctx;

	if (mono_now() >= rd->deadline || !ctx->waits) { /* no waiting room once shut down */
		reply_behind(rd);
		return;
	}
	rd->wait.min = rd->min;
	rd->wait.deadline = rd->deadline;
	rd->wait.model = rd->kind == READ_EVENTS || rd->kind == READ_TT_AS_OF ? WAIT_LOG
			 : rd->redis_cannot                                   ? WAIT_SQL
									      : WAIT_ANY;
	rd->wait.wake = on_wake;
	switch (waitset_add(ctx->waits, &rd->wait, rd->wait_seq)) {
	case WAIT_ADDED:
		break;
	case WAIT_FULL:
		reply_too_many(rd);
		break;
	case WAIT_AGAIN:
		read_start(rd);
		break;
	}
}

static void on_redis_probe(void *arg, const redisReply *rep)
{
	struct query_ctx *ctx = arg;
	struct readmodel_position at;

	if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 &&
	    rep->element[0]->type == REDIS_REPLY_STRING &&
	    query_position_parse_n(rep->element[0]->str, rep->element[0]->len, &at))
		waitset_reached(ctx->waits, WAIT_FROM_REDIS, &at);
	waitset_probed(ctx->waits, false);
}

/* The waiting room's probes: the live Redis checkpoint, and in one SQL statement the
 * SQL checkpoint with the log head. */
static bool probe_redis(void *arg)
{
	struct query_ctx *ctx = arg;
	const char *identity[1] = { sqlpool_identity(ctx->sql) };

	return redis_connected(ctx->redis) &&
	       redis_eval(ctx->redis, SCRIPT_CHECKPOINT, 0, 1, identity, NULL, on_redis_probe, ctx);
}

static bool probe_sql(void *arg)
{
	struct query_ctx *ctx = arg;
	struct read *rd = calloc(1, sizeof(*rd));

	if (!rd)
		return false;
	rd->ctx = ctx;
	rd->kind = READ_PROBE;
	if (sqlpool_submit(ctx->sql, rd))
		return true;
	free(rd);
	return false;
}

static void sql_probe_done(struct query_ctx *ctx, const struct read *rd, const PGresult *res)
{
	struct answer ans = { 0 };
	struct readmodel_position head;

	if (sql_render(rd, res, &ans)) {
		waitset_reached(ctx->waits, WAIT_FROM_SQL, &ans.at);
		if (sql_probe_head(res, &head))
			waitset_reached(ctx->waits, WAIT_FROM_LOG, &head);
	}
	free(ans.body);
}

/* --- the flow -------------------------------------------------------------------- */

static void fallback(struct read *rd, enum fallback why)
{
	struct query_ctx *ctx = rd->ctx;

	metric_add(ctx->fallbacks[why], 1);
	rd->redis_behind = why == FALLBACK_BEHIND;
	if (sqlpool_submit(ctx->sql, rd))
		return;
	/* Redis answers but has not reached min_position, and SQL cannot be asked
	 * (PostgreSQL away, failing over): the read waits for either model to reach it,
	 * as any read behind does, instead of 503 unavailable at once. */
	if (rd->redis_behind)
		wait_for(rd);
	else
		reply_unavailable(rd, sqlpool_last_error(ctx->sql));
}

/* A Redis hit for the read's kind: serve it, or say why not. */
static bool serve_redis(struct read *rd, const redisReply *rep, const struct readmodel_position *at,
			enum fallback *why)
{
	redisReply *const *el = rep->element;
	char *body;
	size_t len;

	char key[LEDGER_ID_MAX + 8];

	switch (rd->kind) {
	case READ_ACCOUNT:
		if (rep->elements != 3 || el[1]->type != REDIS_REPLY_STRING ||
		    el[2]->type != REDIS_REPLY_STRING || el[2]->len > 10)
			break;
		metric_add(rd->ctx->served_redis, 1);
		if (rd->cache_ticket && cache_key(rd, key, sizeof(key)))
			cache_fill(rd->ctx->cache, rd->cache_ticket, key, el[1]->str, el[1]->len,
				   el[2]->str, at);
		reply_body(rd, at, el[1]->str, el[1]->len, el[2]->str);
		return true;
	case READ_TRANSFER:
	case READ_TOTALS:
		if (rep->elements != 2 || el[1]->type != REDIS_REPLY_STRING)
			break;
		metric_add(rd->ctx->served_redis, 1);
		if (rd->cache_ticket && cache_key(rd, key, sizeof(key)))
			cache_fill(rd->ctx->cache, rd->cache_ticket, key, el[1]->str, el[1]->len,
				   NULL, at);
		reply_body(rd, at, el[1]->str, el[1]->len, NULL);
		return true;
	case READ_TRANSACTIONS: {
		const char **items;
		size_t *lens, n;
		if (el[1]->type != REDIS_REPLY_STRING || el[1]->len != 1)
			break;
		if (el[1]->str[0] != 'h' || rep->elements < 3) {
			*why = el[1]->str[0] == 'n' ? FALLBACK_NOT_CACHED : FALLBACK_MISS;
			return false;
		}
		n = rep->elements - 3;
		items = malloc((n ? n : 1) * sizeof(*items));
		lens = malloc((n ? n : 1) * sizeof(*lens));
		for (size_t i = 0; items && lens && i < n; i++) {
			items[i] = el[i + 3]->str;
			lens[i] = el[i + 3]->len;
		}
		body = items && lens && el[2]->type == REDIS_REPLY_STRING
			       ? transactions_body(items, lens, n, el[2]->len ? el[2]->str : NULL,
						   &len)
			       : NULL;
		free(items);
		free(lens);
		if (!body)
			break;
		metric_add(rd->ctx->served_redis, 1);
		reply_body(rd, at, body, len, NULL);
		free(body);
		return true;
	}
	case READ_EVENTS:
	case READ_PROBE:
	case READ_TT_AS_OF:
	case READ_TT_AT:
		break;
	}
	*why = FALLBACK_MISS;
	return false;
}

static void on_redis_reply(void *arg, const redisReply *rep)
{
	struct read *rd = arg;
	enum fallback why = FALLBACK_UNAVAILABLE;
	struct readmodel_position at;

	if (!rep || rep->type != REDIS_REPLY_ARRAY) {
		if (rep && rep->type == REDIS_REPLY_ERROR)
			log_warn(&rd->ctx->log, "redis read failed: %s", rep->str);
	} else if (rep->elements == 0 || rep->element[0]->type != REDIS_REPLY_STRING ||
		   !query_position_parse_n(rep->element[0]->str, rep->element[0]->len, &at)) {
		why = FALLBACK_NO_LIVE;
	} else if (rep->elements == 1) {
		why = FALLBACK_MISS;
	} else if (rd->has_min && readmodel_position_cmp(&at, &rd->min) < 0) {
		why = FALLBACK_BEHIND; /* prefer SQL if it is further */
	} else if (serve_redis(rd, rep, &at, &why)) {
		return;
	}
	if (rd->hinted &&
	    (why == FALLBACK_UNAVAILABLE || why == FALLBACK_NO_LIVE || why == FALLBACK_BEHIND ||
	     (why == FALLBACK_MISS && rd->has_min && readmodel_position_cmp(&at, &rd->min) < 0))) {
		/* Woken by a message's claim that Redis has not made good (another
		 * deployment's, a generation not live, or Redis failing): back to waiting,
		 * as the probe would have left it, not to SQL; SQL's own NOTIFY or the
		 * probe wakes it when a model really reaches its position. */
		rd->hinted = false;
		wait_for(rd);
		return;
	}
	/* Redis is at min_position yet lacks the answer: should the read have to wait,
	 * only the SQL model can end it. */
	if ((why == FALLBACK_MISS || why == FALLBACK_NOT_CACHED) && rd->has_min &&
	    readmodel_position_cmp(&at, &rd->min) >= 0)
		rd->redis_cannot = true;
	fallback(rd, why);
}

void read_start(struct read *rd)
{
	struct query_ctx *ctx = rd->ctx;
	const char *argv[7], **args = argv;
	char limit[16], before[16], key[LEDGER_ID_MAX + 8], keys[2][LEDGER_ID_MAX + 48];
	const char *gen = NULL;
	int argc = 1, nkeys = 0;
	enum script script;

	rd->wait_seq = waitset_seq(ctx->waits);
	rd->cache_ticket = 0;
	if (cache_key(rd, key, sizeof(key))) {
		if (reply_cached(rd, key))
			return;
		rd->cache_ticket = cache_ticket(ctx->cache, key, sqlpool_identity(ctx->sql), &gen);
	}
	if (rd->cache_ticket) {
		/* Redis tracks the keys a script call declares (cache.c): the script itself
		 * still finds them from the live pointer. */
		readmodel_key_text(keys[0], sizeof(keys[0]), gen, READMODEL_KIND_IDENTITY, NULL);
		readmodel_key_text(keys[1], sizeof(keys[1]), gen, key,
				   NULL); /* key: "<kind>:<id>" */
		argv[0] = READMODEL_LIVE_KEY;
		argv[1] = keys[0];
		argv[2] = keys[1];
		args = argv + 3;
		nkeys = 3;
	}
	switch (rd->kind) {
	case READ_ACCOUNT:
		script = SCRIPT_ACCOUNT;
		break;
	case READ_TRANSACTIONS:
		script = SCRIPT_TRANSACTIONS;
		snprintf(limit, sizeof(limit), "%d", rd->limit);
		snprintf(before, sizeof(before), "%d", rd->before);
		args[1] = limit;
		args[2] = before;
		argc = 3;
		break;
	case READ_TRANSFER:
		script = SCRIPT_TRANSFER;
		break;
	case READ_TOTALS:
		script = SCRIPT_TOTALS;
		argc = 0;
		break;
	default:
		if (!sqlpool_submit(ctx->sql, rd))
			reply_unavailable(rd, sqlpool_last_error(ctx->sql));
		return;
	}
	args[0] = rd->id;
	args[argc++] = sqlpool_identity(ctx->sql); /* the store whose generation may answer */
	/* A call that cannot be made is answered as a failed one: the same fallback, and
	 * the same return to waiting for a read woken by an unchecked claim. */
	if (!redis_eval(ctx->redis, script, nkeys, nkeys + argc, argv, NULL, on_redis_reply, rd))
		on_redis_reply(rd, NULL);
}

void read_sql_done(struct read *rd, const PGresult *res)
{
	struct query_ctx *ctx = rd->ctx;
	struct answer ans = { 0 };

	if (rd->kind == READ_PROBE) {
		sql_probe_done(ctx, rd, res);
		free(rd);
		waitset_probed(ctx->waits, true);
		return;
	}
	if (!sql_render(rd, res, &ans)) {
		log_error(&ctx->log, "cannot render the SQL read model's answer for %s",
			  http_path(rd->req));
		http_reply_problem(rd->req, 500, "internal", "Internal error",
				   "the SQL read model gave an unexpected answer");
		read_free(rd);
	} else if (rd->has_min && readmodel_position_cmp(&ans.at, &rd->min) < 0) {
		wait_for(rd);
	} else {
		metric_add(ctx->served_sql, 1);
		if (ans.status == 404)
			reply_not_found(rd, &ans.at, ans.code);
		else
			reply_body(rd, &ans.at, ans.body, ans.len, ans.etag[0] ? ans.etag : NULL);
	}
	free(ans.body);
}

void read_sql_failed(struct read *rd, const char *why, bool retry)
{
	struct query_ctx *ctx = rd->ctx;

	if (rd->kind == READ_PROBE) {
		free(rd);
		waitset_probed(ctx->waits, true);
		return;
	}
	if (retry && ++rd->sql_attempts < 3 && sqlpool_submit(ctx->sql, rd))
		return;
	if (retry && rd->redis_behind) {
		/* PostgreSQL went away under it: as in fallback, wait for Redis to catch up. */
		wait_for(rd);
		return;
	}
	if (retry) {
		reply_unavailable(rd, why);
		return;
	}
	log_error(&ctx->log, "SQL read failed for %s: %s", http_path(rd->req), why);
	http_reply_problem(rd->req, 500, "internal", "Internal error", "the SQL read failed");
	read_free(rd);
}

int read_init(struct query_ctx *ctx)
{
	char labels[64];
	struct waitset_config wc = {
		.base = ctx->base,
		.metrics = ctx->metrics,
		.max = ctx->max_waiters,
		.total = ctx->waiters,
		.probe_interval = ctx->probe_interval,
		.probe_sql = probe_sql,
		.probe_redis = probe_redis,
		.arg = ctx,
	};

	if (waitset_open(&ctx->waits, &wc))
		return -1;
	for (size_t i = 0; i < FALLBACK_COUNT; i++) {
		snprintf(labels, sizeof(labels), "reason=\"%s\"", fallback_names[i]);
		ctx->fallbacks[i] =
			metrics_get(ctx->metrics, METRIC_COUNTER,
				    "daybook_query_redis_fallbacks_total",
				    "Reads Redis could not answer, answered from SQL, by reason.",
				    labels, NULL, 0);
	}
	ctx->served_redis = metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_query_reads_total",
					"Reads answered, by the model that answered.",
					"model=\"redis\"", NULL, 0);
	ctx->served_sql = metrics_get(ctx->metrics, METRIC_COUNTER, "daybook_query_reads_total",
				      "Reads answered, by the model that answered.",
				      "model=\"sql\"", NULL, 0);
	return 0;
}

void read_fini(struct query_ctx *ctx)
{
	waitset_close(&ctx->waits);
}

/* --- for the reads of timetravel.c ------------------------------------------------ */

void read_finish(struct read *rd)
{
	read_free(rd);
}

void read_reply_body(struct read *rd, const struct readmodel_position *at, const char *body,
		     size_t len, const char *etag)
{
	reply_body(rd, at, body, len, etag);
}

void read_reply_not_found(struct read *rd, const struct readmodel_position *at)
{
	reply_not_found(rd, at, "account_not_found");
}

void read_wait(struct read *rd)
{
	wait_for(rd);
}
