/* The write API through HTTP: every route, every refusal of SPEC §3, auth and limits. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(write_api, .init = setup, .fini = teardown, .timeout = 60);

/* Assert a status and, for problems, the problem code and content type. */
static void expect(struct response *r, int status, const char *code)
{
	char ct[128] = "";

	cr_assert_eq(r->status, status, "expected %d, got %d: %s", status, r->status,
		     r->body ? r->body : "(no body)");
	response_header(r, "Content-Type", ct, sizeof(ct));
	if (code) {
		cr_assert_str_eq(ct, "application/problem+json");
		cr_assert_str_eq(json_string_value(json_object_get(r->json, "code")), code,
				 "body: %s", r->body);
		cr_assert_eq(json_integer_value(json_object_get(r->json, "status")), status);
		cr_assert(json_is_string(json_object_get(r->json, "type")));
		cr_assert(json_is_string(json_object_get(r->json, "title")));
		cr_assert(json_is_string(json_object_get(r->json, "detail")));
		/* Every problem names the request it answers (RFC 9457 "instance"). */
		char id[160] = "";
		cr_assert(response_header(r, "X-Request-Id", id, sizeof(id)));
		cr_assert_str_eq(json_string_value(json_object_get(r->json, "instance")), id,
				 "body: %s", r->body);
	} else {
		cr_assert_str_eq(ct, "application/json");
	}
}

static void call(const char *path, const char *body, int status, const char *code)
{
	struct response r = post(&stack.command, path, body, NULL);
	expect(&r, status, code);
	response_free(&r);
}

static void open_account(const char *id, const char *currency, long long overdraft)
{
	char body[256];

	snprintf(body, sizeof(body),
		 "{\"id\":\"%s\",\"name\":\"Account %s\",\"currency\":\"%s\",\"overdraft_limit\":%lld}",
		 id, id, currency, overdraft);
	call("/accounts", body, 201, NULL);
}

static long long events_of(const char *stream)
{
	char q[256];
	snprintf(q, sizeof(q), "SELECT count(*) FROM events WHERE stream = '%s'", stream);
	return sql_int(stack.db, q);
}

Test(write_api, open_account_answers_201_with_location_etag_and_position)
{
	struct response r = post(&stack.command, "/accounts",
				 "{\"id\":\"acc-1\",\"name\":\"Alice\",\"currency\":\"EUR\"}",
				 NULL);
	char h[128];

	expect(&r, 201, NULL);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "account_id")), "acc-1");
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 1);
	cr_assert(json_is_string(json_object_get(r.json, "position")));
	cr_assert(response_header(&r, "Location", h, sizeof(h)));
	cr_assert_str_eq(h, "/accounts/acc-1");
	cr_assert(response_header(&r, "ETag", h, sizeof(h)));
	cr_assert_str_eq(h, "\"1\"");
	response_free(&r);

	PGresult *ev = sql(stack.db,
			   "SELECT type, data->>'currency', (data->>'overdraft_limit')::bigint, "
			   "data->>'name' FROM events WHERE stream = 'account-acc-1'");
	cr_assert_eq(PQntuples(ev), 1);
	cr_assert_str_eq(PQgetvalue(ev, 0, 0), "AccountOpened");
	cr_assert_str_eq(PQgetvalue(ev, 0, 1), "EUR");
	cr_assert_str_eq(PQgetvalue(ev, 0, 2), "0");
	cr_assert_str_eq(PQgetvalue(ev, 0, 3), "Alice");
	PQclear(ev);
}

Test(write_api, opening_an_existing_account_is_409)
{
	open_account("dup", "EUR", 0);
	call("/accounts", "{\"id\":\"dup\",\"name\":\"Again\",\"currency\":\"USD\"}", 409,
	     "account_exists");
	cr_assert_eq(events_of("account-dup"), 1);
}

Test(write_api, malformed_and_mistyped_bodies_are_400_naming_the_field)
{
	static const struct {
		const char *body, *field;
	} cases[] = {
		{ "{not json", "malformed" },
		{ "[1,2]", "object" },
		{ "{\"name\":\"A\",\"currency\":\"EUR\"}", "id" },
		{ "{\"id\":\"a\",\"currency\":\"EUR\"}", "name" },
		{ "{\"id\":\"a\",\"name\":\"A\"}", "currency" },
		{ "{\"id\":\"a b\",\"name\":\"A\",\"currency\":\"EUR\"}", "id" },
		{ "{\"id\":\"\",\"name\":\"A\",\"currency\":\"EUR\"}", "id" },
		{ "{\"id\":7,\"name\":\"A\",\"currency\":\"EUR\"}", "id" },
		{ "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"eur\"}", "currency" },
		{ "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EURO\"}", "currency" },
		{ "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":-1}",
		  "overdraft_limit" },
		{ "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":1.5}",
		  "overdraft_limit" },
		{ "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"color\":\"red\"}", "color" },
		{ "{\"id\":\"a\",\"id\":\"b\",\"name\":\"A\",\"currency\":\"EUR\"}", "duplicate" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct response r = post(&stack.command, "/accounts", cases[i].body, NULL);
		expect(&r, 400, "invalid_request");
		const char *detail = json_string_value(json_object_get(r.json, "detail"));
		cr_assert(strstr(detail, cases[i].field), "detail '%s' should name '%s' (body %s)",
			  detail, cases[i].field, cases[i].body);
		response_free(&r);
	}
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events"), 0, "nothing may be written");
}

Test(write_api, amounts_out_of_range_are_400)
{
	static const char *const bodies[] = {
		"{\"amount\":0}",
		"{\"amount\":-5}",
		"{\"amount\":1000000000000001}",
		"{\"amount\":\"100\"}",
		"{\"amount\":10.0}",
		"{}",
		"{\"amount\":5,\"reference\":7}",
	};

	open_account("amt", "EUR", 0);
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
		call("/accounts/amt/deposits", bodies[i], 400, "invalid_request");
		call("/accounts/amt/withdrawals", bodies[i], 400, "invalid_request");
	}
	call("/accounts/amt/deposits", "{\"amount\":1000000000000000}", 201, NULL);
	cr_assert_eq(events_of("account-amt"), 2);
}

Test(write_api, deposit_and_withdrawal_report_version_and_balance)
{
	struct response r;

	open_account("dw", "EUR", 0);
	r = post(&stack.command, "/accounts/dw/deposits",
		 "{\"amount\":1000,\"reference\":\"salary\"}", NULL);
	expect(&r, 201, NULL);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 2);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 1000);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "account_id")), "dw");
	cr_assert(json_is_string(json_object_get(r.json, "position")));
	response_free(&r);
	r = post(&stack.command, "/accounts/dw/withdrawals", "{\"amount\":400}", NULL);
	expect(&r, 201, NULL);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 3);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 600);
	response_free(&r);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT (data->>'amount')::bigint FROM events WHERE stream = "
			     "'account-dw' AND type = 'FundsWithdrawn'"),
		     400);
}

Test(write_api, unknown_accounts_are_404)
{
	call("/accounts/ghost/deposits", "{\"amount\":1}", 404, "account_not_found");
	call("/accounts/ghost/withdrawals", "{\"amount\":1}", 404, "account_not_found");
	call("/accounts/ghost/close", NULL, 404, "account_not_found");
	call("/accounts/bad%20id/deposits", "{\"amount\":1}", 400, "invalid_request");
}

Test(write_api, withdrawals_respect_the_overdraft_limit)
{
	open_account("od", "EUR", 500);
	call("/accounts/od/withdrawals", "{\"amount\":501}", 422, "insufficient_funds");
	call("/accounts/od/withdrawals", "{\"amount\":500}", 201, NULL);
	call("/accounts/od/withdrawals", "{\"amount\":1}", 422, "insufficient_funds");
	cr_assert_eq(events_of("account-od"), 2);
}

Test(write_api, deposits_that_would_overflow_are_422)
{
	/* Reaching the int64 edge over HTTP takes 9,224 deposits; the log can hold it directly. */
	open_account("big", "EUR", 0);
	PQclear(sql(stack.db,
		    "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		    "('account-big', 2, 'FundsDeposited', '{\"amount\": 9223372036854775000}', '{}')"));
	call("/accounts/big/deposits", "{\"amount\":808}", 422, "overflow");
	call("/accounts/big/deposits", "{\"amount\":807}", 201, NULL);
	call("/accounts/big/deposits", "{\"amount\":1}", 422, "overflow");
}

Test(write_api, transfers_move_money_atomically)
{
	struct response r;

	open_account("tf-a", "EUR", 0);
	open_account("tf-b", "EUR", 0);
	call("/accounts/tf-a/deposits", "{\"amount\":1000}", 201, NULL);
	r = post(&stack.command, "/transfers",
		 "{\"id\":\"tx-1\",\"from\":\"tf-a\",\"to\":\"tf-b\",\"amount\":300,\"reference\":\"rent\"}",
		 NULL);
	expect(&r, 201, NULL);
	cr_assert_str_eq(json_string_value(json_object_get(r.json, "transfer_id")), "tx-1");
	cr_assert_eq(json_integer_value(json_object_get(r.json, "from_version")), 3);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "to_version")), 2);
	cr_assert(json_is_string(json_object_get(r.json, "position")));
	/* Where the query API serves the transfer. */
	char location[128] = "";
	cr_assert(response_header(&r, "Location", location, sizeof(location)));
	cr_assert_str_eq(location, "/transfers/tx-1");
	response_free(&r);

	/* Both sides committed in one transaction. */
	cr_assert_eq(
		sql_int(stack.db,
			"SELECT count(DISTINCT txid) FROM events WHERE data->>'transfer_id' = 'tx-1'"),
		1);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events WHERE data->>'transfer_id' = 'tx-1'"),
		     2);
	cr_assert_eq(sql_int(stack.db, "SELECT (data->>'amount')::bigint FROM events WHERE type = "
				       "'TransferReceived' AND data->>'from' = 'tf-a'"),
		     300);
	call("/transfers", "{\"id\":\"tx-1\",\"from\":\"tf-a\",\"to\":\"tf-b\",\"amount\":1}", 409,
	     "transfer_exists");
}

Test(write_api, transfer_refusals)
{
	open_account("r-eur", "EUR", 0);
	open_account("r-eur2", "EUR", 0);
	open_account("r-usd", "USD", 0);
	open_account("r-closed", "EUR", 0);
	call("/accounts/r-closed/close", NULL, 201, NULL);
	call("/accounts/r-eur/deposits", "{\"amount\":100}", 201, NULL);

	call("/transfers", "{\"id\":\"x1\",\"from\":\"r-eur\",\"to\":\"r-eur2\",\"amount\":101}",
	     422, "insufficient_funds");
	call("/transfers", "{\"id\":\"x2\",\"from\":\"r-eur\",\"to\":\"r-usd\",\"amount\":1}", 422,
	     "currency_mismatch");
	call("/transfers", "{\"id\":\"x3\",\"from\":\"r-eur\",\"to\":\"r-eur\",\"amount\":1}", 422,
	     "same_account");
	call("/transfers", "{\"id\":\"x4\",\"from\":\"r-eur\",\"to\":\"r-closed\",\"amount\":1}",
	     422, "account_closed");
	call("/transfers", "{\"id\":\"x5\",\"from\":\"r-eur\",\"to\":\"nobody\",\"amount\":1}", 404,
	     "account_not_found");
	call("/transfers", "{\"id\":\"x6\",\"from\":\"nobody\",\"to\":\"r-eur\",\"amount\":1}", 404,
	     "account_not_found");
	call("/transfers", "{\"id\":\"bad id\",\"from\":\"r-eur\",\"to\":\"r-eur2\",\"amount\":1}",
	     400, "invalid_request");
	call("/transfers", "{\"id\":\"x7\",\"from\":\"r-eur\",\"to\":\"r-eur2\"}", 400,
	     "invalid_request");
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events WHERE type LIKE 'Transfer%'"),
		     0);
}

Test(write_api, closing_needs_a_zero_balance_and_stops_everything)
{
	struct response r;

	open_account("cl", "EUR", 0);
	call("/accounts/cl/deposits", "{\"amount\":5}", 201, NULL);
	call("/accounts/cl/close", NULL, 422, "nonzero_balance");
	call("/accounts/cl/withdrawals", "{\"amount\":5}", 201, NULL);
	r = post(&stack.command, "/accounts/cl/close", "{}", NULL);
	expect(&r, 201, NULL);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 4);
	response_free(&r);
	call("/accounts/cl/deposits", "{\"amount\":5}", 422, "account_closed");
	call("/accounts/cl/withdrawals", "{\"amount\":5}", 422, "account_closed");
	call("/accounts/cl/close", NULL, 422, "account_closed");
	call("/accounts/cl/close", "{\"force\":true}", 400, "invalid_request");
	cr_assert_eq(events_of("account-cl"), 4);
}

Test(write_api, if_match_guards_the_version)
{
	const char *stale[] = { "If-Match: \"1\"", NULL };
	const char *fresh[] = { "If-Match: \"2\"", NULL };
	const char *junk[] = { "If-Match: banana", NULL };
	struct response r;
	char etag[32];

	open_account("im", "EUR", 0);
	call("/accounts/im/deposits", "{\"amount\":10}", 201, NULL);
	r = post(&stack.command, "/accounts/im/deposits", "{\"amount\":10}", stale);
	expect(&r, 412, "version_mismatch");
	response_free(&r);
	r = post(&stack.command, "/accounts/im/withdrawals", "{\"amount\":10}", junk);
	expect(&r, 400, "invalid_request");
	response_free(&r);
	r = post(&stack.command, "/accounts/im/withdrawals", "{\"amount\":10}", fresh);
	expect(&r, 201, NULL);
	cr_assert(response_header(&r, "ETag", etag, sizeof(etag)));
	cr_assert_str_eq(etag, "\"3\"");
	response_free(&r);
	r = post(&stack.command, "/accounts/im/close", NULL, fresh);
	expect(&r, 412, "version_mismatch");
	response_free(&r);
	cr_assert_eq(events_of("account-im"), 3);
}

Test(write_api, bodies_over_64_kib_are_413_and_write_nothing)
{
	size_t n = 64 * 1024 + 1;
	char *body = malloc(n + 64);

	snprintf(body, n + 64, "{\"id\":\"big\",\"name\":\"A\",\"currency\":\"EUR\",\"pad\":\"");
	size_t len = strlen(body);
	memset(body + len, 'x', n - len);
	strcpy(body + n, "\"}");
	call("/accounts", body, 413, "payload_too_large");
	free(body);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events"), 0);
}

Test(write_api, tokens_are_required_and_scoped)
{
	const char *none[] = { "Content-Type: application/json", NULL };
	const char *unknown[] = { "Authorization: Bearer nope", "Content-Type: application/json",
				  NULL };
	const char *reader[] = { "Authorization: Bearer " TOKEN_READ,
				 "Content-Type: application/json", NULL };
	const char *body = "{\"id\":\"auth\",\"name\":\"A\",\"currency\":\"EUR\"}";
	struct response r;

	r = http_request(stack.command.port, "POST", "/accounts", none, body, 10);
	expect(&r, 401, "unauthorized");
	response_free(&r);
	r = http_request(stack.command.port, "POST", "/accounts", unknown, body, 10);
	expect(&r, 401, "unauthorized");
	response_free(&r);
	r = http_request(stack.command.port, "POST", "/accounts", reader, body, 10);
	expect(&r, 403, "forbidden");
	response_free(&r);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM events"), 0);
	/* The probes need no token. */
	r = http_request(stack.command.port, "GET", "/healthz", NULL, NULL, 10);
	cr_assert_eq(r.status, 200);
	response_free(&r);
	r = http_request(stack.command.port, "GET", "/metrics", NULL, NULL, 10);
	cr_assert_eq(r.status, 200);
	cr_assert(strstr(r.body, "daybook_http_requests_total"));
	response_free(&r);
}

Test(write_api, unknown_routes_and_methods)
{
	const char *auth[] = { "Authorization: Bearer " TOKEN_WRITE, NULL };
	struct response r;
	char allow[64];

	r = http_request(stack.command.port, "GET", "/nowhere", auth, NULL, 10);
	expect(&r, 404, "not_found");
	response_free(&r);
	r = http_request(stack.command.port, "GET", "/accounts", auth, NULL, 10);
	expect(&r, 405, "method_not_allowed");
	cr_assert(response_header(&r, "Allow", allow, sizeof(allow)));
	cr_assert_str_eq(allow, "POST");
	response_free(&r);
	r = http_request(stack.command.port, "DELETE", "/accounts/x/deposits", auth, NULL, 10);
	expect(&r, 405, "method_not_allowed");
	response_free(&r);
}

Test(write_api, wrong_content_type_is_415)
{
	const char *form[] = { "Authorization: Bearer " TOKEN_WRITE,
			       "Content-Type: application/x-www-form-urlencoded", NULL };
	struct response r = http_request(stack.command.port, "POST", "/accounts", form,
					 "{\"id\":\"ct\",\"name\":\"A\",\"currency\":\"EUR\"}", 10);

	expect(&r, 415, "unsupported_media_type");
	response_free(&r);
}

Test(write_api, request_ids_are_echoed_and_stored_with_the_caller)
{
	const char *extra[] = { "X-Request-Id: req-abc-123", "Idempotency-Key: key-1", NULL };
	struct response r = post(&stack.command, "/accounts",
				 "{\"id\":\"rid\",\"name\":\"A\",\"currency\":\"EUR\"}", extra);
	char id[64];
	PGresult *m;

	expect(&r, 201, NULL);
	cr_assert(response_header(&r, "X-Request-Id", id, sizeof(id)));
	cr_assert_str_eq(id, "req-abc-123");
	response_free(&r);
	m = sql(stack.db,
		"SELECT metadata->>'request_id', metadata->>'token_id', "
		"metadata->>'idempotency_key', metadata->>'time' FROM events WHERE stream = 'account-rid'");
	cr_assert_str_eq(PQgetvalue(m, 0, 0), "req-abc-123");
	cr_assert_str_eq(PQgetvalue(m, 0, 1), "test-write");
	cr_assert_str_eq(PQgetvalue(m, 0, 2), "key-1");
	/* The command's time: UTC to the microsecond, "2026-01-02T03:04:05.678901Z". */
	const char *t = PQgetvalue(m, 0, 3);
	cr_assert_eq(strlen(t), 27, "time: %s", t);
	for (size_t i = 0; i < 27; i++) {
		const char sep = i == 4 || i == 7     ? '-'
				 : i == 10            ? 'T'
				 : i == 13 || i == 16 ? ':'
				 : i == 19            ? '.'
				 : i == 26            ? 'Z'
						      : 0;
		cr_assert(sep ? t[i] == sep : (t[i] >= '0' && t[i] <= '9'), "time: %s", t);
	}
	PQclear(m);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events WHERE stream = 'account-rid' AND "
			     "abs(extract(epoch FROM (metadata->>'time')::timestamptz - "
			     "statement_timestamp())) < 60"),
		     1, "the time is not now");

	/* Without one, the service makes one up and still echoes it. */
	r = post(&stack.command, "/accounts",
		 "{\"id\":\"rid2\",\"name\":\"A\",\"currency\":\"EUR\"}", NULL);
	cr_assert(response_header(&r, "X-Request-Id", id, sizeof(id)));
	cr_assert(strlen(id) >= 8);
	response_free(&r);
}

/* Header names in any case (RFC 9110), and of a header sent twice the first counts, as
 * evhttp finds it: the headers the service reads are picked out in one pass. */
Test(write_api, header_names_match_in_any_case_and_the_first_of_a_repeated_one_counts)
{
	const char *open_headers[] = { "aUTHORIZATION: Bearer " TOKEN_WRITE,
				       "content-TYPE: application/json",
				       "x-request-id: case-1",
				       "X-Request-Id: case-2",
				       "IDEMPOTENCY-KEY: case-key",
				       NULL };
	const char *stale[] = { "authorization: Bearer " TOKEN_WRITE,
				"CONTENT-type: application/json", "if-MATCH: \"7\"", NULL };
	const char *wrong_type[] = { "Authorization: Bearer " TOKEN_WRITE,
				     "content-type: text/plain", "Content-Type: application/json",
				     NULL };
	const char *body = "{\"id\":\"hc\",\"name\":\"A\",\"currency\":\"EUR\"}";
	struct response r = http_request(stack.command.port, "POST", "/accounts", open_headers,
					 body, 30);
	char id[64];

	expect(&r, 201, NULL);
	cr_assert(response_header(&r, "X-Request-Id", id, sizeof(id)));
	cr_assert_str_eq(id, "case-1");
	response_free(&r);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events WHERE stream = 'account-hc' AND "
			     "metadata->>'idempotency_key' = 'case-key' AND "
			     "metadata->>'request_id' = 'case-1'"),
		     1);
	/* The same key again: the stored answer, not a second account. */
	r = http_request(stack.command.port, "POST", "/accounts", open_headers, body, 30);
	expect(&r, 201, NULL);
	cr_assert(response_header(&r, "Idempotent-Replayed", id, sizeof(id)));
	response_free(&r);

	r = http_request(stack.command.port, "POST", "/accounts/hc/deposits", stale,
			 "{\"amount\":5}", 30);
	expect(&r, 412, "version_mismatch");
	response_free(&r);
	r = http_request(stack.command.port, "POST", "/accounts/hc/deposits", wrong_type,
			 "{\"amount\":5}", 30);
	expect(&r, 415, "unsupported_media_type");
	response_free(&r);
	cr_assert_eq(events_of("account-hc"), 1);
}

Test(write_api, versions_are_gap_free_and_sigterm_exits_zero)
{
	open_account("gap", "EUR", 0);
	for (int i = 0; i < 5; i++)
		call("/accounts/gap/deposits", "{\"amount\":1}", 201, NULL);
	cr_assert_eq(sql_int(stack.db,
			     "SELECT count(*) FROM events e WHERE stream = 'account-gap' AND "
			     "version <> (SELECT count(*) FROM events f WHERE f.stream = e.stream "
			     "AND f.position <= e.position)"),
		     0);
	cr_assert_eq(harness_stop(&stack.command), 0);
}

/* Every line of the command service's log as JSON (the test fails on a line that is
 * not); caller json_decrefs the array. */
static json_t *log_lines(void)
{
	/* The service's log (the harness sends its stderr there). */
	FILE *f = fopen(stack.command.log_path, "r");
	json_t *lines = json_array();
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;

	cr_assert_not_null(f, "%s", stack.command.log_path);
	while ((n = getline(&line, &cap, f)) > 0) {
		json_error_t error;
		json_t *j = json_loadb(line, (size_t)n, 0, &error);
		cr_assert(json_is_object(j), "a log line that is not JSON (%s): %s", error.text,
			  line);
		json_array_append_new(lines, j);
	}
	free(line);
	fclose(f);
	return lines;
}

/* The access line of the request with this id; NULL when absent. */
static json_t *access_line(json_t *lines, const char *request_id)
{
	size_t i;
	json_t *j;

	json_array_foreach (lines, i, j) {
		const char *id = json_string_value(json_object_get(j, "request_id"));
		const char *msg = json_string_value(json_object_get(j, "msg"));
		if (id && msg && strcmp(id, request_id) == 0 && strcmp(msg, "request") == 0)
			return j;
	}
	return NULL;
}

Test(write_api, each_request_leaves_one_json_access_line_whatever_its_bytes)
{
	const char *ok_hdr[] = { "X-Request-Id: acc-\"q\"\\1", NULL };
	const char *bad_hdr[] = { "X-Request-Id: acc-2", "Authorization: Bearer " TOKEN_WRITE,
				  "Content-Type: application/json", NULL };
	struct response r;
	json_t *lines, *line;
	double deadline;

	open_account("log-a", "EUR", 0);
	r = post(&stack.command, "/accounts/log-a/deposits", "{\"amount\":5}", ok_hdr);
	expect(&r, 201, NULL);
	response_free(&r);
	/* Quotes, a backslash, a control byte and invalid UTF-8 in the path. */
	r = http_request(stack.command.port, "POST", "/accounts/a\"b\\c\x01\xff\xfe/deposits",
			 bad_hdr, "{\"amount\":5}", 20);
	cr_assert(r.status == 400 || r.status == 404, "%d %s", r.status, r.body);
	response_free(&r);

	/* The lines are written as the requests are answered: wait for the second. */
	for (deadline = harness_now() + 10;; usleep(20000)) {
		lines = log_lines();
		if (access_line(lines, "acc-2") || harness_now() > deadline)
			break;
		json_decref(lines);
	}
	line = access_line(lines, "acc-\"q\"\\1");
	cr_assert_not_null(line, "no access line for the deposit");
	cr_assert_str_eq(json_string_value(json_object_get(line, "level")), "info");
	cr_assert_str_eq(json_string_value(json_object_get(line, "method")), "POST");
	cr_assert_str_eq(json_string_value(json_object_get(line, "route")),
			 "/accounts/{id}/deposits");
	cr_assert_str_eq(json_string_value(json_object_get(line, "path")),
			 "/accounts/log-a/deposits");
	cr_assert_eq(json_integer_value(json_object_get(line, "status")), 201);
	cr_assert_str_eq(json_string_value(json_object_get(line, "token_id")), "test-write");
	cr_assert_gt(json_integer_value(json_object_get(line, "bytes")), 0);
	cr_assert(json_is_real(json_object_get(line, "duration_ms")));
	cr_assert_geq(json_real_value(json_object_get(line, "duration_ms")), 0);

	line = access_line(lines, "acc-2");
	cr_assert_not_null(line, "no access line for the request with a hostile path");
	cr_assert_str_eq(json_string_value(json_object_get(line, "path")),
			 "/accounts/a\"b\\c\x01\xef\xbf\xbd\xef\xbf\xbd/deposits");
	json_decref(lines);
}

Test(write_api, cors_is_off_by_default_and_answers_allowed_origins_when_set)
{
	const char *preflight[] = {
		"Origin: https://app.example", "Access-Control-Request-Method: POST",
		"Access-Control-Request-Headers: authorization, idempotency-key", NULL
	};
	const char *other[] = { "Origin: https://evil.example",
				"Access-Control-Request-Method: POST", NULL };
	const char *env[] = { "DAYBOOK_CORS_ORIGINS", "https://app.example, https://b.example",
			      NULL };
	const char *from_app[] = { "Origin: https://app.example", NULL };
	struct service cors;
	struct response r;
	char v[256], cors_db[64];

	/* Off: OPTIONS is a method like any other (405), no CORS header anywhere. */
	r = http_request(stack.command.port, "OPTIONS", "/accounts/x/deposits", preflight, NULL,
			 20);
	cr_assert_eq(r.status, 405, "%s", r.body);
	cr_assert_not(response_header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
	response_free(&r);

	/* A database of its own: one command service leads a database's writes. */
	harness_db_create(cors_db, sizeof(cors_db));
	harness_start_command_env(&cors, cors_db, env);
	r = http_request(cors.port, "OPTIONS", "/accounts/x/deposits", preflight, NULL, 20);
	cr_assert_eq(r.status, 204, "%s", r.body);
	cr_assert(response_header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
	cr_assert_str_eq(v, "https://app.example");
	cr_assert(response_header(&r, "Access-Control-Allow-Methods", v, sizeof(v)));
	cr_assert_not_null(strstr(v, "POST"), "%s", v);
	cr_assert(response_header(&r, "Access-Control-Allow-Headers", v, sizeof(v)));
	cr_assert_not_null(strstr(v, "Idempotency-Key"), "%s", v);
	cr_assert_not_null(strstr(v, "Authorization"), "%s", v);
	response_free(&r);

	/* An origin not on the list gets no CORS header (the browser then refuses). */
	r = http_request(cors.port, "OPTIONS", "/accounts/x/deposits", other, NULL, 20);
	cr_assert_not(response_header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
	response_free(&r);

	/* An actual request from the allowed origin may read the headers it needs. */
	r = post(&cors, "/accounts", "{\"id\":\"cors-a\",\"name\":\"A\",\"currency\":\"EUR\"}",
		 from_app);
	cr_assert_eq(r.status, 201, "%s", r.body);
	cr_assert(response_header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
	cr_assert_str_eq(v, "https://app.example");
	cr_assert(response_header(&r, "Access-Control-Expose-Headers", v, sizeof(v)));
	cr_assert_not_null(strstr(v, "Location"), "%s", v);
	cr_assert(response_header(&r, "Vary", v, sizeof(v)));
	response_free(&r);
	harness_stop(&cors);
}
