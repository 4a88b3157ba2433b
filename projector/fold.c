/* Fold a batch of log events into the SQL read models: the pure domain's evolve
 * decides every balance, and the batch is written with two statements: the
 * checkpoint's compare-and-set, then every row as arrays in one statement. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "projector.h"

/* A multi-row statement's columns: one array parameter each, in binary. */
struct table {
	struct pg_bin_array *cols;
	size_t ncols;
};

static void table_init(struct table *t, struct pg_bin_array *cols, const enum pg_type_oid *types,
		       size_t ncols)
{
	t->cols = cols;
	t->ncols = ncols;
	for (size_t i = 0; i < ncols; i++)
		cols[i] = (struct pg_bin_array){ .type = types[i] };
}

static void table_free(struct table *t)
{
	for (size_t i = 0; t->cols && i < t->ncols; i++)
		pg_bin_array_free(&t->cols[i]);
}

/* The table's columns as binary array parameters into params[0 .. ncols) and their
 * lengths, which the caller frees; false when out of memory. */
static bool table_take(struct table *t, char **params, int *lengths)
{
	for (size_t i = 0; i < t->ncols; i++)
		if (!(params[i] = pg_bin_array_take(&t->cols[i], &lengths[i])))
			return false;
	return true;
}

static struct rm_total *total_of(struct projector_ctx *ctx, const char *currency)
{
	struct rm_total *t = strmap_get(ctx->totals, currency);

	if (t)
		return t;
	t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	snprintf(t->tot.currency, sizeof(t->tot.currency), "%s", currency);
	if (!strmap_put(ctx->totals, currency, t)) {
		free(t);
		return NULL;
	}
	return t;
}

/* The batch's rows, built while folding. */
struct fold_rows {
	struct pg_bin_array ecols[9];
	struct table entries;
	struct rm_account **accounts; /* touched, each once */
	size_t naccounts, cap;
	struct rm_total **totals; /* touched currencies, each once */
	size_t ntotals, tcap;
	struct rm_total *last_total;  /* the last event's */
	struct projector_item *items; /* statement items and transfers, as JSON for Redis */
	size_t nitems, icap;
	struct readmodel_text text;    /* the items' JSON, each at its item's json_at */
	struct ledger_event_buf evbuf; /* the event being applied, read from its data */
};

/* An item whose JSON is at json_at in r->text ((size_t)-1: it could not be made). */
static bool add_item(struct fold_rows *r, const char *id, int32_t version, size_t json_at)
{
	struct projector_item *it;
	size_t idlen = strlen(id);

	if (json_at == (size_t)-1)
		return false;
	if (r->nitems == r->icap) {
		size_t cap = r->icap ? 2 * r->icap : 256;
		struct projector_item *grown = realloc(r->items, cap * sizeof(*grown));
		if (!grown)
			return false;
		r->items = grown;
		r->icap = cap;
	}
	it = &r->items[r->nitems++];
	if (idlen >= sizeof(it->id))
		idlen = sizeof(it->id) - 1; /* cut, as snprintf would */
	memcpy(it->id, id, idlen);
	it->id[idlen] = '\0';
	it->version = version;
	it->json_at = json_at;
	it->json_len = r->text.len - json_at - 1; /* its NUL ends the text */
	it->json = NULL; /* set once the batch is folded: r->text moves while it grows */
	return true;
}

static const enum pg_type_oid entry_types[9] = {
	PG_TYPE_TEXT, PG_TYPE_INT4, PG_TYPE_TEXT, PG_TYPE_INT8,        PG_TYPE_INT8,
	PG_TYPE_TEXT, PG_TYPE_TEXT, PG_TYPE_TEXT, PG_TYPE_TIMESTAMPTZ,
};

static bool add_entry(struct fold_rows *r, const struct rm_account *a, const struct log_event *e,
		      const struct ledger_event *ev)
{
	struct pg_bin_array *c = r->ecols;
	struct readmodel_entry item = readmodel_entry_of(&a->row, ev, e->at);

	pg_bin_text(&c[0], a->row.acc.id);
	pg_bin_int4(&c[1], item.version);
	pg_bin_text(&c[2], item.type);
	pg_bin_int8(&c[3], item.amount);
	pg_bin_int8(&c[4], item.balance_after);
	pg_bin_text(&c[5], item.transfer_id);
	pg_bin_text(&c[6], item.counterparty);
	pg_bin_text(&c[7], item.reference);
	pg_bin_int8(&c[8], e->at_us);
	return add_item(r, a->row.acc.id, item.version,
			readmodel_entry_json_append(&r->text, &item));
}

/* A transfer is Redis's only: the SQL model of transfers reads the log (sql/017). */
static bool add_transfer(struct fold_rows *r, const struct rm_account *from,
			 const struct log_event *e, const struct ledger_event *ev)
{
	struct readmodel_transfer item = readmodel_transfer_of(&from->row, ev, e->at);

	/* Version 0 marks a transfer among the items. */
	return add_item(r, item.transfer_id, 0, readmodel_transfer_json_append(&r->text, &item));
}

/* Totals move with every event (the fold says by how much). */
static bool count_totals(struct projector_ctx *ctx, struct fold_rows *r, const struct rm_account *a,
			 const struct readmodel_count *d)
{
	/* A batch's events are mostly of one currency: the last one's totals first. */
	struct rm_total *t = r->last_total && strcmp(r->last_total->tot.currency,
						     a->row.acc.currency) == 0
				     ? r->last_total
				     : total_of(ctx, a->row.acc.currency);

	if (!t)
		return false;
	r->last_total = t;
	if (!t->touched) {
		/* A batch may touch any number of currencies (up to every one there is). */
		if (r->ntotals == r->tcap) {
			size_t cap = r->tcap ? 2 * r->tcap : 16;
			struct rm_total **grown = realloc(r->totals, cap * sizeof(*grown));
			if (!grown)
				return false;
			r->totals = grown;
			r->tcap = cap;
		}
		r->totals[r->ntotals++] = t;
		t->touched = true;
	}
	readmodel_count_add(&t->delta, d);
	return true;
}

/* Apply one event to its account (creating it on AccountOpened). */
static bool apply(struct projector_ctx *ctx, struct fold_rows *r, const struct log_event *e)
{
	struct rm_account *a = e->acct ? e->acct : strmap_get(ctx->accounts, e->account);
	struct ledger_event ev;
	struct readmodel_change change;

	if (!ledger_event_from_text(e->type, e->data, e->data_len, &r->evbuf, &ev))
		return false;
	if (!a) {
		if (e->type != LEDGER_ACCOUNT_OPENED || !(a = calloc(1, sizeof(*a))))
			return false;
		if (!strmap_put(ctx->accounts, e->account, a)) {
			free(a);
			return false;
		}
	}
	if (e->version != a->row.acc.version + 1) {
		log_error(&ctx->log, "account-%s: event version %d follows version %d", e->account,
			  e->version, a->row.acc.version);
		return false;
	}
	if (!readmodel_fold(&a->row, e->account, e->version, &ev, &change))
		return false;
	if (change.opened)
		memcpy(a->opened_at, e->at, sizeof(a->opened_at)); /* both char[32], NUL within */
	memcpy(a->updated_at, e->at, sizeof(a->updated_at));
	if (!a->touched) {
		if (r->naccounts == r->cap) {
			size_t cap = r->cap ? 2 * r->cap : 256;
			struct rm_account **grown = realloc(r->accounts, cap * sizeof(*grown));
			if (!grown)
				return false;
			r->accounts = grown;
			r->cap = cap;
		}
		r->accounts[r->naccounts++] = a;
		a->touched = true;
	}
	if (change.entry_type && !add_entry(r, a, e, &ev))
		return false;
	if (change.transfer && !add_transfer(r, a, e, &ev))
		return false;
	return count_totals(ctx, r, a, &change.totals);
}

void projector_rows_free(struct fold_rows **rp)
{
	struct fold_rows *r = *rp;

	if (!r)
		return;
	for (size_t i = 0; i < r->naccounts; i++)
		r->accounts[i]->touched = false;
	for (size_t i = 0; i < r->ntotals; i++) {
		r->totals[i]->touched = false;
		r->totals[i]->delta = (struct readmodel_count){ 0 };
	}
	table_free(&r->entries);
	readmodel_text_free(&r->text);
	ledger_event_buf_free(&r->evbuf);
	free(r->items);
	free(r->accounts);
	free(r->totals);
	free(r);
	*rp = NULL;
}

bool projector_fold(struct projector_ctx *ctx)
{
	struct fold_rows *r = calloc(1, sizeof(*r));

	ctx->rows = r;
	if (!r)
		return false;
	table_init(&r->entries, r->ecols, entry_types, 9);
	for (size_t i = 0; i < ctx->nevents; i++) {
		if (!apply(ctx, r, &ctx->events[i])) {
			log_error(&ctx->log, "cannot apply event %lld (account-%s v%d)",
				  ctx->events[i].position, ctx->events[i].account,
				  ctx->events[i].version);
			return false;
		}
	}
	for (size_t i = 0; i < r->nitems; i++)
		r->items[i].json = r->text.p + r->items[i].json_at;
	return true;
}

/* write_rows' parameters (step.c): each table's columns. */
enum {
	ACCOUNT_COLS = 10,
	ENTRY_COLS = 9, /* fold_rows.ecols */
	TOTAL_COLS = 4,
	ROW_PARAMS = ACCOUNT_COLS + ENTRY_COLS + TOTAL_COLS,
};

static const enum pg_type_oid account_types[ACCOUNT_COLS] = {
	PG_TYPE_TEXT, PG_TYPE_TEXT, PG_TYPE_TEXT, PG_TYPE_INT8,        PG_TYPE_INT8,
	PG_TYPE_TEXT, PG_TYPE_INT4, PG_TYPE_INT4, PG_TYPE_TIMESTAMPTZ, PG_TYPE_TIMESTAMPTZ,
};

static bool take_accounts(const struct fold_rows *r, char **params, int *lengths)
{
	struct pg_bin_array c[ACCOUNT_COLS];
	struct table t;
	bool ok = false;

	table_init(&t, c, account_types, ACCOUNT_COLS);
	for (size_t i = 0; i < r->naccounts; i++) {
		const struct rm_account *a = r->accounts[i];
		int64_t opened_at, updated_at;
		if (!readmodel_time_parse(a->opened_at, &opened_at) ||
		    !readmodel_time_parse(a->updated_at, &updated_at))
			goto done;
		pg_bin_text(&c[0], a->row.acc.id);
		pg_bin_text(&c[1], a->row.name);
		pg_bin_text(&c[2], a->row.acc.currency);
		pg_bin_int8(&c[3], a->row.acc.balance);
		pg_bin_int8(&c[4], a->row.acc.overdraft_limit);
		pg_bin_text(&c[5], readmodel_status(&a->row.acc));
		pg_bin_int4(&c[6], a->row.acc.version);
		pg_bin_int4(&c[7], a->row.entries);
		pg_bin_int8(&c[8], opened_at);
		pg_bin_int8(&c[9], updated_at);
	}
	ok = table_take(&t, params, lengths);
done:
	table_free(&t);
	return ok;
}

/* The sums go as text (numeric's binary form is not worth making): SQL casts them. */
static const enum pg_type_oid total_types[TOTAL_COLS] = {
	PG_TYPE_TEXT,
	PG_TYPE_INT8,
	PG_TYPE_INT8,
	PG_TYPE_TEXT,
};

static bool take_totals(const struct fold_rows *r, char **params, int *lengths)
{
	struct pg_bin_array c[TOTAL_COLS];
	struct table t;
	bool ok = false;
	char sum[48];

	table_init(&t, c, total_types, TOTAL_COLS);
	for (size_t i = 0; i < r->ntotals; i++) {
		const struct rm_total *tot = r->totals[i];
		/* Adding nothing is no write (no probe, row lock, update or WAL): a batch of
		 * transfers alone moves neither a count nor the balance sum. The row is there
		 * already: the batch that opened the currency's first account wrote it. */
		if (!tot->delta.accounts && !tot->delta.open_accounts && !tot->delta.balance_sum)
			continue;
		pg_bin_text(&c[0], tot->tot.currency);
		pg_bin_int8(&c[1], tot->delta.accounts);
		pg_bin_int8(&c[2], tot->delta.open_accounts);
		readmodel_int128_text(tot->delta.balance_sum, sum);
		pg_bin_text(&c[3], sum);
	}
	ok = table_take(&t, params, lengths);
	table_free(&t);
	return ok;
}

/* Every row of the batch in one statement, the arrays in binary. */
static bool queue_rows(struct projector_ctx *ctx)
{
	struct fold_rows *r = ctx->rows;
	char *params[ROW_PARAMS] = { NULL };
	int lengths[ROW_PARAMS] = { 0 }, formats[ROW_PARAMS];
	char **p = params;
	int *l = lengths;
	bool ok = false;

	for (size_t i = 0; i < ROW_PARAMS; i++)
		formats[i] = 1;
	if (!take_accounts(r, p, l) ||
	    !table_take(&r->entries, p += ACCOUNT_COLS, l += ACCOUNT_COLS) ||
	    !take_totals(r, p += ENTRY_COLS, l += ENTRY_COLS))
		goto done;
	ok = pg_queue_params(ctx->pg, "write_rows", ROW_PARAMS, (const char *const *)params,
			     lengths, formats, false);
done:
	for (size_t i = 0; i < ROW_PARAMS; i++)
		free(params[i]);
	return ok;
}

bool projector_queue_writes(struct projector_ctx *ctx)
{
	const struct log_event *last = &ctx->events[ctx->nevents - 1];
	char epoch[24], pos[24], newpos[24];
	const char *cas[6] = { epoch, ctx->cp_txid, pos, ctx->cp_gen, last->txid, newpos };

	snprintf(epoch, sizeof(epoch), "%lld", ctx->epoch);
	snprintf(pos, sizeof(pos), "%lld", ctx->cp_pos);
	snprintf(newpos, sizeof(newpos), "%lld", last->position);
	/* The checkpoint moves first: if another projector took the lease (our epoch is
	 * stale) or moved it, or a rebuild swapped the tables (a new generation), the
	 * whole transaction fails and nothing is applied twice or to the wrong tables. */
	return pg_queue(ctx->pg, "move_checkpoint", 6, cas) && queue_rows(ctx);
}

void projector_rows_committed(struct projector_ctx *ctx)
{
	struct fold_rows *r = ctx->rows;

	/* The change moves into the committed totals, so that tot + delta (what a PUT_BATCH
	 * sends, redis_batch.c) is the batch's end both before and after the commit. */
	for (size_t i = 0; r && i < r->ntotals; i++) {
		readmodel_count_add(&r->totals[i]->tot.count, &r->totals[i]->delta);
		r->totals[i]->delta = (struct readmodel_count){ 0 };
	}
}

size_t projector_rows_accounts(const struct fold_rows *r, struct rm_account *const **out)
{
	*out = r ? r->accounts : NULL;
	return r ? r->naccounts : 0;
}

size_t projector_rows_items(const struct fold_rows *r, const struct projector_item **out)
{
	*out = r ? r->items : NULL;
	return r ? r->nitems : 0;
}

size_t projector_account_json_append(struct readmodel_text *text, const struct rm_account *a)
{
	struct readmodel_account body = readmodel_account_of(&a->row, a->opened_at, a->updated_at);

	return readmodel_account_json_append(text, &body);
}
