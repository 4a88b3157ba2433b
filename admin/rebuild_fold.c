/* daybook-admin rebuild: the fold of events into accounts, totals, rows and keys. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rebuild.h"

static struct readmodel_totals *total_of(struct rebuild *rb, const char *currency)
{
	struct readmodel_totals *t = strmap_get(rb->totals, currency);

	if (!t && (t = calloc(1, sizeof(*t)))) {
		snprintf(t->currency, sizeof(t->currency), "%s", currency);
		if (!strmap_put(rb->totals, currency, t)) {
			free(t);
			t = NULL;
		}
	}
	return t;
}

/* Send an account's held statement items, oldest first, in one LPUSH: the statement
 * list has the newest first. */
bool rb_send_items(struct rebuild *rb, struct acct *a)
{
	char k[READMODEL_KEY_MAX];
	const char *argv[2 + READMODEL_ITEMS_KEPT];
	bool sent;

	if (a->npending == 0)
		return true;
	rb_key(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, a->row.acc.id);
	/* The generation is new, but its number may not be: Redis that lost its data
	 * counts generations from 1 again, and a projector batch in flight then may have
	 * left keys under it. A statement is pushed onto, so it starts empty. */
	argv[0] = "DEL";
	argv[1] = k;
	if (a->sent == 0 && !rb_redis_send(rb, 2, argv))
		return false;
	argv[0] = "LPUSH";
	argv[1] = k;
	for (int32_t i = 0; i < a->npending; i++)
		argv[2 + i] = a->pending[i];
	sent = rb_redis_send(rb, 2 + a->npending, argv);
	for (int32_t i = 0; i < a->npending; i++)
		free(a->pending[i]);
	a->sent += a->npending;
	rb->held -= a->npending;
	a->npending = 0;
	return sent;
}

/* Hold a statement item (json is taken over) until the account has a full LPUSH; at
 * most held_max in all (accounts whose items are spread thinly over a long log would
 * otherwise hold theirs to the end): beyond that, every held item is sent. */
bool rb_hold_item(struct rebuild *rb, struct acct *a, char *json)
{
	if (!json)
		return false;
	if (!a->pending) {
		a->pending = calloc(READMODEL_ITEMS_KEPT, sizeof(*a->pending));
		if (!a->pending) {
			free(json);
			return false;
		}
	}
	if (!a->listed) {
		if (rb->nholders == rb->holders_cap) {
			size_t cap = rb->holders_cap ? 2 * rb->holders_cap : 1024;
			struct acct **h = realloc(rb->holders, cap * sizeof(*h));
			if (!h) {
				free(json);
				return false;
			}
			rb->holders = h;
			rb->holders_cap = cap;
		}
		rb->holders[rb->nholders++] = a;
		a->listed = true;
	}
	a->pending[a->npending++] = json;
	rb->held++;
	if (a->npending == READMODEL_ITEMS_KEPT && !rb_send_items(rb, a))
		return false;
	return rb->held <= rb->held_max || rb_send_held(rb);
}

void rb_acct_free(void *value)
{
	struct acct *a = value;

	for (int32_t i = 0; a && i < a->npending; i++)
		free(a->pending[i]);
	if (a) {
		free(a->pending);
		while (a->stash) {
			struct stashed *s = a->stash;
			a->stash = s->next;
			free(s);
		}
	}
	free(a);
}

/* An rm_entries_shadow row, in its column order; false when out of memory. */
static bool entry_row(struct copy_buf *b, const struct acct *a, const struct readmodel_entry *e,
		      int64_t at)
{
	return copy_row(b, 9) && copy_text(b, a->row.acc.id) && copy_int(b, e->version, 4) &&
	       copy_text(b, e->type) && copy_int(b, e->amount, 8) &&
	       copy_int(b, e->balance_after, 8) && copy_text(b, e->transfer_id) &&
	       copy_text(b, e->counterparty) && copy_text(b, e->reference) && copy_int(b, at, 8);
}

/* The statement item: a COPY row for SQL, held for one LPUSH per account for Redis. */
static bool emit_entry(struct rebuild *rb, struct acct *a, const struct ledger_event *ev,
		       int64_t at)
{
	char at_text[READMODEL_TIME_LEN];
	struct readmodel_entry e = readmodel_entry_of(&a->row, ev, at_text);

	if (rb->sql && !entry_row(&rb->entries, a, &e, at))
		return false;
	/* Redis keeps the newest items only: skip those certain to be trimmed, and send
	 * the rest as one LPUSH per account rather than a command per item. */
	if (!rb->redis || a->row.entries <= a->expected - READMODEL_ITEMS_KEPT)
		return true;
	readmodel_time_text(at, at_text);
	return rb_hold_item(rb, a, readmodel_entry_json(&e));
}

/* Transfer ids, so that the old generation's transfer keys can be deleted by name
 * after the switch; past XFER_IDS_MAX bytes (about three million transfers) the
 * cleanup scans for them instead. */
static void keep_xfer_id(struct rebuild *rb, const char *id)
{
	struct copy_buf *b = &rb->xfer_ids;
	size_t n = strlen(id) + 1;

	if (rb->xfer_ids_full)
		return;
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? 2 * b->cap : 1 << 16;
		char *p = cap <= XFER_IDS_MAX ? realloc(b->p, cap) : NULL;
		if (!p) {
			free(b->p);
			*b = (struct copy_buf){ 0 };
			rb->xfer_ids_full = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, id, n);
	b->len += n;
}

static bool emit_transfer(struct rebuild *rb, const struct acct *from,
			  const struct ledger_event *ev, int64_t at)
{
	char at_text[READMODEL_TIME_LEN], k[READMODEL_KEY_MAX], *json = NULL;
	struct readmodel_transfer t = readmodel_transfer_of(&from->row, ev, at_text);
	const char *argv[3] = { "SET", k, NULL };

	/* Redis's only: the SQL model of transfers reads the log (sql/017). */
	if (!rb->redis)
		return true;
	readmodel_time_text(at, at_text);
	if (!(json = readmodel_transfer_json(&t)))
		goto fail;
	argv[2] = json;
	rb_key(rb, k, sizeof(k), READMODEL_KIND_TRANSFER, ev->transfer_id);
	if (!rb_redis_send(rb, 3, argv))
		goto fail;
	free(json);
	keep_xfer_id(rb, ev->transfer_id);
	return true;
fail:
	free(json);
	return false;
}

/* Apply one event to its account, in version order (the shared fold). */
static bool apply(struct rebuild *rb, const char *id, struct acct *a, const struct logged *e)
{
	struct ledger_event ev;
	struct readmodel_change change;
	struct readmodel_totals *t;

	if (!e->type || e->version != a->row.acc.version + 1 ||
	    !ledger_event_from_text(e->type, e->data, e->len, &rb->data, &ev) ||
	    !readmodel_fold(&a->row, id, e->version, &ev, &change))
		goto fail;
	if (change.opened)
		a->opened_at = e->at;
	a->updated_at = e->at;
	/* An account keeps its currency: its totals are looked up once, not every event. */
	if (!a->total || strcmp(a->total->currency, a->row.acc.currency) != 0)
		a->total = total_of(rb, a->row.acc.currency);
	if (!(t = a->total))
		goto fail;
	readmodel_count_add(&t->count, &change.totals);
	if (change.entry_type) {
		if (rb->hinted && (e->txid < rb->hint_txid ||
				   (e->txid == rb->hint_txid && e->position <= rb->hint_pos)))
			a->at_cp++;
		if (!emit_entry(rb, a, &ev, e->at))
			goto fail;
	}
	if (change.transfer && !emit_transfer(rb, a, &ev, e->at))
		goto fail;
	if (e->txid > rb->cp_txid || (e->txid == rb->cp_txid && e->position > rb->position)) {
		rb->cp_txid = e->txid;
		rb->position = e->position;
	}
	return true;
fail:
	rb_error(rb, "cannot fold event %lld (account-%s v%d)\n", (long long)e->position, id,
		 e->version);
	return false;
}

/* Keep an event that came before its predecessor, in version order. */
static bool stash(struct rebuild *rb, const char *id, struct acct *a, const struct logged *e)
{
	struct stashed *s = malloc(sizeof(*s) + e->len), **at = &a->stash;

	if (!s)
		return false;
	s->ev = *e;
	memcpy(s->text, e->data, e->len);
	s->ev.data = s->text;
	while (*at && (*at)->ev.version < e->version)
		at = &(*at)->next;
	if (*at && (*at)->ev.version == e->version) {
		rb_error(rb, "account-%s has two events of version %d\n", id, e->version);
		free(s);
		return false;
	}
	s->next = *at;
	*at = s;
	rb->stashed++;
	return true;
}

/* Fold one row of a read (binary): position, txid, account, version, type, data (jsonb:
 * a format version byte, 1, then JSON text), recorded_at. An event ahead of its
 * account waits for the ones before it. */
bool rb_fold_row(struct rebuild *rb, PGresult *r, int i)
{
	const char *id = PQgetvalue(r, i, 2), *data = PQgetvalue(r, i, 5);
	int len = PQgetlength(r, i, 5);
	struct logged e = {
		.position = (int64_t)pg_bin_uint(PQgetvalue(r, i, 0), 8),
		.txid = pg_bin_uint(PQgetvalue(r, i, 1), 8),
		.version = (int32_t)pg_bin_uint(PQgetvalue(r, i, 3), 4),
		.type = ledger_event_type_from_name(PQgetvalue(r, i, 4)),
		.at = (int64_t)pg_bin_uint(PQgetvalue(r, i, 6), 8),
		.data = data + 1,
		.len = len > 0 ? (size_t)len - 1 : 0,
	};
	struct acct *a = strmap_get(rb->accounts, id);

	if (len < 1 || data[0] != 1) {
		rb_error(rb, "event %lld: unexpected jsonb format\n", (long long)e.position);
		return false;
	}
	if (!a && (!(a = calloc(1, sizeof(*a))) || !strmap_put(rb->accounts, id, a))) {
		free(a);
		return false;
	}
	if (e.version > a->row.acc.version + 1)
		return stash(rb, id, a, &e);
	if (!apply(rb, id, a, &e))
		return false;
	while (a->stash && a->stash->ev.version == a->row.acc.version + 1) {
		struct stashed *s = a->stash;
		bool applied;
		a->stash = s->next;
		rb->stashed--;
		applied = apply(rb, id, a, &s->ev);
		free(s);
		if (!applied)
			return false;
	}
	return true;
}

/* At the end: send what the account still holds, and trim its statement if it got
 * more than Redis keeps (items appended while the rebuild ran). */
bool rb_finish_items(struct rebuild *rb, struct acct *a)
{
	char k[READMODEL_KEY_MAX], stop[16];
	const char *argv[4] = { "LTRIM", k, "0", stop };

	if (!rb_send_items(rb, a))
		return false;
	if (a->sent <= READMODEL_ITEMS_KEPT)
		return true;
	rb_key(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, a->row.acc.id);
	snprintf(stop, sizeof(stop), "%d", READMODEL_ITEMS_KEPT - 1);
	return rb_redis_send(rb, 4, argv);
}

bool rb_send_held(struct rebuild *rb)
{
	size_t i;

	for (i = 0; i < rb->nholders; i++) {
		rb->holders[i]->listed = false;
		if (!rb_send_items(rb, rb->holders[i]))
			goto fail;
	}
	rb->nholders = 0;
	return true;
fail:
	/* Those not sent keep their items (freed with the account); none is listed. */
	for (; i < rb->nholders; i++)
		rb->holders[i]->listed = false;
	rb->nholders = 0;
	return false;
}
