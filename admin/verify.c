/* daybook-admin verify: fold the event log independently with the pure domain and
 * compare the result, field by field, with the SQL read models and Redis's live
 * generation. Memory stays bounded: sorted server-side cursors are merge-joined, and
 * only one account's state is held at a time.
 *
 * This fold is independent ON PURPOSE: the projector, rebuild and time travel share
 * one fold (readmodel_fold, shared/readmodel_fold.c), and verify is the check of that
 * fold, so it does not call it: it keeps its own bookkeeping of names, times, statement
 * items and totals (the totals even from the accounts' end states rather than event by
 * event). It shares only what must be byte-identical to be compared: the Redis key
 * names (readmodel_key*), the body renderers (readmodel_*_json) and the constants
 * (READMODEL_ITEMS_KEPT, READMODEL_SQL_TIME). */
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "cli.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "strmap.h"

#define FETCH_ROWS 5000
#define REDIS_CHUNK 256        /* checks per pipelined round trip */
#define DIFFS_PRINTED 1000
#define REDIS_WAIT_SECONDS 5.0 /* for Redis to reach the snapshot's checkpoint */
#define TEXT_TIME(col) READMODEL_SQL_TIME(col)
#define AT_SNAPSHOT "(txid, position) <= ($1::xid8, $2::bigint)"

/* A Redis check waiting for its replies; the expected texts are owned. */
struct pending {
	bool transfer;
	char id[LEDGER_ID_MAX + 1];
	int32_t version, entries;
	char *json;
	char *items[READMODEL_ITEMS_KEPT]; /* statement items, oldest first */
	int32_t item_versions[READMODEL_ITEMS_KEPT];
	size_t nitems;
};

struct verify {
	PGconn *pg;
	redisContext *redis; /* NULL: Redis is not checked (or no longer) */
	char gen[32];        /* the live generation */
	char foreign[32];    /* the live generation, when another store's (not checked) */
	char cp_txid[24], cp_pos[24], cp_token[48];
	struct readmodel_position cp;
	unsigned long long events, accounts, entries, transfers, newer, diffs;
	bool failed; /* the verification could not complete */
	struct readmodel_totals *totals;
	size_t ntotals, tcap;
	struct pending pending[REDIS_CHUNK];
	size_t npending;
	struct strmap *orphans; /* orphan keys reported (see orphan_diff) */
};

/* The state of one account, folded from its stream. */
struct folded {
	const char *id;
	struct ledger_account acc;
	char name[LEDGER_NAME_MAX + 1];
	int32_t entries;
	char opened_at[32], updated_at[32];
	bool broken; /* an event did not apply: the rest of the stream is not folded */
	char *ring[READMODEL_ITEMS_KEPT]; /* the newest statement items as JSON (Redis check) */
	int32_t ring_version[READMODEL_ITEMS_KEPT];
	size_t pushed;
};

/* A server-side cursor, read FETCH_ROWS rows at a time; one row is current. */
struct cursor {
	struct verify *v;
	const char *name;
	PGresult *res;
	int row;
	bool end; /* the last FETCH came back short */
};

/* The live generation's key of `kind` (and id) into k, which it returns. */
static const char *vkey(const struct verify *v, char k[READMODEL_KEY_MAX], const char *kind,
			const char *id)
{
	readmodel_key_text(k, READMODEL_KEY_MAX, v->gen, kind, id);
	return k;
}

/* One line on stderr (libpq's multi-line errors folded); the verification has no
 * verdict. */
__attribute__((format(printf, 2, 3))) static void fail(struct verify *v, const char *fmt, ...)
{
	char msg[2048], line[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "daybook-admin verify: %s\n", log_oneline(msg, line, sizeof(line)));
	v->failed = true;
}

static void diff(struct verify *v, const char *model, const char *entity, const char *field,
		 const char *expected, const char *found)
{
	if (++v->diffs <= DIFFS_PRINTED)
		printf("DIFF %s %s %s: expected %s, found %s\n", model, entity, field, expected, found);
}

/* One field: NULL is SQL NULL (or a missing value) and prints as null. */
static void field(struct verify *v, const char *model, const char *entity, const char *name,
		  const char *expected, const char *found)
{
	if (expected && found ? strcmp(expected, found) == 0 : expected == found)
		return;
	diff(v, model, entity, name, expected ? expected : "null", found ? found : "null");
}

static void field_int(struct verify *v, const char *model, const char *entity, const char *name,
		      long long expected, const char *found)
{
	char text[24];

	snprintf(text, sizeof(text), "%lld", expected);
	field(v, model, entity, name, text, found);
}

static void presence(struct verify *v, const char *model, const char *entity, bool expected,
		     bool found)
{
	if (expected != found)
		diff(v, model, entity, "row", expected ? "present" : "absent",
		     found ? "present" : "absent");
}

static bool exec_ok(struct verify *v, const char *sql)
{
	PGresult *r = PQexec(v->pg, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	if (!ok)
		fail(v, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* --- cursors ---------------------------------------------------------------------------- */

/* DECLARE the cursor; `snapshot` passes the checkpoint as $1, $2. */
static bool cursor_open(struct cursor *c, struct verify *v, const char *name, const char *query,
			bool snapshot)
{
	const char *params[2] = { v->cp_txid, v->cp_pos };
	char *sql = malloc(strlen(query) + 64);
	PGresult *r;

	*c = (struct cursor){ .v = v, .name = name };
	if (!sql) {
		fail(v, "out of memory\n");
		return false;
	}
	sprintf(sql, "DECLARE %s NO SCROLL CURSOR FOR %s", name, query);
	r = PQexecParams(v->pg, sql, snapshot ? 2 : 0, NULL, snapshot ? params : NULL, NULL, NULL, 0);
	free(sql);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		fail(v, "opening cursor %s: %s", name, PQresultErrorMessage(r));
		c->end = true;
	}
	PQclear(r);
	return !v->failed;
}

static bool cursor_fetch(struct cursor *c)
{
	char q[96];

	PQclear(c->res);
	c->res = NULL;
	c->row = 0;
	if (c->end)
		return false;
	snprintf(q, sizeof(q), "FETCH FORWARD %d FROM %s", FETCH_ROWS, c->name);
	c->res = PQexec(c->v->pg, q);
	if (PQresultStatus(c->res) != PGRES_TUPLES_OK) {
		fail(c->v, "reading cursor %s: %s", c->name, PQresultErrorMessage(c->res));
		PQclear(c->res);
		c->res = NULL;
		c->end = true;
		return false;
	}
	c->end = PQntuples(c->res) < FETCH_ROWS;
	return PQntuples(c->res) > 0;
}

/* Is there a current row? Fetches the next rows when needed. */
static bool cursor_has(struct cursor *c)
{
	if (c->res && c->row < PQntuples(c->res))
		return true;
	return !c->v->failed && cursor_fetch(c);
}

static void cursor_next(struct cursor *c)
{
	c->row++;
}

/* A column of the current row; NULL for SQL NULL. */
static const char *col(const struct cursor *c, int column)
{
	return PQgetisnull(c->res, c->row, column) ? NULL : PQgetvalue(c->res, c->row, column);
}

/* The key column of the current row, or NULL at the end. */
static const char *head(struct cursor *c)
{
	return cursor_has(c) ? PQgetvalue(c->res, c->row, 0) : NULL;
}

static void cursor_close(struct cursor *c)
{
	char q[64];

	PQclear(c->res);
	c->res = NULL;
	snprintf(q, sizeof(q), "CLOSE %s", c->name);
	if (!c->v->failed)
		exec_ok(c->v, q);
}

/* --- Redis -------------------------------------------------------------------------------- */

static const char *reply_str(const redisReply *r)
{
	return r && r->type == REDIS_REPLY_STRING ? r->str : NULL;
}

static void redis_lost(struct verify *v)
{
	fail(v, "redis: %s\n", v->redis->errstr[0] ? v->redis->errstr : "unexpected reply");
	redisFree(v->redis);
	v->redis = NULL;
}

static void pending_free(struct pending *p)
{
	free(p->json);
	for (size_t i = 0; i < p->nitems; i++)
		free(p->items[i]);
	memset(p, 0, sizeof(*p));
}

/* The account's statement items in Redis (a list, newest first) against the newest
 * folded ones, by version. */
static void check_redis_items(struct verify *v, const struct pending *p, const redisReply *l)
{
	size_t i = 0, j = 0, nl = l && l->type == REDIS_REPLY_ARRAY ? l->elements : 0;
	char entity[128];

	if (nl == 0 && p->nitems > 0) { /* the whole key is gone: one difference */
		snprintf(entity, sizeof(entity), "stmt:%s", p->id);
		diff(v, "redis", entity, "key", "present", "absent");
		return;
	}
	while (i < p->nitems || j < nl) { /* both oldest first */
		long long want = i < p->nitems ? p->item_versions[i] : LLONG_MAX;
		const char *member = j < nl ? reply_str(l->element[nl - 1 - j]) : NULL;
		long long got = j < nl ? readmodel_item_version(member) : LLONG_MAX;
		const char *want_text, *got_text;

		snprintf(entity, sizeof(entity), "entry:%s/%lld", p->id, want < got ? want : got);
		want_text = want <= got ? p->items[i] : NULL;
		got_text = got <= want ? (member ? member : "") : NULL;
		if (!want_text || !got_text || strcmp(want_text, got_text) != 0)
			diff(v, "redis", entity, "item", want_text ? want_text : "absent",
			     got_text ? got_text : "absent");
		i += want <= got;
		j += got <= want;
	}
}

/* HMGET acct v n j and LRANGE stmt against the folded account. */
static void check_redis_account(struct verify *v, const struct pending *p, const redisReply *h,
				const redisReply *z)
{
	char entity[96];
	const char *version;

	snprintf(entity, sizeof(entity), "account:%s", p->id);
	if (!h || h->type != REDIS_REPLY_ARRAY || h->elements != 3) {
		diff(v, "redis", entity, "key", "a hash",
		     h && h->type == REDIS_REPLY_ERROR ? h->str : "another reply");
		return;
	}
	version = reply_str(h->element[0]);
	if (!version) {
		diff(v, "redis", entity, "key", "present", "absent");
		return;
	}
	if (atoll(version) > p->version) {
		v->newer++; /* the projector moved on since the snapshot */
		return;
	}
	field_int(v, "redis", entity, "version", p->version, version);
	if (atoll(version) < p->version)
		return; /* stale: one difference says it */
	field_int(v, "redis", entity, "entries", p->entries, reply_str(h->element[1]));
	field(v, "redis", entity, "body", p->json, reply_str(h->element[2]));
	check_redis_items(v, p, z);
}

static void check_redis_transfer(struct verify *v, const struct pending *p, const redisReply *r)
{
	char entity[96];

	snprintf(entity, sizeof(entity), "transfer:%s", p->id);
	if (!reply_str(r))
		diff(v, "redis", entity, "key", "present", "absent");
	else
		field(v, "redis", entity, "body", p->json, r->str);
}

static bool append_checks(struct verify *v)
{
	char k[READMODEL_KEY_MAX];

	for (size_t i = 0; i < v->npending; i++) {
		const struct pending *p = &v->pending[i];
		int rc = p->transfer
			 ? redisAppendCommand(v->redis, "GET %s",
					      vkey(v, k, READMODEL_KIND_TRANSFER, p->id))
			 : redisAppendCommand(v->redis, "HMGET %s v n j",
					      vkey(v, k, READMODEL_KIND_ACCOUNT, p->id));
		if (rc == REDIS_OK && !p->transfer)
			rc = redisAppendCommand(v->redis, "LRANGE %s 0 -1",
						vkey(v, k, READMODEL_KIND_STATEMENT, p->id));
		if (rc != REDIS_OK)
			return false;
	}
	return true;
}

/* Send the pending checks in one pipeline, then compare their replies. */
static void redis_flush(struct verify *v)
{
	bool ok = v->redis && append_checks(v);

	for (size_t i = 0; ok && i < v->npending; i++) {
		struct pending *p = &v->pending[i];
		void *a = NULL, *b = NULL;
		ok = redisGetReply(v->redis, &a) == REDIS_OK &&
		     (p->transfer || redisGetReply(v->redis, &b) == REDIS_OK);
		if (ok && p->transfer)
			check_redis_transfer(v, p, a);
		else if (ok)
			check_redis_account(v, p, a, b);
		if (a)
			freeReplyObject(a);
		if (b)
			freeReplyObject(b);
	}
	if (v->redis && !ok)
		redis_lost(v);
	for (size_t i = 0; i < v->npending; i++)
		pending_free(&v->pending[i]);
	v->npending = 0;
}

static struct pending *pending_add(struct verify *v)
{
	if (v->npending == REDIS_CHUNK)
		redis_flush(v);
	return &v->pending[v->npending++];
}

/* --- folding an account -------------------------------------------------------------------- */

static void ring_push(struct folded *f, int32_t version, char *json)
{
	size_t slot = f->pushed++ % READMODEL_ITEMS_KEPT;

	free(f->ring[slot]);
	f->ring[slot] = json;
	f->ring_version[slot] = version;
}

static void ring_free(struct folded *f)
{
	for (size_t i = 0; i < READMODEL_ITEMS_KEPT; i++)
		free(f->ring[i]);
}

/* Statement rows of account `id` below `version` that the fold does not have. */
static void extra_entries(struct verify *v, struct cursor *ent, const char *id, long long version)
{
	char entity[128];
	const char *row;

	while ((row = head(ent)) && strcmp(row, id) == 0 && atoll(col(ent, 1)) < version) {
		snprintf(entity, sizeof(entity), "entry:%s/%s", id, col(ent, 1));
		presence(v, "sql", entity, false, true);
		cursor_next(ent);
	}
}

/* rm_entries columns: account_id, version, type, amount, balance_after, transfer_id,
 * counterparty, reference, at. */
static void compare_entry(struct verify *v, const struct cursor *ent, const char *entity,
			  const struct readmodel_entry *e)
{
	field(v, "sql", entity, "type", e->type, col(ent, 2));
	field_int(v, "sql", entity, "amount", e->amount, col(ent, 3));
	field_int(v, "sql", entity, "balance_after", e->balance_after, col(ent, 4));
	field(v, "sql", entity, "transfer_id", e->transfer_id, col(ent, 5));
	field(v, "sql", entity, "counterparty", e->counterparty, col(ent, 6));
	field(v, "sql", entity, "reference", e->reference, col(ent, 7));
	field(v, "sql", entity, "at", e->at, col(ent, 8));
}

/* A money event's statement item, against rm_entries and kept for Redis. */
static void expect_entry(struct verify *v, struct folded *f, struct cursor *ent, int32_t version,
			 const struct ledger_event *ev, const char *at)
{
	struct readmodel_entry e = {
		.version = version, .type = readmodel_entry_type(ev->type), .amount = ev->amount,
		.balance_after = f->acc.balance, .transfer_id = ev->transfer_id,
		.counterparty = ev->counterparty, .reference = ev->reference, .at = at,
	};
	char entity[128];
	const char *row;

	snprintf(entity, sizeof(entity), "entry:%s/%d", f->id, version);
	extra_entries(v, ent, f->id, version);
	row = head(ent);
	if (row && strcmp(row, f->id) == 0 && atoll(col(ent, 1)) == version) {
		compare_entry(v, ent, entity, &e);
		cursor_next(ent);
	} else {
		presence(v, "sql", entity, true, false);
	}
	f->entries++;
	v->entries++;
	if (v->redis)
		ring_push(f, version, readmodel_entry_json(&e));
}

/* An event that does not fold: the log itself is wrong (or this tool is). */
static void broken_event(struct verify *v, struct folded *f, int32_t version, const char *why,
			 const char *found)
{
	char entity[128];

	snprintf(entity, sizeof(entity), "event:%s/%d", f->id, version);
	diff(v, "log", entity, why, "an event that folds", found);
	f->broken = true;
}

/* Events cursor columns: stream, version, type, data, at. */
static void fold_event(struct verify *v, struct folded *f, struct cursor *ev, struct cursor *ent)
{
	int32_t version = atoi(col(ev, 1));
	enum ledger_event_type type = ledger_event_type_from_name(col(ev, 2));
	json_t *data = json_loads(col(ev, 3), 0, NULL);
	const char *at = col(ev, 4);
	struct ledger_event e;

	v->events++;
	if (f->broken)
		goto done;
	if (!type || !data || !ledger_event_from_json(type, data, &e)) {
		broken_event(v, f, version, "data", col(ev, 3));
		goto done;
	}
	if (type == LEDGER_ACCOUNT_OPENED)
		e.account_id = f->id; /* the stream names the account */
	if (version != f->acc.version + 1 || !ledger_evolve(&f->acc, &e)) {
		broken_event(v, f, version, "apply", col(ev, 2));
		goto done;
	}
	if (type == LEDGER_ACCOUNT_OPENED) {
		snprintf(f->name, sizeof(f->name), "%s", e.name);
		snprintf(f->opened_at, sizeof(f->opened_at), "%s", at);
	}
	snprintf(f->updated_at, sizeof(f->updated_at), "%s", at);
	if (readmodel_entry_type(type))
		expect_entry(v, f, ent, version, &e, at);
done:
	json_decref(data);
}

/* rm_accounts columns: account_id, name, currency, balance, overdraft_limit, status,
 * version, entries, opened_at, updated_at. */
static void compare_account(struct verify *v, const struct folded *f, const struct cursor *acc,
			    const char *entity)
{
	field(v, "sql", entity, "name", f->name, col(acc, 1));
	field(v, "sql", entity, "currency", f->acc.currency, col(acc, 2));
	field_int(v, "sql", entity, "balance", f->acc.balance, col(acc, 3));
	field_int(v, "sql", entity, "overdraft_limit", f->acc.overdraft_limit, col(acc, 4));
	field(v, "sql", entity, "status", readmodel_status(&f->acc), col(acc, 5));
	field_int(v, "sql", entity, "version", f->acc.version, col(acc, 6));
	field_int(v, "sql", entity, "entries", f->entries, col(acc, 7));
	field(v, "sql", entity, "opened_at", f->opened_at, col(acc, 8));
	field(v, "sql", entity, "updated_at", f->updated_at, col(acc, 9));
}

static void check_account_row(struct verify *v, const struct folded *f, struct cursor *acc)
{
	const char *row = head(acc);
	bool have = row && strcmp(row, f->id) == 0, want = ledger_account_exists(&f->acc);
	char entity[128];

	snprintf(entity, sizeof(entity), "account:%s", f->id);
	presence(v, "sql", entity, want, have);
	if (have && want)
		compare_account(v, f, acc, entity);
	if (have)
		cursor_next(acc);
}

static void add_total(struct verify *v, const struct folded *f)
{
	struct readmodel_totals *t = NULL;

	for (size_t i = 0; i < v->ntotals && !t; i++)
		if (strcmp(v->totals[i].currency, f->acc.currency) == 0)
			t = &v->totals[i];
	if (!t) {
		if (v->ntotals == v->tcap) {
			size_t cap = v->tcap ? 2 * v->tcap : 16;
			struct readmodel_totals *grown = realloc(v->totals, cap * sizeof(*grown));
			if (!grown) {
				fail(v, "out of memory\n");
				return;
			}
			v->totals = grown;
			v->tcap = cap;
		}
		t = memset(&v->totals[v->ntotals++], 0, sizeof(*t));
		snprintf(t->currency, sizeof(t->currency), "%s", f->acc.currency);
	}
	t->count.accounts++;
	t->count.open_accounts += !f->acc.closed;
	t->count.balance_sum += f->acc.balance;
}

/* Hand the account's expected Redis state (and its ring) to a pending check. */
static void queue_account_check(struct verify *v, struct folded *f)
{
	struct readmodel_account body = {
		.account_id = f->id, .name = f->name, .currency = f->acc.currency,
		.status = readmodel_status(&f->acc), .balance = f->acc.balance,
		.overdraft_limit = f->acc.overdraft_limit, .version = f->acc.version,
		.opened_at = f->opened_at, .updated_at = f->updated_at,
	};
	struct pending *p = pending_add(v);
	size_t n = f->pushed < READMODEL_ITEMS_KEPT ? f->pushed : READMODEL_ITEMS_KEPT;

	snprintf(p->id, sizeof(p->id), "%s", f->id);
	p->version = f->acc.version;
	p->entries = f->entries;
	p->json = readmodel_account_json(&body);
	for (size_t i = 0; i < n; i++) {
		size_t slot = (f->pushed - n + i) % READMODEL_ITEMS_KEPT;
		p->items[i] = f->ring[slot];
		p->item_versions[i] = f->ring_version[slot];
		f->ring[slot] = NULL;
	}
	p->nitems = n;
	if (!p->json)
		fail(v, "out of memory\n");
}

/* The account id of the current event; events of other streams are reported. */
static const char *event_account(struct verify *v, struct cursor *ev)
{
	const char *stream;
	char entity[128];

	while ((stream = head(ev)) && strncmp(stream, "account-", 8) != 0) {
		snprintf(entity, sizeof(entity), "event:%s/%s", stream, col(ev, 1));
		diff(v, "log", entity, "stream", "account-<id>", stream);
		v->events++;
		cursor_next(ev);
	}
	return stream ? stream + 8 : NULL;
}

/* Fold one account's events and compare it with its rows (any side may be empty). */
static void verify_account(struct verify *v, struct cursor *ev, struct cursor *acc,
			   struct cursor *ent, const char *id)
{
	struct folded f = { .id = id };
	const char *e;

	while ((e = event_account(v, ev)) && strcmp(e, id) == 0) {
		fold_event(v, &f, ev, ent);
		cursor_next(ev);
	}
	extra_entries(v, ent, id, LLONG_MAX);
	check_account_row(v, &f, acc);
	if (ledger_account_exists(&f.acc)) {
		v->accounts++;
		add_total(v, &f);
		if (v->redis)
			queue_account_check(v, &f);
	}
	ring_free(&f);
}

static const char *min_key(const char *a, const char *b)
{
	if (!a || !b)
		return a ? a : b;
	return strcmp(a, b) <= 0 ? a : b;
}

/* Pass 1: the log by stream, merged with rm_accounts and rm_entries by account. */
static void pass_accounts(struct verify *v)
{
	struct cursor ev, acc, ent;

	if (!cursor_open(&ev, v, "ev",
			 "SELECT stream, version, type, data::text, " TEXT_TIME("recorded_at")
			 " FROM events WHERE " AT_SNAPSHOT " ORDER BY stream COLLATE \"C\", version",
			 true) ||
	    !cursor_open(&acc, v, "acc",
			 "SELECT account_id, name, currency, balance, overdraft_limit, status, version, "
			 "entries, " TEXT_TIME("opened_at") ", " TEXT_TIME("updated_at")
			 " FROM rm_accounts ORDER BY ('account-' || account_id) COLLATE \"C\"",
			 false) ||
	    !cursor_open(&ent, v, "ent",
			 "SELECT account_id, version, type, amount, balance_after, transfer_id, "
			 "counterparty, reference, " TEXT_TIME("at") " FROM rm_entries "
			 "ORDER BY ('account-' || account_id) COLLATE \"C\", version",
			 false))
		return;
	while (!v->failed) {
		const char *next = min_key(min_key(event_account(v, &ev), head(&acc)), head(&ent));
		char *id;
		if (!next)
			break;
		if (!(id = strdup(next))) {
			fail(v, "out of memory\n");
			break;
		}
		verify_account(v, &ev, &acc, &ent, id);
		free(id);
	}
	cursor_close(&ev);
	cursor_close(&acc);
	cursor_close(&ent);
	redis_flush(v);
}

/* --- transfers ------------------------------------------------------------------------------ */

/* rm_transfers columns: transfer_id, from_account, to_account, amount, currency,
 * reference, at. */
static void compare_transfer(struct verify *v, const struct cursor *rt, const char *entity,
			     const struct readmodel_transfer *t)
{
	field(v, "sql", entity, "from_account", t->from, col(rt, 1));
	field(v, "sql", entity, "to_account", t->to, col(rt, 2));
	field_int(v, "sql", entity, "amount", t->amount, col(rt, 3));
	field(v, "sql", entity, "currency", t->currency, col(rt, 4));
	field(v, "sql", entity, "reference", t->reference, col(rt, 5));
	field(v, "sql", entity, "at", t->at, col(rt, 6));
}

static void queue_transfer_check(struct verify *v, const struct readmodel_transfer *t)
{
	struct pending *p = pending_add(v);

	p->transfer = true;
	snprintf(p->id, sizeof(p->id), "%s", t->transfer_id);
	if (!(p->json = readmodel_transfer_json(t)))
		fail(v, "out of memory\n");
}

/* TransferSent cursor columns: transfer_id, data, from account, at, the from account's
 * AccountOpened data (for the currency). rt is NULL when rm_transfers lacks the row. */
static void expect_transfer(struct verify *v, const struct cursor *xf, const struct cursor *rt)
{
	json_t *data = json_loads(col(xf, 1), 0, NULL);
	json_t *opened = col(xf, 4) ? json_loads(col(xf, 4), 0, NULL) : NULL;
	struct ledger_event sent, open;
	struct readmodel_transfer t;
	char entity[128];

	snprintf(entity, sizeof(entity), "transfer:%s", PQgetvalue(xf->res, xf->row, 0));
	if (!data || !opened || !ledger_event_from_json(LEDGER_TRANSFER_SENT, data, &sent) ||
	    !ledger_event_from_json(LEDGER_ACCOUNT_OPENED, opened, &open)) {
		diff(v, "log", entity, "data", "a TransferSent of an opened account", col(xf, 1));
		goto done;
	}
	t = (struct readmodel_transfer){
		.transfer_id = sent.transfer_id, .from = col(xf, 2), .to = sent.counterparty,
		.currency = open.currency, .reference = sent.reference, .at = col(xf, 3),
		.amount = sent.amount,
	};
	presence(v, "sql", entity, true, rt != NULL);
	if (rt)
		compare_transfer(v, rt, entity, &t);
	v->transfers++;
	if (v->redis)
		queue_transfer_check(v, &t);
done:
	json_decref(data);
	json_decref(opened);
}

/* Pass 2: TransferSent events by transfer id, merged with rm_transfers. */
static void pass_transfers(struct verify *v)
{
	struct cursor xf, rt;

	if (!cursor_open(&xf, v, "xf",
			 "SELECT coalesce(e.data->>'transfer_id', ''), e.data::text, substr(e.stream, 9), "
			 TEXT_TIME("e.recorded_at") ", o.data::text FROM events e LEFT JOIN events o "
			 "ON o.stream = e.stream AND o.version = 1 WHERE e.type = 'TransferSent' AND "
			 "(e.txid, e.position) <= ($1::xid8, $2::bigint) "
			 "ORDER BY coalesce(e.data->>'transfer_id', '') COLLATE \"C\"",
			 true) ||
	    !cursor_open(&rt, v, "rt",
			 "SELECT transfer_id, from_account, to_account, amount, currency, reference, "
			 TEXT_TIME("at") " FROM rm_transfers ORDER BY transfer_id COLLATE \"C\"",
			 false))
		return;
	while (!v->failed) {
		const char *a = head(&xf), *b = head(&rt);
		int c = !a ? 1 : !b ? -1 : strcmp(a, b);
		char entity[128];
		if (!a && !b)
			break;
		if (c <= 0) {
			expect_transfer(v, &xf, c == 0 ? &rt : NULL);
			cursor_next(&xf);
		} else {
			snprintf(entity, sizeof(entity), "transfer:%s", b);
			presence(v, "sql", entity, false, true);
		}
		if (c >= 0)
			cursor_next(&rt);
	}
	cursor_close(&xf);
	cursor_close(&rt);
	redis_flush(v);
}

/* --- totals --------------------------------------------------------------------------------- */

static int by_currency(const void *a, const void *b)
{
	return strcmp(((const struct readmodel_totals *)a)->currency,
		      ((const struct readmodel_totals *)b)->currency);
}

static void compare_total(struct verify *v, const struct readmodel_totals *t, PGresult *r, int row)
{
	char entity[32], sum[48];

	snprintf(entity, sizeof(entity), "totals:%s", t->currency);
	field_int(v, "sql", entity, "accounts", t->count.accounts, PQgetvalue(r, row, 1));
	field_int(v, "sql", entity, "open_accounts", t->count.open_accounts, PQgetvalue(r, row, 2));
	readmodel_int128_text(t->count.balance_sum, sum);
	field(v, "sql", entity, "balance_sum", sum, PQgetvalue(r, row, 3));
}

/* rm_totals is one row per currency: small enough to read at once. */
static void check_sql_totals(struct verify *v)
{
	PGresult *r = PQexec(v->pg, "SELECT currency, accounts, open_accounts, balance_sum::text "
				    "FROM rm_totals ORDER BY currency COLLATE \"C\"");
	size_t i = 0;
	int row = 0, rows = PQntuples(r);
	char entity[96];

	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		fail(v, "reading rm_totals: %s", PQresultErrorMessage(r));
		PQclear(r);
		return;
	}
	while (i < v->ntotals || row < rows) {
		int c = i == v->ntotals ? 1 : row == rows ? -1
				    : strcmp(v->totals[i].currency, PQgetvalue(r, row, 0));
		snprintf(entity, sizeof(entity), "totals:%s",
			 c <= 0 ? v->totals[i].currency : PQgetvalue(r, row, 0));
		presence(v, "sql", entity, c <= 0, c >= 0);
		if (c == 0)
			compare_total(v, &v->totals[i], r, row);
		i += c <= 0;
		row += c >= 0;
	}
	PQclear(r);
}

/* GET /totals's body, as the projector writes it. Caller frees. */
static char *totals_json(const struct verify *v)
{
	const struct readmodel_totals **rows = malloc((v->ntotals ? v->ntotals : 1) * sizeof(*rows));
	char *json = NULL;

	for (size_t i = 0; rows && i < v->ntotals; i++)
		rows[i] = &v->totals[i];
	if (rows)
		json = readmodel_totals_json_of(rows, v->ntotals);
	free(rows);
	return json;
}

static void check_redis_totals(struct verify *v, const char *token, const char *found)
{
	struct readmodel_position p;
	char *want = totals_json(v);

	if (!want) {
		fail(v, "out of memory\n");
	} else if (!token || !found) {
		if (v->ntotals)
			diff(v, "redis", "totals", "key", "present", "absent");
	} else if (readmodel_position_parse(token, &p) && readmodel_position_cmp(&p, &v->cp) > 0) {
		v->newer++;
	} else {
		field(v, "redis", "totals", "body", want, found);
	}
	free(want);
}

static void check_totals(struct verify *v)
{
	char k[READMODEL_KEY_MAX];
	redisReply *r;

	if (v->ntotals)
		qsort(v->totals, v->ntotals, sizeof(*v->totals), by_currency);
	check_sql_totals(v);
	if (!v->redis)
		return;
	r = redisCommand(v->redis, "HMGET %s p j", vkey(v, k, READMODEL_KIND_TOTALS, NULL));
	if (!r)
		redis_lost(v);
	else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
		diff(v, "redis", "totals", "key", "a hash", r->type == REDIS_REPLY_ERROR ? r->str : "?");
	else
		check_redis_totals(v, reply_str(r->element[0]), reply_str(r->element[1]));
	if (r)
		freeReplyObject(r);
}

/* --- the run ---------------------------------------------------------------------------------- */

static bool read_checkpoint(struct verify *v)
{
	PGresult *r = PQexec(v->pg, "SELECT txid::text, position FROM projection_checkpoints "
				    "WHERE projection = 'sql'");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	if (ok) {
		snprintf(v->cp_txid, sizeof(v->cp_txid), "%s", PQgetvalue(r, 0, 0));
		snprintf(v->cp_pos, sizeof(v->cp_pos), "%s", PQgetvalue(r, 0, 1));
		snprintf(v->cp_token, sizeof(v->cp_token), "%s.%s", v->cp_txid, v->cp_pos);
		ok = readmodel_position_parse(v->cp_token, &v->cp);
	}
	if (!ok)
		fail(v, "reading the sql checkpoint: %s",
		     PQresultStatus(r) == PGRES_TUPLES_OK ? "no row 'sql' in projection_checkpoints\n"
							  : PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* The live generation's checkpoint compared with the snapshot's: <0 behind. */
static int redis_checkpoint_cmp(struct verify *v)
{
	char k[READMODEL_KEY_MAX];
	redisReply *r = redisCommand(v->redis, "GET %s", vkey(v, k, READMODEL_KIND_CHECKPOINT, NULL));
	struct readmodel_position p = { 0, 0 };
	int c;

	if (!r)
		return 0; /* the connection failed: the checks will say so */
	if (!reply_str(r) || !readmodel_position_parse(r->str, &p))
		p = (struct readmodel_position){ 0, 0 };
	c = readmodel_position_cmp(&p, &v->cp);
	freeReplyObject(r);
	return c;
}

/* Name (on stderr) every generation built from another event store, other than the
 * live one: nothing of ours uses them, and nothing of ours deletes them, since they
 * may be another deployment's (docs/operations.md). */
static void note_foreign_generations(struct verify *v, const char *ours)
{
	char cursor[32] = "0";

	do {
		redisReply *r = redisCommand(v->redis, "SCAN %s MATCH %s COUNT 1000", cursor,
					     READMODEL_GEN_PREFIX "*:" READMODEL_KIND_IDENTITY);
		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
			freeReplyObject(r);
			return; /* the checks that follow report a lost connection */
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; i < r->element[1]->elements; i++) {
			const char *k = r->element[1]->element[i]->str;
			long long gen = readmodel_key_generation(k);
			redisReply *id = redisCommand(v->redis, "GET %s", k);
			if (id && reply_str(id) && strcmp(id->str, ours) != 0 && gen != atoll(v->gen))
				fprintf(stderr, "daybook-admin verify: note: redis generation %lld was "
						"built from another event store (identity %s): unused here, "
						"and left in place\n", gen, id->str);
			freeReplyObject(id);
		}
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
}

/* Was the live generation built from this event store? One that was not (another
 * deployment's, or one of an earlier life of this database) is never served nor
 * adopted: it is one difference, and its content is not compared. */
static bool redis_identity_ours(struct verify *v)
{
	PGresult *q = PQexec(v->pg, READMODEL_IDENTITY_SQL);
	char k[READMODEL_KEY_MAX];
	redisReply *r;
	bool ok = PQresultStatus(q) == PGRES_TUPLES_OK && PQntuples(q) == 1 &&
		  !PQgetisnull(q, 0, 0);

	if (!ok) {
		fail(v, "reading the event store's identity (is the database migrated?): %s",
		     PQresultErrorMessage(q));
		PQclear(q);
		return false;
	}
	note_foreign_generations(v, PQgetvalue(q, 0, 0));
	r = redisCommand(v->redis, "GET %s", vkey(v, k, READMODEL_KIND_IDENTITY, NULL));
	if (!r) {
		PQclear(q);
		redis_lost(v);
		return false;
	}
	ok = reply_str(r) && strcmp(r->str, PQgetvalue(q, 0, 0)) == 0;
	if (!ok) {
		diff(v, "redis", "live", "identity", PQgetvalue(q, 0, 0),
		     reply_str(r) ? r->str : "absent");
		fprintf(stderr, "daybook-admin verify: note: redis generation %s was not built from "
				"this event store: it is not served, and its content is not checked\n",
			v->gen);
		snprintf(v->foreign, sizeof(v->foreign), "%s", v->gen);
		v->gen[0] = '\0';
		redisFree(v->redis);
		v->redis = NULL;
	}
	freeReplyObject(r);
	PQclear(q);
	return ok;
}

/* Find the live generation; give the projector a moment to bring Redis up to the
 * snapshot, since it writes Redis just after committing SQL. */
static void redis_prepare(struct verify *v)
{
	redisReply *r = redisCommand(v->redis, "GET " READMODEL_LIVE_KEY);
	struct timespec pause = { 0, 50 * 1000 * 1000 };
	char k[READMODEL_KEY_MAX];

	if (!r) {
		redis_lost(v);
		return;
	}
	if (!reply_str(r)) {
		diff(v, "redis", "live", "generation", "present", "absent");
		freeReplyObject(r);
		redisFree(v->redis);
		v->redis = NULL;
		return;
	}
	snprintf(v->gen, sizeof(v->gen), "%s", r->str);
	freeReplyObject(r);
	if (!redis_identity_ours(v))
		return;
	r = redisCommand(v->redis, "GET %s", vkey(v, k, READMODEL_KIND_LAYOUT, NULL));
	if (r && !(reply_str(r) && strcmp(r->str, READMODEL_REDIS_LAYOUT) == 0))
		diff(v, "redis", "live", "layout", READMODEL_REDIS_LAYOUT,
		     reply_str(r) ? r->str : "absent");
	freeReplyObject(r);
	for (int i = 0; i < (int)(REDIS_WAIT_SECONDS * 20) && redis_checkpoint_cmp(v) < 0; i++)
		nanosleep(&pause, NULL);
	if (redis_checkpoint_cmp(v) < 0)
		fprintf(stderr, "daybook-admin verify: note: redis generation %s is behind the SQL "
				"checkpoint %s\n", v->gen, v->cp_token);
}

/* A switch of generation during the run (a rebuild or a resync) explains Redis
 * differences that a second run would not find. */
static void redis_recheck_live(struct verify *v)
{
	redisReply *r = redisCommand(v->redis, "GET " READMODEL_LIVE_KEY);

	if (r && !(reply_str(r) && strcmp(r->str, v->gen) == 0))
		fprintf(stderr, "daybook-admin verify: note: the live generation changed from %s to %s "
				"during the run: Redis differences may come from the switch; run verify "
				"again\n", v->gen, reply_str(r) ? r->str : "(none)");
	if (r)
		freeReplyObject(r);
}

/* --- keys that nothing in the log accounts for ------------------------------------------- */

#define ORPHAN_PAGE 1000

#define ORPHANS_REMEMBERED 100000

/* SCAN may return a key more than once (while Redis rehashes): each orphan is
 * reported once, for the first ORPHANS_REMEMBERED of them. */
static void orphan_diff(struct verify *v, const char *entity)
{
	if (v->orphans && strmap_get(v->orphans, entity))
		return;
	if (v->orphans && strmap_count(v->orphans) < ORPHANS_REMEMBERED &&
	    !strmap_put(v->orphans, entity, v->orphans))
		fail(v, "out of memory\n");
	diff(v, "redis", entity, "key", "absent", "present");
}

/* Keys of the live generation to look up: each key's kind and id. */
struct orphan_page {
	const char *kind[ORPHAN_PAGE], *id[ORPHAN_PAGE];
	size_t n;
};

/* The ids of one kind in the page that the log has no events for, each reported
 * once per key. The log is read as it is now, not at the snapshot: the projector
 * writes Redis after the events commit, so a key without its events is an orphan, not
 * a newcomer. (The SQL models are no reference here: they may be what is broken.) */
static void orphans_of(struct verify *v, const struct orphan_page *page, const char *kind,
		       const char *query)
{
	struct evbuffer *ids = evbuffer_new();
	const char *params[1];
	size_t n = 0;
	PGresult *r;

	if (!ids)
		return;
	evbuffer_add(ids, "{", 1);
	for (size_t i = 0; i < page->n; i++)
		if (strcmp(page->kind[i], kind) == 0)
			pg_array_append(ids, page->id[i], n++ == 0);
	evbuffer_add(ids, "}", 2);
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	r = n ? PQexecParams(v->pg, query, 1, NULL, params, NULL, NULL, 0) : NULL;
	if (r && PQresultStatus(r) != PGRES_TUPLES_OK)
		fail(v, "looking up redis keys: %s", PQresultErrorMessage(r));
	for (int row = 0; r && PQresultStatus(r) == PGRES_TUPLES_OK && row < PQntuples(r); row++) {
		for (size_t i = 0; i < page->n; i++) {
			char entity[LEDGER_ID_MAX + 32];
			if (strcmp(page->kind[i], kind) != 0 ||
			    strcmp(page->id[i], PQgetvalue(r, row, 0)) != 0)
				continue;
			snprintf(entity, sizeof(entity), "%s:%s",
				 strcmp(kind, "xfer") == 0 ? "transfer" :
				 strcmp(kind, "acct") == 0 ? "account" : kind, page->id[i]);
			orphan_diff(v, entity);
		}
	}
	PQclear(r);
	evbuffer_free(ids);
}

/* Sort the page's keys: an account's hash or statement, a transfer, the generation's
 * own keys, or something that has no business in the generation (an id that no
 * event could carry included). */
static void classify(struct verify *v, struct orphan_page *page, char *key, size_t prefix)
{
	static const char *const kinds[] = { "acct", "stmt", "xfer" };
	char *rest = key + prefix, *colon = strchr(rest, ':');

	if (strcmp(rest, "totals") == 0 || strcmp(rest, "checkpoint") == 0 ||
	    strcmp(rest, "layout") == 0 || strcmp(rest, "identity") == 0)
		return;
	for (size_t k = 0; colon && k < sizeof(kinds) / sizeof(kinds[0]); k++) {
		if ((size_t)(colon - rest) == strlen(kinds[k]) &&
		    strncmp(rest, kinds[k], strlen(kinds[k])) == 0 && ledger_valid_id(colon + 1)) {
			page->kind[page->n] = kinds[k];
			page->id[page->n++] = colon + 1;
			return;
		}
	}
	char entity[600];
	snprintf(entity, sizeof(entity), "key:%s", key);
	orphan_diff(v, entity);
}

#define ACCOUNT_MISSING \
	"SELECT id FROM unnest($1::text[]) id WHERE NOT EXISTS " \
	"(SELECT 1 FROM events WHERE stream = 'account-' || id)"

/* Every key of the live generation, a SCAN page at a time (memory stays bounded). */
static void pass_redis_orphans(struct verify *v)
{
	char cursor[32] = "0", match[48];
	size_t prefix;

	readmodel_key_text(match, sizeof(match), v->gen, "*", NULL);
	prefix = strlen(match) - 1;
	if (strmap_open(&v->orphans, NULL) != 0) {
		fail(v, "out of memory\n");
		return;
	}
	do {
		redisReply *r = redisCommand(v->redis, "SCAN %s MATCH %s COUNT %d", cursor, match,
					     ORPHAN_PAGE);
		size_t i = 0;

		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
			freeReplyObject(r);
			redis_lost(v);
			break;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		while (i < r->element[1]->elements) { /* SCAN may return more than COUNT */
			struct orphan_page page = { .n = 0 };
			for (; i < r->element[1]->elements && page.n < ORPHAN_PAGE; i++)
				classify(v, &page, r->element[1]->element[i]->str, prefix);
			orphans_of(v, &page, "acct", ACCOUNT_MISSING);
			orphans_of(v, &page, "stmt", ACCOUNT_MISSING);
			orphans_of(v, &page, "xfer", "SELECT id FROM unnest($1::text[]) id WHERE NOT "
						     "EXISTS (SELECT 1 FROM events WHERE type = 'TransferSent' "
						     "AND data->>'transfer_id' = id)");
		}
		freeReplyObject(r);
	} while (!v->failed && strcmp(cursor, "0") != 0);
	strmap_close(&v->orphans);
}

static double seconds_since(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

static void summary(const struct verify *v, bool redis, const struct timespec *start)
{
	printf("verify: %llu events folded up to %s: %llu accounts, %llu entries, %llu transfers, "
	       "%zu currencies",
	       v->events, v->cp_token, v->accounts, v->entries, v->transfers, v->ntotals);
	if (v->gen[0])
		printf("; redis generation %s: %llu newer than the snapshot", v->gen, v->newer);
	else if (v->foreign[0])
		printf("; redis generation %s is another event store's", v->foreign);
	else
		printf("; redis %s", redis ? "has no live generation" : "not checked");
	printf("; %llu difference%s", v->diffs, v->diffs == 1 ? "" : "s");
	if (v->diffs > DIFFS_PRINTED)
		printf(" (first %d printed)", DIFFS_PRINTED);
	printf(" in %.2f s\n", seconds_since(start));
}

static int run(struct verify *v)
{
	bool redis = v->redis != NULL;
	struct timespec start;

	clock_gettime(CLOCK_MONOTONIC, &start);
	if (!exec_ok(v, "SET application_name = 'daybook-admin verify'") ||
	    !exec_ok(v, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") || !read_checkpoint(v))
		return 2;
	if (v->redis)
		redis_prepare(v);
	pass_accounts(v);
	if (!v->failed)
		check_totals(v);
	if (!v->failed)
		pass_transfers(v);
	if (!v->failed && v->redis)
		redis_recheck_live(v);
	if (!v->failed)
		exec_ok(v, "COMMIT");
	if (!v->failed && v->redis && v->gen[0])
		pass_redis_orphans(v);
	fflush(stdout);
	if (v->failed)
		return CLI_EXIT_UNAVAILABLE; /* a query or Redis failed: no verdict */
	summary(v, redis, &start);
	return v->diffs ? 1 : 0;
}

static bool connect_all(struct admin_ctx *ctx, struct verify *v, bool use_redis)
{
	char err[256];

	v->pg = PQconnectdb(ctx->cfg.pg);
	if (PQstatus(v->pg) != CONNECTION_OK) {
		char line[1024];
		fprintf(stderr, "daybook-admin verify: cannot connect to PostgreSQL: %s\n",
			log_oneline(PQerrorMessage(v->pg), line, sizeof(line)));
		return false;
	}
	if (!use_redis) {
		fprintf(stderr, "daybook-admin verify: note: %s: Redis is not checked\n",
			ctx->cfg.redis_url ? "--no-redis" : "DAYBOOK_REDIS is not set");
		return true;
	}
	v->redis = admin_redis_connect(&ctx->cfg.redis, err, sizeof(err));
	if (!v->redis) {
		char where[600];
		config_redis_describe(&ctx->cfg.redis, where, sizeof(where));
		fprintf(stderr, "daybook-admin verify: cannot connect to Redis at %s: %s\n", where,
			err);
	}
	return v->redis != NULL;
}

int admin_verify(struct admin_ctx *ctx, int argc, char **argv)
{
	static const struct option options[] = {
		{ "no-redis", no_argument, NULL, 'R' },
		CLI_COMMON_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	struct verify *v = calloc(1, sizeof(*v));
	bool use_redis, no_redis = false;
	int rc = CLI_EXIT_USAGE, c;

	while ((c = getopt_long(argc, argv, "+:h", options, NULL)) != -1) {
		switch (c) {
		case 'R':
			no_redis = true;
			break;
		case 'h':
			rc = admin_help("verify");
			goto done;
		default:
			rc = admin_getopt_error("verify", argc, argv, c);
			goto done;
		}
	}
	if (optind < argc) {
		rc = admin_usage_error("verify", "unexpected argument '%s'", argv[optind]);
		goto done;
	}
	if (!admin_configure(ctx, "verify"))
		goto done;
	use_redis = ctx->cfg.redis_url != NULL && !no_redis;
	rc = CLI_EXIT_UNAVAILABLE;
	if (!v) {
		fprintf(stderr, "daybook-admin verify: out of memory\n");
		goto done;
	}
	if (!connect_all(ctx, v, use_redis))
		goto done;
	if (!admin_event_store_usable(v->pg, "verify")) {
		rc = EVENTSTORE_EXIT_UNUSABLE;
		goto done;
	}
	rc = run(v);
done:
	if (v) {
		for (size_t i = 0; i < v->npending; i++)
			pending_free(&v->pending[i]);
		if (v->redis)
			redisFree(v->redis);
		PQfinish(v->pg);
		free(v->totals);
	}
	free(v);
	return rc;
}
