/* The read API through HTTP: every route of SPEC §4 from both read models, errors,
 * auth, read-your-writes, and Redis or PostgreSQL outages. The read models are filled
 * by hand here, following docs/read-models.md. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "readmodel.h"

#define SQL_POS "5.10"
#define REDIS_POS "7.20"

static char db[64];
static char redis_url[128];
static struct service svc, redis_svc;
static redisContext *rc;

static const char acct_a1[] =
	"{\"account_id\":\"a1\",\"name\":\"Alice \\\"A\\\" \xc3\x9cn\xc3\xaf"
	"code\",\"currency\":\"EUR\","
	"\"balance\":1500,\"overdraft_limit\":100,\"status\":\"open\",\"version\":3,"
	"\"opened_at\":\"2026-01-02T03:04:05.123456Z\",\"updated_at\":\"2026-01-02T03:05:00.000000Z\"}";
static const char item_a1_3[] =
	"{\"version\":3,\"type\":\"transfer_in\",\"amount\":500,\"balance_after\":1500,"
	"\"transfer_id\":\"t1\",\"counterparty\":\"b1\",\"at\":\"2026-01-02T03:05:00.000000Z\"}";
static const char item_a1_2[] =
	"{\"version\":2,\"type\":\"deposit\",\"amount\":1000,\"balance_after\":1000,"
	"\"reference\":\"salary\",\"at\":\"2026-01-02T03:04:06.000000Z\"}";
static const char xfer_t1[] =
	"{\"transfer_id\":\"t1\",\"from\":\"b1\",\"to\":\"a1\",\"amount\":500,\"currency\":\"EUR\","
	"\"reference\":null,\"at\":\"2026-01-02T03:05:00.000000Z\"}";
static const char totals[] =
	"{\"currencies\":[{\"currency\":\"EUR\",\"accounts\":2,\"open_accounts\":2,"
	"\"balance_sum\":1000},{\"currency\":\"USD\",\"accounts\":1,\"open_accounts\":0,"
	"\"balance_sum\":0}]}";

static void exec_sql(const char *q)
{
	PQclear(sql(db, q));
}

/* A Redis command on the test's private server; the test fails on an error reply. */
static void redis(const char *fmt, ...)
{
	va_list ap;
	redisReply *r;

	va_start(ap, fmt);
	r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	cr_assert(r, "redis: %s", rc->errstr);
	cr_assert(r->type != REDIS_REPLY_ERROR, "redis %s: %s", fmt, r->str);
	freeReplyObject(r);
}

static void setup_services(bool start_query)
{
	harness_db_create(db, sizeof(db));
	harness_start_redis(&redis_svc, false, redis_url, sizeof(redis_url));
	rc = harness_redis(redis_url);
	if (start_query)
		harness_start_query(&svc, db, redis_url);
}

static void setup(void)
{
	setup_services(true);
}

static void setup_without_query(void)
{
	setup_services(false);
}

static void teardown(void)
{
	harness_stop(&svc);
	if (rc)
		redisFree(rc);
	rc = NULL;
	harness_kill(&redis_svc);
}

TestSuite(query, .init = setup, .fini = teardown, .timeout = 60);

/* The same state in both models; Redis's generation 1 is not live until go_live(). */
static void fill_sql(void)
{
	exec_sql("INSERT INTO rm_accounts VALUES ('a1', 'Alice \"A\" \xc3\x9cn\xc3\xaf"
		 "code', 'EUR', 1500, "
		 "100, 'open', 3, 2, '2026-01-02 03:04:05.123456+00', '2026-01-02 03:05:00+00'),"
		 "('b1', 'Bob', 'EUR', -500, 1000, 'open', 2, 1, '2026-01-02 03:00:00+00',"
		 " '2026-01-02 03:05:00+00')");
	exec_sql(
		"INSERT INTO rm_entries VALUES"
		" ('a1', 2, 'deposit', 1000, 1000, NULL, NULL, 'salary', '2026-01-02 03:04:06+00'),"
		" ('a1', 3, 'transfer_in', 500, 1500, 't1', 'b1', NULL, '2026-01-02 03:05:00+00'),"
		" ('b1', 2, 'transfer_out', 500, -500, 't1', 'a1', NULL, '2026-01-02 03:05:00+00')");
	/* The SQL model of transfers is the log's (sql/017): b1's opening (the currency) and
	 * its TransferSent, both covered by the checkpoint below. */
	exec_sql("INSERT INTO events (txid, stream, version, type, data, metadata, recorded_at) "
		 "VALUES ('3', 'account-b1', 1, 'AccountOpened', '{\"account_id\":\"b1\","
		 "\"name\":\"Bob\",\"currency\":\"EUR\",\"overdraft_limit\":1000}', '{}', "
		 "'2026-01-02 03:00:00+00'), ('3', 'account-b1', 2, 'TransferSent', "
		 "'{\"transfer_id\":\"t1\",\"to\":\"a1\",\"amount\":500}', '{}', "
		 "'2026-01-02 03:05:00+00')");
	exec_sql("INSERT INTO rm_totals VALUES ('USD', 1, 0, 0), ('EUR', 2, 2, 1000)");
	exec_sql(
		"UPDATE projection_checkpoints SET txid = '5', position = 10 WHERE projection = 'sql'");
}

static void fill_redis(void)
{
	redis("SET dbk:g:1:checkpoint %s", REDIS_POS);
	redis("HSET dbk:g:1:acct:a1 v 3 n 2 j %s", acct_a1);
	redis("LPUSH dbk:g:1:stmt:a1 %s %s", item_a1_2, item_a1_3); /* newest first */
	redis("SET dbk:g:1:xfer:t1 %s", xfer_t1);
	redis("HSET dbk:g:1:totals p %s j %s", REDIS_POS, totals);
}

/* Live, as the projector would make it: built from this event store (its identity). */
static void go_live(void)
{
	PGresult *r = sql(db, READMODEL_IDENTITY_SQL);

	redis("SET dbk:g:1:identity %s", PQgetvalue(r, 0, 0));
	PQclear(r);
	redis("SET " READMODEL_LIVE_KEY " 1");
}

static struct response get_as(const char *token, const char *path, const char *extra_header)
{
	char auth[128];
	const char *headers[3] = { auth, extra_header, NULL };

	if (!token)
		return http_request(svc.port, "GET", path, headers + 1, NULL, 20);
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
	return http_request(svc.port, "GET", path, headers, NULL, 20);
}

static struct response get(const char *path)
{
	return get_as(TOKEN_READ, path, NULL);
}

static void expect_header(const struct response *r, const char *name, const char *value)
{
	char h[256];

	cr_assert(response_header(r, name, h, sizeof(h)), "no %s header in\n%s", name, r->headers);
	cr_assert_str_eq(h, value, "%s: %s, expected %s", name, h, value);
}

/* 200 with exactly `body` (if given), served at position `pos`. */
static void expect_ok(const struct response *r, const char *body, const char *pos)
{
	cr_assert_eq(r->status, 200, "expected 200, got %d: %s", r->status, r->body ? r->body : "");
	expect_header(r, "Content-Type", "application/json");
	expect_header(r, "X-Daybook-Position", pos);
	if (body)
		cr_assert_str_eq(r->body, body);
}

static void expect_problem(const struct response *r, int status, const char *code)
{
	cr_assert_eq(r->status, status, "expected %d, got %d: %s", status, r->status,
		     r->body ? r->body : "");
	expect_header(r, "Content-Type", "application/problem+json");
	cr_assert_str_eq(json_string_value(json_object_get(r->json, "code")), code, "body: %s",
			 r->body);
	cr_assert_eq(json_integer_value(json_object_get(r->json, "status")), status);
	if (status == 503) {
		char h[32];
		cr_assert(response_header(r, "Retry-After", h, sizeof(h)),
			  "503 without Retry-After");
	}
}

/* GET path: 200 with `body` (NULL: any) at position `pos`. */
static void check(const char *path, const char *body, const char *pos)
{
	struct response r = get(path);

	expect_ok(&r, body, pos);
	response_free(&r);
}

static void check_problem(const char *path, int status, const char *code, const char *detail_has)
{
	struct response r = get(path);
	const char *detail;

	expect_problem(&r, status, code);
	detail = json_string_value(json_object_get(r.json, "detail"));
	if (detail_has)
		cr_assert(detail && strstr(detail, detail_has), "%s: detail '%s' should name '%s'",
			  path, detail, detail_has);
	response_free(&r);
}

static double fallbacks(const char *reason)
{
	char name[128];

	snprintf(name, sizeof(name), "daybook_query_redis_fallbacks_total{reason=\"%s\"}", reason);
	return harness_metric(&svc, name);
}

/* --- each route from each model ------------------------------------------------------ */

Test(query, account_from_sql_when_redis_has_no_live_generation)
{
	struct response r;

	fill_sql();
	fill_redis(); /* filled, but not live: readers must not use it */
	r = get("/accounts/a1");
	expect_ok(&r, acct_a1, SQL_POS);
	expect_header(&r, "ETag", "\"3\"");
	response_free(&r);
	cr_assert_geq(fallbacks("no_live"), 1);
}

/* A migration that changes a column the statements return (006 made the keys
 * COLLATE "C") makes PostgreSQL refuse the statements prepared before it: the service
 * prepares them again and answers, without a restart. */
Test(query, a_migration_that_changes_a_returned_column_needs_no_restart)
{
	struct response r;
	double end = harness_now() + 10;

	fill_sql();
	r = get("/accounts/a1");
	expect_ok(&r, acct_a1, SQL_POS);
	response_free(&r);
	exec_sql("ALTER TABLE rm_accounts ALTER COLUMN name TYPE text COLLATE \"POSIX\"");
	for (;; usleep(50000)) {
		r = get("/accounts/a1");
		if (r.status == 200)
			break;
		cr_assert(harness_now() < end, "still %d after the migration", r.status);
		response_free(&r);
	}
	expect_ok(&r, acct_a1, SQL_POS);
	response_free(&r);
}

Test(query, account_from_redis_with_etag_and_its_checkpoint)
{
	/* Every read goes to Redis's scripts here: no read cache in front of them. */
	const char *no_cache[] = { "DAYBOOK_QUERY_CACHE_BYTES", "0", NULL };
	struct response r;

	harness_stop(&svc);
	harness_start_query_env(&svc, db, redis_url, no_cache);
	fill_sql();
	fill_redis();
	go_live();
	r = get("/accounts/a1");
	expect_ok(&r, acct_a1, REDIS_POS);
	expect_header(&r, "ETag", "\"3\"");
	{ /* built by http.c, not evhttp: the body's length, and the date (IMF-fixdate) */
		char h[64], len[24];
		struct tm tm = { 0 };
		snprintf(len, sizeof(len), "%zu", strlen(acct_a1));
		expect_header(&r, "Content-Length", len);
		cr_assert(response_header(&r, "Date", h, sizeof(h)), "%s", r.headers);
		cr_assert(strptime(h, "%a, %d %b %Y %H:%M:%S GMT", &tm) && strlen(h) == 29, "%s",
			  h);
	}
	response_free(&r);
	cr_assert_eq(harness_metric(&svc, "daybook_query_reads_total{model=\"redis\"}"), 1);
	/* Redis forgot its scripts: the read is retried with EVAL, still from Redis. */
	redis("SCRIPT FLUSH");
	check("/accounts/a1", acct_a1, REDIS_POS);
	check("/accounts/a1", acct_a1, REDIS_POS);
	cr_assert_eq(harness_metric(&svc, "daybook_query_reads_total{model=\"redis\"}"), 3);
}

/* A read with an ETag answers a conditional GET (or HEAD) whose tag still matches with
 * 304 and no body, from either model. */
Test(query, if_none_match_with_the_current_etag_is_304_without_a_body)
{
	static const char *const matching[] = { "If-None-Match: \"3\"", "If-None-Match: W/\"3\"",
						"If-None-Match: \"1\", \"3\"", "If-None-Match: *" };
	struct response r;

	fill_sql();
	for (int model = 0; model < 2; model++) {
		if (model == 1) {
			fill_redis();
			go_live();
		}
		for (size_t i = 0; i < sizeof(matching) / sizeof(matching[0]); i++) {
			r = get_as(TOKEN_READ, "/accounts/a1", matching[i]);
			cr_assert_eq(r.status, 304, "%s: %d %s", matching[i], r.status, r.body);
			cr_assert(r.body == NULL || r.body[0] == '\0', "a 304 has no body: %s",
				  r.body);
			expect_header(&r, "ETag", "\"3\"");
			response_free(&r);
		}
		r = get_as(TOKEN_READ, "/accounts/a1", "If-None-Match: \"2\"");
		expect_ok(&r, acct_a1, model == 0 ? SQL_POS : REDIS_POS);
		response_free(&r);
	}
}

Test(query, both_models_serve_byte_identical_bodies)
{
	static const char *const paths[] = {
		"/accounts/a1",
		"/accounts/a1/transactions",
		"/accounts/a1/transactions?limit=1",
		"/accounts/a1/transactions?limit=1&before=3",
		"/accounts/a1/transactions?before=2",
		"/transfers/t1",
		"/totals",
	};
	struct response from_sql[sizeof(paths) / sizeof(paths[0])];

	fill_sql();
	fill_redis();
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		from_sql[i] = get(paths[i]);
		expect_ok(&from_sql[i], NULL, SQL_POS);
	}
	go_live();
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		struct response r = get(paths[i]);
		expect_ok(&r, NULL, REDIS_POS);
		cr_assert_str_eq(r.body, from_sql[i].body, "%s differs:\nredis %s\nsql   %s",
				 paths[i], r.body, from_sql[i].body);
		response_free(&r);
		response_free(&from_sql[i]);
	}
}

Test(query, transactions_newest_first_with_optional_keys_and_next_before)
{
	char body[1024];

	fill_sql();
	snprintf(body, sizeof(body), "{\"items\":[%s,%s],\"next_before\":null}", item_a1_3,
		 item_a1_2);
	check("/accounts/a1/transactions", body, SQL_POS);
	snprintf(body, sizeof(body), "{\"items\":[%s],\"next_before\":3}", item_a1_3);
	check("/accounts/a1/transactions?limit=1", body, SQL_POS);
	snprintf(body, sizeof(body), "{\"items\":[%s],\"next_before\":null}", item_a1_2);
	check("/accounts/a1/transactions?limit=1&before=3", body, SQL_POS);
	check("/accounts/a1/transactions?before=2", "{\"items\":[],\"next_before\":null}", SQL_POS);
	/* Unknown query parameters are refused, never ignored (test_http_edge.c). */
	struct response r = get("/accounts/a1/transactions?limit=1&before=3&colour=red");
	expect_problem(&r, 400, "invalid_request");
	response_free(&r);
}

/* Statement item of account c1 at version v (entries v = 2..61, see fill_long_statement). */
static int item_c1(char *out, size_t len, int v)
{
	int s = v - 1;
	return snprintf(out, len,
			"{\"version\":%d,\"type\":\"deposit\",\"amount\":10,\"balance_after\":%d,"
			"\"at\":\"2026-01-01T00:%02d:%02d.000000Z\"}",
			v, s * 10, s / 60, s % 60);
}

/* c1 has 60 entries (versions 2..61); Redis keeps the newest 50 (12..61). */
static void fill_long_statement(void)
{
	char item[256];

	exec_sql("INSERT INTO rm_accounts VALUES ('c1', 'Carol', 'USD', 600, 0, 'open', 61, 60,"
		 " '2026-01-01 00:00:00+00', '2026-01-01 00:01:00+00')");
	exec_sql(
		"INSERT INTO rm_entries SELECT 'c1', s + 1, 'deposit', 10, s * 10, NULL, NULL, NULL,"
		" timestamptz '2026-01-01 00:00:00+00' + s * interval '1 second'"
		" FROM generate_series(1, 60) s");
	exec_sql(
		"UPDATE projection_checkpoints SET txid = '5', position = 10 WHERE projection = 'sql'");
	redis("SET dbk:g:1:checkpoint %s", REDIS_POS);
	redis("HSET dbk:g:1:acct:c1 v 61 n 60 j {}");
	for (int v = 12; v <= 61; v++) {
		item_c1(item, sizeof(item), v);
		redis("LPUSH dbk:g:1:stmt:c1 %s", item);
	}
}

/* {"items":[from..to],"next_before":next} for c1. */
static void c1_page(char *out, size_t len, int from, int to, int next)
{
	size_t n = (size_t)snprintf(out, len, "{\"items\":[");

	for (int v = from; v >= to; v--) {
		n += (size_t)item_c1(out + n, len - n, v);
		if (v > to)
			out[n++] = ',';
	}
	if (next)
		snprintf(out + n, len - n, "],\"next_before\":%d}", next);
	else
		snprintf(out + n, len - n, "],\"next_before\":null}");
}

Test(query, transactions_beyond_redis_newest_50_come_from_sql)
{
	static char page[16384];
	struct response sql_first;

	fill_long_statement();
	c1_page(page, sizeof(page), 61, 12, 12);
	sql_first = get("/accounts/c1/transactions");
	expect_ok(&sql_first, page, SQL_POS);
	go_live();
	check("/accounts/c1/transactions", page, REDIS_POS);
	check("/accounts/c1/transactions?limit=50", page, REDIS_POS);
	c1_page(page, sizeof(page), 61, 52, 52);
	check("/accounts/c1/transactions?limit=10", page, REDIS_POS);
	/* Pages Redis cannot hold: older than its window, or longer than 50. */
	c1_page(page, sizeof(page), 11, 2, 0);
	check("/accounts/c1/transactions?before=12", page, SQL_POS);
	c1_page(page, sizeof(page), 29, 20, 20);
	check("/accounts/c1/transactions?limit=10&before=30", page, SQL_POS);
	c1_page(page, sizeof(page), 61, 11, 11);
	check("/accounts/c1/transactions?limit=51", page, SQL_POS);
	cr_assert_geq(fallbacks("not_cached"), 3, "%f", fallbacks("not_cached"));
	response_free(&sql_first);
}

Test(query, transfer_and_totals_from_both_models)
{
	fill_sql();
	fill_redis();
	check("/transfers/t1", xfer_t1, SQL_POS);
	check("/totals", totals, SQL_POS);
	go_live();
	check("/transfers/t1", xfer_t1, REDIS_POS);
	check("/totals", totals, REDIS_POS);
}

/* The SQL model of transfers reads the log, but shows a transfer only once the SQL
 * checkpoint covers its event in reader order ((txid, position)), as when the projector
 * wrote its row: a read served from SQL never shows what its position does not cover. */
Test(query, the_sql_model_shows_a_transfer_only_once_its_checkpoint_covers_it)
{
	static const char t2[] =
		"{\"transfer_id\":\"t2\",\"from\":\"b1\",\"to\":\"a1\",\"amount\":7,"
		"\"currency\":\"EUR\",\"reference\":\"late\",\"at\":\"2026-01-02T04:00:00.000000Z\"}";
	static const char t3[] =
		"{\"transfer_id\":\"t3\",\"from\":\"b1\",\"to\":\"a1\",\"amount\":8,"
		"\"currency\":\"EUR\",\"reference\":null,\"at\":\"2026-01-02T04:01:00.000000Z\"}";
	struct response r;
	char pos[64];

	fill_sql(); /* the SQL checkpoint is 5.10; no live Redis: reads come from SQL */
	/* t2 in the checkpoint's transaction but after it; t3 at a later position of an
	 * earlier transaction, which reader order puts before the checkpoint. */
	exec_sql("INSERT INTO events (position, txid, stream, version, type, data, metadata, "
		 "recorded_at) OVERRIDING SYSTEM VALUE VALUES (1000, '5', 'account-b1', 3, "
		 "'TransferSent', '{\"transfer_id\":\"t2\",\"to\":\"a1\",\"amount\":7,"
		 "\"reference\":\"late\"}', '{}', '2026-01-02 04:00:00+00'), (1001, '4', "
		 "'account-b1', 4, 'TransferSent', '{\"transfer_id\":\"t3\",\"to\":\"a1\","
		 "\"amount\":8}', '{}', '2026-01-02 04:01:00+00')");
	r = get("/transfers/t2");
	expect_problem(&r, 404, "transfer_not_found");
	expect_header(&r, "X-Daybook-Position", SQL_POS);
	response_free(&r);
	check("/transfers/t3", t3, SQL_POS);
	check("/transfers/t1", xfer_t1, SQL_POS);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM rm_transfers"), 2);

	/* Once the checkpoint reaches its event, it is there. */
	exec_sql("UPDATE projection_checkpoints SET position = 1000 WHERE projection = 'sql'");
	snprintf(pos, sizeof(pos), "5.1000");
	check("/transfers/t2", t2, pos);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM rm_transfers"), 3);
}

Test(query, totals_beyond_int64_and_empty)
{
	check("/totals", "{\"currencies\":[]}", "0.0");
	exec_sql("INSERT INTO rm_totals VALUES ('EUR', 3, 3, 27670116110564327421)");
	check("/totals",
	      "{\"currencies\":[{\"currency\":\"EUR\",\"accounts\":3,\"open_accounts\":3,"
	      "\"balance_sum\":27670116110564327421}]}",
	      "0.0");
}

Test(query, redis_miss_falls_back_to_sql)
{
	fill_sql();
	fill_redis(); /* b1 is only in SQL */
	go_live();
	check("/accounts/b1", NULL, SQL_POS);
	cr_assert_geq(fallbacks("miss"), 1);
}

/* --- the event store --------------------------------------------------------------- */

static void append_events(void)
{
	exec_sql(
		"INSERT INTO events (stream, version, type, data, metadata) VALUES"
		" ('account-e1', 1, 'AccountOpened', '{\"account_id\":\"e1\",\"name\":\"Eve\","
		"\"currency\":\"EUR\",\"overdraft_limit\":0}', '{\"request_id\":\"r1\",\"token_id\":\"w\"}'),"
		" ('account-e1', 2, 'FundsDeposited', '{\"amount\":1000000000000000,\"reference\":null}',"
		" '{\"request_id\":\"r2\",\"token_id\":\"w\"}'),"
		" ('account-e1', 3, 'FundsWithdrawn', '{\"amount\":5,\"reference\":\"atm\"}',"
		" '{\"request_id\":\"r3\",\"token_id\":\"w\"}')");
}

Test(query, events_of_an_account_from_the_event_store)
{
	struct response r;
	json_t *events, *e;
	char pos[64], path[256];
	PGresult *last;

	append_events();
	last = sql(db,
		   "SELECT txid::text || '.' || position FROM events ORDER BY position DESC LIMIT 1");
	snprintf(pos, sizeof(pos), "%s", PQgetvalue(last, 0, 0));
	PQclear(last);
	/* The event store's position is its last event below the snapshot's xmin, which
	 * write transactions elsewhere in the cluster may hold back for a moment. */
	snprintf(path, sizeof(path), "/accounts/e1/events?min_position=%s&wait_ms=10000", pos);
	r = get(path);
	expect_ok(&r, NULL, pos);
	events = json_object_get(r.json, "events");
	cr_assert_eq(json_array_size(events), 3, "%s", r.body);
	e = json_array_get(events, 0);
	cr_assert_eq(json_integer_value(json_object_get(e, "version")), 1);
	cr_assert_str_eq(json_string_value(json_object_get(e, "type")), "AccountOpened");
	cr_assert_str_eq(json_string_value(json_object_get(json_object_get(e, "data"), "name")),
			 "Eve");
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_object_get(e, "metadata"), "request_id")),
			 "r1");
	cr_assert_eq(strlen(json_string_value(json_object_get(e, "recorded_at"))), 27);
	e = json_array_get(events, 1);
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(e, "data"), "amount")),
		     1000000000000000LL);
	cr_assert(json_is_null(json_object_get(json_object_get(e, "data"), "reference")));
	response_free(&r);

	snprintf(path, sizeof(path), "/accounts/e1/events?after_version=1&limit=1&min_position=%s",
		 pos);
	r = get(path);
	expect_ok(&r, NULL, pos);
	events = json_object_get(r.json, "events");
	cr_assert_eq(json_array_size(events), 1, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(json_array_get(events, 0), "version")), 2);
	response_free(&r);

	snprintf(path, sizeof(path), "/accounts/e1/events?after_version=3&min_position=%s", pos);
	r = get(path);
	expect_ok(&r, "{\"events\":[]}", pos);
	response_free(&r);
}

/* --- errors ------------------------------------------------------------------------ */

Test(query, unknown_ids_are_404_from_either_model)
{
	fill_sql();
	fill_redis();
	for (int live = 0; live < 2; live++) {
		if (live)
			go_live();
		check_problem("/accounts/nope", 404, "account_not_found", "nope");
		check_problem("/accounts/nope/transactions", 404, "account_not_found", NULL);
		check_problem("/accounts/nope/events", 404, "account_not_found", NULL);
		check_problem("/transfers/nope", 404, "transfer_not_found", "nope");
	}
	{
		struct response r = get("/accounts/nope");
		expect_header(&r, "X-Daybook-Position", SQL_POS);
		response_free(&r);
	}
}

Test(query, malformed_ids_and_parameters_are_400_naming_them)
{
	static const struct {
		const char *path, *names;
	} cases[] = {
		{ "/accounts/a%20b", "account id" },
		{ "/accounts/a!b/transactions", "account id" },
		{ "/accounts/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		  "account id" },
		{ "/transfers/t%2F1", "transfer id" },
		{ "/accounts/a1/transactions?limit=0", "limit" },
		{ "/accounts/a1/transactions?limit=501", "limit" },
		{ "/accounts/a1/transactions?limit=abc", "limit" },
		{ "/accounts/a1/transactions?limit=-1", "limit" },
		{ "/accounts/a1/transactions?limit=", "limit" },
		{ "/accounts/a1/transactions?limit=1.5", "limit" },
		{ "/accounts/a1/transactions?before=0", "before" },
		{ "/accounts/a1/transactions?before=x", "before" },
		{ "/accounts/a1/transactions?before=99999999999", "before" },
		{ "/accounts/a1/events?limit=0", "limit" },
		{ "/accounts/a1/events?limit=1001", "limit" },
		{ "/accounts/a1/events?after_version=-1", "after_version" },
		{ "/accounts/a1?wait_ms=abc", "wait_ms" },
		{ "/accounts/a1?wait_ms=10001", "wait_ms" },
		{ "/accounts/a1?min_position=abc", "min_position" },
		{ "/accounts/a1?min_position=1.", "min_position" },
		{ "/accounts/a1?min_position=.1", "min_position" },
		{ "/accounts/a1?min_position=1.2.3", "min_position" },
		{ "/accounts/a1?min_position=-1.2", "min_position" },
		{ "/accounts/a1?min_position=99999999999999999999.1", "min_position" },
		{ "/totals?min_position=", "min_position" },
		{ "/transfers/t1?min_position=1%202", "min_position" },
	};

	fill_sql();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		check_problem(cases[i].path, 400, "invalid_request", cases[i].names);
}

Test(query, malformed_min_position_header_is_400)
{
	struct response r = get_as(TOKEN_READ, "/accounts/a1", "X-Daybook-Min-Position: soon");

	expect_problem(&r, 400, "invalid_request");
	cr_assert(strstr(json_string_value(json_object_get(r.json, "detail")),
			 "X-Daybook-Min-Position"));
	response_free(&r);
}

Test(query, reads_need_a_read_token)
{
	struct response r;

	fill_sql();
	r = get_as(NULL, "/accounts/a1", NULL);
	expect_problem(&r, 401, "unauthorized");
	response_free(&r);
	r = get_as("not-a-token", "/totals", NULL);
	expect_problem(&r, 401, "unauthorized");
	response_free(&r);
	r = get_as(TOKEN_WRITE, "/accounts/a1", NULL);
	expect_problem(&r, 403, "forbidden");
	response_free(&r);
	r = get_as(TOKEN_ADMIN, "/accounts/a1", NULL); /* admin holds read too */
	expect_ok(&r, acct_a1, SQL_POS);
	response_free(&r);
	/* The server remembers the last secret that matched (http.c): a secret of the same
	 * length differing in one byte is still unknown, and each token keeps its scopes. */
	const char *in_turn[] = { TOKEN_READ, "test-read-tokeN", TOKEN_WRITE, TOKEN_READ };
	for (size_t i = 0; i < sizeof(in_turn) / sizeof(in_turn[0]); i++) {
		r = get_as(in_turn[i], "/accounts/a1", NULL);
		if (i == 0 || i == 3)
			expect_ok(&r, acct_a1, SQL_POS);
		else
			expect_problem(&r, i == 1 ? 401 : 403,
				       i == 1 ? "unauthorized" : "forbidden");
		response_free(&r);
	}
	/* Probes and metrics are public. */
	cr_assert(harness_wait_status(&svc, "/healthz", 200, 1));
	cr_assert(harness_wait_status(&svc, "/readyz", 200, 1));
	cr_assert_geq(harness_metric(&svc, "daybook_query_reads_total{model=\"sql\"}"), 1);
}

Test(query, wrong_method_is_405)
{
	struct response r = http_request(svc.port, "POST", "/accounts/a1", NULL, "{}", 5);
	char allow[64];

	expect_problem(&r, 405, "method_not_allowed");
	cr_assert(response_header(&r, "Allow", allow, sizeof(allow)));
	cr_assert_str_eq(allow, "GET, HEAD");
	response_free(&r);
}

/* --- read-your-writes --------------------------------------------------------------- */

Test(query, min_position_already_reached_answers_at_once)
{
	struct response r;

	fill_sql();
	check("/accounts/a1?min_position=5.10", acct_a1, SQL_POS);
	check("/accounts/a1?min_position=4.99", acct_a1, SQL_POS);
	check("/accounts/a1?min_position=0.0", acct_a1, SQL_POS);
	r = get_as(TOKEN_READ, "/accounts/a1/transactions", "X-Daybook-Min-Position: 5.9");
	expect_ok(&r, NULL, SQL_POS);
	response_free(&r);
}

Test(query, redis_ahead_answers_while_sql_is_behind)
{
	fill_sql();
	fill_redis();
	go_live();
	/* Redis (7.20) has reached it, SQL (5.10) has not. */
	check("/accounts/a1?min_position=6.0", acct_a1, REDIS_POS);
	check("/totals?min_position=7.20", totals, REDIS_POS);
}

Test(query, redis_behind_min_position_yields_to_sql)
{
	fill_sql();
	fill_redis();
	go_live();
	redis("SET dbk:g:1:checkpoint 3.0");
	check("/accounts/a1?min_position=4.0", acct_a1, SQL_POS);
	check("/transfers/t1?min_position=4.0", xfer_t1, SQL_POS);
	cr_assert_geq(fallbacks("behind"), 2);
	/* Without min_position Redis answers, at its own position. */
	check("/accounts/a1", acct_a1, "3.0");
}

Test(query, both_models_behind_is_503_projection_behind_after_wait_ms)
{
	struct response r;
	double t0;

	fill_sql();
	fill_redis();
	go_live();
	t0 = harness_now();
	r = get("/accounts/a1?min_position=8.0&wait_ms=300");
	expect_problem(&r, 503, "projection_behind");
	cr_assert_geq(harness_now() - t0, 0.29);
	response_free(&r);
	r = get("/accounts/a1?min_position=8.0&wait_ms=0");
	expect_problem(&r, 503, "projection_behind");
	response_free(&r);
}

struct background {
	pthread_t thread;
	const char *path;
	struct response r;
	atomic_bool done;
};

static void *background_get(void *arg)
{
	struct background *bg = arg;

	bg->r = get(bg->path);
	atomic_store(&bg->done, true);
	return NULL;
}

static void start_background(struct background *bg, const char *path)
{
	bg->path = path;
	atomic_init(&bg->done, false);
	cr_assert_eq(pthread_create(&bg->thread, NULL, background_get, bg), 0);
}

static void join_background(struct background *bg)
{
	pthread_join(bg->thread, NULL);
}

/* Wait (deadline 20 s) until `n` reads wait in svc's waiting room. */
static void wait_for_waiters(const struct service *s, double n)
{
	cr_assert(harness_wait_metric(s, "daybook_query_waiting_reads", n, harness_now() + 20),
		  "%g reads wait, expected %g", harness_metric(s, "daybook_query_waiting_reads"),
		  n);
}

Test(query, waits_for_the_sql_checkpoint_then_answers)
{
	struct background bg;

	fill_sql();
	start_background(&bg, "/accounts/a1?min_position=6.0&wait_ms=5000");
	wait_for_waiters(&svc, 1);
	cr_assert_not(atomic_load(&bg.done), "answered before the checkpoint reached 6.0");
	exec_sql(
		"UPDATE projection_checkpoints SET txid = '6', position = 0 WHERE projection = 'sql'");
	join_background(&bg);
	expect_ok(&bg.r, acct_a1, "6.0");
	response_free(&bg.r);
}

Test(query, waits_for_redis_then_answers_from_it)
{
	struct background bg;

	fill_sql();
	fill_redis();
	go_live();
	start_background(&bg, "/transfers/t1?min_position=8.0&wait_ms=5000");
	wait_for_waiters(&svc, 1);
	cr_assert_not(atomic_load(&bg.done), "answered before Redis reached 8.0");
	redis("SET dbk:g:1:checkpoint 8.0");
	redis("PUBLISH dbk:position %s", "1 8.0");
	join_background(&bg);
	expect_ok(&bg.r, xfer_t1, "8.0");
	response_free(&bg.r);
}

/* --- the waiting room: woken by messages, one probe, a cap ---------------------------- */

/* The SQL checkpoint moves to `pos` as the projector moves it: with its NOTIFY in
 * the same transaction (or, with `notify` false, a notification that was lost). */
static void move_sql_checkpoint(const char *txid, const char *position, bool notify)
{
	char q[512];
	int n = snprintf(q, sizeof(q),
			 "BEGIN; UPDATE projection_checkpoints SET txid = '%s', position = %s"
			 " WHERE projection = 'sql';",
			 txid, position);

	if (notify)
		n += snprintf(q + n, sizeof(q) - (size_t)n,
			      " SELECT pg_notify('" READMODEL_POSITION_CHANNEL "', '%s.%s');", txid,
			      position);
	snprintf(q + n, sizeof(q) - (size_t)n, " COMMIT");
	exec_sql(q);
}

/* A position message wakes the few reads it would satisfy at once, before any probe
 * (a round trip less between the projector's Redis write and the answer); a claim
 * that Redis has not made good sends the read back to waiting, with no SQL read. */
Test(query, a_position_message_wakes_a_lone_waiting_read_before_the_probe)
{
	static const char hinted[] = "daybook_query_hinted_wakes_total";
	static const char behind[] = "daybook_query_redis_fallbacks_total{reason=\"behind\"}";
	struct background bg;
	double h0, f0, end;

	fill_sql();
	fill_redis();
	go_live();
	start_background(&bg, "/transfers/t1?min_position=8.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	h0 = harness_metric(&svc, hinted);
	f0 = harness_metric(&svc, behind);
	cr_assert_geq(h0, 0, "no %s", hinted);
	/* A false claim (another deployment's, say): Redis is still at its checkpoint. */
	redis("PUBLISH dbk:position %s", "1 9.0");
	for (end = harness_now() + 10; harness_metric(&svc, hinted) < h0 + 1; usleep(10000))
		cr_assert(harness_now() < end, "the message woke no waiting read");
	wait_for_waiters(&svc, 1);
	cr_assert_not(atomic_load(&bg.done), "answered on a claim Redis had not made good: %d %s",
		      bg.r.status, bg.r.body ? bg.r.body : "");
	cr_assert_eq(harness_metric(&svc, behind), f0, "a false claim made the read go to SQL");
	/* The real move. */
	redis("SET dbk:g:1:checkpoint 8.0");
	redis("PUBLISH dbk:position %s", "1 8.0");
	join_background(&bg);
	expect_ok(&bg.r, xfer_t1, "8.0");
	response_free(&bg.r);
	cr_assert_geq(harness_metric(&svc, hinted), h0 + 2);
}

Test(query, waiting_reads_beyond_the_cap_get_503_too_many_waiters_at_once,
     .init = setup_without_query)
{
	struct background bg[3];
	struct response r;
	double t0;

	setenv("DAYBOOK_MAX_WAITERS", "3", 1);
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	for (int i = 0; i < 3; i++)
		start_background(&bg[i], "/accounts/a1?min_position=6.0&wait_ms=10000");
	wait_for_waiters(&svc, 3);
	t0 = harness_now();
	r = get("/accounts/a1?min_position=6.0&wait_ms=10000");
	expect_problem(&r, 503, "too_many_waiters");
	/* At once: long before the 10 s the waiters were willing to wait. */
	cr_assert_lt(harness_now() - t0, 5.0, "the read over the cap waited");
	response_free(&r);
	check("/accounts/a1", acct_a1, SQL_POS); /* reads that need not wait still pass */
	move_sql_checkpoint("6", "0", true);
	for (int i = 0; i < 3; i++) {
		join_background(&bg[i]);
		expect_ok(&bg[i].r, acct_a1, "6.0");
		response_free(&bg[i].r);
	}
	/* Their places are given back. */
	start_background(&bg[0], "/accounts/a1?min_position=7.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	move_sql_checkpoint("7", "0", true);
	join_background(&bg[0]);
	expect_ok(&bg[0].r, acct_a1, "7.0");
	response_free(&bg[0].r);
}

Test(query, a_notification_wakes_waiting_reads_without_any_polling, .init = setup_without_query)
{
	struct background acct, events;
	char head[64], path[256];
	unsigned long long txid;

	setenv("DAYBOOK_WAIT_PROBE_MS", "600000", 1); /* no safety probe within the test */
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	harness_log_head(db, head, sizeof(head));
	txid = strtoull(head, NULL, 10);
	/* Any transaction that appends from now on has a larger txid. */
	snprintf(path, sizeof(path), "/accounts/e1/events?min_position=%llu.0&wait_ms=10000",
		 txid + 1);
	start_background(&acct, "/accounts/a1?min_position=6.0&wait_ms=10000");
	start_background(&events, path);
	wait_for_waiters(&svc, 2);
	move_sql_checkpoint("6", "0", true);
	join_background(&acct);
	expect_ok(&acct.r, acct_a1, "6.0");
	response_free(&acct.r);
	append_events(); /* the event store's NOTIFY on append */
	/* The log head is the last event below every running transaction's xid: other
	 * tests' transactions may hold it back past the append's own notification, so the
	 * hint is repeated (as the next append would) until the read is answered. */
	while (!atomic_load(&events.done)) {
		exec_sql("NOTIFY daybook_events");
		usleep(100000);
	}
	join_background(&events);
	cr_assert_eq(events.r.status, 200, "%d %s", events.r.status, events.r.body);
	cr_assert_eq(json_array_size(json_object_get(events.r.json, "events")), 3, "%s",
		     events.r.body);
	response_free(&events.r);
}

/* How many of the query service's sessions last ran a statement starting with `what`. */
static int query_sessions_last_running(const char *what)
{
	char q[512];
	PGresult *res;
	int n;

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM pg_stat_activity WHERE datname = '%s'"
		 " AND usename = 'daybook_query' AND query LIKE '%s%%'",
		 db, what);
	res = sql(db, q);
	n = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	return n;
}

/* Is the query service's position subscriber connected to Redis? */
static bool position_subscriber_connected(void)
{
	redisReply *r = redisCommand(rc, "CLIENT LIST TYPE pubsub");
	bool found;

	cr_assert(r && r->type == REDIS_REPLY_STRING, "redis: %s", rc->errstr);
	found = strstr(r->str, "name=daybook-query-position") != NULL;
	freeReplyObject(r);
	return found;
}

Test(query, a_worker_listens_and_subscribes_only_while_someone_waits_and_again_for_a_later_one,
     .init = setup_without_query)
{
	struct background bg;

	setenv("DAYBOOK_WAIT_PROBE_MS", "600000", 1); /* no safety probe within the test */
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	start_background(&bg, "/accounts/a1?min_position=6.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	move_sql_checkpoint("6", "0", true);
	join_background(&bg);
	expect_ok(&bg.r, acct_a1, "6.0");
	response_free(&bg.r);
	/* A moment after its last waiter the worker stops listening: its backends are
	 * then not woken by every NOTIFY of the database. */
	for (double deadline = harness_now() + 10;
	     query_sessions_last_running("UNLISTEN") == 0 && harness_now() < deadline;)
		usleep(100000);
	cr_assert_gt(query_sessions_last_running("UNLISTEN"), 0, "nobody waits, yet it listens");
	/* Nor is the position subscriber kept, whose every message would wake it. */
	for (double deadline = harness_now() + 10;
	     position_subscriber_connected() && harness_now() < deadline;)
		usleep(100000);
	cr_assert_not(position_subscriber_connected(), "nobody waits, yet it subscribes");
	/* A later waiter makes it listen again, and the notification wakes it: once the
	 * LISTEN and the probe after it are done, only the NOTIFY (or a position message,
	 * which nobody sends here) can. */
	start_background(&bg, "/accounts/a1?min_position=7.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	sleep(1);
	cr_assert_not(atomic_load(&bg.done), "answered before the checkpoint moved");
	move_sql_checkpoint("7", "0", true);
	join_background(&bg);
	expect_ok(&bg.r, acct_a1, "7.0");
	response_free(&bg.r);
}

Test(query, a_lost_notification_is_made_up_for_when_postgresql_reconnects,
     .init = setup_without_query)
{
	struct background bg;
	char q[256];

	setenv("DAYBOOK_WAIT_PROBE_MS", "600000", 1);
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	start_background(&bg, "/accounts/a1?min_position=6.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	move_sql_checkpoint("6", "0", false);
	snprintf(q, sizeof(q),
		 "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s'"
		 " AND usename = 'daybook_query'",
		 db);
	exec_sql(q);
	join_background(&bg);
	expect_ok(&bg.r, acct_a1, "6.0");
	response_free(&bg.r);
}

Test(query, a_lost_redis_message_is_made_up_for_when_the_subscriber_reconnects,
     .init = setup_without_query)
{
	struct background bg;

	setenv("DAYBOOK_WAIT_PROBE_MS", "600000", 1);
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	fill_redis();
	go_live();
	start_background(&bg, "/transfers/t1?min_position=8.0&wait_ms=10000");
	wait_for_waiters(&svc, 1);
	redis("SET dbk:g:1:checkpoint 8.0"); /* and no message */
	redis("CLIENT KILL TYPE pubsub");
	join_background(&bg);
	expect_ok(&bg.r, xfer_t1, "8.0");
	response_free(&bg.r);
}

/* --- outages -------------------------------------------------------------------- */

Test(query, redis_unreachable_from_the_start_reads_come_from_sql, .init = setup_without_query)
{
	harness_kill(&redis_svc); /* its port is now closed */
	harness_start_query(&svc, db, redis_url);
	fill_sql();
	check("/accounts/a1", acct_a1, SQL_POS);
	check("/accounts/a1/transactions?limit=1", NULL, SQL_POS);
	check("/transfers/t1", xfer_t1, SQL_POS);
	check("/totals", totals, SQL_POS);
	check("/accounts/a1?min_position=5.10", acct_a1, SQL_POS);
	cr_assert(harness_wait_status(&svc, "/readyz", 200, 1),
		  "Redis down must not make /readyz fail");
	cr_assert_geq(fallbacks("unavailable"), 5);
}

static void wait_for_position(const char *path, const char *pos)
{
	double end = harness_now() + 10;
	char h[64] = "";

	while (harness_now() < end) {
		struct response r = get(path);
		bool done = r.status == 200 &&
			    response_header(&r, "X-Daybook-Position", h, sizeof(h)) &&
			    strcmp(h, pos) == 0;
		response_free(&r);
		if (done)
			return;
		usleep(50000);
	}
	cr_assert_fail("%s was not served at %s within 10 s (last %s)", path, pos, h);
}

Test(query, redis_dying_then_returning)
{
	fill_sql();
	fill_redis();
	go_live();
	check("/accounts/a1", acct_a1, REDIS_POS);
	redisFree(rc);
	rc = NULL;
	harness_kill(&redis_svc);
	check("/accounts/a1", acct_a1, SQL_POS);
	check("/totals", totals, SQL_POS);
	harness_start_redis(&redis_svc, true, redis_url, sizeof(redis_url));
	rc = harness_redis(redis_url);
	fill_redis();
	go_live();
	wait_for_position("/accounts/a1", REDIS_POS); /* reconnected by itself */
}

Test(query, hung_redis_never_holds_a_read)
{
	double t0;

	fill_sql();
	fill_redis();
	go_live();
	check("/accounts/a1", acct_a1, REDIS_POS);
	kill(redis_svc.pid, SIGSTOP);
	t0 = harness_now();
	check("/accounts/a1", acct_a1, SQL_POS);
	/* Dropped after 250 ms; the bound only says "not forever" on a busy machine. */
	cr_assert_lt(harness_now() - t0, 5.0, "a hung Redis held the read %.2f s",
		     harness_now() - t0);
	check("/transfers/t1", xfer_t1, SQL_POS);
	kill(redis_svc.pid, SIGCONT);
	wait_for_position("/accounts/a1", REDIS_POS);
	cr_assert_geq(fallbacks("unavailable"), 1);
}

static void set_pg_access(bool allowed)
{
	char q[512];

	snprintf(q, sizeof(q), "%s CONNECT ON DATABASE %s %s PUBLIC, daybook_query",
		 allowed ? "GRANT" : "REVOKE", db, allowed ? "TO" : "FROM");
	exec_sql(q);
	if (!allowed) {
		snprintf(q, sizeof(q),
			 "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s'"
			 " AND usename = 'daybook_query'",
			 db);
		exec_sql(q);
	}
}

Test(query, postgresql_unreachable_redis_still_answers_and_the_rest_is_503)
{
	fill_sql();
	fill_redis();
	go_live();
	set_pg_access(false);
	cr_assert(harness_wait_status(&svc, "/readyz", 503, 5),
		  "/readyz should fail without PostgreSQL");
	check("/accounts/a1", acct_a1, REDIS_POS);
	check_problem("/accounts/b1", 503, "unavailable", NULL);        /* a Redis miss */
	check_problem("/accounts/a1/events", 503, "unavailable", NULL); /* SQL only */
	set_pg_access(true);
	cr_assert(harness_wait_status(&svc, "/readyz", 200, 10), "no reconnection to PostgreSQL");
	check("/accounts/b1", NULL, SQL_POS);
}

Test(query, sigterm_finishes_a_waiting_read_then_exits_0)
{
	struct background bg;

	fill_sql();
	start_background(&bg, "/accounts/a1?min_position=6.0&wait_ms=5000");
	wait_for_waiters(&svc, 1);
	kill(svc.pid, SIGTERM);
	cr_assert(harness_wait_log(&svc, "no longer accepting", harness_now() + 10),
		  "the service did not take the SIGTERM");
	exec_sql(
		"UPDATE projection_checkpoints SET txid = '6', position = 0 WHERE projection = 'sql'");
	join_background(&bg);
	expect_ok(&bg.r, acct_a1, "6.0");
	response_free(&bg.r);
	cr_assert_eq(harness_stop(&svc), 0);
}

/* --- end to end: daybook-command → daybook-projector → daybook-query ------------------ */

static struct service command, projector, sql_only; /* sql_only: a query service without Redis */
static char dead_redis_url[128];

static void setup_e2e(void)
{
	struct service dead;

	setup_services(false);
	harness_start_redis(&dead, false, dead_redis_url, sizeof(dead_redis_url));
	harness_kill(&dead); /* nothing listens there any more */
	harness_start_command(&command, db);
	harness_start_projector(&projector, db, redis_url);
	harness_start_query(&svc, db, redis_url);
	harness_start_query(&sql_only, db, dead_redis_url);
}

static void teardown_e2e(void)
{
	harness_stop(&sql_only);
	harness_stop(&projector);
	harness_stop(&command);
	teardown();
}

TestSuite(query_e2e, .init = setup_e2e, .fini = teardown_e2e, .timeout = 90);

/* POST to the command service; the write's position token into pos. */
static void command_post(const char *path, const char *body, char *pos, size_t len)
{
	struct response r = post(&command, path, body, NULL);

	cr_assert_eq(r.status, 201, "%s %s: %d %s", path, body, r.status, r.body);
	snprintf(pos, len, "%s", json_string_value(json_object_get(r.json, "position")));
	response_free(&r);
}

static struct response get_from(const struct service *s, const char *path)
{
	const char *headers[] = { "Authorization: Bearer " TOKEN_READ, NULL };

	return http_request(s->port, "GET", path, headers, NULL, 20);
}

Test(query_e2e, a_write_is_readable_at_its_position_and_both_models_agree)
{
	static const char *const paths[] = {
		"/accounts/alice",
		"/accounts/bob",
		"/accounts/alice/transactions",
		"/accounts/bob/transactions?limit=1",
		"/transfers/tx-1",
		"/totals",
		"/accounts/alice/events",
	};
	char pos[64], path[256], h[64];
	struct response r;

	command_post("/accounts", "{\"id\":\"alice\",\"name\":\"Alice\",\"currency\":\"EUR\"}", pos,
		     sizeof(pos));
	command_post("/accounts",
		     "{\"id\":\"bob\",\"name\":\"Bob\",\"currency\":\"EUR\",\"overdraft_limit\":50}",
		     pos, sizeof(pos));
	command_post("/accounts/alice/deposits", "{\"amount\":1000,\"reference\":\"pay \\u00e9\"}",
		     pos, sizeof(pos));
	command_post("/transfers",
		     "{\"id\":\"tx-1\",\"from\":\"alice\",\"to\":\"bob\",\"amount\":300}", pos,
		     sizeof(pos));

	/* Read-your-writes: the transfer is visible at once at its position. */
	snprintf(path, sizeof(path), "/accounts/bob?min_position=%s&wait_ms=5000", pos);
	r = get(path);
	cr_assert_eq(r.status, 200, "%d %s", r.status, r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 300);
	expect_header(&r, "ETag", "\"2\"");
	response_free(&r);

	/* Redis (written by the projector) and SQL serve the same bytes. Redis is written
	 * after SQL, so a read at the position may come from SQL until Redis has it too. */
	harness_wait_caught_up(db, redis_url, 30);
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		struct response a, b;
		snprintf(path, sizeof(path), "%s%cmin_position=%s&wait_ms=5000", paths[i],
			 strchr(paths[i], '?') ? '&' : '?', pos);
		a = get_from(&svc, path);
		b = get_from(&sql_only, path);
		cr_assert_eq(a.status, 200, "%s: %d %s", path, a.status, a.body);
		cr_assert_eq(b.status, 200, "%s: %d %s", path, b.status, b.body);
		cr_assert_str_eq(a.body, b.body, "%s differs:\nredis %s\nsql   %s", paths[i],
				 a.body, b.body);
		cr_assert(response_header(&a, "X-Daybook-Position", h, sizeof(h)));
		response_free(&a);
		response_free(&b);
	}
	cr_assert_geq(harness_metric(&svc, "daybook_query_reads_total{model=\"redis\"}"), 5,
		      "the projector's Redis model should have answered");
}

/* The reads of `paths` on s, each on its own thread and connection. */
struct waiting_read {
	pthread_t thread;
	const struct service *svc;
	char path[256];
	struct response r;
};

static void *waiting_get(void *arg)
{
	struct waiting_read *w = arg;

	w->r = get_from(w->svc, w->path);
	return NULL;
}

/* Half account reads, half event-store reads, all for the next write's position. */
static void start_waiting_reads(struct waiting_read *w, size_t n, const struct service *s,
				const char *account, const char *min)
{
	for (size_t i = 0; i < n; i++) {
		w[i].svc = s;
		snprintf(w[i].path, sizeof(w[i].path),
			 "/accounts/%s%s?min_position=%s&wait_ms=10000", account,
			 i % 2 ? "/events" : "", min);
		cr_assert_eq(pthread_create(&w[i].thread, NULL, waiting_get, &w[i]), 0);
	}
}

/* Each read got the deposit of 700 made after the account was opened. */
static void expect_deposit_seen(struct waiting_read *w, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		pthread_join(w[i].thread, NULL);
		cr_assert_eq(w[i].r.status, 200, "%s: %d %s", w[i].path, w[i].r.status,
			     w[i].r.body);
		if (i % 2)
			cr_assert_eq(json_array_size(json_object_get(w[i].r.json, "events")), 2,
				     "%s: %s", w[i].path, w[i].r.body);
		else
			cr_assert_eq(json_integer_value(json_object_get(w[i].r.json, "balance")),
				     700, "%s: %s", w[i].path, w[i].r.body);
		response_free(&w[i].r);
	}
}

/* The position just past every event so far: the next write's transaction has a
 * larger txid, so it reaches it, and nothing reaches it before. */
static void next_position(const char *pos, char *min, size_t len)
{
	snprintf(min, len, "%llu.0", strtoull(pos, NULL, 10) + 1);
}

Test(query_e2e, hundreds_of_waiting_reads_cost_a_bounded_number_of_probes_then_all_get_the_write)
{
	enum { N = 300 };
	struct waiting_read *w = calloc(N, sizeof(*w));
	char pos[64], min[64];
	double p0, p1, t0, elapsed;

	cr_assert(w);
	command_post("/accounts", "{\"id\":\"w\",\"name\":\"W\",\"currency\":\"EUR\"}", pos,
		     sizeof(pos));
	next_position(pos, min, sizeof(min));
	start_waiting_reads(w, N, &svc, "w", min);
	wait_for_waiters(&svc, N);
	p0 = harness_metric(&svc, "daybook_query_position_probes_total{model=\"sql\"}");
	t0 = harness_now();
	usleep(1000000); /* the window in which the probes are counted */
	p1 = harness_metric(&svc, "daybook_query_position_probes_total{model=\"sql\"}");
	elapsed = harness_now() - t0;
	cr_assert_geq(p0, 0, "no probe counter");
	cr_log_info("%g SQL probes in %.2f s for %d waiting reads", p1 - p0, elapsed, N);
	/* Polling made about 200 statements per waiter and second; one shared probe makes
	 * a handful per worker and second, however many wait. */
	cr_assert_lt(p1 - p0, 50 * elapsed, "%g SQL probes in %.2f s for %d waiting reads", p1 - p0,
		     elapsed, N);
	command_post("/accounts/w/deposits", "{\"amount\":700}", pos, sizeof(pos));
	expect_deposit_seen(w, N);
	free(w);
}

Test(query_e2e, the_projectors_commit_wakes_waiting_reads_without_any_polling)
{
	struct waiting_read w[2] = { 0 };
	struct service quiet;
	char pos[64], min[64];

	/* SQL only (its Redis is gone), and no safety probe within the test: only the
	 * projector's NOTIFY can end the wait in time. */
	setenv("DAYBOOK_WAIT_PROBE_MS", "600000", 1);
	harness_start_query(&quiet, db, dead_redis_url);
	unsetenv("DAYBOOK_WAIT_PROBE_MS");
	command_post("/accounts", "{\"id\":\"q\",\"name\":\"Q\",\"currency\":\"EUR\"}", pos,
		     sizeof(pos));
	next_position(pos, min, sizeof(min));
	start_waiting_reads(w, 2, &quiet, "q", min);
	wait_for_waiters(&quiet, 2);
	command_post("/accounts/q/deposits", "{\"amount\":700}", pos, sizeof(pos));
	expect_deposit_seen(w, 2);
	cr_assert_eq(harness_stop(&quiet), 0);
}

/* Position messages of another deployment (its own Redis database on the
 * same server: PUBLISH is not per database) wake every waiting read, each of which
 * then reads Redis and SQL again. */
static char foreign_db[64], foreign_redis_url[128];
static struct service foreign_query, foreign_redis;
static atomic_int foreign_answered;
static char foreign_path[256];

static void *foreign_waiter(void *arg)
{
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct response r;

	(void)arg;
	r = http_request(foreign_query.port, "GET", foreign_path, h, NULL, 20);
	atomic_fetch_add(&foreign_answered, 1);
	response_free(&r);
	return NULL;
}

/* SQL fallbacks of n waiting reads (n <= 20) while 100 position messages come, foreign or
 * none. */
static double foreign_round(bool foreign, int n)
{
	pthread_t t[20];
	redisContext *c = harness_redis(foreign_redis_url);
	double before = harness_metric(&foreign_query,
				       "daybook_query_redis_fallbacks_total{reason=\"no_live\"}") +
			harness_metric(&foreign_query,
				       "daybook_query_redis_fallbacks_total{reason=\"behind\"}");
	double after;

	atomic_store(&foreign_answered, 0);
	for (int i = 0; i < n; i++)
		pthread_create(&t[i], NULL, foreign_waiter, NULL);
	/* Messages before the reads wait would wake nobody, and prove nothing. */
	wait_for_waiters(&foreign_query, n);
	for (int i = 0; i < 100; i++) {
		usleep(20000); /* paces the messages over the reads' 3 s wait */
		if (foreign)
			freeReplyObject(
				redisCommand(c, "PUBLISH dbk:position %s", "7 900000000.1"));
	}
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	after = harness_metric(&foreign_query,
			       "daybook_query_redis_fallbacks_total{reason=\"no_live\"}") +
		harness_metric(&foreign_query,
			       "daybook_query_redis_fallbacks_total{reason=\"behind\"}");
	redisFree(c);
	return after - before;
}

Test(query_positions, position_messages_of_another_deployment_do_not_make_waiters_read_sql_again,
     .timeout = 120)
{
	double quiet, foreign;

	harness_db_create(foreign_db, sizeof(foreign_db));
	harness_start_redis(&foreign_redis, false, foreign_redis_url, sizeof(foreign_redis_url));
	harness_start_query(&foreign_query, foreign_db, foreign_redis_url);
	snprintf(foreign_path, sizeof(foreign_path),
		 "/accounts/nobody?min_position=800000000.1&wait_ms=3000");
	/* 20 reads: more than a message wakes by its claim on each worker, so the probe
	 * looks; 4: few enough that each message wakes them by its claim, and each must
	 * go back to waiting when Redis has no live model of this store, not to SQL. */
	for (int n = 20; n > 0; n = n == 20 ? 4 : 0) {
		quiet = foreign_round(false, n);
		foreign = foreign_round(true, n);
		fprintf(stderr,
			"r1: SQL fallbacks by %d waiting reads over 2 s: %.0f without messages, "
			"%.0f with 100 foreign position messages\n",
			n, quiet, foreign);
		cr_expect_lt(foreign, 2 * quiet + 40,
			     "foreign messages made %d waiting reads poll SQL", n);
	}
	harness_stop(&foreign_query);
	harness_kill(&foreign_redis);
}
