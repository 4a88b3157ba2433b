/* daybook-admin rebuild: the end state (accounts, totals) and the shadow tables' keys. */
#include <errno.h>
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "cli.h"
#include "copy.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "strmap.h"
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

static void put_account(void *arg, const char *id, void *value)
{
	struct account_walk *w = arg;
	struct acct *a = value;
	struct copy_buf *b = w->rows;
	const char *status = a->acc.closed ? "closed" : "open";

	/* Counted before the rebuild began but never opened: nothing to write. */
	if (!w->ok || !ledger_account_exists(&a->acc) || a->written == a->acc.version)
		return;
	a->written = a->acc.version;
	if (w->ids)
		pg_array_append(w->ids, id, w->n == 0);
	w->n++;
	if (w->rb->redis)
		w->ok = rb_finish_items(w->rb, a);
	if (w->ok && w->rb->sql)
		w->ok = copy_row(b, 10) && copy_text(b, id) && copy_text(b, a->name) &&
			copy_text(b, a->acc.currency) && copy_int(b, a->acc.balance, 8) &&
			copy_int(b, a->acc.overdraft_limit, 8) && copy_text(b, status) &&
			copy_int(b, a->acc.version, 4) && copy_int(b, a->entries, 4) &&
			copy_int(b, a->opened_at, 8) && copy_int(b, a->updated_at, 8);
	/* The first pass COPYs as it goes; the switch's rewrite deletes the old rows first. */
	if (w->ok && w->rb->sql && !w->ids && b->len > ACCOUNT_ROWS_MAX)
		w->ok = copy_in(w->pg, "rm_accounts_shadow", b);
	if (w->ok && w->rb->redis) {
		char opened[READMODEL_TIME_LEN], updated[READMODEL_TIME_LEN];
		struct readmodel_account body = {
			.account_id = id, .name = a->name, .currency = a->acc.currency, .status = status,
			.balance = a->acc.balance, .overdraft_limit = a->acc.overdraft_limit,
			.version = a->acc.version, .opened_at = opened, .updated_at = updated,
		};
		char k[LEDGER_ID_MAX + 48], v[16], n[16], *json;
		readmodel_time_text(a->opened_at, opened);
		readmodel_time_text(a->updated_at, updated);
		json = readmodel_account_json(&body);
		const char *argv[8] = { "HSET", k, "v", v, "n", n, "j", json };
		rb_key(w->rb, k, sizeof(k), "acct", id);
		snprintf(v, sizeof(v), "%d", a->acc.version);
		snprintf(n, sizeof(n), "%d", a->entries);
		w->ok = json && rb_redis_send(w->rb, 8, argv);
		free(json);
	}
}

struct totals_walk {
	struct total **sorted;
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
static bool sql_totals(struct rebuild *rb, struct total **t, size_t n)
{
	bool ok = true;

	for (size_t i = 0; ok && i < n; i++) {
		char accounts[24], open[24], sum[48];
		const char *params[4] = { t[i]->currency, accounts, open, sum };
		PGresult *r;

		snprintf(accounts, sizeof(accounts), "%lld", t[i]->accounts);
		snprintf(open, sizeof(open), "%lld", t[i]->open);
		readmodel_int128_text(t[i]->sum, sum);
		r = PQexecParams(rb->wr, "INSERT INTO rm_totals_shadow VALUES ($1, $2, $3, $4)", 4,
				 NULL, params, NULL, NULL, 0);
		ok = PQresultStatus(r) == PGRES_COMMAND_OK;
		if (!ok)
			rb_error(rb, "writing the totals: %s", PQresultErrorMessage(r));
		PQclear(r);
	}
	return ok;
}

static int by_currency(const void *a, const void *b)
{
	return strcmp((*(struct total *const *)a)->currency, (*(struct total *const *)b)->currency);
}

/* The totals body (t sorted by currency) into Redis, with the checkpoint token. */
static bool redis_totals(struct rebuild *rb, struct total **t, size_t n, const char *token)
{
	struct readmodel_total *rows = malloc((n ? n : 1) * sizeof(*rows));
	char (*text)[3][48] = malloc((n ? n : 1) * sizeof(*text));
	char k[64], *body = NULL;
	bool ok = false;

	if (!rows || !text)
		goto done;
	for (size_t i = 0; i < n; i++) {
		snprintf(text[i][0], sizeof(text[i][0]), "%lld", t[i]->accounts);
		snprintf(text[i][1], sizeof(text[i][1]), "%lld", t[i]->open);
		readmodel_int128_text(t[i]->sum, text[i][2]);
		rows[i] = (struct readmodel_total){ .currency = t[i]->currency, .accounts = text[i][0],
						    .open_accounts = text[i][1], .balance_sum = text[i][2] };
	}
	body = readmodel_totals_json(rows, n);
	if (body) {
		const char *argv[6] = { "HSET", k, "p", token, "j", body };
		rb_key(rb, k, sizeof(k), "totals", NULL);
		ok = rb_redis_send(rb, 6, argv);
	}
done:
	free(rows);
	free(text);
	free(body);
	return ok;
}

/* The switch's rewrite drops the rows it replaces first. */
static bool delete_accounts(struct rebuild *rb, PGconn *pg, struct evbuffer *ids)
{
	const char *params[1];
	PGresult *r;
	bool ok;

	evbuffer_add(ids, "}", 2); /* with the NUL */
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	r = PQexecParams(pg, "DELETE FROM rm_accounts_shadow WHERE account_id = ANY($1::text[])",
			 1, NULL, params, NULL, NULL, 0);
	ok = params[0] && PQresultStatus(r) == PGRES_COMMAND_OK;
	if (!ok)
		rb_error(rb, "rewriting accounts: %s", PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Every account not written yet or changed since: all of them after the load, those
 * the tail changed in the switch. Their statement items for Redis are finished too. */
static bool write_accounts(struct rebuild *rb, PGconn *pg, bool rewrite)
{
	struct copy_buf rows = { 0 };
	struct account_walk w = { rb, pg, &rows, NULL, 0, true };
	bool ok;

	if (rewrite && rb->sql && (!(w.ids = evbuffer_new()) || evbuffer_add(w.ids, "{", 1)))
		w.ok = false;
	if (w.ok)
		strmap_foreach(rb->accounts, put_account, &w);
	ok = w.ok && (!w.ids || w.n == 0 || delete_accounts(rb, pg, w.ids)) &&
	     (!rb->sql || copy_in(pg, "rm_accounts_shadow", &rows));
	if (w.ids)
		evbuffer_free(w.ids);
	free(rows.p);
	return ok;
}

bool rb_write_end_state(struct rebuild *rb, const char *token)
{
	struct totals_walk tw = { calloc(strmap_count(rb->totals) + 1, sizeof(struct total *)), 0 };
	bool ok = write_accounts(rb, rb->wr, true) && tw.sorted;

	if (ok) {
		strmap_foreach(rb->totals, collect_total, &tw);
		qsort(tw.sorted, tw.n, sizeof(*tw.sorted), by_currency);
		ok = (!rb->sql || sql_totals(rb, tw.sorted, tw.n)) &&
		     (!rb->redis || redis_totals(rb, tw.sorted, tw.n, token));
	}
	free(tw.sorted);
	return ok && (!rb->redis || rb_redis_drain(rb));
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

#define REPAIR_ITEMS                                                                        \
	"SELECT e.account_id, e.version, e.type, e.amount, e.balance_after, e.transfer_id, "     \
	"e.counterparty, e.reference, "                                                          \
	"to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "                \
	"FROM unnest($1::text[]) id, LATERAL (SELECT * FROM rm_entries_shadow x WHERE "          \
	"x.account_id = id ORDER BY x.version DESC LIMIT 50) e ORDER BY e.account_id, e.version"

/* Their statements again, from the indexed shadow table: everything the load folded. */
bool rb_repair_items(struct rebuild *rb)
{
	struct evbuffer *ids = evbuffer_new();
	const char *params[1];
	PGresult *r = NULL;
	bool ok = ids && evbuffer_add(ids, "{", 1) == 0;
	int repaired = 0;

	if (ok)
		strmap_foreach(rb->accounts, find_short, ids);
	if (ok && evbuffer_get_length(ids) > 1) {
		evbuffer_add(ids, "}", 2);
		params[0] = (const char *)evbuffer_pullup(ids, -1);
		r = PQexecParams(rb->wr, REPAIR_ITEMS, 1, NULL, params, NULL, NULL, 0);
		ok = PQresultStatus(r) == PGRES_TUPLES_OK;
		if (!ok)
			rb_error(rb, "repairing statements: %s", PQresultErrorMessage(r));
	}
	for (int row = 0; ok && r && row < PQntuples(r); row++) {
		const char *id = PQgetvalue(r, row, 0);
		struct acct *a = strmap_get(rb->accounts, id);
		char k[LEDGER_ID_MAX + 48];
		const char *del[2] = { "DEL", k };
		struct readmodel_entry e = {
			.version = atoi(PQgetvalue(r, row, 1)), .type = PQgetvalue(r, row, 2),
			.amount = atoll(PQgetvalue(r, row, 3)), .balance_after = atoll(PQgetvalue(r, row, 4)),
			.transfer_id = PQgetisnull(r, row, 5) ? NULL : PQgetvalue(r, row, 5),
			.counterparty = PQgetisnull(r, row, 6) ? NULL : PQgetvalue(r, row, 6),
			.reference = PQgetisnull(r, row, 7) ? NULL : PQgetvalue(r, row, 7),
			.at = PQgetvalue(r, row, 8),
		};
		if (!a)
			continue;
		if (a->expected > a->at_cp) { /* its first row: start the statement afresh */
			rb_key(rb, k, sizeof(k), "stmt", id);
			ok = rb_send_items(rb, a) && rb_redis_send(rb, 2, del);
			a->expected = 0; /* every later item counts */
			a->sent = 0;
			repaired++;
		}
		ok = ok && rb_hold_item(rb, a, readmodel_entry_json(&e));
	}
	ok = ok && rb_send_held(rb);
	if (repaired)
		rb_note(rb, "the live count of %d account%s statement items was "
				"too high; their items were sent again\n", repaired, repaired == 1 ? "'s" : "s'");
	PQclear(r);
	if (ids)
		evbuffer_free(ids);
	return ok;
}

/* After the load, PostgreSQL builds rm_entries_shadow's key on the writer's
 * connection while the reader's, idle until the switch reads the tail, takes the
 * accounts and builds the small tables' keys, and Redis takes the accounts and the
 * statement items still held: little is left for the switch. */
bool rb_index_and_send(struct rebuild *rb)
{
	bool ok, big = false, small = false;

	rb->phase = "index";
	rb_report(rb, true);
	ok = !rb->sql || (big = PQsendQuery(rb->wr, "SELECT rm_shadow_key('rm_entries')"));
	ok = ok && write_accounts(rb, rb->pg, false);
	ok = ok && (!rb->sql || (small = PQsendQuery(rb->pg, "SELECT rm_shadow_key('rm_accounts'), "
							     "rm_shadow_key('rm_transfers'), "
							     "rm_shadow_key('rm_totals')")));
	if (ok && rb->redis)
		ok = rb_redis_drain(rb);
	if (small)
		ok = rb_sent_ok(rb, rb->pg, "indexing the shadow tables", !ok) && ok;
	if (big)
		ok = rb_sent_ok(rb, rb->wr, "indexing the shadow tables", !ok) && ok;
	return ok && (!rb->hinted || rb_repair_items(rb));
}
