/* daybook-admin rebuild: the end state (accounts, totals) and the shadow tables' keys. */
#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg.h"
#include "rebuild.h"

/* Accounts are written after the load, before the keys are built and outside the
 * switch lock; the switch then rewrites only those that its tail of the log changed. */
struct account_walk {
	struct rebuild *rb;
	PGconn *pg; /* where the rows go */
	struct copy_buf *rows;
	struct evbuffer *ids; /* the switch's: accounts written again, as a text[] literal */
	size_t n;
	bool ok;
};

/* An rm_accounts_shadow row, in its column order; false when out of memory. */
static bool account_row(struct copy_buf *b, const char *id, const struct acct *a)
{
	return copy_row(b, 10) && copy_text(b, id) && copy_text(b, a->row.name) &&
	       copy_text(b, a->row.acc.currency) && copy_int(b, a->row.acc.balance, 8) &&
	       copy_int(b, a->row.acc.overdraft_limit, 8) &&
	       copy_text(b, readmodel_status(&a->row.acc)) && copy_int(b, a->row.acc.version, 4) &&
	       copy_int(b, a->row.entries, 4) && copy_int(b, a->opened_at, 8) &&
	       copy_int(b, a->updated_at, 8);
}

/* The account's hash in Redis (v, n and the GET /accounts/{id} body). */
static bool account_hash(struct rebuild *rb, const char *id, const struct acct *a)
{
	char opened[READMODEL_TIME_LEN], updated[READMODEL_TIME_LEN];
	struct readmodel_account body;
	char k[READMODEL_KEY_MAX], v[16], n[16], *json;
	const char *argv[8] = { "HSET", k, "v", v, "n", n, "j", NULL };
	bool sent;

	readmodel_time_text(a->opened_at, opened);
	readmodel_time_text(a->updated_at, updated);
	body = readmodel_account_of(&a->row, opened, updated);
	if (!(json = readmodel_account_json(&body)))
		return false;
	argv[7] = json;
	rb_key(rb, k, sizeof(k), READMODEL_KIND_ACCOUNT, id);
	snprintf(v, sizeof(v), "%d", a->row.acc.version);
	snprintf(n, sizeof(n), "%d", a->row.entries);
	sent = rb_redis_send(rb, 8, argv);
	free(json);
	return sent;
}

static bool account_out(struct account_walk *w, const char *id, struct acct *a)
{
	struct copy_buf *b = w->rows;

	a->written = a->row.acc.version;
	if (w->ids)
		pg_array_append(w->ids, id, w->n == 0);
	w->n++;
	if (w->rb->redis && !rb_finish_items(w->rb, a))
		return false;
	if (w->rb->sql && !account_row(b, id, a))
		return false;
	/* The first pass COPYs as it goes; the switch's rewrite deletes the old rows first. */
	if (w->rb->sql && !w->ids && b->len > ACCOUNT_ROWS_MAX &&
	    !copy_in(w->pg, "rm_accounts_shadow", b, &w->rb->ctx->log))
		return false;
	return !w->rb->redis || account_hash(w->rb, id, a);
}

static void put_account(void *arg, const char *id, void *value)
{
	struct account_walk *w = arg;
	struct acct *a = value;

	/* Counted before the rebuild began but never opened: nothing to write. */
	if (!w->ok || !ledger_account_exists(&a->row.acc) || a->written == a->row.acc.version)
		return;
	w->ok = account_out(w, id, a);
}

struct totals_walk {
	struct readmodel_totals **sorted;
	size_t n;
};

static void collect_total(void *arg, const char *currency, void *value)
{
	struct totals_walk *w = arg;

	(void)currency;
	w->sorted[w->n++] = value;
}

/* The few totals rows: a plain INSERT each (balance_sum is numeric, whose binary
 * form is not worth writing for a row per currency). */
static bool sql_totals(struct rebuild *rb, struct readmodel_totals **t, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char accounts[24], open[24], sum[48];
		const char *params[4] = { t[i]->currency, accounts, open, sum };
		PGresult *r;

		snprintf(accounts, sizeof(accounts), "%lld", (long long)t[i]->count.accounts);
		snprintf(open, sizeof(open), "%lld", (long long)t[i]->count.open_accounts);
		readmodel_int128_text(t[i]->count.balance_sum, sum);
		r = PQexecParams(rb->wr, "INSERT INTO rm_totals_shadow VALUES ($1, $2, $3, $4)", 4,
				 NULL, params, NULL, NULL, 0);
		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			rb_error(rb, "writing the totals: %s", PQresultErrorMessage(r));
			PQclear(r);
			return false;
		}
		PQclear(r);
	}
	return true;
}

static int by_currency(const void *a, const void *b)
{
	return strcmp((*(struct readmodel_totals *const *)a)->currency,
		      (*(struct readmodel_totals *const *)b)->currency);
}

/* The totals body into Redis, with the checkpoint token. */
static bool redis_totals(struct rebuild *rb, struct readmodel_totals **t, size_t n,
			 const char *token)
{
	char k[READMODEL_KEY_MAX], *body;
	bool ok;

	if (!(body = readmodel_totals_json_of((const struct readmodel_totals *const *)t, n)))
		return false;
	const char *argv[6] = { "HSET", k, "p", token, "j", body };
	rb_key(rb, k, sizeof(k), READMODEL_KIND_TOTALS, NULL);
	ok = rb_redis_send(rb, 6, argv);
	free(body);
	return ok;
}

/* The switch's rewrite drops the rows it replaces first. */
static bool delete_accounts(struct rebuild *rb, PGconn *pg, struct evbuffer *ids)
{
	const char *params[1];
	PGresult *r;

	evbuffer_add(ids, "}", 2); /* with the NUL */
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	r = PQexecParams(pg, "DELETE FROM rm_accounts_shadow WHERE account_id = ANY($1::text[])", 1,
			 NULL, params, NULL, NULL, 0);
	if (!params[0] || PQresultStatus(r) != PGRES_COMMAND_OK) {
		rb_error(rb, "rewriting accounts: %s", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	PQclear(r);
	return true;
}

/* Every account not written yet or changed since: all of them after the load, those
 * the tail changed in the switch. Their statement items for Redis are finished too. */
static bool write_accounts(struct rebuild *rb, PGconn *pg, bool rewrite)
{
	struct copy_buf rows = { 0 };
	struct account_walk w = { rb, pg, &rows, NULL, 0, true };
	bool ok = false;

	if (rewrite && rb->sql && (!(w.ids = evbuffer_new()) || evbuffer_add(w.ids, "{", 1)))
		goto done;
	strmap_foreach(rb->accounts, put_account, &w);
	if (!w.ok)
		goto done;
	if (w.ids && w.n > 0 && !delete_accounts(rb, pg, w.ids))
		goto done;
	if (rb->sql && !copy_in(pg, "rm_accounts_shadow", &rows, &rb->ctx->log))
		goto done;
	ok = true;
done:
	if (w.ids)
		evbuffer_free(w.ids);
	free(rows.p);
	return ok;
}

bool rb_write_end_state(struct rebuild *rb, const char *token)
{
	struct totals_walk tw = {
		calloc(strmap_count(rb->totals) + 1, sizeof(struct readmodel_totals *)), 0
	};

	if (!write_accounts(rb, rb->wr, true) || !tw.sorted)
		goto fail;
	strmap_foreach(rb->totals, collect_total, &tw);
	qsort(tw.sorted, tw.n, sizeof(*tw.sorted), by_currency);
	if (rb->sql && !sql_totals(rb, tw.sorted, tw.n))
		goto fail;
	if (rb->redis && !redis_totals(rb, tw.sorted, tw.n, token))
		goto fail;
	free(tw.sorted);
	return !rb->redis || rb_redis_drain(rb);
fail:
	free(tw.sorted);
	return false;
}

/* Accounts whose live count was too high (more than the fold found at the live
 * checkpoint): their newest items were not all sent. */
static void find_short(void *arg, const char *id, void *value)
{
	struct evbuffer *ids = arg;
	const struct acct *a = value;

	if (a->expected > a->at_cp)
		pg_array_append(ids, id, evbuffer_get_length(ids) == 1);
}

#define REPAIR_ITEMS                                                                                 \
	"SELECT e.account_id, " READMODEL_SQL_ENTRY_COLUMNS(                                         \
		"e") " "                                                                             \
		     "FROM unnest($1::text[]) id, LATERAL (SELECT * FROM rm_entries_shadow x WHERE " \
		     "x.account_id = id ORDER BY x.version DESC LIMIT " READMODEL_ITEMS_KEPT_TEXT    \
		     ") e "                                                                          \
		     "ORDER BY e.account_id, e.version"

/* Their statements again, from the indexed shadow table: everything the load folded. */
bool rb_repair_items(struct rebuild *rb)
{
	struct evbuffer *ids = evbuffer_new();
	const char *params[1];
	PGresult *r = NULL;
	bool ok = false;
	int repaired = 0;

	if (!ids || evbuffer_add(ids, "{", 1) != 0)
		goto done;
	strmap_foreach(rb->accounts, find_short, ids);
	if (evbuffer_get_length(ids) > 1) {
		evbuffer_add(ids, "}", 2);
		params[0] = (const char *)evbuffer_pullup(ids, -1);
		r = PQexecParams(rb->wr, REPAIR_ITEMS, 1, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(r) != PGRES_TUPLES_OK) {
			rb_error(rb, "repairing statements: %s", PQresultErrorMessage(r));
			goto done;
		}
	}
	for (int row = 0; r && row < PQntuples(r); row++) {
		const char *id = PQgetvalue(r, row, 0);
		struct acct *a = strmap_get(rb->accounts, id);
		char k[READMODEL_KEY_MAX];
		const char *del[2] = { "DEL", k };
		struct readmodel_entry e = readmodel_entry_from_pg(r, row, 1);
		if (!a)
			continue;
		if (a->expected > a->at_cp) { /* its first row: start the statement afresh */
			rb_key(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, id);
			if (!rb_send_items(rb, a) || !rb_redis_send(rb, 2, del))
				goto done;
			a->expected = 0; /* every later item counts */
			a->sent = 0;
			repaired++;
		}
		if (!rb_hold_item(rb, a, readmodel_entry_json(&e)))
			goto done;
	}
	ok = rb_send_held(rb);
done:
	if (repaired)
		rb_note(rb,
			"the live count of %d account%s statement items was "
			"too high; their items were sent again\n",
			repaired, repaired == 1 ? "'s" : "s'");
	PQclear(r);
	if (ids)
		evbuffer_free(ids);
	return ok;
}

/* Collect the answers of the key builds sent (small on the reader's connection, big
 * on the writer's); with abort, or once one failed, the rest are cancelled. */
static bool keys_built(struct rebuild *rb, bool small, bool big, bool abort)
{
	static const char what[] = "indexing the shadow tables";
	bool ok = !abort;

	if (small && !rb_sent_ok(rb, rb->pg, what, !ok))
		ok = false;
	if (big && !rb_sent_ok(rb, rb->wr, what, !ok))
		ok = false;
	return ok;
}

/* After the load, PostgreSQL builds rm_entries_shadow's key on the writer's
 * connection while the reader's, idle until the switch reads the tail, takes the
 * accounts and builds the small tables' keys, and Redis takes the accounts and the
 * statement items still held: little is left for the switch. */
bool rb_index_and_send(struct rebuild *rb)
{
	bool big = false, small = false;

	rb->phase = "index";
	rb_report(rb, true);
	if (rb->sql && !(big = PQsendQuery(rb->wr, "SELECT rm_shadow_key('rm_entries')"))) {
		rb_error(rb, "indexing the shadow tables: %s", PQerrorMessage(rb->wr));
		goto fail;
	}
	if (!write_accounts(rb, rb->pg, false))
		goto fail;
	if (rb->sql && !(small = PQsendQuery(rb->pg, "SELECT rm_shadow_key('rm_accounts'), "
						     "rm_shadow_key('rm_totals')"))) {
		rb_error(rb, "indexing the shadow tables: %s", PQerrorMessage(rb->pg));
		goto fail;
	}
	if (rb->redis && !rb_redis_drain(rb))
		goto fail;
	if (!keys_built(rb, small, big, false))
		return false;
	return !rb->hinted || rb_repair_items(rb);
fail:
	(void)keys_built(rb, small, big, true);
	return false;
}
