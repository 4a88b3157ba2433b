/* Unit tests of the read model's one owner (shared/readmodel*): the key layout, the
 * constants, and the fold from a known event sequence to its known rows and bodies. */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "readmodel.h"

Test(readmodel_keys, each_kind_has_its_documented_key)
{
	char k[READMODEL_KEY_MAX];

	cr_assert_eq(readmodel_key(k, sizeof(k), 7, READMODEL_KIND_ACCOUNT, "alice"), 18);
	cr_assert_str_eq(k, "dbk:g:7:acct:alice");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_STATEMENT, "alice");
	cr_assert_str_eq(k, "dbk:g:7:stmt:alice");
	readmodel_key(k, sizeof(k), 123456789012LL, READMODEL_KIND_TRANSFER, "t-1");
	cr_assert_str_eq(k, "dbk:g:123456789012:xfer:t-1");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_TOTALS, NULL);
	cr_assert_str_eq(k, "dbk:g:7:totals");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_CHECKPOINT, NULL);
	cr_assert_str_eq(k, "dbk:g:7:checkpoint");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_IDENTITY, NULL);
	cr_assert_str_eq(k, "dbk:g:7:identity");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_LAYOUT, NULL);
	cr_assert_str_eq(k, "dbk:g:7:layout");
	readmodel_key(k, sizeof(k), 7, READMODEL_KIND_ENTRIES_V1, "alice");
	cr_assert_str_eq(k, "dbk:g:7:entries:alice");
	readmodel_key_text(k, sizeof(k), "42", READMODEL_KIND_ACCOUNT, "bob");
	cr_assert_str_eq(k, "dbk:g:42:acct:bob");
	readmodel_key_match(k, sizeof(k), 42);
	cr_assert_str_eq(k, "dbk:g:42:*");
	cr_assert_str_eq(READMODEL_GEN_MATCH, "dbk:g:*");
	cr_assert_str_eq(READMODEL_GENERATION_KEY, "dbk:generation");
	cr_assert_str_eq(READMODEL_POSITION_TOPIC, "dbk:position");
}

Test(readmodel_keys, the_longest_account_key_fits_and_a_short_buffer_truncates)
{
	char id[LEDGER_ID_MAX + 1], k[READMODEL_KEY_MAX], small[10];

	memset(id, 'x', LEDGER_ID_MAX);
	id[LEDGER_ID_MAX] = '\0';
	cr_assert_lt(readmodel_key(k, sizeof(k), INT64_MAX, READMODEL_KIND_STATEMENT, id),
		     sizeof(k));
	cr_assert_eq(readmodel_key(small, sizeof(small), 7, READMODEL_KIND_ACCOUNT, "alice"), 18);
	cr_assert_str_eq(small, "dbk:g:7:a");
}

Test(readmodel_keys, the_generation_of_a_key)
{
	cr_assert_eq(readmodel_key_generation("dbk:g:12:acct:alice"), 12);
	cr_assert_eq(readmodel_key_generation("dbk:g:3:totals"), 3);
	cr_assert_eq(readmodel_key_generation("dbk:live:2"), 0);
	cr_assert_eq(readmodel_key_generation("dbk:generation"), 0);
	cr_assert_eq(readmodel_key_generation("dbk:g:12"), 0);
	cr_assert_eq(readmodel_key_generation("dbk:g:x:acct"), 0);
	cr_assert_eq(readmodel_key_generation("dbk:g:-1:acct"), 0);
	cr_assert_eq(readmodel_key_generation(NULL), 0);
}

/* The Lua helpers are built from the same prefix as the C keys. */
Test(readmodel_keys, the_lua_text_spells_the_prefix_of_the_c_keys)
{
	cr_assert(strstr(READMODEL_LUA_GEN_KEY, "return 'dbk:g:' .. g .. ':' .. kind end"));
	cr_assert(strstr(READMODEL_LUA_GEN_KEY, "string.match(key, '^dbk:g:(%d+):')"));
}

Test(readmodel_constants, items_kept_and_the_sql_time_format)
{
	char sql[] = READMODEL_SQL_TIME("e.at");

	cr_assert_eq(READMODEL_ITEMS_KEPT, 50);
	cr_assert_str_eq(READMODEL_ITEMS_KEPT_TEXT, "50");
	cr_assert_str_eq(sql,
			 "to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
}

/* One event of the known sequence below. */
struct step {
	const char *account;
	struct ledger_event ev;
};

static const struct step sequence[] = {
	{ "alice",
	  { .type = LEDGER_ACCOUNT_OPENED,
	    .name = "Alice",
	    .currency = "EUR",
	    .overdraft_limit = 100 } },
	{ "bob", { .type = LEDGER_ACCOUNT_OPENED, .name = "Bob", .currency = "EUR" } },
	{ "carol", { .type = LEDGER_ACCOUNT_OPENED, .name = "Carol", .currency = "USD" } },
	{ "alice", { .type = LEDGER_FUNDS_DEPOSITED, .amount = 500 } },
	{ "alice", { .type = LEDGER_FUNDS_WITHDRAWN, .amount = 200, .reference = "atm" } },
	{ "alice",
	  { .type = LEDGER_TRANSFER_SENT,
	    .amount = 100,
	    .transfer_id = "t-1",
	    .counterparty = "bob",
	    .reference = "rent" } },
	{ "bob",
	  { .type = LEDGER_TRANSFER_RECEIVED,
	    .amount = 100,
	    .transfer_id = "t-1",
	    .counterparty = "alice",
	    .reference = "rent" } },
	{ "carol", { .type = LEDGER_ACCOUNT_CLOSED_EVENT } },
};

static struct readmodel_row *row_of(struct readmodel_row rows[3], const char *id)
{
	return &rows[strcmp(id, "alice") == 0 ? 0 : strcmp(id, "bob") == 0 ? 1 : 2];
}

static char *json_of_entry(const struct readmodel_row *row, const struct ledger_event *ev)
{
	struct readmodel_entry e = readmodel_entry_of(row, ev, "2026-01-02T03:04:05.000006Z");
	return readmodel_entry_json(&e);
}

Test(readmodel_fold, a_known_sequence_gives_the_known_rows_bodies_and_totals)
{
	struct readmodel_row rows[3] = { 0 };
	struct readmodel_totals eur = { "EUR", { 0 } }, usd = { "USD", { 0 } };
	const struct readmodel_totals *totals[2] = { &usd, &eur };
	char *items[8] = { 0 }, *transfer = NULL, *body;
	size_t nitems = 0;

	for (size_t i = 0; i < sizeof(sequence) / sizeof(sequence[0]); i++) {
		struct readmodel_row *row = row_of(rows, sequence[i].account);
		struct ledger_event ev = sequence[i].ev;
		struct readmodel_change c;

		cr_assert(readmodel_fold(row, sequence[i].account, row->acc.version + 1, &ev, &c),
			  "event %zu", i);
		cr_assert_eq(c.opened, ev.type == LEDGER_ACCOUNT_OPENED);
		cr_assert_eq(c.transfer, ev.type == LEDGER_TRANSFER_SENT);
		cr_assert_eq(c.entry_type, readmodel_entry_type(ev.type));
		readmodel_count_add(strcmp(row->acc.currency, "EUR") == 0 ? &eur.count : &usd.count,
				    &c.totals);
		if (c.entry_type)
			items[nitems++] = json_of_entry(row, &ev);
		if (c.transfer) {
			struct readmodel_transfer t =
				readmodel_transfer_of(row, &ev, "2026-01-02T03:04:05.000006Z");
			transfer = readmodel_transfer_json(&t);
		}
	}
	/* The rows. */
	cr_assert_str_eq(rows[0].acc.id, "alice");
	cr_assert_str_eq(rows[0].name, "Alice");
	cr_assert_eq(rows[0].acc.balance, 200);
	cr_assert_eq(rows[0].acc.version, 4);
	cr_assert_eq(rows[0].entries, 3);
	cr_assert_eq(rows[1].acc.balance, 100);
	cr_assert_eq(rows[1].acc.version, 2);
	cr_assert_eq(rows[1].entries, 1);
	cr_assert_str_eq(rows[2].name, "Carol");
	cr_assert(rows[2].acc.closed);
	cr_assert_eq(rows[2].entries, 0);
	/* The statement items, in order, and the transfer. */
	cr_assert_eq(nitems, 4);
	cr_assert_str_eq(items[0], "{\"version\":2,\"type\":\"deposit\",\"amount\":500,"
				   "\"balance_after\":500,\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	cr_assert_str_eq(items[1], "{\"version\":3,\"type\":\"withdrawal\",\"amount\":200,"
				   "\"balance_after\":300,\"reference\":\"atm\","
				   "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	cr_assert_str_eq(items[2], "{\"version\":4,\"type\":\"transfer_out\",\"amount\":100,"
				   "\"balance_after\":200,\"transfer_id\":\"t-1\","
				   "\"counterparty\":\"bob\",\"reference\":\"rent\","
				   "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	cr_assert_str_eq(items[3], "{\"version\":2,\"type\":\"transfer_in\",\"amount\":100,"
				   "\"balance_after\":100,\"transfer_id\":\"t-1\","
				   "\"counterparty\":\"alice\",\"reference\":\"rent\","
				   "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	cr_assert_str_eq(transfer, "{\"transfer_id\":\"t-1\",\"from\":\"alice\",\"to\":\"bob\","
				   "\"amount\":100,\"currency\":\"EUR\",\"reference\":\"rent\","
				   "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	/* The account bodies. */
	{
		struct readmodel_account a = readmodel_account_of(&rows[0], "T1", "T4");
		body = readmodel_account_json(&a);
		cr_assert_str_eq(body,
				 "{\"account_id\":\"alice\",\"name\":\"Alice\",\"currency\":"
				 "\"EUR\",\"balance\":200,\"overdraft_limit\":100,\"status\":"
				 "\"open\",\"version\":4,\"opened_at\":\"T1\",\"updated_at\":\"T4\"}");
		free(body);
		a = readmodel_account_of(&rows[2], "T3", "T8");
		body = readmodel_account_json(&a);
		cr_assert(strstr(body, "\"status\":\"closed\""), "%s", body);
		free(body);
	}
	/* The totals, sorted by currency whatever the order given. */
	cr_assert_eq(eur.count.accounts, 2);
	cr_assert_eq(eur.count.open_accounts, 2);
	cr_assert(eur.count.balance_sum == 300);
	cr_assert_eq(usd.count.accounts, 1);
	cr_assert_eq(usd.count.open_accounts, 0);
	body = readmodel_totals_json_of(totals, 2);
	cr_assert_str_eq(body, "{\"currencies\":[{\"currency\":\"EUR\",\"accounts\":2,"
			       "\"open_accounts\":2,\"balance_sum\":300},{\"currency\":\"USD\","
			       "\"accounts\":1,\"open_accounts\":0,\"balance_sum\":0}]}");
	free(body);
	for (size_t i = 0; i < nitems; i++)
		free(items[i]);
	free(transfer);
}

Test(readmodel_fold, an_event_that_does_not_follow_or_apply_leaves_the_row_unchanged)
{
	struct readmodel_row row = { 0 }, before;
	struct ledger_event open = sequence[0].ev, again = sequence[0].ev;
	struct ledger_event deposit = { .type = LEDGER_FUNDS_DEPOSITED, .amount = 5 };
	struct readmodel_change c;

	cr_assert(readmodel_fold(&row, "alice", 1, &open, &c));
	before = row;
	cr_assert_not(readmodel_fold(&row, "alice", 3, &deposit, &c), "a version gap");
	cr_assert_not(readmodel_fold(&row, "alice", 1, &deposit, &c), "a version again");
	cr_assert_not(readmodel_fold(&row, "alice", 2, &again, &c), "a second AccountOpened");
	cr_assert_eq(memcmp(&row, &before, sizeof(row)), 0);
	cr_assert(readmodel_fold(&row, "alice", 2, &deposit, &c));
	cr_assert_eq(row.acc.balance, 5);
}

Test(readmodel_fold, totals_sums_beyond_int64_render_in_full)
{
	struct readmodel_totals t = { "EUR", { 3, 3, 0 } };
	const struct readmodel_totals *rows[1] = { &t };
	char *body;

	t.count.balance_sum = (__int128)INT64_MAX * 3;
	body = readmodel_totals_json_of(rows, 1);
	cr_assert_str_eq(body, "{\"currencies\":[{\"currency\":\"EUR\",\"accounts\":3,"
			       "\"open_accounts\":3,\"balance_sum\":27670116110564327421}]}");
	free(body);
	body = readmodel_totals_json_of(NULL, 0);
	cr_assert_str_eq(body, "{\"currencies\":[]}");
	free(body);
}

/* A result of text columns as libpq would give them; NULL values are SQL NULLs. */
static PGresult *result_of(const char *const *values, int n)
{
	PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
	PGresAttDesc *attrs = calloc((size_t)n, sizeof(*attrs));

	cr_assert(res && attrs);
	for (int i = 0; i < n; i++)
		attrs[i].name = "c";
	cr_assert(PQsetResultAttrs(res, n, attrs));
	for (int i = 0; i < n; i++)
		cr_assert(PQsetvalue(res, 0, i, (char *)values[i],
				     values[i] ? (int)strlen(values[i]) : -1));
	free(attrs);
	return res;
}

Test(readmodel_sql, the_columns_and_their_bodies)
{
	const char *account[9] = { "alice", "Alice", "EUR", "200", "100", "open", "4", "T1", "T4" };
	const char *entry[9] = { "skipped", "3",   "withdrawal",
				 "200",     "300", NULL,
				 NULL,      "atm", "2026-01-02T03:04:05.000006Z" };
	const char *transfer[7] = {
		"t-1", "alice", "bob", "100", "EUR", NULL, "2026-01-02T03:04:05.000006Z"
	};
	struct readmodel_account a;
	struct readmodel_entry e;
	struct readmodel_transfer t;
	PGresult *res;
	char *body;

	cr_assert_str_eq(READMODEL_SQL_ACCOUNT_COLUMNS("a"),
			 "a.account_id, a.name, a.currency, a.balance, a.overdraft_limit, a.status, "
			 "a.version, " READMODEL_SQL_TIME("a.opened_at") ", " READMODEL_SQL_TIME(
				 "a.updated_at"));
	cr_assert_str_eq(READMODEL_SQL_ENTRY_COLUMNS("e"),
			 "e.version, e.type, e.amount, e.balance_after, e.transfer_id, "
			 "e.counterparty, e.reference, " READMODEL_SQL_TIME("e.at"));
	cr_assert_str_eq(READMODEL_SQL_TRANSFER_COLUMNS("t"),
			 "t.transfer_id, t.from_account, t.to_account, t.amount, t.currency, "
			 "t.reference, " READMODEL_SQL_TIME("t.at"));

	res = result_of(account, 9);
	a = readmodel_account_from_pg(res, 0, 0);
	body = readmodel_account_json(&a);
	cr_assert_str_eq(body,
			 "{\"account_id\":\"alice\",\"name\":\"Alice\",\"currency\":"
			 "\"EUR\",\"balance\":200,\"overdraft_limit\":100,\"status\":"
			 "\"open\",\"version\":4,\"opened_at\":\"T1\",\"updated_at\":\"T4\"}");
	free(body);
	PQclear(res);

	res = result_of(entry, 9);
	e = readmodel_entry_from_pg(res, 0, 1);
	body = readmodel_entry_json(&e);
	cr_assert_str_eq(body, "{\"version\":3,\"type\":\"withdrawal\",\"amount\":200,"
			       "\"balance_after\":300,\"reference\":\"atm\","
			       "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	free(body);
	PQclear(res);

	res = result_of(transfer, 7);
	t = readmodel_transfer_from_pg(res, 0, 0);
	body = readmodel_transfer_json(&t);
	cr_assert_str_eq(body, "{\"transfer_id\":\"t-1\",\"from\":\"alice\",\"to\":\"bob\","
			       "\"amount\":100,\"currency\":\"EUR\",\"reference\":null,"
			       "\"at\":\"2026-01-02T03:04:05.000006Z\"}");
	free(body);
	PQclear(res);
}

/* The bodies appended to one buffer are the same bytes as the single ones, each at its
 * offset with its NUL, however the buffer grows; a body that cannot be made (a name
 * that is not UTF-8) leaves the buffer's text as it was. */
Test(readmodel_json, bodies_appended_to_one_buffer_are_the_single_bodies)
{
	struct readmodel_text text = { 0 };
	struct readmodel_account a = { .account_id = "alice",
				       .name = "Al\"ice\\ \xc3\xa9",
				       .currency = "EUR",
				       .status = "open",
				       .balance = -5,
				       .overdraft_limit = 10,
				       .version = 7,
				       .opened_at = "T1",
				       .updated_at = "T2" };
	struct readmodel_entry e = { .version = 7,
				     .type = "transfer_out",
				     .amount = 9,
				     .balance_after = -5,
				     .transfer_id = "t-1",
				     .counterparty = "bob",
				     .at = "T2" };
	struct readmodel_transfer t = { .transfer_id = "t-1",
					.from = "alice",
					.to = "bob",
					.amount = 9,
					.currency = "EUR",
					.at = "T2" };
	size_t at[300 * 3], len;
	char *single[3] = { readmodel_account_json(&a), readmodel_entry_json(&e),
			    readmodel_transfer_json(&t) };

	for (size_t i = 0; i < 300; i++) {
		at[3 * i] = readmodel_account_json_append(&text, &a);
		at[3 * i + 1] = readmodel_entry_json_append(&text, &e);
		at[3 * i + 2] = readmodel_transfer_json_append(&text, &t);
	}
	for (size_t i = 0; i < 300 * 3; i++) {
		cr_assert_neq(at[i], (size_t)-1);
		cr_assert_str_eq(text.p + at[i], single[i % 3], "body %zu", i);
		cr_assert_eq(i + 1 < 300 * 3 ? at[i + 1] : text.len,
			     at[i] + strlen(single[i % 3]) + 1);
	}
	len = text.len;
	a.name = "bad \xff";
	cr_assert_eq(readmodel_account_json_append(&text, &a), (size_t)-1);
	cr_assert_eq(text.len, len);
	cr_assert_str_eq(text.p + at[300 * 3 - 1], single[2]);
	text.len = 0; /* reused */
	cr_assert_eq(readmodel_entry_json_append(&text, &e), 0);
	cr_assert_str_eq(text.p, single[1]);
	for (int i = 0; i < 3; i++)
		free(single[i]);
	readmodel_text_free(&text);
	cr_assert_null(text.p);
}
