/* daybook-admin verify: the independent fold of the log and its comparison with the read models.
 * Independent on purpose: it folds with the pure domain (ledger_evolve) and its own
 * bookkeeping, not with the projector's or rebuild's fold, so that a bug there cannot
 * hide itself here; it shares only key names and the body renderers (readmodel.h). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ledger_json.h"
#include "verify.h"

static void presence(struct verify *v, const char *model, const char *entity, bool expected,
		     bool found)
{
	if (expected != found)
		verify_diff(v, model, entity, "row", expected ? "present" : "absent",
			    found ? "present" : "absent");
}

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

	while ((row = cursor_head(ent)) && strcmp(row, id) == 0 &&
	       atoll(cursor_col(ent, 1)) < version) {
		snprintf(entity, sizeof(entity), "entry:%s/%s", id, cursor_col(ent, 1));
		presence(v, "sql", entity, false, true);
		cursor_next(ent);
	}
}

/* rm_entries columns: account_id, version, type, amount, balance_after, transfer_id,
 * counterparty, reference, at. */
static void compare_entry(struct verify *v, const struct cursor *ent, const char *entity,
			  const struct readmodel_entry *e)
{
	verify_field(v, "sql", entity, "type", e->type, cursor_col(ent, 2));
	verify_field_int(v, "sql", entity, "amount", e->amount, cursor_col(ent, 3));
	verify_field_int(v, "sql", entity, "balance_after", e->balance_after, cursor_col(ent, 4));
	verify_field(v, "sql", entity, "transfer_id", e->transfer_id, cursor_col(ent, 5));
	verify_field(v, "sql", entity, "counterparty", e->counterparty, cursor_col(ent, 6));
	verify_field(v, "sql", entity, "reference", e->reference, cursor_col(ent, 7));
	verify_field(v, "sql", entity, "at", e->at, cursor_col(ent, 8));
}

/* A money event's statement item, against rm_entries and kept for Redis. */
static void expect_entry(struct verify *v, struct folded *f, struct cursor *ent, int32_t version,
			 const struct ledger_event *ev, const char *at)
{
	struct readmodel_entry e = {
		.version = version,
		.type = readmodel_entry_type(ev->type),
		.amount = ev->amount,
		.balance_after = f->acc.balance,
		.transfer_id = ev->transfer_id,
		.counterparty = ev->counterparty,
		.reference = ev->reference,
		.at = at,
	};
	char entity[128];
	const char *row;

	snprintf(entity, sizeof(entity), "entry:%s/%d", f->id, version);
	extra_entries(v, ent, f->id, version);
	row = cursor_head(ent);
	if (row && strcmp(row, f->id) == 0 && atoll(cursor_col(ent, 1)) == version) {
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
	verify_diff(v, "log", entity, why, "an event that folds", found);
	f->broken = true;
}

/* Events cursor columns: stream, version, type, data, at. */
static void fold_event(struct verify *v, struct folded *f, struct cursor *ev, struct cursor *ent)
{
	int32_t version = atoi(cursor_col(ev, 1));
	enum ledger_event_type type = ledger_event_type_from_name(cursor_col(ev, 2));
	json_t *data = json_loads(cursor_col(ev, 3), 0, NULL);
	const char *at = cursor_col(ev, 4);
	struct ledger_event e;

	v->events++;
	if (f->broken)
		goto done;
	if (!type || !data || !ledger_event_from_json(type, data, &e)) {
		broken_event(v, f, version, "data", cursor_col(ev, 3));
		goto done;
	}
	if (type == LEDGER_ACCOUNT_OPENED)
		e.account_id = f->id; /* the stream names the account */
	if (version != f->acc.version + 1 || !ledger_evolve(&f->acc, &e)) {
		broken_event(v, f, version, "apply", cursor_col(ev, 2));
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
	verify_field(v, "sql", entity, "name", f->name, cursor_col(acc, 1));
	verify_field(v, "sql", entity, "currency", f->acc.currency, cursor_col(acc, 2));
	verify_field_int(v, "sql", entity, "balance", f->acc.balance, cursor_col(acc, 3));
	verify_field_int(v, "sql", entity, "overdraft_limit", f->acc.overdraft_limit,
			 cursor_col(acc, 4));
	verify_field(v, "sql", entity, "status", readmodel_status(&f->acc), cursor_col(acc, 5));
	verify_field_int(v, "sql", entity, "version", f->acc.version, cursor_col(acc, 6));
	verify_field_int(v, "sql", entity, "entries", f->entries, cursor_col(acc, 7));
	verify_field(v, "sql", entity, "opened_at", f->opened_at, cursor_col(acc, 8));
	verify_field(v, "sql", entity, "updated_at", f->updated_at, cursor_col(acc, 9));
}

static void check_account_row(struct verify *v, const struct folded *f, struct cursor *acc)
{
	const char *row = cursor_head(acc);
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
				verify_fail(v, "out of memory\n");
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
		.account_id = f->id,
		.name = f->name,
		.currency = f->acc.currency,
		.status = readmodel_status(&f->acc),
		.balance = f->acc.balance,
		.overdraft_limit = f->acc.overdraft_limit,
		.version = f->acc.version,
		.opened_at = f->opened_at,
		.updated_at = f->updated_at,
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
		verify_fail(v, "out of memory\n");
}

/* The account id of the current event; events of other streams are reported. */
static const char *event_account(struct verify *v, struct cursor *ev)
{
	const char *stream;
	char entity[128];

	while ((stream = cursor_head(ev)) && strncmp(stream, "account-", 8) != 0) {
		snprintf(entity, sizeof(entity), "event:%s/%s", stream, cursor_col(ev, 1));
		verify_diff(v, "log", entity, "stream", "account-<id>", stream);
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
void verify_pass_accounts(struct verify *v)
{
	struct cursor ev, acc, ent;

	if (!cursor_open(&ev, v, "ev",
			 "SELECT stream, version, type, data::text, " TEXT_TIME(
				 "recorded_at") " FROM events WHERE " AT_SNAPSHOT
						" ORDER BY stream COLLATE \"C\", version",
			 true) ||
	    !cursor_open(
		    &acc, v, "acc",
		    "SELECT account_id, name, currency, balance, overdraft_limit, status, version, "
		    "entries, " TEXT_TIME("opened_at") ", " TEXT_TIME(
			    "updated_at") " FROM rm_accounts ORDER BY ('account-' || account_id) COLLATE \"C\"",
		    false) ||
	    !cursor_open(&ent, v, "ent",
			 "SELECT account_id, version, type, amount, balance_after, transfer_id, "
			 "counterparty, reference, " TEXT_TIME(
				 "at") " FROM rm_entries "
				       "ORDER BY ('account-' || account_id) COLLATE \"C\", version",
			 false))
		return;
	while (!v->failed) {
		const char *next = min_key(min_key(event_account(v, &ev), cursor_head(&acc)),
					   cursor_head(&ent));
		char *id;
		if (!next)
			break;
		if (!(id = strdup(next))) {
			verify_fail(v, "out of memory\n");
			break;
		}
		verify_account(v, &ev, &acc, &ent, id);
		free(id);
	}
	cursor_close(&ev);
	cursor_close(&acc);
	cursor_close(&ent);
	verify_redis_flush(v);
}

/* rm_transfers columns: transfer_id, from_account, to_account, amount, currency,
 * reference, at. */
static void compare_transfer(struct verify *v, const struct cursor *rt, const char *entity,
			     const struct readmodel_transfer *t)
{
	verify_field(v, "sql", entity, "from_account", t->from, cursor_col(rt, 1));
	verify_field(v, "sql", entity, "to_account", t->to, cursor_col(rt, 2));
	verify_field_int(v, "sql", entity, "amount", t->amount, cursor_col(rt, 3));
	verify_field(v, "sql", entity, "currency", t->currency, cursor_col(rt, 4));
	verify_field(v, "sql", entity, "reference", t->reference, cursor_col(rt, 5));
	verify_field(v, "sql", entity, "at", t->at, cursor_col(rt, 6));
}

static void queue_transfer_check(struct verify *v, const struct readmodel_transfer *t)
{
	struct pending *p = pending_add(v);

	p->transfer = true;
	snprintf(p->id, sizeof(p->id), "%s", t->transfer_id);
	if (!(p->json = readmodel_transfer_json(t)))
		verify_fail(v, "out of memory\n");
}

/* TransferSent cursor columns: transfer_id, data, from account, at, the from account's
 * AccountOpened data (for the currency). rt is NULL when rm_transfers lacks the row. */
static void expect_transfer(struct verify *v, const struct cursor *xf, const struct cursor *rt)
{
	json_t *data = json_loads(cursor_col(xf, 1), 0, NULL);
	json_t *opened = cursor_col(xf, 4) ? json_loads(cursor_col(xf, 4), 0, NULL) : NULL;
	struct ledger_event sent, open;
	struct readmodel_transfer t;
	char entity[128];

	snprintf(entity, sizeof(entity), "transfer:%s", PQgetvalue(xf->res, xf->row, 0));
	if (!data || !opened || !ledger_event_from_json(LEDGER_TRANSFER_SENT, data, &sent) ||
	    !ledger_event_from_json(LEDGER_ACCOUNT_OPENED, opened, &open)) {
		verify_diff(v, "log", entity, "data", "a TransferSent of an opened account",
			    cursor_col(xf, 1));
		goto done;
	}
	t = (struct readmodel_transfer){
		.transfer_id = sent.transfer_id,
		.from = cursor_col(xf, 2),
		.to = sent.counterparty,
		.currency = open.currency,
		.reference = sent.reference,
		.at = cursor_col(xf, 3),
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
void verify_pass_transfers(struct verify *v)
{
	struct cursor xf, rt;

	if (!cursor_open(
		    &xf, v, "xf",
		    "SELECT coalesce(e.data->>'transfer_id', ''), e.data::text, substr(e.stream, 9), " TEXT_TIME(
			    "e.recorded_at") ", o.data::text FROM events e LEFT JOIN events o "
					     "ON o.stream = e.stream AND o.version = 1 WHERE e.type = 'TransferSent' AND "
					     "(e.txid, e.position) <= ($1::xid8, $2::bigint) "
					     "ORDER BY coalesce(e.data->>'transfer_id', '') COLLATE \"C\"",
		    true) ||
	    !cursor_open(
		    &rt, v, "rt",
		    "SELECT transfer_id, from_account, to_account, amount, currency, reference, " TEXT_TIME(
			    "at") " FROM rm_transfers ORDER BY transfer_id COLLATE \"C\"",
		    false))
		return;
	while (!v->failed) {
		const char *a = cursor_head(&xf), *b = cursor_head(&rt);
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
	verify_redis_flush(v);
}

static int by_currency(const void *a, const void *b)
{
	return strcmp(((const struct readmodel_totals *)a)->currency,
		      ((const struct readmodel_totals *)b)->currency);
}

static void compare_total(struct verify *v, const struct readmodel_totals *t, PGresult *r, int row)
{
	char entity[32], sum[48];

	snprintf(entity, sizeof(entity), "totals:%s", t->currency);
	verify_field_int(v, "sql", entity, "accounts", t->count.accounts, PQgetvalue(r, row, 1));
	verify_field_int(v, "sql", entity, "open_accounts", t->count.open_accounts,
			 PQgetvalue(r, row, 2));
	readmodel_int128_text(t->count.balance_sum, sum);
	verify_field(v, "sql", entity, "balance_sum", sum, PQgetvalue(r, row, 3));
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
		verify_fail(v, "reading rm_totals: %s", PQresultErrorMessage(r));
		PQclear(r);
		return;
	}
	while (i < v->ntotals || row < rows) {
		int c = i == v->ntotals ? 1
			: row == rows   ? -1
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
	const struct readmodel_totals **rows = malloc((v->ntotals ? v->ntotals : 1) *
						      sizeof(*rows));
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
	char *want = totals_json(v), pos[96];

	if (!want) {
		verify_fail(v, "out of memory\n");
	} else if (!token || !found) {
		if (v->ntotals)
			verify_diff(v, "redis", "totals", "key", "present", "absent");
	} else if (readmodel_position_parse(token, &p) && readmodel_position_cmp(&p, &v->cp) > 0) {
		/* the projector's since the snapshot, if the log has that event now */
		if (verify_event_in_log(v, token)) {
			v->newer++;
		} else if (!v->failed) {
			snprintf(pos, sizeof(pos), "%s or a later event in the log", v->cp_token);
			verify_diff(v, "redis", "totals", "position", pos, token);
		}
	} else {
		verify_field(v, "redis", "totals", "body", want, found);
	}
	free(want);
}

void verify_check_totals(struct verify *v)
{
	char k[READMODEL_KEY_MAX];
	redisReply *r;

	if (v->ntotals)
		qsort(v->totals, v->ntotals, sizeof(*v->totals), by_currency);
	check_sql_totals(v);
	if (!v->redis)
		return;
	readmodel_key_text(k, sizeof(k), v->gen, READMODEL_KIND_TOTALS, NULL);
	r = redisCommand(v->redis, "HMGET %s p j", k);
	if (!r)
		verify_redis_lost(v);
	else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
		verify_diff(v, "redis", "totals", "key", "a hash",
			    r->type == REDIS_REPLY_ERROR ? r->str : "?");
	else
		check_redis_totals(v, verify_reply_str(r->element[0]),
				   verify_reply_str(r->element[1]));
	if (r)
		freeReplyObject(r);
}
