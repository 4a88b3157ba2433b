/* daybook-query's renderers: SQL rows and Redis statement items into response bodies,
 * byte for byte as the projector writes them (docs/read-models.md, "JSON bodies"). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

char *transactions_body(const char *const *items, const size_t *lens, size_t n,
			const char *next_before, size_t *len)
{
	static const char head[] = "{\"items\":[", mid[] = "],\"next_before\":";
	const char *next = next_before ? next_before : "null";
	size_t total = sizeof(head) + sizeof(mid) + strlen(next) + 2 + n, at = 0;
	char *body;

	for (size_t i = 0; i < n; i++)
		total += lens[i];
	if (!(body = malloc(total)))
		return NULL;
	memcpy(body, head, sizeof(head) - 1);
	at = sizeof(head) - 1;
	for (size_t i = 0; i < n; i++) {
		if (i)
			body[at++] = ',';
		memcpy(body + at, items[i], lens[i]);
		at += lens[i];
	}
	at += (size_t)sprintf(body + at, "%s%s}", mid, next);
	*len = at;
	return body;
}

bool sql_probe_head(const PGresult *res, struct readmodel_position *head)
{
	char text[QUERY_POSITION_MAX];

	if (PQntuples(res) < 1 || PQnfields(res) < 4 || PQgetisnull(res, 0, 2) ||
	    PQgetisnull(res, 0, 3))
		return false;
	snprintf(text, sizeof(text), "%s.%s", PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3));
	return readmodel_position_parse(text, head);
}

static const char *val(const PGresult *res, int row, int col)
{
	return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t int_of(const PGresult *res, int row, int col)
{
	return strtoll(PQgetvalue(res, row, col), NULL, 10);
}

static bool take(char *body, struct answer *ans)
{
	if (!body)
		return false;
	ans->body = body;
	ans->len = strlen(body);
	ans->status = 200;
	return true;
}

static bool render_account(const PGresult *res, struct answer *ans)
{
	struct readmodel_account a;

	if (!val(res, 0, 2)) {
		ans->status = 404;
		ans->code = "account_not_found";
		return true;
	}
	a = readmodel_account_from_pg(res, 0, 2);
	snprintf(ans->etag, sizeof(ans->etag), "%d", a.version);
	return take(readmodel_account_json(&a), ans);
}

/* One statement item from READMODEL_SQL_ENTRY_COLUMNS starting at col. Caller frees. */
static char *render_item(const PGresult *res, int row, int col)
{
	struct readmodel_entry e = readmodel_entry_from_pg(res, row, col);

	return readmodel_entry_json(&e);
}

static bool render_transactions(const struct read *rd, const PGresult *res, struct answer *ans)
{
	int rows = PQntuples(res), n = 0;
	char **items = NULL;
	size_t *lens = NULL;
	const char *next = NULL;
	bool ok = false;

	if (strcmp(PQgetvalue(res, 0, 2), "t") != 0) {
		ans->status = 404;
		ans->code = "account_not_found";
		return true;
	}
	/* At most limit + 1 rows (one more tells whether there is a next page). */
	items = malloc((size_t)rows * sizeof(*items));
	lens = malloc((size_t)rows * sizeof(*lens));
	if (!items || !lens)
		goto done;
	for (int i = 0; i < rows && n < rd->limit; i++, n++) {
		if (!val(res, i, 3))
			break;
		if (!(items[n] = render_item(res, i, 3)))
			goto done;
		lens[n] = strlen(items[n]);
	}
	if (rows > rd->limit && n == rd->limit)
		next = PQgetvalue(res, n - 1, 3);
	ans->body = transactions_body((const char *const *)items, lens, (size_t)n, next, &ans->len);
	ans->status = 200;
	ok = ans->body != NULL;
done:
	for (int i = 0; items && i < n; i++)
		free(items[i]);
	free(items);
	free(lens);
	return ok;
}

static bool render_transfer(const PGresult *res, struct answer *ans)
{
	struct readmodel_transfer t;

	if (!val(res, 0, 2)) {
		ans->status = 404;
		ans->code = "transfer_not_found";
		return true;
	}
	t = readmodel_transfer_from_pg(res, 0, 2);
	return take(readmodel_transfer_json(&t), ans);
}

/* balance_sum is numeric (a sum of int64 can exceed int64): the texts go into the
 * body as they are, through the one rendering the projector uses too. */
static bool render_totals(const PGresult *res, struct answer *ans)
{
	int rows = PQntuples(res), n = 0;
	struct readmodel_total *t = malloc((size_t)(rows ? rows : 1) * sizeof(*t));
	char *body;

	if (!t)
		return false;
	for (; n < rows && val(res, n, 2); n++)
		t[n] = (struct readmodel_total){ .currency = val(res, n, 2),
						 .accounts = val(res, n, 3),
						 .open_accounts = val(res, n, 4),
						 .balance_sum = val(res, n, 5) };
	body = readmodel_totals_json(t, (size_t)n);
	free(t);
	if (!body)
		return false;
	ans->body = body;
	ans->len = strlen(body);
	ans->status = 200;
	return true;
}

static bool render_events(const PGresult *res, struct answer *ans)
{
	int rows = PQntuples(res);
	json_t *list, *o;
	bool ok = false;

	if (strcmp(PQgetvalue(res, 0, 2), "t") != 0) {
		ans->status = 404;
		ans->code = "account_not_found";
		return true;
	}
	list = json_array();
	o = json_pack("{s:o}", "events", list);
	if (!o)
		goto done;
	for (int i = 0; i < rows && val(res, i, 3); i++) {
		/* jsonb's text is re-encoded compactly; its objects nest as objects. */
		json_t *e = json_pack("{s:I, s:s, s:o, s:o, s:s}", "version",
				      (json_int_t)int_of(res, i, 3), "type", val(res, i, 4), "data",
				      json_loads(val(res, i, 5), 0, NULL), "metadata",
				      json_loads(val(res, i, 6), 0, NULL), "recorded_at",
				      val(res, i, 7));
		if (!e || json_array_append_new(list, e) != 0)
			goto done;
	}
	ok = take(json_dumps(o, JSON_COMPACT), ans);
done:
	json_decref(o);
	return ok;
}

bool sql_render(const struct read *rd, const PGresult *res, struct answer *ans)
{
	if (PQntuples(res) < 1 || PQnfields(res) < 2 || PQgetisnull(res, 0, 0))
		return false; /* no checkpoint row: the read models are not migrated */
	snprintf(ans->position, sizeof(ans->position), "%s.%s", PQgetvalue(res, 0, 0),
		 PQgetvalue(res, 0, 1));
	if (!readmodel_position_parse(ans->position, &ans->at))
		return false;
	switch (rd->kind) {
	case READ_ACCOUNT:
		return render_account(res, ans);
	case READ_TRANSACTIONS:
		return render_transactions(rd, res, ans);
	case READ_TRANSFER:
		return render_transfer(res, ans);
	case READ_TOTALS:
		return render_totals(res, ans);
	case READ_EVENTS:
		return render_events(res, ans);
	case READ_PROBE:
		return true;
	case READ_TT_AS_OF:
	case READ_TT_AT:
		break; /* timetravel_done renders them */
	}
	return false;
}
